"""Memory bounded in bytes (issue 15, point 3): the exporter and ``fetch_many(max_bytes=...)``
against real Dovecot and against a scripted server whose ``RFC822.SIZE`` lies.

Rules: loopback only; every test makes a user of its own on the shared ``dovecot`` server (or
runs a scripted server of its own), and runs under ``trio.fail_after``.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import pytest
import trio

from trio_imappool import fetch_many, open_pool
from trio_imappool.exporter import export_maildir, maildir_folder_path, parse_message_filename
from trio_imappool.testing import (
    DovecotServer,
    ScriptedCommand,
    ScriptedFolder,
    ScriptedMessage,
    ScriptedSession,
    make_message,
    open_scripted_server,
    seed_folders,
)
from trio_imappool.wire import ByteSemaphore, message_size

from .test_export_sync import recording_relay

_users = itertools.count(1)


def new_user(server: DovecotServer) -> dict[str, Any]:
    name = f"memory{next(_users)}"
    server.add_user(name, f"{name}-pw")
    return server.pool_kwargs(name, tls=False)


def exported(root: Path, folder: str) -> dict[int, bytes]:
    """UID -> the bytes of its file in the folder's ``cur/``."""
    path = maildir_folder_path(root, folder, "/")
    found = {}
    for file in (path / "cur").iterdir():
        key = parse_message_filename(file.name)
        assert key is not None, file
        found[key[1]] = file.read_bytes()
    return found


async def test_messages_larger_than_the_budget_are_exported_byte_for_byte(
    dovecot: DovecotServer, tmp_path: Path
) -> None:
    settings = new_user(dovecot)
    large = seed_folders(settings, {"INBOX": 3, "Big": 2}, size=300_000)
    small = seed_folders(settings, {"INBOX": 5}, size=2000)
    root = tmp_path / "Mail"
    with trio.fail_after(60):
        async with open_pool(**settings, max_size=4) as pool:
            result = await export_maildir(pool, root, memory_budget=100_000)
    assert result.complete and result.messages_fetched == 10
    inbox = exported(root, "INBOX")
    assert sorted(inbox) == sorted(large["INBOX"] + small["INBOX"])
    for i, uid in enumerate(large["INBOX"] + small["INBOX"]):
        assert inbox[uid] == make_message("INBOX", i, 300_000 if i < 3 else 2000)
    big = exported(root, "Big")
    assert [big[uid] for uid in large["Big"]] == [make_message("Big", i, 300_000) for i in (0, 1)]


async def test_a_budget_smaller_than_a_batch_still_exports_everything(
    dovecot: DovecotServer, tmp_path: Path
) -> None:
    settings = new_user(dovecot)
    uids = seed_folders(settings, {"INBOX": 40, "Lists/trio": 25})
    root = tmp_path / "Mail"
    with trio.fail_after(60):
        async with open_pool(**settings, max_size=3) as pool:
            result = await export_maildir(pool, root, memory_budget=5000, batch_size=200)
    assert result.complete and result.messages_fetched == 65
    for folder, folder_uids in uids.items():
        files = exported(root, folder)
        assert [files[uid] for uid in folder_uids] == [
            make_message(folder, i) for i in range(len(folder_uids))
        ]


async def test_a_run_without_news_asks_no_sizes_and_one_with_news_asks_them_pipelined(
    dovecot: DovecotServer, tmp_path: Path
) -> None:
    settings = new_user(dovecot)
    names = [f"Box{i}" for i in range(6)]
    seed_folders(settings, dict.fromkeys(names, 3))
    root = tmp_path / "Mail"
    with trio.fail_after(60):
        async with recording_relay(settings["host"], settings["port"]) as relay:
            through = {**settings, "port": relay.port}

            async def export() -> Any:
                async with open_pool(**through, max_size=4) as pool:
                    # Smaller than the folders: the sizes must be asked.
                    return await export_maildir(pool, root, memory_budget=10_000)

            first = await export()
            assert first.messages_fetched == 18
            relay.clear()

            unchanged = await export()

            assert unchanged.messages_fetched == 0
            assert relay.commands() == ["LOGIN", "NAMESPACE", "LIST", "LOGOUT"]
            assert relay.lines(b"RFC822.SIZE") == []
            (listing,) = relay.lines(b"LIST")
            assert b"SIZE" not in listing  # asked on a first export only

            seed_folders(settings, dict.fromkeys(names[:4], 2))
            relay.clear()

            news = await export()

            assert news.messages_fetched == 8 and news.complete
            sized = relay.lines(b"RFC822.SIZE")
            assert len(sized) == 4  # each folder with news sized once
            # On one connection, with their EXAMINEs, before any message is fetched: one round
            # trip (a few folders' sizes are not worth another connection).
            (sizing,) = [data for data in relay.sent if b"RFC822.SIZE" in data]
            lines = [line for line in bytes(sizing).split(b"\r\n") if b"FETCH" in line]
            lines = [line for line in lines if b"(FLAGS)" not in line]  # the flag pass
            assert [b"RFC822.SIZE" in line for line in lines[:4]] == [True] * 4, lines
            assert not any(b"RFC822.SIZE" in line for line in lines[4:]), lines


