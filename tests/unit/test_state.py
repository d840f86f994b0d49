"""The pool's decisions (``trio_imappool._state.PoolState``), without a server, threads or trio.

Every test drives the state with an explicit clock and a seeded random source, and carries out
its actions in a small bookkeeping :class:`World`: a token per connection from its ``Open`` to
its ``Close`` (as the driver's size limiter does), the wakes, the LOGOUTs and background work
asked for. The rules are tested one by one, then a hypothesis state machine runs random
sequences of events and checks every invariant after every step.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from trio_imappool._state import (
    BACKOFF_CAP,
    BACKOFF_FIRST,
    LIMIT_RECHECK,
    Action,
    Close,
    Housekeep,
    Logout,
    Open,
    PoolState,
    Sizing,
    Waiter,
    Wake,
)


@dataclass(eq=False)
class Fake:
    """A connection as the state sees it (the fields of ``Member``), plus what the test sets:
    whether a look at its socket finds it alive, its selected folder."""

    number: int = 0
    created_at: float = 0.0
    last_used: float = 0.0
    expires_at: float = math.inf
    broken: str | None = None
    server_gone: bool = False
    busy: bool = False
    release_when_done: bool = False
    alive: bool = True
    selected: str | None = None

    def __repr__(self) -> str:
        return f"<Fake {id(self) % 10000} #{self.number} broken={self.broken}>"


@dataclass
class World:
    """A state and the record of the actions it returned."""

    sizing: Sizing
    seed: int = 1
    reset_on_release: bool = False
    now: float = 0.0
    tokens: set[Fake] = field(default_factory=set)
    closed: list[Fake] = field(default_factory=list)
    logouts: list[Fake] = field(default_factory=list)
    chores: list[tuple[Fake, str]] = field(default_factory=list)
    woken: list[Waiter[Fake]] = field(default_factory=list)
    numbers: Any = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self) -> None:
        self.state: PoolState[Fake] = PoolState(
            self.sizing,
            Fake,
            lambda c: c.alive,
            lambda c: self.reset_on_release and c.selected is not None,
            random.Random(self.seed),
        )

    def do(self, actions: list[Action[Fake]]) -> list[Action[Fake]]:
        for action in actions:  # closes first, as the driver does
            if isinstance(action, Close):
                assert action.conn in self.tokens, f"{action.conn} closed twice"
                self.tokens.remove(action.conn)
                self.closed.append(action.conn)
        for action in actions:
            if isinstance(action, Open):
                assert action.conn not in self.tokens
                self.tokens.add(action.conn)
            elif isinstance(action, Logout):
                self.logouts.append(action.conn)
            elif isinstance(action, Housekeep):
                self.chores.append((action.conn, action.what))
            elif isinstance(action, Wake):
                assert action.waiter not in self.woken, "a waiter woken twice"
                self.woken.append(action.waiter)
        return actions

    def opens(self, actions: list[Action[Fake]]) -> list[Fake]:
        return [a.conn for a in actions if isinstance(a, Open)]

    def open_all(self) -> None:
        """Every opener succeeds (in the order they started)."""
        for conn in list(self.state.opening):
            conn.number = next(self.numbers)
            self.do(self.state.opened(conn, self.now))

    def checkout(self, prefer: Any = None) -> Fake | None:
        conn, actions = self.state.checkout(self.now, prefer)
        self.do(actions)
        return conn

    def wait(self) -> Waiter[Fake]:
        waiter: Waiter[Fake] = Waiter()
        self.do(self.state.wait(waiter, self.now))
        return waiter

    def release(self, conn: Fake) -> list[Action[Fake]]:
        return self.do(self.state.checkout_ended(conn, self.now))

    def fail_open(
        self, conn: Fake, *, permanent: bool = False, limit: bool = False, gone: bool = False
    ) -> list[Action[Fake]]:
        return self.do(self.failed(conn, permanent=permanent, limit=limit, gone=gone))

    def failed(
        self, conn: Fake, *, permanent: bool = False, limit: bool = False, gone: bool = False
    ) -> list[Action[Fake]]:
        """The state's actions for a failed open (not carried out yet)."""
        error = ValueError("could not open")
        error.__cause__ = OSError("refused")
        return self.state.open_failed(
            conn, self.now, error, permanent=permanent, limit=limit, server_gone=gone
        )

    def warm(self, count: int) -> list[Fake]:
        """*count* connections opened and checked out (the first one through the probe)."""
        held = []
        for _ in range(count):
            conn = self.checkout()
            if conn is None:
                waiter = self.wait()
                self.open_all()
                assert waiter.conn is not None
                conn, waiter.conn = waiter.conn, None
            held.append(conn)
        return held


