"""One folder's local side: its Maildir directories, the files already there, what to fetch,
and writing messages whole (unnamed or named files in ``tmp/``, then ``cur/``)."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from trio_imappool.wire import FlagStep, uid_set

from ._base import (
    _DENSE_FACTOR,
    _DENSE_SLACK,
    _MAX_CRITERIA_CHARS,
    _NAME_RE,
    _TMP_PREFIX,
    REPLACED_DIR,
    ExportError,
)
from ._naming import _escape_part, _with_hash, local_folder_name, message_filename
from ._server import FolderFailure, ServerFolder
from ._state import FolderState, _dir_times, _fsync_dir, _listing_holds, read_folder_state

# -- one folder's local side ---------------------------------------------------------------------


@dataclasses.dataclass(slots=True, eq=False)
class _Folder:
    """A folder being exported: what the server said, what is on disk, what this run did."""

    server: ServerFolder
    path: Path
    exported: set[int]
    synced_below: int
    old_state: FolderState | None
    moved_aside: int = 0  # files of an older UIDVALIDITY moved out of the way
    uidvalidity_changed: bool = False
    spec: Sequence[int] | str | list[Any] | None = None
    expected: int = 0
    fetched: int = 0
    bytes: int = 0
    unnamed_tmp: bool = True  # until the file system refuses O_TMPFILE
    received: set[int] = dataclasses.field(default_factory=set)  # UIDs the fetch returned
    asked: set[int] = dataclasses.field(default_factory=set)  # UIDs asked for by number
    searched: bool = False  # asked for by search criteria (UIDs unknown here)
    whole: bool = False  # asked for with "ALL" only (a first export of the folder)
    missing: list[int] = dataclasses.field(default_factory=list)  # asked for, not returned
    failure: str | None = None  # why the folder could not be exported
    # Following the server (flags and deletions):
    # UID -> (subdirectory, name); None until listed (unchanged directories are not listed).
    files: dict[int, tuple[str, str]] | None = None
    gone: set[int] = dataclasses.field(default_factory=set)  # gone from the server, file kept
    modseq: int = 0  # the trusted HIGHESTMODSEQ of the last run (0: compare every message)
    last_counts: tuple[int, int] = (0, -1)  # (UIDNEXT, MESSAGES) at the last run, if trusted
    step: FlagStep | None = None  # this run's flag pass, if it needs one
    flags_synced: bool = False  # every flag change up to server.highestmodseq is applied
    flags_changed: int = 0
    gone_new: int = 0  # noticed gone in this run
    removed: int = 0  # files of gone messages removed in this run
    _tmp_str: str | None = None

    @property
    def cur(self) -> Path:
        return self.path / "cur"

    def listed(self) -> dict[int, tuple[str, str]]:
        """This UIDVALIDITY's files, listed now if they were not. Synchronous."""
        if self.files is None:
            uidvalidity = self.server.uidvalidity
            found = _scan(self.path).items()
            self.files = {uid: file for (uv, uid), file in found if uv == uidvalidity}
        return self.files

    @property
    def tmp(self) -> Path:
        return self.path / "tmp"

    @property
    def tmp_str(self) -> str:
        """``tmp/`` as a str, made once (the writers open a file in it per message)."""
        if self._tmp_str is None:
            self._tmp_str = os.fspath(self.tmp)
        return self._tmp_str

    def state(self, listing: tuple[int, int, int] = (0, 0, 0)) -> FolderState:
        """The state after the run: every message below the UIDNEXT listed is here, or below
        the first message the server did not return (so that the next run asks again); the
        flags are those of the HIGHESTMODSEQ listed if the flag pass completed."""
        synced = self.flags_synced
        uidnext, messages = (
            (self.server.uidnext, self.server.messages) if synced else self.last_counts
        )
        return FolderState(
            folder=self.server.name,
            uidvalidity=self.server.uidvalidity,
            uids=frozenset(self.exported - self.gone),
            synced_below=min(self.missing, default=self.server.uidnext),
            gone=frozenset(self.gone),
            highestmodseq=self.server.highestmodseq if synced else self.modseq,
            uidnext=uidnext,
            messages=messages,
            listing=listing,
        )


def _make_maildir(path: Path) -> None:
    for sub in ("cur", "new", "tmp"):
        (path / sub).mkdir(mode=0o700, parents=True, exist_ok=True)


def _scan(path: Path) -> dict[tuple[int, int], tuple[str, str]]:
    """Our message files in ``cur/`` and ``new/``: (uidvalidity, uid) -> (subdirectory, name).

    Plain strings, not paths: a run that finds nothing changed still lists every file, and
    making 20,000 ``Path`` objects cost more than the rest of such a run."""
    found: dict[tuple[int, int], tuple[str, str]] = {}
    match = _NAME_RE.match
    for sub in ("cur", "new"):
        with os.scandir(path / sub) as entries:
            for entry in entries:
                parsed = match(entry.name)
                if parsed is None:
                    continue
                key = int(parsed.group(1)), int(parsed.group(2))
                if key not in found:
                    found[key] = (sub, entry.name)
    return found


