"""open_pool_group(): one pool per account under a per-account and a global cap, against Dovecot.

Rules: loopback only; each test has a Dovecot of its own (from ``dovecot_factory``, free ports)
with 50 users ``u0``..``u49`` (password ``pw0``..``pw49``) and Dovecot's per-user limit set to
the group's per-account cap, so a pool that went over it would see its logins refused; every
test runs under ``fail_after``; every test ends with no worker thread left.

What Dovecot counts is read with ``doveadm who``; what the process holds is read from the
kernel's table of TCP sockets (``/proc/net/tcp``): client sockets connected to the server's port.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from imapclient import IMAPClient

from trio_imappool import (
    AuthenticationError,
    ConfigurationError,
    ConnectError,
    PoolClosedError,
    PoolTimeout,
)
from trio_imappool._group import PoolGroup, open_pool_group
from trio_imappool.testing import DovecotServer
from trio_imappool.testing._dovecot import DovecotFactory

USERS: Mapping[str, str] = {f"u{i}": f"pw{i}" for i in range(50)}
PER_ACCOUNT = 3
DEADLINE = 10.0


# -- helpers --------------------------------------------------------------------------------------


@pytest.fixture
def server(dovecot_factory: DovecotFactory) -> DovecotServer:
    """A Dovecot of the test's own: 50 users, at most PER_ACCOUNT connections per user."""
    return dovecot_factory(users=USERS, max_userip_connections=PER_ACCOUNT)


class Credentials:
    """The credentials callable's state: the passwords it hands out (the server's unless
    overridden) and how often it was asked, per account."""

    def __init__(self, server: DovecotServer) -> None:
        self.server = server
        self.passwords: dict[str, str] = {}
        self.calls: collections.Counter[str] = collections.Counter()
        self.gate: trio.Event | None = None  # when set, lookups wait for it
        self.extra: dict[str, dict[str, Any]] = {}  # further options, per account

    def options(self, account: str) -> dict[str, Any]:
        self.calls[account] += 1
        options = self.server.pool_kwargs(account, tls=False)
        if account in self.passwords:
            options["password"] = self.passwords[account]
        options.update(self.extra.get(account, {}))
        return options

    def sync(self) -> Callable[[str], dict[str, Any]]:
        """A sync credentials callable (the group runs it in a worker thread)."""
        return self.options

    def async_(self) -> Callable[[str], Any]:
        """An async credentials callable (waits for ``gate`` when one is set)."""

        async def credentials(account: str) -> dict[str, Any]:
            if self.gate is not None:
                await self.gate.wait()
            return self.options(account)

        return credentials


async def server_connections(server: DovecotServer, user: str | None = None) -> int:
    return await trio.to_thread.run_sync(server.connections, user)


async def server_counts_per_user(server: DovecotServer) -> collections.Counter[str]:
    """Dovecot's count of logged-in connections, per user, from one ``doveadm who``."""
    out = await trio.to_thread.run_sync(server.doveadm, "who", "-1")
    return collections.Counter(line.split()[0] for line in out.stdout.splitlines()[1:] if line)


