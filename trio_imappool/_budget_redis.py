"""The connection budget's Redis side: :class:`RedisBudget`, the scripts run from Trio.

Each call runs one script (:mod:`trio_imappool._budget_scripts`) with the synchronous redis-py
client in a worker thread of the budget's own :class:`trio.CapacityLimiter`; waiting for a place
is an adaptive poll, woken early when this process gives a place back. See
:mod:`trio_imappool._budget` for the design.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import secrets
import socket
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol

import trio

from ._budget_scripts import (
    ACQUIRE,
    COUNT,
    POLL_FIRST,
    RELEASE,
    RENEW,
    WAITER_TTL,
    redis_keys,
)
from ._errors import BudgetUnavailableError, ConfigurationError

__all__ = ["AccountAddress", "BudgetStatistics", "RedisBudget"]


class AccountAddress(Protocol):
    """What names an account's budget key: a :class:`~trio_imappool.PoolConfig` has it."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def username(self) -> str: ...


@dataclasses.dataclass(frozen=True)
class BudgetStatistics:
    """A snapshot of one :class:`RedisBudget` object's counters (this process only).

    Attributes:
        limit: The budget's limit.
        lease: The lease, in seconds.
        acquires: Places taken.
        releases: Places given back.
        waits: Takes that had to wait in the queue.
        lost: Places found lost at a renewal (and not taken again).
        unavailable: Calls that failed because Redis was unreachable.
    """

    limit: int
    lease: float
    acquires: int
    releases: int
    waits: int
    lost: int
    unavailable: int


