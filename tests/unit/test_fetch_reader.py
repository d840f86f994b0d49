"""The purpose-built FETCH reader against imaplib + imapclient's generic parser.

Rules: every case is fed byte for byte to a real ``imaplib.IMAP4`` (no socket: its file is a
stream that hands out the bytes in chunks of a chosen size, so literals and lines split
anywhere), once through :class:`FetchReader` and once through imaplib alone followed by the
generic parser; the two must agree on every message, on the other untagged responses, and
on the errors. tests/integration/test_fetch_reader_dovecot.py runs it against Dovecot.
"""

from __future__ import annotations

import imaplib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_imappool._imap import FetchReader, parse_simple_fetch, select_fetch_results
from trio_imappool._imap import fetch_responses as _fetch_responses

from ._imaplib_double import ScriptedIMAP4


def _client(data: bytes, chunk: int) -> ScriptedIMAP4:
    """An imaplib client whose server is *data* in segments of *chunk*; tag ``T1`` in flight."""
    return ScriptedIMAP4(data, chunk=chunk, in_flight=(b"T1",))


def _outcome(run: Any) -> tuple[str, Any]:
    try:
        return "ok", run()
    except Exception as exc:  # compared by type between the two readers
        return "error", type(exc).__name__


def read_fast(data: bytes, chunk: int) -> tuple[str, Any]:
    def run() -> Any:
        imap = _client(data, chunk)
        with FetchReader(imap) as reader:
            typ, _ = imap._command_complete("FETCH", b"T1")
        lines = [x for x in imap.untagged_responses.pop("FETCH", []) if x]
        parsed = reader.messages + _fetch_responses(reader.unparsed + lines, True)
        return typ, sorted(map(repr, parsed)), imap.untagged_responses, reader

    status, value = _outcome(run)
    if status == "ok":
        typ, parsed, untagged, _ = value
        return status, (typ, parsed, untagged)
    return status, value


def read_generic(data: bytes, chunk: int) -> tuple[str, Any]:
    def run() -> Any:
        imap = _client(data, chunk)
        typ, _ = imap._command_complete("FETCH", b"T1")
        lines = [x for x in imap.untagged_responses.pop("FETCH", []) if x]
        return typ, sorted(map(repr, _fetch_responses(lines, True))), imap.untagged_responses

    return _outcome(run)


# -- examples --------------------------------------------------------------------------------


def test_the_common_shape_is_parsed_without_the_generic_parser() -> None:
    body = b"From: a\r\n\r\n) {3}\r\n* 9 FETCH (UID 1)\r\n"
    wire = (
        b"* 3 EXISTS\r\n"
        b"* 1 FETCH (UID 7 FLAGS (\\Seen $Label) BODY[] {%d}\r\n%s)\r\n"
        b"* 7 FETCH (FLAGS (\\Deleted))\r\n"  # another session's flag change: no UID
        b"* 2 FETCH (BODY[] {3}\r\nabc FLAGS () UID 8)\r\n"
        b"T1 OK done\r\n"
    ) % (len(body), body)
    imap = _client(wire, 5)
    with FetchReader(imap) as reader:
        assert imap._command_complete("FETCH", b"T1")[0] == "OK"
    assert reader.unparsed == []
    assert reader.messages == [
        {b"SEQ": 1, b"UID": 7, b"FLAGS": (b"\\Seen", b"$Label"), b"BODY[]": body},
        {b"SEQ": 7, b"FLAGS": (b"\\Deleted",)},
        {b"SEQ": 2, b"BODY[]": b"abc", b"FLAGS": (), b"UID": 8},
    ]
    assert imap.untagged_responses == {"EXISTS": [b"3"]}
    # The flag change is no result: it carries no UID (and 7 is a UID asked for).
    results = select_fetch_results(reader.messages, {7, 8})
    assert results[7][b"FLAGS"] == (b"\\Seen", b"$Label")
    assert read_fast(wire, 5) == read_generic(wire, 5)
    # imaplib's own method is back once the reader is left.
    assert "_get_response" not in imap.__dict__ and "_get_line" not in imap.__dict__


@pytest.mark.parametrize(
    "response",
    [
        b'* 1 FETCH (UID 5 INTERNALDATE "17-Jul-1996 02:44:25 -0700" BODY[] {2}\r\nab)\r\n',
        b"* 1 FETCH (UID 5 BODY[HEADER.FIELDS (FROM)] {2}\r\nab)\r\n",
        b"* 1 FETCH (UID 05 BODY[] NIL)\r\n",
        b'* 1 FETCH (UID 5 X-GM-LABELS ("a b") BODY[] NIL)\r\n',
        b"* 1 FETCH (UID 5 BODY[] {2}\r\nab  FLAGS ())\r\n",
        b"* 1 FETCH (UID 5 FLAGS (\\Seen  \\Draft))\r\n",
    ],
)
def test_other_shapes_go_to_the_generic_parser_and_read_the_same(response: bytes) -> None:
    wire = response + b"T1 OK done\r\n"
    imap = _client(wire, 64)
    with FetchReader(imap) as reader:
        imap._command_complete("FETCH", b"T1")
    assert reader.messages == [] and reader.unparsed
    assert read_fast(wire, 64) == read_generic(wire, 64)


