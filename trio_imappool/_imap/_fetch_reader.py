"""A purpose-built reader for the answers of ``UID FETCH``: the common shape parsed directly.

imaplib reads every response line through a chain of regular expressions and keeps it in
``untagged_responses``; imapclient then runs its generic tokenizer, byte by byte, over every
line again. For a mailbox export that is most of the CPU a message costs. The answers to a
fetch of message bodies nearly always look the same::

    * 12 FETCH (UID 345 FLAGS (\\Seen) BODY[] {2000}
    <2000 bytes>
    )

:class:`FetchReader` takes the place of imaplib's ``_get_response`` while a FETCH is read. A
line that starts an untagged FETCH response is read here, with its literals (each read once,
straight from imaplib's buffered file, never copied again); the response is parsed by
:func:`parse_simple_fetch`, which accepts only items whose value is a number, an atom, ``NIL``,
a flat list of those, or a literal, and returns None for anything else (quoted strings,
nested lists such as ENVELOPE, sections with field lists, a literal whose size does not match
its announcement, anything unexpected). Such a response is kept, in imaplib's form, for the
generic parser, so the result is the same as imapclient's either way; the property tests
check that. Every other line (tagged completions, other untagged responses,
``BYE``) goes to imaplib's own ``_get_response`` unchanged.

No Trio in here: it runs in the worker thread that owns the connection.
"""

from __future__ import annotations

import imaplib
import re
from collections.abc import Callable
from typing import Any, Final

__all__ = ["FetchReader", "parse_simple_fetch"]

# The lines of one untagged FETCH response as imaplib stores them: (text, literal) pairs for
# lines that announce a literal, then the last line. The first text is "<seq> (<items>...".
Pieces = list[Any]

_MAX_LINE: Final = imaplib._MAXLINE  # type: ignore[attr-defined]
_FETCH_START: Final = re.compile(rb"\* (\d+) FETCH (\(.*)", re.DOTALL)
_LITERAL_END: Final = re.compile(rb"\{(\d+)\}\Z")
# One item: a space unless it is the first, the name (BODY[...] sections without spaces or
# parentheses, an optional <origin>), a space, and a value: an atom or number (no IMAP
# specials), a flat list, or a literal announced at the very end of the text.
_ITEM: Final = re.compile(
    rb"(?P<name>[A-Za-z0-9.\-]+(?:\[[^\]\[(){}\"% ]*\](?:<[0-9]+>)?)?) "
    rb"(?:(?P<atom>[^ ()\[\]{}\"%\\]+|\\[A-Za-z]+)(?= |\)|\Z)"
    rb"|\((?P<list>[^()\[\]{}\"%]*)\)"
    rb"|\{(?P<literal>[0-9]+)\}\Z)"
)
_FLAG_CHARS: Final = re.compile(rb"[^ ()\[\]{}\"%]+")
# Items whose values imapclient converts (dates, envelopes, body structures): generic parser.
_CONVERTED: Final = frozenset({b"INTERNALDATE", b"ENVELOPE", b"BODY", b"BODYSTRUCTURE"})


def _atom(token: bytes) -> Any:
    """A token as imapclient's parser gives it: NIL, a number (no leading zero), or bytes."""
    if token == b"NIL":
        return None
    if token.isdigit() and (token[:1] != b"0" or len(token) == 1):
        return int(token)
    return token


# The commonest of all: "<seq> (UID <uid> [FLAGS (<flags>)] BODY[] {<size>}", then ")".
_BODY_FIRST: Final = re.compile(
    rb"([0-9]+) \(UID ([1-9][0-9]*)(?: FLAGS \(((?:[^ ()\[\]{}\"%]+(?: [^ ()\[\]{}\"%]+)*)?)\))?"
    rb" BODY\[\] \{([0-9]+)\}"
)


def _flags(text: bytes) -> tuple[Any, ...]:
    tokens = text.split(b" ") if text else []
    for token in tokens:  # once per message: a loop, not any() over a generator
        if token == b"NIL" or token.isdigit():
            return tuple(_atom(token) for token in tokens)
    return tuple(tokens)


def parse_simple_fetch(pieces: Pieces) -> dict[bytes, Any] | None:
    """One FETCH response in its common shape, as imapclient's fetch gives it, or None.

    *pieces* are the response's lines as imaplib stores them (see the module's docstring).
    Returns ``{b"SEQ": n, b"UID": u, b"BODY[]": b"...", b"FLAGS": (...)}``, or None when the
    response has anything this parser does not handle, for the generic parser to read.
    """
    if len(pieces) == 2 and pieces[1] == b")" and isinstance(pieces[0], tuple):
        text, literal = pieces[0]
        match = _BODY_FIRST.fullmatch(text) if isinstance(text, bytes) else None
        if match is not None and isinstance(literal, bytes) and int(match[4]) == len(literal):
            seq, uid, flags = match[1], match[2], match[3]
            if seq[:1] != b"0" or len(seq) == 1:
                message: dict[bytes, Any] = {b"SEQ": int(seq), b"UID": int(uid)}
                if flags is not None:
                    message[b"FLAGS"] = _flags(flags)
                message[b"BODY[]"] = literal
                return message
    return _parse_items(pieces)


