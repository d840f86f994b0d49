"""Exporting an IMAP account to a local Maildir, over pooled connections, resumably.

:func:`export_maildir` copies every message of the chosen folders into a Maildir, one file per
message, and on later runs copies only what it has not copied yet and follows the server's
flag changes and deletions::

    async with trio_imappool.open_pool(host, username=u, password=p, max_size=8) as pool:
        result = await export_maildir(pool, "backup/Maildir")
    print(result.messages_fetched, "new messages", result.flags_changed, "flags changed")

The export is **one-way**: it follows the server and never writes to it (folders are
EXAMINEd, bodies fetched with ``BODY.PEEK[]``); a flag changed or a file deleted locally is not
sent back, and the next flag change of that message on the server overwrites the local one.

**Layout (Maildir++).** The destination is the Maildir of ``INBOX`` (``cur/``, ``new/``,
``tmp/``); every other folder is a subfolder ``.Name`` next to them, its hierarchy joined with
dots: ``Archive/2024`` is ``.Archive.2024`` whatever the server's delimiter. In a name part,
``%``, ``.``, ``/`` and control characters are written ``%XX`` (``a.b`` is ``.a%2Eb``); other
characters, non-ASCII included, are kept (UTF-8). Mail readers that know Maildir++
(Dovecot, mutt, neomutt, mbsync with ``SubFolders Maildir++``) read this layout.

**Namespaces.** Names are relative to the account's personal namespace (NAMESPACE, RFC 2342):
on a server that keeps folders under ``INBOX.`` (Courier, Cyrus without ``altnamespace``),
``INBOX.Archive`` is ``.Archive``, not ``.INBOX.Archive``; folders outside it keep their whole
name. Folder patterns are written with ``/`` between levels, relative to the same namespace
(``Archive/*`` is every folder under Courier's ``INBOX.Archive``); see :func:`export_maildir`.

**Hostile names.** Folder names are data, never paths: :func:`local_folder_name` holds the
rules (an over-long name is shortened with a hash; no result is empty, ``.``, ``..`` or more
than one path component), and two server folders never share a directory (the second gets a
``%~{hash}`` name, kept across runs through the state files). Nothing outside the destination
is ever created, moved or deleted. A folder that cannot be exported (a name that cannot be
asked for again, a garbled STATUS, a NO to its EXAMINE) is reported in
:attr:`ExportResult.folders_failed` and the others are exported; a message the server lists
but does not return is counted in :attr:`FolderReport.missing`, not recorded as exported, and
asked for again by the next run.

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

**Following the server.** Every run brings the flags of the messages already exported up to
date, before it fetches new ones, with as few round trips as the server allows:

- The listing asks for each folder's ``HIGHESTMODSEQ`` too where the server has CONDSTORE (RFC
  7162); the state file keeps it, with the UIDNEXT and message count of the run. A folder whose
  UIDVALIDITY, HIGHESTMODSEQ, UIDNEXT and count are unchanged is not selected at all: with
  LIST-STATUS, an unchanged account costs one round trip after the login.
- With CONDSTORE, a changed folder is asked only for what changed: ``UID FETCH 1:* (FLAGS)
  (CHANGEDSINCE m)``, with ``VANISHED`` added (after ``ENABLE QRESYNC``) where the server has
  QRESYNC, which also names the messages expunged since. Without CONDSTORE (or on the first
  run after an upgrade, or with a CONDSTORE server without QRESYNC whose counts show an
  expunge) every message's flags are listed (``UID FETCH 1:* (FLAGS)``, no bodies) and
  compared with the files; a message the listing lacks is gone, unless the listing is shorter
  than the folder's count (then nothing is concluded). These commands are pipelined: one
  connection asks about many folders in one round trip.
- A message whose flags changed keeps its file, renamed to the new info letters (letters
  other than ``DFRST``, a mail reader's keywords, are kept). ``rename(2)`` is atomic and the
  state is written only at the end, so a run killed midway leaves every file under its old
  name or its new one, and the next run asks again from the last saved modseq.
- A message gone from the server keeps its file by default (a backup does not lose what it
  had); it is counted in :attr:`FolderReport.gone` when first noticed, in
  :attr:`FolderReport.gone_kept` on every run, and remembered in the state. With
  ``delete=True`` the files of messages gone from the server are removed
  (:attr:`FolderReport.removed`). ``\\Deleted`` on the server is the ``T`` letter, not a
  deletion.

Only responses that carry a UID count: other sessions' flag changes arrive without one and are
never attributed to a message by their sequence number.

**The state file** is versioned (``"format": 2``); a format 1 file (from before flags were
followed) is upgraded on the first run, by one full FLAGS listing per folder and without
fetching any message again.

One export at a time per destination: a lock file (``trio-imappool.lock``, ``flock``) makes a
second one fail at once with :class:`ExportError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import fnmatch
import hashlib
import imaplib
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

from ._config import check_wire_text
from ._errors import PoolError, connection_survives
from ._fanout import DEFAULT_BATCH_SIZE, FanOutError, fetch_many
from ._sync_wire import FlagAnswer, FlagStep, fetch_flags

if TYPE_CHECKING:
    from imapclient import IMAPClient

    from ._pool import Pool

__all__ = [
    "LOCK_NAME",
    "MAX_LOCAL_NAME",
    "REPLACED_DIR",
    "STATE_NAME",
    "ExportError",
    "ExportProgress",
    "ExportResult",
    "FolderFailure",
    "FolderNotFoundError",
    "FolderReport",
    "FolderState",
    "ServerFolder",
    "export_maildir",
    "local_folder_name",
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

_STATE_FORMAT: Final = 2  # 1: before flags and deletions were followed (read and upgraded)
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
_STATUS_ITEMS: Final = ("MESSAGES", "UIDNEXT", "UIDVALIDITY")
# A UID range is fetched as it is (the server skips UIDs that do not exist) when it is at most
# this many times the messages expected in it, plus the slack; otherwise the folder is searched.
_DENSE_FACTOR: Final = 2
_DENSE_SLACK: Final = 500
_MAX_CRITERIA_CHARS: Final = 20_000
# Writer tasks (each a worker thread while it writes) and messages per thread hop. Few and big:
# the fetching threads need the GIL too, and on a 2-core machine 4 writers of 64 were slower.
# Messages held for writing: a full channel plus a batch per writer (384 with these values).
_WRITERS: Final = 2
# Messages of full FLAGS listings per connection in a flag pass (see _flag_pass).
_FLAGS_PER_CONNECTION: Final = 5_000
_WRITE_BATCH: Final = 128


class ExportError(PoolError):
    """The local side of an export failed: the destination cannot be written, is locked by
    another export, or is not a directory. The original error, if any, is ``__cause__``."""


class FolderNotFoundError(ExportError, LookupError):
    """A folder asked for by name is not on the server, or a pattern matches none of its
    folders."""


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


#: The longest local folder name, in bytes of UTF-8 (file systems allow 255; the room left is
#: for the ``.{uidvalidity}`` suffix of a folder moved to ``trio-imappool-replaced/``).
MAX_LOCAL_NAME: Final = 200
_HASH_CHARS: Final = 16  # hex digits of SHA-256 in a shortened or disambiguated name
_MARK: Final = "%~"  # never made by the escaping: "%" is written "%25"


def _escape_part(part: str) -> str:
    if not part:
        return "%"  # an empty part; never made otherwise ("%" alone is always "%25")
    out = []
    for ch in part:
        code = ord(ch)
        if ch in "%./" or code < 0x20 or code == 0x7F:
            out.append(f"%{code:02X}")
        elif 0xD800 <= code <= 0xDFFF:  # a lone surrogate cannot be written in UTF-8
            out.append(f"%u{code:04X}")
        else:
            out.append(ch)
    return "".join(out)


def _name_hash(folder: str, delimiter: str | None) -> str:
    key = f"{delimiter or ''}\0{folder}".encode("utf-8", "surrogatepass")
    return hashlib.sha256(key).hexdigest()[:_HASH_CHARS]


def _with_hash(local: str, folder: str, delimiter: str | None) -> str:
    """*local* cut to fit :data:`MAX_LOCAL_NAME` with the mark and the hash of the server name
    appended; the cut never splits a character or a ``%XX`` escape."""
    suffix = _MARK + _name_hash(folder, delimiter)
    room = MAX_LOCAL_NAME - len(suffix)
    cut = local.encode("utf-8")[:room].decode("utf-8", "ignore")
    # Do not leave half an escape: "%", "%X" or "%uXXX" at the end.
    tail = cut[-5:]
    percent = tail.rfind("%")
    if percent >= 0 and not re.fullmatch(r"%(?:[0-9A-F]{2}|u[0-9A-F]{4}|)", tail[percent:]):
        cut = cut[: len(cut) - len(tail) + percent]
    return cut + suffix


def local_folder_name(folder: str, delimiter: str | None, namespace: str = "") -> str:
    """The directory name of a server folder in the Maildir++ tree: the one mapping, one place.

    The rules:

    0. A folder under *namespace*, the prefix of the account's personal namespace
       (``"INBOX."`` on Courier; ``""`` on Dovecot, Cyrus with ``altnamespace``, Gmail: then
       nothing changes), is named by the rest of its name: ``INBOX.Archive`` is ``Archive``
       below. INBOX itself, folders outside the namespace, and a rest that is empty or
       ``INBOX`` keep the whole name.
    1. ``INBOX`` (in any case) is ``""``: the destination itself.
    2. Any other folder is ``"."`` followed by its name split at the server's delimiter (not
       split when there is none) and joined with ``"."``, each part escaped: ``%``, ``.``,
       ``/``, control characters (U+0000-U+001F, U+007F) are written ``%XX`` (hex), a lone
       surrogate ``%uXXXX``, an empty part ``%``. Everything else, non-ASCII included, is kept
       (UTF-8). So ``Archive/2024`` (delimiter ``/``) is ``.Archive.2024`` and ``a.b`` is
       ``.a%2Eb``.
    3. A result longer than :data:`MAX_LOCAL_NAME` bytes (UTF-8) is cut (never inside a
       character or an escape) and ends with ``%~`` and 16 hex digits of the SHA-256 of the
       delimiter and the full name: stable, and distinct for distinct names.

    So the result is one path component (no ``/``, no NUL), never empty for a folder other
    than INBOX, never ``.`` or ``..``, never starting with ``..``, and it fits the file
    system's name limit: whatever the server sends, the folder stays inside the destination.
    Two folders that still map to one name (``a/b`` with delimiter ``/`` and ``a.b`` with
    delimiter ``.``; ``INBOX`` and ``Inbox``) are told apart by :func:`_assign_paths`.
    """
    if folder.upper() == "INBOX":
        return ""
    name = _relative_name(folder, namespace)
    parts = name.split(delimiter) if delimiter else [name]
    local = "." + ".".join(_escape_part(part) for part in parts)
    if len(local.encode("utf-8")) > MAX_LOCAL_NAME:
        local = _with_hash(local, folder, delimiter)
    return local


def maildir_folder_path(
    root: str | os.PathLike[str], folder: str, delimiter: str | None, namespace: str = ""
) -> Path:
    """Where a folder goes in the Maildir++ tree at *root*: ``root /`` :func:`local_folder_name`.

    ``INBOX`` (in any case) is *root* itself; ``Archive/2024`` with delimiter ``/`` is
    ``root/.Archive.2024``, and so is ``INBOX.Archive.2024`` with delimiter ``.`` and
    *namespace* ``INBOX.``. Two server folders with the same result are told apart when an
    export assigns the paths (see the module's documentation).
    """
    local = local_folder_name(folder, delimiter, namespace)
    return Path(root) / local if local else Path(root)


# -- the server side -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class ServerFolder:
    """A selectable folder on the server and its status, as listed at the start of a run.
    ``namespace`` is the personal namespace's prefix its local name is relative to (``""``:
    none; see :func:`local_folder_name`)."""

    name: str
    delimiter: str | None
    uidvalidity: int
    uidnext: int
    messages: int
    namespace: str = ""
    highestmodseq: int = 0  # 0: the server has no CONDSTORE, or not for this folder


@dataclasses.dataclass(frozen=True, slots=True)
class FolderFailure:
    """A folder an export could not export, and why (the others were exported).

    Attributes:
        name: The folder's name as the server listed it (decoded where it could be; bytes that
            are not UTF-8 are shown as ``\\xNN``).
        reason: What went wrong, in a few words.
    """

    name: str
    reason: str


_STATUS_KEYS: Final = (b"MESSAGES", b"UIDNEXT", b"UIDVALIDITY")


def _status_items(items: Sequence[Any]) -> dict[bytes, int]:
    """The numbers of a STATUS answer. Raises ValueError for a garbled or incomplete one."""
    if not isinstance(items, list | tuple) or len(items) % 2:
        raise ValueError("a garbled STATUS answer")
    found: dict[bytes, int] = {}
    for key, value in zip(items[::2], items[1::2], strict=True):
        if isinstance(key, bytes) and isinstance(value, int) and not isinstance(value, bool):
            found[key.upper()] = value
    lacking = [k.decode() for k in _STATUS_KEYS if k not in found]
    if found.get(b"HIGHESTMODSEQ", 0) < 0:
        raise ValueError("the server's STATUS answer has an impossible HIGHESTMODSEQ")
    if lacking:
        raise ValueError(f"the server's STATUS answer lacks {', '.join(lacking)} or garbles it")
    if found[b"UIDVALIDITY"] < 1 or found[b"UIDNEXT"] < 1 or found[b"MESSAGES"] < 0:
        raise ValueError("the server's STATUS answer has an impossible UIDVALIDITY or UIDNEXT")
    return found


def _shown(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


def _decode_raw_name(raw: object) -> tuple[str | None, str, str | None]:
    """``(name, shown, problem)`` for a name as LIST sent it: the name to use (None when it
    cannot be used), how to show it, and why it cannot."""
    if isinstance(raw, int):
        raw = str(raw).encode()
    if not isinstance(raw, bytes):
        return None, repr(raw), "a name that is not a string"
    if any(byte in raw for byte in b"\r\n\0"):
        return None, _shown(raw), "the name holds a line break or NUL: it cannot be asked for"
    try:
        name = str(imap_utf7.decode(raw))
        valid = imap_utf7.encode(name) == raw
    except Exception:  # any failure of the decoder means "not valid"
        name, valid = _shown(raw), False
    if not valid:
        # imapclient would send the name back encoded differently (e.g. "&AC8-" as "/"), and
        # so ask for another folder: never that.
        return None, _shown(raw), "the name is not valid modified UTF-7 (RFC 3501 5.1.3)"
    return name, name, None


@dataclasses.dataclass(frozen=True, slots=True)
class _Capabilities:
    """What the server offers for following changes (from the listing connection)."""

    condstore: bool = False  # RFC 7162: HIGHESTMODSEQ, CHANGEDSINCE
    qresync: bool = False  # RFC 7162: VANISHED (EARLIER)


def _list_status(
    client: IMAPClient,
) -> tuple[_Namespace, list[ServerFolder], list[FolderFailure], _Capabilities]:
    """The personal namespace, and LIST and STATUS of every folder: one round trip where the
    server has LIST-STATUS (RFC 5819; NAMESPACE pipelined with the LIST), else NAMESPACE,
    LIST and a STATUS per folder. With CONDSTORE, HIGHESTMODSEQ is asked for too. Runs in a
    worker thread, on a checked-out connection.

    A folder whose name or status cannot be used is a :class:`FolderFailure`, not an error of
    the run; a NO or BAD for one folder's STATUS too. Errors that end the session are raised.
    """
    condstore = bool(client.has_capability("CONDSTORE"))
    caps = _Capabilities(condstore, condstore and bool(client.has_capability("QRESYNC")))
    wanted = [*_STATUS_ITEMS, "HIGHESTMODSEQ"] if condstore else list(_STATUS_ITEMS)
    status: dict[bytes, Any] = {}
    encode = client.folder_encode
    client.folder_encode = False  # the names as the server sent them, to check them here
    try:
        if client.has_capability("LIST-STATUS"):
            # imapclient has no LIST-STATUS; imaplib's plumbing does it, as imapclient's own
            # list_folders() does for LIST.
            imap = client._imap
            asked = imap._command("NAMESPACE") if client.has_capability("NAMESPACE") else None
            tag = imap._command("LIST", '""', '"*"', "RETURN", f"(STATUS ({' '.join(wanted)}))")
            namespace = _namespace_answer(client, asked)
            typ, data = imap._command_complete("LIST", tag)
            client._checkok("list", typ, data)
            _, lists = imap._untagged_response(typ, data, "LIST")
            _, statuses = imap._untagged_response(typ, [None], "STATUS")
            listed = client._proc_folder_list(lists)
            with contextlib.suppress(Exception):  # a garbled answer: STATUS per folder below
                found = parse_response([item for item in statuses if item is not None])
                for i in range(0, len(found) - 1, 2):
                    key = found[i]
                    status[str(key).encode() if isinstance(key, int) else bytes(key)] = found[i + 1]
        else:
            client.folder_encode = encode
            namespace = _personal_namespace(client)
            client.folder_encode = False
            listed = client.list_folders()
    finally:
        client.folder_encode = encode
    folders: list[ServerFolder] = []
    failures: list[FolderFailure] = []
    seen: set[bytes] = set()
    for flags, delimiter, raw in listed:
        lowered = {bytes(flag).lower() for flag in flags if isinstance(flag, bytes)}
        if b"\\noselect" in lowered or b"\\nonexistent" in lowered:
            continue
        key = raw if isinstance(raw, bytes) else str(raw).encode()
        if key in seen:
            continue  # listed twice: one folder
        seen.add(key)
        name, shown, problem = _decode_raw_name(raw)
        if name is None:
            failures.append(FolderFailure(shown, problem or "unusable name"))
            continue
        try:
            items = status.get(key)
            if items is None:
                answer = client.folder_status(name, wanted)
                items = [part for pair in answer.items() for part in pair]
            numbers = _status_items(items)
        except imaplib.IMAP4.abort:
            raise
        except imaplib.IMAP4.error as exc:  # a NO or BAD for this folder (imapclient's errors)
            failures.append(FolderFailure(name, f"STATUS failed: {_one_line(exc)}"))
            continue
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            failures.append(FolderFailure(name, _one_line(exc)))
            continue
        sep = delimiter.decode("utf-8", "replace") if isinstance(delimiter, bytes) else delimiter
        folders.append(
            ServerFolder(
                name=name,
                delimiter=sep or None,
                uidvalidity=numbers[b"UIDVALIDITY"],
                uidnext=numbers[b"UIDNEXT"],
                messages=numbers[b"MESSAGES"],
                highestmodseq=numbers.get(b"HIGHESTMODSEQ", 0) if condstore else 0,
            )
        )
    return namespace, folders, failures, caps


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


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
                "uids": _uid_ranges(sorted(self.uids)),
                "gone": _uid_ranges(sorted(self.gone)),
                "listing": list(self.listing),
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
        ranges = _uid_ranges(sorted(exported_here))
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
        missing: Messages the server listed but did not return in this run (left out of the
            FETCH answer, or ``BODY[] NIL``): not exported, asked for again by the next run.
        flags_changed: Files renamed in this run because the message's flags changed on the
            server.
        gone: Messages found gone from the server in this run (expunged there).
        gone_kept: Files of messages gone from the server that are kept (all of them, found
            in this run or before; none with ``delete=True``).
        removed: Files removed in this run because their messages are gone from the server
            (``delete=True`` only).
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
    missing: int = 0
    flags_changed: int = 0
    gone: int = 0
    gone_kept: int = 0
    removed: int = 0


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
    ``folders_failed``      a :class:`FolderFailure` (name, reason) per folder that could
                            not be exported; the others were
    ``messages_missing``    messages the server listed but did not return (see
                            :attr:`FolderReport.missing`)
    ======================  ============================================================
    """

    folders: tuple[FolderReport, ...]
    messages_fetched: int
    bytes_fetched: int
    messages_skipped: int
    folders_fetched: int
    elapsed: float
    folders_failed: tuple[FolderFailure, ...] = ()
    messages_missing: int = 0

    @property
    def complete(self) -> bool:
        """Every folder was exported and every message the server listed is in the Maildir."""
        return not self.folders_failed and not self.messages_missing

    @property
    def flags_changed(self) -> int:
        """Files renamed for a flag change on the server, in all folders."""
        return sum(f.flags_changed for f in self.folders)

    @property
    def messages_gone(self) -> int:
        """Messages found gone from the server in this run, in all folders."""
        return sum(f.gone for f in self.folders)

    @property
    def gone_kept(self) -> int:
        """Files kept of messages gone from the server, in all folders."""
        return sum(f.gone_kept for f in self.folders)

    @property
    def messages_removed(self) -> int:
        """Files removed because their messages are gone from the server (``delete=True``)."""
        return sum(f.removed for f in self.folders)

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


