"""A scripted IMAP server: an in-memory account and a handler per command, on loopback.

Dovecot is the server to test against; this one is for what Dovecot will not do. Folders with
hostile names, a FETCH that leaves out a UID or answers ``BODY[] NIL``, a login refused with any
wording, unsolicited FETCH lines between responses, a line over imaplib's limit, a server that
ends IDLE by itself: each is a few lines of a handler, or a field of the account.

The server speaks enough IMAP4rev1 for imapclient and the pool (CAPABILITY, LOGIN, AUTHENTICATE
PLAIN, LIST, LSUB, STATUS, SELECT, EXAMINE, SEARCH, FETCH and their UID forms, NOOP, IDLE,
UNSELECT, CLOSE, NAMESPACE, ID, ENABLE, LOGOUT; literals from the client, synchronizing or
``LITERAL+``). It is not a conforming server: it never changes its account except for ``\\Seen``
on a ``BODY[]`` fetch from a folder selected read-write, and it understands only simple search
keys. It listens on ``127.0.0.1`` only, on a free port unless told otherwise, and every read from
a client has a deadline (``read_timeout``).

Example (in a Trio test)::

    from trio_imappool.testing import ScriptedFolder, ScriptedMessage, open_scripted_server

    async def refuse(session, command):
        await session.send_line(f"{command.tag} NO [UNAVAILABLE] come back later")

    folders = {"INBOX": [b"Subject: a\\r\\n\\r\\nhello\\r\\n"],
               "Odd": ScriptedFolder([ScriptedMessage(uid=7, body=None)])}  # BODY[] NIL
    async with open_scripted_server(folders=folders, handlers={"LOGIN": refuse}) as server:
        ...  # open_pool(**server.pool_kwargs()), then look at server.commands

:func:`start_scripted_server_thread` runs the same server in a thread of its own (its own
``trio.run``), for blocking code and subprocesses.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import functools
import inspect
import re
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, TypeAlias

import trio

__all__ = [
    "DEFAULT_CAPABILITIES",
    "ScriptedAccount",
    "ScriptedCommand",
    "ScriptedFolder",
    "ScriptedMessage",
    "ScriptedServer",
    "ScriptedServerThread",
    "ScriptedSession",
    "open_scripted_server",
    "start_scripted_server_thread",
]

#: What the server announces unless told otherwise.
DEFAULT_CAPABILITIES: tuple[str, ...] = (
    "IMAP4rev1",
    "LITERAL+",
    "SASL-IR",
    "AUTH=PLAIN",
    "IDLE",
    "UNSELECT",
    "NAMESPACE",
    "ID",
    "ENABLE",
)

#: A command's argument: an atom or string (bytes), or a parenthesized list of arguments.
Argument: TypeAlias = "bytes | list[Argument]"
#: ``handler(session, command)``: answers one command (see :class:`ScriptedSession`).
Handler: TypeAlias = Callable[["ScriptedSession", "ScriptedCommand"], Awaitable[None]]
#: ``greeting(session)``: replaces the server's greeting (it may also close the connection).
Greeting: TypeAlias = Callable[["ScriptedSession"], Awaitable[None]]

_MAX_LINE = 1 << 20  # a client line longer than this closes the connection
_MAX_LITERAL = 64 << 20
_LITERAL_RE = re.compile(rb"\{(\d+)(\+?)\}$")
_DATE = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)


class _Closed(Exception):
    """The session is over (the client left, a read timed out, or a handler closed it)."""


# -- the account ---------------------------------------------------------------------------------


@dataclasses.dataclass
class ScriptedMessage:
    """One message of a :class:`ScriptedFolder`.

    Attributes:
        uid: Its UID (unique and ascending within the folder).
        body: Its bytes, as ``BODY[]`` returns them; ``None`` makes FETCH answer ``BODY[] NIL``.
        flags: Its flags, e.g. ``("\\\\Seen",)``.
        internaldate: Its INTERNALDATE.
        in_fetch: False makes FETCH leave the message out of its answer (SEARCH still finds
            it, STATUS and SELECT count it), as a broken server might.
    """

    uid: int
    body: bytes | None
    flags: tuple[str, ...] = ()
    internaldate: datetime.datetime = _DATE
    in_fetch: bool = True


@dataclasses.dataclass
class ScriptedFolder:
    """A folder of a :class:`ScriptedAccount`.

    Attributes:
        messages: Its messages, in UID order.
        uidvalidity: Its UIDVALIDITY.
        uidnext: Its UIDNEXT; ``None``: one more than the largest UID (1 when empty).
        attributes: Its LIST attributes, e.g. ``("\\\\Noselect",)``.
        subscribed: Listed by LSUB.
        status: The raw answer to STATUS after the name, e.g. ``b"(MESSAGES x)"``, for servers
            that answer garbage; ``None``: the real counts of the items asked for.
    """

    messages: list[ScriptedMessage] = dataclasses.field(default_factory=list)
    uidvalidity: int = 1
    uidnext: int | None = None
    attributes: tuple[str, ...] = ("\\HasNoChildren",)
    subscribed: bool = True
    status: bytes | None = None

    @classmethod
    def of(cls, bodies: Sequence[bytes], *, first_uid: int = 1, **options: Any) -> ScriptedFolder:
        """A folder holding *bodies* with UIDs from *first_uid* on."""
        messages = [ScriptedMessage(uid=first_uid + i, body=b) for i, b in enumerate(bodies)]
        return cls(messages=messages, **options)

    def next_uid(self) -> int:
        """The UIDNEXT the server announces."""
        if self.uidnext is not None:
            return self.uidnext
        return max((m.uid for m in self.messages), default=0) + 1

    def selectable(self) -> bool:
        return not any(a.lower() in ("\\noselect", "\\nonexistent") for a in self.attributes)


def _encode_name(name: str | bytes) -> bytes:
    if isinstance(name, bytes):
        return name
    from imapclient import imap_utf7

    encoded: bytes = imap_utf7.encode(name)
    return encoded


@dataclasses.dataclass
class ScriptedAccount:
    """What the server holds: users, folders and how it names them.

    Folder names are given as ``str`` (sent in modified UTF-7, as a real server would) or as
    ``bytes`` (sent exactly so on the wire, for names no real server would send). A client's
    name matches a folder when its bytes (after unquoting) equal the folder's wire name; INBOX
    matches in any case.

    Attributes:
        users: User name -> password (compared as UTF-8 text).
        folders: Name -> folder, in LIST order.
        delimiter: The hierarchy delimiter LIST shows; ``None`` for a flat server (NIL).
        namespace: The raw NAMESPACE answer after ``* NAMESPACE ``; ``None``: a personal
            namespace ``""`` with the delimiter.
    """

    users: dict[str, str] = dataclasses.field(default_factory=lambda: {"user": "password"})
    folders: dict[str | bytes, ScriptedFolder] = dataclasses.field(
        default_factory=lambda: {"INBOX": ScriptedFolder()}
    )
    delimiter: str | None = "/"
    namespace: bytes | None = None

    def find(self, wire_name: bytes) -> tuple[str | bytes, ScriptedFolder] | None:
        """The folder a client named (by its bytes on the wire), or None."""
        for name, folder in self.folders.items():
            encoded = _encode_name(name)
            if encoded == wire_name or (
                encoded.upper() == b"INBOX" and wire_name.upper() == b"INBOX"
            ):
                return name, folder
        return None


# -- commands ------------------------------------------------------------------------------------


@dataclasses.dataclass
class ScriptedCommand:
    """One command as the server read it.

    Attributes:
        tag: The client's tag.
        name: The command in upper case (``"FETCH"`` for ``UID FETCH`` too).
        uid: True for the ``UID`` form.
        args: The arguments: atoms and strings (quoted or literal) as bytes, parenthesized
            lists as lists; ``BODY.PEEK[HEADER.FIELDS (FROM)]`` is one atom.
        raw: The lines and literals it was made of, exactly as received (without CRLF).
    """

    tag: str
    name: str
    uid: bool
    args: list[Argument]
    raw: list[bytes]

    def arg(self, index: int) -> bytes:
        """Argument *index* as bytes (b"" when it is missing or a list)."""
        if index < len(self.args) and isinstance(self.args[index], bytes):
            return self.args[index]  # type: ignore[return-value]
        return b""


class _Literal(bytes):
    """A literal's bytes inside a command being parsed."""


