"""A fetch bounded in bytes, without a server: batches cut by count and bytes from the sizes,
every folder sized before its batches are planned, and the accounting of what a fetch holds
(planned sizes corrected by the real ones, everything given back at the end)."""

from __future__ import annotations

import types

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_imappool import fetch_many
from trio_imappool._byte_semaphore import ByteSemaphore
from trio_imappool._fanout_memory import FetchMemory, batch_bytes, message_size
from trio_imappool._fanout_plan import ALL_UIDS, FanOutPlan, Search, Work, cut_by_bytes
from trio_imappool._fanout_progress import ProgressCounter


@given(
    st.lists(st.integers(0, 1000), max_size=200),
    st.integers(1, 50),
    st.integers(1, 3000),
)
def test_batches_keep_every_uid_once_within_count_and_bytes(
    sizes: list[int], count: int, limit: int
) -> None:
    uids = list(range(1, len(sizes) + 1))
    by_uid = dict(zip(uids, sizes, strict=True))
    batches = cut_by_bytes("INBOX", uids, by_uid, count, limit)
    assert [uid for work in batches for uid in work.uids] == uids
    for work in batches:
        assert 1 <= len(work.uids) <= count
        assert work.nbytes == sum(by_uid[uid] for uid in work.uids)
        # Over the limit only when a single message is larger than it.
        assert work.nbytes <= limit or len(work.uids) == 1


def test_a_message_larger_than_the_limit_is_a_batch_of_its_own() -> None:
    sizes = {1: 10, 2: 10, 3: 500, 4: 10}
    batches = cut_by_bytes("INBOX", [1, 2, 3, 4], sizes, 100, 100)
    assert [list(w.uids) for w in batches] == [[1, 2], [3], [4]]
    assert [w.nbytes for w in batches] == [20, 500, 10]


def test_uids_without_a_size_count_nothing() -> None:
    batches = cut_by_bytes("INBOX", [1, 2, 3], {}, 2, 1)
    assert [list(w.uids) for w in batches] == [[1, 2], [3]]


def make_plan(folders: dict[str, object]) -> tuple[FanOutPlan, ProgressCounter]:
    counter = ProgressCounter(len(folders))
    specs = {
        name: Search(spec)
        if isinstance(spec, str | list) and spec and isinstance(spec[0], str)
        else spec
        for name, spec in folders.items()
    }
    plan = FanOutPlan(
        specs,  # type: ignore[arg-type]
        batch_size=3,
        mode="read-only",
        batches=True,
        probe_all=True,
        progress=counter,
        batch_bytes=100,
    )
    return plan, counter


def test_every_folder_is_sized_before_its_batches_and_all_needs_no_probe() -> None:
    plan, counter = make_plan({"INBOX": [1, 2, 3, 4], "Archive": "ALL", "Empty": []})
    first = plan.take(None)
    assert first is not None and first.sizing and first.folder == "INBOX"
    (second,) = first.companions  # one round trip; an empty UID list needs no sizes
    assert second.uids is ALL_UIDS and not second.probe
    assert plan.take(None) is None
    assert not plan.finished()
    plan.sized(first, {1: 60, 2: 60, 3: 10, 4: 10})
    plan.finish(first)
    plan.sized(second, {7: 1, 9: 1})  # ALL: the UIDs that answered
    plan.finish(second)
    assert plan.finished()
    assert plan.found["Archive"] == [7, 9]
    works: list[Work] = []
    while (work := plan.take(None)) is not None:
        works.append(work)
        plan.finish(work)
    inbox = [(list(w.uids), w.nbytes) for w in works if w.folder == "INBOX"]
    assert inbox == [([1], 60), ([2, 3, 4], 80)]
    assert [list(w.uids) for w in works if w.folder == "Archive"] == [[7, 9]]
    assert counter.snapshot().messages_total == 6


