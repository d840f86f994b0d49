"""The pool: checkout, release, opening on demand, and closing."""

from __future__ import annotations

import collections
import contextlib
import inspect
import itertools
import logging
import math
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Final, TypeVar, TypeVarTuple, Unpack, cast

import trio
from imapclient import IMAPClient
from imapclient.exceptions import LoginError
from trio_util import AsyncValue

from . import _fanout
from . import _idle as _watching
from ._budget import PoolPlaces, RedisBudget
from ._client import PooledClient, TrackingClient
from ._config import ConfigOptions, PoolConfig, PoolOptions, check_wire_text
from ._connection import Connection
from ._errors import (
    AuthenticationError,
    ConfigurationError,
    ConnectError,
    ConnectionLimitError,
    PoolClosedError,
    PoolTimeout,
    classify_open_error,
    is_permanent_open_error,
    suggests_server_gone,
)
from ._stats import AsyncCounts, PoolCounts, PoolStatistics
from ._util import holds_only

__all__ = ["Pool", "open_pool"]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

logger = logging.getLogger("trio_imappool")

# Backoff between failed attempts to open a connection: doubles from the first to the cap, each
# delay multiplied by a random factor in [0.5, 1) so that pools do not retry in step.
BACKOFF_FIRST: Final = 0.05
BACKOFF_CAP: Final = 0.5
# After a login refused for too many connections: wait longer before the next attempt, and try
# one connection more than the server allowed after this long.
LIMIT_BACKOFF: Final = 1.0
LIMIT_RECHECK: Final = 30.0
MAINTENANCE_TICK_MIN: Final = 0.05
MAINTENANCE_TICK_MAX: Final = 30.0


# The places a connection goes through, and the moves between them that the pool makes:
# opened into the idle channel (or given up), taken from it by a task or by the pool's own
# work, given back, closed. Closed is final.
_MOVES: Final = frozenset(
    {
        ("new", "opening"),
        ("opening", "idle"),
        ("opening", "closed"),
        ("idle", "in_use"),
        ("idle", "closed"),
        ("in_use", "idle"),
        ("in_use", "closed"),
    }
)


class _Probe:
    """The one attempt to open a connection made while the server has not yet accepted us
    (or while opens fail). Once it has reached the server, other openers may connect too, but
    they log in only after it has, and only if it did."""

    __slots__ = ("logged_in", "reached", "settled")

    def __init__(self) -> None:
        self.reached = False  # TCP, TLS, greeting (and STARTTLS) done
        self.settled = trio.Event()  # its login ended, either way
        self.logged_in = False


class _ProbeFailed(Exception):
    """A follower's probe did not log in: the follower gives up without a LOGIN."""


class _Waiter:
    __slots__ = ("error", "scope")

    def __init__(self, scope: trio.CancelScope) -> None:
        self.scope = scope
        self.error: BaseException | None = None


