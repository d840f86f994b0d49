"""Tests of the Dovecot test harness (trio_imappool.testing) against a real Dovecot.

Rules of this module: loopback only; every connection has connect and read timeouts and is
closed (``filterwarnings = error`` turns a leaked socket into a failure); tests that stop, kick,
limit or add users take a server of their own from ``dovecot_factory``, and the shared
``dovecot`` server is only logged into and seeded (in folders of the test's own).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import imapclient
import pytest
import trustme
from imapclient.exceptions import IMAPClientAbortError, LoginError
from imapclient.imapclient import SocketTimeout

import _trio_imappool_pytest_plugin
from trio_imappool.testing import (
    DovecotFactory,
    DovecotNotFoundError,
    DovecotServer,
    DovecotStartError,
    make_message,
    message_date,
    seed_folders,
    start_dovecot,
)

pytest_plugins = ["pytester"]

TIMEOUT = SocketTimeout(connect=5.0, read=10.0)


@contextlib.contextmanager
def connect(
    server: DovecotServer, user: str | None = None, *, mode: str = "plain", login: bool = True
) -> Iterator[Any]:
    """An imapclient connection in mode "plain", "starttls" or "tls", always closed after."""
    settings = server.pool_kwargs(user, tls=mode == "tls")
    client = imapclient.IMAPClient(
        settings["host"],
        settings["port"],
        ssl=settings["ssl"],
        ssl_context=settings["ssl_context"],
        timeout=TIMEOUT,
    )
    with client:  # logs out, or shuts the socket down if that fails
        client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if mode == "starttls":
            client.starttls(server.ssl_context())
        if login:
            client.login(settings["username"], settings["password"])
        yield client


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2.0).close()
    except ConnectionRefusedError:
        return True
    return False


# -- life cycle -------------------------------------------------------------------------------


def test_leaving_the_block_stops_dovecot_and_removes_its_folder() -> None:
    with start_dovecot(users={"carol": "carol-pw"}) as server:
        assert server.running
        assert server.host == "127.0.0.1"
        assert server.users == {"carol": "carol-pw"}
        assert (server.username, server.password) == ("carol", "carol-pw")
        assert server.base_dir.stat().st_mode & 0o777 == 0o755
        assert len(str(server.base_dir)) < 60
        assert server.log_path.is_file()
        assert "imap=" in repr(server)
        base_dir, port = server.base_dir, server.imap_port
    assert not server.running
    assert not base_dir.exists()
    assert refused(port)
    with pytest.raises(RuntimeError, match="closed"):
        server.start()


def test_stop_start_and_restart_keep_ports_and_mail(dovecot_factory: DovecotFactory) -> None:
    server = dovecot_factory()
    ports = (server.imap_port, server.imaps_port)
    uids = seed_folders(server, {"Keep": 3})["Keep"]
    with connect(server) as client:
        uidvalidity = client.select_folder("Keep")[b"UIDVALIDITY"]

        started = time.monotonic()
        server.stop()
        stop_seconds = time.monotonic() - started
        assert not server.running
        assert server.connections() == 0
        assert refused(server.imap_port) and refused(server.imaps_port)
        with pytest.raises(IMAPClientAbortError):
            client.noop()  # stopping dropped the connection
    server.stop()  # idempotent

    started = time.monotonic()
    server.start()
    start_seconds = time.monotonic() - started
    server.start()  # idempotent
    assert server.running
    assert (server.imap_port, server.imaps_port) == ports

    started = time.monotonic()
    server.restart()
    restart_seconds = time.monotonic() - started
    assert (server.imap_port, server.imaps_port) == ports
    with connect(server, mode="tls") as client:
        assert client.select_folder("Keep")[b"UIDVALIDITY"] == uidvalidity
        assert client.search() == uids
    assert stop_seconds < 2.0
    assert start_seconds < 5.0
    assert restart_seconds < 5.0


def test_start_failure_raises_with_the_log_tail() -> None:
    with (
        pytest.raises(DovecotStartError, match="no_such_setting"),
        start_dovecot(extra_config="no_such_setting = 1\n"),
    ):
        pytest.fail("unreachable")  # pragma: no cover


def test_missing_dovecot_raises_with_the_install_hint(tmp_path: Path) -> None:
    missing = tmp_path / "dovecot"
    with (
        pytest.raises(DovecotNotFoundError, match="apt-get install dovecot-imapd"),
        start_dovecot(dovecot_binary=missing),
    ):
        pytest.fail("unreachable")  # pragma: no cover
    assert issubclass(DovecotNotFoundError, RuntimeError)

    missing.write_text("not executable")
    with pytest.raises(DovecotNotFoundError), start_dovecot(dovecot_binary=missing):
        pytest.fail("unreachable")  # pragma: no cover


def test_bad_user_names_are_refused_before_starting() -> None:
    for users in ({}, {"a:b": "pw"}, {"alice": "pw\nroot"}, {"../x": "pw"}):
        with pytest.raises(ValueError), start_dovecot(users=users):
            pytest.fail("unreachable")  # pragma: no cover


# -- logging in -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["plain", "starttls", "tls"])
def test_login_works_plain_with_starttls_and_with_implicit_tls(
    dovecot: DovecotServer, mode: str
) -> None:
    with connect(dovecot, "bob", mode=mode) as client:
        assert isinstance(client.socket(), ssl.SSLSocket) == (mode != "plain")
        assert client.select_folder("INBOX")[b"READ-WRITE"]
        assert client.has_capability("MULTIAPPEND")
        assert client.has_capability("UNSELECT")


def test_pool_kwargs_describe_both_listeners(dovecot: DovecotServer) -> None:
    tls = dovecot.pool_kwargs()
    assert tls["port"] == dovecot.imaps_port
    assert tls["ssl"] is True
    assert isinstance(tls["ssl_context"], ssl.SSLContext)
    assert tls["ssl_context"].check_hostname
    assert (tls["username"], tls["password"]) == ("alice", "alice-pw")
    plain = dovecot.pool_kwargs("bob", tls=False)
    assert plain == {
        "host": "127.0.0.1",
        "port": dovecot.imap_port,
        "username": "bob",
        "password": "bob-pw",
        "ssl": False,
        "ssl_context": None,
    }
    with pytest.raises(KeyError):
        dovecot.pool_kwargs("nobody")


def tls_handshake(port: int, context: ssl.SSLContext, server_hostname: str) -> None:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5.0) as raw,
        context.wrap_socket(raw, server_hostname=server_hostname),
    ):
        pass


def test_the_certificate_is_valid_for_localhost_and_127_0_0_1_only(
    dovecot: DovecotServer,
) -> None:
    for name in ("localhost", "127.0.0.1"):
        tls_handshake(dovecot.imaps_port, dovecot.ssl_context(), name)
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        tls_handshake(dovecot.imaps_port, dovecot.ssl_context(), "imap.example.org")

    stranger = ssl.create_default_context()
    trustme.CA().configure_trust(stranger)
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_handshake(dovecot.imaps_port, stranger, "localhost")


def test_a_failed_login_does_not_slow_the_next_one(dovecot: DovecotServer) -> None:
    with connect(dovecot, login=False) as client, pytest.raises(LoginError, match="AUTHENTICATI"):
        client.login("alice", "wrong-password")
    started = time.monotonic()
    with connect(dovecot) as client:
        client.noop()
    assert time.monotonic() - started < 2.0


def test_the_session_server_has_alice_and_bob(dovecot: DovecotServer) -> None:
    assert dovecot.running
    # Other tests may have added users of their own.
    assert list(dovecot.users.items())[:2] == [("alice", "alice-pw"), ("bob", "bob-pw")]
    assert (dovecot.username, dovecot.password) == ("alice", "alice-pw")
    assert dovecot.max_userip_connections == 200


# -- server-side actions ----------------------------------------------------------------------


def test_kick_drops_only_that_users_connections(dovecot_factory: DovecotFactory) -> None:
    server = dovecot_factory()
    with (
        connect(server, "alice") as first,
        connect(server, "alice", mode="tls") as second,
        connect(server, "bob") as bob,
    ):
        assert server.connections("alice") == 2
        assert server.connections() == 3
        server.kick("alice")
        assert server.connections("alice") == 0
        for client in (first, second):
            with pytest.raises(IMAPClientAbortError):
                client.noop()
        bob.noop()
    server.kick("alice")  # nobody left to kick: fine


def test_max_userip_connections_is_enforced(dovecot_factory: DovecotFactory) -> None:
    server = dovecot_factory(users={"alice": "alice-pw"}, max_userip_connections=2)
    with (
        connect(server),
        connect(server),
        connect(server, login=False) as third,
        pytest.raises(LoginError, match=r"\[LIMIT\]"),
    ):
        third.login("alice", "alice-pw")
    # The limit counts live connections only: once they are gone, logins work again.
    deadline = time.monotonic() + 5.0
    while True:
        try:
            with connect(server), connect(server):
                break
        except LoginError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def test_add_user_works_at_once_while_running(dovecot_factory: DovecotFactory) -> None:
    server = dovecot_factory(users={"alice": "alice-pw"})
    with connect(server, login=False) as client, pytest.raises(LoginError):
        client.login("carol", "carol-pw")
    server.add_user("carol", "carol-pw")
    with connect(server, "carol") as client:
        assert client.select_folder("INBOX")[b"EXISTS"] == 0

    server.add_user("carol", "new-pw")
    with connect(server, "carol") as client:
        client.noop()
    with connect(server, login=False) as client, pytest.raises(LoginError):
        client.login("carol", "carol-pw")
    with pytest.raises(ValueError):
        server.add_user("dave", "pass:word")


def test_doveadm_reports_errors(dovecot_factory: DovecotFactory) -> None:
    server = dovecot_factory()
    assert "alice" in server.doveadm("user", "alice").stdout
    with pytest.raises(subprocess.CalledProcessError):
        server.doveadm("no-such-command")


# -- seeding ----------------------------------------------------------------------------------


def test_make_message_is_deterministic_crlf_ascii_and_sized() -> None:
    message = make_message("INBOX", 7)
    assert message == make_message("INBOX", 7)
    assert len(message) == 2000
    assert message.count(b"\n") == message.count(b"\r\n")
    assert b"\r\nSubject: Message 7 in INBOX\r\n" in message
    assert message.endswith(b"\r\n")
    assert message.isascii()
    for size in (1000, 2001, 2002, 2003, 10_000):
        assert len(make_message("Archive/2024", 3, size)) == size
    tiny = make_message("Archive/2024", 3, 1)  # headers and one line of body
    assert tiny.endswith(b"\r\n") and tiny.count(b"\r\n\r\n") == 1
    assert make_message("INBOX", 1) != make_message("INBOX", 2)
    ids = {
        line
        for folder in ("INBOX", "Sent", "Entwürfe")
        for i in range(3)
        for line in make_message(folder, i).split(b"\r\n")
        if line.startswith(b"Message-ID:")
    }
    assert len(ids) == 9
    assert b"Subject: =?utf-8?" in make_message("Entwürfe", 0)


def test_seed_folders_appends_byte_identical_messages(dovecot: DovecotServer) -> None:
    folders = {"Seed/One": 3, "Seed/Empty": 0, "Seed/Entwürfe": 2}
    first = seed_folders(dovecot, folders, user="bob", size=1000, flags=[r"\Seen"])
    assert {name: len(uids) for name, uids in first.items()} == folders
    # Seeding again adds new messages, numbered on from those already there.
    again = seed_folders(
        dovecot.pool_kwargs("bob", tls=True),
        {"Seed/One": 2},
        flags=lambda folder, i: [r"\Flagged"] if i % 2 else [],
    )
    assert again["Seed/One"][0] > first["Seed/One"][-1]

    with connect(dovecot, "bob") as client:
        assert client.folder_exists("Seed/Empty")
        client.select_folder("Seed/One", readonly=True)
        uids = first["Seed/One"] + again["Seed/One"]
        assert client.search() == uids
        fetched = client.fetch(uids, ["BODY.PEEK[]", "FLAGS", "INTERNALDATE"])
        for i, uid in enumerate(uids):
            size = 1000 if i < 3 else 2000
            assert fetched[uid][b"BODY[]"] == make_message("Seed/One", i, size)
            expected_flag = rb"\Seen" if i < 3 else (rb"\Flagged" if i % 2 else None)
            assert set(fetched[uid][b"FLAGS"]) - {rb"\Recent"} == (
                {expected_flag} if expected_flag else set()
            )
            internal = fetched[uid][b"INTERNALDATE"].astimezone()
            assert internal == message_date(i)
        client.select_folder("Seed/Entwürfe", readonly=True)
        fetched = client.fetch(first["Seed/Entwürfe"], ["BODY.PEEK[]"])
        assert [fetched[uid][b"BODY[]"] for uid in first["Seed/Entwürfe"]] == [
            make_message("Seed/Entwürfe", i, 1000) for i in range(2)
        ]


def test_seed_folders_is_fast_for_ten_thousand_messages(
    dovecot_factory: DovecotFactory,
) -> None:
    server = dovecot_factory(users={"alice": "alice-pw"})
    started = time.monotonic()
    uids = seed_folders(server, {"INBOX": 10_000})["INBOX"]
    assert time.monotonic() - started < 10.0
    assert uids == list(range(1, 10_001))
    with connect(server) as client:
        assert client.select_folder("INBOX", readonly=True)[b"EXISTS"] == 10_000


@pytest.mark.parametrize(
    "capabilities",
    ["IMAP4rev1 LITERAL+ UIDPLUS", "IMAP4rev1 LITERAL+", "IMAP4rev1 MULTIAPPEND"],
    ids=["no-multiappend", "neither", "no-uidplus-no-literal-plus"],
)
def test_seed_folders_works_without_multiappend_or_uidplus(
    dovecot_factory: DovecotFactory, capabilities: str
) -> None:
    server = dovecot_factory(extra_config=f"imap_capability = {capabilities}\n")
    uids = seed_folders(server, {"INBOX": 5, "Other": 2}, size=600, batch_size=2)
    assert uids == {"INBOX": [1, 2, 3, 4, 5], "Other": [1, 2]}
    with connect(server) as client:
        assert set(client.capabilities()) == set(capabilities.upper().encode().split())
        client.select_folder("INBOX", readonly=True)
        fetched = client.fetch(uids["INBOX"], ["BODY.PEEK[]"])
        assert [fetched[uid][b"BODY[]"] for uid in uids["INBOX"]] == [
            make_message("INBOX", i, 600) for i in range(5)
        ]


def test_seed_folders_refuses_user_with_settings(dovecot: DovecotServer) -> None:
    with pytest.raises(ValueError, match="user"):
        seed_folders(dovecot.pool_kwargs(), {"INBOX": 1}, user="bob")
    with pytest.raises(ValueError):
        seed_folders(dovecot, {"INBOX": -1})


# -- the pytest plugin ------------------------------------------------------------------------


def test_the_fixtures_fail_instead_of_skipping_without_dovecot(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack, pytest.raises(pytest.fail.Exception) as failed:
        _trio_imappool_pytest_plugin._start(stack, dovecot_binary=tmp_path / "missing-dovecot")
    assert "apt-get install dovecot-imapd" in str(failed.value)


def test_dovecot_factory_stops_its_servers_at_teardown(pytester: pytest.Pytester) -> None:
    record = pytester.path / "servers.txt"
    pytester.makepyfile(
        f"""
        def test_two_servers(dovecot_factory):
            one = dovecot_factory()
            two = dovecot_factory(users={{"zed": "zed-pw"}}, max_userip_connections=5)
            assert one.running and two.running and one.imap_port != two.imap_port
            with open({str(record)!r}, "w") as f:
                for server in (one, two):
                    f.write(f"{{server.base_dir}} {{server.imap_port}}\\n")
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    for line in record.read_text().splitlines():
        base_dir, port = line.split()
        assert not Path(base_dir).exists()
        assert refused(int(port))
