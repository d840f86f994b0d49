"""The pool's decisions, without I/O: who gets which connection, what to open, close or check.

:class:`PoolState` is a plain synchronous object in the spirit of httpcore's
``_assign_requests_to_connections``: every event (a checkout, a release, an open that succeeded
or failed, a maintenance tick, ``drain()``, closing) is one method call that takes the time as an
argument, changes the state, and returns the :data:`Action` list for the driver
(:class:`~trio_imappool.Pool`) to carry out: open a connection, close one, log one out, reset or
NOOP it in the background, wake a waiting task. It imports no trio and touches no socket; the
random source (for backoff and lifetime jitter) is passed in, so tests can seed it.

Where every connection is, is the state's collections and nothing else: ``idle`` (a FIFO),
``in_use`` (checked out, or busy with the pool's own work) and ``opening``. The counts are
their lengths, never kept on the side. Waiting tasks are a FIFO of :class:`Waiter`; a released
or newly opened connection goes to the first of them, else to ``idle``.

The connections themselves are the driver's objects; the state reads and writes only the
fields of :class:`Member` (times, ``broken``, whether a command runs on it).
"""

from __future__ import annotations

import collections
import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Generic, Protocol, TypeVar

__all__ = [
    "Action",
    "Close",
    "Housekeep",
    "Logout",
    "Member",
    "Open",
    "PoolState",
    "Probe",
    "Sizing",
    "Waiter",
    "Wake",
]

logger = logging.getLogger("trio_imappool")

# Backoff between failed attempts to open a connection: doubles from the first to the cap, each
# delay multiplied by a random factor in [0.5, 1) so that pools do not retry in step.
BACKOFF_FIRST: Final = 0.05
BACKOFF_CAP: Final = 0.5
# After a login refused for too many connections: wait longer before the next attempt, and try
# one connection more than the server allowed after this long.
LIMIT_BACKOFF: Final = 1.0
LIMIT_RECHECK: Final = 30.0


class Member(Protocol):
    """What the state reads and writes of a connection (the driver's ``PooledClient``)."""

    number: int
    created_at: float
    last_used: float
    expires_at: float
    #: Why it must not be reused, or None while healthy.
    broken: str | None
    #: Set by the command that broke it when the error suggests the server went away.
    server_gone: bool
    #: A command runs on it (a task sharing the checkout); set by the driver around commands.
    busy: bool
    #: Its checkout ended while a command ran: it comes back when the command ends.
    release_when_done: bool


C = TypeVar("C", bound=Member)


@dataclass(frozen=True, slots=True)
class Sizing:
    """The settings the decisions depend on (a subset of :class:`PoolConfig`)."""

    name: str = "pool"
    min_size: int = 0
    max_size: int = 10
    max_idle: float = 600.0
    max_lifetime: float = 3600.0
    keepalive: float | None = None
    noop_check_after: float = 30.0


class Probe:
    """The one attempt to open a connection made while the server has not yet accepted us (or
    while opens fail). Once it has reached the server, other openers may connect too; they log
    in only after it has, and only if it did."""

    __slots__ = ("logged_in", "reached", "settled")

    def __init__(self) -> None:
        self.reached = False  # TCP, TLS, greeting (and STARTTLS) done
        self.settled = False  # its login ended, either way
        self.logged_in = False


class Waiter(Generic[C]):
    """A task waiting for a connection. The state sets :attr:`conn` (handed over) or
    :attr:`error` (the pool gave up on it) and returns :class:`Wake` for it."""

    __slots__ = ("conn", "error")

    def __init__(self) -> None:
        self.conn: C | None = None
        self.error: BaseException | None = None


@dataclass(frozen=True, slots=True)
class Open(Generic[C]):
    """Start opening *conn* (it is in ``opening`` and holds a place); *probe* is the probe it
    leads or follows, or None."""

    conn: C
    probe: Probe | None


@dataclass(frozen=True, slots=True)
class Close(Generic[C]):
    """Close *conn* now, without LOGOUT, and give its place back (it has left the state)."""

    conn: C
    discarded: bool


@dataclass(frozen=True, slots=True)
class Logout(Generic[C]):
    """LOGOUT *conn* in the background (it stays ``in_use``), then call ``logged_out``."""

    conn: C


