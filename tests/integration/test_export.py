"""The exporter (``trio_imappool.exporter``) and ``trio-imappool export``, against real Dovecot.

Rules: loopback only; every test makes a user of its own on the shared ``dovecot`` server (or
a server of its own), so its mailboxes start empty; the command line runs in a subprocess with
the password in an environment variable, never on the command line; every subprocess has a
timeout.
"""

from __future__ import annotations

import errno
import itertools
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import imapclient
import pytest
import trio

from trio_imappool import Pool, open_pool
from trio_imappool.exporter import (
    LOCK_NAME,
    REPLACED_DIR,
    STATE_NAME,
    ExportError,
    ExportResult,
    FolderNotFoundError,
    export_maildir,
    maildir_folder_path,
    parse_message_filename,
    read_folder_state,
)
from trio_imappool.testing import (
    DovecotServer,
    ImapServer,
    make_message,
    seed_folders,
    start_proxy_thread,
)

_users = itertools.count(1)

FOLDERS = {"INBOX": 12, "Archive/2024": 8, "Sent Items": 5, "Ünïcödé": 3, "Empty": 0}


def flags_for(folder: str, i: int) -> list[str]:
    """A spread of flags: every mapped system flag, a keyword, and none."""
    flags = []
    if i % 2:
        flags.append(r"\Seen")
    if i % 3 == 0:
        flags.append(r"\Flagged")
    if i % 4 == 1:
        flags.append(r"\Answered")
    if i % 5 == 2:
        flags.append(r"\Draft")
    if i % 7 == 3:
        flags.append(r"\Deleted")
    if i % 6 == 5:
        flags.append("$Forwarded")
    return flags


def expected_letters(folder: str, i: int) -> str:
    letters = {r"\Draft": "D", r"\Flagged": "F", r"\Answered": "R", r"\Seen": "S"}
    letters[r"\Deleted"] = "T"
    return "".join(sorted(letters[f] for f in flags_for(folder, i) if f in letters))


def new_user(server: ImapServer) -> dict[str, Any]:
    name = f"export{next(_users)}"
    server.add_user(name, f"{name}-pw")
    return server.pool_kwargs(name, tls=False)


def message_files(path: Path) -> dict[tuple[int, int], Path]:
    """(uidvalidity, uid) -> file, for our files in cur/ and new/; fails on a duplicate."""
    found: dict[tuple[int, int], Path] = {}
    for sub in ("cur", "new"):
        for file in (path / sub).iterdir():
            key = parse_message_filename(file.name)
            assert key is not None, f"a file that is not ours: {file}"
            assert key not in found, f"duplicate: {found[key]} and {file}"
            found[key] = file
    return found


def our_tmp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("tmp/*") if p.name.startswith("trio-imappool-")]


def check_folder(root: Path, folder: str, uids: list[int], uidvalidity: int | None = None) -> int:
    """Every seeded message of *folder* is there, byte for byte, with its flags; returns the
    UIDVALIDITY."""
    path = maildir_folder_path(root, folder, "/")
    files = message_files(path)
    validities = {v for v, _ in files} or ({uidvalidity} if uidvalidity else set())
    assert len(validities) <= 1, validities
    assert sorted(uid for _, uid in files) == sorted(uids)
    for i, uid in enumerate(uids):
        (key,) = [k for k in files if k[1] == uid]
        file = files[key]
        assert file.read_bytes() == make_message(folder, i), file
        assert file.name.endswith(":2," + expected_letters(folder, i)), file.name
        assert file.parent.name == "cur"
    return validities.pop() if validities else 0


async def export(settings: dict[str, Any], root: Path, **kwargs: Any) -> ExportResult:
    async with open_pool(**settings, max_size=4) as pool:
        return await export_maildir(pool, root, **kwargs)


def recreate_folder(settings: dict[str, Any], folder: str) -> None:
    client = imapclient.IMAPClient(settings["host"], settings["port"], ssl=False, timeout=10)
    client.login(settings["username"], settings["password"])
    client.delete_folder(folder)
    client.create_folder(folder)
    client.logout()


# -- exports against Dovecot -----------------------------------------------------------------------


