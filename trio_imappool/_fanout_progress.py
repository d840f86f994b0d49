"""A fan-out's progress: what :attr:`FetchResults.progress` shows, counted without trio.

:class:`ProgressCounter` is told as work is planned and done; every change makes a frozen
:class:`Progress` and hands it to a callback (the engine's publishes it as an
:class:`~trio_util.AsyncValue`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

__all__ = ["Progress", "ProgressCounter"]


@dataclasses.dataclass(frozen=True, slots=True)
class Progress:
    """A snapshot of a :func:`~trio_imappool.fetch_many`, from
    :attr:`FetchResults.progress <trio_imappool.FetchResults.progress>`.

    A message counts as done when the iteration has handed it to the caller, or when the server
    did not return it or returned it without its data (expunged meanwhile: it is skipped, and
    counted in ``messages_missing``). Totals are known once every folder's search has
    finished; until then they are None.

    ====================  ===========================================================
    field                 meaning
    ====================  ===========================================================
    ``messages_total``    messages to fetch in all (None while searches are running)
    ``messages_done``     messages handed to the caller, plus those skipped
    ``bytes_done``        bytes of the ``bytes`` values (bodies, headers) handed over
    ``batches_total``     FETCH commands in all (None while searches are running)
    ``batches_done``      batches whose every message is done
    ``folders_total``     folders asked for
    ``folders_done``      folders whose every batch is done
    ``messages_missing``  of the messages done, those skipped because the server did not
                          return them or returned them without the data asked for
    ====================  ===========================================================
    """

    messages_total: int | None
    messages_done: int
    bytes_done: int
    batches_total: int | None
    batches_done: int
    folders_total: int
    folders_done: int
    messages_missing: int = 0

    @property
    def complete(self) -> bool:
        """Whether every message of every folder is done."""
        return self.folders_done == self.folders_total

    def __str__(self) -> str:
        total = "?" if self.messages_total is None else self.messages_total
        batches = "?" if self.batches_total is None else self.batches_total
        missing = f" ({self.messages_missing} missing)" if self.messages_missing else ""
        return (
            f"{self.messages_done}/{total} messages{missing}, {self.bytes_done} bytes, "
            f"{self.batches_done}/{batches} batches, "
            f"{self.folders_done}/{self.folders_total} folders"
        )


class ProgressCounter:
    """Counts a fan-out's progress; hands every new :class:`Progress` to *publish*."""

    def __init__(self, folders: int, publish: Callable[[Progress], object] | None = None) -> None:
        self._unplanned = folders
        self._folders = folders
        self._messages_total = self._batches_total = 0
        self._messages = self._bytes = self._batches = self._folders_done = 0
        self._missing = 0
        self._left: dict[str, int] = {}  # folder -> batches not done yet
        self._final: set[str] = set()  # folders whose every batch is known
        self._publish_to = publish

    def snapshot(self) -> Progress:
        """The progress now."""
        planned = not self._unplanned
        return Progress(
            self._messages_total if planned else None,
            self._messages,
            self._bytes,
            self._batches_total if planned else None,
            self._batches,
            self._folders,
            self._folders_done,
            self._missing,
        )

    def _publish(self) -> None:
        if self._publish_to is not None:
            self._publish_to(self.snapshot())

    def planned(self, folder: str, messages: int, batches: int, *, final: bool = True) -> None:
        """More of a folder's work is known: *messages* in *batches*; with *final*, all of it
        (a folder whose first batch was sent before its size was known is planned twice)."""
        self._messages_total += messages
        self._batches_total += batches
        left = self._left.get(folder, 0) + batches
        if left:
            self._left[folder] = left
        if final:
            self._unplanned -= 1
            self._final.add(folder)
            if not left:
                self._folders_done += 1
        self._publish()

    def done(
        self,
        folder: str,
        messages: int,
        size: int,
        *,
        batch_done: bool,
        missing: int = 0,
        publish: bool = True,
    ) -> None:
        """*messages* of *folder* (of *size* bytes, *missing* of them skipped) are done, and
        maybe their batch."""
        self._messages += messages
        self._missing += missing
        self._bytes += size
        if batch_done:
            self._batches += 1
            self._left[folder] -= 1
            if not self._left[folder]:
                del self._left[folder]
                if folder in self._final:
                    self._folders_done += 1
        if publish:
            self._publish()
