"""The scripted server's account: users, folders, messages, and how folder names go on the wire.

Plain data a test builds and changes between commands; :mod:`._scripted` serves it.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Sequence
from typing import Any

from ._scripted_command import Argument

__all__ = ["ScriptedAccount", "ScriptedFolder", "ScriptedMessage"]

_DATE = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)


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
        delimiter: The delimiter LIST shows for this folder (servers with several namespaces
            show different ones); ``None``: the account's.
    """

    messages: list[ScriptedMessage] = dataclasses.field(default_factory=list)
    uidvalidity: int = 1
    uidnext: int | None = None
    attributes: tuple[str, ...] = ("\\HasNoChildren",)
    subscribed: bool = True
    status: bytes | None = None
    delimiter: str | None = None

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
        """The folder a client named (by its bytes on the wire), or None. An exact match
        first; then INBOX in any case."""
        encoded = {name: _encode_name(name) for name in self.folders}
        for name, wire in encoded.items():
            if wire == wire_name:
                return name, self.folders[name]
        if wire_name.upper() == b"INBOX":
            for name, wire in encoded.items():
                if wire.upper() == b"INBOX":
                    return name, self.folders[name]
        return None


def _status_answer(folder: ScriptedFolder, items: Sequence[Argument]) -> bytes:
    """The parenthesized part of a STATUS answer: the folder's ``status`` if scripted, else
    the items asked for that the server knows."""
    if folder.status is not None:
        return folder.status
    values = {
        b"MESSAGES": len(folder.messages),
        b"UIDNEXT": folder.next_uid(),
        b"UIDVALIDITY": folder.uidvalidity,
        b"RECENT": 0,
        b"UNSEEN": sum("\\Seen" not in m.flags for m in folder.messages),
    }
    wanted = [i.upper() for i in items if isinstance(i, bytes)]
    return b"(" + b" ".join(b"%s %d" % (i, values[i]) for i in wanted if i in values) + b")"
