"""The fault proxy in a thread of its own, for blocking code, benchmarks and subprocesses."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar, TypeVarTuple

import outcome
import trio

from ._proxy import Direction, FaultProxy, ProxyStatistics, open_fault_proxy

__all__ = ["ProxyThread", "start_proxy_thread"]

_T = TypeVar("_T")
_Ts = TypeVarTuple("_Ts")


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
