"""The exporter's per-folder state file without a server: what is written is what is read back,
format 1 is upgraded, anything unknown or garbled is ignored (the files are the truth), and the
directory listing is trusted only when it is old enough."""

from __future__ import annotations

import json
from pathlib import Path

import hypothesis
import pytest
from hypothesis import strategies as st

from trio_imappool.exporter import STATE_NAME, FolderState, read_folder_state
from trio_imappool.exporter._state import _listing_holds, _parse_ranges, _write_state

UIDS = st.frozensets(st.integers(1, 2**32 - 1), max_size=60)


def folder_dir(tmp_path: Path) -> Path:
    (tmp_path / "tmp").mkdir()
    return tmp_path


@hypothesis.given(
    uids=UIDS,
    gone=UIDS,
    numbers=st.tuples(*(st.integers(0, 2**63 - 1) for _ in range(4))),
    messages=st.integers(-1, 10**9),
    listing=st.tuples(*(st.integers(0, 2**63 - 1) for _ in range(3))),
    folder=st.text(),
)
@hypothesis.settings(max_examples=200, deadline=None)
def test_a_written_state_is_read_back_as_it_was(
    tmp_path_factory: pytest.TempPathFactory,
    uids: frozenset[int],
    gone: frozenset[int],
    numbers: tuple[int, int, int, int],
    messages: int,
    listing: tuple[int, int, int],
    folder: str,
) -> None:
    path = folder_dir(tmp_path_factory.mktemp("folder"))
    uidvalidity, synced_below, highestmodseq, uidnext = numbers
    state = FolderState(
        folder=folder,
        uidvalidity=uidvalidity,
        uids=uids,
        synced_below=synced_below,
        gone=gone,
        highestmodseq=highestmodseq,
        uidnext=uidnext,
        messages=messages,
        listing=listing,
    )
    _write_state(path, state, fsync=False)
    assert read_folder_state(path) == state
    assert json.loads((path / STATE_NAME).read_text("utf-8"))["format"] == 2
    assert list((path / "tmp").iterdir()) == []  # written aside, then renamed into place


def test_uid_sets_are_written_compactly_and_parsed_back() -> None:
    state = FolderState("INBOX", 7, frozenset([1, 2, 3, 5, 10, 11]), 12, gone=frozenset([4]))
    raw = json.loads(state.to_json())
    assert raw["uids"] == "1:3,5,10:11" and raw["gone"] == "4"
    assert _parse_ranges(raw["uids"]) == {1, 2, 3, 5, 10, 11}
    assert _parse_ranges("") == set()


def test_a_format_1_state_is_upgraded_with_everything_new_unknown(tmp_path: Path) -> None:
    old = {"format": 1, "folder": "Archive", "uidvalidity": 9, "uids": "1:4", "synced_below": 5}
    (tmp_path / STATE_NAME).write_text(json.dumps(old), "utf-8")
    state = read_folder_state(tmp_path)
    assert state == FolderState("Archive", 9, frozenset({1, 2, 3, 4}), 5)
    assert state is not None
    assert (state.gone, state.highestmodseq, state.uidnext, state.messages) == (
        frozenset(),
        0,
        0,
        -1,
    )
    assert state.listing == (0, 0, 0)  # the files are listed by the next run


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "[]",
        '{"format": 3, "folder": "x", "uidvalidity": 1, "uids": "", "synced_below": 0}',
        '{"format": 2, "folder": "x", "uidvalidity": 1, "uids": "", "synced_below": 0}',
        '{"format": 1, "folder": "x", "uidvalidity": "v", "uids": "", "synced_below": 0}',
        '{"format": 1, "folder": "x", "uidvalidity": 1, "uids": "1:x", "synced_below": 0}',
        # A damaged range: refused, not four billion UIDs allocated.
        '{"format": 1, "folder": "x", "uidvalidity": 1, "uids": "1:4294967295", "synced_below": 0}',
        '{"format": 1, "folder": "x", "uidvalidity": 1, "uids": "1,,2", "synced_below": 0}',
    ],
)
def test_an_unknown_or_garbled_state_is_ignored(tmp_path: Path, text: str) -> None:
    (tmp_path / STATE_NAME).write_text(text, "utf-8")
    assert read_folder_state(tmp_path) is None


def test_no_state_file_is_no_state(tmp_path: Path) -> None:
    assert read_folder_state(tmp_path) is None
    assert read_folder_state(tmp_path / "missing") is None


def test_out_of_range_counts_are_clamped_and_a_bad_listing_is_forgotten(tmp_path: Path) -> None:
    raw = {
        "format": 2,
        "folder": "x",
        "uidvalidity": 1,
        "uids": "1",
        "synced_below": 2,
        "gone": "",
        "highestmodseq": -5,
        "uidnext": -1,
        "messages": -9,
        "listing": [1, "2", 3],
    }
    (tmp_path / STATE_NAME).write_text(json.dumps(raw), "utf-8")
    state = read_folder_state(tmp_path)
    assert state is not None
    assert (state.highestmodseq, state.uidnext, state.messages) == (0, 0, -1)
    assert state.listing == (0, 0, 0)


def test_a_listing_is_trusted_only_for_the_same_directory_times_old_enough() -> None:
    second = 1_000_000_000
    times = (100 * second, 101 * second)
    assert _listing_holds((*times, 104 * second), times)
    assert not _listing_holds((*times, 102 * second), times)  # too recent: times are coarse
    assert not _listing_holds((*times, 104 * second), (100 * second, 102 * second))
    assert not _listing_holds((0, 0, 0), (0, 0))
