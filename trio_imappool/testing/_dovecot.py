"""A private Dovecot IMAP server for tests, started and stopped from Python.

Every server lives in its own short temporary folder (Unix socket paths must stay under 108
bytes, so pytest's ``tmp_path`` is too long; ``/dev/shm`` when there is one, because seeding
thousands of messages on a disk can be throttled to a crawl) and listens on ``127.0.0.1`` only,
on two free ports chosen here: a plain listener that offers STARTTLS and an implicit-TLS
listener. The TLS certificate comes from a `trustme` CA made in memory; each user has a
passwd-file of their own; mail is stored as maildir under the folder.

The configuration avoids the traps of a stock Dovecot in a test suite:

- the userdb hands out an unprivileged uid (``nobody`` when we run as root, ourselves otherwise):
  uid 0 kills the ``imap`` process right after a good LOGIN;
- the folder is mode 0755, so the auth process (user ``dovecot``) can read the users' files;
- the ``anvil-auth-penalty`` listener is off, so a failed LOGIN does not slow down the logins
  after it, and ``auth_failure_delay = 0`` makes a failed LOGIN answer after 0.5 s, not 2 s;
- ``imap-login`` serves every connection from one process (``service_count = 0``);
- ``mail_fsync = never``, so seeding thousands of messages takes about a second;
- Dovecot re-reads a passwd-file at most once a second: one file per user lets a new user log
  in at once.

Stopping kills Dovecot's whole process group with SIGKILL (instant, and every client connection
drops), waits until no member is left holding the ports, and removes its runtime files
(``master.pid`` and sockets), so that :meth:`DovecotServer.start` can bring it back at once on the
same ports with the same mail. A start takes about 35 ms, a stop about 5 ms.

Everything here is synchronous and bounded in time: waits have deadlines, and a server that does
not become ready raises :class:`DovecotStartError` with the end of its log. Methods may be called
from any thread (a lock serializes them), e.g. through ``trio.to_thread.run_sync``.

The life cycle (start, readiness check, stop), the folder and port helpers and the client-side
helpers are shared with Cyrus (``_server.ProcessServer``); this module holds what is Dovecot's own.
"""

from __future__ import annotations

import contextlib
import grp
import math
import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from ._server import (
    DEFAULT_USERS,
    HOST,
    ProcessServer,
    check_field,
    free_ports,
    import_trustme,
    run_in_new_folder,
    user_map,
)

__all__ = [
    "DEFAULT_USERS",
    "DovecotFactory",
    "DovecotNotFoundError",
    "DovecotServer",
    "DovecotStartError",
    "find_dovecot",
    "start_dovecot",
]

DEFAULT_DOVECOT = "/usr/sbin/dovecot"
DEFAULT_DOVEADM = "/usr/bin/doveadm"
INSTALL_HINT = "install it with `apt-get install dovecot-imapd` (Debian/Ubuntu)"
IMAP_INSTALL_HINT = (
    "Dovecot is installed without its IMAP server (Debian's dovecot-core without "
    "dovecot-imapd): install it with `apt-get install dovecot-imapd`"
)
_DOVEADM_TIMEOUT = 10.0
_import_trustme = import_trustme  # its old name here (the trustme check before a start)


class DovecotNotFoundError(RuntimeError):
    """The Dovecot binary (or ``doveadm``) is not installed where we looked."""


class DovecotStartError(RuntimeError):
    """Dovecot exited, or did not accept a LOGIN and SELECT INBOX, before the deadline.

    The message includes the end of Dovecot's log.
    """


def find_dovecot(dovecot_binary: str | os.PathLike[str] | None = None) -> str:
    """Locate the ``dovecot`` binary.

    Args:
        dovecot_binary: The path to use. ``None`` looks for ``dovecot`` on ``PATH``, then at
            ``/usr/sbin/dovecot`` (``/usr/sbin`` is often not on a user's ``PATH``).

    Returns:
        The path of an executable file.

    Raises:
        DovecotNotFoundError: There is no such executable; the message says how to install it.
    """
    if dovecot_binary is not None:
        candidates = [os.fspath(dovecot_binary)]
    else:
        candidates = [p for p in (shutil.which("dovecot"), DEFAULT_DOVECOT) if p]
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise DovecotNotFoundError(
        f"Dovecot not found (looked for {' and '.join(candidates)}): {INSTALL_HINT}"
    )


