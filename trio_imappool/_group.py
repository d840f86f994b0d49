"""Many accounts: one pool per account, under a per-account and a global cap.

A program that serves many mailboxes (a sync service, a help-desk tool, a mail archiver) needs
one pool per account, because connections are logged in as one user. It also needs limits: the
provider allows a few connections per account, and the process can afford only so many sockets
and threads in all. Opening every account's pool up front wastes connections on accounts nobody
uses; keeping connections of quiet accounts open starves busy ones under the global cap.

:func:`open_pool_group` is a keyed pool for that. ``group.connection(account)`` opens the
account's :class:`~trio_imappool.Pool` on first use, with the options the *credentials* callable
returns for it, and checks a connection out of it. Every pool of the group shares one
:class:`trio.CapacityLimiter` of ``max_connections`` places (a pool's opener waits for a place,
first come, first served, across all accounts) and one thread limiter. When tasks wait for a
place, the group closes idle connections of other accounts (the longest-idle account first), so
idle connections cannot keep a place another account needs. An account with no checkout for
``account_idle_timeout`` has its pool closed, its connections logged out; its credentials are
asked for again when it is used next, and so is an account whose login was rejected: rotated
passwords and tokens are picked up without restarting anything.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import MappingProxyType, TracebackType
from typing import Any, Final, TypeAlias, TypeVar, TypeVarTuple, Unpack

import trio
from imapclient import IMAPClient

from ._config import GroupOptions, PoolConfig
from ._connection import Connection
from ._errors import (
    AuthenticationError,
    ConfigurationError,
    ConnectError,
    PoolClosedError,
    PoolTimeout,
)
from ._pool import Pool, open_pool
from ._stats import PoolStatistics
from ._util import holds_only

__all__ = ["CredentialsProvider", "GroupStatistics", "PoolGroup", "open_pool_group"]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

logger = logging.getLogger("trio_imappool")

#: ``credentials(account) -> options``, sync or async: the :func:`~trio_imappool.open_pool`
#: options of one account (``username``, ``password`` or ``oauth2_token``, and optionally
#: ``host``, ``port``, ``ssl``, ``max_size``, ...).
CredentialsProvider: TypeAlias = Callable[[str], Mapping[str, Any] | Awaitable[Mapping[str, Any]]]

# While tasks of the group wait for connections, how often the group looks whether some of them
# wait for a place under the global cap that an idle connection of another account could free.
REBALANCE_POLL: Final = 0.005
EXPIRY_TICK_MIN: Final = 0.01
EXPIRY_TICK_MAX: Final = 30.0
# Options of the accounts' pools that the group sets itself.
_OWNED: Final = {
    "max_size": "per_account_max",
    "thread_limiter": "max_threads",
    "connection_limiter": "max_connections",
}


@dataclasses.dataclass(frozen=True, slots=True)
class GroupStatistics:
    """A snapshot of a pool group, returned by :meth:`PoolGroup.statistics`.

    ========================  ===============================================================
    field                     meaning
    ========================  ===============================================================
    ``accounts``              accounts with an open pool
    ``connections``           connections that exist or are being opened, each holding one of
                              the ``max_connections`` places (pools being closed included)
    ``max_connections``       the global cap
    ``per_account_max``       the default ``max_size`` of an account's pool
    ``idle``                  idle connections, summed over the open pools
    ``in_use``                checked-out connections, summed over the open pools
    ``waiting``               tasks waiting for a connection, summed over the open pools
    ``places_waiting``        openers waiting for a place under ``max_connections``
    ``credential_lookups``    calls of the credentials callable
    ``pools_opened``          pools opened (one per account, again after each close)
    ``accounts_expired``      pools closed after ``account_idle_timeout`` without a checkout
    ``accounts_rejected``     pools closed because the server rejected their credentials
    ``places_freed``          idle connections closed to give their place to another account
    ``closed``                whether the group is closed
    ``pools``                 account -> :class:`~trio_imappool.PoolStatistics`, open pools
    ========================  ===============================================================
    """

    accounts: int
    connections: int
    max_connections: int
    per_account_max: int
    idle: int
    in_use: int
    waiting: int
    places_waiting: int
    credential_lookups: int
    pools_opened: int
    accounts_expired: int
    accounts_rejected: int
    places_freed: int
    closed: bool
    pools: Mapping[str, PoolStatistics]

    def __str__(self) -> str:
        return (
            f"accounts={self.accounts} connections={self.connections}/{self.max_connections} "
            f"idle={self.idle} in_use={self.in_use} waiting={self.waiting} "
            f"places_waiting={self.places_waiting}"
        )


class _Account:
    """One account's pool, from the credentials lookup until the pool is closed."""

    __slots__ = (
        "active",
        "creating",
        "done",
        "error",
        "last_used",
        "name",
        "pool",
        "ready",
        "retired",
        "stop",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.pool: Pool | None = None
        # Why the pool could not be opened (None if it was, or if the group closed first).
        self.error: BaseException | None = None
        self.ready = trio.Event()  # the pool is open, or opening it failed
        self.stop = trio.Event()  # tells the pool's task to close the pool
        self.done = trio.Event()  # the pool is closed, or was never opened
        self.creating = trio.CancelScope()  # the credentials lookup and the pool's opening
        # Checkouts and pool() blocks in progress (waiting ones included): the account is in use.
        self.active = 0
        self.last_used = trio.current_time()
        # No longer handed out: the next use of the account opens a new pool.
        self.retired = False


class PoolGroup:
    """Pools of IMAP connections to many accounts, under a per-account and a global cap.
    Made by :func:`open_pool_group`.

    Check a connection of an account out with :meth:`connection`, or run one blocking function
    with :meth:`run_sync`; the account's pool is opened on first use. :meth:`pool` gives the
    account's :class:`~trio_imappool.Pool` itself, for the pool's own operations.

    **Caps.** An account's pool has at most ``per_account_max`` connections (or the
    ``max_size`` its credentials name); all pools together at most ``max_connections``
    connections existing or being opened: a pool that needs one more waits for a place, first
    come, first served across the accounts. Worker threads of all pools share one limiter of
    ``max_threads`` tokens.

    **Fairness.** While a pool waits for a place and other accounts have idle connections, the
    group closes those (with LOGOUT), from the account used longest ago first, one for each
    place wanted. Connections in use are never taken away.

    **Credentials.** The *credentials* callable is called each time an account's pool is
    opened: on first use, after the pool was closed for inactivity, and after the server
    rejected the credentials (:class:`~trio_imappool.AuthenticationError` closes the account's
    pool; connections already logged in stay usable until released). Many tasks asking for a
    new account at once cause one call and one pool.

    **Idle accounts.** An account without a checkout for ``account_idle_timeout`` seconds has
    its pool closed, its idle connections logged out.

    Attributes:
        connection_limiter: The global cap, a :class:`trio.CapacityLimiter` of
            ``max_connections`` places (give it to :func:`~trio_imappool.open_pool` to put a
            pool of your own under the same cap).
        thread_limiter: The worker threads' :class:`trio.CapacityLimiter`.
        per_account_max: The default ``max_size`` of an account's pool.
        account_idle_timeout: Seconds without a checkout after which an account's pool closes.
    """

    def __init__(
        self,
        credentials: CredentialsProvider,
        nursery: trio.Nursery,
        *,
        host: str | None,
        port: int | None,
        per_account_max: int,
        max_connections: int,
        max_threads: int,
        account_idle_timeout: float,
        pool_options: Mapping[str, Any],
    ) -> None:
        self._credentials = credentials
        self._nursery = nursery
        self._host = host
        self._port = port
        self._pool_options = dict(pool_options)
        self._acquire_timeout: float = pool_options.get(
            "acquire_timeout", PoolConfig.acquire_timeout
        )
        self.per_account_max: Final = per_account_max
        self.account_idle_timeout: Final = account_idle_timeout
        self.connection_limiter: Final = trio.CapacityLimiter(max_connections)
        self.thread_limiter: Final = trio.CapacityLimiter(max_threads)
        # The current pool of each account in use (opening, open).
        self._accounts: dict[str, _Account] = {}
        # Every account whose pool is not closed yet, retired ones included.
        self._live: set[_Account] = set()
        # Accounts whose pools have tasks waiting for a connection.
        self._demanding: set[_Account] = set()
        # Accounts with idle connections being closed for others: the pool's
        # connections_closed count at which they are all closed.
        self._freeing: dict[_Account, int] = {}
        self._wake = trio.Event()
        self._closed = False
        self._lookups = 0
        self._pools_opened = 0
        self._expired = 0
        self._rejected = 0
        self._freed = 0

    # -- reporting -----------------------------------------------------------------------------

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<PoolGroup {state} {self.statistics()}>"

    def statistics(self) -> GroupStatistics:
        """A snapshot of the group's counts and counters (see :class:`GroupStatistics`)."""
        pools = {
            name: entry.pool.statistics()
            for name, entry in self._accounts.items()
            if entry.pool is not None
        }
        limiter = self.connection_limiter.statistics()
        return GroupStatistics(
            accounts=len(pools),
            connections=limiter.borrowed_tokens,
            max_connections=int(limiter.total_tokens),
            per_account_max=self.per_account_max,
            idle=sum(stats.idle for stats in pools.values()),
            in_use=sum(stats.in_use for stats in pools.values()),
            waiting=sum(stats.waiting for stats in pools.values()),
            places_waiting=limiter.tasks_waiting,
            credential_lookups=self._lookups,
            pools_opened=self._pools_opened,
            accounts_expired=self._expired,
            accounts_rejected=self._rejected,
            places_freed=self._freed,
            closed=self._closed,
            pools=MappingProxyType(pools),
        )

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` has been called (or the ``open_pool_group`` block has
        ended)."""
        return self._closed

    # -- checkout ------------------------------------------------------------------------------

    def connection(self, account: str, *, timeout: float | None = None) -> _GroupCheckout:
        """Check a connection of *account* out for the duration of an ``async with`` block.

        ::

            async with group.connection("alice@example.org") as conn:
                await conn.select_folder("INBOX")
                uids = await conn.search(["UNSEEN"])

        The same :class:`~trio_imappool.Connection` and the same guarantees as
        :meth:`Pool.connection() <trio_imappool.Pool.connection>`; the account's pool is opened
        first if it is not open.

        Args:
            account: The account, as the credentials callable knows it.
            timeout: How long to wait, for the pool to open and then for a connection, instead
                of the ``acquire_timeout`` of the account's pool.

        Entering waits for the account's pool (the credentials lookup) and then for a free or
        newly opened connection, and may be cancelled; a cancelled lookup goes on in the
        background for the other tasks that want the account.

        Leaving never blocks and never loses the connection (see
        :meth:`Pool.connection() <trio_imappool.Pool.connection>`).

        Raises:
            PoolTimeout: No connection within the timeout.
            AuthenticationError: The server rejected the account's credentials; the account's
                pool is closed, so the next checkout asks for the credentials again.
            ConnectError: The credentials callable failed (its exception is ``__cause__``), or
                opening a connection failed.
            ConfigurationError: The credentials callable returned invalid options.
            PoolClosedError: The group is closed or closes while waiting.
        """
        return _GroupCheckout(self, account, timeout)

    async def run_sync(self, account: str, fn: Callable[[IMAPClient, *Ts], T], *args: *Ts) -> T:
        """Check out a connection of *account*, run ``fn(client, *args)`` in a worker thread,
        release it.

        ::

            count = await group.run_sync("bob", lambda client: len(client.list_folders()))

        Args:
            account: The account.
            fn: A blocking function given the :class:`imapclient.IMAPClient`.
            args: Further positional arguments for *fn*.

        Returns:
            What *fn* returns.

        Raises:
            Whatever :meth:`connection` and *fn* raise.

        **Cancellation**: while waiting for a connection, as :meth:`connection`; while *fn*
        runs, its I/O is interrupted at once and the connection discarded.
        """
        async with self.connection(account) as conn:
            return await conn.run_sync(fn, *args)

    @asynccontextmanager
    async def pool(self, account: str) -> AsyncIterator[Pool]:
        """The :class:`~trio_imappool.Pool` of *account*, opened if need be, for a block.

        ::

            async with group.pool("alice") as pool:
                async with pool.connection() as a, pool.connection() as b:
                    ...

        The account counts as in use for the whole block: its pool is not closed for
        inactivity meanwhile. The pool is the group's: do not close it. It may still close
        under you if the server rejects the account's credentials (then its checkouts raise
        :class:`~trio_imappool.PoolClosedError`); an
        :class:`~trio_imappool.AuthenticationError` that leaves the block closes it too.

        Raises:
            As entering :meth:`connection`, but for the errors of opening a connection.

        **Cancellation**: entering waits for the credentials lookup and may be cancelled;
        leaving never blocks.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        entry = await self._enter(account, trio.current_time(), None)
        assert entry.pool is not None
        try:
            yield entry.pool
        except AuthenticationError:
            self._retire(entry)
            raise
        finally:
            self._leave(entry)

    async def _checkout(
        self, account: str, wait_limit: float | None
    ) -> tuple[_Account, AbstractAsyncContextManager[Connection], Connection]:
        await trio.lowlevel.checkpoint_if_cancelled()
        start = trio.current_time()
        while True:
            entry = await self._enter(account, start, wait_limit)
            pool = entry.pool
            assert pool is not None
            limit = pool.config.acquire_timeout if wait_limit is None else wait_limit
            checkout = pool.connection(timeout=max(0.0, start + limit - trio.current_time()))
            try:
                conn = await checkout.__aenter__()
            except AuthenticationError:
                self._leave(entry)
                self._retire(entry)
                raise
            except PoolClosedError:
                self._leave(entry)
                if entry.retired and not self._closed:
                    continue  # the account's pool was replaced meanwhile: use the new one
                raise
            except BaseException:
                self._leave(entry)
                raise
            return entry, checkout, conn

    async def _enter(self, account: str, start: float, wait_limit: float | None) -> _Account:
        """Count a use of *account* and wait for its pool. A checkpoint."""
        if self._closed:
            await trio.lowlevel.cancel_shielded_checkpoint()
            raise PoolClosedError(f"pool group: closed (checkout of {account!r})")
        if not isinstance(account, str) or not account:
            await trio.lowlevel.cancel_shielded_checkpoint()
            raise TypeError(f"an account must be a non-empty str, not {account!r}")
        entry = self._accounts.get(account)
        if entry is None:
            entry = self._open(account)
        entry.active += 1
        entry.last_used = trio.current_time()
        try:
            limit = self._acquire_timeout if wait_limit is None else wait_limit
            with trio.CancelScope(deadline=start + limit) as scope:
                await entry.ready.wait()
            if scope.cancelled_caught:
                raise PoolTimeout(
                    f"pool group: no pool for {account!r} within {limit:g} s: "
                    "the credentials callable has not answered"
                )
            if entry.pool is None:
                if entry.error is None:
                    raise PoolClosedError(f"pool group: closed (checkout of {account!r})")
                raise _copy(entry.error)
        except BaseException:
            self._leave(entry)
            raise
        return entry

    def _leave(self, entry: _Account) -> None:
        entry.active -= 1
        entry.last_used = trio.current_time()

    # -- opening and closing accounts' pools ---------------------------------------------------

    def _open(self, account: str) -> _Account:
        entry = _Account(account)
        self._accounts[account] = entry
        self._live.add(entry)
        self._nursery.start_soon(self._create, entry, name=f"trio_imappool group: {account}")
        return entry

    async def _create(self, entry: _Account) -> None:
        """Ask for the account's options and start its pool's task. Runs in the group's
        nursery, so that a task that stops waiting does not stop it for the others."""
        try:
            with entry.creating:
                options = await self._lookup(entry.name)
                await self._nursery.start(self._serve, entry, options)
        except Exception as exc:
            entry.error = exc
            logger.warning("pool group: cannot open a pool for %r: %s", entry.name, exc)
        finally:
            if entry.pool is None:
                self._forget(entry)
            entry.ready.set()

    async def _lookup(self, account: str) -> dict[str, Any]:
        """Call the credentials callable (sync ones in a worker thread) and make the options of
        the account's pool."""
        self._lookups += 1
        provider = self._credentials
        try:
            if inspect.iscoroutinefunction(provider):
                result = await provider(account)
            else:
                result = await trio.to_thread.run_sync(
                    provider, account, limiter=self.thread_limiter, abandon_on_cancel=True
                )
                if inspect.isawaitable(result):
                    result = await result
        except Exception as exc:
            raise ConnectError(
                f"pool group: the credentials callable failed for {account!r}: {type(exc).__name__}"
            ) from exc
        if not isinstance(result, Mapping):
            raise ConfigurationError(
                f"pool group: the credentials callable returned a {type(result).__name__} for "
                f"{account!r}, not a mapping of open_pool options"
            )
        owned = sorted(key for key in ("thread_limiter", "connection_limiter") if key in result)
        if owned:
            raise ConfigurationError(
                f"pool group: the credentials for {account!r} set {', '.join(owned)}, "
                "which the group sets itself"
            )
        options = {
            **self._pool_options,
            "host": self._host,
            "port": self._port,
            "username": account,
            "max_size": self.per_account_max,
            **result,
        }
        if options["host"] is None:
            raise ConfigurationError(
                f"pool group: no host for {account!r}: give open_pool_group(host=...) or "
                "return host from the credentials callable"
            )
        options["thread_limiter"] = self.thread_limiter
        options["connection_limiter"] = self.connection_limiter
        return options

    async def _serve(
        self,
        entry: _Account,
        options: dict[str, Any],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Keep the account's pool open until told to close it. Runs in the group's nursery."""
        try:
            async with open_pool(**options) as pool, trio.open_nursery() as nursery:
                entry.pool = pool
                self._pools_opened += 1
                nursery.start_soon(self._watch_demand, entry, pool)
                task_status.started()
                await entry.stop.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._forget(entry)

    async def _watch_demand(self, entry: _Account, pool: Pool) -> None:
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

    def _retire(self, entry: _Account, *, expired: bool = False) -> None:
        """Stop handing out *entry*'s pool and close it in the background. Synchronous."""
        if entry.retired:
            return
        entry.retired = True
        if self._accounts.get(entry.name) is entry:
            del self._accounts[entry.name]
        if expired:
            self._expired += 1
            logger.info("pool group: closing the pool of %r (no checkout for long)", entry.name)
        else:
            self._rejected += 1
            logger.warning(
                "pool group: the server rejected the credentials of %r: closing its pool; the "
                "next checkout asks for them again",
                entry.name,
            )
        entry.stop.set()

    def _forget(self, entry: _Account) -> None:
        """*entry*'s pool is closed (or was never opened). Synchronous, idempotent."""
        entry.retired = True
        if self._accounts.get(entry.name) is entry:
            del self._accounts[entry.name]
        self._live.discard(entry)
        self._demanding.discard(entry)
        self._freeing.pop(entry, None)
        entry.done.set()

    async def aclose(self) -> None:
        """Close the group and every account's pool. Idempotent.

        Each pool closes as :meth:`Pool.aclose() <trio_imappool.Pool.aclose>` does: waiting
        tasks get :class:`~trio_imappool.PoolClosedError`, idle connections are logged out,
        checked-out ones are closed when they come back. Credentials lookups in progress are
        abandoned. Later checkouts raise :class:`~trio_imappool.PoolClosedError`.

        **Cancellation**: shielded; it waits until every pool is closed, which each pool bounds
        by its ``logout_timeout`` (and, for abandoned worker threads, its connect and login
        timeouts). It is a checkpoint.
        """
        await trio.lowlevel.checkpoint()
        if self._closed:
            return
        self._closed = True
        for entry in list(self._live):
            entry.retired = True
            entry.creating.cancel()
            entry.stop.set()
        self._accounts.clear()
        with trio.CancelScope(shield=True):
            while self._live:
                await next(iter(self._live)).done.wait()

    # -- maintenance ---------------------------------------------------------------------------

    async def _expire_forever(self) -> None:
        """Close the pools of accounts unused for ``account_idle_timeout``."""
        timeout = self.account_idle_timeout
        if math.isinf(timeout):
            await trio.sleep_forever()
        tick = min(EXPIRY_TICK_MAX, max(EXPIRY_TICK_MIN, timeout / 4))
        while True:
            await trio.sleep(tick)
            self._expire()

    def _expire(self) -> None:
        now = trio.current_time()
        for entry in list(self._accounts.values()):
            if (
                entry.pool is not None
                and entry.active == 0
                and now - entry.last_used >= self.account_idle_timeout
            ):
                self._retire(entry, expired=True)

    async def _rebalance_forever(self) -> None:
        """While tasks wait for connections, free places under the global cap for them.

        Woken when an account's tasks start waiting (see :meth:`_watch_demand`); it then looks
        every few milliseconds, as long as some account has waiting tasks, because an opener
        joins the global limiter's queue a moment after its pool's tasks start waiting. A look
        costs next to nothing while the global cap is not reached.
        """
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._demanding:
                self._rebalance()
                await trio.sleep(REBALANCE_POLL)

    def _rebalance(self) -> None:
        """Close idle connections of other accounts, one for each opener waiting for a place
        (less those already being closed), the longest-unused account first. Synchronous."""
        limiter = self.connection_limiter
        if self._closed or limiter.available_tokens > 0:
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
                self._freed += closed
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


def _counts_waiting(entry: _Account) -> int:
    return 0 if entry.pool is None else entry.pool.counts.value.waiting


def _copy(error: BaseException) -> BaseException:
    """A copy of *error* for one more waiting task (raising one object in many tasks would
    tangle their tracebacks)."""
    try:
        copy = type(error)(*error.args)
    except Exception:
        return error
    copy.__cause__ = error.__cause__
    return copy


class _GroupCheckout:
    """The async context manager returned by :meth:`PoolGroup.connection`."""

    __slots__ = ("_account", "_checkout", "_entered", "_entry", "_group", "_timeout")

    def __init__(self, group: PoolGroup, account: str, timeout: float | None) -> None:
        self._group = group
        self._account = account
        self._timeout = timeout
        self._entered = False
        self._entry: _Account | None = None
        self._checkout: AbstractAsyncContextManager[Connection] | None = None

    async def __aenter__(self) -> Connection:
        # Marked before the first await, so that a second task entering meanwhile is refused.
        if self._entered:
            await trio.lowlevel.checkpoint()
            raise RuntimeError("this group.connection() context manager is already in use")
        self._entered = True
        try:
            entry, checkout, conn = await self._group._checkout(self._account, self._timeout)
        except BaseException:
            self._entered = False
            raise
        self._entry, self._checkout = entry, checkout
        return conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        entry, checkout = self._entry, self._checkout
        assert entry is not None and checkout is not None
        self._entry = self._checkout = None
        self._entered = False
        try:
            await checkout.__aexit__(exc_type, exc, tb)  # never blocks
        finally:
            self._group._leave(entry)


@asynccontextmanager
async def open_pool_group(
    credentials: CredentialsProvider,
    *,
    host: str | None = None,
    port: int | None = None,
    per_account_max: int = 5,
    max_connections: int = 50,
    max_threads: int | None = None,
    account_idle_timeout: float = 300.0,
    **pool_options: Unpack[GroupOptions],
) -> AsyncIterator[PoolGroup]:
    """Open a group of pools, one per account, for the duration of a block.

    ::

        async def credentials(account: str) -> dict[str, Any]:
            secret = await vault.read(f"imap/{account}")  # read again for every new pool
            return {"username": account, "password": secret["password"]}

        async with trio_imappool.open_pool_group(
            credentials, host="imap.example.org", per_account_max=4, max_connections=100
        ) as group:
            async with group.connection("alice@example.org") as conn:
                await conn.noop()
            await group.run_sync("bob@example.org", lambda client: client.list_folders())

    An account's pool is opened on its first use with
    ``open_pool(host, port, max_size=per_account_max, **pool_options, **credentials(account))``
    and the group's shared limiters; it lives in a task of the group's nursery until the account
    is idle for ``account_idle_timeout``, its credentials are rejected, or the block ends.

    Args:
        credentials: ``credentials(account)``, sync (run in a worker thread) or async: the
            :func:`~trio_imappool.open_pool` options of the account: ``password`` or
            ``oauth2_token``, and optionally ``username`` (default: the account itself),
            ``host``, ``port``, ``ssl``, ``ssl_context``, ``max_size`` (to give an account a cap
            of its own) and any other option. Called each time the account's pool is opened.
        host: The server of every account whose credentials name none.
        port: Its port (default: 993 with implicit TLS, else 143).
        per_account_max: The ``max_size`` of each account's pool.
        max_connections: At most this many connections of all accounts exist or are being
            opened at once.
        max_threads: Worker threads of all pools at once (default: ``max_connections``).
        account_idle_timeout: Seconds without a checkout after which an account's pool is
            closed (``math.inf``: never).
        **pool_options: Further :func:`~trio_imappool.open_pool` options for every account
            (``ssl``, ``acquire_timeout``, ``reset_on_release``, ...; typed as
            :class:`~trio_imappool.GroupOptions`); the credentials win.
            ``budget=RedisBudget(url, limit=N)`` (without a ``key``) shares each account's
            connections with other processes and hosts: at most N per account across all.

    Raises:
        ConfigurationError: An argument is invalid (raised before anything is opened).

    Leaving the block closes every pool (see :meth:`PoolGroup.aclose`). An exception raised in
    the block comes out of it unchanged, never wrapped in an exception group; the group's
    background tasks do not raise.

    A sync credentials callable still running when the group closes is abandoned: its worker
    thread ends by itself. ``min_size`` in *pool_options* applies to each account's pool, but
    the group may close idle connections below it when other accounts need their places.

    **Cancellation**: entering does not block. Leaving the block on a cancellation still closes
    every pool, shielded (each pool bounds its closing).
    """
    _check_group_options(
        credentials,
        host=host,
        port=port,
        per_account_max=per_account_max,
        max_connections=max_connections,
        max_threads=max_threads,
        account_idle_timeout=account_idle_timeout,
        pool_options=pool_options,
    )
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            group = PoolGroup(
                credentials,
                nursery,
                host=host,
                port=port,
                per_account_max=per_account_max,
                max_connections=max_connections,
                max_threads=max_threads or max_connections,
                account_idle_timeout=account_idle_timeout,
                pool_options=pool_options,
            )
            nursery.start_soon(group._expire_forever)
            nursery.start_soon(group._rebalance_forever)
            try:
                yield group
            except BaseException as exc:
                body_error = exc
                raise
            finally:
                with trio.CancelScope(shield=True):
                    await group.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group_error:
        if body_error is None or not holds_only(group_error, body_error):
            raise
    if body_error is not None:
        raise body_error


def _check_group_options(
    credentials: object,
    *,
    host: object,
    port: object,
    per_account_max: object,
    max_connections: object,
    max_threads: object,
    account_idle_timeout: object,
    pool_options: Mapping[str, Any],
) -> None:
    if not callable(credentials):
        raise ConfigurationError("open_pool_group needs a credentials callable")
    if host is not None and (not isinstance(host, str) or not host):
        raise ConfigurationError(f"host must be a non-empty str or None, not {host!r}")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int)):
        raise ConfigurationError(f"port must be an int or None, not {port!r}")
    for key, value in (
        ("per_account_max", per_account_max),
        ("max_connections", max_connections),
        ("max_threads", 1 if max_threads is None else max_threads),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigurationError(f"{key} must be an int >= 1, not {value!r}")
    timeout = account_idle_timeout
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise ConfigurationError(
            f"account_idle_timeout must be a positive number of seconds (or math.inf), "
            f"not {timeout!r}"
        )
    for key, instead in _OWNED.items():
        if key in pool_options:
            raise ConfigurationError(f"open_pool_group sets {key} itself: use {instead}=")
    # ``budget`` (a RedisBudget) goes to every account's pool; with its key left
    # None each account gets a budget of its own in Redis, ``limit`` places per account.
    known = {field.name for field in dataclasses.fields(PoolConfig)} | {"budget"}
    unknown = sorted(set(pool_options) - known)
    if unknown:
        raise ConfigurationError(f"unknown option(s) for open_pool_group: {', '.join(unknown)}")
