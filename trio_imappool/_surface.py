"""What the bulk operations, IDLE and the pool group need of a pool: a small structural type.

:class:`~trio_imappool.Pool` satisfies :class:`PoolSurface` without naming it. The modules built
on a pool (``_fanout``, ``_idle``, ``_group``) import this instead of ``_pool``, so the driver
can offer ``pool.fetch_many(...)`` and ``pool.idle(...)`` as one-way conveniences and no module
below the driver imports it, not even for types (tests/unit/test_layering.py keeps it so).
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ._config import PoolConfig
    from ._connection import Connection
    from ._stats import AsyncCounts, PoolStatistics


class PoolSurface(Protocol):
    """The part of a pool that code built on it may use."""

    @property
    def config(self) -> PoolConfig:
        """The settings the pool was opened with (its name and ``max_size`` among them)."""

    @property
    def counts(self) -> AsyncCounts:
        """Idle, in use, opening and waiting, as a value that can be waited on."""

    @property
    def closed(self) -> bool:
        """Whether the pool has closed (its block ended or ``aclose`` ran)."""

    def statistics(self) -> PoolStatistics:
        """A snapshot of the counts and the totals since the pool opened."""

    def connection(
        self, folder: str | None = None, *, readonly: bool = False, timeout: float | None = None
    ) -> AbstractAsyncContextManager[Connection]:
        """Check a connection out for an ``async with`` block."""

    def close_idle(self, count: int = 1) -> int:
        """Close up to *count* idle connections now; return how many were closed."""
