"""A TCP proxy that injects network faults, for tests and benchmarks.

A pool is only as good as its behaviour on a bad network, and a real bad network cannot be
summoned on demand. This proxy sits between a client and a server on ``127.0.0.1`` and, on
request, makes the link slow (a delay line per direction), stalls one direction, resets every
connection with a TCP RST, swallows traffic (a black hole: no data, no RST, the client just
waits), cuts connections after a number of bytes, or refuses new connections at the TCP level::

    import trio
    from trio_imappool.testing._proxy import open_fault_proxy

    async def main(imap_port: int) -> None:
        async with open_fault_proxy("127.0.0.1", imap_port) as proxy:
            proxy.set_latency(up=0.025, down=0.025)  # a 50 ms round trip
            ...  # connect clients to proxy.host, proxy.port
            proxy.reset_all()  # every client sees ECONNRESET
            await proxy.wait_connections(0)
            print(proxy.statistics())

Blocking code (imapclient without Trio, benchmarks, subprocesses) gets the same proxy running its
own ``trio.run`` in a background thread, with thread-safe methods::

    with start_proxy_thread("127.0.0.1", imap_port, up=0.025, down=0.025) as proxy:
        client = imapclient.IMAPClient(proxy.host, proxy.port, ssl=False)

How it works: every accepted connection gets four tasks, a reader and a writer per direction,
joined by a bounded memory channel of ``(time read, bytes)`` chunks. The writer sends each chunk
once ``time read + latency`` has passed, so a delay adds to every request and response but never
limits throughput or reorders bytes. Settings are read when a chunk is due, so changing the
latency, stalling or resuming applies at once to existing connections too. All tasks live in
the proxy's nursery; leaving the block closes every socket, and nothing outlives it.

Faults are plain TCP, as the kernel would produce them: a reset is ``SO_LINGER`` 0 then
``close()`` (the peer's next read raises :class:`ConnectionResetError`, after it has read the
bytes that reached it before), a refused connect is a closed listener
(:class:`ConnectionRefusedError`). An RST or EOF from one side is passed on to the other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import socket as _stdlib_socket
from collections.abc import AsyncIterator
from typing import Literal

import trio

from .._util import holds_only
from ._proxy_link import _Connection, _LinkSettings, _Way

__all__ = [
    "Direction",
    "FaultProxy",
    "ProxyStatistics",
    "open_fault_proxy",
]

Direction = Literal["up", "down", "both"]
"""Which way traffic flows: ``"up"`` is client to server, ``"down"`` server to client."""
_WAYS: dict[str, tuple[_Way, ...]] = {"up": ("up",), "down": ("down",), "both": ("up", "down")}

_LISTEN_BACKLOG = 128


@dataclasses.dataclass(frozen=True, slots=True)
class ProxyStatistics:
    """A snapshot of a proxy, returned by :meth:`FaultProxy.statistics`.

    ==============  ==================================================================
    field           meaning
    ==============  ==================================================================
    ``accepted``    connections accepted since the proxy opened (black-holed included)
    ``active``      connections open now (:attr:`FaultProxy.active_connections`)
    ``bytes_up``    bytes forwarded to the server (handed to the kernel), client to server
    ``bytes_down``  bytes forwarded to clients (handed to the kernel), server to client
    ``resets``      connections the proxy ended with an RST: :meth:`~FaultProxy.reset_all`,
                    :meth:`~FaultProxy.cut_after`, a failed connect to the target, or an
                    RST or error from one side passed on to the other
    ==============  ==================================================================
    """

    accepted: int
    active: int
    bytes_up: int
    bytes_down: int
    resets: int


def _ways(direction: Direction) -> tuple[_Way, ...]:
    try:
        return _WAYS[direction]
    except KeyError:
        raise ValueError(f"direction must be 'up', 'down' or 'both', not {direction!r}") from None


class FaultProxy:
    """A TCP proxy on ``127.0.0.1`` whose faults the test switches on and off.

    Made by :func:`open_fault_proxy`, which owns its tasks. All methods are synchronous, take
    effect at once, and must be called from the proxy's Trio thread (use :class:`ProxyThread`
    from other threads). Settings changed after the proxy closed raise
    :class:`trio.ClosedResourceError`.

    Attributes:
        host: The address clients connect to (``127.0.0.1`` unless given).
        port: The port clients connect to; it stays the same across
            :meth:`set_refusing` cycles.
        target_host: The server's host.
        target_port: The server's port.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        up: float = 0.0,
        down: float = 0.0,
    ) -> None:
        self.host = listen_host
        self.port = listen_port
        self.target_host = target_host
        self.target_port = target_port
        self._nursery = nursery
        self._link = _LinkSettings(target_host, target_port)
        self._cut_after: dict[_Way, int | None] = {"up": None, "down": None}
        self._blackhole = False
        self._refusing = False
        self._closed = False
        self._listener: trio.socket.SocketType | None = None
        self._accept_scope: trio.CancelScope | None = None
        self._connections: set[_Connection] = set()
        self._count_changed = trio.Event()
        self._accepted = 0
        self.set_latency(up=up, down=down)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "refusing" if self._refusing else "open"
        link = self._link
        stalled = "/".join(way for way in ("up", "down") if link.stalled[way]) or "no"
        return (
            f"<FaultProxy {state} {self.host}:{self.port} -> {self.target_host}:"
            f"{self.target_port} active={len(self._connections)} "
            f"latency={link.latency['up']:g}/{link.latency['down']:g}s stalled={stalled} "
            f"blackhole={self._blackhole}>"
        )

    # -- settings -------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether the proxy has closed (its block was left)."""
        return self._closed

    @property
    def latency(self) -> tuple[float, float]:
        """The delays added now, ``(up, down)``, in seconds."""
        return self._link.latency["up"], self._link.latency["down"]

    @property
    def active_connections(self) -> int:
        """Connections open now, black-holed ones included."""
        return len(self._connections)

    def set_latency(self, up: float | None = None, down: float | None = None) -> None:
        """Delay every chunk by a fixed time per direction.

        A delay line, not a throttle: each chunk is delivered ``delay`` seconds after the proxy
        read it, in order, so a round trip grows by ``up + down`` whatever its size. Applies to
        the bytes already queued on existing connections too.

        Args:
            up: Seconds added from client to server; ``None`` leaves it as it is, 0 turns it
                off.
            down: Seconds added from server to client; ``None`` leaves it as it is.

        Raises:
            ValueError: A delay is negative or not finite.
            trio.ClosedResourceError: The proxy is closed.
        """
        self._check_open()
        for value in (up, down):
            if value is not None and not (0 <= value < math.inf):
                raise ValueError(f"latency must be a finite number >= 0, not {value!r}")
        if up is not None:
            self._link.latency["up"] = float(up)
        if down is not None:
            self._link.latency["down"] = float(down)
        self._link.did_change()

    def stall(self, direction: Direction = "both") -> None:
        """Hold back bytes in *direction* until :meth:`resume`.

        Held bytes are read and queued (up to a bound, then simply not read) and delivered in
        order on :meth:`resume`. Applies to existing and new connections.

        Raises:
            ValueError: *direction* is not ``"up"``, ``"down"`` or ``"both"``.
            trio.ClosedResourceError: The proxy is closed.
        """
        self._check_open()
        for way in _ways(direction):
            self._link.stalled[way] = True
        self._link.did_change()

    def resume(self, direction: Direction = "both") -> None:
        """Deliver what :meth:`stall` held back in *direction*, and forward again.

        Raises:
            ValueError: *direction* is not ``"up"``, ``"down"`` or ``"both"``.
            trio.ClosedResourceError: The proxy is closed.
        """
        self._check_open()
        for way in _ways(direction):
            self._link.stalled[way] = False
        self._link.did_change()

    def reset_all(self) -> None:
        """Drop every current connection now with a TCP RST to both sides.

        Each side's next read raises :class:`ConnectionResetError` once it has read what had
        already reached it. New connections are not affected.

        Raises:
            trio.ClosedResourceError: The proxy is closed.
        """
        self._check_open()
        for conn in list(self._connections):
            conn.reset()

    def set_blackhole(self, enabled: bool) -> None:
        """Swallow traffic silently, like a network partition.

        While on, new connections are accepted (the client's connect succeeds) but never
        forwarded: no connection to the server, nothing sent back, no RST, so the client waits
        until its own timeout. Existing connections stop forwarding in both directions too:
        their bytes, EOFs and RSTs vanish. Turning it off restores forwarding for new
        connections only; black-holed connections stay so until they end. A black-holed
        connection ends when its client closes it (a server connected to it then sees an
        ordinary close), or on :meth:`reset_all`.

        Raises:
            trio.ClosedResourceError: The proxy is closed.
        """
        self._check_open()
        self._blackhole = bool(enabled)
        if enabled:
            for conn in self._connections:
                conn.blackholed = True
        self._link.did_change()

    def cut_after(self, n_bytes: int | None, direction: Direction = "down") -> None:
        """Reset each new connection after it has forwarded *n_bytes* in *direction*.

        The count is per connection. The peer receives exactly *n_bytes* (the proxy waits, up
        to a second, for them to leave the kernel) and then an RST, and so does the other side.
        With 0 the RST comes when the first bytes would be forwarded. Connections that already
        exist keep the limits they started with.

        Args:
            n_bytes: The byte count, or ``None`` to stop cutting new connections.
            direction: Where bytes are counted; ``"both"`` sets the same limit on each
                direction separately.

        Raises:
            ValueError: *n_bytes* is negative or *direction* is unknown.
            trio.ClosedResourceError: The proxy is closed.
        """
        self._check_open()
        if n_bytes is not None and n_bytes < 0:
            raise ValueError(f"n_bytes must be >= 0 or None, not {n_bytes!r}")
        for way in _ways(direction):
            self._cut_after[way] = n_bytes

    def set_refusing(self, enabled: bool) -> None:
        """Refuse new connections at the TCP level, or accept them again.

        On: the listening socket is closed, so a client's ``connect()`` fails with
        :class:`ConnectionRefusedError` (connections waiting in the backlog are reset too).
        Off: the proxy listens again on the same port (``SO_REUSEADDR``). Existing connections
        are not affected either way.

        Raises:
            OSError: The port could not be bound again.
            trio.ClosedResourceError: The proxy is closed.
        """
        self._check_open()
        if enabled and not self._refusing:
            self._refusing = True
            self._stop_listening()
        elif not enabled and self._refusing:
            self._listen()
            self._refusing = False

    def statistics(self) -> ProxyStatistics:
        """A snapshot of the proxy's counters (see :class:`ProxyStatistics`)."""
        return ProxyStatistics(
            accepted=self._accepted,
            active=len(self._connections),
            bytes_up=self._link.forwarded["up"],
            bytes_down=self._link.forwarded["down"],
            resets=self._link.resets,
        )

    async def wait_connections(self, n: int) -> None:
        """Wait until :attr:`active_connections` is *n*.

        Wakes on every change of the count (no polling) and returns when the count is *n* as
        it checks; a value held only between two checks may be missed.

        **Cancellation**: a checkpoint on every path; cancelling the wait changes nothing.
        """
        if len(self._connections) == n:
            await trio.lowlevel.checkpoint()
            return
        while len(self._connections) != n:
            await self._count_changed.wait()

    # -- internals ------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError(f"{self!r} is closed")

    def _count_did_change(self) -> None:
        self._count_changed.set()
        self._count_changed = trio.Event()

    def _listen(self) -> None:
        """Bind and listen synchronously, then serve the listener in a task."""
        family = _stdlib_socket.AF_INET6 if ":" in self.host else _stdlib_socket.AF_INET
        sock = _stdlib_socket.socket(family, _stdlib_socket.SOCK_STREAM)
        try:
            sock.setsockopt(_stdlib_socket.SOL_SOCKET, _stdlib_socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(_LISTEN_BACKLOG)
            self.port = sock.getsockname()[1]
            listener = trio.socket.from_stdlib_socket(sock)
        except BaseException:
            sock.close()
            raise
        self._listener = listener
        self._accept_scope = trio.CancelScope()
        self._nursery.start_soon(self._accept_loop, listener, self._accept_scope)

    def _stop_listening(self) -> None:
        if self._accept_scope is not None:
            self._accept_scope.cancel()
            self._accept_scope = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def _close(self) -> None:
        """Close the listener and every connection (FIN), and stop every task."""
        if self._closed:
            return
        self._closed = True
        self._stop_listening()
        for conn in list(self._connections):
            conn.close()
        self._nursery.cancel_scope.cancel()
        self._link.did_change()

    async def _accept_loop(self, listener: trio.socket.SocketType, scope: trio.CancelScope) -> None:
        with scope:
            try:
                while True:
                    try:
                        sock, _ = await listener.accept()
                    except trio.ClosedResourceError:
                        return
                    except (ConnectionAbortedError, ConnectionResetError):
                        continue  # the client gave up while waiting in the backlog
                    except OSError:
                        if listener.fileno() == -1:
                            # Closed (set_refusing, close) after this task was woken to
                            # accept but before it ran: the accept itself saw a closed fd.
                            return
                        raise
                    self._accepted += 1
                    conn = _Connection(
                        self._link,
                        sock,
                        blackholed=self._blackhole,
                        cut_after=dict(self._cut_after),
                    )
                    self._connections.add(conn)
                    self._count_did_change()
                    self._nursery.start_soon(self._serve, conn)
            finally:
                listener.close()

    async def _serve(self, conn: _Connection) -> None:
        try:
            await conn.serve()
        finally:
            conn.close()
            self._connections.discard(conn)
            self._count_did_change()


@contextlib.asynccontextmanager
async def open_fault_proxy(
    target_host: str,
    target_port: int,
    *,
    listen_host: str = "127.0.0.1",
    listen_port: int = 0,
    up: float = 0.0,
    down: float = 0.0,
) -> AsyncIterator[FaultProxy]:
    """Run a :class:`FaultProxy` to ``target_host:target_port`` for the duration of a block.

    ::

        async with open_fault_proxy("127.0.0.1", server_port, up=0.01, down=0.01) as proxy:
            stream = await trio.open_tcp_stream(proxy.host, proxy.port)

    The proxy listens before the block starts; its tasks run in a nursery of its own.

    Args:
        target_host: Where to forward connections (a loopback address in tests).
        target_port: The server's port.
        listen_host: The numeric address to listen on.
        listen_port: The port to listen on; 0 for a free one (see :attr:`FaultProxy.port`).
        up: The initial client-to-server delay in seconds (see
            :meth:`FaultProxy.set_latency`).
        down: The initial server-to-client delay in seconds.

    Raises:
        OSError: The listening port could not be bound.
        ValueError: A delay is negative.

    Leaving the block never blocks: it closes the listener and every connection (an ordinary
    close, FIN) and cancels the proxy's tasks. An exception raised in the block comes out
    unchanged, never wrapped in an exception group.

    **Cancellation**: entering is a checkpoint; a cancelled block closes the proxy the same way.
    """
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            proxy = FaultProxy(
                nursery,
                target_host,
                target_port,
                listen_host=listen_host,
                listen_port=listen_port,
                up=up,
                down=down,
            )
            try:
                proxy._listen()
                await trio.lowlevel.checkpoint()
                yield proxy
            except BaseException as exc:
                body_error = exc
                raise
            finally:
                proxy._close()
    except BaseExceptionGroup as group:
        if body_error is None or not holds_only(group, body_error):
            raise
    if body_error is not None:
        raise body_error
