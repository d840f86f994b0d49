"""One pooled IMAP connection: the blocking client, its thread offload and its interruption.

imapclient is blocking and not safe for concurrent use, but it keeps no thread-local state, so a
connection may be driven from different worker threads one after another. :class:`PooledClient`
enforces exactly that: one call at a time, each in a worker thread of the pool's own limiter.

Cancellation. A Trio cancel scope that fires while a command runs in a worker thread takes effect
at once: the task abandons the thread, shuts the socket down from outside (which wakes a blocked
read within microseconds, for plain and TLS sockets alike), waits shielded and briefly for the
worker to notice, and marks the connection for discarding. The caller gets its ``Cancelled`` or
``TooSlowError`` promptly, never after the socket's read timeout. A worker that does not finish
within the grace period is left to end by itself (it owns the socket and closes it when it does);
the connection is never handed out again either way.
"""

from __future__ import annotations

import contextlib
import imaplib
import math
import select
import socket
import ssl
import threading
from collections.abc import Callable, Container, Iterable, Sequence
from typing import Any, Final, Literal, NamedTuple, TypeVar

import trio
from imapclient import IMAPClient, SocketTimeout
from imapclient.exceptions import ProtocolError
from imapclient.imap4 import IMAP4WithTimeout
from imapclient.imapclient import (
    _normalise_search_criteria,
    join_message_ids,
    seq_to_parenstr_upper,
)
from imapclient.response_parser import (
    _convert_ENVELOPE,
    _convert_INTERNALDATE,
    gen_parsed_response,
    parse_message_list,
)
from imapclient.response_types import BodyData
from imapclient.tls import IMAP4_TLS

from ._config import PoolConfig, check_wire_text
from ._errors import (
    LoginDisabled,
    StartTLSNotOffered,
    connection_survives,
    suggests_server_gone,
)
from ._fetch_reader import FetchReader
from ._login import LoginError, login_with_literals

__all__ = ["PipelinedFetch", "PooledClient", "TrackingClient"]

T = TypeVar("T")

# How long a cancelled task waits for its interrupted worker thread to finish.
INTERRUPT_GRACE: Final = 1.0

# The phases of one call into a worker thread.
_QUEUED: Final = 0  # handed to trio.to_thread, the thread has not started it
_RUNNING: Final = 1  # the thread is inside the call
_ABANDONED: Final = 2  # the task left before the thread started it: it will not run
_ORPHANED: Final = 3  # the task left while the thread was inside the call
_FINISHED: Final = 4


class _GreetingCapabilities:
    """imaplib asks for CAPABILITY after the greeting even when the greeting carried them.

    Servers that put ``[CAPABILITY ...]`` in their greeting (Dovecot, Cyrus, most providers)
    have already said everything that command would return (RFC 9051 7.1), so this takes the
    list from the greeting and saves a round trip on every connection the pool opens. Later
    reads (after STARTTLS or LOGIN) go to the server as before.
    """

    _greeted = False
    untagged_responses: dict[str, list[Any]]
    capabilities: tuple[str, ...]

    def _get_capabilities(self) -> None:
        # Asked after the greeting and after STARTTLS, which replaced the socket (the old
        # object is detached): show the pool the socket the answer will be read from.
        show = getattr(self, "_show", None)
        if show is not None:
            show(self.sock)  # type: ignore[attr-defined]
        if not self._greeted:
            self._greeted = True
            announced = self.untagged_responses.pop("CAPABILITY", None)
            if announced and isinstance(announced[-1], bytes):
                self.capabilities = tuple(str(announced[-1], "ascii").upper().split())
                return
        super()._get_capabilities()  # type: ignore[misc]


class _Interrupted(OSError):
    """The pool gave up on an open while its worker thread was still connecting."""


class _ShownSocket:
    """imaplib makes its socket inside ``IMAP4.__init__`` and then connects it, shakes hands
    (TLS) and reads the greeting, all before the caller gets the client: a server that trickles
    its greeting a byte at a time keeps that thread forever, since each byte restarts the
    socket's timeout. This makes the socket itself and shows it to the pool (*on_socket*)
    before any blocking step, so that the pool can shut it down from outside, which wakes the
    thread at once, as it does for commands. *on_socket* raises once the pool has given up.
    """

    host: str
    port: int
    _timeout: float | None
    _on_socket: Callable[[socket.socket], None] | None = None

    def _create_socket(self, timeout: float | None = None) -> socket.socket:
        if timeout is None:
            timeout = self._timeout
        error: OSError | None = None
        for family, kind, proto, _, address in socket.getaddrinfo(
            self.host, self.port, type=socket.SOCK_STREAM
        ):
            sock = socket.socket(family, kind, proto)
            try:
                self._show(sock)
                sock.settimeout(timeout)
                sock.connect(address)
                # Shown again once connected: an interrupt that came between the first look
                # and connect() found an unconnected socket, where shutdown() does nothing.
                self._show(sock)
                return self._secure(sock)
            except _Interrupted:
                sock.close()
                raise
            except OSError as exc:
                sock.close()
                error = exc
        raise error or OSError(f"no address for {self.host!r}")

    def _show(self, sock: socket.socket) -> None:
        if self._on_socket is not None:
            self._on_socket(sock)

    def _secure(self, sock: socket.socket) -> socket.socket:
        return sock


