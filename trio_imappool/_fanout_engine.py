"""The fan-out's engine: tasks that check connections out and run the planned work.

:class:`FanOut` runs up to ``workers`` tasks in a nursery. Each takes work from the
:class:`~trio_imappool._fanout_plan.FanOutPlan` (which decides), checks a connection out of the
pool, selects the folder if need be, runs the command, tells the plan what came back, and goes
on while the next work is of the same folder and nobody waits for a connection. The first
exception stops everything: it becomes one :class:`FanOutError` and the other tasks are
cancelled.

It uses only the pool's small public surface (:class:`~trio_imappool._surface.PoolSurface`).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, NoReturn, Protocol, TypeAlias

import trio
from imapclient import IMAPClient
from trio_util import AsyncValue

from ._client import PipelinedFetch, TrackingClient
from ._errors import PoolError
from ._fanout_plan import ALL_UIDS, Criteria, FanOutPlan, Mode, Search, Work
from ._fanout_progress import Progress, ProgressCounter
from ._util import uid_set

if TYPE_CHECKING:
    from ._connection import Connection
    from ._surface import PoolSurface

__all__ = ["DEFAULT_BATCH_SIZE", "Cursor", "Delivery", "FanOut", "FanOutError", "Tracker"]

#: UIDs per command unless the caller says otherwise.
DEFAULT_BATCH_SIZE: Final = 200

# Batches a fetch worker sends at once: the second one's round trip overlaps the first's.
PIPELINE_DEPTH: Final = 2

_SHOWN_UID_CHARS: Final = 60


class FanOutError(PoolError):
    """One batch of a fan-out operation failed; the rest of the operation was cancelled.

    The original exception (imapclient's, or the pool's own such as
    :class:`~trio_imappool.PoolTimeout`) is ``__cause__``; the message names the folder and the
    UIDs.

    Attributes:
        folder: The folder of the failed batch.
        uids: The UIDs of the failed batch, ascending; empty when the search for the folder's
            messages failed.
        operation: ``"SEARCH"``, ``"FETCH"``, ``"STORE"``, ``"COPY"`` or ``"MOVE"``.
    """

    def __init__(self, message: str, *, folder: str, uids: Sequence[int], operation: str) -> None:
        super().__init__(message)
        self.folder = folder
        self.uids: tuple[int, ...] = tuple(uids)
        self.operation = operation


class Tracker(ProgressCounter):
    """Counts progress and publishes it as an :class:`~trio_util.AsyncValue`. Synchronous."""

    def __init__(self, folders: int) -> None:
        self.value: Final = AsyncValue(Progress(None, 0, 0, None, 0, folders, 0))
        super().__init__(folders)

    def _publish(self) -> None:
        self.value.value = self.snapshot()


@dataclasses.dataclass(slots=True, eq=False)
class Delivery:
    """A fetched batch on its way to the caller."""

    folder: str
    messages: collections.deque[tuple[int, dict[bytes, Any]]]
    skipped: int
    #: What the batch's EXAMINE said (only where the batch had one).
    examined: dict[bytes, Any] | None = None
    #: The bytes of the messages left in it, as a memory budget counts them (-1: not counted).
    nbytes: int = -1


class Cursor:
    """What a worker task is working on, and at which step, for the error message."""

    __slots__ = ("step", "work")

    def __init__(self, work: Work) -> None:
        self.work = work
        self.step = "checkout"


# Runs one batch on a connection that has the batch's folder selected; a delivery for the
# caller (fetch) or None (the other operations). The flag says that the folder was selected
# before this batch's turn (by another checkout, or for an earlier batch): the session may not
# have seen other sessions' changes yet.
RunBatch: TypeAlias = Callable[["Connection", Work, bool], Awaitable[Delivery | None]]

# Runs batches in one round trip, selecting their folders as needed (fetch): per batch its
# delivery, or the failed step (a NO or BAD answer). Sets the cursor to the batch whose answer
# was being read when an exception is raised.
RunPipelined: TypeAlias = Callable[
    ["Connection", list[Work], Cursor], Awaitable[list[Delivery | PipelinedFetch]]
]

# Asks the sizes of the works' UIDs in one round trip (a fetch with a memory budget): per
# work, UID -> RFC822.SIZE, or the failed step. Sets the cursor as RunPipelined does.
RunSizes: TypeAlias = Callable[
    ["Connection", list[Work], Cursor], Awaitable[list[dict[int, int] | PipelinedFetch]]
]


class Memory(Protocol):
    """Where a fetch's batches reserve the bytes they are planned to take (see
    :mod:`trio_imappool._fanout_memory`)."""

    async def reserve(self, work: Work) -> None: ...
    def reserve_nowait(self, work: Work) -> bool: ...


# Searches a folder and fetches the matches among its first UIDs in one round trip (fetch):
# every UID found and the first batch's delivery, or None where the server cannot.
RunSearchFetch: TypeAlias = Callable[
    ["Connection", Work, range, Cursor], Awaitable[tuple[list[int], Delivery] | None]
]


class FanOut:
    """Runs the work of one fan-out operation on up to *workers* pooled connections.

    The decisions (which batch next, when to stop) are the plan's; the workers do the I/O.
    :meth:`run` never raises a batch's error: it records the first one in :attr:`error` and
    cancels the other workers.
    """

    def __init__(
        self,
        pool: PoolSurface,
        plan: Mapping[str, Sequence[int] | Search],
        *,
        operation: str,
        mode: Mode,
        batch_size: int,
        workers: int,
        run_batch: RunBatch | None,
        run_pipelined: RunPipelined | None = None,
        send: trio.MemorySendChannel[Delivery] | None = None,
        charset: str | None = None,
        run_search_fetch: RunSearchFetch | None = None,
        batch_bytes: int | None = None,
        run_sizes: RunSizes | None = None,
        memory: Memory | None = None,
    ) -> None:
        self._pool = pool
        self._run_sizes = run_sizes
        self._memory = memory
        self._run_search_fetch = run_search_fetch
        self._run_pipelined = run_pipelined
        self.operation = operation
        self._mode = mode
        self._batch_size = batch_size
        self._workers = workers
        self._run_batch = run_batch
        self._send = send
        self._charset = charset
        self.tracker: Final = Tracker(len(plan))
        self.plan: Final = FanOutPlan(
            plan,
            batch_size=batch_size,
            mode=mode,
            batches=run_batch is not None or run_pipelined is not None,
            probe_all=run_pipelined is not None,
            progress=self.tracker,
            batch_bytes=batch_bytes,
        )
        self.error: FanOutError | None = None
        self._error_reported = False
        self._cancel_scope = trio.CancelScope()
        self._changed = trio.Event()

    @property
    def found(self) -> dict[str, list[int]]:
        """Folder -> the UIDs its search found."""
        return self.plan.found

    def _wake(self) -> None:
        """More work may have appeared: wake the workers that wait for some."""
        self._changed.set()
        self._changed = trio.Event()

    def _fail(self, cursor: Cursor, exc: Exception) -> None:
        work = cursor.work
        if self.error is None:
            uids = () if work.uids is ALL_UIDS else work.uids
            if work.search is not None:
                what = f"search for {work.search.criteria!r}"
            elif work.uids is ALL_UIDS:
                what = "the sizes of every message"
            else:
                shown = uid_set(work.uids, max_chars=_SHOWN_UID_CHARS)
                what = f"UIDs {shown} ({len(work.uids)} messages)"
            operation = "SEARCH" if work.search is not None else self.operation
            step = {"checkout": " checking out a connection", "select": " selecting it"}
            error = FanOutError(
                f"{self._pool.config.name}: {operation} of {what} in folder {work.folder!r} "
                f"failed{step.get(cursor.step, '')}: {type(exc).__qualname__}: {exc}",
                folder=work.folder,
                uids=uids,
                operation=operation,
            )
            error.__cause__ = exc
            self.error = error
        self._cancel_scope.cancel()

    @property
    def error_reported(self) -> bool:
        return self._error_reported

    def take_error(self) -> FanOutError | None:
        """The error, the first time it is asked for; None after that (raised once)."""
        if self._error_reported:
            return None
        self._error_reported = True
        return self.error

    # -- I/O --

    async def run(self) -> None:
        """Run all the work; closes the delivery channel when done, however it ends."""
        try:
            with self._cancel_scope:
                async with trio.open_nursery() as nursery:
                    for _ in range(self._workers):
                        nursery.start_soon(self._worker)
        finally:
            if self._send is not None:
                self._send.close()

    async def _worker(self) -> None:
        plan = self.plan
        work = plan.take(None)
        cursor = Cursor(work or Work(""))
        try:
            while True:
                if work is None:
                    if plan.finished():
                        return
                    await self._changed.wait()
                    work = plan.take(None)
                    continue
                cursor.work = work
                work = await self._run_on_one_connection(cursor)
        except Exception as exc:  # the first error stops everything; see _fail
            self._fail(cursor, exc)

    async def _run_on_one_connection(self, cursor: Cursor) -> Work | None:
        """Check out a connection and work on it while the folder stays the same. Returns the
        next work taken (of another folder), or None."""
        plan = self.plan
        work = cursor.work
        undelivered: list[Delivery] = []
        cursor.step = "checkout"
        memory = self._memory
        if memory is not None and work.search is None and not work.sizing:
            await memory.reserve(work)  # before the checkout: no connection held meanwhile
        async with self._pool.connection() as conn:
            if memory is None:  # else the batch's bytes are reserved: keep it
                work = plan.prefer(work, conn.selected_folder, conn.readonly)
            while True:
                cursor.work = work
                cursor.step = "select"
                if work.sizing:
                    work = await self._size(conn, work, cursor)
                elif work.search is None and self._run_pipelined is not None:
                    work = await self._run_pipeline(conn, work, cursor, undelivered)
                elif work.search is not None:
                    if not await self._search_and_fetch(conn, work, cursor, undelivered):
                        await self._search(conn, work, cursor)
                        plan.finish(work)
                else:
                    selected = await self._select(conn, work.folder, fresh=False)
                    cursor.step = "command"
                    assert self._run_batch is not None
                    done = await self._run_batch(conn, work, not selected)
                    self._batch_done(work, done, undelivered)
                following = plan.take(work.folder)
                if (
                    undelivered
                    or following is None
                    or following.folder != work.folder
                    or self._pool.counts.value.waiting
                    or (memory is not None and not memory.reserve_nowait(following))
                ):
                    break
                work = following
        for delivery in undelivered:
            # The caller is busy: wait for it without holding a connection (backpressure).
            assert self._send is not None
            cursor.step = "deliver"
            await self._send.send(delivery)
        return following

    async def _run_pipeline(
        self, conn: Connection, work: Work, cursor: Cursor, undelivered: list[Delivery]
    ) -> Work:
        """Run *work* and, if batches are waiting, the next one with it, in one round trip.
        Returns the last work run."""
        assert self._run_pipelined is not None
        works = [work]
        while len(works) < PIPELINE_DEPTH:
            extra = self.plan.take(works[-1].folder, searches=False)
            if extra is None:
                break
            if self._memory is not None and not self._memory.reserve_nowait(extra):
                self.plan.put_back(extra)  # no memory for it yet: another round trip
                break
            works.append(extra)
        outcomes = await self._run_pipelined(conn, works, cursor)
        for done, outcome in zip(works, outcomes, strict=True):
            cursor.work = done
            if isinstance(outcome, PipelinedFetch):
                _raise_failed(outcome, cursor)
            if done.probe:
                returned = len(outcome.messages) + outcome.skipped
                self.plan.probed(done, returned, outcome.examined)
                self._wake()
            self._batch_done(done, outcome, undelivered)
        cursor.step = "command"
        return works[-1]

    async def _size(self, conn: Connection, work: Work, cursor: Cursor) -> Work:
        """Ask the sizes of *work*'s folder and of its companions, in one round trip, and plan
        their batches. Returns the last work run."""
        assert self._run_sizes is not None
        works = [work, *work.companions]
        outcomes = await self._run_sizes(conn, works, cursor)
        for done, outcome in zip(works, outcomes, strict=True):
            cursor.work = done
            if isinstance(outcome, PipelinedFetch):
                _raise_failed(outcome, cursor)
            self.plan.sized(done, outcome)
            self.plan.finish(done)
        self._wake()
        cursor.step = "command"
        return works[-1]

    def _batch_done(
        self, work: Work, delivery: Delivery | None, undelivered: list[Delivery]
    ) -> None:
        if delivery is None:
            self.tracker.done(work.folder, len(work.uids), 0, batch_done=True)
        elif undelivered or not self._deliver_nowait(delivery):
            undelivered.append(delivery)
        self.plan.finish(work)

    def _deliver_nowait(self, delivery: Delivery) -> bool:
        assert self._send is not None
        try:
            self._send.send_nowait(delivery)
        except trio.WouldBlock:
            return False
        return True

    async def _select(self, conn: Connection, folder: str, *, fresh: bool) -> bool:
        """Select *folder* unless it is selected in a suitable mode; whether it selected. A
        *fresh* select always happens: a SEARCH on a connection that has had the folder
        selected for a while may answer from its old view (Dovecot syncs changes made by other
        connections only after it)."""
        if not fresh and conn.selected_folder == folder and self.plan.suits(conn.readonly):
            return False
        await conn.select_folder(folder, readonly=self._mode != "read-write")
        return True

    async def _search_and_fetch(
        self, conn: Connection, work: Work, cursor: Cursor, undelivered: list[Delivery]
    ) -> bool:
        """Search a folder and fetch its first batch in one round trip where the operation
        and the server allow it (SEARCHRES); False where not (nothing was sent)."""
        search = work.search
        if self._run_search_fetch is None or search is None or search.above:
            return False
        first = range(1, self._batch_size + 1)
        outcome = await self._run_search_fetch(conn, work, first, cursor)
        if outcome is None:
            return False
        uids, delivery = outcome
        self.plan.searched_with_first(work, uids, first)
        self._wake()
        self._batch_done(work, delivery, undelivered)
        return True

    async def _search(self, conn: Connection, work: Work, cursor: Cursor) -> None:
        """SELECT the folder afresh and search it, both in one round trip: a SEARCH on a
        connection that has had the folder selected for a while may answer from its old view
        (Dovecot syncs changes made by other connections only after a SELECT)."""
        assert work.search is not None
        readonly = self._mode != "read-write"
        uids, error, command = await conn.run_sync(
            select_and_search, work.folder, readonly, work.search.criteria, self._charset
        )
        if error is not None:
            cursor.step = "select" if command == "select" else "command"
            raise error
        assert uids is not None
        cursor.step = "command"
        self.plan.searched(work, uids)
        self._wake()


async def run_to_end(fanout: FanOut) -> None:
    """Run *fanout* to its end; raise its error, if any, once. A checkpoint."""
    await trio.lowlevel.checkpoint_if_cancelled()
    await fanout.run()
    error = fanout.take_error()
    if error is not None:
        raise error from error.__cause__
    await trio.lowlevel.cancel_shielded_checkpoint()


# -- what the worker threads run ------------------------------------------------------------------


def search_and_fetch(
    client: IMAPClient, folder: str, criteria: Criteria, first: range, fields: list[str | bytes]
) -> tuple[list[int] | None, dict[int, dict[bytes, Any]] | None, Exception | None, str]:
    """In a worker thread: search *folder* and fetch the matches in *first*, one round trip;
    all None (nothing sent) where the server cannot."""
    assert isinstance(client, TrackingClient)
    if not client.can_search_and_fetch(criteria, None):
        return None, None, None, ""
    return client.search_and_fetch(folder, criteria, first, fields)


def select_and_search(
    client: IMAPClient, folder: str, readonly: bool, criteria: Criteria, charset: str | None
) -> tuple[list[int] | None, Exception | None, str | None]:
    """In a worker thread: SELECT (or EXAMINE) *folder* and search it, one round trip."""
    assert isinstance(client, TrackingClient)
    return client.select_and_search(folder, readonly, criteria, charset)


def _raise_failed(outcome: PipelinedFetch, cursor: Cursor) -> NoReturn:
    """Raise the error a pipelined step ended with, the cursor saying which step it was."""
    assert outcome.error is not None
    cursor.step = "select" if outcome.command == "select" else "command"
    raise outcome.error
