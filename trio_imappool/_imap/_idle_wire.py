"""IDLE on the wire: the blocking steps of a watch, one worker-thread hop each.

imapclient's ``idle_check()`` has two bugs that lose pushes or connections (mjs/imapclient#519):
a push that arrives in the same TCP segment as the ``+ idling`` continuation sits in imaplib's
read buffer, where polling the socket cannot see it; and a response split across TCP segments
is read with the socket non-blocking and fails with ``unterminated line``. The steps here
read whole responses in blocking mode (the connection's read timeout applies) straight from
imaplib's buffered file, and after each step say whether more data may already be buffered
(:attr:`IdleSession.more`), so that the caller (``trio_imappool._idle``) only waits on the
socket's readability when nothing is.

Each step takes the client and an :class:`IdleSession` (the protocol state of one watch) and
keeps what it read in the session, not only in its result. No Trio here.
"""

from __future__ import annotations

import dataclasses
import re
import select
from collections.abc import Mapping
from typing import Any, Final

from imapclient.exceptions import IMAPClientAbortError, IMAPClientError, ProtocolError
from imapclient.response_parser import parse_fetch_response, parse_response

from ._sockets import has_buffered_data

__all__ = [
    "MAX_BATCH",
    "IdleEvent",
    "IdleSession",
    "begin_idle",
    "end_idle",
    "open_watch",
    "poll",
    "read_batch",
    "renew",
]

#: At most this many responses are read in one thread hop; the rest stay buffered for the next.
MAX_BATCH: Final = 1000

# A line that announces a literal: "... {123}" (what follows is 123 raw bytes, then the rest).
_LITERAL: Final = re.compile(rb"\{(\d+)\}$")
_FETCH_WORD: Final = re.compile(rb"^(\d+) FETCH ", re.IGNORECASE)
_STATUS_WORDS: Final = frozenset({b"OK", b"NO", b"BAD", b"BYE", b"PREAUTH"})

# One response as imaplib hands data to imapclient's parser: lines, or (line, literal) pairs.
_Fragment = bytes | tuple[bytes, bytes]


@dataclasses.dataclass(frozen=True, slots=True)
class IdleEvent:
    """One untagged response the server pushed while the folder was watched.

    Attributes:
        kind: The response's name in upper case: ``"EXISTS"`` (the folder now holds *number*
            messages), ``"EXPUNGE"`` (message *number* was removed; later ones move down by
            one), ``"FETCH"`` (message *number* changed, usually its flags: see *data*),
            ``"RECENT"``, or any other the server sends: ``"OK"`` (e.g. Dovecot's
            ``* OK Still here`` every two minutes), ``"FLAGS"``, ``"VANISHED"``, ``"BYE"``
            (the server is closing the connection: the next iteration raises).
        number: The message sequence number or count that precedes the name
            (``* 12 EXISTS``), or None for responses without one (``* OK ...``).
        data: For ``FETCH``: the items as :meth:`imapclient.IMAPClient.fetch` returns them
            for one message, e.g. ``{b"FLAGS": (b"\\\\Seen",), b"UID": 7}``; empty otherwise.
        raw: The response as imapclient's parser returns it, e.g. ``(12, b"EXISTS")``,
            ``(5, b"FETCH", (b"FLAGS", (b"\\\\Seen",)))``; status responses as
            ``(b"OK", b"Still here")``.
    """

    kind: str
    number: int | None
    data: Mapping[bytes, Any]
    raw: tuple[Any, ...]


def _ready(imap: Any) -> bool:
    """Whether a read would find data now: in imaplib's buffer, TLS's buffer, or the socket.

    Never blocks. An empty buffer asks the socket too (EOF reads as readable, and a blocking
    read then reports it).
    """
    if has_buffered_data(imap):
        return True
    poller = select.poll()
    poller.register(imap.sock, select.POLLIN)
    return bool(poller.poll(0))


def _read_response(imap: Any) -> list[_Fragment]:
    """Read one whole response, literals included, in blocking mode (read timeout applies)."""
    fragments: list[_Fragment] = []
    line: bytes = imap._get_line()  # raises abort at EOF
    while match := _LITERAL.search(line):
        literal: bytes = imap.read(int(match.group(1)))
        fragments.append((line, literal))
        line = imap._get_line()
    fragments.append(line)
    return fragments


