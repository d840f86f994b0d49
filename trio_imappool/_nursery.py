"""A nursery whose body's own exception comes out as it was raised.

Every context manager of ours that owns a nursery (``open_pool``, ``open_pool_group``,
``fetch_many``'s results, the exporter) wants the same thing: when the code in the ``async with``
block raises, the caller sees that exception, not an exception group holding it; an error of a
background task still comes out as the group trio made.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from ._util import holds_only

__all__ = ["open_nursery_unwrapped"]


@asynccontextmanager
async def open_nursery_unwrapped() -> AsyncIterator[trio.Nursery]:
    """``trio.open_nursery()``, except that an exception raised by the body is re-raised as
    itself when it is all the nursery's group holds (possibly nested in one-exception groups).

    The body still runs inside the nursery: cleanup that must run before the nursery's tasks
    are waited for (cancelling them, closing a pool) belongs in the body's own ``finally``.
    """
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            try:
                yield nursery
            except BaseException as exc:
                body_error = exc
                raise
    except BaseExceptionGroup as group:
        if body_error is None or not holds_only(group, body_error):
            raise
    if body_error is not None:
        raise body_error
