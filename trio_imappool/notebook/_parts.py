"""The notebook helper's small parts: statistics, background tasks, calls and held contexts,
and the signal and outcome helpers :class:`~trio_imappool.notebook.TrioRunner` builds on."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from typing import Any, Final, Generic, Literal, TypeVar, TypeVarTuple

import outcome
import trio

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

    def __init__(
        self,
        cancel_soon: Callable[[trio.CancelScope], None],
        name: str,
        finished: asyncio.Future[None],
    ) -> None:
        self.name: Final = name
        self._cancel_soon = cancel_soon  # the runner's: cancels in the Trio run
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
            self._cancel_soon(self._scope)

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


def _closed(why: str) -> outcome.Error:
    return outcome.Error(trio.ClosedResourceError(f"the TrioRunner is closed: {why}"))


async def _settle(future: asyncio.Future[Any]) -> None:
    """Wait for *future* to finish, unless cancelled again (then stop waiting, quietly)."""
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait([future])
