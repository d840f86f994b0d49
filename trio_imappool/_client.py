"""One pooled IMAP connection: the blocking client, its thread offload and its interruption.

imapclient is blocking and not safe for concurrent use, but it keeps no thread-local state, so a
connection may be driven from different worker threads one after another. :class:`PooledClient`
enforces exactly that: one call at a time, each in a worker thread of the pool's own limiter.

Cancellation. A Trio cancel scope that fires while a command runs in a worker thread takes effect
at once: the task abandons the thread, shuts the socket down from outside (which wakes a blocked
read within microseconds, for plain and TLS sockets alike), waits shielded and briefly for the
worker to notice, and marks the connection for discarding. The caller gets its ``Cancelled`` or
``TooSlowError`` promptly, never after the socket's read timeout. A worker that does not finish
within the grace period is left to end by itself (it owns the socket and closes it when it does);
the connection is never handed out again either way.
"""

from __future__ import annotations

import contextlib
import imaplib
import math
import select
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any, Final, Literal, NamedTuple, TypeVar

import trio
from imapclient import IMAPClient, SocketTimeout
from imapclient.imap4 import IMAP4WithTimeout
from imapclient.imapclient import join_message_ids, seq_to_parenstr_upper
from imapclient.response_parser import parse_fetch_response
from imapclient.tls import IMAP4_TLS

from ._config import PoolConfig
from ._errors import (
    LoginDisabled,
    StartTLSNotOffered,
    connection_survives,
    suggests_server_gone,
)

__all__ = ["PipelinedFetch", "PooledClient", "TrackingClient"]

T = TypeVar("T")

# How long a cancelled task waits for its interrupted worker thread to finish.
INTERRUPT_GRACE: Final = 1.0

# The phases of one call into a worker thread.
_QUEUED: Final = 0  # handed to trio.to_thread, the thread has not started it
_RUNNING: Final = 1  # the thread is inside the call
_ABANDONED: Final = 2  # the task left before the thread started it: it will not run
_ORPHANED: Final = 3  # the task left while the thread was inside the call
_FINISHED: Final = 4


class _GreetingCapabilities:
    """imaplib asks for CAPABILITY after the greeting even when the greeting carried them.

    Servers that put ``[CAPABILITY ...]`` in their greeting (Dovecot, Cyrus, most providers)
    have already said everything that command would return (RFC 9051 7.1), so this takes the
    list from the greeting and saves a round trip on every connection the pool opens. Later
    reads (after STARTTLS or LOGIN) go to the server as before.
    """

    _greeted = False
    untagged_responses: dict[str, list[Any]]
    capabilities: tuple[str, ...]

    def _get_capabilities(self) -> None:
        if not self._greeted:
            self._greeted = True
            announced = self.untagged_responses.pop("CAPABILITY", None)
            if announced and isinstance(announced[-1], bytes):
                self.capabilities = tuple(str(announced[-1], "ascii").upper().split())
                return
        super()._get_capabilities()  # type: ignore[misc]


class _PlainIMAP4(_GreetingCapabilities, IMAP4WithTimeout):  # type: ignore[misc]
    pass


class _TLSIMAP4(_GreetingCapabilities, IMAP4_TLS):  # type: ignore[misc]
    pass


class PipelinedFetch(NamedTuple):
    """The outcome of one step of :meth:`TrackingClient.fetch_pipelined`."""

    fetched: dict[int, dict[bytes, Any]] | None
    error: Exception | None
    command: Literal["select", "fetch"] | None  # the command that failed


def _failure(command: str, typ: str, answer: list[Any]) -> Exception:
    """The error imapclient raises for a NO or BAD answer (``"select failed: ..."``)."""
    text = answer[0].decode("utf-8", "replace") if answer and isinstance(answer[0], bytes) else ""
    # imapclient's IMAPClientError is this class.
    return imaplib.IMAP4.error(f"{command} failed: {text or typ}")


