"""How much the pool adds on top of the Trio primitives it is built from.

Run it with ``.venv/bin/python benchmarks/bench_pool.py`` (it needs Debian's ``dovecot-imapd``).
It starts a private Dovecot on 127.0.0.1 through :func:`trio_imappool.testing.start_dovecot` and
talks to its plain port, without TLS, so that the numbers measure the pool and not encryption.

Two things are measured, each against its floor, the least that any Trio pool of blocking
imapclient connections has to pay:

``checkout``
    ``async with pool.connection() as conn: pass`` with an idle connection available, one task,
    nothing else running: the pool's checkout plus release. The floor is a bare
    ``async with limiter: pass`` on a :class:`trio.CapacityLimiter`, the one primitive a pool
    cannot do without (it is a checkpoint, it counts, it queues waiters fairly). Target: the
    pool costs at most 2.0 times the floor.

``noop``
    ``await conn.noop()`` on a checked-out pooled connection: one IMAP round trip to Dovecot
    through the pool's command path (proxy method, busy check, interruptible thread call). The
    floor is ``await trio.to_thread.run_sync(client.noop, limiter=limiter)`` on a bare
    :class:`imapclient.IMAPClient` logged in to the same server, with ``TCP_NODELAY`` set as the
    pool sets it and a limiter of its own as the pool has. Both pay the same thread hop and the
    same round trip, so the ratio shows the pool's own overhead per command. Target: at most
    1.15 times the floor.

How it measures. The machine may be shared and noisy, so the two sides of each comparison are
interleaved. A round times ``--ops`` checkouts (``--noop-ops`` NOOPs) of each side, the sides
taking turns every 200 checkouts (10 NOOPs), a millisecond or two each, in the order A B B A A B
..., so that both sides of a round are measured over the same stretch of time and drift in the
machine's load hits them alike. There are ``--rounds`` rounds, after one untimed warm-up round
of each side. The reported cost per operation is the median over rounds; min and max show the
spread. The ratio is the pool's median over the floor's median; the range after it is that of
the per-round ratios, a feel for how much to trust it.

How to read it. Costs are in microseconds per operation. A ratio is "met" when it is at or below
its target. With ``--check`` the script exits with status 1 when a target is missed (otherwise
always 0: it is a benchmark, not a test). Absolute numbers depend on the machine; the ratios are
what to compare across machines and commits. A single noisy run can miss a target by a few
percent: run it again before concluding.
"""

from __future__ import annotations

import argparse
import gc
import platform
import socket
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import imapclient
import trio
from imapclient import IMAPClient, SocketTimeout

import trio_imappool
from trio_imappool.testing import start_dovecot

CHECKOUT_TARGET = 2.0
NOOP_TARGET = 1.15
# The sides take turns every this many operations (a millisecond or two of work).
CHECKOUT_BLOCK = 200
NOOP_BLOCK = 10

# One side of a comparison: run this many operations, return the elapsed seconds.
Side = Callable[[int], Awaitable[float]]


@dataclass(frozen=True)
class Result:
    """The per-round costs of both sides of one comparison, in seconds per operation."""

    name: str
    pool_label: str
    floor_label: str
    pool: list[float]
    floor: list[float]
    target: float

    @property
    def ratio(self) -> float:
        return statistics.median(self.pool) / statistics.median(self.floor)

    @property
    def round_ratios(self) -> list[float]:
        return [p / f for p, f in zip(self.pool, self.floor, strict=True)]

    @property
    def met(self) -> bool:
        return self.ratio <= self.target


async def compare(
    name: str,
    pool_side: tuple[str, Side],
    floor_side: tuple[str, Side],
    *,
    rounds: int,
    ops: int,
    block: int,
    target: float,
) -> Result:
    """Time both sides in rounds of *ops* operations each, after one untimed warm-up round.

    Within a round the two sides take turns every *block* operations (A B B A A B ...), so
    that both are measured over the same stretch of wall-clock time.
    """
    (pool_label, run_pool), (floor_label, run_floor) = pool_side, floor_side
    await run_pool(ops)
    await run_floor(ops)
    pool: list[float] = []
    floor: list[float] = []
    for _ in range(rounds):
        gc.collect()  # every round starts with no garbage left by the one before
        pool_time = floor_time = 0.0
        done = 0
        while done < ops:
            n = min(block, ops - done)
            if done // block % 2 == 0:
                pool_time += await run_pool(n)
                floor_time += await run_floor(n)
            else:
                floor_time += await run_floor(n)
                pool_time += await run_pool(n)
            done += n
        pool.append(pool_time / ops)
        floor.append(floor_time / ops)
    return Result(name, pool_label, floor_label, pool, floor, target)


