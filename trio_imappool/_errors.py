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
from typing import Final, NamedTuple

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
    """The server refused the connection because the account has too many, or asks us to slow
    down (``[LIMIT]``, ``[UNAVAILABLE]``, Gmail's "Too many simultaneous connections", Cyrus's
    "Too many open connections"; all wordings are in :data:`REFUSALS`)."""


class BudgetUnavailableError(ConnectError):
    """The Redis of a connection budget (:class:`~trio_imappool.RedisBudget`) is unreachable,
    so no place could be taken for a new connection. Connections that exist keep working; the
    pool tries again (with backoff) and recovers by itself when Redis is back. The message
    names Redis by host, port and database, never with its password."""


# -- reading imapclient's exceptions ---------------------------------------------------------


class Refusal(NamedTuple):
    """One way a server says "too many connections" (or "not now") rather than "wrong password".

    Attributes:
        marker: Upper-case text whose presence in the server's answer identifies the refusal.
        server: Who answers so.
        example: A whole answer, as the server sends it.
        source: Where the wording is known from.
    """

    marker: str
    server: str
    example: str
    source: str


REFUSALS: tuple[Refusal, ...] = (
    Refusal(
        "[LIMIT]",
        "Dovecot (mail_max_userip_connections); any RFC 5530 server",
        "a1 NO [LIMIT] Maximum number of connections from user+IP exceeded "
        "(mail_max_userip_connections=10)",
        "RFC 5530 3; Dovecot 2.3.19, seen in this project's tests",
    ),
    Refusal(
        "MAXIMUM NUMBER OF CONNECTIONS",
        "Dovecot and its proxies when the code is dropped",
        "a1 NO Maximum number of connections from user+IP exceeded",
        "Dovecot 2.3 source text (the same limit without the response code)",
    ),
    Refusal(
        "TOO MANY SIMULTANEOUS CONNECTIONS",
        "Gmail (about 15 per account)",
        "a1 NO [ALERT] Too many simultaneous connections. (Failure)",
        "Gmail, reported by users and seen against imap.gmail.com (FIELD-NOTES)",
    ),
    Refusal(
        "TOO MANY OPEN CONNECTIONS",
        "Cyrus IMAP (maxlogins_per_user, maxlogins_per_host)",
        "a1 NO Too many open connections (3 of 3 for alice)",
        "Cyrus 3.6, seen in this project's tests (start_cyrus(max_logins_per_user=...))",
    ),
    Refusal(
        "USER IS AUTHENTICATED BUT NOT CONNECTED",
        "Microsoft 365 / Exchange Online, throttled: BAD to the first command after LOGIN",
        "a2 BAD User is authenticated but not connected.",
        "Microsoft 365, reported by users of many IMAP clients (FIELD-NOTES)",
    ),
    Refusal(
        "[UNAVAILABLE]",
        "Yahoo and other RFC 5530 servers, temporarily",
        "a1 NO [UNAVAILABLE] Try again later",
        "RFC 5530 3",
    ),
    Refusal(
        "[THROTTLED]",
        "Gmail, when the account sends or downloads too much",
        "a1 NO [THROTTLED] Account exceeded command or bandwidth limits",
        "Gmail (FIELD-NOTES); not in an RFC",
    ),
)
"""The connection-limit and throttling refusals the pool recognises, in one table.

Any of these markers in a failed LOGIN (or in a failure of the first command after it) makes
the open a :class:`ConnectionLimitError`: the pool keeps the connections it has, uses them as
its effective size, and tries one more later. Two refusals carry no words at all and are told
apart by circumstance, in :func:`classify_open_error`: a plain ``NO`` to LOGIN while the pool
has other connections open (whose credentials obviously worked), and a connection closed
before the greeting while the pool's other connections are healthy (Courier-IMAP's
``-maxperip``). Only ``[AUTHENTICATIONFAILED]``, or a plain ``NO`` when the pool has nothing
else open, means wrong credentials.
"""

_AUTHENTICATION_FAILED = "[AUTHENTICATIONFAILED]"


def refusal_of(exc: BaseException) -> Refusal | None:
    """The entry of :data:`REFUSALS` whose marker the error's text holds, if any."""
    text = str(exc).upper()
    return next((refusal for refusal in REFUSALS if refusal.marker in text), None)


def closed_before_greeting(exc: BaseException) -> bool:
    """Whether an open failed because the server closed the connection cleanly without a
    word: EOF before the greeting, or a TLS handshake ended by EOF (Courier-IMAP's per-IP
    limit). A reset (RST: a network fault) or a refused connection (nothing listening) is not
    one."""
    if isinstance(exc, imaplib.IMAP4.abort) and not isinstance(
        exc, imap_exc.IMAPClientReadOnlyError
    ):
        return "EOF" in str(exc).upper()
    return isinstance(exc, EOFError | ssl.SSLEOFError)


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
    ``run_sync``, discards it (a reconnect is cheap; a confused connection is not). A BAD that
    says the session is not usable (Microsoft 365's "User is authenticated but not connected")
    discards it too.
    """
    if isinstance(exc, imap_exc.IMAPClientReadOnlyError | ConfigurationError):
        # Raised before anything is sent: the mailbox is read-only, or an argument (a folder
        # name with a line break) was refused.
        return True
    if isinstance(exc, imaplib.IMAP4.abort | imap_exc.ProtocolError | OSError | ssl.SSLError):
        return False
    if isinstance(exc, _COMMAND_FAILED):
        return True
    # A plain IMAPClientError (imaplib.IMAP4.error) is what imapclient raises for a tagged NO or
    # BAD; its other subclasses (ProtocolError, handled above) mean trouble. So does the one
    # imaplib raises for an over-long line (it stopped reading in the middle of a response),
    # and Microsoft 365's refusal of a throttled session.
    if type(exc) is not imap_exc.IMAPClientError or _session_refused(exc):
        return False
    return not str(exc).startswith(_READ_STOPPED_MIDWAY)


# imaplib's texts for a plain IMAP4.error raised while a response was only partly read.
_READ_STOPPED_MIDWAY: Final = ("got more than",)


def _session_refused(exc: BaseException) -> bool:
    return "USER IS AUTHENTICATED BUT NOT CONNECTED" in str(exc).upper()


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


def classify_open_error(
    exc: BaseException, *, others_open: bool = False, others_healthy: bool = False
) -> type[ConnectError]:
    """Which :class:`ConnectError` subclass describes a failure to open a connection.

    Args:
        exc: What opening raised.
        others_open: Whether the pool has other connections open (logged in with the same
            credentials): then a ``NO`` to LOGIN without ``[AUTHENTICATIONFAILED]`` is a
            refusal, not wrong credentials.
        others_healthy: Whether those connections look alive (their sockets show no EOF):
            then a connection closed before the greeting is a refusal, not an outage.
    """
    if isinstance(exc, BudgetUnavailableError):
        return BudgetUnavailableError
    if refusal_of(exc) is not None:
        return ConnectionLimitError
    if others_healthy and closed_before_greeting(exc):
        return ConnectionLimitError
    if isinstance(exc, ssl.SSLError | StartTLSNotOffered):
        return TLSError
    if isinstance(exc, imap_exc.LoginError):
        if others_open and _AUTHENTICATION_FAILED not in str(exc).upper():
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
