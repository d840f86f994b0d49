"""IDLE as an async iterator: the server's pushes for one folder, on a dedicated connection.

IMAP IDLE (RFC 2177) lets the server tell a client about changes to the selected folder as they
happen: new messages (``* 12 EXISTS``), removed ones (``* 3 EXPUNGE``), flag changes
(``* 5 FETCH (FLAGS (\\Seen))``). imapclient offers ``idle()``, ``idle_check()`` and
``idle_done()``, but ``idle_check()`` has two bugs that lose pushes or connections
(mjs/imapclient#519): a push that arrives in the same TCP segment as the ``+ idling``
continuation sits in imaplib's read buffer, where polling the socket cannot see it; and a
response split across TCP segments is read with the socket non-blocking and fails with
``unterminated line``. It also parks a thread for the whole wait.

:func:`idle` does it differently. Between pushes it waits in Trio, on the socket's readability
(:func:`trio.lowlevel.wait_readable`), with no thread parked. Before every wait it asks, without
blocking, whether imaplib's buffer (or TLS's decrypted-but-unread bytes) already holds data; when
there is data it reads whole responses in one worker thread hop, in blocking mode under the
connection's normal read timeout, so a response split across segments is simply waited for.

This module is the Trio side. The hops themselves (what is written and read on the wire) are
in :mod:`trio_imappool._imap._idle_wire`, which has no Trio in it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar

import trio

from ._config import check_wire_text
from ._connection import Connection
from ._imap import MAX_BATCH as MAX_BATCH
from ._imap import (
    IdleEvent,
    IdleSession,
    begin_idle,
    end_idle,
    open_watch,
    poll,
    read_batch,
    renew,
)

if TYPE_CHECKING:
    from ._surface import PoolSurface

__all__ = ["IdleEvent", "IdleEvents", "IdleStatistics", "idle"]

logger = logging.getLogger("trio_imappool")

# The blocking steps (one worker-thread hop each), as names of this module: the watch looks
# them up here at every hop, so a test can replace one.
_Session = IdleSession
_begin_idle = begin_idle
_end_idle = end_idle
_open = open_watch
_poll = poll
_read_batch = read_batch
_renew = renew

T = TypeVar("T")

#: RFC 2177: a client should re-issue IDLE at least every 29 minutes, or the server may log it
#: out as inactive.
IDLE_LIMIT: Final = 29 * 60.0
DEFAULT_RENEW_AFTER: Final = 25 * 60.0
DEFAULT_POLL_INTERVAL: Final = 30.0
DEFAULT_DONE_TIMEOUT: Final = 2.0


@dataclasses.dataclass(frozen=True, slots=True)
class IdleStatistics:
    """A snapshot of an :class:`IdleEvents`, returned by :meth:`IdleEvents.statistics`.

    Attributes:
        folder: The folder watched.
        mode: ``"idle"``, or ``"poll"`` when the server lacks the IDLE capability.
        idle_commands: IDLE commands sent (the first, and one per renewal).
        polls: NOOP commands sent in poll mode.
        received: Responses read from the server.
        pending: Responses read but not yet taken by the iteration.
    """

    folder: str
    mode: Literal["idle", "poll"]
    idle_commands: int
    polls: int
    received: int
    pending: int


class IdleEvents:
    """The server's pushes for one folder, as an async iterator of :class:`IdleEvent`.

    Made by :func:`idle`; valid until its ``async with`` block ends. Iterating never ends by
    itself: leave the loop with ``break``, a cancel scope, or an exception.

    Attributes:
        folder: The folder watched.
        selected: What the SELECT (read-only) of the folder returned when the watch began,
            e.g. ``selected[b"EXISTS"]`` and ``selected[b"UIDNEXT"]``: events are changes
            relative to this state.
        mode: ``"idle"``, or ``"poll"`` when the server lacks the IDLE capability.
    """

    def __init__(
        self,
        conn: Connection,
        folder: str,
        *,
        renew_after: float,
        poll_interval: float,
    ) -> None:
        self.folder: Final = folder
        self.selected: dict[bytes, Any] = {}
        self.mode: Literal["idle", "poll"] = "idle"
        self._conn = conn
        self._session = _Session()
        self._renew_after = renew_after
        self._poll_interval = poll_interval
        self._sock: Any = None
        self._pending: deque[IdleEvent] = deque()
        self._renew_at = trio.current_time() + renew_after
        self._next_poll = trio.current_time() + poll_interval
        self._busy = False
        self._closed = False
        self._idle_commands = 0
        self._polls = 0
        self._received = 0

    def __repr__(self) -> str:
        state = "closed" if self._closed else self.mode
        return (
            f"<IdleEvents {self.folder!r} {state} idle_commands={self._idle_commands} "
            f"polls={self._polls} received={self._received} pending={len(self._pending)}>"
        )

    def statistics(self) -> IdleStatistics:
        """A snapshot of the watch's counters (see :class:`IdleStatistics`)."""
        return IdleStatistics(
            folder=self.folder,
            mode=self.mode,
            idle_commands=self._idle_commands,
            polls=self._polls,
            received=self._received,
            pending=len(self._pending),
        )

    def __aiter__(self) -> IdleEvents:
        return self

    async def __anext__(self) -> IdleEvent:
        """Wait for the next push and return it.

        Raises:
            trio.ClosedResourceError: The :func:`idle` block has ended.
            trio.BusyResourceError: Another task is iterating over the same events.
            trio.BrokenResourceError: An earlier iteration broke the connection (it was
                cancelled in the middle of a read, or the read failed).
            imapclient.exceptions.IMAPClientAbortError: The server closed the connection
                (after a ``BYE`` event, or at EOF); the connection is discarded.
            TimeoutError: A response started but did not end within the pool's
                ``read_timeout``; the connection is discarded.

        **Cancellation**: a checkpoint on every path. Waiting for the server costs no thread
        and is cancelled at once, leaving the connection in IDLE and usable: the
        :func:`idle` block ends IDLE cleanly when it is left. A cancellation that arrives while
        a response is being read in a worker thread (microseconds, or up to ``read_timeout``
        for a response split across a stalled network) interrupts the read at once; the
        connection is then discarded and later iterations raise
        :class:`trio.BrokenResourceError`. Events that the iterator holds are never lost to a
        cancellation: the next iteration returns them.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            raise trio.ClosedResourceError("the idle() block has ended")
        if self._busy:
            await trio.lowlevel.checkpoint()
            raise trio.BusyResourceError("another task is already iterating over these events")
        self._busy = True
        try:
            if self._pending:
                await trio.lowlevel.checkpoint()
            while not self._pending:
                await self._fill()
            return self._pending.popleft()
        finally:
            self._busy = False

    async def _fill(self) -> None:
        """One step towards having events: a read, a wait, a renewal or a poll."""
        broken = self._conn.broken
        if broken is not None:
            raise trio.BrokenResourceError(f"the IDLE connection broke: {broken}")
        session = self._session
        if self.mode == "poll":
            await trio.sleep_until(self._next_poll)
            await self._hop(_poll)
            self._polls += 1
            self._next_poll = trio.current_time() + self._poll_interval
            return
        if session.tag is None:  # the server ended IDLE by itself
            await self._start_idle(_begin_idle)
        elif session.more or session.error is not None:
            await self._hop(_read_batch)
        elif trio.current_time() >= self._renew_at:
            await self._start_idle(_renew)
        else:
            with trio.move_on_at(self._renew_at):
                await trio.lowlevel.wait_readable(self._sock)
                session.more = True  # readable: the next step reads

    async def _hop(self, step: Callable[..., T], *args: Any) -> T:
        """Run one blocking step in a worker thread; whatever it read becomes pending events,
        however the hop ends (a cancellation may drop its result, never its events)."""
        try:
            return await self._conn.run_sync(step, self._session, *args)
        finally:
            events = self._session.take_events()
            self._received += len(events)
            self._pending.extend(events)

    async def _start_idle(self, step: Callable[[Any, _Session], None]) -> None:
        self._renew_at = trio.current_time() + self._renew_after
        self._idle_commands += 1
        await self._hop(step)

    async def _begin(self) -> None:
        self._sock, self.selected, can_idle = await self._hop(_open, self.folder)
        if can_idle:
            self._idle_commands += 1
            self._renew_at = trio.current_time() + self._renew_after
        else:
            self.mode = "poll"
            self._next_poll = trio.current_time() + self._poll_interval

    async def _end(self, done_timeout: float) -> None:
        """End IDLE if it is on and the connection is sound. Shielded, bounded; never raises
        an Exception (a failure leaves the connection to be discarded)."""
        self._closed = True
        session = self._session
        if session.tag is None or self._conn.broken is not None:
            return
        with trio.move_on_after(done_timeout, shield=True):
            try:
                # With a pending BYE this raises in the thread: the connection is discarded.
                await self._hop(_end_idle)
            except Exception as exc:
                logger.debug("ending IDLE on %r failed: %r", self._conn, exc)


@asynccontextmanager
async def idle(
    pool: PoolSurface,
    folder: str,
    *,
    renew_after: float = DEFAULT_RENEW_AFTER,
    poll_interval: float = DEFAULT_POLL_INTERVAL,
    done_timeout: float = DEFAULT_DONE_TIMEOUT,
) -> AsyncIterator[IdleEvents]:
    """Watch a folder: the server's pushes (new, removed and changed messages) as they happen.

    ::

        async with idle(pool, "INBOX") as events:
            print("INBOX holds", events.selected[b"EXISTS"], "messages")
            async for event in events:
                if event.kind == "EXISTS":
                    print("now", event.number, "messages")
                elif event.kind == "EXPUNGE":
                    print("message", event.number, "was removed")
                elif event.kind == "FETCH":
                    print("message", event.number, "now has flags", event.data.get(b"FLAGS"))

    The watch has a connection of its own, checked out of *pool* for the whole block: it
    counts against ``max_size`` (and the server's per-account limit) and nobody else uses it
    meanwhile. Entering checks it out, selects *folder* read-only (``events.selected`` has
    the result) and issues IDLE; pushes that arrive from then on are kept until iterated, also
    while the body does something else. Do the other work of the task on other connections.

    Between pushes nothing runs: the task waits on the socket's readability in Trio, with no
    worker thread parked. Responses are read in one worker thread hop each time data arrives,
    whole, also when the server's push shares a TCP segment with the IDLE continuation or a
    response is split across segments (both defeat imapclient's ``idle_check``).

    IDLE is re-issued (DONE, then IDLE again, in one hop) every *renew_after* seconds, as RFC
    2177 asks of clients, so that the server does not log the connection out; pushes that come
    with the renewal are kept. A server without the IDLE capability is polled with NOOP every
    *poll_interval* seconds instead (``events.mode == "poll"``).

    Args:
        pool: The pool to take the connection from.
        folder: The folder to watch.
        renew_after: Seconds between IDLE renewals; more than 0 and at most 29 minutes.
        poll_interval: Seconds between NOOPs when the server lacks IDLE; more than 0.
        done_timeout: How long leaving the block waits for the server to end IDLE.

    Yields:
        The :class:`IdleEvents` to iterate over.

    Raises:
        ValueError: An argument is out of range.
        IMAPClientError: The folder could not be selected or IDLE was refused (the connection
            goes back to the pool).
        Whatever :meth:`Pool.connection <trio_imappool.Pool.connection>` raises.

    Leaving the block sends DONE and waits, shielded and for at most *done_timeout*, for the
    server to confirm; the connection then goes back to the pool with the folder still
    selected (read-only), like any other. Pushes not yet iterated are dropped. If IDLE cannot
    be ended cleanly (no answer in time, an error, a broken connection), the connection is
    discarded instead, never handed out in IDLE.

    **Cancellation**: entering may wait for a connection and is cancelled as
    :meth:`Pool.connection <trio_imappool.Pool.connection>` is. Iterating is cancelled at
    once (see :meth:`IdleEvents.__anext__`). Leaving the block on a cancellation still ends
    IDLE: one round trip on a responsive server, at most *done_timeout* on a silent one.

    Limits: one folder per watch (IMAP IDLE watches the selected folder only; watch several
    with one block each, each costing a connection). Sequence numbers in events are relative
    to the watch's own view of the folder; use UIDs (``FETCH`` data, or a search) to name
    messages elsewhere. A push whose response stops half-way for longer than the pool's
    ``read_timeout`` ends the watch with :class:`TimeoutError` and discards the connection.
    """
    check_wire_text("the folder name", folder)
    if not 0 < renew_after <= IDLE_LIMIT:
        raise ValueError(f"renew_after must be more than 0 and at most {IDLE_LIMIT:g} s")
    if not 0 < poll_interval < float("inf"):
        raise ValueError("poll_interval must be a positive number of seconds")
    if not 0 < done_timeout < float("inf"):
        raise ValueError("done_timeout must be a positive number of seconds")
    async with pool.connection() as conn:
        events = IdleEvents(conn, folder, renew_after=renew_after, poll_interval=poll_interval)
        try:
            await events._begin()
            yield events
        finally:
            await events._end(done_timeout)  # shielded and bounded inside
