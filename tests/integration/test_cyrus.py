"""Tests of the Cyrus IMAP test harness (trio_imappool.testing.start_cyrus) against a real Cyrus.

Rules of this module: loopback only; every connection has connect and read timeouts and is
closed; tests that stop, kick or limit take a server of their own from ``cyrus_factory``, and the
shared ``cyrus`` server is only logged into and seeded (in folders of the test's own).
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import imapclient
import pytest
from imapclient.exceptions import IMAPClientAbortError, LoginError
from imapclient.imapclient import SocketTimeout

from trio_imappool.testing import (
    CyrusFactory,
    CyrusNotFoundError,
    CyrusServer,
    make_message,
    message_date,
    seed_folders,
    start_cyrus,
)
from trio_imappool.testing._cyrus import _namespaces_work

pytest_plugins = ["pytester"]

TIMEOUT = SocketTimeout(connect=5.0, read=10.0)


@contextlib.contextmanager
def connect(
    server: CyrusServer, user: str | None = None, *, mode: str = "plain", login: bool = True
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
    with client:
        client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if mode == "starttls":
            client.starttls(server.ssl_context())
        if login:
            client.login(settings["username"], settings["password"])
        yield client


def eventually(check: Any, timeout: float = 2.0) -> None:
    """Wait until ``check()`` is true: Cyrus records a login in its session file just after
    answering it."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the condition did not become true in time"
        time.sleep(0.01)


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2.0).close()
    except ConnectionRefusedError:
        return True
    return False


def test_leaving_the_block_stops_cyrus_and_removes_its_folder() -> None:
    with start_cyrus(users={"carol": "carol-pw"}) as server:
        assert server.running
        assert server.users == {"carol": "carol-pw"}
        assert len(str(server.base_dir)) < 40  # Unix socket paths must stay short
        base_dir, port = server.base_dir, server.imap_port
    assert not server.running
    assert not base_dir.exists()
    assert refused(port)


def test_stop_start_and_restart_keep_ports_and_mail(cyrus_factory: CyrusFactory) -> None:
    server = cyrus_factory()
    uids = seed_folders(server, {"Keep": 2})
    ports = (server.imap_port, server.imaps_port)
    server.stop()
    assert not server.running and refused(server.imap_port)
    assert server.connections() == 0
    server.start()
    server.restart()
    assert (server.imap_port, server.imaps_port) == ports
    with connect(server) as client:
        client.select_folder("Keep")
        assert client.search() == uids["Keep"]


def test_login_works_plain_with_starttls_and_with_implicit_tls(cyrus: CyrusServer) -> None:
    for mode in ("plain", "starttls", "tls"):
        with connect(cyrus, "bob", mode=mode) as client:
            assert client.select_folder("INBOX")[b"READ-WRITE"]


def test_the_greeting_lists_only_pre_login_capabilities(cyrus: CyrusServer) -> None:
    with connect(cyrus, login=False) as client:
        assert b"[CAPABILITY " in client.welcome
        assert b"IDLE" not in client.welcome and b"MOVE" not in client.welcome
        client.login(cyrus.username, cyrus.password)
        for name in (b"IDLE", b"MOVE", b"UIDPLUS", b"UNSELECT", b"NAMESPACE", b"LIST-STATUS"):
            assert client.has_capability(name.decode()), name


def test_hierarchy_separator_is_slash_without_inbox_prefix(cyrus: CyrusServer) -> None:
    seed_folders(cyrus, {"Sep/Child": 1}, user="bob")
    with connect(cyrus, "bob") as client:
        assert client.namespace().personal == (("", "/"),)
        names = {name for _, delimiter, name in client.list_folders() if delimiter == b"/"}
        assert {"INBOX", "Sep", "Sep/Child"} <= names


def test_a_courier_like_namespace_on_request(cyrus_factory: CyrusFactory) -> None:
    """Without altnamespace and unixhierarchysep: personal namespace ``INBOX.``, delimiter
    ``.``, as on Courier-IMAP (a real server for the exporter's NAMESPACE handling)."""
    server = cyrus_factory(altnamespace=False, unixhierarchysep=False)
    assert server.delimiter == "."
    seed_folders(server, {"INBOX.Archive.2024": 1})
    with connect(server) as client:
        assert client.namespace().personal == (("INBOX.", "."),)
        names = {name for _, delimiter, name in client.list_folders() if delimiter == b"."}
        assert {"INBOX", "INBOX.Archive", "INBOX.Archive.2024"} <= names


def test_the_log_holds_cyrus_syslog_lines(cyrus: CyrusServer) -> None:
    if not _namespaces_work():  # not root, or a container without mount namespaces
        assert not cyrus.log_captured and "not captured" in cyrus.log_tail()
        return
    assert cyrus.log_captured
    with connect(cyrus, "bob"):
        pass
    deadline = time.monotonic() + 2.0
    while "login: localhost [127.0.0.1] bob" not in cyrus.log_tail(100_000):
        assert time.monotonic() < deadline, cyrus.log_tail()
        time.sleep(0.02)


