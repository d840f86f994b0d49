"""What pipelined commands share: message sets, reading an answer, and FETCH results by UID.

The pipelined commands (:mod:`._wire_client`, :mod:`._sync`) write several commands before
reading any answer, then read each answer with imaplib's ``_command_complete``. This module
holds the pieces they have in common: how a NO or BAD becomes imapclient's error, how the
untagged FETCH responses become results (only those that carry a UID asked for), and the
ESEARCH and message-set codecs; and :func:`after_noop`, a NOOP pipelined before any command.
Pure functions apart from :func:`complete` and :func:`after_noop`; no Trio.
"""

from __future__ import annotations

import imaplib
from collections.abc import Container, Iterable, Sequence
from typing import Any, Literal, NamedTuple

from imapclient import IMAPClient
from imapclient.exceptions import ProtocolError
from imapclient.imapclient import join_message_ids
from imapclient.response_parser import (
    _convert_ENVELOPE,
    _convert_INTERNALDATE,
    gen_parsed_response,
)
from imapclient.response_types import BodyData

from ._fetch_reader import FetchReader

__all__ = [
    "PipelinedFetch",
    "Wanted",
    "after_noop",
    "complete",
    "esearch_uids",
    "failure",
    "fetch_responses",
    "message_ids",
    "message_set",
    "read_fetch_results",
    "select_fetch_results",
]


class PipelinedFetch(NamedTuple):
    """The outcome of one step of :meth:`~._wire_client.WireClient.fetch_pipelined`."""

    fetched: dict[int, dict[bytes, Any]] | None
    error: Exception | None
    command: Literal["select", "fetch"] | None  # the command that failed
    #: What the EXAMINE sent for this step said (``b"EXISTS"``, ``b"UIDNEXT"`` ...), as
    #: imapclient's ``select_folder`` returns it; None where the step had no EXAMINE.
    examined: dict[bytes, Any] | None = None


def failure(command: str, typ: str, answer: Sequence[Any]) -> Exception:
    """The error imapclient raises for a NO or BAD answer (``"select failed: ..."``)."""
    text = answer[0].decode("utf-8", "replace") if answer and isinstance(answer[0], bytes) else ""
    # imapclient's IMAPClientError is this class.
    return imaplib.IMAP4.error(f"{command} failed: {text or typ}")


def complete(imap: Any, name: str, tag: Any) -> tuple[str, list[Any]]:
    """The tagged answer of a pipelined command; a BAD is returned, not raised (imaplib has
    read it in full). Errors that end the session (``abort``) are raised."""
    try:
        typ, answer = imap._command_complete(name, tag)
    except imaplib.IMAP4.abort:
        raise
    except imaplib.IMAP4.error as exc:  # BAD, read in full
        return "BAD", [str(exc).encode()]
    return str(typ), list(answer)


def message_ids(messages: Any) -> set[int]:
    """The UIDs a caller of ``fetch`` gave (an int, or an iterable of ints or digit strings),
    as imapclient reads them."""
    if isinstance(messages, int | str | bytes):
        messages = [messages]
    return {int(message) for message in messages}


def message_set(uids: Sequence[int]) -> bytes:
    """UIDs as an IMAP message set: a ``range`` as ``first:last``, anything else listed."""
    if isinstance(uids, range) and uids.step == 1 and uids:
        return b"%d:%d" % (uids.start, uids.stop - 1)
    joined: bytes = join_message_ids(uids)
    return joined


def esearch_uids(lines: list[Any]) -> list[int] | None:
    """The UIDs of an ESEARCH answer's ``ALL`` (RFC 4731), or None if it has none."""
    for line in lines:
        if not isinstance(line, bytes):
            continue
        words = line.split()
        for index, word in enumerate(words[:-1]):
            if word.upper() == b"ALL":
                uids: list[int] = []
                for part in words[index + 1].split(b","):
                    low, _, high = part.partition(b":")
                    first, last = int(low), int(high or low)
                    if first > last:
                        first, last = last, first
                    uids.extend(range(first, last + 1))
                return uids
    return None


