"""The :class:`TrioRunner`: one Trio run, a guest on the asyncio loop, across cells."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import sys
import threading
import traceback
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import outcome
import trio

from ._parts import (
    _LAST,
    BackgroundTask,
    ErrorHandler,
    RunnerStatistics,
    State,
    T,
    Ts,
    _Call,
    _closed,
    _Held,
    _host_has_wakeup_fd,
    _name,
    _resolve,
    _settle,
    _trio_leaves_sigint_alone,
    _uncancelled,
)


class TrioRunner:
    """One Trio run, kept alive on the running asyncio loop until :meth:`close`.

    Make one with ``await TrioRunner.start()``. Its methods are called from the asyncio side
    (a notebook cell); each runs a Trio task, in a copy of the caller's :mod:`contextvars`
    context:

    ================================  ======================================================
    method                            the Trio task
    ================================  ======================================================
    ``await run(fn, *args)``          runs ``await fn(*args)``; its result or exception is
                                      the caller's
    ``await enter(cm)``               enters an async context manager and holds it open, so
                                      ``open_pool(...)``'s pool outlives the cell
    ``await exit(value)``             leaves the context that gave *value*
    ``start_soon(fn, *args)``         runs ``await fn(*args)`` in the background; a crash is
                                      reported, not raised, and the run goes on
    ``await close()``                 cancels background tasks and unfinished calls, exits the
                                      contexts in reverse order, ends the run
    ================================  ======================================================

    Call them from the thread of the asyncio loop the runner was started on (the kernel's
    main thread). See the module documentation for interrupts, output and the limits.

    Attributes:
        errors: Exceptions of background tasks that crashed and of held contexts that ended on
            their own with an error, oldest first. Each has a note naming the task.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, on_background_error: ErrorHandler | None
    ) -> None:
        # Private: use ``await TrioRunner.start()``.
        self._loop = loop
        self._thread = threading.current_thread()
        self._on_background_error = on_background_error
        self._state: State = "running"
        self._token: trio.lowlevel.TrioToken | None = None
        self._workers: trio.Nursery | None = None
        self._holders: trio.Nursery | None = None
        self._accepting = False
        self._root = trio.CancelScope()
        self._close_requested = trio.Event()
        # True once the run takes work; False if it ended before.
        self._started: asyncio.Future[bool] = loop.create_future()
        self._done: asyncio.Future[outcome.Outcome[None]] = loop.create_future()
        self._calls: dict[_Call[Any], None] = {}
        self._tasks: dict[BackgroundTask, None] = {}
        self._held: list[_Held] = []
        self._close_errors: list[BaseException] = []
        self.errors: list[BaseException] = []

    # -- starting ----------------------------------------------------------------------------

    @classmethod
    async def start(cls, *, on_background_error: ErrorHandler | None = None) -> TrioRunner:
        """Start a Trio run as a guest of the running asyncio loop, and return its runner.

        ::

            trio_runner = await TrioRunner.start()

        Args:
            on_background_error: Called as ``fn(what, exception)`` when a background task or a
                held context crashes, in the Trio run (so it must not block); *what* names the
                task (``"background task 'sample'"``). The default prints the traceback to
                ``sys.stderr``. Either way the exception is kept in :attr:`errors`.

        Returns:
            The runner, ready: its Trio run is going.

        Raises:
            RuntimeError: No asyncio loop is running (under ``%autoawait trio``, say), or a
                Trio run is already active in this thread (another runner, or a cell's
                ``trio.run``).

        **Cancellation**: cancelling the wait for the start ends the new run before
        re-raising.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "TrioRunner.start() must be awaited on a running asyncio loop (in Jupyter: "
                "with IPython's default '%autoawait asyncio', not '%autoawait trio')"
            ) from None
        if trio.lowlevel.in_trio_run():
            raise RuntimeError(
                "a Trio run is already active in this thread (another TrioRunner that is not "
                "closed, or %autoawait trio): Trio allows one run per thread"
            )
        runner = cls(loop, on_background_error)
        with _trio_leaves_sigint_alone():
            trio.lowlevel.start_guest_run(
                runner._main,
                run_sync_soon_threadsafe=loop.call_soon_threadsafe,
                run_sync_soon_not_threadsafe=loop.call_soon,
                done_callback=runner._run_finished,
                host_uses_signal_set_wakeup_fd=_host_has_wakeup_fd(),
            )
            # Usable as soon as start_guest_run returns (the run is set up, not yet running).
            runner._token = trio.lowlevel.current_trio_token()
        try:
            started = await asyncio.shield(runner._started)
        except asyncio.CancelledError:
            runner._state = "closing"
            runner._cancel_soon(runner._root)
            await _settle(runner._done)
            raise
        if not started:
            await runner.close()  # raises what ended the run
            raise RuntimeError("the Trio run ended as it started")
        return runner

    async def _main(self) -> None:
        with self._root:
            async with trio.open_nursery() as holders:
                self._holders = holders
                async with trio.open_nursery() as workers:
                    self._workers = workers
                    self._accepting = True
                    _resolve(self._started, True)
                    await self._close_requested.wait()
                    self._accepting = False
                    workers.cancel_scope.cancel()
                # Calls and background tasks have finished; they may have used the contexts.
                for held in list(self._held):
                    if not held.entered:
                        held.scope.cancel()
                for held in reversed(list(self._held)):
                    held.exit_requested.set()
                    await held.trio_finished.wait()

    def _run_finished(self, run_outcome: outcome.Outcome[None]) -> None:
        # Trio's done_callback: the run is over. Fail what is still waiting (nothing, unless
        # the run itself crashed: a bug, reported at once in case nobody calls close()).
        if isinstance(run_outcome, outcome.Error) and self._state == "running":
            print("TrioRunner: the Trio run crashed:", file=sys.stderr)
            traceback.print_exception(run_outcome.error, file=sys.stderr)
        self._state = "closed"
        self._accepting = False
        closed = outcome.Error(trio.ClosedResourceError("the TrioRunner's Trio run ended"))
        _resolve(self._started, False)
        for call in self._calls:
            _resolve(call.future, closed)
        for held in self._held:
            _resolve(held.entering, closed)
            _resolve(held.finished, closed)
        for task in self._tasks:
            _resolve(task._finished, None)
        self._calls.clear()
        self._held.clear()
        self._tasks.clear()
        _resolve(self._done, run_outcome)

    # -- reporting ---------------------------------------------------------------------------

    def statistics(self) -> RunnerStatistics:
        """A snapshot of the runner's state and counts (see :class:`RunnerStatistics`)."""
        return RunnerStatistics(
            state=self._state,
            calls=len(self._calls),
            background_tasks=len(self._tasks),
            contexts=len(self._held),
            errors=len(self.errors),
        )

    def __repr__(self) -> str:
        return f"<TrioRunner {self.statistics()}>"

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called (the run may still be ending)."""
        return self._state != "running"

    # -- plumbing ----------------------------------------------------------------------------

    def _check_caller(self, *, in_loop: bool = True) -> None:
        if threading.current_thread() is not self._thread:
            raise RuntimeError("use a TrioRunner from the thread of its asyncio loop")
        if in_loop and asyncio.get_running_loop() is not self._loop:
            raise RuntimeError("use a TrioRunner from the asyncio loop it was started on")
        if self._state != "running" or self._done.done():
            raise trio.ClosedResourceError("this TrioRunner is closed")

    def _call_soon(self, fn: Callable[[], object]) -> bool:
        """Run ``fn()`` in the Trio run soon; False if the run has finished."""
        if self._token is None or self._done.done():
            return False
        try:
            self._token.run_sync_soon(fn)
        except trio.RunFinishedError:
            return False
        return True

    def _cancel_soon(self, scope: trio.CancelScope) -> None:
        self._call_soon(scope.cancel)

    def _spawn(
        self,
        nursery: Callable[[], trio.Nursery | None],
        context: contextvars.Context,
        fn: Callable[[Any], Awaitable[object]],
        arg: Any,
        name: str,
        refused: Callable[[], object],
    ) -> None:
        """Start ``fn(arg)`` in a nursery of the run, in *context*; or call ``refused()``."""

        def spawn() -> None:
            target = nursery()
            if not self._accepting or target is None:
                refused()
                return
            try:
                context.run(lambda: target.start_soon(fn, arg, name=name))
            except RuntimeError:  # the nursery no longer takes new tasks
                refused()

        if not self._call_soon(spawn):
            refused()

    async def _wait(
        self,
        result: asyncio.Future[outcome.Outcome[T]],
        scope: trio.CancelScope,
        settled: asyncio.Future[Any],
    ) -> outcome.Outcome[T]:
        """Await *result*; on cancellation, cancel *scope*, wait for *settled*, re-raise."""
        try:
            return await asyncio.shield(result)
        except asyncio.CancelledError:
            self._cancel_soon(scope)
            await _settle(settled)
            raise

    # -- run ---------------------------------------------------------------------------------

    async def run(self, fn: Callable[[*Ts], Awaitable[T]], *args: *Ts) -> T:
        """Run ``await fn(*args)`` in the Trio run, and return its result.

        ::

            uids = await trio_runner.run(search_unseen, pool, "INBOX")
            await trio_runner.run(trio.sleep, 1)

        Args:
            fn: A Trio async function (it may use the pool, open nurseries, sleep, ...).
            args: Positional arguments for *fn* (use :func:`functools.partial` for keywords).

        Returns:
            What *fn* returns.

        Raises:
            Whatever *fn* raises, as it raised it.
            trio.ClosedResourceError: The runner is closed, or closes while *fn* runs.

        **Cancellation**: cancelling the awaiting asyncio task (a kernel interrupt) cancels
        *fn*'s Trio task, waits until it has finished, then raises
        :exc:`asyncio.CancelledError`. A second cancellation stops the waiting, not the task.
        """
        self._check_caller()
        call: _Call[T] = _Call(fn, args, self._loop.create_future())
        self._calls[call] = None

        def refused() -> None:
            self._calls.pop(call, None)
            _resolve(call.future, _closed(f"{call.name} was not started"))

        self._spawn(
            lambda: self._workers,
            contextvars.copy_context(),
            self._run_call,
            call,
            call.name,
            refused,
        )
        result = await self._wait(call.future, call.scope, call.future)
        return result.unwrap()

    async def _run_call(self, call: _Call[T]) -> None:
        try:
            with call.scope:
                result = _uncancelled(await outcome.acapture(call.fn, *call.args))
            if result is None:
                # Cancelled by the caller (who no longer listens) or by close().
                result = _closed(f"{call.name} was cancelled")
            _resolve(call.future, result)
        finally:
            self._calls.pop(call, None)

    # -- background tasks --------------------------------------------------------------------

    def start_soon(
        self, fn: Callable[[*Ts], Awaitable[object]], *args: *Ts, name: str | None = None
    ) -> BackgroundTask:
        """Start ``await fn(*args)`` as a background task of the Trio run, and return at once.

        The task keeps running between cells, until it returns, is cancelled
        (:meth:`BackgroundTask.cancel`) or the runner closes. If it raises, the exception is
        reported (printed to ``sys.stderr``, or given to ``on_background_error``) and kept in
        :attr:`errors`; the run, the other tasks and the held contexts go on. Its ``print()``
        output goes to the cell that started it.

        Args:
            fn: A Trio async function.
            args: Positional arguments for *fn*.
            name: The task's name, for reports; default: *fn*'s name.

        Returns:
            A :class:`BackgroundTask`, to cancel it or wait for it.

        Raises:
            trio.ClosedResourceError: The runner is closed.
        """
        self._check_caller(in_loop=False)
        task = BackgroundTask(self._cancel_soon, name or _name(fn), self._loop.create_future())
        self._tasks[task] = None

        async def body() -> object:
            return await fn(*args)

        def refused() -> None:
            self._tasks.pop(task, None)
            _resolve(task._finished, None)

        self._spawn(
            lambda: self._workers,
            contextvars.copy_context(),
            self._run_background,
            (task, body),
            task.name,
            refused,
        )
        return task

    async def _run_background(
        self, item: tuple[BackgroundTask, Callable[[], Awaitable[object]]]
    ) -> None:
        task, body = item
        try:
            with task._scope:
                result = _uncancelled(await outcome.acapture(body))
            if isinstance(result, outcome.Error):
                task._exception = result.error
                self._report(f"background task {task.name!r}", result.error)
        finally:
            self._tasks.pop(task, None)
            _resolve(task._finished, None)

    def _report(self, what: str, exc: BaseException) -> None:
        """Report a crash without ending the run (called in the crashed task's context)."""
        exc.add_note(f"(in the {what} of a TrioRunner; the Trio run goes on)")
        self.errors.append(exc)
        handler = self._on_background_error
        if handler is not None:
            try:
                handler(what, exc)
            except Exception as handler_error:
                print(f"TrioRunner: on_background_error raised {handler_error!r}", file=sys.stderr)
            else:
                return
        print(f"TrioRunner: the {what} crashed; the Trio run goes on:", file=sys.stderr)
        traceback.print_exception(exc, file=sys.stderr)

    # -- contexts ----------------------------------------------------------------------------

    async def enter(self, cm: AbstractAsyncContextManager[T]) -> T:
        """Enter an async context manager in the Trio run, and keep it open across cells.

        ::

            pool = await trio_runner.enter(trio_imappool.open_pool(**settings))
            ...  # later cells use the pool
            await trio_runner.exit(pool)  # or leave it to close()

        A Trio task of its own enters *cm* and holds it open until :meth:`exit` or
        :meth:`close` (which exits contexts in reverse order of entering). If the context ends
        on its own with an error while held (a nursery whose child crashed, say), the error is
        reported like a background task's crash.

        Args:
            cm: An async context manager, such as ``open_pool(...)`` or
                ``open_fault_proxy(...)``.

        Returns:
            What entering *cm* gave (``async with cm as value``).

        Raises:
            Whatever entering *cm* raises.
            trio.ClosedResourceError: The runner is closed, or closes while entering.

        **Cancellation**: cancelling the awaiting asyncio task cancels the entering, waits
        until the context is left again, then raises :exc:`asyncio.CancelledError`.
        """
        self._check_caller()
        held = _Held(cm, self._loop)
        self._held.append(held)

        def refused() -> None:
            self._forget(held)
            _resolve(held.entering, _closed(f"{held.name} was not entered"))
            _resolve(held.finished, outcome.Value(None))
            held.trio_finished.set()

        self._spawn(
            lambda: self._holders,
            contextvars.copy_context(),
            self._hold,
            held,
            f"enter {held.name}",
            refused,
        )
        result = await self._wait(held.entering, held.scope, held.finished)
        value: T = result.unwrap()
        return value

    def _forget(self, held: _Held) -> None:
        with contextlib.suppress(ValueError):
            self._held.remove(held)

    async def _hold(self, held: _Held) -> None:
        async def body() -> None:
            with held.scope:
                async with held.cm as value:
                    held.entered = True
                    held.value = value
                    _resolve(held.entering, outcome.Value(value))
                    await held.exit_requested.wait()

        try:
            result: outcome.Outcome[Any] | None = _uncancelled(await outcome.acapture(body))
            if not held.entered:
                # Entering failed, or was cancelled (by the caller, or by close()); after a
                # cancellation of held.scope, the scope caught it and body() returned.
                if result is None or isinstance(result, outcome.Value):
                    result = _closed(f"entering {held.name} was cancelled")
                _resolve(held.entering, result)
                result = outcome.Value(None)
            elif result is None:
                # Cancelled while held or leaving, by exit()'s caller or a cancelled close().
                result = outcome.Value(None)
            elif isinstance(result, outcome.Error) and not held.exit_requested.is_set():
                self._report(f"context {held.name}", result.error)  # it ended on its own
                result = outcome.Value(None)
            elif isinstance(result, outcome.Error) and not held.exit_asked:
                self._close_errors.append(result.error)  # left by close(), which raises it
                result = outcome.Value(None)
            _resolve(held.finished, result)
        finally:
            self._forget(held)
            held.trio_finished.set()

    async def exit(self, value: object = _LAST) -> None:
        """Leave a context entered with :meth:`enter`, and wait until it is left.

        ::

            await trio_runner.exit(pool)  # closes the pool

        Args:
            value: What :meth:`enter` returned for the context to leave; without it, the
                context entered last that is still held.

        Raises:
            LookupError: No such context is held (never entered, already left, or it ended on
                its own: see :attr:`errors`).
            Whatever leaving the context raises.
            trio.ClosedResourceError: The runner is closed.

        **Cancellation**: cancelling the awaiting asyncio task cancels the leaving (a pool
        still closes: its closing is shielded), waits until it is over, then raises
        :exc:`asyncio.CancelledError`.
        """
        self._check_caller()
        candidates = [
            held
            for held in self._held
            if held.entered and not held.exit_asked and (value is _LAST or held.value is value)
        ]
        if not candidates:
            what = "no context" if value is _LAST else f"no context that gave {value!r}"
            raise LookupError(f"{what} is held by this TrioRunner")
        held = candidates[-1]
        held.exit_asked = True
        if not self._call_soon(held.exit_requested.set):
            raise trio.ClosedResourceError("this TrioRunner is closed")
        result = await self._wait(held.finished, held.scope, held.finished)
        result.unwrap()

    # -- closing -----------------------------------------------------------------------------

    async def close(self) -> None:
        """End the Trio run: cancel tasks, leave the held contexts, wait for the run to end.

        In order: background tasks and unfinished :meth:`run` calls are cancelled (the calls'
        callers get :exc:`trio.ClosedResourceError`) and waited for; contexts still being
        entered are cancelled; held contexts are left one at a time, the last entered first
        (a pool logs its connections out); then the run ends. Idempotent.

        Raises:
            Exception: Leaving a context failed: that exception, or an :exc:`ExceptionGroup`
                of them when several failed. Everything is closed regardless.

        **Cancellation**: cancelling the awaiting asyncio task cancels everything still
        running in the Trio run (a pool still closes: its closing is shielded), waits for the
        run to end, then raises :exc:`asyncio.CancelledError`.
        """
        if threading.current_thread() is not self._thread:
            raise RuntimeError("use a TrioRunner from the thread of its asyncio loop")
        if self._state == "running":
            self._state = "closing"
            self._call_soon(self._close_requested.set)
        try:
            run_outcome = await asyncio.shield(self._done)
        except asyncio.CancelledError:
            self._cancel_soon(self._root)
            await _settle(self._done)
            raise
        self._state = "closed"
        errors, self._close_errors = self._close_errors, []
        if isinstance(run_outcome, outcome.Error) and run_outcome.error not in errors:
            errors.append(run_outcome.error)
        if len(errors) == 1:
            raise errors[0]
        if errors:
            raise BaseExceptionGroup("errors while closing the TrioRunner", errors)
