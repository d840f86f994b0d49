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

**Where it is.** This module has the operations that run to the end and re-exports the rest:
the planner (:mod:`._fanout_plan`: what goes to which connection, no trio), the progress
(:mod:`._fanout_progress`), the engine (:mod:`._fanout_engine`: the tasks and their
connections) and :func:`fetch_many` with its results (:mod:`._fanout_fetch`). All of it takes
a :class:`~trio_imappool._surface.PoolSurface`, never the pool's class.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Literal

from ._client import after_noop
from ._config import check_wire_text
from ._fanout_engine import (
    DEFAULT_BATCH_SIZE,
    PIPELINE_DEPTH,
    FanOut,
    FanOutError,
    RunBatch,
    run_to_end,
    search_and_fetch,
    select_and_search,
)
from ._fanout_fetch import FetchResults, fetch_many, fetch_pipelined
from ._fanout_plan import Criteria, Messages, Search, Work, check_sizes, normalise
from ._fanout_progress import Progress

if TYPE_CHECKING:
    from ._connection import Connection
    from ._surface import PoolSurface

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "Criteria",
    "FanOutError",
    "FetchResults",
    "Messages",
    "Progress",
    "add_flags_many",
    "copy_many",
    "fetch_many",
    "move_many",
    "remove_flags_many",
    "search_many",
]

# Kept under their old names, where the tests look for them: what the engine runs in worker
# threads, and how many batches a fetch task sends at once.
_PIPELINE_DEPTH: Final = PIPELINE_DEPTH
_fetch_pipelined = fetch_pipelined
_search_and_fetch = search_and_fetch
_select_and_search = select_and_search


# -- the operations that run to the end --------------------------------------------------------


async def search_many(
    pool: PoolSurface,
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
    fanout = FanOut(
        pool,
        {name: Search(criteria) for name in names},
        operation="SEARCH",
        mode="any",
        batch_size=1,
        workers=check_sizes(pool.config.max_size, 1, max_connections),
        run_batch=None,
        charset=charset,
    )
    await run_to_end(fanout)
    return {name: fanout.found[name] for name in names}


def _write(name: str, *args: Any, **kwargs: Any) -> RunBatch:
    """A write batch (STORE, COPY, MOVE): ``conn.<name>(uids, *args, **kwargs)``, with a NOOP
    pipelined before it when the folder was selected before the batch's turn (see
    :func:`~trio_imappool._client.after_noop`: no extra round trip)."""

    async def run(conn: Connection, work: Work, selected_before: bool) -> None:
        uids = list(work.uids)
        if selected_before:
            await conn.run_sync(after_noop, name, (uids, *args), kwargs)
        else:
            await getattr(conn, name)(uids, *args, **kwargs)

    return run


def _flags_runner(name: str, flags: Sequence[str | bytes]) -> RunBatch:
    return _write(name, flags, silent=True)


def _copy_runner(name: str, destination: str) -> RunBatch:
    return _write(name, destination)


async def _store_many(
    pool: PoolSurface,
    messages: Mapping[str, Messages],
    flags: Sequence[str | bytes] | str | bytes,
    name: str,
    batch_size: int,
    max_connections: int | None,
) -> None:
    flag_list = [flags] if isinstance(flags, str | bytes) else list(flags)
    fanout = FanOut(
        pool,
        normalise(messages),
        operation="STORE",
        mode="read-write",
        batch_size=batch_size,
        workers=check_sizes(pool.config.max_size, batch_size, max_connections),
        run_batch=_flags_runner(name, flag_list),
    )
    await run_to_end(fanout)


async def add_flags_many(
    pool: PoolSurface,
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
    pool: PoolSurface,
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
    pool: PoolSurface,
    messages: Mapping[str, Messages],
    destination: str,
    operation: Literal["COPY", "MOVE"],
    batch_size: int,
    max_connections: int | None,
) -> None:
    if not isinstance(destination, str):
        raise TypeError(f"destination must be a folder name (str), not {destination!r}")
    check_wire_text("the destination folder name", destination)
    fanout = FanOut(
        pool,
        normalise(messages),
        operation=operation,
        mode="any" if operation == "COPY" else "read-write",
        batch_size=batch_size,
        workers=check_sizes(pool.config.max_size, batch_size, max_connections),
        run_batch=_copy_runner(operation.lower(), destination),
    )
    await run_to_end(fanout)


async def copy_many(
    pool: PoolSurface,
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
    pool: PoolSurface,
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
