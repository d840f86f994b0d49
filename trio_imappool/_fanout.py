"""Fan-out: bulk work over many folders and UIDs, spread over pooled connections.

An IMAP connection runs one command at a time, and over a real network every command costs a
round trip: fetching 50,000 messages one FETCH at a time on one connection costs 50,000 round
trips. The functions here split the work into batches (one command for up to ``batch_size``
UIDs), run the batches concurrently from up to ``max_connections`` tasks in a nursery, each on a
connection checked out of the pool, and either stream the results back as they arrive
(:func:`fetch_many`) or wait for all of them (:func:`search_many`, :func:`add_flags_many`,
:func:`remove_flags_many`, :func:`copy_many`, :func:`move_many`)::

    async with fetch_many(pool, {"INBOX": uids, "Archive": "ALL"}, ["BODY.PEEK[]"]) as results:
        async for folder, uid, data in results:
            save(folder, uid, data[b"BODY[]"])

**What each folder gets.** A UID list (any iterable of ints), or search criteria (a string such
as ``"ALL"``, or a list such as ``["UNSEEN"]`` or ``["SINCE", date(2026, 1, 1)]``: anything with
a string in it), searched first on a pooled connection. :func:`fetch_many` needs no search
for ``"ALL"``: it fetches the folder by UID range, the first range sent with the folder's
EXAMINE, whose UIDNEXT and EXISTS plan the rest (a folder whose UIDs are sparse, its old
messages expunged, is searched above the first range instead).

**How the work is spread.** Searches run first, each with a SELECT of its own sent in the same
round trip (so that it sees the folder as it is now, not as a connection that has had it
selected for a while last saw it; ESEARCH where the server has it), and the connection that
searched a folder goes on with that folder's first batches, so one SELECT serves both. A task
keeps its connection for the next batch of the same folder (no second SELECT) unless other
tasks are waiting for a connection; when it has to change folders
it releases the connection and checks one out again, so other users of the pool get their
turn. A task that gets a connection with a folder already selected takes a batch of that folder
if one is left. Tasks spread over the folders, the least-worked folder first, so that each
SELECT serves as many batches as it can. :func:`fetch_many` also pipelines its batches two at
a time (see there).

**Errors.** The first batch that fails stops the whole operation: the other tasks are
cancelled, and :class:`FanOutError` (with the folder, the batch's UIDs, and the original
exception as ``__cause__``) is raised once, never inside an exception group. Nothing is retried:
a STORE, COPY or MOVE that failed may or may not have reached the server.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, Final, Literal, TypeAlias

import trio
from imapclient import IMAPClient
from trio_util import AsyncValue

from ._client import PipelinedFetch, TrackingClient, after_noop
from ._config import check_wire_text
from ._errors import PoolError

if TYPE_CHECKING:
    from ._connection import Connection
    from ._pool import Pool

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "FanOutError",
    "FetchResults",
    "Progress",
    "add_flags_many",
    "copy_many",
    "fetch_many",
    "move_many",
    "remove_flags_many",
    "search_many",
]

#: UIDs per command unless the caller says otherwise.
DEFAULT_BATCH_SIZE: Final = 200

Criteria: TypeAlias = str | bytes | Sequence[Any]
"""IMAP search criteria as imapclient takes them: ``"ALL"``, ``["UNSEEN", "SINCE", date]``."""

Messages: TypeAlias = Iterable[int] | Criteria
"""What to work on in one folder: its UIDs, or criteria to search for them."""

# How a folder must be selected for an operation: exactly read-only (FETCH: never sets \Seen),
# read-write (STORE, MOVE), or either (SEARCH, COPY).
_Mode: TypeAlias = Literal["read-only", "read-write", "any"]

_SHOWN_UID_CHARS: Final = 60


# -- the public results ----------------------------------------------------------------------


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


@dataclasses.dataclass(frozen=True, slots=True)
class Progress:
    """A snapshot of a :func:`fetch_many`, from :attr:`FetchResults.progress`.

    A message counts as done when the iteration has handed it to the caller, or when the server
    did not return it or returned it without its data (expunged meanwhile: it is skipped, and
    counted in ``messages_missing``). Totals are known once every folder's search has
    finished; until then they are None.

    ====================  ===========================================================
    field                 meaning
    ====================  ===========================================================
    ``messages_total``    messages to fetch in all (None while searches are running)
    ``messages_done``     messages handed to the caller, plus those skipped
    ``bytes_done``        bytes of the ``bytes`` values (bodies, headers) handed over
    ``batches_total``     FETCH commands in all (None while searches are running)
    ``batches_done``      batches whose every message is done
    ``folders_total``     folders asked for
    ``folders_done``      folders whose every batch is done
    ``messages_missing``  of the messages done, those skipped because the server did not
                          return them or returned them without the data asked for
    ====================  ===========================================================
    """

    messages_total: int | None
    messages_done: int
    bytes_done: int
    batches_total: int | None
    batches_done: int
    folders_total: int
    folders_done: int
    messages_missing: int = 0

    @property
    def complete(self) -> bool:
        """Whether every message of every folder is done."""
        return self.folders_done == self.folders_total

    def __str__(self) -> str:
        total = "?" if self.messages_total is None else self.messages_total
        batches = "?" if self.batches_total is None else self.batches_total
        missing = f" ({self.messages_missing} missing)" if self.messages_missing else ""
        return (
            f"{self.messages_done}/{total} messages{missing}, {self.bytes_done} bytes, "
            f"{self.batches_done}/{batches} batches, "
            f"{self.folders_done}/{self.folders_total} folders"
        )


class _Tracker:
    """Counts progress and publishes it as an AsyncValue. Synchronous."""

    def __init__(self, folders: int) -> None:
        self._unplanned = folders
        self._folders = folders
        self._messages_total = self._batches_total = 0
        self._messages = self._bytes = self._batches = self._folders_done = 0
        self._missing = 0
        self._left: dict[str, int] = {}  # folder -> batches not done yet
        self._final: set[str] = set()  # folders whose every batch is known
        self.value: Final = AsyncValue(Progress(None, 0, 0, None, 0, folders, 0))

    def _publish(self) -> None:
        planned = not self._unplanned
        self.value.value = Progress(
            self._messages_total if planned else None,
            self._messages,
            self._bytes,
            self._batches_total if planned else None,
            self._batches,
            self._folders,
            self._folders_done,
            self._missing,
        )

    def planned(self, folder: str, messages: int, batches: int, *, final: bool = True) -> None:
        """More of a folder's work is known: *messages* in *batches*; with *final*, all of it
        (a folder whose first batch was sent before its size was known is planned twice)."""
        self._messages_total += messages
        self._batches_total += batches
        left = self._left.get(folder, 0) + batches
        if left:
            self._left[folder] = left
        if final:
            self._unplanned -= 1
            self._final.add(folder)
            if not left:
                self._folders_done += 1
        self._publish()

    def done(
        self,
        folder: str,
        messages: int,
        size: int,
        *,
        batch_done: bool,
        missing: int = 0,
        publish: bool = True,
    ) -> None:
        """*messages* of *folder* (of *size* bytes, *missing* of them skipped) are done, and
        maybe their batch."""
        self._messages += messages
        self._missing += missing
        self._bytes += size
        if batch_done:
            self._batches += 1
            self._left[folder] -= 1
            if not self._left[folder]:
                del self._left[folder]
                if folder in self._final:
                    self._folders_done += 1
        if publish:
            self._publish()


# -- planning: the caller's folders, checked before anything starts ----------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Search:
    criteria: Criteria
    #: Only UIDs above this count (a search for what a folder's first range did not cover).
    above: int = 0


def _is_all(criteria: Criteria) -> bool:
    """Whether criteria are just ``ALL``: fetched by UID range, with no search."""
    if isinstance(criteria, bytes):
        criteria = criteria.decode("ascii", "replace")
    if isinstance(criteria, str):
        return criteria.strip().upper() == "ALL"
    items = list(criteria)
    return len(items) == 1 and isinstance(items[0], str | bytes) and _is_all(items[0])


def _is_uid(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _normalise(folders: Mapping[str, Messages]) -> dict[str, Sequence[int] | _Search]:
    """Tell UID sets from search criteria; sort and deduplicate UIDs. Raises TypeError."""
    if not isinstance(folders, Mapping):
        raise TypeError(f"folders must be a mapping of folder -> UIDs or criteria, not {folders!r}")
    plan: dict[str, Sequence[int] | _Search] = {}
    for folder, spec in folders.items():
        if not isinstance(folder, str):
            raise TypeError(f"folder names must be str, not {folder!r}")
        check_wire_text("a folder name", folder)
        if isinstance(spec, str | bytes):
            plan[folder] = _Search(spec)
        elif isinstance(spec, range) and spec.step > 0 and (not spec or spec.start >= 1):
            plan[folder] = spec
        else:
            try:
                items = list(spec)
            except TypeError:
                raise TypeError(
                    f"folder {folder!r}: expected UIDs or search criteria, got {spec!r}"
                ) from None
            if all(_is_uid(item) for item in items):
                plan[folder] = sorted(set(items))
            elif any(isinstance(item, str | bytes) for item in items):
                plan[folder] = _Search(items)
            else:
                raise TypeError(
                    f"folder {folder!r}: expected UIDs (ints >= 1) or search criteria "
                    f"(a str, or a list with a str in it), got {spec!r}"
                )
    return plan


def _check_sizes(pool: Pool, batch_size: int, max_connections: int | None) -> int:
    """Validate; return how many tasks to run (never more than the pool's size)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, not {batch_size!r}")
    size = pool.config.max_size
    if max_connections is None:
        return size
    if isinstance(max_connections, bool) or not isinstance(max_connections, int):
        raise ValueError(f"max_connections must be an int >= 1 or None, not {max_connections!r}")
    if max_connections < 1:
        raise ValueError(f"max_connections must be at least 1, not {max_connections}")
    return min(max_connections, size)


def _uid_set(uids: Sequence[int]) -> str:
    """UIDs as a compact IMAP set ("1:200,205"), shortened for messages."""
    parts: list[str] = []
    start = prev = None
    for uid in uids:
        if prev is not None and uid == prev + 1:
            prev = uid
            continue
        if start is not None:
            parts.append(f"{start}" if start == prev else f"{start}:{prev}")
        start = prev = uid
    if start is not None:
        parts.append(f"{start}" if start == prev else f"{start}:{prev}")
    text = ",".join(parts)
    if len(text) > _SHOWN_UID_CHARS:
        text = text[: _SHOWN_UID_CHARS - 3].rsplit(",", 1)[0] + ",..."
    return text


# -- the engine ----------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True, eq=False)
class _Work:
    """One command's worth of work: a batch of UIDs, or the search of a folder."""

    folder: str
    uids: Sequence[int] = ()
    search: _Search | None = None
    #: The first UID range of a folder fetched as "ALL", sent with a fresh EXAMINE whose
    #: UIDNEXT and EXISTS plan the rest of the folder.
    probe: bool = False


@dataclasses.dataclass(slots=True, eq=False)
class _Delivery:
    """A fetched batch on its way to the caller."""

    folder: str
    messages: collections.deque[tuple[int, dict[bytes, Any]]]
    skipped: int
    #: What the batch's EXAMINE said (only where the batch had one).
    examined: dict[bytes, Any] | None = None


# Runs one batch on a connection that has the batch's folder selected; a delivery for the
# caller (fetch) or None (the other operations). The flag says that the folder was selected
# before this batch's turn (by another checkout, or for an earlier batch): the session may not
# have seen other sessions' changes yet.
_RunBatch: TypeAlias = Callable[["Connection", _Work, bool], Awaitable[_Delivery | None]]


# Runs batches in one round trip, selecting their folders as needed (fetch): per batch its
# delivery, or the failed step (a NO or BAD answer). Sets the cursor to the batch whose answer
# was being read when an exception is raised.
_RunPipelined: TypeAlias = Callable[
    ["Connection", list[_Work], "_Cursor"], Awaitable[list[_Delivery | PipelinedFetch]]
]

# Searches a folder and fetches the matches among its first UIDs in one round trip (fetch):
# every UID found and the first batch's delivery, or None where the server cannot.
_RunSearchFetch: TypeAlias = Callable[
    ["Connection", _Work, range, "_Cursor"], Awaitable[tuple[list[int], _Delivery] | None]
]

# Batches a fetch worker sends at once: the second one's round trip overlaps the first's.
_PIPELINE_DEPTH: Final = 2


class _Cursor:
    """What a worker task is working on, and at which step, for the error message."""

    __slots__ = ("step", "work")

    def __init__(self, work: _Work) -> None:
        self.work = work
        self.step = "checkout"


class _FanOut:
    """Runs the work of one fan-out operation on up to *workers* pooled connections.

    The decisions (which batch next, when to stop) are synchronous methods; the workers do the
    I/O. :meth:`run` never raises a batch's error: it records the first one in
    :attr:`error` and cancels the other workers.
    """

    def __init__(
        self,
        pool: Pool,
        plan: Mapping[str, Sequence[int] | _Search],
        *,
        operation: str,
        mode: _Mode,
        batch_size: int,
        workers: int,
        run_batch: _RunBatch | None,
        run_pipelined: _RunPipelined | None = None,
        send: trio.MemorySendChannel[_Delivery] | None = None,
        charset: str | None = None,
        run_search_fetch: _RunSearchFetch | None = None,
    ) -> None:
        self._pool = pool
        self._run_search_fetch = run_search_fetch
        self._run_pipelined = run_pipelined
        self.operation = operation
        self._mode = mode
        self._batch_size = batch_size
        self._workers = workers
        self._run_batch = run_batch
        self._send = send
        self._charset = charset
        self.tracker: Final = _Tracker(len(plan))
        self.found: dict[str, list[int]] = {}
        self.error: FanOutError | None = None
        self._error_reported = False
        self._cancel_scope = trio.CancelScope()
        self._searches: collections.deque[_Work] = collections.deque()
        self._batches: dict[str, collections.deque[_Work]] = {}
        self._busy: collections.Counter[str] = collections.Counter()
        self._searching = 0
        self._probing = 0
        self._changed = trio.Event()
        for folder, spec in plan.items():
            if isinstance(spec, _Search) and run_pipelined is not None and _is_all(spec.criteria):
                # No search: the first range goes now, with an EXAMINE that tells the rest.
                probe = _Work(folder, range(1, batch_size + 1), probe=True)
                self._batches[folder] = collections.deque([probe])
                self._probing += 1
                self.tracker.planned(folder, 0, 1, final=False)
            elif isinstance(spec, _Search):
                self._searches.append(_Work(folder, search=spec))
            else:
                self._plan(folder, spec)

    # -- decisions (synchronous) --

    def _plan(
        self, folder: str, uids: Sequence[int], *, already: int = 0, fetched: int = 0
    ) -> None:
        """Plan a folder's batches; *already* messages in *fetched* batches came with its
        search."""
        size = self._batch_size
        if self._run_batch is None and self._run_pipelined is None:  # search only
            self.tracker.planned(folder, len(uids), 0)
        else:
            batches = [_Work(folder, uids[i : i + size]) for i in range(0, len(uids), size)]
            if batches:
                self._batches.setdefault(folder, collections.deque()).extend(batches)
            self.tracker.planned(folder, already + len(uids), fetched + len(batches))
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _planned_after_probe(self, probe: _Work, delivery: _Delivery) -> None:
        """Plan the rest of a folder fetched as "ALL" from what its first range's EXAMINE
        said: UID ranges up to UIDNEXT where the UIDs are dense, else a search for the UIDs
        above the first range (a folder whose old messages were expunged)."""
        assert isinstance(probe.uids, range)
        folder, start = probe.folder, probe.uids.stop
        examined = delivery.examined or {}
        returned = len(delivery.messages) + delivery.skipped
        exists, uidnext = examined.get(b"EXISTS"), examined.get(b"UIDNEXT")
        self._probing -= 1
        known = isinstance(exists, int) and isinstance(uidnext, int)
        if not known:  # the server did not say: search
            exists = uidnext = 0
        assert isinstance(exists, int) and isinstance(uidnext, int)
        left = exists - returned
        if known and left <= 0:
            self.tracker.planned(folder, returned, 0)
        elif known and uidnext - start <= 2 * left + self._batch_size:
            size = self._batch_size
            batches = [
                _Work(folder, range(low, min(low + size, uidnext)))
                for low in range(start, uidnext, size)
            ]
            self._batches.setdefault(folder, collections.deque()).extend(batches)
            self.tracker.planned(folder, returned + left, len(batches))
        else:
            self.tracker.planned(folder, returned, 0, final=False)
            search = _Search(["UID", f"{start}:*"], above=start - 1)
            self._searches.append(_Work(folder, search=search))
        self._wake()

    def _take(self, prefer: str | None, *, searches: bool = True) -> _Work | None:
        """The next work for a worker whose connection has *prefer* selected: more of the
        same folder, else a search, else the least-worked folder with the most batches left."""
        queue = self._batches.get(prefer) if prefer is not None else None
        if queue:
            work = queue.popleft()
        elif self._searches and searches:
            work = self._searches.popleft()
            self._searching += 1
        elif self._batches:
            folder = min(self._batches, key=lambda f: (self._busy[f], -len(self._batches[f])))
            queue = self._batches[folder]
            work = queue.popleft()
        else:
            return None
        if queue is not None and not queue:
            del self._batches[work.folder]
        self._busy[work.folder] += 1
        return work

    def _prefer(self, work: _Work, conn: Connection) -> _Work:
        """Swap the work a worker took before its checkout for a batch of the folder that the
        connection it got already has selected, if that folder has batches left: a SELECT
        saved, whoever had the connection before."""
        selected = conn.selected_folder
        if (
            selected is None
            or selected == work.folder
            or work.search is not None
            or not self._selected_suits(conn)
            or not self._batches.get(selected)
        ):
            return work
        self._batches.setdefault(work.folder, collections.deque()).appendleft(work)
        self._busy[work.folder] -= 1
        better = self._take(selected)
        assert better is not None  # the folder has batches
        return better

    def _selected_suits(self, conn: Connection) -> bool:
        """Whether the connection's selected folder is in the mode this operation needs."""
        return self._mode == "any" or conn.readonly == (self._mode == "read-only")

    def _finished(self) -> bool:
        """Whether no more work can appear (no search is pending or running)."""
        return not self._searches and not self._searching and not self._probing

    def _fail(self, cursor: _Cursor, exc: Exception) -> None:
        work = cursor.work
        if self.error is None:
            if work.search is not None:
                what = f"search for {work.search.criteria!r}"
            else:
                what = f"UIDs {_uid_set(work.uids)} ({len(work.uids)} messages)"
            operation = "SEARCH" if work.search is not None else self.operation
            step = {"checkout": " checking out a connection", "select": " selecting it"}
            error = FanOutError(
                f"{self._pool.config.name}: {operation} of {what} in folder {work.folder!r} "
                f"failed{step.get(cursor.step, '')}: {type(exc).__qualname__}: {exc}",
                folder=work.folder,
                uids=work.uids,
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
        work = self._take(None)
        cursor = _Cursor(work or _Work(""))
        try:
            while True:
                if work is None:
                    if self._finished():
                        return
                    await self._changed.wait()
                    work = self._take(None)
                    continue
                cursor.work = work
                work = await self._run_on_one_connection(cursor)
        except Exception as exc:  # the first error stops everything; see _fail
            self._fail(cursor, exc)

    async def _run_on_one_connection(self, cursor: _Cursor) -> _Work | None:
        """Check out a connection and work on it while the folder stays the same. Returns the
        next work taken (of another folder), or None."""
        work = cursor.work
        undelivered: list[_Delivery] = []
        cursor.step = "checkout"
        async with self._pool.connection() as conn:
            work = self._prefer(work, conn)
            while True:
                cursor.work = work
                cursor.step = "select"
                if work.search is None and self._run_pipelined is not None:
                    work = await self._run_pipeline(conn, work, cursor, undelivered)
                elif work.search is not None:
                    if not await self._search_and_fetch(conn, work, cursor, undelivered):
                        await self._search(conn, work.folder, work.search, cursor)
                        self._busy[work.folder] -= 1
                else:
                    selected = await self._select(conn, work.folder, fresh=False)
                    cursor.step = "command"
                    assert self._run_batch is not None
                    done = await self._run_batch(conn, work, not selected)
                    self._batch_done(work, done, undelivered)
                following = self._take(work.folder)
                if (
                    undelivered
                    or following is None
                    or following.folder != work.folder
                    or self._pool.counts.value.waiting
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
        self, conn: Connection, work: _Work, cursor: _Cursor, undelivered: list[_Delivery]
    ) -> _Work:
        """Run *work* and, if batches are waiting, the next one with it, in one round trip.
        Returns the last work run."""
        assert self._run_pipelined is not None
        works = [work]
        while len(works) < _PIPELINE_DEPTH:
            extra = self._take(works[-1].folder, searches=False)
            if extra is None:
                break
            works.append(extra)
        outcomes = await self._run_pipelined(conn, works, cursor)
        for done, outcome in zip(works, outcomes, strict=True):
            cursor.work = done
            if isinstance(outcome, PipelinedFetch):
                assert outcome.error is not None
                cursor.step = "select" if outcome.command == "select" else "command"
                raise outcome.error
            if done.probe:
                self._planned_after_probe(done, outcome)
            self._batch_done(done, outcome, undelivered)
        cursor.step = "command"
        return works[-1]

    def _batch_done(
        self, work: _Work, delivery: _Delivery | None, undelivered: list[_Delivery]
    ) -> None:
        if delivery is None:
            self.tracker.done(work.folder, len(work.uids), 0, batch_done=True)
        elif undelivered or not self._deliver_nowait(delivery):
            undelivered.append(delivery)
        self._busy[work.folder] -= 1

    def _deliver_nowait(self, delivery: _Delivery) -> bool:
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
        if not fresh and conn.selected_folder == folder and self._selected_suits(conn):
            return False
        await conn.select_folder(folder, readonly=self._mode != "read-write")
        return True

    async def _search_and_fetch(
        self, conn: Connection, work: _Work, cursor: _Cursor, undelivered: list[_Delivery]
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
        self.found[work.folder] = uids
        self._searching -= 1
        head = [uid for uid in uids if uid in first]
        rest = [uid for uid in uids if uid not in first]
        self._plan(work.folder, rest, already=len(head), fetched=1)
        self._batch_done(work, delivery, undelivered)
        return True

    async def _search(
        self, conn: Connection, folder: str, search: _Search, cursor: _Cursor
    ) -> None:
        """SELECT the folder afresh and search it, both in one round trip: a SEARCH on a
        connection that has had the folder selected for a while may answer from its old view
        (Dovecot syncs changes made by other connections only after a SELECT)."""
        readonly = self._mode != "read-write"
        uids, error, command = await conn.run_sync(
            _select_and_search, folder, readonly, search.criteria, self._charset
        )
        if error is not None:
            cursor.step = "select" if command == "select" else "command"
            raise error
        assert uids is not None
        cursor.step = "command"
        if search.above:
            uids = [uid for uid in uids if uid > search.above]
        self.found[folder] = uids
        self._searching -= 1
        self._plan(folder, uids)


def _search_and_fetch(
    client: IMAPClient, folder: str, criteria: Criteria, first: range, fields: list[str | bytes]
) -> tuple[list[int] | None, dict[int, dict[bytes, Any]] | None, Exception | None, str]:
    assert isinstance(client, TrackingClient)
    if not client.can_search_and_fetch(criteria, None):
        return None, None, None, ""
    return client.search_and_fetch(folder, criteria, first, fields)


def _select_and_search(
    client: IMAPClient, folder: str, readonly: bool, criteria: Criteria, charset: str | None
) -> tuple[list[int] | None, Exception | None, str | None]:
    assert isinstance(client, TrackingClient)
    return client.select_and_search(folder, readonly, criteria, charset)


# -- fetch_many ------------------------------------------------------------------------------


class FetchResults:
    """The messages of a :func:`fetch_many`, as they arrive: ``(folder, uid, data)``.

    An async iterator; ``data`` is imapclient's dict for the message (``{b"BODY[]": ...,
    b"SEQ": ...}``). Messages come in batches, ascending by UID within a batch; batches of
    different folders interleave. Iterate it inside the ``async with`` block only.

    After a batch has failed, the next step of the iteration raises :class:`FanOutError`
    (messages of earlier batches not yet handed over are dropped), and the steps after that
    end the iteration.
    """

    def __init__(self, receive: trio.MemoryReceiveChannel[_Delivery], fanout: _FanOut) -> None:
        self._receive = receive
        self._fanout = fanout
        self._tracker = fanout.tracker
        self._current: _Delivery | None = None
        self._in_next = False  # the caller is inside __anext__
        self._closed = False
        self._body_scope = trio.CancelScope()

    def __repr__(self) -> str:
        return f"<FetchResults {self.progress}>"

    @property
    def progress(self) -> Progress:
        """The progress now (a frozen snapshot)."""
        progress: Progress = self._tracker.value.value
        return progress

    @property
    def progress_value(self) -> AsyncValue[Progress]:
        """The progress as a :class:`trio_util.AsyncValue`, updated on every message: wait for
        a state without polling, e.g. ``await results.progress_value.wait_value(lambda p:
        p.messages_done >= 1000)``, or drive a progress bar with ``eventual_values()``."""
        return self._tracker.value

    def __aiter__(self) -> FetchResults:
        return self

    async def __anext__(self) -> tuple[str, int, dict[bytes, Any]]:
        """The next message.

        Raises:
            StopAsyncIteration: Every message has been handed over (or a failure was).
            FanOutError: A batch failed (raised once; the other batches were cancelled).
            trio.ClosedResourceError: The ``async with`` block has ended.
            trio.BusyResourceError: Another task is iterating over the same results (one
                task iterates; others would each get some of the messages, unnoticed).

        **Cancellation**: a checkpoint; a cancelled call loses no message.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            raise trio.ClosedResourceError(
                "the fetch_many() block has ended: iterate the results inside it"
            )
        if self._in_next:
            await trio.lowlevel.checkpoint()
            raise trio.BusyResourceError(
                "another task is already iterating over these results; hand the messages on "
                "through a memory channel instead"
            )
        self._in_next = True
        try:
            delivery = self._current
            if delivery is not None and delivery.messages:
                await trio.lowlevel.checkpoint()
                self._raise_if_failed()
            else:
                delivery = await self._next_delivery()
        finally:
            self._in_next = False
        uid, data = delivery.messages.popleft()
        size = sum(len(value) for value in data.values() if isinstance(value, bytes))
        self._tracker.done(delivery.folder, 1, size, batch_done=not delivery.messages)
        return delivery.folder, uid, data

    def _raise_if_failed(self) -> None:
        """After a failure the iteration raises it once, then stops."""
        if self._fanout.error is not None:
            error = self._fanout.take_error()
            if error is not None:
                raise error from error.__cause__
            raise StopAsyncIteration

    async def _next_delivery(self) -> _Delivery:
        while True:
            self._raise_if_failed()
            try:
                delivery = await self._receive.receive()
            except trio.EndOfChannel:
                self._raise_if_failed()
                raise StopAsyncIteration from None
            self._raise_if_failed()
            self._current = delivery
            skipped = delivery.skipped
            if delivery.messages:
                if skipped:
                    self._tracker.done(
                        delivery.folder, skipped, 0, batch_done=False, missing=skipped
                    )
                return delivery
            self._tracker.done(delivery.folder, skipped, 0, batch_done=True, missing=skipped)


def fetch_many(
    pool: Pool,
    folders: Mapping[str, Messages],
    data: Sequence[str | bytes] | str | bytes,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_connections: int | None = None,
) -> AbstractAsyncContextManager[FetchResults]:
    """Fetch messages of many folders concurrently, streaming them as they arrive.

    ::

        async with fetch_many(
            pool, {"INBOX": uids, "Archive": "ALL"}, ["ENVELOPE", "BODY.PEEK[]"]
        ) as results:
            async for folder, uid, data in results:
                print(folder, uid, data[b"ENVELOPE"].subject, len(data[b"BODY[]"]))
                bar.update(results.progress.messages_done)

    Each batch is one ``UID FETCH`` of up to *batch_size* UIDs, on a connection that has the
    folder selected read-only (EXAMINE), so nothing, not even ``\\Seen``, changes. Messages
    that the server does not return, or returns without the message data asked for
    (``BODY[] NIL``: expunged meanwhile), are skipped: no message reaches the caller without
    its data. They count as done, and in ``messages_missing``, in
    :attr:`FetchResults.progress`. Only responses that carry a UID asked for are results: a
    server's unsolicited FETCH (another session's flag change) is never mistaken for one.

    **Pipelined.** A task sends two batches at once when there are batches left, with the
    EXAMINE each needs, and then reads the answers (IMAP lets a client pipeline commands;
    imapclient alone cannot): EXAMINE A, FETCH A, EXAMINE B, FETCH B cost one round trip, not
    four. Over a slow link that halves the round trips of a fetch, and more where folders
    change often. ``"ALL"`` costs no search: the folder's first UID range is fetched with its
    EXAMINE, and the rest planned from the UIDNEXT and EXISTS it returns, so it is as fast as
    a UID list. Other criteria, where the server has SEARCHRES and ESEARCH (RFC 5182 and
    4731: Dovecot has both, Gmail only ESEARCH), fetch the folder's first batch
    with its search (EXAMINE, the search, the same search among UIDs 1 to *batch_size* saved
    as ``$``, and ``UID FETCH $``, in one round trip); elsewhere they cost one round trip
    (SELECT and UID SEARCH together) before the folder's first batches. With ``"ALL"`` the
    totals in :attr:`FetchResults.progress` come from EXISTS: messages expunged meanwhile
    are simply not returned.

    **Parsed as they are read.** FETCH answers of the common shape (``UID``, ``FLAGS``,
    ``BODY[]`` and other plain items, in any order) are parsed while imaplib reads them, each
    literal taken once from its buffer; any other shape goes to imapclient's generic parser,
    with the same result.

    **Memory is bounded** whatever the mailbox size: each task holds at most two fetched
    batches (one pipeline) and waits, without holding a connection, until the caller takes
    them. So a slow caller slows the fetching instead of buffering the mailbox: memory is about
    ``(2 * max_connections + 1) * batch_size`` messages (plus the UID lists themselves).

    Args:
        pool: The pool to check connections out of.
        folders: Folder -> its UIDs (any iterable of ints), or search criteria (a str such as
            ``"ALL"``, or a list with a str in it such as ``["UNSEEN"]``).
        data: What to fetch, as for :meth:`imapclient.IMAPClient.fetch`
            (``["BODY.PEEK[]"]``, ``["ENVELOPE", "FLAGS"]``).
        batch_size: UIDs per FETCH.
        max_connections: Connections used at once; default and upper bound the pool's
            ``max_size``.

    Returns:
        An async context manager giving :class:`FetchResults`.

    Raises:
        TypeError: A folder's value is neither UIDs nor criteria (raised by the call).
        ValueError: *batch_size* or *max_connections* is not a positive int (by the call).
        FanOutError: A search or a batch failed, with the folder, the UIDs and the original as
            ``__cause__``. It is raised by the iteration if the caller is waiting in it, else
            the block is cancelled (like a nursery's body when a child fails) and the error
            comes out of the ``async with``. Raised once: if the iteration raised it, leaving
            the block does not raise it again. Never in an exception group.

    **Cancellation**: entering the block is a checkpoint. Leaving it, by the end of the block,
    ``break``, an exception or a cancellation, cancels the fetching tasks at once (a command in
    flight is interrupted and its connection discarded; the others go back to the pool) and
    waits for them, which takes milliseconds. An exception raised in the block comes out of it
    unchanged.
    """
    plan = _normalise(folders)
    workers = _check_sizes(pool, batch_size, max_connections)
    fields = [data] if isinstance(data, str | bytes) else list(data)
    if not fields:
        raise ValueError("fetch_many() needs at least one data item to fetch")
    return _fetch_many(pool, plan, fields, batch_size, workers)


def _data_keys(fields: Sequence[str | bytes]) -> tuple[bytes, ...]:
    """The response keys of the message data asked for (``BODY.PEEK[TEXT]<0.100>`` is answered
    as ``BODY[TEXT]<0>``): the start of each key, up to the section's closing bracket."""
    keys = []
    for field in fields:
        word = (field.encode() if isinstance(field, str) else field).upper().strip()
        word = word.replace(b"BODY.PEEK[", b"BODY[").replace(b"BINARY.PEEK[", b"BINARY[")
        if word.startswith((b"BODY[", b"BINARY[")):
            keys.append(word.split(b"]", 1)[0] + b"]")
        elif word in (b"RFC822", b"RFC822.HEADER", b"RFC822.TEXT"):
            keys.append(word)
    return tuple(keys)


def _has_data(data: Mapping[bytes, Any], keys: tuple[bytes, ...]) -> bool:
    """Whether a fetched message has every piece of message data asked for, and none of it
    NIL: a message expunged by another session may come back as ``BODY[] NIL``, or without
    it."""
    for key in keys:
        found = [value for name, value in data.items() if name.startswith(key)]
        if not found or any(value is None for value in found):
            return False
    return True


def _fetch_pipelined(
    client: IMAPClient,
    steps: list[tuple[str, Sequence[int]]],
    fields: list[str | bytes],
    reading: list[int],
    fresh: frozenset[int],
) -> list[PipelinedFetch]:
    assert isinstance(client, TrackingClient)
    return client.fetch_pipelined(steps, fields, reading, fresh)


@asynccontextmanager
async def _fetch_many(
    pool: Pool,
    plan: Mapping[str, Sequence[int] | _Search],
    fields: list[str | bytes],
    batch_size: int,
    workers: int,
) -> AsyncIterator[FetchResults]:
    wanted = _data_keys(fields)

    def delivery(outcome: PipelinedFetch, work: _Work) -> _Delivery | PipelinedFetch:
        if outcome.fetched is None:
            return outcome
        fetched: dict[int, dict[bytes, Any]] = outcome.fetched
        if isinstance(work.uids, range):
            # UIDs of a range that are not returned never existed: only those returned
            # without their data are missing.
            returned = sorted(uid for uid in fetched if uid in work.uids)
            messages = collections.deque(
                (uid, found) for uid in returned if _has_data(found := fetched[uid], wanted)
            )
            skipped = len(returned) - len(messages)
        else:
            messages = collections.deque(
                (uid, data)
                for uid in work.uids
                if (data := fetched.pop(uid, None)) is not None and _has_data(data, wanted)
            )
            skipped = len(work.uids) - len(messages)
        return _Delivery(work.folder, messages, skipped, outcome.examined)

    async def fetch_pipelined(
        conn: Connection, works: list[_Work], cursor: _Cursor
    ) -> list[_Delivery | PipelinedFetch]:
        steps = [(work.folder, work.uids) for work in works]
        fresh = frozenset(index for index, work in enumerate(works) if work.probe)
        reading = [0]
        try:
            outcomes = await conn.run_sync(_fetch_pipelined, steps, fields, reading, fresh)
        except Exception:
            cursor.work = works[reading[0]]
            cursor.step = "command"
            raise
        return [delivery(outcome, work) for work, outcome in zip(works, outcomes, strict=True)]

    async def search_and_fetch(
        conn: Connection, work: _Work, first: range, cursor: _Cursor
    ) -> tuple[list[int], _Delivery] | None:
        assert work.search is not None
        criteria = work.search.criteria
        found, fetched, error, command = await conn.run_sync(
            _search_and_fetch, work.folder, criteria, first, fields
        )
        if error is not None:
            cursor.step = "select" if command == "select" else "command"
            raise error
        if found is None:
            return None  # the server cannot: search first
        cursor.step = "command"
        head = _Work(work.folder, [uid for uid in found if uid in first])
        result = delivery(PipelinedFetch(fetched, None, None), head)
        assert isinstance(result, _Delivery)
        return found, result

    await trio.lowlevel.checkpoint()
    send, receive = trio.open_memory_channel[_Delivery](0)
    fanout = _FanOut(
        pool,
        plan,
        operation="FETCH",
        mode="read-only",
        batch_size=batch_size,
        workers=workers,
        run_batch=None,
        run_pipelined=fetch_pipelined,
        send=send,
        run_search_fetch=search_and_fetch,
    )
    results = FetchResults(receive, fanout)

    async def produce() -> None:
        await fanout.run()
        if fanout.error is not None and not fanout.error_reported and not results._in_next:
            # The caller is not waiting in the iteration: cancel the block, as a nursery
            # cancels its body when a child fails; the error comes out of the async with.
            results._body_scope.cancel()

    body_error: BaseException | None = None
    with receive:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            try:
                with results._body_scope:
                    yield results
            except BaseException as exc:
                # Kept out of the nursery so that it is not wrapped in an exception group.
                body_error = exc
            finally:
                nursery.cancel_scope.cancel()
                results._closed = True
    if body_error is not None:
        raise body_error
    error = fanout.take_error()
    if error is not None:
        raise error from error.__cause__


# -- the operations that run to the end --------------------------------------------------------


async def _run_to_end(fanout: _FanOut) -> None:
    await trio.lowlevel.checkpoint_if_cancelled()
    await fanout.run()
    error = fanout.take_error()
    if error is not None:
        raise error from error.__cause__
    await trio.lowlevel.cancel_shielded_checkpoint()


async def search_many(
    pool: Pool,
    folders: Iterable[str],
    criteria: Criteria = "ALL",
    *,
    charset: str | None = None,
    max_connections: int | None = None,
) -> dict[str, list[int]]:
    """Search many folders concurrently, one SEARCH per folder.

    ::

        unseen = await search_many(pool, ["INBOX", "Lists/trio", "Archive"], ["UNSEEN"])
        total = sum(len(uids) for uids in unseen.values())

    Args:
        pool: The pool to check connections out of.
        folders: The folders to search.
        criteria: As for :meth:`imapclient.IMAPClient.search`.
        charset: As for :meth:`imapclient.IMAPClient.search`.
        max_connections: Connections used at once; default and upper bound the pool's
            ``max_size``.

    Returns:
        Folder -> matching UIDs (ascending), in the order of *folders*.

    Raises:
        ValueError: *max_connections* is not a positive int.
        FanOutError: A search failed (``uids`` is empty); the others were cancelled.

    **Cancellation**: a checkpoint. A cancellation interrupts the searches in flight (their
    connections are discarded), returns the other connections, and propagates.
    """
    names = list(dict.fromkeys(folders))
    if any(not isinstance(name, str) for name in names):
        raise TypeError(f"folder names must be str: {names!r}")
    fanout = _FanOut(
        pool,
        {name: _Search(criteria) for name in names},
        operation="SEARCH",
        mode="any",
        batch_size=1,
        workers=_check_sizes(pool, 1, max_connections),
        run_batch=None,
        charset=charset,
    )
    await _run_to_end(fanout)
    return {name: fanout.found[name] for name in names}


def _write(name: str, *args: Any, **kwargs: Any) -> _RunBatch:
    """A write batch (STORE, COPY, MOVE): ``conn.<name>(uids, *args, **kwargs)``, with a NOOP
    pipelined before it when the folder was selected before the batch's turn (see
    :func:`~trio_imappool._client.after_noop`: no extra round trip)."""

    async def run(conn: Connection, work: _Work, selected_before: bool) -> None:
        uids = list(work.uids)
        if selected_before:
            await conn.run_sync(after_noop, name, (uids, *args), kwargs)
        else:
            await getattr(conn, name)(uids, *args, **kwargs)

    return run


def _flags_runner(name: str, flags: Sequence[str | bytes]) -> _RunBatch:
    return _write(name, flags, silent=True)


def _copy_runner(name: str, destination: str) -> _RunBatch:
    return _write(name, destination)


async def _store_many(
    pool: Pool,
    messages: Mapping[str, Messages],
    flags: Sequence[str | bytes] | str | bytes,
    name: str,
    batch_size: int,
    max_connections: int | None,
) -> None:
    flag_list = [flags] if isinstance(flags, str | bytes) else list(flags)
    fanout = _FanOut(
        pool,
        _normalise(messages),
        operation="STORE",
        mode="read-write",
        batch_size=batch_size,
        workers=_check_sizes(pool, batch_size, max_connections),
        run_batch=_flags_runner(name, flag_list),
    )
    await _run_to_end(fanout)


async def add_flags_many(
    pool: Pool,
    messages: Mapping[str, Messages],
    flags: Sequence[str | bytes] | str | bytes,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_connections: int | None = None,
) -> None:
    """Add flags to messages of many folders, one ``UID STORE +FLAGS.SILENT`` per batch.

    ::

        await add_flags_many(pool, {"INBOX": uids, "Lists/trio": ["UNSEEN"]}, [r"\\Seen"])

    Args:
        pool: The pool to check connections out of.
        messages: Folder -> UIDs, or search criteria (searched first), as for
            :func:`fetch_many`. UIDs that no longer exist are ignored by the server.
        flags: The flags to add (``r"\\Seen"``, ``[r"\\Flagged", "$Label1"]``).
        batch_size: UIDs per STORE.
        max_connections: Connections used at once; default and upper bound the pool's
            ``max_size``.

    Raises:
        TypeError, ValueError: Invalid arguments, before anything is sent.
        FanOutError: A batch failed; the batches in flight were interrupted, the others not
            started. Batches done before stay done: nothing is rolled back or retried.

    **Cancellation**: a checkpoint. A cancellation interrupts the batches in flight (they may
    or may not have been applied; their connections are discarded) and starts no more.
    """
    await _store_many(pool, messages, flags, "add_flags", batch_size, max_connections)


async def remove_flags_many(
    pool: Pool,
    messages: Mapping[str, Messages],
    flags: Sequence[str | bytes] | str | bytes,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_connections: int | None = None,
) -> None:
    """Remove flags from messages of many folders, one ``UID STORE -FLAGS.SILENT`` per batch.

    ::

        await remove_flags_many(pool, {"INBOX": ["FLAGGED"]}, [r"\\Flagged"])

    Arguments, errors and cancellation as for :func:`add_flags_many`.

    **Cancellation**: a checkpoint. A cancellation interrupts the batches in flight (they may
    or may not have been applied; their connections are discarded) and starts no more.
    """
    await _store_many(pool, messages, flags, "remove_flags", batch_size, max_connections)


async def _transfer_many(
    pool: Pool,
    messages: Mapping[str, Messages],
    destination: str,
    operation: Literal["COPY", "MOVE"],
    batch_size: int,
    max_connections: int | None,
) -> None:
    if not isinstance(destination, str):
        raise TypeError(f"destination must be a folder name (str), not {destination!r}")
    check_wire_text("the destination folder name", destination)
    fanout = _FanOut(
        pool,
        _normalise(messages),
        operation=operation,
        mode="any" if operation == "COPY" else "read-write",
        batch_size=batch_size,
        workers=_check_sizes(pool, batch_size, max_connections),
        run_batch=_copy_runner(operation.lower(), destination),
    )
    await _run_to_end(fanout)


async def copy_many(
    pool: Pool,
    messages: Mapping[str, Messages],
    destination: str,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_connections: int | None = None,
) -> None:
    """Copy messages of many folders to one folder, one ``UID COPY`` per batch.

    ::

        await copy_many(pool, {"INBOX": uids, "Lists/trio": ["SINCE", date(2026, 1, 1)]},
                        "Archive/2026")

    Batches run concurrently, so the copies may arrive in *destination* in any order of
    batches. The source folders are selected read-only unless a connection already has one
    selected.

    Args:
        pool: The pool to check connections out of.
        messages: Folder -> UIDs, or search criteria (searched first), as for
            :func:`fetch_many`. UIDs that no longer exist are ignored by the server.
        destination: The folder to copy to; it must exist.
        batch_size: UIDs per COPY.
        max_connections: Connections used at once; default and upper bound the pool's
            ``max_size``.

    Raises:
        TypeError, ValueError: Invalid arguments, before anything is sent.
        FanOutError: A batch failed (say, *destination* does not exist); the batches in
            flight were interrupted, the others not started. Copies made before stay.

    **Cancellation**: a checkpoint. A cancellation interrupts the batches in flight (they may
    or may not have been copied; their connections are discarded) and starts no more.
    """
    await _transfer_many(pool, messages, destination, "COPY", batch_size, max_connections)


async def move_many(
    pool: Pool,
    messages: Mapping[str, Messages],
    destination: str,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_connections: int | None = None,
) -> None:
    """Move messages of many folders to one folder, one ``UID MOVE`` (RFC 6851) per batch.

    ::

        await move_many(pool, {"INBOX": ["BEFORE", date(2025, 1, 1)]}, "Archive/2024")

    Each batch is atomic on the server; the operation as a whole is not. The server must have
    the MOVE capability (Dovecot, Gmail, Microsoft 365 and most others do); without it the
    first batches fail with :class:`imapclient.exceptions.CapabilityError` before anything is
    sent.

    Args:
        pool: The pool to check connections out of.
        messages: Folder -> UIDs, or search criteria (searched first), as for
            :func:`fetch_many`. UIDs that no longer exist are ignored by the server.
        destination: The folder to move to; it must exist.
        batch_size: UIDs per MOVE.
        max_connections: Connections used at once; default and upper bound the pool's
            ``max_size``.

    Raises:
        TypeError, ValueError: Invalid arguments, before anything is sent.
        FanOutError: A batch failed; the batches in flight were interrupted, the others not
            started. Batches moved before stay moved.

    **Cancellation**: a checkpoint. A cancellation interrupts the batches in flight (they may
    or may not have been moved; their connections are discarded) and starts no more.
    """
    await _transfer_many(pool, messages, destination, "MOVE", batch_size, max_connections)
