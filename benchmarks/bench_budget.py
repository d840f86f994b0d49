"""What a shared connection budget (:class:`trio_imappool.RedisBudget`) costs a checkout.

Run it with ``.venv/bin/python benchmarks/bench_budget.py`` (it needs Debian's ``dovecot-imapd``
and ``redis-server``, and the ``redis`` extra). It starts a private Dovecot and a private Redis on
127.0.0.1 and talks to Dovecot's plain port.

``open``
    A checkout that must open a connection (the pool is drained after each one, so none is
    idle): connect, greeting, LOGIN, through a pool with a budget against one without. The
    budget adds one script call to Redis (through a worker thread) before connecting; that is
    the cost to expect, a fraction of a millisecond against a few milliseconds of opening.
``reuse``
    A checkout of an idle connection plus its release, with and without a budget: the budget is
    not on this path at all (giving a place back happens in the pool's background, once the
    server has closed its end), so the ratio should be 1.0 within noise.
``script``
    One take-and-give-back of a place straight on the budget (two script calls), for scale.

The two sides of each comparison are interleaved in rounds (A B B A ...), the reported cost per
operation is the median over rounds, and the ratio is with-budget over without.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence

import trio

import trio_imappool
from trio_imappool.testing import start_dovecot, start_redis


async def timed(op: Callable[[], Awaitable[None]], count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        await op()
    return (time.perf_counter() - start) / count * 1e6


async def compare(
    a: Callable[[], Awaitable[None]],
    b: Callable[[], Awaitable[None]],
    rounds: int,
    ops: int,
) -> tuple[float, float]:
    await timed(a, ops)  # warm-up
    await timed(b, ops)
    costs_a: list[float] = []
    costs_b: list[float] = []
    for i in range(rounds):
        pair = [(a, costs_a), (b, costs_b)]
        if i % 2:
            pair.reverse()
        for op, costs in pair:
            costs.append(await timed(op, ops))
    return statistics.median(costs_a), statistics.median(costs_b)


async def run(rounds: int, ops: int) -> str:
    lines = []
    with (
        start_dovecot(max_userip_connections=100) as server,
        start_redis() as redis,
        trio_imappool.RedisBudget(redis.url, limit=50, key="bench") as budget,
    ):
        settings = server.pool_kwargs(tls=False)
        async with (
            trio_imappool.open_pool(**settings, max_size=2, budget=budget) as with_budget,
            trio_imappool.open_pool(**settings, max_size=2) as without,
        ):

            def opener(pool: trio_imappool.Pool) -> Callable[[], Awaitable[None]]:
                async def op() -> None:
                    async with pool.connection():
                        pass
                    pool.drain()

                return op

            def reuser(pool: trio_imappool.Pool) -> Callable[[], Awaitable[None]]:
                async def op() -> None:
                    async with pool.connection():
                        pass

                return op

            budgeted, bare = await compare(opener(with_budget), opener(without), rounds, ops)
            lines.append(
                f"open   (checkout that opens): budget {budgeted:8.0f} us, none {bare:8.0f} us,"
                f" ratio {budgeted / bare:.3f} (+{budgeted - bare:.0f} us)"
            )
            budgeted, bare = await compare(reuser(with_budget), reuser(without), rounds, ops * 20)
            lines.append(
                f"reuse  (idle checkout+release): budget {budgeted:6.1f} us, none {bare:6.1f} us,"
                f" ratio {budgeted / bare:.3f}"
            )
        place = budget.new_place()

        async def take_and_give() -> None:
            await budget.try_acquire(place)
            await budget.release(place)

        cost = await timed(take_and_give, ops * 5)
        lines.append(f"script (take + give back a place, 2 calls): {cost:.0f} us")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--ops", type=int, default=50, help="opens per side and round")
    args = parser.parse_args(argv)
    logging.getLogger("trio_imappool").setLevel(logging.ERROR)  # drain() warns each time
    print(f"bench_budget: {args.rounds} rounds, {args.ops} opens per side and round")
    print(trio.run(run, args.rounds, args.ops))
    return 0


if __name__ == "__main__":
    sys.exit(main())
