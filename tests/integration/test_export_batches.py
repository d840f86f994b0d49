"""``FetchResults.batches()`` and the exporter's batched writers, from the review of 1521631:
reproducers for the budget, the progress, cancellation, errors and the exporter's bounds.

Rules: loopback only; Dovecot users of their own or a scripted server per test; every
blocking path under ``trio.fail_after``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import trio

from trio_imappool import fetch_many, open_pool
from trio_imappool._fanout import FanOutError
from trio_imappool.exporter import _local, _run, export_maildir
from trio_imappool.exporter._base import _WRITE_BATCH, _WRITE_QUEUE, _WRITERS
from trio_imappool.testing import (
    ScriptedCommand,
    ScriptedFolder,
    ScriptedMessage,
    ScriptedSession,
    make_message,
    open_scripted_server,
    seed_folders,
)
from trio_imappool.wire import ByteSemaphore, message_size

BODY = ["BODY.PEEK[]"]


def body(folder: str, uid: int, pad: int = 300) -> bytes:
    return f"Subject: {folder} {uid}\r\n\r\n".encode() + b"x" * pad + b"\r\n"


# -- fetch_many: progress and budget with batches() ---------------------------------------------


def odd_folder() -> ScriptedFolder:
    messages = [ScriptedMessage(uid=uid, body=body("Odd", uid)) for uid in range(1, 11)]
    messages[1].in_fetch = False  # UID 2 left out
    messages[4].body = None  # UID 5: BODY[] NIL
    return ScriptedFolder(messages)


async def duplicate_fetch(session: ScriptedSession, command: ScriptedCommand) -> None:
    """A FETCH of bodies gets an extra response for UID 3 first (its FLAGS only): the two
    responses of one UID are one message, merged."""
    if b"BODY" in b" ".join(command.raw) and session.selected == "Odd":
        await session.send_line(b"* 3 FETCH (UID 3 FLAGS (\\Flagged))")
    await session.default(command)


@pytest.mark.parametrize("budget", [None, "int", "shared"])
async def test_batches_mixed_with_single_messages_count_and_release_like_the_iteration(
    budget: str | None,
) -> None:
    folders: dict[str | bytes, ScriptedFolder | list[bytes]] = {
        "INBOX": ScriptedFolder.of([body("INBOX", u) for u in range(1, 8)]),
        "Odd": odd_folder(),
    }
    spec = {"INBOX": "ALL", "Odd": list(range(1, 11))}

    def limit() -> int | ByteSemaphore | None:
        if budget == "int":
            return 2_000
        if budget == "shared":
            return ByteSemaphore(2_000)
        return None

    with trio.fail_after(30):
        async with (
            open_scripted_server(folders=folders, handlers={"FETCH": duplicate_fetch}) as server,
            open_pool(**server.pool_kwargs(), max_size=2) as pool,
        ):
            plain_budget = limit()
            async with fetch_many(
                pool, spec, BODY, batch_size=3, max_bytes=plain_budget
            ) as results:
                plain = []
                async for folder, uid, data in results:
                    plain.append((folder, uid, data[b"BODY[]"], data.get(b"FLAGS")))
                    if isinstance(plain_budget, ByteSemaphore):
                        plain_budget.release(message_size(data))
                plain_progress = results.progress
            mixed_budget = limit()
            async with fetch_many(
                pool, spec, BODY, batch_size=3, max_bytes=mixed_budget
            ) as results:
                memory = results._memory
                mixed = []
                batches = results.batches()
                turn = 0
                while True:
                    turn += 1
                    try:
                        if turn % 3 == 1:
                            folder, uid, data = await results.__anext__()
                            got = [(uid, data)]
                        else:
                            folder, got = await batches.__anext__()
                    except StopAsyncIteration:
                        break
                    for uid, data in got:
                        mixed.append((folder, uid, data[b"BODY[]"], data.get(b"FLAGS")))
                        if isinstance(mixed_budget, ByteSemaphore):
                            mixed_budget.release(message_size(data))
                mixed_progress = results.progress
                if memory is not None:
                    assert memory.held == 0
                    assert memory.budget.in_use == 0
    assert sorted(mixed) == sorted(plain)
    odd = {uid: flags for folder, uid, _, flags in mixed if folder == "Odd"}
    assert sorted(odd) == [1, 3, 4, 6, 7, 8, 9, 10]
    assert odd[3] == (b"\\Flagged",)  # the earlier response's FLAGS, merged with the body
    assert mixed_progress == plain_progress
    assert mixed_progress.messages_missing == 2
    assert mixed_progress.messages_done == 7 + 10
    assert mixed_progress.bytes_done == sum(len(b) for _, _, b, _ in plain)
    assert mixed_progress.folders_done == 2
    for shared in (plain_budget, mixed_budget):
        if isinstance(shared, ByteSemaphore):
            assert shared.in_use == 0


async def test_cancelled_batch_requests_lose_no_message_and_leave_no_budget(
    account: dict[str, Any],
) -> None:
    settings = account
    uids = seed_folders(settings, {"A": 20, "B": 13}, size=3_000)
    got: list[tuple[str, int]] = []
    cancelled = 0
    with trio.fail_after(60):
        async with (
            open_pool(**settings, max_size=2) as pool,
            fetch_many(pool, uids, BODY, batch_size=4, max_bytes=9_000) as results,
        ):
            memory = results._memory
            assert memory is not None
            batches = results.batches()
            while True:
                result = None
                with trio.move_on_after(0.0005) as scope:
                    try:
                        result = await batches.__anext__()
                    except StopAsyncIteration:
                        break
                if scope.cancelled_caught and result is None:
                    cancelled += 1
                    continue
                assert result is not None
                folder, messages = result
                got += [(folder, uid) for uid, _ in messages]
                for uid, data in messages:
                    index = uids[folder].index(uid)
                    assert data[b"BODY[]"] == make_message(folder, index, 3_000)
            assert memory.budget.in_use == 0 and memory.held == 0
            progress = results.progress
    assert cancelled > 0
    assert sorted(got) == sorted((f, u) for f, us in uids.items() for u in us)
    assert progress.messages_done == 33 and progress.folders_done == 2
    assert progress.messages_missing == 0


async def test_a_fanout_error_from_batches_is_raised_once_and_the_budget_given_back() -> None:
    async def fetch(session: ScriptedSession, command: ScriptedCommand) -> None:
        if session.selected == "Broken" and b"BODY" in b" ".join(command.raw):
            await session.send_line(f"{command.tag} NO [SERVERBUG] cannot fetch")
        else:
            await session.default(command)

    folders: dict[str | bytes, ScriptedFolder | list[bytes]] = {
        "INBOX": ScriptedFolder.of([body("INBOX", u) for u in range(1, 30)]),
        "Broken": ScriptedFolder.of([body("Broken", u) for u in range(1, 4)]),
    }
    budget = ByteSemaphore(5_000)
    got = []
    with trio.fail_after(30):
        async with (
            open_scripted_server(folders=folders, handlers={"FETCH": fetch}) as server,
            open_pool(**server.pool_kwargs(), max_size=2) as pool,
            fetch_many(
                pool,
                {"INBOX": "ALL", "Broken": [1, 2, 3]},
                BODY,
                batch_size=3,
                max_bytes=budget,
            ) as results,
        ):
            batches = results.batches()
            with pytest.raises(FanOutError) as caught:
                async for folder, messages in batches:
                    got.append((folder, len(messages)))
                    for _, data in messages:
                        budget.release(message_size(data))
            with pytest.raises(StopAsyncIteration):
                await batches.__anext__()
    assert caught.value.folder == "Broken"
    assert budget.in_use == 0  # what the fetch held when it failed is given back at the end


# -- the exporter --------------------------------------------------------------------------------


class BudgetSpy:
    """Records each round's budget of the exporter (``_Run.plan`` makes a new one per round)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.budgets: list[ByteSemaphore] = []
        real = _run._Run.plan

        def plan(run: _run._Run) -> Any:
            chosen = real(run)
            if run.budget is not None:
                self.budgets.append(run.budget)
            return chosen

        monkeypatch.setattr(_run._Run, "plan", plan)