async def test_an_export_that_fits_its_budget_asks_no_sizes_where_status_says_how_much(
    dovecot: DovecotServer, tmp_path: Path
) -> None:
    """Dovecot has STATUS=SIZE: the listing says what the folders hold, and when all of it
    fits in the budget no message sizes are asked (the fetch is what it was without one)."""
    settings = new_user(dovecot)
    uids = seed_folders(settings, {"INBOX": 5, "Other": 5})
    with trio.fail_after(60):
        async with recording_relay(settings["host"], settings["port"]) as relay:
            async with open_pool(**{**settings, "port": relay.port}, max_size=2) as pool:
                result = await export_maildir(pool, tmp_path / "Mail")
            (listing,) = relay.lines(b"LIST")
            assert b" SIZE" in listing
            assert relay.lines(b"RFC822.SIZE") == []
            assert result.complete and result.messages_fetched == 10
            async with open_pool(**{**settings, "port": relay.port}, max_size=2) as pool:
                result = await export_maildir(pool, tmp_path / "Small", memory_budget=15_000)
            assert len(relay.lines(b"RFC822.SIZE")) == 2  # 20 KB > 15 KB: sized
            assert result.complete and result.messages_fetched == 10
    files = exported(tmp_path / "Small", "Other")
    assert [files[uid] for uid in uids["Other"]] == [make_message("Other", i) for i in range(5)]


async def test_fetch_many_with_a_shared_budget_never_holds_more_than_it(
    dovecot: DovecotServer,
) -> None:
    settings = new_user(dovecot)
    uids = seed_folders(settings, {"A": 10, "B": 10, "C": 10}, size=40_000)
    budget = ByteSemaphore(150_000)
    got: dict[str, list[int]] = {}
    with trio.fail_after(60):
        async with (
            open_pool(**settings, max_size=4) as pool,
            fetch_many(
                pool,
                {"A": "ALL", "B": uids["B"], "C": ["UNDELETED"]},
                ["BODY.PEEK[]"],
                max_bytes=budget,
            ) as results,
        ):
            async for folder, uid, data in results:
                got.setdefault(folder, []).append(uid)
                await trio.sleep(0.001)  # a slow caller: the fetch waits for the budget
                budget.release(message_size(data))
            assert results.progress.complete
    assert {folder: sorted(found) for folder, found in got.items()} == uids
    stats = budget.statistics()
    assert stats.in_use == 0 and stats.waiting == 0
    assert 40_000 <= stats.peak <= 150_000


async def test_fetch_many_with_an_int_budget_gets_every_message(dovecot: DovecotServer) -> None:
    settings = new_user(dovecot)
    uids = seed_folders(settings, {"A": 7, "B": 3}, size=30_000)
    got = []
    with trio.fail_after(60):
        async with (
            open_pool(**settings, max_size=2) as pool,
            fetch_many(pool, {"A": "ALL", "B": uids["B"]}, "BODY.PEEK[]", max_bytes=1) as results,
        ):
            async for folder, uid, data in results:
                got.append((folder, uid))
                assert data[b"BODY[]"] == make_message(folder, uids[folder].index(uid), 30_000)
    assert sorted(got) == sorted((f, uid) for f, folder_uids in uids.items() for uid in folder_uids)


# -- a server whose RFC822.SIZE lies --------------------------------------------------------------

BODIES = [f"Subject: {i}\r\n\r\n".encode() + b"x" * (20_000 + i) + b"\r\n" for i in range(6)]