@dataclass(frozen=True, slots=True)
class Housekeep(Generic[C]):
    """Run the pool's own command on *conn* ("reset" or "keepalive"; it stays ``in_use``),
    then ``release`` it."""

    conn: C
    what: str


@dataclass(frozen=True, slots=True)
class Wake(Generic[C]):
    """*waiter* left the queue with a connection or an error: wake its task."""

    waiter: Waiter[C]


Action = Open[C] | Close[C] | Logout[C] | Housekeep[C] | Wake[C]


class PoolState(Generic[C]):
    """The pool's decisions over its connections (see the module documentation).

    Args:
        sizing: The settings.
        new: Makes a connection object for an opener (the state never opens it).
        alive: A look at an idle connection without a round trip: False when its server
            closed it or spoke unasked.
        returned: Called when a connection comes back from its user: marks it broken if the
            user left it unusable; returns whether it needs a reset (an UNSELECT) first.
        rng: The random source for backoff and lifetime jitter.
    """

    def __init__(
        self,
        sizing: Sizing,
        new: Callable[[], C],
        alive: Callable[[C], bool],
        returned: Callable[[C], bool],
        rng: random.Random,
    ) -> None:
        self.sizing: Final = sizing
        self._new = new
        self._alive = alive
        self._returned = returned
        self._rng = rng
        self.idle: collections.deque[C] = collections.deque()
        #: Checked out (or handed to a waiter), or busy with the pool's own work (why).
        self.in_use: dict[C, str] = {}
        #: Being opened, with the probe each one leads or follows.
        self.opening: dict[C, Probe | None] = {}
        self.waiters: dict[Waiter[C], None] = {}  # insertion order is arrival order
        #: The connections the pool may have: ``max_size``, less after a limit refusal.
        self.limit = sizing.max_size
        self.limit_lowered_at: float | None = None
        self.closed = False
        self.ever_opened = False
        self.failures = 0
        self.probe: Probe | None = None
        self.next_attempt_at = -math.inf
        self.last_error: BaseException | None = None
        #: Connections opened before this time are not reused (server failure, drain()).
        self.invalid_before = -math.inf
        # Totals since the pool opened (not counts: those are the collections' lengths).
        self.opened_count = self.discarded_count = self.closed_count = self.failed_count = 0

    # -- counts, all derived --------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Connections that exist or are being opened: the places taken."""
        return len(self.idle) + len(self.in_use) + len(self.opening)

    def demand(self) -> int:
        """How many more connections are needed: for waiting tasks beyond the idle and the
        opening ones, or to reach min_size (negative: fewer would do)."""
        return max(
            len(self.waiters) - len(self.idle) - len(self.opening),
            self.sizing.min_size - self.size,
        )

    def healthy(self) -> bool:
        """Whether the pool has connections and none of the idle ones shows a closed socket."""
        return self.size - len(self.opening) > 0 and all(map(self._alive, self.idle))

    def needs_check(self, conn: C, now: float) -> bool:
        """Whether a checkout must NOOP *conn* first (it was idle for long)."""
        return now - conn.last_used > self.sizing.noop_check_after

    # -- checkout ---------------------------------------------------------------------------------

    def checkout(
        self, now: float, prefer: Callable[[C], bool] | None = None
    ) -> tuple[C | None, list[Action[C]]]:
        """Take a usable idle connection for a task (the first one *prefer* likes, if more
        than one is idle; otherwise the one idle longest). Candidates found unusable are
        closed, never put back. Returns None if no idle connection is usable."""
        actions: list[Action[C]] = []
        chosen: C | None = None
        if prefer is not None and len(self.idle) > 1:
            for conn in [c for c in self.idle if prefer(c)]:
                self.idle.remove(conn)
                if self._usable(conn, now):
                    chosen = conn
                    break
                actions += self._drop(conn, discarded=True)
        while chosen is None and self.idle:
            conn = self.idle.popleft()
            if self._usable(conn, now):
                chosen = conn
            else:
                actions += self._drop(conn, discarded=True)
        if chosen is not None:
            self.in_use[chosen] = "task"
        return chosen, actions + self._want(now)

    def wait(self, waiter: Waiter[C], now: float, *, first: bool = False) -> list[Action[C]]:
        """Queue *waiter* (last, or with *first* at the head: a task whose connection failed
        its check keeps its turn) and start openers it needs."""
        if first:
            self.waiters = {waiter: None, **self.waiters}
        else:
            self.waiters[waiter] = None
        return self._want(now)

    def abandon(self, waiter: Waiter[C], now: float) -> list[Action[C]]:
        """*waiter*'s task stopped waiting (cancelled, timed out). If it had been handed a
        connection it did not take, the connection goes back (to the next waiter)."""
        self.waiters.pop(waiter, None)
        conn, waiter.conn = waiter.conn, None
        if conn is None:
            return self._want(now)
        return self.release(conn, now)

    def checkout_ended(self, conn: C, now: float) -> list[Action[C]]:
        """A task's checkout ended. While another task (sharing the checkout) still runs a
        command on *conn*, it comes back only when that command ends."""
        if conn.busy:
            conn.release_when_done = True
            return []
        return self.release(conn, now)

    def command_ended(self, conn: C, now: float) -> list[Action[C]] | None:
        """A command on *conn* ended; releases it if its checkout ended meanwhile (else
        returns None: nothing changed, the checkout goes on)."""
        conn.busy = False
        if not conn.release_when_done:
            return None
        conn.release_when_done = False
        return self.release(conn, now)

    def release(self, conn: C, now: float) -> list[Action[C]]:
        """Take *conn* back from a task or from the pool's own work: to the first waiter or
        idle, or to a reset (it has a folder selected and the pool unselects on release), a
        LOGOUT (past its lifetime) or closed (broken, stale, pool closed)."""
        why = self.in_use.get(conn)
        if why is None or why == "logout":
            raise RuntimeError(
                f"{self.sizing.name}: internal error: connection #{conn.number} released "
                + ("twice" if why is None else "during its LOGOUT")
            )
        del self.in_use[conn]
        conn.last_used = now
        reset = self._returned(conn)
        actions: list[Action[C]] = []
        if conn.server_gone:
            actions += self.invalidate(now, f"#{conn.number} lost its server ({conn.broken})")
        self._mark_if_stale(conn)
        if conn.broken is not None or self.closed:
            actions += self._drop(conn, discarded=conn.broken is not None)
        elif now >= conn.expires_at:
            actions += self._retire(conn)
        elif reset:
            self.in_use[conn] = "reset"
            actions.append(Housekeep(conn, "reset"))
        else:
            actions += self._give(conn, now)
        return actions + self._want(now)

    def logged_out(self, conn: C, now: float) -> list[Action[C]]:
        """The LOGOUT of *conn* ended (either way): it is closed."""
        if self.in_use.get(conn) != "logout":
            raise RuntimeError(f"connection #{conn.number} logged out twice")
        del self.in_use[conn]
        return [*self._drop(conn, discarded=False), *self._want(now)]

    def _give(self, conn: C, now: float) -> list[Action[C]]:
        """Hand a usable connection to the first waiter, or make it idle."""
        if not self.waiters or not self._usable(conn, now):
            if conn.broken is not None:
                return self._drop(conn, discarded=True)
            self.idle.append(conn)
            return []
        waiter = next(iter(self.waiters))
        del self.waiters[waiter]
        waiter.conn = conn
        self.in_use[conn] = "task"
        return [Wake(waiter)]

    def _usable(self, conn: C, now: float) -> bool:
        """The checks made without a round trip; marks *conn* broken if one fails."""
        self._mark_if_stale(conn)
        if conn.broken is None:
            if now >= conn.expires_at:
                conn.broken = "reached max_lifetime"
            elif not self._alive(conn):
                conn.broken = "the server closed it or spoke unasked while it was idle"
        return conn.broken is None

    def _mark_if_stale(self, conn: C) -> None:
        if conn.broken is None and conn.created_at < self.invalid_before:
            conn.broken = "opened before a server failure or drain()"

    # -- closing connections ----------------------------------------------------------------------

    def _drop(self, conn: C, *, discarded: bool) -> list[Action[C]]:
        """Close *conn* (already out of every collection) without LOGOUT."""
        if discarded:
            self.discarded_count += 1
            logger.info("%s: discarding #%d (%s)", self.sizing.name, conn.number, conn.broken)
        else:
            self.closed_count += 1
        return [Close(conn, discarded)]

    def _retire(self, conn: C) -> list[Action[C]]:
        """Close a healthy connection (out of every collection) politely, in the background."""
        self.in_use[conn] = "logout"
        return [Logout(conn)]

    def close_idle(self, count: int, now: float) -> tuple[int, list[Action[C]]]:
        """Log out up to *count* idle connections, the longest unused first."""
        actions: list[Action[C]] = []
        taken = 0
        while self.idle and taken < count:
            actions += self._retire(self.idle.popleft())
            taken += 1
        return taken, actions + self._want(now)

    def drop_idle(self, now: float, which: Callable[[C], bool]) -> list[Action[C]]:
        """Close the idle connections *which* selects, without LOGOUT."""
        actions: list[Action[C]] = []
        for conn in [c for c in self.idle if which(c)]:
            self.idle.remove(conn)
            conn.broken = conn.broken or "dropped with the other idle connections"
            actions += self._drop(conn, discarded=True)
        return actions + self._want(now)

    def invalidate(self, now: float, why: str) -> list[Action[C]]:
        """Stop reusing every connection opened until now (a server failure, drain())."""
        self.invalid_before = now
        if self.limit_lowered_at is not None:
            # The server went away (or drain() was called): what it allowed before is no guide
            # to what it allows now.
            self.limit = self.sizing.max_size
            self.limit_lowered_at = None
        dropped = len(self.idle)
        actions = self.drop_idle(now, lambda _: True)
        if dropped:
            logger.warning("%s: %s: dropped %d idle connections", self.sizing.name, why, dropped)
        return actions

    def close(self, error: BaseException) -> list[Action[C]]:
        """The pool closes: waiters get (a copy of) *error*, idle connections are logged out;
        the others close when they come back or have opened."""
        self.closed = True
        actions = self._fail_waiters(error)
        while self.idle:
            actions += self._retire(self.idle.popleft())
        return actions

    def _fail_waiters(self, error: BaseException) -> list[Action[C]]:
        actions: list[Action[C]] = []
        for waiter in self.waiters:
            copy = type(error)(*error.args)
            copy.__cause__ = error.__cause__
            waiter.error = copy
            actions.append(Wake(waiter))
        self.waiters.clear()
        return actions

    # -- maintenance ------------------------------------------------------------------------------

    def maintain(self, now: float) -> list[Action[C]]:
        """Close idle connections past max_idle (above min_size) or max_lifetime, keep idle ones
        alive, and try one more place after a limit refusal, every LIMIT_RECHECK seconds."""
        sizing = self.sizing
        actions: list[Action[C]] = []
        keep: list[C] = []
        candidates = list(self.idle)
        self.idle.clear()
        staying = self.size + len(candidates)  # the places held, less those given up below
        for conn in candidates:
            self._mark_if_stale(conn)
            if conn.broken is not None:
                actions += self._drop(conn, discarded=True)
                staying -= 1
            elif now >= conn.expires_at or (
                now - conn.last_used >= sizing.max_idle and staying > sizing.min_size
            ):
                actions += self._retire(conn)
                staying -= 1
            elif sizing.keepalive is not None and now - conn.last_used >= sizing.keepalive:
                self.in_use[conn] = "keepalive"
                actions.append(Housekeep(conn, "keepalive"))
            else:
                keep.append(conn)
        self.idle = collections.deque(keep)
        if (
            self.limit_lowered_at is not None
            and now - self.limit_lowered_at >= LIMIT_RECHECK
            and self.limit < sizing.max_size
        ):
            self.limit += 1  # one more connection than the server last allowed
            self.limit_lowered_at = now if self.limit < sizing.max_size else None
        return actions + self._want(now)

    # -- opening ----------------------------------------------------------------------------------

    def _want(self, now: float) -> list[Action[C]]:
        """Start openers if tasks wait or min_size is not met."""
        if self.closed or (not self.waiters and self.size >= self.sizing.min_size):
            return []  # the common case, first
        wanted = self.demand()
        if wanted <= 0:
            return []
        probe = self.probe
        if probe is not None and probe.reached and not probe.settled:
            pass  # the others connect now and log in after the probe
        elif self.failures or not self.ever_opened:
            # Until the server has shown that it accepts us, and while opens fail, one attempt
            # at a time: a wrong password or port costs one try, not max_size.
            wanted = min(wanted, 1 - len(self.opening))
            if wanted > 0:
                probe = self.probe = Probe()
        else:
            probe = None
        actions: list[Action[C]] = []
        for _ in range(wanted):
            if self.size >= self.limit:
                break
            conn = self._new()
            self.opening[conn] = probe
            actions.append(Open(conn, probe))
        return actions

    def leads(self, conn: C) -> bool:
        """Whether *conn*'s opener is the probe's leader (it has not reached the server)."""
        probe = self.opening.get(conn)
        return probe is not None and probe is self.probe and not probe.reached

    def probe_reached(self, conn: C, now: float) -> list[Action[C]]:
        """The probe reached the server: the others may connect meanwhile."""
        probe = self.opening[conn]
        assert probe is not None
        probe.reached = True
        return self._want(now)

    def probe_settled(self, probe: Probe, logged_in: bool) -> None:
        """The probe's login ended."""
        probe.settled = True
        probe.logged_in = logged_in
        if self.probe is probe:
            self.probe = None

    def give_up_open(self, conn: C, now: float) -> list[Action[C]]:
        """An opener stops without a connection (not needed, or its probe failed)."""
        return self._forget_opener(conn, now)

    def opened(self, conn: C, now: float) -> list[Action[C]]:
        """*conn* has logged in: it goes to the first waiter, or idle."""
        del self.opening[conn]
        self.opened_count += 1
        conn.created_at = conn.last_used = now
        conn.expires_at = now + self.sizing.max_lifetime * self._rng.uniform(0.9, 1.0)
        self.ever_opened = True
        self.failures = 0
        self.last_error = None
        self.next_attempt_at = -math.inf
        if self.closed:
            return self._drop(conn, discarded=False)
        self.in_use[conn] = "opened"
        return self.release(conn, now)

    def open_failed(
        self,
        conn: C,
        now: float,
        error: BaseException,
        *,
        permanent: bool,
        limit: bool,
        server_gone: bool,
    ) -> list[Action[C]]:
        """An attempt to open *conn* failed with *error* (classified by the driver: whether
        retrying cannot mend it, whether the server refused for too many connections, whether
        the server seems gone). While opens fail, the last opener retries, with a fresh
        connection, not before :attr:`next_attempt_at` (exponential backoff with jitter)."""
        self.failed_count += 1
        self.failures += 1
        if limit:
            delay = LIMIT_BACKOFF * 2 ** min(self.failures - 1, 3)
        else:
            delay = min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** (self.failures - 1))
        self.next_attempt_at = now + delay * self._rng.uniform(0.5, 1.0)
        self.last_error = error
        actions: list[Action[C]] = []
        if permanent or not self.ever_opened:
            actions += self._fail_waiters(error)
        if limit and self._lower_limit(now):
            return actions + self._forget_opener(conn, now)  # what we have is the limit
        if server_gone:
            actions += self.invalidate(now, f"opening failed ({type(error.__cause__).__name__})")
        if permanent or len(self.opening) > 1 or self.demand() < 0 or self.closed:
            return actions + self._forget_opener(conn, now)  # only the last one retries
        del self.opening[conn]
        actions.append(Close(conn, discarded=False))
        if self.size >= self.limit:
            return actions + self._want(now)
        fresh = self._new()  # a fresh one: the failed one may hold a half-made client
        probe = self.probe = Probe()  # still the only one trying
        self.opening[fresh] = probe
        return [*actions, Open(fresh, probe)]

    def _forget_opener(self, conn: C, now: float) -> list[Action[C]]:
        del self.opening[conn]
        return [Close(conn, discarded=False), *self._want(now)]

    def _lower_limit(self, now: float) -> bool:
        """After a login refused for too many connections: make the connections we have the
        pool's limit, if we have any. Returns whether it did."""
        have = len(self.idle) + len(self.in_use)
        if have < 1:
            return False
        if have < self.limit:
            logger.warning(
                "%s: the server allows no more connections: using %d of max_size %d",
                self.sizing.name,
                have,
                self.sizing.max_size,
            )
            self.limit = have
        self.limit_lowered_at = now
        return True