class _PlainIMAP4(_GreetingCapabilities, _ShownSocket, IMAP4WithTimeout):  # type: ignore[misc]
    def __init__(
        self, host: str, port: int, timeout: float | None, on_socket: Callable[..., None] | None
    ) -> None:
        self._on_socket = on_socket
        super().__init__(host, port, timeout)


class _TLSIMAP4(_GreetingCapabilities, _ShownSocket, IMAP4_TLS):  # type: ignore[misc]
    def __init__(
        self,
        host: str,
        port: int,
        ssl_context: Any,
        timeout: float | None,
        on_socket: Callable[..., None] | None,
    ) -> None:
        self._on_socket = on_socket
        super().__init__(host, port, ssl_context, timeout)

    def _secure(self, sock: socket.socket) -> socket.socket:
        context = self.ssl_context or ssl.create_default_context()
        secured = context.wrap_socket(
            sock, server_hostname=self.host, do_handshake_on_connect=False
        )
        self._show(secured)  # the handshake can stall too
        secured.do_handshake()
        return secured


def _message_ids(messages: Any) -> set[int]:
    """The UIDs a caller of ``fetch`` gave (an int, or an iterable of ints or digit strings),
    as imapclient reads them."""
    if isinstance(messages, int | str | bytes):
        messages = [messages]
    return {int(message) for message in messages}


def read_fetch_results(
    reader: FetchReader, lines: list[Any], normalise_times: bool, wanted: Container[int] | None
) -> dict[int, dict[bytes, Any]]:
    """The results of a ``UID FETCH`` read through *reader*, by UID: the responses it parsed,
    and the rest (those it left to the generic parser, and *lines*, the FETCH lines imaplib
    kept) parsed here. See :func:`select_fetch_results` for which responses are results."""
    rest = _fetch_responses([*reader.unparsed, *lines], normalise_times)
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
        results.setdefault(uid, {}).update(items)
    return results


def _fetch_responses(lines: list[Any], normalise_times: bool) -> list[dict[bytes, Any]]:
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


class _Wanted:
    """Membership in any of several UID collections (lists or ranges), without copying them."""

    __slots__ = ("_ranges", "_set")

    def __init__(self, parts: Sequence[Sequence[int]]) -> None:
        self._ranges = [part for part in parts if isinstance(part, range)]
        self._set = {uid for part in parts if not isinstance(part, range) for uid in part}

    def __contains__(self, uid: object) -> bool:
        return uid in self._set or any(uid in part for part in self._ranges)


class PipelinedFetch(NamedTuple):
    """The outcome of one step of :meth:`TrackingClient.fetch_pipelined`."""

    fetched: dict[int, dict[bytes, Any]] | None
    error: Exception | None
    command: Literal["select", "fetch"] | None  # the command that failed
    #: What the EXAMINE sent for this step said (``b"EXISTS"``, ``b"UIDNEXT"`` ...), as
    #: imapclient's ``select_folder`` returns it; None where the step had no EXAMINE.
    examined: dict[bytes, Any] | None = None


def message_set(uids: Sequence[int]) -> bytes:
    """UIDs as an IMAP message set: a ``range`` as ``first:last``, anything else listed."""
    if isinstance(uids, range) and uids.step == 1 and uids:
        return b"%d:%d" % (uids.start, uids.stop - 1)
    joined: bytes = join_message_ids(uids)
    return joined


def _esearch_uids(lines: list[Any]) -> list[int] | None:
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


def _failure(command: str, typ: str, answer: list[Any]) -> Exception:
    """The error imapclient raises for a NO or BAD answer (``"select failed: ..."``)."""
    text = answer[0].decode("utf-8", "replace") if answer and isinstance(answer[0], bytes) else ""
    # imapclient's IMAPClientError is this class.
    return imaplib.IMAP4.error(f"{command} failed: {text or typ}")


