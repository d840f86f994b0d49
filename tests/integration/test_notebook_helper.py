"""The notebook helper: one Trio run kept alive across "cells" on an asyncio loop.

Rules: every test is a plain function that drives :func:`asyncio.run` itself (pytest-trio would
run an ``async def`` test under Trio, and the helper needs an asyncio host), under
``asyncio.timeout``; every runner is closed in a ``finally``, because a guest run left behind
would make every later ``trio.run`` in this thread fail. A "cell" is one await of the runner.
Only loopback addresses; the Dovecot tests use a user of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import re
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import nbclient
import nbformat
import pytest
import trio
import trio.testing

import trio_imappool
from trio_imappool.notebook import TrioRunner
from trio_imappool.testing import DovecotServer, seed_folders

_users = itertools.count(1)
_cell: contextvars.ContextVar[str] = contextvars.ContextVar("cell", default="none")


@pytest.fixture
def account(dovecot: DovecotServer) -> dict[str, Any]:
    """Plain-IMAP pool settings for a fresh user of the shared Dovecot, with 5 messages."""
    name = f"notebook{next(_users)}"
    dovecot.add_user(name, f"{name}-pw")
    settings = dovecot.pool_kwargs(name, tls=False)
    seed_folders(settings, {"INBOX": 5})
    return settings


def run_async(main: Callable[[], Awaitable[None]], timeout: float = 20) -> None:
    """Run *main* on a fresh asyncio loop, under a deadline."""

    async def bounded() -> None:
        async with asyncio.timeout(timeout):
            await main()

    asyncio.run(bounded())


@contextlib.asynccontextmanager
async def started(**kwargs: Any) -> AsyncIterator[TrioRunner]:
    runner = await TrioRunner.start(**kwargs)
    try:
        yield runner
    finally:
        await runner.close()


def busy_threads() -> set[str]:
    """Threads other than the main one and Trio's idle cached workers ("Trio thread N")."""
    return {
        thread.name
        for thread in threading.enumerate()
        if thread is not threading.main_thread()
        and not re.fullmatch(r"Trio thread \d+", thread.name)
    }


async def threads_left() -> int:
    """In the Trio run: worker threads of this run still running after a short wait."""
    with trio.move_on_after(5):
        await trio.testing.wait_all_threads_completed()
    return trio.testing.active_thread_count()


# -- state across cells ----------------------------------------------------------------------


def test_state_made_in_one_call_is_used_in_later_ones() -> None:
    async def main() -> None:
        async with started() as runner:
            token = await runner.run(_current_token)
            event = await runner.run(_make_event)  # a Trio object, made inside the run
            ticks: list[float] = []
            ticker = runner.start_soon(_tick, ticks, name="ticker")
            await asyncio.sleep(0.05)  # a cell that awaits asyncio: Trio keeps going
            setter = runner.start_soon(_set_later, event, 0.02)
            await runner.run(event.wait)  # a later cell waits for it
            assert event.is_set() and setter.done and setter.exception is None
            assert await runner.run(_current_token) is token  # the same run throughout
            assert len(ticks) >= 2, ticks  # the background task ran between the cells
            assert runner.statistics().background_tasks == 1
            ticker.cancel()
            await ticker.wait()
            assert ticker.done and ticker.exception is None
            assert str(runner.statistics()) == (
                "running calls=0 background_tasks=0 contexts=0 errors=0"
            )

    run_async(main)


async def _current_token() -> trio.lowlevel.TrioToken:
    await trio.lowlevel.checkpoint()
    return trio.lowlevel.current_trio_token()


async def _make_event() -> trio.Event:
    await trio.lowlevel.checkpoint()
    return trio.Event()


async def _set_later(event: trio.Event, delay: float) -> None:
    await trio.sleep(delay)
    event.set()


async def _tick(ticks: list[float]) -> None:
    while True:
        ticks.append(trio.current_time())
        await trio.sleep(0.01)


def test_results_and_exceptions_come_back_as_they_were() -> None:
    async def fails() -> None:
        await trio.lowlevel.checkpoint()
        raise KeyError("nope")

    async def main() -> None:
        async with started() as runner:
            assert await runner.run(_add, 2, 3) == 5
            with pytest.raises(KeyError, match="nope"):
                await runner.run(fails)
            assert runner.statistics().calls == 0
            assert runner.errors == []  # raised to the caller, not reported

    run_async(main)


