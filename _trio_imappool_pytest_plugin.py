"""The ``trio_imappool`` pytest plugin: fixtures that run tests against a real Dovecot.

This module is what the ``pytest11`` entry point named ``trio_imappool`` loads, so pytest loads
it in every test run of every project whose environment has trio-imappool installed. It is a
top-level module, outside the ``trio_imappool`` package, for that reason: importing any module
of the package first runs the package's ``__init__``, which imports the whole library (trio,
imapclient, ...). This module imports only pytest and the standard library; the harness is
imported when a test first asks for a fixture. (Hypothesis ships its plugin the same way.)

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

``cyrus`` (session scope) and ``cyrus_factory`` (function scope)
    The same for Cyrus IMAP (:func:`~trio_imappool.testing.start_cyrus`): alice and bob, no
    per-user limit on the shared one. They fail, never skip, when Cyrus is not installed. When
    a test using one fails, the end of Cyrus's log is added to its report.

``imap_server`` (session scope, parametrised ``dovecot`` and ``cyrus``)
    The shared Dovecot, then the shared Cyrus: a test that takes it runs once against each. For
    tests of IMAP behaviour, not of one server's administration; both servers have
    ``pool_kwargs``, ``add_user``, ``kick``, ``connections`` and ``/`` as hierarchy separator.

``redis_server`` (function scope)
    A private, empty :class:`~trio_imappool.testing.RedisServer` (Debian's ``redis-server``)
    for the test; ``stop()`` and ``start()`` it to make Redis unreachable and then empty.

If Dovecot, its IMAP server (``dovecot-imapd``), Redis (``redis-server``) or trustme (the
``testing`` extra) is missing, the fixtures fail the test with what to install. They never
skip: a CI run without Dovecot must go red, not quietly green. ``-p no:trio_imappool`` turns
the plugin off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from trio_imappool.testing import (
        CyrusFactory,
        CyrusServer,
        DovecotFactory,
        DovecotServer,
        ImapServer,
        RedisServer,
    )

__all__ = ["cyrus", "cyrus_factory", "dovecot", "dovecot_factory", "imap_server", "redis_server"]


def _missing_trustme(exc: ModuleNotFoundError) -> None:
    if exc.name != "trustme":
        raise exc
    pytest.fail(
        f"these tests need trustme: {exc} (pip install 'trio-imappool[testing]')", pytrace=False
    )


def _start(stack: contextlib.ExitStack, **kwargs: Any) -> DovecotServer:
    try:
        from trio_imappool.testing import DovecotNotFoundError, start_dovecot
    except ModuleNotFoundError as exc:
        _missing_trustme(exc)
        raise
    try:
        return stack.enter_context(start_dovecot(**kwargs))
    except DovecotNotFoundError as exc:
        pytest.fail(f"these tests need a real Dovecot: {exc}", pytrace=False)
    except ModuleNotFoundError as exc:
        _missing_trustme(exc)
        raise


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
    from trio_imappool.testing import RedisNotFoundError, start_redis

    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(start_redis())
        except RedisNotFoundError as exc:
            pytest.fail(f"these tests need a real Redis: {exc}", pytrace=False)
        yield server


def _start_cyrus(stack: contextlib.ExitStack, **kwargs: Any) -> CyrusServer:
    try:
        from trio_imappool.testing import CyrusNotFoundError, start_cyrus
    except ModuleNotFoundError as exc:
        _missing_trustme(exc)
        raise
    try:
        server = stack.enter_context(start_cyrus(**kwargs))
    except CyrusNotFoundError as exc:
        pytest.fail(f"these tests need a real Cyrus IMAP: {exc}", pytrace=False)
    _cyrus_servers.append(server)
    stack.callback(_cyrus_servers.remove, server)
    return server


# The running Cyrus servers, whose log a failed test's report shows.
_cyrus_servers: list[CyrusServer] = []


@pytest.fixture(scope="session")
def cyrus() -> Iterator[CyrusServer]:
    """The session's shared Cyrus IMAP (alice and bob, no per-user limit)."""
    with contextlib.ExitStack() as stack:
        yield _start_cyrus(stack)


@pytest.fixture
def cyrus_factory() -> Iterator[CyrusFactory]:
    """Start Cyrus servers of the test's own; all are stopped when the test ends."""
    with contextlib.ExitStack() as stack:

        def factory(**kwargs: Any) -> CyrusServer:
            return _start_cyrus(stack, **kwargs)

        yield factory


@pytest.fixture(scope="session", params=["dovecot", "cyrus"])
def imap_server(request: pytest.FixtureRequest) -> ImapServer:
    """The shared Dovecot, then the shared Cyrus (see the module's docstring)."""
    server: ImapServer = request.getfixturevalue(request.param)
    return server


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    names = " ".join([*getattr(item, "fixturenames", ()), item.name])
    if report.failed and _cyrus_servers and "cyrus" in names:
        for server in _cyrus_servers:
            report.sections.append((f"Cyrus log ({server.imap_port})", server.log_tail()))
    return report
