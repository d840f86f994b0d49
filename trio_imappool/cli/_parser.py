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
"starttls" | "plain", ca_file, connections, batch_size, memory_budget, fsync, delete,
folders = [...], exclude = [...], maildir); then the defaults.
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
import re
import sys
import textwrap
from collections.abc import Sequence
from typing import Any, NoReturn

from trio_imappool import __version__
from trio_imappool.exporter import local_folder_name
from trio_imappool.wire import DEFAULT_BATCH_SIZE

from . import _accounts
from ._settings import _AUTH_MODES, DEFAULT_CONNECTIONS, ENV_PREFIX, EXIT_CODES, PROG

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
        "--memory-budget",
        type=int,
        metavar="MIB",
        help="MiB of messages held at once, from their FETCH until they are written (64); "
        "a larger message is fetched alone",
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