def _clean_tmp(path: Path) -> None:
    with os.scandir(path / "tmp") as entries:
        for entry in entries:
            if entry.name.startswith(_TMP_PREFIX):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


def _replaced_dir(root: Path, folder_path: Path, uidvalidity: int) -> Path:
    label = "INBOX" if folder_path == root else folder_path.name.removeprefix(".")
    return root / REPLACED_DIR / f"{label}.{uidvalidity}"


def _plan(folder: _Folder) -> None:
    """Decide what to fetch: a list of UIDs (a dense UID range less what is there), search
    criteria (a sparse one), or nothing."""
    server = folder.server
    low = max(folder.synced_below, 1)
    candidates = range(low, server.uidnext)
    if server.messages == 0 or not candidates:
        return
    exported_here = [uid for uid in folder.exported if uid >= low]
    expected = max(
        0, min(len(candidates) - len(exported_here), server.messages - len(folder.exported))
    )
    folder.expected = expected
    if len(candidates) <= _DENSE_FACTOR * expected + _DENSE_SLACK:
        missing = [uid for uid in candidates if uid not in folder.exported]
        folder.spec = missing or None
        folder.expected = min(expected, len(missing)) if missing else 0
        return
    if low == 1 and not folder.exported:
        folder.spec = "ALL"
        return
    criteria: list[Any] = ["UID", f"{low}:{server.uidnext - 1}"]
    if exported_here:
        ranges = uid_set(sorted(exported_here))
        if len(ranges) <= _MAX_CRITERIA_CHARS:  # else: fetched again, skipped when written
            criteria += ["NOT", "UID", ranges]
    folder.spec = criteria


def _assign_paths(
    root: Path, servers: Sequence[ServerFolder]
) -> tuple[list[tuple[ServerFolder, Path]], list[FolderFailure]]:
    """Each folder's directory: :func:`local_folder_name`, unless another folder has it.

    Two folders never share a directory. One that maps to a name another folder already owns
    gets the same name with ``%~`` and the hash of its own server name appended (shortened to
    fit, as an over-long name is). Who owns a contested name, in this order: the folder that
    the directory's state file names (so names stay what they were in earlier runs), then, for
    the destination itself, the folder named exactly ``INBOX``, then the first in sorted order
    of (name, delimiter). Synchronous: reads the state files.
    """
    wanted: dict[str, list[ServerFolder]] = {}
    for server in servers:
        local = local_folder_name(server.name, server.delimiter, server.namespace)
        wanted.setdefault(local, []).append(server)
    taken = set(wanted)
    placed: list[tuple[ServerFolder, Path]] = []
    failures: list[FolderFailure] = []
    for local, claimants in wanted.items():
        path = root / local if local else root
        if len(claimants) > 1:
            state = read_folder_state(path)
            owner_name = state.folder if state is not None else None

            def rank(f: ServerFolder, owner: str | None = owner_name) -> tuple[int, int, str, str]:
                return (f.name != owner, f.name != "INBOX", f.name, f.delimiter or "")

            claimants = sorted(claimants, key=rank)
        placed.append((claimants[0], path))
        for other in claimants[1:]:
            base = local or "." + _escape_part(other.name)
            alternative = _with_hash(base, other.name, other.delimiter)
            if alternative in taken:  # a 64-bit hash collision: refuse rather than merge
                failures.append(FolderFailure(other.name, "no distinct local name"))
                continue
            taken.add(alternative)
            placed.append((other, root / alternative))
    for server, path in placed:
        # The rules make this impossible; checked all the same, before anything is created.
        if path != root and (path.parent != root or path.name in ("", ".", "..")):
            raise ExportError(f"refusing a local name outside {root} for {server.name!r}")
    return placed, failures


def _prepare(
    root: Path, servers: Sequence[ServerFolder], fsync: bool
) -> tuple[list[_Folder], list[FolderFailure]]:
    """Reconcile each folder's files and state with the server's status; plan the fetch.
    Synchronous (runs in a worker thread). A folder whose directory cannot be made or read is
    a failure of its own; the destination's own (INBOX) raises."""
    folders: list[_Folder] = []
    placed, failures = _assign_paths(root, servers)
    for server, path in placed:
        try:
            folders.append(_prepare_one(root, server, path))
        except OSError as exc:
            if path == root:
                raise
            failures.append(
                FolderFailure(server.name, f"cannot use {path.name}: {exc.strerror or exc}")
            )
    if fsync:
        for folder in folders:
            if folder.moved_aside:
                _fsync_dir(folder.cur)
                _fsync_dir(folder.path / "new")
    folders.sort(key=lambda f: (f.path != root, f.server.name))
    return folders, failures


def _same_folder(a: str, b: str) -> bool:
    return a == b or a.upper() == b.upper() == "INBOX"


