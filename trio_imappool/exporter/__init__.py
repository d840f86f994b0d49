"""The exporter (``trio-imappool export``), an application built on the pool's public API:
exporting an IMAP account to a local Maildir, over pooled connections, resumably.

:func:`export_maildir` copies every message of the chosen folders into a Maildir, one file per
message, and on later runs copies only what it has not copied yet and follows the server's
flag changes and deletions::

    async with trio_imappool.open_pool(host, username=u, password=p, max_size=8) as pool:
        result = await export_maildir(pool, "backup/Maildir")
    print(result.messages_fetched, "new messages", result.flags_changed, "flags changed")

The export is **one-way**: it follows the server and never writes to it (folders are
EXAMINEd, bodies fetched with ``BODY.PEEK[]``); a flag changed or a file deleted locally is not
sent back, and the next flag change of that message on the server overwrites the local one.

**Layout (Maildir++).** The destination is the Maildir of ``INBOX`` (``cur/``, ``new/``,
``tmp/``); every other folder is a subfolder ``.Name`` next to them, its hierarchy joined with
dots: ``Archive/2024`` is ``.Archive.2024`` whatever the server's delimiter. In a name part,
``%``, ``.``, ``/`` and control characters are written ``%XX`` (``a.b`` is ``.a%2Eb``); other
characters, non-ASCII included, are kept (UTF-8). Mail readers that know Maildir++
(Dovecot, mutt, neomutt, mbsync with ``SubFolders Maildir++``) read this layout.

**Namespaces.** Names are relative to the account's personal namespace (NAMESPACE, RFC 2342):
on a server that keeps folders under ``INBOX.`` (Courier, Cyrus without ``altnamespace``),
``INBOX.Archive`` is ``.Archive``, not ``.INBOX.Archive``; folders outside it keep their whole
name. Folder patterns are written with ``/`` between levels, relative to the same namespace
(``Archive/*`` is every folder under Courier's ``INBOX.Archive``); see :func:`export_maildir`.

**Hostile names.** Folder names are data, never paths: :func:`local_folder_name` holds the
rules (an over-long name is shortened with a hash; no result is empty, ``.``, ``..`` or more
than one path component), and two server folders never share a directory (the second gets a
``%~{hash}`` name, kept across runs through the state files). Nothing outside the destination
is ever created, moved or deleted. A folder that cannot be exported (a name that cannot be
asked for again, a garbled STATUS, a NO to its EXAMINE) is reported in
:attr:`ExportResult.folders_failed` and the others are exported; a message the server lists
but does not return is counted in :attr:`FolderReport.missing`, not recorded as exported, and
asked for again by the next run.

**Messages.** One file per message in the folder's ``cur/``, named
``{UIDVALIDITY}-{UID}.trio-imappool,S={size}:2,{flags}``, holding the message exactly as the
server sent it (``BODY[]``, CRLF line endings, no conversion). The flags are Maildir's info
letters for the IMAP system flags (``\\Draft`` D, ``\\Flagged`` F, ``\\Answered`` R, ``\\Seen``
S, ``\\Deleted`` T, in that order); keywords are not kept. The messages are fetched with
``BODY.PEEK[]`` from folders selected read-only: exporting changes nothing on the server.

**Resuming.** The files are the truth: a name says which UIDVALIDITY and UID it holds, so a run
starts by listing ``cur/`` and ``new/`` and fetches only the UIDs missing there. Each folder
also has a small state file, ``trio-imappool.json``, with its UIDVALIDITY, the UIDs exported
and ``synced_below``, the UIDNEXT below which every message was exported, so a run that finds a
folder's UIDNEXT unchanged does not even select it. The state is written (atomically, after the
files it names are in place) at the end of a run; it is checked against the files on startup
and ignored where it claims more than they hold.

**Crashes.** A message is written to an unnamed file in ``tmp/`` (``O_TMPFILE``; a named one
where the file system has no unnamed files), flushed to disk (``fsync``, unless turned off) and
only then linked (or renamed) into ``cur/`` under its final name, so a killed run (Ctrl-C,
SIGKILL, a power cut with ``fsync``) leaves no partial file in ``cur/``; an unnamed file
vanishes with the process, and the next run removes named leftovers of ours from ``tmp/``.
Everything in ``cur/`` stays, and is not fetched again.

**UIDVALIDITY.** When a folder's UIDVALIDITY is not the one its files were exported with (the
folder was deleted and created again, or the server rebuilt it), the old files are moved out of
the way, into ``trio-imappool-replaced/{folder}.{old UIDVALIDITY}/`` (a Maildir of its own, out
of the Maildir++ tree), and the folder is exported again into its emptied location. The
UIDVALIDITY is read once, at the start of a run: a folder deleted and created again while a run
fetches from it may end that run with messages of both in its Maildir, named with the old
UIDVALIDITY; the next run sees the new one and sorts them out as above.

**Following the server.** Every run brings the flags of the messages already exported up to
date, before it fetches new ones, with as few round trips as the server allows:

- The listing asks for each folder's ``HIGHESTMODSEQ`` too where the server has CONDSTORE (RFC
  7162); the state file keeps it, with the UIDNEXT and message count of the run. A folder whose
  UIDVALIDITY, HIGHESTMODSEQ, UIDNEXT and count are unchanged is not selected at all: with
  LIST-STATUS, an unchanged account costs one round trip after the login.
- With CONDSTORE, a changed folder is asked only for what changed: ``UID FETCH 1:* (FLAGS)
  (CHANGEDSINCE m)``, with ``VANISHED`` added (after ``ENABLE QRESYNC``) where the server has
  QRESYNC, which also names the messages expunged since. Without CONDSTORE (or on the first
  run after an upgrade, or with a CONDSTORE server without QRESYNC whose counts show an
  expunge) every message's flags are listed (``UID FETCH 1:* (FLAGS)``, no bodies) and
  compared with the files; a message the listing lacks is gone, unless the listing is shorter
  than the folder's count (then nothing is concluded). These commands are pipelined: one
  connection asks about many folders in one round trip.
- A message whose flags changed keeps its file, renamed to the new info letters (letters
  other than ``DFRST``, a mail reader's keywords, are kept). ``rename(2)`` is atomic and the
  state is written only at the end, so a run killed midway leaves every file under its old
  name or its new one, and the next run asks again from the last saved modseq.
- A message gone from the server keeps its file by default (a backup does not lose what it
  had); it is counted in :attr:`FolderReport.gone` when first noticed, in
  :attr:`FolderReport.gone_kept` on every run, and remembered in the state. With
  ``delete=True`` the files of messages gone from the server are removed
  (:attr:`FolderReport.removed`). ``\\Deleted`` on the server is the ``T`` letter, not a
  deletion.

Only responses that carry a UID count: other sessions' flag changes arrive without one and are
never attributed to a message by their sequence number.

**The state file** is versioned (``"format": 2``); a format 1 file (from before flags were
followed) is upgraded on the first run, by one full FLAGS listing per folder and without
fetching any message again.

One export at a time per destination: a lock file (``trio-imappool.lock``, ``flock``) makes a
second one fail at once with :class:`ExportError`.
"""

from ._api import export_maildir
from ._base import LOCK_NAME, REPLACED_DIR, STATE_NAME, ExportError, FolderNotFoundError
from ._naming import (
    MAX_LOCAL_NAME,
    local_folder_name,
    maildir_flags,
    maildir_folder_path,
    message_filename,
    parse_message_filename,
)
from ._results import ExportProgress, ExportResult, FolderReport
from ._server import FolderFailure, ServerFolder
from ._state import FolderState, read_folder_state
from ._survey import PlannedFolder, Survey, survey

__all__ = [
    "LOCK_NAME",
    "MAX_LOCAL_NAME",
    "REPLACED_DIR",
    "STATE_NAME",
    "ExportError",
    "ExportProgress",
    "ExportResult",
    "FolderFailure",
    "FolderNotFoundError",
    "FolderReport",
    "FolderState",
    "PlannedFolder",
    "ServerFolder",
    "Survey",
    "export_maildir",
    "local_folder_name",
    "maildir_flags",
    "maildir_folder_path",
    "message_filename",
    "parse_message_filename",
    "read_folder_state",
    "survey",
]
