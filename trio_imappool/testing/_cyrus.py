"""A private Cyrus IMAP server for tests, the second real server beside Dovecot.

:func:`start_cyrus` has the shape of :func:`~trio_imappool.testing.start_dovecot`: a short
temporary folder, ``127.0.0.1`` only, two free ports (plain with STARTTLS, and implicit TLS), a
certificate from a `trustme` CA, users with passwords, ``kick``, ``restart``, ``connections``,
``pool_kwargs`` and seeding through :func:`~trio_imappool.testing.seed_folders`. The server is
configured the way a client of many providers should expect: ``/`` as hierarchy separator with
no ``INBOX.`` prefix (``unixhierarchysep`` and ``altnamespace``), a greeting that lists only the
pre-login capabilities, IDLE, MOVE, and a per-user connection limit (``maxlogins_per_user``)
that refuses a LOGIN over it with ``NO Too many open connections (3 of 3 for alice)``.

Where the pieces come from (Debian 12, Cyrus 3.6): ``master``, ``ctl_cyrusdb`` and the SASL tools
from the packages ``cyrus-common`` and ``sasl2-bin``, which install beside Dovecot; ``imapd``
from ``cyrus-imapd``, which apt refuses to install beside ``dovecot-imapd`` (both provide
``imap-server``), so ``scripts/_env.sh`` unpacks it with ``apt-get download`` and ``dpkg -x``
into :data:`DEFAULT_CYRUS_ROOT` (or ``$TRIO_IMAPPOOL_CYRUS_ROOT``). Users live in a sasldb made
with ``saslpasswd2 -f``; each user's INBOX is created at their first login.

Cyrus writes its log only to syslog, through ``/dev/log``. When we are root, the server runs in
a mount namespace of its own (``unshare --mount``) whose ``/dev`` is a small tmpfs with the
device nodes it needs and ``/dev/log`` pointing at a datagram socket of this object, read by a
thread into :attr:`CyrusServer.log_path`; :meth:`CyrusServer.log_tail` shows its end, and errors
of :func:`start_cyrus` carry it. Without root, or in a container that forbids mount namespaces,
Cyrus runs without one and its log goes to the system's syslog, if any.

Stopping kills the server's process group with SIGKILL and waits until no member is left, so
:meth:`CyrusServer.start` brings it back at once on the same ports with the same mail. Everything
is synchronous and bounded in time; methods may be called from any thread. That life cycle, the
readiness check and the client-side helpers are shared with Dovecot (``_server.ProcessServer``);
this module holds what is Cyrus's own.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Protocol, TypeAlias

from ._dovecot import DovecotServer
from ._server import (
    HOST,
    ProcessServer,
    check_field,
    process_alive,
    run_in_new_folder,
    user_map,
)

__all__ = [
    "DEFAULT_CYRUS_ROOT",
    "CyrusFactory",
    "CyrusNotFoundError",
    "CyrusServer",
    "CyrusStartError",
    "ImapServer",
    "find_cyrus",
    "start_cyrus",
]

DEFAULT_CYRUS_ROOT = "/var/cache/trio-imappool/cyrus-imapd"
"""Where ``scripts/_env.sh`` unpacks the ``cyrus-imapd`` package (``dpkg -x``)."""

_ROOT_VARIABLE = "TRIO_IMAPPOOL_CYRUS_ROOT"
_BIN = "usr/lib/cyrus/bin"
_SASLPASSWD = "/usr/sbin/saslpasswd2"
INSTALL_HINT = (
    "run scripts/_env.sh as root, or: apt-get install cyrus-common cyrus-admin sasl2-bin "
    "libsasl2-modules; cd /tmp && apt-get download cyrus-imapd && "
    f"dpkg -x cyrus-imapd_*.deb {DEFAULT_CYRUS_ROOT}"
)
_REALM = "localhost"
# The device nodes a Cyrus process opens; bound into the namespace's private /dev.
_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")


_NOT_CAPTURED = (
    "(Cyrus's syslog is not captured: that needs root and a mount namespace, "
    "which this machine or container does not allow)\n"
)


class CyrusNotFoundError(RuntimeError):
    """A piece of Cyrus (``imapd``, ``master``, ``saslpasswd2``) is not installed."""


class CyrusStartError(RuntimeError):
    """Cyrus exited, or did not accept a LOGIN and SELECT INBOX, before the deadline.

    The message includes the end of its log.
    """


def find_cyrus(root: str | os.PathLike[str] | None = None) -> tuple[str, str]:
    """Locate Cyrus's ``imapd`` and ``master``.

    Args:
        root: The folder ``cyrus-imapd`` was unpacked into (it holds ``usr/lib/cyrus/bin``).
            ``None`` tries ``$TRIO_IMAPPOOL_CYRUS_ROOT``, :data:`DEFAULT_CYRUS_ROOT`, then
            ``/`` (a system-wide ``cyrus-imapd``).

    Returns:
        The paths of ``imapd`` and ``master``.

    Raises:
        CyrusNotFoundError: Something is missing; the message says how to install it.
    """
    if root is not None:
        roots = [os.fspath(root)]
    else:
        roots = [r for r in (os.environ.get(_ROOT_VARIABLE), DEFAULT_CYRUS_ROOT, "/") if r]
    imapd = next(
        (p for r in roots if _executable(p := os.path.join(r, _BIN, "imapd"))),
        None,
    )
    master = os.path.join("/", _BIN, "master")
    missing = [
        name
        for name, path in (("imapd", imapd), ("master", master), ("saslpasswd2", _SASLPASSWD))
        if path is None or not _executable(path)
    ]
    if missing or imapd is None:
        raise CyrusNotFoundError(
            f"Cyrus IMAP not found ({', '.join(missing)} missing; looked for imapd under "
            f"{', '.join(roots)}): {INSTALL_HINT}"
        )
    return imapd, master


def _executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _cyrus_ids() -> tuple[str, int, int]:
    """The user Cyrus runs as: ``cyrus`` when we are root (it refuses to run as root), else us."""
    if os.geteuid() == 0:
        for name in ("cyrus", "nobody"):
            with contextlib.suppress(KeyError):
                entry = pwd.getpwnam(name)
                return name, entry.pw_uid, entry.pw_gid
    entry = pwd.getpwuid(os.geteuid())
    return entry.pw_name, entry.pw_uid, os.getegid()


@functools.cache
def _namespaces_work() -> bool:
    """Whether we may run a server in a mount namespace with a tmpfs of its own: root, and not
    in a container that forbids it (then Cyrus runs without one, its log uncaptured)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    with tempfile.TemporaryDirectory(prefix="imappool-probe-") as target:
        script = f"mount --make-rprivate / && mount -t tmpfs imappool-probe {shlex.quote(target)}"
        try:
            probe = subprocess.run(
                ["unshare", "--mount", "sh", "-c", script],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=10.0,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            return False
    return probe.returncode == 0


class _SyslogListener:
    """A datagram socket that takes the place of ``/dev/log`` and appends to a file."""

    def __init__(self, path: Path, log_path: Path, uid: int, gid: int) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(os.fspath(path))
        os.chmod(path, 0o666)
        with contextlib.suppress(PermissionError):
            os.chown(path, uid, gid)
        self._sock.settimeout(0.2)
        self._log_path = log_path
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"cyrus-syslog {path}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with self._log_path.open("ab", buffering=0) as log:
            while not self._stop.is_set():
                try:
                    data = self._sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                # "<PRI>Mon DD HH:MM:SS ident[pid]: message": drop the priority.
                if data.startswith(b"<") and b">" in data[:6]:
                    data = data[data.index(b">") + 1 :]
                log.write(data.rstrip(b"\0\n") + b"\n")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        self._sock.close()


class CyrusServer(ProcessServer):
    """One private Cyrus IMAP instance; use :func:`start_cyrus` to get one.

    Attributes:
        host: Always ``"127.0.0.1"``.
        imap_port: The plain listener; it offers STARTTLS and allows LOGIN without TLS.
        imaps_port: The implicit-TLS listener.
        ca: The `trustme.CA` that signed the server certificate (``localhost``, ``127.0.0.1``).
        base_dir: The server's temporary folder (configuration, users, mail, runtime files).
        log_path: Cyrus's syslog lines (when we are root; see the module's docstring) and the
            master's own output.
        max_logins_per_user: Cyrus's ``maxlogins_per_user`` (0: no limit).
        delimiter: The hierarchy separator: ``"/"``, or ``"."`` without ``unixhierarchysep``.
    """

    _product = "Cyrus"
    _start_error = CyrusStartError
    _poll_interval = 0.02
    _ready_read_timeout = 3.0

    max_logins_per_user: int
    delimiter: str

    def __init__(
        self,
        *,
        base_dir: Path,
        users: Mapping[str, str],
        max_logins_per_user: int,
        extra_config: str,
        imapd: str,
        master: str,
        ready_timeout: float,
        idled: bool,
        capture_log: bool,
        altnamespace: bool = True,
        unixhierarchysep: bool = True,
    ) -> None:
        # Private: start_cyrus() makes the folder and calls this.
        super().__init__(base_dir=base_dir, log_name="cyrus.log", ready_timeout=ready_timeout)
        self.max_logins_per_user = max_logins_per_user
        self._imapd = imapd
        self._master = master
        self._extra_config = extra_config
        self._idled = idled
        self._altnamespace = altnamespace
        self._unixhierarchysep = unixhierarchysep
        self.delimiter = "/" if unixhierarchysep else "."
        self._listener: _SyslogListener | None = None
        self._user, self._uid, self._gid = _cyrus_ids()
        self._namespace = capture_log and _namespaces_work()
        self._config_dir = base_dir / "conf"
        self._sasldb = base_dir / "sasldb2"
        self._imapd_conf = base_dir / "imapd.conf"
        self._cyrus_conf = base_dir / "cyrus.conf"
        # Where the namespace keeps the real /dev while its own covers it (made when needed).
        self._hostdev: Path | None = None

        self._issue_certificate(("localhost", HOST))
        for sub in ("conf", "spool", "run"):
            (base_dir / sub).mkdir(mode=0o750)
        # What Cyrus's mkimap would make: it does not create these itself.
        for sub in ("db", "socket", "lock", "log", "msg", "proc", "quota", "sieve", "user"):
            (self._config_dir / sub).mkdir(mode=0o750)
        for name, password in users.items():
            self._add_user(name, password)
        self._write_config()
        self._chown_tree()

    # -- the log -----------------------------------------------------------------------------

    @property
    def log_captured(self) -> bool:
        """Whether :attr:`log_path` receives Cyrus's syslog lines (root only)."""
        return self._namespace

    def _log_note(self) -> str:
        # log_tail() says when the log lacks Cyrus's own lines.
        return "" if self._namespace else _NOT_CAPTURED

    # -- users -------------------------------------------------------------------------------

    def add_user(self, name: str, password: str) -> None:
        """Add a user, or change a password, while running or not; it applies at once.

        Raises:
            ValueError: The name or password cannot be stored.
        """
        with self._lock:
            self._add_user(name, password)

    def _add_user(self, name: str, password: str) -> None:
        check_field("user name", name)
        check_field("password", password)
        if any(c in name for c in "/.@ ") or not name.isascii():
            raise ValueError(f"user name {name!r}: use ASCII letters, digits, '-' or '_'")
        subprocess.run(
            [_SASLPASSWD, "-f", os.fspath(self._sasldb), "-u", _REALM, "-c", "-p", name],
            input=password.encode("utf-8"),
            capture_output=True,
            timeout=10.0,
            check=True,
        )
        self._users[name] = password
        if os.geteuid() == 0:
            os.chown(self._sasldb, self._uid, self._gid)
        os.chmod(self._sasldb, 0o640)

    def _write_config(self) -> None:
        base = self.base_dir
        limit = f"maxlogins_per_user: {self.max_logins_per_user}\n"
        imapd_conf = f"""\
# Generated by trio_imappool.testing for a test server. Do not edit.
configdirectory: {self._config_dir}
partition-default: {base}/spool
defaultpartition: default
servername: {_REALM}
cyrus_user: {self._user}
syslog_prefix: imappool-{self.imap_port}
admins: cyrus
allowplaintext: yes
sasl_pwcheck_method: auxprop
sasl_auxprop_plugin: sasldb
sasl_sasldb_path: {self._sasldb}
sasl_mech_list: PLAIN LOGIN
tls_server_cert: {base}/cert.pem
tls_server_key: {base}/key.pem
unixhierarchysep: {"yes" if self._unixhierarchysep else "no"}
altnamespace: {"yes" if self._altnamespace else "no"}
imapidlepoll: 1
autocreate_quota: 0
failedloginpause: 0
specialusealways: yes
{limit}idlesocket: {base}/run/idle
notifysocket: {base}/run/notify
lmtpsocket: {base}/run/lmtp
mboxname_lockpath: {base}/run/lock
proc_path: {base}/run/proc
{self._extra_config}
"""
        self._imapd_conf.write_text(imapd_conf, encoding="utf-8")
        bindir = os.path.join("/", _BIN)
        idled_dir = os.path.dirname(self._imapd)
        daemon = f'  idled cmd="{idled_dir}/idled -C {self._imapd_conf}"\n' if self._idled else ""
        cyrus_conf = f"""\
START {{
  recover cmd="{bindir}/ctl_cyrusdb -C {self._imapd_conf} -r"
}}
SERVICES {{
  imap cmd="{self._imapd} -C {self._imapd_conf}" listen="{HOST}:{self.imap_port}" prefork=0
  imaps cmd="{self._imapd} -s -C {self._imapd_conf}" listen="{HOST}:{self.imaps_port}" prefork=0
}}
EVENTS {{
}}
DAEMON {{
{daemon}}}
"""
        self._cyrus_conf.write_text(cyrus_conf, encoding="utf-8")

    def _chown_tree(self) -> None:
        if os.geteuid() != 0:
            return
        for path in [self.base_dir, *self.base_dir.rglob("*")]:
            with contextlib.suppress(FileNotFoundError):
                os.lchown(path, self._uid, self._gid)

    # -- life cycle --------------------------------------------------------------------------

    def _command(self) -> list[str]:
        if self._namespace and self._listener is None:
            # The /dev/log of the namespace below points at this socket.
            self._listener = _SyslogListener(
                self.base_dir / "syslog.sock", self.log_path, self._uid, self._gid
            )
        master = [
            self._master,
            "-D",
            "-C",
            os.fspath(self._imapd_conf),
            "-M",
            os.fspath(self._cyrus_conf),
            "-p",
            os.fspath(self.base_dir / "run" / "master.pid"),
        ]
        if not self._namespace:
            return master
        # A private /dev: a tmpfs with the device nodes bound in from the real one, /dev/shm
        # (where our folder may live) bound back, and /dev/log pointing at our socket.
        if self._hostdev is None:
            self._hostdev = Path(tempfile.mkdtemp(prefix="imappool-dev-"))
        hostdev = shlex.quote(os.fspath(self._hostdev))
        lines = [
            "set -e",
            "mount --make-rprivate /",
            f"mount --rbind /dev {hostdev}",
            "mount -t tmpfs -o mode=755,size=1m imappool-dev /dev",
        ]
        for name in _DEVICES:
            lines.append(
                f"if [ -e {hostdev}/{name} ]; then touch /dev/{name}; "
                f"mount --bind {hostdev}/{name} /dev/{name}; fi"
            )
        lines += [
            f"if [ -d {hostdev}/shm ]; then mkdir /dev/shm; "
            f"mount --rbind {hostdev}/shm /dev/shm; fi",
            "ln -s /proc/self/fd /dev/fd",
            f"ln -s {shlex.quote(os.fspath(self.base_dir / 'syslog.sock'))} /dev/log",
            f"exec {shlex.join(master)}",
        ]
        return ["unshare", "--mount", "sh", "-c", "\n".join(lines)]

    def start(self) -> None:
        """Start Cyrus, on the same ports and with the same mail as before.

        Returns once the first user can LOGIN and SELECT INBOX. Does nothing if running.

        Raises:
            CyrusStartError: Cyrus exited or was not ready within the deadline; it has been
                stopped and the message has the end of its log.
            RuntimeError: The server was closed.
        """
        self._start()

    def _config_file(self) -> Path:
        return self._imapd_conf

    def _release(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._hostdev is not None:
            with contextlib.suppress(OSError):
                self._hostdev.rmdir()

    def _clean_runtime_files(self) -> None:
        # Session records (proc files), locks, sockets and the pid file of the last run.
        run = self.base_dir / "run"
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir(mode=0o750)
        if os.geteuid() == 0:
            os.chown(run, self._uid, self._gid)

    # -- admin -------------------------------------------------------------------------------

    def _sessions(self) -> list[tuple[int, str]]:
        """(pid, user) of every live imapd that has a user logged in."""
        sessions = []
        with contextlib.suppress(FileNotFoundError):
            for entry in (self.base_dir / "run" / "proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    fields = entry.read_text("utf-8", "replace").split("\t")
                except OSError:
                    continue
                pid = int(entry.name)
                if len(fields) > 2 and fields[2] and process_alive(pid):
                    sessions.append((pid, fields[2]))
        return sessions

    def connections(self, user: str | None = None) -> int:
        """How many logged-in sessions Cyrus has, for a user or all; 0 when stopped.

        Read from Cyrus's session files, which it writes just after answering a LOGIN: a
        login that has just succeeded may be counted a few milliseconds later.
        """
        if not self.running:
            return 0
        return sum(1 for _, name in self._sessions() if user is None or name == user)

    def kick(self, user: str) -> None:
        """Drop all of a user's connections from the server side (their ``imapd`` processes
        are killed); returns once none is left (within 5 s).

        Raises:
            RuntimeError: The server is not running, or the sessions outlived the deadline.
        """
        if not self.running:
            raise RuntimeError(f"{self!r} is not running")

        def gone() -> bool:
            sessions = [pid for pid, name in self._sessions() if name == user]
            for pid in sessions:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            return not sessions

        self._wait_kicked(user, gone)


@contextlib.contextmanager
def start_cyrus(
    *,
    users: Mapping[str, str] | None = None,
    max_logins_per_user: int = 0,
    extra_config: str = "",
    cyrus_root: str | os.PathLike[str] | None = None,
    ready_timeout: float = 15.0,
    root_dir: str | os.PathLike[str] | None = None,
    idled: bool = False,
    capture_log: bool = True,
    altnamespace: bool = True,
    unixhierarchysep: bool = True,
) -> Iterator[CyrusServer]:
    """Run a private Cyrus IMAP on 127.0.0.1 for the duration of a ``with`` block.

    Args:
        users: User name -> password; ``None`` for alice/alice-pw and bob/bob-pw. The first one
            is :attr:`CyrusServer.username`; the readiness check logs in as it.
        max_logins_per_user: Cyrus's ``maxlogins_per_user``: past it, LOGIN fails with
            ``NO Too many open connections (N of N for user)``. 0 for no limit.
        extra_config: Raw lines appended to ``imapd.conf``.
        cyrus_root: Where ``cyrus-imapd`` was unpacked; see :func:`find_cyrus`.
        ready_timeout: Seconds to wait for a LOGIN and SELECT INBOX to succeed.
        root_dir: Where to make the server's folder (as for ``start_dovecot``).
        idled: Run Cyrus's ``idled`` (instant IDLE pushes); without it ``imapidlepoll: 1``
            makes them arrive within a second.
        capture_log: Run in a mount namespace whose ``/dev/log`` is ours (root only; see the
            module's docstring).
        altnamespace: Cyrus's ``altnamespace``: folders beside INBOX (personal namespace
            ``""``). ``False`` puts them under it (``INBOX.``), as Courier and older Cyrus do.
        unixhierarchysep: Cyrus's ``unixhierarchysep``: ``/`` as separator; ``False`` for
            ``.`` (then user names must not contain dots).

    Yields:
        The running server. Leaving the block stops it and removes its folder.

    Raises:
        CyrusNotFoundError: Cyrus is not installed.
        CyrusStartError: Cyrus did not start (the message has the end of its log).
        ValueError: ``users`` is empty or holds a name or password that cannot be stored.
    """
    imapd, master = find_cyrus(cyrus_root)
    all_users = user_map(users, "start_cyrus")
    if max_logins_per_user < 0:
        raise ValueError("max_logins_per_user must be 0 (no limit) or more")

    def make(base_dir: Path) -> CyrusServer:
        return CyrusServer(
            base_dir=base_dir,
            users=all_users,
            max_logins_per_user=max_logins_per_user,
            extra_config=extra_config,
            imapd=imapd,
            master=master,
            ready_timeout=ready_timeout,
            idled=idled,
            capture_log=capture_log,
            altnamespace=altnamespace,
            unixhierarchysep=unixhierarchysep,
        )

    with run_in_new_folder(root_dir, make) as server:
        yield server


ImapServer: TypeAlias = "DovecotServer | CyrusServer"
"""Either test server, as the ``imap_server`` fixture gives it. Both have what tests of IMAP
behaviour use: ``pool_kwargs``, ``ssl_context``, ``add_user``, ``kick``, ``connections``,
``restart``."""


class CyrusFactory(Protocol):
    """The type of the ``cyrus_factory`` fixture: :func:`start_cyrus` without ``with``."""

    def __call__(
        self,
        *,
        users: Mapping[str, str] | None = None,
        max_logins_per_user: int = 0,
        extra_config: str = "",
        cyrus_root: str | os.PathLike[str] | None = None,
        ready_timeout: float = 15.0,
        root_dir: str | os.PathLike[str] | None = None,
        idled: bool = False,
        capture_log: bool = True,
        altnamespace: bool = True,
        unixhierarchysep: bool = True,
    ) -> CyrusServer: ...
