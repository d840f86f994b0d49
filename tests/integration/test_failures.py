"""The failure model against Dovecot, with faults injected through our loopback proxy.

Prompt cancellation of blocked commands, health checks, lifetime, bulk invalidation, recovery
after a restart, connection limits, and the scenarios other pools got wrong (named in each
test's docstring). Every test runs under a deadline; faults are bounded and stop by themselves.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError

from trio_imappool import (
    ConnectError,
    Pool,
    PoolError,
    PoolTimeout,
    open_pool,
)
from trio_imappool.testing import DovecotServer, FaultProxy, open_fault_proxy, seed_folders
from trio_imappool.testing._dovecot import DovecotFactory

from .conftest import assert_settled

# What a task may see when the server or the network fails under it: the pool's own errors,
# imapclient's, or the operating system's (a reset, a timeout). Anything else is a bug.
TYPED_ERRORS = (PoolError, IMAPClientError, OSError)


@asynccontextmanager
async def proxied(
    account: dict[str, Any], **options: Any
) -> AsyncIterator[tuple[Pool, FaultProxy]]:
    """A pool whose connections go through a fault proxy to the account's Dovecot."""
    async with open_fault_proxy(account["host"], account["port"]) as proxy:
        settings = dict(account, host=proxy.host, port=proxy.port)
        async with open_pool(**settings, **options) as pool:
            yield pool, proxy


async def hold(pool: Pool, count: int) -> None:
    """Check out *count* connections at once, use them, give them back: the pool then has at
    least *count* idle connections."""
    async with trio.open_nursery() as nursery:
        gate = trio.Event()

        async def user() -> None:
            async with pool.connection() as conn:
                await conn.noop()
                await gate.wait()

        for _ in range(count):
            nursery.start_soon(user)
        with trio.fail_after(5):
            await pool.counts.wait_value(lambda c: c.in_use == count)
        gate.set()


# -- prompt cancellation of an in-flight command --------------------------------------------------


async def test_a_deadline_on_a_stalled_command_takes_effect_at_once(
    account: dict[str, Any],
) -> None:
    async with proxied(account, read_timeout=20) as (pool, proxy):
        await hold(pool, 1)
        proxy.stall("down")  # the server's answers are held back
        deadline = 0.2
        started = trio.current_time()
        with trio.move_on_after(deadline) as scope:
            async with pool.connection() as conn:
                await conn.noop()
        late = trio.current_time() - started - deadline
        assert scope.cancelled_caught
        # Without the interruption this would be the 20 s read timeout (or the 1 s grace).
        assert late < 0.5, f"resumed {late * 1000:.0f} ms after the deadline"
        proxy.resume()
        await assert_settled(pool)
        stats = pool.statistics()
        assert (stats.size, stats.connections_discarded) == (0, 1)
        async with pool.connection() as conn:  # the replacement
            await conn.noop()
        assert pool.statistics().connections_opened == 2


# -- health and lifetime -------------------------------------------------------------------------


async def test_an_idle_connection_the_server_closed_is_not_handed_out(
    dovecot: DovecotServer, account: dict[str, Any]
) -> None:
    async with open_pool(**account) as pool:
        await hold(pool, 1)
        await trio.to_thread.run_sync(dovecot.kick, account["username"])
        # No NOOP, no error for the user: the readable socket gave it away.
        async with pool.connection() as conn:
            await conn.noop()
            assert conn.number == 2
        stats = pool.statistics()
        assert stats.connections_discarded == 1 and stats.noop_checks == 0


async def test_a_connection_idle_past_the_threshold_is_checked_with_noop(
    account: dict[str, Any],
) -> None:
    async with proxied(account, noop_check_after=0.2) as (pool, proxy):
        await hold(pool, 1)
        async with pool.connection() as conn:  # used just now: no check
            await conn.noop()
        assert pool.statistics().noop_checks == 0
        await trio.sleep(0.3)
        before = proxy.statistics().bytes_up
        async with pool.connection() as conn:
            assert proxy.statistics().bytes_up > before  # the NOOP went to the server
            assert conn.number == 1
        assert pool.statistics().noop_checks == 1


