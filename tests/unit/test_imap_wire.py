"""The imaplib layer's pure parts, and its IDLE steps against a scripted server, without one.

Rules: no server, no thread. A scripted connection is a real ``imaplib.IMAP4`` whose server is
a byte string (read through imaplib's own line reader) and whose writes are recorded; its
socket, which the steps only look at for readability, is one end of a local socket pair that
nothing is written to. tests/integration/test_idle.py runs the same steps against Dovecot.
"""

from __future__ import annotations

import imaplib
import socket
import types
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError, ProtocolError

from trio_imappool._imap import (
    IdleSession,
    begin_idle,
    complete,
    end_idle,
    esearch_uids,
    failure,
    message_set,
    parse_uid_set,
    poll,
    read_batch,
)
from trio_imappool._imap._fetch import Wanted, message_ids
from trio_imappool._imap._idle_wire import _event, _read_response

from ._imaplib_double import ScriptedIMAP4

if TYPE_CHECKING:
    pass


def _client(script: bytes, sock: socket.socket | None = None) -> Any:
    """What the IDLE steps use of a client: its imaplib connection and two attributes."""
    imap = ScriptedIMAP4(script)
    imap.sock = sock  # type: ignore[assignment]
    return types.SimpleNamespace(_imap=imap, normalise_times=True, idling=False)


