"""The connection budget's parts that need no Redis: its settings, keys, places and URL."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import trio
import trio.testing
import trio_util

from trio_imappool import ConfigurationError, PoolConfig, RedisBudget
from trio_imappool._budget_places import PoolPlaces
from trio_imappool._budget_scripts import (
    ACQUIRE,
    COUNT,
    RELEASE,
    RENEW,
    SHARE_EVERY,
    redis_keys,
)
from trio_imappool._stats import PoolCounts

URL = "redis://127.0.0.1:1/0"  # never connected to: nothing here talks to Redis


def test_the_five_keys_share_one_cluster_slot() -> None:
    keys = redis_keys("budget:a")
    assert keys == [
        "{budget:a}:holders",
        "{budget:a}:queue",
        "{budget:a}:waiting",
        "{budget:a}:tickets",
        "{budget:a}:fence",
    ]


@pytest.mark.parametrize("script", [ACQUIRE, RELEASE, RENEW, COUNT])
def test_every_script_reads_the_time_from_redis_and_drops_expired_leases(script: str) -> None:
    assert "redis.call('TIME')" in script
    assert "ZREMRANGEBYSCORE', KEYS[1], '-inf', now" in script


def test_a_budget_without_a_key_has_one_per_account() -> None:
    with RedisBudget(URL, limit=3) as budget:
        alice = PoolConfig.build("imap.example.org", username="alice", password="p")
        bob = dataclasses.replace(alice, username="bob")
        assert budget.key_for(alice) == "trio-imappool:budget:imap.example.org:993:alice"
        assert budget.key_for(alice) != budget.key_for(bob)
        with pytest.raises(ConfigurationError, match="no key of its own"):
            budget._keys(None)
    with RedisBudget(URL, limit=3, key="shared") as budget:
        assert budget.key_for(alice) == budget.key_for(bob) == "shared"
        assert budget._keys(None) == redis_keys("shared")


def test_places_are_unique() -> None:
    with RedisBudget(URL, limit=1) as budget, RedisBudget(URL, limit=1) as other:
        places = {budget.new_place() for _ in range(100)} | {other.new_place() for _ in range(100)}
    assert len(places) == 200


def test_the_password_of_the_url_is_never_shown() -> None:
    with RedisBudget("redis://user:hunter2@127.0.0.1:6390/2", limit=2) as budget:
        assert budget.url == "redis://127.0.0.1:6390/2"
        assert "hunter2" not in repr(budget)
        assert budget._scrub("auth failed for hunter2") == "auth failed for ***"
        assert budget.statistics().limit == 2


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"limit": 0}, "limit must be an int >= 1"),
        ({"limit": True}, "limit must be an int >= 1"),
        ({"limit": 2, "lease": 0}, "lease must be a positive number"),
        ({"limit": 2, "timeout": -1}, "timeout must be a positive number"),
        ({"limit": 2, "poll_max": "1"}, "poll_max must be a positive number"),
        ({"limit": 2, "lease": 2.0, "timeout": 1.0}, "at least three times timeout"),
        ({"limit": 2, "key": ""}, "key must be a non-empty str"),
        ({"limit": 2, "restart_fence": -1}, "restart_fence must be >= 0"),
    ],
)
def test_invalid_settings_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        RedisBudget(URL, **options)


def test_an_invalid_url_is_refused_without_its_password() -> None:
    with pytest.raises(ConfigurationError, match="url must be a str"):
        RedisBudget(b"redis://x", limit=1)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError) as refused:
        RedisBudget("http://user:hunter2@127.0.0.1:6379", limit=1)
    assert "hunter2" not in str(refused.value)


def test_the_restart_fence_defaults_to_two_timeouts_and_a_half_second() -> None:
    with RedisBudget(URL, limit=1, timeout=0.5) as budget:
        assert budget.restart_fence == 1.5
    with RedisBudget(URL, limit=1, restart_fence=0) as budget:
        assert budget.restart_fence == 0.0


class _Queue:
    """A budget whose queue holds one opener of the pool's own, which leaves it (in Redis,
    then in the pool's count) while the budget is being asked."""

    key = "k"
    lease = 60.0

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.looks = 0

    def key_for(self, config: object) -> str:
        return self.key

    async def _look(self, key: str) -> tuple[int, int, bool]:
        self.looks += 1
        waiting = 1 if self.pool.queued else 0  # read before the opener left
        await trio.sleep(0.01)
        self.pool.queued = 0  # the opener gave up: out of Redis's queue, then out of ours
        return 1, waiting, False

    async def renew(self, places: list[str], *, key: str | None = None) -> list[str]:
        return []


class _Pool:
    def __init__(self) -> None:
        self.queued = 1
        self.closed_idle = 0
        self.config = object()

    @property
    def _queued(self) -> int:
        return self.queued

    @property
    def counts(self) -> Any:
        return trio_util.AsyncValue(PoolCounts(2, 1, 1, 0, 0))

    def close_idle(self, count: int = 1) -> int:
        self.closed_idle += count
        return count


async def test_an_opener_of_ours_leaving_the_queue_while_redis_is_asked_closes_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pool = _Pool()
    budget = _Queue(pool)
    async with trio.open_nursery() as nursery:
        places = PoolPlaces(budget, pool, nursery)  # type: ignore[arg-type]
        places._places[object()] = "p1"  # type: ignore[index]  # one place held
        await trio.sleep(10 * SHARE_EVERY)
        nursery.cancel_scope.cancel()
    assert budget.looks >= 5
    assert pool.closed_idle == 0  # nobody else waits: the idle connection stays
