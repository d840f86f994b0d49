"""The command line's basics (issue 17): ``--version``, the default config file, ``folders``,
``export --dry-run``, ``-q``, a closed output pipe, and the folder-name escaping as documented.

Against the shared Dovecot (loopback, plain IMAP), the command run as a subprocess as a user
runs it; every subprocess has a timeout.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

import trio_imappool
from trio_imappool import open_pool
from trio_imappool.cli import EXIT_CODES, Settings, classify, main
from trio_imappool.cli._errors import _output_closed
from trio_imappool.cli._parser import _parser
from trio_imappool.exporter import local_folder_name, survey
from trio_imappool.testing import DovecotServer, seed_folders

README = Path(__file__).resolve().parents[2] / "README.md"
ENV = "TRIO_IMAPPOOL_"


def cli(
    *args: str,
    password: str | None,
    env: dict[str, str] | None = None,
    timeout: float = 60,
    **kwargs: Any,
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(ENV)}
    environ.pop("XDG_CONFIG_HOME", None)
    environ["HOME"] = "/nonexistent-home-for-tests"  # no user's default config file
    environ.update(env or {})
    if password is not None:
        environ[f"{ENV}PASSWORD"] = password
    if "stdout" not in kwargs:
        kwargs["capture_output"] = True
    return subprocess.run(
        [sys.executable, "-m", "trio_imappool", *args],
        text=True,
        timeout=timeout,
        env=environ,
        stdin=subprocess.DEVNULL,
        check=False,
        **kwargs,
    )


def server_args(account: dict[str, Any]) -> list[str]:
    return [
        "--plain",
        "--host",
        account["host"],
        "--port",
        str(account["port"]),
        "--user",
        account["username"],
    ]


def snapshot(top: Path) -> dict[str, tuple[str, int, str]]:
    """Every entry under *top*: kind, mode and content hash (files), for "nothing changed"."""
    found: dict[str, tuple[str, int, str]] = {}
    for directory, dirs, files in os.walk(top):
        for name in dirs + files:
            path = Path(directory) / name
            stat = path.lstat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if name in files else ""
            found[str(path.relative_to(top))] = ("d" if name in dirs else "f", stat.st_mode, digest)
    return found


def table(stdout: str) -> dict[str, list[str]]:
    """The folders listing's rows by folder name (columns split at runs of 2+ spaces)."""
    rows = {}
    for line in stdout.splitlines()[1:-1]:
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells[1:]
    return rows


# -- --version -----------------------------------------------------------------------------------


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"trio-imappool {trio_imappool.__version__}\n"


# -- the default config file ---------------------------------------------------------------------


def write_config(directory: Path, text: str) -> Path:
    path = directory / "trio-imappool" / "config.toml"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    return path


def test_the_default_config_file_is_read_unless_another_is_named(tmp_path: Path) -> None:
    xdg = tmp_path / "xdg"
    home = tmp_path / "home"
    write_config(xdg, 'host = "from-xdg.example"\n')
    write_config(home / ".config", 'host = "from-home.example"\nuser = "home-user"\n')
    other = tmp_path / "other.toml"
    other.write_text('host = "from-flag.example"\n')

    def host(*argv: str, command: str = "export", **env: str) -> Any:
        return Settings(_parser().parse_args([command, *argv]), env).get("host")

    assert host(XDG_CONFIG_HOME=str(xdg), HOME=str(home)) == "from-xdg.example"
    assert host(HOME=str(home)) == "from-home.example"
    assert host(HOME=str(home), command="folders") == "from-home.example"
    # XDG_CONFIG_HOME without the file: no fallback to HOME's (the XDG place is the place).
    assert host(XDG_CONFIG_HOME=str(tmp_path / "empty"), HOME=str(home)) is None
    assert host(XDG_CONFIG_HOME="relative/dir", HOME=str(home)) == "from-home.example"
    assert host("--config", str(other), HOME=str(home)) == "from-flag.example"
    assert host(**{f"{ENV}CONFIG": str(other), "HOME": str(home)}) == "from-flag.example"
    assert host(HOME=str(home), **{f"{ENV}HOST": "from-env"}) == "from-env"
    # The demo never reaches an account from a file it was not told about.
    assert host(HOME=str(home), command="demo") is None
    assert host(HOME=str(tmp_path / "nobody")) is None


