"""Following the server: the flag pass (flag changes and deletions) before new mail is fetched."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from trio_imappool.wire import FlagAnswer, FlagStep, fetch_flags

from ._base import _FLAGS_PER_CONNECTION, ExportError
from ._local import _Folder
from ._naming import maildir_flags
from ._server import _Capabilities, _one_line
from ._state import _fsync_dir

if TYPE_CHECKING:
    from trio_imappool import Pool


# -- following the server: flags and deletions ---------------------------------------------------


def _flag_step(folder: _Folder, caps: _Capabilities) -> FlagStep | None:
    """What the flag pass must ask the server about *folder*, or None if nothing can have
    changed for the messages it has. Synchronous, pure.

    Without CONDSTORE (or without a modseq from the last run) every message's flags are
    listed, which also says which UIDs still exist. With CONDSTORE and an unchanged
    HIGHESTMODSEQ nothing is asked, unless the counts say that messages were expunged (a
    server without QRESYNC need not change the modseq then); otherwise only the messages
    changed since the last run's modseq, and with QRESYNC the UIDs expunged since then.
    """
    server = folder.server
    if not folder.exported - folder.gone:
        return None  # nothing here whose flags could change (a first export, say)
    modseq = server.highestmodseq
    if not caps.condstore or modseq == 0 or folder.modseq == 0 or modseq < folder.modseq:
        return FlagStep(server.name)
    uidnext, messages = folder.last_counts
    # Messages now = before + appended - expunged, and at most UIDNEXT's growth was appended:
    # equality leaves no room for an expunge.
    only_appended = (
        messages >= 0 and uidnext > 0 and server.messages == messages + server.uidnext - uidnext
    )
    if modseq == folder.modseq and only_appended:
        return None
    if caps.qresync:
        return FlagStep(server.name, since=folder.modseq, vanished=True)
    if not only_appended:
        return FlagStep(server.name)  # expunges, and no VANISHED: compare the UID sets
    return FlagStep(server.name, since=folder.modseq)


def _plan_flags(folders: Sequence[_Folder], caps: _Capabilities) -> None:
    """Decide each folder's flag pass (``step``); settle the ones that need none."""
    for folder in folders:
        if folder.failure is not None:
            continue
        folder.step = _flag_step(folder, caps)
        if folder.step is None:
            folder.flags_synced = True


def _new_info(info: str, letters: str) -> str:
    """The info letters of a file after the server's flags are applied: ours (DFRST) as the
    server says, any others (a mail reader's keywords) kept; in ASCII order."""
    kept = {c for c in info if c not in "DFRST"}
    return "".join(sorted(kept | set(letters)))


def _rename_for_flags(folder: _Folder, flags: dict[int, tuple[bytes, ...]], fsync: bool) -> int:
    """Rename the files whose flags differ from the server's; the number renamed.

    Each file is renamed in its own directory (``rename(2)``: atomic, so a crash leaves it
    under its old name or its new one, never lost); the directories are flushed after.
    Synchronous.
    """
    changed = 0
    dirs: set[str] = set()
    files = folder.listed()
    for uid, server_flags in flags.items():
        file = files.get(uid)
        if file is None or uid in folder.gone:
            continue  # a new message of this run, or one not exported yet
        sub, name = file
        base, sep, info = name.partition(":2,")
        new_info = _new_info(info, maildir_flags(server_flags))
        if sep and new_info == info:
            continue
        new = f"{base}:2,{new_info}"
        directory = f"{folder.path}/{sub}"
        try:
            os.rename(f"{directory}/{name}", f"{directory}/{new}")
        except FileNotFoundError:
            continue  # moved or removed meanwhile (by a mail reader)
        files[uid] = (sub, new)
        changed += 1
        dirs.add(directory)
    if fsync:
        for directory in dirs:
            _fsync_dir(Path(directory))
    return changed


def _apply_answers(group: Sequence[_Folder], answers: Sequence[FlagAnswer], fsync: bool) -> None:
    """Apply a flag pass's answers to the folders' files (renames) and gone sets.
    Synchronous (a worker thread)."""
    for folder, answer in zip(group, answers, strict=True):
        step = folder.step
        if answer.error is not None or step is None:
            continue
        known = folder.exported - folder.gone
        trusted = True
        if step.since is None:
            # A full listing: what it does not name is gone, unless the server left messages
            # out of its answer (fewer than EXAMINE counted); then nothing is concluded.
            if answer.exists is not None and len(answer.flags) >= answer.exists:
                newly = known - answer.flags.keys()
            else:
                newly, trusted = set(), False
        else:
            newly = answer.vanished & known
        folder.gone |= newly
        folder.gone_new += len(newly)
        folder.flags_changed += _rename_for_flags(folder, answer.flags, fsync)
        folder.flags_synced = trusted


def _remove_gone(folders: Sequence[_Folder], fsync: bool) -> None:
    """``delete=True``: remove the files of messages gone from the server. Synchronous."""
    for folder in folders:
        if folder.failure is not None or not folder.gone:
            continue
        dirs: set[Path] = set()
        files = folder.listed()
        for uid in sorted(folder.gone):
            file = files.pop(uid, None)
            if file is not None:
                sub, name = file
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(folder.path / sub / name)
                    folder.removed += 1
                dirs.add(folder.path / sub)
            folder.exported.discard(uid)
        folder.gone.clear()
        if fsync:
            for directory in dirs:
                _fsync_dir(directory)


async def _flag_pass(
    pool: Pool,
    folders: Sequence[_Folder],
    caps: _Capabilities,
    max_connections: int | None,
    fsync: bool,
) -> None:
    """Ask the server about the folders with a ``step``, spread over up to *max_connections*
    connections (each asks about its folders in one round trip), and apply the answers.

    A NO or BAD for a folder fails that folder; an error that ends a session is raised.
    """
    todo = [f for f in folders if f.step is not None and f.failure is None]
    if not todo:
        return
    # Opening a connection costs round trips; a pipelined flag pass costs one. So the answers
    # share the connection the listing used, and only long full listings (parsing them is
    # the cost) are spread over more.
    size = pool.config.max_size
    listed = sum(f.server.messages for f in todo if f.step is not None and f.step.since is None)
    wanted = 1 + listed // _FLAGS_PER_CONNECTION
    count = min(max_connections or size, size, len(todo), wanted)
    groups: list[list[_Folder]] = [[] for _ in range(count)]
    loads = [0] * count

    def weight(folder: _Folder) -> int:
        step = folder.step
        return 1 + (folder.server.messages if step is not None and step.since is None else 0)

    for folder in sorted(todo, key=weight, reverse=True):
        least = loads.index(min(loads))
        groups[least].append(folder)
        loads[least] += weight(folder)
    fatal: list[BaseException] = []

    async def one(group: list[_Folder]) -> None:
        steps = [f.step for f in group if f.step is not None]
        try:
            async with pool.connection() as conn:
                answers = await conn.run_sync(fetch_flags, steps, caps.qresync)
        except Exception as exc:
            fatal.append(exc)
            nursery.cancel_scope.cancel()
            return
        for folder, answer in zip(group, answers, strict=True):
            if answer.error is not None:
                folder.failure = f"flag sync failed: {_one_line(answer.error)}"
        try:
            await trio.to_thread.run_sync(_apply_answers, group, answers, fsync)
        except OSError as exc:
            error = ExportError(f"cannot rename the files of a flag change: {exc}")
            error.__cause__ = exc
            fatal.append(error)
            nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        for group in groups:
            if group:
                nursery.start_soon(one, group)
    if fatal:
        raise fatal[0]
