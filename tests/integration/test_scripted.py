"""Tests of the scripted IMAP server (:mod:`trio_imappool.testing._scripted`).

Rules: loopback only, port 0; imapclient (blocking) talks to the server from a worker thread
with a socket timeout, and every Trio test runs under ``trio.fail_after``.
"""

from __future__ import annotations

import contextlib
import imaplib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import imapclient
import pytest
import trio

import trio_imappool
from trio_imappool.testing import (
    ScriptedCommand,
    ScriptedFolder,
    ScriptedMessage,
    ScriptedServer,
    ScriptedSession,
    open_scripted_server,
    start_scripted_server_thread,
)

T = TypeVar("T")

BODY = b"Subject: hello\r\n\r\nhello\r\n"


@contextlib.contextmanager
def connect(server: Any) -> Iterator[imapclient.IMAPClient]:
    """A logged-in imapclient, its socket closed at the end whatever happened."""
    kwargs = server.pool_kwargs()
    client = imapclient.IMAPClient(kwargs["host"], kwargs["port"], ssl=False, timeout=5)
    try:
        client.login(kwargs["username"], kwargs["password"])
        yield client
    finally:
        with contextlib.suppress(OSError):
            client.shutdown()


def login_only(server: Any) -> None:
    with connect(server):
        pass