class TrackingClient(IMAPClient):  # type: ignore[misc]
    """An :class:`imapclient.IMAPClient` that remembers the session state the pool cares about.

    Tracking lives on the client, not on the async proxy, so that functions given to
    ``run_sync`` that call ``client.select_folder(...)`` directly are tracked too.
    """

    selected: tuple[str, bool] | None
    idling: bool
    logged_out: bool

    def __init__(
        self, *args: Any, on_socket: Callable[[socket.socket], None] | None = None, **kwargs: Any
    ) -> None:
        self.selected = None
        self.idling = False
        self.logged_out = False
        self._on_socket = on_socket
        super().__init__(*args, **kwargs)

    def select_folder(self, folder: str, readonly: bool = False) -> dict[bytes, Any]:
        # A failed SELECT leaves no folder selected (RFC 3501 6.3.1).
        self.selected = None
        result: dict[bytes, Any] = super().select_folder(folder, readonly)
        self.selected = (folder, readonly)
        return result

    def fetch_pipelined(
        self,
        steps: Sequence[tuple[str, Sequence[int]]],
        data: Sequence[str | bytes],
        reading: list[int] | None = None,
        fresh: Container[int] = (),
    ) -> list[PipelinedFetch]:
        """``UID FETCH`` batches of one or more folders in one round trip.

        Each step is ``(folder, uids)``; *uids* may be a ``range``, sent as ``first:last``
        (UIDs that do not exist are simply not returned). The first step, every step whose
        folder is not the one the step before examined, and every step whose index is in
        *fresh*, is preceded by an EXAMINE (also when the connection has the folder selected:
        the EXAMINE makes the session current); what the EXAMINE said is in the step's
        ``examined``. Every
        command is written before any answer is read: IMAP lets a client pipeline commands, and
        the server runs them in order (RFC 9051 5.5), so EXAMINE A, FETCH A, EXAMINE B, FETCH B
        cost one round trip instead of four.

        Returns one :class:`PipelinedFetch` per step: the messages as :meth:`fetch` returns
        them, or the error of a NO or BAD answer and the command that got it. A failed EXAMINE
        leaves no folder selected, so its FETCH fails too; its answer is read and dropped, and
        no data of another folder is ever returned for the step. Errors that leave the session
        in doubt (EOF, timeout, BYE) are raised; ``reading[0]``, if given, is then the index of
        the step whose answers were being read.
        """
        imap = self._imap
        fields = seq_to_parenstr_upper(list(data))
        sent: list[tuple[str | None, str]] = []  # per step: the EXAMINE's tag or None, FETCH's
        will_be: tuple[str, bool] | None
        state = imap.state
        imap.state = "SELECTED"  # imaplib sends UID commands only then; the server will be
        # The first folder is examined even when it is selected already: a session learns of
        # other sessions' changes (messages appended since) only at its next command, and a
        # NOOP pipelined before the FETCH is not enough, since Dovecot runs the FETCH beside
        # the NOOP before the NOOP's sync is done (seen: the new UID's FETCH came back empty).
        # An EXAMINE is a barrier, in the same round trip.
        will_be = None
        try:
            # Untagged FETCH responses left by earlier commands are not this pipeline's.
            imap.untagged_responses.pop("FETCH", None)
            for number, (folder, uids) in enumerate(steps):
                examine = None
                if will_be != (folder, True) or number in fresh:
                    if not sent:
                        imap.untagged_responses = {}  # as imaplib's select() does
                    imap.is_readonly = True
                    examine = imap._command("EXAMINE", self._normalise_folder(folder))
                    will_be = (folder, True)
                sent.append((examine, imap._command("UID", "FETCH", message_set(uids), fields)))
        finally:
            imap.state = state
        results: list[PipelinedFetch] = []
        start = 0
        while start < len(steps):
            # One folder's run of steps: its EXAMINE (if any) and the FETCHes after it. Dovecot
            # may run pipelined FETCHes at the same time, so their untagged answers can come in
            # any order before their completions: they are pooled and handed out by UID. An
            # EXAMINE is a barrier; no server runs it beside a command on another folder.
            end = start + 1
            while end < len(steps) and sent[end][0] is None:
                end += 1
            folder, examine = steps[start][0], sent[start][0]
            failed: dict[int, PipelinedFetch] = {}
            if reading is not None:
                reading[0] = start
            examined = None
            if examine is not None:
                self.selected = None
                typ, answer = imap._command_complete("EXAMINE", examine)
                if typ == "OK":
                    examined = self._process_select_response(imap.untagged_responses)
                imap.untagged_responses.clear()  # what EXAMINE said; the FETCHes' come next
                if typ == "OK":
                    imap.state = "SELECTED"
                    self.selected = (folder, True)
                else:
                    imap.state = "AUTH"
                    error = _failure("select", typ, answer)
                    failed = {i: PipelinedFetch(None, error, "select") for i in range(start, end)}
            lines: list[Any] = []
            with FetchReader(imap) as reader:
                for index in range(start, end):
                    if reading is not None:
                        reading[0] = index
                    try:
                        typ, answer = imap._command_complete("FETCH", sent[index][1])
                    except imaplib.IMAP4.abort:
                        raise
                    except imaplib.IMAP4.error as exc:  # a BAD answer, read in full
                        typ, answer = "BAD", [str(exc).encode()]
                    lines += [x for x in imap.untagged_responses.pop("FETCH", []) if x]
                    if typ != "OK" and index not in failed:
                        error = _failure("fetch", typ, answer)
                        failed[index] = PipelinedFetch(None, error, "fetch")
            # Only responses with a UID asked for are results: unsolicited ones (other
            # sessions' flag changes, without a UID) are dropped, never merged.
            wanted = _Wanted([steps[index][1] for index in range(start, end)])
            response = read_fetch_results(reader, lines, self.normalise_times, wanted)
            for index in range(start, end):
                if index in failed:
                    results.append(failed[index])
                else:
                    uids = steps[index][1]
                    if isinstance(uids, range):
                        fetched = {uid: data for uid, data in response.items() if uid in uids}
                    else:
                        fetched = {uid: response[uid] for uid in uids if uid in response}
                    results.append(
                        PipelinedFetch(fetched, None, None, examined if index == start else None)
                    )
            start = end
        return results

    def select_and_search(
        self, folder: str, readonly: bool, criteria: Any, charset: str | None = None
    ) -> tuple[list[int] | None, Exception | None, Literal["select", "search"] | None]:
        """SELECT (or EXAMINE) *folder* and ``UID SEARCH`` it, in one round trip.

        Both commands are written before either answer is read (RFC 9051 5.5). Where the
        server has ESEARCH (RFC 4731) the search asks for ``RETURN (ALL)``, whose answer lists
        the UIDs as ranges. Criteria that would need a literal (non-ASCII, or a *charset*) take
        imapclient's own two round trips instead.

        Returns the UIDs found (ascending), or the error of a NO or BAD answer and the command
        that got it. Errors that leave the session in doubt are raised.
        """
        args = _normalise_search_criteria(criteria, charset)
        if charset or any(not arg.isascii() or b"\r" in arg or b"\n" in arg for arg in args):
            try:
                self.select_folder(folder, readonly)
            except imaplib.IMAP4.abort:
                raise
            except imaplib.IMAP4.error as exc:
                return None, exc, "select"
            try:
                return sorted({int(uid) for uid in self.search(criteria, charset)}), None, None
            except imaplib.IMAP4.abort:
                raise
            except imaplib.IMAP4.error as exc:
                return None, exc, "search"
        imap = self._imap
        esearch = self.has_capability("ESEARCH")
        if esearch:
            args = [b"RETURN", b"(ALL)", *args]
        state = imap.state
        imap.state = "SELECTED"
        try:
            imap.untagged_responses = {}
            imap.is_readonly = readonly
            name = "EXAMINE" if readonly else "SELECT"
            select = imap._command(name, self._normalise_folder(folder))
            search = imap._command("UID", "SEARCH", *args)
        finally:
            imap.state = state
        self.selected = None
        typ, answer = imap._command_complete(name, select)
        error: Exception | None = None
        if typ == "OK":
            imap.state = "SELECTED"
            self.selected = (folder, readonly)
        else:
            imap.state = "AUTH"
            error = _failure("select", typ, answer)
        imap.untagged_responses.clear()
        try:
            typ, answer = imap._command_complete("SEARCH", search)
        except imaplib.IMAP4.abort:
            raise
        except imaplib.IMAP4.error as exc:  # a BAD answer, read in full
            typ, answer = "BAD", [str(exc).encode()]
        if error is not None:
            return None, error, "select"
        if typ != "OK":
            return None, _failure("search", typ, answer), "search"
        untagged = imap.untagged_responses
        found = _esearch_uids(untagged.pop("ESEARCH", [])) if esearch else None
        if found is None:
            lines = [x for x in untagged.pop("SEARCH", []) if x is not None]
            found = parse_message_list(lines) if lines else []
        return sorted({int(uid) for uid in found}), None, None

    def can_search_and_fetch(self, criteria: Any, charset: str | None) -> bool:
        """Whether :meth:`search_and_fetch` can send these criteria in one round trip."""
        if charset or not (self.has_capability("SEARCHRES") and self.has_capability("ESEARCH")):
            return False
        args = _normalise_search_criteria(criteria, charset)
        return all(arg.isascii() and b"\r" not in arg and b"\n" not in arg for arg in args)

    def search_and_fetch(
        self, folder: str, criteria: Any, first: range, data: Sequence[str | bytes]
    ) -> tuple[list[int] | None, dict[int, dict[bytes, Any]] | None, Exception | None, str]:
        """EXAMINE *folder*, search it, and fetch the matches among the UIDs *first*, in one
        round trip (check :meth:`can_search_and_fetch` first).

        Four commands go at once: EXAMINE; ``UID SEARCH RETURN (ALL)`` with the criteria
        (every match, as ranges: ESEARCH, RFC 4731); ``UID SEARCH RETURN (SAVE) UID
        first:last`` with the criteria (the matches in *first*, kept by the server as ``$``:
        SEARCHRES, RFC 5182); and ``UID FETCH $``. So the folder's first batch comes back
        with its search, bounded by *first* as any batch is.

        Returns every UID found (ascending) and the first batch's messages (as
        :meth:`fetch_pipelined` returns them), or the error of a NO or BAD answer and the
        command that got it (``"select"``, ``"search"`` or ``"fetch"``).
        """
        imap = self._imap
        args = _normalise_search_criteria(criteria, None)
        fields = seq_to_parenstr_upper(list(data))
        state = imap.state
        imap.state = "SELECTED"
        try:
            imap.untagged_responses = {}
            imap.is_readonly = True
            examine = imap._command("EXAMINE", self._normalise_folder(folder))
            search = imap._command("UID", "SEARCH", b"RETURN", b"(ALL)", *args)
            save = imap._command(
                "UID", "SEARCH", b"RETURN", b"(SAVE)", b"UID", message_set(first), *args
            )
            fetch = imap._command("UID", "FETCH", b"$", fields)
        finally:
            imap.state = state
        self.selected = None
        typ, answer = imap._command_complete("EXAMINE", examine)
        failure: tuple[Exception, str] | None = None
        if typ == "OK":
            imap.state = "SELECTED"
            self.selected = (folder, True)
        else:
            imap.state = "AUTH"
            failure = (_failure("select", typ, answer), "select")
        imap.untagged_responses.clear()
        found: list[int] | None = None
        lines: list[Any] = []
        with FetchReader(imap) as reader:
            for name, tag in (("SEARCH", search), ("SEARCH", save), ("FETCH", fetch)):
                try:
                    typ, answer = imap._command_complete(name, tag)
                except imaplib.IMAP4.abort:
                    raise
                except imaplib.IMAP4.error as exc:  # a BAD answer, read in full
                    typ, answer = "BAD", [str(exc).encode()]
                if typ != "OK" and failure is None:
                    failure = (_failure(name.lower(), typ, answer), name.lower())
                if tag == search:
                    answers = imap.untagged_responses.pop("ESEARCH", [])
                    found = _esearch_uids([x for x in answers if x]) or []
                lines += [x for x in imap.untagged_responses.pop("FETCH", []) if x]
        if failure is not None:
            return None, None, failure[0], failure[1]
        assert found is not None
        uids = sorted(set(found))
        wanted = {uid for uid in uids if uid in first}
        return uids, read_fetch_results(reader, lines, self.normalise_times, wanted), None, ""

    def fetch(self, messages: Any, data: Any, modifiers: Any = None) -> dict[int, dict[bytes, Any]]:
        """imapclient's ``fetch``, but a message's data is only what the server sent for it.

        With UIDs (the default), only responses that carry a UID asked for are results, so
        another session's flag change (``* 7 FETCH (FLAGS (...))``, no UID) is never merged
        into the message whose UID is 7; and FETCH responses left over from earlier commands
        are not read as this command's.
        """
        if not self.use_uid:
            return super().fetch(messages, data, modifiers)  # type: ignore[no-any-return]
        if not messages:
            return {}
        imap = self._imap
        imap.untagged_responses.pop("FETCH", None)
        args = ["FETCH", join_message_ids(messages), seq_to_parenstr_upper(data)]
        if modifiers:
            args.append(seq_to_parenstr_upper(modifiers))
        tag = imap._command("UID", *args)
        with FetchReader(imap) as reader:
            typ, answer = imap._command_complete("FETCH", tag)
        self._checkok("fetch", typ, answer)
        lines = [x for x in imap.untagged_responses.pop("FETCH", []) if x]
        return read_fetch_results(reader, lines, self.normalise_times, _message_ids(messages))

    def unselect_folder(self) -> Any:
        try:
            return super().unselect_folder()
        finally:
            self.selected = None

    def close_folder(self) -> Any:
        try:
            return super().close_folder()
        finally:
            self.selected = None

    def idle(self) -> Any:
        self.idling = True
        return super().idle()

    def idle_done(self) -> Any:
        result = super().idle_done()
        self.idling = False
        return result

    def logout(self) -> Any:
        self.logged_out = True
        return super().logout()

    def shutdown(self) -> None:
        self.logged_out = True
        super().shutdown()

    def _create_IMAP4(self) -> imaplib.IMAP4:
        connect_timeout = getattr(self._timeout, "connect", None)
        if self.ssl:
            return _TLSIMAP4(
                self.host, self.port, self.ssl_context, connect_timeout, self._on_socket
            )
        return _PlainIMAP4(self.host, self.port, connect_timeout, self._on_socket)

    def _normalise_folder(self, folder_name: str | bytes) -> Any:
        # Every folder argument of every command passes here: one that holds CR, LF or NUL
        # would end the command line and let the rest be read as a command of its own.
        if isinstance(folder_name, bytes):
            check_wire_text("a folder name", folder_name.decode("ascii", "replace"))
        else:
            check_wire_text("a folder name", folder_name)
        return super()._normalise_folder(folder_name)

    def restore_defaults(self) -> None:
        """Undo attribute changes a previous user may have made (no I/O)."""
        self.use_uid = True
        self.folder_encode = True
        self.normalise_times = True


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


