"""The pool against a real Dovecot: checkout, release on every exit path, sizing, errors,
statistics and closing."""

from __future__ import annotations

import imaplib
import math
import socket
import threading
import time
from functools import partial
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing
from imapclient import IMAPClient, SocketTimeout
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError
from trio_util import AsyncValue

import trio_imappool
from trio_imappool import (
    AuthenticationError,
    ConfigurationError,
    ConnectError,
    PoolClosedError,
    PoolTimeout,
    ReleasedConnectionError,
    open_pool,
)
from trio_imappool._client import PooledClient, TrackingClient
from trio_imappool.testing import DovecotServer, ImapServer, open_fault_proxy, seed_folders

from .conftest import assert_consistent, assert_settled


@pytest.fixture
def gated_open(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Make every connection open wait (in its worker thread) until the test sets the event.

    The open itself is real: it goes on to connect and log in to Dovecot.
    """
    gate = threading.Event()
    real_connect = PooledClient.connect_blocking

    def connect_when_allowed(self: PooledClient, config: Any) -> None:
        if not gate.wait(10):
            raise TimeoutError("the test never opened the gate")
        real_connect(self, config)

    monkeypatch.setattr(PooledClient, "connect_blocking", connect_when_allowed)
    return gate


# -- the example of the README, end to end ---------------------------------------------------


async def test_quickstart_over_tls_selects_searches_fetches_and_counts(
    dovecot: DovecotServer, tls_account: dict[str, Any]
) -> None:
    seed_folders(dovecot, {"INBOX": 5}, user=tls_account["username"])
    async with open_pool(**tls_account, max_size=8) as pool:
        async with pool.connection() as conn:
            await conn.select_folder("INBOX")
            uids = await conn.search(["UNSEEN"])
            msgs = await conn.fetch(uids, ["ENVELOPE"])
        n = await pool.run_sync(lambda client: len(client.list_folders()))
        stats = pool.statistics()
    assert len(uids) == 5
    assert sorted(msgs) == uids
    assert msgs[uids[0]][b"ENVELOPE"].subject == b"Message 0 in INBOX"
    assert n >= 1
    assert (stats.size, stats.idle, stats.in_use, stats.connections_opened) == (1, 1, 0, 1)
    assert stats.acquires == 2
    assert pool.statistics().size == 0
    assert pool.closed


async def test_starttls_upgrades_the_plain_port(
    imap_server: ImapServer, imap_account: dict[str, Any]
) -> None:
    settings = dict(imap_account, starttls=True, ssl_context=imap_server.ssl_context())
    async with open_pool(**settings) as pool:
        cipher = await pool.run_sync(lambda client: client._imap.sock.cipher())
    assert cipher is not None


async def test_opening_takes_the_capabilities_from_the_greeting(account: dict[str, Any]) -> None:
    """Dovecot's greeting lists its capabilities, so opening sends no CAPABILITY: with nothing
    getting through from client to server, the pool's client still gets past the greeting,
    where plain imapclient waits for the answer to the CAPABILITY it sent."""

    def connect(cls: type[IMAPClient], host: str, port: int) -> IMAPClient:
        return cls(host, port, ssl=False, timeout=SocketTimeout(connect=1.0, read=1.0))

    async with open_fault_proxy(account["host"], account["port"]) as proxy:
        proxy.stall("up")
        client = await trio.to_thread.run_sync(connect, TrackingClient, proxy.host, proxy.port)
        assert proxy.statistics().bytes_up == 0
        assert b"IMAP4REV1" in client.capabilities()
        with pytest.raises((OSError, imaplib.IMAP4.abort)):
            await trio.to_thread.run_sync(connect, IMAPClient, proxy.host, proxy.port)
        proxy.resume("up")
        # The capabilities after LOGIN are the server's new list, not the greeting's.
        await trio.to_thread.run_sync(client.login, account["username"], account["password"])
        assert b"IDLE" not in client._imap.capabilities  # Dovecot adds it after login
        assert b"IDLE" in await trio.to_thread.run_sync(client.capabilities)
        await trio.to_thread.run_sync(client.logout)


async def test_a_greeting_without_capabilities_still_gets_them_asked_for() -> None:
    """The fallback, against a small scripted server: a bare greeting, then CAPABILITY."""
    received: list[bytes] = []

    async def serve(stream: trio.SocketStream) -> None:
        await stream.send_all(b"* OK ready\r\n")
        line = await stream.receive_some()
        received.append(line)
        tag = line.split()[0]
        await stream.send_all(b"* CAPABILITY IMAP4rev1 X-SCRIPTED\r\n" + tag + b" OK done\r\n")
        await stream.receive_some()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        client = await trio.to_thread.run_sync(
            lambda: TrackingClient("127.0.0.1", port, ssl=False, timeout=2.0)
        )
        assert [line.split()[1:] for line in received] == [[b"CAPABILITY"]]
        assert b"X-SCRIPTED" in client.capabilities()
        client.shutdown()
        nursery.cancel_scope.cancel()


async def test_one_task_may_hold_two_connections_to_copy_between_folders(
    dovecot: DovecotServer, account: dict[str, Any]
) -> None:
    uids = seed_folders(dovecot, {"INBOX": 3, "Archive": 0}, user=account["username"])
    async with open_pool(**account) as pool:
        async with pool.connection() as source, pool.connection() as target:
            assert source.number != target.number
            await source.select_folder("INBOX", readonly=True)
            fetched = await source.fetch(uids["INBOX"], ["BODY.PEEK[]"])
            await target.multiappend("Archive", [fetched[u][b"BODY[]"] for u in uids["INBOX"]])
            status = await target.folder_status("Archive", ["MESSAGES"])
        assert status[b"MESSAGES"] == 3
        await assert_settled(pool)


# -- sizing, fairness, whichever comes first -------------------------------------------------


async def test_connections_never_exceed_max_size_under_load(
    dovecot: DovecotServer, account: dict[str, Any]
) -> None:
    async with open_pool(**account, max_size=3) as pool:

        async def worker() -> None:
            for _ in range(5):
                async with pool.connection() as conn:
                    await conn.noop()
                    assert pool.statistics().size <= 3
                    # Held a little: on a loaded machine two connections could otherwise
                    # serve all 60 checkouts before the third has logged in.
                    await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            for _ in range(12):
                nursery.start_soon(worker)
        stats = pool.statistics()
        await assert_settled(pool)
        # The server agrees: three connections, no more, none lost.
        on_server = await trio.to_thread.run_sync(dovecot.connections, account["username"])
    assert stats.connections_opened == 3
    assert stats.acquires == 60
    assert stats.acquire_waits > 0
    assert on_server == 3


async def test_min_size_connections_are_opened_in_the_background(account: dict[str, Any]) -> None:
    async with open_pool(**account, min_size=2, max_size=4) as pool:
        with trio.fail_after(5):
            await pool.counts.wait_value(lambda c: c.idle == 2)
        assert pool.statistics().connections_opened == 2
        async with pool.connection() as conn:
            await conn.noop()
        assert pool.statistics().connections_opened == 2  # no third one was needed


async def test_waiters_get_connections_in_arrival_order(account: dict[str, Any]) -> None:
    order: list[int] = []
    async with open_pool(**account, max_size=1) as pool:
        held = pool.connection()
        await held.__aenter__()

        async def waiter(i: int) -> None:
            async with pool.connection():
                order.append(i)
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            for i in range(6):
                nursery.start_soon(waiter, i)
                await trio.testing.wait_all_tasks_blocked()
            assert pool.statistics().waiting == 6
            await held.__aexit__(None, None, None)
        await assert_settled(pool)
    assert order == [0, 1, 2, 3, 4, 5]


async def test_a_waiter_takes_a_released_connection_while_another_is_still_opening(
    account: dict[str, Any], gated_open: threading.Event
) -> None:
    async with open_pool(**account, max_size=2) as pool:
        gated_open.set()
        held = pool.connection()
        first = await held.__aenter__()
        first_number = first.number
        gated_open.clear()  # the next open will hang until we allow it
        got: list[int] = []

        async def waiter() -> None:
            async with pool.connection() as conn:
                got.append(conn.number)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            with trio.fail_after(5):
                await pool.counts.wait_value(lambda c: c.opening == 1 and c.waiting == 1)
            await trio.testing.wait_all_tasks_blocked()  # the open is inside its thread
            await held.__aexit__(None, None, None)  # released before the open finishes
            with trio.fail_after(5):
                await pool.counts.wait_value(lambda c: c.waiting == 0)
        assert got == [first_number]
        assert pool.statistics().opening == 1
        gated_open.set()
        with trio.fail_after(5):
            await pool.counts.wait_value(lambda c: c.opening == 0)
        stats = pool.statistics()
        assert (stats.size, stats.idle, stats.connections_opened) == (2, 2, 2)
        await assert_settled(pool)


async def test_the_pool_uses_its_own_thread_limiter_not_trios_default(
    account: dict[str, Any],
) -> None:
    default = trio.to_thread.current_default_thread_limiter()
    saved = default.total_tokens
    release = threading.Event()
    default.total_tokens = 1
    try:
        async with trio.open_nursery() as nursery:
            # Take the only token of Trio's default limiter and keep it.
            nursery.start_soon(trio.to_thread.run_sync, lambda: release.wait(10))
            await trio.testing.wait_all_tasks_blocked()
            assert default.borrowed_tokens == 1
            with trio.fail_after(10):
                async with open_pool(**account, max_size=2) as pool, pool.connection() as conn:
                    await conn.noop()
            release.set()
    finally:
        release.set()
        default.total_tokens = saved


# -- release on every exit path ---------------------------------------------------------------


async def test_an_exception_in_the_block_returns_the_connection_and_comes_out_unwrapped(
    account: dict[str, Any],
) -> None:
    class Oops(Exception):
        pass

    with pytest.raises(Oops):
        async with open_pool(**account) as pool:
            with pytest.raises(Oops):
                async with pool.connection() as conn:
                    await conn.noop()
                    raise Oops
            stats = pool.statistics()
            assert (stats.idle, stats.in_use, stats.connections_discarded) == (1, 0, 0)
            raise Oops  # out of open_pool itself: not an ExceptionGroup
    assert pool.statistics().size == 0


async def test_cancel_while_holding_an_idle_connection_returns_it(account: dict[str, Any]) -> None:
    """SQLAlchemy #8145: a connection held by a cancelled task was never returned."""
    async with open_pool(**account) as pool:
        with trio.move_on_after(0.05) as scope:
            async with pool.connection() as conn:
                await conn.noop()
                await trio.sleep_forever()
        assert scope.cancelled_caught
        stats = pool.statistics()
        assert (stats.idle, stats.in_use, stats.connections_discarded) == (1, 0, 0)
        with pytest.raises(ReleasedConnectionError):
            await conn.noop()
        await assert_settled(pool)


async def test_cancel_while_waiting_leaves_the_queue_and_loses_nothing(
    account: dict[str, Any],
) -> None:
    async with open_pool(**account, max_size=1) as pool:
        async with pool.connection() as conn:
            number = conn.number
            with trio.move_on_after(0.1) as scope:
                async with pool.connection():
                    pytest.fail("got a second connection from a pool of one")
            assert scope.cancelled_caught
            assert pool.statistics().waiting == 0
        async with pool.connection() as again:
            assert again.number == number
        stats = pool.statistics()
        assert stats.acquire_timeouts == 0  # the caller's scope, not the pool's timeout
        await assert_settled(pool)


async def test_cancel_while_a_connection_is_being_opened_for_the_waiter(
    account: dict[str, Any], gated_open: threading.Event
) -> None:
    async with open_pool(**account, max_size=2) as pool:
        with trio.move_on_after(0.2) as scope:
            async with pool.connection():
                pytest.fail("the open was gated")
        assert scope.cancelled_caught
        assert pool.statistics().opening == 1  # the open goes on, for the next user
        gated_open.set()
        with trio.fail_after(5):
            await pool.counts.wait_value(lambda c: c.idle == 1)
        async with pool.connection() as conn:
            await conn.noop()
        assert pool.statistics().connections_opened == 1
        await assert_settled(pool)


async def test_cancel_during_a_blocking_command_interrupts_it_at_once(
    imap_server: ImapServer, imap_account: dict[str, Any]
) -> None:
    async with open_pool(**imap_account, read_timeout=20) as pool:
        started = trio.current_time()
        with trio.move_on_after(0.3) as scope:
            async with pool.connection() as conn:
                await conn.select_folder("INBOX")
                await conn.idle()
                await conn.idle_check(timeout=15)  # blocks in its thread: nothing arrives
        elapsed = trio.current_time() - started
        assert scope.cancelled_caught
        # Without the interruption the task would sit out the 1 s grace period, then more.
        assert elapsed < 1.0, f"the cancel took {elapsed:.2f} s: the thread was not interrupted"
        await assert_settled(pool)
        stats = pool.statistics()
        assert (stats.size, stats.connections_discarded) == (0, 1)
        async with pool.connection() as conn:  # a replacement is opened when needed
            await conn.noop()
            assert conn.number == 2
        await assert_settled(pool)


# -- deadlines ----------------------------------------------------------------------------------


async def test_the_pool_timeout_names_the_counts(account: dict[str, Any]) -> None:
    async with open_pool(**account, max_size=1, acquire_timeout=0.2) as pool:
        async with pool.connection():
            with pytest.raises(PoolTimeout) as info:
                async with pool.connection():
                    pass
            with pytest.raises(trio.TooSlowError):  # the same error, as Trio's own
                async with pool.connection(timeout=0.05):
                    pass
        assert "size=1/1 idle=0 in_use=1 opening=0 waiting=1" in str(info.value)
        assert pool.statistics().acquire_timeouts == 2
        await assert_settled(pool)


async def test_the_callers_deadline_applies_to_commands_and_checkout(
    account: dict[str, Any],
) -> None:
    async with open_pool(**account, max_size=1) as pool:
        async with pool.connection():
            with pytest.raises(trio.TooSlowError), trio.fail_after(0.1):
                await pool.run_sync(IMAPClient.noop)
        assert pool.statistics().acquire_timeouts == 0


# -- errors on a connection --------------------------------------------------------------------


async def test_a_no_answer_keeps_the_connection(imap_account: dict[str, Any]) -> None:
    async with open_pool(**imap_account) as pool:
        async with pool.connection() as conn:
            await conn.select_folder("INBOX")
            with pytest.raises(IMAPClientError) as info:
                await conn.select_folder("No such folder")
            assert type(info.value) is IMAPClientError  # imapclient's own, unwrapped
            assert conn.selected_folder is None  # a failed SELECT unselects
            assert conn.broken is None
            number = conn.number
        async with pool.connection() as conn:
            assert conn.number == number
            await conn.noop()
        assert pool.statistics().connections_discarded == 0


async def test_a_bad_answer_keeps_the_connection(imap_account: dict[str, Any]) -> None:
    async with open_pool(**imap_account) as pool:
        async with pool.connection() as conn:
            await conn.select_folder("INBOX")
            with pytest.raises(IMAPClientError):
                await conn.search(["NOT-A-SEARCH-KEY"])
            number = conn.number
        async with pool.connection() as conn:
            assert conn.number == number
            await conn.noop()
        assert pool.statistics().connections_discarded == 0


async def test_a_dropped_connection_is_discarded_and_replaced(
    imap_server: ImapServer, imap_account: dict[str, Any]
) -> None:
    async with open_pool(**imap_account) as pool:
        async with pool.connection() as conn:
            await conn.noop()
            await trio.to_thread.run_sync(imap_server.kick, imap_account["username"])
            with pytest.raises(IMAPClientAbortError):  # the original error, unwrapped
                await conn.noop()
            assert conn.broken is not None
        stats = pool.statistics()
        assert (stats.size, stats.connections_discarded) == (0, 1)
        async with pool.connection() as conn:
            assert conn.number == 2
            await conn.noop()
        await assert_settled(pool)


async def test_an_error_of_the_users_own_function_discards_the_connection(
    account: dict[str, Any],
) -> None:
    def broken_parser(client: IMAPClient) -> None:
        client.noop()
        raise KeyError("not ours to judge")

    async with open_pool(**account) as pool:
        with pytest.raises(KeyError):
            await pool.run_sync(broken_parser)
        assert pool.statistics().connections_discarded == 1


async def test_logout_by_the_user_discards_the_connection(account: dict[str, Any]) -> None:
    async with open_pool(**account) as pool:
        async with pool.connection() as conn:
            await conn.logout()
        assert pool.statistics().connections_discarded == 1
        async with pool.connection() as conn:
            await conn.noop()


# -- state between users -----------------------------------------------------------------------


async def test_the_selected_folder_is_tracked_even_through_run_sync(
    imap_server: ImapServer, imap_account: dict[str, Any]
) -> None:
    seed_folders(imap_server, {"Archive": 1}, user=imap_account["username"])
    async with open_pool(**imap_account, max_size=1) as pool:
        async with pool.connection() as conn:
            assert (conn.selected_folder, conn.readonly) == (None, None)
            await conn.select_folder("INBOX", readonly=True)
            assert (conn.selected_folder, conn.readonly) == ("INBOX", True)
            await conn.run_sync(lambda client: client.select_folder("Archive"))
        async with pool.connection() as conn:
            # The next user sees what was left behind.
            assert (conn.selected_folder, conn.readonly) == ("Archive", False)
            await conn.unselect_folder()
            assert conn.selected_folder is None


async def test_reset_on_release_unselects_and_restores_client_settings(
    imap_account: dict[str, Any],
) -> None:
    async with open_pool(**imap_account, max_size=1, reset_on_release=True) as pool:
        async with pool.connection() as conn:
            await conn.select_folder("INBOX")

            def change_settings(client: IMAPClient) -> None:
                client.use_uid = False
                client.normalise_times = False

            await conn.run_sync(change_settings)
        async with pool.connection() as conn:
            assert conn.selected_folder is None
            settings = await conn.run_sync(lambda c: (c.use_uid, c.normalise_times))
            assert settings == (True, True)
            # The server agrees that nothing is selected: a command needing a folder fails.
            with pytest.raises(IMAPClientError):
                await conn.run_sync(lambda c: c._imap._simple_command("CHECK"))
        assert pool.statistics().connections_discarded == 0


async def test_without_reset_client_settings_are_still_restored(account: dict[str, Any]) -> None:
    async with open_pool(**account, max_size=1) as pool:
        async with pool.connection() as conn:
            await conn.run_sync(lambda c: setattr(c, "use_uid", False))
        async with pool.connection() as conn:
            assert await conn.run_sync(lambda c: c.use_uid) is True


# -- statistics and observing the counts --------------------------------------------------------


async def test_counts_can_be_awaited_without_polling(account: dict[str, Any]) -> None:
    async with open_pool(**account, max_size=1) as pool:
        seen: list[Any] = []

        async def wait_for_idle() -> None:
            seen.append(await pool.counts.wait_value(lambda c: c.idle > 0))

        async with trio.open_nursery() as nursery, pool.connection() as conn:
            nursery.start_soon(wait_for_idle)
            await trio.testing.wait_all_tasks_blocked()
            assert seen == []
            await conn.noop()
        assert seen and seen[0].idle == 1
        assert_consistent(pool)
    assert pool.counts.value == (0, 0, 0, 0, 0)


async def test_statistics_count_what_happened(account: dict[str, Any]) -> None:
    async with open_pool(**account, max_size=2, acquire_timeout=0.1) as pool:
        async with pool.connection() as a, pool.connection() as b:
            await a.noop()
            await b.noop()
            with pytest.raises(PoolTimeout):
                async with pool.connection():
                    pass
        stats = pool.statistics()
    assert stats.name == f"{account['username']}@127.0.0.1:{account['port']}"
    assert (stats.acquires, stats.acquire_waits, stats.acquire_timeouts) == (2, 3, 1)
    assert (stats.connections_opened, stats.connections_discarded) == (2, 0)
    assert stats.open_failures == 0 and stats.last_open_error is None
    assert "idle=2" in repr(pool) or "idle=2" in str(stats)


# -- closing ------------------------------------------------------------------------------------


async def test_closing_wakes_waiters_and_closes_connections_when_they_come_back(
    dovecot: DovecotServer, account: dict[str, Any]
) -> None:
    errors: list[BaseException] = []
    async with open_pool(**account, max_size=1) as pool:
        async with trio.open_nursery() as nursery:
            async with pool.connection() as conn:

                async def waiter() -> None:
                    try:
                        async with pool.connection():
                            pass
                    except PoolClosedError as exc:
                        errors.append(exc)

                nursery.start_soon(waiter)
                await trio.testing.wait_all_tasks_blocked()
                await pool.aclose()
                await trio.testing.wait_all_tasks_blocked()
                assert len(errors) == 1
                await conn.noop()  # still ours until we give it back
            stats = pool.statistics()
            assert (stats.size, stats.connections_closed) == (0, 1)
        with pytest.raises(PoolClosedError):
            async with pool.connection():
                pass
        await pool.aclose()  # a second close is a no-op
    assert await trio.to_thread.run_sync(dovecot.connections, account["username"]) == 0


async def test_leaving_the_block_logs_idle_connections_out(
    dovecot: DovecotServer, account: dict[str, Any]
) -> None:
    async with open_pool(**account, min_size=3) as pool:
        with trio.fail_after(5):
            await pool.counts.wait_value(lambda c: c.idle == 3)
        assert await trio.to_thread.run_sync(dovecot.connections, account["username"]) == 3
    assert pool.statistics().connections_closed == 3
    await trio.testing.wait_all_threads_completed()
    assert await trio.to_thread.run_sync(dovecot.connections, account["username"]) == 0
    # Dovecot's log process writes a session's last line a little after the session is gone.
    for _ in range(100):
        log = dovecot.log_path.read_text()
        if log.count(f"imap({account['username']})") >= 3:
            break
        await trio.sleep(0.02)
    assert log.count(f"imap({account['username']})") >= 3 and "Logged out" in log


async def test_closing_when_logout_fails_still_closes_quietly(
    imap_server: ImapServer, imap_account: dict[str, Any]
) -> None:
    async with open_pool(**imap_account, min_size=2) as pool:
        with trio.fail_after(5):
            await pool.counts.wait_value(lambda c: c.idle == 2)
        # The server drops them: the LOGOUTs of closing will fail.
        await trio.to_thread.run_sync(imap_server.kick, imap_account["username"])
    stats = pool.statistics()
    assert (stats.size, stats.connections_closed) == (0, 2)
    await trio.testing.wait_all_threads_completed()


async def test_leaving_the_block_by_cancellation_still_closes(account: dict[str, Any]) -> None:
    with trio.move_on_after(0.2):
        async with open_pool(**account, min_size=2) as pool:
            await trio.sleep_forever()
    stats = pool.statistics()
    assert stats.closed and stats.size == 0 and stats.connections_closed == 2
    await trio.testing.wait_all_threads_completed()


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_size": 0}, "max_size"),
        ({"min_size": -1}, "min_size"),
        ({"min_size": 5, "max_size": 2}, "larger than max_size"),
        ({"acquire_timeout": 0}, "acquire_timeout"),
        ({"connect_timeout": math.inf}, "connect_timeout"),
        ({"read_timeout": math.nan}, "read_timeout"),
        ({"login_timeout": "5"}, "login_timeout"),
        ({"port": 0}, "port"),
        ({"ssl": True, "starttls": True}, "exclude each other"),
        ({"mx_size": 3}, "unknown option"),
        ({"username": ""}, "username"),
        ({"password": None}, "password"),
    ],
)
async def test_bad_configuration_fails_at_open_pool_before_anything_runs(
    account: dict[str, Any], options: dict[str, Any], message: str
) -> None:
    settings = dict(account, **options)
    with pytest.raises(ConfigurationError, match=message):
        async with open_pool(**settings):
            pytest.fail("the pool opened")
    assert trio.testing.active_thread_count() == 0


