"""Constants and errors shared by the exporter's modules."""

from __future__ import annotations

import re
from typing import Final

from trio_imappool import PoolError

#: The state file in each folder's directory.
STATE_NAME: Final = "trio-imappool.json"
#: The lock file in the destination.
LOCK_NAME: Final = "trio-imappool.lock"
#: Where the files of a folder whose UIDVALIDITY changed are moved to.
REPLACED_DIR: Final = "trio-imappool-replaced"

_STATE_FORMAT: Final = 2  # 1: before flags and deletions were followed (read and upgraded)
_TMP_PREFIX: Final = "trio-imappool-"
_NAME_TAG: Final = "trio-imappool"
_NAME_RE: Final = re.compile(r"^(\d+)-(\d+)\.trio-imappool(?:,[^:]*)?(?::2,([^:]*))?$")
_FLAG_LETTERS: Final = {
    b"\\draft": "D",
    b"\\flagged": "F",
    b"\\answered": "R",
    b"\\seen": "S",
    b"\\deleted": "T",
}
_FETCH_ITEMS: Final = ["BODY.PEEK[]", "FLAGS"]
_STATUS_ITEMS: Final = ("MESSAGES", "UIDNEXT", "UIDVALIDITY")
# A UID range is fetched as it is (the server skips UIDs that do not exist) when it is at most
# this many times the messages expected in it, plus the slack; otherwise the folder is searched.
_DENSE_FACTOR: Final = 2
_DENSE_SLACK: Final = 500
_MAX_CRITERIA_CHARS: Final = 20_000
# Writer tasks (each a worker thread while it writes) and messages per thread hop. Few and big:
# the fetching threads need the GIL too, and on a 2-core machine 4 writers of 64 were slower.
# The fetch hands each batch to the writers in chunks of _WRITE_BATCH; _WRITE_QUEUE chunks wait
# in the queue. Messages held for writing: the queue's and one chunk per writer (384 with
# these values), beside the batch the fetch is handing on; with a memory budget, all of them
# count on it.
_WRITERS: Final = 2
# Messages of full FLAGS listings per connection in a flag pass (see _flag_pass).
_FLAGS_PER_CONNECTION: Final = 5_000
_WRITE_BATCH: Final = 128
_WRITE_QUEUE: Final = 1


class ExportError(PoolError):
    """The local side of an export failed: the destination cannot be written, is locked by
    another export, or is not a directory. The original error, if any, is ``__cause__``."""


class FolderNotFoundError(ExportError, LookupError):
    """A folder asked for by name is not on the server, or a pattern matches none of its
    folders."""
