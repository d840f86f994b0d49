"""The checkout: what ``async with pool.connection()`` does on the way in and on the way out.

The state (:class:`~trio_imappool._state.PoolState`) says which idle connection a task gets, or
queues it (first come, first served) and hands it the next one released or opened. This module
does the waiting, the checkout's round trips (a NOOP for a connection idle for long, the SELECT
of ``pool.connection(folder)``), all by the checkout's one deadline, and gives the connection back
at the end of the block, or when a command another task runs on it ends.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import TracebackType

import trio

from ._client import PooledClient, TrackingClient
from ._config import PoolConfig
from ._connection import Connection
from ._errors import PoolClosedError, PoolTimeout
from ._opening import housekeeping
from ._state import Action, PoolState, Waiter
from ._stats import PoolStatistics, Totals

__all__ = ["Checkout", "Checkouts"]


class _Waiter(Waiter[PooledClient]):
    __slots__ = ("event",)

    def __init__(self) -> None:
        super().__init__()
        self.event = trio.Event()


def wake(waiter: Waiter[PooledClient]) -> None:
    """Wake the task waiting as *waiter* (it has a connection or an error)."""
    assert isinstance(waiter, _Waiter)
    waiter.event.set()


class Checkouts:
    """The checkouts of one pool.

    Args:
        config: The pool's settings.
        state: The pool's decisions.
        apply: Carries out the state's actions (the driver's ``_apply``).
        thread_limiter: The pool's worker-thread limiter.
        totals: The pool's running totals (counted here: acquires, waits, checks, SELECTs).
        statistics: The pool's snapshot, for the timeout's message.
    """

    def __init__(
        self,
        config: PoolConfig,
        state: PoolState[PooledClient],
        apply: Callable[[Sequence[Action[PooledClient]]], None],
        thread_limiter: trio.CapacityLimiter,
        totals: Totals,
        statistics: Callable[[], PoolStatistics],
    ) -> None:
        self.config = config
        self.thread_limiter = thread_limiter
        self._state = state
        self._apply = apply
        self._totals = totals
        self._statistics = statistics

    async def acquire(
        self, wait_limit: float | None, want: tuple[str, bool] | None = None
    ) -> PooledClient:
        """Check a connection out: the checkout's whole work (waiting, the health check of an
        idle connection, selecting *want*) ends by one deadline."""
        await trio.lowlevel.checkpoint_if_cancelled()
        state = self._state
        timeout = self.config.acquire_timeout if wait_limit is None else wait_limit
        now = trio.current_time()
        deadline = now + timeout  # inf with an acquire_timeout of inf: now stays a number
        prefer = None if want is None else _selects(want)
        waited = again = False
        while True:
            if state.closed:
                raise PoolClosedError(f"{self.config.name}: the pool is closed")
            slot, actions = state.checkout(now, prefer)
            self._apply(actions)
            if slot is None:
                if not waited:
                    self._totals.acquire_waits += 1
                    waited = True
                # After a connection that failed its check: first in line again, not last.
                slot = await self._wait(timeout, deadline, first=again)
            else:
                try:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                except BaseException:
                    self.release(slot)
                    raise
            self._closed_check(slot)
            assert slot.client is not None
            slot.client.restore_defaults()  # what a previous user changed through run_sync
            # Idle for long: make sure it still answers before handing it out.
            now = trio.current_time()
            check = state.needs_check(slot, now)
            if (check or want is not None) and not await self._prepare(
                slot, check, want, deadline, timeout
            ):
                now = trio.current_time()
                again = True
                continue
            self._closed_check(slot)  # closed during the check or the SELECT
            self._totals.acquires += 1
            return slot

    def release(self, slot: PooledClient) -> None:
        """Take a connection back (a checkout's own, or the pool's work). Never blocks."""
        self._apply(self._state.release(slot, trio.current_time()))

    def checkout_ended(self, slot: PooledClient) -> None:
        """The block ended: the connection comes back now, or when a command that another
        task runs on it ends."""
        self._apply(self._state.checkout_ended(slot, trio.current_time()))

    def command_ended(self, slot: PooledClient) -> None:
        """A command on *slot* ended: it comes back if its checkout ended meanwhile."""
        actions = self._state.command_ended(slot, trio.current_time())
        if actions is not None:
            self._apply(actions)

    def _closed_check(self, slot: PooledClient) -> None:
        if self._state.closed:
            self.release(slot)
            raise PoolClosedError(f"{self.config.name}: the pool closed while waiting")

    async def _wait(self, limit: float, deadline: float, *, first: bool) -> PooledClient:
        """Queue for the next connection released or opened (first come, first served; with
        *first*, at the head of the line). A connection handed over as the wait is cancelled
        goes back (to the next waiter)."""
        waiter = _Waiter()
        self._apply(self._state.wait(waiter, trio.current_time(), first=first))
        try:
            with trio.move_on_at(deadline):
                await waiter.event.wait()
        except BaseException:
            self._apply(self._state.abandon(waiter, trio.current_time()))
            raise
        if waiter.conn is not None:  # handed over (perhaps as the deadline passed)
            slot, waiter.conn = waiter.conn, None
            return slot
        if waiter.error is not None:
            raise waiter.error
        seen = str(self._statistics())  # the counts as this waiter saw them
        self._apply(self._state.abandon(waiter, trio.current_time()))
        raise self.timed_out(limit, seen)

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
                    self.release(slot)
                    return False
                if want is not None:
                    await self._select(slot, want)
                return True
        except BaseException:
            self.release(slot)
            raise
        # The deadline passed during the check or the SELECT (which was interrupted).
        self.release(slot)
        raise self.timed_out(limit, str(self._statistics()))

    async def _noop_check(self, slot: PooledClient) -> bool:
        """NOOP, bounded by ``connect_timeout`` (and by the caller's scopes); whether it
        answered. A cancellation interrupts it and the connection is then broken."""
        self._totals.noop_checks += 1
        config = self.config
        noop = TrackingClient.noop
        if await housekeeping(slot, noop, config.connect_timeout, self.thread_limiter, config.name):
            return True
        slot.broken = slot.broken or "failed its NOOP check"
        return False

    async def _select(self, slot: PooledClient, want: tuple[str, bool]) -> None:
        client = slot.client
        assert client is not None
        if client.selected == want:
            self._totals.selects_saved += 1
            return
        self._totals.selects += 1
        await slot.run(self.thread_limiter, TrackingClient.select_folder, client, *want)

    def timed_out(self, timeout: float, seen: str) -> PoolTimeout:
        """The error of a checkout that reached its deadline (counted)."""
        self._totals.acquire_timeouts += 1
        last = self._state.last_error
        reason = f"; opening connections fails: {last}" if last else ""
        error = PoolTimeout(
            f"{self.config.name}: no connection within {timeout:g} s ({seen}){reason}"
        )
        error.__cause__ = last
        return error


def _selects(want: tuple[str, bool]) -> Callable[[PooledClient], bool]:
    return lambda slot: slot.client is not None and slot.client.selected == want


class Checkout:
    """The async context manager returned by :meth:`Pool.connection`."""

    __slots__ = ("_checkouts", "_conn", "_entered", "_slot", "_timeout", "_want")

    def __init__(
        self, checkouts: Checkouts, timeout: float | None, want: tuple[str, bool] | None
    ) -> None:
        self._checkouts = checkouts
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
        checkouts = self._checkouts
        try:
            slot = await checkouts.acquire(self._timeout, self._want)
        except BaseException:
            self._entered = False
            raise
        self._slot = slot
        self._conn = Connection(
            slot, checkouts.config.name, checkouts.thread_limiter, checkouts.command_ended
        )
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
        self._checkouts.checkout_ended(slot)