def _head(fragments: list[_Fragment]) -> bytes:
    first = fragments[0]
    return first[0] if isinstance(first, tuple) else first


def _tag_status(head: bytes, tag: bytes | None) -> bytes | None:
    """The status word (``b"OK"``...) if *head* is the tagged completion of *tag*, else None."""
    if tag is None or not head.startswith(tag + b" "):
        return None
    return head[len(tag) + 1 :].split(b" ", 1)[0].upper()


def _untagged(fragments: list[_Fragment]) -> list[_Fragment]:
    """The response without its ``* `` prefix; raises ProtocolError if it is not untagged."""
    head = _head(fragments)
    if not head.startswith(b"* "):
        raise ProtocolError(f"unexpected response while watching a folder: {head!r}")
    first = fragments[0]
    stripped: _Fragment = (first[0][2:], first[1]) if isinstance(first, tuple) else first[2:]
    return [stripped, *fragments[1:]]


def _event(fragments: list[_Fragment], normalise_times: bool) -> IdleEvent:
    """Parse one untagged response into an :class:`IdleEvent`."""
    body = _untagged(fragments)
    text = _head(body)
    word, _, rest = text.partition(b" ")
    if word.upper() in _STATUS_WORDS and len(body) == 1:
        status = word.upper()
        return IdleEvent(status.decode("ascii"), None, {}, (status, rest))
    raw = tuple(parse_response(body))
    if len(raw) >= 2 and isinstance(raw[0], int) and isinstance(raw[1], bytes):
        kind = raw[1].decode("ascii", "replace").upper()
        data: Mapping[bytes, Any] = {}
        if kind == "FETCH":
            data = _fetch_items(body, normalise_times)
        return IdleEvent(kind, raw[0], data, raw)
    if raw and isinstance(raw[0], bytes):
        return IdleEvent(raw[0].decode("ascii", "replace").upper(), None, {}, raw)
    raise ProtocolError(f"unexpected untagged response: {text!r}")


def _fetch_items(body: list[_Fragment], normalise_times: bool) -> dict[bytes, Any]:
    """The items of an unsolicited FETCH, converted as :meth:`IMAPClient.fetch` converts them."""
    first = body[0]
    if isinstance(first, tuple):
        first = (_FETCH_WORD.sub(rb"\1 ", first[0], count=1), first[1])
    else:
        first = _FETCH_WORD.sub(rb"\1 ", first, count=1)
    parsed = parse_fetch_response([first, *body[1:]], normalise_times, False)
    items: dict[bytes, Any] = {}
    for values in parsed.values():
        items.update(values)
    items.pop(b"SEQ", None)
    return items


class IdleSession:
    """The protocol state of one watch. Touched only inside a worker thread hop, or by the
    Trio task between hops (never both at once: one hop at a time, awaited).

    What a hop reads is kept here, not only returned: a cancellation that lands after the
    thread has read some pushes but before its result reaches the task drops the result, and
    the pushes would be lost while the connection stays healthy. The task takes the events
    from here after every hop, however the hop ended.
    """

    __slots__ = ("error", "events", "more", "tag")

    def __init__(self) -> None:
        #: The tag of the IDLE command in progress, or None when not idling.
        self.tag: bytes | None = None
        #: Raised by the next hop: the server said BYE.
        self.error: BaseException | None = None
        #: Events read by hops and not yet taken by the task.
        self.events: list[IdleEvent] = []
        #: Data may still be buffered: the next step is another read, not a wait for
        #: readability (which cannot see buffered data).
        self.more = False

    def take_events(self) -> list[IdleEvent]:
        events, self.events = self.events, []
        return events


def _check_error(session: IdleSession) -> None:
    if session.error is not None:
        raise session.error


def _collect(client: Any, session: IdleSession, fragments: list[_Fragment]) -> None:
    event = _event(fragments, client.normalise_times)
    session.events.append(event)
    if event.kind == "BYE" and session.error is None:
        text = event.raw[1].decode("utf-8", "replace") if len(event.raw) > 1 else ""
        session.error = IMAPClientAbortError(f"the server closed the connection: BYE {text}")


