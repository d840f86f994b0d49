"""Opening one of the pool's clients: connect, STARTTLS and log in, as the configuration says.

The decisions live here: refuse to log in without TLS when STARTTLS was asked for and is not
offered, pick the login mechanism, refuse text that cannot go on the wire, and which errors
say so. What they drive on the wire (a socket the pool can interrupt, the capabilities from the
greeting, LOGIN with UTF-8 literals, the timeouts) is in :mod:`trio_imappool._imap`. Blocking
code, run in worker threads by :class:`trio_imappool._client.PooledClient`.
"""

from __future__ import annotations

import socket

from imapclient import IMAPClient, SocketTimeout
from imapclient.exceptions import LoginError

from ._config import PoolConfig, check_wire_text
from ._errors import LoginDisabled, StartTLSNotOffered
from ._imap import OnSocket, WireClient, close_client, login_with_literals, set_timeouts

__all__ = [
    "LoginError",
    "TrackingClient",
    "authenticate",
    "connect_client",
    "login_client",
    "login_with_literals",
]


class TrackingClient(WireClient):
    """The pool's client: :class:`~trio_imappool._imap.WireClient`, whose folder names are
    checked as the configuration checks its texts (a
    :class:`~trio_imappool.ConfigurationError` for CR, LF or NUL)."""

    check_text = staticmethod(check_wire_text)


def connect_client(config: PoolConfig, on_socket: OnSocket | None = None) -> TrackingClient:
    """Connect and upgrade with STARTTLS if asked: everything before the login. Blocking.

    The connect timeout covers TCP connect, TLS handshake, greeting and CAPABILITY (asked for
    only when the greeting lacks it); the login timeout covers STARTTLS. *on_socket* is shown
    the socket before each blocking step (see :class:`trio_imappool._imap.OpenInterrupted`).
    """
    client = TrackingClient(
        config.host,
        config.port,
        ssl=config.ssl,
        ssl_context=config.ssl_context,
        timeout=SocketTimeout(connect=config.connect_timeout, read=config.login_timeout),
        on_socket=on_socket,
    )
    try:
        # imapclient writes some commands in two pieces; without this each costs a delayed ACK.
        client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if config.starttls:
            if not client.has_capability("STARTTLS"):
                raise StartTLSNotOffered(
                    "starttls=True but the server does not offer STARTTLS: refusing to log in "
                    "without TLS"
                )
            client.starttls(config.ssl_context)
    except BaseException:
        close_client(client)
        raise
    return client


def login_client(client: TrackingClient, config: PoolConfig, token: str | None) -> None:
    """Log in a client from :func:`connect_client` (bounded by the login timeout), then set
    the read timeout for commands. Closes the client if it fails. Blocking.

    *token* is the OAuth2 access token when the pool logs in with one.
    """
    try:
        authenticate(client, config, token)
        # The post-login capabilities, now: free where the LOGIN answer carried them (Dovecot,
        # Cyrus), one round trip elsewhere, which also proves the session serves commands
        # (throttled Microsoft 365 answers them "BAD User is authenticated but not connected").
        client.capabilities()
        set_timeouts(client, config.connect_timeout, config.read_timeout)
    except BaseException:
        close_client(client)
        raise


def authenticate(client: IMAPClient, config: PoolConfig, token: str | None) -> None:
    """Log in with the configured mechanism (see ``PoolConfig.auth_mechanism``).

    A user name or password with non-ASCII characters goes as UTF-8: with ``"auto"`` in
    AUTHENTICATE PLAIN where the server offers it, else (and with ``"LOGIN"``) in LOGIN as a
    literal (RFC 9051 allows 8-bit octets there). No error raised here names any character of
    a secret: an encoding failure becomes a :class:`~imapclient.exceptions.LoginError` of its
    own wording, raised outside the failing ``except`` block so that no chained exception
    carries the original text either.
    """
    mechanism = config.auth_mechanism
    if token is not None:
        check_wire_text("the OAuth2 token", token)
        if mechanism == "OAUTHBEARER":
            client.oauthbearer_login(config.username, token)
        else:
            client.oauth2_login(config.username, token)
        return
    user, password = config.username, config.password or ""
    ascii_only = user.isascii() and password.isascii()
    if mechanism == "auto" and client.has_capability("LOGINDISABLED"):
        if not client.has_capability("AUTH=PLAIN"):
            raise LoginDisabled(
                "the server disables LOGIN on this connection and offers no AUTHENTICATE "
                "PLAIN: it wants TLS (ssl=True or starttls=True)"
            )
        mechanism = "PLAIN"
    elif mechanism == "auto" and not ascii_only and client.has_capability("AUTH=PLAIN"):
        mechanism = "PLAIN"
    unsendable = False
    try:
        if mechanism == "PLAIN":
            client.plain_login(user, password)
        elif ascii_only:
            client.login(user, password)
        else:
            login_with_literals(client, user, password)
    except UnicodeError:
        unsendable = True
    if unsendable:
        raise LoginError("the user name or password could not be sent to the server")