def world(**sizing: Any) -> World:
    seed = sizing.pop("seed", 1)
    reset = sizing.pop("reset_on_release", False)
    return World(Sizing(**sizing), seed=seed, reset_on_release=reset)


# -- the rules, one by one ----------------------------------------------------------------------


def test_waiters_are_served_first_come_first_served() -> None:
    w = world(max_size=1)
    (conn,) = w.warm(1)
    first, second, third = w.wait(), w.wait(), w.wait()
    assert w.state.opening == {}  # at max_size: nothing more to open
    w.release(conn)
    assert first.conn is conn and second.conn is None
    assert w.woken[-1] is first
    w.release(conn)
    assert second.conn is conn and third.conn is None
    assert len(w.state.waiters) == 1


def test_a_task_whose_connection_failed_its_check_keeps_its_turn() -> None:
    w = world(max_size=1)
    (conn,) = w.warm(1)
    first = w.wait()
    w.release(conn)
    assert first.conn is conn  # handed over; then its NOOP check fails
    conn.broken = "the NOOP check failed"
    later = w.wait()  # came while the check ran
    w.release(conn)  # dropped: a new one opens
    again: Waiter[Fake] = Waiter()
    w.do(w.state.wait(again, w.now, first=True))  # the same task queues again
    assert list(w.state.waiters) == [again, later]
    w.open_all()
    assert again.conn is not None and later.conn is None


def test_a_waiter_cancelled_after_it_was_handed_a_connection_gives_it_back() -> None:
    w = world(max_size=1)
    (conn,) = w.warm(1)
    first, second = w.wait(), w.wait()
    w.release(conn)
    assert first.conn is conn
    w.do(w.state.abandon(first, w.now))  # cancelled before its task took the connection
    assert first.conn is None and second.conn is conn
    assert w.state.in_use == {conn: "task"} and not w.state.idle


def test_a_waiter_that_leaves_the_queue_is_no_longer_counted() -> None:
    w = world(max_size=1)
    w.warm(1)
    waiter = w.wait()
    w.do(w.state.abandon(waiter, w.now))
    assert len(w.state.waiters) == 0 and waiter.conn is None


def test_until_the_first_login_one_connection_opens_at_a_time() -> None:
    w = world(max_size=5)
    waiters = [w.wait() for _ in range(3)]
    (probe_conn,) = w.state.opening
    assert w.state.leads(probe_conn)
    # Once the probe has reached the server, the others connect too (and follow it).
    followers = w.opens(w.do(w.state.probe_reached(probe_conn, w.now)))
    assert len(followers) == 2
    assert all(w.state.opening[f] is w.state.opening[probe_conn] for f in followers)
    probe = w.state.opening[probe_conn]
    assert probe is not None
    w.state.probe_settled(probe, logged_in=True)
    w.open_all()
    assert [x.conn is not None for x in waiters] == [True, True, True]


def test_a_failure_before_the_first_login_goes_to_every_waiter() -> None:
    w = world(max_size=5)
    waiters = [w.wait() for _ in range(3)]
    (probe_conn,) = w.state.opening
    w.fail_open(probe_conn)
    assert all(isinstance(x.error, ValueError) for x in waiters)
    assert all(x.error is not waiters[0].error for x in waiters[1:])  # each its own copy
    assert w.woken == waiters and len(w.state.waiters) == 0
    assert w.state.opening == {} and w.tokens == set()


