"""The pool's imapclient: session state tracked, and the commands it pipelines.

:class:`WireClient` is an :class:`imapclient.IMAPClient` that remembers what the pool needs to
know about the session (the selected folder, whether it is idling or logged out) and adds
commands that write several IMAP commands before reading any answer (RFC 9051 5.5): a fetch of
many batches and folders, a select with its search, a search with its first fetch. They drive
imaplib directly (``_command``, ``_command_complete``, ``untagged_responses``, its ``state``)
and read FETCH answers through :class:`~._fetch_reader.FetchReader`.

Blocking code for worker threads; no Trio here.
"""

from __future__ import annotations

import imaplib
import math
import time
from collections.abc import Callable, Container, Sequence
from typing import Any, Literal

from imapclient import IMAPClient
from imapclient.imapclient import (
    _normalise_search_criteria,
    join_message_ids,
    seq_to_parenstr_upper,
)
from imapclient.response_parser import parse_message_list

from ._fetch import (
    PipelinedFetch,
    Wanted,
    complete,
    esearch_uids,
    message_ids,
    message_set,
    read_fetch_results,
)
from ._fetch import failure as _failure
from ._fetch_reader import FetchReader
from ._sockets import TLSIMAP4, OnSocket, PlainIMAP4

__all__ = ["WireClient"]


def _refuse_line_breaks(what: str, value: str) -> None:
    """The check :class:`WireClient` makes unless a subclass gives its own (see there)."""
    if any(ch in value for ch in "\r\n\0"):
        raise ValueError(
            f"{what} contains a line break (CR or LF) or NUL, which IMAP cannot carry: refused"
        )


