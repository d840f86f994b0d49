"""The ``trio-imappool`` command (also ``python -m trio_imappool``).

Commands:
  export  copy the folders of an IMAP account into a local Maildir over N pooled
          connections; run it again and it fetches only what it has not copied yet and
          follows the server's flag changes and deletions (one-way: local changes are
          never sent to the server)
  demo    start a private Dovecot, seed a mailbox, export it, and show what the pool did
  folders list the account's folders with message counts and sizes, and what an export
          into MAILDIR would fetch (nothing is fetched or written)

Settings come from, first found wins: the command line; environment variables
TRIO_IMAPPOOL_<SETTING> (HOST, PORT, USER, PASSWORD_COMMAND, TLS, CA_FILE, CONNECTIONS,
MAILDIR, ...); the TOML file named by --config or TRIO_IMAPPOOL_CONFIG, with keys named
like the long options (host, port, user, password_command, auth, tls = "implicit" |
"starttls" | "plain", ca_file, connections, batch_size, fsync, delete, folders = [...],
exclude = [...], maildir); then the defaults.
Without --config and TRIO_IMAPPOOL_CONFIG, export and folders read the default config file
$XDG_CONFIG_HOME/trio-imappool/config.toml (~/.config/trio-imappool/config.toml when
XDG_CONFIG_HOME is not set) if it exists.
The password (or OAuth2 token, with --auth xoauth2) is the standard output of
--password-command if given, else TRIO_IMAPPOOL_PASSWORD, else the output of a
password_command from the environment or the config file, else asked for when standard
input is a terminal; never a command-line argument, never in the config file. A password
command's first line of output is the password or token (as with `pass`, whose entries may
hold more lines: user names, URLs, notes); the rest is ignored, and it is never printed.
User names, passwords and tokens with a line break (CR, LF) or NUL are refused (status 2)
before anything connects.

Exit status:
  0    done
  1    unexpected error (a bug; --debug shows the traceback)
  2    usage or configuration error (including: no password available, a --folder
       that matches no folder on the server)
  3    authentication failed (wrong user, password or token)
  4    cannot connect (refused, unreachable, timed out, too many connections)
  5    TLS failed (certificate not trusted, wrong host name, no STARTTLS)
  6    other IMAP error (the server refused or broke off a command)
  7    local error (the Maildir cannot be written, or another export is using it)
  8    partial export: every folder and message not named on standard error was
       exported; a folder that could not be (named, with the reason) or messages the
       server listed but did not return (folder and count) were not; run again to retry
  130  interrupted (Ctrl-C); what was written stays, run again to go on
  141  standard output was closed early (as by `| head`): the run stops quietly, as a
       program killed by SIGPIPE would (128 + 13)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import getpass
import importlib
import io
import ipaddress
import logging
import os
import re
import select
import subprocess
import sys
import tempfile
import textwrap
import time
import tomllib
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

import trio
from imapclient.exceptions import IMAPClientError

from . import _accounts
from ._errors import (
    AuthenticationError,
    ConfigurationError,
    ConnectError,
    PoolError,
    PoolTimeout,
    TLSError,
)
from ._export import (
    ExportError,
    ExportProgress,
    ExportResult,
    FolderFailure,
    FolderNotFoundError,
    export_maildir,
    local_folder_name,
)
from ._fanout import DEFAULT_BATCH_SIZE
from ._pool import Pool, open_pool
from ._stats import PoolStatistics
from ._survey import Survey, survey
from ._version import __version__

__all__ = ["EXIT_CODES", "main"]

PROG = "trio-imappool"
ENV_PREFIX = "TRIO_IMAPPOOL_"

#: Exit status per kind of failure (see the module's documentation).
EXIT_CODES = {
    "ok": 0,
    "bug": 1,
    "usage": 2,
    "authentication": 3,
    "connection": 4,
    "tls": 5,
    "imap": 6,
    "local": 7,
    "partial": 8,
    "interrupted": 130,
    "output_closed": 141,
}

DEFAULT_CONNECTIONS = 4
_TLS_MODES = ("implicit", "starttls", "plain")
_AUTH_MODES = ("auto", "login", "plain", "xoauth2", "oauthbearer")


class UsageError(Exception):
    """A setting is missing or wrong; exit status 2."""


# -- settings: flags, then environment, then config file, then defaults ------------------------


@dataclasses.dataclass(frozen=True)
class _Key:
    name: str
    kind: type
    default: Any = None
    env: bool = True


_KEYS = {
    key.name: key
    for key in (
        _Key("host", str),
        _Key("port", int),
        _Key("user", str),
        _Key("password_command", str),
        _Key("auth", str, "auto"),
        _Key("tls", str, "implicit"),
        _Key("ca_file", str),
        _Key("insecure_plaintext", bool, False),
        _Key("insecure_skip_tls_verify", bool, False),
        _Key("connections", int, DEFAULT_CONNECTIONS),
        _Key("batch_size", int, DEFAULT_BATCH_SIZE),
        _Key("fsync", bool, True),
        _Key("delete", bool, False),
        _Key("maildir", str),
        _Key("folders", list, env=False),
        _Key("exclude", list, env=False),
        # The shared budget and the multi-account export (see _accounts).
        _Key("budget", str),
        _Key("budget_limit", int),
        _Key("budget_lease", int),
        _Key("accounts", str),
    )
}


def _parse_bool(text: str, where: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise UsageError(f"{where}: expected true or false, not {text!r}")


def _load_config(path: str) -> dict[str, Any]:
    try:
        with open(os.path.expanduser(path), "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise UsageError(f"cannot read the config file {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path}: {exc}") from exc
    if "password" in data:
        raise UsageError(
            f"config file {path}: no passwords in config files; use password_command, "
            f"{ENV_PREFIX}PASSWORD or the prompt"
        )
    config: dict[str, Any] = {}
    for name, value in data.items():
        key = _KEYS.get(name.replace("-", "_"))
        if key is None:
            raise UsageError(f"config file {path}: unknown setting {name!r}")
        if key.kind is list:
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise UsageError(f"config file {path}: {name} must be a list of folder names")
        elif key.kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise UsageError(f"config file {path}: {name} must be an integer")
        elif not isinstance(value, key.kind):
            raise UsageError(f"config file {path}: {name} must be a {key.kind.__name__}")
        config[key.name] = value
    return config


class Settings:
    """The effective settings: each from a flag, else the environment, else the config file."""

    def __init__(
        self, args: argparse.Namespace, environ: dict[str, str] | os._Environ[str]
    ) -> None:
        self._args = args
        self._env = environ
        path = getattr(args, "config", None) or environ.get(f"{ENV_PREFIX}CONFIG")
        path = path or _default_config_file(args, environ)
        self._config = _load_config(path) if path else {}

    def get(self, name: str) -> Any:
        key = _KEYS[name]
        value = getattr(self._args, name, None)
        if value is not None:
            return value
        raw = self._env.get(ENV_PREFIX + name.upper()) if key.env else None
        if raw is not None and raw != "":
            where = ENV_PREFIX + name.upper()
            if key.kind is bool:
                return _parse_bool(raw, where)
            if key.kind is int:
                try:
                    return int(raw)
                except ValueError:
                    raise UsageError(f"{where}: expected an integer, not {raw!r}") from None
            return raw
        return self._config.get(name, key.default)

    def has_server(self) -> bool:
        return self.get("host") is not None

    def _secret(self, user: str, host: str) -> Callable[[], str]:
        """How to get the password or token: env, command, prompt; checked now."""
        command_flag = getattr(self._args, "password_command", None)
        env_password = self._env.get(f"{ENV_PREFIX}PASSWORD")
        command = command_flag or (None if env_password else self.get("password_command"))
        if command:
            return lambda: _run_password_command(command)
        if env_password:
            return lambda: env_password
        if sys.stdin is not None and sys.stdin.isatty():
            password = getpass.getpass(f"Password for {user} on {host}: ")
            return lambda: password
        raise UsageError(
            f"no password: set {ENV_PREFIX}PASSWORD, use --password-command, "
            "or run in a terminal to be asked"
        )

    def pool_options(self) -> dict[str, Any]:
        """Keyword arguments for open_pool (the secret included)."""
        host = self.get("host")
        user = self.get("user")
        if not host:
            raise UsageError(f"no server: give --host or set {ENV_PREFIX}HOST")
        if not user:
            raise UsageError(f"no user: give --user or set {ENV_PREFIX}USER")
        tls = self.get("tls")
        if tls not in _TLS_MODES:
            raise UsageError(f"tls must be one of {', '.join(_TLS_MODES)}, not {tls!r}")
        auth = str(self.get("auth")).lower()
        if auth not in _AUTH_MODES:
            raise UsageError(f"auth must be one of {', '.join(_AUTH_MODES)}, not {auth!r}")
        connections = self.get("connections")
        if connections < 1:
            raise UsageError("connections must be at least 1")
        if self.get("batch_size") < 1:
            raise UsageError("batch size must be at least 1")
        if tls == "plain" and not self.get("insecure_plaintext") and not _is_loopback(host):
            raise UsageError(
                f"refusing to send the password without TLS to {host}: use TLS (the default), "
                "--starttls, or --insecure-plaintext if you must"
            )
        options: dict[str, Any] = {
            "host": host,
            "port": self.get("port"),
            "username": user,
            "ssl": tls == "implicit",
            "starttls": tls == "starttls",
            "max_size": connections,
            "insecure_plaintext": self.get("insecure_plaintext"),
            "insecure_skip_tls_verify": self.get("insecure_skip_tls_verify"),
        }
        if self.get("ca_file"):
            options["ca_file"] = os.path.expanduser(self.get("ca_file"))
        secret = self._secret(user, host)
        if auth in ("xoauth2", "oauthbearer"):
            first = secret()

            def token(refresh: bool) -> str:
                return secret() if refresh else first

            options["oauth2_token"] = token
            options["auth_mechanism"] = auth.upper()
        else:
            options["password"] = secret()
            options["auth_mechanism"] = "auto" if auth == "auto" else auth.upper()
        return options


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _run_password_command(command: str) -> str:
    """The first line of the command's standard output, without its line ending.

    The first line is the secret, as ``pass`` and tools like it print it (an entry's other lines
    hold metadata). Nothing of the output, nor the command's standard error, goes into an error
    message.
    """
    try:
        result = subprocess.run(
            command, shell=True, capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        reason = "timed out" if isinstance(exc, subprocess.TimeoutExpired) else type(exc).__name__
        raise UsageError(f"the password command failed ({reason})") from None
    if result.returncode != 0:
        raise UsageError(f"the password command failed with exit status {result.returncode}")
    secret = result.stdout.split("\n", 1)[0].rstrip("\r")
    if not secret:
        raise UsageError("the password command printed nothing on its first line")
    return secret


# -- the parser ----------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line too (the usage is in --help), and
    never show the value of an argument it did not know (``--password=SECRET``)."""

    def error(self, message: str) -> NoReturn:
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            # argparse lists the unknown words as given: keep only what names an option.
            words = message[len(prefix) :].split()
            shown = [w.split("=", 1)[0] if w.startswith("-") else "VALUE" for w in words]
            message = prefix + " ".join(shown)
        self.exit(EXIT_CODES["usage"], f"{self.prog}: error: {message} (see --help)\n")

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        words = sys.argv[1:] if args is None else list(args)
        for word in words:
            if word == "--":
                break
            if _PASSWORD_FLAG.match(word):
                self.error(
                    f"{word.split('=', 1)[0]}: passwords are never taken on the command line "
                    f"(they would be in the shell history and the process list); use "
                    f"{ENV_PREFIX}PASSWORD, --password-command or the prompt"
                )
        return super().parse_known_args(args, namespace)