async def test_a_seeded_account_is_exported_completely_byte_for_byte_with_its_flags(
    dovecot: DovecotServer, tmp_path: Path
) -> None:
    settings = new_user(dovecot)
    uids = seed_folders(settings, FOLDERS, flags=flags_for)
    root = tmp_path / "Mail"

    result = await export(settings, root)

    total = sum(FOLDERS.values())
    assert result.messages_fetched == total
    assert result.bytes_fetched == 2000 * total
    assert result.folders_fetched == 4  # Empty has nothing to fetch
    assert {f.name for f in result.folders} == set(FOLDERS)
    for folder, folder_uids in uids.items():
        uidvalidity = check_folder(root, folder, folder_uids)
        state = read_folder_state(maildir_folder_path(root, folder, "/"))
        assert state is not None and state.folder == folder
        assert state.uids == frozenset(folder_uids)
        if folder_uids:
            assert state.uidvalidity == uidvalidity
            assert state.synced_below == max(folder_uids) + 1
    assert (root / "cur").is_dir() and (root / ".Archive.2024" / "cur").is_dir()
    assert (root / ".Sent Items").is_dir() and (root / ".Ünïcödé").is_dir()
    assert our_tmp_files(root) == []


@pytest.mark.parametrize("unnamed", [True, False], ids=["O_TMPFILE", "named tmp files"])
async def test_messages_reach_cur_only_whole_through_unnamed_or_named_tmp_files(
    dovecot: DovecotServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unnamed: bool
) -> None:
    """Unnamed files (linked into cur/ when complete) where the file system has them, so that
    a killed run leaves nothing in tmp/; named files renamed into cur/ where it has not."""
    settings = new_user(dovecot)
    uids = seed_folders(settings, {"INBOX": 30, "Other": 20}, flags=flags_for)
    root = tmp_path / "Mail"
    real_open, real_rename = os.open, os.rename
    renamed_messages: list[str] = []

    def open_(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if not unnamed and flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, "no unnamed files here")
        return real_open(path, flags, *args, **kwargs)

    def rename(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if "/cur/" in str(dst):
            renamed_messages.append(str(src))
        real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "rename", rename)
    for fsync in (True, False):
        result = await export(settings, root / str(fsync), batch_size=7, fsync=fsync)
        assert result.messages_fetched == 50
        check_folder(root / str(fsync), "INBOX", uids["INBOX"])
        check_folder(root / str(fsync), "Other", uids["Other"])
        assert our_tmp_files(root / str(fsync)) == []
    if unnamed:
        assert renamed_messages == []
    else:
        assert len(renamed_messages) == 100
        assert all("/tmp/trio-imappool-" in src for src in renamed_messages)


async def test_a_second_run_fetches_nothing_and_selects_no_folder(
    dovecot: DovecotServer, tmp_path: Path
) -> None:
    settings = new_user(dovecot)
    seed_folders(settings, FOLDERS, flags=flags_for)
    root = tmp_path / "Mail"
    await export(settings, root)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}

    async with open_pool(**settings, max_size=4) as pool:
        result = await export_maildir(pool, root)
        stats = pool.statistics()

    assert (result.messages_fetched, result.folders_fetched, result.bytes_fetched) == (0, 0, 0)
    assert sum(f.exported for f in result.folders) == sum(FOLDERS.values())
    # One checkout, for the LIST-STATUS; no SELECT, no FETCH, one connection.
    assert (stats.acquires, stats.connections_opened, stats.selects) == (1, 1, 0)
    after = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    assert after == before  # not even a state file rewritten


async def test_new_messages_are_fetched_by_the_next_run_and_only_they(
    imap_server: ImapServer, tmp_path: Path
) -> None:
    settings = new_user(imap_server)
    uids = seed_folders(settings, FOLDERS, flags=flags_for)
    root = tmp_path / "Mail"
    await export(settings, root)
    await export(settings, root)

    added = seed_folders(settings, {"INBOX": 4, "Empty": 2, "New/Folder": 3}, flags=flags_for)
    result = await export(settings, root)

    assert result.messages_fetched == 9
    fetched = {f.name: f.fetched for f in result.folders if f.fetched}
    assert fetched == {"INBOX": 4, "Empty": 2, "New/Folder": 3}
    check_folder(root, "INBOX", uids["INBOX"] + added["INBOX"])
    check_folder(root, "Empty", added["Empty"])
    check_folder(root, "New/Folder", added["New/Folder"])
    check_folder(root, "Archive/2024", uids["Archive/2024"])


