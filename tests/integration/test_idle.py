"""idle(): IMAP IDLE as an async iterator, against Dovecot.

Rules: loopback only, servers and relays on free ports; every wait for a push runs under
``fail_after``. Changes to the watched folder are made by "another connection": a plain blocking
imapclient client of the same user, straight to Dovecot, driven from worker threads. Dovecot
batches its pushes: they arrive about 0.5 s after the change, so the deadlines here are a few
seconds while the measured delays are about half a second.

Two network shapes break imapclient's own ``idle_check()`` (mjs/imapclient#519); each is
reproduced here, for imapclient as a control and for :func:`idle`:

- a push in the same TCP segment as the ``+ idling`` continuation: Dovecot writes the
  continuation and the pushes for changes made between SELECT and IDLE in one write; the fault
  proxy's upward latency opens that window, and the change is made inside it;
- a response split across TCP segments: the fault proxy forwards what it reads whole and cannot
  split a line, so :func:`open_splitting_relay` (below) cuts each chunk from the server in two
  segments, some time apart.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, TypeVar

import pytest
import trio
import trio.testing
from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError

from trio_imappool import PoolTimeout, open_pool
from trio_imappool._idle import IdleEvent, IdleEvents, idle
from trio_imappool.testing import DovecotServer, open_fault_proxy
from trio_imappool.testing._dovecot import DovecotFactory

from .conftest import assert_settled

T = TypeVar("T")

MESSAGE = b"From: a@example.org\r\nSubject: idle test\r\n\r\nhello\r\n"
# Generous for Dovecot's ~0.5 s batching on a loaded machine; the delays measured are ~0.5 s.
PUSH_DEADLINE = 3.0


# -- helpers --------------------------------------------------------------------------------------


@pytest.fixture(params=["plain", "tls"])
def any_account(
    request: pytest.FixtureRequest, account: dict[str, Any], tls_account: dict[str, Any]
) -> dict[str, Any]:
    """The test's own user, over plain IMAP and over implicit TLS."""
    return account if request.param == "plain" else tls_account


@pytest.fixture
def other(account: dict[str, Any]) -> Iterator[IMAPClient]:
    """Another connection of the same user, straight to Dovecot (not through any pool)."""
    client = IMAPClient(account["host"], account["port"], ssl=False, timeout=10)
    client.login(account["username"], account["password"])
    yield client
    client.logout()


@pytest.fixture
def imap_other(imap_account: dict[str, Any]) -> Iterator[IMAPClient]:
    """``other`` for ``imap_account``: Dovecot's, then Cyrus's."""
    client = IMAPClient(imap_account["host"], imap_account["port"], ssl=False, timeout=10)
    client.login(imap_account["username"], imap_account["password"])
    yield client
    client.logout()


async def use(client: IMAPClient, fn: Callable[[IMAPClient], T]) -> T:
    return await trio.to_thread.run_sync(fn, client)


def append(client: IMAPClient, count: int = 1) -> None:
    for _ in range(count):
        client.append("INBOX", MESSAGE)


