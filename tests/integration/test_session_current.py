"""A session sees other sessions' changes only at its next command: bulk work on a connection
that has had its folder selected for a while makes it current first, in the same round trip.

Runs against Dovecot and Cyrus (``imap_server``). Loopback only; every test under a deadline.
"""

from __future__ import annotations

import imaplib
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from imapclient import IMAPClient

from trio_imappool import add_flags_many, fetch_many, open_pool
from trio_imappool.testing import ImapServer, seed_folders


class Wire:
    """What imaplib writes (each command's name) and when it reads, per thread."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[bytes] = []
        self.recording = False
        send, get_line = imaplib.IMAP4.send, imaplib.IMAP4._get_line  # type: ignore[attr-defined]
        owner = threading.get_ident

        def recording_send(imap: imaplib.IMAP4, data: bytes) -> None:
            if self.recording and owner() != self.trio_thread:
                self.events.append(bytes(data).split()[1])
            send(imap, data)

        def recording_get_line(imap: imaplib.IMAP4) -> bytes:
            if self.recording and owner() != self.trio_thread:
                self.events.append(b"<read>")
            line: bytes = get_line(imap)
            return line

        self.trio_thread = owner()
        monkeypatch.setattr(imaplib.IMAP4, "send", recording_send)
        monkeypatch.setattr(imaplib.IMAP4, "_get_line", recording_get_line)

    def writes_before_first_read(self) -> list[bytes]:
        first = self.events.index(b"<read>")
        return self.events[:first]


@pytest.fixture
def wire(monkeypatch: pytest.MonkeyPatch) -> Iterator[Wire]:
    yield Wire(monkeypatch)


def other_session(account: dict[str, Any]) -> IMAPClient:
    client = IMAPClient(account["host"], account["port"], ssl=False, timeout=5)
    client.login(account["username"], account["password"])
    return client


async def test_a_write_batch_on_a_connection_with_the_folder_selected_sends_a_noop_first(
    imap_server: ImapServer, imap_account: dict[str, Any], wire: Wire
) -> None:
    uids = await trio.to_thread.run_sync(
        lambda: seed_folders(imap_server, {"A": 10}, user=imap_account["username"], size=300)
    )
    with trio.fail_after(20):
        async with open_pool(**imap_account, max_size=1) as pool:
            async with pool.connection("A") as conn:  # left selected, read-write
                await conn.noop()
            wire.recording = True
            await add_flags_many(pool, uids, [b"\\Flagged"], batch_size=100)
            wire.recording = False
            # NOOP and STORE written before anything is read: one round trip, not two.
            assert wire.writes_before_first_read() == [b"NOOP", b"UID"], wire.events
            async with pool.connection("A", readonly=True) as conn:
                flags = await conn.get_flags(uids["A"])
            assert all(b"\\Flagged" in value for value in flags.values())

            # A connection that selects the folder for the batch needs no NOOP.
            async with pool.connection() as conn:
                await conn.unselect_folder()
            wire.events.clear()
            wire.recording = True
            await add_flags_many(pool, uids, [b"\\Seen"], batch_size=100)
            wire.recording = False
            assert b"NOOP" not in wire.events, wire.events


async def test_a_fetch_on_a_connection_that_had_the_folder_selected_sees_new_messages(
    imap_server: ImapServer, imap_account: dict[str, Any]
) -> None:
    await trio.to_thread.run_sync(
        lambda: seed_folders(imap_server, {"INBOX": 3}, user=imap_account["username"], size=300)
    )
    other = await trio.to_thread.run_sync(other_session, imap_account)
    try:
        with trio.fail_after(20):
            async with open_pool(**imap_account, max_size=1) as pool:
                async with pool.connection("INBOX", readonly=True) as conn:
                    await conn.noop()
                status = await trio.to_thread.run_sync(
                    lambda: other.folder_status("INBOX", ["UIDNEXT"])
                )
                new = int(status[b"UIDNEXT"])
                await trio.to_thread.run_sync(
                    lambda: other.append("INBOX", b"Subject: new\r\n\r\nnew\r\n")
                )
                async with fetch_many(pool, {"INBOX": [new]}, ["BODY.PEEK[]"]) as results:
                    got = [uid async for _, uid, _ in results]
                    progress = results.progress
        assert got == [new], progress
    finally:
        await trio.to_thread.run_sync(other.logout)


async def test_a_folder_given_as_uids_is_examined_once_per_connection_not_per_batch(
    imap_server: ImapServer, imap_account: dict[str, Any], wire: Wire
) -> None:
    """An EXAMINE makes Dovecot look through the whole folder: one before every pipeline cost
    in proportion to the folder's size (a 10,000-message folder: 111 us of Dovecot's CPU per
    message fetched, 21 us with one EXAMINE). UIDs given to the call existed before it, so a
    connection that examined the folder during the call is current for them."""
    uids = await trio.to_thread.run_sync(
        lambda: seed_folders(imap_server, {"A": 30}, user=imap_account["username"], size=300)
    )
    with trio.fail_after(20):
        async with open_pool(**imap_account, max_size=1) as pool:
            wire.recording = True
            async with fetch_many(pool, uids, ["BODY.PEEK[]"], batch_size=5) as results:
                got = [uid async for _, uid, _ in results]
            wire.recording = False
    assert got == uids["A"]
    assert wire.events.count(b"UID") == 6  # six batches, in three pipelines
    assert wire.events.count(b"EXAMINE") == 1
