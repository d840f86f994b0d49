"""trio-imappool: a Trio-native pool of IMAP connections, on imapclient.

::

    import trio
    import trio_imappool

    async def main():
        async with trio_imappool.open_pool(
            "imap.example.org", username="u", password="p", max_size=8
        ) as pool:
            async with pool.connection() as conn:  # waits for a free connection
                await conn.select_folder("INBOX")
                uids = await conn.search(["UNSEEN"])
                msgs = await conn.fetch(uids, ["ENVELOPE"])
            n = await pool.run_sync(lambda client: len(client.list_folders()))
            print(pool.statistics())

    trio.run(main)
"""

import importlib as _importlib
import os as _os
import typing as _typing

if _os.name != "posix":  # pragma: no cover - tested only where it holds
    raise ImportError(
        "trio-imappool runs on POSIX systems only (Linux, macOS, the BSDs): it uses fcntl, "
        "termios and poll(), which Windows lacks; on Windows, run it under WSL"
    )

from ._budget import BudgetStatistics, RedisBudget
from ._commands import IMAPCommands
from ._config import (
    AccountOptions,
    AuthMechanism,
    ConfigOptions,
    GroupOptions,
    PoolConfig,
    PoolOptions,
    TokenProvider,
)
from ._connection import COMMANDS, Connection
from ._errors import (
    AuthenticationError,
    BudgetUnavailableError,
    ConfigurationError,
    ConnectError,
    ConnectionLimitError,
    PoolClosedError,
    PoolError,
    PoolTimeout,
    ReleasedConnectionError,
    TLSError,
)
from ._fanout import (
    FanOutError,
    FetchResults,
    Progress,
    add_flags_many,
    copy_many,
    fetch_many,
    move_many,
    remove_flags_many,
    search_many,
)
from ._idle import IdleEvent, IdleEvents, IdleStatistics
from ._pool import Pool, open_pool
from ._stats import AsyncCounts, PoolCounts, PoolStatistics
from ._version import __version__ as __version__

if _typing.TYPE_CHECKING:
    from ._group import CredentialsProvider, GroupStatistics, PoolGroup, open_pool_group

# Loaded on first use, so that a program that only pools connections (and the command line's
# start-up) never imports them: the pool group, and the exporter. The exporter is an application
# built on the names above, so this module does not import it, not even for type checkers (that
# would be an import cycle): its names are typed where they live, in trio_imappool.exporter;
# here they stay for programs written before it moved.
_LAZY: dict[str, str] = {
    "CredentialsProvider": "_group",
    "GroupStatistics": "_group",
    "PoolGroup": "_group",
    "open_pool_group": "_group",
    "ExportError": "exporter",
    "ExportProgress": "exporter",
    "ExportResult": "exporter",
    "FolderFailure": "exporter",
    "FolderNotFoundError": "exporter",
    "FolderReport": "exporter",
    "export_maildir": "exporter",
    "local_folder_name": "exporter",
}


def __getattr__(name: str) -> _typing.Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "COMMANDS",
    "AuthenticationError",
    "BudgetStatistics",
    "BudgetUnavailableError",
    "ConfigurationError",
    "ConnectError",
    "Connection",
    "ConnectionLimitError",
    "CredentialsProvider",
    "ExportError",
    "ExportProgress",
    "ExportResult",
    "FanOutError",
    "FetchResults",
    "FolderFailure",
    "FolderNotFoundError",
    "FolderReport",
    "GroupStatistics",
    "IdleEvent",
    "IdleEvents",
    "IdleStatistics",
    "Pool",
    "PoolClosedError",
    "PoolConfig",
    "PoolCounts",
    "PoolError",
    "PoolGroup",
    "PoolStatistics",
    "PoolTimeout",
    "Progress",
    "RedisBudget",
    "ReleasedConnectionError",
    "TLSError",
    "TokenProvider",
    "add_flags_many",
    "copy_many",
    "export_maildir",
    "fetch_many",
    "local_folder_name",
    "move_many",
    "open_pool",
    "open_pool_group",
    "remove_flags_many",
    "search_many",
]
# Types for type checkers and the reference.
__all__ += [
    "AccountOptions",
    "AsyncCounts",
    "AuthMechanism",
    "ConfigOptions",
    "GroupOptions",
    "IMAPCommands",
    "PoolOptions",
]