async def _server_folders(
    pool: Pool,
) -> tuple[_Namespace, list[ServerFolder], list[FolderFailure]]:
    namespace, listed, failures, _caps = await _list_server(pool)
    return namespace, listed, failures


async def _list_server(
    pool: Pool,
) -> tuple[_Namespace, list[ServerFolder], list[FolderFailure], _Capabilities]:
    """The namespace, the folders and what the server offers for following changes."""
    async with pool.connection() as conn:
        return await conn.run_sync(_list_in_namespace)


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
        self.retry = False
        self.limiter = trio.CapacityLimiter(_WRITERS)
        self.folders_done = 0
        self.folders_handed = 0
        self.totals = (0, 0)
        self.messages = 0
        self.bytes = 0

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
        chosen: Sequence[_Folder],
        batch_size: int,
        max_connections: int | None,
        send: trio.MemorySendChannel[_Pending],
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
                ) as results,
            ):
                async for name, uid, data in results:
                    folder = self.by_name[name]
                    body = data.get(b"BODY[]")
                    if not isinstance(body, bytes):  # BODY[] NIL, or no BODY[] at all
                        self.skipped += 1
                        continue
                    folder.received.add(uid)
                    if uid in folder.exported:
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
            ranges = _uid_ranges(sorted(unanswered))
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

    Returns:
        An :class:`ExportResult`; :attr:`ExportResult.complete` is False when a folder failed
        or a message was missing.

    Raises:
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
) -> tuple[list[_Folder], _Run, list[FolderFailure]]:
    """List, reconcile, fetch and write, then look for what did not come; the state is left
    to the caller."""
    namespace, listed, failures, caps = await _list_server(pool)
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
    run = _Run(prepared, fsync, progress)
    for _round in range(len(prepared) + 1):  # each further round follows a failed folder
        batch = run.plan()
        if not batch:
            break
        run.retry = False
        run.report()
        send, receive = trio.open_memory_channel[_Pending](_WRITE_BATCH)
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


