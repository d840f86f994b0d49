"""What the pool reports about itself: a frozen snapshot and the live counts."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

if TYPE_CHECKING:
    from ._config import PoolConfig
    from ._state import PoolState

__all__ = ["AsyncCounts", "PoolCounts", "PoolStatistics", "Totals"]


class PoolCounts(NamedTuple):
    """The pool's live counts, published on every change through
    :attr:`Pool.counts <trio_imappool.Pool.counts>` (a :class:`trio_util.AsyncValue`).

    Always ``size == idle + in_use + opening``.
    """

    #: Connections that exist or are being opened (what the server sees, at most max_size).
    size: int
    #: Open connections waiting in the pool for a user.
    idle: int
    #: Connections checked out by tasks (including any being reset after release).
    in_use: int
    #: Connections being opened (connect, TLS, login), including retries after a failure.
    opening: int
    #: Tasks waiting in :meth:`~trio_imappool.Pool.connection` for a connection.
    waiting: int


@dataclasses.dataclass(frozen=True, slots=True)
class PoolStatistics:
    """A snapshot of the pool, returned by :meth:`~trio_imappool.Pool.statistics`.

    =========================  ===============================================================
    field                      meaning
    =========================  ===============================================================
    ``name``                   the pool's name (``user@host:port`` unless given)
    ``min_size``               connections kept open
    ``max_size``               upper bound on ``size``
    ``size``                   connections that exist or are being opened
    ``idle``                   open connections ready to be handed out
    ``in_use``                 connections checked out by tasks
    ``opening``                connections being opened
    ``waiting``                tasks waiting for a connection
    ``closed``                 whether the pool is closed
    ``acquires``               checkouts that got a connection
    ``acquire_waits``          of those and the failed ones, checkouts that had to wait
    ``acquire_timeouts``       checkouts that ended in :class:`~trio_imappool.PoolTimeout`
    ``connections_opened``     connections opened successfully
    ``connections_discarded``  connections dropped because they broke (errors, interruptions)
    ``connections_closed``     connections closed by the pool while healthy (pool closing,
                               ``max_idle``, ``max_lifetime``)
    ``open_failures``          failed attempts to open a connection
    ``last_open_error``        the text of the last failed open, or None after a success
    ``effective_max_size``     ``max_size``, or less after the server refused logins for too
                               many connections (raised again one by one every 30 s)
    ``noop_checks``            NOOPs sent at checkout to connections idle for long
    ``keepalives``             NOOPs sent to idle connections by the ``keepalive`` option
    ``selects``                SELECTs sent by ``pool.connection(folder)``
    ``selects_saved``          ``pool.connection(folder)`` checkouts that found the folder
                               selected already: round trips saved
    ``queued``                 openers waiting for a place under a cap shared with other pools
                               (a pool group); not counted in ``size`` or ``opening``
    =========================  ===============================================================
    """

    name: str
    min_size: int
    max_size: int
    size: int
    idle: int
    in_use: int
    opening: int
    waiting: int
    closed: bool
    acquires: int
    acquire_waits: int
    acquire_timeouts: int
    connections_opened: int
    connections_discarded: int
    connections_closed: int
    open_failures: int
    last_open_error: str | None
    effective_max_size: int
    noop_checks: int
    keepalives: int
    selects: int
    selects_saved: int
    queued: int

    def __str__(self) -> str:
        return (
            f"size={self.size}/{self.max_size} idle={self.idle} in_use={self.in_use} "
            f"opening={self.opening} waiting={self.waiting}"
        )


@dataclasses.dataclass(slots=True)
class Totals:
    """The driver's running totals (the state keeps those of its own decisions)."""

    acquires: int = 0
    acquire_waits: int = 0
    acquire_timeouts: int = 0
    noop_checks: int = 0
    keepalives: int = 0
    selects: int = 0
    selects_saved: int = 0

    def snapshot(
        self, config: PoolConfig, counts: PoolCounts, state: PoolState[Any], queued: int
    ) -> PoolStatistics:
        """The :class:`PoolStatistics` of a pool with these totals, counts and state."""
        last = state.last_error
        return PoolStatistics(
            name=config.name,
            min_size=config.min_size,
            max_size=config.max_size,
            size=counts.size,
            idle=counts.idle,
            in_use=counts.in_use,
            opening=counts.opening,
            waiting=counts.waiting,
            closed=state.closed,
            acquires=self.acquires,
            acquire_waits=self.acquire_waits,
            acquire_timeouts=self.acquire_timeouts,
            connections_opened=state.opened_count,
            connections_discarded=state.discarded_count,
            connections_closed=state.closed_count,
            open_failures=state.failed_count,
            last_open_error=str(last) if last else None,
            effective_max_size=state.limit,
            noop_checks=self.noop_checks,
            keepalives=self.keepalives,
            selects=self.selects,
            selects_saved=self.selects_saved,
            queued=queued,
        )


class AsyncCounts(Protocol):
    """The type of :attr:`Pool.counts <trio_imappool.Pool.counts>`: a
    :class:`trio_util.AsyncValue` of :class:`PoolCounts` (trio-util has no type information, so
    this declares the part of it that is for users).

    ::

        await pool.counts.wait_value(lambda c: c.idle > 0)  # an idle connection exists
        async for counts in pool.counts.eventual_values():  # each change, as it happens
            print(counts.in_use, counts.waiting)
    """

    #: The current counts (set by the pool only).
    value: PoolCounts

    async def wait_value(
        self,
        value_or_predicate: PoolCounts | Callable[[PoolCounts], bool],
        *,
        held_for: float = 0.0,
    ) -> PoolCounts:
        """Wait until the counts are equal to a value or satisfy a predicate; return them.

        **Cancellation**: a checkpoint; cancelling only stops the wait.
        """
        ...

    async def wait_transition(
        self,
        value_or_predicate: PoolCounts | Callable[[PoolCounts, PoolCounts], bool] = ...,
    ) -> tuple[PoolCounts, PoolCounts]:
        """Wait for the next change (that matches); return ``(new, old)``.

        **Cancellation**: a checkpoint; cancelling only stops the wait.
        """
        ...

    def eventual_values(
        self,
        value_or_predicate: PoolCounts | Callable[[PoolCounts], bool] = ...,
        held_for: float = 0.0,
    ) -> AsyncIterator[PoolCounts]:
        """Iterate over the counts that match, the current one first if it does (values that
        change faster than the loop body runs are skipped)."""
        ...

    def transitions(
        self,
        value_or_predicate: PoolCounts | Callable[[PoolCounts, PoolCounts], bool] = ...,
    ) -> AsyncIterator[tuple[PoolCounts, PoolCounts]]:
        """Iterate over the changes (that match), as ``(new, old)``."""
        ...
