"""The exporter's flag pass on the wire: FLAGS-only ``UID FETCH`` of many folders, pipelined.

Blocking code for a worker thread (``conn.run_sync(fetch_flags, steps, qresync)``); no Trio
here. What it sends for each folder, all written before any answer is read (IMAP lets a client
pipeline commands, and the server answers them in order), so that one connection syncs the
flags of many folders in one round trip::

    EXAMINE "Folder"
    UID FETCH 1:* (FLAGS)                                    (no modseq known, or no CONDSTORE)
    UID FETCH 1:* (FLAGS) (CHANGEDSINCE 41)                  (CONDSTORE, RFC 7162)
    UID FETCH 1:* (FLAGS) (CHANGEDSINCE 41 VANISHED)         (QRESYNC, after ENABLE QRESYNC)

The answers kept are the untagged FETCH responses that carry a UID (other sessions' flag
changes come without one, and a sequence number must never be read as a UID) and the
``VANISHED`` responses (RFC 7162 3.2.10) that arrive while the folder's FETCH runs: with
``(EARLIER)`` the messages expunged since the modseq, without it the ones expunged meanwhile.
"""

from __future__ import annotations

import dataclasses
import re
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

from imapclient.exceptions import ProtocolError
from imapclient.response_parser import parse_response

from ._fetch import complete, failure

if TYPE_CHECKING:
    from imapclient import IMAPClient

__all__ = ["FlagAnswer", "FlagStep", "fetch_flags", "parse_flag_responses", "parse_uid_set"]

# Clients (connections) on which QRESYNC was enabled: ENABLE is sent once per connection.
_qresync_on: weakref.WeakSet[Any] = weakref.WeakSet()

_LINE_RE: Final = re.compile(rb"(\d+) \((.*)\)\s*\Z", re.DOTALL)
_TOKEN_RE: Final = re.compile(rb"\(([^()]*)\)|([^\s()]+)")
_UID_SET_RE: Final = re.compile(rb"\d+(?::\d+)?(?:,\d+(?::\d+)?)*")
# The largest UID range a VANISHED answer is taken to name (a UID is 32 bits; a server that
# says "1:4294967295" must not make us build a set of four billion numbers).
_MAX_RANGE: Final = 10_000_000


@dataclasses.dataclass(frozen=True, slots=True)
class FlagStep:
    """One folder of a flag pass.

    Attributes:
        folder: The folder's name (as imapclient takes it).
        since: Only the messages whose flags changed after this modseq (``CHANGEDSINCE``);
            None for every message (a full listing, which also says which UIDs exist).
        vanished: Ask for the UIDs expunged since *since* too (QRESYNC; needs *since*).
    """

    folder: str
    since: int | None = None
    vanished: bool = False


@dataclasses.dataclass(slots=True)
class FlagAnswer:
    """What the server said for one :class:`FlagStep`.

    Attributes:
        flags: UID -> its flags, for every message the FETCH returned.
        vanished: UIDs the server said are expunged (``VANISHED``, with or without
            ``(EARLIER)``).
        exists: The message count from the EXAMINE answer (None if it had none).
        error: The NO or BAD answer of the EXAMINE or the FETCH (the connection is fine), or
            None.
    """

    flags: dict[int, tuple[bytes, ...]] = dataclasses.field(default_factory=dict)
    vanished: set[int] = dataclasses.field(default_factory=set)
    exists: int | None = None
    error: Exception | None = None


def parse_uid_set(text: bytes) -> set[int]:
    """The UIDs of a UID set as VANISHED sends it (``41,43:116``). Raises ProtocolError for
    anything else."""
    text = text.strip()
    if not _UID_SET_RE.fullmatch(text):
        raise ProtocolError(f"invalid UID set in a VANISHED response: {text[:80]!r}")
    uids: set[int] = set()
    for part in text.split(b","):
        low, _, high = part.partition(b":")
        a, b = int(low), int(high or low)
        a, b = min(a, b), max(a, b)
        if b - a > _MAX_RANGE:
            raise ProtocolError("a VANISHED range too large to be true")
        uids.update(range(a, b + 1))
    return uids


def _vanished(lines: Sequence[Any]) -> set[int]:
    uids: set[int] = set()
    for line in lines:
        if not isinstance(line, bytes):
            continue
        text = line.strip()
        if text.upper().startswith(b"(EARLIER)"):
            text = text[len(b"(EARLIER)") :]
        uids |= parse_uid_set(text)
    return uids


def _items_slow(line: Any) -> tuple[int, dict[bytes, Any]]:
    parsed = parse_response(list(line) if isinstance(line, tuple) else [line])
    if len(parsed) != 2 or not isinstance(parsed[1], tuple) or len(parsed[1]) % 2:
        raise ProtocolError(f"malformed FETCH response: {str(line)[:80]}")
    seq, pairs = parsed
    items = {}
    for name, value in zip(pairs[::2], pairs[1::2], strict=True):
        if isinstance(name, bytes):
            items[name.upper()] = value
    return int(seq), items


