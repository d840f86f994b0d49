"""``fetch_many``: messages of many folders fetched concurrently and streamed to the caller.

The engine (:mod:`trio_imappool._fanout_engine`) runs the batches; here are what a fetch adds:
the pipelined FETCH each task sends, the deliveries (a batch's messages, those missing
counted), and :class:`FetchResults`, the async iterator that hands them over one message at a
time, with the progress.
"""

from __future__ import annotations

import collections
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio
from imapclient import IMAPClient
from trio_util import AsyncValue

from ._byte_semaphore import ByteSemaphore
from ._client import PipelinedFetch, TrackingClient
from ._fanout_engine import (
    DEFAULT_BATCH_SIZE,
    Cursor,
    Delivery,
    FanOut,
)
from ._fanout_engine import search_and_fetch as _search_and_fetch
from ._fanout_memory import FetchMemory, batch_bytes, message_size, sizes_runner
from ._fanout_plan import Messages, Search, Work, check_sizes, normalise
from ._fanout_progress import Progress
from ._nursery import open_nursery_unwrapped

if TYPE_CHECKING:
    from ._connection import Connection
    from ._surface import PoolSurface

__all__ = ["FetchResults", "fetch_many", "fetch_pipelined"]


class FetchResults:
    """The messages of a :func:`fetch_many`, as they arrive: ``(folder, uid, data)``.

    An async iterator; ``data`` is imapclient's dict for the message (``{b"BODY[]": ...,
    b"SEQ": ...}``). Messages come in batches, ascending by UID within a batch; batches of
    different folders interleave. Iterate it inside the ``async with`` block only.

    After a batch has failed, the next step of the iteration raises :class:`FanOutError`
    (messages of earlier batches not yet handed over are dropped), and the steps after that
    end the iteration.
    """

    def __init__(
        self,
        receive: trio.MemoryReceiveChannel[Delivery],
        fanout: FanOut,
        memory: FetchMemory | None = None,
    ) -> None:
        self._receive = receive
        self._memory = memory
        self._fanout = fanout
        self._tracker = fanout.tracker
        self._current: Delivery | None = None
        self._in_next = False  # the caller is inside __anext__
        self._closed = False
        self._body_scope = trio.CancelScope()

    def __repr__(self) -> str:
        return f"<FetchResults {self.progress}>"

    @property
    def progress(self) -> Progress:
        """The progress now (a frozen snapshot)."""
        progress: Progress = self._tracker.value.value
        return progress

    @property
    def progress_value(self) -> AsyncValue[Progress]:
        """The progress as a :class:`trio_util.AsyncValue`, updated on every message: wait for
        a state without polling, e.g. ``await results.progress_value.wait_value(lambda p:
        p.messages_done >= 1000)``, or drive a progress bar with ``eventual_values()``."""
        return self._tracker.value

    def __aiter__(self) -> FetchResults:
        return self

    async def __anext__(self) -> tuple[str, int, dict[bytes, Any]]:
        """The next message.

        Raises:
            StopAsyncIteration: Every message has been handed over (or a failure was).
            FanOutError: A batch failed (raised once; the other batches were cancelled).
            trio.ClosedResourceError: The ``async with`` block has ended.
            trio.BusyResourceError: Another task is iterating over the same results (one
                task iterates; others would each get some of the messages, unnoticed).

        **Cancellation**: a checkpoint; a cancelled call loses no message.
        """
        delivery = await self._advance()
        uid, data = delivery.messages.popleft()
        size = message_size(data)
        if delivery.nbytes >= 0:
            delivery.nbytes -= size
        if self._memory is not None:
            self._memory.hand_on(size)
        self._tracker.done(delivery.folder, 1, size, batch_done=not delivery.messages)
        return delivery.folder, uid, data

    def batches(self) -> AsyncIterator[tuple[str, list[tuple[int, dict[bytes, Any]]]]]:
        """The messages a batch at a time, as they arrive: ``(folder, [(uid, data), ...])``.

        The same messages as iterating over the results, in the same order, with one
        checkpoint per batch instead of one per message: for a caller that handles many
        small messages, such as an export writing each to a file, that is most of the cost
        of the iteration. Each list holds one batch's messages of one folder, ascending by
        UID (or what is left of it if single messages were taken first); it is never empty.
        With an int *max_bytes*, a batch's bytes are given back when the next batch is
        asked for. The two ways of iterating may be mixed, by one task at a time; errors and
        cancellation are those of ``__anext__``.
        """
        return _Batches(self)

    async def _next_batch(self) -> tuple[str, list[tuple[int, dict[bytes, Any]]]]:
        delivery = await self._advance()
        messages = list(delivery.messages)
        delivery.messages.clear()
        size = delivery.nbytes
        if size < 0:
            size = sum(message_size(data) for _, data in messages)
        delivery.nbytes = 0
        if self._memory is not None:
            self._memory.hand_on(size)
        self._tracker.done(delivery.folder, len(messages), size, batch_done=True)
        return delivery.folder, messages

    async def _advance(self) -> Delivery:
        """Wait for a delivery with a message left in it (a checkpoint either way)."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            raise trio.ClosedResourceError(
                "the fetch_many() block has ended: iterate the results inside it"
            )
        if self._in_next:
            await trio.lowlevel.checkpoint()
            raise trio.BusyResourceError(
                "another task is already iterating over these results; hand the messages on "
                "through a memory channel instead"
            )
        self._in_next = True
        if self._memory is not None:
            self._memory.handed_on()  # the caller is done with the messages before
        try:
            delivery = self._current
            if delivery is not None and delivery.messages:
                await trio.lowlevel.checkpoint()
                self._raise_if_failed()
            else:
                delivery = await self._next_delivery()
        finally:
            self._in_next = False
        return delivery

    def _raise_if_failed(self) -> None:
        """After a failure the iteration raises it once, then stops."""
        if self._fanout.error is not None:
            error = self._fanout.take_error()
            if error is not None:
                raise error from error.__cause__
            raise StopAsyncIteration

    async def _next_delivery(self) -> Delivery:
        while True:
            self._raise_if_failed()
            try:
                delivery = await self._receive.receive()
            except trio.EndOfChannel:
                self._raise_if_failed()
                raise StopAsyncIteration from None
            self._raise_if_failed()
            self._current = delivery
            skipped = delivery.skipped
            if delivery.messages:
                if skipped:
                    self._tracker.done(
                        delivery.folder, skipped, 0, batch_done=False, missing=skipped
                    )
                return delivery
            self._tracker.done(delivery.folder, skipped, 0, batch_done=True, missing=skipped)


class _Batches:
    """:meth:`FetchResults.batches`: an async iterator over the results' batches."""

    __slots__ = ("_results",)

    def __init__(self, results: FetchResults) -> None:
        self._results = results

    def __aiter__(self) -> _Batches:
        return self

    async def __anext__(self) -> tuple[str, list[tuple[int, dict[bytes, Any]]]]:
        return await self._results._next_batch()


