"""One account of a pool group: its pool's life, from the credentials lookup until it closes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Generic, TypeVar

import trio

if TYPE_CHECKING:
    from ._surface import PoolSurface

__all__ = ["Account", "P", "copy_error"]

#: The type of the accounts' pools (the group opens :class:`~trio_imappool.Pool` objects;
#: the machinery needs only their :class:`~trio_imappool._surface.PoolSurface`).
P = TypeVar("P", bound="PoolSurface")


class Account(Generic[P]):
    """One account's pool, from the credentials lookup until the pool is closed."""

    __slots__ = (
        "active",
        "creating",
        "done",
        "error",
        "last_used",
        "name",
        "pool",
        "ready",
        "retired",
        "stop",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.pool: P | None = None
        # Why the pool could not be opened (None if it was, or if the group closed first).
        self.error: BaseException | None = None
        self.ready = trio.Event()  # the pool is open, or opening it failed
        self.stop = trio.Event()  # tells the pool's task to close the pool
        self.done = trio.Event()  # the pool is closed, or was never opened
        self.creating = trio.CancelScope()  # the credentials lookup and the pool's opening
        # Checkouts and pool() blocks in progress (waiting ones included): the account is in use.
        self.active = 0
        self.last_used = trio.current_time()
        # No longer handed out: the next use of the account opens a new pool.
        self.retired = False


def copy_error(error: BaseException) -> BaseException:
    """A copy of *error* for one more waiting task (raising one object in many tasks would
    tangle their tracebacks)."""
    try:
        copy = type(error)(*error.args)
    except Exception:
        return error
    copy.__cause__ = error.__cause__
    return copy
