"""The pool group's machinery: accounts' pools opened on first use, checkouts, expiry.

:class:`GroupCore` keeps one :class:`~trio_imappool._group_account.Account` per account in use:
the first checkout of an account starts a task in the group's nursery that asks the
credentials callable for its options and opens its pool (many tasks asking at once cause one
lookup and one pool); the pool lives in that task until the account is idle for
``account_idle_timeout``, its credentials are rejected, or the group closes. Fairness under the
global cap is the :class:`~trio_imappool._group_balance.Rebalancer`'s.

It needs only the pools' small public surface; how a pool is opened is the subclass's
(:class:`~trio_imappool.PoolGroup` opens them with :func:`~trio_imappool.open_pool`).
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Generic

import trio

from ._config import PoolConfig
from ._errors import AuthenticationError, ConnectError, PoolClosedError, PoolTimeout
from ._group_account import Account, P, copy_error
from ._group_balance import Rebalancer
from ._group_options import CredentialsProvider, account_options

if TYPE_CHECKING:
    from ._connection import Connection

__all__ = ["EXPIRY_TICK_MAX", "EXPIRY_TICK_MIN", "GroupCheckout", "GroupCore"]

logger = logging.getLogger("trio_imappool")

EXPIRY_TICK_MIN: Final = 0.01
EXPIRY_TICK_MAX: Final = 30.0


class GroupCore(Generic[P]):
    """Pools of many accounts under a per-account and a global cap; the public face is
    :class:`~trio_imappool.PoolGroup`, which says what each part does."""

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
        self._accounts: dict[str, Account[P]] = {}
        # Every account whose pool is not closed yet, retired ones included.
        self._live: set[Account[P]] = set()
        self._balance: Final = Rebalancer(self.connection_limiter, self._accounts)
        self._closed = False
        self._lookups = 0
        self._pools_opened = 0
        self._expired = 0
        self._rejected = 0

    def _open_pool(self, options: dict[str, Any]) -> AbstractAsyncContextManager[P]:
        """Open one account's pool with *options* (``open_pool(**options)``)."""
        raise NotImplementedError

    # -- checkout ------------------------------------------------------------------------------

    async def _checkout(
        self, account: str, wait_limit: float | None
    ) -> tuple[Account[P], AbstractAsyncContextManager[Connection], Connection]:
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

    async def _enter(self, account: str, start: float, wait_limit: float | None) -> Account[P]:
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
                raise copy_error(entry.error)
        except BaseException:
            self._leave(entry)
            raise
        return entry

    def _leave(self, entry: Account[P]) -> None:
        entry.active -= 1
        entry.last_used = trio.current_time()

    # -- opening and closing accounts' pools ---------------------------------------------------

    def _open(self, account: str) -> Account[P]:
        entry: Account[P] = Account(account)
        self._accounts[account] = entry
        self._live.add(entry)
        self._nursery.start_soon(self._create, entry, name=f"trio_imappool group: {account}")
        return entry

    async def _create(self, entry: Account[P]) -> None:
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
        options = account_options(
            account,
            result,
            defaults=self._pool_options,
            host=self._host,
            port=self._port,
            per_account_max=self.per_account_max,
        )
        options["thread_limiter"] = self.thread_limiter
        options["connection_limiter"] = self.connection_limiter
        return options

    async def _serve(
        self,
        entry: Account[P],
        options: dict[str, Any],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Keep the account's pool open until told to close it. Runs in the group's nursery."""
        try:
            async with self._open_pool(options) as pool, trio.open_nursery() as nursery:
                entry.pool = pool
                self._pools_opened += 1
                nursery.start_soon(self._balance.watch_demand, entry, pool)
                task_status.started()
                await entry.stop.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._forget(entry)

    def _retire(self, entry: Account[P], *, expired: bool = False) -> None:
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

    def _forget(self, entry: Account[P]) -> None:
        """*entry*'s pool is closed (or was never opened). Synchronous, idempotent."""
        entry.retired = True
        if self._accounts.get(entry.name) is entry:
            del self._accounts[entry.name]
        self._live.discard(entry)
        self._balance.forget(entry)
        entry.done.set()

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


class GroupCheckout(Generic[P]):
    """The async context manager returned by :meth:`PoolGroup.connection
    <trio_imappool.PoolGroup.connection>`."""

    __slots__ = ("_account", "_checkout", "_entered", "_entry", "_group", "_timeout")

    def __init__(self, group: GroupCore[P], account: str, timeout: float | None) -> None:
        self._group = group
        self._account = account
        self._timeout = timeout
        self._entered = False
        self._entry: Account[P] | None = None
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
