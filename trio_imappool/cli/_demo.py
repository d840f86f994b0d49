"""The ``demo`` command: a private Dovecot, a seeded mailbox, an export, and what the pool did.

The only module of the command line that uses :mod:`trio_imappool.testing`, imported when the
demo starts its own server."""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

import trio

from trio_imappool import Pool, open_pool

from ._commands import _export
from ._output import _print_result, _print_statistics
from ._settings import DEFAULT_CONNECTIONS, PROG, Settings, UsageError

# -- demo ----------------------------------------------------------------------------------------


def _demo(args: argparse.Namespace, out: TextIO) -> int:
    if min(args.demo_folders, args.messages, _connections(args)) < 1:
        raise UsageError("--folders, --messages and --connections must be at least 1")
    settings = Settings(args, os.environ)
    with contextlib.ExitStack() as stack:
        if args.into:
            root = Path(os.path.expanduser(args.into))
        else:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="imappool-demo-")))
            root = root / "Maildir"
        if settings.has_server():
            options = settings.pool_options()
            print(f"exporting {options['username']} on {options['host']} into {root}", file=out)
            result, stats = trio.run(_export, options, root, settings, args.progress)
            _print_result(result, stats, root, True, out)
            return 0
        return _demo_with_dovecot(args, settings, root, stack, out)
    raise AssertionError  # pragma: no cover (for mypy: ExitStack might swallow exceptions)


def _connections(args: argparse.Namespace) -> int:
    return DEFAULT_CONNECTIONS if args.connections is None else int(args.connections)


def _demo_flags(folder: str, i: int) -> list[str]:
    flags = []
    if i % 3 == 0:
        flags.append(r"\Seen")
    if i % 7 == 0:
        flags.append(r"\Flagged")
    if i % 11 == 0:
        flags.append(r"\Answered")
    return flags


def _demo_with_dovecot(
    args: argparse.Namespace,
    settings: Settings,
    root: Path,
    stack: contextlib.ExitStack,
    out: TextIO,
) -> int:
    from trio_imappool.testing import (
        DovecotNotFoundError,
        seed_folders,
        start_dovecot,
        start_proxy_thread,
    )

    try:
        import trustme  # noqa: F401
    except ImportError:
        raise UsageError(
            "the demo needs the trustme package: pip install 'trio-imappool[demo]'"
        ) from None
    names = ["INBOX", "Archive/2024", "Archive/2025", "Sent", "Lists/trio", "Drafts"]
    names += [f"Folder{i}" for i in range(len(names), args.demo_folders)]
    names = names[: args.demo_folders]
    try:
        server = stack.enter_context(start_dovecot(users={"demo": "demo-password"}))
    except DovecotNotFoundError as exc:
        raise UsageError(str(exc)) from exc
    started = time.monotonic()
    seed_folders(server, dict.fromkeys(names, args.messages), flags=_demo_flags)
    print(
        f"Dovecot on {server.host}:{server.imaps_port} (implicit TLS, a test CA); "
        f"seeded {len(names)} folders x {args.messages} messages "
        f"in {time.monotonic() - started:.2f} s",
        file=out,
    )
    ca_file = server.base_dir / "ca.pem"
    server.ca.cert_pem.write_to_path(str(ca_file))
    port = server.imaps_port
    if args.latency > 0:
        proxy = stack.enter_context(
            start_proxy_thread(server.host, port, up=args.latency / 1000, down=args.latency / 1000)
        )
        port = proxy.port
        print(f"through a proxy adding {args.latency:g} ms each way", file=out)
    options = {
        "host": server.host,
        "port": port,
        "username": "demo",
        "password": "demo-password",
        "ssl": True,
        "ca_file": str(ca_file),
        "max_size": settings.get("connections"),
    }
    print(
        f"\n$ TRIO_IMAPPOOL_PASSWORD=demo-password {PROG} export --host {server.host} "
        f"--port {port} --user demo "
        f"--ca-file {ca_file} -c {options['max_size']} {root}",
        file=out,
    )
    result, stats = trio.run(_export, dict(options), root, settings, args.progress)
    _print_result(result, stats, root, True, out)
    _show_files(root, out)

    arriving = {names[0]: 3}
    arriving[names[-1]] = arriving.get(names[-1], 0) + 2
    seed_folders(server, arriving, flags=_demo_flags)
    count = sum(arriving.values())
    print(f"\n{count} new messages arrive; the same command again:", file=out)
    result, stats = trio.run(_export, dict(options), root, settings, args.progress)
    _print_result(result, stats, root, args.verbose, out)

    print("\nthe pool under a deadline:", file=out)
    trio.run(_show_deadline, dict(options), names, out)
    return 0


def _show_files(root: Path, out: TextIO) -> None:
    inbox = sorted((root / "cur").iterdir())
    subfolders = sorted(p.name for p in root.iterdir() if p.name.startswith("."))
    print(f"{root}: INBOX in cur/, subfolders {', '.join(subfolders)}", file=out)
    for path in inbox[:3]:
        print(f"  cur/{path.name}", file=out)


async def _show_deadline(options: dict[str, Any], names: list[str], out: TextIO) -> None:
    host, port = options.pop("host"), options.pop("port")
    async with open_pool(host, port, **options) as pool:
        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(_fetch_sizes, pool, name)
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
            f"(pool size now {pool.statistics().size})",
            file=out,
        )
        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(_fetch_sizes, pool, name)
        with trio.move_on_after(5):  # a replacement may still be opening: let it finish
            await pool.counts.wait_value(lambda counts: counts.opening == 0)
        print(
            f"{len(names)} tasks fetched every folder again; "
            f"pool size back to {pool.statistics().size}",
            file=out,
        )
        _print_statistics(pool.statistics(), out)


async def _fetch_sizes(pool: Pool, name: str) -> None:
    async with pool.connection(name, readonly=True) as conn:
        uids = await conn.search(["ALL"])
        await conn.fetch(uids, ["RFC822.SIZE"])