@pytest.fixture
def quiet_socket() -> Iterator[socket.socket]:
    """A socket with nothing to read: one end of a pair whose other end never writes."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        yield ours


# -- message sets, ESEARCH, errors --------------------------------------------------------------


def test_a_range_goes_as_first_colon_last_and_a_list_as_listed() -> None:
    assert message_set(range(5, 9)) == b"5:8"
    assert message_set([9, 3, 4]) == b"9,3,4"


def test_esearch_all_is_expanded_in_any_order_of_its_bounds() -> None:
    lines: list[Any] = [None, b'(TAG "T2") UID ALL 1:3,7,10:9']
    assert esearch_uids(lines) == [1, 2, 3, 7, 9, 10]


def test_an_esearch_answer_without_all_says_none() -> None:
    assert esearch_uids([b'(TAG "T2") UID COUNT 0']) is None
    assert esearch_uids([]) is None


def test_the_uids_a_caller_gave_are_read_as_imapclient_reads_them() -> None:
    assert message_ids(7) == {7}
    assert message_ids("7") == {7}
    assert message_ids([1, "2", 3]) == {1, 2, 3}


def test_wanted_looks_into_ranges_and_lists_without_copying_them() -> None:
    wanted = Wanted([range(10, 10**9), [3, 5]])
    assert 3 in wanted and 10**8 in wanted
    assert 4 not in wanted and 10**9 not in wanted


def test_a_no_becomes_imapclients_error_with_the_servers_words() -> None:
    error = failure("select", "NO", [b"[NONEXISTENT] Mailbox doesn't exist"])
    assert type(error) is imaplib.IMAP4.error
    assert str(error) == "select failed: [NONEXISTENT] Mailbox doesn't exist"
    assert str(failure("fetch", "BAD", [])) == "fetch failed: BAD"


def test_a_pipelined_bad_is_returned_and_an_eof_raised() -> None:
    imap = ScriptedIMAP4(b"T1 BAD Error in IMAP command\r\nT2 OK done\r\n")
    imap.tagged_commands = {b"T1": None, b"T2": None}
    typ, answer = complete(imap, "FETCH", b"T1")
    assert typ == "BAD" and b"Error in IMAP command" in answer[0]
    assert complete(imap, "NOOP", b"T2") == ("OK", [b"done"])
    imap.tagged_commands[b"T3"] = None
    with pytest.raises(imaplib.IMAP4.abort):
        complete(imap, "NOOP", b"T3")


@given(st.lists(st.tuples(st.integers(1, 2**32 - 1), st.integers(0, 50)), min_size=1))
def test_a_vanished_set_names_exactly_its_uids(runs: list[tuple[int, int]]) -> None:
    parts: list[str] = []
    expected: set[int] = set()
    for first, length in runs:
        last = min(first + length, 2**32 - 1)
        parts.append(f"{first}" if first == last else f"{last}:{first}")
        expected.update(range(first, last + 1))
    assert parse_uid_set(",".join(parts).encode()) == expected


@pytest.mark.parametrize("text", [b"", b"1,,2", b"1:", b"a", b"1:4294967295"])
def test_a_vanished_set_that_is_not_one_is_a_protocol_error(text: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_uid_set(text)


# -- IDLE: responses as events ------------------------------------------------------------------


def test_a_push_with_a_literal_is_read_whole_and_parsed_as_fetch_items() -> None:
    imap = ScriptedIMAP4(b"* 3 FETCH (UID 8 BODY[HEADER] {5}\r\nab\r\nc FLAGS (\\Seen))\r\n")
    event = _event(_read_response(imap), True)
    assert (event.kind, event.number) == ("FETCH", 3)
    assert event.data == {b"UID": 8, b"BODY[HEADER]": b"ab\r\nc", b"FLAGS": (b"\\Seen",)}


@pytest.mark.parametrize(
    ("line", "kind", "number", "raw"),
    [
        (b"* 12 EXISTS", "EXISTS", 12, (12, b"EXISTS")),
        (b"* 3 expunge", "EXPUNGE", 3, (3, b"expunge")),
        (b"* OK Still here", "OK", None, (b"OK", b"Still here")),
        (b"* BYE going away", "BYE", None, (b"BYE", b"going away")),
        (b"* FLAGS (\\Seen)", "FLAGS", None, (b"FLAGS", (b"\\Seen",))),
    ],
)
def test_untagged_responses_become_events(
    line: bytes, kind: str, number: int | None, raw: tuple[Any, ...]
) -> None:
    event = _event([line], True)
    assert (event.kind, event.number, event.raw, dict(event.data)) == (kind, number, raw, {})


def test_a_tagged_line_is_not_an_event() -> None:
    with pytest.raises(ProtocolError):
        _event([b"T9 OK done"], True)


# -- IDLE: the steps that need no readability check ----------------------------------------------


def test_a_poll_keeps_what_came_with_the_noop() -> None:
    client = _client(b"* 5 FETCH (FLAGS (\\Seen) UID 9)\r\n* 1 EXPUNGE\r\nT1 OK NOOP done\r\n")
    session = IdleSession()
    poll(client, session)
    assert client._imap.sent == [b"T1 NOOP\r\n"]
    events = session.take_events()
    assert [(e.kind, e.number) for e in events] == [("FETCH", 5), ("EXPUNGE", 1)]
    assert events[0].data == {b"FLAGS": (b"\\Seen",), b"UID": 9}
    assert session.events == [] and b"T1" not in client._imap.tagged_commands


def test_a_poll_answered_no_raises_imapclients_error() -> None:
    with pytest.raises(IMAPClientError, match="NOOP failed"):
        poll(_client(b"T1 NO not now\r\n"), IdleSession())


def test_a_bye_is_an_event_and_the_next_step_raises() -> None:
    client = _client(b"* BYE shutting down\r\nT1 OK NOOP done\r\n")
    session = IdleSession()
    poll(client, session)
    assert [e.kind for e in session.take_events()] == ["BYE"]
    with pytest.raises(IMAPClientAbortError, match="BYE shutting down"):
        poll(client, session)


def test_ending_idle_reads_up_to_the_noop_behind_done() -> None:
    client = _client(b"* 4 EXISTS\r\nT0 OK Idle completed\r\n* 2 RECENT\r\nT1 OK NOOP done\r\n")
    client._imap.tagged_commands[b"T0"] = None
    client.idling = True
    session = IdleSession()
    session.tag = b"T0"
    end_idle(client, session)
    assert client._imap.sent == [b"DONE\r\n", b"T1 NOOP\r\n"]
    assert [(e.kind, e.number) for e in session.take_events()] == [("EXISTS", 4), ("RECENT", 2)]
    assert session.tag is None and client.idling is False
    assert client._imap.tagged_commands == {}


def test_ending_an_idle_the_server_had_ended_skips_its_answer_to_done() -> None:
    client = _client(b"T0 OK Idle completed\r\n* BAD Unknown command\r\nT1 OK NOOP done\r\n")
    client._imap.tagged_commands[b"T0"] = None
    client.idling = True
    session = IdleSession()
    session.tag = b"T0"
    end_idle(client, session)
    assert session.take_events() == [] and client.idling is False


def test_an_idle_that_ends_with_no_raises_after_reading_everything() -> None:
    client = _client(b"T0 NO too long\r\nT1 OK NOOP done\r\n")
    client._imap.tagged_commands[b"T0"] = None
    client.idling = True
    session = IdleSession()
    session.tag = b"T0"
    with pytest.raises(IMAPClientError, match="IDLE failed: T0 NO too long"):
        end_idle(client, session)
    assert client.idling is False and client._imap.tagged_commands == {}


def test_a_noop_completed_before_idle_is_a_protocol_error() -> None:
    client = _client(b"T1 OK NOOP done\r\n")
    session = IdleSession()
    session.tag = b"T0"
    with pytest.raises(ProtocolError):
        end_idle(client, session)


def test_ending_idle_when_none_is_running_sends_nothing() -> None:
    client = _client(b"")
    end_idle(client, IdleSession())
    assert client._imap.sent == []


def test_a_push_that_came_with_the_continuation_is_seen_in_the_buffer(
    quiet_socket: socket.socket,
) -> None:
    # imapclient's idle_check() polls the socket here and misses it (mjs/imapclient#519).
    client = _client(b"+ idling\r\n* 3 EXISTS\r\n", quiet_socket)
    session = IdleSession()
    begin_idle(client, session)
    assert client._imap.sent == [b"T1 IDLE\r\n"]
    assert session.tag == b"T1" and client.idling is True
    assert session.more is True and session.take_events() == []
    read_batch(client, session)
    assert [(e.kind, e.number) for e in session.take_events()] == [("EXISTS", 3)]
    assert session.more is False  # nothing buffered, the socket quiet: wait for readability


def test_pushes_before_the_continuation_are_events(quiet_socket: socket.socket) -> None:
    client = _client(b"* 1 RECENT\r\n+ idling\r\n", quiet_socket)
    session = IdleSession()
    begin_idle(client, session)
    assert [(e.kind, e.number) for e in session.take_events()] == [("RECENT", 1)]
    assert session.more is False


def test_a_refused_idle_raises_and_leaves_the_client_not_idling() -> None:
    client = _client(b"T1 NO IDLE not allowed now\r\n")
    session = IdleSession()
    with pytest.raises(IMAPClientError, match="IDLE failed: T1 NO IDLE not allowed now"):
        begin_idle(client, session)
    assert session.tag is None and client.idling is False
    assert client._imap.tagged_commands == {}


def test_an_idle_the_server_ends_by_itself_is_noticed_by_the_next_read(
    quiet_socket: socket.socket,
) -> None:
    client = _client(b"* 2 EXPUNGE\r\nT7 OK IDLE terminated\r\n", quiet_socket)
    client.idling = True
    client._imap.tagged_commands[b"T7"] = None
    session = IdleSession()
    session.tag = b"T7"
    read_batch(client, session)
    assert [(e.kind, e.number) for e in session.take_events()] == [("EXPUNGE", 2)]
    assert session.tag is None and client.idling is False
