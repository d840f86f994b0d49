""":func:`export_maildir`: the export from start to end."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from trio_imappool.wire import DEFAULT_BATCH_SIZE, DEFAULT_MEMORY_BUDGET, check_wire_text

from ._base import _WRITE_QUEUE, _WRITERS, ExportError
from ._flags import _flag_pass, _plan_flags, _remove_gone
from ._local import _Folder, _Pending, _plan, _prepare
from ._results import ExportProgress, ExportResult, FolderReport
from ._run import _has_state, _list_server, _locked, _Run, _verify, _warm_up
from ._server import FolderFailure, _select
from ._state import _dir_times, _listing_holds, _write_state

if TYPE_CHECKING:
    from trio_imappool import Pool


async def export_maildir(
    pool: Pool,
    destination: str | os.PathLike[str],
    *,
    folders: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_connections: int | None = None,
    fsync: bool = True,
    progress: Callable[[ExportProgress], object] | None = None,
    delete: bool = False,
    memory_budget: int | None = DEFAULT_MEMORY_BUDGET,
) -> ExportResult:
    """Export folders of the pool's account to a Maildir, fetching only what is missing and
    following the server's flag changes and deletions (one-way).

    The folders are listed with their status (one ``LIST ... RETURN (STATUS ...)`` where the
    server has LIST-STATUS, with ``HIGHESTMODSEQ`` where it has CONDSTORE), compared with the
    files and state in the Maildir; the folders that changed since the last run get a flag
    pass (flags only, pipelined; see "Following the server" in the module's documentation),
    unchanged ones are not selected, and the missing messages are fetched with
    :func:`~trio_imappool.fetch_many` over up to *max_connections* pooled connections, while
    worker threads write them (see the module's documentation for the layout, the file names
    and what happens on a crash or a new UIDVALIDITY). On a first
    export (no state file in *destination* yet) the other connections are opened while the
    folders are listed, instead of when the fetching starts.

    A folder that cannot be exported (a name that cannot be asked for, a garbled STATUS, a
    directory that cannot be made, a NO to its EXAMINE) does not stop the others: it is in
    :attr:`ExportResult.folders_failed` with the reason. A message the server lists but does
    not return (left out of the FETCH answer, or ``BODY[] NIL``) is not recorded as exported:
    it is counted in :attr:`FolderReport.missing`, and the next run asks for it again.

    Args:
        pool: The pool of the account to export.
        destination: The Maildir++ root; created if missing. Nothing outside it is ever
            created, moved or deleted, whatever the server's folder names.
        folders: Folder names or shell-style patterns (``"Archive/*"``) to export; None for
            every selectable folder. Written with ``/`` between levels whatever the server's
            delimiter, and relative to the personal namespace: ``Archive/*`` matches
            ``INBOX.Archive.2024`` on a server whose namespace is ``INBOX.`` with ``.``
            (Courier); the name exactly as the server lists it matches too, and ``INBOX`` in
            any case. A name or pattern that matches no folder on the server is an error.
        exclude: Names or patterns of folders to leave out (written the same way).
        batch_size: UIDs per FETCH.
        max_connections: Connections used at once (default and upper bound: the pool's size).
        fsync: Flush every message (and the directories) to disk before it counts as exported.
            Without it an export is still safe against a killed process, not a power cut.
        progress: Called (synchronously, from the Trio thread) with an
            :class:`ExportProgress` after every batch of files written.
        delete: Remove the files of messages gone from the server (those noticed in this run
            and those kept by earlier runs). By default they are kept and counted
            (:attr:`FolderReport.gone`, :attr:`FolderReport.gone_kept`).
        memory_budget: Bytes of messages held at once, from the FETCH that asks for them
            until they are written to their files (default 64 MiB): the sizes of the new
            messages are asked first (``RFC822.SIZE``, one pipelined round trip per
            connection, and none at all when nothing is new), and the batches cut to fit (see
            *max_bytes* of :func:`~trio_imappool.fetch_many`). A message larger than the
            budget is fetched alone, once nothing else is held; it is read whole, so the
            peak is about the budget plus the largest message (when the server's sizes are
            true; a server whose sizes are too small is bounded by message counts). None:
            bounded by message
            counts only (``batch_size``), no sizes asked.

    Returns:
        An :class:`ExportResult`; :attr:`ExportResult.complete` is False when a folder failed
        or a message was missing.

    Raises:
        ValueError: *memory_budget* is neither None nor an int >= 1.
        ConfigurationError: A folder name or pattern holds CR, LF or NUL.
        ExportError: The destination cannot be used or written, or is locked by another
            export.
        FolderNotFoundError: A folder asked for by name is not on the server, or a pattern
            in *folders* matches none of its folders (an :class:`ExportError`; raised before
            anything is written).
        FanOutError: A FETCH failed in a way that ends the session (the original,
            imapclient's or the pool's, is ``__cause__``). Every message written before
            stays, and the next run goes on.
        imapclient.exceptions.IMAPClientError, OSError: The flag pass failed in a way that
            ends the session (EOF, timeout, a garbled answer; as imapclient raises it). Every
            file renamed before stays renamed; the next run asks again.
        ConnectError, PoolTimeout: As from :meth:`Pool.connection` for the listing.

    Errors come out as they were raised, never wrapped in an exception group.

    **Cancellation**: a checkpoint. A cancellation interrupts the commands in flight, lets the
    files being written land in ``cur/`` (a worker thread finishes its batch, or its renames),
    and saves no state; every file in ``cur/`` is a whole message under its old name or its
    new one, and the next run fetches the rest and asks for the flag changes again.

    Connections used for a flag pass on a server with QRESYNC keep it enabled (RFC 7162): the
    server reports expunges on them as ``VANISHED`` instead of ``EXPUNGE`` from then on.
    """
    await trio.lowlevel.checkpoint()
    for pattern in [*(folders or ()), *exclude]:
        check_wire_text("a folder name or pattern", pattern)
    if memory_budget is not None and (
        isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 1
    ):
        raise ValueError(f"memory_budget must be an int >= 1 or None, not {memory_budget!r}")
    root = Path(destination)
    started = time.monotonic()
    with _locked(root):
        try:
            warm = not await trio.to_thread.run_sync(_has_state, root)
        except OSError as exc:
            raise ExportError(f"cannot read the Maildir {root}: {exc}") from exc
        size = pool.config.max_size
        warm_ups = min(max_connections or size, size) - 1 if warm else 0
        body_error: BaseException | None = None
        async with trio.open_nursery() as warming:
            # A first export: open the other connections while the folders are listed.
            for _ in range(warm_ups):
                warming.start_soon(_warm_up, pool)
            try:
                prepared, run, failures = await _export(
                    pool,
                    root,
                    folders,
                    exclude,
                    batch_size,
                    max_connections,
                    fsync,
                    progress,
                    delete,
                    memory_budget,
                    warm,
                )
            except BaseException as exc:
                # Kept out of the nursery, so that it is not wrapped in an exception group.
                body_error = exc
            finally:
                warming.cancel_scope.cancel()
        if body_error is not None:
            raise body_error
        done = [f for f in prepared if f.failure is None]
        failures += [FolderFailure(f.server.name, f.failure) for f in prepared if f.failure]
        try:
            await trio.to_thread.run_sync(_save_states, done, fsync)
        except OSError as exc:
            raise ExportError(f"cannot save the state in {root}: {exc}") from exc
    return ExportResult(
        folders=tuple(
            FolderReport(
                name=f.server.name,
                path=f.path,
                uidvalidity=f.server.uidvalidity,
                messages=f.server.messages,
                fetched=f.fetched,
                bytes=f.bytes,
                exported=len(f.exported),
                uidvalidity_changed=f.uidvalidity_changed,
                moved_aside=f.moved_aside,
                missing=len(f.missing),
                flags_changed=f.flags_changed,
                gone=f.gone_new,
                gone_kept=len(f.gone),
                removed=f.removed,
            )
            for f in done
        ),
        messages_fetched=run.messages,
        bytes_fetched=run.bytes,
        messages_skipped=run.skipped,
        folders_fetched=run.folders_handed,
        elapsed=time.monotonic() - started,
        folders_failed=tuple(sorted(failures, key=lambda f: f.name)),
        messages_missing=sum(len(f.missing) for f in done),
    )


async def _export(
    pool: Pool,
    root: Path,
    folders: Sequence[str] | None,
    exclude: Sequence[str],
    batch_size: int,
    max_connections: int | None,
    fsync: bool,
    progress: Callable[[ExportProgress], object] | None,
    delete: bool,
    memory_budget: int | None = None,
    first: bool = False,
) -> tuple[list[_Folder], _Run, list[FolderFailure]]:
    """List, reconcile, fetch and write, then look for what did not come; the state is left
    to the caller. A *first* export asks the folders' sizes with the listing: if the account
    fits in the memory budget, no message sizes are asked."""
    sizes = first and memory_budget is not None
    namespace, listed, failures, caps = await _list_server(pool, sizes)
    chosen, failures = _select(namespace, listed, failures, folders, exclude)
    try:
        prepared, more = await trio.to_thread.run_sync(_prepare, root, chosen, fsync)
    except OSError as exc:
        raise ExportError(f"cannot prepare the Maildir {root}: {exc}") from exc
    failures += more
    # Flags and deletions first (no bodies: one round trip per connection), then new mail.
    _plan_flags(prepared, caps)
    await _flag_pass(pool, prepared, caps, max_connections, fsync)
    if delete:
        try:
            await trio.to_thread.run_sync(_remove_gone, prepared, fsync)
        except OSError as exc:
            raise ExportError(f"cannot remove a message gone from the server: {exc}") from exc
    run = _Run(prepared, fsync, progress, memory_budget)
    for _round in range(len(prepared) + 1):  # each further round follows a failed folder
        batch = run.plan()
        if not batch:
            break
        run.retry = False
        run.report()
        send, receive = trio.open_memory_channel[list[_Pending]](_WRITE_QUEUE)
        async with trio.open_nursery() as nursery:
            for _ in range(_WRITERS):
                nursery.start_soon(run.writer, receive.clone(), nursery.cancel_scope)
            receive.close()
            nursery.start_soon(
                run.fetch, pool, batch, batch_size, max_connections, send, nursery.cancel_scope
            )
        if run.error is not None:
            raise run.error
        if not run.retry:
            break
        for folder in prepared:  # the folders that did not fail: what is still to fetch
            folder.spec, folder.expected = None, 0
            if folder.failure is None:
                _plan(folder)
    await _verify(pool, run, max_connections)
    return prepared, run, failures


def _save_states(folders: Sequence[_Folder], fsync: bool) -> None:
    for folder in folders:
        times = _dir_times(folder.path)
        listing = (*times, time.time_ns())
        old = folder.old_state
        if (
            old is not None
            and old.listing[:2] == times
            and (_listing_holds(old.listing, times) or not _listing_holds(listing, times))
        ):
            listing = old.listing  # the same directories: no reason to write the state
        state = folder.state(listing)
        if state != old:
            _write_state(folder.path, state, fsync)