def fetch_many(
    pool: PoolSurface,
    folders: Mapping[str, Messages],
    data: Sequence[str | bytes] | str | bytes,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_connections: int | None = None,
    max_bytes: int | ByteSemaphore | None = None,
) -> AbstractAsyncContextManager[FetchResults]:
    """Fetch messages of many folders concurrently, streaming them as they arrive.

    ::

        async with fetch_many(
            pool, {"INBOX": uids, "Archive": "ALL"}, ["ENVELOPE", "BODY.PEEK[]"]
        ) as results:
            async for folder, uid, data in results:
                print(folder, uid, data[b"ENVELOPE"].subject, len(data[b"BODY[]"]))
                bar.update(results.progress.messages_done)

    Each batch is one ``UID FETCH`` of up to *batch_size* UIDs, on a connection that has the
    folder selected read-only (EXAMINE), so nothing, not even ``\\Seen``, changes. Messages
    that the server does not return, or returns without the message data asked for
    (``BODY[] NIL``: expunged meanwhile), are skipped: no message reaches the caller without
    its data. They count as done, and in ``messages_missing``, in
    :attr:`FetchResults.progress`. Only responses that carry a UID asked for are results: a
    server's unsolicited FETCH (another session's flag change) is never mistaken for one.

    **Pipelined.** A task sends two batches at once when there are batches left, with the
    EXAMINE each needs, and then reads the answers (IMAP lets a client pipeline commands;
    imapclient alone cannot): EXAMINE A, FETCH A, EXAMINE B, FETCH B cost one round trip, not
    four. Over a slow link that halves the round trips of a fetch, and more where folders
    change often. A folder given as UIDs is examined once per connection and call, not before
    every batch (those UIDs existed before the call, and the session has seen them since; an
    EXAMINE makes a server such as Dovecot look through the whole folder, so one per batch
    costs in proportion to the folder's size): a message appended during the call is
    returned only if a connection examined the folder after it came. ``"ALL"`` costs no
    search: the folder's first UID range is fetched with its EXAMINE, and the rest planned
    from the UIDNEXT and EXISTS it returns, so it is as fast as a UID list. Other criteria,
    where the server has SEARCHRES and ESEARCH (RFC 5182 and 4731: Dovecot has both, Gmail
    only ESEARCH), fetch the folder's first batch
    with its search (EXAMINE, the search, the same search among UIDs 1 to *batch_size* saved
    as ``$``, and ``UID FETCH $``, in one round trip); elsewhere they cost one round trip
    (SELECT and UID SEARCH together) before the folder's first batches. With ``"ALL"`` the
    totals in :attr:`FetchResults.progress` come from EXISTS: messages expunged meanwhile
    are simply not returned.

    **Parsed as they are read.** FETCH answers of the common shape (``UID``, ``FLAGS``,
    ``BODY[]`` and other plain items, in any order) are parsed while imaplib reads them, each
    literal taken once from its buffer; any other shape goes to imapclient's generic parser,
    with the same result.

    **Memory is bounded** whatever the mailbox size: each task holds at most two fetched
    batches (one pipeline) and waits, without holding a connection, until the caller takes
    them. So a slow caller slows the fetching instead of buffering the mailbox: memory is about
    ``(2 * max_connections + 1) * batch_size`` messages (plus the UID lists themselves).

    **Bounded in bytes** with *max_bytes*: messages differ in size (forty 25 MB messages in
    flight are a gigabyte), so with a byte budget every folder's message sizes are asked first
    (``UID FETCH <uids> (RFC822.SIZE)``, pipelined with the folders' EXAMINEs: one extra round
    trip for the folders of up to about 5,000 messages, more spread over the connections;
    ``"ALL"`` then needs no probe, other criteria are searched and then sized), batches are cut
    by bytes as well as by count (at most ``max_bytes / (2 * max_connections)`` each, unless one
    message is larger: it is then fetched alone), and a batch's FETCH is sent only once its
    planned bytes are free. A message larger than the whole budget waits until nothing else is
    in flight. The bytes stay reserved until the message is handed on: with an int, when the
    caller asks for the next message (or the block ends); with a
    :class:`~trio_imappool.wire.ByteSemaphore` of the caller's, when the caller releases them,
    ``budget.release(message_size(data))`` (see :func:`~trio_imappool.wire.message_size`): so a
    budget can also cover what the caller queues and writes. A size is only a plan: once a batch
    arrives it is accounted at the real length of its messages. A message is read whole (imaplib
    reads a literal in one piece), so the peak is about the budget plus one message being read,
    as long as the server's RFC822.SIZE is true: a server whose sizes are too small gets the
    batches planned from them sent, and is bounded by message counts only, as without a byte
    budget (the batches in flight, up to ``2 * max_connections`` of ``batch_size`` messages).

    Args:
        pool: The pool to check connections out of.
        folders: Folder -> its UIDs (any iterable of ints), or search criteria (a str such as
            ``"ALL"``, or a list with a str in it such as ``["UNSEEN"]``).
        data: What to fetch, as for :meth:`imapclient.IMAPClient.fetch`
            (``["BODY.PEEK[]"]``, ``["ENVELOPE", "FLAGS"]``).
        batch_size: UIDs per FETCH.
        max_connections: Connections used at once; default and upper bound the pool's
            ``max_size``.
        max_bytes: A memory budget in bytes (an int >= 1, or a
            :class:`~trio_imappool.wire.ByteSemaphore` shared with the caller, who then
            releases each message's bytes); None (the default): bounded by counts only, no
            sizes asked.

    Returns:
        An async context manager giving :class:`FetchResults`.

    Raises:
        TypeError: A folder's value is neither UIDs nor criteria (raised by the call).
        ValueError: *batch_size*, *max_connections* or an int *max_bytes* is not a positive
            int (by the call).
        FanOutError: A search or a batch failed, with the folder, the UIDs and the original as
            ``__cause__``. It is raised by the iteration if the caller is waiting in it, else
            the block is cancelled (like a nursery's body when a child fails) and the error
            comes out of the ``async with``. Raised once: if the iteration raised it, leaving
            the block does not raise it again. Never in an exception group.

    **Cancellation**: entering the block is a checkpoint. Leaving it, by the end of the block,
    ``break``, an exception or a cancellation, cancels the fetching tasks at once (a command in
    flight is interrupted and its connection discarded; the others go back to the pool) and
    waits for them, which takes milliseconds. An exception raised in the block comes out of it
    unchanged.
    """
    plan = normalise(folders)
    workers = check_sizes(pool.config.max_size, batch_size, max_connections)
    fields = [data] if isinstance(data, str | bytes) else list(data)
    if not fields:
        raise ValueError("fetch_many() needs at least one data item to fetch")
    memory = None
    if isinstance(max_bytes, ByteSemaphore):
        memory = FetchMemory(max_bytes, owned=False)
    elif max_bytes is not None:
        memory = FetchMemory(ByteSemaphore(max_bytes), owned=True)
    return _fetch_many(pool, plan, fields, batch_size, workers, memory)