# -- the personal namespace and folder patterns ---------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Namespace:
    """The account's personal namespace: its prefix (``"INBOX."`` on Courier, ``""`` where
    folders are beside INBOX) and delimiter. The prefix ends with the delimiter, if any."""

    prefix: str = ""
    delimiter: str | None = None


def _namespace_answer(client: IMAPClient, tag: Any) -> _Namespace:
    """:func:`_personal_namespace` from the answer to a NAMESPACE command sent (pipelined)
    with tag *tag* (None: not sent). Runs in a worker thread."""
    if tag is None:
        return _Namespace()
    imap = client._imap
    try:
        typ, data = imap._command_complete("NAMESPACE", tag)
        if typ != "OK":
            return _Namespace()
        _, answer = imap._untagged_response(typ, data, "NAMESPACE")
        personal = parse_response([line for line in answer if line is not None])[0]
        prefix, delimiter = personal[0] if personal else (b"", None)
        prefix = imap_utf7.decode(prefix)
        if isinstance(delimiter, bytes):
            delimiter = delimiter.decode("utf-8", "replace")
    except imaplib.IMAP4.abort:
        raise
    except (imaplib.IMAP4.error, ValueError, TypeError, IndexError, AttributeError):
        return _Namespace()
    return _namespace_of(prefix, delimiter)