def test_small_folders_share_a_round_trip_and_a_large_one_is_sized_alone() -> None:
    folders: dict[str, object] = {f"F{i}": list(range(1, 301)) for i in range(20)}
    folders["Big"] = list(range(1, 2001))
    plan, _ = make_plan(folders)
    first = plan.take(None)
    assert first is not None and len(first.companions) == 15  # 16 x 300 UIDs <= 5,000
    second = plan.take(None)
    assert second is not None and len(second.companions) == 3  # the other 4 small ones
    big = plan.take(None)
    assert big is not None and big.folder == "Big" and big.companions == []
    assert plan.take(None) is None


def test_a_searched_folder_is_sized_after_its_search() -> None:
    plan, _ = make_plan({"INBOX": ["UNSEEN"]})
    search = plan.take(None)
    assert search is not None and search.search is not None
    plan.searched(search, [5, 6])
    plan.finish(search)
    sizing = plan.take(None)
    assert sizing is not None and sizing.sizing and list(sizing.uids) == [5, 6]


def test_a_batch_put_back_is_taken_next() -> None:
    plan, _ = make_plan({"INBOX": [1, 2, 3, 4, 5, 6]})
    sizing = plan.take(None)
    assert sizing is not None
    plan.sized(sizing, {})
    plan.finish(sizing)
    batch = plan.take("INBOX")
    assert batch is not None
    plan.put_back(batch)
    assert plan.take("INBOX") is batch


def test_the_batch_limit_shares_the_budget_between_the_tasks_pipelines() -> None:
    assert batch_bytes(ByteSemaphore(64 * 2**20), 4) == 8 * 2**20
    assert batch_bytes(ByteSemaphore(3), 4) == 1


def test_message_size_counts_byte_strings_only() -> None:
    assert message_size({b"BODY[]": b"x" * 10, b"FLAGS": (b"\\Seen",), b"UID": 4}) == 10


async def test_the_real_size_replaces_the_plan_and_close_gives_everything_back() -> None:
    budget = ByteSemaphore(100)
    memory = FetchMemory(budget, owned=True)
    await memory.reserve(Work("INBOX", [1, 2], nbytes=40))
    assert memory.reserve_nowait(Work("INBOX", [3], nbytes=50))
    assert not memory.reserve_nowait(Work("INBOX", [4], nbytes=20))  # 110 > 100
    assert memory.reserve_nowait(Work("INBOX", search=Search("ALL")))  # searches hold nothing
    memory.settle(40, 25)  # the server said 40, the literals held 25
    assert budget.in_use == 75
    memory.settle(50, 70)  # it said 50 and sent 70: taken on top
    assert budget.in_use == 95
    memory.hand_on(25)
    assert budget.in_use == 95  # handed on, not yet done with
    memory.handed_on()
    assert budget.in_use == 70
    memory.hand_on(30)
    memory.close()
    assert budget.in_use == 0 and memory.held == 0


async def test_a_callers_budget_keeps_what_was_handed_on() -> None:
    budget = ByteSemaphore(100)
    memory = FetchMemory(budget, owned=False)
    await memory.reserve(Work("INBOX", [1], nbytes=30))
    memory.settle(30, 30)
    memory.hand_on(30)
    memory.close()
    assert budget.in_use == 30  # the caller releases it once written


def test_fetch_many_refuses_a_budget_that_is_not_a_positive_int() -> None:
    pool = types.SimpleNamespace(config=types.SimpleNamespace(max_size=2))
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="byte budget"):
            fetch_many(pool, {"INBOX": [1]}, "FLAGS", max_bytes=bad)  # type: ignore[arg-type]


def test_sizes_are_asked_by_ranges_of_consecutive_uids() -> None:
    from trio_imappool._fanout_memory import _ranges

    assert _ranges([1, 2, 3, 7, 8, 10]) == [range(1, 4), range(7, 9), range(10, 11)]
    assert _ranges(range(5, 9)) == [range(5, 9)]
    assert _ranges([]) == [[]]
    scattered = list(range(1, 200, 2))  # too many gaps: as it is
    assert _ranges(scattered) == [scattered]
