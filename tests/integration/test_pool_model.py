"""Model-based test of the pool: random sequences of operations, invariants after every step.

A hypothesis :class:`~hypothesis.stateful.RuleBasedStateMachine` drives one pool against a
Dovecot of the test's own through the fault proxy: checkouts (plain and folder-affine), releases,
commands under random deadlines, a child task running a command on a shared checkout, cancelling
a holder, server kicks and restarts, stalls and drains. After every step it checks what the
pool promises, from the inside (the pool's own records) and from the outside (Dovecot's
sessions):

- ``idle + in_use + opening == size <= max_size``;
- every token of the size limiter is held by exactly one live connection, and every idle
  connection holds one;
- no connection is in two hands (idle and checked out, or checked out twice);
- no worker thread is inside a client that is idle, and none is left after close;
- Dovecot never has more sessions than the pool has connections (after every step), and none
  once the pool is closed.

The machine runs synchronously in a thread of its own (hypothesis drives it) and does each step
in the test's Trio run with :func:`trio.from_thread.run`; connections are held by tasks of that
run. Everything is bounded: each step under a deadline, the whole run under pytest-timeout.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import hypothesis.strategies as st
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError

from trio_imappool import Connection, Pool, PoolError, open_pool
from trio_imappool.testing import DovecotFactory, DovecotServer, FaultProxy, open_fault_proxy

T = TypeVar("T")

MAX_SIZE = 3
STEP_LIMIT = 8.0  # no single step may take longer than this
FOLDERS = ("INBOX", "Archive")


class _Holder:
    """A task that holds one checkout until told to release it."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.conn: Connection | None = None
        self.scope = trio.CancelScope()
        self.got = trio.Event()
        self.release = trio.Event()
        self.done = trio.Event()
        self.error: BaseException | None = None
        self.children: list[trio.Event] = []

    def __repr__(self) -> str:
        return f"holder{self.number}"

    @property
    def child_running(self) -> bool:
        return any(not done.is_set() for done in self.children)


# What a step may see without the pool being wrong.
EXPECTED = (PoolError, IMAPClientError, OSError, trio.TooSlowError)


class _World:
    """What the machine shares with the Trio side: the run, the server, the proxy."""

    def __init__(
        self,
        token: trio.lowlevel.TrioToken,
        nursery: trio.Nursery,
        server: DovecotServer,
        proxy: FaultProxy,
        account: dict[str, Any],
    ) -> None:
        self.token = token
        self.nursery = nursery
        self.server = server
        self.proxy = proxy
        self.account = account

    def run(self, fn: Callable[[], Awaitable[T]]) -> T:
        async def bounded() -> T:
            with trio.fail_after(STEP_LIMIT):
                return await fn()

        return trio.from_thread.run(bounded, trio_token=self.token)

    def call(self, fn: Callable[[], T]) -> T:
        """Call a synchronous function of the Trio side (the proxy's controls) in the run."""
        return trio.from_thread.run_sync(fn, trio_token=self.token)


def _blocking_noop(client: IMAPClient, seconds: float) -> None:
    time.sleep(seconds)  # a slow command: a long response on a slow link
    client.noop()


