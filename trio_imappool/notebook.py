"""One Trio run that lives across Jupyter cells: Trio in guest mode on the kernel's asyncio loop.

A pool lives inside one Trio run: its connections and background work belong to a nursery that
must be exited in the run that opened it. Jupyter's ``%autoawait trio`` runs every cell as a
``trio.run`` of its own, so a pool opened in one cell is closed when that cell ends. This module
keeps a single Trio run going for as long as you want, as a *guest* on the asyncio event loop the
kernel already runs (:func:`trio.lowlevel.start_guest_run`), and lets each cell hand work to it::

    # IPython's default autoawait (asyncio) lets a cell await at the top level.
    import trio_imappool
    from trio_imappool.notebook import TrioRunner

    trio_runner = await TrioRunner.start()  # cell 1: the Trio run starts

    pool = await trio_runner.enter(trio_imappool.open_pool(**settings))  # cell 2: stays open


    async def unseen(pool, folder):  # cell 3: a Trio function, run in the Trio run
        async with pool.connection() as conn:
            await conn.select_folder(folder, readonly=True)
            return await conn.search(["UNSEEN"])


    print(await trio_runner.run(unseen, pool, "INBOX"))

    sampler = trio_runner.start_soon(sample_forever, pool)  # keeps running between cells
    ...
    await trio_runner.close()  # last cell: cancel tasks, close the pool, end the run

Nothing here depends on IPython: any running asyncio loop will do (the tests use
:func:`asyncio.run`).

**What is taken care of.**

- *Interrupts.* Interrupting the kernel while a cell awaits :meth:`TrioRunner.run`,
  :meth:`~TrioRunner.enter` or :meth:`~TrioRunner.exit` cancels the cell's asyncio task
  (ipykernel turns SIGINT into :exc:`asyncio.CancelledError` for async cells). The runner
  forwards it: it cancels the Trio task's cancel scope, waits until the Trio task has finished
  (so nothing is left running behind your back: a pool connection busy in a command is
  interrupted and discarded, as for any Trio cancellation), then re-raises the
  :exc:`~asyncio.CancelledError`. Interrupt a second time to stop waiting for a Trio task that
  ignores cancellation (a shielded one); it then finishes on its own. Trio does not install its
  own Ctrl-C handler in this run: Ctrl-C belongs to the kernel.
- *Output.* Each Trio task runs in a copy of the calling cell's :mod:`contextvars` context,
  where ipykernel keeps the cell's identity, so ``print()`` in a task lands in the cell that
  called :meth:`~TrioRunner.run` or :meth:`~TrioRunner.start_soon` (for a background task: the
  cell that started it, even after that cell has finished).
- *Crashes of background tasks.* An exception in a task started with
  :meth:`~TrioRunner.start_soon` does not end the run: it is printed to ``sys.stderr`` (or
  given to ``on_background_error``), kept in :attr:`TrioRunner.errors`, and the run goes on.
  An exception raised by a function given to :meth:`~TrioRunner.run` is raised in the cell.

**Limits.**

- *A blocking cell freezes Trio.* The Trio run makes progress only while the kernel's asyncio
  loop runs, that is between cells and while a cell awaits. A cell that blocks (``time.sleep``,
  a blocking network call, a long computation) stops every Trio task for that long: background
  tasks do not tick, deadlines fire late, pooled connections wait. Await instead
  (``await asyncio.sleep(1)``, ``await trio_runner.run(trio.sleep, 1)``), or run the blocking
  work in a thread (``await asyncio.to_thread(fn)``).
- *No other Trio run in the kernel's thread.* While a runner is alive, ``trio.run()`` in a cell,
  ``%autoawait trio`` and a second :class:`TrioRunner` fail with Trio's
  ``RuntimeError("Attempted to call run() from inside a run()")``: Trio allows one run per
  thread. Do Trio work through :meth:`~TrioRunner.run`, or close the runner first. Conversely,
  :meth:`TrioRunner.start` needs IPython's default ``%autoawait asyncio``: under
  ``%autoawait trio`` there is no asyncio loop to be a guest of.
- *Trio objects belong to the run.* Create Trio objects (events, channels, cancel scopes, pools)
  and call Trio functions inside functions given to :meth:`~TrioRunner.run`, not directly in a
  cell. Reading plain attributes (``pool.statistics()``, ``pool.counts.value``) from a cell is
  fine: the cell and the Trio run share one thread and never run at the same moment.
- *Close before you stop.* Await :meth:`TrioRunner.close` before restarting or shutting down the
  kernel, so contexts exit cleanly (a pool logs out). If the kernel dies first, the operating
  system closes the sockets; the server sees dropped connections.
- *Signals.* If the asyncio loop has no signal wakeup fd of its own (ipykernel's has none),
  Trio installs its own for the life of the run, which also makes kernel interrupts of any
  awaiting cell take effect at once instead of when the loop next wakes (ipykernel#881). A
  signal handler added with :meth:`asyncio.loop.add_signal_handler` while the runner is alive
  replaces it, and closing the runner then removes asyncio's. If the loop has one already,
  Trio leaves it alone (``host_uses_signal_set_wakeup_fd=True``).

(The other way round is ipykernel's own ``--trio-loop`` option, in a kernelspec of your own:
the whole kernel then runs inside one Trio run, with ``%autoawait trio`` fixed, so asyncio code
cannot be awaited in its cells.)
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import signal
import sys
import threading
import traceback
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from typing import Any, Final, Generic, Literal, TypeVar, TypeVarTuple

import outcome
import trio

__all__ = ["BackgroundTask", "RunnerStatistics", "TrioRunner"]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

State = Literal["running", "closing", "closed"]
"""The life of a :class:`TrioRunner`: ``running`` until :meth:`~TrioRunner.close` is called,
``closing`` while it waits for the run to end, then ``closed``."""

ErrorHandler = Callable[[str, BaseException], object]
"""Called as ``fn(what, exception)`` when a background task or a held context crashes; *what*
names it (``"background task 'sample'"``)."""

#: ``exit()`` without an argument: the context entered last.
_LAST: Final[Any] = object()


@dataclasses.dataclass(frozen=True, slots=True)
class RunnerStatistics:
    """A snapshot of a runner, returned by :meth:`TrioRunner.statistics`.

    ====================  ================================================================
    field                 meaning
    ====================  ================================================================
    ``state``             ``"running"``, ``"closing"`` or ``"closed"``
    ``calls``             :meth:`~TrioRunner.run` calls whose Trio task has not finished
    ``background_tasks``  tasks from :meth:`~TrioRunner.start_soon` still running
    ``contexts``          contexts from :meth:`~TrioRunner.enter` being entered or held open
    ``errors``            background tasks and held contexts that crashed
                          (:attr:`TrioRunner.errors`)
    ====================  ================================================================
    """

    state: State
    calls: int
    background_tasks: int
    contexts: int
    errors: int

    def __str__(self) -> str:
        return (
            f"{self.state} calls={self.calls} background_tasks={self.background_tasks} "
            f"contexts={self.contexts} errors={self.errors}"
        )


def _uncancelled(result: outcome.Outcome[T]) -> outcome.Outcome[T] | None:
    """*result* without :exc:`trio.Cancelled` in it; ``None`` if that was all it held.

    A Cancelled belongs to the Trio run and must not reach asyncio code; in an exception group
    with other errors, the others are kept.
    """
    if not isinstance(result, outcome.Error):
        return result
    error = result.error
    if isinstance(error, trio.Cancelled):
        return None
    if isinstance(error, BaseExceptionGroup):
        _cancelled, rest = error.split(trio.Cancelled)
        if rest is None:
            return None
        if rest is not error:
            return outcome.Error(rest)
    return result


def _resolve(future: asyncio.Future[T], value: T) -> None:
    if not future.done():
        future.set_result(value)


def _name(fn: object) -> str:
    return str(getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn))


def _forward_sigint(signum: int, frame: Any) -> None:
    signal.default_int_handler(signum, frame)


@contextlib.contextmanager
def _trio_leaves_sigint_alone() -> Iterator[None]:
    """Keep Trio from installing its Ctrl-C handler while the guest run is set up.

    Trio takes over SIGINT when it finds Python's default handler, and would then raise
    :exc:`KeyboardInterrupt` inside the Trio run, ending it (and every pool in it). In a kernel,
    Ctrl-C belongs to the awaiting cell. An equivalent handler in place of the default one
    while the run starts makes Trio leave SIGINT alone; the default one is put back after.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    signal.signal(signal.SIGINT, _forward_sigint)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGINT) is _forward_sigint:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def _host_has_wakeup_fd() -> bool:
    """Whether the host loop already receives signals through :func:`signal.set_wakeup_fd`.

    If it does, Trio must leave the wakeup fd alone. If not (the case of ipykernel's loop and
    of :func:`asyncio.run`), Trio installs its own, and that matters: a kernel interrupt is
    then delivered at once, because the signal wakes Trio's I/O thread, which wakes the
    asyncio loop, which runs the kernel's SIGINT handler. Without a wakeup fd, a SIGINT that
    lands in another thread waits until the loop wakes for another reason (ipykernel#881).
    """
    if threading.current_thread() is not threading.main_thread():
        return True  # only the main thread has a wakeup fd; Trio would not touch it anyway
    current = signal.set_wakeup_fd(-1)
    if current != -1:
        signal.set_wakeup_fd(current)
    return current != -1