class Wanted:
    """Membership in any of several UID collections (lists or ranges), without copying them."""

    __slots__ = ("_ranges", "_set")

    def __init__(self, parts: Sequence[Sequence[int]]) -> None:
        self._ranges = [part for part in parts if isinstance(part, range)]
        self._set = {uid for part in parts if not isinstance(part, range) for uid in part}

    def __contains__(self, uid: object) -> bool:
        # Asked once per message read: a loop, not any() over a generator.
        if uid in self._set:
            return True
        for part in self._ranges:  # noqa: SIM110 (no generator per message)
            if uid in part:
                return True
        return False


def read_fetch_results(
    reader: FetchReader, lines: list[Any], normalise_times: bool, wanted: Container[int] | None
) -> dict[int, dict[bytes, Any]]:
    """The results of a ``UID FETCH`` read through *reader*, by UID: the responses it parsed,
    and the rest (those it left to the generic parser, and *lines*, the FETCH lines imaplib
    kept) parsed here. See :func:`select_fetch_results` for which responses are results."""
    rest = fetch_responses([*reader.unparsed, *lines], normalise_times)
    return select_fetch_results([*reader.messages, *rest], wanted)


def select_fetch_results(
    responses: Iterable[dict[bytes, Any]], wanted: Container[int] | None
) -> dict[int, dict[bytes, Any]]:
    """The parsed FETCH responses that are results, merged by UID.

    Only responses that carry a UID are results, and with *wanted* only those with a UID in
    it: a server sends other sessions' flag changes as ``* 7 FETCH (FLAGS (...))`` without a
    UID, even in the middle of a UID FETCH, and imapclient's own parser then files them under
    the sequence number, merged into whichever message has that number as its UID. Several
    responses for the same UID are one message's items, merged.
    """
    results: dict[int, dict[bytes, Any]] = {}
    for items in responses:
        uid = items.get(b"UID")
        if not isinstance(uid, int) or (wanted is not None and uid not in wanted):
            continue
        merged = results.get(uid)
        if merged is None:
            results[uid] = items  # each response is parsed into a dict of its own: no copy
        else:
            merged.update(items)
    return results


def fetch_responses(lines: list[Any], normalise_times: bool) -> list[dict[bytes, Any]]:
    """Each untagged FETCH response on its own, as imapclient converts its items (with
    ``b"SEQ"``, and ``b"UID"`` if it had one). Never merged: a sequence number may name
    another message after an EXPUNGE, which a server may send during a UID command."""
    lines = [line for line in lines if line is not None]
    if not lines:
        return []
    tokens = gen_parsed_response(lines)
    out: list[dict[bytes, Any]] = []
    for number in tokens:
        try:
            seq = int(number)
        except (TypeError, ValueError):
            raise ProtocolError(f"invalid message number in a FETCH response: {number!r}") from None
        items = next(tokens, None)
        if not isinstance(items, tuple) or len(items) % 2:
            raise ProtocolError(f"malformed FETCH response for message {seq}")
        message: dict[bytes, Any] = {b"SEQ": seq}
        for name, value in zip(items[::2], items[1::2], strict=True):
            if not isinstance(name, bytes):
                raise ProtocolError(f"malformed FETCH item name for message {seq}: {name!r}")
            word = name.upper()
            message[word] = _fetch_value(word, value, normalise_times)
        out.append(message)
    return out


def _fetch_value(word: bytes, value: Any, normalise_times: bool) -> Any:
    """One FETCH item's value as imapclient's ``fetch`` returns it."""
    if word == b"UID":
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ProtocolError(f"invalid UID in a FETCH response: {value!r}") from None
    if word == b"INTERNALDATE":
        return _convert_INTERNALDATE(value, normalise_times)
    if word == b"ENVELOPE":
        return _convert_ENVELOPE(value, normalise_times)
    if word in (b"BODY", b"BODYSTRUCTURE"):
        return BodyData.create(value)
    return value


def after_noop(client: IMAPClient, name: str, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """``client.<name>(*args, **kwargs)`` with a NOOP written right before it, in the same round
    trip: the server answers the NOOP first, so a session that has had its folder selected for
    a while sees other sessions' changes before the command runs (a session learns of them only
    at its next command; Courier-IMAP loses keyword updates of sessions that STORE without
    that). The NOOP's answer is read with the command's."""
    imap = client._imap
    tag = imap._command("NOOP")
    result = getattr(client, name)(*args, **kwargs)
    imap._command_complete("NOOP", tag)
    return result