def begin_idle(client: Any, session: IdleSession) -> None:
    """Send IDLE and read up to the continuation. Untagged responses before it are events."""
    _check_error(session)
    imap = client._imap
    client.idling = True  # from here on, the pool must not reuse it unless DONE completes
    tag: bytes = imap._command("IDLE")
    session.tag = tag
    session.more = False
    while True:
        fragments = _read_response(imap)
        head = _head(fragments)
        if head.startswith(b"+"):
            # The continuation may share a segment with the first pushes: they are in
            # imaplib's buffer now, where waiting on the socket would not see them.
            session.more = _ready(imap)
            return
        status = _tag_status(head, tag)
        if status is not None:
            imap.tagged_commands.pop(tag, None)
            session.tag = None
            client.idling = False
            raise IMAPClientError(f"IDLE failed: {head.decode('utf-8', 'replace')}")
        _collect(client, session, fragments)
        if session.error is not None:
            return


def end_idle(client: Any, session: IdleSession) -> None:
    """Send DONE and read everything it provokes; untagged responses are events.

    A NOOP goes right behind DONE (same round trip), and reading stops at its completion:
    whether the server was still idling (IDLE completes, then NOOP) or had already ended IDLE
    by itself (IDLE's completion was under way, and the server answers DONE with a BAD),
    nothing is left unread for the connection's next user.
    """
    _check_error(session)
    imap = client._imap
    tag = session.tag
    if tag is None:
        return
    imap.send(b"DONE\r\n")
    barrier: bytes = imap._command("NOOP")
    failure: str | None = None
    while True:
        fragments = _read_response(imap)
        head = _head(fragments)
        status = _tag_status(head, tag)
        if status is not None:
            imap.tagged_commands.pop(tag, None)
            session.tag = None
            if status != b"OK":
                failure = f"IDLE failed: {head.decode('utf-8', 'replace')}"
            continue
        status = _tag_status(head, barrier)
        if status is not None:
            imap.tagged_commands.pop(barrier, None)
            if session.tag is not None:
                raise ProtocolError("the server ended a command that followed IDLE, not IDLE")
            client.idling = False
            if failure is not None:
                raise IMAPClientError(failure)
            return
        if head.startswith((b"DONE ", b"* BAD")):
            continue  # the server had left IDLE: DONE is an unknown command to it
        _collect(client, session, fragments)
        _check_error(session)


def renew(client: Any, session: IdleSession) -> None:
    """End IDLE and start it again in one hop, keeping what arrived in between."""
    end_idle(client, session)
    begin_idle(client, session)


def read_batch(client: Any, session: IdleSession) -> None:
    """Read the responses that are available now (at least one if any is); never waits for
    one to start, but waits (under the read timeout) for the rest of one that has started."""
    _check_error(session)
    imap = client._imap
    session.more = False
    for _ in range(MAX_BATCH):
        if not _ready(imap):
            return
        fragments = _read_response(imap)
        head = _head(fragments)
        status = _tag_status(head, session.tag)
        if status is not None:
            # The server ended IDLE by itself; the caller starts it again.
            imap.tagged_commands.pop(session.tag, None)
            session.tag = None
            client.idling = False
            if status != b"OK":
                raise IMAPClientError(f"IDLE failed: {head.decode('utf-8', 'replace')}")
            return
        _collect(client, session, fragments)
        if session.error is not None:
            return
    session.more = True


def poll(client: Any, session: IdleSession) -> None:
    """Send NOOP and keep the untagged responses that came with its completion."""
    _check_error(session)
    imap = client._imap
    tag: bytes = imap._command("NOOP")
    while True:
        fragments = _read_response(imap)
        head = _head(fragments)
        status = _tag_status(head, tag)
        if status is not None:
            imap.tagged_commands.pop(tag, None)
            if status != b"OK":
                raise IMAPClientError(f"NOOP failed: {head.decode('utf-8', 'replace')}")
            return
        _collect(client, session, fragments)


def open_watch(
    client: Any, session: IdleSession, folder: str
) -> tuple[Any, dict[bytes, Any], bool]:
    """Select *folder* read-only and, if the server can, start IDLE. Returns the socket,
    SELECT's answer, and whether IDLE is on."""
    # Capabilities first: right after LOGIN they are known without a round trip, while a
    # SELECT would clear imaplib's record of them.
    can_idle = bool(client.has_capability("IDLE"))
    selected: dict[bytes, Any] = client.select_folder(folder, readonly=True)
    if can_idle:
        begin_idle(client, session)
    return client.socket(), selected, can_idle
