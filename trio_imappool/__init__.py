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

import os as _os

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
from ._export import (
    ExportError,
    ExportProgress,
    ExportResult,
    FolderFailure,
    FolderNotFoundError,
    FolderReport,
    export_maildir,
    local_folder_name,
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
from ._group import CredentialsProvider, GroupStatistics, PoolGroup, open_pool_group
from ._idle import IdleEvent, IdleEvents, IdleStatistics
from ._pool import Pool, open_pool
from ._stats import AsyncCounts, PoolCounts, PoolStatistics
from ._version import __version__ as __version__

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
