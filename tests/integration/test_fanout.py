"""Fan-out (``trio_imappool._fanout``) against the session's Dovecot.

Each test has a Dovecot user of its own (the ``account`` fixture) and seeds it with
:func:`seed_folders`, so messages compare byte for byte with :func:`make_message`. Faults and
latency go through the loopback fault proxy. Every test runs under pytest-timeout, and waits
that could hang run under ``fail_after``; tests that leave a fan-out early end with
:func:`assert_settled` (nothing checked out, no worker thread left).
"""

from __future__ import annotations

import math
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError
from trio_util import AsyncValue

from trio_imappool import Connection, Pool, PoolError, _fanout, open_pool
from trio_imappool._client import PipelinedFetch, after_noop
from trio_imappool._fanout import (
    FanOutError,
    Progress,
    add_flags_many,
    copy_many,
    fetch_many,
    move_many,
    remove_flags_many,
    search_many,
)
from trio_imappool.testing import (
    DovecotServer,
    FaultProxy,
    ImapServer,
    make_message,
    open_fault_proxy,
)
from trio_imappool.testing import seed_folders as _seed

from .conftest import assert_settled

BODY = ["BODY.PEEK[]"]


def seed(
    dovecot: ImapServer, account: dict[str, Any], folders: dict[str, int], size: int = 600
) -> dict[str, list[int]]:
    return _seed(dovecot, folders, user=account["username"], size=size)


