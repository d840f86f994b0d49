"""The command line (``trio_imappool.cli``): the demo end to end against its own Dovecot,
and the settings, secrets and error reporting without a server. The exporter's runs against
Dovecot are in ``test_export.py``."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from trio_imappool.cli import EXIT_CODES, Settings, UsageError, main
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


def export_args(*argv: str) -> argparse.Namespace:
    from trio_imappool.cli._parser import _parser

    return _parser().parse_args(["export", *argv])


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


# -- secrets on the command line (issue 11) ------------------------------------------------------


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