async def next_event(events: IdleEvents, kind: str, within: float = PUSH_DEADLINE) -> IdleEvent:
    """The next event of *kind*, skipping others (RECENT after EXISTS, keepalive OKs)."""
    with trio.fail_after(within):
        async for event in events:
            if event.kind == kind:
                return event
    raise AssertionError("unreachable: the iteration never ends by itself")


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll for a condition nothing signals (a byte count, a thread count)."""
    while True:
        if condition():
            return
        await trio.sleep(0.002)


class SplittingRelay:
    """A loopback TCP relay that can send each chunk from the server in two segments.

    While :attr:`split` is on, a chunk is cut in the middle of its first line; the first part is
    sent at once and the rest :attr:`pause` seconds later (TCP_NODELAY is on, so they leave as
    two segments).
    """

    def __init__(self) -> None:
        self.port = 0
        self.split = False
        self.pause = 0.2
        self.first_part_sent = trio.Event()


async def _pump(
    source: trio.SocketStream,
    sink: trio.SocketStream,
    relay: SplittingRelay | None,
    scope: trio.CancelScope,
) -> None:
    try:
        async for data in source:
            if relay is not None and relay.split and len(data) > 1:
                cut = max(1, data.find(b"\n") // 2)
                await sink.send_all(data[:cut])
                relay.first_part_sent.set()
                await trio.sleep(relay.pause)
                data = data[cut:]
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    scope.cancel()  # one side ended: end both


@asynccontextmanager
async def open_splitting_relay(host: str, port: int) -> AsyncIterator[SplittingRelay]:
    relay = SplittingRelay()

    async def handle(client: trio.SocketStream) -> None:
        try:
            server = await trio.open_tcp_stream(host, port)
        except OSError:
            await client.aclose()
            return
        async with client, server, trio.open_nursery() as nursery:
            nursery.start_soon(_pump, client, server, None, nursery.cancel_scope)
            nursery.start_soon(_pump, server, client, relay, nursery.cancel_scope)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        relay.port = listeners[0].socket.getsockname()[1]
        yield relay
        nursery.cancel_scope.cancel()


# -- pushes -------------------------------------------------------------------------------------


async def test_an_append_by_another_connection_arrives_within_a_second(
    any_account: dict[str, Any], other: IMAPClient
) -> None:
    async with open_pool(**any_account, max_size=2) as pool:
        async with idle(pool, "INBOX") as events:
            assert events.mode == "idle"
            assert events.selected[b"EXISTS"] == 0
            for expected in (1, 2):
                await use(other, append)
                appended = trio.current_time()
                event = await next_event(events, "EXISTS")
                delay = trio.current_time() - appended
                assert (event.number, event.raw) == (expected, (expected, b"EXISTS"))
                assert delay < PUSH_DEADLINE  # measured: about 0.5 s (Dovecot's batching)
            assert events.statistics().idle_commands == 1
        await assert_settled(pool)


async def test_flag_changes_and_expunges_arrive_parsed(
    imap_account: dict[str, Any], imap_other: IMAPClient
) -> None:
    await use(imap_other, lambda c: append(c, 3))
    await use(imap_other, lambda c: c.select_folder("INBOX"))
    uids = sorted(await use(imap_other, lambda c: c.search(["ALL"])))
    async with open_pool(**imap_account, max_size=2) as pool:
        async with idle(pool, "INBOX") as events:
            assert events.selected[b"EXISTS"] == 3
            await use(imap_other, lambda c: c.add_flags([uids[1]], [b"\\Flagged"]))
            fetch = await next_event(events, "FETCH")
            assert fetch.number == 2
            assert b"\\Flagged" in fetch.data[b"FLAGS"]
            assert fetch.raw[:2] == (2, b"FETCH")

            await use(imap_other, lambda c: c.delete_messages([uids[0]]))
            await use(imap_other, lambda c: c.expunge())
            expunge = await next_event(events, "EXPUNGE")
            assert (expunge.number, expunge.data, expunge.raw) == (1, {}, (1, b"EXPUNGE"))
        await assert_settled(pool)


async def test_a_push_in_the_same_segment_as_the_continuation_is_not_missed(
    account: dict[str, Any], other: IMAPClient
) -> None:
    """A change made between SELECT and IDLE: Dovecot answers IDLE with ``+ idling`` and
    ``* 1 EXISTS`` in one write. The proxy's upward latency holds the IDLE command back while
    the change is made; nothing else will ever announce that message."""
    async with open_fault_proxy(account["host"], account["port"]) as proxy:
        settings = dict(account, host=proxy.host, port=proxy.port)
        async with open_pool(**settings, max_size=1) as pool:
            async with pool.connection() as conn:
                await conn.noop()  # logged in before the way up slows down
            proxy.set_latency(up=0.3)
            before = proxy.statistics().bytes_down

            async def append_once_selected() -> None:
                await wait_until(lambda: proxy.statistics().bytes_down > before)  # SELECT done
                await use(other, append)

            with trio.fail_after(5):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(append_once_selected)
                    async with idle(pool, "INBOX") as events:
                        started = trio.current_time()
                        assert events.selected[b"EXISTS"] == 0
                        event = await next_event(events, "EXISTS", within=0.25)
                        assert event.number == 1
                        assert trio.current_time() - started < 0.25  # no second push came
            await assert_settled(pool)


async def test_control_imapclient_idle_check_misses_a_push_sharing_the_continuation(
    account: dict[str, Any], other: IMAPClient
) -> None:
    """The shape above is real: imapclient's idle_check() does not see the push (it sits in
    imaplib's buffer) until idle_done() reads it. If this starts failing, imapclient fixed it."""

    def stock() -> tuple[list[Any], list[Any]]:
        client = IMAPClient(account["host"], account["port"], ssl=False, timeout=5)
        client.login(account["username"], account["password"])
        client.select_folder("INBOX", readonly=True)
        append(other)
        client.idle()
        missed = client.idle_check(timeout=0.5)
        _, responses = client.idle_done()
        client.logout()
        return missed, responses

    missed, responses = await trio.to_thread.run_sync(stock)
    assert missed == []
    assert (1, b"EXISTS") in responses


