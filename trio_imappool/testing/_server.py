"""What the real test servers (Dovecot, Cyrus, Redis) share: a server as a process group.

A server here is a program started in a process group of its own, in a short temporary folder,
listening on ``127.0.0.1`` at ports chosen before it starts. Stopping it kills the whole group
with SIGKILL and waits until no member is left, so that the ports are free again at once.

:class:`ProcessServer` is the life cycle of an IMAP test server (start, the readiness check,
stop, restart, close) and the client-side helpers; each server's module says what differs: the
command, its configuration, its runtime files, and how it counts and drops connections. The
functions below it are the pieces the Redis harness uses too.

Everything here is synchronous and bounded in time.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self, TypeVar

if TYPE_CHECKING:
    import ssl

    import trustme

HOST = "127.0.0.1"
"""The only address the servers listen on."""

DEFAULT_USERS: Mapping[str, str] = {"alice": "alice-pw", "bob": "bob-pw"}
"""The users of a server started without ``users=``."""

TRUSTME_HINT = (
    "trio_imappool.testing needs the trustme package for its test CA: "
    "pip install 'trio-imappool[testing]'"
)

STOP_TIMEOUT = 5.0
"""Seconds a stop waits for the killed process group to be gone."""
LOG_TAIL_BYTES = 4000
_KICK_TIMEOUT = 5.0
_SETTLE_TIMEOUT = 1.0
# Longest parent folder we create a server folder in; longer ones leave too little room for
# Unix socket paths under it (e.g. Dovecot's "<folder>/run/login/imap-urlauth").
_MAX_PARENT_LEN = 40
# A RAM file system: seeding 10,000 messages took 0.6 s there and 4.5 s on an ext4 /tmp, where
# the kernel throttled the burst of small writes.
_RAM_DIR = "/dev/shm"


def import_trustme() -> Any:
    """trustme, or a ModuleNotFoundError that names the extra that brings it."""
    try:
        import trustme
    except ModuleNotFoundError as exc:
        if exc.name != "trustme":
            raise
        raise ModuleNotFoundError(TRUSTME_HINT, name="trustme") from exc
    return trustme


def free_ports(count: int) -> list[int]:
    """``count`` different free TCP ports on :data:`HOST`."""
    # Bind them all at once so that they differ, then release them for the server.
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((HOST, 0))
            ports.append(sock.getsockname()[1])
        return ports


def make_base_dir(root_dir: str | os.PathLike[str] | None) -> Path:
    """A new server folder, mode 0755, under a parent short enough for Unix socket paths.

    ``None`` for ``/dev/shm`` when usable, else the temporary folder (``/tmp`` if its path is
    long).
    """
    if root_dir is not None:
        parent = os.fspath(root_dir)
    elif os.path.isdir(_RAM_DIR) and os.access(_RAM_DIR, os.W_OK | os.X_OK):
        parent = _RAM_DIR
    else:
        parent = tempfile.gettempdir()
        if len(parent) > _MAX_PARENT_LEN:
            parent = "/tmp"
    path = Path(tempfile.mkdtemp(prefix="imappool-", dir=parent))
    path.chmod(0o755)  # mkdtemp makes 0700: the server's own users must read the users' files
    return path


def user_map(users: Mapping[str, str] | None, caller: str) -> dict[str, str]:
    """A copy of ``users``, or of :data:`DEFAULT_USERS` for ``None``.

    Raises:
        ValueError: ``users`` is empty (the message names ``caller``).
    """
    result = dict(DEFAULT_USERS if users is None else users)
    if not result:
        raise ValueError(f"{caller}() needs at least one user")
    return result


def check_field(kind: str, value: str) -> None:
    """Refuse a user name or password that cannot go into a passwd-file line."""
    if not value or any(c in value for c in ":\r\n\0") or value != value.strip():
        raise ValueError(
            f"{kind} {value!r} cannot go into a passwd-file: it must be non-empty, "
            "without ':', line breaks or surrounding spaces"
        )


def wait_until(done: Callable[[], bool], *, timeout: float, interval: float) -> bool:
    """Call ``done`` every ``interval`` seconds until it is true (``True``) or ``timeout``
    seconds have passed (``False``)."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def _stat_fields(pid: int | str) -> list[bytes] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state, ppid, pgrp, ...)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            data = stat.read()
    except OSError:
        return None
    # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
    return data[data.rindex(b")") + 2 :].split()


def process_alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in (b"Z", b"X")


def group_alive(pgid: int) -> bool:
    """Whether a process group still has a member that is not a zombie."""
    try:
        entries = os.listdir("/proc")
    except OSError:  # pragma: no cover - not Linux: zombies count, but init reaps them
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for entry in entries:
        if not entry.isdigit():
            continue
        fields = _stat_fields(entry)
        if fields is not None and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


