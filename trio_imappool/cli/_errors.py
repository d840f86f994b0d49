"""Errors: one line, one exit status (see :data:`EXIT_CODES`); a closed standard output."""

from __future__ import annotations

import contextlib
import os
import select
import sys
import traceback
from collections.abc import Iterator
from typing import TextIO

import trio
from imapclient.exceptions import IMAPClientError

from trio_imappool import (
    AuthenticationError,
    ConfigurationError,
    ConnectError,
    PoolError,
    PoolTimeout,
    TLSError,
)
from trio_imappool.exporter import ExportError, FolderNotFoundError

from ._settings import EXIT_CODES, PROG, UsageError

# -- errors: one line, one exit status -----------------------------------------------------------


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__


def classify(exc: BaseException) -> tuple[str, str]:
    """The exit status name (a key of :data:`EXIT_CODES`) and a one-line message for an error.

    The error and its ``__cause__`` chain are looked at in order, so a
    :class:`~trio_imappool.FanOutError` caused by a lost connection counts as a connection
    error.
    """
    kind = None
    for item in _causes(exc):
        if isinstance(item, UsageError | ConfigurationError | FolderNotFoundError):
            kind = "usage"
        elif isinstance(item, AuthenticationError):
            kind = "authentication"
        elif isinstance(item, TLSError):
            kind = "tls"
        elif isinstance(item, ConnectError | PoolTimeout):
            kind = "connection"
        elif isinstance(item, ExportError):
            kind = "local"
        elif isinstance(item, IMAPClientError):
            kind = "imap"
        elif isinstance(item, OSError):
            kind = "connection"  # a network error in a command (files raise ExportError)
        else:
            continue
        break
    if kind is None:
        kind = "imap" if isinstance(exc, PoolError) else "bug"
    message = " ".join(str(exc).split()) or type(exc).__name__
    if not isinstance(exc, UsageError):
        message = f"{type(exc).__name__}: {message}"
    return kind, message


def _report_error(exc: BaseException, debug: bool, err: TextIO) -> int:
    kind, message = classify(exc)
    if debug:
        traceback.print_exception(exc, file=err)
    hint = "" if debug or kind != "bug" else " (run with --debug for the traceback)"
    print(f"{PROG}: error: {message}{hint}", file=err)
    return EXIT_CODES[kind]


def _single(exc: BaseException) -> BaseException:
    """The one error inside (nested) exception groups: KeyboardInterrupt first."""
    if isinstance(exc, BaseExceptionGroup):
        interrupt = exc.subgroup(KeyboardInterrupt)
        if interrupt is not None:
            return KeyboardInterrupt()
        rest = exc.split(trio.Cancelled)[1]
        if rest is not None and len(rest.exceptions) == 1:
            return _single(rest.exceptions[0])
    return exc


def _output_closed(exc: BaseException) -> bool:
    """Whether *exc* is a BrokenPipeError from writing to a standard output whose reader has
    gone (``| head``). A BrokenPipeError from an IMAP socket, standard output being fine,
    stays a connection error."""
    if not any(isinstance(item, BrokenPipeError) for item in _causes(exc)):
        return False
    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        events = poller.poll(0)
    except (AttributeError, OSError, ValueError):  # no real stdout (a test's capture)
        return False
    # Linux and the BSDs report POLLERR (or POLLHUP) on a pipe's write end without readers.
    return any(mask & (select.POLLERR | select.POLLHUP) for _fd, mask in events)


def _quiet_exit_for_closed_output() -> int:
    """Point standard output at /dev/null (so that the interpreter's last flush does not
    complain either) and return 141, what a shell shows for a program killed by SIGPIPE."""
    with contextlib.suppress(AttributeError, OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)
    return EXIT_CODES["output_closed"]
