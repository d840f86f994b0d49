"""What an export reports: progress, per-folder reports, the result."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ._server import FolderFailure

# -- results -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class ExportProgress:
    """How far an export is, passed to the ``progress`` callback of :func:`export_maildir`.

    ==================  ================================================================
    field               meaning
    ==================  ================================================================
    ``folders_total``   folders with messages to fetch in this run
    ``folders_done``    of those, folders whose every message has been handed over
    ``messages_total``  messages expected to be fetched (an estimate from the status)
    ``messages_done``   messages written into ``cur/`` in this run
    ``bytes_done``      their size in bytes
    ==================  ================================================================
    """

    folders_total: int
    folders_done: int
    messages_total: int
    messages_done: int
    bytes_done: int


@dataclasses.dataclass(frozen=True, slots=True)
class FolderReport:
    """What an export did to one folder.

    Attributes:
        name: The folder's name on the server.
        path: Its Maildir directory.
        uidvalidity: The folder's UIDVALIDITY.
        messages: Messages on the server (at the start of the run).
        fetched: Messages fetched and written in this run.
        bytes: Their size in bytes.
        exported: This folder's messages in the Maildir now (of this UIDVALIDITY).
        uidvalidity_changed: The UIDVALIDITY is not the one of the last export: the folder
            was exported again from scratch.
        moved_aside: Files of an older UIDVALIDITY moved to ``trio-imappool-replaced/``.
        missing: Messages the server listed but did not return in this run (left out of the
            FETCH answer, or ``BODY[] NIL``): not exported, asked for again by the next run.
        flags_changed: Files renamed in this run because the message's flags changed on the
            server.
        gone: Messages found gone from the server in this run (expunged there).
        gone_kept: Files of messages gone from the server that are kept (all of them, found
            in this run or before; none with ``delete=True``).
        removed: Files removed in this run because their messages are gone from the server
            (``delete=True`` only).
    """

    name: str
    path: Path
    uidvalidity: int
    messages: int
    fetched: int
    bytes: int
    exported: int
    uidvalidity_changed: bool
    moved_aside: int
    missing: int = 0
    flags_changed: int = 0
    gone: int = 0
    gone_kept: int = 0
    removed: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class ExportResult:
    """What :func:`export_maildir` did.

    ======================  ============================================================
    field                   meaning
    ======================  ============================================================
    ``folders``             a :class:`FolderReport` per folder, INBOX first, then by name
    ``messages_fetched``    messages fetched and written in this run
    ``bytes_fetched``       their size in bytes
    ``messages_skipped``    messages fetched that were exported already (sparse folders
                            fetched by search) or came without a body
    ``folders_fetched``      folders handed to the fetch (0 when nothing was new)
    ``elapsed``             seconds, listing to the last state file
    ``folders_failed``      a :class:`FolderFailure` (name, reason) per folder that could
                            not be exported; the others were
    ``messages_missing``    messages the server listed but did not return (see
                            :attr:`FolderReport.missing`)
    ======================  ============================================================
    """

    folders: tuple[FolderReport, ...]
    messages_fetched: int
    bytes_fetched: int
    messages_skipped: int
    folders_fetched: int
    elapsed: float
    folders_failed: tuple[FolderFailure, ...] = ()
    messages_missing: int = 0

    @property
    def complete(self) -> bool:
        """Every folder was exported and every message the server listed is in the Maildir."""
        return not self.folders_failed and not self.messages_missing

    @property
    def flags_changed(self) -> int:
        """Files renamed for a flag change on the server, in all folders."""
        return sum(f.flags_changed for f in self.folders)

    @property
    def messages_gone(self) -> int:
        """Messages found gone from the server in this run, in all folders."""
        return sum(f.gone for f in self.folders)

    @property
    def gone_kept(self) -> int:
        """Files kept of messages gone from the server, in all folders."""
        return sum(f.gone_kept for f in self.folders)

    @property
    def messages_removed(self) -> int:
        """Files removed because their messages are gone from the server (``delete=True``)."""
        return sum(f.removed for f in self.folders)

    @property
    def messages_per_second(self) -> float:
        """Messages fetched per second of :attr:`elapsed`."""
        return self.messages_fetched / self.elapsed if self.elapsed > 0 else 0.0
