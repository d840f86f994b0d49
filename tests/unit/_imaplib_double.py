"""A real ``imaplib.IMAP4`` without a socket, for the unit tier: the server's side is a byte
string read through imaplib's own reader, what the client sends is recorded."""

from __future__ import annotations

import imaplib
import io
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer


class Chunks(io.RawIOBase):
    """A raw stream that returns at most *chunk* bytes per read: TCP segments."""

    def __init__(self, data: bytes, chunk: int) -> None:
        self._data = memoryview(data)
        self._chunk = chunk

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        size = min(len(buffer), self._chunk, len(self._data))
        buffer[:size] = self._data[:size]
        self._data = self._data[size:]
        return size


class ScriptedIMAP4(imaplib.IMAP4):
    """An imaplib connection in the SELECTED state whose server says *script*, handed out
    *chunk* bytes at a time (None: as one stream); *in_flight* are tags already sent. What the
    client sends is in ``sent``."""

    def __init__(
        self, script: bytes, *, chunk: int | None = None, in_flight: tuple[bytes, ...] = ()
    ) -> None:  # no super(): no socket
        self.debug = 0
        self.state = "SELECTED"
        self.literal = None
        self.tagged_commands: dict[Any, Any] = dict.fromkeys(in_flight)
        self.untagged_responses: dict[str, list[Any]] = {}
        self.continuation_response = ""
        self.is_readonly = True
        self.tagnum = 1
        self._tls_established = False
        self._mode_ascii()
        self.tagpre = b"T"  # type: ignore[assignment]
        tagre: Any = re.compile(rb"(?P<tag>T\d+) (?P<type>[A-Z]+) (?P<data>.*)", re.ASCII)
        self.tagre = tagre
        self._cmd_log_len = 10
        self._cmd_log_idx = 0
        self._cmd_log: dict[int, Any] = {}
        if chunk is None:
            self.file = io.BufferedReader(io.BytesIO(script))
        else:
            self.file = io.BufferedReader(Chunks(script, chunk), buffer_size=max(chunk, 8))
        self.sent: list[bytes] = []

    def send(self, data: ReadableBuffer) -> None:
        self.sent.append(bytes(data))
