"""A semaphore counted in bytes: memory for messages in flight, shared fairly.

A :class:`trio.Semaphore` counts tokens of one size. Messages differ in size by five orders
of magnitude (a 2 KB note, a 25 MB attachment), so bounding memory by counting messages
bounds nothing: forty large messages in flight are a gigabyte. :class:`ByteSemaphore` counts
bytes instead: a task asks for as many bytes as it is about to hold, waits until that many
are free, and gives them back when it has handed the data on.

Two rules keep it from starving anyone:

- **First come, first served.** Requests are granted in the order they were made: a large
  request at the head of the queue is not overtaken by a stream of small ones that would each
  fit (they wait behind it), and :meth:`ByteSemaphore.acquire_nowait` fails while anyone
  waits.
- **A request larger than the whole budget** is granted when nothing else is held, and then
  holds more than the budget until it is released: a message larger than the budget is
  still fetched, alone.

No I/O; Trio only for the waiting.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Final

import trio

__all__ = ["ByteSemaphore", "ByteSemaphoreStatistics"]


@dataclasses.dataclass(frozen=True, slots=True)
class ByteSemaphoreStatistics:
    """A snapshot of a :class:`ByteSemaphore`.

    Attributes:
        total: The budget, in bytes.
        in_use: Bytes held now (may exceed *total* while a request larger than the budget, or
            a :meth:`~ByteSemaphore.force`, holds them).
        waiting: Requests waiting for bytes.
        peak: The most bytes ever held at once.
    """

    total: int
    in_use: int
    waiting: int
    peak: int


class _Waiter:
    __slots__ = ("nbytes", "task")

    def __init__(self, task: trio.lowlevel.Task, nbytes: int) -> None:
        self.task = task
        self.nbytes = nbytes


def _check(nbytes: int) -> None:
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"a byte count must be an int >= 0, not {nbytes!r}")


class ByteSemaphore:
    """A budget of *total* bytes that tasks acquire and release, in FIFO order.

    ::

        budget = ByteSemaphore(64 * 1024 * 1024)
        await budget.acquire(len_planned)   # waits until that many bytes are free
        ...                                 # hold the data
        budget.release(len_planned)

    Not tied to a task: any task may release what another acquired (a fetching task
    acquires, a writing task releases).

    Args:
        total: The budget, in bytes (an int >= 1).

    Raises:
        ValueError: *total* is not an int >= 1.
    """

    def __init__(self, total: int) -> None:
        if isinstance(total, bool) or not isinstance(total, int) or total < 1:
            raise ValueError(f"the byte budget must be an int >= 1, not {total!r}")
        self.total: Final = total
        self._in_use = 0
        self._peak = 0
        self._waiters: collections.deque[_Waiter] = collections.deque()

    def __repr__(self) -> str:
        return (
            f"<ByteSemaphore {self._in_use}/{self.total} bytes in use, "
            f"{len(self._waiters)} waiting>"
        )

    @property
    def in_use(self) -> int:
        """Bytes held now."""
        return self._in_use

    def statistics(self) -> ByteSemaphoreStatistics:
        """A frozen snapshot: total, in use, waiting, peak."""
        return ByteSemaphoreStatistics(self.total, self._in_use, len(self._waiters), self._peak)

    def _fits(self, nbytes: int) -> bool:
        # A request larger than the budget fits only when nothing else is held.
        return self._in_use + nbytes <= self.total or self._in_use == 0

    def _take(self, nbytes: int) -> None:
        self._in_use += nbytes
        self._peak = max(self._peak, self._in_use)

    def acquire_nowait(self, nbytes: int) -> None:
        """Take *nbytes* now, or raise :class:`trio.WouldBlock` (also while others wait:
        they come first).

        Raises:
            trio.WouldBlock: Not enough free bytes, or another request is waiting.
            ValueError: *nbytes* is not an int >= 0.
        """
        _check(nbytes)
        if self._waiters or not self._fits(nbytes):
            raise trio.WouldBlock
        self._take(nbytes)

    async def acquire(self, nbytes: int) -> None:
        """Wait until *nbytes* are free and every earlier request has been served; take them.

        Raises:
            ValueError: *nbytes* is not an int >= 0 (before any waiting).

        **Cancellation**: a checkpoint. A cancelled call takes nothing (its place in the queue
        is given up, and the requests behind it are served if they now fit).
        """
        _check(nbytes)
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._waiters and self._fits(nbytes):
            self._take(nbytes)
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        waiter = _Waiter(trio.lowlevel.current_task(), nbytes)
        self._waiters.append(waiter)

        def abort(_: object) -> trio.lowlevel.Abort:
            self._waiters.remove(waiter)
            self._wake()  # the ones behind it may fit now
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def force(self, nbytes: int) -> None:
        """Take *nbytes* without waiting, even beyond the budget: for data already in memory
        that turned out larger than was acquired for it (a message larger than its announced
        size). The budget is over-committed until it is released.

        Raises:
            ValueError: *nbytes* is not an int >= 0.
        """
        _check(nbytes)
        self._take(nbytes)

    def release(self, nbytes: int) -> None:
        """Give *nbytes* back and serve the waiting requests that now fit, in order.

        Raises:
            ValueError: *nbytes* is not an int >= 0, or more than is held.
        """
        _check(nbytes)
        if nbytes > self._in_use:
            raise ValueError(f"released {nbytes} bytes, but only {self._in_use} are held")
        self._in_use -= nbytes
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._fits(self._waiters[0].nbytes):
            waiter = self._waiters.popleft()
            self._take(waiter.nbytes)
            trio.lowlevel.reschedule(waiter.task)