async def _add(a: int, b: int) -> int:
    await trio.lowlevel.checkpoint()
    return a + b


def test_each_task_runs_in_its_callers_context() -> None:
    # ipykernel keeps the cell's identity in a contextvar: this is how print() finds its cell.
    seen: dict[str, str] = {}

    async def report(key: str) -> None:
        await trio.sleep(0.01)
        seen[key] = _cell.get()

    async def cell(name: str, runner: TrioRunner) -> None:
        _cell.set(name)
        background = runner.start_soon(report, f"{name} background")
        await runner.run(report, name)
        await background.wait()

    async def main() -> None:
        async with started() as runner:
            await asyncio.gather(cell("cell 1", runner), cell("cell 2", runner))

    run_async(main)
    assert seen == {
        "cell 1": "cell 1",
        "cell 1 background": "cell 1",
        "cell 2": "cell 2",
        "cell 2 background": "cell 2",
    }


# -- a pool across cells ---------------------------------------------------------------------


def test_a_pool_opened_in_one_call_is_used_in_the_next(account: dict[str, Any]) -> None:
    async def main() -> None:
        async with started() as runner:
            pool = await runner.enter(trio_imappool.open_pool(**account, max_size=2))
            assert await runner.run(_count, pool, "INBOX") == 5
            assert await runner.run(_count, pool, "INBOX") == 5
            stats = pool.statistics()  # read from the asyncio side: same thread
            assert (stats.acquires, stats.connections_opened, stats.closed) == (2, 1, False)
            assert runner.statistics().contexts == 1
            await runner.exit(pool)
            assert pool.statistics().closed
            assert pool.statistics().size == 0
            assert runner.statistics().contexts == 0

    run_async(main)


async def _count(pool: trio_imappool.Pool, folder: str) -> int:
    async with pool.connection() as conn:
        await conn.select_folder(folder, readonly=True)
        return len(await conn.search(["ALL"]))


# -- interrupts ------------------------------------------------------------------------------


def test_cancelling_the_awaiting_task_interrupts_the_trio_task(account: dict[str, Any]) -> None:
    # A kernel interrupt cancels the cell's asyncio task: the Trio side must follow, at once,
    # even with the connection blocked in a worker thread, and leave nothing running.
    seen: list[str] = []

    async def idle_forever(pool: trio_imappool.Pool, blocked: trio.Event) -> None:
        async with pool.connection() as conn:
            await conn.select_folder("INBOX")
            await conn.idle()
            blocked.set()
            try:
                await conn.idle_check(timeout=30)
            except trio.Cancelled:
                seen.append("cancelled")
                raise

    async def main() -> None:
        async with started() as runner:
            pool = await runner.enter(trio_imappool.open_pool(**account, max_size=1))
            blocked = await runner.run(_make_event)
            cell = asyncio.create_task(runner.run(idle_forever, pool, blocked))
            await runner.run(blocked.wait)
            await asyncio.sleep(0.2)  # the worker thread is in its blocking read
            assert runner.statistics().calls == 1
            start = time.monotonic()
            cell.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cell
            assert time.monotonic() - start < 5  # not the 30 s of the IDLE wait
            assert seen == ["cancelled"]
            assert runner.statistics().calls == 0  # the Trio task has finished
            assert await runner.run(threads_left) == 0
            stats = pool.statistics()
            assert (stats.in_use, stats.connections_discarded) == (0, 1), stats
            # The pool goes on with a new connection.
            assert await runner.run(_count, pool, "INBOX") == 5
            assert pool.statistics().connections_opened == 2

    run_async(main)


def test_a_second_cancellation_stops_waiting_for_a_shielded_task() -> None:
    finished = []

    async def shielded() -> None:
        with trio.CancelScope(shield=True):
            await trio.sleep(1)
        finished.append(True)

    async def main() -> None:
        async with started() as runner:
            cell = asyncio.create_task(runner.run(shielded))
            await asyncio.sleep(0.05)
            cell.cancel()
            await asyncio.sleep(0.05)
            assert not cell.done()  # waiting for the Trio task, which ignores the cancel
            cell.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cell
            assert finished == [] and runner.statistics().calls == 1
            await asyncio.sleep(1.2)
            assert finished == [True] and runner.statistics().calls == 0

    run_async(main)


