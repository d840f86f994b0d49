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
import struct
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Literal, TypeVar, TypeVarTuple

import outcome
import trio

from .._util import holds_only

__all__ = [
    "Direction",
    "FaultProxy",
    "ProxyStatistics",
    "ProxyThread",
    "open_fault_proxy",
    "start_proxy_thread",
]

Direction = Literal["up", "down", "both"]
"""Which way traffic flows: ``"up"`` is client to server, ``"down"`` server to client."""

_Way = Literal["up", "down"]
_WAYS: dict[str, tuple[_Way, ...]] = {"up": ("up",), "down": ("down",), "both": ("up", "down")}

_T = TypeVar("_T")
_Ts = TypeVarTuple("_Ts")

#: Bytes asked for per read; a chunk is what one read returned.
_CHUNK_SIZE = 65536
#: Chunks queued per direction and connection before the reader stops reading.
_QUEUE_CHUNKS = 1024
#: How long a cut waits for the last bytes to leave the kernel before the RST discards them.
_DRAIN_TIMEOUT = 1.0
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


def _set_nodelay(sock: trio.socket.SocketType) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(_stdlib_socket.IPPROTO_TCP, _stdlib_socket.TCP_NODELAY, 1)


def _close_with_rst(sock: trio.socket.SocketType) -> None:
    """Close *sock* so that the kernel sends an RST instead of a FIN."""
    if sock.fileno() == -1:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(
            _stdlib_socket.SOL_SOCKET, _stdlib_socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
    sock.close()


async def _wait_sent(sock: trio.socket.SocketType) -> None:
    """Wait (bounded) until the kernel has no unacknowledged bytes queued on *sock*.

    Closing with ``SO_LINGER`` 0 throws away whatever is still queued, so a cut must wait for
    the bytes it promised to deliver. Outside Linux this is a checkpoint only.
    """
    if sys.platform != "linux":
        await trio.lowlevel.checkpoint()
        return
    import fcntl
    import termios

    with trio.move_on_after(_DRAIN_TIMEOUT):
        while sock.fileno() != -1:
            queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
            if struct.unpack("i", queued)[0] == 0:
                break
            await trio.sleep(0.001)
    await trio.lowlevel.checkpoint()


class _Connection:
    """One client connection and, unless black-holed from the start, its server connection."""

    def __init__(
        self,
        proxy: FaultProxy,
        client: trio.socket.SocketType,
        *,
        blackholed: bool,
        cut_after: dict[_Way, int | None],
    ) -> None:
        self.proxy = proxy
        self.client = client
        self.server: trio.socket.SocketType | None = None
        self.blackholed = blackholed
        self.cut_after = cut_after
        self.forwarded: dict[_Way, int] = {"up": 0, "down": 0}
        self.cancel_scope = trio.CancelScope()
        self.closed = False

    def reset(self) -> None:
        """Drop the connection now with an RST to both sides."""
        if self.closed:
            return
        self.closed = True
        self.proxy._resets += 1
        _close_with_rst(self.client)
        if self.server is not None:
            _close_with_rst(self.server)
        self.cancel_scope.cancel()

    def close(self) -> None:
        """Close both sides normally (FIN)."""
        if self.closed:
            return
        self.closed = True
        self.client.close()
        if self.server is not None:
            self.server.close()
        self.cancel_scope.cancel()


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
        self._latency: dict[_Way, float] = {"up": 0.0, "down": 0.0}
        self._stalled: dict[_Way, bool] = {"up": False, "down": False}
        self._cut_after: dict[_Way, int | None] = {"up": None, "down": None}
        self._blackhole = False
        self._refusing = False
        self._closed = False
        self._listener: trio.socket.SocketType | None = None
        self._accept_scope: trio.CancelScope | None = None
        self._connections: set[_Connection] = set()
        self._settings_changed = trio.Event()
        self._count_changed = trio.Event()
        self._accepted = 0
        self._bytes: dict[_Way, int] = {"up": 0, "down": 0}
        self._resets = 0
        self.set_latency(up=up, down=down)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "refusing" if self._refusing else "open"
        stalled = "/".join(way for way in ("up", "down") if self._stalled[way]) or "no"
        return (
            f"<FaultProxy {state} {self.host}:{self.port} -> {self.target_host}:"
            f"{self.target_port} active={len(self._connections)} "
            f"latency={self._latency['up']:g}/{self._latency['down']:g}s stalled={stalled} "
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
        return self._latency["up"], self._latency["down"]

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
            self._latency["up"] = float(up)
        if down is not None:
            self._latency["down"] = float(down)
        self._settings_did_change()

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
            self._stalled[way] = True
        self._settings_did_change()

    def resume(self, direction: Direction = "both") -> None:
        """Deliver what :meth:`stall` held back in *direction*, and forward again.

        Raises:
            ValueError: *direction* is not ``"up"``, ``"down"`` or ``"both"``.
            trio.ClosedResourceError: The proxy is closed.
        """
        self._check_open()
        for way in _ways(direction):
            self._stalled[way] = False
        self._settings_did_change()

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
        self._settings_did_change()

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
            bytes_up=self._bytes["up"],
            bytes_down=self._bytes["down"],
            resets=self._resets,
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

    def _settings_did_change(self) -> None:
        self._settings_changed.set()
        self._settings_changed = trio.Event()

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
        self._settings_did_change()

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
                        self, sock, blackholed=self._blackhole, cut_after=dict(self._cut_after)
                    )
                    self._connections.add(conn)
                    self._count_did_change()
                    self._nursery.start_soon(self._serve, conn)
            finally:
                listener.close()

    async def _serve(self, conn: _Connection) -> None:
        try:
            with conn.cancel_scope:
                _set_nodelay(conn.client)
                if conn.blackholed:
                    await self._swallow(conn)
                    return
                try:
                    stream = await trio.open_tcp_stream(self.target_host, self.target_port)
                except OSError:
                    conn.reset()  # the target is down: the client sees what it would see
                    return
                server = conn.server = stream.socket  # TCP_NODELAY is set by SocketStream
                pipes: tuple[tuple[_Way, trio.socket.SocketType, trio.socket.SocketType], ...] = (
                    ("up", conn.client, server),
                    ("down", server, conn.client),
                )
                async with trio.open_nursery() as nursery:
                    for way, src, dst in pipes:
                        send, receive = trio.open_memory_channel[tuple[float, bytes]](_QUEUE_CHUNKS)
                        nursery.start_soon(self._read_side, conn, way, src, send)
                        nursery.start_soon(self._write_side, conn, way, dst, receive)
        finally:
            conn.close()
            self._connections.discard(conn)
            self._count_did_change()

    async def _swallow(self, conn: _Connection) -> None:
        """Read and discard a connection black-holed from the start until its client leaves."""
        while True:
            try:
                if not await conn.client.recv(_CHUNK_SIZE):
                    return
            except (OSError, trio.ClosedResourceError):
                return

    async def _read_side(
        self,
        conn: _Connection,
        way: _Way,
        src: trio.socket.SocketType,
        send: trio.MemorySendChannel[tuple[float, bytes]],
    ) -> None:
        async with send:  # closing it tells the writer about EOF
            while True:
                try:
                    data = await src.recv(_CHUNK_SIZE)
                except trio.ClosedResourceError:
                    return
                except OSError:
                    if conn.blackholed:
                        if way == "up":
                            conn.close()
                    else:
                        conn.reset()  # pass the RST on
                    return
                if not data:
                    if conn.blackholed and way == "up":
                        conn.close()
                    return
                if not conn.blackholed:
                    await send.send((trio.current_time(), data))

    async def _write_side(
        self,
        conn: _Connection,
        way: _Way,
        dst: trio.socket.SocketType,
        receive: trio.MemoryReceiveChannel[tuple[float, bytes]],
    ) -> None:
        async with receive:
            async for read_at, data in receive:
                if not await self._wait_until_due(conn, way, read_at):
                    continue  # black-holed: the bytes vanish
                limit = conn.cut_after[way]
                cut = limit is not None and len(data) >= limit - conn.forwarded[way]
                if limit is not None and cut:
                    data = data[: limit - conn.forwarded[way]]
                try:
                    await self._forward(conn, way, dst, data)
                except trio.ClosedResourceError:
                    return
                except OSError:
                    conn.reset()
                    return
                if cut:
                    await _wait_sent(dst)
                    conn.reset()
                    return
        if not conn.blackholed:
            with contextlib.suppress(OSError):
                dst.shutdown(_stdlib_socket.SHUT_WR)  # pass the EOF on

    async def _forward(
        self, conn: _Connection, way: _Way, dst: trio.socket.SocketType, data: bytes
    ) -> None:
        """Send all of *data*, counting the bytes as they are handed to the kernel.

        They are counted just before each send and the count corrected after a partial one:
        a peer in another thread may read them before this task runs again, and must not
        then see :meth:`statistics` without them.
        """
        view = memoryview(data)
        while view:
            conn.forwarded[way] += len(view)
            self._bytes[way] += len(view)
            try:
                sent = await dst.send(view)
            except BaseException:
                conn.forwarded[way] -= len(view)
                self._bytes[way] -= len(view)
                raise
            conn.forwarded[way] -= len(view) - sent
            self._bytes[way] -= len(view) - sent
            view = view[sent:]

    async def _wait_until_due(self, conn: _Connection, way: _Way, read_at: float) -> bool:
        """Wait until a chunk read at *read_at* may go; ``False`` if it must be dropped.

        Re-evaluates on every settings change, so a new latency, a resume or a black hole
        applies to chunks already waiting.
        """
        while True:
            if conn.blackholed:
                return False
            due = math.inf if self._stalled[way] else read_at + self._latency[way]
            if trio.current_time() >= due:
                return True
            changed = self._settings_changed
            with trio.move_on_at(due):
                await changed.wait()


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


class ProxyThread:
    """A :class:`FaultProxy` running its own ``trio.run`` in a background thread.

    Made by :func:`start_proxy_thread`. Every method may be called from any thread: it runs in
    the proxy's Trio thread (through :func:`trio.from_thread.run_sync` with the proxy's
    :class:`~trio.lowlevel.TrioToken`) and returns its result or raises its exception. From a
    thread that is itself running Trio, the call is handed over with
    :meth:`~trio.lowlevel.TrioToken.run_sync_soon` instead and blocks that thread briefly.

    Attributes:
        host: The address clients connect to.
        port: The port clients connect to.
    """

    def __init__(
        self,
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
        self._target = (target_host, target_port)
        self._listen_at = (listen_host, listen_port)
        self._initial_latency = (up, down)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._proxy: FaultProxy | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop_event: trio.Event | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"fault-proxy-to-{target_host}:{target_port}", daemon=True
        )

    def __repr__(self) -> str:
        alive = "running" if self._thread.is_alive() else "stopped"
        return f"<ProxyThread {alive} {self._proxy!r}>"

    def start(self, timeout: float = 5.0) -> None:
        """Start the thread and wait until the proxy listens.

        Raises:
            OSError: The proxy could not listen (raised as the thread raised it).
            TimeoutError: The proxy did not start within *timeout* seconds.
        """
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the fault proxy thread did not start within {timeout} s")
        if self._error is not None:
            self._thread.join(timeout)
            raise self._error

    def stop(self, timeout: float = 5.0) -> None:
        """Close the proxy, end its ``trio.run`` and join the thread. Idempotent.

        Raises:
            TimeoutError: The thread did not end within *timeout* seconds.
            RuntimeError: The proxy's Trio run failed (the cause is attached).
        """
        token, stop_event = self._token, self._stop_event
        if token is not None and stop_event is not None and self._thread.is_alive():
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(stop_event.set)
        if self._thread.ident is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"the fault proxy thread did not end within {timeout} s")
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError("the fault proxy's Trio run failed") from error

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._stop_event = trio.Event()
        (host, port), (up, down) = self._listen_at, self._initial_latency
        async with open_fault_proxy(
            *self._target, listen_host=host, listen_port=port, up=up, down=down
        ) as proxy:
            self._proxy = proxy
            self.host, self.port = proxy.host, proxy.port
            self._token = trio.lowlevel.current_trio_token()
            self._ready.set()
            await self._stop_event.wait()

    def _call(self, fn: Callable[[*_Ts], _T], *args: *_Ts) -> _T:
        token = self._token
        if token is None or not self._thread.is_alive():
            raise trio.ClosedResourceError(f"{self!r} is not running")
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            return trio.from_thread.run_sync(fn, *args, trio_token=token)
        # Called from inside another Trio run, where trio.from_thread refuses to block.
        done = threading.Event()
        result: list[outcome.Outcome[_T]] = []

        def job() -> None:
            result.append(outcome.capture(fn, *args))
            done.set()

        token.run_sync_soon(job)
        if not done.wait(5.0):
            raise TimeoutError("the fault proxy thread did not answer within 5 s")
        return result[0].unwrap()

    @property
    def _live(self) -> FaultProxy:
        if self._proxy is None:
            raise trio.ClosedResourceError(f"{self!r} is not running")
        return self._proxy

    @property
    def active_connections(self) -> int:
        """See :attr:`FaultProxy.active_connections`."""
        return self._call(lambda: self._live.active_connections)

    @property
    def latency(self) -> tuple[float, float]:
        """See :attr:`FaultProxy.latency`."""
        return self._call(lambda: self._live.latency)

    def set_latency(self, up: float | None = None, down: float | None = None) -> None:
        """See :meth:`FaultProxy.set_latency`."""
        self._call(self._live.set_latency, up, down)

    def stall(self, direction: Direction = "both") -> None:
        """See :meth:`FaultProxy.stall`."""
        self._call(self._live.stall, direction)

    def resume(self, direction: Direction = "both") -> None:
        """See :meth:`FaultProxy.resume`."""
        self._call(self._live.resume, direction)

    def reset_all(self) -> None:
        """See :meth:`FaultProxy.reset_all`."""
        self._call(self._live.reset_all)

    def set_blackhole(self, enabled: bool) -> None:
        """See :meth:`FaultProxy.set_blackhole`."""
        self._call(self._live.set_blackhole, enabled)

    def cut_after(self, n_bytes: int | None, direction: Direction = "down") -> None:
        """See :meth:`FaultProxy.cut_after`."""
        self._call(self._live.cut_after, n_bytes, direction)

    def set_refusing(self, enabled: bool) -> None:
        """See :meth:`FaultProxy.set_refusing`."""
        self._call(self._live.set_refusing, enabled)

    def statistics(self) -> ProxyStatistics:
        """See :meth:`FaultProxy.statistics`."""
        return self._call(self._live.statistics)

    def wait_connections(self, n: int, timeout: float = 5.0) -> None:
        """Block until :attr:`active_connections` is *n* (see :meth:`FaultProxy.wait_connections`).

        Must not be called from a thread running Trio.

        Raises:
            TimeoutError: The count was not *n* within *timeout* seconds.
        """
        proxy, token = self._live, self._token

        async def wait() -> None:
            with trio.fail_after(timeout):
                await proxy.wait_connections(n)

        try:
            trio.from_thread.run(wait, trio_token=token)
        except trio.TooSlowError:
            raise TimeoutError(f"not {n} connections within {timeout} s") from None