def _items(line: Any) -> tuple[int, dict[bytes, Any]]:
    """The items of one FETCH response line: a fast path for the plain ``(UID n FLAGS (...)
    MODSEQ (m))`` shape, imapclient's parser for anything else (quotes, literals, nesting)."""
    if isinstance(line, bytes) and b'"' not in line and b"{" not in line:
        match = _LINE_RE.match(line)
        if match is not None:
            tokens = list(_TOKEN_RE.finditer(match.group(2)))
            inner = match.group(2)
            nested = inner.count(b"(") != sum(1 for t in tokens if t.group(1) is not None)
            if len(tokens) % 2 == 0 and not nested:
                items: dict[bytes, Any] = {}
                for name, value in zip(tokens[::2], tokens[1::2], strict=True):
                    if name.group(2) is None:
                        break
                    if value.group(1) is not None:
                        items[name.group(2).upper()] = tuple(value.group(1).split())
                    else:
                        items[name.group(2).upper()] = value.group(2)
                else:
                    return int(match.group(1)), items
    return _items_slow(line)


def parse_flag_responses(lines: Sequence[Any]) -> dict[int, tuple[bytes, ...]]:
    """UID -> flags from untagged FETCH response lines (as imaplib keeps them).

    A response without a UID is another session's news about a message known only by its
    sequence number: dropped. A response without FLAGS (a bare MODSEQ) leaves the flags known
    so far. Several responses for one UID: the last FLAGS wins (they arrive in order).
    """
    out: dict[int, tuple[bytes, ...]] = {}
    for line in lines:
        if line is None:
            continue
        _seq, items = _items(line)
        raw_uid = items.get(b"UID")
        try:
            uid = int(raw_uid) if raw_uid is not None else None
        except (TypeError, ValueError):
            raise ProtocolError(f"invalid UID in a FETCH response: {raw_uid!r}") from None
        if uid is None or uid < 1:
            continue
        flags = items.get(b"FLAGS")
        if isinstance(flags, tuple):
            out[uid] = tuple(f for f in flags if isinstance(f, bytes))
        elif flags is not None:
            raise ProtocolError(f"invalid FLAGS in a FETCH response for UID {uid}")
    return out


def fetch_flags(client: IMAPClient, steps: Sequence[FlagStep], qresync: bool) -> list[FlagAnswer]:
    """Run a flag pass over *steps* on one connection, in one round trip; one answer per step.

    With *qresync*, ``ENABLE QRESYNC`` goes first (once per connection; a folder selected
    on it is unselected first, as RFC 5161 wants ENABLE outside a folder). Every folder is
    EXAMINEd (read-only: nothing changes on the server) and then fetched. A NO or BAD for one
    folder is that step's :attr:`FlagAnswer.error`; errors that end the session (EOF,
    timeout, BYE, a garbled answer) are raised. Leaves the last folder selected read-only,
    and the pool's record of the selected folder (``client.selected``) says so.
    """
    imap = client._imap
    answers = [FlagAnswer() for _ in steps]
    if not steps:
        return answers
    state = imap.state
    tags: list[tuple[Any, Any]] = []
    unselect = enable = None
    try:
        imap.untagged_responses = {}
        imap.is_readonly = True
        if qresync and client not in _qresync_on:
            if getattr(client, "selected", None) is not None and state == "SELECTED":
                unselect = imap._command("UNSELECT")
            imap.state = "AUTH"
            enable = imap._command("ENABLE", "QRESYNC")
        imap.state = "SELECTED"  # imaplib sends UID commands only then; the server will be
        for step in steps:
            examine = imap._command("EXAMINE", client._normalise_folder(step.folder))
            modifiers: list[str] = []
            if step.since is not None:
                modifiers = [f"(CHANGEDSINCE {step.since}{' VANISHED' if step.vanished else ''})"]
            fetch = imap._command("UID", "FETCH", "1:*", "(FLAGS)", *modifiers)
            tags.append((examine, fetch))
    finally:
        imap.state = state
    if hasattr(client, "selected"):
        client.selected = None
    if unselect is not None:
        complete(imap, "UNSELECT", unselect)
    if enable is not None:
        typ, _answer = complete(imap, "ENABLE", enable)
        if typ == "OK":
            _qresync_on.add(client)
        # Else (a server that announces QRESYNC but refuses it): the FETCHes with VANISHED
        # get a BAD, and their folders fail in this run; the connection is fine.
    for step, answer_, (examine, fetch) in zip(steps, answers, tags, strict=True):
        imap.untagged_responses = {}
        typ, answer = complete(imap, "EXAMINE", examine)
        exists = imap.untagged_responses.get("EXISTS", [])
        imap.untagged_responses = {}
        if typ == "OK":
            imap.state = "SELECTED"
            if hasattr(client, "selected"):
                client.selected = (step.folder, True)
            if exists and isinstance(exists[-1], bytes) and exists[-1].isdigit():
                answer_.exists = int(exists[-1])
        else:
            imap.state = "AUTH"
            if hasattr(client, "selected"):
                client.selected = None
            answer_.error = failure("select", typ, answer)
        ftyp, fanswer = complete(imap, "FETCH", fetch)
        lines = imap.untagged_responses.pop("FETCH", [])
        vanished = imap.untagged_responses.pop("VANISHED", [])
        if answer_.error is not None:
            continue  # the FETCH ran on no folder (or failed): nothing of it is this folder's
        if ftyp != "OK":
            answer_.error = failure("fetch", ftyp, fanswer)
            continue
        answer_.flags = parse_flag_responses(lines)
        answer_.vanished = _vanished(vanished)
    imap.untagged_responses = {}
    return answers