def _tokenize(segments: Sequence[bytes]) -> list[Argument]:
    """Atoms, strings and lists of a command made of lines and literals (``_Literal``)."""
    root: list[Argument] = []
    stack = [root]
    for segment in segments:
        if isinstance(segment, _Literal):
            stack[-1].append(bytes(segment))
            continue
        i, n = 0, len(segment)
        while i < n:
            ch = segment[i : i + 1]
            if ch == b" ":
                i += 1
            elif ch == b"(":
                new: list[Argument] = []
                stack[-1].append(new)
                stack.append(new)
                i += 1
            elif ch == b")":
                if len(stack) > 1:
                    stack.pop()
                i += 1
            elif ch == b'"':
                out = bytearray()
                i += 1
                while i < n and segment[i : i + 1] != b'"':
                    if segment[i : i + 1] == b"\\" and i + 1 < n:
                        i += 1
                    out += segment[i : i + 1]
                    i += 1
                i += 1
                stack[-1].append(bytes(out))
            else:
                start, depth = i, 0
                while i < n:
                    c = segment[i : i + 1]
                    if c == b"[":
                        depth += 1
                    elif c == b"]":
                        depth = max(0, depth - 1)
                    elif depth == 0 and c in (b" ", b"(", b")"):
                        break
                    i += 1
                stack[-1].append(segment[start:i])
    return root