async def test_a_dead_silent_connection_fails_its_noop_check_and_is_replaced(
    account: dict[str, Any],
) -> None:
    """OfflineIMAP #56/#516: after a suspend the old connections are dead but silent."""
    async with proxied(account, noop_check_after=0.1, connect_timeout=0.5) as (pool, proxy):
        await hold(pool, 1)
        proxy.set_blackhole(True)  # the network vanishes under the idle connection...
        proxy.set_blackhole(False)  # ...and new connections work again
        await trio.sleep(0.2)
        with trio.fail_after(5):
            async with pool.connection() as conn:
                await conn.noop()
                assert conn.number == 2
        stats = pool.statistics()
        assert (stats.noop_checks, stats.connections_discarded) == (1, 1)
        await assert_settled(pool)


async def test_idle_connections_beyond_min_size_close_after_max_idle(
    dovecot: DovecotServer, account: dict[str, Any]
) -> None:
    async with open_pool(**account, min_size=1, max_idle=0.3) as pool:
        await hold(pool, 3)
        assert pool.statistics().idle == 3
        with trio.fail_after(5):
            await pool.counts.wait_value(lambda c: c.size == 1 and c.in_use == 0)
        stats = pool.statistics()
        assert (stats.connections_closed, stats.connections_discarded) == (2, 0)
        seen = await trio.to_thread.run_sync(dovecot.connections, account["username"])
        assert seen == 1
        await trio.sleep(0.6)
        assert pool.statistics().size == 1  # min_size is kept


async def test_connections_are_replaced_after_max_lifetime_with_jitter(
    account: dict[str, Any],
) -> None:
    async with open_pool(**account, max_lifetime=0.5) as pool:
        lifetimes = []
        async with pool.connection() as a, pool.connection() as b, pool.connection() as c:
            for conn in (a, b, c):
                slot = conn._slot
                assert slot is not None
                lifetimes.append(slot.expires_at - slot.created_at)
        assert all(0.45 <= t <= 0.5 for t in lifetimes)
        assert len(set(lifetimes)) == 3  # they do not all expire at once
        with trio.fail_after(5):
            await pool.counts.wait_value(lambda c: c.size == 0)
        assert pool.statistics().connections_closed == 3
        async with pool.connection() as conn:
            assert conn.number == 4


async def test_keepalive_sends_noop_on_idle_connections(account: dict[str, Any]) -> None:
    async with proxied(account, min_size=1, keepalive=0.2) as (pool, proxy):
        with trio.fail_after(5):
            await pool.counts.wait_value(lambda c: c.idle == 1)
        before = proxy.statistics().bytes_up
        await trio.sleep(0.7)
        assert pool.statistics().keepalives >= 2
        assert proxy.statistics().bytes_up > before
        assert pool.statistics().connections_discarded == 0


async def test_a_server_failure_drops_every_older_idle_connection_at_once(
    dovecot: DovecotServer, account: dict[str, Any]
) -> None:
    async with open_pool(**account) as pool:
        await hold(pool, 4)
        async with pool.connection() as a, pool.connection():
            await trio.to_thread.run_sync(dovecot.kick, account["username"])
            with pytest.raises(IMAPClientError):
                await a.noop()  # EOF: the server went away
            assert pool.statistics().idle == 2  # nobody has looked at them yet
        # Releasing `a` dropped the two idle ones at once, and `b` (older than the failure).
        stats = pool.statistics()
        assert (stats.size, stats.connections_discarded) == (0, 4)
        async with pool.connection() as conn:
            await conn.noop()


async def test_drain_closes_idle_connections_now_and_busy_ones_when_they_return(
    account: dict[str, Any],
) -> None:
    async with open_pool(**account) as pool:
        await hold(pool, 3)
        async with pool.connection() as busy:
            pool.drain()
            assert pool.statistics().idle == 0
            await busy.noop()  # still usable until it comes back
        stats = pool.statistics()
        assert (stats.size, stats.connections_discarded) == (0, 3)
        async with pool.connection() as conn:
            assert conn.number == 4


# -- recovery ------------------------------------------------------------------------------------


