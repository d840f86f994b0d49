"""What the commands print: the progress bar, the result of an export, the pool's statistics."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import sys
from pathlib import Path
from typing import Any, TextIO

from trio_imappool import PoolStatistics
from trio_imappool.exporter import ExportProgress, ExportResult

# -- output --------------------------------------------------------------------------------------


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


class _ProgressBar:
    """A tqdm bar of messages (folders and bytes in its postfix) on stderr; nothing when
    stderr is not a terminal, when turned off, or when tqdm is not installed."""

    def __init__(self, enabled: bool) -> None:
        self._bar: Any = None
        if enabled and sys.stderr.isatty():
            with contextlib.suppress(ImportError):
                tqdm = importlib.import_module("tqdm").tqdm  # the extra "cli"; untyped
                self._bar = tqdm(total=0, unit="msg", desc="export", leave=False, file=sys.stderr)

    def update(self, progress: ExportProgress) -> None:
        bar = self._bar
        if bar is None:
            return
        if bar.total != progress.messages_total:
            bar.total = progress.messages_total
        bar.set_postfix_str(
            f"folders {progress.folders_done}/{progress.folders_total}, "
            f"{_size(progress.bytes_done)}",
            refresh=False,
        )
        bar.update(progress.messages_done - bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _n(count: int, word: str) -> str:
    """``1 message``, ``2 messages``."""
    return f"{count:,} {word}{'' if count == 1 else 's'}"


def _print_result(
    result: ExportResult, stats: PoolStatistics, root: Path, verbose: bool, out: TextIO
) -> None:
    folders = len(result.folders)
    total = sum(f.exported for f in result.folders)
    for f in result.folders:
        followed = f.flags_changed or f.gone or f.removed  # new mail alone: the summary
        if not (verbose or followed):
            continue
        note = ""
        if f.uidvalidity_changed:
            note = f"  new UIDVALIDITY: {f.moved_aside} old files moved aside"
        where = "cur/" if f.path == root else f"{f.path.name}/cur/"
        print(
            f"  {_printable(f.name):<24} {f.fetched:6} new {f.flags_changed:6} flags changed "
            f"{f.gone:6} gone from the server {f.removed:6} removed locally "
            f"{f.exported:7} in {where}{note}",
            file=out,
        )
    for f in result.folders:
        if f.uidvalidity_changed and not verbose:
            print(
                f"{f.name}: UIDVALIDITY changed, exported again "
                f"({_n(f.moved_aside, 'old file')} moved to trio-imappool-replaced/)",
                file=out,
            )
    if result.messages_fetched:
        print(
            f"exported {_n(result.messages_fetched, 'new message')} "
            f"({_size(result.bytes_fetched)}) from {result.folders_fetched} of "
            f"{_n(folders, 'folder')} in {result.elapsed:.2f} s "
            f"({result.messages_per_second:,.0f} messages/s) over "
            f"{_n(stats.connections_opened, 'connection')}; {_n(total, 'message')} in {root}",
            file=out,
        )
    elif not (result.flags_changed or result.messages_gone or result.messages_removed):
        print(
            f"nothing new in {_n(folders, 'folder')} ({_n(total, 'message')} in {root}); "
            f"{result.elapsed:.2f} s",
            file=out,
        )
    else:
        print(f"no new messages in {_n(folders, 'folder')}; {result.elapsed:.2f} s", file=out)
    if result.flags_changed or result.messages_gone or result.messages_removed:
        print(
            f"followed the server: flags changed on {_n(result.flags_changed, 'message')}, "
            f"{_n(result.messages_gone, 'message')} gone from the server, "
            f"{_n(result.messages_removed, 'file')} removed locally",
            file=out,
        )
    if result.gone_kept:
        print(
            f"{_n(result.gone_kept, 'message')} gone from the server kept in {root} "
            "(--delete removes them)",
            file=out,
        )
    if verbose:
        print(
            f"pool: {_n(stats.connections_opened, 'connection')} opened, "
            f"{stats.connections_discarded} discarded, {_n(stats.open_failures, 'failed open')}, "
            f"{_n(stats.acquires, 'checkout')} ({stats.acquire_waits} waited)",
            file=out,
        )


def _print_statistics(stats: PoolStatistics, out: TextIO) -> None:
    print("pool statistics:", file=out)
    for field in dataclasses.fields(stats):
        print(f"  {field.name:<22} {getattr(stats, field.name)}", file=out)


def _printable(name: str) -> str:
    """A folder name for one line of output: control characters shown as escapes."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in name)