# Words that look like a password given as an option: --password, --passwd, --pass, -p, with or
# without "=value". --password-command is an option of its own.
_PASSWORD_FLAG = re.compile(r"^(?:--pass(?:word|wd)?|-p)(?:=.*)?$", re.DOTALL)


class _TLSMode(argparse.Action):
    """--starttls or --plain (one of them at most); implicit TLS when neither."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        if getattr(namespace, self.dest, None) not in (None, self.const):
            parser.error("--starttls and --plain exclude each other")
        setattr(namespace, self.dest, self.const)


def _wrap(text: str) -> str:
    return textwrap.fill(" ".join(text.split()), width=88)


def _parser() -> argparse.ArgumentParser:
    doc = __doc__ or ""
    # No abbreviations: "--password x" must not pass for "--password-command x".
    parser = _Parser(
        prog=PROG,
        allow_abbrev=False,
        description="A Trio-native IMAP connection pool, and a mailbox exporter built on it.",
        epilog=doc[doc.index("Commands:") :],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    common.add_argument(
        "-v", "--verbose", action="store_true", help="show each folder and what the pool did"
    )
    common.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bar (it is shown only when stderr is a terminal anyway)",
    )

    server = _Parser(add_help=False)
    group = server.add_argument_group("server (flags, else TRIO_IMAPPOOL_* variables, else config)")
    group.add_argument("--config", metavar="FILE", help="a TOML file of settings")
    group.add_argument("--host", help="the IMAP server")
    group.add_argument("--port", type=int, help="default 993, or 143 with --starttls/--plain")
    group.add_argument("--user", help="the account's user name")
    group.add_argument(
        "--password-command",
        metavar="CMD",
        help="a shell command that prints the password or token (e.g. 'pass show mail')",
    )
    group.add_argument(
        "--auth",
        choices=_AUTH_MODES,
        help="login mechanism; xoauth2/oauthbearer take an OAuth2 access token as the password",
    )
    for flag, mode, text in (
        ("--starttls", "starttls", "plain connection upgraded with STARTTLS (port 143), required"),
        ("--plain", "plain", "no TLS (to loopback only, unless --insecure-plaintext)"),
    ):
        group.add_argument(flag, dest="tls", action=_TLSMode, nargs=0, const=mode, help=text)
    group.add_argument("--ca-file", metavar="PEM", help="trust these CAs instead of the system's")
    group.add_argument(
        "--insecure-plaintext",
        action="store_const",
        const=True,
        help="allow --plain to a host that is not loopback (sends the password in clear)",
    )
    group.add_argument(
        "--insecure-skip-tls-verify",
        action="store_const",
        const=True,
        help="accept any certificate (for testing only)",
    )

    work = _Parser(add_help=False)
    options = work.add_argument_group("export")
    options.add_argument(
        "-c",
        "--connections",
        type=int,
        metavar="N",
        help=f"pooled connections used at once (default {DEFAULT_CONNECTIONS})",
    )
    options.add_argument(
        "--folder",
        dest="folders",
        action="append",
        metavar="NAME",
        help=(
            "a folder to export, or a pattern like 'Archive/*', written with '/' between levels "
            "whatever the server's delimiter and relative to the personal namespace ('Archive' "
            "is INBOX.Archive on Courier); one that matches no folder is an error (status 2); "
            "repeat for more (default: all)"
        ),
    )
    options.add_argument(
        "--exclude",
        action="append",
        metavar="NAME",
        help="a folder or pattern to leave out (written as for --folder)",
    )
    options.add_argument(
        "--batch-size", type=int, metavar="N", help=f"UIDs per FETCH ({DEFAULT_BATCH_SIZE})"
    )
    options.add_argument(
        "--no-fsync",
        dest="fsync",
        action="store_const",
        const=False,
        help="do not flush files to disk (still safe if killed, not on a power cut)",
    )
    options.add_argument(
        "--delete",
        action="store_const",
        const=True,
        help="remove the local copies of messages gone from the server (default: keep them "
        "and report how many)",
    )

    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    export = commands.add_parser(
        "export",
        parents=[common, server, work],
        allow_abbrev=False,
        help="copy an account's folders into a local Maildir (resumable)",
        description=_wrap(
            "Copy the folders of an IMAP account into MAILDIR (Maildir++: INBOX at the top, "
            "other folders as .Folder.Sub), one file per message with its flags, over N "
            "pooled connections. A second run fetches only the messages not exported yet and "
            "follows the server: flags changed there are changed in the file names, and "
            "messages gone from the server are reported (and removed with --delete). The "
            "export is one-way: local changes (flags, deleted files) are never sent to the "
            "server, and the next flag change on the server overwrites a local one. An "
            "interrupted run leaves no partial files. A folder whose UIDVALIDITY changed is "
            "exported again, its old files moved to MAILDIR/trio-imappool-replaced/."
        ),
        epilog=doc[doc.index("Settings come") :],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("maildir", nargs="?", metavar="MAILDIR", help="the destination")
    _accounts.add_arguments(export)  # --budget, --budget-limit, --accounts

    demo = commands.add_parser(
        "demo",
        parents=[common, server, work],
        allow_abbrev=False,
        help="export a seeded mailbox from a private Dovecot, and show what the pool did",
        description=(
            "With no --host: start a private Dovecot on 127.0.0.1 (Debian's dovecot-imapd, "
            "a test CA), seed a mailbox, export it over implicit TLS into a temporary folder "
            "(or --into), export again after new mail arrives, and show what the pool did. "
            "With --host: export that account into the temporary folder, changing nothing "
            "on the server."
        ),
    )
    demo.add_argument("--into", metavar="DIR", help="export here instead of a temporary folder")
    demo.add_argument("--folders", dest="demo_folders", type=int, default=6, help="default 6")
    demo.add_argument("--messages", type=int, default=200, help="per folder (default 200)")
    demo.add_argument("--max-size", dest="connections", type=int, help="the same as --connections")
    demo.add_argument(
        "--latency",
        type=float,
        default=0.0,
        metavar="MS",
        help="add this many ms each way (a proxy), to show what parallel connections buy",
    )
    _add_basics(parser, commands, export, common, server)
    return parser


# -- errors: one line, one exit status -----------------------------------------------------------


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__


def classify(exc: BaseException) -> tuple[str, str]:
    """The exit status name (a key of :data:`EXIT_CODES`) and a one-line message for an error.

    The error and its ``__cause__`` chain are looked at in order, so a
    :class:`~trio_imappool.FanOutError` caused by a lost connection counts as a connection
    error.
    """
    kind = None
    for item in _causes(exc):
        if isinstance(item, UsageError | ConfigurationError | FolderNotFoundError):
            kind = "usage"
        elif isinstance(item, AuthenticationError):
            kind = "authentication"
        elif isinstance(item, TLSError):
            kind = "tls"
        elif isinstance(item, ConnectError | PoolTimeout):
            kind = "connection"
        elif isinstance(item, ExportError):
            kind = "local"
        elif isinstance(item, IMAPClientError):
            kind = "imap"
        elif isinstance(item, OSError):
            kind = "connection"  # a network error in a command (files raise ExportError)
        else:
            continue
        break
    if kind is None:
        kind = "imap" if isinstance(exc, PoolError) else "bug"
    message = " ".join(str(exc).split()) or type(exc).__name__
    if not isinstance(exc, UsageError):
        message = f"{type(exc).__name__}: {message}"
    return kind, message


def _report_error(exc: BaseException, debug: bool, err: TextIO) -> int:
    kind, message = classify(exc)
    if debug:
        traceback.print_exception(exc, file=err)
    hint = "" if debug or kind != "bug" else " (run with --debug for the traceback)"
    print(f"{PROG}: error: {message}{hint}", file=err)
    return EXIT_CODES[kind]


def _single(exc: BaseException) -> BaseException:
    """The one error inside (nested) exception groups: KeyboardInterrupt first."""
    if isinstance(exc, BaseExceptionGroup):
        interrupt = exc.subgroup(KeyboardInterrupt)
        if interrupt is not None:
            return KeyboardInterrupt()
        rest = exc.split(trio.Cancelled)[1]
        if rest is not None and len(rest.exceptions) == 1:
            return _single(rest.exceptions[0])
    return exc


# -- output --------------------------------------------------------------------------------------


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


class _ProgressBar:
    """A tqdm bar of messages (folders and bytes in its postfix) on stderr; nothing when
    stderr is not a terminal, when turned off, or when tqdm is not installed."""

    def __init__(self, enabled: bool) -> None:
        self._bar: Any = None
        if enabled and sys.stderr.isatty():
            with contextlib.suppress(ImportError):
                tqdm = importlib.import_module("tqdm").tqdm  # the extra "cli"; untyped
                self._bar = tqdm(total=0, unit="msg", desc="export", leave=False, file=sys.stderr)

    def update(self, progress: ExportProgress) -> None:
        bar = self._bar
        if bar is None:
            return
        if bar.total != progress.messages_total:
            bar.total = progress.messages_total
        bar.set_postfix_str(
            f"folders {progress.folders_done}/{progress.folders_total}, "
            f"{_size(progress.bytes_done)}",
            refresh=False,
        )
        bar.update(progress.messages_done - bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _n(count: int, word: str) -> str:
    """``1 message``, ``2 messages``."""
    return f"{count:,} {word}{'' if count == 1 else 's'}"


def _print_result(
    result: ExportResult, stats: PoolStatistics, root: Path, verbose: bool, out: TextIO
) -> None:
    folders = len(result.folders)
    total = sum(f.exported for f in result.folders)
    for f in result.folders:
        followed = f.flags_changed or f.gone or f.removed  # new mail alone: the summary
        if not (verbose or followed):
            continue
        note = ""
        if f.uidvalidity_changed:
            note = f"  new UIDVALIDITY: {f.moved_aside} old files moved aside"
        where = "cur/" if f.path == root else f"{f.path.name}/cur/"
        print(
            f"  {_printable(f.name):<24} {f.fetched:6} new {f.flags_changed:6} flags changed "
            f"{f.gone:6} gone from the server {f.removed:6} removed locally "
            f"{f.exported:7} in {where}{note}",
            file=out,
        )
    for f in result.folders:
        if f.uidvalidity_changed and not verbose:
            print(
                f"{f.name}: UIDVALIDITY changed, exported again "
                f"({_n(f.moved_aside, 'old file')} moved to trio-imappool-replaced/)",
                file=out,
            )
    if result.messages_fetched:
        print(
            f"exported {_n(result.messages_fetched, 'new message')} "
            f"({_size(result.bytes_fetched)}) from {result.folders_fetched} of "
            f"{_n(folders, 'folder')} in {result.elapsed:.2f} s "
            f"({result.messages_per_second:,.0f} messages/s) over "
            f"{_n(stats.connections_opened, 'connection')}; {_n(total, 'message')} in {root}",
            file=out,
        )
    elif not (result.flags_changed or result.messages_gone or result.messages_removed):
        print(
            f"nothing new in {_n(folders, 'folder')} ({_n(total, 'message')} in {root}); "
            f"{result.elapsed:.2f} s",
            file=out,
        )
    else:
        print(f"no new messages in {_n(folders, 'folder')}; {result.elapsed:.2f} s", file=out)
    if result.flags_changed or result.messages_gone or result.messages_removed:
        print(
            f"followed the server: flags changed on {_n(result.flags_changed, 'message')}, "
            f"{_n(result.messages_gone, 'message')} gone from the server, "
            f"{_n(result.messages_removed, 'file')} removed locally",
            file=out,
        )
    if result.gone_kept:
        print(
            f"{_n(result.gone_kept, 'message')} gone from the server kept in {root} "
            "(--delete removes them)",
            file=out,
        )
    if verbose:
        print(
            f"pool: {_n(stats.connections_opened, 'connection')} opened, "
            f"{stats.connections_discarded} discarded, {_n(stats.open_failures, 'failed open')}, "
            f"{_n(stats.acquires, 'checkout')} ({stats.acquire_waits} waited)",
            file=out,
        )


def _print_statistics(stats: PoolStatistics, out: TextIO) -> None:
    print("pool statistics:", file=out)
    for field in dataclasses.fields(stats):
        print(f"  {field.name:<22} {getattr(stats, field.name)}", file=out)


# -- export --------------------------------------------------------------------------------------


async def _export(
    options: dict[str, Any], root: Path, settings: Settings, progress: bool
) -> tuple[ExportResult, PoolStatistics]:
    host = options.pop("host")
    port = options.pop("port")
    bar = _ProgressBar(progress)
    try:
        async with open_pool(host, port, **options) as pool:
            result = await export_maildir(
                pool,
                root,
                folders=settings.get("folders"),
                exclude=settings.get("exclude") or (),
                batch_size=settings.get("batch_size"),
                max_connections=options["max_size"],
                fsync=settings.get("fsync"),
                progress=bar.update,
                delete=bool(settings.get("delete")),
            )
        return result, pool.statistics()
    finally:
        bar.close()


def _run_export(args: argparse.Namespace, out: TextIO) -> int:
    settings = Settings(args, os.environ)
    maildir = args.maildir or settings.get("maildir")
    if not maildir:
        raise UsageError("no destination: give MAILDIR (or maildir in the config file)")
    if settings.get("accounts"):  # many accounts, shared with other workers
        if settings.get("delete"):
            raise UsageError("--delete is not supported with --accounts (yet)")
        return _accounts.run_accounts(args, settings, out)
    root = Path(os.path.expanduser(maildir))
    options = settings.pool_options()
    options.update(_accounts.budget_options(settings, options))  # {"budget": ...}
    result, stats = trio.run(_export, options, root, settings, args.progress)
    _print_result(result, stats, root, args.verbose, out)
    return _report_incomplete(result, sys.stderr)


def _printable(name: str) -> str:
    """A folder name for one line of output: control characters shown as escapes."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in name)


