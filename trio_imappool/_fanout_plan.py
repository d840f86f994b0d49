"""The fan-out's decisions: which work comes next for which connection. No trio, no I/O.

A fan-out operation (see :mod:`trio_imappool._fanout`) is a set of folders, each with its UIDs
or criteria to search for them. :class:`FanOutPlan` holds what is left to do as plain
collections and answers the engine's questions synchronously: what should a task whose
connection has folder X selected do next, is there anything left, how does a folder's work look
once its search (or its first UID range) has answered. The engine
(:mod:`trio_imappool._fanout_engine`) checks connections out, runs the commands and tells the
plan what happened; everything it decides is here, testable without a server
(tests/unit/test_fanout_plan.py).

The rules:

- A folder's UIDs are cut into batches of at most ``batch_size``, in ascending order; every UID
  is in exactly one batch.
- A task keeps to the folder its connection has selected while that folder has batches (one
  SELECT serves them all); otherwise searches go first (their results make more batches), then
  the folder fewest tasks work on, the one with most batches left among those.
- A folder fetched as ``"ALL"`` starts with a *probe*, its first UID range, sent with an EXAMINE
  whose EXISTS and UIDNEXT plan the rest: UID ranges up to UIDNEXT where the UIDs are dense,
  else a search for the UIDs above the probe.
- With a byte limit per batch (a fetch with a memory budget), every folder's UIDs are first
  *sized* (``UID FETCH uids (RFC822.SIZE)``; ``"ALL"`` asks ``1:4294967295``, searches size what
  they found), and batches are cut by bytes as well as by count: a message larger than the
  limit is a batch of its own. No probes then.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, Literal, TypeAlias

from ._config import check_wire_text
from ._fanout_progress import ProgressCounter

__all__ = [
    "ALL_UIDS",
    "Criteria",
    "FanOutPlan",
    "Messages",
    "Mode",
    "Search",
    "Work",
    "check_sizes",
    "cut_by_bytes",
    "is_all",
    "normalise",
]

Criteria: TypeAlias = str | bytes | Sequence[Any]
"""IMAP search criteria as imapclient takes them: ``"ALL"``, ``["UNSEEN", "SINCE", date]``."""

Messages: TypeAlias = Iterable[int] | Criteria
"""What to work on in one folder: its UIDs, or criteria to search for them."""

Mode: TypeAlias = Literal["read-only", "read-write", "any"]
"""How a folder must be selected for an operation: exactly read-only (FETCH: never sets
``\\Seen``), read-write (STORE, MOVE), or either (SEARCH, COPY)."""


# -- the caller's folders, checked before anything starts ----------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Search:
    """A folder's messages given as search criteria."""

    criteria: Criteria
    #: Only UIDs above this count (a search for what a folder's first range did not cover).
    above: int = 0


def is_all(criteria: Criteria) -> bool:
    """Whether criteria are just ``ALL``: fetched by UID range, with no search."""
    if isinstance(criteria, bytes):
        criteria = criteria.decode("ascii", "replace")
    if isinstance(criteria, str):
        return criteria.strip().upper() == "ALL"
    items = list(criteria)
    return len(items) == 1 and isinstance(items[0], str | bytes) and is_all(items[0])


