"""The async proxy a task holds while it has a connection checked out."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar, TypeVarTuple

import trio
from imapclient import IMAPClient

from ._client import PooledClient
from ._errors import ReleasedConnectionError

if TYPE_CHECKING:
    from ._commands import IMAPCommands

__all__ = ["COMMANDS", "Connection"]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


def _call_method(client: IMAPClient, name: str, args: tuple[Any, ...], kwargs: Any) -> Any:
    return getattr(client, name)(*args, **kwargs)


def _make_command(name: str) -> Any:  # typed by the declarations in Connection
    method = getattr(IMAPClient, name)

    async def command(self: Connection, *args: Any, **kwargs: Any) -> Any:
        return await self._command(name, args, kwargs)

    command.__name__ = name
    command.__qualname__ = f"Connection.{name}"
    command.__doc__ = (
        f"Awaitable :meth:`imapclient.IMAPClient.{name}`; same arguments and result, run in a "
        "worker thread.\n\n**Cancellation**: a checkpoint; a cancellation while the command "
        "runs interrupts it at once and the connection is discarded when released.\n\n"
        + inspect.cleandoc(method.__doc__ or "")
    )
    command.__signature__ = inspect.signature(method)  # type: ignore[attr-defined]
    command._imap_command = True  # type: ignore[attr-defined]
    return command


class Connection:
    """A checked-out connection: every IMAP command of imapclient, awaitable.

    You get one from :meth:`Pool.connection() <trio_imappool.Pool.connection>` and it is yours
    until the ``async with`` block ends; after that every method raises
    :class:`~trio_imappool.ReleasedConnectionError`. Each command runs the matching
    :class:`imapclient.IMAPClient` method, with the same name, arguments and result, in one
    worker thread hop::

        async with pool.connection() as conn:
            info = await conn.select_folder("INBOX", readonly=True)
            uids = await conn.search(["SINCE", date(2026, 1, 1)])
            for uid, data in (await conn.fetch(uids, ["ENVELOPE"])).items():
                print(uid, data[b"ENVELOPE"].subject)

    Several steps in one hop, with the blocking client itself::

        def newest_subject(client: IMAPClient) -> bytes:
            client.select_folder("INBOX", readonly=True)
            uid = max(client.search(["ALL"]))
            return client.fetch([uid], ["ENVELOPE"])[uid][b"ENVELOPE"].subject

        subject = await conn.run_sync(newest_subject)

    One connection runs one command at a time: a second task using it while a command is
    running gets :class:`trio.BusyResourceError` (check out a second connection instead).

    **Errors** are imapclient's own, unwrapped. A tagged NO or BAD leaves the connection usable;
    an error that leaves it in doubt (EOF, timeout, protocol error, TLS error, an exception of
    your own function in :meth:`run_sync`) marks it broken: it is discarded when the block ends
    and the pool opens a replacement when one is needed. Commands are never retried.

    **Cancellation**: every command is a checkpoint. If a cancel scope fires while a command
    runs, the command is interrupted at once (its socket is shut down), the connection is
    marked broken, and ``Cancelled`` propagates within milliseconds.

    **State**: :attr:`selected_folder` and :attr:`readonly` say what the previous user left
    selected (see :class:`~trio_imappool.Pool` for what you may assume).
    """

    __slots__ = ("_command_ended", "_name", "_slot", "_threads")

    def __init__(
        self,
        slot: PooledClient,
        name: str,
        thread_limiter: trio.CapacityLimiter,
        command_ended: Callable[[PooledClient], None],
    ) -> None:
        """Made by the pool's checkout: *slot* is the connection, *name* the pool's name,
        *thread_limiter* the pool's limiter for worker threads, and *command_ended* is called
        after every command (the pool takes the connection back then if its checkout ended
        while the command ran)."""
        self._slot: PooledClient | None = slot
        self._name = name
        self._threads = thread_limiter
        self._command_ended = command_ended

    def __repr__(self) -> str:
        slot = self._slot
        if slot is None:
            return "<Connection (released)>"
        return f"<Connection #{slot.number} of {self._name} {slot!r}>"

    def _live(self) -> PooledClient:
        slot = self._slot
        if slot is None:
            raise ReleasedConnectionError(
                "this connection was used after its 'async with pool.connection()' block ended"
            )
        return slot

    @property
    def number(self) -> int:
        """The connection's serial number in its pool (1 for the first one opened)."""
        return self._live().number

    @property
    def selected_folder(self) -> str | None:
        """The folder selected on this connection, or None."""
        client = self._live().client
        assert client is not None
        return client.selected[0] if client.selected else None

    @property
    def readonly(self) -> bool | None:
        """Whether the selected folder was selected read-only (None if none is selected)."""
        client = self._live().client
        assert client is not None
        return client.selected[1] if client.selected else None

    @property
    def broken(self) -> str | None:
        """Why this connection will be discarded when released, or None if it is healthy."""
        return self._live().broken

    async def run_sync(self, fn: Callable[[IMAPClient, *Ts], T], *args: *Ts) -> T:
        """Run ``fn(client, *args)`` in a worker thread with the blocking imapclient client.

        The client must not be kept or used after *fn* returns. If *fn* raises, the
        connection is discarded unless the error is one that imapclient raises for a failed
        command (NO/BAD); see the class documentation.

        Raises:
            ReleasedConnectionError: The ``async with`` block has ended.
            trio.BusyResourceError: Another task is running a command on this connection.

        **Cancellation**: as for any command: interrupts *fn*'s socket I/O at once and
        discards the connection.
        """
        slot = self._live()
        if slot.busy:
            raise trio.BusyResourceError(
                "another task is running a command on this connection; "
                "check out one connection per concurrent task"
            )
        slot.busy = True
        try:
            return await slot.run(self._threads, fn, slot.client, *args)
        finally:
            # Not busy any more; back to the pool if the checkout ended meanwhile (the
            # block's task shared the connection with this one).
            self._command_ended(slot)

    async def _command(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return await self.run_sync(_call_method, name, args, kwargs)

    if TYPE_CHECKING:
        # The commands' types, for type checkers only (imapclient has none): declared in
        # _commands.py; the assignments below make the commands at run time.
        add_flags = IMAPCommands.add_flags
        add_gmail_labels = IMAPCommands.add_gmail_labels
        append = IMAPCommands.append
        capabilities = IMAPCommands.capabilities
        close_folder = IMAPCommands.close_folder
        copy = IMAPCommands.copy
        create_folder = IMAPCommands.create_folder
        delete_folder = IMAPCommands.delete_folder
        delete_messages = IMAPCommands.delete_messages
        enable = IMAPCommands.enable
        expunge = IMAPCommands.expunge
        fetch = IMAPCommands.fetch
        find_special_folder = IMAPCommands.find_special_folder
        folder_exists = IMAPCommands.folder_exists
        folder_status = IMAPCommands.folder_status
        get_flags = IMAPCommands.get_flags
        get_gmail_labels = IMAPCommands.get_gmail_labels
        get_quota = IMAPCommands.get_quota
        get_quota_root = IMAPCommands.get_quota_root
        getacl = IMAPCommands.getacl
        gmail_search = IMAPCommands.gmail_search
        has_capability = IMAPCommands.has_capability
        id_ = IMAPCommands.id_
        idle = IMAPCommands.idle
        idle_check = IMAPCommands.idle_check
        idle_done = IMAPCommands.idle_done
        list_folders = IMAPCommands.list_folders
        list_sub_folders = IMAPCommands.list_sub_folders
        login = IMAPCommands.login
        logout = IMAPCommands.logout
        move = IMAPCommands.move
        multiappend = IMAPCommands.multiappend
        namespace = IMAPCommands.namespace
        noop = IMAPCommands.noop
        oauth2_login = IMAPCommands.oauth2_login
        oauthbearer_login = IMAPCommands.oauthbearer_login
        plain_login = IMAPCommands.plain_login
        remove_flags = IMAPCommands.remove_flags
        remove_gmail_labels = IMAPCommands.remove_gmail_labels
        rename_folder = IMAPCommands.rename_folder
        sasl_login = IMAPCommands.sasl_login
        search = IMAPCommands.search
        select_folder = IMAPCommands.select_folder
        set_flags = IMAPCommands.set_flags
        set_gmail_labels = IMAPCommands.set_gmail_labels
        set_quota = IMAPCommands.set_quota
        setacl = IMAPCommands.setacl
        shutdown = IMAPCommands.shutdown
        sort = IMAPCommands.sort
        starttls = IMAPCommands.starttls
        subscribe_folder = IMAPCommands.subscribe_folder
        thread = IMAPCommands.thread
        uid_expunge = IMAPCommands.uid_expunge
        unselect_folder = IMAPCommands.unselect_folder
        unsubscribe_folder = IMAPCommands.unsubscribe_folder
        xlist_folders = IMAPCommands.xlist_folders

    # -- the commands, in imapclient's order of names --

    add_flags = _make_command("add_flags")
    add_gmail_labels = _make_command("add_gmail_labels")
    append = _make_command("append")
    capabilities = _make_command("capabilities")
    close_folder = _make_command("close_folder")
    copy = _make_command("copy")
    create_folder = _make_command("create_folder")
    delete_folder = _make_command("delete_folder")
    delete_messages = _make_command("delete_messages")
    enable = _make_command("enable")
    expunge = _make_command("expunge")
    fetch = _make_command("fetch")
    find_special_folder = _make_command("find_special_folder")
    folder_exists = _make_command("folder_exists")
    folder_status = _make_command("folder_status")
    get_flags = _make_command("get_flags")
    get_gmail_labels = _make_command("get_gmail_labels")
    get_quota = _make_command("get_quota")
    get_quota_root = _make_command("get_quota_root")
    getacl = _make_command("getacl")
    gmail_search = _make_command("gmail_search")
    has_capability = _make_command("has_capability")
    id_ = _make_command("id_")
    idle = _make_command("idle")
    idle_check = _make_command("idle_check")
    idle_done = _make_command("idle_done")
    list_folders = _make_command("list_folders")
    list_sub_folders = _make_command("list_sub_folders")
    login = _make_command("login")
    logout = _make_command("logout")
    move = _make_command("move")
    multiappend = _make_command("multiappend")
    namespace = _make_command("namespace")
    noop = _make_command("noop")
    oauth2_login = _make_command("oauth2_login")
    oauthbearer_login = _make_command("oauthbearer_login")
    plain_login = _make_command("plain_login")
    remove_flags = _make_command("remove_flags")
    remove_gmail_labels = _make_command("remove_gmail_labels")
    rename_folder = _make_command("rename_folder")
    sasl_login = _make_command("sasl_login")
    search = _make_command("search")
    select_folder = _make_command("select_folder")
    set_flags = _make_command("set_flags")
    set_gmail_labels = _make_command("set_gmail_labels")
    set_quota = _make_command("set_quota")
    setacl = _make_command("setacl")
    shutdown = _make_command("shutdown")
    sort = _make_command("sort")
    starttls = _make_command("starttls")
    subscribe_folder = _make_command("subscribe_folder")
    thread = _make_command("thread")
    uid_expunge = _make_command("uid_expunge")
    unselect_folder = _make_command("unselect_folder")
    unsubscribe_folder = _make_command("unsubscribe_folder")
    xlist_folders = _make_command("xlist_folders")


#: The imapclient methods offered as awaitables on :class:`Connection`: every public method of
#: :class:`imapclient.IMAPClient` except ``socket()`` (the raw socket would let a task block the
#: event loop on it).
COMMANDS: Final = tuple(
    name for name, value in vars(Connection).items() if getattr(value, "_imap_command", False)
)