def _find_imap(dovecot: str) -> str:
    """Locate Dovecot's ``imap`` program (the IMAP server proper, from ``dovecot-imapd``).

    Without it Dovecot starts, accepts connections, and drops every session after LOGIN; say so
    before starting instead.
    """
    prefix = Path(os.path.realpath(dovecot)).parent.parent
    candidates = [
        prefix / "lib" / "dovecot" / "imap",
        prefix / "libexec" / "dovecot" / "imap",
    ]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    looked = " and ".join(str(path) for path in candidates)
    raise DovecotNotFoundError(f"{IMAP_INSTALL_HINT} (looked for {looked})")


def _find_doveadm(doveadm_binary: str | os.PathLike[str] | None, dovecot: str) -> str:
    if doveadm_binary is not None:
        candidates = [os.fspath(doveadm_binary)]
    else:
        sibling = os.path.join(os.path.dirname(dovecot), "doveadm")
        found = shutil.which("doveadm")
        candidates = [p for p in (found, DEFAULT_DOVEADM, sibling) if p]
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise DovecotNotFoundError(
        f"doveadm not found (looked for {' and '.join(candidates)}): {INSTALL_HINT}"
    )


def _mail_ids() -> tuple[int, int]:
    """The uid and gid that own the mail: never 0, which Dovecot refuses after LOGIN."""
    if os.geteuid() != 0:
        return os.geteuid(), os.getegid()
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        return 65534, 65534
    return nobody.pw_uid, nobody.pw_gid


