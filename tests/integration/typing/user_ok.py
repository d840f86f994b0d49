"""A user's program that must type-check cleanly under ``mypy --strict``.

It is never run: tests/test_typing.py checks it with mypy. ``assert_type`` pins the types a
user sees for the commands the README uses and the ones the bulk operations use.
"""

from __future__ import annotations

import math
from datetime import date
from typing import Any, assert_type

import trio

import trio_imappool
from trio_imappool import Connection, PoolCounts, PoolStatistics


async def unseen_subjects(conn: Connection, folder: str) -> list[bytes]:
    info = await conn.select_folder(folder, readonly=True)
    assert_type(info, dict[bytes, Any])
    uids = await conn.search(["UNSEEN", "SINCE", date(2026, 1, 1)])
    assert_type(uids, list[int])
    messages = await conn.fetch(uids, ["ENVELOPE", "FLAGS"])
    assert_type(messages, dict[int, dict[bytes, Any]])
    return [data[b"ENVELOPE"].subject for data in messages.values()]


async def tidy(conn: Connection) -> None:
    await conn.select_folder("INBOX")
    uids = await conn.search("ALL")
    flags = await conn.add_flags(uids, [b"\\Seen"])
    assert_type(flags, dict[int, tuple[bytes, ...]])
    assert_type(await conn.remove_flags(uids[:1], b"\\Flagged", silent=True), None)
    assert_type(await conn.set_flags(uids, [b"\\Seen"]), dict[int, tuple[bytes, ...]])
    assert_type(await conn.get_flags(uids), dict[int, tuple[bytes, ...]])
    assert_type(await conn.copy(uids, "Archive"), bytes)
    assert_type(await conn.move(uids, "Archive"), bytes)
    assert_type(await conn.expunge(), tuple[bytes, list[Any]])
    assert_type(await conn.uid_expunge(uids), list[bytes])
    assert_type(await conn.noop(), tuple[bytes, list[Any]])
    assert_type(await conn.unselect_folder(), bytes)
    for folder_flags, delimiter, name in await conn.list_folders():
        assert_type(folder_flags, tuple[bytes, ...])
        assert_type(delimiter, bytes | None)
        assert_type(name, str)
        status = await conn.folder_status(name, ["MESSAGES", "UIDNEXT"])
        assert_type(status, dict[bytes, int])
    assert_type(await conn.capabilities(), tuple[bytes, ...])
    assert_type(await conn.has_capability("IDLE"), bool)
    assert_type(await conn.append("INBOX", b"Subject: hi\r\n\r\nhello\r\n", [b"\\Seen"]), bytes)
    assert_type(await conn.create_folder("Projects"), bytes)
    assert_type(await conn.rename_folder("Projects", "Old projects"), bytes)
    assert_type(await conn.delete_folder("Old projects"), bytes)


async def main() -> None:
    async with trio_imappool.open_pool(
        "imap.example.org",
        username="u",
        password="p",
        max_size=8,
        acquire_timeout=math.inf,
        auth_mechanism="LOGIN",
        thread_limiter=trio.CapacityLimiter(4),
    ) as pool:
        async with pool.connection() as conn:
            subjects = await unseen_subjects(conn, "INBOX")
            assert_type(subjects, list[bytes])
        async with pool.connection("INBOX", readonly=True) as conn:
            await tidy(conn)
        n = await pool.run_sync(lambda client: len(client.list_folders()))
        assert_type(n, int)
        assert_type(pool.statistics(), PoolStatistics)
        counts = await pool.counts.wait_value(lambda c: c.idle > 0)
        assert_type(counts, PoolCounts)
        assert_type(pool.counts.value.in_use, int)

        async with pool.fetch_many({"INBOX": [1, 2, 3]}, ["BODY.PEEK[]"]) as results:
            async for folder, uid, data in results:
                assert_type(folder, str)
                assert_type(uid, int)
                print(len(data[b"BODY[]"]), results.progress.messages_done)
        unseen = await pool.search_many(["INBOX", "Archive"], ["UNSEEN"])
        assert_type(unseen, dict[str, list[int]])

        async with pool.idle("INBOX") as events:
            async for event in events:
                assert_type(event.kind, str)
                assert_type(event.number, int | None)
                break

    def token(refresh: bool) -> str:
        return "access-token"

    async def credentials(account: str) -> dict[str, Any]:
        return {"username": account, "oauth2_token": token}

    async with (
        trio_imappool.open_pool_group(
            credentials, host="imap.example.org", per_account_max=4, acquire_timeout=5.0
        ) as group,
        group.connection("alice@example.org") as conn,
    ):
        await conn.noop()

    config = trio_imappool.PoolConfig.build("imap.example.org", username="u", password="p")
    assert_type(config.max_size, int)


trio.run(main)