async def test_an_export_with_a_budget_ends_with_nothing_held(
    account: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = account
    seed_folders(settings, {"INBOX": 30, "A": 17, "B": 5}, size=2_500)
    spy = BudgetSpy(monkeypatch)
    with trio.fail_after(60):
        async with open_pool(**settings, max_size=3) as pool:
            result = await export_maildir(
                pool, tmp_path / "Mail", batch_size=7, memory_budget=20_000, fsync=False
            )
            # A second run: everything is there, the fetch finds nothing new.
            second = await export_maildir(
                pool, tmp_path / "Mail", batch_size=7, memory_budget=20_000, fsync=False
            )
    assert result.complete and result.messages_fetched == 52
    assert second.complete and second.messages_fetched == 0
    assert spy.budgets
    for budget in spy.budgets:
        stats = budget.statistics()
        assert stats.in_use == 0 and stats.waiting == 0
        assert stats.peak <= 20_000 + 2_600


async def test_an_export_with_a_budget_and_already_exported_messages_releases_them(
    account: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Messages fetched again but already on disk (the skip path of ``_pending``) give their
    bytes back at once; a batch of nothing but those is never queued."""
    settings = account
    seed_folders(settings, {"INBOX": 12}, size=2_000)
    spy = BudgetSpy(monkeypatch)
    real_plan = _local._plan

    def plan_everything(folder: Any) -> None:
        real_plan(folder)
        if folder.exported:
            folder.spec = "ALL"  # fetch again what is already here

    monkeypatch.setattr(_local, "_plan", plan_everything)
    with trio.fail_after(60):
        async with open_pool(**settings, max_size=2) as pool:
            await export_maildir(pool, tmp_path / "Mail", batch_size=5, memory_budget=9_000)
            second = await export_maildir(
                pool, tmp_path / "Mail", batch_size=5, memory_budget=9_000
            )
    assert second.complete
    for budget in spy.budgets:
        assert budget.in_use == 0


async def test_without_a_budget_the_messages_held_for_writing_stay_bounded(
    account: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """memory_budget=None: messages between the fetch's hand-over and their write, counted
    with slow writers. Before 1521631: the channel (128) and a write batch per writer (2 x
    128): 384, plus the one in the fetcher's hands."""
    settings = account
    seed_folders(settings, {"INBOX": 1_200}, size=200)
    alive = {"now": 0, "peak": 0}
    real_pending = _run._Run._pending
    real_written = _run._Run._written

    def pending(run: Any, name: str, messages: Any) -> Any:
        items = real_pending(run, name, messages)
        alive["now"] += len(items)
        alive["peak"] = max(alive["peak"], alive["now"])
        return items

    def written(run: Any, batch: Any) -> None:
        alive["now"] -= len(batch)
        real_written(run, batch)

    real_write = _local._write_batch

    def slow_write(batch: Any, fsync: bool) -> None:
        time.sleep(0.05)
        real_write(batch, fsync)

    monkeypatch.setattr(_run._Run, "_pending", pending)
    monkeypatch.setattr(_run._Run, "_written", written)
    monkeypatch.setattr(_run, "_write_batch", slow_write)
    batch_size = 200
    with trio.fail_after(120):
        async with open_pool(**settings, max_size=2) as pool:
            result = await export_maildir(
                pool, tmp_path / "Mail", batch_size=batch_size, memory_budget=None, fsync=False
            )
    assert result.complete and result.messages_fetched == 1_200
    # The new bound: the queue's lists, the fetcher's list, and per writer a list merged up to
    # _WRITE_BATCH - 1 plus one more list.
    new_bound = (_WRITE_QUEUE + 1) * batch_size + _WRITERS * (_WRITE_BATCH - 1 + batch_size)
    print("peak messages held for writing:", alive["peak"], "bound", new_bound)
    assert alive["peak"] <= new_bound
    assert alive["peak"] <= 384 + batch_size, f"held {alive['peak']} messages (was <= 385)"


async def test_a_folder_failing_while_the_exporter_waits_to_queue_loses_nothing_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A FETCH refused for one folder while the fetcher waits for room in the writers' queue
    (slow writers): the block is cancelled and the list it was queueing dropped. The other
    folders must still end up complete on disk (asked for again in the next round)."""

    async def fetch(session: ScriptedSession, command: ScriptedCommand) -> None:
        if session.selected == "Broken" and b"BODY" in b" ".join(command.raw):
            await trio.sleep(0.3)  # after the queue has filled up
            await session.send_line(f"{command.tag} NO [SERVERBUG] cannot fetch")
        else:
            await session.default(command)

    inbox = [body("INBOX", u) for u in range(1, 61)]
    other = [body("Other", u) for u in range(1, 41)]
    folders: dict[str | bytes, ScriptedFolder | list[bytes]] = {
        "INBOX": ScriptedFolder.of(inbox),
        "Other": ScriptedFolder.of(other),
        "Broken": ScriptedFolder.of([body("Broken", 1)]),
    }
    real_write = _local._write_batch

    def slow_write(batch: Any, fsync: bool) -> None:
        time.sleep(0.2)
        real_write(batch, fsync)

    monkeypatch.setattr(_run, "_write_batch", slow_write)
    with trio.fail_after(60):
        async with (
            open_scripted_server(folders=folders, handlers={"FETCH": fetch}) as server,
            open_pool(**server.pool_kwargs(), max_size=3) as pool,
        ):
            result = await export_maildir(
                pool, tmp_path / "Mail", batch_size=5, memory_budget=None, fsync=False
            )
    assert {f.name for f in result.folders_failed} == {"Broken"}
    by_name = {f.name: f for f in result.folders}
    for name, bodies in (("INBOX", inbox), ("Other", other)):
        path = by_name[name].path
        on_disk = {p.read_bytes() for p in (path / "cur").iterdir()}
        assert on_disk == set(bodies), name
    assert result.messages_fetched == 100
