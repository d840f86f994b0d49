"""The shared helpers: UID-set compaction, loopback detection, unwrapping a body's error."""

from __future__ import annotations

import itertools

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from trio_imappool._nursery import open_nursery_unwrapped
from trio_imappool._util import is_loopback, uid_set


def expand(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition(":")
        out.extend(range(int(low), int(high or low) + 1))
    return out


@given(st.lists(st.integers(1, 2**32 - 1), unique=True).map(sorted))
def test_a_uid_set_expands_to_the_uids_it_was_made_of(uids: list[int]) -> None:
    text = uid_set(uids)
    assert (expand(text) if uids else []) == uids
    # No two elements could have been one run.
    for left, right in itertools.pairwise(text.split(",")):
        assert int(left.rpartition(":")[2]) + 1 != int(right.partition(":")[0])


def test_a_uid_set_for_a_message_is_cut_after_a_whole_element() -> None:
    text = uid_set(range(1, 200, 2), max_chars=20)
    assert len(text) <= 20 and text.endswith(",...")
    assert text == "1,3,5,7,9,11,13,..."
    assert uid_set([1, 2, 3, 7], max_chars=20) == "1:3,7"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("10.0.0.1", False),
        ("imap.example.org", False),
        ("localhost.example.org", False),
        ("", False),
    ],
)
def test_loopback_is_an_address_or_the_name_localhost_never_a_lookup(
    host: str, loopback: bool
) -> None:
    assert is_loopback(host) is loopback


async def test_the_body_error_comes_out_bare_and_a_task_error_as_a_group() -> None:
    with pytest.raises(KeyError) as raised:
        async with open_nursery_unwrapped():
            raise KeyError("body")
    assert raised.value.args == ("body",)

    async def fails() -> None:
        raise ValueError("task")

    with pytest.RaisesGroup(ValueError):
        async with open_nursery_unwrapped() as nursery:
            nursery.start_soon(fails)
            await trio.sleep_forever()

    async def also_fails() -> None:
        raise ValueError("task")

    # The body failed and so did a task: both are reported, in the group.
    with pytest.RaisesGroup(KeyError, ValueError):
        async with open_nursery_unwrapped() as nursery:
            nursery.start_soon(also_fails)
            raise KeyError("body")  # before the task has run