def test_after_the_first_login_failures_are_retried_by_the_last_opener_with_backoff() -> None:
    w = world(max_size=3, seed=7)
    (held,) = w.warm(1)
    waiter = w.wait()
    (opener,) = w.state.opening
    delays = []
    for _ in range(6):
        actions = w.fail_open(opener)
        assert waiter.error is None  # an outage: the waiter keeps waiting
        (opener,) = w.opens(actions)  # a fresh connection, the only one trying
        assert w.state.leads(opener)
        delays.append(w.state.next_attempt_at - w.now)
    bounds = [min(BACKOFF_CAP, BACKOFF_FIRST * 2**i) for i in range(6)]
    assert all(0.5 * b <= d < b for d, b in zip(delays, bounds, strict=True)), delays
    # The jitter comes from the seeded source: the same seed, the same delays.
    again = world(max_size=3, seed=7)
    again.warm(1)
    again.wait()
    (other,) = again.state.opening
    replay = []
    for _ in range(6):
        (other,) = again.opens(again.fail_open(other))
        replay.append(again.state.next_attempt_at - again.now)
    assert replay == delays
    assert held in w.state.in_use


def test_a_permanent_failure_goes_to_every_waiter_and_is_not_retried() -> None:
    w = world(max_size=3)
    w.warm(1)
    waiter = w.wait()
    (opener,) = w.state.opening
    actions = w.fail_open(opener, permanent=True)
    assert w.opens(actions) == [] and isinstance(waiter.error, ValueError)


def test_a_connection_limit_lowers_the_size_and_invalidation_resets_it() -> None:
    w = world(max_size=4)
    held = w.warm(2)
    waiter = w.wait()
    (opener,) = w.state.opening
    actions = w.fail_open(opener, limit=True)
    assert w.opens(actions) == [] and waiter.error is None
    assert w.state.limit == 2  # the connections we have are what the server allows
    assert w.state.opening == {}
    w.now += LIMIT_RECHECK
    w.do(w.state.maintain(w.now))
    assert w.state.limit == 3  # one more than the server last allowed
    assert len(w.state.opening) == 1  # for the waiter
    w.do(w.state.invalidate(w.now, "drain() was called"))
    assert w.state.limit == 4 and w.state.limit_lowered_at is None
    assert held[0] in w.state.in_use


def test_idle_connections_past_max_idle_are_retired_down_to_min_size() -> None:
    w = world(min_size=1, max_size=3, max_idle=10.0)
    w.open_all()  # min_size's one
    held = w.warm(3)
    for conn in held:
        w.release(conn)
    w.now += 11
    w.do(w.state.maintain(w.now))
    assert len(w.logouts) == 2 and len(w.state.idle) == 1
    for conn in w.logouts:
        w.do(w.state.logged_out(conn, w.now))
    assert w.state.size == 1 and len(w.tokens) == 1


def test_max_lifetime_has_jitter_and_retires_connections() -> None:
    w = world(max_size=2, max_lifetime=100.0)
    (conn,) = w.warm(1)
    assert 90.0 <= conn.expires_at - conn.created_at <= 100.0
    w.now = conn.expires_at
    w.release(conn)  # released past its lifetime: logged out, not kept
    assert w.logouts == [conn] and conn not in w.state.idle
    (other,) = w.warm(1)
    w.release(other)
    w.now = other.expires_at
    assert w.checkout() is None  # the expired idle one is not handed out
    assert other in w.closed and other.broken == "reached max_lifetime"


def test_invalidation_drops_the_idle_ones_and_the_older_ones_when_they_come_back() -> None:
    w = world(max_size=3)
    idle, held = w.warm(2)
    w.release(idle)
    w.now += 1
    w.do(w.state.invalidate(w.now, "drain() was called"))
    assert idle in w.closed and not w.state.idle
    w.now += 1
    w.release(held)
    assert held in w.closed and held.broken == "opened before a server failure or drain()"
    (fresh,) = w.warm(1)
    w.release(fresh)
    assert list(w.state.idle) == [fresh]