class PoolModel(RuleBasedStateMachine):
    world: _World

    holders = Bundle("holders")

    def __init__(self) -> None:
        super().__init__()
        self.pool: Pool | None = None
        self.pool_error: BaseException | None = None
        self.closed = trio.Event()
        self.stop = trio.Event()
        self.live: list[_Holder] = []
        self.numbers = 0
        self.stalled = False
        self.restarted = False
        self.world.run(self._start_pool)

    # -- the Trio side --

    async def _start_pool(self) -> None:
        ready = trio.Event()

        async def host() -> None:
            try:
                async with open_pool(
                    **self.world.account,
                    max_size=MAX_SIZE,
                    acquire_timeout=0.5,
                    connect_timeout=0.5,
                    login_timeout=0.5,
                    read_timeout=2.0,
                    logout_timeout=0.5,
                ) as pool:
                    self.pool = pool
                    ready.set()
                    await self.stop.wait()
            except BaseException as exc:  # recorded: the invariant fails
                self.pool_error = exc
            finally:
                ready.set()
                self.closed.set()

        self.world.nursery.start_soon(host)
        await ready.wait()

    async def _hold(self, holder: _Holder, folder: str | None, readonly: bool) -> None:
        assert self.pool is not None
        try:
            with holder.scope:
                async with self.pool.connection(folder, readonly=readonly) as conn:
                    holder.conn = conn
                    holder.got.set()
                    await holder.release.wait()
        except Exception as exc:  # judged by the machine (_check_step_error)
            holder.error = exc
        finally:
            holder.conn = None
            holder.got.set()
            holder.done.set()

    # -- rules --

    @precondition(lambda self: len(self.live) < MAX_SIZE)
    @rule(
        target=holders,
        folder=st.sampled_from([None, "INBOX", "INBOX", "Archive"]),
        readonly=st.booleans(),
    )
    def checkout(self, folder: str | None, readonly: bool) -> _Holder:
        self.numbers += 1
        holder = _Holder(self.numbers)

        async def start() -> None:
            self.world.nursery.start_soon(self._hold, holder, folder, readonly)
            await holder.got.wait()

        self.world.run(start)
        self._check_step_error(holder)
        if holder.conn is not None:
            self.live.append(holder)
        return holder

    @rule(holder=consumes(holders))
    def release(self, holder: _Holder) -> None:
        async def release() -> None:
            holder.release.set()
            await holder.done.wait()

        self.world.run(release)
        self._check_step_error(holder)
        if holder in self.live:
            self.live.remove(holder)

    @rule(holder=consumes(holders))
    def cancel_holder(self, holder: _Holder) -> None:
        async def cancel() -> None:
            holder.scope.cancel()
            await holder.done.wait()

        self.world.run(cancel)
        self._check_step_error(holder)
        if holder in self.live:
            self.live.remove(holder)

    @rule(
        holder=holders,
        command=st.sampled_from(["noop", "select", "examine", "search", "missing"]),
        deadline=st.one_of(st.none(), st.floats(0.0, 0.05)),
    )
    def command(self, holder: _Holder, command: str, deadline: float | None) -> None:
        conn = holder.conn
        if conn is None:
            return
        if self.stalled and deadline is None:
            deadline = 0.2  # a stalled link answers nothing: only a deadline ends the command

        async def run() -> None:
            with trio.move_on_after(deadline if deadline is not None else STEP_LIMIT / 2):
                if command == "noop":
                    await conn.noop()
                elif command == "select":
                    await conn.select_folder("INBOX")
                elif command == "examine":
                    await conn.select_folder("Archive", readonly=True)
                elif command == "search":
                    await conn.select_folder("INBOX", readonly=True)
                    await conn.search(["ALL"])
                else:
                    await conn.select_folder("No such folder")

        try:
            self.world.run(run)
        except trio.BusyResourceError:
            assert holder.child_running, "BusyResourceError without another command running"
        except EXPECTED:
            pass

    @rule(holder=holders, seconds=st.sampled_from([0.05, 0.2]))
    def child_command(self, holder: _Holder, seconds: float) -> None:
        """Another task runs a slow command on the same checkout and is not waited for."""
        conn = holder.conn
        if conn is None:
            return
        done = trio.Event()
        holder.children.append(done)

        async def child() -> None:
            try:
                await conn.run_sync(_blocking_noop, seconds)
            except (*EXPECTED, trio.BusyResourceError, trio.ClosedResourceError):
                pass
            finally:
                done.set()

        async def start() -> None:
            self.world.nursery.start_soon(child)
            await trio.sleep(0.01)  # let its thread start

        self.world.run(start)

    @precondition(lambda self: not self.restarted)
    @rule()
    def restart(self) -> None:
        """The server goes away and comes back on the same port (once per run: it is slow)."""
        self.restarted = True
        self.world.server.restart()

    @rule()
    def kick(self) -> None:
        self.world.server.kick(self.world.account["username"])

    @precondition(lambda self: not self.stalled)
    @rule()
    def stall(self) -> None:
        self.world.call(self.world.proxy.stall)
        self.stalled = True

    @precondition(lambda self: self.stalled)
    @rule()
    def resume(self) -> None:
        self.world.call(self.world.proxy.resume)
        self.stalled = False

    @rule()
    def drain(self) -> None:
        async def drain() -> None:
            assert self.pool is not None
            self.pool.drain()
            await trio.lowlevel.checkpoint()

        self.world.run(drain)

    @rule(seconds=st.sampled_from([0.0, 0.05, 0.3]))
    def wait(self, seconds: float) -> None:
        """Let background work (opens, children, maintenance) move on."""

        async def wait() -> None:
            await trio.sleep(seconds)

        self.world.run(wait)

    # -- invariants --

    def _check_step_error(self, holder: _Holder) -> None:
        error = holder.error
        if error is not None and not isinstance(error, EXPECTED):
            raise AssertionError(f"{holder} got {error!r}") from error

    @invariant()
    def pool_is_whole(self) -> None:
        if self.pool_error is not None:
            raise AssertionError(f"the pool failed: {self.pool_error!r}") from self.pool_error
        for holder in self.live:
            self._check_step_error(holder)
        self.world.run(self._check_inside)
        self._check_server()

    def _check_server(self) -> None:
        """Dovecot never has more sessions for the user than the pool has connections: none
        leaked. (Not equality after every step: after a kick or a restart the pool learns that
        its idle connections are dead only when it next looks at them; Dovecot counts a closed
        session for a moment longer, so the check waits a little for it to settle; and while
        the proxy stalls, the pool's closes do not reach the server.)"""
        if self.stalled:
            return  # the proxy holds the pool's closes back from the server
        pool = self.pool
        assert pool is not None
        user = self.world.account["username"]
        deadline = time.monotonic() + 3
        while True:
            size = self.world.call(lambda: pool.statistics().size)
            seen = self.world.server.connections(user)
            if seen <= size:
                return
            assert time.monotonic() < deadline, f"Dovecot has {seen} sessions, the pool {size}"
            time.sleep(0.05)

    async def _check_inside(self) -> None:
        # Let connections handed to waiting tasks reach them.
        await trio.testing.wait_all_tasks_blocked()
        pool = self.pool
        assert pool is not None
        stats = pool.statistics()
        assert stats.size == stats.idle + stats.in_use + stats.opening, stats
        assert 0 <= stats.size <= MAX_SIZE, stats
        assert min(stats.idle, stats.in_use, stats.opening, stats.waiting) >= 0, stats
        idle = _idle_connections(pool)
        assert len(idle) == stats.idle, (idle, stats)
        assert len(set(map(id, idle))) == len(idle), f"one connection idle twice: {idle}"
        borrowers = pool._size_limiter.statistics().borrowers
        assert len(borrowers) == stats.size, (borrowers, stats)
        for slot in idle:
            assert slot in borrowers, f"idle {slot!r} holds no place in the pool"
            assert not slot.thread_running, f"a worker thread is inside idle {slot!r}"
            assert not slot.busy, f"a command is running on idle {slot!r}"
            assert slot.broken is None or slot.broken == "closed", slot
        held = [h.conn._slot for h in self.live if h.conn is not None and h.conn._slot]
        assert len(set(map(id, held))) == len(held), f"one connection in two hands: {held}"
        for slot in held:
            assert slot not in idle, f"{slot!r} is idle and checked out"
            assert slot in borrowers, f"checked-out {slot!r} holds no place in the pool"

    def teardown(self) -> None:
        if self.stalled:
            self.world.call(self.world.proxy.resume)
            self.stalled = False

        async def finish() -> None:
            for holder in self.live:
                holder.release.set()
            for holder in self.live:
                await holder.done.wait()
            for holder in self.live:
                for child in holder.children:
                    await child.wait()
            self.stop.set()
            await self.closed.wait()
            with trio.move_on_after(5):
                await trio.testing.wait_all_threads_completed()
            assert trio.testing.active_thread_count() == 0, "worker threads left after close"

        try:
            self.world.run(finish)
            if self.pool_error is not None:
                raise AssertionError(f"the pool failed: {self.pool_error!r}") from self.pool_error
            assert self.pool is not None
            leftover = [
                (slot, getattr(slot, "place", None))
                for slot in self.pool._size_limiter.statistics().borrowers
            ]
            assert self.pool.statistics().size == 0, f"places still held: {leftover}"
            deadline = time.monotonic() + 5
            user = self.world.account["username"]
            while (seen := self.world.server.connections(user)) != 0:
                assert time.monotonic() < deadline, f"Dovecot still has {seen} sessions"
                time.sleep(0.05)
        finally:
            self.world.call(self.world.proxy.resume)