def connect_client(
    config: PoolConfig, on_socket: Callable[[socket.socket], None] | None = None
) -> TrackingClient:
    """Connect and upgrade with STARTTLS if asked: everything before the login. Blocking.

    The connect timeout covers TCP connect, TLS handshake, greeting and CAPABILITY (asked for
    only when the greeting lacks it); the login timeout covers STARTTLS. *on_socket* is shown
    the socket before each blocking step (see :class:`_ShownSocket`).
    """
    client = TrackingClient(
        config.host,
        config.port,
        ssl=config.ssl,
        ssl_context=config.ssl_context,
        timeout=SocketTimeout(connect=config.connect_timeout, read=config.login_timeout),
        on_socket=on_socket,
    )
    try:
        # imapclient writes some commands in two pieces; without this each costs a delayed ACK.
        client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if config.starttls:
            if not client.has_capability("STARTTLS"):
                raise StartTLSNotOffered(
                    "starttls=True but the server does not offer STARTTLS: refusing to log in "
                    "without TLS"
                )
            client.starttls(config.ssl_context)
    except BaseException:
        close_client(client)
        raise
    return client


def login_client(client: TrackingClient, config: PoolConfig, token: str | None) -> None:
    """Log in a client from :func:`connect_client` (bounded by the login timeout), then set
    the read timeout for commands. Closes the client if it fails. Blocking.

    *token* is the OAuth2 access token when the pool logs in with one.
    """
    try:
        authenticate(client, config, token)
        # The post-login capabilities, now: free where the LOGIN answer carried them (Dovecot,
        # Cyrus), one round trip elsewhere, which also proves the session serves commands
        # (throttled Microsoft 365 answers them "BAD User is authenticated but not connected").
        client.capabilities()
        client._timeout = SocketTimeout(connect=config.connect_timeout, read=config.read_timeout)
        client.socket().settimeout(config.read_timeout)
    except BaseException:
        close_client(client)
        raise