def _is_uid(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def normalise(folders: Mapping[str, Messages]) -> dict[str, Sequence[int] | Search]:
    """Tell UID sets from search criteria; sort and deduplicate UIDs.

    Raises:
        TypeError: *folders* is not a mapping of folder names to UIDs or criteria.
        ConfigurationError: A folder name holds CR, LF or NUL.
    """
    if not isinstance(folders, Mapping):
        raise TypeError(f"folders must be a mapping of folder -> UIDs or criteria, not {folders!r}")
    plan: dict[str, Sequence[int] | Search] = {}
    for folder, spec in folders.items():
        if not isinstance(folder, str):
            raise TypeError(f"folder names must be str, not {folder!r}")
        check_wire_text("a folder name", folder)
        if isinstance(spec, str | bytes):
            plan[folder] = Search(spec)
        elif isinstance(spec, range) and spec.step > 0 and (not spec or spec.start >= 1):
            plan[folder] = spec
        else:
            try:
                items = list(spec)
            except TypeError:
                raise TypeError(
                    f"folder {folder!r}: expected UIDs or search criteria, got {spec!r}"
                ) from None
            if all(_is_uid(item) for item in items):
                plan[folder] = sorted(set(items))
            elif any(isinstance(item, str | bytes) for item in items):
                plan[folder] = Search(items)
            else:
                raise TypeError(
                    f"folder {folder!r}: expected UIDs (ints >= 1) or search criteria "
                    f"(a str, or a list with a str in it), got {spec!r}"
                )
    return plan


def check_sizes(max_size: int, batch_size: int, max_connections: int | None) -> int:
    """Validate; return how many tasks to run: *max_connections*, never more than the pool's
    *max_size* (its default).

    Raises:
        ValueError: *batch_size* or *max_connections* is not a positive int.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, not {batch_size!r}")
    if max_connections is None:
        return max_size
    if isinstance(max_connections, bool) or not isinstance(max_connections, int):
        raise ValueError(f"max_connections must be an int >= 1 or None, not {max_connections!r}")
    if max_connections < 1:
        raise ValueError(f"max_connections must be at least 1, not {max_connections}")
    return min(max_connections, max_size)


# -- the plan ------------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True, eq=False)
class Work:
    """One command's worth of work: a batch of UIDs, or the search of a folder."""

    folder: str
    uids: Sequence[int] = ()
    search: Search | None = None
    #: The first UID range of a folder fetched as "ALL", sent with a fresh EXAMINE whose
    #: UIDNEXT and EXISTS plan the rest of the folder.
    probe: bool = False
    #: The bytes the batch's messages are planned to take (from RFC822.SIZE; 0 unplanned).
    nbytes: int = 0
    #: Ask the sizes of *uids* (RFC822.SIZE), to plan the folder's batches by bytes.
    sizing: bool = False
    #: Other folders to size in the same round trip (taken with this one).
    companions: list[Work] = dataclasses.field(default_factory=list)


#: Every UID there can be (``1:4294967295``): the sizes of a whole folder in one FETCH.
ALL_UIDS: Final = range(1, 2**32)

#: Sizes asked in one round trip, about: a task takes folders to size until they hold this
#: many UIDs (parsing the answers is the cost; a connection is opened or found meanwhile for
#: the next), so that a few folders cost one round trip and a huge mailbox is spread.
SIZES_PER_TRIP: Final = 5000
# What a folder sized as "ALL" (its count unknown) weighs.
_ALL_WEIGHT: Final = 1000
#: A folder with this many UIDs to size is asked which of them are large (a search where the
#: server can, see :func:`trio_imappool._fanout_memory.size_folders`): a round trip of its
#: own, so it is sized alone; fewer are sized one by one, many folders in one round trip.
SEARCH_SIZES_FROM: Final = 500


def _sizing_weight(work: Work) -> int:
    if work.uids is ALL_UIDS:
        return _ALL_WEIGHT
    return SIZES_PER_TRIP if len(work.uids) >= SEARCH_SIZES_FROM else len(work.uids)


def cut_by_bytes(
    folder: str, uids: Sequence[int], sizes: Mapping[int, int], count: int, limit: int
) -> list[Work]:
    """Batches of at most *count* UIDs and, unless a single message is larger, at most
    *limit* bytes (a UID without a size counts 0), in order."""
    batches: list[Work] = []
    start, total = 0, 0
    for index, uid in enumerate(uids):
        size = sizes.get(uid, 0)
        if index > start and (index - start >= count or total + size > limit):
            batches.append(Work(folder, uids[start:index], nbytes=total))
            start, total = index, 0
        total += size
    if start < len(uids):
        batches.append(Work(folder, uids[start:], nbytes=total))
    return batches


class FanOutPlan:
    """The work of one fan-out operation that is left, and the choice of what comes next.

    Synchronous and without I/O: the engine asks :meth:`take` for work, tells :meth:`finish`
    when a task is done with it, and reports what searches and probes found.

    Args:
        plan: Folder -> sorted UIDs or a :class:`Search` (see :func:`normalise`).
        batch_size: UIDs per command.
        mode: How the operation needs its folders selected.
        batches: Whether the operation runs commands on batches (False: it only searches).
        probe_all: Whether a folder searched for ``"ALL"`` starts with a probe instead (the
            fetch, which can send an EXAMINE with its first batch).
        progress: Counts the messages and batches as they are planned.
        batch_bytes: Bytes per batch (then every folder is sized first, see above); None to
            cut by count only.
    """

    def __init__(
        self,
        plan: Mapping[str, Sequence[int] | Search],
        *,
        batch_size: int,
        mode: Mode,
        batches: bool,
        probe_all: bool,
        progress: ProgressCounter,
        batch_bytes: int | None = None,
    ) -> None:
        self.batch_size: Final = batch_size
        self.batch_bytes: Final = batch_bytes
        self._sizing: collections.deque[Work] = collections.deque()
        self._sizing_run = 0
        self.mode: Final = mode
        self.progress: Final = progress
        self._batches_run = batches
        #: Folder -> the UIDs its search found (the result of a search-only operation).
        self.found: dict[str, list[int]] = {}
        self._searches: collections.deque[Work] = collections.deque()
        self._batches: dict[str, collections.deque[Work]] = {}
        # Work taken and not finished yet, per folder.
        self._busy: collections.Counter[str] = collections.Counter()
        self._searching = 0
        self._probing = 0
        for folder, spec in plan.items():
            if batch_bytes is not None and isinstance(spec, Search) and is_all(spec.criteria):
                self._sizing.append(Work(folder, ALL_UIDS, sizing=True))
            elif isinstance(spec, Search) and probe_all and is_all(spec.criteria):
                # No search: the first range goes now, with an EXAMINE that tells the rest.
                probe = Work(folder, range(1, batch_size + 1), probe=True)
                self._batches[folder] = collections.deque([probe])
                self._probing += 1
                progress.planned(folder, 0, 1, final=False)
            elif isinstance(spec, Search):
                self._searches.append(Work(folder, search=spec))
            else:
                self._plan(folder, spec)

    def _plan(
        self, folder: str, uids: Sequence[int], *, already: int = 0, fetched: int = 0
    ) -> None:
        """Plan a folder's batches; *already* messages in *fetched* batches came with its
        search."""
        size = self.batch_size
        if not self._batches_run:  # search only
            self.progress.planned(folder, len(uids), 0)
        elif self.batch_bytes is not None and uids:  # size them first
            self._sizing.append(Work(folder, uids, sizing=True))
        else:
            batches = [Work(folder, uids[i : i + size]) for i in range(0, len(uids), size)]
            if batches:
                self._batches.setdefault(folder, collections.deque()).extend(batches)
            self.progress.planned(folder, already + len(uids), fetched + len(batches))

    # -- what comes next --

    def take(self, prefer: str | None, *, searches: bool = True) -> Work | None:
        """The next work for a task whose connection has *prefer* selected: folders to size
        (a fetch with a memory budget: every folder is planned early), else more of the same
        folder, else a search (neither sizes nor a search unless *searches*), else the
        least-worked folder with the most batches left. None if nothing is left now (more may
        come: :meth:`finished`)."""
        queue = self._batches.get(prefer) if prefer is not None else None
        if self._sizing and searches:  # sizes first: every folder planned early
            work = self._take_sizing()
            queue = None
        elif queue:
            work = queue.popleft()
        elif self._searches and searches:
            work = self._searches.popleft()
            self._searching += 1
        elif self._batches:
            folder = min(self._batches, key=lambda f: (self._busy[f], -len(self._batches[f])))
            queue = self._batches[folder]
            work = queue.popleft()
        else:
            return None
        if queue is not None and not queue:
            del self._batches[work.folder]
        self._busy[work.folder] += 1
        return work

    def _take_sizing(self) -> Work:
        """The next folder to size, with as many more (its ``companions``) as one round trip
        should carry (:data:`SIZES_PER_TRIP`)."""
        work = self._sizing.popleft()
        weight = _sizing_weight(work)
        while self._sizing and weight + _sizing_weight(self._sizing[0]) <= SIZES_PER_TRIP:
            extra = self._sizing.popleft()
            weight += _sizing_weight(extra)
            work.companions.append(extra)
            self._busy[extra.folder] += 1
        self._sizing_run += 1 + len(work.companions)
        return work

    def put_back(self, work: Work) -> None:
        """Undo :meth:`take` for a batch a task cannot run now (no memory for it yet)."""
        self._batches.setdefault(work.folder, collections.deque()).appendleft(work)
        self._busy[work.folder] -= 1

    def suits(self, readonly: bool | None) -> bool:
        """Whether a folder selected read-only (or not) is in the mode the operation needs."""
        return self.mode == "any" or readonly == (self.mode == "read-only")

    def prefer(self, work: Work, selected: str | None, readonly: bool | None) -> Work:
        """Swap *work*, taken before a checkout, for a batch of the folder that the connection
        got already has *selected* (*readonly* or not), if that folder has batches left: a
        SELECT saved, whoever had the connection before."""
        if (
            selected is None
            or selected == work.folder
            or work.search is not None
            or not self.suits(readonly)
            or not self._batches.get(selected)
        ):
            return work
        self._batches.setdefault(work.folder, collections.deque()).appendleft(work)
        self._busy[work.folder] -= 1
        better = self.take(selected)
        assert better is not None  # the folder has batches
        return better

    def finish(self, work: Work) -> None:
        """A task is done with *work* (its batch ran, or its search was planned)."""
        self._busy[work.folder] -= 1

    def finished(self) -> bool:
        """Whether no more work can appear (no search or probe is pending or running)."""
        return (
            not self._searches
            and not self._searching
            and not self._probing
            and not self._sizing
            and not self._sizing_run
        )

    # -- what the server said --

    def searched(self, work: Work, uids: list[int]) -> None:
        """The search of *work* found *uids*: plan their batches."""
        assert work.search is not None
        if work.search.above:
            uids = [uid for uid in uids if uid > work.search.above]
        self.found[work.folder] = uids
        self._searching -= 1
        self._plan(work.folder, uids)

    def sized(self, work: Work, sizes: Mapping[int, int]) -> None:
        """The sizes of *work*'s UIDs are known: cut the folder's batches by count and bytes.
        A UID list keeps every UID (one that does not exist is reported missing by its
        batch); :data:`ALL_UIDS` becomes the UIDs that answered."""
        assert work.sizing and self.batch_bytes is not None
        self._sizing_run -= 1
        if work.uids is ALL_UIDS:
            uids: Sequence[int] = sorted(sizes)
            self.found[work.folder] = list(uids)
        else:
            uids = work.uids
        batches = cut_by_bytes(work.folder, uids, sizes, self.batch_size, self.batch_bytes)
        if batches:
            self._batches.setdefault(work.folder, collections.deque()).extend(batches)
        self.progress.planned(work.folder, len(uids), len(batches))

    def searched_with_first(self, work: Work, uids: list[int], first: range) -> None:
        """The search of *work* found *uids*, and those in *first* were fetched with it (one
        batch): plan the batches of the others."""
        self.found[work.folder] = uids
        self._searching -= 1
        head = [uid for uid in uids if uid in first]
        rest = [uid for uid in uids if uid not in first]
        self._plan(work.folder, rest, already=len(head), fetched=1)

    def probed(self, probe: Work, returned: int, examined: Mapping[bytes, Any] | None) -> None:
        """Plan the rest of a folder fetched as "ALL" from what its first range's EXAMINE
        said (*examined*), *returned* messages of that range having come back: UID ranges up
        to UIDNEXT where the UIDs are dense, else a search for the UIDs above the first range
        (a folder whose old messages were expunged)."""
        assert isinstance(probe.uids, range)
        folder, start = probe.folder, probe.uids.stop
        examined = examined or {}
        exists, uidnext = examined.get(b"EXISTS"), examined.get(b"UIDNEXT")
        self._probing -= 1
        known = isinstance(exists, int) and isinstance(uidnext, int)
        if not known:  # the server did not say: search
            exists = uidnext = 0
        assert isinstance(exists, int) and isinstance(uidnext, int)
        left = exists - returned
        if known and left <= 0:
            self.progress.planned(folder, returned, 0)
        elif known and uidnext - start <= 2 * left + self.batch_size:
            size = self.batch_size
            batches = [
                Work(folder, range(low, min(low + size, uidnext)))
                for low in range(start, uidnext, size)
            ]
            self._batches.setdefault(folder, collections.deque()).extend(batches)
            self.progress.planned(folder, returned + left, len(batches))
        else:
            self.progress.planned(folder, returned, 0, final=False)
            search = Search(["UID", f"{start}:*"], above=start - 1)
            self._searches.append(Work(folder, search=search))
