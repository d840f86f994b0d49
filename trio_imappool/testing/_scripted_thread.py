"""The scripted server in a thread of its own, for blocking code and subprocesses."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import trio

from ._scripted import ScriptedServer, open_scripted_server
from ._scripted_account import ScriptedAccount

__all__ = ["ScriptedServerThread", "start_scripted_server_thread"]


class ScriptedServerThread:
    """A :class:`ScriptedServer` running its own ``trio.run`` in a background thread.

    Made by :func:`start_scripted_server_thread`. Its attributes and :meth:`pool_kwargs` are
    those of the server (read them from any thread; lists are appended to by the server's
    thread). Handlers run in the server's thread.
    """

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._server: ScriptedServer | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="scripted-imap-server", daemon=True)

    def __getattr__(self, name: str) -> Any:
        server = self.__dict__.get("_server")
        if server is None or name.startswith("_"):
            raise AttributeError(name)
        return getattr(server, name)

    def __repr__(self) -> str:
        alive = "running" if self._thread.is_alive() else "stopped"
        return f"<ScriptedServerThread {alive} {self._server!r}>"

    @property
    def server(self) -> ScriptedServer:
        """The server (in the other thread)."""
        assert self._server is not None
        return self._server

    def push(self, line: str | bytes) -> int:
        """:meth:`ScriptedServer.push`, from a thread that is not the server's."""
        assert self._token is not None
        return int(trio.from_thread.run(self.server.push, line, trio_token=self._token))

    def start(self, timeout: float = 5.0) -> None:
        """Start the thread; return when the server listens.

        Raises:
            OSError: The server could not listen.
            TimeoutError: It did not start within *timeout* seconds.
        """
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the scripted server did not start within {timeout} s")
        if self._error is not None:
            raise self._error

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the server and join the thread. Idempotent.

        Raises:
            TimeoutError: The thread did not end within *timeout* seconds.
        """
        token, stop = self._token, self._stop
        if token is not None and stop is not None and self._thread.is_alive():
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(stop.set)
        if self._thread.ident is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"the scripted server thread did not end within {timeout} s")

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._stop = trio.Event()
        self._token = trio.lowlevel.current_trio_token()
        async with open_scripted_server(**self._options) as server:
            self._server = server
            self._ready.set()
            await self._stop.wait()


@contextlib.contextmanager
def start_scripted_server_thread(
    account: ScriptedAccount | None = None, *, timeout: float = 5.0, **options: Any
) -> Iterator[ScriptedServerThread]:
    """Run a scripted server in a background thread for the duration of a ``with`` block.

    Takes the arguments of :func:`open_scripted_server`; for blocking code and programs in
    subprocesses::

        with start_scripted_server_thread(folders={"INBOX": [b"x\\r\\n"]}) as server:
            client = imapclient.IMAPClient(server.host, server.port, ssl=False)

    Raises:
        OSError: The server could not listen.
        TimeoutError: The thread did not start, or end, within *timeout* seconds.
    """
    thread = ScriptedServerThread(account=account, **options)
    thread.start(timeout)
    try:
        yield thread
    finally:
        thread.stop(timeout)