class Pool:
    """A pool of logged-in IMAP connections to one account. Made by :func:`open_pool`.

    Check a connection out with :meth:`connection`; it comes back when the block ends, however
    it ends. Or run one blocking function on a pooled client with :meth:`run_sync`.

    **What a checked-out connection is like.** It is logged in, and nobody else uses it while
    you hold it. It may have a folder selected by its previous user
    (:attr:`Connection.selected_folder <trio_imappool.Connection.selected_folder>` says which,
    and whether read-only); select the folder you need before commands that depend on one. With
    ``reset_on_release=True`` the pool unselects on release (one round trip, done in the
    background), so every connection you get has no folder selected. Client attributes a
    previous user changed through ``run_sync`` (``use_uid``, ``folder_encode``,
    ``normalise_times``) are always put back to imapclient's defaults.

    **Sizing.** ``min_size`` connections are opened in the background and kept. Beyond that a
    connection is opened when a task waits and none is idle, up to ``max_size`` connections
    existing or being opened (a :class:`trio.CapacityLimiter` keeps count). A waiting task gets
    whichever comes first, a connection released by another task or a newly opened one, and
    waiting tasks are served first come, first served.

    **Failures to open.** Until the first connection has opened, one connection logs in at a
    time (the others may connect meanwhile, once the first has reached the server, but send no
    LOGIN until it has logged in), and a failure goes at once to every waiting task as a
    :class:`~trio_imappool.ConnectError`, so a wrong port or password is reported after one
    attempt. So does an error that retrying cannot mend (rejected credentials, a certificate
    that does not verify, a missing STARTTLS), at any time. Once the pool has worked, a failure
    is taken as an outage: one attempt at a time is retried with exponential backoff and jitter
    (at most 0.5 s apart) while tasks wait or ``min_size`` is not met, and a waiting task that
    reaches its acquire timeout gets :class:`~trio_imappool.PoolTimeout` naming the last error.
    Commands are never retried. See the README for health checks, lifetimes, bulk
    invalidation and connection limits.
    """

    def __init__(
        self,
        config: PoolConfig,
        nursery: trio.Nursery,
        *,
        thread_limiter: trio.CapacityLimiter | None = None,
        connection_limiter: trio.CapacityLimiter | None = None,
        budget: RedisBudget | None = None,
    ) -> None:
        self.config: Final = config
        # Shared with other pools (a pool group): a global cap on connections.
        self._connection_limiter = connection_limiter
        # Shared with other processes and hosts through Redis: a place per connection,
        # taken in _open before connecting, given back in _forget; renewed in the nursery.
        self._budget = None if budget is None else PoolPlaces(budget, self, nursery)
        self._nursery = nursery
        self._size_limiter = trio.CapacityLimiter(config.max_size)
        self._thread_limiter = thread_limiter or trio.CapacityLimiter(config.max_size)
        self._idle_send, self._idle_recv = trio.open_memory_channel[PooledClient](config.max_size)
        self._numbers = itertools.count(1)
        # How many connections are in each place (see _move): the only record of the counts.
        self._places: collections.Counter[str] = collections.Counter()
        self._queued = 0
        self._waiters: dict[_Waiter, None] = {}
        self._closed = False
        self._ever_opened = False
        self._failures = 0
        self._probe: _Probe | None = None
        self._next_attempt_at = -math.inf
        self._last_open_error: ConnectError | None = None
        self._orphans: list[PooledClient] = []
        # Connections opened before this time are not reused (a server failure, or drain()).
        self._invalid_before = -math.inf
        self._limit_lowered_at: float | None = None
        self._noop_checks = 0
        self._keepalives = 0
        self._selects = 0
        self._selects_saved = 0
        self._acquires = 0
        self._acquire_waits = 0
        self._acquire_timeouts = 0
        self._opened = 0
        self._discarded = 0
        self._closed_count = 0
        self._open_failures = 0
        #: The live counts, updated on every change: ``await pool.counts.wait_value(lambda c:
        #: c.idle > 0)`` waits for an idle connection without polling.
        self.counts: Final[AsyncCounts] = AsyncValue(PoolCounts(0, 0, 0, 0, 0))
        if config.insecure_skip_tls_verify and (config.ssl or config.starttls):
            logger.warning(
                "%s: TLS certificates are NOT verified (insecure_skip_tls_verify=True): "
                "anyone on the network path can read the credentials",
                config.name,
            )
        if config.insecure_plaintext and not (config.ssl or config.starttls):
            logger.warning(
                "%s: credentials are sent WITHOUT TLS (insecure_plaintext=True)", config.name
            )

    # -- where each connection is -------------------------------------------------------------

    @property
    def _idle(self) -> int:
        """Connections in the idle channel, including one on its way to a waiting task."""
        return self._places["idle"]

    @property
    def _in_use(self) -> int:
        """Connections checked out, or busy with the pool's own work (reset, keepalive,
        LOGOUT)."""
        return self._places["in_use"]

    @property
    def _opening(self) -> int:
        """Connections being opened (including openers queued under a shared cap)."""
        return self._places["opening"]

    def _move(self, slot: PooledClient, to: str) -> None:
        """Put *slot* in another place. Every change of the counts goes through here, and a
        move the pool's rules do not allow (a connection released twice, or put back after
        it was closed) raises at once instead of corrupting the counts and the limiter."""
        here = slot.place
        if (here, to) not in _MOVES:
            raise RuntimeError(
                f"{self.config.name}: internal error: connection #{slot.number} cannot go "
                f"from {here} to {to}"
            )
        if here != "new":
            self._places[here] -= 1
        if to != "closed":
            self._places[to] += 1
        slot.place = to  # the caller publishes the counts when its step is done

    # -- reporting -----------------------------------------------------------------------------

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Pool {self.config.name} {state} {self.statistics()}>"

    def statistics(self) -> PoolStatistics:
        """A snapshot of the pool's counts and counters (see :class:`PoolStatistics`)."""
        counts = self.counts.value
        return PoolStatistics(
            name=self.config.name,
            min_size=self.config.min_size,
            max_size=self.config.max_size,
            size=counts.size,
            idle=counts.idle,
            in_use=counts.in_use,
            opening=counts.opening,
            waiting=counts.waiting,
            closed=self._closed,
            acquires=self._acquires,
            acquire_waits=self._acquire_waits,
            acquire_timeouts=self._acquire_timeouts,
            connections_opened=self._opened,
            connections_discarded=self._discarded,
            connections_closed=self._closed_count,
            open_failures=self._open_failures,
            last_open_error=str(self._last_open_error) if self._last_open_error else None,
            effective_max_size=int(self._size_limiter.total_tokens),
            noop_checks=self._noop_checks,
            keepalives=self._keepalives,
            selects=self._selects,
            selects_saved=self._selects_saved,
            queued=self._queued,
        )

    def _publish(self) -> None:
        queued = self._queued  # openers waiting for a place under a shared cap: not connections
        self.counts.value = PoolCounts(
            self._size_limiter.borrowed_tokens - queued,
            self._idle,
            self._in_use,
            self._opening - queued,
            len(self._waiters),
        )

    # -- checkout ------------------------------------------------------------------------------

    def connection(
        self, folder: str | None = None, *, readonly: bool = False, timeout: float | None = None
    ) -> _Checkout:
        """Check a connection out for the duration of an ``async with`` block.

        ::

            async with pool.connection() as conn:
                await conn.select_folder("INBOX")
                uids = await conn.search(["UNSEEN"])

            async with pool.connection("Archive", readonly=True) as conn:
                uids = await conn.search(["FROM", "boss@example.org"])  # selected already

        Args:
            folder: Hand out a connection with this folder selected. An idle connection that
                has it selected already (in the same mode) is preferred, saving the SELECT
                round trip; otherwise the connection the pool would give anyway is selected
                before it is handed out. Preference never jumps the queue: it only chooses
                among idle connections, which exist only while nobody waits.
            readonly: With *folder*: select it read-only (EXAMINE), as ``select_folder`` does.
            timeout: How long to wait for a connection, instead of the pool's
                ``acquire_timeout``.

        Entering waits until a connection is free or opened, and may be cancelled; the
        caller's own cancel scopes apply as usual.

        Leaving never blocks and never loses the connection: it goes back to the pool on a
        normal exit, an exception or a cancellation, or is discarded if it broke.

        Raises:
            PoolTimeout: No connection within the timeout (the message has the pool's counts).
            ConnectError: Opening a connection failed and the pool has nothing else to offer
                (see the class documentation).
            PoolClosedError: The pool is closed or closes while waiting.
            imapclient.exceptions.IMAPClientError: Selecting *folder* failed (it does not
                exist, say); the connection went back to the pool.
        """
        if folder is not None:
            check_wire_text("the folder name", folder)
        return _Checkout(self, timeout, None if folder is None else (folder, readonly))

    async def run_sync(self, fn: Callable[[IMAPClient, *Ts], T], *args: *Ts) -> T:
        """Check out a connection, run ``fn(client, *args)`` in a worker thread, release it.

        ::

            count = await pool.run_sync(lambda client: len(client.list_folders()))

        Args:
            fn: A blocking function given the :class:`imapclient.IMAPClient`.
            args: Further positional arguments for *fn*.

        Returns:
            What *fn* returns.

        Raises:
            Whatever :meth:`connection` and *fn* raise.

        **Cancellation**: while waiting for a connection, as :meth:`connection`; while *fn*
        runs, its I/O is interrupted at once and the connection discarded.
        """
        async with self.connection() as conn:
            return await conn.run_sync(fn, *args)

    # -- bulk operations over several connections (see the _fanout module) ----------------------

    fetch_many = _fanout.fetch_many
    search_many = _fanout.search_many
    add_flags_many = _fanout.add_flags_many
    remove_flags_many = _fanout.remove_flags_many
    copy_many = _fanout.copy_many
    move_many = _fanout.move_many
    idle = _watching.idle

    async def _acquire(
        self, wait_limit: float | None, want: tuple[str, bool] | None = None
    ) -> PooledClient:
        """Check a connection out: the checkout's whole work (waiting, the health check of an
        idle connection, selecting *want*) ends by one deadline."""
        await trio.lowlevel.checkpoint_if_cancelled()
        timeout = self.config.acquire_timeout if wait_limit is None else wait_limit
        deadline = trio.current_time() + timeout
        while True:
            if self._closed:
                raise PoolClosedError(f"{self.config.name}: the pool is closed")
            try:
                slot = self._take_idle_nowait(want)
            except trio.WouldBlock:
                slot = await self._wait_for_connection(timeout, deadline)
            else:
                try:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                except BaseException:
                    self._release(slot)
                    raise
            if self._closed:
                self._release(slot)
                raise PoolClosedError(f"{self.config.name}: the pool closed while waiting")
            # Idle for long: make sure it still answers before handing it out.
            check = trio.current_time() - slot.last_used > self.config.noop_check_after
            if (check or want is not None) and not await self._prepare(
                slot, check, want, deadline, timeout
            ):
                continue
            if self._closed:  # closed during the check or the SELECT
                self._release(slot)
                raise PoolClosedError(f"{self.config.name}: the pool closed while waiting")
            self._acquires += 1
            self._publish()
            return slot

    async def _prepare(
        self,
        slot: PooledClient,
        check: bool,
        want: tuple[str, bool] | None,
        deadline: float,
        limit: float,
    ) -> bool:
        """The checkout's round trips, by its deadline: the NOOP check (False if it failed: the
        connection went back, to be dropped) and the SELECT of *want*."""
        try:
            with trio.move_on_at(deadline):
                if check and not await self._noop_check(slot):
                    self._release(slot)
                    return False
                if want is not None:
                    await self._select(slot, want)
                return True
        except BaseException:
            self._release(slot)
            raise
        # The deadline passed during the check or the SELECT (which was interrupted).
        self._release(slot)
        raise self._timed_out(limit, str(self.statistics()))

    async def _select(self, slot: PooledClient, want: tuple[str, bool]) -> None:
        client = slot.client
        assert client is not None
        if client.selected == want:
            self._selects_saved += 1
            return
        self._selects += 1
        await slot.run(self._thread_limiter, TrackingClient.select_folder, client, *want)

    def _usable(self, slot: PooledClient) -> bool:
        """The checks a checkout makes without a round trip; drops the connection if one fails."""
        self._mark_if_stale(slot)
        if slot.broken is None:
            if trio.current_time() >= slot.expires_at:
                slot.broken = "reached max_lifetime"
            elif slot.server_spoke():
                slot.broken = "the server closed it or spoke unasked while it was idle"
        if slot.broken is None:
            return True
        self._drop(slot, discarded=True)
        return False

    def _take_idle_nowait(self, want: tuple[str, bool] | None = None) -> PooledClient:
        """A usable idle connection, now in use; raises :class:`trio.WouldBlock` if none."""
        slot = self._take_idle_with(want) if want is not None and self._idle > 1 else None
        while slot is None:
            candidate = self._idle_recv.receive_nowait()
            if self._usable(candidate):
                slot = candidate
        self._move(slot, "in_use")
        return slot

    def _take_idle_with(self, want: tuple[str, bool]) -> PooledClient | None:
        """The first usable idle connection with *want* selected, the others left in order.
        A candidate that is not usable is dropped (by :meth:`_usable`), never put back."""
        keep: list[PooledClient] = []
        chosen = None
        for slot in self._take_all_idle():
            if chosen is None and slot.client is not None and slot.client.selected == want:
                if self._usable(slot):
                    chosen = slot
                continue
            keep.append(slot)
        self._put_back(keep)
        return chosen

    async def _noop_check(self, slot: PooledClient) -> bool:
        """NOOP, bounded by ``connect_timeout`` (and by the caller's scopes); whether it
        answered. A cancellation interrupts it and the connection is then broken."""
        self._noop_checks += 1
        if await self._housekeeping(slot, TrackingClient.noop, self.config.connect_timeout):
            return True
        slot.broken = slot.broken or "failed its NOOP check"
        return False

    async def _housekeeping(
        self, slot: PooledClient, fn: Callable[[TrackingClient], object], limit: float
    ) -> bool:
        """Run the pool's own command *fn* on *slot*, bounded by *limit*; True if it succeeded.

        Failures are logged, not raised: the connection is judged by ``slot.broken``, which
        the thread call sets for a failure that leaves it in doubt, and for a timeout.
        """
        with trio.move_on_after(limit):
            try:
                await slot.run(self._thread_limiter, fn, slot.client)
            except Exception as exc:
                logger.info(
                    "%s: %s on #%d failed: %r", self.config.name, fn.__name__, slot.number, exc
                )
                return False
            return True
        return False

    async def _wait_for_connection(self, limit: float, deadline: float) -> PooledClient:
        self._acquire_waits += 1
        with trio.CancelScope(deadline=deadline) as scope:
            waiter = _Waiter(scope)
            self._waiters[waiter] = None
            try:
                self._want_connections()
                while True:
                    slot = await self._idle_recv.receive()
                    if self._usable(slot):
                        self._move(slot, "in_use")
                        return slot
            finally:
                # The counts as this waiter saw them, for the timeout's message.
                seen = str(self.statistics()) if trio.current_time() >= scope.deadline else ""
                self._waiters.pop(waiter, None)
                self._publish()
        if waiter.error is not None:
            raise waiter.error
        raise self._timed_out(limit, seen)

    def _timed_out(self, timeout: float, seen: str) -> PoolTimeout:
        """The error of a checkout that reached its deadline (counted)."""
        self._acquire_timeouts += 1
        last = self._last_open_error
        reason = f"; opening connections fails: {last}" if last else ""
        error = PoolTimeout(
            f"{self.config.name}: no connection within {timeout:g} s ({seen}){reason}"
        )
        error.__cause__ = last
        return error

    # -- release ---------------------------------------------------------------------------------

    def _release(self, slot: PooledClient) -> None:
        """Take a connection back from a task. Synchronous: never blocks, never fails."""
        self._return(slot)

    def _return(self, slot: PooledClient) -> None:
        """Put an opened or released connection where it belongs: the idle channel, a reset,
        a LOGOUT, or closed."""
        assert (not slot.busy and not slot.thread_running) or slot.broken is not None, slot
        slot.last_used = trio.current_time()
        client = slot.client
        assert client is not None
        if slot.broken is None:
            if client.logged_out:
                slot.broken = "logged out by its user"
            elif client.idling:
                slot.broken = "left in IDLE by its user"
        if slot.server_gone:
            self._invalidate(f"#{slot.number} lost its server ({slot.broken})")
        self._mark_if_stale(slot)
        if slot.broken is not None or self._closed:
            self._drop(slot, discarded=slot.broken is not None)
        elif slot.last_used >= slot.expires_at:
            self._retire(slot)
        elif self.config.reset_on_release and client.selected is not None:
            self._nursery.start_soon(self._reset, slot)  # in use until it is reset
        else:
            client.restore_defaults()
            self._move(slot, "idle")
            self._idle_send.send_nowait(slot)
        self._publish()

    async def _reset(self, slot: PooledClient) -> None:
        try:
            await self._housekeeping(slot, _unselect, self.config.read_timeout)
        finally:
            if slot.client is not None and slot.client.selected is not None:
                slot.broken = slot.broken or "could not be reset"
            self._release(slot)

    def _drop(self, slot: PooledClient, *, discarded: bool) -> None:
        """Close a connection and give its place back. Never blocks."""
        if discarded:
            self._discarded += 1
            logger.info("%s: discarding #%d (%s)", self.config.name, slot.number, slot.broken)
        else:
            self._closed_count += 1
        self._forget(slot)
        self._want_connections()

    def _forget(self, slot: PooledClient) -> None:
        """Close *slot* and give its place in the size limiter (and any global one) back."""
        self._move(slot, "closed")  # raises for a second close, before anything is released
        if self._budget is not None:  # before close(), to see the server close its end
            self._budget.give_back(slot)
        slot.close()
        if slot.thread_running:
            self._orphans.append(slot)
        self._size_limiter.release_on_behalf_of(slot)
        if slot.global_token:
            assert self._connection_limiter is not None
            self._connection_limiter.release_on_behalf_of(slot)
            slot.global_token = False
        self._publish()  # the size counts the place just given back

    def drain(self) -> None:
        """Close every idle connection now, and every checked-out one when it comes back.

        For when you know the server restarted or the network changed (after a resume from
        sleep, say): the next checkouts get fresh connections instead of finding the stale ones
        one by one. The pool does the same by itself when a command or an open fails in a way
        that suggests the server went away (EOF, BYE, connection reset or refused).
        Synchronous: closes sockets without LOGOUT, never blocks.
        """
        self._invalidate("drain() was called")

    def close_idle(self, count: int = 1) -> int:
        """Close up to *count* idle connections (the longest unused first) with LOGOUT, in the
        background, regardless of ``min_size``. Returns how many it took.

        For giving places back, e.g. to other pools under a shared cap (a pool group does).
        Synchronous: never blocks.
        """
        idle = self._take_all_idle()
        closing, keep = idle[:count], idle[count:]
        self._put_back(keep)
        for slot in closing:
            self._retire(slot)
        self._publish()
        return len(closing)

    def _invalidate(self, why: str) -> None:
        self._invalid_before = trio.current_time()
        if self._limit_lowered_at is not None:
            # The server went away (or drain() was called): what it allowed before is no
            # guide to what it allows now, and a refusal misread during a restart must not
            # keep the pool small for minutes.
            self._size_limiter.total_tokens = self.config.max_size
            self._limit_lowered_at = None
        dropped = 0
        for slot in self._take_all_idle():
            slot.broken = slot.broken or "dropped with the other idle connections"
            self._drop(slot, discarded=True)
            dropped += 1
        if dropped:
            logger.warning("%s: %s: dropped %d idle connections", self.config.name, why, dropped)
        self._publish()

    def _take_all_idle(self) -> list[PooledClient]:
        """Empty the idle channel (synchronously, so no task can slip in between). The
        connections stay idle in the counts: the caller puts each back, drops or retires it
        before it yields."""
        taken: list[PooledClient] = []
        while True:
            try:
                taken.append(self._idle_recv.receive_nowait())
            except trio.WouldBlock:
                return taken

    def _put_back(self, slots: list[PooledClient]) -> None:
        """Return idle connections taken by :meth:`_take_all_idle`, in their order."""
        for slot in slots:
            self._idle_send.send_nowait(slot)

    def _mark_if_stale(self, slot: PooledClient) -> None:
        """Mark *slot* broken if it was opened before a server failure or drain()."""
        if slot.broken is None and slot.created_at < self._invalid_before:
            slot.broken = "opened before a server failure or drain()"

    def _retire(self, slot: PooledClient) -> None:
        """Close a healthy connection politely (LOGOUT) in the background."""
        if slot.place == "idle":
            self._move(slot, "in_use")  # busy with the pool's own work until it is closed
        self._nursery.start_soon(self._logout, slot)

    async def _keepalive(self, slot: PooledClient) -> None:
        self._keepalives += 1
        try:
            await self._housekeeping(slot, TrackingClient.noop, self.config.connect_timeout)
        finally:
            self._release(slot)

    async def _maintain_forever(self) -> None:
        """Close idle connections past max_idle or max_lifetime, send keepalives, and give
        back the places taken away after a connection-limit refusal. Runs in the nursery."""
        config = self.config
        periods = [config.max_idle, config.max_lifetime / 10, LIMIT_RECHECK]
        if config.keepalive is not None:
            periods.append(config.keepalive)
        tick = min(MAINTENANCE_TICK_MAX, max(MAINTENANCE_TICK_MIN, min(periods) / 4))
        while True:
            await trio.sleep(tick)
            self._maintain()

    def _maintain(self) -> None:
        config = self.config
        now = trio.current_time()
        idle = self._take_all_idle()
        keep: list[PooledClient] = []
        retired = 0
        for slot in idle:
            self._mark_if_stale(slot)
            if slot.broken is not None:
                self._drop(slot, discarded=True)
            elif now >= slot.expires_at or (
                now - slot.last_used >= config.max_idle
                and self._size_limiter.borrowed_tokens - retired > config.min_size
            ):
                self._retire(slot)
                retired += 1
            elif config.keepalive is not None and now - slot.last_used >= config.keepalive:
                self._move(slot, "in_use")
                self._nursery.start_soon(self._keepalive, slot)
            else:
                keep.append(slot)
        self._put_back(keep)
        limiter = self._size_limiter
        if (
            self._limit_lowered_at is not None
            and now - self._limit_lowered_at >= LIMIT_RECHECK
            and limiter.total_tokens < config.max_size
        ):
            # Try one more connection than the server last allowed.
            limiter.total_tokens += 1
            self._limit_lowered_at = now if limiter.total_tokens < config.max_size else None
        self._publish()
        self._want_connections()

    # -- opening -------------------------------------------------------------------------------

    def _demand(self) -> int:
        """How many more connections are needed: for waiting tasks beyond the idle and the
        opening ones, or to reach min_size."""
        return max(
            len(self._waiters) - self._idle - self._opening,
            self.config.min_size - self._size_limiter.borrowed_tokens,
        )

    def _want_connections(self) -> None:
        """Start opening connections if tasks wait or min_size is not met. Synchronous."""
        if self._closed:
            self._publish()
            return
        wanted = self._demand()
        probe = self._probe
        if probe is not None and probe.reached and not probe.settled.is_set():
            pass  # the others connect now and log in after the probe (see _connect)
        elif self._failures or not self._ever_opened:
            # Until the server has shown that it accepts us, and while opens fail, one
            # attempt at a time: a wrong password or port costs one try, not max_size.
            wanted = min(wanted, 1 - self._opening)
            if wanted > 0:
                probe = self._probe = _Probe()
        else:
            probe = None
        for _ in range(wanted):
            slot = PooledClient()
            try:
                self._size_limiter.acquire_on_behalf_of_nowait(slot)
            except trio.WouldBlock:
                break
            self._move(slot, "opening")
            self._nursery.start_soon(self._open, slot, probe)
        self._publish()

    async def _open(self, slot: PooledClient, probe: _Probe | None) -> None:
        """Open one connection into the idle channel, retrying while it is still wanted.

        Runs in the pool's nursery, holding one token of the size limiter (on behalf of
        *slot*) from :meth:`_want_connections` until the connection is delivered or given up.
        *probe* is this opener's own probe or the one it follows, or None.
        """
        config = self.config
        pending: PooledClient | None = slot
        try:
            while pending is not None:
                await trio.sleep(max(0.0, self._next_attempt_at - trio.current_time()))
                if self._connection_limiter is not None and not pending.global_token:
                    # Wait (first come, first served across the pools sharing it) for a place
                    # under the global cap; meanwhile it is queued, not opening.
                    self._queued += 1
                    self._publish()
                    try:
                        await self._connection_limiter.acquire_on_behalf_of(pending)
                    finally:
                        self._queued -= 1
                    pending.global_token = True
                if self._demand() < 0:
                    return  # nobody needs it any more
                try:
                    # Wait for a place in the budget (False: nobody needs it any more;
                    # a place taken is given back by _forget in the finally below).
                    if self._budget is not None and not await self._budget.acquire(pending):
                        return
                    await self._connect(pending, probe)
                except _ProbeFailed:
                    return  # the probe reports; this one never tried to log in
                except (Exception, trio.TooSlowError) as exc:
                    error = self._open_failed(exc)
                    permanent = is_permanent_open_error(error)
                    if permanent or not self._ever_opened:
                        self._fail_waiters(error)
                    if isinstance(error, ConnectionLimitError) and self._lower_size():
                        return  # the connections we have are what the server allows
                    if suggests_server_gone(exc):
                        self._invalidate(f"opening failed ({type(exc).__name__})")
                    if permanent or self._opening > 1 or self._demand() < 0:
                        return  # while opens fail, only the last opener keeps probing
                    # Try again with a fresh slot; the failed one may hold a half-made client.
                    fresh = PooledClient()
                    self._forget(pending)
                    pending = None
                    try:
                        self._size_limiter.acquire_on_behalf_of_nowait(fresh)
                    except trio.WouldBlock:
                        return
                    self._move(fresh, "opening")
                    pending = fresh
                    probe = self._probe = _Probe()  # still the only one trying
                    continue
                self._opened += 1
                pending.number = next(self._numbers)
                now = trio.current_time()
                pending.created_at = pending.last_used = now
                pending.expires_at = now + config.max_lifetime * random.uniform(0.9, 1.0)
                self._ever_opened = True
                self._failures = 0
                self._last_open_error = None
                self._next_attempt_at = -math.inf
                logger.debug("%s: opened #%d", config.name, pending.number)
                opened, pending = pending, None
                self._return(opened)
        finally:
            if pending is not None:
                self._forget(pending)
            self._want_connections()

    async def _connect(self, slot: PooledClient, probe: _Probe | None) -> None:
        """One attempt to open *slot*'s connection, bounded by the connect and login timeouts.

        As the probe (see :class:`_Probe`), it says when it has reached the server and when its
        login has ended; as a follower, it connects, then waits for its probe's login and logs
        in only if that succeeded (else raises :class:`_ProbeFailed`). With an OAuth2 token
        provider, a token the server rejects is asked for again once, with ``refresh=True``,
        before the failure counts.
        """
        config = self.config
        leading = probe is not None and probe is self._probe and not probe.reached
        try:
            await self._connect_phase(slot)
            if leading:
                assert probe is not None
                probe.reached = True
                self._want_connections()
            elif probe is not None:
                await probe.settled.wait()
                if not probe.logged_in:
                    raise _ProbeFailed
            token = None if config.oauth2_token is None else await self._token(refresh=False)
            try:
                await self._login_phase(slot, token)
            except LoginError as exc:
                if token is None or classify_open_error(exc) is not AuthenticationError:
                    raise
                logger.info("%s: the server rejected the token; refreshing it", config.name)
                token = await self._token(refresh=True)
                await self._connect_phase(slot)
                await self._login_phase(slot, token)
            if leading:
                assert probe is not None
                probe.logged_in = True
        finally:
            if leading:
                assert probe is not None
                probe.settled.set()
                if self._probe is probe:
                    self._probe = None

    async def _connect_phase(self, slot: PooledClient) -> None:
        with trio.fail_after(self.config.connect_timeout + self.config.login_timeout):
            await slot.run(self._thread_limiter, slot.connect_blocking, self.config, grace=0.0)

    async def _login_phase(self, slot: PooledClient, token: str | None) -> None:
        bound = self.config.login_timeout
        with trio.fail_after(bound):
            await slot.run(self._thread_limiter, slot.login_blocking, self.config, token, grace=0.0)

    async def _token(self, *, refresh: bool) -> str:
        """Ask the configured provider for an access token (sync ones run in a thread)."""
        provider = self.config.oauth2_token
        assert provider is not None
        try:
            if inspect.iscoroutinefunction(provider):
                result = await provider(refresh)
            else:
                result = await trio.to_thread.run_sync(provider, refresh, abandon_on_cancel=True)
                if inspect.isawaitable(result):
                    result = await result
        except Exception as exc:
            raise ConnectError(
                f"{self.config.name}: the oauth2_token provider failed: {type(exc).__name__}"
            ) from exc
        if not isinstance(result, str) or not result:
            raise ConnectError(f"{self.config.name}: the oauth2_token provider gave no token")
        return result

    def _open_failed(self, exc: BaseException) -> ConnectError:
        self._open_failures += 1
        self._failures += 1
        if isinstance(exc, trio.TooSlowError):
            kind: type[ConnectError] = ConnectError
        else:
            # With connections of ours open, a bare NO to LOGIN or a connection closed before
            # the greeting is the server refusing one more, not wrong credentials or an outage.
            kind = classify_open_error(
                exc, others_open=self._idle + self._in_use > 0, others_healthy=self._healthy()
            )
        if kind is ConnectionLimitError:
            delay = LIMIT_BACKOFF * 2 ** min(self._failures - 1, 3)
        else:
            delay = min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** (self._failures - 1))
        self._next_attempt_at = trio.current_time() + delay * random.uniform(0.5, 1.0)
        if isinstance(exc, trio.TooSlowError):
            text = "timed out opening a connection"
        else:
            text = f"could not open a connection: {type(exc).__name__}: {exc}"
        error = kind(f"{self.config.name}: {text}")
        error.__cause__ = exc
        self._last_open_error = error
        logger.warning("%s", error)
        return error

    def _healthy(self) -> bool:
        """Whether the pool has connections and none of the idle ones shows a closed socket
        (a synchronous look, no round trip)."""
        idle = self._take_all_idle()
        try:
            return len(idle) + self._in_use > 0 and not any(s.server_spoke() for s in idle)
        finally:
            self._put_back(idle)

    def _lower_size(self) -> bool:
        """After a login refused for too many connections: make the connections we have the
        pool's effective size, if we have any. Returns whether it did."""
        others = self._idle + self._in_use  # the connections that exist, none being opened
        if others < 1:
            return False
        if others < self._size_limiter.total_tokens:
            logger.warning(
                "%s: the server allows no more connections: using %d of max_size %d",
                self.config.name,
                others,
                self.config.max_size,
            )
            self._size_limiter.total_tokens = others
        self._limit_lowered_at = trio.current_time()
        return True

    def _fail_waiters(self, error: BaseException) -> None:
        """Wake every waiting task with (a copy of) *error*; they stop counting as waiting."""
        for waiter in self._waiters:
            copy = type(error)(*error.args)
            copy.__cause__ = error.__cause__
            waiter.error = copy
            waiter.scope.cancel()
        self._waiters.clear()
        self._publish()

    # -- closing -------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` has been called (or the ``open_pool`` block has ended)."""
        return self._closed

    async def aclose(self) -> None:
        """Close the pool. Idempotent.

        Waiting tasks get :class:`~trio_imappool.PoolClosedError`; idle connections are logged
        out (for at most ``logout_timeout``, then dropped); connections still checked out are
        closed when they come back; connections being opened are abandoned and closed. Later
        checkouts raise :class:`~trio_imappool.PoolClosedError`.

        **Cancellation**: the closing is shielded and bounded by ``logout_timeout`` plus a
        second, so it completes even when called from a cancelled scope; it is a checkpoint.
        """
        await trio.lowlevel.checkpoint()
        if self._closed:
            return
        self._closed = True
        self._fail_waiters(PoolClosedError(f"{self.config.name}: the pool was closed"))
        idle = self._take_all_idle()
        for slot in idle:
            self._move(slot, "in_use")  # busy with the LOGOUT
        with trio.move_on_after(self.config.logout_timeout, shield=True):
            async with trio.open_nursery() as nursery:
                for slot in idle:
                    nursery.start_soon(self._logout, slot)
        self._publish()

    async def _logout(self, slot: PooledClient) -> None:
        """LOGOUT (bounded by ``logout_timeout``), then close. Never raises but Cancelled."""
        if self._budget is not None:  # keep watching the socket that LOGOUT closes
            self._budget.watch(slot)
        try:
            await self._housekeeping(slot, TrackingClient.logout, self.config.logout_timeout)
        finally:
            self._drop(slot, discarded=False)

    async def _wait_for_orphans(self) -> None:
        """Wait (bounded by the open timeouts) for abandoned worker threads to end."""
        bound = self.config.connect_timeout + self.config.login_timeout
        with trio.move_on_after(bound, shield=True):
            for slot in self._orphans:
                await slot.wait_thread_done()
        self._orphans = [slot for slot in self._orphans if slot.thread_running]