def test_wrong_password_is_refused_without_a_response_code(cyrus: CyrusServer) -> None:
    started = time.monotonic()
    with connect(cyrus, login=False) as client, pytest.raises(LoginError) as caught:
        client.login(cyrus.username, "wrong")
    assert time.monotonic() - started < 1.0  # failedloginpause is 0, not Cyrus's 3 s
    assert "authentication failure" in str(caught.value)
    assert "[AUTHENTICATIONFAILED]" not in str(caught.value)


def test_the_per_user_limit_refuses_with_cyrus_wording(cyrus_factory: CyrusFactory) -> None:
    server = cyrus_factory(max_logins_per_user=2)
    with connect(server), connect(server):
        eventually(lambda: server.connections("alice") == 2)
        wording = r"Too many open connections \(2 of 2 for alice\)"
        with pytest.raises(LoginError, match=wording), connect(server):
            pass
        with connect(server, "bob"):  # per user, not per address
            eventually(lambda: server.connections() == 3)


def test_kick_drops_only_that_users_connections(cyrus_factory: CyrusFactory) -> None:
    server = cyrus_factory()
    with connect(server) as alice, connect(server, "bob") as bob:
        eventually(lambda: server.connections("bob") == 1)
        eventually(lambda: server.connections("alice") == 1)
        server.kick("alice")
        assert server.connections("alice") == 0
        with pytest.raises(IMAPClientAbortError):
            alice.noop()
        bob.noop()
        assert server.connections() == 1


def test_add_user_works_at_once_while_running(cyrus_factory: CyrusFactory) -> None:
    server = cyrus_factory()
    server.add_user("dave", "dave-pw")
    with connect(server, "dave") as client:
        assert client.select_folder("INBOX")[b"EXISTS"] == 0
    server.add_user("dave", "new-pw")
    with connect(server, "dave"):
        pass


def test_seed_folders_appends_byte_identical_messages(cyrus: CyrusServer) -> None:
    uids = seed_folders(cyrus, {"Seeded/Deep": 5}, user="bob")
    with connect(cyrus, "bob") as client:
        client.select_folder("Seeded/Deep")
        fetched = client.fetch(uids["Seeded/Deep"], ["BODY.PEEK[]"])
    for i, uid in enumerate(uids["Seeded/Deep"]):
        assert fetched[uid][b"BODY[]"] == make_message("Seeded/Deep", i)


def test_missing_cyrus_raises_with_the_install_hint(tmp_path: Path) -> None:
    with (
        pytest.raises(CyrusNotFoundError, match="apt-get download cyrus-imapd"),
        start_cyrus(cyrus_root=tmp_path),
    ):
        pass


def test_the_fixtures_fail_instead_of_skipping_without_cyrus(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(
        """
        def test_needs_cyrus(cyrus):
            pass
        """
    )
    monkeypatch.setenv("TRIO_IMAPPOOL_CYRUS_ROOT", str(tmp_path))
    monkeypatch.setattr("trio_imappool.testing._cyrus.DEFAULT_CYRUS_ROOT", str(tmp_path / "none"))
    monkeypatch.setattr("trio_imappool.testing._cyrus._BIN", "no/such/bin")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*these tests need a real Cyrus IMAP*"])


# -- Cyrus's quirks that the README's table names -------------------------------------------------


def test_creating_a_child_makes_its_parent_a_real_folder(cyrus: CyrusServer) -> None:
    """Unlike Dovecot, where the parent of ``Quirk/Child`` is not a folder at all."""
    seed_folders(cyrus, {"Quirk/Child": 1}, user="bob")
    with connect(cyrus, "bob") as client:
        listed = {name: flags for flags, _, name in client.list_folders("", "Quirk*")}
        assert set(listed) == {"Quirk", "Quirk/Child"}
        assert b"\\Noselect" not in listed["Quirk"]
        assert client.select_folder("Quirk", readonly=True)[b"EXISTS"] == 0


async def test_the_exporter_writes_such_a_parent_as_an_empty_folder(
    cyrus: CyrusServer, tmp_path: Path
) -> None:
    from trio_imappool import open_pool
    from trio_imappool.exporter import export_maildir

    cyrus.add_user("exporter", "exporter-pw")
    settings = cyrus.pool_kwargs("exporter", tls=False)
    uids = seed_folders(settings, {"Parent/Child": 2})
    async with open_pool(**settings, max_size=2) as pool:
        result = await export_maildir(pool, tmp_path / "Mail")
    assert {f.name for f in result.folders} == {"INBOX", "Parent", "Parent/Child"}
    assert result.messages_fetched == len(uids["Parent/Child"]) == 2
    assert (tmp_path / "Mail" / ".Parent" / "cur").is_dir()


def test_multiappend_of_bare_messages_is_refused(cyrus: CyrusServer) -> None:
    """Cyrus 3.6 answers BAD when a message after the first comes without flags or a date
    (imapclient then sends literal after literal); with dates, as seed_folders sends, it works.
    If this starts passing, the README's table is out of date."""
    messages = [make_message("Bare", 0), make_message("Bare", 1)]
    with connect(cyrus, "bob") as client:
        with pytest.raises(imapclient.exceptions.IMAPClientError, match="Missing required"):
            client.multiappend("INBOX", messages)
        dated = [{"msg": m, "date": message_date(i)} for i, m in enumerate(messages)]
        assert client.multiappend("INBOX", dated)[0] == "OK"