def _report_incomplete(result: ExportResult, err: TextIO) -> int:
    """Name each folder not exported and each folder with missing messages; the exit status."""
    for failure in result.folders_failed:
        print(
            f"{PROG}: folder {_printable(failure.name)!r} not exported: {failure.reason}",
            file=err,
        )
    for folder in result.folders:
        if folder.missing:
            print(
                f"{PROG}: folder {_printable(folder.name)!r}: {_n(folder.missing, 'message')} "
                "listed by the server but not returned (not exported; the next run asks again)",
                file=err,
            )
    if result.complete:
        return EXIT_CODES["ok"]
    print(f"{PROG}: partial export: run again to retry what is named above", file=err)
    return EXIT_CODES["partial"]


# -- demo ----------------------------------------------------------------------------------------


def _demo(args: argparse.Namespace, out: TextIO) -> int:
    if min(args.demo_folders, args.messages, _connections(args)) < 1:
        raise UsageError("--folders, --messages and --connections must be at least 1")
    settings = Settings(args, os.environ)
    with contextlib.ExitStack() as stack:
        if args.into:
            root = Path(os.path.expanduser(args.into))
        else:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="imappool-demo-")))
            root = root / "Maildir"
        if settings.has_server():
            options = settings.pool_options()
            print(f"exporting {options['username']} on {options['host']} into {root}", file=out)
            result, stats = trio.run(_export, options, root, settings, args.progress)
            _print_result(result, stats, root, True, out)
            return 0
        return _demo_with_dovecot(args, settings, root, stack, out)
    raise AssertionError  # pragma: no cover (for mypy: ExitStack might swallow exceptions)


