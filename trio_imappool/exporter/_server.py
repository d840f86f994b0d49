"""The server side of an export: listing the folders with their STATUS, the personal
namespace, and choosing folders by pattern."""

from __future__ import annotations

import dataclasses
import fnmatch
import imaplib
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final

from imapclient import imap_utf7

from trio_imappool.wire import list_with_status

from ._base import _STATUS_ITEMS, FolderNotFoundError
from ._naming import _relative_name

if TYPE_CHECKING:
    from imapclient import IMAPClient


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
    size: int | None = None  # bytes of all its messages (STATUS=SIZE, RFC 8438); None: unknown


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
    client: IMAPClient, sizes: bool = False
) -> tuple[_Namespace, list[ServerFolder], list[FolderFailure], _Capabilities]:
    """The personal namespace, and LIST and STATUS of every folder: one round trip where the
    server has LIST-STATUS (RFC 5819; NAMESPACE pipelined with the LIST), else NAMESPACE,
    LIST and a STATUS per folder. With CONDSTORE, HIGHESTMODSEQ is asked for too. Runs in a
    worker thread, on a checked-out connection. With *sizes*, where the server has
    STATUS=SIZE (RFC 8438), each folder's SIZE too (Dovecot adds it up at every listing, about
    0.5 us a message: asked on a first export only, where it can spare asking message sizes).

    A folder whose name or status cannot be used is a :class:`FolderFailure`, not an error of
    the run; a NO or BAD for one folder's STATUS too. Errors that end the session are raised.
    """
    condstore = bool(client.has_capability("CONDSTORE"))
    caps = _Capabilities(condstore, condstore and bool(client.has_capability("QRESYNC")))
    wanted = [*_STATUS_ITEMS, "HIGHESTMODSEQ"] if condstore else list(_STATUS_ITEMS)
    sized = sizes and bool(client.has_capability("STATUS=SIZE"))
    if sized:  # what the folders hold: an export that fits its memory budget plans nothing
        wanted.append("SIZE")
    status: dict[bytes, Any] = {}
    encode = client.folder_encode
    client.folder_encode = False  # the names as the server sent them, to check them here
    try:
        if client.has_capability("LIST-STATUS"):
            answer = list_with_status(
                client, wanted, namespace=bool(client.has_capability("NAMESPACE"))
            )
            namespace = _Namespace() if answer.personal is None else _namespace_of(*answer.personal)
            listed, status = answer.folders, answer.status
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
                size=numbers.get(b"SIZE") if sized and numbers.get(b"SIZE", -1) >= 0 else None,
            )
        )
    return namespace, folders, failures, caps


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


# -- the personal namespace and folder patterns ---------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Namespace:
    """The account's personal namespace: its prefix (``"INBOX."`` on Courier, ``""`` where
    folders are beside INBOX) and delimiter. The prefix ends with the delimiter, if any."""

    prefix: str = ""
    delimiter: str | None = None


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
    client: IMAPClient, sizes: bool = False
) -> tuple[_Namespace, list[ServerFolder], list[FolderFailure], _Capabilities]:
    """:func:`_list_status`, each folder with the personal namespace's prefix (NAMESPACE is
    pipelined with LIST-STATUS: no round trip more). Runs in a worker thread."""
    namespace, listed, failures, caps = _list_status(client, sizes)
    if namespace.prefix:
        listed = [dataclasses.replace(f, namespace=namespace.prefix) for f in listed]
    return namespace, listed, failures, caps


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