def test_a_connection_that_lost_its_server_invalidates_the_others() -> None:
    w = world(max_size=3)
    idle, held = w.warm(2)
    w.release(idle)
    w.now += 1
    held.broken, held.server_gone = "EOF", True
    w.release(held)
    assert set(w.closed) == {idle, held}


def test_a_checkout_ended_while_a_shared_command_runs_releases_it_when_the_command_ends() -> None:
    w = world(max_size=1)
    (conn,) = w.warm(1)
    waiter = w.wait()
    conn.busy = True  # another task runs a command on the checkout
    assert w.release(conn) == []
    assert conn in w.state.in_use and waiter.conn is None and conn.release_when_done
    w.do(w.state.command_ended(conn, w.now) or [])
    assert waiter.conn is conn and not conn.busy and not conn.release_when_done


def test_an_unusable_idle_candidate_is_dropped_never_put_back() -> None:
    w = world(max_size=3)
    a, b, c = w.warm(3)
    for conn in (a, b, c):
        conn.selected = "INBOX" if conn is not c else "Archive"
        w.release(conn)
    a.alive = False  # the server closed it while it was idle
    got = w.checkout(lambda x: x.selected == "INBOX")
    assert got is b and a in w.closed and a not in w.state.idle
    assert list(w.state.idle) == [c] and a not in w.tokens
    c.alive = False
    assert w.checkout() is None and c in w.closed and not w.state.idle


def test_reset_on_release_unselects_before_the_connection_is_reused() -> None:
    w = world(max_size=1, reset_on_release=True)
    (conn,) = w.warm(1)
    waiter = w.wait()
    conn.selected = "INBOX"
    w.release(conn)
    assert w.chores == [(conn, "reset")] and waiter.conn is None
    conn.selected = None  # the driver's UNSELECT
    w.do(w.state.release(conn, w.now))
    assert waiter.conn is conn


def test_keepalive_and_the_noop_check_after_a_long_idle() -> None:
    w = world(max_size=1, keepalive=5.0, noop_check_after=3.0)
    (conn,) = w.warm(1)
    w.release(conn)
    w.now += 4
    assert w.state.needs_check(conn, w.now)
    w.now += 2
    w.do(w.state.maintain(w.now))
    assert w.chores == [(conn, "keepalive")] and not w.state.idle
    w.do(w.state.release(conn, w.now))
    assert list(w.state.idle) == [conn] and not w.state.needs_check(conn, w.now)


def test_closing_fails_the_waiters_and_logs_out_the_idle_ones() -> None:
    w = world(max_size=2)
    idle, held = w.warm(2)
    w.release(idle)
    waiter = w.wait()
    w.do(w.state.close(RuntimeError("closed")))
    assert isinstance(waiter.error, RuntimeError) and w.logouts == [idle]
    w.release(held)
    assert held in w.closed
    w.do(w.state.logged_out(idle, w.now))
    assert w.tokens == set() and w.state.size == 0


def test_close_idle_takes_the_longest_unused_first() -> None:
    w = world(max_size=3)
    a, b, c = w.warm(3)
    for conn in (b, a, c):
        w.release(conn)
    taken, actions = w.state.close_idle(2, w.now)
    w.do(actions)
    assert taken == 2 and w.logouts == [b, a] and list(w.state.idle) == [c]


def test_min_size_is_opened_without_waiters() -> None:
    w = world(min_size=2, max_size=4)
    w.do(w.state.maintain(w.now))
    assert len(w.state.opening) == 1  # the probe first
    w.open_all()
    assert len(w.state.opening) == 1  # then the rest
    w.open_all()
    assert len(w.state.idle) == 2 and w.state.opening == {}


def test_a_second_release_raises_instead_of_corrupting_the_state() -> None:
    w = world(max_size=2)
    (conn,) = w.warm(1)
    w.release(conn)
    with pytest.raises(RuntimeError, match="released twice"):
        w.state.release(conn, w.now)
    assert list(w.state.idle) == [conn] and w.state.size == 1


# -- random sequences ---------------------------------------------------------------------------

FOLDERS = ("INBOX", "Archive")