class TrackingClient(IMAPClient):  # type: ignore[misc]
    """An :class:`imapclient.IMAPClient` that remembers the session state the pool cares about.

    Tracking lives on the client, not on the async proxy, so that functions given to
    ``run_sync`` that call ``client.select_folder(...)`` directly are tracked too.
    """

    selected: tuple[str, bool] | None
    idling: bool
    logged_out: bool

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.selected = None
        self.idling = False
        self.logged_out = False
        super().__init__(*args, **kwargs)

    def select_folder(self, folder: str, readonly: bool = False) -> dict[bytes, Any]:
        # A failed SELECT leaves no folder selected (RFC 3501 6.3.1).
        self.selected = None
        result: dict[bytes, Any] = super().select_folder(folder, readonly)
        self.selected = (folder, readonly)
        return result

    def fetch_pipelined(
        self,
        steps: Sequence[tuple[str, Sequence[int]]],
        data: Sequence[str | bytes],
        reading: list[int] | None = None,
    ) -> list[PipelinedFetch]:
        """``UID FETCH`` batches of one or more folders in one round trip.

        Each step is ``(folder, uids)``. A step whose folder is not the one selected read-only
        before it (on the connection, or by the step before) is preceded by an EXAMINE. Every
        command is written before any answer is read: IMAP lets a client pipeline commands, and
        the server runs them in order (RFC 9051 5.5), so EXAMINE A, FETCH A, EXAMINE B, FETCH B
        cost one round trip instead of four.

        Returns one :class:`PipelinedFetch` per step: the messages as :meth:`fetch` returns
        them, or the error of a NO or BAD answer and the command that got it. A failed EXAMINE
        leaves no folder selected, so its FETCH fails too; its answer is read and dropped, and
        no data of another folder is ever returned for the step. Errors that leave the session
        in doubt (EOF, timeout, BYE) are raised; ``reading[0]``, if given, is then the index of
        the step whose answers were being read.
        """
        imap = self._imap
        fields = seq_to_parenstr_upper(list(data))
        sent: list[tuple[str | None, str]] = []  # per step: the EXAMINE's tag or None, FETCH's
        will_be = self.selected
        state = imap.state
        imap.state = "SELECTED"  # imaplib sends UID commands only then; the server will be
        try:
            for folder, uids in steps:
                examine = None
                if will_be != (folder, True):
                    if not sent:
                        imap.untagged_responses = {}  # as imaplib's select() does
                    imap.is_readonly = True
                    examine = imap._command("EXAMINE", self._normalise_folder(folder))
                    will_be = (folder, True)
                sent.append(
                    (examine, imap._command("UID", "FETCH", join_message_ids(uids), fields))
                )
        finally:
            imap.state = state
        results: list[PipelinedFetch] = []
        start = 0
        while start < len(steps):
            # One folder's run of steps: its EXAMINE (if any) and the FETCHes after it. Dovecot
            # may run pipelined FETCHes at the same time, so their untagged answers can come in
            # any order before their completions: they are pooled and handed out by UID. An
            # EXAMINE is a barrier; no server runs it beside a command on another folder.
            end = start + 1
            while end < len(steps) and sent[end][0] is None:
                end += 1
            folder, examine = steps[start][0], sent[start][0]
            failed: dict[int, PipelinedFetch] = {}
            if reading is not None:
                reading[0] = start
            if examine is not None:
                self.selected = None
                typ, answer = imap._command_complete("EXAMINE", examine)
                imap.untagged_responses.clear()  # what EXAMINE said; the FETCHes' come next
                if typ == "OK":
                    imap.state = "SELECTED"
                    self.selected = (folder, True)
                else:
                    imap.state = "AUTH"
                    error = _failure("select", typ, answer)
                    failed = {i: PipelinedFetch(None, error, "select") for i in range(start, end)}
            lines: list[Any] = []
            for index in range(start, end):
                if reading is not None:
                    reading[0] = index
                try:
                    typ, answer = imap._command_complete("FETCH", sent[index][1])
                except imaplib.IMAP4.abort:
                    raise
                except imaplib.IMAP4.error as exc:  # a BAD answer, read in full
                    typ, answer = "BAD", [str(exc).encode()]
                lines += [x for x in imap.untagged_responses.pop("FETCH", []) if x is not None]
                if typ != "OK" and index not in failed:
                    failed[index] = PipelinedFetch(None, _failure("fetch", typ, answer), "fetch")
            response = parse_fetch_response(lines or [None], self.normalise_times, True)
            for index in range(start, end):
                if index in failed:
                    results.append(failed[index])
                else:
                    # Unsolicited FETCH responses (flag changes of other messages) are dropped.
                    uids = steps[index][1]
                    fetched = {uid: response[uid] for uid in uids if uid in response}
                    results.append(PipelinedFetch(fetched, None, None))
            start = end
        return results

    def unselect_folder(self) -> Any:
        try:
            return super().unselect_folder()
        finally:
            self.selected = None

    def close_folder(self) -> Any:
        try:
            return super().close_folder()
        finally:
            self.selected = None

    def idle(self) -> Any:
        self.idling = True
        return super().idle()

    def idle_done(self) -> Any:
        result = super().idle_done()
        self.idling = False
        return result

    def logout(self) -> Any:
        self.logged_out = True
        return super().logout()

    def shutdown(self) -> None:
        self.logged_out = True
        super().shutdown()

    def _create_IMAP4(self) -> imaplib.IMAP4:
        connect_timeout = getattr(self._timeout, "connect", None)
        if self.ssl:
            return _TLSIMAP4(self.host, self.port, self.ssl_context, connect_timeout)
        return _PlainIMAP4(self.host, self.port, connect_timeout)

    def restore_defaults(self) -> None:
        """Undo attribute changes a previous user may have made (no I/O)."""
        self.use_uid = True
        self.folder_encode = True
        self.normalise_times = True


