"""How fast the pool gets a task out of a stalled command, and back to work after an outage.

Run it with ``.venv/bin/python benchmarks/bench_failures.py`` (it needs Debian's
``dovecot-imapd``). It starts a private Dovecot on 127.0.0.1 through
:func:`trio_imappool.testing.start_dovecot` and talks to its plain port, without TLS. Everything
listens on loopback only. A run takes about 20 s.

Two things are measured:

``cancel``
    Cancellation latency on a stalled command. Clients connect through
    :func:`~trio_imappool.testing.open_fault_proxy`; once a connection is set up, the proxy holds
    back everything the server sends (``proxy.stall("down")``), and a NOOP is issued under
    ``trio.move_on_after(--deadline)`` (0.2 s). The latency is the time from the deadline to the
    cancelled task running again. The pool's side is ``async with pool.connection() as conn:
    await conn.noop()`` (the pool shuts the blocked socket down and discards the connection).
    The floor it is compared with is what plain Trio gives:
    ``trio.to_thread.run_sync(client.noop)`` on a bare :class:`imapclient.IMAPClient` through
    the same proxy, with the default ``abandon_on_cancel=False`` and a socket read timeout of
    ``--bare-timeout`` (2 s): the task cannot leave before the read times out. Every trial uses a
    fresh connection for the stalled command (the pool opens one in an untimed checkout first;
    the bare side connects a new client, since the timed-out one is dead), and the proxy
    resumes between trials. Target: the pool's task resumes within 100 ms of the deadline, on
    its worst trial. Checked as well: after every pool trial no worker thread is left
    (:func:`trio.testing.wait_all_threads_completed`, bounded by 1 s), and the pool's
    statistics count one discarded connection per trial.

``recovery``
    Recovery after a server restart. A pool with ``max_size`` 4 serves four load tasks, each
    looping over checkout + NOOP: the checkout under ``pool.connection(timeout=0.5)``, the
    NOOP under ``trio.move_on_after(0.5)``, errors caught and counted by type, a 2 ms pause
    between iterations. Dovecot is killed (``server.stop()``, in a worker thread so that the
    Trio loop keeps running), kept down ``--down`` seconds (1 s), and started again
    (``server.start()`` in a thread; it returns once its own LOGIN and SELECT succeed). The
    recovery time is from ``start()`` returning to the first success of a NOOP through the
    pool that began after the kill (so the new server answered it). Dovecot listens a few
    milliseconds before ``start()`` returns, so a pool that retries at the right moment can be
    back before it: the time is then negative (or near 0), and that is a fair result. The load
    logs in as the server's second user (bob): ``start()`` checks readiness as the first
    (alice) and then waits, up to 1 s, until that user has no session left, which a pool of
    alice's under load never allows; a pool of alice's would seem to recover a second before
    ``start()`` returned. Repeated ``--restarts`` times (5). Target: at most 1 s, on the worst
    restart. Checked as well: every error the load tasks saw is one the pool documents (a
    :class:`trio_imappool.PoolError`, an imapclient error, or an :class:`OSError`); any other
    type is printed in capitals. The pool's warning log (one line per failed open while the
    server is down) is silenced; its counts are in the statistics printed.

How it measures. The pool and bare trials of ``cancel`` are interleaved (the few slow bare
trials spread evenly among the pool's), after one untimed pool trial as a warm-up, so that both
sides see the same stretch of the machine's load. Times come from Trio's clock (``cancel``) and
:func:`time.perf_counter` (``recovery``: the restart stamps its time in its worker thread). The
reported values are the median and the maximum over trials, in milliseconds.

How to read it. ``bare/pool`` is how many times longer plain Trio keeps a cancelled task
waiting; it is about (read timeout - deadline) over the pool's latency, there for scale, not
as a target. The targets are judged on the maximum, because a pool that is usually prompt but
sometimes waits out a read timeout is not prompt. The recovery time is set by the pool's
backoff between failed opens (``BACKOFF_FIRST`` doubling up to ``BACKOFF_CAP`` in
``trio_imappool/_state.py``, times a jitter in [0.5, 1)): after a second of outage the attempts
are 0.25 to 0.5 s apart, so the pool is back within about half a second of the server plus one
connect and login, anywhere in that range from one restart to the next. With ``--check`` the
script exits with status 1 when a target or a check is missed (otherwise always 0: it is a
benchmark, not a test).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import math
import platform
import socket
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import imapclient
import trio
import trio.testing
from imapclient import IMAPClient, SocketTimeout

import trio_imappool
from trio_imappool.testing import DovecotServer, FaultProxy, open_fault_proxy, start_dovecot

CANCEL_TARGET = 0.100
RECOVERY_TARGET = 1.0
# How long the check for leftover worker threads waits after each pool trial.
THREAD_WAIT_BOUND = 1.0
# Bounds on the untimed steps (setting a connection up, waiting for a recovery).
SETUP_TIMEOUT = 10.0
RECOVERY_BOUND = 10.0
LOAD_TASKS = 4
LOAD_MAX_SIZE = 4
# The load tasks' checkout timeout and command deadline, and their pause between iterations.
LOAD_DEADLINE = 0.5
LOAD_PAUSE = 0.002
# How long the load runs on a healthy server before each restart.
SETTLE = 0.5


# -- cancellation latency --------------------------------------------------------------------


@dataclass(frozen=True)
class CancelResult:
    """Both sides of the cancellation comparison; latencies in seconds after the deadline."""

    deadline: float
    bare_timeout: float
    pool: list[float]
    bare: list[float]
    pool_outcomes: collections.Counter[str]
    bare_outcomes: collections.Counter[str]
    threads_left: int
    thread_wait_max: float
    stats: trio_imappool.PoolStatistics

    @property
    def ratio(self) -> float:
        return statistics.median(self.bare) / statistics.median(self.pool)

    @property
    def met(self) -> bool:
        return max(self.pool) <= CANCEL_TARGET

    @property
    def all_cancelled(self) -> bool:
        return set(self.pool_outcomes) == {"cancelled"}

    @property
    def discards_counted(self) -> bool:
        # One discard per timed trial plus the warm-up trial.
        return self.stats.connections_discarded >= len(self.pool) + 1


def interleave(n_pool: int, n_bare: int) -> list[str]:
    """The order of the trials: the bare ones spread evenly among the pool's."""
    total = n_pool + n_bare
    bare_at = {(2 * k + 1) * total // (2 * n_bare) for k in range(n_bare)}
    return ["bare" if i in bare_at else "pool" for i in range(total)]


async def pool_trial(
    pool: trio_imappool.Pool, proxy: FaultProxy, deadline: float
) -> tuple[float, str]:
    """One stalled NOOP through the pool; returns (seconds after the deadline, outcome)."""
    with trio.fail_after(SETUP_TIMEOUT):
        async with pool.connection() as conn:  # opens a fresh connection through the proxy
            await conn.noop()
    proxy.stall("down")
    outcome = "cancelled"
    try:
        with trio.move_on_after(deadline) as scope:
            try:
                async with pool.connection() as conn:
                    await conn.noop()
            except Exception as exc:
                outcome = type(exc).__name__
            else:
                outcome = "returned"  # the stall did not hold the response back
        latency = trio.current_time() - scope.deadline
    finally:
        proxy.resume()
    return latency, outcome


def open_bare_client(host: str, port: int, settings: dict[str, Any], read_timeout: float) -> Any:
    """A logged-in imapclient client, set up as the pool sets up its own."""
    client = IMAPClient(
        host, port, ssl=False, timeout=SocketTimeout(connect=SETUP_TIMEOUT, read=read_timeout)
    )
    client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.login(settings["username"], settings["password"])
    return client


async def bare_trial(
    settings: dict[str, Any], proxy: FaultProxy, deadline: float, read_timeout: float
) -> tuple[float, str]:
    """One stalled NOOP on a bare client in a worker thread; (seconds after the deadline,
    outcome)."""
    with trio.fail_after(SETUP_TIMEOUT):
        client = await trio.to_thread.run_sync(
            open_bare_client, proxy.host, proxy.port, settings, read_timeout
        )
    proxy.stall("down")
    outcome = "cancelled"
    try:
        with trio.move_on_after(deadline) as scope:
            try:
                await trio.to_thread.run_sync(client.noop)
            except Exception as exc:
                outcome = type(exc).__name__  # TimeoutError, when the read times out
            else:
                outcome = "returned"
        latency = trio.current_time() - scope.deadline
    finally:
        proxy.resume()
        with contextlib.suppress(OSError):
            client.shutdown()  # closes the socket; never blocks, and no thread uses it now
    return latency, outcome


async def wait_threads() -> tuple[float, int]:
    """Wait (bounded) until no worker thread is running; (seconds waited, threads left)."""
    start = trio.current_time()
    with trio.move_on_after(THREAD_WAIT_BOUND):
        await trio.testing.wait_all_threads_completed()
    return trio.current_time() - start, trio.testing.active_thread_count()


async def bench_cancel(
    server: DovecotServer, trials: int, bare_trials: int, deadline: float, bare_timeout: float
) -> CancelResult:
    settings = server.pool_kwargs(tls=False)
    pool_latencies: list[float] = []
    bare_latencies: list[float] = []
    pool_outcomes: collections.Counter[str] = collections.Counter()
    bare_outcomes: collections.Counter[str] = collections.Counter()
    threads_left = 0
    thread_wait_max = 0.0
    async with open_fault_proxy(settings["host"], settings["port"]) as proxy:
        options = {**settings, "host": proxy.host, "port": proxy.port}
        async with trio_imappool.open_pool(**options, min_size=0, max_size=1) as pool:
            await pool_trial(pool, proxy, deadline)  # warm-up, untimed
            for side in interleave(trials, bare_trials):
                if side == "pool":
                    latency, outcome = await pool_trial(pool, proxy, deadline)
                    pool_latencies.append(latency)
                    pool_outcomes[outcome] += 1
                    waited, left = await wait_threads()
                    thread_wait_max = max(thread_wait_max, waited)
                    threads_left = max(threads_left, left)
                else:
                    latency, outcome = await bare_trial(settings, proxy, deadline, bare_timeout)
                    bare_latencies.append(latency)
                    bare_outcomes[outcome] += 1
            stats = pool.statistics()
    return CancelResult(
        deadline,
        bare_timeout,
        pool_latencies,
        bare_latencies,
        pool_outcomes,
        bare_outcomes,
        threads_left,
        thread_wait_max,
        stats,
    )


# -- recovery after a restart ----------------------------------------------------------------

# The error families the pool documents for its users; anything else is a finding.
FAMILIES: tuple[tuple[str, type[BaseException]], ...] = (
    ("PoolError", trio_imappool.PoolError),
    ("imapclient", imapclient.exceptions.IMAPClientError),
    ("OSError", OSError),
)


def type_name(kind: type[BaseException]) -> str:
    """The name to print: imapclient's own for its aliases of imaplib's exceptions."""
    for name, value in vars(imapclient.exceptions).items():
        if value is kind:
            return f"imapclient.exceptions.{name}"
    return f"{kind.__module__}.{kind.__qualname__}"


def family(kind: type[BaseException]) -> str | None:
    for name, base in FAMILIES:
        if issubclass(kind, base):
            return name
    return None


class Load:
    """Load tasks doing checkout + NOOP in a loop, counting what happens."""

    def __init__(self, pool: trio_imappool.Pool) -> None:
        self.pool = pool
        self.successes = 0
        self.deadlines = 0
        self.errors: collections.Counter[type[BaseException]] = collections.Counter()
        # While a restart is watched: the perf_counter times at which NOOPs that began after
        # the server was killed succeeded (so the restarted server answered them).
        self.watch: list[float] | None = None
        self._watch_from = math.inf
        self._changed = trio.Event()

    def watch_from(self, killed: float) -> None:
        """Start collecting the successes of NOOPs begun after *killed*."""
        self.watch = []
        self._watch_from = killed

    def stop_watching(self) -> None:
        self.watch = None
        self._watch_from = math.inf

    async def run_task(self) -> None:
        while True:
            try:
                async with self.pool.connection(timeout=LOAD_DEADLINE) as conn:
                    with trio.move_on_after(LOAD_DEADLINE) as scope:
                        began = time.perf_counter()
                        await conn.noop()
                if scope.cancelled_caught:
                    self.deadlines += 1
                else:
                    self._succeeded(began)
            except Exception as exc:
                self.errors[type(exc)] += 1
            await trio.sleep(LOAD_PAUSE)

    def _succeeded(self, began: float) -> None:
        self.successes += 1
        if self.watch is not None and began > self._watch_from:
            self.watch.append(time.perf_counter())
            self._changed.set()
            self._changed = trio.Event()

    async def first_success(self) -> float:
        """Wait for the first watched success; return its time."""
        while not self.watch:
            await self._changed.wait()
        return min(self.watch)


def start_and_stamp(server: DovecotServer) -> tuple[float, float]:
    """Start Dovecot (blocking, in a worker thread); when it was called and when it returned."""
    called = time.perf_counter()
    server.start()
    return called, time.perf_counter()


@dataclass(frozen=True)
class RecoveryResult:
    down: float
    user: str
    recoveries: list[float]
    start_times: list[float]
    successes: int
    deadlines: int
    errors: collections.Counter[type[BaseException]]
    stats: trio_imappool.PoolStatistics

    @property
    def met(self) -> bool:
        return max(self.recoveries) <= RECOVERY_TARGET

    @property
    def untyped(self) -> list[type[BaseException]]:
        return [kind for kind in self.errors if family(kind) is None]


async def bench_recovery(server: DovecotServer, restarts: int, down: float) -> RecoveryResult:
    # Not the user that start() logs in as to check readiness: after its check, start() waits
    # (up to 1 s) until that user has no session left, which a pool under load never allows.
    user = next(name for name in server.users if name != server.username)
    settings = server.pool_kwargs(user, tls=False)
    recoveries: list[float] = []
    start_times: list[float] = []
    async with trio_imappool.open_pool(**settings, max_size=LOAD_MAX_SIZE) as pool:
        load = Load(pool)
        async with trio.open_nursery() as nursery:
            for _ in range(LOAD_TASKS):
                nursery.start_soon(load.run_task)
            for _ in range(restarts):
                await trio.sleep(SETTLE)  # the load runs on a healthy server
                await trio.to_thread.run_sync(server.stop)
                load.watch_from(time.perf_counter())
                await trio.sleep(down)
                called, started = await trio.to_thread.run_sync(start_and_stamp, server)
                start_times.append(started - called)
                recovered = math.inf
                with trio.move_on_after(RECOVERY_BOUND):
                    recovered = await load.first_success()
                recoveries.append(recovered - started)
                load.stop_watching()
            nursery.cancel_scope.cancel()
        stats = pool.statistics()
    return RecoveryResult(
        down, user, recoveries, start_times, load.successes, load.deadlines, load.errors, stats
    )


# -- report ----------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:9.1f}"


def outcomes(counts: collections.Counter[str]) -> str:
    return ", ".join(f"{name} x{n}" for name, n in counts.most_common())


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def report_cancel(r: CancelResult) -> list[str]:
    s = r.stats
    lines = [
        f"cancel: a NOOP whose response the proxy holds back, under move_on_after"
        f"({r.deadline:g}); latency = resumed - deadline",
        "",
        f"{'side':<52} {'trials':>6} {'median ms':>9} {'max ms':>9}  outcomes",
    ]
    for label, values, counts in (
        ("pool: async with pool.connection(): conn.noop()", r.pool, r.pool_outcomes),
        (
            f"bare: to_thread.run_sync(client.noop), read {r.bare_timeout:g} s",
            r.bare,
            r.bare_outcomes,
        ),
    ):
        lines.append(
            f"{label:<52} {len(values):>6} {ms(statistics.median(values))}"
            f" {ms(max(values))}  {outcomes(counts)}"
        )
    lines += [
        "",
        f"bare/pool (medians) = {r.ratio:.0f}x",
        f"target: pool max <= {CANCEL_TARGET * 1e3:g} ms after the deadline: {verdict(r.met)}",
        f"check: every pool trial ended by the deadline: {verdict(r.all_cancelled)}",
        f"check: worker threads left after the pool trials: {r.threads_left} (longest wait"
        f" {r.thread_wait_max * 1e3:.1f} ms, bound {THREAD_WAIT_BOUND * 1e3:g} ms):"
        f" {verdict(r.threads_left == 0)}",
        f"check: pool opened {s.connections_opened}, discarded {s.connections_discarded}"
        f" ({len(r.pool)} trials + 1 warm-up): {verdict(r.discards_counted)}",
    ]
    return lines


def report_recovery(r: RecoveryResult) -> list[str]:
    s = r.stats
    per_restart = " ".join(f"{x * 1e3:.1f}" for x in r.recoveries)
    lines = [
        f"recovery: max_size {LOAD_MAX_SIZE}, {LOAD_TASKS} load tasks as {r.user}; Dovecot"
        f" killed, down {r.down:g} s, started; time from start() returning to the first good"
        " NOOP",
        "",
        f"restarts {len(r.recoveries)}: median {ms(statistics.median(r.recoveries)).strip()} ms,"
        f" max {ms(max(r.recoveries)).strip()} ms  (per restart: {per_restart} ms)",
        f"target: max <= {RECOVERY_TARGET * 1e3:g} ms: {verdict(r.met)}",
        f"server.start() took median {ms(statistics.median(r.start_times)).strip()} ms, max"
        f" {ms(max(r.start_times)).strip()} ms (the pool may get in while it checks readiness)",
        "",
        f"pool: opened {s.connections_opened}, discarded {s.connections_discarded}, closed"
        f" {s.connections_closed}, open_failures {s.open_failures}, acquires {s.acquires},"
        f" acquire_timeouts {s.acquire_timeouts}",
        f"load: {r.successes} NOOPs succeeded, {r.deadlines} hit the command deadline;"
        f" errors by type:",
    ]
    for kind, n in sorted(r.errors.items(), key=lambda item: -item[1]):
        name = type_name(kind)
        group = family(kind)
        if group is None:
            lines.append(f"  {n:>6}  {name}  !!! UNEXPECTED: NOT A DOCUMENTED ERROR TYPE !!!")
        else:
            lines.append(f"  {n:>6}  {name}  ({group})")
    if not r.errors:
        lines.append("  none")
    lines.append(f"check: every error typed: {verdict(not r.untyped)}")
    return lines


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure cancellation of stalled commands and recovery after a restart.",
    )
    parser.add_argument(
        "--trials", type=int, default=10, help="pool cancellation trials (default 10)"
    )
    parser.add_argument(
        "--bare-trials",
        type=int,
        default=3,
        help="bare-client cancellation trials, each about --bare-timeout long (default 3)",
    )
    parser.add_argument(
        "--deadline", type=float, default=0.2, help="the cancel deadline in s (default 0.2)"
    )
    parser.add_argument(
        "--bare-timeout",
        type=float,
        default=2.0,
        help="the bare client's socket read timeout in s (default 2)",
    )
    parser.add_argument("--restarts", type=int, default=5, help="server restarts (default 5)")
    parser.add_argument(
        "--down", type=float, default=1.0, help="how long the server stays down, s (default 1)"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit with status 1 when a target or a check is missed",
    )
    args = parser.parse_args(argv)
    for name in ("trials", "bare_trials", "restarts"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("deadline", "bare_timeout", "down"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    return args


async def run_benchmarks(
    server: DovecotServer, args: argparse.Namespace
) -> tuple[CancelResult, RecoveryResult]:
    cancel = await bench_cancel(
        server, args.trials, args.bare_trials, args.deadline, args.bare_timeout
    )
    recovery = await bench_recovery(server, args.restarts, args.down)
    return cancel, recovery


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # The pool logs a warning per failed open while Dovecot is down; the counts are reported.
    logging.getLogger("trio_imappool").addHandler(logging.NullHandler())
    started = time.perf_counter()
    with start_dovecot() as server:
        host = server.host
        cancel, recovery = trio.run(run_benchmarks, server, args)
    header = (
        f"trio-imappool {trio_imappool.__version__} on Python {platform.python_version()}, "
        f"trio {trio.__version__}, imapclient {imapclient.__version__}; Dovecot on "
        f"{host} (plain); {time.perf_counter() - started:.1f} s in all"
    )
    print("\n".join([header, "", *report_cancel(cancel), "", *report_recovery(recovery)]))
    ok = (
        cancel.met
        and cancel.all_cancelled
        and cancel.threads_left == 0
        and cancel.discards_counted
        and recovery.met
        and not recovery.untyped
    )
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