class WireClient(IMAPClient):  # type: ignore[misc]
    """An :class:`imapclient.IMAPClient` that remembers the session state the pool cares about.

    Tracking lives on the client, not on the async proxy, so that functions given to
    ``run_sync`` that call ``client.select_folder(...)`` directly are tracked too.

    Every folder argument of every command passes through :attr:`check_text` first: a name
    holding CR, LF or NUL would end the command line and let the rest be read as a command of
    its own. Here it raises ``ValueError``; the pool's subclass
    (:class:`trio_imappool._client.TrackingClient`) gives its own check, which raises its
    configuration error (a ``ValueError`` too).
    """

    _selected: tuple[str, bool] | None
    #: When the command that selected :attr:`selected` was sent (``time.monotonic()``), where
    #: known; ``-inf`` otherwise. The session has seen every message that existed then.
    selected_since: float
    idling: bool
    logged_out: bool
    #: ``check_text(what, value)``: refuses a text that cannot go on the wire (see above).
    check_text: Callable[[str, str], None] = staticmethod(_refuse_line_breaks)

    def __init__(self, *args: Any, on_socket: OnSocket | None = None, **kwargs: Any) -> None:
        self._selected = None
        self.selected_since = -math.inf
        self.idling = False
        self.logged_out = False
        self._on_socket = on_socket
        super().__init__(*args, **kwargs)

    @property
    def selected(self) -> tuple[str, bool] | None:
        """The folder selected and whether read-only (EXAMINE), or None."""
        return self._selected

    @selected.setter
    def selected(self, value: tuple[str, bool] | None) -> None:
        self._selected = value
        self.selected_since = -math.inf  # since when the session is current: not known

    def _now_selected(self, folder: str, readonly: bool, sent_at: float) -> None:
        """*folder* is selected by a command sent at *sent_at* (``time.monotonic()``)."""
        self._selected = (folder, readonly)
        self.selected_since = sent_at

    def select_folder(self, folder: str, readonly: bool = False) -> dict[bytes, Any]:
        # A failed SELECT leaves no folder selected (RFC 3501 6.3.1).
        self.selected = None
        sent_at = time.monotonic()
        result: dict[bytes, Any] = super().select_folder(folder, readonly)
        self._now_selected(folder, readonly, sent_at)
        return result

    def fetch_pipelined(
        self,
        steps: Sequence[tuple[str, Sequence[int]]],
        data: Sequence[str | bytes],
        reading: list[int] | None = None,
        fresh: Container[int] = (),
        current: tuple[Container[str], float] | None = None,
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

        *current* ``(folders, since)`` spares the first step's EXAMINE when the connection
        has that folder examined already, the folder is one of *folders*, and the EXAMINE
        was sent at or after *since* (``time.monotonic()``): the caller knows that every
        UID it asks for there existed by then, so the session has seen them. On a server
        that syncs a whole folder for every EXAMINE (Dovecot reads a Maildir's directory),
        an EXAMINE per batch costs in proportion to the folder's size.
        """
        imap = self._imap
        fields = seq_to_parenstr_upper(list(data))
        sent: list[tuple[str | None, str]] = []  # per step: the EXAMINE's tag or None, FETCH's
        sent_at: list[float] = []  # per step: when its EXAMINE (if any) was written
        will_be: tuple[str, bool] | None
        state = imap.state
        imap.state = "SELECTED"  # imaplib sends UID commands only then; the server will be
        # The first folder is examined even when it is selected already: a session learns of
        # other sessions' changes (messages appended since) only at its next command, and a
        # NOOP pipelined before the FETCH is not enough, since Dovecot runs the FETCH beside
        # the NOOP before the NOOP's sync is done (seen: the new UID's FETCH came back empty).
        # An EXAMINE is a barrier, in the same round trip.
        will_be = None
        if current is not None and self._selected is not None:
            folders, since = current
            if self._selected[1] and self._selected[0] in folders and self.selected_since >= since:
                will_be = self._selected  # current since before the UIDs were known
        try:
            # Untagged FETCH responses left by earlier commands are not this pipeline's.
            imap.untagged_responses.pop("FETCH", None)
            for number, (folder, uids) in enumerate(steps):
                examine = None
                if will_be != (folder, True) or number in fresh:
                    if not sent:
                        imap.untagged_responses = {}  # as imaplib's select() does
                    imap.is_readonly = True
                    sent_at.append(time.monotonic())
                    examine = imap._command("EXAMINE", self._normalise_folder(folder))
                    will_be = (folder, True)
                else:
                    sent_at.append(-math.inf)
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
                    self._now_selected(folder, True, sent_at[start])
                else:
                    imap.state = "AUTH"
                    error = _failure("select", typ, answer)
                    failed = {i: PipelinedFetch(None, error, "select") for i in range(start, end)}
            lines: list[Any] = []
            with FetchReader(imap) as reader:
                for index in range(start, end):
                    if reading is not None:
                        reading[0] = index
                    typ, answer = complete(imap, "FETCH", sent[index][1])
                    lines += [x for x in imap.untagged_responses.pop("FETCH", []) if x]
                    if typ != "OK" and index not in failed:
                        error = _failure("fetch", typ, answer)
                        failed[index] = PipelinedFetch(None, error, "fetch")
            # Only responses with a UID asked for are results: unsolicited ones (other
            # sessions' flag changes, without a UID) are dropped, never merged.
            wanted = Wanted([steps[index][1] for index in range(start, end)])
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
        typ, answer = complete(imap, "SEARCH", search)
        if error is not None:
            return None, error, "select"
        if typ != "OK":
            return None, _failure("search", typ, answer), "search"
        untagged = imap.untagged_responses
        found = esearch_uids(untagged.pop("ESEARCH", [])) if esearch else None
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
                typ, answer = complete(imap, name, tag)
                if typ != "OK" and failure is None:
                    failure = (_failure(name.lower(), typ, answer), name.lower())
                if tag == search:
                    answers = imap.untagged_responses.pop("ESEARCH", [])
                    found = esearch_uids([x for x in answers if x]) or []
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
        return read_fetch_results(reader, lines, self.normalise_times, message_ids(messages))

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
            return TLSIMAP4(
                self.host, self.port, self.ssl_context, connect_timeout, self._on_socket
            )
        return PlainIMAP4(self.host, self.port, connect_timeout, self._on_socket)

    def _normalise_folder(self, folder_name: str | bytes) -> Any:
        # Every folder argument of every command passes here (see check_text).
        if isinstance(folder_name, bytes):
            self.check_text("a folder name", folder_name.decode("ascii", "replace"))
        else:
            self.check_text("a folder name", folder_name)
        return super()._normalise_folder(folder_name)

    def restore_defaults(self) -> None:
        """Undo attribute changes a previous user may have made (no I/O)."""
        self.use_uid = True
        self.folder_encode = True
        self.normalise_times = True
