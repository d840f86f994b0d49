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

The client itself, and everything done past imapclient's public methods (opening a socket
that can be interrupted, the pipelined commands, the FETCH reader), is in the imaplib layer,
:mod:`trio_imappool._imap`; opening and logging in, as configured, in :mod:`._login`. This
module adds the Trio side and re-exports the names other modules import from here.
"""

from __future__ import annotations

import contextlib
import math
import select
import socket
import threading
from collections.abc import Callable
from typing import Any, Final, TypeVar

import trio

from ._config import PoolConfig
from ._errors import connection_survives, suggests_server_gone

# The imaplib layer's names that other modules and tests import from here.
from ._imap import (
    OpenInterrupted,
    PipelinedFetch,
    after_noop,
    close_client,
    esearch_uids,
    fetch_responses,
    has_buffered_data,
    holds_unread,
    message_set,
    read_fetch_results,
    select_fetch_results,
    socket_of,
)
from ._login import TrackingClient, authenticate, connect_client, login_client

__all__ = [
    "INTERRUPT_GRACE",
    "PipelinedFetch",
    "PooledClient",
    "TrackingClient",
    "after_noop",
    "authenticate",
    "close_client",
    "connect_client",
    "has_buffered_data",
    "login_client",
    "message_set",
    "read_fetch_results",
    "select_fetch_results",
]

# Under their old names, for the tests and benchmarks that import them from here.
_esearch_uids = esearch_uids
_fetch_responses = fetch_responses

T = TypeVar("T")

# How long a cancelled task waits for its interrupted worker thread to finish.
INTERRUPT_GRACE: Final = 1.0

# The phases of one call into a worker thread.
_QUEUED: Final = 0  # handed to trio.to_thread, the thread has not started it
_RUNNING: Final = 1  # the thread is inside the call
_ABANDONED: Final = 2  # the task left before the thread started it: it will not run
_ORPHANED: Final = 3  # the task left while the thread was inside the call
_FINISHED: Final = 4


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
        "_sock",
        "broken",
        "buffered",
        "busy",
        "client",
        "created_at",
        "expires_at",
        "global_token",
        "last_used",
        "number",
        "place",
        "poller",
        "release_when_done",
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
        #: Its checkout ended while another task's call still ran: the pool takes it back when
        #: that call ends.
        self.release_when_done = False
        #: Where the pool has it: "new", "opening", "idle", "in_use" or "closed".
        self.place = "new"
        #: Whether imaplib's buffer held unread bytes when the last call ended (the server
        #: sent more than the answer: what a readability check of the socket cannot see).
        self.buffered = False
        self._lock = threading.Lock()
        self._call: _Call | None = None
        #: The socket while the connection is being opened (see :meth:`connect_blocking`).
        self._sock: socket.socket | None = None

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
            if self.client is not None and self.broken is None:
                self.buffered = holds_unread(self.client)
            with self._lock:
                orphaned = call.phase == _ORPHANED
                call.phase = _FINISHED
            if orphaned:
                if self.client is not None:
                    # The task gave up on us; we are the last user of the socket.
                    close_client(self.client)
                elif self._sock is not None:
                    with contextlib.suppress(OSError):
                        self._sock.close()
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
        if self.thread_running:
            # An interrupted call's worker has not ended yet: a second thread must never run
            # inside the same client, and the record of that worker must not be lost.
            raise trio.BrokenResourceError(
                f"connection #{self.number} was interrupted and its worker thread is still "
                "running; it will be discarded"
            )
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
        """Connect, up to the login (in a worker thread, through :meth:`run`).

        The socket is shown to :meth:`interrupt` before every blocking step, so an open is
        interrupted like a command: a server that trickles its greeting cannot keep the thread.
        """
        self.client = connect_client(config, self._show_socket)
        self._sock = None

    def _show_socket(self, sock: socket.socket) -> None:
        """Called in the worker thread with each new socket, before it blocks on it."""
        self._sock = sock
        if self.broken is not None:  # the pool gave up before the socket existed
            raise OpenInterrupted(f"connection #{self.number}: opening was interrupted")

    def login_blocking(self, config: PoolConfig, token: str | None = None) -> None:
        """Log the connected client in (in a worker thread, through :meth:`run`)."""
        assert self.client is not None
        login_client(self.client, config, token)
        self.poller = select.poll()
        self.poller.register(socket_of(self.client), select.POLLIN)

    def server_spoke(self) -> bool:
        """Whether the idle connection has something unread: its socket is readable (the
        server closed it or sent something unasked, a BYE before shutting down) or imaplib's
        buffer held bytes when the last command ended. No round trip, never blocks."""
        if self.poller is None or self.buffered:
            return True
        try:
            # poll(), not recv(MSG_PEEK): a socket with a timeout waits inside recv().
            return bool(self.poller.poll(0))
        except (OSError, ValueError):
            return True

    def interrupt(self) -> None:
        """Wake a worker blocked on this connection's socket (callable from any thread)."""
        client = self.client
        sock = socket_of(client) if client is not None else self._sock
        if sock is None:
            return  # not connected yet: _show_socket sees `broken` and gives up
        with contextlib.suppress(OSError, AttributeError):
            # The plain socket method: for TLS sockets it shuts the TCP stream down without
            # touching the SSL object that the worker thread is using.
            socket.socket.shutdown(sock, socket.SHUT_RDWR)

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
        elif self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
