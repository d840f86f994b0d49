"""The fan-out's planner and progress, without a server: every UID planned exactly once, in
batches no larger than asked, and the choices the engine relies on."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_imappool import ConfigurationError
from trio_imappool._fanout_plan import (
    FanOutPlan,
    Search,
    Work,
    check_sizes,
    is_all,
    normalise,
)
from trio_imappool._fanout_progress import Progress, ProgressCounter

folder_names = st.sampled_from(["INBOX", "Archive", "Lists/trio", "Sent", "a", "b"])
uid_lists = st.lists(st.integers(1, 5000), max_size=300)
folder_uids = st.dictionaries(folder_names, uid_lists, max_size=5)


def make_plan(
    folders: dict[str, Any],
    batch_size: int,
    *,
    mode: Any = "read-only",
    batches: bool = True,
    probe_all: bool = False,
) -> tuple[FanOutPlan, list[Progress]]:
    published: list[Progress] = []
    counter = ProgressCounter(len(folders), published.append)
    plan = FanOutPlan(
        normalise(folders),
        batch_size=batch_size,
        mode=mode,
        batches=batches,
        probe_all=probe_all,
        progress=counter,
    )
    return plan, published


def drain(plan: FanOutPlan, prefers: list[str | None]) -> list[Work]:
    """Take every batch, one task at a time, each preferring the next of *prefers*."""
    taken: list[Work] = []
    index = 0
    while (work := plan.take(prefers[index % len(prefers)] if prefers else None)) is not None:
        taken.append(work)
        plan.finish(work)
        index += 1
    return taken


# -- the caller's folders --------------------------------------------------------------------------


@given(folder_uids)
def test_uids_are_sorted_and_deduplicated(folders: dict[str, list[int]]) -> None:
    plan = normalise(folders)
    assert plan == {folder: sorted(set(uids)) for folder, uids in folders.items()}


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("ALL", Search("ALL")),
        (b"UNSEEN", Search(b"UNSEEN")),
        (["SINCE", "1-Jan-2026"], Search(["SINCE", "1-Jan-2026"])),
        (["UID", 5], Search(["UID", 5])),
        (range(3, 9), range(3, 9)),
        ({5, 1, 3}, [1, 3, 5]),
        (iter([2, 2, 1]), [1, 2]),
    ],
)
def test_a_folder_is_given_uids_or_criteria(spec: Any, expected: object) -> None:
    assert normalise({"INBOX": spec}) == {"INBOX": expected}


@pytest.mark.parametrize(
    "folders",
    [
        [("INBOX", [1])],
        {1: [1]},
        {"INBOX": 5},
        {"INBOX": [0, 1]},
        {"INBOX": [True]},
        {"INBOX": [1.0]},
        {"INBOX": range(0, 5)},
    ],
)
def test_what_is_neither_uids_nor_criteria_is_a_type_error(folders: Any) -> None:
    with pytest.raises(TypeError):
        normalise(folders)


def test_a_folder_name_with_a_line_break_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="folder name"):
        normalise({"INBOX\r\nA1 LOGOUT": [1]})


@pytest.mark.parametrize(
    ("criteria", "expected"),
    [("ALL", True), (" all ", True), (b"ALL", True), (["ALL"], True), ([b"all"], True)],
)
def test_all_is_recognised_in_any_spelling(criteria: Any, expected: bool) -> None:
    assert is_all(criteria) is expected


@pytest.mark.parametrize("criteria", ["UNSEEN", ["ALL", "UNSEEN"], ["NOT", "ALL"], [], [1]])
def test_other_criteria_are_not_all(criteria: Any) -> None:
    assert not is_all(criteria)


# -- how many connections --------------------------------------------------------------------------


@given(st.integers(1, 50), st.integers(1, 1000), st.none() | st.integers(1, 100))
def test_a_fan_out_never_uses_more_connections_than_the_pool_has(
    max_size: int, batch_size: int, max_connections: int | None
) -> None:
    workers = check_sizes(max_size, batch_size, max_connections)
    assert 1 <= workers <= max_size
    if max_connections is None:
        assert workers == max_size
    else:
        assert workers == min(max_size, max_connections)


@pytest.mark.parametrize(
    ("batch_size", "max_connections"),
    [(0, None), (-1, None), (True, None), (1.5, None), (10, 0), (10, True), (10, 2.0)],
)
def test_sizes_that_are_not_positive_ints_are_refused(
    batch_size: Any, max_connections: Any
) -> None:
    with pytest.raises(ValueError):
        check_sizes(10, batch_size, max_connections)


# -- batches -------------------------------------------------------------------------------------


@given(
    folder_uids,
    st.integers(1, 64),
    st.lists(st.none() | folder_names, min_size=1, max_size=8),
)
def test_every_uid_is_planned_exactly_once_in_batches_no_larger_than_asked(
    folders: dict[str, list[int]], batch_size: int, prefers: list[str | None]
) -> None:
    plan, published = make_plan(folders, batch_size)
    taken = drain(plan, prefers)

    assert plan.finished()
    planned: dict[str, list[int]] = {}
    for work in taken:
        assert work.search is None and not work.probe
        assert 1 <= len(work.uids) <= batch_size
        assert list(work.uids) == sorted(work.uids)
        planned.setdefault(work.folder, []).extend(work.uids)
    for folder, uids in folders.items():
        assert sorted(planned.get(folder, [])) == sorted(set(uids))
    assert set(planned) <= set(folders)
    # Within a folder, batches come in ascending order, whoever takes them.
    for uids in planned.values():
        assert uids == sorted(uids)
    # The totals are known at once and count every batch.
    final = published[-1] if published else None
    if folders:
        assert final is not None
        assert final.messages_total == sum(len(set(uids)) for uids in folders.values())
        assert (
            final.batches_total
            == len(taken)
            == sum(math.ceil(len(set(uids)) / batch_size) for uids in folders.values())
        )


@given(folder_uids, st.integers(1, 64), st.randoms(use_true_random=False))
def test_tasks_working_at_once_share_the_batches_without_overlap(
    folders: dict[str, list[int]], batch_size: int, random: Any
) -> None:
    """Several tasks hold work at once and finish it in any order: still each UID once."""
    plan, _ = make_plan(folders, batch_size)
    holding: list[Work] = []
    seen: list[tuple[str, int]] = []
    while True:
        if holding and (random.random() < 0.5 or len(holding) >= 4):
            plan.finish(holding.pop(random.randrange(len(holding))))
            continue
        prefer = random.choice([None, *folders]) if folders else None
        taken = plan.take(prefer)
        if taken is None:
            if not holding:
                break
            plan.finish(holding.pop())
            continue
        seen.extend((taken.folder, uid) for uid in taken.uids)
        holding.append(taken)
    assert sorted(seen) == sorted((f, uid) for f, uids in folders.items() for uid in set(uids))


def test_a_task_keeps_to_the_folder_its_connection_has_selected() -> None:
    plan, _ = make_plan({"INBOX": range(1, 31), "Archive": range(1, 31)}, 10)
    first = plan.take("Archive")
    assert first is not None and first.folder == "Archive"
    second = plan.take("Archive")
    assert second is not None and second.folder == "Archive"
    assert list(second.uids) == list(range(11, 21))


def test_a_new_task_goes_to_the_folder_fewest_tasks_work_on() -> None:
    plan, _ = make_plan({"INBOX": range(1, 41), "Archive": range(1, 21)}, 10)
    first = plan.take(None)
    assert first is not None and first.folder == "INBOX"  # most batches left
    second = plan.take(None)
    assert second is not None and second.folder == "Archive"  # nobody works on it yet
    plan.finish(first)
    plan.finish(second)
    third = plan.take(None)
    assert third is not None and third.folder == "INBOX"


def test_work_taken_before_a_checkout_is_swapped_for_the_selected_folders() -> None:
    plan, _ = make_plan({"INBOX": range(1, 21), "Archive": range(1, 21)}, 10, mode="read-only")
    work = plan.take("INBOX")
    assert work is not None and work.folder == "INBOX"
    better = plan.prefer(work, "Archive", True)
    assert better.folder == "Archive" and list(better.uids) == list(range(1, 11))
    # The batch given up comes first again for INBOX.
    again = plan.take("INBOX")
    assert again is not None and again.uids == work.uids


@pytest.mark.parametrize(
    ("mode", "readonly", "swapped"),
    [
        ("read-only", False, False),
        ("read-only", None, False),
        ("read-write", True, False),
        ("read-write", False, True),
        ("any", True, True),
        ("any", False, True),
    ],
)
def test_a_selected_folder_serves_only_in_the_mode_the_operation_needs(
    mode: Any, readonly: bool | None, swapped: bool
) -> None:
    plan, _ = make_plan({"INBOX": [1, 2], "Archive": [1, 2]}, 10, mode=mode)
    work = plan.take("INBOX")
    assert work is not None
    assert (plan.prefer(work, "Archive", readonly).folder == "Archive") is swapped


def test_no_swap_for_the_same_folder_none_selected_or_nothing_left_there() -> None:
    plan, _ = make_plan({"INBOX": [1, 2], "Archive": [1]}, 1)
    work = plan.take("INBOX")
    assert work is not None
    assert plan.prefer(work, "INBOX", True) is work
    assert plan.prefer(work, None, True) is work
    archive = plan.take("Archive")
    assert archive is not None
    assert plan.prefer(work, "Archive", True) is work  # Archive has no batches left


# -- searches ------------------------------------------------------------------------------------


@given(
    st.dictionaries(folder_names, uid_lists.map(lambda u: sorted(set(u))), max_size=5),
    st.integers(1, 64),
)
def test_searches_go_first_and_their_results_are_batched_once(
    found: dict[str, list[int]], batch_size: int
) -> None:
    plan, published = make_plan({folder: ["UNSEEN"] for folder in found}, batch_size)
    assert bool(found) != plan.finished()
    searches = []
    while (work := plan.take(None)) is not None:
        assert work.search is not None and work.search.criteria == ["UNSEEN"]
        searches.append(work)
    assert {work.folder for work in searches} == set(found)
    if found:
        assert plan.progress.snapshot().messages_total is None  # unknown before the searches
    for work in searches:
        plan.searched(work, found[work.folder])
        plan.finish(work)
    assert plan.finished()
    assert plan.found == found
    taken = drain(plan, [None])
    planned = sorted((work.folder, uid) for work in taken for uid in work.uids)
    assert planned == sorted((f, uid) for f, uids in found.items() for uid in uids)
    assert all(len(work.uids) <= batch_size for work in taken)
    if found:
        assert published[-1].messages_total == sum(map(len, found.values()))


def test_a_search_only_operation_plans_no_batches() -> None:
    plan, published = make_plan({"INBOX": "ALL", "Archive": "ALL"}, 1, batches=False)
    for _ in range(2):
        work = plan.take(None)
        assert work is not None and work.search is not None
        plan.searched(work, [1, 2, 3])
        plan.finish(work)
    assert plan.take(None) is None and plan.finished()
    assert plan.found == {"INBOX": [1, 2, 3], "Archive": [1, 2, 3]}
    assert published[-1].complete and published[-1].messages_total == 6


def test_a_search_fetched_with_its_first_batch_plans_only_the_rest() -> None:
    plan, published = make_plan({"INBOX": ["UNSEEN"]}, 10)
    work = plan.take(None)
    assert work is not None
    plan.searched_with_first(work, [2, 5, 11, 12, 40], range(1, 11))
    rest = drain(plan, ["INBOX"])
    assert [list(batch.uids) for batch in rest] == [[11, 12, 40]]
    assert published[-1].messages_total == 5 and published[-1].batches_total == 2


# -- a folder fetched as ALL: the probe ----------------------------------------------------------


def probe_plan(batch_size: int) -> tuple[FanOutPlan, Work, list[Progress]]:
    plan, published = make_plan({"INBOX": "ALL"}, batch_size, probe_all=True)
    probe = plan.take(None)
    assert probe is not None and probe.probe and probe.uids == range(1, batch_size + 1)
    assert not plan.finished()  # the probe plans more
    return plan, probe, published


@given(st.integers(1, 50), st.integers(0, 400), st.integers(0, 400))
def test_the_rest_of_a_dense_folder_is_planned_in_uid_ranges_up_to_uidnext(
    batch_size: int, returned: int, more: int
) -> None:
    plan, probe, published = probe_plan(batch_size)
    returned = min(returned, batch_size)
    uidnext = batch_size + 1 + more
    exists = returned + more  # every UID above the probe exists: dense
    plan.probed(probe, returned, {b"EXISTS": exists, b"UIDNEXT": uidnext})
    plan.finish(probe)
    assert plan.finished()
    rest = drain(plan, ["INBOX"])
    uids = [uid for work in rest for uid in work.uids]
    assert uids == list(range(batch_size + 1, uidnext))
    assert all(1 <= len(work.uids) <= batch_size for work in rest)
    assert published[-1].messages_total == exists
    assert published[-1].batches_total == 1 + len(rest)


def test_a_folder_whose_old_messages_were_expunged_is_searched_above_the_probe() -> None:
    plan, probe, published = probe_plan(10)
    plan.probed(probe, 0, {b"EXISTS": 3, b"UIDNEXT": 100_000})
    plan.finish(probe)
    assert not plan.finished()
    search = plan.take(None)
    assert search is not None and search.search == Search(["UID", "11:*"], above=10)
    plan.searched(search, [5, 99_000, 99_001, 99_002])  # a UID at or below the probe's: dropped
    plan.finish(search)
    assert plan.found == {"INBOX": [99_000, 99_001, 99_002]}
    rest = drain(plan, ["INBOX"])
    assert [list(work.uids) for work in rest] == [[99_000, 99_001, 99_002]]
    assert published[-1].messages_total == 3 and published[-1].batches_total == 2


@pytest.mark.parametrize("examined", [None, {}, {b"EXISTS": 5}, {b"UIDNEXT": 9}])
def test_a_server_that_does_not_say_uidnext_and_exists_gets_a_search(
    examined: dict[bytes, Any] | None,
) -> None:
    plan, probe, _ = probe_plan(10)
    plan.probed(probe, 4, examined)
    search = plan.take(None)
    assert search is not None and search.search is not None and search.search.above == 10


def test_a_folder_the_probe_covered_is_done() -> None:
    plan, probe, published = probe_plan(10)
    plan.probed(probe, 7, {b"EXISTS": 7, b"UIDNEXT": 8})
    plan.finish(probe)
    assert plan.finished() and plan.take(None) is None
    assert published[-1].messages_total == 7 and published[-1].batches_total == 1


# -- progress ------------------------------------------------------------------------------------


def test_progress_counts_batches_and_folders_until_complete() -> None:
    published: list[Progress] = []
    counter = ProgressCounter(2, published.append)
    assert counter.snapshot() == Progress(None, 0, 0, None, 0, 2, 0)
    counter.planned("INBOX", 3, 2)
    assert published[-1].messages_total is None  # one folder not planned yet
    counter.planned("Empty", 0, 0)
    assert published[-1] == Progress(3, 0, 0, 2, 0, 2, 1)
    counter.done("INBOX", 2, 100, batch_done=True)
    counter.done("INBOX", 1, 0, batch_done=True, missing=1)
    final = published[-1]
    assert final == Progress(3, 3, 100, 2, 2, 2, 2, 1) and final.complete
    assert str(final) == "3/3 messages (1 missing), 100 bytes, 2/2 batches, 2/2 folders"
    assert (
        str(Progress(None, 0, 0, None, 0, 1, 0))
        == "0/? messages, 0 bytes, 0/? batches, 0/1 folders"
    )


def test_a_folder_planned_in_two_steps_is_done_only_after_both() -> None:
    counter = ProgressCounter(1)
    counter.planned("INBOX", 0, 1, final=False)  # the probe
    counter.done("INBOX", 5, 10, batch_done=True)
    assert counter.snapshot().folders_done == 0
    counter.planned("INBOX", 5, 0)
    assert counter.snapshot().folders_done == 1 and counter.snapshot().complete
