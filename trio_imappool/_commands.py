"""The IMAP commands of a :class:`~trio_imappool.Connection`, with their types.

At run time a connection's commands are made from :class:`imapclient.IMAPClient`'s methods (same
names, arguments and results, each run in a worker thread). imapclient has no type information,
so this module declares what they take and return, for type checkers and readers; the
declarations follow imapclient 3.0 to 4.x. ``Connection`` takes its commands' types from here
(in a block that only type checkers read), and a test keeps the two lists of names and the
parameter names equal to imapclient's.

Results are imapclient's: message ids are ints (UIDs, as the pool never turns ``use_uid`` off
for good), flags and response texts are bytes, folder names are str.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeAlias, overload

if TYPE_CHECKING:
    import ssl

__all__ = ["FetchData", "FolderInfo", "IMAPCommands", "Messages", "Untagged"]

#: Messages to act on: one UID, several, or an IMAP sequence set such as ``"1:10"``.
Messages: TypeAlias = int | str | Iterable[int]
#: One flag or several: ``b"\\Seen"``, ``[b"\\Seen", b"\\Flagged"]`` (str works too).
Flags: TypeAlias = bytes | str | Iterable[bytes | str]
#: Fetch data items: ``"ENVELOPE"``, ``["FLAGS", "BODY.PEEK[]"]``.
FetchItems: TypeAlias = bytes | str | Iterable[bytes | str]
#: Search criteria: ``"ALL"``, ``["UNSEEN"]``, ``["SINCE", date(2026, 1, 1)]``.
Criteria: TypeAlias = bytes | str | Sequence[Any]
#: One message's fetched items, keyed by the item name as bytes (``b"ENVELOPE"``,
#: ``b"BODY[]"``, ``b"FLAGS"``, ...); the values are imapclient's parsed types.
FetchData: TypeAlias = dict[bytes, Any]
#: A LIST result line: (flags, hierarchy delimiter or None, folder name).
FolderInfo: TypeAlias = tuple[tuple[bytes, ...], bytes | None, str]
#: Untagged responses the server sent with a command (parsed by imapclient).
Untagged: TypeAlias = list[Any]


class IMAPCommands(Protocol):
    """The awaitable IMAP commands of :class:`~trio_imappool.Connection`, typed.

    Every method runs the :class:`imapclient.IMAPClient` method of the same name in a worker
    thread and returns its result. **Cancellation**: every command is a checkpoint; a
    cancellation while it runs interrupts it at once and the connection is discarded when
    released.
    """

    # -- folders --

    async def select_folder(self, folder: str, readonly: bool = False) -> dict[bytes, Any]:
        """SELECT (or EXAMINE): the folder's counts and flags (``b"EXISTS"``,
        ``b"UIDVALIDITY"``, ``b"UIDNEXT"``, ``b"FLAGS"``, ...)."""
        ...

    async def unselect_folder(self) -> bytes:
        """UNSELECT (RFC 3691): leave the folder without expunging."""
        ...

    async def close_folder(self) -> bytes:
        """CLOSE: leave the folder, expunging messages flagged ``\\Deleted``."""
        ...

    async def list_folders(self, directory: str = "", pattern: str = "*") -> list[FolderInfo]:
        """LIST: ``(flags, delimiter, name)`` for each matching folder."""
        ...

    async def list_sub_folders(self, directory: str = "", pattern: str = "*") -> list[FolderInfo]:
        """LSUB: the subscribed folders."""
        ...

    async def xlist_folders(self, directory: str = "", pattern: str = "*") -> list[FolderInfo]:
        """XLIST (Gmail's older LIST with special-use flags)."""
        ...

    async def find_special_folder(self, folder_flag: bytes | str) -> str | None:
        """The folder carrying a special-use flag (``imapclient.SENT``, ...), or None."""
        ...

    async def folder_exists(self, folder: str) -> bool:
        """Whether the folder exists."""
        ...

    async def folder_status(
        self, folder: str, what: Iterable[bytes | str] | None = None
    ) -> dict[bytes, int]:
        """STATUS: ``{b"MESSAGES": 10, b"UIDNEXT": 11, ...}`` without selecting the folder."""
        ...

    async def create_folder(self, folder: str) -> bytes:
        """CREATE."""
        ...

    async def delete_folder(self, folder: str) -> bytes:
        """DELETE."""
        ...

    async def rename_folder(self, old_name: str, new_name: str) -> bytes:
        """RENAME."""
        ...

    async def subscribe_folder(self, folder: str) -> list[bytes]:
        """SUBSCRIBE."""
        ...

    async def unsubscribe_folder(self, folder: str) -> list[bytes]:
        """UNSUBSCRIBE."""
        ...

    async def namespace(self) -> Any:
        """NAMESPACE: imapclient's ``Namespace`` tuple (``personal``, ``other``, ``shared``)."""
        ...

    # -- messages --

    async def search(self, criteria: Criteria = "ALL", charset: str | None = None) -> list[int]:
        """SEARCH: the UIDs of the matching messages."""
        ...

    async def gmail_search(self, query: str, charset: str = "UTF-8") -> list[int]:
        """Gmail's X-GM-RAW search."""
        ...

    async def sort(
        self,
        sort_criteria: bytes | str | Iterable[bytes | str],
        criteria: Criteria = "ALL",
        charset: str = "UTF-8",
    ) -> list[int]:
        """SORT (RFC 5256): UIDs in the order asked for."""
        ...

    async def thread(
        self, algorithm: str = "REFERENCES", criteria: Criteria = "ALL", charset: str = "UTF-8"
    ) -> tuple[Any, ...]:
        """THREAD (RFC 5256): nested tuples of UIDs."""
        ...

    async def fetch(
        self,
        messages: Messages,
        data: FetchItems,
        modifiers: Iterable[bytes | str] | None = None,
    ) -> dict[int, FetchData]:
        """FETCH: ``{uid: {b"ENVELOPE": ..., b"BODY[]": b"...", b"SEQ": 1}}``."""
        ...

    async def append(
        self,
        folder: str,
        msg: bytes | str,
        flags: Flags = (),
        msg_time: datetime | None = None,
    ) -> bytes:
        """APPEND one message; the server's response text (``[APPENDUID ...]`` with UIDPLUS)."""
        ...

    async def multiappend(self, folder: str, msgs: Iterable[Any]) -> bytes:
        """MULTIAPPEND (RFC 3502): several messages in one command."""
        ...

    async def copy(self, messages: Messages, folder: str) -> bytes:
        """COPY; the response text (``[COPYUID ...]`` with UIDPLUS)."""
        ...

    async def move(self, messages: Messages, folder: str) -> bytes:
        """MOVE (RFC 6851)."""
        ...

    @overload
    async def expunge(self, messages: None = None) -> tuple[bytes, Untagged]: ...
    @overload
    async def expunge(self, messages: Messages) -> list[bytes] | tuple[bytes, Untagged]: ...
    async def expunge(self, messages: Messages | None = None) -> Any:
        """EXPUNGE: without messages, every ``\\Deleted`` one, returning the response text and
        the ``EXPUNGE`` responses; with messages (non-empty), UID EXPUNGE of those."""
        ...

    async def uid_expunge(self, messages: Messages) -> list[bytes]:
        """UID EXPUNGE (UIDPLUS) of these messages only."""
        ...

    async def get_flags(self, messages: Messages) -> dict[int, tuple[bytes, ...]]:
        """The flags of each message."""
        ...

    @overload
    async def add_flags(
        self, messages: Messages, flags: Flags, silent: Literal[False] = False
    ) -> dict[int, tuple[bytes, ...]]: ...
    @overload
    async def add_flags(self, messages: Messages, flags: Flags, silent: Literal[True]) -> None: ...
    @overload
    async def add_flags(
        self, messages: Messages, flags: Flags, silent: bool = False
    ) -> dict[int, tuple[bytes, ...]] | None: ...
    async def add_flags(self, messages: Messages, flags: Flags, silent: bool = False) -> Any:
        """STORE +FLAGS: each message's flags afterwards (None when ``silent``)."""
        ...

    @overload
    async def remove_flags(
        self, messages: Messages, flags: Flags, silent: Literal[False] = False
    ) -> dict[int, tuple[bytes, ...]]: ...
    @overload
    async def remove_flags(
        self, messages: Messages, flags: Flags, silent: Literal[True]
    ) -> None: ...
    @overload
    async def remove_flags(
        self, messages: Messages, flags: Flags, silent: bool = False
    ) -> dict[int, tuple[bytes, ...]] | None: ...
    async def remove_flags(self, messages: Messages, flags: Flags, silent: bool = False) -> Any:
        """STORE -FLAGS: each message's flags afterwards (None when ``silent``)."""
        ...

    @overload
    async def set_flags(
        self, messages: Messages, flags: Flags, silent: Literal[False] = False
    ) -> dict[int, tuple[bytes, ...]]: ...
    @overload
    async def set_flags(self, messages: Messages, flags: Flags, silent: Literal[True]) -> None: ...
    @overload
    async def set_flags(
        self, messages: Messages, flags: Flags, silent: bool = False
    ) -> dict[int, tuple[bytes, ...]] | None: ...
    async def set_flags(self, messages: Messages, flags: Flags, silent: bool = False) -> Any:
        """STORE FLAGS: replace the flags; each message's flags afterwards (None when
        ``silent``)."""
        ...

    async def delete_messages(
        self, messages: Messages, silent: bool = False
    ) -> dict[int, tuple[bytes, ...]] | None:
        """Flag the messages ``\\Deleted`` (EXPUNGE removes them)."""
        ...

    async def get_gmail_labels(self, messages: Messages) -> dict[int, tuple[str, ...]]:
        """Gmail's labels of each message."""
        ...

    async def add_gmail_labels(
        self, messages: Messages, labels: Flags, silent: bool = False
    ) -> dict[int, tuple[str, ...]] | None:
        """Add Gmail labels."""
        ...

    async def remove_gmail_labels(
        self, messages: Messages, labels: Flags, silent: bool = False
    ) -> dict[int, tuple[str, ...]] | None:
        """Remove Gmail labels."""
        ...

    async def set_gmail_labels(
        self, messages: Messages, labels: Flags, silent: bool = False
    ) -> dict[int, tuple[str, ...]] | None:
        """Replace Gmail labels."""
        ...

    # -- the session --

    async def noop(self) -> tuple[bytes, Untagged]:
        """NOOP: the response text and what the server had to say meanwhile."""
        ...

    async def capabilities(self) -> tuple[bytes, ...]:
        """The server's capabilities (``(b"IMAP4REV1", b"IDLE", ...)``)."""
        ...

    async def has_capability(self, capability: str) -> bool:
        """Whether the server has a capability."""
        ...

    async def enable(self, *capabilities: str) -> list[bytes]:
        """ENABLE (RFC 5161): the capabilities the server enabled."""
        ...

    async def id_(self, parameters: Mapping[str, str] | None = None) -> Any:
        """ID (RFC 2971): the server's identification."""
        ...

    async def idle(self) -> None:
        """Start IDLE (prefer :meth:`Pool.idle <trio_imappool.Pool.idle>`)."""
        ...

    async def idle_check(self, timeout: float | None = None) -> Untagged:  # noqa: ASYNC109
        """Wait for IDLE responses (prefer :meth:`Pool.idle <trio_imappool.Pool.idle>`)."""
        ...

    async def idle_done(self) -> tuple[bytes, Untagged]:
        """End IDLE with DONE."""
        ...

    async def get_quota(self, mailbox: str = "INBOX") -> list[Any]:
        """GETQUOTAROOT and GETQUOTA: the quotas of a mailbox."""
        ...

    async def get_quota_root(self, mailbox: str) -> tuple[Any, list[Any]]:
        """GETQUOTAROOT."""
        ...

    async def set_quota(self, quotas: Iterable[Any]) -> list[Any]:
        """SETQUOTA."""
        ...

    async def getacl(self, folder: str) -> list[tuple[bytes, bytes]]:
        """GETACL: ``(who, rights)`` pairs."""
        ...

    async def setacl(self, folder: str, who: str, what: str) -> bytes:
        """SETACL."""
        ...

    async def login(self, username: str, password: str) -> bytes:
        """LOGIN (the pool logs its connections in; rarely needed)."""
        ...

    async def plain_login(
        self, identity: str, password: str, authorization_identity: str | None = None
    ) -> bytes:
        """AUTHENTICATE PLAIN."""
        ...

    async def oauth2_login(
        self, user: str, access_token: str, mech: str = "XOAUTH2", vendor: str | None = None
    ) -> bytes:
        """AUTHENTICATE XOAUTH2."""
        ...

    async def oauthbearer_login(self, identity: str, access_token: str) -> bytes:
        """AUTHENTICATE OAUTHBEARER."""
        ...

    async def sasl_login(self, mech_name: str, mech_callable: Callable[[bytes], Any]) -> bytes:
        """AUTHENTICATE with any SASL mechanism."""
        ...

    async def starttls(self, ssl_context: ssl.SSLContext | None = None) -> bytes:
        """STARTTLS (the pool does it when ``starttls=True``)."""
        ...

    async def logout(self) -> bytes:
        """LOGOUT: the connection is unusable afterwards."""
        ...

    async def shutdown(self) -> None:
        """Close the socket without LOGOUT: the connection is unusable afterwards."""
        ...
