"""The ``export`` and ``folders`` commands (and ``export --dry-run``)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import trio

from trio_imappool import PoolStatistics, open_pool
from trio_imappool.exporter import ExportResult, FolderFailure, Survey, export_maildir, survey

from . import _accounts
from ._output import _n, _print_result, _printable, _ProgressBar, _size
from ._settings import EXIT_CODES, PROG, Settings, UsageError

# -- export --------------------------------------------------------------------------------------


async def _export(
    options: dict[str, Any], root: Path, settings: Settings, progress: bool
) -> tuple[ExportResult, PoolStatistics]:
    host = options.pop("host")
    port = options.pop("port")
    bar = _ProgressBar(progress)
    try:
        async with open_pool(host, port, **options) as pool:
            result = await export_maildir(
                pool,
                root,
                folders=settings.get("folders"),
                exclude=settings.get("exclude") or (),
                batch_size=settings.get("batch_size"),
                memory_budget=settings.get("memory_budget") * 1024 * 1024,
                max_connections=options["max_size"],
                fsync=settings.get("fsync"),
                progress=bar.update,
                delete=bool(settings.get("delete")),
            )
        return result, pool.statistics()
    finally:
        bar.close()


def _run_export(args: argparse.Namespace, out: TextIO) -> int:
    settings = Settings(args, os.environ)
    maildir = args.maildir or settings.get("maildir")
    if not maildir:
        raise UsageError("no destination: give MAILDIR (or maildir in the config file)")
    if settings.get("accounts"):  # many accounts, shared with other workers
        return _accounts.run_accounts(args, settings, out)
    root = Path(os.path.expanduser(maildir))
    options = settings.pool_options()
    options.update(_accounts.budget_options(settings, options))  # {"budget": ...}
    result, stats = trio.run(_export, options, root, settings, args.progress)
    _print_result(result, stats, root, args.verbose, out)
    return _report_incomplete(result, sys.stderr)


def _report_incomplete(result: ExportResult, err: TextIO) -> int:
    """Name each folder not exported and each folder with missing messages; the exit status."""
    for failure in result.folders_failed:
        print(
            f"{PROG}: folder {_printable(failure.name)!r} not exported: {failure.reason}",
            file=err,
        )
    for folder in result.folders:
        if folder.missing:
            print(
                f"{PROG}: folder {_printable(folder.name)!r}: {_n(folder.missing, 'message')} "
                "listed by the server but not returned (not exported; the next run asks again)",
                file=err,
            )
    if result.complete:
        return EXIT_CODES["ok"]
    print(f"{PROG}: partial export: run again to retry what is named above", file=err)
    return EXIT_CODES["partial"]


async def _survey_account(
    options: dict[str, Any], root: Path | None, settings: Settings, sizes: bool
) -> Survey:
    host = options.pop("host")
    port = options.pop("port")
    async with open_pool(host, port, **options) as pool:
        return await survey(
            pool,
            root,
            folders=settings.get("folders"),
            exclude=settings.get("exclude") or (),
            sizes=sizes,
            max_connections=options["max_size"],
        )


def _report_unusable(failures: Sequence[FolderFailure], err: TextIO) -> None:
    for failure in failures:
        print(
            f"{PROG}: folder {_printable(failure.name)!r} cannot be exported: {failure.reason}",
            file=err,
        )


def _run_folders(args: argparse.Namespace, out: TextIO) -> int:
    settings = Settings(args, os.environ)
    maildir = args.maildir or settings.get("maildir")
    root = Path(os.path.expanduser(maildir)) if maildir else None
    found = trio.run(_survey_account, settings.pool_options(), root, settings, True)
    _print_folders(found, root, out)
    _report_unusable(found.failures, sys.stderr)
    return EXIT_CODES["ok"]


def _print_folders(found: Survey, root: Path | None, out: TextIO) -> None:
    header = ["FOLDER", "MESSAGES", "SIZE", *(["NEW"] if root is not None else []), "MAILDIR"]
    rows = [header]
    for f in found.folders:
        row = [_printable(f.server.name), f"{f.server.messages:,}"]
        row.append("-" if f.size is None else _size(f.size))
        if root is not None:
            row.append(f"{f.new or 0:,}")
        row.append(_printable(f.local) or "(top)")
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(row[1:-1], widths[1:-1], strict=True)]
        cells.append(row[-1])
        print("  ".join(cells).rstrip(), file=out)
    messages = sum(f.server.messages for f in found.folders)
    total = f"{_n(len(found.folders), 'folder')}, {_n(messages, 'message')}"
    if found.size_source is not None:
        size = sum(f.size or 0 for f in found.folders)
        total += f", {_size(size)} (sizes from {found.size_source})"
    if root is not None:
        new = [f for f in found.folders if f.new]
        count = sum(f.new or 0 for f in new)
        if count:
            total += (
                f"; an export into {root} would fetch {_n(count, 'new message')} from "
                f"{len(new)} of {_n(len(found.folders), 'folder')}"
            )
        else:
            total += f"; nothing new to export into {root}"
    print(total, file=out)


def _run_dry_run(args: argparse.Namespace, out: TextIO) -> int:
    settings = Settings(args, os.environ)
    maildir = args.maildir or settings.get("maildir")
    if not maildir:
        raise UsageError("no destination: give MAILDIR (or maildir in the config file)")
    if settings.get("accounts"):
        raise UsageError("--dry-run is for one account; it cannot be used with --accounts")
    root = Path(os.path.expanduser(maildir))
    found = trio.run(_survey_account, settings.pool_options(), root, settings, False)
    print(f"dry run: nothing is fetched or written into {root}", file=out)
    width = max((len(_printable(f.server.name)) for f in found.folders), default=0)
    count = 0
    active = 0
    for f in found.folders:
        new = f.new or 0
        count += new
        active += bool(new)
        if not (new or f.aside or args.verbose):
            continue
        where = "cur/" if not f.local else f"{_printable(f.local)}/cur/"
        note = ""
        if f.aside:
            note = f"  (new UIDVALIDITY: {_n(f.aside, 'old file')} would be moved aside first)"
        line = f"  {_printable(f.server.name):<{width}} {new:7,} new {f.exported:7,} in {where}"
        print(f"{line}{note}", file=out)
    folders = _n(len(found.folders), "folder")
    if count:
        print(f"would fetch {_n(count, 'new message')} from {active} of {folders}", file=out)
    else:
        print(f"nothing new in {folders}", file=out)
    _report_unusable(found.failures, sys.stderr)
    return EXIT_CODES["ok"]
