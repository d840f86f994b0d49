"""Tests of the fault-injection proxy (:mod:`trio_imappool.testing._proxy`).

Rules: loopback only, port 0 everywhere; the target is a tiny Trio echo server in the test's
own run (a blocking one in a thread for the thread variant, and the session Dovecot once);
every test runs under ``trio.fail_after`` (or socket timeouts, for blocking code); timing
asserts are lower bounds only, because the machine is noisy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import socket
import socketserver
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import imapclient
import pytest
import trio
import trio.testing

from trio_imappool.testing import (
    DovecotServer,
    FaultProxy,
    ProxyStatistics,
    open_fault_proxy,
    start_proxy_thread,
)

LOCALHOST = "127.0.0.1"


@dataclasses.dataclass
class EchoServer:
    """What the echo server saw: one entry per connection, in accept order."""

    port: int = 0
    received: list[int] = dataclasses.field(default_factory=list)
    errors: list[BaseException | None] = dataclasses.field(default_factory=list)


@contextlib.asynccontextmanager
async def open_echo_server() -> AsyncIterator[EchoServer]:
    server = EchoServer()

    async def handle(stream: trio.SocketStream) -> None:
        index = len(server.received)
        server.received.append(0)
        try:
            async with stream:
                while data := await stream.receive_some(65536):
                    server.received[index] += len(data)
                    await stream.send_all(data)
        except trio.BrokenResourceError as exc:
            server.errors.append(exc.__cause__)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, handle, 0, host=LOCALHOST)
        )
        server.port = listeners[0].socket.getsockname()[1]
        yield server
        nursery.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def open_echo_proxy(**kwargs: Any) -> AsyncIterator[tuple[FaultProxy, EchoServer]]:
    async with (
        open_echo_server() as server,
        open_fault_proxy(LOCALHOST, server.port, **kwargs) as p,
    ):
        yield p, server


async def connect(proxy: FaultProxy) -> trio.SocketStream:
    return await trio.open_tcp_stream(proxy.host, proxy.port)


async def receive_exactly(stream: trio.SocketStream, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        assert chunk, f"EOF after {len(data)} of {n} bytes"
        data += chunk
    return bytes(data)


async def round_trip(stream: trio.SocketStream, data: bytes) -> float:
    start = trio.current_time()
    await stream.send_all(data)
    assert await receive_exactly(stream, len(data)) == data
    return trio.current_time() - start


async def read_until_closed(stream: trio.SocketStream) -> tuple[bytes, BaseException | None]:
    """Everything the peer sent, and the error that ended it (``None`` for EOF)."""
    data = bytearray()
    try:
        while chunk := await stream.receive_some(65536):
            data += chunk
    except trio.BrokenResourceError as exc:
        return bytes(data), exc.__cause__
    return bytes(data), None


async def test_forwards_both_ways_and_counts_bytes() -> None:
    with trio.fail_after(5):
        async with open_echo_proxy() as (proxy, server):
            async with await connect(proxy) as stream:
                await proxy.wait_connections(1)
                await round_trip(stream, b"x" * 1000)
                assert proxy.statistics() == ProxyStatistics(
                    accepted=1, active=1, bytes_up=1000, bytes_down=1000, resets=0
                )
                assert "active=1" in repr(proxy)
            await proxy.wait_connections(0)
            assert proxy.statistics().active == 0
            assert server.received == [1000]
            assert server.errors == []  # the client's FIN reached the server as EOF
        assert proxy.closed
        with pytest.raises(trio.ClosedResourceError):
            proxy.set_latency(up=0.1)


async def test_latency_adds_the_delay_to_each_round_trip_and_keeps_order() -> None:
    with trio.fail_after(10):
        async with open_echo_proxy() as (proxy, _), await connect(proxy) as stream:
            await round_trip(stream, b"warm-up")
            proxy.set_latency(up=0.04)
            proxy.set_latency(down=0.06)  # None leaves the other direction alone
            assert proxy.latency == (0.04, 0.06)
            for _ in range(3):
                assert await round_trip(stream, b"ping") >= 0.9 * 0.1
            assert await round_trip(stream, bytes(range(256)) * 1024) >= 0.9 * 0.1

            messages = [b"%04d," % i for i in range(200)]
            async with trio.open_nursery() as nursery:

                async def send_slowly() -> None:
                    for message in messages:
                        await stream.send_all(message)
                        await trio.sleep(0.001)

                nursery.start_soon(send_slowly)
                expected = b"".join(messages)
                assert await receive_exactly(stream, len(expected)) == expected

            proxy.set_latency(up=0, down=0)
            await round_trip(stream, b"fast again")


async def test_stall_holds_bytes_until_resume_then_delivers_them_in_order() -> None:
    with trio.fail_after(5):
        async with open_echo_proxy() as (proxy, server), await connect(proxy) as stream:
            proxy.stall("down")
            await stream.send_all(b"one,")
            await trio.testing.wait_all_tasks_blocked()
            await stream.send_all(b"two,")
            await trio.testing.wait_all_tasks_blocked()
            assert server.received == [8]  # the other direction still flows
            assert proxy.statistics().bytes_down == 0
            with trio.move_on_after(0.05) as waited:
                await stream.receive_some(100)
            assert waited.cancelled_caught
            proxy.resume("down")
            assert await receive_exactly(stream, 8) == b"one,two,"

            proxy.stall("both")
            await stream.send_all(b"three")
            await trio.testing.wait_all_tasks_blocked()
            assert server.received == [8]
            proxy.resume()
            assert await receive_exactly(stream, 5) == b"three"


async def test_reset_all_sends_an_rst_to_both_sides() -> None:
    with trio.fail_after(5):
        async with open_echo_proxy() as (proxy, server):
            async with await connect(proxy) as stream:
                await round_trip(stream, b"hello")
                proxy.reset_all()
                data, error = await read_until_closed(stream)
                assert data == b""
                assert isinstance(error, ConnectionResetError)
            await proxy.wait_connections(0)
            await trio.testing.wait_all_tasks_blocked()
            assert len(server.errors) == 1
            assert isinstance(server.errors[0], ConnectionResetError)
            assert proxy.statistics().resets == 1
            async with await connect(proxy) as stream:  # new connections are not affected
                await round_trip(stream, b"again")


async def test_blackhole_swallows_traffic_without_an_rst() -> None:
    with trio.fail_after(5):
        async with open_echo_proxy() as (proxy, server):
            async with await connect(proxy) as before:
                await round_trip(before, b"hello")
                proxy.set_blackhole(True)
                async with await connect(proxy) as during:
                    await proxy.wait_connections(2)
                    await before.send_all(b"lost")
                    await during.send_all(b"lost too")
                    with trio.move_on_after(0.3) as waited:
                        await before.receive_some(100)
                    assert waited.cancelled_caught
                    with trio.move_on_after(0.05) as waited:
                        await during.receive_some(100)
                    assert waited.cancelled_caught
                    assert len(server.received) == 1  # no connection to the server
                    assert server.received == [5]
                    await during.send_all(b"still writable: no RST came")

                    proxy.set_blackhole(False)
                    async with await connect(proxy) as after:
                        await round_trip(after, b"works again")
            await proxy.wait_connections(0)  # black-holed connections end with their client
            assert proxy.statistics().resets == 0
            assert proxy.statistics().accepted == 3


async def test_cut_after_delivers_exactly_n_bytes_then_resets() -> None:
    with trio.fail_after(5):
        async with open_echo_proxy() as (proxy, server):
            async with await connect(proxy) as older:
                proxy.cut_after(10, "down")
                payload = bytes(range(100))
                async with await connect(proxy) as cut:
                    await cut.send_all(payload)
                    data, error = await read_until_closed(cut)
                    assert data == payload[:10]
                    assert isinstance(error, ConnectionResetError)
                await round_trip(older, payload)  # limits are taken at accept

                proxy.cut_after(None)
                async with await connect(proxy) as uncut:
                    await round_trip(uncut, payload)

                proxy.cut_after(7, "up")
                async with await connect(proxy) as cut:
                    await cut.send_all(payload)
                    _, error = await read_until_closed(cut)
                    assert isinstance(error, ConnectionResetError)
                proxy.cut_after(None, "up")
            await proxy.wait_connections(0)
            await trio.testing.wait_all_tasks_blocked()
            assert server.received == [100, 100, 100, 7]
            assert proxy.statistics().resets == 2


async def test_set_refusing_refuses_then_listens_again_on_the_same_port() -> None:
    with trio.fail_after(5):
        async with open_echo_proxy() as (proxy, _), await connect(proxy) as existing:
            port = proxy.port
            proxy.set_refusing(True)
            sock = trio.socket.socket()
            with sock, pytest.raises(ConnectionRefusedError):
                await sock.connect((LOCALHOST, port))
            await round_trip(existing, b"existing connections live on")
            proxy.set_refusing(False)
            assert proxy.port == port
            async with await connect(proxy) as stream:
                await round_trip(stream, b"accepted again")
            assert proxy.statistics().accepted == 2


async def test_refusing_while_a_connection_waits_to_be_accepted_does_not_break_the_proxy() -> None:
    """The listener closed between its accept task being woken and running (a race seen in
    the fault storm): the task must take it as closed, not fail with EBADF."""
    with trio.fail_after(10):
        async with open_echo_proxy() as (proxy, _):
            for _ in range(40):
                await trio.testing.wait_all_tasks_blocked()  # the accept task waits
                # Completes in the kernel's backlog: the listener is now readable.
                client = socket.create_connection((proxy.host, proxy.port))
                with client:
                    await trio.lowlevel.checkpoint()  # the accept task may be woken, not run
                    proxy.set_refusing(True)
                    proxy.set_refusing(False)
            async with await connect(proxy) as stream:
                await round_trip(stream, b"still serving")


async def test_a_target_that_refuses_makes_the_proxy_reset_the_client() -> None:
    with socket.socket() as placeholder:
        placeholder.bind((LOCALHOST, 0))
        dead_port = placeholder.getsockname()[1]
    with trio.fail_after(5):
        async with open_fault_proxy(LOCALHOST, dead_port) as proxy:
            async with await connect(proxy) as stream:
                data, error = await read_until_closed(stream)
            assert (data, type(error)) == (b"", ConnectionResetError)
            assert proxy.statistics().resets == 1


async def test_leaving_the_block_closes_connections_and_does_not_wrap_errors() -> None:
    with trio.fail_after(5):
        async with open_echo_server() as server:
            with pytest.raises(KeyError):
                async with open_fault_proxy(LOCALHOST, server.port) as proxy:
                    stream = await connect(proxy)
                    await round_trip(stream, b"hi")
                    raise KeyError("from the block")
            async with stream:
                assert await read_until_closed(stream) == (b"", None)


async def test_wait_connections_is_a_checkpoint_and_settings_are_checked() -> None:
    with trio.fail_after(5):
        async with open_echo_server() as server:
            with trio.testing.assert_checkpoints():
                async with open_fault_proxy(LOCALHOST, server.port) as proxy:
                    pass
        async with open_echo_proxy() as (proxy, _):
            with trio.testing.assert_checkpoints():
                await proxy.wait_connections(0)
            with pytest.raises(ValueError, match="direction"):
                proxy.stall("sideways")  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="latency"):
                proxy.set_latency(up=-1)
            with pytest.raises(ValueError, match="n_bytes"):
                proxy.cut_after(-1)


class _BlockingEcho(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.settimeout(5)
        with contextlib.suppress(OSError):
            while data := self.request.recv(65536):
                self.request.sendall(data)


@contextlib.contextmanager
def blocking_echo_server() -> Iterator[int]:
    with socketserver.ThreadingTCPServer((LOCALHOST, 0), _BlockingEcho) as server:
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        thread.start()
        try:
            yield server.server_address[1]
        finally:
            server.shutdown()
            thread.join(5)


def blocking_round_trip(sock: socket.socket, data: bytes) -> float:
    start = time.monotonic()
    sock.sendall(data)
    received = bytearray()
    while len(received) < len(data):
        chunk = sock.recv(65536)
        assert chunk
        received += chunk
    assert received == data
    return time.monotonic() - start


def test_thread_variant_serves_a_blocking_client() -> None:
    with (
        blocking_echo_server() as port,
        start_proxy_thread(LOCALHOST, port, up=0.02, down=0.02) as proxy,
    ):
        with socket.create_connection((proxy.host, proxy.port), timeout=5) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            proxy.wait_connections(1)
            assert proxy.active_connections == 1
            assert blocking_round_trip(sock, b"ping") >= 0.9 * 0.04
            proxy.set_latency(up=0, down=0)
            blocking_round_trip(sock, b"x" * 5000)
            stats = proxy.statistics()
            assert (stats.bytes_up, stats.bytes_down) == (5004, 5004)

            proxy.stall("up")
            sock.sendall(b"held")
            sock.settimeout(0.1)
            with pytest.raises(TimeoutError):
                sock.recv(100)
            sock.settimeout(5)
            proxy.resume("up")
            assert sock.recv(100) == b"held"

            proxy.reset_all()
            with pytest.raises(ConnectionResetError):
                sock.recv(100)
        proxy.wait_connections(0)

        proxy.set_refusing(True)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((proxy.host, proxy.port), timeout=5).close()
        proxy.set_refusing(False)
        with socket.create_connection((proxy.host, proxy.port), timeout=5) as sock:
            blocking_round_trip(sock, b"back")
        assert proxy.statistics().resets == 1
    with pytest.raises(trio.ClosedResourceError):
        proxy.statistics()  # the thread is gone


async def test_thread_variant_methods_work_from_inside_another_trio_run() -> None:
    with trio.fail_after(5):
        async with open_echo_server() as server:
            with start_proxy_thread(LOCALHOST, server.port) as proxy:
                stream = await trio.open_tcp_stream(proxy.host, proxy.port)
                async with stream:
                    proxy.set_latency(up=0.03)
                    assert await round_trip(stream, b"ping") >= 0.9 * 0.03
                    assert proxy.statistics().bytes_down == 4
                    with pytest.raises(ValueError, match="direction"):
                        proxy.resume("sideways")  # type: ignore[arg-type]
                    with pytest.raises(RuntimeError, match="from a thread"):
                        proxy.wait_connections(1)


async def test_imapclient_logs_in_through_the_proxy(dovecot: DovecotServer) -> None:
    settings = dovecot.pool_kwargs(tls=False)

    def login_and_noop(port: int) -> float:
        client = imapclient.IMAPClient(
            LOCALHOST, port, ssl=False, timeout=imapclient.SocketTimeout(connect=5, read=5)
        )
        try:
            client.login(settings["username"], settings["password"])
            start = time.monotonic()
            client.noop()
            return time.monotonic() - start
        finally:
            client.logout()

    with trio.fail_after(10):
        async with open_fault_proxy(
            settings["host"], settings["port"], up=0.015, down=0.015
        ) as proxy:
            noop_time = await trio.to_thread.run_sync(login_and_noop, proxy.port)
            assert noop_time >= 0.9 * 0.03
            await proxy.wait_connections(0)
            stats = proxy.statistics()
            assert stats.accepted == 1
            assert stats.bytes_up > 0 and stats.bytes_down > 0
            assert stats.resets == 0


async def test_a_busy_port_fails_to_open_in_both_variants() -> None:
    with trio.fail_after(5):
        async with open_echo_proxy() as (proxy, server):
            with pytest.raises(OSError, match="in use"):
                async with open_fault_proxy(LOCALHOST, server.port, listen_port=proxy.port):
                    pass  # pragma: no cover
            with (
                pytest.raises(OSError, match="in use"),
                start_proxy_thread(LOCALHOST, server.port, listen_port=proxy.port),
            ):
                pass  # pragma: no cover
