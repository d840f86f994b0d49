"""A connection budget shared by every process and host that uses the same Redis.

A pool keeps its own process under ``max_size``, and a pool group keeps one process under a
global cap, but the provider's cap is per account: two workers, or a cron export beside a
service, together exceed it and the server starts refusing logins. :class:`RedisBudget` is the
cap as one shared counter: a pool takes a *place* in it before it opens a connection and gives
the place back once the connection is closed.

**Leases, not trust.** A place is a lease: a member of a sorted set in Redis whose score is its
expiry, taken from Redis's own clock (``TIME`` inside the scripts), never from a client's. The
pool renews its leases from a task in its nursery every ``lease / 3`` seconds; a process that
dies (SIGKILL, a lost host) stops renewing and its places come free ``lease`` seconds later.

**Atomic and fair.** Taking, renewing and giving back a place are each one Lua script, so they
are atomic on the server. Waiters queue in a second sorted set scored by a ticket from a counter
(``INCR``), the fair counting semaphore of "Redis in Action" 6.3: a waiter takes a free place
only if fewer waiters are ahead of it than there are free places, so waiters on different hosts
are served in the order they arrived. A waiter that stops asking (its process died) leaves the
queue by itself after :data:`WAITER_TTL`.

**Waking.** A waiter asks again after a short adaptive poll: 2 ms after joining, then each wait
half again as long, up to ``poll_max`` (25 ms by default). A place given back in the same process
wakes that process's waiters at once. Measured on loopback (tests/test_budget.py): a waiter in
another process takes a freed place within ``poll_max`` plus one round trip. Keyspace
notifications would need a server setting and a subscriber connection per process; a blocking
pop on a per-key list wakes one waiter, not the one first in line; the poll costs one small
script per waiter every 25 ms, which Redis serves in microseconds.

**Sharing.** Every 0.1 s while others wait for a place, a pool closes an idle connection for
them, or retires its oldest one when it is next released, so a busy process does not keep every
place while processes elsewhere starve; the queue hands the freed places out in arrival order.

**Redis restarted empty.** Redis cannot tell a key it lost from one never used. A mark that
never expires tells: while it is missing, the scripts set it with a *fence* time
(``restart_fence`` seconds ahead) and hand out no place before it, so that pools holding
connections register them again first (they look every 0.1 s and renew at once when they find
the mark missing or fenced). Without the fence, a waiter takes a place in the empty Redis while
the connections of the lost leases still exist, and the server refuses its login.

**Giving back.** A place goes back only once the server has closed its end of the connection
(the socket's TCP state, read through a second descriptor kept past the client's close): Dovecot
counts a session until then, and a place given back at the client's close lets a login elsewhere
be refused. It happens in the pool's background, never on a checkout's path.

**The client.** The synchronous redis-py client, called in worker threads of the budget's own
:class:`trio.CapacityLimiter`. It is imported only when a :class:`RedisBudget` is made: install
the ``redis`` extra (``pip install trio-imappool[redis]``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import secrets
import socket
import urllib.parse
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, TypeVar

import trio

from ._errors import BudgetUnavailableError, ConfigurationError

if TYPE_CHECKING:
    from ._client import PooledClient
    from ._config import PoolConfig
    from ._pool import Pool

__all__ = ["BudgetStatistics", "RedisBudget"]

T = TypeVar("T")

logger = logging.getLogger("trio_imappool")

#: A waiter that has not asked for this long (its process died) leaves the queue.
WAITER_TTL: Final = 2.0
#: The first wait between two asks of a waiting opener; each later one is 1.5 times longer.
POLL_FIRST: Final = 0.002
#: After a connection is closed, how long to wait for the server to close its end before the
#: place is given back anyway.
SERVER_CLOSE_WAIT: Final = 2.0
#: How long a renewal that failed (Redis unreachable) waits before trying again.
RENEW_RETRY: Final = 0.5
#: How often a pool with idle connections looks for waiters elsewhere, to give places back.
SHARE_EVERY: Final = 0.1
#: A waiting opener whose pool has needed no new connection for this long leaves the queue.
GIVE_UP_AFTER: Final = 0.5

# Scripts. KEYS: 1 holders (zset place -> expiry ms), 2 queue (zset waiter -> ticket), 3 waiter
# expiries (zset waiter -> expiry ms), 4 the ticket counter. Every script first drops expired
# holders and waiters, then sets the keys to expire when nobody has touched them for a while.
_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local gone = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
for i = 1, #gone do
  redis.call('ZREM', KEYS[2], gone[i])
  redis.call('ZREM', KEYS[3], gone[i])
end
local function keep(ms)
  for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], ms) end
end
-- KEYS[5] never expires: its absence means Redis lost the budget (a restart without
-- persistence, a flush) or never had it. Then no place is handed out until the fence time it
-- holds, so that pools whose leases were lost can register their connections again first.
local function fence_until(fence_ms)
  local until_ms = redis.call('GET', KEYS[5])
  if not until_ms then
    until_ms = now + fence_ms
    redis.call('SET', KEYS[5], until_ms)
  end
  return tonumber(until_ms)
end
"""