async def test_a_response_split_across_segments_is_read_whole(
    account: dict[str, Any], other: IMAPClient
) -> None:
    async with open_splitting_relay(account["host"], account["port"]) as relay:
        settings = dict(account, port=relay.port)
        async with open_pool(**settings, max_size=1) as pool:
            async with idle(pool, "INBOX") as events:
                relay.split = True
                await use(other, append)
                event = await next_event(events, "EXISTS")
                assert relay.first_part_sent.is_set()
                assert event.raw == (1, b"EXISTS")
                relay.split = False
            assert pool.statistics().connections_discarded == 0
            await assert_settled(pool)


async def test_control_imapclient_idle_check_dies_on_a_split_response(
    account: dict[str, Any], other: IMAPClient
) -> None:
    """The relay reproduces the second bug: idle_check() reads the first part non-blocking and
    raises ``unterminated line``."""
    async with open_splitting_relay(account["host"], account["port"]) as relay:

        def stock() -> None:
            client = IMAPClient(account["host"], relay.port, ssl=False, timeout=5)
            client.login(account["username"], account["password"])
            client.select_folder("INBOX", readonly=True)
            client.idle()
            relay.split = True
            append(other)
            try:
                while not client.idle_check(timeout=PUSH_DEADLINE):
                    pass
            finally:
                client.shutdown()

        with pytest.raises(IMAPClientAbortError, match="unterminated line"):
            await trio.to_thread.run_sync(stock)


# -- renewal and polling --------------------------------------------------------------------------


async def test_idle_is_renewed_before_renew_after_without_losing_pushes(
    imap_account: dict[str, Any], imap_other: IMAPClient
) -> None:
    async with open_pool(**imap_account, max_size=2) as pool:
        async with idle(pool, "INBOX", renew_after=0.2) as events:
            count = 0
            with trio.fail_after(PUSH_DEADLINE + 2):
                async with trio.open_nursery() as nursery:

                    async def append_slowly() -> None:
                        for _ in range(8):  # across several renewals, some during one
                            await use(imap_other, append)
                            await trio.sleep(0.07)

                    nursery.start_soon(append_slowly)
                    async for event in events:
                        if event.kind == "EXISTS":
                            assert event.number is not None
                            assert event.number > count  # in order, none twice
                            count = event.number
                            if count == 8:
                                break
            # Renewed every 0.2 s over the ~0.5 s + 8 x 0.07 s it took.
            assert events.statistics().idle_commands >= 4
        assert pool.statistics().connections_discarded == 0
        await assert_settled(pool)


