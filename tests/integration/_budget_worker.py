"""A worker process for tests/integration/test_budget.py: one pool with a Redis budget.

Run as ``python -m tests.integration._budget_worker JSON``; the JSON has ``mode`` and settings. It
prints one JSON line per event the test waits for (``{"event": "ready"}``, ...) and a last line
``{"event": "done", ...}`` with its counts. Modes:

``load``
    ``tasks`` tasks check connections out for ``seconds`` seconds, each checkout with a random
    timeout in [0.05, 0.5] s, a NOOP, and a random hold in [0, ``hold``] s.
``hold``
    Check out ``count`` connections and hold them until killed (prints ``held``).
``fair``
    Budget only (no pool): prints ``ready``, reads a wall-clock start time from stdin, and at
    ``start + offset`` for each offset in ``arrivals`` a waiter joins the queue for a place;
    once it has one it holds it ``hold`` seconds and gives it back. Prints, per waiter, the
    times before and after its first ask (its ticket is drawn in between) and its grant time.
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from typing import Any

import trio

from trio_imappool import (
    BudgetUnavailableError,
    ConnectionLimitError,
    PoolTimeout,
    RedisBudget,
    open_pool,
)


def emit(**event: Any) -> None:
    print(json.dumps(event), flush=True)


class _LimitCounter(logging.Handler):
    """Counts the pool's warnings about logins refused for too many connections."""

    def __init__(self) -> None:
        super().__init__()
        self.refusals = 0

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "ConnectionLimitError" in text or "Maximum number of connections" in text:
            self.refusals += 1


async def load(settings: dict[str, Any], budget: RedisBudget) -> None:
    counter = _LimitCounter()
    logging.getLogger("trio_imappool").addHandler(counter)
    counts = {"ok": 0, "timeout": 0, "limit": 0, "budget": 0, "other": 0}
    others: list[str] = []
    end = time.monotonic() + settings["seconds"]

    async def worker() -> None:
        while time.monotonic() < end:
            try:
                async with pool.connection(timeout=random.uniform(0.05, 0.5)) as conn:
                    await conn.noop()
                    await trio.sleep(random.uniform(0, settings["hold"]))
                counts["ok"] += 1
            except PoolTimeout as exc:
                unavailable = isinstance(exc.__cause__, BudgetUnavailableError)
                counts["budget" if unavailable else "timeout"] += 1
            except ConnectionLimitError:
                counts["limit"] += 1
            except BudgetUnavailableError:
                counts["budget"] += 1
            except Exception as exc:
                counts["other"] += 1
                others.append(f"{type(exc).__name__}: {exc}")
                await trio.sleep(0.01)

    async with open_pool(**settings["pool"], max_size=8, budget=budget) as pool:
        emit(event="ready")
        async with trio.open_nursery() as nursery:
            for _ in range(settings["tasks"]):
                nursery.start_soon(worker)
        stats = pool.statistics()
    emit(
        event="done",
        counts=counts,
        others=others[:5],
        refusals=counter.refusals,
        opened=stats.connections_opened,
    )


async def hold(settings: dict[str, Any], budget: RedisBudget) -> None:
    async with (
        open_pool(**settings["pool"], max_size=8, budget=budget) as pool,
        trio.open_nursery() as nursery,
    ):
        held = 0
        all_held = trio.Event()

        async def holder() -> None:
            nonlocal held
            async with pool.connection(timeout=30) as conn:
                await conn.noop()
                held += 1
                if held == settings["count"]:
                    all_held.set()
                await trio.sleep_forever()

        for _ in range(settings["count"]):
            nursery.start_soon(holder)
        await all_held.wait()
        emit(event="held")


async def fair(settings: dict[str, Any], budget: RedisBudget) -> None:
    key = settings["key"]
    results: list[dict[str, float]] = []

    async def waiter(at: float) -> None:
        await trio.sleep(max(0.0, at - time.time()))
        place = budget.new_place()
        # The ticket is drawn while the first ask runs: between these two times.
        before = time.time()
        held = await budget.try_acquire(place, key=key)
        after = time.time()
        if not held:
            await budget.acquire(place, key=key)  # the same place keeps its turn
        granted = time.time()
        await trio.sleep(settings["hold"])
        await budget.release(place, key=key)
        results.append({"before": before, "after": after, "granted": granted})

    await budget.counts(key=key)  # connected, scripts loaded
    emit(event="ready")
    start = float(await trio.to_thread.run_sync(sys.stdin.readline))
    async with trio.open_nursery() as nursery:
        for offset in settings["arrivals"]:
            nursery.start_soon(waiter, start + offset)
    emit(event="done", results=results)


def main() -> None:
    settings = json.loads(sys.argv[1])
    budget = RedisBudget(
        settings["redis"],
        limit=settings["limit"],
        lease=settings["lease"],
        timeout=settings["lease"] / 3,
        key=settings.get("key"),
    )
    mode = {"load": load, "hold": hold, "fair": fair}[settings["mode"]]
    with budget:
        trio.run(mode, settings, budget)


if __name__ == "__main__":
    main()
