"""Low-level IMAP steps for tools built on the pool.

The pool's public surface (:func:`~trio_imappool.open_pool`, ``pool.connection()``,
``conn.run_sync``, :func:`~trio_imappool.fetch_many`) is what most programs need. A tool that
does more on each connection, as ``trio-imappool export`` does, also wants a few of the steps the
library uses itself: they are here, with stable names, so that such a tool never imports a
private module.

* :func:`connection_survives` says whether a connection whose command raised an exception may
  go back to the pool (the pool's own rule); :func:`check_wire_text` refuses a string that would
  break the command it is put into (CR, LF, NUL).
* :func:`fetch_flags` runs a pipelined flag pass (``EXAMINE`` + ``UID FETCH ... (FLAGS)``,
  ``CHANGEDSINCE`` and ``VANISHED`` where asked) over many folders in one round trip, on one
  connection; pass it to ``conn.run_sync``. :class:`FlagStep` is one folder of it,
  :class:`FlagAnswer` what the server said; :func:`parse_flag_responses` and
  :func:`parse_uid_set` read such answers.
* :func:`list_with_status` lists every folder with its STATUS numbers in one round trip where
  the server has LIST-STATUS (RFC 5819), the personal namespace (NAMESPACE) pipelined with it;
  :class:`Listing` is its answer.
* :func:`uid_set` writes UIDs as a compact IMAP set (``1:200,205``); :func:`is_loopback` says
  whether a host name is this machine's loopback (plain IMAP there sends no password over a
  network).
* :data:`DEFAULT_BATCH_SIZE` is :func:`~trio_imappool.fetch_many`'s default batch size.
* :class:`ByteSemaphore` is a memory budget in bytes (FIFO; a request larger than the budget
  waits until nothing else is held) that :func:`~trio_imappool.fetch_many` can share with its
  caller (``max_bytes=budget``): the caller then releases each message's
  :func:`message_size` once it is done with it. :data:`DEFAULT_MEMORY_BUDGET` (64 MiB) is the
  exporter's default.

The functions that take an ``IMAPClient`` block: call them through ``conn.run_sync`` (or
``pool.run_sync``), never on the event loop.
"""

from __future__ import annotations

from ._byte_semaphore import ByteSemaphore, ByteSemaphoreStatistics
from ._config import check_wire_text
from ._errors import connection_survives
from ._fanout import DEFAULT_BATCH_SIZE
from ._fanout_memory import DEFAULT_MEMORY_BUDGET, message_size
from ._imap import (
    FlagAnswer,
    FlagStep,
    Listing,
    fetch_flags,
    list_with_status,
    parse_flag_responses,
    parse_uid_set,
)
from ._util import is_loopback, uid_set

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_MEMORY_BUDGET",
    "ByteSemaphore",
    "ByteSemaphoreStatistics",
    "FlagAnswer",
    "FlagStep",
    "Listing",
    "check_wire_text",
    "connection_survives",
    "fetch_flags",
    "is_loopback",
    "list_with_status",
    "message_size",
    "parse_flag_responses",
    "parse_uid_set",
    "uid_set",
]