def _parse_items(pieces: Pieces) -> dict[bytes, Any] | None:
    """:func:`parse_simple_fetch` for items in any order and of any simple kind."""
    if not pieces or not isinstance(pieces[-1], bytes):
        return None
    first = pieces[0][0] if isinstance(pieces[0], tuple) else pieces[0]
    if not isinstance(first, bytes):
        return None
    number, _, text = first.partition(b" ")
    if not number.isdigit() or text[:1] != b"(":
        return None
    message: dict[bytes, Any] = {b"SEQ": int(number)}
    last = len(pieces) - 1
    first_item = True
    for index, piece in enumerate(pieces):
        if index < last:
            if not isinstance(piece, tuple) or len(piece) != 2:
                return None
            text, literal = piece
            if not isinstance(text, bytes) or not isinstance(literal, bytes):
                return None
        else:
            text, literal = piece, None
        position = len(number) + 2 if index == 0 else 0  # after "<seq> (" in the first
        while True:
            if index == last and text[position:] == b")":
                return message
            if not first_item:
                if text[position : position + 1] != b" ":
                    return None
                position += 1
            first_item = False
            match = _ITEM.match(text, position)
            if match is None:
                return None
            name = match["name"].upper()
            if name in _CONVERTED:
                return None
            atom, items, size = match["atom"], match["list"], match["literal"]
            if atom is not None:
                value = _atom(atom)
            elif items is not None:
                tokens = items.split(b" ") if items else []
                if any(not _FLAG_CHARS.fullmatch(token) for token in tokens):
                    return None  # double spaces, stray characters
                value = tuple(_atom(token) for token in tokens)
            else:
                if literal is None or int(size) != len(literal):
                    return None  # a literal that is not there, or not of its announced size
                value = literal
            if name == b"UID" and not isinstance(value, int):
                return None
            message[name] = value
            position = match.end()
            if size is not None:
                break  # the literal ends this text; the next one goes on after it
    return None


class FetchReader:
    """Reads the answers of FETCH commands on one imaplib connection, parsing as they come.

    Use as a context manager around ``imap._command_complete(...)`` calls: while it is
    active, untagged FETCH responses do not go to ``untagged_responses``; each is parsed by
    :func:`parse_simple_fetch` into :attr:`messages`, or, when it has another shape, kept
    as imaplib would have kept it in :attr:`unparsed`, for the generic parser to read once
    the commands are complete (so that a malformed response fails as it always did, after
    the answers are read). Everything else is read by imaplib as before. Only from the
    thread that owns the connection.
    """

    def __init__(self, imap: Any) -> None:
        self._imap = imap
        self._get_line: Callable[[], bytes] | None = None
        self._pending: bytes | None = None
        #: The parsed responses, in the order they came.
        self.messages: list[dict[bytes, Any]] = []
        #: The lines of the responses left to the generic parser, as imaplib stores them.
        self.unparsed: Pieces = []

    def __enter__(self) -> FetchReader:
        imap = self._imap
        self._get_line = imap._get_line
        imap._get_response = self._get_response
        return self

    def __exit__(self, *exc_info: object) -> None:
        # The instance attribute goes; imaplib's method shows through again.
        self._imap.__dict__.pop("_get_response", None)

    def _line(self) -> bytes:
        """The next line without its CRLF, checked as imaplib's ``_get_line`` checks it."""
        imap = self._imap
        line: bytes = imap.readline()
        if not line:
            raise imap.abort("socket error: EOF")
        if len(line) > _MAX_LINE:
            raise imap.error(f"got more than {_MAX_LINE} bytes")
        if not line.endswith(b"\r\n"):
            raise imap.abort(f"socket error: unterminated line: {line!r}")
        return line[:-2]

    def _get_response(self) -> bytes | None:
        line = self._line()
        start = _FETCH_START.match(line)
        if start is None:
            return self._by_imaplib(line)
        imap = self._imap
        text = start[1] + b" " + start[2]  # what imaplib stores: "<seq> (<items>..."
        pieces: Pieces = []
        while (literal := _LITERAL_END.search(text)) is not None:
            data: bytes = imap.read(int(literal[1]))
            pieces.append((text, data))
            text = self._line()
        pieces.append(text)
        parsed = parse_simple_fetch(pieces)
        if parsed is not None:
            self.messages.append(parsed)
        else:
            self.unparsed += pieces
        return line

    def _by_imaplib(self, line: bytes) -> bytes | None:
        """Let imaplib read a response whose first line was already read here."""
        imap = self._imap
        hooked = imap.__dict__.get("_get_line")  # a hook set on the instance, if any
        self._pending = line
        imap._get_line = self._pending_line
        try:
            result: bytes | None = imaplib.IMAP4._get_response(imap)  # type: ignore[attr-defined]
            return result
        finally:
            if hooked is not None:
                imap._get_line = hooked
            else:
                imap.__dict__.pop("_get_line", None)

    def _pending_line(self) -> bytes:
        line = self._pending
        if line is not None:
            self._pending = None
            return line
        assert self._get_line is not None
        return self._get_line()
