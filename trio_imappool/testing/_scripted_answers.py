"""What the scripted server answers to each command when no handler is given for it.

:class:`_DefaultAnswers` holds one ``_do_<COMMAND>`` method per command the server knows;
:class:`~._scripted.ScriptedSession` inherits them and :meth:`~._scripted.ScriptedSession.default`
picks one by name. They read the account and the session's state (user, selected folder) and
write through the session's primitives, declared here for the type checker only.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from ._scripted_account import (
    ScriptedAccount,
    ScriptedFolder,
    ScriptedMessage,
    _encode_name,
    _status_answer,
)
from ._scripted_command import Argument, ScriptedCommand, _glob, _quote, _sequence_set

__all__: list[str] = []


class _ServerView(Protocol):
    """What the default answers read from the server."""

    capabilities: list[str]
    read_timeout: float


class _DefaultAnswers:
    """The default answers, one ``_do_<COMMAND>`` per command (a base of ``ScriptedSession``)."""

    server: _ServerView
    account: ScriptedAccount
    user: str | None
    selected: str | bytes | None
    readonly: bool
    idling: bool

    if TYPE_CHECKING:  # the session's primitives (defined by ScriptedSession)

        async def send(self, data: bytes) -> None: ...

        async def send_line(self, line: str | bytes) -> None: ...

        async def read_line(self, limit: float | None = None) -> bytes: ...

        async def close(self) -> None: ...

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
        # LIST-STATUS (RFC 5819): LIST "" "*" RETURN (STATUS (MESSAGES ...)).
        status_items: list[Argument] | None = None
        options = command.args[3] if len(command.args) > 3 else None
        if command.arg(2).upper() == b"RETURN" and isinstance(options, list) and not lsub:
            for i, option in enumerate(options[:-1]):
                following = options[i + 1]
                if option == b"STATUS" and isinstance(following, list):
                    status_items = following
        if command.arg(1) == b"":
            await self.send_line(f"* {word} (\\Noselect) ".encode() + sep + b' ""')
        else:
            matcher = _glob(pattern, delimiter)
            for name, folder in self.account.folders.items():
                wire = _encode_name(name)
                if (lsub and not folder.subscribed) or not matcher.match(wire):
                    continue
                own = sep if folder.delimiter is None else _quote(folder.delimiter.encode())
                flags = " ".join(folder.attributes).encode()
                await self.send_line(b"* %s (%s) %s %s" % (word.encode(), flags, own, _quote(wire)))
                if status_items is not None and folder.selectable():
                    answer = _status_answer(folder, status_items)
                    await self.send_line(b"* STATUS " + _quote(wire) + b" " + answer)
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
        items = command.args[1] if len(command.args) > 1 else []
        answer = _status_answer(folder, items if isinstance(items, list) else [])
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
