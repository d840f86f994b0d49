"""The unit tier's guard (tests/unit/conftest.py): each forbidden act fails the test, and what
the unit tests do need (a Trio run, hypothesis) still works under it."""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from .conftest import UnitTierViolation


def _connect() -> None:
    with socket.socket() as sock:
        sock.connect(("127.0.0.1", 9))


def _run_async(fn: Callable[[], Awaitable[object]]) -> None:
    async def main() -> None:
        await fn()

    trio.run(main)


@pytest.mark.parametrize(
    ("act", "what"),
    [
        pytest.param(lambda: threading.Thread(target=print).start(), "start a thread", id="thread"),
        pytest.param(lambda: threading.Timer(0, print).start(), "start a thread", id="timer"),
        pytest.param(
            lambda: _run_async(lambda: trio.to_thread.run_sync(print)),
            "run trio.to_thread.run_sync",
            id="to_thread",
        ),
        pytest.param(
            lambda: trio.lowlevel.start_thread_soon(print, print), "start a thread", id="cache"
        ),
        pytest.param(
            lambda: socket.create_connection(("127.0.0.1", 9)),
            "open a network connection",
            id="create_connection",
        ),
        pytest.param(
            _connect,
            "open a network connection",
            id="connect",
        ),
        pytest.param(
            lambda: _run_async(functools.partial(trio.open_tcp_stream, "127.0.0.1", 9)),
            "open a network connection",
            id="trio-connect",
        ),
        pytest.param(
            lambda: subprocess.run([sys.executable, "-c", "pass"], check=False),
            "start a subprocess",
            id="subprocess",
        ),
        pytest.param(lambda: os.system("true"), "start a subprocess", id="os.system"),
    ],
)
def test_the_guard_stops_what_a_unit_test_may_not_do(
    unit_tier_guard: list[str], act: Callable[[], object], what: str
) -> None:
    with pytest.raises(BaseException) as caught:
        act()
    error = caught.value
    while isinstance(error, BaseExceptionGroup):  # from a Trio run
        error = error.exceptions[0]
    assert isinstance(error, UnitTierViolation)
    assert what in str(error)
    assert what in unit_tier_guard
    unit_tier_guard.clear()  # the guard would fail this test when it ends


def test_the_guard_notices_a_violation_that_was_swallowed(unit_tier_guard: list[str]) -> None:
    with contextlib.suppress(BaseException):  # as careless code under test might
        threading.Thread(target=print).start()
    assert unit_tier_guard == ["start a thread"]
    unit_tier_guard.clear()


async def test_a_trio_test_runs_under_the_guard() -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.sleep, 0.01)
    await trio.testing.wait_all_tasks_blocked()


def test_trio_run_and_its_clock_run_under_the_guard() -> None:
    async def main() -> float:
        await trio.sleep(5)
        return trio.current_time()

    assert trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0)) >= 5


@given(st.lists(st.integers()))
def test_hypothesis_runs_under_the_guard(values: list[int]) -> None:
    assert sorted(sorted(values)) == sorted(values)