async def test_the_pool_recovers_by_itself_after_a_server_restart(
    dovecot_factory: DovecotFactory,
) -> None:
    server = dovecot_factory()
    errors: list[BaseException] = []
    successes: list[float] = []
    async with open_pool(**server.pool_kwargs(tls=False), max_size=4, acquire_timeout=0.5) as pool:

        async def load() -> None:
            while True:
                try:
                    with trio.fail_after(1):
                        async with pool.connection() as conn:
                            await conn.noop()
                    successes.append(trio.current_time())
                except (trio.TooSlowError, *TYPED_ERRORS) as exc:
                    errors.append(exc)
                await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(load)
            await trio.sleep(0.3)
            await trio.to_thread.run_sync(server.stop)
            await trio.sleep(0.8)
            await trio.to_thread.run_sync(server.start)
            back = trio.current_time()
            await trio.sleep(2)
            recovered = min(t for t in successes if t >= back) - back
            nursery.cancel_scope.cancel()
        assert recovered < 1.5, f"first success {recovered:.2f} s after the server returned"
        assert errors, "the outage went unnoticed"
        assert all(isinstance(e, (trio.TooSlowError, *TYPED_ERRORS)) for e in errors)
        await assert_settled(pool)
        stats = pool.statistics()
        assert stats.connections_opened - stats.connections_discarded == stats.size
        seen = await trio.to_thread.run_sync(server.connections, None)
        assert seen == stats.size


async def test_a_waiter_during_an_outage_gets_the_last_error_not_a_bare_timeout(
    account: dict[str, Any],
) -> None:
    async with proxied(account, acquire_timeout=0.5) as (pool, proxy):
        await hold(pool, 1)
        pool.drain()
        proxy.set_refusing(True)
        with pytest.raises(PoolTimeout) as info:
            async with pool.connection():
                pass
        proxy.set_refusing(False)
        assert "ConnectionRefusedError" in str(info.value)
        assert isinstance(info.value.__cause__, ConnectError)
        stats = pool.statistics()
        # Retried with backoff, one attempt at a time: a handful in half a second, no storm.
        assert 2 <= stats.open_failures <= 8
        async with pool.connection() as conn:
            await conn.noop()


async def test_a_connection_limit_lowers_the_pools_size_instead_of_failing_users(
    dovecot_factory: DovecotFactory,
) -> None:
    server = dovecot_factory(max_userip_connections=3)
    settings = server.pool_kwargs(tls=False)
    # Another client of the same account holds one of the three places all along.
    other = IMAPClient(settings["host"], settings["port"], ssl=False, timeout=5)
    other.login(settings["username"], settings["password"])
    served = 0
    try:
        async with open_pool(**settings, max_size=8, acquire_timeout=10) as pool:

            async def user() -> None:
                nonlocal served
                for _ in range(5):
                    async with pool.connection() as conn:
                        await conn.noop()
                        await trio.sleep(0.05)
                    served += 1

            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    for _ in range(20):
                        nursery.start_soon(user)
                        await trio.sleep(0.03)  # users arrive one by one
            stats = pool.statistics()
            await assert_settled(pool)
    finally:
        other.logout()
    assert served == 100  # every user was served, none got an error
    assert (stats.effective_max_size, stats.size) == (2, 2)  # settled at the server's limit
    assert 1 <= stats.open_failures <= 3  # refused, then no more tries: no error storm
    assert "LIMIT" in (stats.last_open_error or "")


# -- faults under load ---------------------------------------------------------------------------


async def test_blackhole_and_stall_end_every_call_within_its_deadline(
    account: dict[str, Any],
) -> None:
    """HikariCP #1170: a network blip must not wedge the pool in blocked reads."""
    async with proxied(account, acquire_timeout=0.5, connect_timeout=0.5) as (pool, proxy):
        await hold(pool, 2)
        outcomes: list[str] = []

        async def call(deadline: float) -> None:
            started = trio.current_time()
            try:
                with trio.fail_after(deadline):
                    async with pool.connection() as conn:
                        await conn.noop()
                outcomes.append("ok")
            except (trio.TooSlowError, *TYPED_ERRORS) as exc:
                outcomes.append(type(exc).__name__)
            assert trio.current_time() - started < deadline + 0.5

        for fault in ("blackhole", "stall"):
            if fault == "blackhole":
                proxy.set_blackhole(True)
            else:
                proxy.stall("both")
            async with trio.open_nursery() as nursery:
                for i in range(6):
                    nursery.start_soon(call, 0.3 + 0.1 * i)
            assert "ok" not in outcomes[-6:]
            proxy.set_blackhole(False)
            proxy.resume()
        await assert_settled(pool)
        with trio.fail_after(5):
            # Recovered. Not within the pool's 0.5 s acquire timeout: an open that began in the
            # blackhole runs out its 0.5 s connect timeout first, then the backoff.
            async with pool.connection(timeout=4) as conn:
                await conn.noop()