async def test_files_are_the_truth_when_files_go_missing_or_the_state_is_lost(
    dovecot: DovecotServer, tmp_path: Path
) -> None:
    settings = new_user(dovecot)
    uids = seed_folders(settings, {"INBOX": 20, "Other": 10}, flags=flags_for)
    root = tmp_path / "Mail"
    await export(settings, root)
    # Files removed behind our back: the state claims them, so it is not believed.
    removed = sorted((root / "cur").iterdir())[3:6]
    for file in removed:
        file.unlink()
    # A lost state file: the files alone say what is there.
    (root / ".Other" / STATE_NAME).unlink()
    # A partial file left in tmp/ by a killed run.
    (root / "tmp" / "trio-imappool-999-7").write_bytes(b"From: half a mess")

    result = await export(settings, root)

    assert {f.name: f.fetched for f in result.folders} == {"INBOX": 3, "Other": 0}
    check_folder(root, "INBOX", uids["INBOX"])
    check_folder(root, "Other", uids["Other"])
    assert our_tmp_files(root) == []
    assert read_folder_state(root / ".Other") is not None


async def test_a_folder_with_a_new_uidvalidity_is_exported_again_and_its_old_files_kept(
    dovecot: DovecotServer, tmp_path: Path
) -> None:
    settings = new_user(dovecot)
    uids = seed_folders(settings, {"INBOX": 5, "Projects": 6}, flags=flags_for)
    root = tmp_path / "Mail"
    await export(settings, root)
    old = read_folder_state(root / ".Projects")
    assert old is not None

    recreate_folder(settings, "Projects")
    new_uids = seed_folders(settings, {"Projects": 4}, flags=flags_for)["Projects"]
    result = await export(settings, root)

    report = {f.name: f for f in result.folders}
    assert report["Projects"].uidvalidity != old.uidvalidity
    assert report["Projects"].uidvalidity_changed and report["Projects"].moved_aside == 6
    assert report["Projects"].fetched == 4 and not report["INBOX"].uidvalidity_changed
    new_validity = check_folder(root, "Projects", new_uids)
    assert new_validity == report["Projects"].uidvalidity
    aside = root / REPLACED_DIR / f"Projects.{old.uidvalidity}"
    kept = message_files(aside)
    assert sorted(uid for _, uid in kept) == uids["Projects"]
    assert all(v == old.uidvalidity for v, _ in kept)
    state = read_folder_state(root / ".Projects")
    assert state is not None and state.uidvalidity == new_validity
    # And the run after that has nothing to do.
    assert (await export(settings, root)).messages_fetched == 0


async def test_a_sparse_folder_is_searched_instead_of_fetched_by_uid_range(
    dovecot: DovecotServer, tmp_path: Path
) -> None:
    settings = new_user(dovecot)
    uids = seed_folders(settings, {"Sparse": 1000})["Sparse"]
    client = imapclient.IMAPClient(settings["host"], settings["port"], ssl=False, timeout=10)
    client.login(settings["username"], settings["password"])
    client.select_folder("Sparse")
    client.delete_messages(uids[:-10])
    client.expunge()
    client.logout()
    root = tmp_path / "Mail"

    # 10 messages below UIDNEXT 1001: a UID range would be 99% misses, so "SEARCH ALL".
    first = await export(settings, root)
    # Lose the state and 3 files: the rest are excluded from the search by UID.
    for file in sorted((root / ".Sparse" / "cur").iterdir())[:3]:
        file.unlink()
    (root / ".Sparse" / STATE_NAME).unlink()
    second = await export(settings, root)

    assert (first.messages_fetched, second.messages_fetched) == (10, 3)
    assert first.messages_skipped == second.messages_skipped == 0
    files = message_files(root / ".Sparse")
    assert sorted(uid for _, uid in files) == uids[-10:]
    for (_, uid), file in files.items():
        assert file.read_bytes() == make_message("Sparse", uids.index(uid))
        assert file.name.endswith(":2,")


async def test_chosen_and_excluded_folders(dovecot: DovecotServer, tmp_path: Path) -> None:
    settings = new_user(dovecot)
    seed_folders(settings, {"INBOX": 2, "Archive/2023": 2, "Archive/2024": 2, "Spam": 2})
    root = tmp_path / "Mail"

    result = await export(settings, root, folders=["inbox", "Archive/*"], exclude=["*2023"])

    assert sorted(f.name for f in result.folders) == ["Archive/2024", "INBOX"]
    assert not (root / ".Spam").exists() and not (root / ".Archive.2023").exists()
    with pytest.raises(FolderNotFoundError, match="no such folder"):
        await export(settings, root, folders=["Nope"])


async def test_a_second_export_into_the_same_maildir_at_once_is_refused(
    dovecot: DovecotServer, tmp_path: Path
) -> None:
    import fcntl

    settings = new_user(dovecot)
    root = tmp_path / "Mail"
    root.mkdir()
    fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(ExportError, match="another process"):
            await export(settings, root)
    finally:
        os.close(fd)


