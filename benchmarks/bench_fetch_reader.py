"""CPU of reading FETCH answers: the purpose-built reader against imaplib + imapclient's parser.

Run it with ``.venv/bin/python benchmarks/bench_fetch_reader.py``. No server, no network: the
answers of ``UID FETCH 1:N (BODY.PEEK[] FLAGS)`` as Dovecot sends them (``--messages``
(20,000) of ``--size`` (2,000) bytes) are fed from memory to a real ``imaplib.IMAP4`` through a
buffered stream in 64 KB reads, and read to the tagged completion and parsed, once through
imaplib's own reader and imapclient's generic parser (what ``IMAPClient.fetch`` does), once
through :class:`trio_imappool._imap.FetchReader`. Each is timed ``--rounds`` (5) times;
the best is printed, per message, with the ratio.
"""

from __future__ import annotations

import argparse
import imaplib
import io
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

from trio_imappool._client import _fetch_responses
from trio_imappool._imap import FetchReader


class _Wire(imaplib.IMAP4):
    def __init__(self, data: bytes) -> None:  # no socket
        self.debug = 0
        self.state = "SELECTED"
        self.literal = None
        self.tagged_commands: dict[Any, Any] = {b"T1": None}
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
        self.file = io.BufferedReader(io.BytesIO(data), buffer_size=65536)


def wire(messages: int, size: int) -> bytes:
    body = (b"x" * 76 + b"\r\n") * (size // 78) + b"y" * (size % 78)
    parts = [
        b"* %d FETCH (UID %d FLAGS (\\Seen) BODY[] {%d}\r\n%s)\r\n" % (i, i, len(body), body)
        for i in range(1, messages + 1)
    ]
    return b"".join(parts) + b"T1 OK Fetch completed.\r\n"


def generic(data: bytes) -> int:
    imap = _Wire(data)
    imap._command_complete("FETCH", b"T1")
    return len(_fetch_responses(imap.untagged_responses.pop("FETCH"), True))


def fast(data: bytes) -> int:
    imap = _Wire(data)
    with FetchReader(imap) as reader:
        imap._command_complete("FETCH", b"T1")
    return len(reader.messages) + len(_fetch_responses(reader.unparsed, True))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--size", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    data = wire(args.messages, args.size)
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, fn in (("imaplib + imapclient parser", generic), ("FetchReader", fast)):
            started = time.perf_counter()
            assert fn(data) == args.messages
            elapsed = time.perf_counter() - started
            best[name] = min(best.get(name, elapsed), elapsed)
    print(f"{args.messages} FETCH answers of {args.size} bytes, best of {args.rounds}:")
    for name, seconds in best.items():
        print(f"  {name:<28} {seconds:6.3f} s  {seconds / args.messages * 1e6:6.1f} us/message")
    ratio = best["imaplib + imapclient parser"] / best["FetchReader"]
    print(f"  FetchReader is {ratio:.1f}x as fast")
    return 0


if __name__ == "__main__":
    sys.exit(main())