def _data_keys(fields: Sequence[str | bytes]) -> tuple[bytes, ...]:
    """The response keys of the message data asked for (``BODY.PEEK[TEXT]<0.100>`` is answered
    as ``BODY[TEXT]<0>``): the start of each key, up to the section's closing bracket."""
    keys = []
    for field in fields:
        word = (field.encode() if isinstance(field, str) else field).upper().strip()
        word = word.replace(b"BODY.PEEK[", b"BODY[").replace(b"BINARY.PEEK[", b"BINARY[")
        if word.startswith((b"BODY[", b"BINARY[")):
            keys.append(word.split(b"]", 1)[0] + b"]")
        elif word in (b"RFC822", b"RFC822.HEADER", b"RFC822.TEXT"):
            keys.append(word)
    return tuple(keys)


def _has_data(data: Mapping[bytes, Any], keys: tuple[bytes, ...]) -> bool:
    """Whether a fetched message has every piece of message data asked for, and none of it
    NIL: a message expunged by another session may come back as ``BODY[] NIL``, or without
    it."""
    for key in keys:  # once per message: loops, no lists or generators
        seen = False
        for name, value in data.items():
            if name.startswith(key):
                if value is None:
                    return False
                seen = True
        if not seen:
            return False
    return True


def fetch_pipelined(
    client: IMAPClient,
    steps: list[tuple[str, Sequence[int]]],
    fields: list[str | bytes],
    reading: list[int],
    fresh: frozenset[int],
    current: tuple[frozenset[str], float] | None = None,
) -> list[PipelinedFetch]:
    """In a worker thread: the batches' EXAMINEs and FETCHes sent at once, then read."""
    assert isinstance(client, TrackingClient)
    return client.fetch_pipelined(steps, fields, reading, fresh, current)


