""":func:`main`: parse, run the chosen command, turn what went wrong into one line and an exit
status."""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import logging
import sys
from collections.abc import Iterator, Sequence
from typing import TextIO

from ._commands import _run_dry_run, _run_export, _run_folders
from ._errors import _output_closed, _quiet_exit_for_closed_output, _report_error, _single
from ._parser import _parser
from ._settings import EXIT_CODES, PROG, UsageError


def _run_command(args: argparse.Namespace, out: TextIO) -> int:
    """Run the chosen command; its output is flushed here, so that a closed pipe is found
    while the errors are still handled (not at the interpreter's exit)."""
    if getattr(args, "quiet", False):
        if args.verbose:
            raise UsageError("-q and -v exclude each other")
        args.progress = False
        out = io.StringIO()  # errors still go to stderr
    if args.command == "folders":
        status = _run_folders(args, out)
    elif args.command == "export" and getattr(args, "dry_run", False):
        status = _run_dry_run(args, out)
    elif args.command == "export":
        status = _run_export(args, out)
    else:
        from ._demo import _demo  # the test harness, only for the demo

        status = _demo(args, out)
    out.flush()
    return status


# -- main ----------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    out = sys.stdout
    with _logging(args.debug, args.verbose):
        return _main(args, out)


def console_main() -> int:
    """:func:`main` for a process of its own: the ``trio-imappool`` script and ``python -m
    trio_imappool``. Returns the exit status.

    The same as :func:`main`, for a process that ends when it returns, with the garbage
    collector told so (:func:`gc.freeze`): the objects made until then (modules, classes,
    functions, which live as long as the process) are left out of every later collection,
    first those made by the imports, then, when the command is done, all of them. Without
    the second, the interpreter's collections at exit walk every object only to free memory
    the operating system takes back anyway: about 50 ms on a small machine, a tenth of a
    no-change export. Exit handlers, flushing and closing files happen as usual; only objects
    kept alive by a reference cycle are not finalized at exit (the command leaves no file or
    connection to them).
    """
    gc.freeze()
    try:
        return main()
    finally:
        gc.freeze()


@contextlib.contextmanager
def _logging(debug: bool, verbose: bool) -> Iterator[None]:
    """The library's log records on stderr, one line each: errors only by default (the error
    that ends the run is reported once, by main), warnings with --verbose, all with --debug."""
    logger = logging.getLogger("trio_imappool")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
    saved = logger.level, logger.propagate
    logger.setLevel(logging.DEBUG if debug else logging.WARNING if verbose else logging.ERROR)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def _main(args: argparse.Namespace, out: TextIO) -> int:
    try:
        return _run_command(args, out)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; what was written stays: run again to go on", file=sys.stderr)
        return EXIT_CODES["interrupted"]
    except BaseException as exc:
        error = _single(exc)
        if _output_closed(error):
            return _quiet_exit_for_closed_output()
        if isinstance(error, KeyboardInterrupt):
            print(f"{PROG}: interrupted; run again to go on", file=sys.stderr)
            return EXIT_CODES["interrupted"]
        if isinstance(error, SystemExit | GeneratorExit) or not isinstance(error, Exception):
            raise
        return _report_error(error, args.debug, sys.stderr)
