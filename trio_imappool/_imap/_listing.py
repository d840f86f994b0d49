"""LIST-STATUS (RFC 5819) with NAMESPACE (RFC 2342) pipelined: every folder and its numbers in
one round trip. imapclient has no LIST-STATUS; imaplib's plumbing does it, as imapclient's own
``list_folders()`` does for LIST."""

from __future__ import annotations

import contextlib
import dataclasses
import imaplib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from imapclient import imap_utf7
from imapclient.response_parser import parse_response

if TYPE_CHECKING:
    from imapclient import IMAPClient

__all__ = ["Listing", "list_with_status"]


@dataclasses.dataclass(frozen=True, slots=True)
class Listing:
    """What one LIST-STATUS round trip said.

    Attributes:
        personal: The first personal namespace's prefix and delimiter (decoded), or None
            where NAMESPACE was not asked for, failed, or was answered with nothing usable.
        folders: ``(flags, delimiter, name)`` per LIST line, as imapclient's ``list_folders``
            gives them (names as the server sent them when ``folder_encode`` is off).
        status: STATUS items by the folder's raw name; a folder with a garbled or missing
            STATUS is absent (ask for it on its own).
    """

    personal: tuple[str, str | None] | None
    folders: list[tuple[Any, Any, Any]]
    status: dict[bytes, Any]


def list_with_status(client: IMAPClient, items: Sequence[str], *, namespace: bool) -> Listing:
    """Send NAMESPACE (if *namespace*) and ``LIST "" "*" RETURN (STATUS (items))`` pipelined,
    and read both answers. Blocks: run it on a checked-out connection in a worker thread.

    A NO or BAD for the LIST raises imapclient's error; one for NAMESPACE only leaves
    ``personal`` None. A broken connection raises ``imaplib.IMAP4.abort``.
    """
    imap = client._imap
    asked = imap._command("NAMESPACE") if namespace else None
    tag = imap._command("LIST", '""', '"*"', "RETURN", f"(STATUS ({' '.join(items)}))")
    personal = _namespace_answer(imap, asked)
    typ, data = imap._command_complete("LIST", tag)
    client._checkok("list", typ, data)
    _, lists = imap._untagged_response(typ, data, "LIST")
    _, statuses = imap._untagged_response(typ, [None], "STATUS")
    folders = client._proc_folder_list(lists)
    status: dict[bytes, Any] = {}
    with contextlib.suppress(Exception):  # a garbled answer: the caller asks per folder
        found = parse_response([item for item in statuses if item is not None])
        for i in range(0, len(found) - 1, 2):
            key = found[i]
            status[str(key).encode() if isinstance(key, int) else bytes(key)] = found[i + 1]
    return Listing(personal, folders, status)


def _namespace_answer(imap: imaplib.IMAP4, tag: Any) -> tuple[str, str | None] | None:
    """The first personal namespace from the answer to a pipelined NAMESPACE (None: not sent,
    refused or unusable)."""
    if tag is None:
        return None
    try:
        typ, data = imap._command_complete("NAMESPACE", tag)
        if typ != "OK":
            return None
        _, answer = imap._untagged_response(typ, data, "NAMESPACE")
        personal = parse_response([line for line in answer if line is not None])[0]
        prefix, delimiter = personal[0] if personal else (b"", None)
        prefix = imap_utf7.decode(prefix)
        if isinstance(delimiter, bytes):
            delimiter = delimiter.decode("utf-8", "replace")
    except imaplib.IMAP4.abort:
        raise
    except (imaplib.IMAP4.error, ValueError, TypeError, IndexError, AttributeError):
        return None
    return prefix, delimiter
