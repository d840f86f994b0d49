"""The command line's settings without a server, threads or subprocesses: flags over
``TRIO_IMAPPOOL_*`` variables over the TOML file over the defaults, bad config files, the
plaintext guard, the help, and how errors become one line and an exit status. (Partly moved from
``tests/integration/test_main.py``; the assertions are theirs.)"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from imapclient.exceptions import IMAPClientError, LoginError

from trio_imappool import AuthenticationError, ConnectError, FanOutError, TLSError
from trio_imappool.cli import EXIT_CODES, Settings, UsageError, classify, main

ENV = "TRIO_IMAPPOOL_"


def export_args(*argv: str) -> argparse.Namespace:
    from trio_imappool.cli._parser import _parser

    return _parser().parse_args(["export", *argv])


def test_help_documents_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["export", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for line in ("2    usage", "3    authentication", "4    cannot connect", "5    TLS failed"):
        assert line in text
    assert "--password-command" in text and "TRIO_IMAPPOOL_PASSWORD" in text


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


def test_the_command_does_not_wait_for_the_answer_to_logout() -> None:
    """The process ends when its pool closes: LOGOUT is sent, its answer not awaited."""
    args = export_args("--host", "127.0.0.1", "--user", "u", "--plain")
    options = Settings(args, {f"{ENV}PASSWORD": "p"}).pool_options()
    assert options["wait_for_logout"] is False


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


# -- each source on its own, and how values are read from it -------------------------------------


def test_without_flags_the_environment_wins_over_the_config_file_which_wins_over_defaults(
    tmp_path: Path,
) -> None:
    config = tmp_path / "c.toml"
    config.write_text('host = "file.example"\nbatch-size = 50\ndelete = true\n')
    env = {f"{ENV}CONFIG": str(config), f"{ENV}HOST": "env.example", f"{ENV}DELETE": "no"}
    settings = Settings(export_args(), env)
    assert settings.get("host") == "env.example"
    assert settings.get("batch_size") == 50  # the file's, written with a dash
    assert settings.get("delete") is False  # the environment's, even when it says no
    assert settings.get("fsync") is True and settings.get("tls") == "implicit"  # defaults
    empty = Settings(export_args(), {f"{ENV}CONFIG": str(config), f"{ENV}HOST": ""})
    assert empty.get("host") == "file.example"  # an empty variable is not set


def test_config_flag_wins_over_the_config_variable(tmp_path: Path) -> None:
    first, second = tmp_path / "a.toml", tmp_path / "b.toml"
    first.write_text('host = "a.example"\n')
    second.write_text('host = "b.example"\n')
    env = {f"{ENV}CONFIG": str(first)}
    assert Settings(export_args("--config", str(second)), env).get("host") == "b.example"
    assert Settings(export_args(), env).get("host") == "a.example"


@pytest.mark.parametrize(
    ("text", "value"),
    [("1", True), ("TRUE", True), (" yes ", True), ("on", True), ("0", False), ("off", False)],
)
def test_boolean_variables(text: str, value: bool) -> None:
    assert Settings(export_args(), {f"{ENV}FSYNC": text}).get("fsync") is value


@pytest.mark.parametrize(
    ("variable", "text", "message"),
    [("FSYNC", "maybe", "expected true or false"), ("PORT", "x", "expected an integer")],
)
def test_a_bad_variable_is_a_usage_error_naming_it(variable: str, text: str, message: str) -> None:
    with pytest.raises(UsageError, match=f"{ENV}{variable}: {message}"):
        Settings(export_args(), {ENV + variable: text}).get(variable.lower())


def test_folder_lists_come_from_the_config_file_only(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('folders = "INBOX"\nexclude = ["Trash", "Spam"]\n')
    env = {f"{ENV}CONFIG": str(config), f"{ENV}FOLDERS": "Sent"}
    settings = Settings(export_args(), env)
    assert settings.get("folders") == ["INBOX"]  # a single name is a list of one
    assert settings.get("exclude") == ["Trash", "Spam"]


def test_the_default_config_file_follows_xdg_and_only_for_export_and_folders(
    tmp_path: Path,
) -> None:
    config = tmp_path / "xdg" / "trio-imappool" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text('host = "default.example"\n')
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    assert Settings(export_args(), env).get("host") == "default.example"
    home = {"HOME": str(tmp_path / "home")}
    (tmp_path / "home" / ".config").mkdir(parents=True)
    (tmp_path / "home" / ".config" / "trio-imappool").symlink_to(config.parent)
    assert Settings(export_args(), home).get("host") == "default.example"
    relative = {"XDG_CONFIG_HOME": "xdg", "HOME": "home"}  # relative paths are ignored
    assert Settings(export_args(), relative).get("host") is None
    demo = argparse.Namespace(command="demo")
    assert Settings(demo, env).get("host") is None  # the demo never reads it


def test_the_memory_budget_is_in_mib_64_by_default_and_at_least_1() -> None:
    env = {f"{ENV}PASSWORD": "p", f"{ENV}MEMORY_BUDGET": "32"}
    assert Settings(export_args(), {}).get("memory_budget") == 64
    assert Settings(export_args(), env).get("memory_budget") == 32
    assert Settings(export_args("--memory-budget", "8"), env).get("memory_budget") == 8
    args = export_args("--host", "localhost", "--user", "u", "--memory-budget", "0")
    with pytest.raises(UsageError, match="memory budget must be at least 1 MiB"):
        Settings(args, env).pool_options()