def _quote(name: bytes) -> bytes:
    """A string as the server sends it: quoted when it can be, else a literal."""
    if any(b in b"\r\n\x00" or b >= 0x80 for b in name):
        return b"{%d}\r\n" % len(name) + name
    return b'"' + name.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _sequence_set(spec: bytes, largest: int) -> set[int]:
    """The numbers of an IMAP sequence set (``1:3,7,9:*``); ``*`` is *largest*."""
    numbers: set[int] = set()
    for part in spec.split(b","):
        low, _, high = part.partition(b":")
        try:
            a = largest if low == b"*" else int(low)
            b = a if not high else (largest if high == b"*" else int(high))
        except ValueError:
            continue
        a, b = min(a, b), max(a, b)
        numbers.update(range(a, min(b, max(largest, a)) + 1))
    return numbers


def _glob(pattern: bytes, delimiter: bytes) -> re.Pattern[bytes]:
    out = b""
    for ch in pattern:
        c = bytes([ch])
        if c == b"*":
            out += b".*"
        elif c == b"%":
            out += b"[^" + re.escape(delimiter) + b"]*" if delimiter else b".*"
        else:
            out += re.escape(c)
    return re.compile(out + rb"\Z", re.DOTALL)


# -- the session ---------------------------------------------------------------------------------