def test_an_error_in_the_default_config_file_names_it(tmp_path: Path) -> None:
    path = write_config(tmp_path, "colour = 'blue'\n")
    result = cli(
        "export", str(tmp_path / "Mail"), password="x", env={"XDG_CONFIG_HOME": str(tmp_path)}
    )
    assert result.returncode == EXIT_CODES["usage"]
    assert result.stderr == f"trio-imappool: error: config file {path}: unknown setting 'colour'\n"


# -- folders -------------------------------------------------------------------------------------


def test_folders_lists_counts_sizes_and_what_an_export_would_fetch(
    dovecot: DovecotServer, account: dict[str, Any], tmp_path: Path
) -> None:
    seed_folders(account, {"INBOX": 3, "Archive/2024": 2, "50% off": 1}, size=1000)
    password = account["password"]
    root = tmp_path / "Mail"

    listed = cli("folders", *server_args(account), password=password)

    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[0].split() == ["FOLDER", "MESSAGES", "SIZE", "MAILDIR"]
    assert table(listed.stdout) == {
        "INBOX": ["3", "3.0 KB", "(top)"],
        "50% off": ["1", "1.0 KB", ".50%25 off"],
        "Archive/2024": ["2", "2.0 KB", ".Archive.2024"],
    }
    assert listed.stdout.splitlines()[-1] == (
        "3 folders, 6 messages, 6.0 KB (sizes from STATUS=SIZE)"
    )
    assert listed.stderr == ""

    exported = cli("export", *server_args(account), str(root), password=password)
    assert exported.returncode == 0, exported.stderr
    seed_folders(account, {"INBOX": 2}, size=1000)
    # The settings from the default config file; the MAILDIR from the command line.
    config_home = tmp_path / "config"
    write_config(
        config_home,
        f'host = "{account["host"]}"\nport = {account["port"]}\n'
        f'user = "{account["username"]}"\ntls = "plain"\n',
    )
    planned = cli(
        "folders", str(root), password=password, env={"XDG_CONFIG_HOME": str(config_home)}
    )

    assert planned.returncode == 0, planned.stderr
    assert table(planned.stdout) == {
        "INBOX": ["5", "5.0 KB", "2", "(top)"],
        "50% off": ["1", "1.0 KB", "0", ".50%25 off"],
        "Archive/2024": ["2", "2.0 KB", "0", ".Archive.2024"],
    }
    assert planned.stdout.splitlines()[-1] == (
        f"3 folders, 8 messages, 8.0 KB (sizes from STATUS=SIZE); an export into {root} "
        "would fetch 2 new messages from 1 of 3 folders"
    )
    again = cli("export", *server_args(account), str(root), password=password)
    assert "exported 2 new messages" in again.stdout
    done = cli("folders", *server_args(account), "--exclude", "50*", str(root), password=password)
    assert done.stdout.splitlines()[-1].endswith(f"; nothing new to export into {root}")
    assert "50% off" not in done.stdout


def test_without_status_size_the_sizes_are_the_sum_of_rfc822_size(
    dovecot_factory: Any,
) -> None:
    # Dovecot's capability list after login, without STATUS=SIZE.
    server = dovecot_factory(
        users={"u": "u-pw"},
        extra_config="imap_capability = IMAP4rev1 LIST-STATUS UNSELECT UIDPLUS MULTIAPPEND\n",
    )
    seed_folders(server, {"INBOX": 4, "Other": 3, "Empty": 0}, size=1500)

    async def run() -> Any:
        kwargs = server.pool_kwargs("u", tls=False)
        async with open_pool(**kwargs) as pool:
            assert not await _has(pool, "STATUS=SIZE")
            return await survey(pool, None, max_connections=2)

    found = trio.run(run)
    assert found.size_source == "RFC822.SIZE"
    assert {f.server.name: f.size for f in found.folders} == {
        "INBOX": 6000,
        "Empty": 0,
        "Other": 4500,
    }