class BackgroundTask:
    """A Trio task started by :meth:`TrioRunner.start_soon`; it runs between cells.

    Attributes:
        name: The task's name (its function's, unless given).
    """

    def __init__(self, runner: TrioRunner, name: str, finished: asyncio.Future[None]) -> None:
        self.name: Final = name
        self._runner = runner
        self._scope = trio.CancelScope()
        self._finished = finished
        self._exception: BaseException | None = None

    def __repr__(self) -> str:
        if not self.done:
            state = "running"
        elif self._exception is not None:
            state = f"crashed with {type(self._exception).__name__}"
        else:
            state = "finished"
        return f"<BackgroundTask {self.name!r} {state}>"

    @property
    def done(self) -> bool:
        """Whether the task has finished (returned, crashed or been cancelled)."""
        return self._finished.done()

    @property
    def exception(self) -> BaseException | None:
        """The exception the task crashed with, or ``None``."""
        return self._exception

    def cancel(self) -> None:
        """Cancel the task; it finishes at its next checkpoint. Does nothing once it finished.

        Does not wait: await :meth:`wait` for that.
        """
        if not self.done:
            self._runner._cancel_soon(self._scope)

    async def wait(self) -> None:
        """Wait (in asyncio) until the task has finished. Does not raise the task's exception.

        **Cancellation**: cancelling the wait (a kernel interrupt) leaves the task running.
        """
        await asyncio.shield(self._finished)