@pytest.mark.parametrize("told", [0, 1, 9, 11, 40])
def test_a_literal_whose_size_lies_reads_as_imaplib_reads_it(told: int) -> None:
    # Ten bytes sent, *told* announced: the reader takes what imaplib takes, and the
    # response (or the error) is the generic parser's.
    wire = (
        b"* 1 FETCH (UID 5 BODY[] {%d}\r\n0123456789)\r\n"
        b"* 2 FETCH (UID 6 BODY[] {2}\r\nab)\r\nT1 OK done\r\n"
    ) % told
    for chunk in (1, 7, 4096):
        assert read_fast(wire, chunk) == read_generic(wire, chunk)
    assert parse_simple_fetch([(b"1 (UID 5 BODY[] {11}", b"0123456789"), b")"]) is None


def test_eof_in_a_literal_or_a_line_aborts_as_imaplib_does() -> None:
    for wire in (b"* 1 FETCH (UID 5 BODY[] {10}\r\n01234", b"* 1 FETCH (UID 5 FL"):
        imap = _client(wire, 3)
        with FetchReader(imap), pytest.raises(imaplib.IMAP4.abort):
            imap._command_complete("FETCH", b"T1")
        assert read_fast(wire, 3) == read_generic(wire, 3)


def test_a_bye_and_a_bad_end_the_read_as_before() -> None:
    bye = b"* 1 FETCH (UID 5 BODY[] {2}\r\nab)\r\n* BYE going away\r\n"
    imap = _client(bye, 8)
    with FetchReader(imap), pytest.raises(imaplib.IMAP4.abort, match="going away"):
        imap._command_complete("FETCH", b"T1")
    bad = b"* 1 FETCH (UID 5 BODY[] {2}\r\nab)\r\nT1 BAD no\r\n"
    assert read_fast(bad, 8) == read_generic(bad, 8) == ("error", "error")


# -- properties ------------------------------------------------------------------------------

_flags = st.lists(
    st.sampled_from(
        [b"\\Seen", b"\\Answered", b"\\Flagged", b"$Label1", b"NonJunk", b"0", b"42", b"007"]
    ),
    max_size=4,
)
_body = st.binary(max_size=60) | st.sampled_from([b")\r\n* 3 FETCH (UID 9)\r\n", b"{5}\r\n"])


@st.composite
def _response(draw: st.DrawFn, seq: int) -> bytes:
    """One untagged FETCH response: items in any order, some the fast path declines."""
    if draw(st.integers(0, 2)) == 0:  # the commonest shape, which has a path of its own
        body = draw(_body)
        told = len(body) + draw(st.sampled_from([0, 0, 0, 0, -1, 1]))
        flags = b" FLAGS (" + b" ".join(draw(_flags)) + b")" if draw(st.booleans()) else b""
        uid = draw(st.sampled_from([b"1", b"77", b"012", b"0"]))
        return b"* %d FETCH (UID %s%s BODY[] {%d}\r\n%s)\r\n" % (
            seq,
            uid,
            flags,
            max(told, 0),
            body,
        )
    items: list[tuple[bytes, bytes | None]] = []  # (text, literal)
    if draw(st.booleans()) or seq == 1:
        items.append((b"UID %d" % draw(st.integers(1, 10**6)), None))
    if draw(st.booleans()):
        items.append((b"FLAGS (" + b" ".join(draw(_flags)) + b")", None))
    if draw(st.booleans()):
        items.append((b"RFC822.SIZE %d" % draw(st.integers(0, 10**7)), None))
    if draw(st.booleans()):
        items.append((b"MODSEQ (%d)" % draw(st.integers(1, 10**9)), None))
    for name in draw(st.lists(st.sampled_from([b"BODY[]", b"BODY[TEXT]", b"RFC822"]), max_size=2)):
        if draw(st.integers(0, 5)) == 0:
            items.append((name + b" NIL", None))
        else:
            items.append((name, draw(_body)))
    if draw(st.integers(0, 6)) == 0:
        items.append((b'INTERNALDATE "17-Jul-1996 02:44:25 -0700"', None))
    items = draw(st.permutations(items))
    out = b"* %d FETCH (" % seq
    for index, (text, literal) in enumerate(items):
        out += (b" " if index else b"") + text
        if literal is not None:
            told = len(literal)
            if draw(st.integers(0, 12)) == 0:
                told = max(0, told + draw(st.integers(-3, 3)))  # a size that lies
            out += b" {%d}\r\n" % told + literal
    return out + b")\r\n"


@st.composite
def _wire(draw: st.DrawFn) -> bytes:
    parts = []
    for seq in range(1, draw(st.integers(1, 5)) + 1):
        if draw(st.integers(0, 3)) == 0:  # unsolicited lines between the responses
            parts.append(
                draw(
                    st.sampled_from(
                        [
                            b"* %d FETCH (FLAGS (\\Deleted))\r\n" % seq,
                            b"* 4 EXISTS\r\n",
                            b"* OK [HIGHESTMODSEQ 9] x\r\n",
                            b"* 2 EXPUNGE\r\n",
                        ]
                    )
                )
            )
        parts.append(draw(_response(seq)))
    return b"".join(parts) + b"T1 OK Fetch completed.\r\n"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(wire=_wire(), chunk=st.integers(1, 64))
def test_any_wire_reads_the_same_as_imaplib_and_imapclient(wire: bytes, chunk: int) -> None:
    assert read_fast(wire, chunk) == read_generic(wire, chunk)
