"""One proxied connection of a :class:`~._proxy.FaultProxy`: its sockets and the four tasks
that pump its bytes.

Each direction has a reader and a writer joined by a bounded memory channel of ``(time read,
bytes)`` chunks; the writer sends a chunk once ``time read + latency`` has passed (or drops it
when the connection is black-holed). Every connection of one proxy reads the same
:class:`_LinkSettings`, which the proxy changes; a change wakes every chunk waiting to be due.
"""

from __future__ import annotations

import contextlib
import math
import socket as _stdlib_socket
import struct
import sys
from typing import Literal

import trio

__all__: list[str] = []

_Way = Literal["up", "down"]

#: Bytes asked for per read; a chunk is what one read returned.
_CHUNK_SIZE = 65536
#: Chunks queued per direction and connection before the reader stops reading.
_QUEUE_CHUNKS = 1024
#: How long a cut waits for the last bytes to leave the kernel before the RST discards them.
_DRAIN_TIMEOUT = 1.0


class _LinkSettings:
    """What a proxy's connections read as they forward, and the counters they keep.

    Attributes:
        target_host: The server's host.
        target_port: The server's port.
        latency: The delay added per direction, in seconds.
        stalled: Whether a direction holds its bytes back.
        changed: Set (and replaced) on every change of the settings.
        forwarded: Bytes handed to the kernel per direction, all connections together.
        resets: Connections ended with an RST.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.latency: dict[_Way, float] = {"up": 0.0, "down": 0.0}
        self.stalled: dict[_Way, bool] = {"up": False, "down": False}
        self.changed = trio.Event()
        self.forwarded: dict[_Way, int] = {"up": 0, "down": 0}
        self.resets = 0

    def did_change(self) -> None:
        """Wake every chunk waiting to be due, so that it looks at the settings again."""
        self.changed.set()
        self.changed = trio.Event()


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
        link: _LinkSettings,
        client: trio.socket.SocketType,
        *,
        blackholed: bool,
        cut_after: dict[_Way, int | None],
    ) -> None:
        self.link = link
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
        self.link.resets += 1
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

    async def serve(self) -> None:
        """Connect to the target and pump both directions until either side ends (or, when
        black-holed from the start, swallow the client's bytes until it leaves)."""
        with self.cancel_scope:
            _set_nodelay(self.client)
            if self.blackholed:
                await self._swallow()
                return
            try:
                stream = await trio.open_tcp_stream(self.link.target_host, self.link.target_port)
            except OSError:
                self.reset()  # the target is down: the client sees what it would see
                return
            server = self.server = stream.socket  # TCP_NODELAY is set by SocketStream
            pipes: tuple[tuple[_Way, trio.socket.SocketType, trio.socket.SocketType], ...] = (
                ("up", self.client, server),
                ("down", server, self.client),
            )
            async with trio.open_nursery() as nursery:
                for way, src, dst in pipes:
                    send, receive = trio.open_memory_channel[tuple[float, bytes]](_QUEUE_CHUNKS)
                    nursery.start_soon(self._read_side, way, src, send)
                    nursery.start_soon(self._write_side, way, dst, receive)

    async def _swallow(self) -> None:
        """Read and discard a connection black-holed from the start until its client leaves."""
        while True:
            try:
                if not await self.client.recv(_CHUNK_SIZE):
                    return
            except (OSError, trio.ClosedResourceError):
                return

    async def _read_side(
        self,
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
                    if self.blackholed:
                        if way == "up":
                            self.close()
                    else:
                        self.reset()  # pass the RST on
                    return
                if not data:
                    if self.blackholed and way == "up":
                        self.close()
                    return
                if not self.blackholed:
                    await send.send((trio.current_time(), data))

    async def _write_side(
        self,
        way: _Way,
        dst: trio.socket.SocketType,
        receive: trio.MemoryReceiveChannel[tuple[float, bytes]],
    ) -> None:
        async with receive:
            async for read_at, data in receive:
                if not await self._wait_until_due(way, read_at):
                    continue  # black-holed: the bytes vanish
                limit = self.cut_after[way]
                cut = limit is not None and len(data) >= limit - self.forwarded[way]
                if limit is not None and cut:
                    data = data[: limit - self.forwarded[way]]
                try:
                    await self._forward(way, dst, data)
                except trio.ClosedResourceError:
                    return
                except OSError:
                    self.reset()
                    return
                if cut:
                    await _wait_sent(dst)
                    self.reset()
                    return
        if not self.blackholed:
            with contextlib.suppress(OSError):
                dst.shutdown(_stdlib_socket.SHUT_WR)  # pass the EOF on

    async def _forward(self, way: _Way, dst: trio.socket.SocketType, data: bytes) -> None:
        """Send all of *data*, counting the bytes as they are handed to the kernel.

        They are counted just before each send and the count corrected after a partial one:
        a peer in another thread may read them before this task runs again, and must not
        then see the proxy's statistics without them.
        """
        view = memoryview(data)
        while view:
            self.forwarded[way] += len(view)
            self.link.forwarded[way] += len(view)
            try:
                sent = await dst.send(view)
            except BaseException:
                self.forwarded[way] -= len(view)
                self.link.forwarded[way] -= len(view)
                raise
            self.forwarded[way] -= len(view) - sent
            self.link.forwarded[way] -= len(view) - sent
            view = view[sent:]

    async def _wait_until_due(self, way: _Way, read_at: float) -> bool:
        """Wait until a chunk read at *read_at* may go; ``False`` if it must be dropped.

        Re-evaluates on every settings change, so a new latency, a resume or a black hole
        applies to chunks already waiting.
        """
        while True:
            if self.blackholed:
                return False
            due = math.inf if self.link.stalled[way] else read_at + self.link.latency[way]
            if trio.current_time() >= due:
                return True
            changed = self.link.changed
            with trio.move_on_at(due):
                await changed.wait()