def _connections(args: argparse.Namespace) -> int:
    return DEFAULT_CONNECTIONS if args.connections is None else int(args.connections)


def _demo_flags(folder: str, i: int) -> list[str]:
    flags = []
    if i % 3 == 0:
        flags.append(r"\Seen")
    if i % 7 == 0:
        flags.append(r"\Flagged")
    if i % 11 == 0:
        flags.append(r"\Answered")
    return flags


def _demo_with_dovecot(
    args: argparse.Namespace,
    settings: Settings,
    root: Path,
    stack: contextlib.ExitStack,
    out: TextIO,
) -> int:
    from .testing import DovecotNotFoundError, seed_folders, start_dovecot, start_proxy_thread

    try:
        import trustme  # noqa: F401
    except ImportError:
        raise UsageError(
            "the demo needs the trustme package: pip install 'trio-imappool[demo]'"
        ) from None
    names = ["INBOX", "Archive/2024", "Archive/2025", "Sent", "Lists/trio", "Drafts"]
    names += [f"Folder{i}" for i in range(len(names), args.demo_folders)]
    names = names[: args.demo_folders]
    try:
        server = stack.enter_context(start_dovecot(users={"demo": "demo-password"}))
    except DovecotNotFoundError as exc:
        raise UsageError(str(exc)) from exc
    started = time.monotonic()
    seed_folders(server, dict.fromkeys(names, args.messages), flags=_demo_flags)
    print(
        f"Dovecot on {server.host}:{server.imaps_port} (implicit TLS, a test CA); "
        f"seeded {len(names)} folders x {args.messages} messages "
        f"in {time.monotonic() - started:.2f} s",
        file=out,
    )
    ca_file = server.base_dir / "ca.pem"
    server.ca.cert_pem.write_to_path(str(ca_file))
    port = server.imaps_port
    if args.latency > 0:
        proxy = stack.enter_context(
            start_proxy_thread(server.host, port, up=args.latency / 1000, down=args.latency / 1000)
        )
        port = proxy.port
        print(f"through a proxy adding {args.latency:g} ms each way", file=out)
    options = {
        "host": server.host,
        "port": port,
        "username": "demo",
        "password": "demo-password",
        "ssl": True,
        "ca_file": str(ca_file),
        "max_size": settings.get("connections"),
    }
    print(
        f"\n$ TRIO_IMAPPOOL_PASSWORD=demo-password {PROG} export --host {server.host} "
        f"--port {port} --user demo "
        f"--ca-file {ca_file} -c {options['max_size']} {root}",
        file=out,
    )
    result, stats = trio.run(_export, dict(options), root, settings, args.progress)
    _print_result(result, stats, root, True, out)
    _show_files(root, out)

    arriving = {names[0]: 3}
    arriving[names[-1]] = arriving.get(names[-1], 0) + 2
    seed_folders(server, arriving, flags=_demo_flags)
    count = sum(arriving.values())
    print(f"\n{count} new messages arrive; the same command again:", file=out)
    result, stats = trio.run(_export, dict(options), root, settings, args.progress)
    _print_result(result, stats, root, args.verbose, out)

    print("\nthe pool under a deadline:", file=out)
    trio.run(_show_deadline, dict(options), names, out)
    return 0


