"""The connection budget's pool side: the places one pool holds, renewed and given back.

:class:`PoolPlaces` is the pool's helper: the pool asks it for a place before opening a
connection and hands the place back when it forgets the connection (once the server has closed
its end: see :mod:`trio_imappool._budget`). Two background tasks in the pool's nursery renew
the leases and, while openers elsewhere wait, hand places over.

It works on the pool through :class:`BudgetedPool`, the members of the driver it needs, so that
this module does not import the pool's.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import TYPE_CHECKING, Final, Protocol

import trio

from ._budget_redis import RedisBudget
from ._budget_scripts import GIVE_UP_AFTER, RENEW_RETRY, SERVER_CLOSE_WAIT, SHARE_EVERY
from ._errors import BudgetUnavailableError
from ._imap import socket_of

if TYPE_CHECKING:
    from ._client import PooledClient
    from ._config import PoolConfig
    from ._stats import AsyncCounts

__all__ = ["BudgetedPool", "PoolPlaces"]

logger = logging.getLogger("trio_imappool")


class BudgetedPool(Protocol):
    """What :class:`PoolPlaces` uses of its pool (:class:`~trio_imappool.Pool` has it): its
    settings and counts, the openers queued for a place, the demand for more connections, and
    a way to close idle connections."""

    @property
    def config(self) -> PoolConfig: ...

    @property
    def closed(self) -> bool: ...

    @property
    def counts(self) -> AsyncCounts: ...

    @property
    def _queued(self) -> int: ...

    def _budget_wait(self, change: int) -> None: ...

    def _demand(self) -> int: ...

    def close_idle(self, count: int = 1) -> int: ...

    def _close_broken_idle(self) -> None: ...


def _watch_socket(slot: PooledClient) -> socket.socket | None:
    """A second descriptor of *slot*'s socket, to see the server close its end after ours."""
    client = slot.client
    if client is None or not hasattr(socket, "TCP_INFO"):
        return None
    try:
        fd = socket_of(client).fileno()
        if fd < 0:
            return None
        return socket.socket(fileno=os.dup(fd))
    except (AttributeError, OSError):
        return None


_TCP_GONE: Final = (6, 7)  # TIME_WAIT, CLOSE: both ends have sent their FIN


async def _wait_server_closed(watch: socket.socket) -> None:
    """Wait until the connection's TCP state says that the server has closed its end."""
    wait = 0.001
    while True:
        try:
            state = watch.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
        except OSError:
            return
        if state in _TCP_GONE:
            return
        await trio.sleep(wait)
        wait = min(wait * 2, 0.02)


