"""Servers that refuse one more connection, in their many ways, and servers that say little in
their greeting: the pool must tell a refusal from wrong credentials and from an outage.

Rules of this module: loopback only; real servers (Cyrus with its per-user limit) wherever one
shows the behaviour, scripted servers only for Gmail's, Microsoft 365's and Courier's ways;
every test runs under ``trio.fail_after``.
"""

from __future__ import annotations

import imapclient
import pytest
import trio
from imapclient.exceptions import IMAPClientError, LoginError

from trio_imappool import AuthenticationError, ConnectionLimitError, open_pool
from trio_imappool._errors import REFUSALS, Refusal, classify_open_error, refusal_of
from trio_imappool.testing import CyrusFactory, CyrusServer

from .conftest import assert_settled


async def test_a_pool_above_cyrus_limit_settles_at_the_limit(
    cyrus_factory: CyrusFactory,
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
    assert "Too many open connections" in (stats.last_open_error or "")


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
