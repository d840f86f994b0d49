"""A real IMAP server for tests: a private Dovecot, seeded with known messages.

Tests of an IMAP client learn most against a real server. This package starts Dovecot (Debian's
``dovecot-imapd``) in a temporary folder on ``127.0.0.1`` with free ports, a TLS certificate
from an in-memory `trustme` CA, passwd-file users and maildir storage, and fills its folders
with deterministic messages::

    import imapclient
    from trio_imappool.testing import make_message, seed_folders, start_dovecot

    with start_dovecot(users={"alice": "alice-pw"}) as server:
        uids = seed_folders(server, {"INBOX": 10, "Archive/2024": 100})
        settings = server.pool_kwargs()  # implicit TLS, trusting the test CA
        client = imapclient.IMAPClient(
            settings["host"], settings["port"], ssl_context=settings["ssl_context"]
        )
        client.login(settings["username"], settings["password"])
        client.select_folder("INBOX")
        fetched = client.fetch(uids["INBOX"][:1], ["BODY.PEEK[]"])
        assert fetched[uids["INBOX"][0]][b"BODY[]"] == make_message("INBOX", 0)
        client.logout()
        server.kick("alice")  # drop connections from the server side
        server.restart()  # same ports, same mail

Faults and latency go through :func:`open_fault_proxy` (a Trio TCP proxy on 127.0.0.1 that can
add latency per direction, stall, reset, blackhole, cut after N bytes and refuse connections),
or :func:`start_proxy_thread` for blocking code.

With pytest, the ``dovecot`` (session) and ``dovecot_factory`` fixtures of
:mod:`trio_imappool.testing.pytest_plugin` are loaded automatically.

A second real server, Cyrus IMAP, starts the same way (:func:`start_cyrus`, the ``cyrus`` and
``cyrus_factory`` fixtures, and ``imap_server``, which runs a test against both).

For behaviour no real server here shows (hostile folder names, FETCH answers that leave a
message out, odd logins), :func:`open_scripted_server` and :func:`start_scripted_server_thread`
run a scripted IMAP server on 127.0.0.1: an in-memory account and a handler per command.

Everything else here is synchronous and bounded in time. Importing this package is cheap: `trustme`
and `imapclient` are imported when first needed.
"""

from ._cyrus import (
    CyrusFactory,
    CyrusNotFoundError,
    CyrusServer,
    CyrusStartError,
    ImapServer,
    find_cyrus,
    start_cyrus,
)
from ._dovecot import (
    DEFAULT_USERS,
    DovecotFactory,
    DovecotNotFoundError,
    DovecotServer,
    DovecotStartError,
    find_dovecot,
    start_dovecot,
)
from ._proxy import FaultProxy, ProxyStatistics, open_fault_proxy
from ._proxy_thread import ProxyThread, start_proxy_thread
from ._redis import RedisNotFoundError, RedisServer, find_redis, start_redis
from ._scripted import (
    DEFAULT_CAPABILITIES,
    ScriptedServer,
    ScriptedSession,
    open_scripted_server,
)
from ._scripted_account import ScriptedAccount, ScriptedFolder, ScriptedMessage
from ._scripted_command import ScriptedCommand
from ._scripted_thread import ScriptedServerThread, start_scripted_server_thread
from ._seed import make_message, message_date, seed_folders

__all__ = [
    "DEFAULT_CAPABILITIES",
    "DEFAULT_USERS",
    "CyrusFactory",
    "CyrusNotFoundError",
    "CyrusServer",
    "CyrusStartError",
    "DovecotFactory",
    "DovecotNotFoundError",
    "DovecotServer",
    "DovecotStartError",
    "FaultProxy",
    "ImapServer",
    "ProxyStatistics",
    "ProxyThread",
    "RedisNotFoundError",
    "RedisServer",
    "ScriptedAccount",
    "ScriptedCommand",
    "ScriptedFolder",
    "ScriptedMessage",
    "ScriptedServer",
    "ScriptedServerThread",
    "ScriptedSession",
    "find_cyrus",
    "find_dovecot",
    "find_redis",
    "make_message",
    "message_date",
    "open_fault_proxy",
    "open_scripted_server",
    "seed_folders",
    "start_cyrus",
    "start_dovecot",
    "start_proxy_thread",
    "start_redis",
    "start_scripted_server_thread",
]