@asynccontextmanager
async def _fetch_many(
    pool: PoolSurface,
    plan: Mapping[str, Sequence[int] | Search],
    fields: list[str | bytes],
    batch_size: int,
    workers: int,
    memory: FetchMemory | None,
) -> AsyncIterator[FetchResults]:
    wanted = _data_keys(fields)
    # The folders given as UIDs: every UID asked for there existed before the call, so a
    # connection that examined the folder since needs no EXAMINE before its next batch.
    listed = frozenset(folder for folder, spec in plan.items() if not isinstance(spec, Search))
    current = (listed, time.monotonic())

    def delivery(outcome: PipelinedFetch, work: Work) -> Delivery | PipelinedFetch:
        if outcome.fetched is None:
            return outcome
        fetched: dict[int, dict[bytes, Any]] = outcome.fetched
        if isinstance(work.uids, range):
            # UIDs of a range that are not returned never existed: only those returned
            # without their data are missing.
            returned = sorted(uid for uid in fetched if uid in work.uids)
            messages = collections.deque(
                (uid, found) for uid in returned if _has_data(found := fetched[uid], wanted)
            )
            skipped = len(returned) - len(messages)
        else:
            messages = collections.deque(
                (uid, data)
                for uid in work.uids
                if (data := fetched.pop(uid, None)) is not None and _has_data(data, wanted)
            )
            skipped = len(work.uids) - len(messages)
        nbytes = 0
        for _, data in messages:
            nbytes += message_size(data)
        if memory is not None:
            memory.settle(work.nbytes, nbytes)
        return Delivery(work.folder, messages, skipped, outcome.examined, nbytes)

    async def fetch_batches(
        conn: Connection, works: list[Work], cursor: Cursor
    ) -> list[Delivery | PipelinedFetch]:
        steps = [(work.folder, work.uids) for work in works]
        fresh = frozenset(index for index, work in enumerate(works) if work.probe)
        reading = [0]
        try:
            outcomes = await conn.run_sync(fetch_pipelined, steps, fields, reading, fresh, current)
        except Exception:
            cursor.work = works[reading[0]]
            cursor.step = "command"
            raise
        return [delivery(outcome, work) for work, outcome in zip(works, outcomes, strict=True)]

    async def search_and_fetch(
        conn: Connection, work: Work, first: range, cursor: Cursor
    ) -> tuple[list[int], Delivery] | None:
        assert work.search is not None
        criteria = work.search.criteria
        found, fetched, error, command = await conn.run_sync(
            _search_and_fetch, work.folder, criteria, first, fields
        )
        if error is not None:
            cursor.step = "select" if command == "select" else "command"
            raise error
        if found is None:
            return None  # the server cannot: search first
        cursor.step = "command"
        head = Work(work.folder, [uid for uid in found if uid in first])
        result = delivery(PipelinedFetch(fetched, None, None), head)
        assert isinstance(result, Delivery)
        return found, result

    await trio.lowlevel.checkpoint()
    limit = None if memory is None else batch_bytes(memory.budget, workers)
    send, receive = trio.open_memory_channel[Delivery](0)
    fanout = FanOut(
        pool,
        plan,
        operation="FETCH",
        mode="read-only",
        batch_size=batch_size,
        workers=workers,
        run_batch=None,
        run_pipelined=fetch_batches,
        send=send,
        run_search_fetch=search_and_fetch if memory is None else None,
        batch_bytes=limit,
        run_sizes=None if limit is None else sizes_runner(max(1, limit // batch_size)),
        memory=memory,
    )
    results = FetchResults(receive, fanout, memory)

    async def produce() -> None:
        await fanout.run()
        if fanout.error is not None and not fanout.error_reported and not results._in_next:
            # The caller is not waiting in the iteration: cancel the block, as a nursery
            # cancels its body when a child fails; the error comes out of the async with.
            results._body_scope.cancel()

    try:
        with receive:
            # An exception of the block comes out as it was raised, not in an exception group.
            async with open_nursery_unwrapped() as nursery:
                nursery.start_soon(produce)
                try:
                    with results._body_scope:
                        yield results
                finally:
                    nursery.cancel_scope.cancel()
                    results._closed = True
    finally:
        if memory is not None:
            memory.close()  # what was fetched and not handed on, or reserved for a batch
    error = fanout.take_error()
    if error is not None:
        raise error from error.__cause__