async def in_thread(fn: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(fn)


async def test_imapclient_logs_in_lists_selects_fetches_and_idles() -> None:
    folders: dict[str | bytes, ScriptedFolder | list[bytes]] = {
        "INBOX": [BODY, BODY + b"2"],
        "Archive/2024": ScriptedFolder.of([BODY], first_uid=10, uidvalidity=77),
        "Ünïcode": [BODY],
    }
    with trio.fail_after(10):
        async with open_scripted_server(folders=folders) as server:

            def talk() -> dict[str, Any]:
                with connect(server) as client:
                    out: dict[str, Any] = {"list": client.list_folders()}
                    out["status"] = client.folder_status("Archive/2024", ["MESSAGES", "UIDNEXT"])
                    out["select"] = client.select_folder("Archive/2024", readonly=True)
                    out["search"] = client.search(["ALL"])
                    out["fetch"] = client.fetch([10], ["BODY.PEEK[]", "FLAGS", "RFC822.SIZE"])
                    client.select_folder("Ünïcode")
                    out["unicode"] = client.fetch([1], ["BODY[]"])
                    client.idle()
                    out["idle"] = client.idle_check(timeout=0.1)
                    client.idle_done()
                    client.logout()
                    return out

            out = await in_thread(talk)
            assert [name for _, _, name in out["list"]] == ["INBOX", "Archive/2024", "Ünïcode"]
            assert out["status"] == {b"MESSAGES": 1, b"UIDNEXT": 11}
            assert out["select"][b"UIDVALIDITY"] == 77
            assert out["search"] == [10]
            assert out["fetch"][10][b"BODY[]"] == BODY
            assert out["fetch"][10][b"RFC822.SIZE"] == len(BODY)
            assert out["unicode"][1][b"BODY[]"] == BODY
            assert out["idle"] == []
            assert server.connections == 1
            assert "UID FETCH" in server.command_names()
            assert any(line.startswith(b"DONE") for line in server.received)


async def test_a_handler_replaces_a_command_and_sees_the_raw_line() -> None:
    seen: list[ScriptedCommand] = []

    async def refuse(session: ScriptedSession, command: ScriptedCommand) -> None:
        seen.append(command)
        await session.send_line(f"{command.tag} NO [UNAVAILABLE] try later, friend")

    with trio.fail_after(10):
        async with open_scripted_server(handlers={"LOGIN": refuse}) as server:
            with pytest.raises(imapclient.exceptions.LoginError, match="try later, friend"):
                await in_thread(lambda: login_only(server))
    assert seen[0].args == [b"user", b"password"]
    assert b"user" in seen[0].raw[0]


async def test_fetch_can_leave_a_message_out_or_answer_nil() -> None:
    folder = ScriptedFolder(
        [
            ScriptedMessage(uid=1, body=BODY),
            ScriptedMessage(uid=2, body=None),
            ScriptedMessage(uid=3, body=BODY, in_fetch=False),
        ]
    )
    with trio.fail_after(10):
        async with open_scripted_server(folders={"INBOX": folder}) as server:

            def talk() -> dict[int, Any]:
                with connect(server) as client:
                    client.select_folder("INBOX", readonly=True)
                    assert client.search(["ALL"]) == [1, 2, 3]
                    fetched: dict[int, Any] = client.fetch([1, 2, 3], ["BODY.PEEK[]"])
                    return fetched

            fetched = await in_thread(talk)
    assert sorted(fetched) == [1, 2]
    assert fetched[2][b"BODY[]"] is None


async def test_unsolicited_fetch_lines_and_a_huge_line_can_be_scripted() -> None:
    async def noisy(session: ScriptedSession, command: ScriptedCommand) -> None:
        await session.send_line(b"* 1 FETCH (FLAGS (\\Deleted))")
        await session.default(command)

    async def huge(session: ScriptedSession, command: ScriptedCommand) -> None:
        await session.send(b"* OK " + b"x" * 1_000_001 + b"\r\n")
        await session.send_line(f"{command.tag} OK NOOP done")

    with trio.fail_after(20):
        async with open_scripted_server(
            folders={"INBOX": [BODY]}, handlers={"FETCH": noisy, "NOOP": huge}
        ) as server:

            def talk() -> Any:
                with connect(server) as client:
                    client.select_folder("INBOX")
                    fetched = client.fetch([1], ["FLAGS"])
                    with pytest.raises(imaplib.IMAP4.error, match="more than 1000000"):
                        client.noop()
                    return fetched

            fetched = await in_thread(talk)
    assert fetched[1][b"FLAGS"] == ()


async def test_idle_ended_by_the_server_then_done_is_bad() -> None:
    async def short_idle(session: ScriptedSession, command: ScriptedCommand) -> None:
        await session.send_line("+ idling")
        await session.send_line(f"{command.tag} OK IDLE ended by the server")
        line = await session.read_line()
        await session.send_line(line + b" BAD unexpected DONE")

    with trio.fail_after(10):
        async with open_scripted_server(handlers={"IDLE": short_idle}) as server:
            stream = await trio.open_tcp_stream(server.host, server.port)
            async with stream:
                for line in (b"a LOGIN user password", b"b SELECT INBOX", b"c IDLE"):
                    await stream.send_all(line + b"\r\n")
                seen = b""
                while b"c OK IDLE ended" not in seen:
                    seen += await stream.receive_some()
                await stream.send_all(b"DONE\r\n")
                while b"DONE BAD" not in seen:
                    seen += await stream.receive_some()
    assert seen.index(b"+ idling") < seen.index(b"c OK IDLE ended") < seen.index(b"DONE BAD")
    assert server.received[-1] == b"DONE"


async def test_greeting_hook_can_close_before_the_greeting() -> None:
    async def hang_up(session: ScriptedSession) -> None:
        await session.close()

    with trio.fail_after(10):
        async with open_scripted_server(greeting=hang_up) as server:
            with pytest.raises(imaplib.IMAP4.abort):
                await in_thread(lambda: login_only(server))
    assert server.connections == 1


async def test_hostile_raw_names_are_sent_as_literals_and_select_matches_them() -> None:
    name = b"evil\r\nname/../x"
    with trio.fail_after(10):
        async with open_scripted_server(folders={name: [BODY]}) as server:

            def talk() -> Any:
                with connect(server) as client:
                    client.folder_encode = False
                    listed = client.list_folders()
                    client._imap.literal = name
                    result = client._imap._simple_command("SELECT")
                    return listed, result

            listed, (typ, _) = await in_thread(talk)
    assert listed[0][2] == name
    assert typ == "OK"


async def test_pool_opens_against_it_with_authenticate_plain_and_utf8() -> None:
    users = {"jörg": "pässwörd"}
    with trio.fail_after(10):
        async with open_scripted_server(
            users=users, capabilities=("IMAP4rev1", "AUTH=PLAIN", "LOGINDISABLED")
        ) as server:
            options = server.pool_kwargs() | {"auth_mechanism": "PLAIN"}
            async with trio_imappool.open_pool(**options) as pool, pool.connection() as conn:
                assert await conn.run_sync(lambda c: c.noop())
    assert "AUTHENTICATE" in server.command_names()


def test_thread_variant_serves_blocking_code() -> None:
    with (
        start_scripted_server_thread(folders={"INBOX": [BODY]}) as server,
        connect(server) as client,
    ):
        client.select_folder("INBOX")
        assert client.fetch([1], ["BODY.PEEK[]"])[1][b"BODY[]"] == BODY
        client.idle()
        assert server.push("* 2 EXISTS") == 1
        assert client.idle_check(timeout=5) == [(2, b"EXISTS")]
        client.idle_done()
        client.logout()
        assert isinstance(server.server, ScriptedServer)
        assert server.connections == 1


async def test_a_trickled_greeting_without_capabilities_still_opens_a_pool() -> None:
    async def trickle(session: ScriptedSession) -> None:
        for byte in b"* OK slow server\r\n":
            await session.send(bytes([byte]))
            await trio.sleep(0.001)

    with trio.fail_after(10):
        async with (
            open_scripted_server(greeting=trickle, greeting_capabilities=False) as server,
            trio_imappool.open_pool(**server.pool_kwargs()) as pool,
        ):
            await pool.run_sync(lambda c: c.noop())
    assert server.command_names()[0] == "CAPABILITY"  # asked, since the greeting had none


async def test_a_silent_client_is_closed_after_the_read_timeout() -> None:
    with trio.fail_after(10):
        async with open_scripted_server(read_timeout=0.2) as server:
            stream = await trio.open_tcp_stream(server.host, server.port)
            async with stream:
                received = b""
                while True:
                    data = await stream.receive_some()
                    if not data:
                        break
                    received += data
    assert received.startswith(b"* OK [CAPABILITY IMAP4rev1")
    assert server.active == 0 and server.connections == 1
