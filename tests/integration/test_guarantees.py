"""Regression tests of the pool's core guarantees: one test per defect found in review.

Each test is named after what a user saw, runs against Dovecot where Dovecot can show the
behaviour and against the scripted server otherwise, and failed on the code before its fix.
Loopback only, free ports, a deadline on every test.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import pytest
import trio
import trio.testing
from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError

from trio_imappool import PoolTimeout, fetch_many, open_pool, open_pool_group
from trio_imappool import _idle as idle_module
from trio_imappool.testing import (
    DovecotServer,
    ScriptedCommand,
    ScriptedFolder,
    ScriptedMessage,
    ScriptedSession,
    open_fault_proxy,
    open_scripted_server,
    seed_folders,
)

from .conftest import assert_consistent, assert_settled

BODY = b"Subject: hi\r\n\r\nhello\r\n"


def blocking_client(account: dict[str, Any]) -> IMAPClient:
    client = IMAPClient(account["host"], account["port"], ssl=False, timeout=5)
    client.login(account["username"], account["password"])
    return client


# -- 1. a folder checkout and a dead idle connection ---------------------------------------------


async def test_a_folder_checkout_with_dead_idle_connections_opens_a_fresh_one_and_keeps_the_pool(
    dovecot: DovecotServer, account: dict[str, Any]
) -> None:
    with trio.fail_after(20):
        async with open_pool(**account, max_size=3) as pool:
            async with contextlib.AsyncExitStack() as stack:
                for _ in range(3):
                    await stack.enter_async_context(pool.connection("INBOX", readonly=True))
            assert pool.statistics().idle == 3
            await trio.to_thread.run_sync(dovecot.kick, account["username"])
            await trio.sleep(0.2)  # the server's FINs arrive
            async with pool.connection("INBOX", readonly=True) as conn:
                await conn.noop()
            pool._maintain()  # the background task's pass over the idle connections
            assert_consistent(pool)
            stats = pool.statistics()
            assert stats.connections_discarded == 3, stats
            assert stats.size == stats.idle == 1, stats
            assert len(pool._size_limiter.statistics().borrowers) == 1


# -- 2. a checkout shared with a running command -------------------------------------------------


def slow_noop(client: IMAPClient, seconds: float) -> bytes:
    time.sleep(seconds)
    result: bytes = client.noop()[0]
    return result


async def test_a_connection_shared_with_a_running_command_comes_back_only_when_it_ends(
    account: dict[str, Any],
) -> None:
    results: list[Any] = []
    with trio.fail_after(20):
        async with open_pool(**account, max_size=1) as pool, trio.open_nursery() as nursery:
            async with pool.connection() as conn:
                first = conn.number

                async def child() -> None:
                    results.append(await conn.run_sync(slow_noop, 0.5))

                nursery.start_soon(child)
                await trio.testing.wait_all_tasks_blocked()
            # The block ended while the child's command runs: still in use, not idle.
            assert (pool.statistics().idle, pool.statistics().in_use) == (0, 1)
            async with pool.connection() as conn:  # waits for the command to end
                assert results, "handed out while another task's command was still running"
                assert conn.number == first
                await conn.noop()  # no BusyResourceError: this task holds it alone
            await assert_settled(pool)
    assert pool.statistics().connections_discarded == 0


# -- 3. a command after an interrupted one whose thread still runs -------------------------------


def sleepy(client: IMAPClient, seconds: float) -> None:
    time.sleep(seconds)  # not socket I/O: the interrupt cannot wake it


async def test_a_command_after_an_interrupted_one_whose_thread_still_runs_is_refused(
    account: dict[str, Any],
) -> None:
    with trio.fail_after(20):
        start = trio.current_time()
        async with (
            open_pool(**account, max_size=1, connect_timeout=5, login_timeout=5) as pool,
            pool.connection() as conn,
        ):
            with trio.move_on_after(0.1):
                await conn.run_sync(sleepy, 2.5)  # abandoned after the 1 s grace period
            assert threading.active_count() > 1
            with pytest.raises(trio.BrokenResourceError, match="still running"):
                await conn.noop()
        # Leaving the pool waited for the orphaned thread, as open_pool promises.
        assert trio.current_time() - start >= 2.4
        assert trio.testing.active_thread_count() == 0


# -- 4. another session's flag change during a fetch ---------------------------------------------


async def test_another_sessions_flag_change_during_a_fetch_is_never_given_to_another_message(
    dovecot: DovecotServer, account: dict[str, Any]
) -> None:
    """Dovecot sends the change as ``* 6 FETCH (FLAGS (\\Deleted))``, without a UID; with UID 1
    and 2 expunged, sequence number 6 is UID 8, and UID 6 must not get its flag."""
    await trio.to_thread.run_sync(
        lambda: seed_folders(dovecot, {"INBOX": 10}, user=account["username"], size=300)
    )
    other = await trio.to_thread.run_sync(blocking_client, account)
    try:
        await trio.to_thread.run_sync(other.select_folder, "INBOX")
        await trio.to_thread.run_sync(lambda: other.delete_messages([1, 2]))
        await trio.to_thread.run_sync(other.expunge)
        with trio.fail_after(20):
            async with open_pool(**account, max_size=1) as pool:
                async with pool.connection("INBOX", readonly=True) as conn:
                    await trio.to_thread.run_sync(lambda: other.add_flags([8], [b"\\Deleted"]))
                    fetched = await conn.fetch([6], ["FLAGS", "BODY.PEEK[]"])
                    assert sorted(fetched) == [6]
                    assert b"\\Deleted" not in fetched[6][b"FLAGS"]
                    assert fetched[6][b"SEQ"] == 4
                # The same through fetch_many's pipeline (its EXAMINE resyncs the session; the
                # scripted test below sends the unsolicited lines inside the FETCH's answer).
                await trio.to_thread.run_sync(lambda: other.add_flags([7], [b"\\Flagged"]))
                async with fetch_many(pool, {"INBOX": [5, 6]}, ["FLAGS", "BODY.PEEK[]"]) as got:
                    messages = {uid: data async for _, uid, data in got}
                assert sorted(messages) == [5, 6]
                for data in messages.values():
                    assert b"\\Flagged" not in data[b"FLAGS"] and b"\\Deleted" not in data[b"FLAGS"]
    finally:
        await trio.to_thread.run_sync(other.logout)


async def test_unsolicited_fetch_lines_without_uid_never_become_results_or_phantoms() -> None:
    """A table of what a server may slip into a UID FETCH's answer."""

    async def noisy(session: ScriptedSession, command: ScriptedCommand) -> None:
        await session.send_line(b"* 2 FETCH (FLAGS (\\Deleted))")  # no UID: another's change
        await session.send_line(b"* 9 FETCH (FLAGS (\\Seen))")  # a message not asked for
        await session.send_line(b"* 1 FETCH (UID 77 FLAGS (\\Seen))")  # a UID not asked for
        await session.default(command)

    folder = ScriptedFolder([ScriptedMessage(uid=1, body=BODY), ScriptedMessage(uid=2, body=BODY)])
    with trio.fail_after(20):
        async with (
            open_scripted_server(folders={"INBOX": folder}, handlers={"FETCH": noisy}) as server,
            open_pool(**server.pool_kwargs(), max_size=1) as pool,
        ):
            async with pool.connection("INBOX", readonly=True) as conn:
                fetched = await conn.fetch([1, 2], ["BODY.PEEK[]"])
            assert sorted(fetched) == [1, 2]
            assert all(set(data) == {b"BODY[]", b"SEQ", b"UID"} for data in fetched.values())
            async with fetch_many(pool, {"INBOX": [1, 2]}, ["BODY.PEEK[]"]) as results:
                got = {uid: data async for _, uid, data in results}
            assert sorted(got) == [1, 2]
            assert all(b"FLAGS" not in data for data in got.values())


