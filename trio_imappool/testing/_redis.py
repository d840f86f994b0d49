"""A private Redis for tests: Debian's ``redis-server`` in a temporary folder.

::

    from trio_imappool.testing import start_redis

    with start_redis() as server:
        budget = trio_imappool.RedisBudget(server.url, limit=5)
        ...
        server.stop()  # Redis unreachable
        server.start()  # back on the same port, empty

It listens on 127.0.0.1 at a free port, saves nothing (``--save ''``, ``--appendonly no``), so a
restart is a Redis that lost every key, and runs in the foreground as a child process (no system
service). Every call here is synchronous and bounded in time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from ._server import free_ports, kill_process_group

__all__ = ["RedisNotFoundError", "RedisServer", "find_redis", "start_redis"]

_READY_TIMEOUT = 10.0


class RedisNotFoundError(RuntimeError):
    """``redis-server`` is not installed (``apt-get install redis-server``)."""


def find_redis(binary: str | os.PathLike[str] | None = None) -> str:
    """The path of ``redis-server``.

    Raises:
        RedisNotFoundError: It is not installed; the message says how to install it.
    """
    candidates = [str(binary)] if binary else ["redis-server", "/usr/bin/redis-server"]
    for candidate in candidates:
        found = shutil.which(candidate)
        if found:
            return found
    raise RedisNotFoundError(
        "redis-server is not installed: sudo apt-get install redis-server "
        "(scripts/_env.sh does it when run as root)"
    )


class RedisServer:
    """A ``redis-server`` child process on 127.0.0.1; made by :func:`start_redis`.

    Attributes:
        port: Its TCP port (kept across :meth:`stop` and :meth:`start`).
        dir: Its working folder (removed by :meth:`close`).
    """

    def __init__(self, binary: str, directory: Path, port: int) -> None:
        self._binary = binary
        self.dir = directory
        self.port = port
        self._process: subprocess.Popen[bytes] | None = None
        self._closed = False

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<RedisServer 127.0.0.1:{self.port} {state}>"

    def start(self) -> None:
        """Start it (empty) and return once it answers PING. Does nothing if running.

        Raises:
            RuntimeError: It exited or did not answer within 10 s (the message has its log).
        """
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        if self.running:
            return
        log = self.dir / "redis.log"
        with log.open("ab") as out:
            self._process = subprocess.Popen(
                [
                    self._binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.dir),
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        deadline = time.monotonic() + _READY_TIMEOUT
        while not self._ping():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server did not start on port {self.port}:\n{tail}")
            time.sleep(0.01)

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Kill it at once (SIGKILL): every key is lost. Does nothing if stopped."""
        process, self._process = self._process, None
        if process is None:
            return
        kill_process_group(process)

    def close(self) -> None:
        """Stop it and remove its folder. Idempotent."""
        self.stop()
        self._closed = True
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@contextlib.contextmanager
def start_redis(binary: str | os.PathLike[str] | None = None) -> Iterator[RedisServer]:
    """Start a private, empty Redis on 127.0.0.1 at a free port; stopped and removed at the
    end of the block.

    Raises:
        RedisNotFoundError: ``redis-server`` is not installed.
        RuntimeError: It did not start.
    """
    path = find_redis(binary)
    directory = Path(tempfile.mkdtemp(prefix="tip-redis-"))
    server = RedisServer(path, directory, free_ports(1)[0])
    with server:
        try:
            server.start()
        except RuntimeError:
            # A port taken between our pick and Redis's bind: one more try on another.
            server.port = free_ports(1)[0]
            server.start()
        yield server