def lying_fetch(said: int) -> Any:
    """A FETCH handler that answers every RFC822.SIZE with *said*, whatever the message."""

    async def fetch(session: ScriptedSession, command: ScriptedCommand) -> None:
        real = ScriptedSession.fetch_items

        def items(message: ScriptedMessage, wanted: Any) -> bytes:
            return re.sub(
                rb"RFC822\.SIZE \d+", b"RFC822.SIZE %d" % said, real(session, message, wanted)
            )

        session.fetch_items = items  # type: ignore[method-assign,assignment]
        await session.default(command)

    return fetch


@pytest.mark.parametrize("said", [1, 10**9], ids=["smaller", "larger"])
async def test_a_lying_rfc822_size_is_only_a_plan_the_literal_is_the_truth(
    tmp_path: Path, said: int
) -> None:
    folders: dict[str | bytes, ScriptedFolder | list[bytes]] = {
        "INBOX": ScriptedFolder.of(BODIES),
        "Other": ScriptedFolder.of(BODIES[:2]),
    }
    with trio.fail_after(30):
        async with open_scripted_server(
            folders=folders, handlers={"FETCH": lying_fetch(said)}
        ) as server:
            budget = ByteSemaphore(50_000)
            async with (
                open_pool(**server.pool_kwargs(), max_size=2) as pool,
                fetch_many(
                    pool, {"INBOX": "ALL", "Other": [1, 2]}, "BODY.PEEK[]", max_bytes=budget
                ) as results,
            ):
                bodies = {}
                async for folder, uid, data in results:
                    bodies[(folder, uid)] = data[b"BODY[]"]
                    # The real size is what the fetch accounted: releasing it balances.
                    budget.release(message_size(data))
            assert budget.in_use == 0 and budget.statistics().waiting == 0
            assert bodies == {
                **{("INBOX", i + 1): body for i, body in enumerate(BODIES)},
                **{("Other", i + 1): body for i, body in enumerate(BODIES[:2])},
            }
            root = tmp_path / "Mail"
            async with open_pool(**server.pool_kwargs(), max_size=2) as pool:
                result = await export_maildir(pool, root, memory_budget=50_000)
    assert result.complete and result.messages_fetched == 8
    assert exported(root, "INBOX") == {i + 1: body for i, body in enumerate(BODIES)}
    assert exported(root, "Other") == {1: BODIES[0], 2: BODIES[1]}


async def test_a_large_folder_is_asked_only_for_its_large_messages_sizes(
    dovecot: DovecotServer, tmp_path: Path
) -> None:
    """600 small messages and 3 large ones in one folder: Dovecot (ESEARCH, SEARCHRES) is
    asked which are LARGER than a batch's share, and only their sizes come back."""
    settings = new_user(dovecot)
    small = seed_folders(settings, {"INBOX": 600}, size=2000)["INBOX"]
    large = seed_folders(settings, {"INBOX": 3}, size=200_000)["INBOX"]
    budget = ByteSemaphore(400_000)
    got: dict[int, bytes] = {}
    with trio.fail_after(60):
        async with recording_relay(settings["host"], settings["port"]) as relay:
            async with (
                open_pool(**{**settings, "port": relay.port}, max_size=2) as pool,
                fetch_many(
                    pool, {"INBOX": small + large}, "BODY.PEEK[]", max_bytes=budget
                ) as results,
            ):
                async for _folder, uid, data in results:
                    got[uid] = data[b"BODY[]"]
                    budget.release(message_size(data))
            searches = relay.lines(b"LARGER")
            assert searches and all(b"UID SEARCH RETURN" in line for line in searches)
            (sizes,) = relay.lines(b"RFC822.SIZE")
            assert b"UID FETCH $ (RFC822.SIZE)" in sizes
            root = tmp_path / "Mail"
            async with open_pool(**{**settings, "port": relay.port}, max_size=2) as pool:
                result = await export_maildir(pool, root, memory_budget=400_000)
    stats = budget.statistics()
    assert stats.in_use == 0 and stats.peak <= 400_000
    expected = {uid: make_message("INBOX", i, 2000) for i, uid in enumerate(small)}
    expected |= {uid: make_message("INBOX", 600 + i, 200_000) for i, uid in enumerate(large)}
    assert got == expected
    assert result.complete and exported(root, "INBOX") == expected