async def test_a_cancelled_export_leaves_whole_files_and_the_next_run_completes_it(
    dovecot: DovecotServer, tmp_path: Path
) -> None:
    settings = new_user(dovecot)
    uids = seed_folders(settings, {"INBOX": 400, "Other": 400}, flags=flags_for)
    root = tmp_path / "Mail"
    done = trio.Event()

    def progress(p: Any) -> None:
        if p.messages_done >= 100:
            done.set()

    async def run(pool: Pool) -> None:
        await export_maildir(pool, root, batch_size=20, progress=progress)

    async with open_pool(**settings, max_size=2) as pool, trio.open_nursery() as nursery:
        nursery.start_soon(run, pool)
        await done.wait()
        nursery.cancel_scope.cancel()
    written = 0
    for folder, folder_uids in uids.items():
        index = {uid: i for i, uid in enumerate(folder_uids)}
        for (_, uid), file in message_files(maildir_folder_path(root, folder, "/")).items():
            assert file.read_bytes() == make_message(folder, index[uid])
            written += 1
    assert 100 <= written < 800

    await export(settings, root)
    check_folder(root, "INBOX", uids["INBOX"])
    check_folder(root, "Other", uids["Other"])
    assert our_tmp_files(root) == []


# -- the command line ----------------------------------------------------------------------------


def cli(
    *args: str, password: str | None, timeout: float = 60, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_IMAPPOOL_")}
    if password is not None:
        env["TRIO_IMAPPOOL_PASSWORD"] = password
    return subprocess.run(
        [sys.executable, "-m", "trio_imappool", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
        **kwargs,
    )


def server_args(settings: dict[str, Any], port: int | None = None) -> list[str]:
    port = settings["port"] if port is None else port
    return ["--host", settings["host"], "--port", str(port), "--user", settings["username"]]


def count_files(root: Path) -> int:
    total = 0
    for directory, _dirs, files in os.walk(root):
        if os.path.basename(directory) == "cur":
            total += len(files)
    return total


def test_the_command_exports_and_a_second_run_fetches_nothing(
    dovecot: DovecotServer, tmp_path: Path
) -> None:
    settings = new_user(dovecot)
    uids = seed_folders(settings, {"INBOX": 5, "Lists/trio": 4}, flags=flags_for)
    root = tmp_path / "Mail"
    args = ["export", "--plain", *server_args(settings), "-c", "3", "-v", str(root)]

    first = cli(*args, password=settings["password"])
    second = cli(*args, password=settings["password"])

    assert first.returncode == 0, first.stderr
    assert "exported 9 new messages" in first.stdout
    assert "pool: 3 connections opened" in first.stdout
    check_folder(root, "INBOX", uids["INBOX"])
    check_folder(root, "Lists/trio", uids["Lists/trio"])
    assert second.returncode == 0, second.stderr
    assert "nothing new in 2 folders (9 messages in" in second.stdout
    assert "pool: 1 connection opened" in second.stdout
    assert settings["password"] not in first.stdout + first.stderr


def test_settings_come_from_a_config_file_and_the_password_from_a_command(
    dovecot: DovecotServer, tmp_path: Path
) -> None:
    settings = new_user(dovecot)
    seed_folders(settings, {"INBOX": 2, "Junk": 3})
    root = tmp_path / "Mail"
    secret = tmp_path / "secret"
    secret.write_text(settings["password"] + "\n")
    config = tmp_path / "config.toml"
    config.write_text(
        f'host = "{settings["host"]}"\nport = {settings["port"]}\n'
        f'user = "{settings["username"]}"\ntls = "plain"\n'
        f'password_command = "cat {secret}"\nexclude = ["Junk"]\nmaildir = "{root}"\n'
    )

    result = cli("export", "--config", str(config), password=None)

    assert result.returncode == 0, result.stderr
    assert count_files(root) == 2 and not (root / ".Junk").exists()
    # A flag wins over the file: a wrong port fails.
    refused = cli("export", "--config", str(config), "--port", "1", password=None)
    assert refused.returncode == 4, refused.stderr


def test_without_a_password_and_no_terminal_it_is_a_usage_error(tmp_path: Path) -> None:
    result = cli("export", "--host", "127.0.0.1", "--user", "u", str(tmp_path / "m"), password=None)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "trio-imappool: error: no password: set TRIO_IMAPPOOL_PASSWORD, use --password-command, "
        "or run in a terminal to be asked"
    ]


@pytest.mark.parametrize(
    ("case", "status", "text"),
    [
        ("bad password", 3, "AuthenticationError"),
        ("refused port", 4, "ConnectError"),
        ("untrusted certificate", 5, "TLSError"),
    ],
)
def test_failures_are_one_line_with_distinct_exit_codes(
    dovecot: DovecotServer, tmp_path: Path, case: str, status: int, text: str
) -> None:
    settings = new_user(dovecot)
    password = settings["password"]
    if case == "bad password":
        args = ["--plain", *server_args(settings)]
        password = "not-the-password"
    elif case == "refused port":
        args = ["--plain", *server_args(settings, port=free_port())]
    else:  # the test CA is not in the system's trust store
        args = server_args(settings, port=dovecot.imaps_port)

    result = cli("export", *args, str(tmp_path / "Mail"), password=password)
    debug = cli("export", "--debug", *args, str(tmp_path / "Mail"), password=password)

    assert result.returncode == status, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"trio-imappool: error: {text}: "), lines
    assert password not in result.stderr
    assert debug.returncode == status and "Traceback (most recent call last)" in debug.stderr


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def big_account(dovecot: DovecotServer) -> Iterator[tuple[dict[str, Any], dict[str, list[int]]]]:
    settings = new_user(dovecot)
    uids = seed_folders(settings, {"INBOX": 1500, "Archive/2024": 1000, "Sent": 300}, size=1500)
    yield settings, uids


