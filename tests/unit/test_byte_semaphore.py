"""ByteSemaphore without a server or threads: Trio's own loop and a virtual clock.

The rules pinned here: requests are served first come, first served (a large one is not
overtaken by small ones that would fit); a request larger than the whole budget waits until
nothing else is held; a cancelled wait takes nothing and lets the ones behind it go; force()
over-commits; release() refuses to give back more than is held.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trio_imappool._byte_semaphore import ByteSemaphore


def test_the_budget_must_be_a_positive_int() -> None:
    for bad in (0, -1, 1.5, True, "64"):
        with pytest.raises(ValueError, match="byte budget"):
            ByteSemaphore(bad)  # type: ignore[arg-type]


async def test_acquire_within_the_budget_does_not_wait_and_is_a_checkpoint() -> None:
    budget = ByteSemaphore(100)
    with trio.testing.assert_checkpoints():
        await budget.acquire(60)
    with trio.testing.assert_checkpoints():
        await budget.acquire(40)
    assert budget.in_use == 100
    budget.release(100)
    stats = budget.statistics()
    assert (stats.total, stats.in_use, stats.waiting, stats.peak) == (100, 0, 0, 100)
    assert "0/100 bytes" in repr(budget)


async def test_a_cancelled_caller_takes_nothing_even_when_bytes_are_free() -> None:
    budget = ByteSemaphore(100)
    with trio.CancelScope() as scope:
        scope.cancel()
        await budget.acquire(10)
    assert budget.in_use == 0


async def test_waiters_are_served_in_order_and_a_large_one_is_not_overtaken() -> None:
    budget = ByteSemaphore(100)
    await budget.acquire(90)
    order: list[str] = []

    async def take(name: str, nbytes: int) -> None:
        await budget.acquire(nbytes)
        order.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(take, "large", 80)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(take, "small", 5)  # would fit now, but the large one is first
        await trio.testing.wait_all_tasks_blocked()
        assert order == []
        with pytest.raises(trio.WouldBlock):
            budget.acquire_nowait(1)  # nowait does not jump the queue either
        assert budget.statistics().waiting == 2
        nursery.start_soon(take, "medium", 30)
        await trio.testing.wait_all_tasks_blocked()
        budget.release(90)  # the large and the small go; the medium (115 > 100) waits
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(order) == ["large", "small"]
        assert budget.in_use == 85
        budget.release(80)
        await trio.testing.wait_all_tasks_blocked()
    assert order[2:] == ["medium"]
    assert budget.in_use == 35


async def test_a_request_larger_than_the_budget_waits_until_nothing_is_held() -> None:
    budget = ByteSemaphore(100)
    await budget.acquire(30)
    await budget.acquire(30)
    got = trio.Event()

    async def huge() -> None:
        await budget.acquire(250)
        got.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(huge)
        await trio.testing.wait_all_tasks_blocked()
        budget.release(30)
        await trio.testing.wait_all_tasks_blocked()
        assert not got.is_set()  # 30 still held
        budget.release(30)
        await trio.testing.wait_all_tasks_blocked()
        assert got.is_set()
    assert budget.in_use == 250  # over the budget, alone
    with pytest.raises(trio.WouldBlock):
        budget.acquire_nowait(1)
    budget.release(250)
    budget.acquire_nowait(1)


async def test_a_cancelled_waiter_gives_its_place_to_the_ones_behind() -> None:
    budget = ByteSemaphore(100)
    await budget.acquire(50)
    served: list[str] = []
    large_scope = trio.CancelScope()

    async def large() -> None:
        with large_scope:
            await budget.acquire(80)
            served.append("large")

    async def small() -> None:
        await budget.acquire(40)
        served.append("small")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(large)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(small)
        await trio.testing.wait_all_tasks_blocked()
        assert served == []
        large_scope.cancel()  # the head gives up: the small one fits and goes
        await trio.testing.wait_all_tasks_blocked()
        assert served == ["small"]
    assert budget.in_use == 90
    assert budget.statistics().waiting == 0


async def test_waiting_follows_a_virtual_clock_and_a_timeout_leaves_nothing_held(
    autojump_clock: trio.testing.MockClock,
) -> None:
    budget = ByteSemaphore(10)
    await budget.acquire(10)

    async def release_later() -> None:
        await trio.sleep(5)
        budget.release(10)

    async with trio.open_nursery() as nursery:
        with trio.move_on_after(1):
            await budget.acquire(3)
        assert budget.in_use == 10
        nursery.start_soon(release_later)
        start = trio.current_time()
        await budget.acquire(3)
        assert trio.current_time() - start == pytest.approx(5)
    assert budget.in_use == 3


async def test_force_over_commits_and_release_refuses_more_than_is_held() -> None:
    budget = ByteSemaphore(10)
    await budget.acquire(8)
    budget.force(7)  # a message larger than planned, already in memory
    assert budget.in_use == 15
    assert budget.statistics().peak == 15
    with pytest.raises(ValueError, match="only 15"):
        budget.release(16)
    with pytest.raises(ValueError, match="byte count"):
        budget.release(-1)
    with pytest.raises(ValueError, match="byte count"):
        budget.force(-1)
    with pytest.raises(ValueError, match="byte count"):
        await budget.acquire(-1)
    budget.release(15)
    assert budget.in_use == 0
