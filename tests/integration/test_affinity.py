"""Folder-affine checkout: ``pool.connection(folder)`` against Dovecot and Cyrus."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from imapclient.exceptions import IMAPClientError

from trio_imappool import open_pool
from trio_imappool.testing import ImapServer, open_fault_proxy, seed_folders

from .conftest import assert_settled


async def test_the_connection_comes_with_the_folder_selected(
    imap_server: ImapServer, imap_account: dict[str, Any]
) -> None:
    uids = seed_folders(imap_server, {"Archive": 3}, user=imap_account["username"])["Archive"]
    async with open_pool(**imap_account) as pool:
        async with pool.connection("Archive", readonly=True) as conn:
            assert (conn.selected_folder, conn.readonly) == ("Archive", True)
            assert await conn.search(["ALL"]) == uids  # the server agrees
        assert pool.statistics().selects == 1


async def test_an_idle_connection_with_the_folder_selected_is_preferred_without_a_round_trip(
    imap_server: ImapServer, imap_account: dict[str, Any]
) -> None:
    seed_folders(imap_server, {"Archive": 1}, user=imap_account["username"])
    async with open_fault_proxy(imap_account["host"], imap_account["port"]) as proxy:
        settings = dict(imap_account, host=proxy.host, port=proxy.port)
        async with open_pool(**settings, max_size=2) as pool:
            async with pool.connection() as first, pool.connection() as second:
                await first.select_folder("Archive")
                await second.select_folder("INBOX")
                inbox_number = second.number
            # Released first, `first` (Archive) is next in line; INBOX's is chosen instead.
            before = proxy.statistics().bytes_up
            async with pool.connection("INBOX") as conn:
                assert conn.number == inbox_number
                assert proxy.statistics().bytes_up == before  # nothing was sent
            stats = pool.statistics()
            assert (stats.selects, stats.selects_saved) == (0, 1)
            # The other one is still there, in its place.
            async with pool.connection() as conn:
                assert conn.selected_folder == "Archive"


async def test_the_mode_must_match_too(imap_account: dict[str, Any]) -> None:
    async with open_pool(**imap_account, max_size=1) as pool:
        async with pool.connection("INBOX") as conn:
            assert conn.readonly is False
        async with pool.connection("INBOX", readonly=True) as conn:
            assert conn.readonly is True
        async with pool.connection("INBOX", readonly=True) as conn:
            assert conn.readonly is True
        stats = pool.statistics()
        assert (stats.selects, stats.selects_saved) == (2, 1)


async def test_preference_never_jumps_the_queue(
    imap_server: ImapServer, imap_account: dict[str, Any]
) -> None:
    seed_folders(imap_server, {"A": 1, "B": 1}, user=imap_account["username"])
    order: list[str] = []
    async with open_pool(**imap_account, max_size=1) as pool:
        held = pool.connection("B")
        await held.__aenter__()

        async def waiter(folder: str) -> None:
            async with pool.connection(folder) as conn:
                assert conn.selected_folder == folder  # never another folder than asked
                order.append(folder)

        async with trio.open_nursery() as nursery:
            for folder in ("A", "B", "A"):
                nursery.start_soon(waiter, folder)
                await trio.testing.wait_all_tasks_blocked()
            await held.__aexit__(None, None, None)
        await assert_settled(pool)
    assert order == ["A", "B", "A"]  # arrival order, though "B" was selected when released


async def test_a_folder_that_does_not_exist_fails_the_checkout_and_keeps_the_connection(
    imap_account: dict[str, Any],
) -> None:
    async with open_pool(**imap_account) as pool:
        with pytest.raises(IMAPClientError):
            async with pool.connection("No such folder"):
                pytest.fail("handed out without the folder")
        stats = pool.statistics()
        assert (stats.idle, stats.in_use, stats.connections_discarded) == (1, 0, 0)
        await assert_settled(pool)
