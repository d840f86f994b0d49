"""Exporting an IMAP account to a local Maildir, over pooled connections, resumably.

:func:`export_maildir` copies every message of the chosen folders into a Maildir, one file per
message, and on later runs copies only what it has not copied yet::

    async with trio_imappool.open_pool(host, username=u, password=p, max_size=8) as pool:
        result = await export_maildir(pool, "backup/Maildir")
    print(result.messages_fetched, "new messages")

**Layout (Maildir++).** The destination is the Maildir of ``INBOX`` (``cur/``, ``new/``,
``tmp/``); every other folder is a subfolder ``.Name`` next to them, its hierarchy joined with
dots: ``Archive/2024`` is ``.Archive.2024`` whatever the server's delimiter. In a name part,
``%``, ``.``, ``/`` and control characters are written ``%XX`` (``a.b`` is ``.a%2Eb``); other
characters, non-ASCII included, are kept (UTF-8). Mail readers that know Maildir++
(Dovecot, mutt, neomutt, mbsync with ``SubFolders Maildir++``) read this layout.

**Messages.** One file per message in the folder's ``cur/``, named
``{UIDVALIDITY}-{UID}.trio-imappool,S={size}:2,{flags}``, holding the message exactly as the
server sent it (``BODY[]``, CRLF line endings, no conversion). The flags are Maildir's info
letters for the IMAP system flags (``\\Draft`` D, ``\\Flagged`` F, ``\\Answered`` R, ``\\Seen``
S, ``\\Deleted`` T, in that order); keywords are not kept. The messages are fetched with
``BODY.PEEK[]`` from folders selected read-only: exporting changes nothing on the server.

**Resuming.** The files are the truth: a name says which UIDVALIDITY and UID it holds, so a run
starts by listing ``cur/`` and ``new/`` and fetches only the UIDs missing there. Each folder
also has a small state file, ``trio-imappool.json``, with its UIDVALIDITY, the UIDs exported
and ``synced_below``, the UIDNEXT below which every message was exported, so a run that finds a
folder's UIDNEXT unchanged does not even select it. The state is written (atomically, after the
files it names are in place) at the end of a run; it is checked against the files on startup
and ignored where it claims more than they hold.

**Crashes.** A message is written to an unnamed file in ``tmp/`` (``O_TMPFILE``; a named one
where the file system has no unnamed files), flushed to disk (``fsync``, unless turned off) and
only then linked (or renamed) into ``cur/`` under its final name, so a killed run (Ctrl-C,
SIGKILL, a power cut with ``fsync``) leaves no partial file in ``cur/``; an unnamed file
vanishes with the process, and the next run removes named leftovers of ours from ``tmp/``.
Everything in ``cur/`` stays, and is not fetched again.

**UIDVALIDITY.** When a folder's UIDVALIDITY is not the one its files were exported with (the
folder was deleted and created again, or the server rebuilt it), the old files are moved out of
the way, into ``trio-imappool-replaced/{folder}.{old UIDVALIDITY}/`` (a Maildir of its own, out
of the Maildir++ tree), and the folder is exported again into its emptied location. The
UIDVALIDITY is read once, at the start of a run: a folder deleted and created again while a run
fetches from it may end that run with messages of both in its Maildir, named with the old
UIDVALIDITY; the next run sees the new one and sorts them out as above.

**Deleted messages.** The export never deletes: messages expunged on the server stay in the
Maildir, and later flag changes on the server are not copied.

One export at a time per destination: a lock file (``trio-imappool.lock``, ``flock``) makes a
second one fail at once with :class:`ExportError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import fnmatch
import itertools
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import trio
from imapclient import imap_utf7
from imapclient.response_parser import parse_response

from ._errors import PoolError
from ._fanout import DEFAULT_BATCH_SIZE, fetch_many

if TYPE_CHECKING:
    from imapclient import IMAPClient

    from ._pool import Pool

__all__ = [
    "LOCK_NAME",
    "REPLACED_DIR",
    "STATE_NAME",
    "ExportError",
    "ExportProgress",
    "ExportResult",
    "FolderNotFoundError",
    "FolderReport",
    "FolderState",
    "ServerFolder",
    "export_maildir",
    "maildir_flags",
    "maildir_folder_path",
    "message_filename",
    "parse_message_filename",
    "read_folder_state",
]

#: The state file in each folder's directory.
STATE_NAME: Final = "trio-imappool.json"
#: The lock file in the destination.
LOCK_NAME: Final = "trio-imappool.lock"
#: Where the files of a folder whose UIDVALIDITY changed are moved to.
REPLACED_DIR: Final = "trio-imappool-replaced"

_STATE_FORMAT: Final = 1
_TMP_PREFIX: Final = "trio-imappool-"
_NAME_TAG: Final = "trio-imappool"
_NAME_RE: Final = re.compile(r"^(\d+)-(\d+)\.trio-imappool(?:,[^:]*)?(?::2,([^:]*))?$")
_FLAG_LETTERS: Final = {
    b"\\draft": "D",
    b"\\flagged": "F",
    b"\\answered": "R",
    b"\\seen": "S",
    b"\\deleted": "T",
}
_FETCH_ITEMS: Final = ["BODY.PEEK[]", "FLAGS"]
_STATUS_ITEMS: Final = "(MESSAGES UIDNEXT UIDVALIDITY)"
# A UID range is fetched as it is (the server skips UIDs that do not exist) when it is at most
# this many times the messages expected in it, plus the slack; otherwise the folder is searched.
_DENSE_FACTOR: Final = 2
_DENSE_SLACK: Final = 500
_MAX_CRITERIA_CHARS: Final = 20_000
# Writer tasks (each a worker thread while it writes) and messages per thread hop. Few and big:
# the fetching threads need the GIL too, and on a 2-core machine 4 writers of 64 were slower.
# Messages held for writing: a full channel plus a batch per writer (384 with these values).
_WRITERS: Final = 2
_WRITE_BATCH: Final = 128


class ExportError(PoolError):
    """The local side of an export failed: the destination cannot be written, is locked by
    another export, or is not a directory. The original error, if any, is ``__cause__``."""


class FolderNotFoundError(ExportError, LookupError):
    """A folder asked for by name (not by a pattern) is not on the server."""


# -- the Maildir side: names, flags, paths (synchronous, pure) -----------------------------------


def maildir_flags(flags: Iterable[bytes | str]) -> str:
    """Maildir info letters for IMAP flags, in Maildir's (ASCII) order.

    ``\\Draft`` D, ``\\Flagged`` F, ``\\Answered`` R, ``\\Seen`` S, ``\\Deleted`` T, in any
    case; other flags and keywords are left out::

        >>> maildir_flags([b"\\\\Seen", b"\\\\Answered", b"$Forwarded"])
        'RS'
    """
    letters = set()
    for flag in flags:
        raw = flag.encode("utf-8") if isinstance(flag, str) else flag
        letter = _FLAG_LETTERS.get(raw.lower())
        if letter:
            letters.add(letter)
    return "".join(sorted(letters))


def message_filename(uidvalidity: int, uid: int, size: int, flags: str) -> str:
    """The file name of a message in ``cur/``: ``{uidvalidity}-{uid}.trio-imappool,S={size}:2,
    {flags}``."""
    return f"{uidvalidity}-{uid}.{_NAME_TAG},S={size}:2,{flags}"


def parse_message_filename(name: str) -> tuple[int, int] | None:
    """``(uidvalidity, uid)`` from a file name made by :func:`message_filename` (its flags may
    have been changed since, by a mail reader), or None for any other name."""
    match = _NAME_RE.match(name)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2))


def _escape_part(part: str) -> str:
    return "".join(
        f"%{ord(ch):02X}" if ch in "%./" or ord(ch) < 0x20 or ch == "\x7f" else ch for ch in part
    )


def maildir_folder_path(root: str | os.PathLike[str], folder: str, delimiter: str | None) -> Path:
    """Where a folder goes in the Maildir++ tree at *root*.

    ``INBOX`` (in any case) is *root* itself; ``Archive/2024`` with delimiter ``/`` is
    ``root/.Archive.2024``; ``%``, ``.``, ``/`` and control characters in a name part are
    written ``%XX``.
    """
    base = Path(root)
    if folder.upper() == "INBOX":
        return base
    parts = folder.split(delimiter) if delimiter else [folder]
    return base / ("." + ".".join(_escape_part(part) for part in parts))


# -- the server side -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class ServerFolder:
    """A selectable folder on the server and its status, as listed at the start of a run."""

    name: str
    delimiter: str | None
    uidvalidity: int
    uidnext: int
    messages: int


def _decode_name(client: IMAPClient, raw: object) -> str:
    if isinstance(raw, int):
        return str(raw)
    if isinstance(raw, bytes):
        return str(imap_utf7.decode(raw)) if client.folder_encode else raw.decode("utf-8")
    return str(raw)


def _status_items(items: Sequence[Any]) -> dict[bytes, int]:
    return {
        bytes(key).upper(): int(value) for key, value in zip(items[::2], items[1::2], strict=False)
    }


def _list_status(client: IMAPClient) -> list[ServerFolder]:
    """LIST and STATUS of every folder; one round trip where the server has LIST-STATUS (RFC
    5819), else a STATUS per folder. Runs in a worker thread, on a checked-out connection."""
    if client.has_capability("LIST-STATUS"):
        # imapclient has no LIST-STATUS; imaplib's plumbing does it, as imapclient's own
        # list_folders() does for LIST.
        imap = client._imap
        typ, data = imap._simple_command("LIST", '""', '"*"', "RETURN", f"(STATUS {_STATUS_ITEMS})")
        client._checkok("list", typ, data)
        _, lists = imap._untagged_response(typ, data, "LIST")
        _, statuses = imap._untagged_response(typ, [None], "STATUS")
        listed = client._proc_folder_list(lists)
        found = parse_response([item for item in statuses if item is not None])
        status = {
            _decode_name(client, found[i]): _status_items(found[i + 1])
            for i in range(0, len(found) - 1, 2)
        }
    else:
        listed = client.list_folders()
        status = {}
    folders: list[ServerFolder] = []
    for flags, delimiter, name in listed:
        lowered = {bytes(flag).lower() for flag in flags}
        if b"\\noselect" in lowered or b"\\nonexistent" in lowered:
            continue
        items = status.get(name)
        if items is None:
            items = _status_items(
                [
                    part
                    for pair in client.folder_status(
                        name, ["MESSAGES", "UIDNEXT", "UIDVALIDITY"]
                    ).items()
                    for part in pair
                ]
            )
        sep = delimiter.decode("utf-8") if isinstance(delimiter, bytes) else delimiter
        folders.append(
            ServerFolder(
                name=str(name),
                delimiter=sep or None,
                uidvalidity=items[b"UIDVALIDITY"],
                uidnext=items[b"UIDNEXT"],
                messages=items[b"MESSAGES"],
            )
        )
    return folders


def _choose(
    folders: Sequence[ServerFolder], include: Sequence[str] | None, exclude: Sequence[str]
) -> list[ServerFolder]:
    def matches(name: str, patterns: Iterable[str]) -> bool:
        return any(
            fnmatch.fnmatchcase(name, p) or (p.upper() == "INBOX" == name.upper()) for p in patterns
        )

    chosen = sorted(
        (
            f
            for f in folders
            if (include is None or matches(f.name, include)) and not matches(f.name, exclude)
        ),
        key=lambda f: (f.name.upper() != "INBOX", f.name),
    )
    if include is not None:
        missing = [
            p
            for p in include
            if not any(matches(f.name, [p]) for f in folders) and not any(c in p for c in "*?[")
        ]
        if missing:
            names = ", ".join(map(repr, missing))
            raise FolderNotFoundError(f"no such folder on the server: {names}")
    return chosen


# -- the state file ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class FolderState:
    """What ``trio-imappool.json`` of a folder says.

    Attributes:
        folder: The folder's name on the server.
        uidvalidity: The UIDVALIDITY the files were exported with.
        uids: The UIDs exported (each one's file is in ``cur/`` or ``new/``).
        synced_below: Every message with a smaller UID was exported (the folder's UIDNEXT at
            the last complete run); 0 if unknown.
    """

    folder: str
    uidvalidity: int
    uids: frozenset[int]
    synced_below: int

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": _STATE_FORMAT,
                "folder": self.folder,
                "uidvalidity": self.uidvalidity,
                "synced_below": self.synced_below,
                "uids": _uid_ranges(sorted(self.uids)),
            },
            ensure_ascii=False,
        )


def _uid_ranges(uids: Sequence[int]) -> str:
    """Sorted UIDs as an IMAP set: ``1:200,205``."""
    parts: list[str] = []
    i = 0
    while i < len(uids):
        j = i
        while j + 1 < len(uids) and uids[j + 1] == uids[j] + 1:
            j += 1
        parts.append(str(uids[i]) if i == j else f"{uids[i]}:{uids[j]}")
        i = j + 1
    return ",".join(parts)


def _parse_ranges(text: str) -> set[int]:
    uids: set[int] = set()
    for part in filter(None, text.split(",")):
        low, _, high = part.partition(":")
        uids.update(range(int(low), int(high or low) + 1))
    return uids


def read_folder_state(path: str | os.PathLike[str]) -> FolderState | None:
    """The state of the folder directory *path*, or None if there is none or it is unreadable."""
    try:
        raw = json.loads((Path(path) / STATE_NAME).read_text("utf-8"))
        if raw.get("format") != _STATE_FORMAT:
            return None
        return FolderState(
            folder=str(raw["folder"]),
            uidvalidity=int(raw["uidvalidity"]),
            uids=frozenset(_parse_ranges(str(raw["uids"]))),
            synced_below=int(raw["synced_below"]),
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

    @property
    def cur(self) -> Path:
        return self.path / "cur"

    @property
    def tmp(self) -> Path:
        return self.path / "tmp"

    def state(self) -> FolderState:
        """The state after a complete run: every message below the UIDNEXT listed is here."""
        return FolderState(
            folder=self.server.name,
            uidvalidity=self.server.uidvalidity,
            uids=frozenset(self.exported),
            synced_below=self.server.uidnext,
        )


def _make_maildir(path: Path) -> None:
    for sub in ("cur", "new", "tmp"):
        (path / sub).mkdir(mode=0o700, parents=True, exist_ok=True)


def _scan(path: Path) -> dict[tuple[int, int], Path]:
    """Our message files in ``cur/`` and ``new/``: (uidvalidity, uid) -> path."""
    found: dict[tuple[int, int], Path] = {}
    for sub in ("cur", "new"):
        with os.scandir(path / sub) as entries:
            for entry in entries:
                key = parse_message_filename(entry.name)
                if key is not None and key not in found:
                    found[key] = path / sub / entry.name
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
        ranges = _uid_ranges(sorted(exported_here))
        if len(ranges) <= _MAX_CRITERIA_CHARS:  # else: fetched again, skipped when written
            criteria += ["NOT", "UID", ranges]
    folder.spec = criteria


def _prepare(root: Path, servers: Sequence[ServerFolder], fsync: bool) -> list[_Folder]:
    """Reconcile each folder's files and state with the server's status; plan the fetch.
    Synchronous (runs in a worker thread)."""
    folders: list[_Folder] = []
    for server in servers:
        path = maildir_folder_path(root, server.name, server.delimiter)
        _make_maildir(path)
        _clean_tmp(path)
        state = read_folder_state(path)
        files = _scan(path)
        stale = {key: file for key, file in files.items() if key[0] != server.uidvalidity}
        for (uidvalidity, _uid), file in sorted(stale.items()):
            aside = _replaced_dir(root, path, uidvalidity)
            _make_maildir(aside)
            os.rename(file, aside / file.parent.name / file.name)
        exported = {uid for (uidvalidity, uid) in files if uidvalidity == server.uidvalidity}
        synced_below = 0
        if (
            state is not None
            and state.uidvalidity == server.uidvalidity
            and state.uids <= exported
            and state.synced_below <= server.uidnext
        ):
            synced_below = state.synced_below
        folder = _Folder(server, path, exported, synced_below, state, moved_aside=len(stale))
        folder.uidvalidity_changed = bool(stale) or (
            state is not None and state.uidvalidity != server.uidvalidity
        )
        _plan(folder)
        folders.append(folder)
    if fsync:
        for folder in folders:
            if folder.moved_aside:
                _fsync_dir(folder.cur)
                _fsync_dir(folder.path / "new")
    return folders


@dataclasses.dataclass(slots=True)
class _Pending:
    folder: _Folder
    uid: int
    body: bytes
    flags: str


def _write_batch(batch: Sequence[_Pending], fsync: bool) -> None:
    """Write messages, and put each into ``cur/`` only once it is complete. Synchronous.

    A message is written to an unnamed file in its folder's ``tmp/`` (``O_TMPFILE``, Linux)
    and then linked into ``cur/`` under its final name; where the file system cannot make
    unnamed files, to a named file in ``tmp/`` that is then renamed into ``cur/``. With
    *fsync*, every file of the batch is written first and then flushed, so that one journal
    commit can serve many of them, before any is put into ``cur/``; then ``cur/`` is flushed.
    """
    written: list[tuple[_Pending, int, str | None]] = []  # message, fd, name in tmp/ or None
    cur_fds: dict[Path, int] = {}

    def cur_fd(folder: _Folder) -> int:
        fd = cur_fds.get(folder.cur)
        if fd is None:
            fd = cur_fds[folder.cur] = os.open(folder.cur, os.O_RDONLY | os.O_DIRECTORY)
        return fd

    try:
        for item in batch:
            fd, tmp = _open_tmp(item.folder)
            written.append((item, fd, tmp))
            view = memoryview(item.body)
            while view:
                view = view[os.write(fd, view) :]
        if fsync:
            for _, fd, _ in written:
                os.fsync(fd)
        for index, (item, fd, tmp) in enumerate(written):
            folder = item.folder
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
            for cur in cur_fds.values():
                os.fsync(cur)
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
            return os.open(folder.tmp, _UNNAMED | os.O_WRONLY | os.O_CLOEXEC, 0o600), None
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
            folder.unnamed_tmp = False  # this file system cannot
    tmp = f"{folder.tmp}/{_TMP_PREFIX}{os.getpid()}-{threading.get_ident()}-{next(_tmp_numbers)}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    return os.open(tmp, flags, 0o600), tmp


_tmp_numbers = itertools.count()


# -- results -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class ExportProgress:
    """How far an export is, passed to the ``progress`` callback of :func:`export_maildir`.

    ==================  ================================================================
    field               meaning
    ==================  ================================================================
    ``folders_total``   folders with messages to fetch in this run
    ``folders_done``    of those, folders whose every message has been handed over
    ``messages_total``  messages expected to be fetched (an estimate from the status)
    ``messages_done``   messages written into ``cur/`` in this run
    ``bytes_done``      their size in bytes
    ==================  ================================================================
    """

    folders_total: int
    folders_done: int
    messages_total: int
    messages_done: int
    bytes_done: int


@dataclasses.dataclass(frozen=True, slots=True)
class FolderReport:
    """What an export did to one folder.

    Attributes:
        name: The folder's name on the server.
        path: Its Maildir directory.
        uidvalidity: The folder's UIDVALIDITY.
        messages: Messages on the server (at the start of the run).
        fetched: Messages fetched and written in this run.
        bytes: Their size in bytes.
        exported: This folder's messages in the Maildir now (of this UIDVALIDITY).
        uidvalidity_changed: The UIDVALIDITY is not the one of the last export: the folder
            was exported again from scratch.
        moved_aside: Files of an older UIDVALIDITY moved to ``trio-imappool-replaced/``.
    """

    name: str
    path: Path
    uidvalidity: int
    messages: int
    fetched: int
    bytes: int
    exported: int
    uidvalidity_changed: bool
    moved_aside: int


@dataclasses.dataclass(frozen=True, slots=True)
class ExportResult:
    """What :func:`export_maildir` did.

    ======================  ============================================================
    field                   meaning
    ======================  ============================================================
    ``folders``             a :class:`FolderReport` per folder, INBOX first, then by name
    ``messages_fetched``    messages fetched and written in this run
    ``bytes_fetched``       their size in bytes
    ``messages_skipped``    messages fetched that were exported already (sparse folders
                            fetched by search) or came without a body
    ``folders_fetched``      folders handed to the fetch (0 when nothing was new)
    ``elapsed``             seconds, listing to the last state file
    ======================  ============================================================
    """

    folders: tuple[FolderReport, ...]
    messages_fetched: int
    bytes_fetched: int
    messages_skipped: int
    folders_fetched: int
    elapsed: float

    @property
    def messages_per_second(self) -> float:
        """Messages fetched per second of :attr:`elapsed`."""
        return self.messages_fetched / self.elapsed if self.elapsed > 0 else 0.0


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


async def _server_folders(pool: Pool) -> list[ServerFolder]:
    async with pool.connection() as conn:
        return await conn.run_sync(_list_status)


class _Run:
    """One export's fetching and writing; the decisions are synchronous, the I/O in tasks."""

    def __init__(
        self,
        folders: Sequence[_Folder],
        fsync: bool,
        progress: Callable[[ExportProgress], object] | None,
    ) -> None:
        self.by_name = {f.server.name: f for f in folders}
        self.fsync = fsync
        self.progress_fn = progress
        self.skipped = 0
        self.error: BaseException | None = None
        self.limiter = trio.CapacityLimiter(_WRITERS)
        self.folders_done = 0
        self.totals = (
            sum(1 for f in folders if f.spec is not None),
            sum(f.expected for f in folders),
        )
        self.messages = 0
        self.bytes = 0

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
        self, receive: trio.MemoryReceiveChannel[_Pending], scope: trio.CancelScope
    ) -> None:
        try:
            async with receive:
                async for first in receive:
                    batch = [first]
                    with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel):
                        while len(batch) < _WRITE_BATCH:
                            batch.append(receive.receive_nowait())
                    try:
                        await trio.to_thread.run_sync(
                            _write_batch, batch, self.fsync, limiter=self.limiter
                        )
                    except OSError as exc:
                        raise ExportError(f"cannot write to {batch[0].folder.path}: {exc}") from exc
                    for item in batch:
                        item.folder.exported.add(item.uid)
                        item.folder.fetched += 1
                        item.folder.bytes += len(item.body)
                        self.messages += 1
                        self.bytes += len(item.body)
                    self.report()
        except Exception as exc:
            self.fail(exc, scope)

    async def fetch(
        self,
        pool: Pool,
        batch_size: int,
        max_connections: int | None,
        send: trio.MemorySendChannel[_Pending],
        scope: trio.CancelScope,
    ) -> None:
        specs = {f.server.name: f.spec for f in self.by_name.values() if f.spec is not None}
        try:
            async with (
                send,
                fetch_many(
                    pool,
                    specs,
                    _FETCH_ITEMS,
                    batch_size=batch_size,
                    max_connections=max_connections,
                ) as results,
            ):
                async for name, uid, data in results:
                    folder = self.by_name[name]
                    body = data.get(b"BODY[]")
                    if uid in folder.exported or not isinstance(body, bytes):
                        self.skipped += 1
                        continue
                    item = _Pending(folder, uid, body, maildir_flags(data.get(b"FLAGS", ())))
                    try:
                        send.send_nowait(item)
                    except trio.WouldBlock:
                        await send.send(item)
                    done = results.progress.folders_done
                    if done != self.folders_done:
                        self.report(done)
                self.report(results.progress.folders_done)
        except Exception as exc:
            self.fail(exc, scope)


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
) -> ExportResult:
    """Export folders of the pool's account to a Maildir, fetching only what is missing.

    The folders are listed with their status (one ``LIST ... RETURN (STATUS ...)`` where the
    server has LIST-STATUS), compared with the files in the Maildir, and the missing messages
    fetched with :func:`~trio_imappool.fetch_many` over up to *max_connections* pooled
    connections, while worker threads write them (see the module's documentation for the
    layout, the file names and what happens on a crash or a new UIDVALIDITY). On a first
    export (no state file in *destination* yet) the other connections are opened while the
    folders are listed, instead of when the fetching starts.

    Args:
        pool: The pool of the account to export.
        destination: The Maildir++ root; created if missing.
        folders: Folder names or shell-style patterns (``"Archive/*"``) to export; None for
            every selectable folder. A name without wildcards that matches nothing is an error.
        exclude: Names or patterns of folders to leave out.
        batch_size: UIDs per FETCH.
        max_connections: Connections used at once (default and upper bound: the pool's size).
        fsync: Flush every message (and the directories) to disk before it counts as exported.
            Without it an export is still safe against a killed process, not a power cut.
        progress: Called (synchronously, from the Trio thread) with an
            :class:`ExportProgress` after every batch of files written.

    Returns:
        An :class:`ExportResult`.

    Raises:
        ExportError: The destination cannot be used or written, or is locked by another
            export.
        FolderNotFoundError: A folder asked for by name is not on the server (an
            :class:`ExportError`; raised before anything is written).
        FanOutError: A FETCH failed (the original, imapclient's or the pool's, is
            ``__cause__``). Every message written before stays, and the next run goes on.
        ConnectError, PoolTimeout: As from :meth:`Pool.connection` for the listing.

    Errors come out as they were raised, never wrapped in an exception group.

    **Cancellation**: a checkpoint. A cancellation interrupts the commands in flight, lets the
    files being written land in ``cur/`` (a worker thread finishes its batch), and saves no
    state; every file in ``cur/`` is a whole message, and the next run fetches the rest.
    """
    await trio.lowlevel.checkpoint()
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
                prepared, run = await _export(
                    pool, root, folders, exclude, batch_size, max_connections, fsync, progress
                )
            except BaseException as exc:
                # Kept out of the nursery, so that it is not wrapped in an exception group.
                body_error = exc
            finally:
                warming.cancel_scope.cancel()
        if body_error is not None:
            raise body_error
        try:
            await trio.to_thread.run_sync(_save_states, prepared, fsync)
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
            )
            for f in prepared
        ),
        messages_fetched=run.messages,
        bytes_fetched=run.bytes,
        messages_skipped=run.skipped,
        folders_fetched=run.totals[0],
        elapsed=time.monotonic() - started,
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
) -> tuple[list[_Folder], _Run]:
    """List, reconcile, fetch and write; the state is left to the caller."""
    listed = await _server_folders(pool)
    chosen = _choose(listed, folders, exclude)
    try:
        prepared = await trio.to_thread.run_sync(_prepare, root, chosen, fsync)
    except OSError as exc:
        raise ExportError(f"cannot prepare the Maildir {root}: {exc}") from exc
    run = _Run(prepared, fsync, progress)
    if run.totals[0]:
        run.report()
        send, receive = trio.open_memory_channel[_Pending](_WRITE_BATCH)
        async with trio.open_nursery() as nursery:
            for _ in range(_WRITERS):
                nursery.start_soon(run.writer, receive.clone(), nursery.cancel_scope)
            receive.close()
            nursery.start_soon(
                run.fetch, pool, batch_size, max_connections, send, nursery.cancel_scope
            )
        if run.error is not None:
            raise run.error
    return prepared, run


def _save_states(folders: Sequence[_Folder], fsync: bool) -> None:
    for folder in folders:
        state = folder.state()
        if state != folder.old_state:
            _write_state(folder.path, state, fsync)