def _show_files(root: Path, out: TextIO) -> None:
    inbox = sorted((root / "cur").iterdir())
    subfolders = sorted(p.name for p in root.iterdir() if p.name.startswith("."))
    print(f"{root}: INBOX in cur/, subfolders {', '.join(subfolders)}", file=out)
    for path in inbox[:3]:
        print(f"  cur/{path.name}", file=out)


async def _show_deadline(options: dict[str, Any], names: list[str], out: TextIO) -> None:
    host, port = options.pop("host"), options.pop("port")
    async with open_pool(host, port, **options) as pool:
        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(_fetch_sizes, pool, name)
        # A deadline that fires while a command blocks in its worker thread: the command is
        # interrupted at once, and the connection is discarded, not returned.
        started = trio.current_time()
        with trio.move_on_after(0.2):
            async with pool.connection() as conn:
                interrupted = conn.number
                await conn.select_folder("INBOX")
                await conn.idle()
                await conn.idle_check(timeout=30)
        print(
            f"a 0.2 s deadline on a blocked IDLE wait returned after "
            f"{trio.current_time() - started:.2f} s; connection #{interrupted} was discarded "
            f"(pool size now {pool.statistics().size})",
            file=out,
        )
        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(_fetch_sizes, pool, name)
        with trio.move_on_after(5):  # a replacement may still be opening: let it finish
            await pool.counts.wait_value(lambda counts: counts.opening == 0)
        print(
            f"{len(names)} tasks fetched every folder again; "
            f"pool size back to {pool.statistics().size}",
            file=out,
        )
        _print_statistics(pool.statistics(), out)