class DovecotServer(ProcessServer):
    """One private Dovecot instance; use :func:`start_dovecot` to get one.

    Attributes:
        host: Always ``"127.0.0.1"``.
        imap_port: The plain IMAP listener; it offers STARTTLS and allows LOGIN without TLS.
        imaps_port: The implicit-TLS listener.
        ca: The `trustme.CA` that signed the server certificate (valid for ``localhost`` and
            ``127.0.0.1``).
        users: The users and their passwords (a copy; use :meth:`add_user` to add one).
        base_dir: The server's temporary folder (configuration, users, mail, runtime files).
        log_path: Dovecot's log file.
        config_path: The generated ``dovecot.conf``.
        max_userip_connections: Dovecot's ``mail_max_userip_connections``.
    """

    _product = "Dovecot"
    _start_error = DovecotStartError

    config_path: Path
    max_userip_connections: int

    def __init__(
        self,
        *,
        base_dir: Path,
        users: Mapping[str, str],
        max_userip_connections: int,
        extra_config: str,
        dovecot_binary: str,
        doveadm_binary: str,
        ready_timeout: float,
        tls: bool = True,
        tls_identities: Sequence[str] = ("localhost", HOST),
    ) -> None:
        # Private: start_dovecot() makes the folder and calls this.
        super().__init__(base_dir=base_dir, log_name="dovecot.log", ready_timeout=ready_timeout)
        self.config_path = base_dir / "dovecot.conf"
        self.max_userip_connections = max_userip_connections
        self._users_dir = base_dir / "users"
        self._home_root = base_dir / "home"
        self._run_dir = base_dir / "run"
        self._extra_config = extra_config
        self._dovecot = dovecot_binary
        self._doveadm = doveadm_binary
        self._uid, self._gid = _mail_ids()
        self._first_start = True
        #: Whether TLS is on: implicit TLS on imaps_port and STARTTLS on imap_port. Without it
        #: Dovecot offers no STARTTLS and listens on imap_port only.
        self.tls = tls

        self._issue_certificate(tls_identities)
        self._home_root.mkdir(mode=0o755)
        self._users_dir.mkdir(mode=0o755)
        (base_dir / "state").mkdir(mode=0o755)
        for name, password in users.items():
            self._add_user(name, password)
        self._write_config()

    # -- users -------------------------------------------------------------------------------

    def add_user(self, name: str, password: str) -> None:
        """Add a user, or change a user's password, while running or not.

        Each user has a passwd-file of their own, so a new user can log in at once. Dovecot
        re-reads a changed file at most once a second: changing the password of an existing
        user of a running server therefore waits until the next second.

        Raises:
            ValueError: The name or password cannot be stored in a passwd-file.
        """
        with self._lock:
            existed = name in self._users
            written = self._add_user(name, password)
            if existed and self.running:
                time.sleep(max(0.0, math.floor(written) + 1.0 - time.time()))

    def _add_user(self, name: str, password: str) -> float:
        check_field("user name", name)
        check_field("password", password)
        if "/" in name or name in {".", ".."}:
            raise ValueError(f"user name {name!r} cannot be a file name")
        self._users[name] = password
        self._make_home(name)
        self._write_user(name)
        return time.time()

    def _make_home(self, name: str) -> None:
        home = self._home_root / name
        home.mkdir(mode=0o700, exist_ok=True)
        if os.geteuid() == 0:
            os.chown(home, self._uid, self._gid)

    def _write_user(self, name: str) -> None:
        path = self._users_dir / name
        home = self._home_root / name
        line = f"{name}:{{PLAIN}}{self._users[name]}:{self._uid}:{self._gid}::{home}::\n"
        old_mtime = path.stat().st_mtime if path.exists() else 0.0
        # Replace atomically (Dovecot may read the file at any moment) and make sure the
        # modification time moves: Dovecot compares whole seconds and the size.
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_text(line, encoding="utf-8")
        tmp.chmod(0o644)
        mtime = max(time.time(), old_mtime + 1.0)
        os.utime(tmp, (mtime, mtime))
        os.replace(tmp, path)

    def _write_config(self) -> None:
        base = self.base_dir
        internal = no_chroot = ""
        if os.geteuid() != 0:
            # Unprivileged Dovecot: every service runs as us.
            me = pwd.getpwuid(os.geteuid()).pw_name
            group = grp.getgrgid(os.getegid()).gr_name
            internal = (
                f"default_internal_user = {me}\ndefault_login_user = {me}\n"
                f"default_internal_group = {group}\n"
            )
            no_chroot = "  chroot =\n"  # only root may chroot
        text = f"""\
# Generated by trio_imappool.testing for a test server. Do not edit.
instance_name = trio-imappool-{self.imap_port}
base_dir = {self._run_dir}
state_dir = {base}/state
log_path = {self.log_path}
{internal}protocols = imap
listen = {HOST}
ssl = {"yes" if self.tls else "no"}
ssl_cert = <{base}/cert.pem
ssl_key = <{base}/key.pem
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = 0
auth_verbose = yes
first_valid_uid = 1
first_valid_gid = 1
mail_location = maildir:~/Maildir
mail_fsync = never
mail_max_userip_connections = {self.max_userip_connections}
verbose_proctitle = yes

passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {self._users_dir}/%u
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {self._users_dir}/%u
}}

namespace inbox {{
  inbox = yes
  separator = /
  mailbox Drafts {{
    special_use = \\Drafts
  }}
  mailbox Sent {{
    special_use = \\Sent
  }}
  mailbox Trash {{
    special_use = \\Trash
  }}
  mailbox Junk {{
    special_use = \\Junk
  }}
}}

service imap-login {{
  inet_listener imap {{
    address = {HOST}
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    address = {HOST}
    port = {self.imaps_port}
    ssl = yes
  }}
  service_count = 0
{no_chroot}}}

service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
{no_chroot}}}

{self._extra_config}
"""
        self.config_path.write_text(text, encoding="utf-8")

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Start Dovecot, on the same ports and with the same mail as before.

        Returns once the first user can LOGIN and SELECT INBOX. Does nothing if running.

        Raises:
            DovecotStartError: Dovecot exited or was not ready within the deadline (10 s by
                default); it has been stopped and the message has the end of its log.
            RuntimeError: The server was closed.
        """
        with self._lock:
            try:
                self._start()
            except DovecotStartError as exc:
                if self._first_start and "Address already in use" in str(exc):
                    # Another program took a port between our pick and Dovecot's bind.
                    self._first_start = False
                    self.imap_port, self.imaps_port = free_ports(2)
                    self._write_config()
                    self.start()
                    return
                raise
            self._first_start = False

    def _command(self) -> list[str]:
        return [self._dovecot, "-F", "-c", str(self.config_path)]

    def _config_file(self) -> Path:
        return self.config_path

    def _imaps_listening(self) -> bool:
        return self.tls

    def _clean_runtime_files(self) -> None:
        # A stale master.pid or anvil-auth-penalty socket makes Dovecot refuse or stall.
        shutil.rmtree(self._run_dir, ignore_errors=True)

    # -- admin -------------------------------------------------------------------------------

    def doveadm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``doveadm`` against this server, with a 10 s deadline.

        Args:
            *args: The doveadm command and its arguments, e.g. ``"who"``.
            check: Raise if doveadm exits with a non-zero status.

        Returns:
            The finished process, with text ``stdout`` and ``stderr``.

        Raises:
            subprocess.CalledProcessError: ``check`` is true and doveadm failed.
            subprocess.TimeoutExpired: doveadm did not finish in time.
        """
        return subprocess.run(
            [self._doveadm, "-c", str(self.config_path), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=_DOVEADM_TIMEOUT,
            check=check,
        )

    def connections(self, user: str | None = None) -> int:
        """How many IMAP sessions (logged-in connections) Dovecot counts, for a user or all.

        Connections that have not logged in are not counted. 0 when the server is stopped.
        """
        if not self.running:
            return 0
        args = ["who", "-1"] + ([user] if user is not None else [])
        out = self.doveadm(*args).stdout.splitlines()
        # `who -1` prints a header line, then one line per connection.
        return sum(1 for line in out[1:] if line.strip())

    def kick(self, user: str) -> None:
        """Drop all of a user's connections from the server side.

        Returns once Dovecot no longer counts any of them (within 5 s), so the client's next
        command fails with ``IMAPClientAbortError``.

        Raises:
            RuntimeError: The server is not running, or the connections outlived the deadline.
        """
        if not self.running:
            raise RuntimeError(f"{self!r} is not running")
        self.doveadm("kick", user, check=False)
        self._wait_kicked(user, lambda: not self.connections(user))


@contextlib.contextmanager
def start_dovecot(
    *,
    users: Mapping[str, str] | None = None,
    max_userip_connections: int = 100,
    extra_config: str = "",
    dovecot_binary: str | os.PathLike[str] | None = None,
    doveadm_binary: str | os.PathLike[str] | None = None,
    ready_timeout: float = 10.0,
    root_dir: str | os.PathLike[str] | None = None,
    tls: bool = True,
    tls_identities: Sequence[str] = ("localhost", HOST),
) -> Iterator[DovecotServer]:
    """Run a private Dovecot on 127.0.0.1 for the duration of a ``with`` block.

    Args:
        users: User name -> password; ``None`` for alice/alice-pw and bob/bob-pw. The first one
            is :attr:`DovecotServer.username`, and the readiness check logs in as it.
        max_userip_connections: Dovecot's ``mail_max_userip_connections``: past it, LOGIN
            fails with ``[LIMIT]``.
        extra_config: Raw text appended to ``dovecot.conf`` (later settings win).
        dovecot_binary: Path of ``dovecot``; ``None`` searches ``PATH`` and ``/usr/sbin``.
        doveadm_binary: Path of ``doveadm``; ``None`` searches ``PATH`` and ``/usr/bin``.
        ready_timeout: Seconds to wait for a LOGIN and SELECT INBOX to succeed.
        tls: ``False`` for a server without TLS (``ssl = no``): no STARTTLS on the plain port,
            no implicit-TLS listener. For testing clients that must refuse that.
        tls_identities: The host names and addresses in the server certificate; give others
            to test a client's host name check.
        root_dir: Where to make the server's folder; ``None`` for ``/dev/shm`` (in memory)
            when usable, else the temporary folder (``/tmp`` if that path is long: Unix socket
            paths must stay short). Dovecot's own users must be able to traverse it.

    Yields:
        The running server. Leaving the block stops it and removes its folder.

    Raises:
        DovecotNotFoundError: Dovecot is not installed, or installed without its IMAP server
            (``dovecot-core`` without ``dovecot-imapd``); the message names the package.
        ModuleNotFoundError: trustme is missing (``pip install 'trio-imappool[testing]'``).
        DovecotStartError: Dovecot did not start (the message has the end of its log).
        ValueError: ``users`` is empty or holds a name or password a passwd-file cannot store.
    """
    dovecot = find_dovecot(dovecot_binary)
    doveadm = _find_doveadm(doveadm_binary, dovecot)
    _find_imap(dovecot)
    _import_trustme()
    all_users = user_map(users, "start_dovecot")
    if max_userip_connections < 1:
        raise ValueError("max_userip_connections must be at least 1")

    def make(base_dir: Path) -> DovecotServer:
        return DovecotServer(
            base_dir=base_dir,
            users=all_users,
            max_userip_connections=max_userip_connections,
            extra_config=extra_config,
            dovecot_binary=dovecot,
            doveadm_binary=doveadm,
            ready_timeout=ready_timeout,
            tls=tls,
            tls_identities=tls_identities,
        )

    with run_in_new_folder(root_dir, make) as server:
        yield server


class DovecotFactory(Protocol):
    """The type of the ``dovecot_factory`` fixture: :func:`start_dovecot` without ``with``."""

    def __call__(
        self,
        *,
        users: Mapping[str, str] | None = None,
        max_userip_connections: int = 100,
        extra_config: str = "",
        dovecot_binary: str | os.PathLike[str] | None = None,
        doveadm_binary: str | os.PathLike[str] | None = None,
        ready_timeout: float = 10.0,
        root_dir: str | os.PathLike[str] | None = None,
        tls: bool = True,
        tls_identities: Sequence[str] = ...,
    ) -> DovecotServer: ...