# -- 5. two tasks iterating one fetch_many result ------------------------------------------------


async def test_two_tasks_iterating_one_fetch_many_result_get_busy_resource_error(
    dovecot: DovecotServer, account: dict[str, Any]
) -> None:
    uids = await trio.to_thread.run_sync(
        lambda: seed_folders(dovecot, {"INBOX": 40}, user=account["username"], size=300)
    )
    seen: list[int] = []
    errors: list[BaseException] = []
    with trio.fail_after(20):
        async with (
            open_pool(**account, max_size=2) as pool,
            fetch_many(pool, uids, ["BODY.PEEK[]"], batch_size=5) as results,
        ):

            async def consume() -> None:
                try:
                    async for _, uid, _ in results:
                        seen.append(uid)
                except trio.BusyResourceError as exc:
                    errors.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume)
                nursery.start_soon(consume)
    assert len(errors) == 1  # the second task was refused at once
    assert sorted(seen) == uids["INBOX"]  # the first got every message


# -- 6. the checkout's timeout on a black-holed network ------------------------------------------


async def test_a_checkout_timeout_holds_on_a_black_holed_network(
    account: dict[str, Any],
) -> None:
    with trio.fail_after(30):
        async with open_fault_proxy(account["host"], account["port"]) as proxy:
            settings = {**account, "port": proxy.port}
            async with open_pool(
                **settings, max_size=3, noop_check_after=0.01, connect_timeout=3
            ) as pool:
                async with contextlib.AsyncExitStack() as stack:
                    for _ in range(3):
                        await stack.enter_async_context(pool.connection())
                proxy.set_blackhole(True)
                await trio.sleep(0.05)  # idle past noop_check_after: each gets a NOOP check
                start = trio.current_time()
                with pytest.raises(PoolTimeout):
                    async with pool.connection(timeout=0.5):
                        pass
                took = trio.current_time() - start
                proxy.set_blackhole(False)
    # Each of the three idle connections' NOOP checks would have waited 3 s before the fix.
    assert took < 1.5, took


