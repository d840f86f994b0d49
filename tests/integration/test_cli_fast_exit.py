"""Closing without waiting for LOGOUT's answer (``wait_for_logout=False``, what the command
line uses), and ``export --delete`` with ``--accounts``.

Rules: loopback only; a Dovecot of the test's own (its log is read: every session must end as
"Logged out", with nothing logged as an error or warning); every wait is bounded.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from imapclient import IMAPClient

import trio_imappool
from trio_imappool.cli import main
from trio_imappool.testing import DovecotServer, RedisServer, open_fault_proxy, seed_folders
from trio_imappool.testing._dovecot import DovecotFactory

USER, PASSWORD = "fast", "fast-pw"
ONE_WAY = 0.15  # the proxy's delay each way: LOGOUT's answer would take 0.3 s


@pytest.fixture
def server(dovecot_factory: DovecotFactory) -> DovecotServer:
    return dovecot_factory(users={USER: PASSWORD}, max_userip_connections=20)


def log_offset(server: DovecotServer) -> int:
    return server.log_path.stat().st_size


def session_ends(server: DovecotServer, offset: int, user: str = USER) -> list[str]:
    """How each session of *user* that logged in after *offset* (a size of Dovecot's log)
    ended, in the order of their logins; waits (bounded) until the server has ended them all
    and logged it. Asserts that nothing was logged as an error or a warning meanwhile."""
    deadline = time.monotonic() + 5
    while True:
        text = server.log_path.read_bytes().decode("utf-8", "replace")
        logins = re.findall(rf"Login: user=<{re.escape(user)}>.*session=<([^>]+)>", text[offset:])
        ends = {
            session: reason
            for session, reason in re.findall(
                rf"imap\({re.escape(user)}\)<\d+><([^>]+)>: Info: Disconnected: (.*?) in=", text
            )
        }
        if all(s in ends for s in logins) and not server.connections(user):
            break
        assert time.monotonic() < deadline, text[offset:]
        time.sleep(0.02)
    assert not re.search(r": (Error|Warning|Fatal|Panic):", text[offset:]), text[offset:]
    return [ends[s] for s in logins]


async def use_and_close(kwargs: dict[str, Any], connections: int) -> float:
    """Open *connections* (each selects INBOX), then close the pool; how long closing took."""
    async with trio_imappool.open_pool(**kwargs, max_size=connections) as pool:
        async with trio.open_nursery() as nursery:
            for _ in range(connections):

                async def use() -> None:
                    async with pool.connection("INBOX"):
                        await trio.sleep(0.05)  # hold it: every task gets a connection

                nursery.start_soon(use)
        # Every connection opened, and idle: each one is logged out at close.
        await pool.counts.wait_value(lambda c: c.idle == connections)
        started = trio.current_time()
        await pool.aclose()
        return trio.current_time() - started


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
@pytest.mark.parametrize("wait", [True, False], ids=["waits", "does-not-wait"])
async def test_closing_without_waiting_for_logout_saves_the_round_trip_and_ends_every_session(
    server: DovecotServer, tls: bool, wait: bool
) -> None:
    kwargs = server.pool_kwargs(USER, tls=tls)
    offset = log_offset(server)
    with trio.fail_after(30):
        async with open_fault_proxy(server.host, kwargs["port"], up=ONE_WAY, down=ONE_WAY) as proxy:
            kwargs.update(port=proxy.port, wait_for_logout=wait)
            took = await use_and_close(kwargs, 3)
            if wait:  # the answer crossed the proxy back
                assert took >= 2 * ONE_WAY
            else:  # written, and the sockets closed: less than the round trip
                assert took < 2 * ONE_WAY
            # The proxy delivers what was written (LOGOUT, then the close) while it runs.
            ends = await trio.to_thread.run_sync(session_ends, server, offset)
    assert ends == ["Logged out"] * 3


async def test_a_connection_retired_without_waiting_for_logout_is_replaced(
    server: DovecotServer,
) -> None:
    """close_idle() retires with the same LOGOUT; the pool goes on with a new connection."""
    kwargs = server.pool_kwargs(USER, tls=False)
    offset = log_offset(server)
    with trio.fail_after(30):
        async with trio_imappool.open_pool(**kwargs, wait_for_logout=False) as pool:
            assert await pool.run_sync(lambda c: c.noop()) is not None
            assert pool.close_idle() == 1
            await pool.counts.wait_value(lambda c: c.size == 0)
            assert await pool.run_sync(lambda c: c.noop()) is not None
            stats = pool.statistics()
            assert stats.connections_closed == 1, stats
            assert stats.connections_discarded == 0, stats
    ends = await trio.to_thread.run_sync(session_ends, server, offset)
    assert ends == ["Logged out"] * 2


async def test_with_a_budget_places_come_back_once_the_server_has_closed(
    dovecot_factory: DovecotFactory, redis_server: RedisServer
) -> None:
    """Not waiting for LOGOUT's answer does not give a budget's place back early: Dovecot
    counts a session until it has closed its end, so a place given back at our close would
    let a process elsewhere be refused. At the server's limit, pools open and close in turn,
    each logging in as many connections as the limit allows, and none is refused."""
    limit = 3
    server = dovecot_factory(users={USER: PASSWORD}, max_userip_connections=limit)
    kwargs = server.pool_kwargs(USER, tls=False)
    budget = trio_imappool.RedisBudget(
        redis_server.url, limit=limit, lease=1.5, timeout=0.5, key="fast", restart_fence=0.0
    )
    # Through a proxy, LOGOUT reaches the server 0.2 s after our close: a place given back
    # at the close would be free while the server still counts the session.
    with trio.fail_after(30), budget:
        async with open_fault_proxy(server.host, kwargs["port"], up=0.2, down=0.02) as proxy:
            kwargs["port"] = proxy.port
            for _ in range(3):
                async with trio_imappool.open_pool(
                    **kwargs, max_size=limit, budget=budget, wait_for_logout=False
                ) as pool:
                    async with trio.open_nursery() as nursery:
                        for _ in range(limit):

                            async def use() -> None:
                                async with pool.connection("INBOX"):
                                    await trio.sleep(0.05)

                            nursery.start_soon(use)
                    await pool.counts.wait_value(lambda c: c.idle == limit)
                stats = pool.statistics()
                assert (stats.connections_opened, stats.open_failures) == (limit, 0), stats
                for _ in range(500):  # the places come back in the background
                    if (await budget.counts())[0] == 0:
                        break
                    await trio.sleep(0.01)
                assert await budget.counts() == (0, 0)
                # Given back only once the server had closed every session.
                assert await trio.to_thread.run_sync(server.connections, USER) == 0


def test_the_wait_for_logout_option_is_checked() -> None:
    with pytest.raises(trio_imappool.ConfigurationError, match="wait_for_logout"):
        trio_imappool.PoolConfig.build(
            "127.0.0.1",
            username="u",
            password="p",
            ssl=False,
            wait_for_logout="no",  # type: ignore[arg-type]
        )
    config = trio_imappool.PoolConfig.build("127.0.0.1", username="u", password="p", ssl=False)
    assert config.wait_for_logout is True  # the library's default is unchanged


def test_the_command_line_ends_its_sessions_with_logout_without_waiting(
    server: DovecotServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seed_folders(server, {"INBOX": 5, "Archive": 5}, user=USER, size=500)
    monkeypatch.setenv("TRIO_IMAPPOOL_PASSWORD", PASSWORD)
    argv = ["export", "--host", server.host, "--port", str(server.imap_port), "--plain"]
    argv += ["--user", USER, "-c", "3", "--no-progress", str(tmp_path / "m")]
    for run in range(2):  # a first export (up to 3 connections), then a no-change run (1)
        offset = log_offset(server)
        assert main(argv) == 0
        ends = session_ends(server, offset)
        if run == 0:
            # A connection the first export opened ahead and never needed may still have been
            # logging in when the export ended: abandoned before the pool had it, no LOGOUT.
            assert "Logged out" in ends
            assert set(ends) <= {"Logged out", "Connection closed (No commands sent)"}, ends
        else:
            assert ends == ["Logged out"]
    out = capsys.readouterr()
    assert "nothing new" in out.out
    assert out.err == ""


# -- export --delete with --accounts ------------------------------------------------------------

ACCOUNTS = {"d0": "pw0", "d1": "pw1"}


def test_delete_with_many_accounts_removes_what_each_account_lost(
    dovecot_factory: DovecotFactory,
    redis_server: RedisServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = dovecot_factory(users=ACCOUNTS, max_userip_connections=5)
    for user in ACCOUNTS:
        seed_folders(server, {"INBOX": 6}, user=user, size=500)
        monkeypatch.setenv(f"TRIO_IMAPPOOL_PASSWORD_{user.upper()}", ACCOUNTS[user])
    monkeypatch.delenv("TRIO_IMAPPOOL_PASSWORD", raising=False)
    accounts = tmp_path / "accounts.txt"
    out = tmp_path / "mail"
    argv = ["export", "--accounts", str(accounts), "--budget", redis_server.url]
    argv += ["--host", server.host, "--port", str(server.imap_port), "--plain", "-c", "2"]

    def files(user: str) -> int:
        return sum(1 for p in (out / user).rglob("*") if p.parent.name in ("cur", "new"))

    accounts.write_text("d0\nd1\n", encoding="utf-8")
    assert main([*argv, str(out)]) == 0
    assert [files(user) for user in ACCOUNTS] == [6, 6]
    # Three messages expunged from d0's INBOX, none from d1's.
    imap = IMAPClient(server.host, server.imap_port, ssl=False, timeout=10)
    try:
        imap.login("d0", ACCOUNTS["d0"])
        imap.select_folder("INBOX")
        imap.delete_messages(imap.search("ALL")[:3])
        imap.expunge()
    finally:
        imap.logout()
    # The done marks are per accounts file: a second run is a new file's (a comment line).
    accounts.write_text("# again\nd0\nd1\n", encoding="utf-8")
    assert main([*argv, str(out)]) == 0  # by default the copies stay
    assert [files(user) for user in ACCOUNTS] == [6, 6]
    accounts.write_text("# once more\nd0\nd1\n", encoding="utf-8")
    assert main([*argv, "--delete", str(out)]) == 0
    assert [files(user) for user in ACCOUNTS] == [3, 6]
    lines = capsys.readouterr().out.splitlines()
    assert sorted(lines[-2:]) == [
        "d0: exported 0 messages, removed 3 gone from the server",
        "d1: exported 0 messages",
    ]