class _Call(Generic[T]):
    """One :meth:`TrioRunner.run` call."""

    def __init__(
        self,
        fn: Callable[..., Awaitable[T]],
        args: tuple[Any, ...],
        future: asyncio.Future[outcome.Outcome[T]],
    ) -> None:
        self.fn = fn
        self.args = args
        self.name = _name(fn)
        self.future = future
        self.scope = trio.CancelScope()


class _Held:
    """One context entered by :meth:`TrioRunner.enter`, and the task that holds it open."""

    def __init__(
        self, cm: AbstractAsyncContextManager[Any], loop: asyncio.AbstractEventLoop
    ) -> None:
        self.cm = cm
        self.name = repr(cm)
        self.scope = trio.CancelScope()
        self.entered = False
        self.value: Any = None
        self.exit_asked = False
        self.exit_requested = trio.Event()
        # What entering gave (the value, or why not), for enter(); then the outcome of
        # leaving, for exit(), once the holding task is over.
        self.entering: asyncio.Future[outcome.Outcome[Any]] = loop.create_future()
        self.finished: asyncio.Future[outcome.Outcome[None]] = loop.create_future()
        self.trio_finished = trio.Event()


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
        task = BackgroundTask(self, name or _name(fn), self._loop.create_future())
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


def _closed(why: str) -> outcome.Error:
    return outcome.Error(trio.ClosedResourceError(f"the TrioRunner is closed: {why}"))


async def _settle(future: asyncio.Future[Any]) -> None:
    """Wait for *future* to finish, unless cancelled again (then stop waiting, quietly)."""
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait([future])