def _personal_namespace(client: IMAPClient) -> _Namespace:
    """The first personal namespace of NAMESPACE (RFC 2342), the one a client creates folders
    in. No prefix where the server has no NAMESPACE, answers NO or BAD, or sends something
    unusable. Runs in a worker thread; errors that end the session are raised."""
    if not client.has_capability("NAMESPACE"):
        return _Namespace()
    try:
        personal = client.namespace().personal
        prefix, delimiter = personal[0] if personal else ("", None)
    except imaplib.IMAP4.abort:
        raise
    except (imaplib.IMAP4.error, ValueError, TypeError, IndexError, AttributeError):
        return _Namespace()
    return _namespace_of(prefix, delimiter)


def _namespace_of(prefix: object, delimiter: object) -> _Namespace:
    """A personal namespace's prefix and delimiter, checked; no prefix if unusable."""
    if not isinstance(prefix, str) or any(c in prefix for c in "\r\n\0"):
        return _Namespace()
    if not isinstance(delimiter, str) or len(delimiter) != 1:
        delimiter = None
    if prefix and delimiter and not prefix.endswith(delimiter):
        prefix += delimiter  # "INBOX" with "." names its folders "INBOX.x"
    return _Namespace(prefix, delimiter)


def _list_in_namespace(
    client: IMAPClient,
) -> tuple[_Namespace, list[ServerFolder], list[FolderFailure], _Capabilities]:
    """:func:`_list_status`, each folder with the personal namespace's prefix (NAMESPACE is
    pipelined with LIST-STATUS: no round trip more). Runs in a worker thread."""
    namespace, listed, failures, caps = _list_status(client)
    if namespace.prefix:
        listed = [dataclasses.replace(f, namespace=namespace.prefix) for f in listed]
    return namespace, listed, failures, caps