def authenticate(client: IMAPClient, config: PoolConfig, token: str | None) -> None:
    """Log in with the configured mechanism (see ``PoolConfig.auth_mechanism``).

    A user name or password with non-ASCII characters goes as UTF-8: with ``"auto"`` in
    AUTHENTICATE PLAIN where the server offers it, else (and with ``"LOGIN"``) in LOGIN as a
    literal (RFC 9051 allows 8-bit octets there). No error raised here names any character of
    a secret: an encoding failure becomes a :class:`~imapclient.exceptions.LoginError` of its
    own wording, raised outside the failing ``except`` block so that no chained exception
    carries the original text either.
    """
    mechanism = config.auth_mechanism
    if token is not None:
        check_wire_text("the OAuth2 token", token)
        if mechanism == "OAUTHBEARER":
            client.oauthbearer_login(config.username, token)
        else:
            client.oauth2_login(config.username, token)
        return
    user, password = config.username, config.password or ""
    ascii_only = user.isascii() and password.isascii()
    if mechanism == "auto" and client.has_capability("LOGINDISABLED"):
        if not client.has_capability("AUTH=PLAIN"):
            raise LoginDisabled(
                "the server disables LOGIN on this connection and offers no AUTHENTICATE "
                "PLAIN: it wants TLS (ssl=True or starttls=True)"
            )
        mechanism = "PLAIN"
    elif mechanism == "auto" and not ascii_only and client.has_capability("AUTH=PLAIN"):
        mechanism = "PLAIN"
    unsendable = False
    try:
        if mechanism == "PLAIN":
            client.plain_login(user, password)
        elif ascii_only:
            client.login(user, password)
        else:
            login_with_literals(client, user, password)
    except UnicodeError:
        unsendable = True
    if unsendable:
        raise LoginError("the user name or password could not be sent to the server")