async def test_appends_while_connections_are_cut_are_never_lost_or_doubled(
    dovecot: DovecotServer, account: dict[str, Any]
) -> None:
    """Every APPEND that returned success is there exactly once; every one that raised was
    reported to its caller; none is retried behind the caller's back."""
    seed_folders(dovecot, {"Safe": 0}, user=account["username"])
    succeeded: list[str] = []
    failed: list[str] = []
    async with proxied(account, max_size=4, acquire_timeout=2) as (pool, proxy):

        async def appender(worker: int) -> None:
            for n in range(15):
                msgid = f"<safe-{worker}-{n}@trio-imappool.test>"
                body = f"Message-ID: {msgid}\r\nSubject: safe {worker} {n}\r\n\r\nbody\r\n"
                try:
                    async with pool.connection() as conn:
                        await conn.append("Safe", body.encode())
                    succeeded.append(msgid)
                except (trio.TooSlowError, *TYPED_ERRORS):
                    failed.append(msgid)

        async def cutter() -> None:
            for _ in range(6):
                await trio.sleep(random.uniform(0.01, 0.05))
                proxy.reset_all()

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for worker in range(4):
                    nursery.start_soon(appender, worker)
                nursery.start_soon(cutter)
        await assert_settled(pool)

    assert len(succeeded) + len(failed) == 60
    assert succeeded, "nothing got through"

    def count_on_server(client: IMAPClient) -> dict[str, int]:
        client.select_folder("Safe", readonly=True)
        uids = client.search(["ALL"])
        found: dict[str, int] = {}
        for data in client.fetch(uids, ["BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"]).values():
            header = data[b"BODY[HEADER.FIELDS (MESSAGE-ID)]"].decode().strip()
            msgid = header.split(":", 1)[1].strip()
            found[msgid] = found.get(msgid, 0) + 1
        return found

    async with open_pool(**account) as checker:
        found = await checker.run_sync(count_on_server)
    assert all(found.get(m) == 1 for m in succeeded)  # there, exactly once
    assert all(found.get(m, 0) <= 1 for m in failed)  # maybe there (the answer was lost): once
    assert set(found) <= set(succeeded) | set(failed)  # nothing appended twice or by itself


async def test_a_waiter_cancelled_at_the_moment_of_hand_off_loses_no_connection(
    account: dict[str, Any],
) -> None:
    """asyncpg #467/#547/#955, psycopg #509/#1275/#1345: a connection handed to a waiter
    whose cancel scope fires in the same instant must not vanish."""
    async with open_pool(**account, max_size=1) as pool:
        for attempt in range(20):
            holder = pool.connection()
            await holder.__aenter__()
            async with trio.open_nursery() as nursery:
                scope = trio.CancelScope()

                async def waiter(scope: trio.CancelScope = scope) -> None:
                    with scope:
                        async with pool.connection():
                            await trio.lowlevel.checkpoint()

                nursery.start_soon(waiter)
                await trio.testing.wait_all_tasks_blocked()
                # Cancel and hand off in the same step, in both orders.
                if attempt % 2:
                    scope.cancel()
                    await holder.__aexit__(None, None, None)
                else:
                    await holder.__aexit__(None, None, None)
                    scope.cancel()
            stats = pool.statistics()
            assert (stats.size, stats.idle, stats.in_use, stats.waiting) == (1, 1, 0, 0)
        assert pool.statistics().connections_opened == 1
        await assert_settled(pool)


async def test_a_stale_pool_after_a_restart_is_not_validated_one_by_one(
    dovecot_factory: DovecotFactory,
) -> None:
    """fecfile #2208: checking stale connections one at a time, with backoff between, burned
    the caller's whole timeout."""
    server = dovecot_factory()
    async with open_pool(**server.pool_kwargs(tls=False), max_size=6) as pool:
        await hold(pool, 6)
        await trio.to_thread.run_sync(server.restart)
        started = trio.current_time()
        with trio.fail_after(2):
            async with pool.connection() as conn:
                await conn.noop()
        assert trio.current_time() - started < 1.0
        stats = pool.statistics()
        assert stats.open_failures == 0
        assert stats.connections_discarded == 6
        await assert_settled(pool)