def _unselect(client: TrackingClient) -> None:
    if client.has_capability("UNSELECT"):
        client.unselect_folder()
    else:
        # Without UNSELECT: a failed SELECT leaves no folder selected, and unlike CLOSE it
        # expunges nothing.
        with contextlib.suppress(IMAPClient.Error):
            client.select_folder("trio-imappool-no-such-folder-\x7f", readonly=True)


class _Checkout:
    """The async context manager returned by :meth:`Pool.connection`."""

    __slots__ = ("_conn", "_entered", "_pool", "_slot", "_timeout", "_want")

    def __init__(self, pool: Pool, timeout: float | None, want: tuple[str, bool] | None) -> None:
        self._pool = pool
        self._timeout = timeout
        self._want = want
        self._entered = False
        self._slot: PooledClient | None = None
        self._conn: Connection | None = None

    async def __aenter__(self) -> Connection:
        # Marked before the first await: a second task entering the same object meanwhile
        # would otherwise get a connection whose exit this object cannot record.
        if self._entered:
            await trio.lowlevel.checkpoint()
            raise RuntimeError("this pool.connection() context manager is already in use")
        self._entered = True
        try:
            slot = await self._pool._acquire(self._timeout, self._want)
        except BaseException:
            self._entered = False
            raise
        self._slot = slot
        self._conn = Connection(self._pool, slot)
        return self._conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        slot, conn = self._slot, self._conn
        assert slot is not None and conn is not None
        self._slot = self._conn = None
        self._entered = False
        conn._slot = None
        if slot.busy:
            # Another task (sharing this checkout) is still running a command on it: the
            # connection comes back when that command ends (see Connection.run_sync).
            slot.release_when_done = True
        else:
            self._pool._release(slot)


