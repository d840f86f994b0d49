"""The per-folder state file (``trio-imappool.json``): what it holds, reading (and
upgrading format 1), writing atomically."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Final

from imapclient.exceptions import ProtocolError

from trio_imappool.wire import parse_uid_set, uid_set

from ._base import _STATE_FORMAT, _TMP_PREFIX, STATE_NAME

# -- the state file ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class FolderState:
    """What ``trio-imappool.json`` of a folder says.

    The file is versioned (``"format"``): format 1 (before flags and deletions were followed)
    is read as format 2 with no modseq, nothing gone and the counts unknown, so the first run
    after an upgrade compares every message's flags once (FLAGS only, no bodies) and then
    goes on from there.

    Attributes:
        folder: The folder's name on the server.
        uidvalidity: The UIDVALIDITY the files were exported with.
        uids: The UIDs exported and, as far as known, still on the server (each one's file is
            in ``cur/`` or ``new/``).
        synced_below: Every message with a smaller UID was exported (the folder's UIDNEXT at
            the last complete run); 0 if unknown.
        gone: UIDs whose messages are gone from the server and whose files are kept.
        highestmodseq: The folder's HIGHESTMODSEQ (CONDSTORE) at the start of the last run
            whose flag pass completed: every flag change up to it is in the file names. 0 if
            unknown (the next run compares every message's flags).
        uidnext: The folder's UIDNEXT at the start of that run (0 if unknown).
        messages: Its message count then (-1 if unknown).
        listing: ``(cur, new, at)``: the modification times (ns) of ``cur/`` and ``new/``
            when a run last listed them, and when (``time.time_ns()``). While both are
            unchanged (and were at least two seconds old then: file times are coarse), no file
            was added, renamed or removed, so a run takes :attr:`uids` and :attr:`gone` as the
            files there without listing them. ``(0, 0, 0)``: list them.
    """

    folder: str
    uidvalidity: int
    uids: frozenset[int]
    synced_below: int
    gone: frozenset[int] = frozenset()
    highestmodseq: int = 0
    uidnext: int = 0
    messages: int = -1
    listing: tuple[int, int, int] = (0, 0, 0)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": _STATE_FORMAT,
                "folder": self.folder,
                "uidvalidity": self.uidvalidity,
                "synced_below": self.synced_below,
                "highestmodseq": self.highestmodseq,
                "uidnext": self.uidnext,
                "messages": self.messages,
                "uids": uid_set(sorted(self.uids)),
                "gone": uid_set(sorted(self.gone)),
                "listing": list(self.listing),
            },
            ensure_ascii=False,
        )


def _parse_ranges(text: str) -> set[int]:
    """The UIDs of a set as :func:`uid_set` wrote it; ValueError for anything else, a range
    too large to be true included (a damaged file must not make the run allocate billions)."""
    if not text:
        return set()
    try:
        return parse_uid_set(text.encode("ascii"))
    except ProtocolError as exc:
        raise ValueError(str(exc)) from None


def _listing(raw: object) -> tuple[int, int, int]:
    if isinstance(raw, list) and len(raw) == 3 and all(type(x) is int for x in raw):
        return (raw[0], raw[1], raw[2])
    return (0, 0, 0)


_LISTING_AGE_NS: Final = 2_000_000_000  # how old the directories' times must be to be trusted


def _dir_times(path: Path) -> tuple[int, int]:
    return os.stat(path / "cur").st_mtime_ns, os.stat(path / "new").st_mtime_ns


def _listing_holds(listing: tuple[int, int, int], times: tuple[int, int]) -> bool:
    """Whether the directories are as a run listed them (see :attr:`FolderState.listing`)."""
    cur, new, at = listing
    return at > 0 and (cur, new) == times and max(times) < at - _LISTING_AGE_NS


def read_folder_state(path: str | os.PathLike[str]) -> FolderState | None:
    """The state of the folder directory *path*, or None if there is none, it is unreadable,
    or of a format this version does not know. A format 1 state is upgraded (see
    :class:`FolderState`); it is written in format 2 at the end of the next run."""
    try:
        raw = json.loads((Path(path) / STATE_NAME).read_text("utf-8"))
        version = raw.get("format")
        if version not in (1, _STATE_FORMAT):
            return None
        state = FolderState(
            folder=str(raw["folder"]),
            uidvalidity=int(raw["uidvalidity"]),
            uids=frozenset(_parse_ranges(str(raw["uids"]))),
            synced_below=int(raw["synced_below"]),
        )
        if version == 1:
            return state
        return dataclasses.replace(
            state,
            gone=frozenset(_parse_ranges(str(raw["gone"]))),
            highestmodseq=max(0, int(raw["highestmodseq"])),
            uidnext=max(0, int(raw["uidnext"])),
            messages=max(-1, int(raw["messages"])),
            listing=_listing(raw.get("listing")),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_state(path: Path, state: FolderState, fsync: bool) -> None:
    tmp = path / "tmp" / f"{_TMP_PREFIX}state-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as file:
        file.write(state.to_json())
        file.flush()
        if fsync:
            os.fsync(file.fileno())
    os.replace(tmp, path / STATE_NAME)
    if fsync:
        _fsync_dir(path)
