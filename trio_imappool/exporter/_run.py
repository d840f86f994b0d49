"""One export run's fetching: the lock, the listing, the fetch over pooled connections and the
writer tasks, and the check for what did not come."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from trio_imappool import FanOutError, fetch_many
from trio_imappool.wire import ByteSemaphore, connection_survives, message_size, uid_set

from ._base import (
    _FETCH_ITEMS,
    _MAX_CRITERIA_CHARS,
    _WRITE_BATCH,
    _WRITERS,
    LOCK_NAME,
    STATE_NAME,
    ExportError,
)
from ._local import _Folder, _Pending, _write_batch
from ._naming import maildir_flags
from ._results import ExportProgress
from ._server import (
    FolderFailure,
    ServerFolder,
    _Capabilities,
    _list_in_namespace,
    _Namespace,
    _one_line,
)

if TYPE_CHECKING:
    from trio_imappool import Pool

# Sets of flags whose Maildir letters are remembered during a run.
_LETTERS_KEPT = 256


# -- the export ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ExportError(f"cannot use {root} as the destination: {exc}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise ExportError(f"{root} is being exported to by another process") from exc
            raise ExportError(f"cannot lock {root / LOCK_NAME}: {exc}") from exc
        yield
    finally:
        os.close(fd)  # also releases the lock


def _has_state(root: Path) -> bool:
    """Whether anything was exported to *root* before (a state file at the top or in a
    subfolder)."""
    if (root / STATE_NAME).exists():
        return True
    with os.scandir(root) as entries:
        return any(
            entry.name.startswith(".") and os.path.exists(os.path.join(entry.path, STATE_NAME))
            for entry in entries
        )


async def _warm_up(pool: Pool) -> None:
    """Check a connection out and back in, so that the pool opens one if none is idle.
    Errors are left to the real work to report."""
    with contextlib.suppress(Exception):
        async with pool.connection():
            pass


async def _server_folders(
    pool: Pool,
) -> tuple[_Namespace, list[ServerFolder], list[FolderFailure]]:
    namespace, listed, failures, _caps = await _list_server(pool)
    return namespace, listed, failures


async def _list_server(
    pool: Pool, sizes: bool = False
) -> tuple[_Namespace, list[ServerFolder], list[FolderFailure], _Capabilities]:
    """The namespace, the folders (with their STATUS SIZE if *sizes* and the server can) and
    what the server offers for following changes."""
    async with pool.connection() as conn:
        return await conn.run_sync(_list_in_namespace, sizes)


def _fits(chosen: Sequence[_Folder], limit: int) -> bool:
    """Whether everything to fetch fits in *limit* bytes at once, so that no sizes need asking:
    the folders' STATUS SIZE (all their messages together) says so, and every UID to fetch was
    below the UIDNEXT listed with it (no ``"ALL"``, which takes what came since)."""
    total = 0
    for folder in chosen:
        if folder.server.size is None or folder.spec == "ALL":
            return False
        total += folder.server.size
    return total <= limit


class _Run:
    """One export's fetching and writing; the decisions are synchronous, the I/O in tasks."""

    def __init__(
        self,
        folders: Sequence[_Folder],
        fsync: bool,
        progress: Callable[[ExportProgress], object] | None,
        memory_budget: int | None = None,
    ) -> None:
        self.by_name = {f.server.name: f for f in folders}
        self.memory_budget = memory_budget
        # Bytes of the messages being fetched, queued and written (a round's own).
        self.budget: ByteSemaphore | None = None
        self.fsync = fsync
        self.progress_fn = progress
        self.skipped = 0
        self.error: BaseException | None = None
        self.retry = False
        self.limiter = trio.CapacityLimiter(_WRITERS)
        self.folders_done = 0
        self.folders_handed = 0
        self.totals = (0, 0)
        self.messages = 0
        self.bytes = 0
        self._letters_of: dict[Any, str] = {}

    def plan(self) -> list[_Folder]:
        """The folders with something to fetch in the next round (their ``spec``)."""
        chosen = [f for f in self.by_name.values() if f.spec is not None and f.failure is None]
        for folder in chosen:
            if isinstance(folder.spec, list) and all(isinstance(u, int) for u in folder.spec):
                folder.asked.update(folder.spec)
            else:
                folder.whole = folder.spec == "ALL" and (folder.whole or not folder.searched)
                folder.searched = True
        self.totals = (len(chosen), sum(f.expected for f in chosen))
        self.budget = None
        limit = self.memory_budget
        if limit is not None and not _fits(chosen, limit):
            self.budget = ByteSemaphore(limit)
        self.folders_handed = max(self.folders_handed, len(chosen))
        self.folders_done = 0
        return chosen

    def report(self, folders_done: int | None = None) -> None:
        if folders_done is not None:
            self.folders_done = folders_done
        if self.progress_fn is not None:
            self.progress_fn(
                ExportProgress(
                    self.totals[0], self.folders_done, self.totals[1], self.messages, self.bytes
                )
            )

    def fail(self, exc: BaseException, scope: trio.CancelScope) -> None:
        if self.error is None:
            self.error = exc
        scope.cancel()

    async def writer(
        self, receive: trio.MemoryReceiveChannel[list[_Pending]], scope: trio.CancelScope
    ) -> None:
        try:
            async with receive:
                async for batch in receive:
                    # Raises ExportError naming the folder it could not write to.
                    await trio.to_thread.run_sync(
                        _write_batch, batch, self.fsync, limiter=self.limiter
                    )
                    self._written(batch)
                    batch.clear()  # nothing keeps a message alive once it is written
                    self.report()
        except Exception as exc:
            self.fail(exc, scope)

    def _written(self, batch: Sequence[_Pending]) -> None:
        """Count a batch written; its memory is free again."""
        if self.budget is not None:
            self.budget.release(sum(item.size for item in batch))
        for item in batch:
            item.folder.exported.add(item.uid)
            item.folder.fetched += 1
            item.folder.bytes += len(item.body)
            self.messages += 1
            self.bytes += len(item.body)

    def _letters(self, flags: Any) -> str:
        """:func:`maildir_flags`, remembered for the few sets of flags a mailbox has."""
        try:
            return self._letters_of[flags]
        except KeyError:
            letters = maildir_flags(flags)
            if len(self._letters_of) < _LETTERS_KEPT:  # a server could make up any number
                self._letters_of[flags] = letters
            return letters
        except TypeError:  # not hashable
            return maildir_flags(flags)

    def _pending(self, name: str, messages: list[tuple[int, dict[bytes, Any]]]) -> list[_Pending]:
        """A fetched batch's messages to write (those with nothing to write are released)."""
        folder = self.by_name[name]
        budget = self.budget
        exported, received = folder.exported, folder.received
        pending = []
        for uid, data in messages:
            body = data.get(b"BODY[]")
            # Ours to release once written (the budget covers the writers' queue).
            size = message_size(data) if budget is not None else 0
            if not isinstance(body, bytes) or uid in exported:
                # BODY[] NIL or no BODY[] at all; or already here.
                self.skipped += 1
                if isinstance(body, bytes):
                    received.add(uid)
                if budget is not None:
                    budget.release(size)
                continue
            received.add(uid)
            pending.append(_Pending(folder, uid, body, self._letters(data.get(b"FLAGS", ())), size))
        return pending

    async def fetch(
        self,
        pool: Pool,
        chosen: Sequence[_Folder],
        batch_size: int,
        max_connections: int | None,
        send: trio.MemorySendChannel[list[_Pending]],
        scope: trio.CancelScope,
    ) -> None:
        specs = {f.server.name: f.spec for f in chosen if f.spec is not None}
        try:
            async with (
                send,
                fetch_many(
                    pool,
                    specs,
                    _FETCH_ITEMS,
                    batch_size=batch_size,
                    max_connections=max_connections,
                    max_bytes=self.budget,
                ) as results,
            ):
                # A batch at a time: one checkpoint and one hand-over per batch, not per
                # message (most of the iteration's cost for small messages).
                async for name, messages in results.batches():
                    items = self._pending(name, messages)
                    # The messages are the items' now: nothing here keeps them alive while
                    # the next batch comes, once they are written.
                    del messages
                    # To the writers in chunks of a write batch: one thread hop each, and
                    # the messages waiting to be written bounded by counts without a budget.
                    for start in range(0, len(items), _WRITE_BATCH):
                        chunk = items[start : start + _WRITE_BATCH]
                        try:
                            send.send_nowait(chunk)
                        except trio.WouldBlock:
                            await send.send(chunk)
                        del chunk
                    del items
                    done = results.progress.folders_done
                    if done != self.folders_done:
                        self.report(done)
                self.report(results.progress.folders_done)
        except FanOutError as exc:
            # A NO or BAD for one folder (deleted meanwhile, or a server that will not
            # EXAMINE it): that folder fails, the others go on in another round.
            failed = self.by_name.get(exc.folder)
            cause = exc.__cause__
            if failed is not None and cause is not None and connection_survives(cause):
                failed.failure = f"{exc.operation} failed: {_one_line(cause)}"
                self.retry = True
            else:
                self.fail(exc, scope)
        except Exception as exc:
            self.fail(exc, scope)


