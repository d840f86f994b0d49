"""A fetch's memory, bounded in bytes: the sizes asked first, and the bytes of each batch
reserved before it is sent and released once its messages have been handed on.

With a memory budget, :func:`~trio_imappool.fetch_many` asks every folder's message sizes
first (:func:`size_folders`: ``UID FETCH <uids> (RFC822.SIZE)``, the folders a task takes
pipelined in one round trip; a folder of many UIDs asked only which are ``LARGER`` than a
bound), cuts the batches by bytes as well as by count
(:func:`~trio_imappool._fanout_plan.cut_by_bytes`), and holds each batch's planned bytes on a
:class:`~trio_imappool._byte_semaphore.ByteSemaphore` from before its FETCH is sent until its
messages are handed on. A size is only a plan: when a batch arrives, what it holds is
accounted at the real size of its messages (the literals' lengths), the difference given back
or taken on top (:meth:`ByteSemaphore.force`): no batch is sent while more than the budget is
held. A server whose RFC822.SIZE is too small is still bounded by message counts only: the
batches in flight when its sizes show to be false (up to two per task) were planned from them
and are already sent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import trio
from imapclient import IMAPClient

from ._byte_semaphore import ByteSemaphore
from ._client import PipelinedFetch, TrackingClient
from ._fanout_plan import ALL_UIDS, SEARCH_SIZES_FROM, Work
from ._util import uid_runs, uid_set

if TYPE_CHECKING:
    from ._connection import Connection
    from ._fanout_engine import Cursor, RunSizes

__all__ = ["DEFAULT_MEMORY_BUDGET", "FetchMemory", "message_size", "size_folders", "sizes_runner"]

#: The memory budget of ``trio-imappool export`` unless told otherwise: 64 MiB.
DEFAULT_MEMORY_BUDGET = 64 * 1024 * 1024

# How much of the budget one batch may plan to take: the budget over the batches that can be
# in flight at once (two per task, pipelined), so that every task has work.
_BATCHES_PER_TASK = 2


def message_size(data: Mapping[bytes, Any]) -> int:
    """The bytes a fetched message holds, as a memory budget counts them: the total length of
    its byte strings (``BODY[]``, headers, ``RFC822``...), other items not counted."""
    size = 0
    for value in data.values():  # once per message or more: a loop, not sum() of a generator
        if isinstance(value, bytes):
            size += len(value)
    return size


def batch_bytes(budget: ByteSemaphore, workers: int) -> int:
    """The bytes one batch may plan to take (at least 1)."""
    return max(1, budget.total // (_BATCHES_PER_TASK * workers))


class FetchMemory:
    """What one fetch holds on its budget, so that it can all be given back at the end.

    Args:
        budget: The semaphore the batches reserve on.
        owned: Whether the fetch releases a message's bytes when the caller asks for the next
            one (the budget is the fetch's own); else the caller releases them.
    """

    def __init__(self, budget: ByteSemaphore, *, owned: bool) -> None:
        self.budget = budget
        self.owned = owned
        #: Bytes reserved or fetched and not handed on yet.
        self.held = 0
        # Bytes of the messages handed on and not released yet (own budget only).
        self._handed = 0

    @staticmethod
    def _needs(work: Work) -> bool:
        return work.search is None and not work.sizing

    async def reserve(self, work: Work) -> None:
        """Wait for *work*'s planned bytes. **Cancellation**: a checkpoint; nothing taken."""
        if self._needs(work):
            await self.budget.acquire(work.nbytes)
            self.held += work.nbytes

    def reserve_nowait(self, work: Work) -> bool:
        """Take *work*'s planned bytes if free now (True), else nothing (False)."""
        if self._needs(work):
            try:
                self.budget.acquire_nowait(work.nbytes)
            except trio.WouldBlock:
                return False
            self.held += work.nbytes
        return True

    def settle(self, planned: int, real: int) -> None:
        """A batch planned at *planned* bytes came with *real* bytes of messages: account
        the real size."""
        if real < planned:
            self.budget.release(planned - real)
        elif real > planned:
            self.budget.force(real - planned)
        self.held += real - planned

    def hand_on(self, size: int) -> None:
        """A message of *size* bytes goes to the caller."""
        self.held -= size
        if self.owned:
            self._handed += size

    def handed_on(self) -> None:
        """The caller asks for the next message: the ones before are no longer ours."""
        if self._handed:
            self.budget.release(self._handed)
            self._handed = 0

    def close(self) -> None:
        """Give back everything the fetch still holds (the fetch is over). Synchronous."""
        self.handed_on()
        if self.held:
            self.budget.release(self.held)
            self.held = 0


# A UID list sent as at most this many ranges (one FETCH each, pipelined, one EXAMINE), else as
# it is: ``1:2000`` is cheaper to write and for the server to read than 2,000 numbers.
_MAX_RANGES = 32


def _ranges(uids: Sequence[int]) -> list[Sequence[int]]:
    """*uids* (ascending) as runs of consecutive UIDs, or as they are if they have many gaps."""
    if isinstance(uids, range) or not uids:
        return [uids]
    runs: list[Sequence[int]] = []
    for run in uid_runs(uids):
        runs.append(run)
        if len(runs) > _MAX_RANGES:
            return [uids]
    return runs


def _sizes(fetched: Mapping[int, Mapping[bytes, Any]]) -> dict[int, int]:
    sizes = {}
    for uid, data in fetched.items():
        size = data.get(b"RFC822.SIZE")
        # A size that is not a number plans nothing; the literal will tell the truth.
        sizes[uid] = size if isinstance(size, int) and not isinstance(size, bool) else 0
    return sizes


def fetch_sizes(
    client: IMAPClient, steps: list[tuple[str, Any]], reading: list[int]
) -> list[PipelinedFetch]:
    """In a worker thread: each folder's EXAMINE and ``UID FETCH (RFC822.SIZE)``, sent at
    once, then read."""
    assert isinstance(client, TrackingClient)
    return client.fetch_pipelined(steps, ["RFC822.SIZE"], reading, ())


def size_folders(
    client: IMAPClient, steps: list[tuple[str, Sequence[int]]], small: int, reading: list[int]
) -> list[dict[int, int] | PipelinedFetch]:
    """In a worker thread: the sizes of the steps' UIDs, or the failed step.

    Where the server has ESEARCH and SEARCHRES (RFC 4731, 5182) a list of at least
    :data:`~trio_imappool._fanout_plan.SEARCH_SIZES_FROM` UIDs is searched for its messages
    ``LARGER`` than *small*, and only theirs are fetched, in the same round trip (``UID SEARCH
    RETURN (SAVE) ... LARGER n`` and ``UID FETCH $ (RFC822.SIZE)``): the others are planned at
    *small* bytes, an upper bound. Most mail is small, so the answer is short where a size
    per message costs more to read than a round trip (about 10 us each). Every other step
    (fewer UIDs, ``"ALL"``, or a server without them) gets a size per message, all of them
    pipelined in one round trip.
    """
    assert isinstance(client, TrackingClient)
    results: list[dict[int, int] | PipelinedFetch | None] = [None] * len(steps)
    rest: list[int] = []
    for index, (folder, uids) in enumerate(steps):
        many = uids is not ALL_UIDS and len(uids) >= SEARCH_SIZES_FROM
        criteria = ["UID", uid_set(uids), "LARGER", str(small)] if many else []
        if not criteria or not client.can_search_and_fetch(criteria, None):
            rest.append(index)
            continue
        reading[0] = index
        _large, fetched, error, command = client.search_and_fetch(
            folder, criteria, ALL_UIDS, ["RFC822.SIZE"]
        )
        if error is not None:
            results[index] = PipelinedFetch(
                None, error, "select" if command == "select" else "fetch"
            )
            continue
        sizes = dict.fromkeys(uids, small)
        sizes.update(_sizes(fetched or {}))
        results[index] = sizes
    parts: list[tuple[str, Sequence[int]]] = []
    owner: list[int] = []  # the step of each part
    for index in rest:
        folder, uids = steps[index]
        for part in _ranges(uids):
            parts.append((folder, part))
            owner.append(index)
    if parts:
        inner = [0]
        try:
            outcomes = client.fetch_pipelined(parts, ["RFC822.SIZE"], inner, ())
        except Exception:
            reading[0] = owner[inner[0]]
            raise
        for index, outcome in zip(owner, outcomes, strict=True):
            done = results[index]
            if isinstance(done, PipelinedFetch):
                continue  # failed already
            if outcome.fetched is None:
                results[index] = outcome
            else:
                results[index] = {**(done or {}), **_sizes(outcome.fetched)}
    return [result if result is not None else {} for result in results]


def sizes_runner(small: int) -> RunSizes:
    """The engine's ``run_sizes``: :func:`size_folders` on a connection, messages up to
    *small* bytes planned at *small* where the server can tell which are larger."""

    async def run_sizes(
        conn: Connection, works: list[Work], cursor: Cursor
    ) -> list[dict[int, int] | PipelinedFetch]:
        steps = [(work.folder, work.uids) for work in works]
        reading = [0]
        try:
            return await conn.run_sync(size_folders, steps, small, reading)
        except Exception:
            cursor.work = works[reading[0]]
            cursor.step = "command"
            raise

    return run_sizes
