"""The ``trio-imappool`` command (also ``python -m trio_imappool``).

``trio-imappool demo`` starts a private Dovecot (the test harness of
:mod:`trio_imappool.testing`), seeds a mailbox, and shows the pool at work on it: tasks in a
nursery fetch every folder concurrently over a few pooled connections, one task is cancelled in
the middle of a blocking command, and the pool's statistics are printed at the end.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

import trio

from ._pool import Pool, open_pool

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = argparse.ArgumentParser(prog="trio-imappool", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="show the pool at work on a private Dovecot")
    demo.add_argument("--folders", type=int, default=6, help="folders to seed (default 6)")
    demo.add_argument("--messages", type=int, default=200, help="messages per folder")
    demo.add_argument("--max-size", type=int, default=4, help="the pool's max_size")
    args = parser.parse_args(argv)
    if args.folders < 1 or args.messages < 1 or args.max_size < 1:
        parser.error("--folders, --messages and --max-size must be at least 1")
    return _demo(args.folders, args.messages, args.max_size)


def _demo(folders: int, messages: int, max_size: int) -> int:
    from .testing import DovecotNotFoundError, seed_folders, start_dovecot

    try:
        import trustme  # noqa: F401
    except ImportError:
        print(
            "trio-imappool demo: the demo needs the trustme package: "
            "pip install 'trio-imappool[demo]'",
            file=sys.stderr,
        )
        return 2

    names = ["INBOX"] + [f"Folder{i}" for i in range(1, folders)]
    try:
        with start_dovecot(users={"demo": "demo-password"}) as server:
            print(f"Dovecot {server.host}:{server.imaps_port} (implicit TLS, a test CA) started")
            started = time.monotonic()
            seed_folders(server, dict.fromkeys(names, messages))
            print(
                f"seeded {folders} folders x {messages} messages "
                f"in {time.monotonic() - started:.2f} s"
            )
            trio.run(_show, server.pool_kwargs(), names, max_size)
    except DovecotNotFoundError as exc:
        print(f"trio-imappool demo: {exc}", file=sys.stderr)
        return 2
    return 0


async def _show(settings: dict[str, Any], names: list[str], max_size: int) -> None:
    async with open_pool(**settings, max_size=max_size) as pool:
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(_fetch_folder, pool, name)
        elapsed = trio.current_time() - started
        stats = pool.statistics()
        print(
            f"fetched {len(names)} folders from {len(names)} tasks over "
            f"{stats.connections_opened} connections in {elapsed:.2f} s"
        )

        # A deadline that fires while a command blocks in its worker thread: the command is
        # interrupted at once, and the connection is discarded, not returned.
        started = trio.current_time()
        with trio.move_on_after(0.2):
            async with pool.connection() as conn:
                interrupted = conn.number
                await conn.select_folder("INBOX")
                await conn.idle()
                await conn.idle_check(timeout=30)
        print(
            f"a 0.2 s deadline on a blocked IDLE wait returned after "
            f"{trio.current_time() - started:.2f} s; connection #{interrupted} was discarded "
            f"(pool size now {pool.statistics().size})"
        )
        # Everyone at once again: the pool opens a replacement to get back to max_size.
        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(_fetch_folder, pool, name, False)
        print(f"fetched all again; pool size back to {pool.statistics().size}")
        _print_statistics(pool)


async def _fetch_folder(pool: Pool, name: str, report: bool = True) -> None:
    async with pool.connection() as conn:
        await conn.select_folder(name, readonly=True)
        uids = await conn.search(["ALL"])
        data = await conn.fetch(uids, ["RFC822.SIZE"])
        size = sum(item[b"RFC822.SIZE"] for item in data.values())
        if report:
            print(
                f"  {name:<10} {len(uids):5} messages {size:9,} bytes  on connection #{conn.number}"
            )


def _print_statistics(pool: Pool) -> None:
    stats = pool.statistics()
    print("pool statistics:")
    for field in type(stats).__dataclass_fields__:
        print(f"  {field:<22} {getattr(stats, field)}")


if __name__ == "__main__":
    sys.exit(main())