def _relative_name(folder: str, prefix: str) -> str:
    """*folder* without the namespace *prefix* when it is under it (``INBOX.Archive`` under
    ``INBOX.`` is ``Archive``; the ``INBOX`` of a prefix in any case); else the whole name,
    also when the rest would be empty or ``INBOX``."""
    if not prefix or len(folder) <= len(prefix):
        return folder
    head, rest = folder[: len(prefix)], folder[len(prefix) :]
    inbox = prefix[:5].upper() == "INBOX" and head[:5].upper() == "INBOX"
    if head != prefix and not (inbox and head[5:] == prefix[5:]):
        return folder
    return folder if rest.upper() == "INBOX" else rest


def _pattern_name(folder: str, delimiter: str | None, prefix: str) -> str:
    """How patterns see a folder: relative to the personal namespace, ``/`` between levels
    (``INBOX.Archive.2024`` under ``INBOX.`` with ``.`` is ``Archive/2024``)."""
    name = _relative_name(folder, prefix)
    if delimiter and delimiter != "/":
        name = "/".join(name.split(delimiter))
    return name


def _matches(name: str, delimiter: str | None, prefix: str, patterns: Iterable[str]) -> bool:
    """Whether a folder matches one of the shell-style *patterns*: its :func:`_pattern_name`,
    or its name as the server lists it (so patterns written for the server's own names go on
    working), case-sensitively; ``INBOX`` in any case."""
    shown = _pattern_name(name, delimiter, prefix)
    return any(
        fnmatch.fnmatchcase(shown, p)
        or fnmatch.fnmatchcase(name, p)
        or (p.upper() == "INBOX" == name.upper())
        for p in patterns
    )


