"""The pool's exceptions, and how imapclient's exceptions are read.

The hierarchy is small and flat. Every error the pool raises by itself derives from
:class:`PoolError`; where Trio already has an exception with the same meaning, ours derives from
it too, so ``except trio.TooSlowError`` and ``except trio.ClosedResourceError`` keep working.

Errors raised by an IMAP command are never wrapped: the caller sees imapclient's own exception.
Only opening a connection wraps, because the caller did not ask for a connection to be opened and
needs to know that this is what failed (:class:`ConnectError`, with the original as
``__cause__``).
"""

from __future__ import annotations

import imaplib
import ssl
from typing import Final

import trio
from imapclient import exceptions as imap_exc

__all__ = [
    "AuthenticationError",
    "BudgetUnavailableError",
    "ConfigurationError",
    "ConnectError",
    "ConnectionLimitError",
    "PoolClosedError",
    "PoolError",
    "PoolTimeout",
    "ReleasedConnectionError",
    "TLSError",
]


class PoolError(Exception):
    """Base class of every error the pool raises by itself."""


class ConfigurationError(PoolError, ValueError):
    """An argument of :func:`open_pool` is invalid. Raised by :func:`open_pool` before anything
    is opened."""


class PoolClosedError(PoolError, trio.ClosedResourceError):
    """The pool is closed (or closing): no connection can be checked out of it any more."""


class ReleasedConnectionError(PoolError, trio.ClosedResourceError):
    """A :class:`~trio_imappool.Connection` was used after its ``async with`` block ended."""


class PoolTimeout(PoolError, trio.TooSlowError):
    """No connection became available within the pool's acquire timeout.

    The message carries the pool's counts at that moment and, if opening connections was
    failing, the last error (also set as ``__cause__``).
    """


class ConnectError(PoolError):
    """Opening a new connection failed (DNS, refused port, TLS, timeout, greeting, login).

    The original exception is ``__cause__``.
    """


class AuthenticationError(ConnectError):
    """The server rejected the credentials (``[AUTHENTICATIONFAILED]`` or an equivalent NO).

    Never retried by the pool: retrying a wrong password only locks accounts out.
    """


class TLSError(ConnectError):
    """TLS could not be set up: the handshake failed, the certificate or host name did not
    verify, or the server does not offer the STARTTLS that was asked for. The pool never falls
    back to plaintext."""


class StartTLSNotOffered(Exception):
    """Raised while opening: ``starttls=True`` but the server does not offer STARTTLS."""


class LoginDisabled(Exception):
    """Raised while opening: the server disables LOGIN on this connection (LOGINDISABLED) and
    offers no AUTHENTICATE PLAIN either; it wants TLS first."""


class ConnectionLimitError(ConnectError):
    """The server refused the login because the account has too many connections
    (``[LIMIT]``, ``[UNAVAILABLE]``, "Too many simultaneous connections")."""


class BudgetUnavailableError(ConnectError):
    """The Redis of a connection budget (:class:`~trio_imappool.RedisBudget`) is unreachable,
    so no place could be taken for a new connection. Connections that exist keep working; the
    pool tries again (with backoff) and recovers by itself when Redis is back. The message
    names Redis by host, port and database, never with its password."""


# -- reading imapclient's exceptions ---------------------------------------------------------

_LIMIT_MARKERS = (
    "[LIMIT]",
    "[UNAVAILABLE]",
    "TOO MANY SIMULTANEOUS CONNECTIONS",
    "MAXIMUM NUMBER OF CONNECTIONS",
)

# Raised by imapclient when a command failed but the connection is fine: a tagged NO or BAD, a
# missing capability, a command given in the wrong state, or criteria it could not encode.
_COMMAND_FAILED: tuple[type[BaseException], ...] = (
    imap_exc.CapabilityError,
    imap_exc.IllegalStateError,
    imap_exc.InvalidCriteriaError,
    imap_exc.LoginError,
)


def connection_survives(exc: BaseException) -> bool:
    """Whether a connection whose command raised *exc* may go back to the pool.

    Conservative: only the exceptions known to leave the connection in a known, usable state
    keep it. Anything else, including errors of the caller's own function given to
    ``run_sync``, discards it (a reconnect is cheap; a confused connection is not).
    """
    if isinstance(exc, imap_exc.IMAPClientReadOnlyError):
        # A subclass of abort, but raised before anything is sent: the mailbox is read-only.
        return True
    if isinstance(exc, imaplib.IMAP4.abort | imap_exc.ProtocolError | OSError | ssl.SSLError):
        return False
    if isinstance(exc, _COMMAND_FAILED):
        return True
    # A plain IMAPClientError (imaplib.IMAP4.error) is what imapclient raises for a tagged NO or
    # BAD; its other subclasses (ProtocolError, handled above) mean trouble. So does the one
    # imaplib raises for an over-long line: it stopped reading in the middle of a response.
    if type(exc) is not imap_exc.IMAPClientError:
        return False
    return not str(exc).startswith(_READ_STOPPED_MIDWAY)


# imaplib's texts for a plain IMAP4.error raised while a response was only partly read.
_READ_STOPPED_MIDWAY: Final = ("got more than",)


def suggests_server_gone(exc: BaseException) -> bool:
    """Whether a failure suggests that the server went away (restart, shutdown, network cut):
    then the other idle connections are likely dead too."""
    if isinstance(exc, imap_exc.IMAPClientReadOnlyError):
        return False
    return isinstance(
        exc,
        imaplib.IMAP4.abort
        | ConnectionResetError
        | ConnectionRefusedError
        | BrokenPipeError
        | ConnectionAbortedError
        | EOFError,
    )


def classify_open_error(exc: BaseException) -> type[ConnectError]:
    """Which :class:`ConnectError` subclass describes a failure to open a connection."""
    if isinstance(exc, BudgetUnavailableError):
        return BudgetUnavailableError
    if isinstance(exc, ssl.SSLError | StartTLSNotOffered):
        return TLSError
    if isinstance(exc, imap_exc.LoginError):
        text = str(exc).upper()
        if any(marker in text for marker in _LIMIT_MARKERS):
            return ConnectionLimitError
        return AuthenticationError
    return ConnectError


def is_permanent_open_error(exc: BaseException) -> bool:
    """Whether retrying the open cannot help: wrong credentials, a certificate that does not
    verify, a server without the STARTTLS asked for or without a login it allows."""
    cause = exc.__cause__ if isinstance(exc, ConnectError) else exc
    if isinstance(exc, AuthenticationError):
        return True
    return isinstance(cause, ssl.SSLCertVerificationError | StartTLSNotOffered | LoginDisabled)