async def _verify(pool: Pool, run: _Run, max_connections: int | None) -> None:
    """Find the messages that were asked for and exist but did not come: a UID SEARCH per
    folder where the fetch left something unanswered. Sets each folder's ``missing``."""
    checks: list[tuple[_Folder, list[Any], set[int] | None]] = []
    for folder in run.by_name.values():
        if folder.failure is not None:
            continue
        server = folder.server
        if folder.searched:
            listed = sum(1 for uid in folder.received if uid < server.uidnext)
            if folder.whole and listed >= server.messages:
                continue  # a first export that received every message the status counted
            low = max(folder.synced_below, 1)
            if low < server.uidnext:
                checks.append((folder, ["UID", f"{low}:{server.uidnext - 1}"], None))
            continue
        unanswered = folder.asked - folder.received - folder.exported
        if unanswered:
            ranges = uid_set(sorted(unanswered))
            if len(ranges) > _MAX_CRITERIA_CHARS:
                low, high = min(unanswered), max(unanswered)
                checks.append((folder, ["UID", f"{low}:{high}"], unanswered))
            else:
                checks.append((folder, ["UID", ranges], unanswered))
    if not checks:
        return
    limiter = trio.CapacityLimiter(max_connections or pool.config.max_size)
    fatal: list[BaseException] = []

    async def check(folder: _Folder, criteria: list[Any], among: set[int] | None) -> None:
        try:
            async with limiter, pool.connection(folder.server.name, readonly=True) as conn:
                found = await conn.run_sync(lambda c: c.search(criteria))
        except Exception as exc:
            if connection_survives(exc):
                folder.failure = f"SEARCH failed: {_one_line(exc)}"
            else:
                fatal.append(exc)
                nursery.cancel_scope.cancel()
            return
        exist = {int(uid) for uid in found if int(uid) < folder.server.uidnext}
        if among is not None:
            exist &= among
        folder.missing = sorted(exist - folder.exported)

    async with trio.open_nursery() as nursery:
        for folder, criteria, among in checks:
            nursery.start_soon(check, folder, criteria, among)
    if fatal:
        raise fatal[0]