@contextlib.contextmanager
def start_proxy_thread(
    target_host: str,
    target_port: int,
    *,
    listen_host: str = "127.0.0.1",
    listen_port: int = 0,
    up: float = 0.0,
    down: float = 0.0,
    timeout: float = 5.0,
) -> Iterator[ProxyThread]:
    """Run a fault proxy in a background thread for the duration of a ``with`` block.

    For blocking code: benchmarks with plain imapclient, or programs in subprocesses::

        with start_proxy_thread("127.0.0.1", imap_port, up=0.025, down=0.025) as proxy:
            client = imapclient.IMAPClient(proxy.host, proxy.port, ssl=False)
            proxy.reset_all()

    Args:
        target_host: Where to forward connections.
        target_port: The server's port.
        listen_host: The numeric address to listen on.
        listen_port: The port to listen on; 0 for a free one.
        up: The initial client-to-server delay in seconds.
        down: The initial server-to-client delay in seconds.
        timeout: The bound on starting and on stopping, in seconds.

    Raises:
        OSError: The proxy could not listen.
        TimeoutError: The thread did not start, or end, within *timeout*.

    Entering blocks until the proxy listens. Leaving closes the proxy, ends its Trio run and
    joins the thread, within *timeout*.
    """
    proxy = ProxyThread(
        target_host, target_port, listen_host=listen_host, listen_port=listen_port, up=up, down=down
    )
    proxy.start(timeout)
    try:
        yield proxy
    finally:
        proxy.stop(timeout)