def test_cancelling_enter_leaves_the_context_again() -> None:
    events: list[str] = []

    @contextlib.asynccontextmanager
    async def slow_to_enter() -> AsyncIterator[None]:
        try:
            await trio.sleep_forever()
            yield
        finally:
            events.append("left")

    async def main() -> None:
        async with started() as runner:
            cell = asyncio.create_task(runner.enter(slow_to_enter()))
            await asyncio.sleep(0.05)
            cell.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cell
            assert events == ["left"]
            assert runner.statistics().contexts == 0

    run_async(main)


def test_trio_leaves_the_default_sigint_handler_alone() -> None:
    # Trio takes over SIGINT when it finds Python's default handler; then Ctrl-C would end the
    # run (and every pool in it) instead of cancelling the cell.
    async def main() -> None:
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            async with started():
                assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        finally:
            signal.signal(signal.SIGINT, previous)

    run_async(main)


# -- background tasks ------------------------------------------------------------------------


def test_a_crashing_background_task_is_reported_and_the_run_goes_on(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async def crash() -> None:
        await trio.sleep(0.01)
        raise ValueError("boom")

    async def main() -> None:
        async with started() as runner:
            ticks: list[float] = []
            ticker = runner.start_soon(_tick, ticks)
            crashed = runner.start_soon(crash, name="crasher")
            await crashed.wait()
            assert isinstance(crashed.exception, ValueError)
            assert runner.errors == [crashed.exception]
            assert "background task 'crasher'" in crashed.exception.__notes__[0]
            assert repr(crashed) == "<BackgroundTask 'crasher' crashed with ValueError>"
            before = len(ticks)
            assert await runner.run(_add, 1, 1) == 2  # the run goes on...
            await asyncio.sleep(0.05)
            assert len(ticks) > before and not ticker.done  # ...and so do the other tasks
            assert runner.statistics().errors == 1

    run_async(main)
    err = capsys.readouterr().err
    assert "TrioRunner: the background task 'crasher' crashed; the Trio run goes on:" in err
    assert "ValueError: boom" in err


def test_a_crash_can_go_to_a_handler_of_ones_own() -> None:
    reports: list[tuple[str, BaseException]] = []

    async def crash() -> None:
        await trio.lowlevel.checkpoint()
        raise ValueError("boom")

    async def main() -> None:
        async with started(on_background_error=lambda what, exc: reports.append((what, exc))):
            pass

    async def main_with_crash() -> None:
        async with started(
            on_background_error=lambda what, exc: reports.append((what, exc))
        ) as runner:
            await runner.start_soon(crash, name="c").wait()

    run_async(main)
    run_async(main_with_crash)
    assert [(what, type(exc)) for what, exc in reports] == [("background task 'c'", ValueError)]


def test_trio_cancelled_never_reaches_asyncio_code() -> None:
    # A task cancelled while a child fails: the group holds Cancelled and the child's error.
    reports: list[BaseException] = []

    async def fails_when_cancelled() -> None:
        try:
            await trio.sleep_forever()
        finally:
            raise ValueError("cleanup failed")

    async def parent() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fails_when_cancelled)
            await trio.sleep_forever()

    async def main() -> None:
        async with started(on_background_error=lambda _what, exc: reports.append(exc)) as runner:
            task = runner.start_soon(parent)
            await asyncio.sleep(0.05)
            task.cancel()
            await task.wait()

    run_async(main)
    [error] = reports
    assert isinstance(error, BaseExceptionGroup)
    assert not error.subgroup(trio.Cancelled)
    assert error.subgroup(ValueError) is not None


# -- contexts and closing --------------------------------------------------------------------