def _display_url(url: str) -> str:
    """The URL without user or password: ``redis://host:port/db``."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or "localhost"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "redis://(invalid URL)"
    return f"{parts.scheme}://{host}{port}{parts.path}"


class RedisBudget:
    """An account's connection limit shared by every process and host that uses one Redis.

    ::

        budget = trio_imappool.RedisBudget("redis://cache.internal:6379/0", limit=5)
        async with trio_imappool.open_pool(host, username=u, password=p, budget=budget) as pool:
            ...

    At most *limit* connections exist or are being opened for the budget's key, counted across
    every pool in every process that uses it. See the module documentation for how, and the
    README for what it guarantees and what it does not.

    Args:
        url: The Redis URL (``redis://[[user]:password@]host:port/db``, ``rediss://`` for TLS,
            ``unix://``). The password never appears in messages or reprs.
        limit: How many connections at most.
        lease: Seconds a place outlives the last renewal of its holder: how long the places of
            a process that died stay taken. Renewed every ``lease / 3`` seconds.
        key: The Redis key (a prefix of four keys). Default: one per account, made from the
            pool's host, port and user name, so one budget object given to a pool group (or to
            pools of different accounts) is one budget per account.
        timeout: Seconds for connecting to Redis and for each call; past it, Redis counts as
            unreachable.
        poll_max: The longest wait between two asks of a waiting opener.
        restart_fence: Seconds during which no place is handed out after Redis is found
            without the budget (restarted empty, flushed, or first use of the key), so that
            the pools that hold connections register them again first (they look every 0.1 s).
            Default: ``2 * timeout + 0.5``.

    Raises:
        ConfigurationError: An argument is invalid, or redis-py is not installed.
    """

    def __init__(
        self,
        url: str,
        *,
        limit: int,
        lease: float = 30.0,
        key: str | None = None,
        timeout: float = 1.0,
        poll_max: float = 0.025,
        restart_fence: float | None = None,
    ) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigurationError(f"limit must be an int >= 1, not {limit!r}")
        for name, value in (("lease", lease), ("timeout", timeout), ("poll_max", poll_max)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigurationError(f"{name} must be a positive number, not {value!r}")
        if lease < 3 * timeout:
            raise ConfigurationError(
                f"lease ({lease:g} s) must be at least three times timeout ({timeout:g} s)"
            )
        if key is not None and (not isinstance(key, str) or not key):
            raise ConfigurationError("key must be a non-empty str or None")
        if not isinstance(url, str):
            raise ConfigurationError("url must be a str")
        try:
            import redis
        except ImportError as exc:
            raise ConfigurationError(
                "RedisBudget needs redis-py: pip install 'trio-imappool[redis]'"
            ) from exc
        self.limit: Final = limit
        self.lease: Final = float(lease)
        self.key: Final = key
        self.url: Final = _display_url(url)
        self._poll_max = float(poll_max)
        fence = 2 * timeout + 0.5 if restart_fence is None else restart_fence
        if isinstance(fence, bool) or not isinstance(fence, int | float) or fence < 0:
            raise ConfigurationError(f"restart_fence must be >= 0, not {restart_fence!r}")
        self.restart_fence: Final = float(fence)
        password = urllib.parse.urlsplit(url).password if "://" in url else None
        self._secret = urllib.parse.unquote(password) if password else None
        try:
            self._redis = redis.Redis.from_url(
                url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry=None,
                health_check_interval=0,
            )
        except ValueError as exc:
            raise ConfigurationError(
                f"invalid Redis URL {self.url}: {self._scrub(str(exc))}"
            ) from None
        self._redis_errors: tuple[type[BaseException], ...] = (
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            redis.exceptions.BusyLoadingError,
            OSError,
        )
        self._scripts = {
            name: self._redis.register_script(text)
            for name, text in (
                ("acquire", ACQUIRE),
                ("release", RELEASE),
                ("renew", RENEW),
                ("count", COUNT),
            )
        }
        self._limiter: trio.CapacityLimiter | None = None
        self._freed: dict[str, trio.Event] = {}
        self._ids = itertools.count(1)
        self._prefix = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._acquires = 0
        self._releases = 0
        self._waits = 0
        self._lost = 0
        self._unavailable = 0

    def __repr__(self) -> str:
        key = self.key if self.key is not None else "(per account)"
        return (
            f"<RedisBudget {self.url} key={key} limit={self.limit} lease={self.lease:g}s "
            f"acquires={self._acquires} releases={self._releases} lost={self._lost} "
            f"unavailable={self._unavailable}>"
        )

    def statistics(self) -> BudgetStatistics:
        """This object's counters (see :class:`BudgetStatistics`)."""
        return BudgetStatistics(
            self.limit,
            self.lease,
            self._acquires,
            self._releases,
            self._waits,
            self._lost,
            self._unavailable,
        )

    def close(self) -> None:
        """Close the connections to Redis. Leases held stay until released or expired."""
        self._redis.close()

    def __enter__(self) -> RedisBudget:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the scripts -----------------------------------------------------------------------------

    def key_for(self, config: AccountAddress) -> str:
        """The key a pool of *config* uses: the budget's own, or one made from the account."""
        if self.key is not None:
            return self.key
        return f"trio-imappool:budget:{config.host}:{config.port}:{config.username}"

    def new_place(self) -> str:
        """A fresh place name, unique across hosts and processes (host:pid:random:n)."""
        return f"{self._prefix}:{next(self._ids)}"

    def _keys(self, key: str | None) -> list[str]:
        key = key if key is not None else self.key
        if key is None:
            raise ConfigurationError("this RedisBudget has no key of its own: give key=")
        return redis_keys(key)

    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    async def _call(self, script: str, keys: list[str], args: Sequence[str | int]) -> Any:
        """Run one script in a worker thread; Redis errors become BudgetUnavailableError."""
        if self._limiter is None:
            self._limiter = trio.CapacityLimiter(8)
        call: Callable[[], Any] = lambda: self._scripts[script](keys=keys, args=list(args))  # noqa: E731
        try:
            # Not abandoned on cancel: the call is bounded by ``timeout``, and a script that
            # ran must be seen, or a place taken by it would stay taken until its lease ends.
            return await trio.to_thread.run_sync(call, limiter=self._limiter)
        except self._redis_errors as exc:
            self._unavailable += 1
            raise BudgetUnavailableError(
                f"the connection budget's Redis at {self.url} is unreachable: "
                f"{type(exc).__name__}: {self._scrub(str(exc))}"
            ) from None

    async def try_acquire(self, place: str, *, key: str | None = None) -> bool:
        """Take a place if this one's turn has come; else join (or stay in) the queue.

        A waiter that does not ask again within :data:`WAITER_TTL` seconds leaves the queue.

        Args:
            place: The place's name (:meth:`new_place`); asking again keeps its turn.
            key: The key, if the budget has none of its own.

        Returns:
            True if *place* is now held (a lease of ``lease`` seconds).

        Raises:
            BudgetUnavailableError: Redis is unreachable.

        **Cancellation**: waits for the one call to Redis (bounded by ``timeout``).
        """
        args = (
            place,
            self.limit,
            int(self.lease * 1000),
            int(WAITER_TTL * 1000),
            int(self.restart_fence * 1000),
        )
        held, _ = await self._call("acquire", self._keys(key), args)
        return bool(held)

    async def acquire(
        self,
        place: str,
        *,
        key: str | None = None,
        give_up: Callable[[], bool] | None = None,
    ) -> bool:
        """Wait for a place, first come first served across every process.

        Args:
            place: The place's name (:meth:`new_place`).
            key: The key, if the budget has none of its own.
            give_up: Asked before each new ask while waiting: if it returns True, the place
                leaves the queue and the call returns False (a pool whose waiting task went
                away stops queueing for a connection it no longer needs).

        Returns:
            True once the place is held; False if *give_up* said so first.

        Raises:
            BudgetUnavailableError: Redis is unreachable (the place is not held).

        **Cancellation**: while waiting, at once; the place leaves the queue (one call to
        Redis, shielded and bounded by ``timeout``). Once the place is taken, the call returns
        it even if cancelled, so a place is never taken without its holder knowing.
        """
        keys = self._keys(key)
        wait = POLL_FIRST
        waited = False
        done = False
        try:
            while True:
                if await self.try_acquire(place, key=key):
                    done = True
                    break
                waited = True
                freed = self._freed.setdefault(keys[0], trio.Event())
                with trio.move_on_after(wait):
                    await freed.wait()
                wait = min(wait * 1.5, self._poll_max)
                if give_up is not None and give_up():
                    return False
        finally:
            if not done and waited:
                with (
                    trio.move_on_after(1.0, shield=True),
                    contextlib.suppress(BudgetUnavailableError),
                ):
                    await self._call("release", keys, (place,))
        self._acquires += 1
        self._waits += waited
        return True

    async def release(self, place: str, *, key: str | None = None) -> bool:
        """Give a place back (or leave the queue). Returns whether *place* was held.

        Raises:
            BudgetUnavailableError: Redis is unreachable (the lease then ends by itself).

        **Cancellation**: waits for the one call to Redis (bounded by ``timeout``).
        """
        keys = self._keys(key)
        held = bool(await self._call("release", keys, (place,)))
        self._releases += held
        freed = self._freed.pop(keys[0], None)
        if freed is not None:
            freed.set()  # wake this process's waiters now, not at their next poll
        return held

    async def renew(self, places: Sequence[str], *, key: str | None = None) -> list[str]:
        """Extend the leases of *places*; a lost one is taken again if the budget has room.

        Returns:
            The places lost for good (the budget is full without them).

        Raises:
            BudgetUnavailableError: Redis is unreachable.

        **Cancellation**: waits for the one call to Redis (bounded by ``timeout``).
        """
        if not places:
            await trio.lowlevel.checkpoint()
            return []
        fence = int(self.restart_fence * 1000)
        args: list[str | int] = [self.limit, int(self.lease * 1000), fence, *places]
        lost = await self._call("renew", self._keys(key), args)
        self._lost += len(lost)
        return [p.decode() if isinstance(p, bytes) else str(p) for p in lost]

    async def counts(self, *, key: str | None = None) -> tuple[int, int]:
        """``(places held, waiters)`` for the key, across every process (after expiries).

        **Cancellation**: waits for the one call to Redis (bounded by ``timeout``).
        """
        held, waiting, _ = await self._call("count", self._keys(key), ())
        return int(held), int(waiting)

    async def _look(self, key: str) -> tuple[int, int, bool]:
        """``(places held, waiters, whether Redis lost the budget lately)``."""
        held, waiting, fence = await self._call("count", self._keys(key), ())
        return int(held), int(waiting), int(fence) != 0
