"""Servers that refuse one more connection, in their many ways, and servers that say little in
their greeting: the pool must tell a refusal from wrong credentials and from an outage.

Rules of this module: loopback only; real servers (Cyrus with its per-user limit) wherever one
shows the behaviour, scripted servers only for Gmail's, Microsoft 365's and Courier's ways;
every test runs under ``trio.fail_after``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import imapclient
import pytest
import trio
from imapclient.exceptions import IMAPClientError, LoginError

from trio_imappool import (
    AuthenticationError,
    ConnectError,
    ConnectionLimitError,
    Pool,
    PoolTimeout,
    open_pool,
)
from trio_imappool._errors import REFUSALS, Refusal, classify_open_error, refusal_of
from trio_imappool.testing import (
    CyrusFactory,
    CyrusServer,
    ScriptedCommand,
    ScriptedSession,
    open_scripted_server,
    seed_folders,
)

from .conftest import assert_settled


async def test_a_pool_above_cyrus_limit_settles_at_the_limit(
    cyrus_factory: CyrusFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Cyrus answers ``NO Too many open connections (3 of 3 for alice)``: not a wrong password."""
    server = cyrus_factory(max_logins_per_user=3)
    settings = server.pool_kwargs(tls=False)
    served = 0
    async with open_pool(**settings, max_size=6, acquire_timeout=10) as pool:

        async def user() -> None:
            nonlocal served
            for _ in range(4):
                async with pool.connection() as conn:
                    await conn.noop()
                    await trio.sleep(0.05)
                served += 1

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for _ in range(12):
                    nursery.start_soon(user)
                    await trio.sleep(0.03)  # users arrive one by one
        stats = pool.statistics()
        await assert_settled(pool)
    assert served == 48  # every user was served, none got AuthenticationError
    assert stats.effective_max_size <= 3 and stats.size <= 3, stats
    assert stats.open_failures >= 1, stats  # the limit was reached and recognised
    assert logged(caplog, "Too many open connections")