def has_buffered_data(imap: Any) -> bool:
    """Whether imaplib holds bytes it has read from the socket but nobody has parsed: the
    socket's readability cannot show them. Never blocks (the socket is made non-blocking for
    the look). Only from the thread that owns the connection."""
    sock = imap.sock
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    timeout = sock.gettimeout()
    try:
        sock.setblocking(False)
        return bool(imap.file.peek(1))
    except (OSError, ValueError):
        return False
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(timeout)


def close_client(client: TrackingClient) -> None:
    """Close the client's socket without a LOGOUT. Only when no thread is using it."""
    client.logged_out = True
    with contextlib.suppress(OSError):
        client._imap.shutdown()


class _Skipped(Exception):
    pass


class _Call:
    """One call into a worker thread. ``phase`` changes under the connection's lock."""

    __slots__ = ("done", "phase", "token")

    def __init__(self) -> None:
        self.phase = _QUEUED
        # Made only when the task stops waiting for a running thread (rare), so that it can
        # still wait for the thread to end: the thread sets it through the Trio token.
        self.done: trio.Event | None = None
        self.token: trio.lowlevel.TrioToken | None = None

    def orphan(self) -> None:
        """Mark a running call as left by its task. Call with the lock held, in Trio."""
        self.phase = _ORPHANED
        if self.done is None:
            self.done = trio.Event()
            self.token = trio.lowlevel.current_trio_token()

    def finished_in_thread(self) -> None:
        if self.token is not None and self.done is not None:
            with contextlib.suppress(trio.RunFinishedError):
                self.token.run_sync_soon(self.done.set)