async def _has(pool: Any, capability: str) -> bool:
    async with pool.connection() as conn:
        return bool(await conn.has_capability(capability))


# -- export --dry-run ----------------------------------------------------------------------------


def test_a_dry_run_shows_what_an_export_would_fetch_and_changes_nothing(
    dovecot: DovecotServer, account: dict[str, Any], tmp_path: Path
) -> None:
    seed_folders(account, {"INBOX": 4, "Lists/trio": 3, "Quiet": 2})
    password = account["password"]
    root = tmp_path / "Mail"
    first = cli(
        "export", *server_args(account), "--exclude", "Lists/*", str(root), password=password
    )
    assert first.returncode == 0, first.stderr
    seed_folders(account, {"INBOX": 2})
    before = snapshot(tmp_path)

    dry = cli("export", *server_args(account), "--dry-run", str(root), password=password)
    fresh = cli("export", *server_args(account), "-n", str(tmp_path / "New"), password=password)

    assert dry.returncode == 0, dry.stderr
    assert snapshot(tmp_path) == before  # no file, lock, state or directory made or changed
    lines = dry.stdout.splitlines()
    assert lines[0] == f"dry run: nothing is fetched or written into {root}"
    assert [line.split() for line in lines[1:-1]] == [
        ["INBOX", "2", "new", "4", "in", "cur/"],
        ["Lists/trio", "3", "new", "0", "in", ".Lists.trio/cur/"],
    ]
    assert lines[-1] == "would fetch 5 new messages from 2 of 3 folders"
    assert fresh.returncode == 0 and not (tmp_path / "New").exists()
    assert fresh.stdout.splitlines()[-1] == "would fetch 11 new messages from 3 of 3 folders"
    # The real export fetches what the dry run said.
    real = cli("export", *server_args(account), str(root), password=password)
    assert "exported 5 new messages" in real.stdout, real.stdout
    assert (
        "nothing new in 3 folders"
        in cli("export", *server_args(account), "-n", str(root), password=password).stdout
    )


# -- -q ------------------------------------------------------------------------------------------


def test_quiet_prints_nothing_but_errors(
    dovecot: DovecotServer, account: dict[str, Any], tmp_path: Path
) -> None:
    seed_folders(account, {"INBOX": 2})
    password = account["password"]
    root = tmp_path / "Mail"

    quiet = cli("export", "-q", *server_args(account), str(root), password=password)
    folders = cli("folders", "--quiet", *server_args(account), password=password)
    failing = cli(
        "export", "-q", "--plain", "--host", "127.0.0.1", "--port", "1", "--user", "u",
        str(root), password=password,
    )  # fmt: skip
    both = cli("export", "-q", "-v", *server_args(account), str(root), password=password)

    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")
    assert len(list((root / "cur").iterdir())) == 2
    assert (folders.returncode, folders.stdout, folders.stderr) == (0, "", "")
    assert failing.returncode == EXIT_CODES["connection"] and failing.stdout == ""
    assert failing.stderr.startswith("trio-imappool: error: ConnectError")
    assert both.returncode == EXIT_CODES["usage"]
    assert both.stderr == "trio-imappool: error: -q and -v exclude each other\n"


# -- a closed output pipe ------------------------------------------------------------------------