async def test_a_server_without_idle_is_polled_with_noop(dovecot_factory: DovecotFactory) -> None:
    server: DovecotServer = dovecot_factory(
        users={"nidle": "nidle-pw"},
        extra_config="protocol imap {\n  imap_capability = IMAP4rev1 LITERAL+ UIDPLUS\n}\n",
    )
    settings = server.pool_kwargs(tls=False)
    async with open_pool(**settings, max_size=1) as pool:
        capabilities = await pool.run_sync(lambda client: client.capabilities())
        assert b"IDLE" not in capabilities
        other = IMAPClient(settings["host"], settings["port"], ssl=False, timeout=10)
        other.login(settings["username"], settings["password"])
        try:
            async with idle(pool, "INBOX", poll_interval=0.1) as events:
                assert events.mode == "poll"
                await use(other, append)
                appended = trio.current_time()
                event = await next_event(events, "EXISTS")
                assert event.number == 1
                assert trio.current_time() - appended < 0.5
                assert events.statistics().polls >= 1
                assert events.statistics().idle_commands == 0
        finally:
            other.logout()
        assert pool.statistics().connections_discarded == 0
        await assert_settled(pool)


# -- the connection -------------------------------------------------------------------------------


async def test_leaving_the_block_ends_idle_and_returns_a_healthy_connection(
    imap_account: dict[str, Any],
) -> None:
    async with open_pool(**imap_account, max_size=2) as pool:
        async with idle(pool, "INBOX") as events:
            assert pool.statistics().in_use == 1
            assert "idle_commands=1" in repr(events)
        stats = pool.statistics()
        assert (stats.idle, stats.connections_opened, stats.connections_discarded) == (1, 1, 0)
        async with pool.connection() as conn:
            assert conn.number == 1
            assert conn.selected_folder == "INBOX"
            assert conn.readonly is True
            _, untagged = await conn.noop()  # not in IDLE any more: a command works
            assert untagged == []
        await assert_settled(pool)


async def test_the_idling_connection_is_not_handed_to_anyone_else(
    imap_account: dict[str, Any],
) -> None:
    async with open_pool(**imap_account, max_size=1) as pool:
        async with idle(pool, "INBOX"):
            with pytest.raises(PoolTimeout):
                async with pool.connection(timeout=0.2):
                    pass  # pragma: no cover
        async with pool.connection(timeout=1) as conn:
            await conn.noop()
        await assert_settled(pool)


async def test_a_server_bye_ends_the_iteration_and_the_connection_is_discarded(
    dovecot: DovecotServer, account: dict[str, Any]
) -> None:
    async with open_pool(**account, max_size=1) as pool:
        seen: list[IdleEvent] = []
        with pytest.raises(IMAPClientAbortError, match="closed the connection: BYE"):
            async with idle(pool, "INBOX") as events:
                await trio.to_thread.run_sync(dovecot.kick, account["username"])
                seen.append(await next_event(events, "BYE"))
                with trio.fail_after(PUSH_DEADLINE):
                    await events.__anext__()
        assert seen[0].raw[0] == b"BYE"
        assert pool.statistics().connections_discarded == 1
        await assert_settled(pool)


async def test_when_done_gets_no_answer_the_connection_is_discarded(
    account: dict[str, Any],
) -> None:
    async with open_fault_proxy(account["host"], account["port"]) as proxy:
        settings = dict(account, host=proxy.host, port=proxy.port)
        async with open_pool(**settings, max_size=1) as pool:
            async with idle(pool, "INBOX", done_timeout=0.2):
                proxy.stall("down")
                left = trio.current_time()
            assert trio.current_time() - left < 0.5
            stats = pool.statistics()
            assert (stats.size, stats.connections_discarded) == (0, 1)
            await assert_settled(pool)