async def _fetch_sizes(pool: Pool, name: str) -> None:
    async with pool.connection(name, readonly=True) as conn:
        uids = await conn.search(["ALL"])
        await conn.fetch(uids, ["RFC822.SIZE"])


# -- the command line's basics: --version, the default config file, folders, --dry-run, -q ---------


#: Folder names and what they become on disk (``local_folder_name``), for ``folders --help``.
_ESCAPING_EXAMPLES = (
    ("INBOX", "/"),
    ("Archive/2024", "/"),
    ("Lists.trio", "."),
    ("a.b", "/"),
    ("a/b", "."),
    ("50% off", "/"),
    ("Ünïcödé", "/"),
)


def _escaping_help() -> str:
    """How folder names become directory names, with examples computed by the exporter's own
    mapping (so the help cannot drift from it)."""
    lines = [
        "Folder names on disk (Maildir++, as export writes them; the MAILDIR column of the list):",
    ]
    for name, delimiter in _ESCAPING_EXAMPLES:
        local = local_folder_name(name, delimiter) or "(MAILDIR itself: cur/, new/, tmp/)"
        lines.append(f"  {name:<14} delimiter {delimiter!r}  ->  {local}")
    courier = local_folder_name("INBOX.Archive", ".", "INBOX.")
    lines.append(f"  {'INBOX.Archive':<14} delimiter '.'  ->  {courier}  (namespace INBOX.)")
    lines.append(
        _wrap(
            "Each other folder is '.' and the parts of its name (split at the server's "
            "delimiter) joined with '.'; in a part, '%', '.', '/' and control characters are "
            "written %XX (hex), everything else (non-ASCII included) is kept. A name over 200 "
            "bytes is cut and ends with %~ and 16 hex digits of a hash; two folders that would "
            "share a directory never do (the second gets the %~ suffix). Names are taken "
            "relative to the server's personal namespace (Courier's INBOX. prefix is dropped)."
        )
    )
    return "\n".join(lines)


