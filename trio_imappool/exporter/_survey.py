"""What an account holds and what an export would fetch, without fetching or writing anything.

The ``trio-imappool folders`` command and ``export --dry-run`` are built on :func:`survey`: it
lists the folders with their status exactly as :func:`~trio_imappool.export_maildir` does (the
same NAMESPACE and LIST-STATUS round trips, the same folder choice relative to the personal
namespace, and the same unusable-name checks), and,
for a destination, reads that Maildir's message files and state files and plans each folder
with the exporter's own planning rule (``_plan``), so that the count shown is the count an
export starts with. Unlike the exporter it creates no directory, takes no lock, cleans no
``tmp/`` and moves no file of an old UIDVALIDITY aside: it only reads.

Sizes come from ``STATUS (SIZE)`` (RFC 8438; Dovecot 2.3 has it) where the server advertises
``STATUS=SIZE``: one short round trip per non-empty folder, spread over the pool. A server
without it is asked ``UID FETCH ... (RFC822.SIZE)`` for every message of the folder (with
:func:`~trio_imappool.fetch_many`: about 30 bytes of answer per message, no message data).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import trio

from trio_imappool import Pool, fetch_many
from trio_imappool.wire import connection_survives

from ._local import _assign_paths, _Folder, _plan, _same_folder
from ._naming import local_folder_name, parse_message_filename
from ._run import _server_folders
from ._server import FolderFailure, ServerFolder, _select
from ._state import read_folder_state

__all__ = ["PlannedFolder", "Survey", "survey"]


@dataclasses.dataclass(frozen=True, slots=True)
class PlannedFolder:
    """One server folder, and what an export into a destination would do with it.

    Attributes:
        server: The folder and its status (messages, UIDNEXT, UIDVALIDITY) as listed.
        local: Its directory name in a Maildir++ tree (``""`` for the destination itself).
        size: The sum of its messages' sizes in bytes, or None when not asked for (or when
            the server refused the folder's STATUS).
        exported: Messages of its current UIDVALIDITY already in the destination (0 without
            one).
        new: Messages an export would fetch (the exporter's estimate from the status and the
            local files; None without a destination).
        aside: Files of another UIDVALIDITY (or of another folder) that an export would move
            to ``trio-imappool-replaced/`` before exporting the folder again.
    """

    server: ServerFolder
    local: str
    size: int | None = None
    exported: int = 0
    new: int | None = None
    aside: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Survey:
    """The chosen folders in export order (INBOX first), and the folders that cannot be
    exported (with the reason)."""

    folders: tuple[PlannedFolder, ...]
    failures: tuple[FolderFailure, ...]
    size_source: str | None  # "STATUS=SIZE", "RFC822.SIZE" or None (sizes not asked for)


def _our_files(path: Path) -> set[tuple[int, int]]:
    """(uidvalidity, uid) of our message files in ``cur/`` and ``new/``; none when missing."""
    found: set[tuple[int, int]] = set()
    for sub in ("cur", "new"):
        try:
            entries = os.scandir(path / sub)
        except (FileNotFoundError, NotADirectoryError):
            continue
        with entries:
            for entry in entries:
                key = parse_message_filename(entry.name)
                if key is not None:
                    found.add(key)
    return found


def _plan_local(root: Path, servers: Sequence[ServerFolder]) -> list[PlannedFolder]:
    """Each folder's directory and what an export would fetch into it. Synchronous; reads only.

    The reconciliation follows the exporter's (``_prepare_one``) without its writes: files of
    another UIDVALIDITY, or of another folder named by the directory's state file, do not
    count (an export would move them aside); the state's ``synced_below`` counts only where
    the files back it.
    """
    planned: list[PlannedFolder] = []
    placed, _failures = _assign_paths(root, servers)  # reads the state files of contested names
    for server, path in placed:
        state = read_folder_state(path)
        files = _our_files(path)
        foreign = state is not None and not _same_folder(state.folder, server.name)
        stale = {key for key in files if foreign or key[0] != server.uidvalidity}
        exported = {uid for uidvalidity, uid in files - stale}
        synced_below = 0
        if (
            state is not None
            and not foreign
            and state.uidvalidity == server.uidvalidity
            and state.uids <= exported
            and state.synced_below <= server.uidnext
        ):
            synced_below = state.synced_below
        folder = _Folder(server, path, exported, synced_below, state, moved_aside=len(stale))
        _plan(folder)  # the exporter's own rule: sets spec and expected, no I/O
        new = folder.expected if folder.spec is not None else 0
        local = "" if path == root else path.name
        planned.append(PlannedFolder(server, local, None, len(exported), new, len(stale)))
    planned.sort(key=lambda f: (f.local != "", f.server.name))
    return planned


async def _sizes(
    pool: Pool, folders: Sequence[ServerFolder], max_connections: int
) -> tuple[dict[str, int | None], str]:
    sizes: dict[str, int | None] = {f.name: 0 for f in folders}
    asked = [f for f in folders if f.messages > 0]
    if not asked:
        return sizes, "STATUS=SIZE"
    async with pool.connection() as conn:
        has_size = await conn.has_capability("STATUS=SIZE")
    if has_size:
        limiter = trio.CapacityLimiter(max_connections)

        async def status(name: str) -> None:
            try:
                async with limiter, pool.connection() as conn:
                    answer = await conn.folder_status(name, ["SIZE"])
            except Exception as exc:
                if not connection_survives(exc):
                    raise
                sizes[name] = None  # a NO or BAD for this folder: its size is unknown
                return
            size = answer.get(b"SIZE")
            sizes[name] = size if isinstance(size, int) else None

        async with trio.open_nursery() as nursery:
            for folder in asked:
                nursery.start_soon(status, folder.name)
        return sizes, "STATUS=SIZE"
    specs = {f.name: "ALL" for f in asked}
    async with fetch_many(pool, specs, ["RFC822.SIZE"], max_connections=max_connections) as results:
        async for name, _uid, data in results:
            value = data.get(b"RFC822.SIZE")
            if isinstance(value, int):
                sizes[name] = (sizes[name] or 0) + value
    return sizes, "RFC822.SIZE"


async def survey(
    pool: Pool,
    destination: str | os.PathLike[str] | None,
    *,
    folders: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    sizes: bool = True,
    max_connections: int = 1,
) -> Survey:
    """List the account's folders with their status, their sizes, and what an export into
    *destination* would fetch; change nothing on the server or on disk.

    Args:
        pool: The account's pool.
        destination: A Maildir++ root (need not exist), or None for no plan.
        folders: Names or patterns to include, as for :func:`export_maildir`.
        exclude: Names or patterns to leave out.
        sizes: Ask the server for each folder's size (see the module's documentation).
        max_connections: Connections used at once for the sizes.

    Returns:
        A :class:`Survey`.

    Raises:
        FolderNotFoundError: A folder asked for by name is not on the server.
        ConnectError, PoolTimeout: As from :meth:`Pool.connection`.

    **Cancellation**: a checkpoint; a cancellation interrupts the commands in flight.
    """
    await trio.lowlevel.checkpoint()
    namespace, listed, failures = await _server_folders(pool)
    chosen, failures = _select(namespace, listed, failures, folders, exclude)
    if destination is None:
        planned = [
            PlannedFolder(f, local_folder_name(f.name, f.delimiter, f.namespace)) for f in chosen
        ]
    else:
        planned = await trio.to_thread.run_sync(_plan_local, Path(destination), chosen)
    source = None
    if sizes:
        found, source = await _sizes(pool, chosen, max_connections)
        planned = [dataclasses.replace(p, size=found[p.server.name]) for p in planned]
    return Survey(tuple(planned), tuple(sorted(failures, key=lambda f: f.name)), source)
