"""The pool group's fairness: idle connections of quiet accounts give their places to busy ones.

Every pool of a group opens its connections under one :class:`trio.CapacityLimiter` of
``max_connections`` places. When the cap is reached, a pool that needs one more connection
waits for a place while other accounts may keep idle connections they do not use.
:class:`Rebalancer` watches the accounts whose tasks wait for connections and, while openers
wait for a place, closes idle connections of other accounts, one for each place wanted, the
account used longest ago first. Connections in use are never taken away.

It uses only the pools' small public surface (:class:`~trio_imappool._surface.PoolSurface`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final, Generic

import trio

from ._group_account import Account, P

if TYPE_CHECKING:
    from ._surface import PoolSurface

__all__ = ["REBALANCE_POLL", "Rebalancer"]

logger = logging.getLogger("trio_imappool")

# While tasks of the group wait for connections, how often the group looks whether some of them
# wait for a place under the global cap that an idle connection of another account could free.
REBALANCE_POLL: Final = 0.005


class Rebalancer(Generic[P]):
    """Frees places under a group's global cap for the accounts whose tasks wait.

    Args:
        limiter: The group's global cap.
        accounts: The group's current account -> :class:`Account` (the same dict object for the
            group's whole life; read, never changed here).
    """

    def __init__(self, limiter: trio.CapacityLimiter, accounts: Mapping[str, Account[P]]) -> None:
        self._limiter = limiter
        self._accounts = accounts
        # Accounts whose pools have tasks waiting for a connection.
        self._demanding: set[Account[P]] = set()
        # Accounts with idle connections being closed for others: the pool's
        # connections_closed count at which they are all closed.
        self._freeing: dict[Account[P], int] = {}
        self._wake = trio.Event()
        self.closed = False
        #: Idle connections closed to give their place to another account.
        self.freed = 0

    def forget(self, entry: Account[P]) -> None:
        """*entry*'s pool is closed (or was never opened). Synchronous, idempotent."""
        self._demanding.discard(entry)
        self._freeing.pop(entry, None)

    async def watch_demand(self, entry: Account[P], pool: PoolSurface) -> None:
        """Keep *entry* in the set of accounts whose tasks wait for connections."""
        try:
            while True:
                await pool.counts.wait_value(lambda counts: counts.waiting > 0)
                self._demanding.add(entry)
                self._wake.set()
                await pool.counts.wait_value(lambda counts: counts.waiting == 0)
                self._demanding.discard(entry)
        finally:
            self._demanding.discard(entry)

    async def run_forever(self) -> None:
        """While tasks wait for connections, free places under the global cap for them.

        Woken when an account's tasks start waiting (see :meth:`watch_demand`); it then looks
        every few milliseconds, as long as some account has waiting tasks, because an opener
        joins the global limiter's queue a moment after its pool's tasks start waiting. A look
        costs next to nothing while the global cap is not reached.
        """
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._demanding:
                self.rebalance()
                await trio.sleep(REBALANCE_POLL)

    def rebalance(self) -> None:
        """Close idle connections of other accounts, one for each opener waiting for a place
        (less those already being closed), the longest-unused account first. Synchronous."""
        limiter = self._limiter
        if self.closed or limiter.available_tokens > 0:
            return
        places_wanted = limiter.statistics().tasks_waiting
        if not places_wanted:
            return
        waiting = sum(_counts_waiting(entry) for entry in self._demanding)
        need = min(places_wanted, waiting) - self._being_freed()
        if need <= 0:
            return
        victims = [
            entry
            for entry in self._accounts.values()
            if entry.pool is not None
            and not entry.pool.closed
            and entry.pool.counts.value.idle > 0
            and entry.pool.counts.value.waiting == 0
        ]
        victims.sort(key=lambda entry: entry.last_used)
        for entry in victims:
            if need <= 0:
                break
            pool = entry.pool
            assert pool is not None
            closed = pool.close_idle(need)
            if closed:
                base = max(self._freeing.get(entry, 0), pool.statistics().connections_closed)
                self._freeing[entry] = base + closed
                self.freed += closed
                need -= closed
                logger.debug(
                    "pool group: closing %d idle connection(s) of %r for other accounts",
                    closed,
                    entry.name,
                )

    def _being_freed(self) -> int:
        """Idle connections closed for others whose places have not come back yet."""
        total = 0
        for entry, target in list(self._freeing.items()):
            pool = entry.pool
            left = (
                0 if pool is None or pool.closed else target - pool.statistics().connections_closed
            )
            if left > 0:
                total += left
            else:
                del self._freeing[entry]
        return total


def _counts_waiting(entry: Account[P]) -> int:
    return 0 if entry.pool is None else entry.pool.counts.value.waiting