class PoolStateMachine(RuleBasedStateMachine):
    """Random events over one PoolState; every invariant after every step."""

    @initialize(
        min_size=st.integers(0, 2),
        max_size=st.integers(1, 4),
        reset=st.booleans(),
        seed=st.integers(0, 2**16),
        warm=st.lists(st.sampled_from((None, *FOLDERS, *FOLDERS)), min_size=2, max_size=4),
    )
    def start(
        self, min_size: int, max_size: int, reset: bool, seed: int, warm: list[str | None]
    ) -> None:
        self.w = world(
            min_size=min(min_size, max_size),
            max_size=max_size,
            max_idle=20.0,
            max_lifetime=100.0,
            keepalive=15.0,
            seed=seed,
            reset_on_release=reset,
        )
        self.held: list[Fake] = []  # checked out by tasks
        self.orphans: list[Fake] = []  # checkout ended while a shared command runs
        self.queue: list[Waiter[Fake]] = []  # waiting, in arrival order
        self.handed: list[Waiter[Fake]] = []  # handed a connection, task not yet resumed
        self.seen_wakes = 0
        self.ever_closed: set[Fake] = set()
        self.steps = 0
        # Start with some connections idle, with these folders selected.
        warm = warm[:max_size]
        for conn, folder in zip(self.w.warm(len(warm)), warm, strict=True):
            conn.selected = folder
            self.w.do(self.w.state.release(conn, self.w.now))
        for conn, _ in self.w.chores:
            conn.selected = None
            self.w.do(self.w.state.release(conn, self.w.now))
        self.w.chores.clear()
        self.seen_wakes = len(self.w.woken)

    # -- carrying out actions, checking the hand-offs as they happen --

    def do(self, actions: list[Action[Fake]]) -> None:
        self.steps += 1
        self.w.do(actions)
        for waiter in self.w.woken[self.seen_wakes :]:
            assert waiter in self.queue, "woke a task that was not waiting"
            if waiter.conn is not None:
                assert waiter is self.queue[0], "a connection went past an earlier waiter"
                assert waiter.conn not in self.holders(), "one connection in two hands"
                self.handed.append(waiter)
            self.queue.remove(waiter)
        self.seen_wakes = len(self.w.woken)
        self.ever_closed.update(self.w.closed)
        for action in actions:
            if isinstance(action, Open):
                assert self.w.state.size <= self.w.state.limit, "opened past the limit"

    def holders(self) -> list[Fake]:
        return [*self.held, *self.orphans, *(h.conn for h in self.handed if h.conn)]

    # -- tasks --

    @rule(choice=st.integers(0, 5))
    def checkout(self, choice: int) -> None:
        """A task checks out a connection, often with the folder an idle one has selected."""
        state = self.w.state
        if state.closed:
            return
        options = [*[c.selected for c in state.idle][:3], None, *FOLDERS]
        folder = options[choice % len(options)]
        prefer = None if folder is None else (lambda c: c.selected == folder)
        conn, actions = state.checkout(self.w.now, prefer)
        self.do(actions)
        if conn is not None:
            assert not self.queue, "an idle connection went past the waiters"
            self.held.append(conn)
        else:
            waiter: Waiter[Fake] = Waiter()
            self.queue.append(waiter)
            self.do(state.wait(waiter, self.w.now))

    @precondition(lambda self: self.handed)
    @rule(index=st.integers(0, 10))
    def waiter_resumes(self, index: int) -> None:
        waiter = self.handed.pop(index % len(self.handed))
        assert waiter.conn is not None
        self.held.append(waiter.conn)
        waiter.conn = None

    @precondition(lambda self: self.handed or self.queue)
    @rule(index=st.integers(0, 10))
    def waiter_cancelled(self, index: int) -> None:
        pool = self.handed + self.queue
        waiter = pool[index % len(pool)]
        if waiter in self.handed:
            self.handed.remove(waiter)
        else:
            self.queue.remove(waiter)
        self.do(self.w.state.abandon(waiter, self.w.now))
        assert waiter.conn is None

    @precondition(lambda self: self.held)
    @rule(
        index=st.integers(0, 10),
        broken=st.booleans(),
        gone=st.booleans(),
        folder=st.sampled_from((None, *FOLDERS)),
    )
    def checkout_ends(self, index: int, broken: bool, gone: bool, folder: str | None) -> None:
        conn = self.held.pop(index % len(self.held))
        if not conn.busy:
            conn.selected = folder
            if broken:
                conn.broken, conn.server_gone = "EOF", gone
        if conn.busy:
            self.orphans.append(conn)  # comes back when its command ends
        self.do(self.w.state.checkout_ended(conn, self.w.now))

    @precondition(lambda self: any(not c.busy for c in self.held))
    @rule(index=st.integers(0, 10))
    def shared_command_starts(self, index: int) -> None:
        free = [c for c in self.held if not c.busy]
        free[index % len(free)].busy = True

    @precondition(lambda self: any(c.busy for c in self.held + self.orphans))
    @rule(index=st.integers(0, 10), broken=st.booleans())
    def shared_command_ends(self, index: int, broken: bool) -> None:
        busy = [c for c in self.held + self.orphans if c.busy]
        conn = busy[index % len(busy)]
        if broken:
            conn.broken = "EOF"
        if conn in self.orphans:
            self.orphans.remove(conn)
        self.do(self.w.state.command_ended(conn, self.w.now) or [])

    @precondition(lambda self: self.held)
    @rule(index=st.integers(0, 10))
    def lifetime_cut_short(self, index: int) -> None:
        self.held[index % len(self.held)].expires_at = self.w.now

    # -- openers --

    def _opener(self, index: int) -> Fake:
        openers = list(self.w.state.opening)
        return openers[index % len(openers)]

    @precondition(lambda self: self.w.state.opening)
    @rule(index=st.integers(0, 10))
    def open_succeeds(self, index: int) -> None:
        conn = self._opener(index)
        probe = self.w.state.opening[conn]
        if probe is not None and not self.w.state.leads(conn) and not probe.logged_in:
            return  # a follower logs in only after its probe did
        if self.w.state.leads(conn):
            assert probe is not None
            self.w.state.probe_settled(probe, logged_in=True)
        conn.number = next(self.w.numbers)
        self.do(self.w.state.opened(conn, self.w.now))

    @precondition(lambda self: self.w.state.opening)
    @rule(index=st.integers(0, 10))
    def probe_reaches_the_server(self, index: int) -> None:
        conn = self._opener(index)
        if self.w.state.leads(conn):
            self.do(self.w.state.probe_reached(conn, self.w.now))

    @precondition(lambda self: self.w.state.opening)
    @rule(
        index=st.integers(0, 10),
        permanent=st.booleans(),
        limit=st.booleans(),
        gone=st.booleans(),
    )
    def open_fails(self, index: int, permanent: bool, limit: bool, gone: bool) -> None:
        conn = self._opener(index)
        probe = self.w.state.opening[conn]
        if self.w.state.leads(conn):
            assert probe is not None
            self.w.state.probe_settled(probe, logged_in=False)
        self.do(self.w.failed(conn, permanent=permanent, limit=limit, gone=gone))

    @precondition(lambda self: self.w.state.opening)
    @rule(index=st.integers(0, 10))
    def opener_gives_up(self, index: int) -> None:
        conn = self._opener(index)
        probe = self.w.state.opening[conn]
        if self.w.state.leads(conn):
            assert probe is not None
            self.w.state.probe_settled(probe, logged_in=False)
        self.do(self.w.state.give_up_open(conn, self.w.now))

    # -- the pool's own work and the outside world --

    @precondition(lambda self: self.w.state.idle)
    @rule(index=st.integers(0, 10))
    def idle_connection_dies(self, index: int) -> None:
        idle = list(self.w.state.idle)
        idle[index % len(idle)].alive = False

    @precondition(lambda self: self.w.chores)
    @rule(ok=st.booleans())
    def chore_ends(self, ok: bool) -> None:
        conn, _ = self.w.chores.pop(0)
        if ok:
            conn.selected = None
        else:
            conn.broken = "could not be reset"
        self.do(self.w.state.release(conn, self.w.now))

    @precondition(lambda self: self.w.logouts)
    @rule()
    def logout_ends(self) -> None:
        conn = self.w.logouts.pop(0)
        self.do(self.w.state.logged_out(conn, self.w.now))

    @rule(
        event=st.sampled_from(("tick", "tick", "tick", "keepalive", "max_idle", "lifetime")),
        count=st.integers(1, 3),
    )
    def time_passes(self, event: str, count: int) -> None:
        """Time passes and the maintenance runs (or, seldom, drain() or close_idle())."""
        if event == "lifetime" and count == 3:
            self.do(self.w.state.invalidate(self.w.now, "drain() was called"))
            return
        if event == "max_idle" and count == 3:
            self.do(self.w.state.close_idle(count, self.w.now)[1])
            return
        seconds = {"tick": 0.5, "keepalive": 16.0, "max_idle": 21.0, "lifetime": 101.0}[event]
        self.w.now += seconds
        self.do(self.w.state.maintain(self.w.now))

    @precondition(lambda self: not self.w.state.closed and self.steps > 30)
    @rule()
    def pool_closes(self) -> None:
        self.do(self.w.state.close(RuntimeError("closed")))
        assert not self.queue

    # -- what must hold after every step --

    @invariant()
    def counts_are_the_collections(self) -> None:
        state = self.w.state
        idle, in_use, opening = list(state.idle), set(state.in_use), set(state.opening)
        assert len(set(idle)) == len(idle), f"one connection idle twice: {idle}"
        assert not set(idle) & in_use and not set(idle) & opening and not in_use & opening
        assert state.size == len(idle) + len(in_use) + len(opening)
        assert len(state.waiters) == len(self.queue)
        assert list(state.waiters) == self.queue, "the queue is not in arrival order"

    @invariant()
    def every_connection_holds_exactly_one_token(self) -> None:
        state = self.w.state
        placed = set(state.idle) | set(state.in_use) | set(state.opening)
        assert placed == self.w.tokens, (placed ^ self.w.tokens, state.idle)
        assert state.size <= state.sizing.max_size
        assert not placed & self.ever_closed, "a closed connection came back"

    @invariant()
    def no_connection_in_two_hands(self) -> None:
        state = self.w.state
        holders = self.holders()
        assert len(set(holders)) == len(holders), f"one connection in two hands: {holders}"
        for conn in holders:
            assert state.in_use.get(conn) == "task", f"{conn} is held but {state.in_use.get(conn)}"
        tasks = {c for c, why in state.in_use.items() if why == "task"}
        assert tasks == set(holders)

    @invariant()
    def idle_connections_are_free(self) -> None:
        for conn in self.w.state.idle:
            assert not conn.busy, f"{conn} is idle while a command runs on it"
            assert not conn.release_when_done
            assert conn.broken is None, conn

    @invariant()
    def nobody_waits_while_a_connection_is_idle(self) -> None:
        state = self.w.state
        assert not (state.waiters and state.idle), "a waiter waits beside an idle connection"

    @invariant()
    def waiters_have_openers_or_busy_connections(self) -> None:
        state = self.w.state
        if state.waiters and not state.closed and not state.failures:
            assert state.opening or state.in_use or state.size >= state.limit


TestPoolStateMachine = PoolStateMachine.TestCase
TestPoolStateMachine.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_the_state_module_imports_no_io() -> None:
    import ast
    import pathlib

    import trio_imappool._state as module

    tree = ast.parse(pathlib.Path(module.__file__).read_text())
    names = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        (node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level == 0
    }
    assert not names & {"trio", "imaplib", "imapclient", "socket", "ssl", "threading"}, names
    relative = {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level
    }
    assert relative <= {"_util", "_errors"}, relative


@pytest.mark.parametrize("seed", [0, 1])
def test_seeded_sources_give_the_same_lifetimes(seed: int) -> None:
    first, second = world(max_size=2, seed=seed), world(max_size=2, seed=seed)
    assert [c.expires_at for c in first.warm(2)] == [c.expires_at for c in second.warm(2)]
