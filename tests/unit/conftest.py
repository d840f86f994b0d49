"""The unit tier's promise, enforced: no server, no threads, no subprocesses.

Every test here runs with a guard (autouse) that makes it fail when it starts a thread
(``threading.Thread.start``, ``_thread.start_new_thread``, ``trio.to_thread.run_sync`` or trio's
thread cache), connects a socket (``socket.socket.connect``/``connect_ex``,
``socket.create_connection``; trio's sockets connect through the same method) or starts a
process (``subprocess.Popen``, ``os.system``, ``os.fork``, ``os.posix_spawn``). Such a test
belongs in tests/integration.

The forbidden call raises :class:`UnitTierViolation`, a :class:`BaseException` so that no
``except Exception`` in the code under test can swallow it; and in case something swallows it
anyway, the test is failed when it ends. Trio's own run loop (pytest-trio, ``trio.run``) needs
no thread (its wake-up socket pair is made with ``socketpair()``, not ``connect``), and neither
does hypothesis: both run under the guard.
"""

from __future__ import annotations

import _thread
import os
import socket
import subprocess
import threading
from collections.abc import Callable, Generator, Iterator
from typing import Any

import pytest
import trio
import trio._threads
import trio.lowlevel
import trio.to_thread


class UnitTierViolation(BaseException):
    """A unit test started a thread, connected a socket or started a process."""


def _forbidding(what: str, seen: list[str]) -> Callable[..., Any]:
    def forbidden(*args: object, **kwargs: object) -> Any:
        seen.append(what)
        raise UnitTierViolation(
            f"a unit test may not {what}: tests/unit needs no server, no threads and no "
            "subprocesses (move the test to tests/integration)"
        )

    return forbidden


def _forbidding_async(what: str, seen: list[str]) -> Callable[..., Any]:
    sync = _forbidding(what, seen)

    async def forbidden(*args: object, **kwargs: object) -> Any:
        return sync()

    return forbidden


_CALL_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call":
        item.stash[_CALL_FAILED] = report.failed
    return report


@pytest.fixture(autouse=True)
def unit_tier_guard(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[list[str]]:
    """The guard; its value is the list of forbidden things the test tried (a test of the
    guard itself clears it after checking)."""
    seen: list[str] = []
    thread = "start a thread"
    patch = monkeypatch.setattr
    patch(threading.Thread, "start", _forbidding(thread, seen))
    patch(_thread, "start_new_thread", _forbidding(thread, seen))
    patch(threading, "_start_new_thread", _forbidding(thread, seen), raising=False)
    patch(trio.to_thread, "run_sync", _forbidding_async("run trio.to_thread.run_sync", seen))
    patch(trio.lowlevel, "start_thread_soon", _forbidding(thread, seen))
    # trio.to_thread.run_sync reaches the thread cache through its own module's name for it.
    patch(trio._threads, "start_thread_soon", _forbidding(thread, seen), raising=False)
    connect = "open a network connection"
    patch(socket.socket, "connect", _forbidding(connect, seen))
    patch(socket.socket, "connect_ex", _forbidding(connect, seen))
    patch(socket, "create_connection", _forbidding(connect, seen))
    process = "start a subprocess"
    patch(subprocess.Popen, "_execute_child", _forbidding(process, seen))
    for name in ("system", "fork", "forkpty", "posix_spawn", "posix_spawnp"):
        if hasattr(os, name):
            patch(os, name, _forbidding(process, seen))
    yield seen
    if seen and not request.node.stash.get(_CALL_FAILED, False):  # else it failed already
        pytest.fail(f"the test tried to {', '.join(dict.fromkeys(seen))} (see its output)")
