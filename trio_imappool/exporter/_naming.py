"""The Maildir side of names: folder names to directories, flags to info letters, file names.

Synchronous and pure: folder names are data, never paths."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from ._base import _FLAG_LETTERS, _NAME_RE, _NAME_TAG

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