class Commands:
    """Records the UID batches given to one command of :class:`Connection`, and which
    connection ran each (installed with monkeypatch, so the real command still runs)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.batches: list[tuple[int, list[int]]] = []
        #: How many of the commands have returned.
        self.done = AsyncValue(0)
        real: Callable[..., Awaitable[Any]] = getattr(Connection, name)

        async def recording(conn: Connection, uids: list[int], *args: Any, **kw: Any) -> Any:
            self.batches.append((conn.number, list(uids)))
            result = await real(conn, uids, *args, **kw)
            self.done.value += 1
            return result

        monkeypatch.setattr(Connection, name, recording)
        if name != "fetch":
            # A write batch on a connection that had the folder selected runs the command
            # with a NOOP pipelined before it, through run_sync.
            plain_run_sync = Connection.run_sync

            async def run_sync_after_noop(conn: Connection, fn: Any, *args: Any) -> Any:
                if fn is not after_noop or args[0] != name:
                    return await plain_run_sync(conn, fn, *args)
                self.batches.append((conn.number, list(args[1][0])))
                result = await plain_run_sync(conn, fn, *args)
                self.done.value += 1
                return result

            monkeypatch.setattr(Connection, "run_sync", run_sync_after_noop)
        if name == "fetch":
            # fetch_many sends its FETCHes pipelined, a few batches in one thread hop.
            real_run_sync = Connection.run_sync

            async def run_sync(conn: Connection, fn: Any, *args: Any) -> Any:
                if fn is not _fanout._fetch_pipelined:
                    return await real_run_sync(conn, fn, *args)
                steps = args[0]
                self.batches += [(conn.number, list(uids)) for _, uids in steps]
                result = await real_run_sync(conn, fn, *args)
                self.done.value += len(steps)
                return result

            monkeypatch.setattr(Connection, "run_sync", run_sync)

    @property
    def sizes(self) -> list[int]:
        return [len(uids) for _, uids in self.batches]

    @property
    def connections(self) -> set[int]:
        return {number for number, _ in self.batches}


@asynccontextmanager
async def proxied_pool(
    account: dict[str, Any], *, latency: float = 0.0, **options: Any
) -> AsyncIterator[tuple[Pool, FaultProxy]]:
    async with (
        open_fault_proxy(account["host"], account["port"], up=latency, down=latency) as proxy,
        open_pool(**dict(account, host=proxy.host, port=proxy.port), **options) as pool,
    ):
        yield pool, proxy


def flags_of(account: dict[str, Any], folder: str) -> dict[int, tuple[bytes, ...]]:
    client = IMAPClient(account["host"], account["port"], ssl=False)
    try:
        client.login(account["username"], account["password"])
        client.select_folder(folder, readonly=True)
        return {uid: flags for uid, flags in client.get_flags(client.search("ALL")).items()}
    finally:
        client.logout()


# -- fetch_many: the whole mailbox, byte-identical, in bounded memory -------------------------


async def test_a_10000_message_mailbox_streams_byte_identical_in_memory_bounded_by_the_batches(
    dovecot: DovecotServer, account: dict[str, Any]
) -> None:
    size, batch_size, connections = 1000, 100, 4
    folders = {f"Big{i}": 2500 for i in range(4)}
    uids = seed(dovecot, account, folders, size=size)
    # Two folders by UID list, two by search; every (folder, uid) must come exactly once.
    wanted: dict[str, Any] = {"Big0": uids["Big0"], "Big1": range(1, 2501), "Big2": "ALL"}
    wanted["Big3"] = ["ALL"]
    expected = {(f, uid): i for f, folder_uids in uids.items() for i, uid in enumerate(folder_uids)}
    async with open_pool(**account, max_size=connections) as pool:
        tracemalloc.start()
        try:
            baseline = tracemalloc.get_traced_memory()[0]
            with trio.fail_after(60):
                async with fetch_many(
                    pool, wanted, BODY, batch_size=batch_size, max_connections=connections
                ) as results:
                    assert results.progress.messages_total is None  # searches pending
                    async for folder, uid, data in results:
                        i = expected.pop((folder, uid))
                        assert data[b"BODY[]"] == make_message(folder, i, size), (folder, uid)
                        del data
                        if i == 1000:
                            # Stop consuming a while: the producers must stop too.
                            await trio.sleep(0.2)
                    progress = results.progress
            peak = tracemalloc.get_traced_memory()[1] - baseline
        finally:
            tracemalloc.stop()
        await assert_settled(pool)
    assert not expected, f"{len(expected)} messages never came"
    assert progress == Progress(
        messages_total=10_000,
        messages_done=10_000,
        bytes_done=10_000 * size,
        batches_total=100,
        batches_done=100,
        folders_total=4,
        folders_done=4,
    )
    assert progress.complete
    # A pipeline of batches per task, one batch being consumed.
    in_flight = (connections * _fanout._PIPELINE_DEPTH + 1) * batch_size * size
    assert peak < 4 * in_flight, f"peak {peak} bytes: not bounded by the batches in flight"
    assert peak < 10_000 * size / 4, f"peak {peak} bytes: grows with the mailbox"


async def test_a_stalled_consumer_stops_the_fetching_and_holds_no_connection(
    dovecot: DovecotServer, account: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    uids = seed(dovecot, account, {"INBOX": 60})
    fetches = Commands(monkeypatch, "fetch")
    async with open_pool(**account, max_size=3) as pool:
        got = []
        async with fetch_many(pool, {"INBOX": uids["INBOX"]}, BODY, batch_size=5) as results:
            async for _, uid, _ in results:
                got.append(uid)
                if len(got) == 1:
                    # Each task (3) fetched one pipeline of batches, ours among them, and
                    # waits for us, its connection released.
                    in_flight = 3 * _fanout._PIPELINE_DEPTH
                    with trio.fail_after(5):
                        await fetches.done.wait_value(in_flight)
                        await pool.counts.wait_value(lambda c: c.in_use == 0)
                    await trio.sleep(0.2)
                    assert len(fetches.batches) == in_flight  # no more
                    assert pool.counts.value.in_use == 0
        assert sorted(got) == uids["INBOX"]
        assert fetches.sizes == [5] * 12
        await assert_settled(pool)


async def test_explicit_uids_give_the_totals_at_once_and_expunged_messages_count_as_done(
    imap_server: ImapServer, imap_account: dict[str, Any]
) -> None:
    uids = seed(imap_server, imap_account, {"INBOX": 20, "Other": 7}, size=500)
    gone = uids["INBOX"][3:8]
    client = IMAPClient(imap_account["host"], imap_account["port"], ssl=False)
    client.login(imap_account["username"], imap_account["password"])
    client.select_folder("INBOX")
    client.delete_messages(gone)
    client.expunge()
    client.logout()
    async with (
        open_pool(**imap_account, max_size=2) as pool,
        fetch_many(pool, uids, BODY, batch_size=6) as results,
    ):
        first = results.progress
        seen_at_ten: list[Progress] = []

        async def watch() -> None:
            seen_at_ten.append(
                await results.progress_value.wait_value(lambda p: p.messages_done >= 10)
            )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            got = [(folder, uid) async for folder, uid, _ in results]
        last = results.progress
    assert first == Progress(27, 0, 0, 6, 0, 2, 0)  # 20 in 4 batches, 7 in 2
    assert seen_at_ten and seen_at_ten[0].messages_done >= 10
    assert sorted(got) == sorted(
        [("INBOX", uid) for uid in uids["INBOX"] if uid not in gone]
        + [("Other", uid) for uid in uids["Other"]]
    )
    assert last == Progress(27, 27, 22 * 500, 6, 6, 2, 2, messages_missing=5)
    assert str(last) == "27/27 messages (5 missing), 11000 bytes, 6/6 batches, 2/2 folders"


async def test_searched_folders_are_fetched_on_the_connection_that_searched(
    dovecot: DovecotServer, account: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pins the SEARCHRES path, which Dovecot has (Cyrus 3.6 does not)."""
    seed(dovecot, account, {"A": 30, "B": 0})
    fetches = Commands(monkeypatch, "fetch")
    async with open_pool(**account, max_size=1) as pool:
        async with fetch_many(
            pool, {"A": ["UID", "5:24"], "B": "ALL"}, ["UID", "RFC822.SIZE"], batch_size=10
        ) as results:
            got = [(folder, uid, data[b"RFC822.SIZE"]) async for folder, uid, data in results]
            progress = results.progress
        stats = pool.statistics()
    assert got == [("A", uid, 600) for uid in range(5, 25)]
    # A: its search fetched the matches among UIDs 1:10 (5 to 10) in the same round trip
    # (SEARCHRES), then one batch of the rest (11 to 20) and one of 21 to 24; B's "ALL": no
    # search, its first UID range (1:10) sent with its EXAMINE, which says that it is empty.
    assert sorted(fetches.sizes) == [4, 10, 10]
    assert progress == Progress(20, 20, 0, 4, 4, 2, 2)
    # One connection did it all: SEARCH A, B's range, then A's batches, without a new checkout
    # between batches of the same folder.
    assert stats.connections_opened == 1
    assert stats.acquires <= 3