# -- cancellation ---------------------------------------------------------------------------------


async def test_cancelling_the_wait_is_instant_and_keeps_the_connection(
    account: dict[str, Any],
) -> None:
    async with open_pool(**account, max_size=1) as pool:
        with trio.CancelScope() as scope:
            async with idle(pool, "INBOX") as events, trio.open_nursery() as nursery:

                async def iterate() -> None:
                    async for _ in events:
                        pass  # pragma: no cover

                nursery.start_soon(iterate)
                await trio.testing.wait_all_tasks_blocked()
                cancelled = trio.current_time()
                scope.cancel()  # enclosing the block: leaving it runs under cancellation
        assert scope.cancelled_caught
        assert trio.current_time() - cancelled < 0.5
        stats = pool.statistics()
        assert (stats.idle, stats.connections_discarded) == (1, 0)  # IDLE ended cleanly
        await assert_settled(pool)
        async with pool.connection() as conn:
            await conn.noop()


async def test_cancelling_in_the_middle_of_a_read_interrupts_it_and_discards(
    account: dict[str, Any], other: IMAPClient
) -> None:
    async with open_splitting_relay(account["host"], account["port"]) as relay:
        settings = dict(account, port=relay.port)
        async with open_pool(**settings, max_size=1, read_timeout=30) as pool:
            async with idle(pool, "INBOX") as events:
                relay.split, relay.pause = True, 30.0  # the rest of the push never comes
                await use(other, append)  # done: no thread of ours runs until the reader's
                cancelled_at: list[float] = []
                with trio.fail_after(PUSH_DEADLINE):
                    async with trio.open_nursery() as nursery:

                        async def cancel_mid_read() -> None:
                            await relay.first_part_sent.wait()
                            # Until the reader's worker thread is inside its call (blocked in
                            # readline for the rest), not merely queued for a thread.
                            slot = events._conn._live()
                            await wait_until(lambda: slot.thread_running)
                            cancelled_at.append(trio.current_time())
                            nursery.cancel_scope.cancel()

                        nursery.start_soon(cancel_mid_read)
                        async for _ in events:
                            pass  # pragma: no cover
                assert trio.current_time() - cancelled_at[0] < 0.5
                assert events.statistics().received == 0
                with pytest.raises(trio.BrokenResourceError):
                    await events.__anext__()
            stats = pool.statistics()
            assert (stats.size, stats.connections_discarded) == (0, 1)
            await assert_settled(pool)


# -- misuse ---------------------------------------------------------------------------------------


async def test_misuse_is_reported(account: dict[str, Any]) -> None:
    async with open_pool(**account, max_size=1) as pool:
        for bad in ({"renew_after": 0}, {"renew_after": 30 * 60}, {"poll_interval": 0}):
            with pytest.raises(ValueError):
                async with idle(pool, "INBOX", **bad):
                    pass  # pragma: no cover
        with pytest.raises(IMAPClientError, match="select failed"):
            async with idle(pool, "No such folder"):
                pass  # pragma: no cover
        assert pool.statistics().connections_discarded == 0  # a NO leaves it usable
        with pytest.raises(IMAPClientError, match="select failed"):
            async with idle(pool, "No such folder"):
                pass  # pragma: no cover
        assert pool.statistics().connections_discarded == 0  # a NO leaves it usable
        async with idle(pool, "INBOX") as events, trio.open_nursery() as nursery:
            nursery.start_soon(events.__anext__)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await events.__anext__()
            nursery.cancel_scope.cancel()
        with pytest.raises(trio.ClosedResourceError):
            await events.__anext__()
        await assert_settled(pool)


async def test_idle_is_a_method_of_the_pool_too(account: dict[str, Any]) -> None:
    async with open_pool(**account) as pool, pool.idle("INBOX") as events:
        assert events.mode == "idle"
        assert events.statistics().folder == "INBOX"