def test_the_export_command_with_more_connections_than_cyrus_allows_succeeds(
    cyrus_factory: CyrusFactory, tmp_path: Path
) -> None:
    """The issue's own report: ``trio-imappool export -c 6`` against a limit of 3 exited 3,
    "authentication failed"."""
    server = cyrus_factory(max_logins_per_user=3)
    settings = server.pool_kwargs(tls=False)
    seed_folders(settings, {f"F{i}": 150 for i in range(12)})
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_IMAPPOOL_")}
    env["TRIO_IMAPPOOL_PASSWORD"] = settings["password"]
    args = ["--host", settings["host"], "--port", str(settings["port"])]
    args += ["--user", settings["username"], "-c", "6", "-v", str(tmp_path / "Mail")]
    done = subprocess.run(
        [sys.executable, "-m", "trio_imappool", "export", "--plain", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert re.search(r"exported 1,?800 new messages", done.stdout), done.stdout
    assert "pool: 3 connections opened" in done.stdout  # settled at the limit


async def test_wrong_password_on_cyrus_is_still_an_authentication_error(
    cyrus: CyrusServer,
) -> None:
    """Cyrus's ``NO Login failed: authentication failure`` has no response code: with nothing
    else open, it means wrong credentials, and the pool does not retry it."""
    settings = cyrus.pool_kwargs("bob", tls=False) | {"password": "wrong"}
    with trio.fail_after(10):
        async with open_pool(**settings, max_size=4) as pool:
            with pytest.raises(AuthenticationError):
                async with pool.connection():
                    pass
            assert pool.statistics().open_failures == 1


async def test_capabilities_after_login_are_the_servers_full_list(cyrus: CyrusServer) -> None:
    """Cyrus's greeting lists only what it offers before login; IDLE, MOVE, LIST-STATUS and
    UNSELECT come after. The pool must not keep the greeting's list for the session."""
    greeting = imapclient.IMAPClient(cyrus.host, cyrus.imap_port, ssl=False, timeout=5)
    try:
        # (Its CAPABILITY command lists more before login; the pool takes the greeting's list.)
        assert b"[CAPABILITY " in greeting.welcome
        assert b" IDLE" not in greeting.welcome and b" MOVE" not in greeting.welcome
    finally:
        greeting.shutdown()
    with trio.fail_after(10):
        async with (
            open_pool(**cyrus.pool_kwargs("bob"), max_size=1) as pool,
            pool.connection() as conn,
        ):
            for name in ("IDLE", "MOVE", "LIST-STATUS", "UNSELECT", "UIDPLUS"):
                assert await conn.has_capability(name), name


# -- the table of wordings ------------------------------------------------------------------------


@pytest.mark.parametrize("refusal", REFUSALS, ids=lambda r: r.marker)
def test_every_wording_in_the_table_is_a_refusal(refusal: Refusal) -> None:
    text = refusal.example.split(" ", 2)[2]  # without the tag and NO/BAD
    assert refusal_of(LoginError(text)) is refusal
    assert classify_open_error(LoginError(text)) is ConnectionLimitError
    # Whatever command it answers (Microsoft 365's comes after a good LOGIN).
    assert classify_open_error(IMAPClientError(f"capability failed: {text}")) is (
        ConnectionLimitError
    )


def test_a_plain_no_is_wrong_credentials_only_when_nothing_else_is_open() -> None:
    plain = LoginError("b'Login failed: authentication failure'")
    coded = LoginError("b'[AUTHENTICATIONFAILED] Authentication failed.'")
    assert classify_open_error(plain) is AuthenticationError
    assert classify_open_error(plain, others_open=True) is ConnectionLimitError
    assert classify_open_error(coded, others_open=True) is AuthenticationError


# -- scripted servers: the refusals no server here shows ---------------------------------------

LIMIT = 3


def logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    """Whether the pool logged a failed open with *text* (``last_open_error`` is cleared by the
    next open that succeeds, which may be one that was already under way)."""
    return any(text in record.getMessage() for record in caplog.records)


async def serve_users(pool: Pool, users: int = 12, rounds: int = 4) -> int:
    """Users arriving one by one, each checking a connection out a few times; how many
    checkouts were served."""
    served = 0

    async def user() -> None:
        nonlocal served
        for _ in range(rounds):
            async with pool.connection() as conn:
                await conn.noop()
                await trio.sleep(0.05)
            served += 1

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for _ in range(users):
                nursery.start_soon(user)
                await trio.sleep(0.03)
    return served


async def gmail_login(session: ScriptedSession, command: ScriptedCommand) -> None:
    """Gmail over its limit: ``NO [ALERT] Too many simultaneous connections. (Failure)``."""
    if session.server.active > LIMIT:
        await session.send_line(
            f"{command.tag} NO [ALERT] Too many simultaneous connections. (Failure)"
        )
    else:
        await session.default(command)


async def test_gmails_too_many_simultaneous_connections_lowers_the_size(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with (
        open_scripted_server(handlers={"LOGIN": gmail_login}) as server,
        open_pool(**server.pool_kwargs(), max_size=6, acquire_timeout=10) as pool,
    ):
        served = await serve_users(pool)
        stats = pool.statistics()
        await assert_settled(pool)
    assert served == 48
    assert stats.effective_max_size <= LIMIT and stats.size <= LIMIT, stats
    assert 1 <= stats.open_failures <= 4, stats  # refused, then no storm of retries
    assert logged(caplog, "Too many simultaneous connections")


class Exchange:
    """Microsoft 365 under throttling: LOGIN succeeds, then every command of that session is
    ``BAD User is authenticated but not connected.`` (LOGIN's answer carries no capabilities,
    as Microsoft's does not, so the client's next command is CAPABILITY)."""

    def __init__(self) -> None:
        self.throttled: set[int] = set()
        self.refused = 0

    def handlers(self) -> dict[str, Any]:
        handlers: dict[str, Any] = {"LOGIN": self.login}
        for name in ("CAPABILITY", "NOOP", "SELECT", "EXAMINE", "LIST", "STATUS"):
            handlers[name] = self.command
        return handlers

    async def login(self, session: ScriptedSession, command: ScriptedCommand) -> None:
        if session.account.users.get(command.arg(0).decode()) != command.arg(1).decode():
            await session.send_line(f"{command.tag} NO LOGIN failed.")
            return
        session.user = command.arg(0).decode()
        if session.server.active > LIMIT:
            self.throttled.add(session.number)
        await session.send_line(f"{command.tag} OK LOGIN completed.")

    async def command(self, session: ScriptedSession, command: ScriptedCommand) -> None:
        if session.number in self.throttled:
            self.refused += 1
            await session.send_line(f"{command.tag} BAD User is authenticated but not connected.")
        else:
            await session.default(command)


async def test_microsoft_365s_authenticated_but_not_connected_lowers_the_size(
    caplog: pytest.LogCaptureFixture,
) -> None:
    exchange = Exchange()
    async with (
        open_scripted_server(handlers=exchange.handlers(), greeting_capabilities=False) as server,
        open_pool(**server.pool_kwargs(), max_size=6, acquire_timeout=10) as pool,
    ):
        served = await serve_users(pool)
        stats = pool.statistics()
        await assert_settled(pool)
    assert served == 48  # no user got the BAD: the open failed instead
    assert exchange.throttled and exchange.refused == len(exchange.throttled)
    assert stats.effective_max_size <= LIMIT and stats.size <= LIMIT, stats
    assert 1 <= stats.open_failures <= 4, stats
    assert logged(caplog, "authenticated but not connected")


async def courier_greeting(session: ScriptedSession) -> None:
    """Courier-IMAP over ``-maxperip``: the connection is closed before any greeting."""
    if session.server.active > LIMIT:
        await session.close()
    else:
        await session.send_line("* OK [CAPABILITY IMAP4rev1 IDLE UNSELECT] Courier-IMAP ready.")


async def test_a_connection_closed_before_the_greeting_is_a_refusal_not_an_outage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with (
        open_scripted_server(greeting=courier_greeting) as server,
        open_pool(**server.pool_kwargs(), max_size=6, acquire_timeout=10) as pool,
    ):
        with trio.fail_after(10):
            await serve_users(pool, users=6, rounds=2)  # reach the limit
        served = await serve_users(pool)
        stats = pool.statistics()
        await assert_settled(pool)
    assert served == 48
    assert stats.effective_max_size <= LIMIT and stats.size <= LIMIT, stats
    assert stats.connections_discarded == 0, stats  # the healthy ones were kept
    assert 1 <= stats.open_failures <= 4, stats  # backed off: no retries twice a second
    assert logged(caplog, "EOF")


async def test_a_server_that_goes_away_is_still_an_outage() -> None:
    """The other side of the rule: when the pool's idle connections see EOF too, a closed
    connection means the server went away, and they are dropped."""
    refusing = False

    async def greeting(session: ScriptedSession) -> None:
        if refusing:
            await session.close()
        else:
            await session.send_line("* OK [CAPABILITY IMAP4rev1 IDLE UNSELECT] ready")

    async with (
        open_scripted_server(greeting=greeting) as server,
        open_pool(**server.pool_kwargs(), max_size=2, acquire_timeout=2) as pool,
    ):
        async with pool.connection() as a, pool.connection() as b:
            await a.noop()
            await b.noop()
        refusing = True
        for session in list(server._sessions):  # the server drops everyone
            await session.close()
        await trio.sleep(0.1)
        with pytest.raises((PoolTimeout, ConnectError)):
            async with pool.connection() as conn:
                await conn.noop()
        stats = pool.statistics()
    assert stats.effective_max_size == 2, stats  # not lowered
    assert stats.connections_discarded >= 1, stats


def test_only_a_clean_close_before_the_greeting_can_be_a_refusal() -> None:
    eof = imapclient.exceptions.IMAPClientAbortError("socket error: EOF")
    assert classify_open_error(eof, others_open=True, others_healthy=True) is ConnectionLimitError
    assert classify_open_error(eof, others_open=True, others_healthy=False) is ConnectError
    for fault in (ConnectionResetError(), ConnectionRefusedError(), TimeoutError()):
        assert classify_open_error(fault, others_healthy=True) is ConnectError, fault
