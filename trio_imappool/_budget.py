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

**Where it is.** The key names and the Lua scripts in :mod:`._budget_scripts` (no trio),
:class:`RedisBudget` in :mod:`._budget_redis`, the pool's side (:class:`PoolPlaces`) in
:mod:`._budget_places`; this module re-exports them.
"""

from __future__ import annotations

from ._budget_places import BudgetedPool, PoolPlaces
from ._budget_places import _wait_server_closed as _wait_server_closed
from ._budget_places import _watch_socket as _watch_socket
from ._budget_redis import BudgetStatistics, RedisBudget
from ._budget_scripts import (
    GIVE_UP_AFTER,
    POLL_FIRST,
    RENEW_RETRY,
    SERVER_CLOSE_WAIT,
    SHARE_EVERY,
    WAITER_TTL,
)

__all__ = [
    "GIVE_UP_AFTER",
    "POLL_FIRST",
    "RENEW_RETRY",
    "SERVER_CLOSE_WAIT",
    "SHARE_EVERY",
    "WAITER_TTL",
    "BudgetStatistics",
    "BudgetedPool",
    "PoolPlaces",
    "RedisBudget",
]
