"""How imapclient's exceptions are read: which ones leave a connection usable."""

from __future__ import annotations

import imaplib
import socket
import ssl

import pytest
import trio
from imapclient import exceptions as imap_exc

from trio_imappool import (
    AuthenticationError,
    ConfigurationError,
    ConnectError,
    ConnectionLimitError,
    PoolClosedError,
    PoolError,
    PoolTimeout,
    ReleasedConnectionError,
)
from trio_imappool._errors import (
    classify_open_error,
    connection_survives,
    is_permanent_open_error,
)


@pytest.mark.parametrize(
    "exc",
    [
        imap_exc.IMAPClientError("NO [NONEXISTENT] Mailbox doesn't exist"),
        imap_exc.CapabilityError("Server does not support UNSELECT"),
        imap_exc.IllegalStateError("command SEARCH illegal in state AUTH"),
        imap_exc.InvalidCriteriaError("BAD"),
        imap_exc.IMAPClientReadOnlyError("mailbox status changed to READ-ONLY"),
    ],
)
def test_failed_commands_keep_the_connection(exc: BaseException) -> None:
    assert connection_survives(exc)


@pytest.mark.parametrize(
    "exc",
    [
        imap_exc.IMAPClientAbortError("socket error: EOF"),
        imap_exc.ProtocolError("unexpected response"),
        TimeoutError("timed out"),
        BrokenPipeError(),
        ConnectionResetError(),
        OSError("cannot read from timed out object"),
        ssl.SSLError("bad record mac"),
        KeyError("a bug in the user's own function"),
        ValueError("invalid literal for int()"),
        KeyboardInterrupt(),
    ],
)
def test_doubtful_errors_discard_the_connection(exc: BaseException) -> None:
    assert not connection_survives(exc)


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        (b"[AUTHENTICATIONFAILED] Authentication failed.", AuthenticationError),
        (b"[LIMIT] Maximum number of connections from user+IP exceeded", ConnectionLimitError),
        (b"[UNAVAILABLE] Try again later", ConnectionLimitError),
        (b"[ALERT] Too many simultaneous connections. (Failure)", ConnectionLimitError),
    ],
)
def test_login_errors_are_told_apart(text: bytes, kind: type[ConnectError]) -> None:
    assert classify_open_error(imap_exc.LoginError(str(text))) is kind


def test_other_open_failures_are_connect_errors() -> None:
    assert classify_open_error(ConnectionRefusedError()) is ConnectError
    assert classify_open_error(socket.gaierror()) is ConnectError


def test_only_credentials_and_certificates_are_permanent() -> None:
    assert is_permanent_open_error(AuthenticationError("x"))
    refused = ConnectError("x")
    refused.__cause__ = ConnectionRefusedError()
    assert not is_permanent_open_error(refused)
    cert = ConnectError("x")
    cert.__cause__ = ssl.SSLCertVerificationError("unknown CA")
    assert is_permanent_open_error(cert)
    limited = ConnectionLimitError("x")
    assert not is_permanent_open_error(limited)


def test_the_hierarchy_reuses_trios_meanings() -> None:
    for cls in (ConfigurationError, PoolClosedError, ReleasedConnectionError, PoolTimeout):
        assert issubclass(cls, PoolError)
    assert issubclass(ConfigurationError, ValueError)
    assert issubclass(PoolClosedError, trio.ClosedResourceError)
    assert issubclass(ReleasedConnectionError, trio.ClosedResourceError)
    assert issubclass(PoolTimeout, trio.TooSlowError)
    assert issubclass(AuthenticationError, ConnectError)
    assert issubclass(ConnectionLimitError, ConnectError)
    assert imaplib.IMAP4.readonly is imap_exc.IMAPClientReadOnlyError