def client_sockets(port: int) -> int:
    """TCP sockets of this machine connected (or connecting) to 127.0.0.1:*port* from the
    client side: ESTABLISHED, SYN_SENT or CLOSE_WAIT (the server closed, the client not yet)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote, state = fields[2], fields[3]
        if int(remote.rsplit(":", 1)[1], 16) == port and state in ("01", "02", "08"):
            count += 1
    return count


async def wait_until(predicate: Callable[[], bool]) -> None:
    while True:
        if predicate():
            return
        await trio.sleep(0.01)


async def wait_until_server_counts(server: DovecotServer, user: str | None, expected: int) -> None:
    """Dovecot updates its counts a moment after a connection ends: wait for them (*user*
    None: all users)."""
    while True:
        if await server_connections(server, user) == expected:
            return
        await trio.sleep(0.02)


async def assert_no_threads() -> None:
    with trio.fail_after(5):
        await trio.testing.wait_all_threads_completed()
    assert trio.testing.active_thread_count() == 0


# -- many accounts, two caps ----------------------------------------------------------------------


async def test_fifty_accounts_are_served_concurrently_within_the_per_account_and_global_caps(
    server: DovecotServer,
) -> None:
    credentials = Credentials(server)
    max_connections = 20
    peak_sockets = peak_connections = peak_open = 0
    peak_pool_size: collections.Counter[str] = collections.Counter()
    peak_on_server: collections.Counter[str] = collections.Counter()
    served = 0

    with trio.fail_after(25):
        async with open_pool_group(
            credentials.async_(), per_account_max=PER_ACCOUNT, max_connections=max_connections
        ) as group:

            async def worker(account: str) -> None:
                nonlocal served
                for _ in range(3):
                    async with group.connection(account) as conn:
                        await conn.noop()
                        await conn.select_folder("INBOX", readonly=True)
                served += 1

            async def watch_group() -> None:
                nonlocal peak_sockets, peak_connections, peak_open
                while True:
                    stats = group.statistics()
                    peak_connections = max(peak_connections, stats.connections)
                    peak_open = max(peak_open, stats.idle + stats.in_use)
                    for account, pool in stats.pools.items():
                        peak_pool_size[account] = max(peak_pool_size[account], pool.size)
                    peak_sockets = max(peak_sockets, client_sockets(server.imap_port))
                    await trio.sleep(0.002)

            async def watch_server() -> None:
                while True:
                    for user, count in (await server_counts_per_user(server)).items():
                        peak_on_server[user] = max(peak_on_server[user], count)
                    await trio.sleep(0.02)

            async with trio.open_nursery() as watchers:
                watchers.start_soon(watch_group)
                watchers.start_soon(watch_server)
                async with trio.open_nursery() as nursery:
                    for account in USERS:
                        for _ in range(3):
                            nursery.start_soon(worker, account)
                watchers.cancel_scope.cancel()
            stats = group.statistics()
            sockets_at_end = client_sockets(server.imap_port)

    # Every task was served: 150 tasks, 3 checkouts each, on 50 pools.
    assert served == 150
    assert stats.accounts == 50
    assert sum(pool.acquires for pool in stats.pools.values()) == 450
    assert stats.pools_opened == 50
    assert dict(credentials.calls) == dict.fromkeys(USERS, 1)
    # The per-account cap: no pool went over it, nor did Dovecot ever refuse a login for it.
    assert max(peak_pool_size.values()) <= PER_ACCOUNT
    assert max(peak_on_server.values()) <= PER_ACCOUNT
    assert all(pool.open_failures == 0 for pool in stats.pools.values())
    # The global cap: in the group's counts and in the kernel's table of sockets.
    assert 0 < peak_connections <= max_connections
    assert 0 < peak_open <= max_connections
    assert 0 < peak_sockets <= max_connections
    assert stats.connections <= max_connections
    assert sockets_at_end <= max_connections
    # 50 accounts do not fit under 20 places: idle ones were closed for the others.
    assert stats.places_freed > 0
    # Leaving the group logged everything out.
    assert group.closed
    assert group.statistics().accounts == 0
    assert group.statistics().connections == 0
    assert client_sockets(server.imap_port) == 0
    with trio.fail_after(DEADLINE):
        await wait_until_server_counts(server, None, 0)
    await assert_no_threads()


async def test_many_tasks_asking_for_a_new_account_at_once_open_one_pool(
    server: DovecotServer,
) -> None:
    credentials = Credentials(server)
    credentials.gate = trio.Event()
    with trio.fail_after(DEADLINE):
        async with open_pool_group(credentials.async_(), per_account_max=PER_ACCOUNT) as group:

            async def worker() -> None:
                async with group.connection("u7") as conn:
                    await conn.noop()

            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(worker)
                await trio.testing.wait_all_tasks_blocked()
                assert group.statistics().accounts == 0  # still asking for credentials
                credentials.gate.set()
            stats = group.statistics()
    assert credentials.calls == {"u7": 1}
    assert stats.pools_opened == 1
    assert stats.pools["u7"].acquires == 20
    assert stats.pools["u7"].connections_opened <= PER_ACCOUNT
    await assert_no_threads()


# -- fairness under the global cap ----------------------------------------------------------------


async def fill_with_idle(group: PoolGroup, account: str, count: int) -> None:
    """Open *count* connections of *account* at once, then leave them all idle."""
    opened = trio.Event()

    async def hold() -> None:
        async with group.connection(account):
            await opened.wait()

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(hold)
        await wait_until(
            lambda: (
                account in group.statistics().pools
                and group.statistics().pools[account].in_use == count
            )
        )
        opened.set()


async def test_idle_connections_of_one_account_do_not_starve_another(
    server: DovecotServer,
) -> None:
    credentials = Credentials(server)
    with trio.fail_after(DEADLINE):
        # acquire_timeout is longer than the deadline below: without the group's help, u1
        # would wait for one of u0's idle connections to reach max_idle.
        async with open_pool_group(
            credentials.async_(), per_account_max=3, max_connections=3, acquire_timeout=20
        ) as group:
            await fill_with_idle(group, "u0", 3)
            before = group.statistics()
            assert (before.connections, before.pools["u0"].idle) == (3, 3)

            start = trio.current_time()
            with trio.fail_after(2):
                async with group.connection("u1") as conn:
                    await conn.noop()
            elapsed = trio.current_time() - start
            after = group.statistics()

    assert elapsed < 1.0
    assert after.places_freed == 1
    assert after.pools["u0"].size == 2  # one of u0's three was closed, with LOGOUT
    assert after.pools["u0"].connections_closed == 1
    assert after.pools["u0"].connections_discarded == 0
    assert after.pools["u1"].size == 1
    assert after.connections <= 3
    await assert_no_threads()


async def test_the_longest_idle_account_gives_its_place_up_first(server: DovecotServer) -> None:
    credentials = Credentials(server)
    with trio.fail_after(DEADLINE):
        async with open_pool_group(
            credentials.async_(), per_account_max=2, max_connections=2, acquire_timeout=20
        ) as group:
            for account in ("u0", "u1"):  # u0 is used first, so it has been idle longer
                async with group.connection(account) as conn:
                    await conn.noop()
                await trio.sleep(0.01)
            async with group.connection("u2") as conn:
                await conn.noop()
            stats = group.statistics()
    assert stats.places_freed == 1
    assert (stats.pools["u0"].size, stats.pools["u1"].size, stats.pools["u2"].size) == (0, 1, 1)
    await assert_no_threads()


async def test_the_credentials_may_give_an_account_a_cap_of_its_own(server: DovecotServer) -> None:
    credentials = Credentials(server)
    credentials.extra["u9"] = {"max_size": 1}
    with trio.fail_after(DEADLINE):
        async with open_pool_group(credentials.async_(), per_account_max=PER_ACCOUNT) as group:
            async with trio.open_nursery() as nursery:
                for account in ("u8", "u8", "u9", "u9"):
                    nursery.start_soon(group.run_sync, account, _slow_noop)
            stats = group.statistics()
    assert (stats.pools["u8"].max_size, stats.pools["u8"].connections_opened) == (PER_ACCOUNT, 2)
    assert (stats.pools["u9"].max_size, stats.pools["u9"].connections_opened) == (1, 1)
    assert stats.pools["u9"].acquires == 2  # one after the other, on one connection
    await assert_no_threads()


def _slow_noop(client: IMAPClient) -> None:
    client.noop()
    time.sleep(0.05)


# -- idle accounts and rotated credentials --------------------------------------------------------


async def test_an_idle_account_is_closed_and_logged_out_after_the_idle_time(
    server: DovecotServer,
) -> None:
    # Shared settings for every account, and credentials that give only the password: the
    # account is the user name.
    calls: list[str] = []

    def credentials(account: str) -> dict[str, str]:
        calls.append(account)
        return {"password": USERS[account]}

    with trio.fail_after(DEADLINE):
        async with open_pool_group(
            credentials,
            host=server.host,
            port=server.imap_port,
            ssl=False,
            account_idle_timeout=0.3,
        ) as group:
            async with group.connection("u1") as conn:
                await conn.noop()
            released = trio.current_time()
            assert await server_connections(server, "u1") == 1

            # u2 holds its connection for longer than the idle time: it stays open.
            async with group.connection("u2") as conn:
                await wait_until(lambda: "u1" not in group.statistics().pools)
                closed_after = trio.current_time() - released
                await conn.noop()
                assert "u2" in group.statistics().pools
            await wait_until_server_counts(server, "u1", 0)
            assert await server_connections(server, "u2") == 1
            stats = group.statistics()

            # Used again, u1 gets a new pool, with its credentials asked for again.
            async with group.connection("u1") as conn:
                await conn.noop()
            assert calls.count("u1") == 2

    assert 0.3 <= closed_after < 1.0
    assert stats.accounts_expired == 1
    assert stats.accounts == 1
    assert stats.connections == 1
    await assert_no_threads()


async def test_a_password_rotated_while_idle_is_read_again_when_the_account_returns(
    server: DovecotServer,
) -> None:
    credentials = Credentials(server)
    with trio.fail_after(DEADLINE):
        async with open_pool_group(
            credentials.sync(), per_account_max=PER_ACCOUNT, account_idle_timeout=0.2
        ) as group:
            assert await group.run_sync("u3", lambda client: client.noop()) is not None
            # The password changes on the server and in the vault the callable reads.
            await trio.to_thread.run_sync(server.add_user, "u3", "pw3-rotated")
            credentials.passwords["u3"] = "pw3-rotated"
            await wait_until(lambda: "u3" not in group.statistics().pools)

            async with group.connection("u3") as conn:
                await conn.noop()
            stats = group.statistics()
    assert credentials.calls["u3"] == 2
    assert stats.pools_opened == 2
    assert stats.accounts_expired == 1
    await assert_no_threads()


async def test_rejected_credentials_close_the_pool_and_are_read_again_on_next_use(
    server: DovecotServer,
) -> None:
    credentials = Credentials(server)
    with trio.fail_after(DEADLINE):
        async with open_pool_group(credentials.async_(), per_account_max=PER_ACCOUNT) as group:
            async with group.connection("u4") as conn:
                await conn.noop()
            # The password is changed and the user's sessions are ended; the callable still
            # hands out the old password.
            await trio.to_thread.run_sync(server.add_user, "u4", "pw4-rotated")
            await trio.to_thread.run_sync(server.kick, "u4")

            # Five tasks need a connection: the pool drops the kicked one, opens a new one,
            # and the login fails once for all of them.
            errors: list[BaseException] = []

            async def checkout() -> None:
                try:
                    async with group.connection("u4"):
                        pass
                except AuthenticationError as exc:
                    errors.append(exc)

            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    nursery.start_soon(checkout)
            rejected = group.statistics()

            credentials.passwords["u4"] = "pw4-rotated"
            async with group.connection("u4") as conn:
                await conn.noop()
            stats = group.statistics()

    assert len(errors) == 5
    assert all(type(error) is AuthenticationError for error in errors)
    assert rejected.accounts_rejected == 1
    assert "u4" not in rejected.pools
    assert credentials.calls["u4"] == 2
    assert stats.pools["u4"].connections_opened == 1
    assert stats.pools["u4"].open_failures == 0
    await assert_no_threads()


async def test_an_account_held_through_pool_is_not_closed_for_inactivity(
    server: DovecotServer,
) -> None:
    credentials = Credentials(server)
    with trio.fail_after(DEADLINE):
        async with open_pool_group(
            credentials.async_(), per_account_max=PER_ACCOUNT, account_idle_timeout=0.1
        ) as group:
            async with group.pool("u8") as pool:
                async with pool.connection() as a, pool.connection() as b:
                    await a.noop()
                    await b.noop()
                await trio.sleep(0.3)  # three idle times, with the pool held
                assert "u8" in group.statistics().pools
                assert not pool.closed
            await wait_until(lambda: pool.closed)
            assert "u8" not in group.statistics().pools
            assert group.statistics().accounts_expired == 1
    assert pool.statistics().connections_closed == 2
    await assert_no_threads()


# -- errors ---------------------------------------------------------------------------------------


async def test_errors_come_out_unwrapped(server: DovecotServer) -> None:
    credentials = Credentials(server)
    with trio.fail_after(DEADLINE):
        # The caller's own exception, raised in a checkout and in the group's block.
        with pytest.raises(ValueError, match="mine") as info:
            async with (
                open_pool_group(credentials.async_(), per_account_max=PER_ACCOUNT) as group,
                group.connection("u0") as conn,
            ):
                await conn.noop()
                raise ValueError("mine")
        assert type(info.value) is ValueError
        with pytest.raises(KeyError):
            async with open_pool_group(credentials.async_(), per_account_max=PER_ACCOUNT):
                raise KeyError("mine")

        async with open_pool_group(credentials.async_(), per_account_max=PER_ACCOUNT) as group:
            # A wrong password: AuthenticationError itself, and the pool is closed.
            credentials.passwords["u1"] = "wrong"
            with pytest.raises(AuthenticationError) as auth:
                async with group.connection("u1"):
                    pass
            assert type(auth.value) is AuthenticationError
            assert "u1" not in group.statistics().pools

            # A failing credentials callable: ConnectError with its exception as the cause,
            # and asked again on next use.
            async def broken(account: str) -> dict[str, Any]:
                raise LookupError(f"no such account: {account}")

            group._credentials = broken
            with pytest.raises(ConnectError) as lookup:
                await group.run_sync("u2", lambda client: client.noop())
            assert type(lookup.value) is ConnectError
            assert isinstance(lookup.value.__cause__, LookupError)

            # Options that open_pool refuses.
            async def no_password(account: str) -> dict[str, Any]:
                return {"host": server.host, "port": server.imap_port, "ssl": False}

            group._credentials = no_password
            with pytest.raises(ConfigurationError, match="password"):
                await group.run_sync("u2", lambda client: client.noop())
            assert group.statistics().accounts == 0
            assert group.statistics().credential_lookups == 3  # u1, then u2 twice

        with pytest.raises(PoolClosedError):
            async with group.connection("u0"):
                pass
    await assert_no_threads()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"per_account_max": 0}, "per_account_max"),
        ({"max_connections": 1.5}, "max_connections"),
        ({"max_threads": 0}, "max_threads"),
        ({"account_idle_timeout": 0}, "account_idle_timeout"),
        ({"max_size": 3}, "per_account_max"),
        ({"connection_limiter": object()}, "max_connections"),
        ({"no_such_option": 1}, "no_such_option"),
    ],
)
async def test_invalid_group_options_are_refused_before_anything_opens(
    options: dict[str, Any], match: str
) -> None:
    async def credentials(account: str) -> dict[str, Any]:
        raise AssertionError("never called")

    with pytest.raises(ConfigurationError, match=match):
        async with open_pool_group(credentials, **options):
            raise AssertionError("never entered")


# -- cancellation ---------------------------------------------------------------------------------


async def test_a_checkout_cancelled_while_credentials_are_read_does_not_stop_the_lookup(
    server: DovecotServer,
) -> None:
    credentials = Credentials(server)
    credentials.gate = trio.Event()
    with trio.fail_after(DEADLINE):
        async with open_pool_group(credentials.async_(), per_account_max=PER_ACCOUNT) as group:
            served = trio.Event()

            async def patient() -> None:
                async with group.connection("u5") as conn:
                    await conn.noop()
                served.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(patient)
                with trio.testing.assert_checkpoints(), pytest.raises(trio.TooSlowError):
                    with trio.fail_after(0.05):
                        async with group.connection("u5"):
                            raise AssertionError("not before the lookup ends")
                credentials.gate.set()
            assert served.is_set()
            # A short timeout of the checkout itself covers the lookup too.
            credentials.gate = trio.Event()
            with pytest.raises(PoolTimeout, match="credentials"):
                async with group.connection("u6", timeout=0.05):
                    pass
            credentials.gate.set()
            await wait_until(lambda: "u6" in group.statistics().pools)
            stats = group.statistics()
    assert credentials.calls == {"u5": 1, "u6": 1}
    assert stats.pools["u5"].in_use == 0 and stats.pools["u5"].acquires == 1
    assert stats.pools["u6"].acquires == 0
    await assert_no_threads()


async def test_cancelling_the_group_block_mid_command_closes_every_pool(
    server: DovecotServer,
) -> None:
    credentials = Credentials(server)
    with trio.fail_after(DEADLINE):
        with trio.move_on_after(0.3) as scope:
            async with open_pool_group(
                credentials.async_(), per_account_max=PER_ACCOUNT, max_connections=6
            ) as group:

                async def busy(account: str) -> None:
                    while True:
                        async with group.connection(account) as conn:
                            await conn.noop()

                async with trio.open_nursery() as nursery:
                    for account in ("u0", "u1", "u2", "u3"):
                        for _ in range(2):
                            nursery.start_soon(busy, account)
        assert scope.cancelled_caught
        assert group.closed
        stats = group.statistics()
        assert (stats.accounts, stats.connections) == (0, 0)
        assert client_sockets(server.imap_port) == 0
        with trio.fail_after(DEADLINE):
            await wait_until_server_counts(server, None, 0)
    await assert_no_threads()


async def test_checking_out_of_an_open_pool_is_a_checkpoint(server: DovecotServer) -> None:
    credentials = Credentials(server)
    with trio.fail_after(DEADLINE):
        async with open_pool_group(
            credentials.async_(), per_account_max=PER_ACCOUNT, account_idle_timeout=math.inf
        ) as group:
            async with group.connection("u0") as conn:
                await conn.noop()
            with trio.testing.assert_checkpoints():
                async with group.connection("u0") as conn:
                    pass
            with trio.testing.assert_checkpoints():
                await group.aclose()
            with trio.testing.assert_checkpoints(), pytest.raises(PoolClosedError):
                async with group.connection("u0"):
                    pass
            assert "closed" in repr(group)
    await assert_no_threads()
