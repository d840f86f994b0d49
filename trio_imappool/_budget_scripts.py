"""The connection budget's data in Redis: the key names and the Lua scripts. No trio, no I/O.

A budget *key* names five Redis keys (a hash tag keeps them in one slot of a Redis Cluster):
the holders (a sorted set: place -> lease expiry in ms), the queue (place -> ticket), the
waiters' expiries (place -> expiry in ms), the ticket counter, and the fence mark, which never
expires (see the module documentation of :mod:`trio_imappool._budget`). Each script is one
atomic step on the server; they read the time from Redis (``TIME``), never from a client.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "ACQUIRE",
    "COUNT",
    "GIVE_UP_AFTER",
    "POLL_FIRST",
    "RELEASE",
    "RENEW",
    "RENEW_RETRY",
    "SERVER_CLOSE_WAIT",
    "SHARE_EVERY",
    "WAITER_TTL",
    "redis_keys",
]

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
ACQUIRE = (
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
RELEASE = (
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
RENEW = (
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
COUNT = (
    _PRELUDE
    + """
local until_ms = redis.call('GET', KEYS[5])
local fence = -1
if until_ms then fence = math.max(0, tonumber(until_ms) - now) end
return {redis.call('ZCARD', KEYS[1]), redis.call('ZCARD', KEYS[2]), fence}
"""
)


def redis_keys(key: str) -> list[str]:
    """The five Redis keys of the budget *key*, in the order the scripts take them."""
    # The hash tag keeps the keys in one slot of a Redis Cluster.
    parts = ("holders", "queue", "waiting", "tickets", "fence")
    return [f"{{{key}}}:{part}" for part in parts]