def _prepare_one(root: Path, server: ServerFolder, path: Path) -> _Folder:
    _make_maildir(path)
    _clean_tmp(path)
    state = read_folder_state(path)
    # Files of another server folder (the state names it): never counted as this one's.
    foreign = state is not None and not _same_folder(state.folder, server.name)
    if (
        state is not None
        and not foreign
        and state.uidvalidity == server.uidvalidity
        and state.synced_below <= server.uidnext
        and _listing_holds(state.listing, _dir_times(path))
    ):
        # Nothing was added, renamed or removed since the last run listed the files.
        exported = set(state.uids | state.gone)
        folder = _Folder(server, path, exported, state.synced_below, state)
        folder.gone = set(state.gone)
        folder.modseq = state.highestmodseq
        folder.last_counts = (state.uidnext, state.messages)
        _plan(folder)
        return folder
    files = _scan(path)
    stale = {k: f for k, f in files.items() if foreign or k[0] != server.uidvalidity}
    for (uidvalidity, _uid), (sub, name) in sorted(stale.items()):
        aside = _replaced_dir(root, path, uidvalidity)
        _make_maildir(aside)
        os.rename(path / sub / name, aside / sub / name)
    mine = {key[1]: file for key, file in files.items() if key not in stale}
    exported = set(mine)
    synced_below = 0
    trusted = (
        state is not None
        and not foreign
        and state.uidvalidity == server.uidvalidity
        and state.uids <= exported
        and state.synced_below <= server.uidnext
    )
    if trusted:
        assert state is not None
        synced_below = state.synced_below
    folder = _Folder(server, path, exported, synced_below, state, moved_aside=len(stale))
    folder.files = mine
    if trusted:
        assert state is not None
        folder.gone = set(state.gone & exported)
        folder.modseq = state.highestmodseq
        folder.last_counts = (state.uidnext, state.messages)
    folder.uidvalidity_changed = bool(stale) or (
        state is not None and not foreign and state.uidvalidity != server.uidvalidity
    )
    _plan(folder)
    return folder


@dataclasses.dataclass(slots=True)
class _Pending:
    folder: _Folder
    uid: int
    body: bytes
    flags: str
    #: What the message holds on the run's memory budget, released once it is written.
    size: int = 0


def _write_batch(batch: Sequence[_Pending], fsync: bool) -> None:
    """Write messages, and put each into ``cur/`` only once it is complete. Synchronous.
    Raises ExportError naming the folder that could not be written.

    A message is written to an unnamed file in its folder's ``tmp/`` (``O_TMPFILE``, Linux)
    and then linked into ``cur/`` under its final name; where the file system cannot make
    unnamed files, to a named file in ``tmp/`` that is then renamed into ``cur/``. With
    *fsync*, every file of the batch is written first and then flushed, so that one journal
    commit can serve many of them, before any is put into ``cur/``; then ``cur/`` is flushed.
    """
    written: list[tuple[_Pending, int, str | None]] = []  # message, fd, name in tmp/ or None
    cur_fds: dict[_Folder, int] = {}

    def cur_fd(folder: _Folder) -> int:
        fd = cur_fds.get(folder)
        if fd is None:
            fd = cur_fds[folder] = os.open(folder.cur, os.O_RDONLY | os.O_DIRECTORY)
        return fd

    # Errors name the folder whose message could not be written: a batch may hold several.
    where = batch[0].folder.path if batch else None
    try:
        for item in batch:
            where = item.folder.path
            fd, tmp = _open_tmp(item.folder)
            written.append((item, fd, tmp))
            view = memoryview(item.body)
            while view:
                view = view[os.write(fd, view) :]
        if fsync:
            for item, fd, _ in written:
                where = item.folder.path
                os.fsync(fd)
        for index, (item, fd, tmp) in enumerate(written):
            folder = item.folder
            where = folder.path
            name = message_filename(folder.server.uidvalidity, item.uid, len(item.body), item.flags)
            if tmp is not None:
                os.rename(tmp, f"{folder.path}/cur/{name}")
                written[index] = (item, fd, None)
                if fsync:
                    cur_fd(folder)  # flushed below
                continue
            # linkat() with AT_SYMLINK_FOLLOW, which os.link uses when given a directory fd.
            with contextlib.suppress(FileExistsError):  # the same name is the same message
                os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=cur_fd(folder))
        if fsync:
            for folder, cur in cur_fds.items():
                where = folder.path
                os.fsync(cur)
    except OSError as exc:
        raise ExportError(f"cannot write to {where}: {exc}") from exc
    finally:
        for _, fd, tmp in written:
            os.close(fd)
            if tmp is not None:  # written but never renamed
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        for cur in cur_fds.values():
            os.close(cur)


_UNNAMED: Final = getattr(os, "O_TMPFILE", 0)


def _open_tmp(folder: _Folder) -> tuple[int, str | None]:
    """A new file in the folder's ``tmp/``: unnamed where possible, else named."""
    if _UNNAMED and folder.unnamed_tmp:
        try:
            return os.open(folder.tmp_str, _UNNAMED | os.O_WRONLY | os.O_CLOEXEC, 0o600), None
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
            folder.unnamed_tmp = False  # this file system cannot
    number = next(_tmp_numbers)
    tmp = f"{folder.tmp_str}/{_TMP_PREFIX}{os.getpid()}-{threading.get_ident()}-{number}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    return os.open(tmp, flags, 0o600), tmp


_tmp_numbers = itertools.count()