def test_a_run_killed_at_a_random_point_loses_nothing_and_the_next_run_completes_it(
    big_account: tuple[dict[str, Any], dict[str, list[int]]], tmp_path: Path
) -> None:
    settings, uids = big_account
    root = tmp_path / "Mail"
    # Sent was exported before, then got new mail: the killed run starts from a saved state.
    first = cli(
        "export", "--plain", *server_args(settings), "--folder", "Sent", str(root),
        password=settings["password"],
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    uids["Sent"] += seed_folders(settings, {"Sent": 200}, size=1500)["Sent"]
    total = sum(len(u) for u in uids.values())
    done_before = count_files(root)
    seed = int(os.environ.get("EXPORT_KILL_SEED", random.randrange(1 << 30)))
    target = random.Random(seed).randrange(done_before + 50, total - 500)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_IMAPPOOL_")}
    env["TRIO_IMAPPOOL_PASSWORD"] = settings["password"]
    # A 30 ms round trip and small batches: the run takes a few seconds, time to kill it.
    with start_proxy_thread(settings["host"], settings["port"], up=0.015, down=0.015) as proxy:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "trio_imappool", "export", "--plain"),
                *server_args(settings, port=proxy.port),
                *("-c", "2", "--batch-size", "25", str(root)),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while count_files(root) < target and process.poll() is None:
            assert time.monotonic() < deadline, "the export made no progress"
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        assert process.returncode == -signal.SIGKILL, f"finished before the kill (seed {seed})"

    killed_at = count_files(root)
    assert target <= killed_at < total, f"seed {seed}"
    # Whatever landed in cur/ is whole, and no state file claims a UID whose file is missing.
    states = 0
    for folder, folder_uids in uids.items():
        path = maildir_folder_path(root, folder, "/")
        if not path.exists():
            continue
        files = message_files(path)
        index = {uid: i for i, uid in enumerate(folder_uids)}
        for (_, uid), file in files.items():
            assert file.read_bytes() == make_message(folder, index[uid], 1500)
        state = read_folder_state(path)
        if state is not None:
            states += 1
            assert state.uids <= {uid for _, uid in files}, f"seed {seed}"
    assert states >= 1  # Sent's, from the first run

    again = cli(
        "export", "--plain", *server_args(settings), "-c", "4", str(root),
        password=settings["password"],
    )  # fmt: skip

    assert again.returncode == 0, again.stderr
    assert f"exported {total - killed_at:,} new message" in again.stdout, (seed, again.stdout)
    for folder, folder_uids in uids.items():
        path = maildir_folder_path(root, folder, "/")
        files = message_files(path)  # no duplicates
        assert sorted(uid for _, uid in files) == folder_uids
        index = {uid: i for i, uid in enumerate(folder_uids)}
        for (_, uid), file in files.items():
            assert file.read_bytes() == make_message(folder, index[uid], 1500)
        state = read_folder_state(path)
        assert state is not None and state.uids == frozenset(folder_uids)
    assert our_tmp_files(root) == []
