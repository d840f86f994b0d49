"""The one layer that touches imaplib's and imapclient's internals. No Trio in it.

Read this package first when imapclient (or Python's imaplib) changes. Everything the pool does
past imapclient's public methods is here: private attributes (``client._imap``,
``client._timeout``, ``_normalise_folder``, ``_create_IMAP4``), imaplib's plumbing
(``_command``, ``_command_complete``, ``_get_response``, ``_get_line``, ``untagged_responses``,
``tagged_commands``, ``state``, its buffered ``file`` and ``sock``), and imapclient's parser
helpers (``gen_parsed_response``, ``_convert_ENVELOPE``, ``_normalise_search_criteria``...).

The modules:

- :mod:`._sockets`: opening a connection the pool can interrupt (the socket is shown to the
  pool before every blocking step), the capabilities taken from the greeting instead of asked
  for again, and the socket-level looks (buffered bytes, timeouts, closing without LOGOUT).
- :mod:`._literals`: LOGIN with UTF-8 literals, for what imaplib's ASCII-only ``login`` cannot
  send.
- :mod:`._wire_client`: :class:`WireClient`, the imapclient subclass that tracks the session
  (selected folder, IDLE, logged out) and pipelines commands (``fetch_pipelined``,
  ``select_and_search``, ``search_and_fetch``, ``fetch``).
- :mod:`._fetch_reader` and :mod:`._fetch`: the purpose-built FETCH reader, what turns
  untagged FETCH responses into results by UID, and :func:`after_noop` (a NOOP pipelined
  before a command).
- :mod:`._idle_wire`: the blocking steps of an IDLE watch (its reader works around
  mjs/imapclient#519).
- :mod:`._listing`: LIST-STATUS with NAMESPACE pipelined (every folder's numbers in one
  round trip).
- :mod:`._sync`: the exporter's flag pass (CONDSTORE's CHANGEDSINCE, QRESYNC's VANISHED).

Checked against imapclient 3.0.0 (the lowest version: scripts/oldest-constraints.txt, run by
scripts/check_oldest.sh) to 4.1.0 (what
the test machines run; see ``shared/FIELD-NOTES.md``), with Python 3.11's imaplib, which reads
responses through ``_get_response``, ``_get_line`` and ``readline``. pyproject.toml pins
``imapclient>=3.0,<5`` for this package: before raising the bound, run tests/unit (the FETCH
reader against imaplib) and the integration suite. Python 3.14 reworked imaplib's reader:
re-check there.

Layering (tests/unit/test_imap_layer.py keeps it so): these modules import no Trio, directly or
through another module of the package, and nothing of the package but each other and the
leaves that import no Trio (``_util``, ``_version``, ``_commands``). The pool's core
(``_client``, ``_login``, ``_idle``) builds on this package; its errors and configuration
(``_errors``, ``_config``, which import Trio) stay out of it, so the checks that raise them are
handed in (``WireClient.check_text``) or made by the caller.
"""

from ._fetch import (
    PipelinedFetch,
    after_noop,
    complete,
    esearch_uids,
    failure,
    fetch_responses,
    message_set,
    read_fetch_results,
    select_fetch_results,
)
from ._fetch_reader import FetchReader, parse_simple_fetch
from ._idle_wire import (
    MAX_BATCH,
    IdleEvent,
    IdleSession,
    begin_idle,
    end_idle,
    open_watch,
    poll,
    read_batch,
    renew,
)
from ._listing import Listing, list_with_status
from ._literals import login_with_literals
from ._sockets import (
    OnSocket,
    OpenInterrupted,
    close_client,
    has_buffered_data,
    holds_unread,
    logout_unanswered,
    set_timeouts,
    socket_of,
)
from ._sync import FlagAnswer, FlagStep, fetch_flags, parse_flag_responses, parse_uid_set
from ._wire_client import WireClient

__all__ = [
    "MAX_BATCH",
    "FetchReader",
    "FlagAnswer",
    "FlagStep",
    "IdleEvent",
    "IdleSession",
    "Listing",
    "OnSocket",
    "OpenInterrupted",
    "PipelinedFetch",
    "WireClient",
    "after_noop",
    "begin_idle",
    "close_client",
    "complete",
    "end_idle",
    "esearch_uids",
    "failure",
    "fetch_flags",
    "fetch_responses",
    "has_buffered_data",
    "holds_unread",
    "list_with_status",
    "login_with_literals",
    "logout_unanswered",
    "message_set",
    "open_watch",
    "parse_flag_responses",
    "parse_simple_fetch",
    "parse_uid_set",
    "poll",
    "read_batch",
    "read_fetch_results",
    "renew",
    "select_fetch_results",
    "set_timeouts",
    "socket_of",
]
