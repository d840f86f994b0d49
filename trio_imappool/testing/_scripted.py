"""A scripted IMAP server: an in-memory account and a handler per command, on loopback.

Dovecot is the server to test against; this one is for what Dovecot will not do. Folders with
hostile names, a FETCH that leaves out a UID or answers ``BODY[] NIL``, a login refused with any
wording, unsolicited FETCH lines between responses, a line over imaplib's limit, a server that
ends IDLE by itself: each is a few lines of a handler, or a field of the account.

The server speaks enough IMAP4rev1 for imapclient and the pool (CAPABILITY, LOGIN, AUTHENTICATE
PLAIN, LIST with LIST-STATUS, LSUB, STATUS, SELECT, EXAMINE, SEARCH, FETCH and their UID forms,
NOOP, IDLE, UNSELECT, CLOSE, NAMESPACE, ID, ENABLE, LOGOUT; literals from the client,
synchronizing or ``LITERAL+``). It is not a conforming server: it never changes its account
except for ``\\Seen`` on a ``BODY[]`` fetch from a folder selected read-write, and it
understands only simple search keys. It listens on ``127.0.0.1`` only, on a free port unless
told otherwise, and every read from a client has a deadline (``read_timeout``).

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

import contextlib
import functools
import inspect
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeAlias

import trio

from ._scripted_account import ScriptedAccount, ScriptedFolder
from ._scripted_answers import _DefaultAnswers
from ._scripted_command import ScriptedCommand, _Literal, _tokenize

__all__ = [
    "DEFAULT_CAPABILITIES",
    "ScriptedServer",
    "ScriptedSession",
    "open_scripted_server",
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

#: ``handler(session, command)``: answers one command (see :class:`ScriptedSession`).
Handler: TypeAlias = Callable[["ScriptedSession", "ScriptedCommand"], Awaitable[None]]
#: ``greeting(session)``: replaces the server's greeting (it may also close the connection).
Greeting: TypeAlias = Callable[["ScriptedSession"], Awaitable[None]]

_MAX_LINE = 1 << 20  # a client line longer than this closes the connection
_MAX_LITERAL = 64 << 20
_LITERAL_RE = re.compile(rb"\{(\d+)(\+?)\}$")


class _Closed(Exception):
    """The session is over (the client left, a read timed out, or a handler closed it)."""


# -- the session ---------------------------------------------------------------------------------


class ScriptedSession(_DefaultAnswers):
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
        self.server: ScriptedServer = server
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
            leave out ``"AUTH=PLAIN"``, add ``"LIST-STATUS"`` for clients that use
            ``LIST ... RETURN (STATUS ...)``: the default LIST answers it either way).
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
