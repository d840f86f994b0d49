"""The async proxy: every imapclient command, one task at a time, nothing after release."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import trio
import trio.testing
from imapclient import IMAPClient

from trio_imappool import COMMANDS, Connection, ReleasedConnectionError, open_pool
from trio_imappool.testing import DovecotServer, seed_folders

from .conftest import assert_settled


def test_every_public_imapclient_method_but_socket_is_a_command() -> None:
    public = {
        name
        for name, value in inspect.getmembers(IMAPClient)
        if not name.startswith("_") and inspect.isfunction(value)
    }
    assert set(COMMANDS) == public - {"socket"}


@pytest.mark.parametrize("name", COMMANDS)
def test_each_command_keeps_imapclients_name_signature_and_doc(name: str) -> None:
    command = getattr(Connection, name)
    original = getattr(IMAPClient, name)
    assert inspect.iscoroutinefunction(command)
    assert command.__name__ == name
    assert inspect.signature(command) == inspect.signature(original)
    assert f"IMAPClient.{name}" in (command.__doc__ or "")


async def test_commands_return_what_imapclient_returns(
    dovecot: DovecotServer, account: dict[str, Any]
) -> None:
    uids = seed_folders(dovecot, {"INBOX": 3}, user=account["username"])["INBOX"]
    async with open_pool(**account) as pool, pool.connection() as conn:
        await conn.select_folder("INBOX")
        assert await conn.search(["ALL"]) == uids
        await conn.add_flags(uids[:1], [b"\\Flagged"])  # positional and keyword arguments
        flags = await conn.get_flags(messages=uids[:1])
        assert b"\\Flagged" in flags[uids[0]]
        assert await conn.has_capability("IMAP4REV1")
        folders = [name for _, _, name in await conn.list_folders()]
        assert "INBOX" in folders


async def test_run_sync_is_one_thread_hop_with_the_blocking_client(account: dict[str, Any]) -> None:
    async with open_pool(**account) as pool, pool.connection() as conn:
        threads: list[int] = []

        def two_commands(client: IMAPClient, folder: str) -> int:
            import threading

            threads.append(threading.get_ident())
            client.select_folder(folder, readonly=True)
            client.noop()
            threads.append(threading.get_ident())
            return len(client.search(["ALL"]))

        assert await conn.run_sync(two_commands, "INBOX") == 0
        assert len(set(threads)) == 1
        assert conn.selected_folder == "INBOX"


async def test_a_connection_is_unusable_after_its_block(account: dict[str, Any]) -> None:
    async with open_pool(**account) as pool:
        async with pool.connection() as conn:
            await conn.noop()
        for attempt in (conn.noop(), conn.run_sync(IMAPClient.noop)):
            with pytest.raises(ReleasedConnectionError):
                await attempt
        with pytest.raises(ReleasedConnectionError):
            conn.selected_folder  # noqa: B018
        assert "released" in repr(conn)


async def test_two_tasks_cannot_run_commands_on_one_connection_at_once(
    account: dict[str, Any],
) -> None:
    async with open_pool(**account, read_timeout=20) as pool:
        async with pool.connection() as conn:
            await conn.select_folder("INBOX")
            await conn.idle()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(conn.idle_check, 10)  # blocks in its thread
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(trio.BusyResourceError):
                    await conn.noop()
                nursery.cancel_scope.cancel()
        # The interrupted IDLE broke it; nothing else did.
        assert pool.statistics().connections_discarded == 1
        await assert_settled(pool)


async def test_the_proxy_says_which_connection_it_is(account: dict[str, Any]) -> None:
    async with open_pool(**account) as pool, pool.connection() as conn:
        assert conn.number == 1
        assert conn.broken is None
        assert "#1" in repr(conn)
        assert account["username"] in repr(conn)


async def test_commands_are_checkpoints(account: dict[str, Any]) -> None:
    async with open_pool(**account) as pool:
        with trio.testing.assert_checkpoints():  # opening a connection
            async with pool.connection() as conn:
                pass
        with trio.testing.assert_checkpoints():  # an idle one
            async with pool.connection() as conn:
                pass
        async with pool.connection() as conn:
            with trio.testing.assert_checkpoints():
                await conn.noop()
        with trio.testing.assert_checkpoints():
            await pool.run_sync(IMAPClient.noop)
