"""IDLE as an async iterator: the server's pushes for one folder, on a dedicated connection.

IMAP IDLE (RFC 2177) lets the server tell a client about changes to the selected folder as they
happen: new messages (``* 12 EXISTS``), removed ones (``* 3 EXPUNGE``), flag changes
(``* 5 FETCH (FLAGS (\\Seen))``). imapclient offers ``idle()``, ``idle_check()`` and
``idle_done()``, but ``idle_check()`` has two bugs that lose pushes or connections
(mjs/imapclient#519): a push that arrives in the same TCP segment as the ``+ idling``
continuation sits in imaplib's read buffer, where polling the socket cannot see it; and a
response split across TCP segments is read with the socket non-blocking and fails with
``unterminated line``. It also parks a thread for the whole wait.

:func:`idle` does it differently. Between pushes it waits in Trio, on the socket's readability
(:func:`trio.lowlevel.wait_readable`), with no thread parked. Before every wait it asks, without
blocking, whether imaplib's buffer (or TLS's decrypted-but-unread bytes) already holds data; when
there is data it reads whole responses in one worker thread hop, in blocking mode under the
connection's normal read timeout, so a response split across segments is simply waited for.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import select
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar

import trio
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError, ProtocolError
from imapclient.response_parser import parse_fetch_response, parse_response

from ._client import has_buffered_data
from ._config import check_wire_text
from ._connection import Connection

if TYPE_CHECKING:
    from ._pool import Pool

__all__ = ["IdleEvent", "IdleEvents", "IdleStatistics", "idle"]

logger = logging.getLogger("trio_imappool")

T = TypeVar("T")

#: RFC 2177: a client should re-issue IDLE at least every 29 minutes, or the server may log it
#: out as inactive.
IDLE_LIMIT: Final = 29 * 60.0
DEFAULT_RENEW_AFTER: Final = 25 * 60.0
DEFAULT_POLL_INTERVAL: Final = 30.0
DEFAULT_DONE_TIMEOUT: Final = 2.0
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


@dataclasses.dataclass(frozen=True, slots=True)
class IdleStatistics:
    """A snapshot of an :class:`IdleEvents`, returned by :meth:`IdleEvents.statistics`.

    Attributes:
        folder: The folder watched.
        mode: ``"idle"``, or ``"poll"`` when the server lacks the IDLE capability.
        idle_commands: IDLE commands sent (the first, and one per renewal).
        polls: NOOP commands sent in poll mode.
        received: Responses read from the server.
        pending: Responses read but not yet taken by the iteration.
    """

    folder: str
    mode: Literal["idle", "poll"]
    idle_commands: int
    polls: int
    received: int
    pending: int


# -- the blocking side: runs in worker threads, one hop at a time -------------------------------


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


class _Session:
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


def _check_error(session: _Session) -> None:
    if session.error is not None:
        raise session.error


def _collect(client: Any, session: _Session, fragments: list[_Fragment]) -> None:
    event = _event(fragments, client.normalise_times)
    session.events.append(event)
    if event.kind == "BYE" and session.error is None:
        text = event.raw[1].decode("utf-8", "replace") if len(event.raw) > 1 else ""
        session.error = IMAPClientAbortError(f"the server closed the connection: BYE {text}")


def _begin_idle(client: Any, session: _Session) -> None:
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


def _end_idle(client: Any, session: _Session) -> None:
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


def _renew(client: Any, session: _Session) -> None:
    """End IDLE and start it again in one hop, keeping what arrived in between."""
    _end_idle(client, session)
    _begin_idle(client, session)


def _read_batch(client: Any, session: _Session) -> None:
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


def _poll(client: Any, session: _Session) -> None:
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


def _open(client: Any, session: _Session, folder: str) -> tuple[Any, dict[bytes, Any], bool]:
    """Select *folder* read-only and, if the server can, start IDLE. Returns the socket,
    SELECT's answer, and whether IDLE is on."""
    # Capabilities first: right after LOGIN they are known without a round trip, while a
    # SELECT would clear imaplib's record of them.
    can_idle = bool(client.has_capability("IDLE"))
    selected: dict[bytes, Any] = client.select_folder(folder, readonly=True)
    if can_idle:
        _begin_idle(client, session)
    return client.socket(), selected, can_idle


# -- the Trio side ------------------------------------------------------------------------------