@asynccontextmanager
async def open_pool(
    host: str,
    port: int | None = None,
    **options: Unpack[PoolOptions],
) -> AsyncIterator[Pool]:
    """Open a pool of IMAP connections to one account, for the duration of a block.

    ::

        async with trio_imappool.open_pool(
            "imap.example.org", username="u", password="p", max_size=8
        ) as pool:
            async with pool.connection() as conn:
                await conn.select_folder("INBOX")
                uids = await conn.search(["UNSEEN"])

    The pool's background work (opening connections, resets) runs in a nursery of its own that
    lives as long as the block. Nothing is opened before it is needed unless ``min_size`` asks.

    Args:
        host: The server's host name or address.
        port: The server's port; 993 with implicit TLS (the default), else 143.
        **options: The fields of :class:`PoolConfig` (typed as :class:`PoolOptions`):
            ``username`` and ``password`` or ``oauth2_token`` (required), ``ssl``,
            ``starttls``, ``ssl_context``, ``min_size``, ``max_size``, ``acquire_timeout``,
            ``connect_timeout``, ``login_timeout``, ``read_timeout``, ``logout_timeout``,
            ``reset_on_release``, ``name``, ...; and ``thread_limiter``, a
            :class:`trio.CapacityLimiter` for the worker threads (default: one of the pool's own
            with ``max_size`` tokens); and ``connection_limiter``, a :class:`trio.CapacityLimiter`
            shared with other pools as a global cap on their connections; and ``budget``, a
            :class:`~trio_imappool.RedisBudget` shared with other processes and hosts.

    Raises:
        ConfigurationError: An argument is invalid, unknown or missing (raised before anything
            is opened; a type checker reports the same mistakes).

    Leaving the block closes the pool (see :meth:`Pool.aclose`) and then waits, bounded by the
    connect and login timeouts, for worker threads that were abandoned to finish. An exception
    raised in the block comes out of it unchanged, never wrapped in an exception group; the
    pool's background tasks do not raise.

    **Cancellation**: leaving the block on a cancellation still closes the pool (shielded,
    bounded by ``logout_timeout``).
    """
    thread_limiter = options.pop("thread_limiter", None)
    connection_limiter = options.pop("connection_limiter", None)
    budget = options.pop("budget", None)
    if budget is not None and not isinstance(budget, RedisBudget):
        raise ConfigurationError("budget must be a trio_imappool.RedisBudget")
    for key, value in (
        ("thread_limiter", thread_limiter),
        ("connection_limiter", connection_limiter),
    ):
        if value is not None and not isinstance(value, trio.CapacityLimiter):
            raise ConfigurationError(f"{key} must be a trio.CapacityLimiter")
    config = PoolConfig.build(host, port, **cast(ConfigOptions, options))
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            pool = Pool(
                config,
                nursery,
                thread_limiter=thread_limiter,
                connection_limiter=connection_limiter,
                budget=budget,
            )
            pool._want_connections()
            nursery.start_soon(pool._maintain_forever)
            try:
                yield pool
            except BaseException as exc:
                body_error = exc
                raise
            finally:
                with trio.CancelScope(shield=True):
                    await pool.aclose()
                nursery.cancel_scope.cancel()
        with trio.CancelScope(shield=True):
            await pool._wait_for_orphans()
    except BaseExceptionGroup as group:
        with trio.CancelScope(shield=True):
            await pool._wait_for_orphans()
        if body_error is None or not holds_only(group, body_error):
            raise
    if body_error is not None:
        raise body_error
