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

**Where it is.** This module is the public face (:class:`PoolGroup`, :func:`open_pool_group`)
and the one place that knows the accounts' pools are :class:`~trio_imappool.Pool` objects
opened with :func:`~trio_imappool.open_pool`. The machinery needs only the pools' small public
surface: the accounts and checkouts (:mod:`._group_core`, :mod:`._group_account`), fairness
under the global cap (:mod:`._group_balance`), the options and statistics
(:mod:`._group_options`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import MappingProxyType
from typing import Any, TypeVar, TypeVarTuple, Unpack

import trio
from imapclient import IMAPClient

from ._config import GroupOptions
from ._errors import AuthenticationError
from ._group_balance import REBALANCE_POLL
from ._group_core import EXPIRY_TICK_MAX, EXPIRY_TICK_MIN, GroupCheckout, GroupCore
from ._group_options import CredentialsProvider, GroupStatistics, check_group_options
from ._nursery import open_nursery_unwrapped
from ._pool import Pool, open_pool

__all__ = [
    "EXPIRY_TICK_MAX",
    "EXPIRY_TICK_MIN",
    "REBALANCE_POLL",
    "CredentialsProvider",
    "GroupStatistics",
    "PoolGroup",
    "open_pool_group",
]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


class PoolGroup(GroupCore[Pool]):
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
            places_freed=self._balance.freed,
            closed=self._closed,
            pools=MappingProxyType(pools),
        )

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` has been called (or the ``open_pool_group`` block has
        ended)."""
        return self._closed

    # -- checkout ------------------------------------------------------------------------------

    def connection(self, account: str, *, timeout: float | None = None) -> GroupCheckout[Pool]:
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
        return GroupCheckout(self, account, timeout)

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
        self._closed = self._balance.closed = True
        for entry in list(self._live):
            entry.retired = True
            entry.creating.cancel()
            entry.stop.set()
        self._accounts.clear()
        with trio.CancelScope(shield=True):
            while self._live:
                await next(iter(self._live)).done.wait()

    def _open_pool(self, options: dict[str, Any]) -> AbstractAsyncContextManager[Pool]:
        return open_pool(**options)


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
    check_group_options(
        credentials,
        host=host,
        port=port,
        per_account_max=per_account_max,
        max_connections=max_connections,
        max_threads=max_threads,
        account_idle_timeout=account_idle_timeout,
        pool_options=pool_options,
    )
    # An exception of the block comes out as it was raised, not in an exception group.
    async with open_nursery_unwrapped() as nursery:
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
        nursery.start_soon(group._balance.run_forever)
        try:
            yield group
        finally:
            with trio.CancelScope(shield=True):
                await group.aclose()
            nursery.cancel_scope.cancel()
