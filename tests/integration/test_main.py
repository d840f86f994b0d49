"""The command line (``trio_imappool.__main__``): the demo end to end against its own Dovecot,
and the settings, secrets and error reporting without a server. The exporter's runs against
Dovecot are in ``test_export.py``."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
from imapclient.exceptions import IMAPClientError, LoginError

from trio_imappool import AuthenticationError, ConnectError, FanOutError, TLSError
from trio_imappool.__main__ import EXIT_CODES, Settings, UsageError, classify, main
from trio_imappool.testing import start_scripted_server_thread

ENV = "TRIO_IMAPPOOL_"


def test_demo_exports_a_seeded_mailbox_and_reports_what_the_pool_did() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trio_imappool", "demo", "--folders", "3", "--messages", "20"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "seeded 3 folders x 20 messages" in out
    folder_lines = [line for line in out.splitlines() if line.startswith("  ") and " new " in line]
    assert len(folder_lines) == 3 and all(" 20 new " in line for line in folder_lines)
    assert "exported 60 new messages" in out
    assert "exported 5 new messages (10.0 KB) from 2 of 3 folders" in out
    assert "was discarded" in out
    assert "connections_discarded  1" in out
    assert "pool size back to 3" in out
    assert result.stderr == ""


def test_bad_demo_arguments_are_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--max-size", "0"]) == EXIT_CODES["usage"] == 2
    assert "at least 1" in capsys.readouterr().err


def test_help_documents_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["export", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for line in ("2    usage", "3    authentication", "4    cannot connect", "5    TLS failed"):
        assert line in text
    assert "--password-command" in text and "TRIO_IMAPPOOL_PASSWORD" in text


def export_args(*argv: str) -> argparse.Namespace:
    from trio_imappool.__main__ import _parser

    return _parser().parse_args(["export", *argv])


def test_flags_win_over_the_environment_which_wins_over_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        'host = "file.example"\nport = 1143\nuser = "file-user"\nconnections = 6\n'
        'folders = ["INBOX"]\nfsync = false\n'
    )
    env = {f"{ENV}CONFIG": str(config), f"{ENV}USER": "env-user", f"{ENV}CONNECTIONS": "3"}
    settings = Settings(export_args("--user", "flag-user"), env)
    assert settings.get("user") == "flag-user"
    assert settings.get("connections") == 3
    assert settings.get("host") == "file.example" and settings.get("port") == 1143
    assert settings.get("folders") == ["INBOX"] and settings.get("fsync") is False
    assert settings.get("batch_size") == 200  # the default
    assert Settings(export_args("-c", "9"), env).get("connections") == 9


def test_the_password_comes_from_the_environment_or_a_command_never_a_flag(
    tmp_path: Path,
) -> None:
    args = export_args("--host", "127.0.0.1", "--user", "u", "--plain")
    options = Settings(args, {f"{ENV}PASSWORD": "from-env"}).pool_options()
    assert options["password"] == "from-env" and options["ssl"] is False

    command = export_args("--host", "127.0.0.1", "--user", "u", "--password-command", "echo s3")
    assert Settings(command, {f"{ENV}PASSWORD": "x"}).pool_options()["password"] == "s3"

    with pytest.raises(SystemExit):  # there is no --password flag
        export_args("--password", "p")

    failing = export_args("--host", "h", "--user", "u", "--password-command", "exit 3")
    with pytest.raises(UsageError, match="exit status 3"):
        Settings(failing, {}).pool_options()


def test_an_oauth2_token_is_fetched_again_when_the_server_asks_for_a_refresh(
    tmp_path: Path,
) -> None:
    counter = tmp_path / "n"
    counter.write_text("0")
    command = f"n=$(cat {counter}); echo $((n+1)) > {counter}; echo token$n"
    args = export_args(
        "--host", "h.example", "--user", "u", "--auth", "xoauth2", "--password-command", command
    )  # fmt: skip
    options = Settings(args, {}).pool_options()
    assert options["auth_mechanism"] == "XOAUTH2" and "password" not in options
    provider = options["oauth2_token"]
    assert provider(False) == "token0" and provider(False) == "token0"
    assert provider(True) == "token1"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('password = "p"\n', "no passwords in config files"),
        ('colour = "blue"\n', "unknown setting 'colour'"),
        ("port = 'x'\n", "port must be an integer"),
        ("port = \n", "config file"),
    ],
)
def test_a_bad_config_file_is_a_usage_error(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(text)
    with pytest.raises(UsageError, match=message):
        Settings(export_args("--config", str(config)), {})


def test_plaintext_to_a_remote_host_needs_the_insecure_flag() -> None:
    env = {f"{ENV}PASSWORD": "p"}
    args = export_args("--host", "imap.example.org", "--user", "u", "--plain")
    with pytest.raises(UsageError, match="--insecure-plaintext"):
        Settings(args, env).pool_options()
    loud = export_args("--host", "imap.example.org", "--user", "u", "--plain")
    loud.insecure_plaintext = True
    assert Settings(loud, env).pool_options()["insecure_plaintext"] is True


def test_errors_are_classified_by_their_cause_chain() -> None:
    def caused(outer: Exception, inner: BaseException) -> Exception:
        outer.__cause__ = inner
        return outer

    fan = FanOutError("FETCH failed", folder="INBOX", uids=[1], operation="FETCH")
    assert classify(caused(fan, ConnectError("refused")))[0] == "connection"
    assert classify(caused(fan, IMAPClientError("NO"))) == ("imap", "FanOutError: FETCH failed")
    assert classify(caused(AuthenticationError("bad"), LoginError("x")))[0] == "authentication"
    assert classify(TLSError("cert"))[0] == "tls"
    assert classify(caused(fan, TimeoutError()))[0] == "connection"
    assert classify(ValueError("oops"))[0] == "bug"
    assert classify(UsageError("two\nlines")) == ("usage", "two lines")


def test_usage_errors_are_one_line_too(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["export", "--plain", "--starttls"])
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "trio-imappool export: error: --starttls and --plain exclude each other (see --help)"
    ]


# -- secrets on the command line (issue 11) ------------------------------------------------------


@pytest.mark.parametrize(
    "words",
    [
        ["--password=hunter2-Secret"],
        ["--password", "hunter2-Secret"],
        ["--passwd=hunter2-Secret"],
        ["-p", "hunter2-Secret"],
        ["--pasword=hunter2-Secret"],  # a typo: unknown, and still not echoed
        ["--pasword", "hunter2-Secret", "extra"],
    ],
)
def test_a_password_on_the_command_line_is_refused_and_never_echoed(
    capsys: pytest.CaptureFixture[str], words: list[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["export", "--host", "127.0.0.1", *words, "/tmp/unused-maildir"])
    assert info.value.code == EXIT_CODES["usage"]
    captured = capsys.readouterr()
    assert "hunter2" not in captured.err + captured.out
    assert "(see --help)" in captured.err


def test_the_first_line_of_the_password_command_is_the_password() -> None:
    command = "printf 'first-line-secret\\nlogin: someone\\nurl: https://example.org\\n'"
    args = export_args("--host", "127.0.0.1", "--user", "u", "--password-command", command)
    assert Settings(args, {}).pool_options()["password"] == "first-line-secret"
    crlf = export_args("--host", "h", "--user", "u", "--password-command", "printf 's3\\r\\nx'")
    assert Settings(crlf, {}).pool_options()["password"] == "s3"
    empty = export_args("--host", "h", "--user", "u", "--password-command", "printf '\\nx-secret'")
    with pytest.raises(UsageError, match="first line") as info:
        Settings(empty, {}).pool_options()
    assert "x-secret" not in str(info.value)


@pytest.mark.parametrize(
    ("variable", "value"),
    [("USER", "u\r\nA1 CREATE InjectedByEnv"), ("PASSWORD", "p\nA1 CREATE InjectedByEnv")],
)
def test_a_line_break_in_the_user_or_password_is_a_usage_error_before_connecting(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variable: str,
    value: str,
) -> None:
    with start_scripted_server_thread() as server:
        monkeypatch.setenv(f"{ENV}PASSWORD", "password")
        monkeypatch.setenv(f"{ENV}USER", "user")
        monkeypatch.setenv(ENV + variable, value)
        code = main(
            ["export", "--host", server.host, "--port", str(server.port), "--plain", str(tmp_path)]
        )
        assert code == EXIT_CODES["usage"]
        assert server.connections == 0
    assert "Injected" not in capsys.readouterr().err