async def bench_checkout(pool: trio_imappool.Pool, rounds: int, ops: int) -> Result:
    limiter = trio.CapacityLimiter(pool.config.max_size)

    async def pooled(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            async with pool.connection():
                pass
        return time.perf_counter() - start

    async def bare(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            async with limiter:
                pass
        return time.perf_counter() - start

    return await compare(
        "checkout",
        ("async with pool.connection(): pass", pooled),
        ("async with CapacityLimiter: pass", bare),
        rounds=rounds,
        ops=ops,
        block=CHECKOUT_BLOCK,
        target=CHECKOUT_TARGET,
    )


async def bench_noop(pool: trio_imappool.Pool, client: Any, rounds: int, ops: int) -> Result:
    limiter = trio.CapacityLimiter(pool.config.max_size)

    async def pooled(n: int) -> float:
        async with pool.connection() as conn:
            start = time.perf_counter()
            for _ in range(n):
                await conn.noop()
            return time.perf_counter() - start

    async def bare(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            await trio.to_thread.run_sync(client.noop, limiter=limiter)
        return time.perf_counter() - start

    return await compare(
        "noop",
        ("await conn.noop()", pooled),
        ("to_thread.run_sync(client.noop)", bare),
        rounds=rounds,
        ops=ops,
        block=NOOP_BLOCK,
        target=NOOP_TARGET,
    )


def open_bare_client(settings: dict[str, Any]) -> Any:
    """A logged-in imapclient client, set up as the pool sets up its own."""
    client = IMAPClient(
        settings["host"],
        settings["port"],
        ssl=False,
        timeout=SocketTimeout(connect=10.0, read=30.0),
    )
    client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.login(settings["username"], settings["password"])
    return client


async def run_benchmarks(
    settings: dict[str, Any], rounds: int, checkout_ops: int, noop_ops: int
) -> list[Result]:
    client = await trio.to_thread.run_sync(open_bare_client, settings)
    try:
        async with trio_imappool.open_pool(**settings, min_size=1, max_size=1) as pool:
            with trio.fail_after(10):
                await pool.counts.wait_value(lambda counts: counts.idle > 0)
            checkout = await bench_checkout(pool, rounds, checkout_ops)
            noop = await bench_noop(pool, client, rounds, noop_ops)
    finally:
        await trio.to_thread.run_sync(client.logout)
    return [checkout, noop]


def report(results: Sequence[Result], header: str) -> str:
    def us(seconds: float) -> str:
        return f"{seconds * 1e6:9.2f}"

    lines = [header, ""]
    lines.append(f"{'case':<9} {'side':<36} {'median us':>9} {'min':>9} {'max':>9}")
    for r in results:
        for case, label, costs in ((r.name, r.pool_label, r.pool), ("", r.floor_label, r.floor)):
            lines.append(
                f"{case:<9} {label:<36} {us(statistics.median(costs))}"
                f" {us(min(costs))} {us(max(costs))}"
            )
    lines.append("")
    for r in results:
        spread = r.round_ratios
        verdict = "met" if r.met else "NOT met"
        lines.append(
            f"{r.name:<9} pool/floor = {r.ratio:5.2f}  (per round {min(spread):.2f}"
            f"..{max(spread):.2f})  target <= {r.target:.2f}: {verdict}"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure the pool's checkout and command overhead against bare Trio.",
    )
    parser.add_argument("--rounds", type=int, default=15, help="rounds per case (default 15)")
    parser.add_argument(
        "--ops", type=int, default=2000, help="checkouts per round and side (default 2000)"
    )
    parser.add_argument(
        "--noop-ops", type=int, default=300, help="NOOPs per round and side (default 300)"
    )
    parser.add_argument(
        "--check", action="store_true", help="exit with status 1 when a target is missed"
    )
    args = parser.parse_args(argv)
    for name in ("rounds", "ops", "noop_ops"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    with start_dovecot() as server:
        settings = server.pool_kwargs(tls=False)
        results = trio.run(run_benchmarks, settings, args.rounds, args.ops, args.noop_ops)
    header = (
        f"trio-imappool {trio_imappool.__version__} on Python {platform.python_version()}, "
        f"trio {trio.__version__}, imapclient {imapclient.__version__}; Dovecot on "
        f"{settings['host']} (plain)\n"
        f"{args.rounds} rounds x {args.ops} checkouts / {args.noop_ops} NOOPs per side, "
        f"interleaved; per-op cost = median over rounds; "
        f"{time.perf_counter() - started:.1f} s in all"
    )
    print(report(results, header))
    missed = [r.name for r in results if not r.met]
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
