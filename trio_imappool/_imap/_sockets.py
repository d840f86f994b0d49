"""Opening a connection the pool can interrupt, and the socket-level looks the pool takes.

imaplib makes, connects and secures its socket and reads the greeting inside
``IMAP4.__init__``; imapclient then asks for CAPABILITY. The subclasses here change two things:
the socket is shown to the pool (*on_socket*) before every blocking step, so that the pool can
shut it down from outside and wake the thread; and the CAPABILITY a greeting already carried is
taken from the greeting instead of being asked for again. The functions after them are the few
places the pool looks past imapclient at imaplib's socket, buffer and timeouts.

Blocking code for worker threads; no Trio here.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Callable
from typing import Any

from imapclient import IMAPClient, SocketTimeout
from imapclient.imap4 import IMAP4WithTimeout
from imapclient.tls import IMAP4_TLS

__all__ = [
    "TLSIMAP4",
    "OpenInterrupted",
    "PlainIMAP4",
    "close_client",
    "has_buffered_data",
    "holds_unread",
    "logout_unanswered",
    "set_timeouts",
    "socket_of",
]

#: ``on_socket(sock)``: shown each new socket before a blocking step; raises
#: :class:`OpenInterrupted` once the pool has given up on the open.
OnSocket = Callable[[socket.socket], None]


class _GreetingCapabilities:
    """imaplib asks for CAPABILITY after the greeting even when the greeting carried them.

    Servers that put ``[CAPABILITY ...]`` in their greeting (Dovecot, Cyrus, most providers)
    have already said everything that command would return (RFC 9051 7.1), so this takes the
    list from the greeting and saves a round trip on every connection the pool opens. Later
    reads (after STARTTLS or LOGIN) go to the server as before.
    """

    _greeted = False
    untagged_responses: dict[str, list[Any]]
    capabilities: tuple[str, ...]

    def _get_capabilities(self) -> None:
        # Asked after the greeting and after STARTTLS, which replaced the socket (the old
        # object is detached): show the pool the socket the answer will be read from.
        show = getattr(self, "_show", None)
        if show is not None:
            show(self.sock)  # type: ignore[attr-defined]
        if not self._greeted:
            self._greeted = True
            announced = self.untagged_responses.pop("CAPABILITY", None)
            if announced and isinstance(announced[-1], bytes):
                self.capabilities = tuple(str(announced[-1], "ascii").upper().split())
                return
        super()._get_capabilities()  # type: ignore[misc]


class OpenInterrupted(OSError):
    """The pool gave up on an open while its worker thread was still connecting."""


class _ShownSocket:
    """imaplib makes its socket inside ``IMAP4.__init__`` and then connects it, shakes hands
    (TLS) and reads the greeting, all before the caller gets the client: a server that trickles
    its greeting a byte at a time keeps that thread forever, since each byte restarts the
    socket's timeout. This makes the socket itself and shows it to the pool (*on_socket*)
    before any blocking step, so that the pool can shut it down from outside, which wakes the
    thread at once, as it does for commands. *on_socket* raises once the pool has given up.
    """

    host: str
    port: int
    _timeout: float | None
    _on_socket: OnSocket | None = None

    def _create_socket(self, timeout: float | None = None) -> socket.socket:
        if timeout is None:
            timeout = self._timeout
        error: OSError | None = None
        for family, kind, proto, _, address in socket.getaddrinfo(
            self.host, self.port, type=socket.SOCK_STREAM
        ):
            sock = socket.socket(family, kind, proto)
            try:
                self._show(sock)
                sock.settimeout(timeout)
                sock.connect(address)
                # Shown again once connected: an interrupt that came between the first look
                # and connect() found an unconnected socket, where shutdown() does nothing.
                self._show(sock)
                return self._secure(sock)
            except OpenInterrupted:
                sock.close()
                raise
            except OSError as exc:
                sock.close()
                error = exc
        raise error or OSError(f"no address for {self.host!r}")

    def _show(self, sock: socket.socket) -> None:
        if self._on_socket is not None:
            self._on_socket(sock)

    def _secure(self, sock: socket.socket) -> socket.socket:
        return sock


class PlainIMAP4(_GreetingCapabilities, _ShownSocket, IMAP4WithTimeout):  # type: ignore[misc]
    """imapclient's plain-text imaplib connection, shown to the pool, greeting read once."""

    def __init__(
        self, host: str, port: int, timeout: float | None, on_socket: OnSocket | None
    ) -> None:
        self._on_socket = on_socket
        super().__init__(host, port, timeout)


class TLSIMAP4(_GreetingCapabilities, _ShownSocket, IMAP4_TLS):  # type: ignore[misc]
    """imapclient's implicit-TLS imaplib connection, shown to the pool before the handshake."""

    def __init__(
        self,
        host: str,
        port: int,
        ssl_context: Any,
        timeout: float | None,
        on_socket: OnSocket | None,
    ) -> None:
        self._on_socket = on_socket
        super().__init__(host, port, ssl_context, timeout)

    def _secure(self, sock: socket.socket) -> socket.socket:
        context = self.ssl_context or ssl.create_default_context()
        secured = context.wrap_socket(
            sock, server_hostname=self.host, do_handshake_on_connect=False
        )
        self._show(secured)  # the handshake can stall too
        secured.do_handshake()
        return secured


def socket_of(client: IMAPClient) -> Any:
    """The socket imaplib reads from now (STARTTLS replaces it)."""
    return client._imap.sock


def set_timeouts(client: IMAPClient, connect: float, read: float) -> None:
    """Give a logged-in client its timeouts for commands: *read* on the socket now, and both
    where imapclient keeps them (it reads them again for STARTTLS and its own reconnects)."""
    client._timeout = SocketTimeout(connect=connect, read=read)
    client.socket().settimeout(read)


def has_buffered_data(imap: Any) -> bool:
    """Whether imaplib holds bytes it has read from the socket but nobody has parsed: the
    socket's readability cannot show them. Never blocks (the socket is made non-blocking for
    the look). Only from the thread that owns the connection."""
    sock = imap.sock
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    timeout = sock.gettimeout()
    try:
        sock.setblocking(False)
        return bool(imap.file.peek(1))
    except (OSError, ValueError):
        return False
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(timeout)


def holds_unread(client: IMAPClient) -> bool:
    """:func:`has_buffered_data` of the client's imaplib connection."""
    return has_buffered_data(client._imap)


def close_client(client: Any) -> None:
    """Close the client's socket without a LOGOUT. Only when no thread is using it.

    *client* is the pool's client (its ``logged_out`` record is set: no LOGOUT is owed).
    """
    client.logged_out = True
    with contextlib.suppress(OSError):
        client._imap.shutdown()


def logout_unanswered(client: Any) -> None:
    """Write LOGOUT and close the socket at once, without reading the answer. Blocking (the
    write, bounded by the socket's timeout); only when no thread is using the client.

    The server ends the session when it reads the LOGOUT (RFC 9051 6.1.3: it answers BYE and
    OK, then closes): the answer is not waited for, which saves a round trip when the client
    is done. The socket is closed however the write goes.
    """
    imap = client._imap
    try:
        imap.state = "LOGOUT"
        imap._command("LOGOUT")
    finally:
        close_client(client)