async def test_a_refused_port_fails_the_waiters_at_once_with_one_attempt(
    account: dict[str, Any],
) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound but not listening: connections are refused
        errors: list[BaseException] = []
        async with open_pool(**dict(account, port=port), max_size=4) as pool:

            async def user() -> None:
                with pytest.raises(ConnectError) as info:
                    async with pool.connection():
                        pass
                errors.append(info.value)

            started = time.monotonic()
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(user)
            elapsed = time.monotonic() - started
            stats = pool.statistics()
            await assert_settled(pool)
    assert len(errors) == 4
    assert all(isinstance(e.__cause__, ConnectionRefusedError) for e in errors)
    assert elapsed < 5  # not the 30 s acquire timeout
    assert stats.open_failures == 1  # one attempt for four waiters: no retry storm
    assert stats.size == 0
    assert "ConnectionRefusedError" in (stats.last_open_error or "")


async def test_a_wrong_password_fails_fast_typed_and_is_not_retried(
    account: dict[str, Any],
) -> None:
    async with open_pool(**dict(account, password="wrong"), max_size=4) as pool:
        for _ in range(2):
            with pytest.raises(AuthenticationError) as info:
                async with pool.connection():
                    pass
        stats = pool.statistics()
        await assert_settled(pool)
    assert "wrong" not in str(info.value)
    assert "AUTHENTICATIONFAILED" in str(info.value)
    assert stats.open_failures == 2  # one per checkout the user asked for, none by itself
    assert stats.size == 0