def connect_client(config: PoolConfig) -> TrackingClient:
    """Connect and upgrade with STARTTLS if asked: everything before the login. Blocking.

    The connect timeout covers TCP connect, TLS handshake, greeting and CAPABILITY (asked for
    only when the greeting lacks it); the login timeout covers STARTTLS.
    """
    client = TrackingClient(
        config.host,
        config.port,
        ssl=config.ssl,
        ssl_context=config.ssl_context,
        timeout=SocketTimeout(connect=config.connect_timeout, read=config.login_timeout),
    )
    try:
        # imapclient writes some commands in two pieces; without this each costs a delayed ACK.
        client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if config.starttls:
            if not client.has_capability("STARTTLS"):
                raise StartTLSNotOffered(
                    "starttls=True but the server does not offer STARTTLS: refusing to log in "
                    "without TLS"
                )
            client.starttls(config.ssl_context)
    except BaseException:
        close_client(client)
        raise
    return client


def login_client(client: TrackingClient, config: PoolConfig, token: str | None) -> None:
    """Log in a client from :func:`connect_client` (bounded by the login timeout), then set
    the read timeout for commands. Closes the client if it fails. Blocking.

    *token* is the OAuth2 access token when the pool logs in with one.
    """
    try:
        authenticate(client, config, token)
        # The post-login capabilities, now: free where the LOGIN answer carried them (Dovecot,
        # Cyrus), one round trip elsewhere, which also proves the session serves commands
        # (throttled Microsoft 365 answers them "BAD User is authenticated but not connected").
        client.capabilities()
        client._timeout = SocketTimeout(connect=config.connect_timeout, read=config.read_timeout)
        client.socket().settimeout(config.read_timeout)
    except BaseException:
        close_client(client)
        raise


def authenticate(client: IMAPClient, config: PoolConfig, token: str | None) -> None:
    """Log in with the configured mechanism (see ``PoolConfig.auth_mechanism``)."""
    mechanism = config.auth_mechanism
    if token is not None:
        if mechanism == "OAUTHBEARER":
            client.oauthbearer_login(config.username, token)
        else:
            client.oauth2_login(config.username, token)
        return
    if mechanism == "auto" and client.has_capability("LOGINDISABLED"):
        if not client.has_capability("AUTH=PLAIN"):
            raise LoginDisabled(
                "the server disables LOGIN on this connection and offers no AUTHENTICATE "
                "PLAIN: it wants TLS (ssl=True or starttls=True)"
            )
        mechanism = "PLAIN"
    if mechanism == "PLAIN":
        client.plain_login(config.username, config.password)
    else:
        client.login(config.username, config.password)


def close_client(client: TrackingClient) -> None:
    """Close the client's socket without a LOGOUT. Only when no thread is using it."""
    client.logged_out = True
    with contextlib.suppress(OSError):
        client._imap.shutdown()


class _Skipped(Exception):
    pass


class _Call:
    """One call into a worker thread. ``phase`` changes under the connection's lock."""

    __slots__ = ("done", "phase", "token")

    def __init__(self) -> None:
        self.phase = _QUEUED
        # Made only when the task stops waiting for a running thread (rare), so that it can
        # still wait for the thread to end: the thread sets it through the Trio token.
        self.done: trio.Event | None = None
        self.token: trio.lowlevel.TrioToken | None = None

    def orphan(self) -> None:
        """Mark a running call as left by its task. Call with the lock held, in Trio."""
        self.phase = _ORPHANED
        if self.done is None:
            self.done = trio.Event()
            self.token = trio.lowlevel.current_trio_token()

    def finished_in_thread(self) -> None:
        if self.token is not None and self.done is not None:
            with contextlib.suppress(trio.RunFinishedError):
                self.token.run_sync_soon(self.done.set)