async def test_max_connections_bounds_the_connections_used_at_once(
    imap_server: ImapServer, imap_account: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    uids = seed(imap_server, imap_account, {f"F{i}": 12 for i in range(6)}, size=300)
    fetches = Commands(monkeypatch, "fetch")
    async with proxied_pool(imap_account, latency=0.005, max_size=8) as (pool, _):
        most = 0

        async def watch() -> None:
            nonlocal most
            async for counts in pool.counts.eventual_values():
                most = max(most, counts.in_use)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            async with fetch_many(pool, uids, BODY, batch_size=4, max_connections=3) as results:
                count = len([uid async for _, uid, _ in results])
            nursery.cancel_scope.cancel()
    assert count == 72
    assert most == 3
    assert len(fetches.connections) == 3
    assert fetches.sizes == [4] * 18


# -- leaving early -------------------------------------------------------------------------------


class Stop(Exception):
    pass


@pytest.mark.parametrize("how", ["break", "exception", "cancelled"])
async def test_leaving_the_block_mid_stream_cancels_the_fetching_and_returns_every_connection(
    dovecot: DovecotServer, account: dict[str, Any], how: str
) -> None:
    uids = seed(dovecot, account, {f"F{i}": 100 for i in range(4)})
    async with proxied_pool(account, latency=0.01, max_size=4) as (pool, _):
        got = busy = 0
        with trio.move_on_after(10) as deadline, trio.CancelScope() as outer:
            try:
                async with fetch_many(pool, uids, BODY, batch_size=10) as results:
                    async for _ in results:
                        got += 1
                        busy = pool.counts.value.in_use
                        if got >= 50 and busy >= 2:  # FETCHes in flight (20 ms round trips)
                            left_at = trio.current_time()
                            if how == "break":
                                break
                            if how == "exception":
                                raise Stop
                            outer.cancel()
                            await trio.sleep(1)
            except Stop:
                pass
        assert not deadline.cancelled_caught
        assert trio.current_time() - left_at < 0.5
        assert 50 <= got < 400 and busy >= 2
        assert pool.counts.value.in_use == 0  # leaving took every connection back
        await assert_settled(pool)
        # The pool is healthy: a new fan-out gets everything.
        async with fetch_many(pool, {"F0": uids["F0"]}, BODY) as results:
            assert len([uid async for _, uid, _ in results]) == 100
    await trio.testing.wait_all_threads_completed()


# -- pipelined EXAMINE and FETCH --------------------------------------------------------------


def fetch_pipelined_recording(
    client: IMAPClient, steps: list[tuple[str, list[int]]]
) -> tuple[list[bytes], list[PipelinedFetch]]:
    """``fetch_pipelined``, noting each command written (its name) and each line read."""
    imap = client._imap
    events: list[bytes] = []
    send, get_line = imap.send, imap._get_line

    def recording_send(data: bytes) -> None:
        events.append(bytes(data).split()[1])
        send(data)

    def recording_get_line() -> bytes:
        events.append(b"<read>")
        line: bytes = get_line()
        return line

    imap.send, imap._get_line = recording_send, recording_get_line
    try:
        return events, client.fetch_pipelined(steps, BODY)
    finally:
        del imap.send, imap._get_line


async def test_pipelined_fetches_write_every_command_before_reading_an_answer(
    imap_server: ImapServer, imap_account: dict[str, Any]
) -> None:
    uids = seed(imap_server, imap_account, {"A": 6, "B": 3})
    a, b = uids["A"], uids["B"]
    steps = [("A", a[:3]), ("A", a[3:]), ("B", b)]
    async with open_pool(**imap_account, max_size=1) as pool, pool.connection() as conn:
        events, outcomes = await conn.run_sync(fetch_pipelined_recording, steps)
        assert events[:6] == [b"EXAMINE", b"UID", b"UID", b"EXAMINE", b"UID", b"<read>"]
        assert set(events[6:]) == {b"<read>"}
        assert (conn.selected_folder, conn.readonly) == ("B", True)
        # What one command after the other gives, batch by batch (Dovecot may run the two
        # FETCHes of A at once and mix their answers: each batch still gets its own).
        for (folder, batch), outcome in zip(steps, outcomes, strict=True):
            await conn.select_folder(folder, readonly=True)
            assert outcome._replace(examined=None) == PipelinedFetch(
                await conn.fetch(batch, BODY), None, None
            )
            # The first step of each folder had the EXAMINE, and says what it said.
            examined = outcome.examined
            assert (examined is not None) == (batch in (a[:3], b))
            assert examined is None or examined[b"EXISTS"] == len(uids[folder])
            assert sorted(outcome.fetched or {}) == batch


async def test_a_failed_examine_in_a_pipeline_returns_nothing_and_leaves_the_session_in_step(
    imap_server: ImapServer, imap_account: dict[str, Any]
) -> None:
    uids = seed(imap_server, imap_account, {"INBOX": 3, "B": 2})
    inbox = uids["INBOX"]
    steps = [("Missing", inbox), ("Missing", inbox[:1]), ("B", uids["B"])]
    async with open_pool(**imap_account, max_size=1) as pool, pool.connection() as conn:
        await conn.select_folder("INBOX", readonly=True)
        # The UIDs exist in INBOX, which was selected: the FETCHes must not answer from it.
        _, outcomes = await conn.run_sync(fetch_pipelined_recording, steps)
        assert [(o.fetched, o.command) for o in outcomes[:2]] == [(None, "select")] * 2
        assert all(isinstance(o.error, IMAPClientError) for o in outcomes[:2])
        assert "select failed" in str(outcomes[0].error)
        # The batch after them, of another folder, is fetched all the same.
        assert sorted(outcomes[2].fetched or {}) == uids["B"]
        assert conn.broken is None
        # Every answer was read: the next commands get theirs.
        await conn.noop()
        await conn.select_folder("INBOX", readonly=True)
        assert await conn.search(["ALL"]) == inbox
        assert (await conn.fetch(inbox[:1], ["RFC822.SIZE"]))[inbox[0]][b"RFC822.SIZE"] == 600


# -- errors ----------------------------------------------------------------------------------


async def test_a_failing_batch_raises_fan_out_error_once_from_the_iteration(
    dovecot: DovecotServer, account: dict[str, Any]
) -> None:
    uids = seed(dovecot, account, {"INBOX": 300})
    async with open_pool(**account, max_size=4) as pool:
        caught: list[BaseException] = []
        with trio.fail_after(10):
            async with fetch_many(
                pool, {"INBOX": uids["INBOX"], "Missing": [7, 8, 9, 12]}, BODY, batch_size=20
            ) as results:
                try:
                    async for _ in results:
                        pass
                except BaseException as exc:
                    caught.append(exc)
                # The iteration stays finished; leaving the block does not raise it again.
                assert [uid async for _, uid, _ in results] == []
        assert len(caught) == 1
        error = caught[0]
        assert type(error) is FanOutError
        assert isinstance(error, PoolError)
        assert (error.folder, error.uids, error.operation) == ("Missing", (7, 8, 9, 12), "FETCH")
        assert isinstance(error.__cause__, IMAPClientError)
        assert "'Missing'" in str(error) and "UIDs 7:9,12 (4 messages)" in str(error)
        assert "selecting it" in str(error)
        assert not results.progress.complete  # the other batches were cancelled
        await assert_settled(pool)


async def test_a_failed_search_names_the_folder_and_the_criteria(
    imap_server: ImapServer, imap_account: dict[str, Any]
) -> None:
    seed(imap_server, imap_account, {"INBOX": 3})
    async with open_pool(**imap_account, max_size=2) as pool:
        with pytest.raises(FanOutError) as info:
            async with fetch_many(pool, {"INBOX": "ALL", "Nowhere": ["UNSEEN"]}, BODY) as results:
                async for _ in results:
                    pass
        assert (info.value.folder, info.value.uids, info.value.operation) == (
            "Nowhere",
            (),
            "SEARCH",
        )
        assert "search for ['UNSEEN']" in str(info.value)
        await assert_settled(pool)


async def test_an_error_while_the_block_is_not_iterating_cancels_it_and_comes_out_of_it(
    dovecot: DovecotServer, account: dict[str, Any]
) -> None:
    seed(dovecot, account, {"INBOX": 3})
    async with open_pool(**account, max_size=2) as pool:
        reached = False
        with trio.fail_after(10), pytest.raises(FanOutError) as info:
            async with fetch_many(pool, {"INBOX": "ALL", "Missing": [1]}, BODY) as results:
                await results.progress_value.wait_value(lambda p: p.complete)
                reached = True
        assert not reached
        assert info.value.folder == "Missing"
        await assert_settled(pool)


async def test_a_connection_reset_mid_stream_names_the_batch_it_was_fetching(
    dovecot: DovecotServer, account: dict[str, Any]
) -> None:
    inbox = seed(dovecot, account, {"INBOX": 40})["INBOX"]
    batches = [inbox[i : i + 10] for i in range(0, 40, 10)]
    async with proxied_pool(account, max_size=1) as (pool, proxy):
        # What the server sends up to the end of the first two batches (one pipeline).
        async with pool.connection() as conn:
            await conn.run_sync(
                lambda client: client.fetch_pipelined([("INBOX", b) for b in batches[:2]], BODY)
            )
        first_pipeline = proxy.statistics().bytes_down
        # New connections are reset 3 KB into the next pipeline (batches 3 and 4, 14 KB).
        proxy.cut_after(first_pipeline + 3000)
        pool.drain()
        got = []
        with trio.fail_after(10), pytest.raises(FanOutError) as info:
            async with fetch_many(pool, {"INBOX": inbox}, BODY, batch_size=10) as results:
                async for _, uid, _ in results:
                    got.append(uid)
        # Batches 1 and 2 came whole; the error names a batch of the pipeline that broke.
        assert got == inbox[:20]
        assert info.value.uids in (tuple(batches[2]), tuple(batches[3]))
        assert isinstance(info.value.__cause__, IMAPClientAbortError | OSError)
        assert "(10 messages)" in str(info.value)
        await assert_settled(pool)


# -- search_many -----------------------------------------------------------------------------


async def test_search_many_searches_every_folder_concurrently(
    imap_server: ImapServer, imap_account: dict[str, Any]
) -> None:
    uids = seed(imap_server, imap_account, {f"S{i}": i * 3 for i in range(8)})
    async with proxied_pool(imap_account, latency=0.05, max_size=8) as (pool, _):
        await pool.run_sync(lambda client: None)  # one connection open: the others in parallel
        started = trio.current_time()
        found = await search_many(pool, reversed(uids), "ALL")
        elapsed = trio.current_time() - started
        assert list(found) == list(reversed(uids))
        assert found == uids
        # 8 SELECT + SEARCH one after another would take 16 round trips (1.6 s); concurrently,
        # with connections opened on the way, a handful.
        assert elapsed < 1.0, elapsed
        odd = await search_many(pool, ["S3", "S4"], ["UID", "2:3"])
        assert odd == {"S3": [2, 3], "S4": [2, 3]}
        with trio.testing.assert_checkpoints():
            assert await search_many(pool, [], "ALL") == {}
        with pytest.raises(FanOutError) as info:
            await search_many(pool, ["S1", "Missing"])
        assert (info.value.folder, info.value.operation) == ("Missing", "SEARCH")
        await assert_settled(pool)


async def test_a_search_sees_changes_made_since_its_connection_selected_the_folder(
    imap_server: ImapServer, imap_account: dict[str, Any]
) -> None:
    uids = seed(imap_server, imap_account, {"A": 10, "B": 0})
    async with open_pool(**imap_account, max_size=1) as pool:
        async with pool.connection() as conn:
            await conn.select_folder("A", readonly=True)
        other = IMAPClient(imap_account["host"], imap_account["port"], ssl=False)
        other.login(imap_account["username"], imap_account["password"])
        other.select_folder("A")
        other.move(uids["A"][:4], "B")
        other.logout()
        # Dovecot answers a SEARCH from the connection's old view (all 10) unless it selects
        # the folder again.
        assert await search_many(pool, ["A"]) == {"A": uids["A"][4:]}


# -- flags, copy, move -----------------------------------------------------------------------


async def test_flags_are_added_and_removed_in_chunks_of_batch_size(
    imap_server: ImapServer, imap_account: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    uids = seed(imap_server, imap_account, {"INBOX": 45, "Lists": 10})
    adds = Commands(monkeypatch, "add_flags")
    removes = Commands(monkeypatch, "remove_flags")
    async with open_pool(**imap_account, max_size=3) as pool:
        await add_flags_many(pool, uids, [r"\Flagged", "$Done"], batch_size=10)
        assert sorted(adds.sizes) == [5, 10, 10, 10, 10, 10]
        flagged = await trio.to_thread.run_sync(flags_of, imap_account, "INBOX")
        assert all(set(f) >= {b"\\Flagged", b"$Done"} for f in flagged.values())
        await remove_flags_many(pool, {"INBOX": ["FLAGGED", "UID", "1:20"]}, r"\Flagged")
        assert removes.sizes == [20]
        await assert_settled(pool)
    flagged = await trio.to_thread.run_sync(flags_of, imap_account, "INBOX")
    assert sorted(uid for uid, f in flagged.items() if b"\\Flagged" in f) == list(range(21, 46))
    assert all(b"$Done" in f for f in flagged.values())
    assert all(b"\\Seen" not in f for f in flagged.values())


async def test_copy_and_move_run_in_chunks_and_report_a_missing_destination(
    imap_server: ImapServer, imap_account: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    uids = seed(imap_server, imap_account, {"A": 25, "B": 13, "Copies": 0, "Moved": 0})
    copies = Commands(monkeypatch, "copy")
    moves = Commands(monkeypatch, "move")
    async with open_pool(**imap_account, max_size=4) as pool:
        sources = {"A": uids["A"], "B": uids["B"]}
        await copy_many(pool, sources, "Copies", batch_size=10)
        assert sorted(copies.sizes) == [3, 5, 10, 10, 10]
        await move_many(pool, {"A": "ALL", "B": uids["B"][:6]}, "Moved", batch_size=10)
        assert sorted(moves.sizes) == [5, 6, 10, 10]
        # Connections still have A selected from the copy and the move: the searches SELECT
        # again, or Dovecot would answer from the old view (15 of A's messages left).
        found = await search_many(pool, ["A", "B", "Copies", "Moved"])
        assert [len(found[f]) for f in ("A", "B", "Copies", "Moved")] == [0, 7, 38, 31]
        with pytest.raises(FanOutError) as info:
            await copy_many(pool, {"B": found["B"]}, "No such folder", batch_size=4)
        assert info.value.operation == "COPY" and info.value.folder == "B"
        assert info.value.uids in {tuple(found["B"][:4]), tuple(found["B"][4:])}
        await assert_settled(pool)


# -- arguments -------------------------------------------------------------------------------


async def test_arguments_are_checked_before_anything_starts(account: dict[str, Any]) -> None:
    async with open_pool(**account, max_size=2) as pool:
        with pytest.raises(ValueError, match="batch_size"):
            fetch_many(pool, {"INBOX": [1]}, BODY, batch_size=0)
        with pytest.raises(ValueError, match="max_connections"):
            fetch_many(pool, {"INBOX": [1]}, BODY, max_connections=0)
        with pytest.raises(TypeError, match="'INBOX'"):
            fetch_many(pool, {"INBOX": [1, 2.5]}, BODY)
        with pytest.raises(TypeError, match="'INBOX'"):
            fetch_many(pool, {"INBOX": 3}, BODY)  # type: ignore[dict-item]
        with pytest.raises(TypeError, match="destination"):
            await copy_many(pool, {"INBOX": [1]}, b"Archive")  # type: ignore[arg-type]
        with trio.testing.assert_checkpoints():
            async with fetch_many(pool, {}, BODY) as results:
                assert [m async for m in results] == []
        assert results.progress.complete
        with pytest.raises(trio.ClosedResourceError):
            await results.__anext__()
        assert pool.statistics().connections_opened == 0
        assert math.isfinite(pool.config.acquire_timeout)


async def test_the_bulk_operations_are_methods_of_the_pool_too(
    imap_server: ImapServer, imap_account: dict[str, Any]
) -> None:
    uids = _seed(imap_server, {"INBOX": 5, "Other": 0}, user=imap_account["username"])["INBOX"]
    async with open_pool(**imap_account, max_size=2) as pool:
        async with pool.fetch_many({"INBOX": "ALL"}, ["RFC822.SIZE"]) as results:
            fetched = [uid async for _, uid, _ in results]
        assert sorted(fetched) == uids
        assert await pool.search_many(["INBOX"]) == {"INBOX": uids}
        await pool.add_flags_many({"INBOX": uids}, [b"\\Flagged"])
        assert await pool.search_many(["INBOX"], ["FLAGGED"]) == {"INBOX": uids}
        await pool.copy_many({"INBOX": uids[:2]}, "Other")
        await pool.move_many({"INBOX": uids[2:]}, "Other")
        found = await pool.search_many(["INBOX", "Other"])
        assert (len(found["INBOX"]), len(found["Other"])) == (2, 5)


# -- criteria without a serial search ---------------------------------------------------------


def searches_recorded(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The folders fetch_many searched (SELECT + UID SEARCH, one thread hop each)."""
    folders: list[str] = []
    real_run_sync = Connection.run_sync

    async def run_sync(conn: Connection, fn: Any, *args: Any) -> Any:
        if fn is _fanout._select_and_search:
            folders.append(args[0])
        return await real_run_sync(conn, fn, *args)

    monkeypatch.setattr(Connection, "run_sync", run_sync)
    return folders


async def test_all_is_fetched_by_uid_range_without_a_search(
    dovecot: DovecotServer, account: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    uids = seed(dovecot, account, {"A": 23, "B": 4}, size=700)
    searched = searches_recorded(monkeypatch)
    fetches = Commands(monkeypatch, "fetch")
    async with (
        open_pool(**account, max_size=2) as pool,
        fetch_many(pool, {"A": "ALL", "B": ["all"]}, BODY, batch_size=5) as results,
    ):
        got = [(folder, uid) async for folder, uid, _ in results]
        progress = results.progress
    assert sorted(got) == sorted((f, uid) for f, folder in uids.items() for uid in folder)
    assert searched == []
    # A: the first range 1:5 with the EXAMINE, then 6:10 ... 21:23 from its UIDNEXT (24);
    # B: 1:5 (4 messages), and nothing more.
    assert sorted(batch[0] for _, batch in fetches.batches) == [1, 1, 6, 11, 16, 21]
    assert progress == Progress(27, 27, 27 * 700, 6, 6, 2, 2)


async def test_all_in_a_folder_whose_first_uids_are_gone_searches_above_the_first_range(
    dovecot: DovecotServer, account: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    uids = seed(dovecot, account, {"A": 40}, size=500)
    client = IMAPClient(account["host"], account["port"], ssl=False)
    client.login(account["username"], account["password"])
    client.select_folder("A")
    client.delete_messages(uids["A"][:34])
    client.expunge()
    client.logout()
    searched = searches_recorded(monkeypatch)
    async with (
        open_pool(**account, max_size=1) as pool,
        fetch_many(pool, {"A": "ALL"}, BODY, batch_size=5) as results,
    ):
        got = [uid async for _, uid, _ in results]
        progress = results.progress
    # UIDNEXT 41 but 6 messages: ranges would cost 7 empty FETCHes, a search one round trip.
    assert got == uids["A"][34:]
    assert searched == ["A"]
    assert progress.messages_total == progress.messages_done == 6
    assert progress.complete and progress.messages_missing == 0


def select_and_search_recording(
    client: IMAPClient, folder: str, criteria: Any
) -> tuple[list[bytes], Any]:
    imap = client._imap
    events: list[bytes] = []
    send, get_line = imap.send, imap._get_line

    def recording_send(data: bytes) -> None:
        events.append(bytes(data).split()[1])
        send(data)

    def recording_get_line() -> bytes:
        events.append(b"<read>")
        line: bytes = get_line()
        return line

    imap.send, imap._get_line = recording_send, recording_get_line
    try:
        return events, client.select_and_search(folder, True, criteria)
    finally:
        del imap.send, imap._get_line


async def test_select_and_search_write_both_commands_before_reading_and_use_esearch(
    dovecot: DovecotServer, account: dict[str, Any]
) -> None:
    uids = seed(dovecot, account, {"A": 12, "Empty": 0})
    async with open_pool(**account, max_size=1) as pool, pool.connection() as conn:
        events, (found, error, _) = await conn.run_sync(
            select_and_search_recording, "A", ["UID", f"{uids['A'][2]}:{uids['A'][9]}"]
        )
        assert events[:3] == [b"EXAMINE", b"UID", b"<read>"]
        assert error is None and found == uids["A"][2:10]
        assert (conn.selected_folder, conn.readonly) == ("A", True)
        _, (found, error, _) = await conn.run_sync(select_and_search_recording, "Empty", "ALL")
        assert error is None and found == []
        _, (found, error, command) = await conn.run_sync(
            select_and_search_recording, "Missing", "ALL"
        )
        assert found is None and command == "select" and "select failed" in str(error)
        assert conn.selected_folder is None
        # The session is in step: the next command works.
        await conn.noop()
        _, (found, error, command) = await conn.run_sync(
            select_and_search_recording, "A", ["NOSUCHKEY"]
        )
        assert found is None and command == "search" and error is not None
        assert sorted(await conn.search("ALL")) == uids["A"]


def test_esearch_answers_are_read_as_uid_ranges() -> None:
    from trio_imappool._client import _esearch_uids

    assert _esearch_uids([b'(TAG "A5") UID ALL 1:3,7,10:9']) == [1, 2, 3, 7, 9, 10]
    assert _esearch_uids([b'(TAG "A5") UID']) is None


def search_and_fetch_recording(
    client: IMAPClient, folder: str, criteria: Any, first: range
) -> tuple[list[bytes], Any]:
    imap = client._imap
    events: list[bytes] = []
    send, get_line = imap.send, imap._get_line

    def recording_send(data: bytes) -> None:
        words = bytes(data).split()
        events.append(words[1] if words[1] != b"UID" else b" ".join(words[1:3]))
        send(data)

    def recording_get_line() -> bytes:
        events.append(b"<read>")
        line: bytes = get_line()
        return line

    imap.send, imap._get_line = recording_send, recording_get_line
    try:
        return events, client.search_and_fetch(folder, criteria, first, BODY)
    finally:
        del imap.send, imap._get_line


async def test_criteria_fetch_their_first_batch_with_the_search_in_one_round_trip(
    dovecot: DovecotServer, account: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    uids = seed(dovecot, account, {"A": 25}, size=400)["A"]
    async with open_pool(**account, max_size=1) as pool, pool.connection() as conn:
        events, (found, fetched, error, _) = await conn.run_sync(
            search_and_fetch_recording, "A", ["NOT", "UID", "3"], range(1, 11)
        )
        # Four commands written before any answer was read: one round trip.
        assert events[:5] == [b"EXAMINE", b"UID SEARCH", b"UID SEARCH", b"UID FETCH", b"<read>"]
        assert set(events[5:]) == {b"<read>"}
        assert error is None
        assert found == [uid for uid in uids if uid != 3]
        assert sorted(fetched or {}) == [1, 2, 4, 5, 6, 7, 8, 9, 10]
        assert all(len(data[b"BODY[]"]) == 400 for data in (fetched or {}).values())
        _, (found, fetched, error, command) = await conn.run_sync(
            search_and_fetch_recording, "Missing", ["ALL"], range(1, 11)
        )
        assert found is None and command == "select" and error is not None
        await conn.noop()
    # Through fetch_many: the search's own round trip brought the first batch; every
    # message once, and the totals right.
    searched = searches_recorded(monkeypatch)
    fetches = Commands(monkeypatch, "fetch")
    async with (
        open_pool(**account, max_size=1) as pool,
        fetch_many(pool, {"A": ["NOT", "UID", "3"]}, BODY, batch_size=10) as results,
    ):
        got = [uid async for _, uid, _ in results]
        progress = results.progress
    assert got == [uid for uid in uids if uid != 3]
    assert searched == []  # no separate SELECT + SEARCH
    assert fetches.sizes == [10, 5]  # 11:20 and 21:25 after the first batch
    assert progress == Progress(24, 24, 24 * 400, 3, 3, 1, 1)


# -- a batch at a time ----------------------------------------------------------------------------


async def test_batches_give_the_same_messages_as_the_iteration_with_one_checkpoint_each(
    imap_server: ImapServer, imap_account: dict[str, Any]
) -> None:
    uids = seed(imap_server, imap_account, {"INBOX": 23, "Other": 9}, size=700)
    async with open_pool(**imap_account, max_size=2) as pool:
        async with fetch_many(pool, uids, BODY, batch_size=5) as results:
            one_by_one = [(folder, uid, data[b"BODY[]"]) async for folder, uid, data in results]
        async with fetch_many(pool, uids, BODY, batch_size=5) as results:
            batches = [batch async for batch in results.batches()]
            last = results.progress
        await assert_settled(pool)
    # Whole batches of one folder each, ascending by UID, never empty.
    assert all(0 < len(messages) <= 5 for _, messages in batches)
    assert all(
        [uid for uid, _ in messages] == sorted(uid for uid, _ in messages)
        for _, messages in batches
    )
    assert len(batches) == 5 + 2
    flat = [
        (folder, uid, data[b"BODY[]"]) for folder, messages in batches for uid, data in messages
    ]
    assert sorted(flat) == sorted(one_by_one)
    for folder, uid, body in flat:
        assert body == make_message(folder, uids[folder].index(uid), 700)
    assert last == Progress(32, 32, 32 * len(flat[0][2]), 7, 7, 2, 2)


async def test_batches_and_single_messages_mix_and_a_batch_is_what_is_left_of_it(
    dovecot: DovecotServer, account: dict[str, Any]
) -> None:
    uids = seed(dovecot, account, {"INBOX": 12})
    async with (
        open_pool(**account, max_size=1) as pool,
        fetch_many(pool, uids, BODY, batch_size=6) as results,
    ):
        batches = results.batches()
        _, first, _ = await results.__anext__()
        _, rest = await batches.__anext__()
        folder, second = await batches.__anext__()
        with pytest.raises(StopAsyncIteration):
            await batches.__anext__()
    assert [first, *(uid for uid, _ in rest)] == uids["INBOX"][:6]
    assert [uid for uid, _ in second] == uids["INBOX"][6:]
    assert folder == "INBOX"


async def test_batches_keep_an_int_budget_until_the_next_batch_is_asked_for(
    dovecot: DovecotServer, account: dict[str, Any]
) -> None:
    uids = seed(dovecot, account, {"A": 8, "B": 8}, size=4_000)
    held: list[int] = []
    with trio.fail_after(60):
        async with (
            open_pool(**account, max_size=2) as pool,
            fetch_many(pool, uids, BODY, batch_size=4, max_bytes=10_000) as results,
        ):
            memory = results._memory
            assert memory is not None
            got = 0
            async for _, messages in results.batches():
                got += len(messages)
                # What the batch holds is still on the budget while the caller has it...
                held.append(memory.budget.in_use)
                assert memory.budget.in_use >= sum(len(d[b"BODY[]"]) for _, d in messages)
                await trio.sleep(0.05)
            # ...and given back once the next one is asked for (here: the end).
            assert memory.budget.in_use == 0
    assert got == 16
    assert max(held) <= 10_000 + 4 * 4_100  # the budget, and at most one batch over it