def _select(
    namespace: _Namespace,
    folders: Sequence[ServerFolder],
    failures: Sequence[FolderFailure],
    include: Sequence[str] | None,
    exclude: Sequence[str],
) -> tuple[list[ServerFolder], list[FolderFailure]]:
    """The folders to export (INBOX first, then by name) and the failures among them.

    Raises:
        FolderNotFoundError: A name or pattern of *include* matches no folder on the server
            (one that cannot be exported counts: it is reported as a failure instead).
    """
    prefix = namespace.prefix

    def wanted(name: str, delimiter: str | None) -> bool:
        return (include is None or _matches(name, delimiter, prefix, include)) and not _matches(
            name, delimiter, prefix, exclude
        )

    if include is not None:
        listed = [(f.name, f.delimiter) for f in folders]
        listed += [(f.name, namespace.delimiter) for f in failures]
        _check_patterns(namespace, listed, include)
    chosen = sorted(
        (f for f in folders if wanted(f.name, f.delimiter)),
        key=lambda f: (f.name.upper() != "INBOX", f.name),
    )
    return chosen, [f for f in failures if wanted(f.name, namespace.delimiter)]


def _check_patterns(
    namespace: _Namespace, listed: Sequence[tuple[str, str | None]], include: Sequence[str]
) -> None:
    """Raise :class:`FolderNotFoundError` for the names and patterns that match nothing."""
    unmatched = [
        p for p in include if not any(_matches(n, d, namespace.prefix, [p]) for n, d in listed)
    ]
    if not unmatched:
        return
    names = [p for p in unmatched if not any(c in p for c in "*?[")]
    patterns = [p for p in unmatched if p not in names]
    problems = []
    if names:
        problems.append(f"no such folder on the server: {', '.join(map(repr, names))}")
    if patterns:
        problems.append(f"no folder on the server matches {', '.join(map(repr, patterns))}")
    where = f"relative to the namespace {namespace.prefix!r}, " if namespace.prefix else ""
    raise FolderNotFoundError(
        f"{'; '.join(problems)} (folders are written with '/' between levels, {where}"
        "as in 'Archive/2024')"
    )