class PooledClient:
    """One connection of the pool: a :class:`TrackingClient` plus the pool's bookkeeping.

    Not public; users hold a :class:`~trio_imappool.Connection` proxy instead.
    """

    __slots__ = (
        "_call",
        "_lock",
        "broken",
        "busy",
        "client",
        "created_at",
        "expires_at",
        "global_token",
        "last_used",
        "number",
        "poller",
        "server_gone",
    )

    def __init__(self) -> None:
        #: Serial number in the pool, given when the connection has opened (0 before).
        self.number = 0
        self.client: TrackingClient | None = None
        now = trio.current_time()
        self.created_at = now
        self.last_used = now
        #: When max_lifetime (with its jitter) retires it; set by the pool.
        self.expires_at = math.inf
        #: Set when an error suggests that the server went away (EOF, BYE, reset).
        self.server_gone = False
        #: Whether it holds a place of the pool's shared connection limiter (pool groups).
        self.global_token = False
        #: Polls the socket for readability without a round trip (made once it is open).
        self.poller: select.poll | None = None
        #: Why the connection must not be reused, or None while it is healthy.
        self.broken: str | None = None
        #: True while a task is running a call on it (two tasks sharing a checkout).
        self.busy = False
        self._lock = threading.Lock()
        self._call: _Call | None = None

    def __repr__(self) -> str:
        state = f"broken: {self.broken}" if self.broken else "ok"
        folder = self.client.selected if self.client is not None else None
        return f"<PooledClient #{self.number} {state}, selected={folder!r}>"

    @property
    def thread_running(self) -> bool:
        """Whether a worker thread may still be inside a call on this connection."""
        call = self._call
        return call is not None and call.phase in (_RUNNING, _ORPHANED)

    def _in_thread(self, call: _Call, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        with self._lock:
            if call.phase == _ABANDONED:
                raise _Skipped  # nobody is waiting for this result
            call.phase = _RUNNING
        try:
            return fn(*args)
        except BaseException as exc:
            # Judged here, in the thread, so that only the command's own errors count: a
            # Cancelled delivered to the task is handled by run() from the call's phase.
            if self.broken is None and not connection_survives(exc):
                self.broken = f"{type(exc).__name__}: {exc}"
                self.server_gone = suggests_server_gone(exc)
            raise
        finally:
            with self._lock:
                orphaned = call.phase == _ORPHANED
                call.phase = _FINISHED
            if orphaned:
                if self.client is not None:
                    # The task gave up on us; we are the last user of the socket.
                    close_client(self.client)
                call.finished_in_thread()

    async def run(
        self,
        limiter: trio.CapacityLimiter,
        fn: Callable[..., T],
        *args: Any,
        grace: float = INTERRUPT_GRACE,
    ) -> T:
        """Run ``fn(*args)`` in a worker thread, interrupting it if the task is cancelled.

        On cancellation (or any exception delivered to the task while the thread runs) the
        connection is marked broken, its socket shut down, and the task waits at most *grace*
        seconds (shielded) for the thread before re-raising.
        """
        call = _Call()
        self._call = call
        try:
            return await trio.to_thread.run_sync(
                self._in_thread, call, fn, args, limiter=limiter, abandon_on_cancel=True
            )
        except BaseException:
            with self._lock:
                phase = call.phase
                if phase == _QUEUED:
                    call.phase = _ABANDONED
                elif phase in (_RUNNING, _ORPHANED):
                    call.orphan()
            if phase in (_RUNNING, _ORPHANED):
                self.broken = self.broken or "a command was interrupted"
                self.interrupt()
                with trio.move_on_after(grace, shield=True):
                    await self.wait_thread_done()
            raise

    async def wait_thread_done(self) -> None:
        """Wait until no worker thread is inside a call that its task has left."""
        call = self._call
        if call is not None and call.done is not None:
            await call.done.wait()
        else:
            await trio.lowlevel.checkpoint()

    def connect_blocking(self, config: PoolConfig) -> None:
        """Connect, up to the login (in a worker thread, through :meth:`run`)."""
        self.client = connect_client(config)

    def login_blocking(self, config: PoolConfig, token: str | None = None) -> None:
        """Log the connected client in (in a worker thread, through :meth:`run`)."""
        assert self.client is not None
        login_client(self.client, config, token)
        self.poller = select.poll()
        self.poller.register(self.client._imap.sock, select.POLLIN)

    def server_spoke(self) -> bool:
        """Whether the idle connection's socket is readable: the server closed it or sent
        something unasked (a BYE before shutting down). No round trip, never blocks."""
        if self.poller is None:
            return True
        try:
            # poll(), not recv(MSG_PEEK): a socket with a timeout waits inside recv().
            return bool(self.poller.poll(0))
        except (OSError, ValueError):
            return True

    def interrupt(self) -> None:
        """Wake a worker blocked on this connection's socket (callable from any thread)."""
        client = self.client
        if client is None:
            return
        with contextlib.suppress(OSError, AttributeError):
            # The plain socket method: for TLS sockets it shuts the TCP stream down without
            # touching the SSL object that the worker thread is using.
            socket.socket.shutdown(client._imap.sock, socket.SHUT_RDWR)

    def close(self) -> None:
        """Drop the connection without LOGOUT. Never blocks.

        If a worker thread is still inside a call, the socket is shut down and the worker closes
        it when it returns; otherwise it is closed here.
        """
        if self.broken is None:
            self.broken = "closed"
        with self._lock:
            call = self._call
            running = call is not None and call.phase in (_RUNNING, _ORPHANED)
            if running:
                assert call is not None
                call.orphan()
        if running:
            self.interrupt()
        elif self.client is not None:
            close_client(self.client)
