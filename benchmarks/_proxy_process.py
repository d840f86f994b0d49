"""The latency proxy of :mod:`trio_imappool.testing` in a process of its own, for benchmarks.

The proxy stands for the network between client and server, so it must not compete with the
client it measures for the GIL: run in a thread of the benchmark's process, its forwarding
would slow the clients with the most threads most.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

PROXY_SCRIPT = """
import sys
from trio_imappool.testing import start_proxy_thread
host, port, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
with start_proxy_thread(host, port, up=delay, down=delay) as proxy:
    print(proxy.port, flush=True)
    sys.stdin.read()
"""


@contextmanager
def proxy_process(host: str, port: int, delay: float) -> Iterator[int]:
    """The latency proxy in a process of its own; yields its port."""
    process = subprocess.Popen(
        [sys.executable, "-c", PROXY_SCRIPT, host, str(port), str(delay)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            raise RuntimeError("the proxy process did not start")
        yield int(line)
    finally:
        assert process.stdin is not None
        process.stdin.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
