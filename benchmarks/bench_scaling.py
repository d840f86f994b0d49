"""How the export's cost grows: time, msg/s, MB/s and peak RSS by mailbox size and latency.

Run it with ``.venv/bin/python benchmarks/bench_scaling.py`` (it needs Debian's
``dovecot-imapd``). It starts a private Dovecot on 127.0.0.1 and seeds one user per mailbox:
``--counts`` (2,000, 20,000 and 100,000) messages of 2 KB in 10 folders, and 200 messages of
1 MB in 2 folders (``--no-large`` leaves that one out). Each mailbox is then exported once
per ``--latencies`` (0 and 25 ms each way, that is a 50 ms round trip; 0 goes straight to
Dovecot, the others through the latency proxy in a process of its own) with
:func:`trio_imappool.exporter.export_maildir` (its defaults, ``--connections`` (8)) into a fresh
Maildir under ``/dev/shm``, each export in a child process of its own, so that its peak RSS
(``ru_maxrss``) is its own. Implicit TLS unless ``--plain``.

Each cell is one run (a 100,000-message mailbox takes long enough to seed and to export
that medians would take many minutes on a small machine); on a shared machine compare rows
of one run only. The last lines judge the targets: time linear in the message count (time
per message at each size within 15 % of the 2,000-message one) and RSS flat (the
100,000-message export's peak within 15 % of the 2,000-message one's).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

USER_PASSWORD = "bench-password"


def child(args: argparse.Namespace) -> int:
    """Export one mailbox and print what it cost, as JSON."""
    import trio

    import trio_imappool
    from trio_imappool.exporter import ExportResult, export_maildir

    async def main() -> ExportResult:
        async with trio_imappool.open_pool(
            args.host,
            args.port,
            username=args.user,
            password=USER_PASSWORD,
            ssl=args.ca_file is not None,
            ca_file=args.ca_file,
            max_size=args.connections,
            read_timeout=120,
        ) as pool:
            return await export_maildir(pool, args.dest)

    started = time.perf_counter()
    result = trio.run(main)
    elapsed = time.perf_counter() - started
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"seconds": elapsed, "rss_kib": rss, "messages": result.messages_fetched}))
    return 0


def run_case(
    host: str, port: int, user: str, ca_file: str | None, dest: Path, connections: int
) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", "--host", host, "--port", str(port)]
    command += ["--user", user, "--dest", str(dest), "--connections", str(connections)]
    if ca_file:
        command += ["--ca-file", ca_file]
    output = subprocess.run(command, check=True, capture_output=True, text=True, timeout=1800)
    value: dict[str, float] = json.loads(output.stdout.strip().splitlines()[-1])
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="2000,20000,100000", help="2 KB mailboxes")
    parser.add_argument("--no-large", action="store_true", help="leave out 200 x 1 MB")
    parser.add_argument("--latencies", default="0,25", help="ms added each way")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--plain", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--host", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--user", help=argparse.SUPPRESS)
    parser.add_argument("--dest", help=argparse.SUPPRESS)
    parser.add_argument("--ca-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)

    sys.path.insert(0, str(Path(__file__).parent))
    from _proxy_process import proxy_process

    from trio_imappool.testing import seed_folders, start_dovecot

    counts = [int(n) for n in args.counts.split(",") if n]
    latencies = [float(ms) for ms in args.latencies.split(",") if ms]
    mailboxes = [(f"m{n}", n, 2000, 10) for n in counts]
    if not args.no_large:
        mailboxes.append(("large", 200, 1_000_000, 2))
    tls = not args.plain
    root = Path(tempfile.mkdtemp(prefix="bench-scaling-", dir="/dev/shm"))
    rows: list[tuple[str, float, dict[str, float], int, int]] = []
    try:
        users = {user: USER_PASSWORD for user, *_ in mailboxes}
        with start_dovecot(users=users, max_userip_connections=4 * args.connections + 20) as server:
            ca_file = None
            if tls:
                ca_file = str(root / "ca.pem")
                server.ca.cert_pem.write_to_path(ca_file)
            for user, count, size, folders in mailboxes:
                started = time.perf_counter()
                per = count // folders
                seed_folders(
                    server,
                    {f"F{i:02d}": per for i in range(folders)},
                    user=user,
                    size=size,
                    batch_size=50 if size > 100_000 else 500,
                )
                print(
                    f"seeded {count} x {size} B for {user} in "
                    f"{time.perf_counter() - started:.1f} s",
                    flush=True,
                )
            port = server.imaps_port if tls else server.imap_port
            for latency in latencies:
                for user, count, size, _ in mailboxes:
                    dest = root / f"{user}-{latency:g}"
                    if latency:
                        with proxy_process(server.host, port, latency / 1000) as proxy_port:
                            cost = run_case(
                                server.host, proxy_port, user, ca_file, dest, args.connections
                            )
                    else:
                        cost = run_case(server.host, port, user, ca_file, dest, args.connections)
                    shutil.rmtree(dest)
                    rows.append((user, latency, cost, count, size))
                    print(f"  {user} at {2 * latency:g} ms: {cost}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    mode = "implicit TLS" if tls else "plain IMAP"
    print()
    print(
        f"export_maildir, {args.connections} connections, {mode}, Dovecot on 127.0.0.1, "
        f"one run per cell, Maildir on tmpfs"
    )
    print()
    print("| messages | size | RTT | seconds | msg/s | MB/s | peak RSS |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for _user, latency, cost, count, size in rows:
        seconds = cost["seconds"]
        print(
            f"| {count:,} | {size / 1000:g} KB | {2 * latency:g} ms | {seconds:.2f} | "
            f"{count / seconds:,.0f} | {count * size / seconds / 1e6:.1f} | "
            f"{cost['rss_kib'] / 1024:.0f} MB |"
        )
    print()
    for latency in latencies:
        small = [
            (count, cost) for u, lat, cost, count, size in rows if lat == latency and size == 2000
        ]
        if len(small) < 2:
            continue
        base_count, base = small[0]
        per_base = base["seconds"] / base_count
        for count, cost in small[1:]:
            ratio = (cost["seconds"] / count) / per_base
            print(
                f"{2 * latency:g} ms: time per message at {count:,} vs {base_count:,}: "
                f"{ratio:.2f}x, target within 15 %: "
                f"{'met' if abs(ratio - 1) <= 0.15 else 'NOT met'}"
            )
        last_count, last = small[-1]
        ratio = last["rss_kib"] / base["rss_kib"]
        print(
            f"{2 * latency:g} ms: peak RSS at {last_count:,} vs {base_count:,}: {ratio:.2f}x, "
            f"target within 15 %: {'met' if ratio <= 1.15 else 'NOT met'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