def _default_config_file(
    args: argparse.Namespace, environ: dict[str, str] | os._Environ[str]
) -> str | None:
    """The default config file, if it exists: ``$XDG_CONFIG_HOME/trio-imappool/config.toml``,
    else ``$HOME/.config/trio-imappool/config.toml``. Only for export and folders (the demo
    never reaches a real account unless told to)."""
    if getattr(args, "command", None) not in ("export", "folders"):
        return None
    base = environ.get("XDG_CONFIG_HOME", "")
    if not os.path.isabs(base):  # the XDG spec: a relative path is ignored
        home = environ.get("HOME", "")
        if not os.path.isabs(home):
            return None
        base = os.path.join(home, ".config")
    path = os.path.join(base, PROG, "config.toml")
    return path if os.path.isfile(path) else None


def _add_basics(
    parser: argparse.ArgumentParser,
    commands: Any,
    export: argparse.ArgumentParser,
    common: argparse.ArgumentParser,
    server: argparse.ArgumentParser,
) -> None:
    """--version, export's --dry-run and -q, and the folders command."""
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    quiet_help = "print nothing but errors (on stderr); the exit status tells the rest"
    export.add_argument(
        "-n",
        "--dry-run",
        action="store_true",
        help="connect and show what would be fetched (per folder), fetching and writing nothing",
    )
    export.add_argument("-q", "--quiet", action="store_true", help=quiet_help)
    export.epilog = (export.epilog or "") + (
        "\nHow folder names become directory names: see `trio-imappool folders --help`.\n"
    )
    folders = commands.add_parser(
        "folders",
        parents=[common, server],
        allow_abbrev=False,
        help="list the account's folders: messages, sizes, and what an export would fetch",
        description=_wrap(
            "List the account's selectable folders (the ones export would take, INBOX first) "
            "with their message counts, their sizes (STATUS SIZE where the server has it, "
            "else the sum of the messages' RFC822.SIZE), and the directory each gets in a "
            "Maildir. With MAILDIR (or maildir in the config), also how many new messages an "
            "export into it would fetch, from its files and state files. Nothing is fetched "
            "or written, on the server or on disk."
        ),
        epilog=_escaping_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    folders.add_argument(
        "maildir", nargs="?", metavar="MAILDIR", help="show what an export into it would fetch"
    )
    folders.add_argument(
        "-c",
        "--connections",
        type=int,
        metavar="N",
        help=f"connections used at once for the sizes (default {DEFAULT_CONNECTIONS})",
    )
    folders.add_argument(
        "--folder",
        dest="folders",
        action="append",
        metavar="NAME",
        help="a folder or pattern like 'Archive/*' to list; repeat for more (default: all)",
    )
    folders.add_argument(
        "--exclude", action="append", metavar="NAME", help="a folder or pattern to leave out"
    )
    folders.add_argument("-q", "--quiet", action="store_true", help=quiet_help)


def _run_command(args: argparse.Namespace, out: TextIO) -> int:
    """Run the chosen command; its output is flushed here, so that a closed pipe is found
    while the errors are still handled (not at the interpreter's exit)."""
    if getattr(args, "quiet", False):
        if args.verbose:
            raise UsageError("-q and -v exclude each other")
        args.progress = False
        out = io.StringIO()  # errors still go to stderr
    if args.command == "folders":
        status = _run_folders(args, out)
    elif args.command == "export" and getattr(args, "dry_run", False):
        status = _run_dry_run(args, out)
    elif args.command == "export":
        status = _run_export(args, out)
    else:
        status = _demo(args, out)
    out.flush()
    return status


async def _survey_account(
    options: dict[str, Any], root: Path | None, settings: Settings, sizes: bool
) -> Survey:
    host = options.pop("host")
    port = options.pop("port")
    async with open_pool(host, port, **options) as pool:
        return await survey(
            pool,
            root,
            folders=settings.get("folders"),
            exclude=settings.get("exclude") or (),
            sizes=sizes,
            max_connections=options["max_size"],
        )


def _report_unusable(failures: Sequence[FolderFailure], err: TextIO) -> None:
    for failure in failures:
        print(
            f"{PROG}: folder {_printable(failure.name)!r} cannot be exported: {failure.reason}",
            file=err,
        )


def _run_folders(args: argparse.Namespace, out: TextIO) -> int:
    settings = Settings(args, os.environ)
    maildir = args.maildir or settings.get("maildir")
    root = Path(os.path.expanduser(maildir)) if maildir else None
    found = trio.run(_survey_account, settings.pool_options(), root, settings, True)
    _print_folders(found, root, out)
    _report_unusable(found.failures, sys.stderr)
    return EXIT_CODES["ok"]


def _print_folders(found: Survey, root: Path | None, out: TextIO) -> None:
    header = ["FOLDER", "MESSAGES", "SIZE", *(["NEW"] if root is not None else []), "MAILDIR"]
    rows = [header]
    for f in found.folders:
        row = [_printable(f.server.name), f"{f.server.messages:,}"]
        row.append("-" if f.size is None else _size(f.size))
        if root is not None:
            row.append(f"{f.new or 0:,}")
        row.append(_printable(f.local) or "(top)")
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(row[1:-1], widths[1:-1], strict=True)]
        cells.append(row[-1])
        print("  ".join(cells).rstrip(), file=out)
    messages = sum(f.server.messages for f in found.folders)
    total = f"{_n(len(found.folders), 'folder')}, {_n(messages, 'message')}"
    if found.size_source is not None:
        size = sum(f.size or 0 for f in found.folders)
        total += f", {_size(size)} (sizes from {found.size_source})"
    if root is not None:
        new = [f for f in found.folders if f.new]
        count = sum(f.new or 0 for f in new)
        if count:
            total += (
                f"; an export into {root} would fetch {_n(count, 'new message')} from "
                f"{len(new)} of {_n(len(found.folders), 'folder')}"
            )
        else:
            total += f"; nothing new to export into {root}"
    print(total, file=out)


