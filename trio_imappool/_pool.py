"""The pool's driver: it carries out what the pool's state decides.

Every decision (which connection a task gets, what to open, retire or check, backoff, limits)
is :class:`~trio_imappool._state.PoolState`'s: the driver tells it what happened, with the time,
and carries out the actions it returns (:meth:`Pool._apply`): it is the only place that spawns
tasks or closes connections. Its two halves that await live beside it: the checkout
(``_checkout``) and the opener tasks (``_opening``).
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Final, TypeVar, TypeVarTuple, Unpack, cast

import trio
from imapclient import IMAPClient
from trio_util import AsyncValue

from . import _fanout
from . import _idle as _watching
from ._budget import PoolPlaces, RedisBudget
from ._checkout import Checkout, Checkouts, wake
from ._client import PooledClient, TrackingClient
from ._config import ConfigOptions, PoolConfig, PoolOptions, check_wire_text
from ._errors import ConfigurationError, PoolClosedError
from ._imap import logout_unanswered
from ._nursery import open_nursery_unwrapped
from ._opening import Openers, housekeeping, unselect, warn_insecure
from ._state import Action, Close, Housekeep, Logout, Open, PoolState, Sizing, Wake
from ._stats import AsyncCounts, PoolCounts, PoolStatistics, Totals

__all__ = ["Pool", "open_pool"]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

MAINTENANCE_TICK_MIN: Final = 0.05
MAINTENANCE_TICK_MAX: Final = 30.0


def _alive(slot: PooledClient) -> bool:
    return not slot.server_spoke()


def _judge(slot: PooledClient, reset_on_release: bool) -> bool:
    """Judge a connection given back: broken if its user left it logged out or in IDLE;
    whether it needs a reset (it has a folder selected and the pool unselects on release)."""
    client = slot.client
    assert client is not None
    assert (not slot.busy and not slot.thread_running) or slot.broken is not None, slot
    if slot.broken is None:
        if client.logged_out:
            slot.broken = "logged out by its user"
        elif client.idling:
            slot.broken = "left in IDLE by its user"
    return reset_on_release and client.selected is not None


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
        warn_insecure(config)
        self._nursery = nursery
        # A shared cap (pool group): held per connection from its opener to its close.
        self._connection_limiter = connection_limiter
        # Mirrors the state's places, a token on behalf of each connection: what the server
        # sees, checkable from outside.
        self._size_limiter = trio.CapacityLimiter(config.max_size)
        self._thread_limiter = thread_limiter or trio.CapacityLimiter(config.max_size)
        sizing = Sizing(
            config.name,
            config.min_size,
            config.max_size,
            config.max_idle,
            config.max_lifetime,
            config.keepalive,
            config.noop_check_after,
        )
        reset = config.reset_on_release
        self._state = PoolState(
            sizing, PooledClient, _alive, lambda slot: _judge(slot, reset), random.Random()
        )
        self._orphans: list[PooledClient] = []
        self._totals = Totals()
        self._queued_budget = 0  # openers waiting for a place in the budget (PoolPlaces)
        # Shared with other processes and hosts through Redis: a place per connection.
        places = None if budget is None else PoolPlaces(budget, self, nursery)
        self._budget = places
        self._openers = Openers(
            config, self._state, self._apply, self._thread_limiter, connection_limiter, places
        )
        self._checkouts = Checkouts(
            config, self._state, self._apply, self._thread_limiter, self._totals, self.statistics
        )
        #: The live counts, updated on every change: ``await pool.counts.wait_value(lambda c:
        #: c.idle > 0)`` waits for an idle connection without polling.
        self.counts: Final[AsyncCounts] = AsyncValue(PoolCounts(0, 0, 0, 0, 0))

    # -- carrying out the state's decisions -----------------------------------------------------

    def _apply(self, actions: Sequence[Action[PooledClient]]) -> None:
        """Carry out *actions*, closes first (they give places back), and publish the counts."""
        if not actions:  # the common case: a checkout or a release that needs nothing else
            self._publish()
            return
        limiter = self._size_limiter
        for action in actions:
            if isinstance(action, Close):
                self._forget(action.conn)
        if limiter.total_tokens != self._state.limit:
            limiter.total_tokens = self._state.limit
        for action in actions:
            if isinstance(action, Open):
                limiter.acquire_on_behalf_of_nowait(action.conn)
                self._nursery.start_soon(self._openers.open, action.conn, action.probe)
            elif isinstance(action, Wake):
                wake(action.waiter)
            elif isinstance(action, Logout):
                self._nursery.start_soon(self._logout, action.conn)
            elif isinstance(action, Housekeep):
                self._nursery.start_soon(self._housekeep, action.conn, action.what)
        self._publish()

    def _forget(self, slot: PooledClient) -> None:
        """Close *slot* and give its place in the size limiter (and any global one) back."""
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

    def _publish(self) -> None:
        state = self._state
        idle, in_use, opening = len(state.idle), len(state.in_use), len(state.opening)
        opening -= self._openers.queued + self._queued_budget  # not connections yet
        self.counts.value = PoolCounts(
            idle + in_use + opening, idle, in_use, opening, len(state.waiters)
        )

    async def _housekeep(self, slot: PooledClient, what: str) -> None:
        """The background work the state asked for on *slot* (a reset or a keepalive NOOP),
        then its release."""
        config, limiter = self.config, self._thread_limiter
        try:
            if what == "reset":
                await housekeeping(slot, unselect, config.read_timeout, limiter, config.name)
            else:
                self._totals.keepalives += 1
                noop = TrackingClient.noop
                await housekeeping(slot, noop, config.connect_timeout, limiter, config.name)
        finally:
            if what == "reset" and slot.client is not None and slot.client.selected is not None:
                slot.broken = slot.broken or "could not be reset"
            self._checkouts.release(slot)

    async def _logout(self, slot: PooledClient) -> None:
        """LOGOUT (bounded by ``logout_timeout``; its answer not awaited unless
        ``wait_for_logout``), then close. Never raises but Cancelled."""
        if self._budget is not None:  # keep watching the socket that LOGOUT closes
            self._budget.watch(slot)
        config = self.config
        try:
            logout = TrackingClient.logout if config.wait_for_logout else logout_unanswered
            await housekeeping(
                slot, logout, config.logout_timeout, self._thread_limiter, config.name
            )
        finally:
            self._apply(self._state.logged_out(slot, trio.current_time()))

    # -- reporting -----------------------------------------------------------------------------

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Pool {self.config.name} {state} {self.statistics()}>"

    def statistics(self) -> PoolStatistics:
        """A snapshot of the pool's counts and counters (see :class:`PoolStatistics`)."""
        return self._totals.snapshot(self.config, self.counts.value, self._state, self._queued)

    # -- checkout ------------------------------------------------------------------------------

    def connection(
        self, folder: str | None = None, *, readonly: bool = False, timeout: float | None = None
    ) -> Checkout:
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
        return Checkout(self._checkouts, timeout, None if folder is None else (folder, readonly))

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

    # -- the pool's own upkeep -----------------------------------------------------------------

    def drain(self) -> None:
        """Close every idle connection now, and every checked-out one when it comes back.

        For when you know the server restarted or the network changed (after a resume from
        sleep, say): the next checkouts get fresh connections instead of finding the stale ones
        one by one. The pool does the same by itself when a command or an open fails in a way
        that suggests the server went away (EOF, BYE, connection reset or refused).
        Synchronous: closes sockets without LOGOUT, never blocks.
        """
        self._apply(self._state.invalidate(trio.current_time(), "drain() was called"))

    def close_idle(self, count: int = 1) -> int:
        """Close up to *count* idle connections (the longest unused first) with LOGOUT, in the
        background, regardless of ``min_size``. Returns how many it took.

        For giving places back, e.g. to other pools under a shared cap (a pool group does).
        Synchronous: never blocks.
        """
        taken, actions = self._state.close_idle(count, trio.current_time())
        self._apply(actions)
        return taken

    async def _maintain_forever(self) -> None:
        """Close idle connections past max_idle or max_lifetime, send keepalives, and give
        back the places taken away after a connection-limit refusal. Runs in the nursery."""
        config = self.config
        periods = [config.max_idle, config.max_lifetime / 10, 30.0]
        if config.keepalive is not None:
            periods.append(config.keepalive)
        tick = min(MAINTENANCE_TICK_MAX, max(MAINTENANCE_TICK_MIN, min(periods) / 4))
        while True:
            await trio.sleep(tick)
            self._maintain()

    def _maintain(self) -> None:
        self._apply(self._state.maintain(trio.current_time()))

    # -- closing -------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` has been called (or the ``open_pool`` block has ended)."""
        return self._state.closed

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
        if self.closed:
            return
        actions = self._state.close(PoolClosedError(f"{self.config.name}: the pool was closed"))
        self._apply([a for a in actions if not isinstance(a, Logout)])
        with trio.move_on_after(self.config.logout_timeout, shield=True):
            async with trio.open_nursery() as nursery:
                for action in actions:
                    if isinstance(action, Logout):
                        nursery.start_soon(self._logout, action.conn)
        self._publish()

    async def _wait_for_orphans(self) -> None:
        """Wait (bounded by the open timeouts) for abandoned worker threads to end."""
        bound = self.config.connect_timeout + self.config.login_timeout
        with trio.move_on_after(bound, shield=True):
            for slot in self._orphans:
                await slot.wait_thread_done()
        self._orphans = [slot for slot in self._orphans if slot.thread_running]

    # -- what PoolPlaces (the Redis budget) uses: BudgetedPool in _budget_places.py -----------

    @property
    def _queued(self) -> int:
        """Openers waiting for a place under a shared cap or budget: not connections."""
        return self._openers.queued + self._queued_budget

    def _budget_wait(self, change: int) -> None:
        """An opener starts (+1) or stops (-1) waiting for a place in the budget."""
        self._queued_budget += change
        self._publish()

    def _demand(self) -> int:
        """Connections wanted beyond those open and opening (negative: more than wanted)."""
        return self._state.demand()

    def _close_broken_idle(self) -> None:
        """Close now, without LOGOUT, the idle connections marked broken."""
        self._apply(
            self._state.drop_idle(trio.current_time(), lambda conn: conn.broken is not None)
        )


def _is_broken(conn: PooledClient) -> bool:
    return conn.broken is not None


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
    pool: Pool | None = None
    try:
        async with open_nursery_unwrapped() as nursery:
            pool = Pool(
                config,
                nursery,
                thread_limiter=thread_limiter,
                connection_limiter=connection_limiter,
                budget=budget,
            )
            pool._maintain()  # opens min_size connections
            nursery.start_soon(pool._maintain_forever)
            try:
                yield pool
            finally:
                with trio.CancelScope(shield=True):
                    await pool.aclose()
                nursery.cancel_scope.cancel()
    finally:
        if pool is not None:
            with trio.CancelScope(shield=True):
                await pool._wait_for_orphans()