# -- 7. IDLE ended by the server before DONE -----------------------------------------------------


async def test_leaving_idle_after_the_server_ended_it_keeps_the_next_user_in_step() -> None:
    async def short_idle(session: ScriptedSession, command: ScriptedCommand) -> None:
        await session.send_line("+ idling")
        await trio.sleep(0.2)  # the server's own timer ends IDLE; the client has not read it
        await session.send_line(f"{command.tag} OK IDLE ended by the server")
        line = await session.read_line()
        await session.send_line(line.split(b" ")[0] + b" BAD unknown command")

    with trio.fail_after(20):
        async with (
            open_scripted_server(handlers={"IDLE": short_idle}) as server,
            open_pool(**server.pool_kwargs(), max_size=1) as pool,
        ):
            async with pool.idle("INBOX"):
                await trio.sleep(0.5)  # not iterating: IDLE's completion stays unread
            async with pool.connection() as conn:
                await conn.noop()
                await conn.select_folder("INBOX")
            stats = pool.statistics()
    assert stats.connections_discarded == 0, stats
    assert stats.connections_opened == 1, stats


# -- 8. IDLE events read when a cancellation lands ------------------------------------------------


async def test_idle_events_read_while_a_cancel_lands_come_with_the_next_iteration(
    dovecot: DovecotServer, account: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = idle_module._read_batch
    slow = threading.Event()

    def read_then_dawdle(client: Any, session: Any) -> None:
        real(client, session)
        if slow.is_set():
            time.sleep(0.3)  # the events are read; the task is cancelled before they arrive

    monkeypatch.setattr(idle_module, "_read_batch", read_then_dawdle)
    other = await trio.to_thread.run_sync(blocking_client, account)
    try:
        with trio.fail_after(20):
            async with open_pool(**account, max_size=2) as pool, pool.idle("INBOX") as events:
                slow.set()
                await trio.to_thread.run_sync(
                    lambda: other.append("INBOX", b"Subject: x\r\n\r\nx\r\n")
                )
                with trio.move_on_after(2.0):
                    await trio.lowlevel.wait_readable(events._sock)  # the push has arrived
                with trio.move_on_after(0.05):
                    await events.__anext__()  # cancelled while the thread holds the push
                slow.clear()
                event = await events.__anext__()
                assert event.kind in ("EXISTS", "RECENT"), event
    finally:
        await trio.to_thread.run_sync(other.logout)


# -- 9. one checkout object entered by two tasks -------------------------------------------------


async def test_one_checkout_object_entered_by_two_tasks_raises_at_once_and_leaks_nothing(
    dovecot: DovecotServer, account: dict[str, Any]
) -> None:
    errors: list[BaseException] = []
    with trio.fail_after(20):
        async with open_pool(**account, max_size=2) as pool:
            checkout = pool.connection()

            async def enter() -> None:
                try:
                    async with checkout as conn:
                        await conn.noop()
                except RuntimeError as exc:
                    errors.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(enter)
                nursery.start_soon(enter)
            await assert_settled(pool)
            assert pool.statistics().size == pool.statistics().idle
        assert len(errors) == 1 and "already in use" in str(errors[0])

        errors.clear()

        async def credentials(name: str) -> dict[str, Any]:
            return {"username": account["username"], "password": account["password"]}

        async with open_pool_group(
            credentials, host=account["host"], port=account["port"], ssl=False
        ) as group:
            group_checkout = group.connection(account["username"])

            async def enter_group() -> None:
                try:
                    async with group_checkout as conn:
                        await conn.noop()
                except RuntimeError as exc:
                    errors.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(enter_group)
                nursery.start_soon(enter_group)
            stats = group.statistics()
    assert len(errors) == 1 and "already in use" in str(errors[0])
    assert stats.in_use == 0, stats


# -- 10. a message expunged during fetch_many -----------------------------------------------------


async def test_a_message_returned_without_its_body_is_skipped_and_counted_not_yielded() -> None:
    folder = ScriptedFolder(
        [
            ScriptedMessage(uid=1, body=BODY),
            ScriptedMessage(uid=2, body=None),  # BODY[] NIL: expunged by another session
            ScriptedMessage(uid=3, body=BODY, in_fetch=False),  # not returned at all
            ScriptedMessage(uid=4, body=BODY),
        ]
    )
    with trio.fail_after(20):
        async with (
            open_scripted_server(folders={"INBOX": folder}) as server,
            open_pool(**server.pool_kwargs(), max_size=1) as pool,
            fetch_many(pool, {"INBOX": [1, 2, 3, 4]}, ["BODY.PEEK[]"]) as results,
        ):
            got = {uid: data[b"BODY[]"] async for _, uid, data in results}
            progress = results.progress
    assert got == {1: BODY, 4: BODY}
    assert progress.messages_done == 4 and progress.messages_missing == 2
    assert progress.complete


# -- 11. a server that trickles its greeting -----------------------------------------------------


async def test_a_server_trickling_its_greeting_keeps_no_thread_and_starves_no_command() -> None:
    async def greet(session: ScriptedSession) -> None:
        if session.number == 1:
            await session.send_line("* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready")
            return
        for _ in range(200):  # a byte every 0.1 s: the socket's timeout never fires
            await session.send(b"*")
            await trio.sleep(0.1)

    with trio.fail_after(30):
        async with open_scripted_server(greeting=greet) as server:
            start = trio.current_time()
            async with (
                open_pool(
                    **server.pool_kwargs(), max_size=2, connect_timeout=0.5, login_timeout=0.5
                ) as pool,
                pool.connection() as held,
            ):
                with pytest.raises(PoolTimeout):
                    async with pool.connection(timeout=1.5):
                        pass
                # The abandoned open gave its thread back: a command on the held
                # connection gets one at once.
                with trio.fail_after(2):
                    await held.noop()
            took = trio.current_time() - start
            assert trio.testing.active_thread_count() == 0
    assert took < 8, took  # not the 20 s the server would trickle for


# -- 12. imaplib's over-long line, and bytes buffered inside imaplib -----------------------------


async def test_an_over_long_response_line_discards_the_connection() -> None:
    async def huge(session: ScriptedSession, command: ScriptedCommand) -> None:
        await session.send(b"* OK " + b"x" * 1_000_001 + b"\r\n")
        await session.send_line(f"{command.tag} OK NOOP done")

    with trio.fail_after(30):
        async with (
            open_scripted_server(handlers={"NOOP": huge}) as server,
            open_pool(**server.pool_kwargs(), max_size=1) as pool,
        ):
            async with pool.connection() as conn:
                first = conn.number
                with pytest.raises(IMAPClientError, match="more than"):
                    await conn.noop()
                assert conn.broken is not None
            async with pool.connection() as conn:
                assert conn.number != first
                await conn.select_folder("INBOX")
            stats = pool.statistics()
    assert stats.connections_discarded == 1, stats


async def test_a_connection_with_unread_bytes_inside_imaplib_is_not_handed_out() -> None:
    """The server's answer and an unasked response arrive in one segment: imaplib reads both
    into its buffer, so the socket is not readable, but the connection is not in step."""

    async def chatty(session: ScriptedSession, command: ScriptedCommand) -> None:
        await session.send(f"{command.tag} OK NOOP done\r\n* BYE going away\r\n".encode())

    with trio.fail_after(20):
        async with (
            open_scripted_server(handlers={"NOOP": chatty}) as server,
            open_pool(**server.pool_kwargs(), max_size=1) as pool,
        ):
            async with pool.connection() as conn:
                first = conn.number
                await conn.noop()
            async with pool.connection() as conn:
                assert conn.number != first  # the first one was dropped at checkout
            stats = pool.statistics()
    assert stats.connections_discarded == 1, stats


# -- folder names are never command syntax (hostile input, issue of the same review) -------------

INJECTED = "INBOX\r\nX1 CREATE InjectedByFolder"


async def test_a_folder_name_with_a_line_break_is_refused_before_anything_is_sent(
    dovecot: DovecotServer, account: dict[str, Any]
) -> None:
    from trio_imappool import ConfigurationError, add_flags_many, copy_many

    with trio.fail_after(20):
        async with open_pool(**account, max_size=1) as pool:
            for name in (INJECTED, "a\nb", "a\x00b"):
                with pytest.raises(ConfigurationError, match="line break"):
                    pool.connection(name)
                with pytest.raises(ConfigurationError):
                    fetch_many(pool, {name: [1]}, ["BODY.PEEK[]"])
                with pytest.raises(ConfigurationError):
                    await add_flags_many(pool, {name: [1]}, [b"\\Seen"])
                with pytest.raises(ConfigurationError):
                    await copy_many(pool, {"INBOX": [1]}, name)
                with pytest.raises(ConfigurationError):
                    async with pool.idle(name):
                        pass
            async with pool.connection() as conn:
                first = conn.number
                # Every command's folder argument, through the connection itself.
                with pytest.raises(ConfigurationError):
                    await conn.select_folder(INJECTED)
                with pytest.raises(ConfigurationError):
                    await conn.create_folder(INJECTED)
                with pytest.raises(ConfigurationError):
                    await conn.folder_status(INJECTED, ["MESSAGES"])
                await conn.noop()  # nothing was sent: the connection is in step
                folders = [name for _, _, name in await conn.list_folders()]
            async with pool.connection() as conn:
                assert conn.number == first  # kept: the refusal came before the wire
    assert not any("Injected" in name for name in folders), folders


async def test_a_server_trickling_after_starttls_keeps_no_thread() -> None:
    """STARTTLS replaces the connection's socket in the middle of the open: the new one must be
    the one the pool shuts down when it gives up."""
    import ssl

    import trustme

    from trio_imappool import ConnectError

    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)

    async def handler(stream: trio.SocketStream) -> None:
        await stream.send_all(b"* OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN] ready\r\n")
        received = b""
        while b"\r\n" not in received:
            received += await stream.receive_some()
        await stream.send_all(received.split()[0] + b" OK begin TLS\r\n")
        tls = trio.SSLStream(stream, server_context, server_side=True)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await tls.do_handshake()
            for _ in range(200):  # the CAPABILITY answer, a byte every 0.1 s
                await tls.send_all(b"*")
                await trio.sleep(0.1)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(trio.serve_tcp, handler, 0)
            port = listeners[0].socket.getsockname()[1]
            start = trio.current_time()
            async with open_pool(
                "127.0.0.1",
                port,
                ssl=False,
                starttls=True,
                ssl_context=client_context,
                username="u",
                password="p",
                max_size=1,
                connect_timeout=0.5,
                login_timeout=0.5,
            ) as pool:
                with pytest.raises((PoolTimeout, ConnectError)):
                    async with pool.connection(timeout=2):
                        pass
            took = trio.current_time() - start
            # (An abandoned worker no longer counts in trio's active_thread_count: look at
            # the threads themselves; trio names a busy worker after its function's caller.)
            opening = [t.name for t in threading.enumerate() if "Pool._open" in t.name]
            assert not opening, f"the open's thread is still reading: {opening}"
            nursery.cancel_scope.cancel()
    assert took < 5, took


async def test_an_expired_idle_connection_is_not_handed_out_with_an_infinite_acquire_timeout(
    account: dict[str, Any],
) -> None:
    # acquire_timeout=inf once made the checkout's "now" inf - inf = NaN, and no connection
    # looked past its lifetime.
    with trio.fail_after(20):
        async with open_pool(**account, max_size=1, acquire_timeout=float("inf")) as pool:
            async with pool.connection() as conn:
                first = conn._slot
            (idle,) = pool._state.idle
            idle.expires_at = trio.current_time() - 1  # past its max_lifetime
            async with pool.connection() as conn:
                assert conn._slot is not first
                await conn.noop()
            assert pool.statistics().connections_opened == 2
            await assert_settled(pool)