def _run_dry_run(args: argparse.Namespace, out: TextIO) -> int:
    settings = Settings(args, os.environ)
    maildir = args.maildir or settings.get("maildir")
    if not maildir:
        raise UsageError("no destination: give MAILDIR (or maildir in the config file)")
    if settings.get("accounts"):
        raise UsageError("--dry-run is for one account; it cannot be used with --accounts")
    root = Path(os.path.expanduser(maildir))
    found = trio.run(_survey_account, settings.pool_options(), root, settings, False)
    print(f"dry run: nothing is fetched or written into {root}", file=out)
    width = max((len(_printable(f.server.name)) for f in found.folders), default=0)
    count = 0
    active = 0
    for f in found.folders:
        new = f.new or 0
        count += new
        active += bool(new)
        if not (new or f.aside or args.verbose):
            continue
        where = "cur/" if not f.local else f"{_printable(f.local)}/cur/"
        note = ""
        if f.aside:
            note = f"  (new UIDVALIDITY: {_n(f.aside, 'old file')} would be moved aside first)"
        line = f"  {_printable(f.server.name):<{width}} {new:7,} new {f.exported:7,} in {where}"
        print(f"{line}{note}", file=out)
    folders = _n(len(found.folders), "folder")
    if count:
        print(f"would fetch {_n(count, 'new message')} from {active} of {folders}", file=out)
    else:
        print(f"nothing new in {folders}", file=out)
    _report_unusable(found.failures, sys.stderr)
    return EXIT_CODES["ok"]


def _output_closed(exc: BaseException) -> bool:
    """Whether *exc* is a BrokenPipeError from writing to a standard output whose reader has
    gone (``| head``). A BrokenPipeError from an IMAP socket, standard output being fine,
    stays a connection error."""
    if not any(isinstance(item, BrokenPipeError) for item in _causes(exc)):
        return False
    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        events = poller.poll(0)
    except (AttributeError, OSError, ValueError):  # no real stdout (a test's capture)
        return False
    # Linux and the BSDs report POLLERR (or POLLHUP) on a pipe's write end without readers.
    return any(mask & (select.POLLERR | select.POLLHUP) for _fd, mask in events)


def _quiet_exit_for_closed_output() -> int:
    """Point standard output at /dev/null (so that the interpreter's last flush does not
    complain either) and return 141, what a shell shows for a program killed by SIGPIPE."""
    with contextlib.suppress(AttributeError, OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)
    return EXIT_CODES["output_closed"]


# -- main ----------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    out = sys.stdout
    with _logging(args.debug, args.verbose):
        return _main(args, out)


@contextlib.contextmanager
def _logging(debug: bool, verbose: bool) -> Iterator[None]:
    """The library's log records on stderr, one line each: errors only by default (the error
    that ends the run is reported once, by main), warnings with --verbose, all with --debug."""
    logger = logging.getLogger("trio_imappool")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
    saved = logger.level, logger.propagate
    logger.setLevel(logging.DEBUG if debug else logging.WARNING if verbose else logging.ERROR)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def _main(args: argparse.Namespace, out: TextIO) -> int:
    try:
        return _run_command(args, out)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; what was written stays: run again to go on", file=sys.stderr)
        return EXIT_CODES["interrupted"]
    except BaseException as exc:
        error = _single(exc)
        if _output_closed(error):
            return _quiet_exit_for_closed_output()
        if isinstance(error, KeyboardInterrupt):
            print(f"{PROG}: interrupted; run again to go on", file=sys.stderr)
            return EXIT_CODES["interrupted"]
        if isinstance(error, SystemExit | GeneratorExit) or not isinstance(error, Exception):
            raise
        return _report_error(error, args.debug, sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