class PooledClient:
    """One connection of the pool: a :class:`TrackingClient` plus the pool's bookkeeping.

    Not public; users hold a :class:`~trio_imappool.Connection` proxy instead.
    """

    __slots__ = (
        "_call",
        "_lock",
        "_sock",
        "broken",
        "buffered",
        "busy",
        "client",
        "created_at",
        "expires_at",
        "global_token",
        "last_used",
        "number",
        "place",
        "poller",
        "release_when_done",
        "server_gone",
    )

    def __init__(self) -> None:
        #: Serial number in the pool, given when the connection has opened (0 before).
        self.number = 0
        self.client: TrackingClient | None = None
        now = trio.current_time()
        self.created_at = now
        self.last_used = now
        #: When max_lifetime (with its jitter) retires it; set by the pool.
        self.expires_at = math.inf
        #: Set when an error suggests that the server went away (EOF, BYE, reset).
        self.server_gone = False
        #: Whether it holds a place of the pool's shared connection limiter (pool groups).
        self.global_token = False
        #: Polls the socket for readability without a round trip (made once it is open).
        self.poller: select.poll | None = None
        #: Why the connection must not be reused, or None while it is healthy.
        self.broken: str | None = None
        #: True while a task is running a call on it (two tasks sharing a checkout).
        self.busy = False
        #: Its checkout ended while another task's call still ran: the pool takes it back when
        #: that call ends.
        self.release_when_done = False
        #: Where the pool has it: "new", "opening", "idle", "in_use" or "closed".
        self.place = "new"
        #: Whether imaplib's buffer held unread bytes when the last call ended (the server
        #: sent more than the answer: what a readability check of the socket cannot see).
        self.buffered = False
        self._lock = threading.Lock()
        self._call: _Call | None = None
        #: The socket while the connection is being opened (see :meth:`connect_blocking`).
        self._sock: socket.socket | None = None

    def __repr__(self) -> str:
        state = f"broken: {self.broken}" if self.broken else "ok"
        folder = self.client.selected if self.client is not None else None
        return f"<PooledClient #{self.number} {state}, selected={folder!r}>"

    @property
    def thread_running(self) -> bool:
        """Whether a worker thread may still be inside a call on this connection."""
        call = self._call
        return call is not None and call.phase in (_RUNNING, _ORPHANED)

    def _in_thread(self, call: _Call, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        with self._lock:
            if call.phase == _ABANDONED:
                raise _Skipped  # nobody is waiting for this result
            call.phase = _RUNNING
        try:
            return fn(*args)
        except BaseException as exc:
            # Judged here, in the thread, so that only the command's own errors count: a
            # Cancelled delivered to the task is handled by run() from the call's phase.
            if self.broken is None and not connection_survives(exc):
                self.broken = f"{type(exc).__name__}: {exc}"
                self.server_gone = suggests_server_gone(exc)
            raise
        finally:
            if self.client is not None and self.broken is None:
                self.buffered = has_buffered_data(self.client._imap)
            with self._lock:
                orphaned = call.phase == _ORPHANED
                call.phase = _FINISHED
            if orphaned:
                if self.client is not None:
                    # The task gave up on us; we are the last user of the socket.
                    close_client(self.client)
                elif self._sock is not None:
                    with contextlib.suppress(OSError):
                        self._sock.close()
                call.finished_in_thread()

    async def run(
        self,
        limiter: trio.CapacityLimiter,
        fn: Callable[..., T],
        *args: Any,
        grace: float = INTERRUPT_GRACE,
    ) -> T:
        """Run ``fn(*args)`` in a worker thread, interrupting it if the task is cancelled.

        On cancellation (or any exception delivered to the task while the thread runs) the
        connection is marked broken, its socket shut down, and the task waits at most *grace*
        seconds (shielded) for the thread before re-raising.
        """
        if self.thread_running:
            # An interrupted call's worker has not ended yet: a second thread must never run
            # inside the same client, and the record of that worker must not be lost.
            raise trio.BrokenResourceError(
                f"connection #{self.number} was interrupted and its worker thread is still "
                "running; it will be discarded"
            )
        call = _Call()
        self._call = call
        try:
            return await trio.to_thread.run_sync(
                self._in_thread, call, fn, args, limiter=limiter, abandon_on_cancel=True
            )
        except BaseException:
            with self._lock:
                phase = call.phase
                if phase == _QUEUED:
                    call.phase = _ABANDONED
                elif phase in (_RUNNING, _ORPHANED):
                    call.orphan()
            if phase in (_RUNNING, _ORPHANED):
                self.broken = self.broken or "a command was interrupted"
                self.interrupt()
                with trio.move_on_after(grace, shield=True):
                    await self.wait_thread_done()
            raise

    async def wait_thread_done(self) -> None:
        """Wait until no worker thread is inside a call that its task has left."""
        call = self._call
        if call is not None and call.done is not None:
            await call.done.wait()
        else:
            await trio.lowlevel.checkpoint()

    def connect_blocking(self, config: PoolConfig) -> None:
        """Connect, up to the login (in a worker thread, through :meth:`run`).

        The socket is shown to :meth:`interrupt` before every blocking step, so an open is
        interrupted like a command: a server that trickles its greeting cannot keep the thread.
        """
        self.client = connect_client(config, self._show_socket)
        self._sock = None

    def _show_socket(self, sock: socket.socket) -> None:
        """Called in the worker thread with each new socket, before it blocks on it."""
        self._sock = sock
        if self.broken is not None:  # the pool gave up before the socket existed
            raise _Interrupted(f"connection #{self.number}: opening was interrupted")

    def login_blocking(self, config: PoolConfig, token: str | None = None) -> None:
        """Log the connected client in (in a worker thread, through :meth:`run`)."""
        assert self.client is not None
        login_client(self.client, config, token)
        self.poller = select.poll()
        self.poller.register(self.client._imap.sock, select.POLLIN)

    def server_spoke(self) -> bool:
        """Whether the idle connection has something unread: its socket is readable (the
        server closed it or sent something unasked, a BYE before shutting down) or imaplib's
        buffer held bytes when the last command ended. No round trip, never blocks."""
        if self.poller is None or self.buffered:
            return True
        try:
            # poll(), not recv(MSG_PEEK): a socket with a timeout waits inside recv().
            return bool(self.poller.poll(0))
        except (OSError, ValueError):
            return True

    def interrupt(self) -> None:
        """Wake a worker blocked on this connection's socket (callable from any thread)."""
        client = self.client
        sock = client._imap.sock if client is not None else self._sock
        if sock is None:
            return  # not connected yet: _show_socket sees `broken` and gives up
        with contextlib.suppress(OSError, AttributeError):
            # The plain socket method: for TLS sockets it shuts the TCP stream down without
            # touching the SSL object that the worker thread is using.
            socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def close(self) -> None:
        """Drop the connection without LOGOUT. Never blocks.

        If a worker thread is still inside a call, the socket is shut down and the worker closes
        it when it returns; otherwise it is closed here.
        """
        if self.broken is None:
            self.broken = "closed"
        with self._lock:
            call = self._call
            running = call is not None and call.phase in (_RUNNING, _ORPHANED)
            if running:
                assert call is not None
                call.orphan()
        if running:
            self.interrupt()
        elif self.client is not None:
            close_client(self.client)
        elif self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
