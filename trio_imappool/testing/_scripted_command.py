"""Commands as the scripted server reads them, and the small wire helpers its answers use.

A client's command is lines and literals; :func:`_tokenize` turns them into atoms, strings and
parenthesized lists (:data:`Argument`). Sequence sets, LIST patterns and quoting are here too.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import TypeAlias

__all__ = ["Argument", "ScriptedCommand"]

#: A command's argument: an atom or string (bytes), or a parenthesized list of arguments.
Argument: TypeAlias = "bytes | list[Argument]"


@dataclasses.dataclass
class ScriptedCommand:
    """One command as the server read it.

    Attributes:
        tag: The client's tag.
        name: The command in upper case (``"FETCH"`` for ``UID FETCH`` too).
        uid: True for the ``UID`` form.
        args: The arguments: atoms and strings (quoted or literal) as bytes, parenthesized
            lists as lists; ``BODY.PEEK[HEADER.FIELDS (FROM)]`` is one atom.
        raw: The lines and literals it was made of, exactly as received (without CRLF).
    """

    tag: str
    name: str
    uid: bool
    args: list[Argument]
    raw: list[bytes]

    def arg(self, index: int) -> bytes:
        """Argument *index* as bytes (b"" when it is missing or a list)."""
        if index < len(self.args) and isinstance(self.args[index], bytes):
            return self.args[index]  # type: ignore[return-value]
        return b""


class _Literal(bytes):
    """A literal's bytes inside a command being parsed."""


def _tokenize(segments: Sequence[bytes]) -> list[Argument]:
    """Atoms, strings and lists of a command made of lines and literals (``_Literal``)."""
    root: list[Argument] = []
    stack = [root]
    for segment in segments:
        if isinstance(segment, _Literal):
            stack[-1].append(bytes(segment))
            continue
        i, n = 0, len(segment)
        while i < n:
            ch = segment[i : i + 1]
            if ch == b" ":
                i += 1
            elif ch == b"(":
                new: list[Argument] = []
                stack[-1].append(new)
                stack.append(new)
                i += 1
            elif ch == b")":
                if len(stack) > 1:
                    stack.pop()
                i += 1
            elif ch == b'"':
                out = bytearray()
                i += 1
                while i < n and segment[i : i + 1] != b'"':
                    if segment[i : i + 1] == b"\\" and i + 1 < n:
                        i += 1
                    out += segment[i : i + 1]
                    i += 1
                i += 1
                stack[-1].append(bytes(out))
            else:
                start, depth = i, 0
                while i < n:
                    c = segment[i : i + 1]
                    if c == b"[":
                        depth += 1
                    elif c == b"]":
                        depth = max(0, depth - 1)
                    elif depth == 0 and c in (b" ", b"(", b")"):
                        break
                    i += 1
                stack[-1].append(segment[start:i])
    return root


def _quote(name: bytes) -> bytes:
    """A string as the server sends it: quoted when it can be, else a literal."""
    if any(b in b"\r\n\x00" or b >= 0x80 for b in name):
        return b"{%d}\r\n" % len(name) + name
    return b'"' + name.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _sequence_set(spec: bytes, largest: int) -> set[int]:
    """The numbers of an IMAP sequence set (``1:3,7,9:*``); ``*`` is *largest*."""
    numbers: set[int] = set()
    for part in spec.split(b","):
        low, _, high = part.partition(b":")
        try:
            a = largest if low == b"*" else int(low)
            b = a if not high else (largest if high == b"*" else int(high))
        except ValueError:
            continue
        a, b = min(a, b), max(a, b)
        numbers.update(range(a, min(b, max(largest, a)) + 1))
    return numbers


def _glob(pattern: bytes, delimiter: bytes) -> re.Pattern[bytes]:
    out = b""
    for ch in pattern:
        c = bytes([ch])
        if c == b"*":
            out += b".*"
        elif c == b"%":
            out += b"[^" + re.escape(delimiter) + b"]*" if delimiter else b".*"
        else:
            out += re.escape(c)
    return re.compile(out + rb"\Z", re.DOTALL)
