"""Filling test mailboxes with deterministic messages.

:func:`make_message` builds message number ``i`` of a folder, always the same bytes;
:func:`seed_folders` appends such messages to folders of a server and returns their UIDs, so a
test can fetch them back and compare byte for byte::

    uids = seed_folders(server, {"INBOX": 3, "Archive/2024": 100})
    for i, uid in enumerate(uids["Archive/2024"]):
        expected = make_message("Archive/2024", i)

Seeding is synchronous and uses plain imapclient (not the pool under test), with MULTIAPPEND
(RFC 3502) in batches where the server has it: one round trip per batch, so 10,000 messages
of 2 KB take a few seconds on Dovecot.
"""

from __future__ import annotations

import contextlib
import datetime
import email.header
import email.utils
import hashlib
import re
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing import Protocol

    class _Server(Protocol):
        """A test server of this package (Dovecot or Cyrus)."""

        def pool_kwargs(self, user: str | None = None, *, tls: bool = True) -> dict[str, Any]: ...


__all__ = ["make_message", "seed_folders"]

FlagsArg = Sequence[str | bytes] | Callable[[str, int], Sequence[str | bytes]] | None
"""Flags for seeded messages: the same for all, or ``fn(folder, i)`` per message."""

_EPOCH = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
_LINE_WIDTH = 76
_FILLER = "The quick brown fox jumps over the lazy dog. 0123456789 " * 2
_APPENDUID = re.compile(rb"\[APPENDUID (\d+) ([0-9:,]+)\]", re.IGNORECASE)
_CONNECT_TIMEOUT = 10.0
_READ_TIMEOUT = 60.0
_MAX_BATCH_BYTES = 4 * 1024 * 1024


def message_date(i: int) -> datetime.datetime:
    """The ``Date`` (and INTERNALDATE) of message ``i``: 2024-01-01 00:00 UTC plus ``i`` minutes."""
    return _EPOCH + datetime.timedelta(minutes=i)


def make_message(folder: str, i: int, size: int = 2000) -> bytes:
    """Build message number ``i`` of ``folder``: the same bytes on every call.

    The message is RFC 5322 with CRLF line endings and 7-bit ASCII only, so an IMAP server
    returns it byte-identical. Its ``Subject`` is ``Message {i} in {folder}`` (RFC 2047 encoded
    if the folder name is not ASCII), its ``Message-ID`` is unique per folder and ``i``, its
    ``Date`` is :func:`message_date`, and the body is padded with text lines so that the whole
    message is exactly ``size`` bytes (or headers plus one line, if ``size`` is smaller).

    Args:
        folder: The folder name the message is meant for.
        i: The message's index in the folder (0 for the first).
        size: The wanted size of the whole message in bytes.

    Returns:
        The message.
    """
    if folder.isascii():
        subject = f"Message {i} in {folder}"
    else:
        subject = email.header.Header(f"Message {i} in {folder}", "utf-8").encode()
    if any(c in subject for c in "\r\n"):
        raise ValueError(f"folder name {folder!r} cannot go into a Subject header")
    digest = hashlib.sha256(folder.encode("utf-8")).hexdigest()[:16]
    head = (
        "From: Seeder <seeder@example.org>\r\n"
        "To: Test User <user@example.org>\r\n"
        f"Subject: {subject}\r\n"
        f"Date: {email.utils.format_datetime(message_date(i))}\r\n"
        f"Message-ID: <{i}.{digest}@seed.trio-imappool.test>\r\n"
        f"X-Seed-Index: {i}\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: text/plain; charset="us-ascii"\r\n'
        "Content-Transfer-Encoding: 7bit\r\n"
        "\r\n"
    )
    room = size - len(head)
    lines: list[str] = []
    length = 0
    k = 0
    while length < room or not lines:
        prefix = f"Line {k} of message {i}: "
        line = (prefix + _FILLER)[:_LINE_WIDTH] + "\r\n"
        lines.append(line)
        length += len(line)
        k += 1
    body = "".join(lines)
    if len(body) > room and room >= len(lines[0]):
        # Cut the last line short so the message is exactly `size` bytes; keep it ending in
        # CRLF and never leave a bare CR.
        body = body[: room - 2]
        if body.endswith("\r"):
            body = body[:-1] + "."
        body += "\r\n"
    return (head + body).encode("ascii")


def _parse_uid_set(text: bytes) -> list[int]:
    uids: list[int] = []
    for part in text.split(b","):
        first, _, last = part.partition(b":")
        low = int(first)
        high = int(last) if last else low
        step = 1 if high >= low else -1
        uids.extend(range(low, high + step, step))
    return uids


def _appended_uids(response: Iterable[Any], count: int) -> list[int] | None:
    for item in response:
        if isinstance(item, bytes) and (match := _APPENDUID.search(item)):
            uids = _parse_uid_set(match.group(2))
            if len(uids) != count:
                raise RuntimeError(f"APPENDUID names {len(uids)} UIDs for {count} messages")
            return uids
    return None