def _idle_connections(pool: Pool) -> list[Any]:
    """The pool's idle connections, in order (read without taking them)."""
    return list(pool._state.idle)


@pytest.mark.timeout(600)
async def test_the_pool_keeps_its_invariants_under_random_sequences(
    dovecot_factory: DovecotFactory,
) -> None:
    server = dovecot_factory(users={"model": "model-pw"}, max_userip_connections=50)
    server.doveadm("mailbox", "create", "-u", "model", "Archive")
    account = server.pool_kwargs("model", tls=False)
    async with open_fault_proxy(account["host"], account["port"]) as proxy:
        account["port"] = proxy.port
        finished = trio.Event()
        failure: list[BaseException] = []
        async with trio.open_nursery() as nursery:
            world = _World(trio.lowlevel.current_trio_token(), nursery, server, proxy, account)
            model = type("BoundPoolModel", (PoolModel,), {"world": world})

            def drive() -> None:
                try:
                    run_state_machine_as_test(
                        model,
                        settings=settings(
                            max_examples=30,
                            stateful_step_count=25,
                            deadline=None,
                            suppress_health_check=list(HealthCheck),
                            # No shrinking: it takes minutes with a real server, and the
                            # failing sequence is printed as it is.
                            phases=[Phase.explicit, Phase.reuse, Phase.generate],
                        ),
                    )
                except BaseException as exc:  # reported in the Trio run
                    failure.append(exc)
                finally:
                    world.token.run_sync_soon(finished.set)

            threading.Thread(target=drive, name="pool-model", daemon=True).start()
            await finished.wait()
        if failure:
            raise failure[0]