def test_a_closed_output_pipe_ends_quietly_with_status_141(
    dovecot: DovecotServer, account: dict[str, Any], tmp_path: Path
) -> None:
    seed_folders(account, {"INBOX": 1, "A": 1, "B": 1})
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line is written: EPIPE for sure
    try:
        closed = cli(
            "folders", *server_args(account), password=account["password"],
            stdout=write_end, stderr=subprocess.PIPE,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert (closed.returncode, closed.stderr) == (EXIT_CODES["output_closed"], "")
    assert EXIT_CODES["output_closed"] == 141

    # As a user writes it; the status is 141 or, if all was written before head exited, 0.
    command = " ".join([sys.executable, "-m", "trio_imappool", "folders", *server_args(account)])
    shell = subprocess.run(
        ["bash", "-c", f'{command} | head -1; echo "status ${{PIPESTATUS[0]}}" >&2'],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, f"{ENV}PASSWORD": account["password"], "HOME": str(tmp_path)},
        check=False,
    )
    assert shell.stdout.split() == ["FOLDER", "MESSAGES", "SIZE", "MAILDIR"]
    assert shell.stderr.strip() in ("status 141", "status 0"), shell.stderr


def test_a_broken_pipe_of_a_server_connection_is_still_a_connection_error() -> None:
    # Standard output is fine (a test's capture), so the BrokenPipeError is the network's.
    error = BrokenPipeError(32, "Broken pipe")
    assert not _output_closed(error)
    assert classify(error)[0] == "connection"


# -- the documentation ---------------------------------------------------------------------------


def test_readme_examples_of_folder_names_are_what_the_exporter_makes() -> None:
    text = README.read_text("utf-8")
    rows = re.findall(r"^\| `([^`]+)` \| `(.)` \| `([^`]+)` \|$", text, re.MULTILINE)
    assert len(rows) >= 6
    assert ("50% off", "/", ".50%25 off") in rows
    for name, delimiter, local in rows:
        assert local_folder_name(name, delimiter) == local, (name, delimiter)


def test_readme_and_help_name_the_same_new_flags_and_commands(
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = README.read_text("utf-8")
    helps = {}
    for command in ([], ["export"], ["folders"]):
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        helps[" ".join(command)] = capsys.readouterr().out
    for flag, where in [
        ("--version", ""),
        ("folders", ""),
        ("--dry-run", "export"),
        ("--quiet", "export"),
        ("--quiet", "folders"),
        ("config.toml", "export"),
        ("XDG_CONFIG_HOME", "export"),
        ("141", "export"),
        (".50%25 off", "folders"),
    ]:
        assert flag in helps[where], (flag, where)
        assert flag in text, flag


# -- under a personal namespace (Courier's INBOX.) -----------------------------------------------


async def test_under_a_namespace_the_survey_names_and_plans_as_the_export_does(
    tmp_path: Path,
) -> None:
    from trio_imappool import export_maildir
    from trio_imappool.testing import open_scripted_server

    from .test_export_namespace import courier_account

    root = tmp_path / "Mail"
    async with open_scripted_server(courier_account()) as server:
        with trio.fail_after(30):
            async with open_pool(**server.pool_kwargs(), max_size=2) as pool:
                bare = await survey(pool, None, sizes=False)
                planned = await survey(pool, root, sizes=False, folders=["Archive/*", "Sent"])
                assert not root.exists()  # planning wrote nothing
                result = await export_maildir(
                    pool, root, fsync=False, folders=["Archive/*", "Sent"]
                )

    assert {f.server.name: f.local for f in bare.folders} == {
        "INBOX": "",
        "INBOX.Archive": ".Archive",
        "INBOX.Archive.2024": ".Archive.2024",
        "INBOX.Sent": ".Sent",
        "shared.team": ".shared.team",
    }
    assert {f.server.name: (f.local, f.new) for f in planned.folders} == {
        f.name: (f.path.name, f.fetched) for f in result.folders
    }
    assert sum(f.new or 0 for f in planned.folders) == result.messages_fetched == 4
