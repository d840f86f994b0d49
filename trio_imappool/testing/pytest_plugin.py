"""pytest fixtures that run tests against a real Dovecot IMAP server.

This plugin is registered as the ``trio_imappool`` ``pytest11`` entry point, so every pytest run
in an environment where trio-imappool is installed loads it. It imports nothing heavy and starts
nothing until a test asks for one of its fixtures:

``dovecot`` (session scope)
    One :class:`~trio_imappool.testing.DovecotServer` shared by the whole session, with users
    ``alice``/``alice-pw`` and ``bob``/``bob-pw`` and ``max_userip_connections=200``. Tests
    share its mailboxes: do not stop or restart it, and kick or limit only users of the test's
    own (:meth:`~trio_imappool.testing.DovecotServer.add_user` works at once); take a server of
    your own from ``dovecot_factory`` for anything else.

``dovecot_factory`` (function scope)
    A callable taking the keyword arguments of
    :func:`~trio_imappool.testing.start_dovecot` and returning a started server; every server it
    started is stopped and removed when the test ends.

``redis_server`` (function scope)
    A private, empty :class:`~trio_imappool.testing.RedisServer` (Debian's ``redis-server``)
    for the test; ``stop()`` and ``start()`` it to make Redis unreachable and then empty.

If Dovecot (or Redis) is not installed, the fixtures fail the test with the install hint. They
never skip: a CI run without Dovecot must go red, not quietly green.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from ._dovecot import DovecotFactory, DovecotServer
    from ._redis import RedisServer

__all__ = ["dovecot", "dovecot_factory", "redis_server"]


def _start(stack: contextlib.ExitStack, **kwargs: Any) -> DovecotServer:
    from ._dovecot import DovecotNotFoundError, start_dovecot

    try:
        return stack.enter_context(start_dovecot(**kwargs))
    except DovecotNotFoundError as exc:
        pytest.fail(f"these tests need a real Dovecot: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def dovecot() -> Iterator[DovecotServer]:
    """The session's shared Dovecot (alice and bob, ``max_userip_connections=200``)."""
    with contextlib.ExitStack() as stack:
        yield _start(stack, max_userip_connections=200)


@pytest.fixture
def dovecot_factory() -> Iterator[DovecotFactory]:
    """Start Dovecot servers of the test's own; all are stopped when the test ends."""
    with contextlib.ExitStack() as stack:

        def factory(**kwargs: Any) -> DovecotServer:
            return _start(stack, **kwargs)

        yield factory


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private, empty Redis (:func:`~trio_imappool.testing.start_redis`) for the test.

    Fails the test (never skips) if ``redis-server`` is not installed.
    """
    from ._redis import RedisNotFoundError, start_redis

    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(start_redis())
        except RedisNotFoundError as exc:
            pytest.fail(f"these tests need a real Redis: {exc}", pytrace=False)
        yield server