class ScriptedSession:
    """One client connection, as a handler sees it.

    A handler is ``async def handler(session, command)``; it answers the command by writing
    lines (including the tagged completion), and may read more lines, close the connection, or
    fall back to the server's own answer with :meth:`default`.

    Attributes:
        server: The :class:`ScriptedServer`.
        account: The server's account (shared by all sessions).
        number: The connection's number, from 1.
        user: The user name once logged in, else None.
        selected: The name of the selected folder (as in ``account.folders``), else None.
        readonly: The selected folder was EXAMINEd.
        idling: Inside IDLE (lines given to :meth:`ScriptedServer.push` are sent).
    """

    def __init__(self, server: ScriptedServer, stream: trio.SocketStream, number: int) -> None:
        self.server = server
        self.account = server.account
        self.number = number
        self.user: str | None = None
        self.selected: str | bytes | None = None
        self.readonly = False
        self.idling = False
        self._stream = stream
        self._buffer = bytearray()
        self._closed = False
        self._send_lock = trio.Lock()

    # The primitives a handler uses.

    async def send(self, data: bytes) -> None:
        """Write *data* as it is (no CRLF is added). Raises if the client has gone."""
        if self._closed:
            raise _Closed
        async with self._send_lock:
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise _Closed from exc

    async def send_line(self, line: str | bytes) -> None:
        """Write one line (UTF-8 if given as text) and CRLF."""
        await self.send((line.encode("utf-8") if isinstance(line, str) else line) + b"\r\n")

    async def read_line(self, limit: float | None = None) -> bytes:
        """The client's next line, without CRLF (recorded in ``server.received``).

        Raises (ending the session, if not caught) when the client closes the connection or
        sends nothing for *limit* seconds (the server's ``read_timeout`` by default).
        """
        while True:
            end = self._buffer.find(b"\r\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 2]
                self.server.received.append(line)
                return line
            if len(self._buffer) > _MAX_LINE:
                raise _Closed
            await self._receive(limit)

    async def read_bytes(self, count: int, limit: float | None = None) -> bytes:
        """Exactly *count* bytes from the client (a literal; recorded in ``server.received``)."""
        while len(self._buffer) < count:
            await self._receive(limit)
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        self.server.received.append(data)
        return data

    async def close(self) -> None:
        """Close the connection now (the session ends when the handler returns)."""
        self._closed = True
        await self._stream.aclose()

    async def default(self, command: ScriptedCommand) -> None:
        """Answer *command* as the server does when no handler is given for it."""
        answer = getattr(self, "_do_" + command.name.replace("-", "_"), None)
        if answer is None:
            await self.send_line(f"{command.tag} BAD unknown command {command.name}")
        else:
            await answer(command)

    async def read_command(self) -> ScriptedCommand:
        """Read the client's next command, with its literals (a synchronizing literal gets its
        ``+`` continuation)."""
        raw: list[bytes] = []
        segments: list[bytes] = []
        line = await self.read_line()
        raw.append(line)
        while True:
            match = _LITERAL_RE.search(line)
            if match is None:
                segments.append(line)
                break
            size = int(match.group(1))
            if size > _MAX_LITERAL:
                raise _Closed
            segments.append(line[: match.start()])
            if not match.group(2):
                await self.send_line(b"+ go on")
            literal = await self.read_bytes(size)
            raw.append(literal)
            segments.append(_Literal(literal))
            line = await self.read_line()
            raw.append(line)
        tokens = _tokenize(segments)
        tag = tokens[0] if tokens and isinstance(tokens[0], bytes) else b"*"
        name = tokens[1] if len(tokens) > 1 and isinstance(tokens[1], bytes) else b""
        args = tokens[2:]
        uid = name.upper() == b"UID"
        if uid:
            name = args[0] if args and isinstance(args[0], bytes) else b""
            args = args[1:]
        return ScriptedCommand(
            tag=tag.decode("utf-8", "replace"),
            name=name.decode("utf-8", "replace").upper(),
            uid=uid,
            args=args,
            raw=raw,
        )

    async def _receive(self, limit: float | None) -> None:
        if self._closed:
            raise _Closed
        with trio.move_on_after(self.server.read_timeout if limit is None else limit):
            try:
                data = await self._stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise _Closed from exc
            if not data:
                raise _Closed
            self._buffer += data
            return
        raise _Closed

    # The default answers.

    async def _do_CAPABILITY(self, command: ScriptedCommand) -> None:
        await self.send_line("* CAPABILITY " + " ".join(self.server.capabilities))
        await self.send_line(f"{command.tag} OK CAPABILITY done")

    async def _do_NOOP(self, command: ScriptedCommand) -> None:
        await self.send_line(f"{command.tag} OK NOOP done")

    _do_CHECK = _do_NOOP

    async def _do_ID(self, command: ScriptedCommand) -> None:
        await self.send_line('* ID ("name" "trio-imappool scripted server")')
        await self.send_line(f"{command.tag} OK ID done")

    async def _do_ENABLE(self, command: ScriptedCommand) -> None:
        await self.send_line("* ENABLED")
        await self.send_line(f"{command.tag} OK ENABLE done")

    async def _do_LOGOUT(self, command: ScriptedCommand) -> None:
        await self.send_line("* BYE logging out")
        await self.send_line(f"{command.tag} OK LOGOUT done")
        await self.close()

    def _login_ok(self, user: str, password: str) -> bool:
        return self.account.users.get(user) == password

    async def _do_LOGIN(self, command: ScriptedCommand) -> None:
        if any(c.upper() == "LOGINDISABLED" for c in self.server.capabilities):
            await self.send_line(f"{command.tag} NO [PRIVACYREQUIRED] LOGIN is disabled")
            return
        user = command.arg(0).decode("utf-8", "replace")
        password = command.arg(1).decode("utf-8", "replace")
        if len(command.args) != 2 or not self._login_ok(user, password):
            await self.send_line(f"{command.tag} NO [AUTHENTICATIONFAILED] Authentication failed.")
            return
        self.user = user
        await self.send_line(f"{command.tag} OK [CAPABILITY {self._caps()}] Logged in")

    async def _do_AUTHENTICATE(self, command: ScriptedCommand) -> None:
        if command.arg(0).upper() != b"PLAIN":
            await self.send_line(f"{command.tag} NO [CANNOT] only PLAIN")
            return
        response = command.arg(1)
        if len(command.args) < 2:
            await self.send_line(b"+ ")
            response = await self.read_line()
        if response == b"*":
            await self.send_line(f"{command.tag} BAD authentication cancelled")
            return
        try:
            _, user, password = base64.b64decode(response, validate=True).split(b"\0")
            ok = self._login_ok(user.decode("utf-8"), password.decode("utf-8"))
        except ValueError:
            ok = False
        if not ok:
            await self.send_line(f"{command.tag} NO [AUTHENTICATIONFAILED] Authentication failed.")
            return
        self.user = user.decode("utf-8")
        await self.send_line(f"{command.tag} OK [CAPABILITY {self._caps()}] Logged in")

    def _caps(self) -> str:
        return " ".join(c for c in self.server.capabilities if not c.upper().startswith("AUTH="))

    async def _need_login(self, command: ScriptedCommand) -> bool:
        if self.user is None:
            await self.send_line(f"{command.tag} BAD not logged in")
        return self.user is not None

    async def _do_NAMESPACE(self, command: ScriptedCommand) -> None:
        if not await self._need_login(command):
            return
        namespace = self.account.namespace
        if namespace is None:
            delimiter = self.account.delimiter
            sep = b"NIL" if delimiter is None else _quote(delimiter.encode())
            namespace = b'(("" ' + sep + b")) NIL NIL"
        await self.send_line(b"* NAMESPACE " + namespace)
        await self.send_line(f"{command.tag} OK NAMESPACE done")

    async def _do_LIST(self, command: ScriptedCommand, lsub: bool = False) -> None:
        if not await self._need_login(command):
            return
        word = "LSUB" if lsub else "LIST"
        delimiter = (self.account.delimiter or "").encode()
        sep = _quote(delimiter) if delimiter else b"NIL"
        pattern = command.arg(0) + command.arg(1)
        if command.arg(1) == b"":
            await self.send_line(f"* {word} (\\Noselect) ".encode() + sep + b' ""')
        else:
            matcher = _glob(pattern, delimiter)
            for name, folder in self.account.folders.items():
                wire = _encode_name(name)
                if (lsub and not folder.subscribed) or not matcher.match(wire):
                    continue
                flags = " ".join(folder.attributes).encode()
                await self.send_line(
                    b"* " + word.encode() + b" (" + flags + b") " + sep + b" " + _quote(wire)
                )
        await self.send_line(f"{command.tag} OK {word} done")

    async def _do_LSUB(self, command: ScriptedCommand) -> None:
        await self._do_LIST(command, lsub=True)

    async def _no_folder(self, command: ScriptedCommand) -> None:
        await self.send_line(f"{command.tag} NO [NONEXISTENT] Mailbox doesn't exist")

    async def _do_STATUS(self, command: ScriptedCommand) -> None:
        if not await self._need_login(command):
            return
        found = self.account.find(command.arg(0))
        if found is None or not found[1].selectable():
            await self._no_folder(command)
            return
        name, folder = found
        answer = folder.status
        if answer is None:
            items = command.args[1] if len(command.args) > 1 else []
            values = {
                b"MESSAGES": len(folder.messages),
                b"UIDNEXT": folder.next_uid(),
                b"UIDVALIDITY": folder.uidvalidity,
                b"RECENT": 0,
                b"UNSEEN": sum("\\Seen" not in m.flags for m in folder.messages),
            }
            wanted = (
                [i.upper() for i in items if isinstance(i, bytes)]
                if isinstance(items, list)
                else []
            )
            answer = (
                b"(" + b" ".join(b"%s %d" % (i, values[i]) for i in wanted if i in values) + b")"
            )
        await self.send_line(b"* STATUS " + _quote(_encode_name(name)) + b" " + answer)
        await self.send_line(f"{command.tag} OK STATUS done")

    async def _do_SELECT(self, command: ScriptedCommand, readonly: bool = False) -> None:
        if not await self._need_login(command):
            return
        self.selected = None
        found = self.account.find(command.arg(0))
        if found is None or not found[1].selectable():
            await self._no_folder(command)
            return
        name, folder = found
        await self.send_line("* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)")
        await self.send_line(f"* {len(folder.messages)} EXISTS")
        await self.send_line("* 0 RECENT")
        await self.send_line(f"* OK [UIDVALIDITY {folder.uidvalidity}] UIDs valid")
        await self.send_line(f"* OK [UIDNEXT {folder.next_uid()}] Predicted next UID")
        self.selected, self.readonly = name, readonly
        mode = "READ-ONLY" if readonly else "READ-WRITE"
        await self.send_line(f"{command.tag} OK [{mode}] {command.name} done")

    async def _do_EXAMINE(self, command: ScriptedCommand) -> None:
        await self._do_SELECT(command, readonly=True)

    async def _do_UNSELECT(self, command: ScriptedCommand) -> None:
        if self.selected is None:
            await self.send_line(f"{command.tag} BAD no folder selected")
            return
        self.selected = None
        await self.send_line(f"{command.tag} OK {command.name} done")

    _do_CLOSE = _do_UNSELECT

    def _folder(self) -> ScriptedFolder | None:
        if self.selected is None:
            return None
        return self.account.folders.get(self.selected)

    def _numbers(self, folder: ScriptedFolder, spec: bytes, uid: bool) -> list[int]:
        """Indexes (from 0) of the messages a sequence set names."""
        if uid:
            largest = folder.messages[-1].uid if folder.messages else 0
            uids = _sequence_set(spec, largest)
            return [i for i, m in enumerate(folder.messages) if m.uid in uids]
        numbers = _sequence_set(spec, len(folder.messages))
        return [n - 1 for n in sorted(numbers) if 0 < n <= len(folder.messages)]

    async def _do_SEARCH(self, command: ScriptedCommand) -> None:
        folder = self._folder()
        if folder is None:
            await self.send_line(f"{command.tag} BAD no folder selected")
            return
        chosen = set(range(len(folder.messages)))
        keys = [k for k in command.args if isinstance(k, bytes)]
        i, negate = 0, False
        while i < len(keys):
            key = keys[i].upper()
            i += 1
            if key == b"CHARSET":
                i += 1
                continue
            if key == b"NOT":
                negate = True
                continue
            if key == b"ALL":
                match = set(range(len(folder.messages)))
            elif key == b"UID" and i < len(keys):
                match = set(self._numbers(folder, keys[i], True))
                i += 1
            elif key in (b"SEEN", b"UNSEEN", b"DELETED", b"UNDELETED", b"FLAGGED", b"UNFLAGGED"):
                flag = "\\" + key.decode().removeprefix("UN").capitalize()
                has = not key.startswith(b"UN")
                match = {n for n, m in enumerate(folder.messages) if (flag in m.flags) == has}
            elif key[:1].isdigit() or key[:1] == b"*":
                match = set(self._numbers(folder, key, False))
            else:
                await self.send_line(f"{command.tag} BAD search key not scripted: {key.decode()}")
                return
            chosen &= (set(range(len(folder.messages))) - match) if negate else match
            negate = False
        found = sorted(chosen)
        values = [folder.messages[n].uid if command.uid else n + 1 for n in found]
        await self.send_line("* SEARCH" + "".join(f" {v}" for v in values))
        await self.send_line(f"{command.tag} OK SEARCH done")

    async def _do_FETCH(self, command: ScriptedCommand) -> None:
        folder = self._folder()
        if folder is None:
            await self.send_line(f"{command.tag} BAD no folder selected")
            return
        items_arg = command.args[1] if len(command.args) > 1 else b""
        items = items_arg if isinstance(items_arg, list) else [items_arg]
        wanted = [i.upper() for i in items if isinstance(i, bytes)]
        if b"ALL" in wanted or b"FAST" in wanted or b"FULL" in wanted:
            wanted = [b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE"]
        if command.uid and b"UID" not in wanted:
            wanted.insert(0, b"UID")
        for index in self._numbers(folder, command.arg(0), command.uid):
            message = folder.messages[index]
            if not message.in_fetch:
                continue
            peeked = not any(w in (b"BODY[]", b"RFC822") for w in wanted)
            if not (peeked or self.readonly or "\\Seen" in message.flags):
                message.flags = (*message.flags, "\\Seen")
            await self.send(
                b"* %d FETCH (" % (index + 1) + self.fetch_items(message, wanted) + b")\r\n"
            )
        await self.send_line(f"{command.tag} OK FETCH done")

    def fetch_items(self, message: ScriptedMessage, items: Sequence[bytes]) -> bytes:
        """The data items of one FETCH answer (between the parentheses), for handlers that
        answer FETCH themselves. Known items: UID, FLAGS, RFC822.SIZE, INTERNALDATE, BODY[],
        BODY.PEEK[] (answered as BODY[]) and RFC822."""
        parts: list[bytes] = []
        body = message.body
        for item in items:
            if item == b"UID":
                parts.append(b"UID %d" % message.uid)
            elif item == b"FLAGS":
                parts.append(b"FLAGS (" + " ".join(message.flags).encode() + b")")
            elif item == b"RFC822.SIZE":
                parts.append(b"RFC822.SIZE %d" % len(body or b""))
            elif item == b"INTERNALDATE":
                date = message.internaldate.strftime("%d-%b-%Y %H:%M:%S %z")
                parts.append(b'INTERNALDATE "' + date.encode() + b'"')
            elif item in (b"BODY[]", b"BODY.PEEK[]", b"RFC822"):
                key = b"RFC822" if item == b"RFC822" else b"BODY[]"
                value = b"NIL" if body is None else b"{%d}\r\n" % len(body) + body
                parts.append(key + b" " + value)
        return b" ".join(parts)

    async def _do_IDLE(self, command: ScriptedCommand) -> None:
        await self.send_line("+ idling")
        self.idling = True
        try:
            line = await self.read_line(limit=max(self.server.read_timeout, 1800.0))
        finally:
            self.idling = False
        if line.upper() == b"DONE":
            await self.send_line(f"{command.tag} OK IDLE done")
        else:
            await self.send_line(f"{command.tag} BAD expected DONE")


# -- the server ----------------------------------------------------------------------------------


class ScriptedServer:
    """The server made by :func:`open_scripted_server` (or run by a :class:`ScriptedServerThread`).

    Attributes:
        host: The address to connect to (``127.0.0.1``).
        port: The port to connect to.
        account: The :class:`ScriptedAccount`; tests may change it between commands.
        capabilities: What CAPABILITY lists (and the greeting, unless ``greeting_capabilities``
            is off).
        received: Every line and literal the clients sent, as bytes without CRLF, in order of
            arrival (secrets included: it is a test's record).
        commands: Every command read, as :class:`ScriptedCommand`.
        connections: How many connections were accepted so far.
        active: How many are open now.
        read_timeout: How long a session waits for the client's next line before closing.
    """

    def __init__(
        self,
        account: ScriptedAccount,
        *,
        capabilities: Sequence[str],
        greeting_capabilities: bool,
        greeting: Greeting | bytes | None,
        handlers: Mapping[str, Handler],
        read_timeout: float,
    ) -> None:
        self.host = "127.0.0.1"
        self.port = 0
        self.account = account
        self.capabilities = list(capabilities)
        self.greeting_capabilities = greeting_capabilities
        self.greeting = greeting
        self.handlers = {key.upper(): value for key, value in handlers.items()}
        self.read_timeout = read_timeout
        self.received: list[bytes] = []
        self.commands: list[ScriptedCommand] = []
        self.connections = 0
        self.active = 0
        self._sessions: set[ScriptedSession] = set()

    def __repr__(self) -> str:
        return (
            f"<ScriptedServer {self.host}:{self.port} connections={self.connections} "
            f"active={self.active} commands={len(self.commands)}>"
        )

    def pool_kwargs(self, user: str | None = None) -> dict[str, Any]:
        """Keyword arguments for :func:`~trio_imappool.open_pool` (or imapclient): ``host``,
        ``port``, ``username``, ``password`` (of *user*, or the first user) and ``ssl=False``."""
        name = next(iter(self.account.users)) if user is None else user
        return {
            "host": self.host,
            "port": self.port,
            "username": name,
            "password": self.account.users[name],
            "ssl": False,
        }

    def command_names(self) -> list[str]:
        """The names of the commands read so far (``"UID FETCH"`` for the UID forms)."""
        return [("UID " if c.uid else "") + c.name for c in self.commands]

    async def push(self, line: str | bytes) -> int:
        """Send an untagged line (``"* 3 EXISTS"``) to every session inside IDLE.

        Returns:
            How many sessions it was sent to.

        **Cancellation**: may be cancelled between sessions; a line is written whole or not.
        """
        sent = 0
        for session in list(self._sessions):
            if session.idling:
                with contextlib.suppress(_Closed, trio.BrokenResourceError):
                    await session.send_line(line)
                    sent += 1
        await trio.lowlevel.checkpoint()
        return sent

    async def _serve_one(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        self.active += 1
        session = ScriptedSession(self, stream, self.connections)
        self._sessions.add(session)
        try:
            with contextlib.suppress(_Closed):
                await self._greet(session)
                while not session._closed:
                    command = await session.read_command()
                    self.commands.append(command)
                    handler = self.handlers.get(
                        ("UID " if command.uid else "") + command.name
                    ) or self.handlers.get(command.name)
                    if handler is None:
                        await session.default(command)
                    else:
                        await handler(session, command)
        finally:
            self._sessions.discard(session)
            self.active -= 1
            with trio.move_on_after(1, shield=True):
                await stream.aclose()

    async def _greet(self, session: ScriptedSession) -> None:
        greeting = self.greeting
        if greeting is None:
            caps = (
                f"[CAPABILITY {' '.join(self.capabilities)}] " if self.greeting_capabilities else ""
            )
            await session.send_line(f"* OK {caps}scripted server ready")
        elif isinstance(greeting, bytes):
            await session.send(greeting if greeting.endswith(b"\r\n") else greeting + b"\r\n")
        else:
            result = greeting(session)
            if inspect.isawaitable(result):
                await result


@contextlib.asynccontextmanager
async def open_scripted_server(
    account: ScriptedAccount | None = None,
    *,
    folders: Mapping[str | bytes, ScriptedFolder | Sequence[bytes]] | None = None,
    users: Mapping[str, str] | None = None,
    delimiter: str | None = "/",
    capabilities: Sequence[str] = DEFAULT_CAPABILITIES,
    greeting_capabilities: bool = True,
    greeting: Greeting | bytes | None = None,
    handlers: Mapping[str, Handler] | None = None,
    port: int = 0,
    read_timeout: float = 30.0,
) -> AsyncIterator[ScriptedServer]:
    """Run a scripted IMAP server on ``127.0.0.1`` for the duration of an ``async with`` block.

    It runs in the caller's Trio run; the pool's worker threads (or any blocking client in a
    thread) connect to it. For blocking code outside Trio use
    :func:`start_scripted_server_thread`.

    Args:
        account: The account to serve; without it one is made from *folders*, *users* and
            *delimiter*.
        folders: Name -> :class:`ScriptedFolder`, or a list of message bodies (UIDs 1, 2, ...).
            Default: an empty INBOX.
        users: User name -> password. Default: ``{"user": "password"}``.
        delimiter: The hierarchy delimiter (``None``: a flat server).
        capabilities: What the server announces (add ``"LOGINDISABLED"`` to refuse LOGIN,
            leave out ``"AUTH=PLAIN"``, add ``"LIST-STATUS"`` only with a ``LIST`` handler
            that supports it: the default LIST ignores ``RETURN``).
        greeting_capabilities: Put ``[CAPABILITY ...]`` in the greeting.
        greeting: Replace the greeting: raw bytes (CRLF added if missing), or
            ``async def greeting(session)`` that writes what it wants, trickles it, or closes
            the connection with ``await session.close()``.
        handlers: Command name -> ``async def handler(session, command)``. ``"FETCH"`` also
            handles ``UID FETCH``, unless ``"UID FETCH"`` is given too. A handler writes the
            whole answer (the tagged line included) or calls ``await session.default(command)``.
        port: The port to listen on; 0 for a free one.
        read_timeout: A session whose client sends nothing for this long is closed.

    Yields:
        The :class:`ScriptedServer`, listening.

    **Cancellation**: entering is a checkpoint; leaving cancels every session and closes the
    listener, without blocking for more than a second per session.
    """
    if account is None:
        made: dict[str | bytes, ScriptedFolder] = {}
        for name, value in (folders or {"INBOX": ScriptedFolder()}).items():
            made[name] = value if isinstance(value, ScriptedFolder) else ScriptedFolder.of(value)
        account = ScriptedAccount(
            users=dict(users or {"user": "password"}), folders=made, delimiter=delimiter
        )
    server = ScriptedServer(
        account,
        capabilities=capabilities,
        greeting_capabilities=greeting_capabilities,
        greeting=greeting,
        handlers=handlers or {},
        read_timeout=read_timeout,
    )
    async with trio.open_nursery() as nursery:
        serve = functools.partial(trio.serve_tcp, server._serve_one, port, host="127.0.0.1")
        listeners = await nursery.start(serve)
        server.port = listeners[0].socket.getsockname()[1]
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()


class ScriptedServerThread:
    """A :class:`ScriptedServer` running its own ``trio.run`` in a background thread.

    Made by :func:`start_scripted_server_thread`. Its attributes and :meth:`pool_kwargs` are
    those of the server (read them from any thread; lists are appended to by the server's
    thread). Handlers run in the server's thread.
    """

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._server: ScriptedServer | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="scripted-imap-server", daemon=True)

    def __getattr__(self, name: str) -> Any:
        server = self.__dict__.get("_server")
        if server is None or name.startswith("_"):
            raise AttributeError(name)
        return getattr(server, name)

    def __repr__(self) -> str:
        alive = "running" if self._thread.is_alive() else "stopped"
        return f"<ScriptedServerThread {alive} {self._server!r}>"

    @property
    def server(self) -> ScriptedServer:
        """The server (in the other thread)."""
        assert self._server is not None
        return self._server

    def push(self, line: str | bytes) -> int:
        """:meth:`ScriptedServer.push`, from a thread that is not the server's."""
        assert self._token is not None
        return int(trio.from_thread.run(self.server.push, line, trio_token=self._token))

    def start(self, timeout: float = 5.0) -> None:
        """Start the thread; return when the server listens.

        Raises:
            OSError: The server could not listen.
            TimeoutError: It did not start within *timeout* seconds.
        """
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the scripted server did not start within {timeout} s")
        if self._error is not None:
            raise self._error

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the server and join the thread. Idempotent.

        Raises:
            TimeoutError: The thread did not end within *timeout* seconds.
        """
        token, stop = self._token, self._stop
        if token is not None and stop is not None and self._thread.is_alive():
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(stop.set)
        if self._thread.ident is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"the scripted server thread did not end within {timeout} s")

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._stop = trio.Event()
        self._token = trio.lowlevel.current_trio_token()
        async with open_scripted_server(**self._options) as server:
            self._server = server
            self._ready.set()
            await self._stop.wait()


@contextlib.contextmanager
def start_scripted_server_thread(
    account: ScriptedAccount | None = None, *, timeout: float = 5.0, **options: Any
) -> Iterator[ScriptedServerThread]:
    """Run a scripted server in a background thread for the duration of a ``with`` block.

    Takes the arguments of :func:`open_scripted_server`; for blocking code and programs in
    subprocesses::

        with start_scripted_server_thread(folders={"INBOX": [b"x\\r\\n"]}) as server:
            client = imapclient.IMAPClient(server.host, server.port, ssl=False)

    Raises:
        OSError: The server could not listen.
        TimeoutError: The thread did not start, or end, within *timeout* seconds.
    """
    thread = ScriptedServerThread(account=account, **options)
    thread.start(timeout)
    try:
        yield thread
    finally:
        thread.stop(timeout)