class IdleEvents:
    """The server's pushes for one folder, as an async iterator of :class:`IdleEvent`.

    Made by :func:`idle`; valid until its ``async with`` block ends. Iterating never ends by
    itself: leave the loop with ``break``, a cancel scope, or an exception.

    Attributes:
        folder: The folder watched.
        selected: What the SELECT (read-only) of the folder returned when the watch began,
            e.g. ``selected[b"EXISTS"]`` and ``selected[b"UIDNEXT"]``: events are changes
            relative to this state.
        mode: ``"idle"``, or ``"poll"`` when the server lacks the IDLE capability.
    """

    def __init__(
        self,
        conn: Connection,
        folder: str,
        *,
        renew_after: float,
        poll_interval: float,
    ) -> None:
        self.folder: Final = folder
        self.selected: dict[bytes, Any] = {}
        self.mode: Literal["idle", "poll"] = "idle"
        self._conn = conn
        self._session = _Session()
        self._renew_after = renew_after
        self._poll_interval = poll_interval
        self._sock: Any = None
        self._pending: deque[IdleEvent] = deque()
        self._renew_at = trio.current_time() + renew_after
        self._next_poll = trio.current_time() + poll_interval
        self._busy = False
        self._closed = False
        self._idle_commands = 0
        self._polls = 0
        self._received = 0

    def __repr__(self) -> str:
        state = "closed" if self._closed else self.mode
        return (
            f"<IdleEvents {self.folder!r} {state} idle_commands={self._idle_commands} "
            f"polls={self._polls} received={self._received} pending={len(self._pending)}>"
        )

    def statistics(self) -> IdleStatistics:
        """A snapshot of the watch's counters (see :class:`IdleStatistics`)."""
        return IdleStatistics(
            folder=self.folder,
            mode=self.mode,
            idle_commands=self._idle_commands,
            polls=self._polls,
            received=self._received,
            pending=len(self._pending),
        )

    def __aiter__(self) -> IdleEvents:
        return self

    async def __anext__(self) -> IdleEvent:
        """Wait for the next push and return it.

        Raises:
            trio.ClosedResourceError: The :func:`idle` block has ended.
            trio.BusyResourceError: Another task is iterating over the same events.
            trio.BrokenResourceError: An earlier iteration broke the connection (it was
                cancelled in the middle of a read, or the read failed).
            imapclient.exceptions.IMAPClientAbortError: The server closed the connection
                (after a ``BYE`` event, or at EOF); the connection is discarded.
            TimeoutError: A response started but did not end within the pool's
                ``read_timeout``; the connection is discarded.

        **Cancellation**: a checkpoint on every path. Waiting for the server costs no thread
        and is cancelled at once, leaving the connection in IDLE and usable: the
        :func:`idle` block ends IDLE cleanly when it is left. A cancellation that arrives while
        a response is being read in a worker thread (microseconds, or up to ``read_timeout``
        for a response split across a stalled network) interrupts the read at once; the
        connection is then discarded and later iterations raise
        :class:`trio.BrokenResourceError`. Events that the iterator holds are never lost to a
        cancellation: the next iteration returns them.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            raise trio.ClosedResourceError("the idle() block has ended")
        if self._busy:
            await trio.lowlevel.checkpoint()
            raise trio.BusyResourceError("another task is already iterating over these events")
        self._busy = True
        try:
            if self._pending:
                await trio.lowlevel.checkpoint()
            while not self._pending:
                await self._fill()
            return self._pending.popleft()
        finally:
            self._busy = False

    async def _fill(self) -> None:
        """One step towards having events: a read, a wait, a renewal or a poll."""
        broken = self._conn.broken
        if broken is not None:
            raise trio.BrokenResourceError(f"the IDLE connection broke: {broken}")
        session = self._session
        if self.mode == "poll":
            await trio.sleep_until(self._next_poll)
            await self._hop(_poll)
            self._polls += 1
            self._next_poll = trio.current_time() + self._poll_interval
            return
        if session.tag is None:  # the server ended IDLE by itself
            await self._start_idle(_begin_idle)
        elif session.more or session.error is not None:
            await self._hop(_read_batch)
        elif trio.current_time() >= self._renew_at:
            await self._start_idle(_renew)
        else:
            with trio.move_on_at(self._renew_at):
                await trio.lowlevel.wait_readable(self._sock)
                session.more = True  # readable: the next step reads

    async def _hop(self, step: Callable[..., T], *args: Any) -> T:
        """Run one blocking step in a worker thread; whatever it read becomes pending events,
        however the hop ends (a cancellation may drop its result, never its events)."""
        try:
            return await self._conn.run_sync(step, self._session, *args)
        finally:
            events = self._session.take_events()
            self._received += len(events)
            self._pending.extend(events)

    async def _start_idle(self, step: Callable[[Any, _Session], None]) -> None:
        self._renew_at = trio.current_time() + self._renew_after
        self._idle_commands += 1
        await self._hop(step)

    async def _begin(self) -> None:
        self._sock, self.selected, can_idle = await self._hop(_open, self.folder)
        if can_idle:
            self._idle_commands += 1
            self._renew_at = trio.current_time() + self._renew_after
        else:
            self.mode = "poll"
            self._next_poll = trio.current_time() + self._poll_interval

    async def _end(self, done_timeout: float) -> None:
        """End IDLE if it is on and the connection is sound. Shielded, bounded; never raises
        an Exception (a failure leaves the connection to be discarded)."""
        self._closed = True
        session = self._session
        if session.tag is None or self._conn.broken is not None:
            return
        with trio.move_on_after(done_timeout, shield=True):
            try:
                # With a pending BYE this raises in the thread: the connection is discarded.
                await self._hop(_end_idle)
            except Exception as exc:
                logger.debug("ending IDLE on %r failed: %r", self._conn, exc)


@asynccontextmanager
async def idle(
    pool: Pool,
    folder: str,
    *,
    renew_after: float = DEFAULT_RENEW_AFTER,
    poll_interval: float = DEFAULT_POLL_INTERVAL,
    done_timeout: float = DEFAULT_DONE_TIMEOUT,
) -> AsyncIterator[IdleEvents]:
    """Watch a folder: the server's pushes (new, removed and changed messages) as they happen.

    ::

        async with idle(pool, "INBOX") as events:
            print("INBOX holds", events.selected[b"EXISTS"], "messages")
            async for event in events:
                if event.kind == "EXISTS":
                    print("now", event.number, "messages")
                elif event.kind == "EXPUNGE":
                    print("message", event.number, "was removed")
                elif event.kind == "FETCH":
                    print("message", event.number, "now has flags", event.data.get(b"FLAGS"))

    The watch has a connection of its own, checked out of *pool* for the whole block: it
    counts against ``max_size`` (and the server's per-account limit) and nobody else uses it
    meanwhile. Entering checks it out, selects *folder* read-only (``events.selected`` has
    the result) and issues IDLE; pushes that arrive from then on are kept until iterated, also
    while the body does something else. Do the other work of the task on other connections.

    Between pushes nothing runs: the task waits on the socket's readability in Trio, with no
    worker thread parked. Responses are read in one worker thread hop each time data arrives,
    whole, also when the server's push shares a TCP segment with the IDLE continuation or a
    response is split across segments (both defeat imapclient's ``idle_check``).

    IDLE is re-issued (DONE, then IDLE again, in one hop) every *renew_after* seconds, as RFC
    2177 asks of clients, so that the server does not log the connection out; pushes that come
    with the renewal are kept. A server without the IDLE capability is polled with NOOP every
    *poll_interval* seconds instead (``events.mode == "poll"``).

    Args:
        pool: The pool to take the connection from.
        folder: The folder to watch.
        renew_after: Seconds between IDLE renewals; more than 0 and at most 29 minutes.
        poll_interval: Seconds between NOOPs when the server lacks IDLE; more than 0.
        done_timeout: How long leaving the block waits for the server to end IDLE.

    Yields:
        The :class:`IdleEvents` to iterate over.

    Raises:
        ValueError: An argument is out of range.
        IMAPClientError: The folder could not be selected or IDLE was refused (the connection
            goes back to the pool).
        Whatever :meth:`Pool.connection <trio_imappool.Pool.connection>` raises.

    Leaving the block sends DONE and waits, shielded and for at most *done_timeout*, for the
    server to confirm; the connection then goes back to the pool with the folder still
    selected (read-only), like any other. Pushes not yet iterated are dropped. If IDLE cannot
    be ended cleanly (no answer in time, an error, a broken connection), the connection is
    discarded instead, never handed out in IDLE.

    **Cancellation**: entering may wait for a connection and is cancelled as
    :meth:`Pool.connection <trio_imappool.Pool.connection>` is. Iterating is cancelled at
    once (see :meth:`IdleEvents.__anext__`). Leaving the block on a cancellation still ends
    IDLE: one round trip on a responsive server, at most *done_timeout* on a silent one.

    Limits: one folder per watch (IMAP IDLE watches the selected folder only; watch several
    with one block each, each costing a connection). Sequence numbers in events are relative
    to the watch's own view of the folder; use UIDs (``FETCH`` data, or a search) to name
    messages elsewhere. A push whose response stops half-way for longer than the pool's
    ``read_timeout`` ends the watch with :class:`TimeoutError` and discards the connection.
    """
    check_wire_text("the folder name", folder)
    if not 0 < renew_after <= IDLE_LIMIT:
        raise ValueError(f"renew_after must be more than 0 and at most {IDLE_LIMIT:g} s")
    if not 0 < poll_interval < float("inf"):
        raise ValueError("poll_interval must be a positive number of seconds")
    if not 0 < done_timeout < float("inf"):
        raise ValueError("done_timeout must be a positive number of seconds")
    async with pool.connection() as conn:
        events = IdleEvents(conn, folder, renew_after=renew_after, poll_interval=poll_interval)
        try:
            await events._begin()
            yield events
        finally:
            await events._end(done_timeout)  # shielded and bounded inside