def kill_process_group(process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> None:
    """SIGKILL the process group ``process`` leads; return once no member is left.

    Raises:
        subprocess.TimeoutExpired: The leader outlived ``timeout``.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=timeout)
    # The leader is gone, but its children may still be dying and holding the listening
    # sockets: wait for them too, so the ports are free when we return.
    wait_until(lambda: not group_alive(process.pid), timeout=timeout, interval=0.001)


def read_log_tail(path: Path, max_bytes: int, note: str = "") -> str:
    """``note``, then the end of a log file (about ``max_bytes``), for error messages."""
    try:
        with path.open("rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - max_bytes))
            return note + log.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"{note}(no log: {exc})"


class ProcessServer(ABC):
    """An IMAP test server run as a process group: the part Dovecot and Cyrus share.

    A subclass names the product and its start error, gives the command (:meth:`_command`),
    what to remove before a start (:meth:`_clean_runtime_files`), how to count sessions
    (:meth:`connections`), and calls :meth:`_start` from its ``start``. Methods may be called
    from any thread (a lock serializes them).
    """

    _product: ClassVar[str]
    """The server's name in messages: ``"Dovecot"``, ``"Cyrus"``."""
    _start_error: ClassVar[type[RuntimeError]]
    """What a failed start raises."""
    _poll_interval: ClassVar[float] = 0.01
    """Seconds between two readiness checks (and two looks at the sessions)."""
    _ready_read_timeout: ClassVar[float] = 2.0
    """The readiness check's read timeout (at most)."""

    host: str
    imap_port: int
    imaps_port: int
    ca: trustme.CA
    base_dir: Path
    log_path: Path

    def __init__(self, *, base_dir: Path, log_name: str, ready_timeout: float) -> None:
        self.host = HOST
        self.base_dir = base_dir
        self.log_path = base_dir / log_name
        self._ready_timeout = ready_timeout
        self._users: dict[str, str] = {}
        self._lock = threading.RLock()
        self._process: subprocess.Popen[bytes] | None = None
        self._closed = False
        self.imap_port, self.imaps_port = free_ports(2)

    def _issue_certificate(self, identities: Sequence[str]) -> None:
        """Make :attr:`ca` and the server's ``cert.pem`` and ``key.pem`` (mode 0600)."""
        self.ca = import_trustme().CA()
        cert = self.ca.issue_cert(*identities)
        key_path = self.base_dir / "key.pem"
        (self.base_dir / "cert.pem").write_bytes(b"".join(b.bytes() for b in cert.cert_chain_pems))
        key_path.touch(mode=0o600)
        key_path.write_bytes(cert.private_key_pem.bytes())

    # -- what each server says ---------------------------------------------------------------

    @abstractmethod
    def _command(self) -> list[str]:
        """The command that runs the server in the foreground."""

    @abstractmethod
    def _config_file(self) -> Path:
        """The configuration file named in start errors."""

    @abstractmethod
    def _clean_runtime_files(self) -> None:
        """Remove what the last run left behind (pid file, sockets, session records)."""

    def _imaps_listening(self) -> bool:
        """Whether the readiness check also connects to :attr:`imaps_port`."""
        return True

    def _log_note(self) -> str:
        """A line put before the log's end in :meth:`log_tail`."""
        return ""

    def _release(self) -> None:
        """Free what :meth:`close` frees besides the process and :attr:`base_dir`."""
        return

    @abstractmethod
    def connections(self, user: str | None = None) -> int:
        """How many logged-in sessions the server has, for a user or all; 0 when stopped."""

    # -- public properties -------------------------------------------------------------------

    @property
    def users(self) -> dict[str, str]:
        """User name -> password, in the order they were added (a copy)."""
        return dict(self._users)

    @property
    def username(self) -> str:
        """The first user's name."""
        return next(iter(self._users))

    @property
    def password(self) -> str:
        """The first user's password."""
        return self._users[self.username]

    @property
    def running(self) -> bool:
        """Whether the server's master process is alive."""
        return self._process is not None and self._process.poll() is None

    def __repr__(self) -> str:
        state = "running" if self.running else ("closed" if self._closed else "stopped")
        return (
            f"<{type(self).__name__} {state} {self.host} imap={self.imap_port} "
            f"imaps={self.imaps_port} users={len(self._users)} dir={self.base_dir}>"
        )

    # -- client-side helpers -----------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        """A new client-side context that trusts only this server's CA.

        Hostname checking is on: connect as ``127.0.0.1`` or ``localhost``.
        """
        import ssl

        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        self.ca.configure_trust(context)
        return context

    def pool_kwargs(self, user: str | None = None, *, tls: bool = True) -> dict[str, Any]:
        """Connection settings for a user, as keyword arguments.

        Args:
            user: The user name; ``None`` for the first user.
            tls: ``True`` for the implicit-TLS port with :meth:`ssl_context`; ``False`` for the
                plain port without TLS.

        Returns:
            A dict with ``host``, ``port``, ``username``, ``password``, ``ssl`` and
            ``ssl_context`` (``None`` when ``tls`` is false).

        Raises:
            KeyError: No such user.
        """
        name = self.username if user is None else user
        return {
            "host": self.host,
            "port": self.imaps_port if tls else self.imap_port,
            "username": name,
            "password": self._users[name],
            "ssl": tls,
            "ssl_context": self.ssl_context() if tls else None,
        }

    def log_tail(self, max_bytes: int = LOG_TAIL_BYTES) -> str:
        """The end of the server's log (about ``max_bytes``), for error messages."""
        return read_log_tail(self.log_path, max_bytes, self._log_note())

    # -- life cycle --------------------------------------------------------------------------

    def _start(self) -> None:
        """Start the server and wait until it is ready; the body of each ``start``.

        Does nothing if running; stops the server again if it is not ready.

        Raises:
            RuntimeError: The server was closed.
            _start_error: It exited or was not ready within the deadline.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self!r} is closed: start a new one")
            if self.running:
                return
            self._clean_runtime_files()
            command = self._command()
            with self.log_path.open("ab") as log:
                self._process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,  # its own process group: stop() kills it whole
                )
            _live_servers.add(self)
            try:
                self._wait_ready()
            except BaseException:
                self.stop()
                raise

    def _wait_ready(self) -> None:
        """Wait until the first user can LOGIN and SELECT INBOX on the plain port and the
        implicit-TLS port accepts a connection, then until the check's session is gone."""
        import imapclient
        from imapclient.imapclient import SocketTimeout

        name = self._product
        deadline = time.monotonic() + self._ready_timeout
        last_error: BaseException | None = None
        while True:
            assert self._process is not None
            code = self._process.poll()
            if code is not None:
                raise self._start_error(
                    f"{name} exited with status {code} while starting "
                    f"(config {self._config_file()}); end of its log:\n{self.log_tail()}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._start_error(
                    f"{name} was not ready within {self._ready_timeout} s "
                    f"(last error: {last_error!r}); end of its log:\n{self.log_tail()}"
                )
            try:
                timeout = SocketTimeout(
                    connect=min(1.0, remaining), read=min(self._ready_read_timeout, remaining)
                )
                with imapclient.IMAPClient(
                    self.host, self.imap_port, ssl=False, timeout=timeout
                ) as client:
                    client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    client.login(self.username, self.password)
                    client.select_folder("INBOX")
                if self._imaps_listening():
                    # The implicit-TLS listener is bound by the same master: a connect suffices.
                    socket.create_connection((self.host, self.imaps_port), timeout=1.0).close()
                break
            except (OSError, imapclient.exceptions.IMAPClientError) as exc:
                last_error = exc
            time.sleep(self._poll_interval)
        # The server forgets the check's session a moment after LOGOUT: wait for that
        # (briefly), so that connections() counts only the caller's own.
        with contextlib.suppress(subprocess.SubprocessError):
            wait_until(
                lambda: not self.connections(self.username),
                timeout=_SETTLE_TIMEOUT,
                interval=self._poll_interval,
            )

    def _wait_kicked(self, user: str, gone: Callable[[], bool]) -> None:
        """Call ``gone`` until it says no session of ``user`` is left (within 5 s).

        Raises:
            RuntimeError: The sessions outlived the deadline.
        """
        if not wait_until(gone, timeout=_KICK_TIMEOUT, interval=self._poll_interval):
            raise RuntimeError(f"{user}'s connections survived a kick: {self.log_tail()}")

    def stop(self) -> None:
        """Stop the server at once (SIGKILL to its process group) and clean its runtime files.

        Every client connection drops. Mail and users are kept. Does nothing if stopped.
        """
        with self._lock:
            process, self._process = self._process, None
            _live_servers.discard(self)
            if process is None:
                return
            kill_process_group(process)
            self._clean_runtime_files()

    def restart(self) -> None:
        """:meth:`stop`, then ``start`` (same ports, same mail)."""
        with self._lock:
            self.stop()
            self.start()

    @abstractmethod
    def start(self) -> None:
        """Start the server; see each server's own."""

    def close(self) -> None:
        """Stop the server and remove :attr:`base_dir`. Idempotent; it cannot restart."""
        with self._lock:
            if self._closed:
                return
            self.stop()
            self._closed = True
            self._release()
            shutil.rmtree(self.base_dir, ignore_errors=True)

    # -- context manager ---------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# Strong references: a running server must not be garbage-collected before it is stopped.
_live_servers: set[ProcessServer] = set()


@atexit.register
def _stop_leftover_servers() -> None:
    # A server whose with-block never ended (e.g. a session fixture never finalized) must not
    # outlive the interpreter.
    for server in list(_live_servers):
        with contextlib.suppress(Exception):
            server.close()


_Server = TypeVar("_Server", bound=ProcessServer)


@contextlib.contextmanager
def run_in_new_folder(
    root_dir: str | os.PathLike[str] | None, make: Callable[[Path], _Server]
) -> Iterator[_Server]:
    """``make`` a server in a new folder (see :func:`make_base_dir`), start it, and stop it
    and remove the folder when the block ends (the folder also when ``make`` fails)."""
    base_dir = make_base_dir(root_dir)
    try:
        server = make(base_dir)
    except BaseException:
        shutil.rmtree(base_dir, ignore_errors=True)
        raise
    with server:
        server.start()
        yield server