class OpenRecorder:
    """Counts the pool's connects and logins (the real ones run); the first login can be held."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.connected = AsyncValue(0)
        self.logins: list[int] = []
        self.release_first_login = threading.Event()
        self.release_first_login.set()
        real_connect, real_login = PooledClient.connect_blocking, PooledClient.login_blocking

        def connect(slot: PooledClient, config: Any) -> None:
            real_connect(slot, config)
            trio.from_thread.run_sync(self._count_connect)

        def login(slot: PooledClient, config: Any, token: str | None = None) -> None:
            self.logins.append(1)
            if len(self.logins) == 1 and not self.release_first_login.wait(10):
                raise TimeoutError("the test never let the first login go on")
            real_login(slot, config, token)

        monkeypatch.setattr(PooledClient, "connect_blocking", connect)
        monkeypatch.setattr(PooledClient, "login_blocking", login)

    def _count_connect(self) -> None:
        self.connected.value += 1


async def test_while_the_first_login_runs_the_others_connect_but_send_no_login(
    account: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = OpenRecorder(monkeypatch)
    recorder.release_first_login.clear()
    release = trio.Event()

    async def hold() -> None:
        async with pool.connection():
            await release.wait()

    async with open_pool(**account, max_size=4) as pool, trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(hold)
        with trio.fail_after(5):
            await recorder.connected.wait_value(4)
        await trio.sleep(0.1)
        assert len(recorder.logins) == 1  # the others wait for the first login
        recorder.release_first_login.set()
        with trio.fail_after(5):
            await pool.counts.wait_value(lambda counts: counts.in_use == 4)
        release.set()
    assert len(recorder.logins) == 4
    assert pool.statistics().connections_opened == 4


async def test_a_wrong_password_costs_one_login_however_many_tasks_wait(
    account: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = OpenRecorder(monkeypatch)
    errors: list[BaseException] = []

    async def checkout() -> None:
        try:
            async with pool.connection():
                pass
        except AuthenticationError as exc:
            errors.append(exc)

    async with open_pool(**dict(account, password="wrong"), max_size=4) as pool:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(checkout)
        stats = pool.statistics()
        await assert_settled(pool)
    assert len(errors) == 4  # every task told at once
    assert len(recorder.logins) == 1
    assert 1 <= recorder.connected.value <= 4
    assert stats.open_failures == 1
    assert stats.size == 0


async def test_an_unknown_host_fails_with_a_connect_error(
    tls_account: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The name lookup is faked so that no query leaves this machine; the pool sees the same
    # socket.gaierror that a real unknown name gives.
    real = socket.getaddrinfo

    def lookup(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "imap.nowhere.invalid":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    async with open_pool(**dict(tls_account, host="imap.nowhere.invalid")) as pool:
        with pytest.raises(ConnectError) as info:
            await pool.run_sync(IMAPClient.noop)
        await assert_settled(pool)
    assert isinstance(info.value.__cause__, socket.gaierror)
    assert pool.statistics().size == 0


async def test_an_untrusted_certificate_is_refused(
    dovecot: DovecotServer, tls_account: dict[str, Any]
) -> None:
    import ssl

    settings = dict(tls_account, ssl_context=ssl.create_default_context())  # no test CA
    async with open_pool(**settings) as pool:
        with pytest.raises(ConnectError) as info:
            await pool.run_sync(IMAPClient.noop)
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)


def test_the_public_names_are_exported() -> None:
    for name in trio_imappool.__all__:
        assert hasattr(trio_imappool, name), name