def seed_folders(
    server_or_kwargs: _Server | Mapping[str, Any],
    folders: Mapping[str, int],
    *,
    user: str | None = None,
    size: int = 2000,
    flags: FlagsArg = None,
    batch_size: int = 500,
) -> dict[str, list[int]]:
    """Append deterministic messages to folders, creating the folders that are missing.

    The messages are :func:`make_message` ``(folder, i, size)`` with ``i`` counting on from the
    number of messages already in the folder (so seeding twice adds new messages, not copies),
    and INTERNALDATE :func:`message_date` ``(i)``.

    Args:
        server_or_kwargs: A :class:`DovecotServer` or :class:`CyrusServer` (its plain port is
            used, no TLS), or connection settings shaped like
            :meth:`DovecotServer.pool_kwargs`: ``host``, ``port``, ``username``, ``password``,
            and optionally ``ssl`` (default ``False``) and ``ssl_context``.
        folders: Folder name -> how many messages to append. Use ``/`` as the hierarchy
            separator on the harness's Dovecot and Cyrus (``"Archive/2024"``).
        user: With a server, the user to seed (default: its first user). Not allowed with
            settings.
        size: The size of each message in bytes.
        flags: Flags for every message (``[r"\\Seen"]``), or a function ``fn(folder, i)``
            returning each message's flags; ``None`` for none.
        batch_size: Messages per MULTIAPPEND command.

    Returns:
        Folder -> the UIDs of the appended messages, in order (``i`` ascending).

    Raises:
        ValueError: A negative count, a bad batch size, or ``user`` given with settings.
        imapclient.exceptions.IMAPClientError: The server refused a command.
    """
    import imapclient
    from imapclient.imapclient import SocketTimeout

    if isinstance(server_or_kwargs, Mapping):
        if user is not None:
            raise ValueError("seed_folders(): pass `user` only with a server")
        settings = dict(server_or_kwargs)
    else:
        settings = server_or_kwargs.pool_kwargs(user, tls=False)
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    for folder, count in folders.items():
        if count < 0:
            raise ValueError(f"cannot append {count} messages to {folder!r}")

    use_ssl = bool(settings.get("ssl", False))
    client = imapclient.IMAPClient(
        settings["host"],
        settings["port"],
        ssl=use_ssl,
        ssl_context=settings.get("ssl_context") if use_ssl else None,
        timeout=SocketTimeout(connect=_CONNECT_TIMEOUT, read=_READ_TIMEOUT),
    )
    try:
        client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.login(settings["username"], settings["password"])
        result = {
            folder: _seed_folder(client, folder, count, size, flags, batch_size)
            for folder, count in folders.items()
        }
        client.logout()
    except BaseException:
        with contextlib.suppress(Exception):
            client.shutdown()
        raise
    return result


def _seed_folder(
    client: Any, folder: str, count: int, size: int, flags: FlagsArg, batch_size: int
) -> list[int]:
    if not client.folder_exists(folder):
        client.create_folder(folder)
    first = client.folder_status(folder, [b"MESSAGES"])[b"MESSAGES"]
    uids: list[int] = []
    for batch in _batches(folder, range(first, first + count), size, flags, batch_size):
        uids.extend(_append_batch(client, folder, batch))
    return uids


def _batches(
    folder: str, indexes: range, size: int, flags: FlagsArg, batch_size: int
) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    batch_bytes = 0
    for i in indexes:
        item: dict[str, Any] = {"msg": make_message(folder, i, size), "date": message_date(i)}
        message_flags = flags(folder, i) if callable(flags) else flags
        if message_flags:
            item["flags"] = list(message_flags)
        batch.append(item)
        batch_bytes += len(item["msg"])
        if len(batch) >= batch_size or batch_bytes >= _MAX_BATCH_BYTES:
            yield batch
            batch, batch_bytes = [], 0
    if batch:
        yield batch


def _append_batch(client: Any, folder: str, batch: list[dict[str, Any]]) -> list[int]:
    from imapclient.exceptions import IMAPClientError

    uid_next: int | None = None
    if not client.has_capability("UIDPLUS"):
        # No APPENDUID: the UIDs are the next ones, as long as nobody else appends meanwhile
        # (true in a test).
        uid_next = client.folder_status(folder, [b"UIDNEXT"])[b"UIDNEXT"]
    multiappend = client.has_capability("MULTIAPPEND")
    if multiappend:
        typ, data = client.multiappend(folder, batch)
        if typ != "OK":
            raise IMAPClientError(f"MULTIAPPEND to {folder!r} failed: {data!r}")
        responses = [data]
    else:
        responses = [
            [client.append(folder, item["msg"], item.get("flags", ()), item["date"])]
            for item in batch
        ]
    if uid_next is not None:
        return list(range(uid_next, uid_next + len(batch)))
    uids: list[int] = []
    for response in responses:
        found = _appended_uids(response, len(batch) if multiappend else 1)
        if found is None:
            raise RuntimeError(f"no APPENDUID in the server's answer: {response!r}")
        uids.extend(found)
    return uids