def test_exit_and_close_leave_contexts_last_entered_first() -> None:
    log: list[str] = []

    @contextlib.asynccontextmanager
    async def resource(name: str, fail_on_exit: bool = False) -> AsyncIterator[str]:
        log.append(f"enter {name}")
        yield name
        await trio.sleep(0.01)
        log.append(f"exit {name}")
        if fail_on_exit:
            raise OSError(f"{name} failed to close")

    async def main() -> None:
        runner = await TrioRunner.start()
        try:
            assert await runner.enter(resource("a")) == "a"
            assert await runner.enter(resource("b", fail_on_exit=True)) == "b"
            assert await runner.enter(resource("c")) == "c"
            with pytest.raises(OSError, match="b failed to close"):
                await runner.exit("b")
            with pytest.raises(LookupError):
                await runner.exit("b")
            assert await runner.enter(resource("d", fail_on_exit=True)) == "d"
        finally:
            with pytest.raises(OSError, match="d failed to close"):
                await runner.close()
        await runner.close()  # idempotent, and it raised once

    run_async(main)
    assert log == [
        "enter a",
        "enter b",
        "enter c",
        "exit b",
        "enter d",
        "exit d",
        "exit c",
        "exit a",
    ]


def test_close_cleans_everything_up(account: dict[str, Any]) -> None:
    before = busy_threads()
    cancelled: list[str] = []

    async def forever(what: str) -> None:
        try:
            await trio.sleep_forever()
        finally:
            cancelled.append(what)

    async def main() -> None:
        runner = await TrioRunner.start()
        pool = await runner.enter(trio_imappool.open_pool(**account, max_size=2))
        assert await runner.run(_count, pool, "INBOX") == 5
        background = runner.start_soon(forever, "background")
        call = asyncio.create_task(runner.run(forever, "call"))
        await asyncio.sleep(0.05)
        await runner.close()
        assert sorted(cancelled) == ["background", "call"]
        with pytest.raises(trio.ClosedResourceError, match="was cancelled"):
            await call
        assert background.done and background.exception is None
        stats = pool.statistics()
        assert (stats.closed, stats.size, stats.connections_closed) == (True, 0, 1), stats
        assert runner.closed and str(runner.statistics()).startswith("closed calls=0")
        with pytest.raises(trio.ClosedResourceError):
            await runner.run(_add, 1, 2)
        with pytest.raises(trio.ClosedResourceError):
            runner.start_soon(forever, "too late")
        await runner.close()

    run_async(main)
    assert busy_threads() <= before
    trio.run(trio.sleep, 0)  # the guest run is over: this thread may run Trio again


def test_one_run_per_thread() -> None:
    async def main() -> None:
        async with started():
            with pytest.raises(RuntimeError, match="already active"):
                await TrioRunner.start()
        async with started():  # after closing, a new one may start
            pass

    run_async(main)
    with pytest.raises(RuntimeError, match="running asyncio loop"):
        trio.run(TrioRunner.start)


# -- in a real kernel ------------------------------------------------------------------------

_INTERRUPT_CELLS = [
    """\
import asyncio, os, signal, threading, time
import trio
from trio_imappool.notebook import TrioRunner

trio_runner = await TrioRunner.start()""",
    """\
async def forever():
    try:
        await trio.sleep_forever()
    finally:
        print("the Trio task was cancelled")

# What the kernel does on an interrupt: SIGINT to the process, while the cell awaits.
threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
start = time.monotonic()
try:
    await trio_runner.run(forever)
except asyncio.CancelledError:
    print(f"interrupted after {time.monotonic() - start:.1f} s")""",
    """\
print(await trio_runner.run(trio.sleep, 0), trio_runner)
await trio_runner.close()""",
]


@pytest.mark.usefixtures("python3_kernel")
def test_a_kernel_interrupt_cancels_the_trio_task_at_once() -> None:
    # ipykernel turns SIGINT into a cancellation of the awaiting cell, but only once its loop
    # wakes up (ipykernel#881): the runner's wakeup fd must wake it.
    nb = nbformat.v4.new_notebook()  # type: ignore[no-untyped-call]
    nb.cells = [nbformat.v4.new_code_cell(src) for src in _INTERRUPT_CELLS]  # type: ignore[no-untyped-call]
    client = nbclient.NotebookClient(nb, timeout=30, kernel_name="python3")
    client.execute()
    outputs = [
        "".join(out.get("text", "") for out in cell.outputs if out.output_type == "stream")
        for cell in nb.cells
    ]
    interrupted = outputs[1]
    assert "the Trio task was cancelled\n" in interrupted, outputs
    match = re.search(r"interrupted after ([\d.]+) s", interrupted)
    assert match is not None and float(match.group(1)) < 2.0, outputs
    assert outputs[2].startswith("None <TrioRunner running calls=0"), outputs