class PoolPlaces:
    """The places one pool holds in a :class:`RedisBudget`, and their renewal.

    The pool calls :meth:`acquire` before it opens a connection and :meth:`give_back` (just
    before closing the socket) when it forgets one; both are keyed by the pool's slot.
    """

    def __init__(self, budget: RedisBudget, pool: BudgetedPool, nursery: trio.Nursery) -> None:
        self.budget = budget
        self.key = budget.key_for(pool.config)
        self._pool = pool
        self._nursery = nursery
        self._places: dict[PooledClient, str] = {}
        self._watches: dict[PooledClient, socket.socket] = {}
        nursery.start_soon(self._renew_forever)
        nursery.start_soon(self._share_forever)

    @property
    def held(self) -> int:
        return len(self._places)

    async def acquire(self, slot: PooledClient) -> bool:
        """Wait for a place for *slot* (counted as queued, not opening, meanwhile). Returns
        False, without a place, if the pool stopped needing the connection meanwhile."""
        if slot in self._places:
            await trio.lowlevel.checkpoint()
            return True
        place = self.budget.new_place()
        pool = self._pool
        pool._budget_wait(+1)
        unneeded_since: float | None = None

        def give_up() -> bool:
            # Not at the first moment without demand: checkouts with short deadlines come and
            # go, and an opener that left the queue would lose its turn to other processes.
            nonlocal unneeded_since
            if pool.closed:
                return True
            if pool._demand() >= 0:
                unneeded_since = None
                return False
            now = trio.current_time()
            if unneeded_since is None:
                unneeded_since = now
            return now - unneeded_since >= GIVE_UP_AFTER

        try:
            held = await self.budget.acquire(place, key=self.key, give_up=give_up)
        finally:
            pool._budget_wait(-1)
        if held:
            self._places[slot] = place
        return held

    def watch(self, slot: PooledClient) -> None:
        """Keep a second descriptor of *slot*'s socket before a LOGOUT closes it, so that
        :meth:`give_back` can still see the server close its end."""
        if slot in self._places and slot not in self._watches:
            watch = _watch_socket(slot)
            if watch is not None:
                self._watches[slot] = watch

    def give_back(self, slot: PooledClient) -> None:
        """Give *slot*'s place back in the background, once the server has closed its end.

        Call before closing the socket. Synchronous: never blocks.
        """
        place = self._places.pop(slot, None)
        watch = self._watches.pop(slot, None)
        if place is None:
            if watch is not None:
                watch.close()
            return
        watch = watch or _watch_socket(slot)
        try:
            self._nursery.start_soon(self._give_back, place, watch)
        except RuntimeError:  # the pool's nursery has ended: a task of the run's own
            trio.lowlevel.spawn_system_task(self._give_back, place, watch)

    async def _give_back(self, place: str, watch: socket.socket | None) -> None:
        # Shielded: a pool that closes still gives its places back (bounded).
        with trio.CancelScope(shield=True):
            try:
                if watch is not None:
                    # Dovecot counts a session until its process has closed the socket: a place
                    # given back at our close lets a re-login elsewhere be refused.
                    with trio.move_on_after(SERVER_CLOSE_WAIT):
                        await _wait_server_closed(watch)
            finally:
                if watch is not None:
                    watch.close()
            try:
                with trio.move_on_after(self.budget.lease):
                    await self.budget.release(place, key=self.key)
            except BudgetUnavailableError as exc:
                logger.info("%s: %s; the place ends with its lease", self._pool.config.name, exc)

    async def _renew_forever(self) -> None:
        interval = self.budget.lease / 3
        while True:
            await trio.sleep(interval)
            interval = self.budget.lease / 3
            try:
                await self._renew()
            except BudgetUnavailableError as exc:
                logger.warning("%s: renewing budget leases: %s", self._pool.config.name, exc)
                interval = min(interval, RENEW_RETRY)

    async def _renew(self) -> None:
        places = dict(self._places)
        lost = set(await self.budget.renew(list(places.values()), key=self.key))
        if lost:
            self._lose([slot for slot, place in places.items() if place in lost])

    async def _share_forever(self) -> None:
        """Every :data:`SHARE_EVERY` seconds while the pool holds places: register them again
        at once if Redis lost the budget (restarted empty), and, while openers elsewhere wait
        for a place, hand places over: close an idle connection, or retire the oldest one when
        it comes back. Idle or busy, connections must not hoard the account's budget; the
        queue then gives the places out in arrival order."""
        pool = self._pool
        while True:
            await trio.sleep(SHARE_EVERY)
            if not self._places:
                continue
            # Our own openers wait in the same queue. One that leaves it while Redis is asked
            # may be in Redis's count and no longer in ours: take the larger of our counts
            # from before and after, or our own departing opener would close a connection.
            ours = pool._queued
            try:
                _, waiting, reset = await self.budget._look(self.key)
                if reset:
                    await self._renew()
            except BudgetUnavailableError:
                continue
            others = waiting - max(ours, pool._queued)
            if others <= 0:
                continue
            idle = pool.counts.value.idle
            if idle:
                pool.close_idle(min(others, idle))
                continue
            now = trio.current_time()
            opened = [slot for slot in self._places if slot.number and slot.expires_at > now]
            if opened and len(opened) == len(self._places):
                oldest = min(opened, key=lambda slot: slot.created_at)
                if now - oldest.created_at >= SHARE_EVERY:
                    oldest.expires_at = now  # retired (LOGOUT) when it is next released

    def _lose(self, slots: list[PooledClient]) -> None:
        """Places found lost and not taken again: close their connections (idle ones now,
        checked-out ones when they come back, opening ones when they have opened)."""
        pool = self._pool
        logger.warning(
            "%s: %d places in the connection budget were lost; closing their connections",
            pool.config.name,
            len(slots),
        )
        for slot in slots:
            self._places.pop(slot, None)
            slot.broken = slot.broken or "lost its place in the connection budget"
        pool._close_broken_idle()
