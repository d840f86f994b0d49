"""A user's program with mistakes that ``mypy --strict`` must find.

It is never run: tests/test_typing.py checks it with mypy and compares the errors with the
``# E:`` comments, one per expected error (a part of mypy's message), on the line mypy reports.
Each of these mistakes type-checked before the public API had types.
"""

from __future__ import annotations

import trio

import trio_imappool
from trio_imappool import Connection


async def mistakes(conn: Connection) -> None:
    await conn.select_folder(b"INBOX", readonly="yes")  # E: Argument 1 has incompatible type "bytes"; expected "str" # E: Argument "readonly" has incompatible type "str"; expected "bool"
    uids = await conn.search(["UNSEEN"])
    uids.append("7")  # E: Argument 1 to "append" of "list" has incompatible type "str"
    messages = await conn.fetch(uids)  # E: Too few arguments
    flags = await conn.add_flags(uids, [b"\\Seen"], silent=True)  # E: Function does not return a value
    flags.items()  # E: "None" has no attribute "items"
    await conn.noop(1)  # E: Too many arguments
    conn.select_folder("INBOX")  # E: Value of type "Coroutine[Any, Any, dict[bytes, Any]]" must be used
    await conn.no_such_command()  # E: "Connection" has no attribute "no_such_command"
    status = await conn.folder_status("INBOX")
    status[b"MESSAGES"].decode()  # E: "int" has no attribute "decode"
    del messages


async def main() -> None:
    async with trio_imappool.open_pool("imap.example.org", usernme="u", password="p"):  # E: Unexpected keyword argument "usernme" for "open_pool"; did you mean "username"?
        pass
    async with trio_imappool.open_pool(  # E: Missing named argument "username" for "open_pool"
        "imap.example.org", password="p"
    ):
        pass
    async with trio_imappool.open_pool(
        "imap.example.org",
        username="u",
        password="p",
        max_size="8",  # E: Argument "max_size" to "open_pool" has incompatible type "str"; expected "int"
        auth_mechanism="CRAM-MD5",  # E: Argument "auth_mechanism" to "open_pool" has incompatible type
    ) as pool:
        counts = pool.counts.value
        counts.idel  # E: "PoolCounts" has no attribute "idel"
        await pool.counts.wait_value(lambda c: c.waiting)  # E: Argument 1 to "wait_value" of "AsyncCounts" has incompatible type # E: Incompatible return value type (got "int", expected "bool")
    credentials = {"password": "p"}
    async with trio_imappool.open_pool_group(lambda a: credentials, max_size=3):  # E: Unexpected keyword argument "max_size" for "open_pool_group"
        pass
    trio_imappool.PoolConfig.build("h", username="u", password=b"p")  # E: Argument "password" to "build" of "PoolConfig" has incompatible type "bytes"


trio.run(main)