# ARGV: place, limit, lease ms, waiter ttl ms, fence ms. Returns {1, 0} when the place is held
# (taken or renewed), else {0, waiters ahead of it}.
_ACQUIRE = (
    _PRELUDE
    + """
local place, limit = ARGV[1], tonumber(ARGV[2])
local lease, ttl = tonumber(ARGV[3]), tonumber(ARGV[4])
keep(2 * math.max(lease, ttl))
if redis.call('ZSCORE', KEYS[1], place) then
  redis.call('ZADD', KEYS[1], now + lease, place)
  return {1, 0}
end
if not redis.call('ZSCORE', KEYS[2], place) then
  redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[4]), place)
end
local free = limit - redis.call('ZCARD', KEYS[1])
local ahead = redis.call('ZRANK', KEYS[2], place)
if ahead < free and now >= fence_until(tonumber(ARGV[5])) then
  redis.call('ZREM', KEYS[2], place)
  redis.call('ZREM', KEYS[3], place)
  redis.call('ZADD', KEYS[1], now + lease, place)
  return {1, 0}
end
redis.call('ZADD', KEYS[3], now + ttl, place)
return {0, ahead}
"""
)

# ARGV: place. Leaves the holders and the queue; returns 1 if it held a place.
_RELEASE = (
    _PRELUDE
    + """
local held = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return held
"""
)

# ARGV: limit, lease ms, fence ms, places... Extends the places still held; a place found lost
# (expired, or Redis restarted empty) is taken again if the budget has room, since its
# connection exists already. Returns the places lost for good.
_RENEW = (
    _PRELUDE
    + """
local limit, lease = tonumber(ARGV[1]), tonumber(ARGV[2])
keep(2 * math.max(lease, 2000))
fence_until(tonumber(ARGV[3]))
local lost = {}
for i = 4, #ARGV do
  local place = ARGV[i]
  if redis.call('ZSCORE', KEYS[1], place) then
    redis.call('ZADD', KEYS[1], now + lease, place)
  elseif redis.call('ZCARD', KEYS[1]) < limit then
    redis.call('ZADD', KEYS[1], now + lease, place)
  else
    table.insert(lost, place)
  end
end
return lost
"""
)

# Returns {places held, waiters, ms until the fence ends (0: none; -1: Redis lost the budget)}.
_COUNT = (
    _PRELUDE
    + """
local until_ms = redis.call('GET', KEYS[5])
local fence = -1
if until_ms then fence = math.max(0, tonumber(until_ms) - now) end
return {redis.call('ZCARD', KEYS[1]), redis.call('ZCARD', KEYS[2]), fence}
"""
)


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
                ("acquire", _ACQUIRE),
                ("release", _RELEASE),
                ("renew", _RENEW),
                ("count", _COUNT),
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

    def key_for(self, config: PoolConfig) -> str:
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
        # The hash tag keeps the four keys in one slot of a Redis Cluster.
        parts = ("holders", "queue", "waiting", "tickets", "fence")
        return [f"{{{key}}}:{part}" for part in parts]

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


# -- the pool's side -------------------------------------------------------------------------------


def _watch_socket(slot: PooledClient) -> socket.socket | None:
    """A second descriptor of *slot*'s socket, to see the server close its end after ours."""
    client = slot.client
    if client is None or not hasattr(socket, "TCP_INFO"):
        return None
    try:
        fd = client._imap.sock.fileno()
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

    def __init__(self, budget: RedisBudget, pool: Pool, nursery: trio.Nursery) -> None:
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
        pool._queued += 1
        pool._publish()
        unneeded_since: float | None = None

        def give_up() -> bool:
            # Not at the first moment without demand: checkouts with short deadlines come and
            # go, and an opener that left the queue would lose its turn to other processes.
            nonlocal unneeded_since
            if pool._closed:
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
            pool._queued -= 1
            pool._publish()
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
            try:
                _, waiting, reset = await self.budget._look(self.key)
                if reset:
                    await self._renew()
            except BudgetUnavailableError:
                continue
            others = waiting - pool._queued  # our own openers wait in the same queue
            if others <= 0:
                continue
            if pool._idle:
                pool.close_idle(min(others, pool._idle))
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
        keep: list[PooledClient] = []
        for slot in pool._take_all_idle():
            if slot.broken is None:
                keep.append(slot)
            else:
                pool._drop(slot, discarded=True)
        pool._put_back(keep)
        pool._publish()
