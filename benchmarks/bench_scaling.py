"""How the export's cost grows: time, msg/s, MB/s and peak RSS by mailbox size and latency.

Run it with ``.venv/bin/python benchmarks/bench_scaling.py`` (it needs Debian's
``dovecot-imapd``). It starts a private Dovecot on 127.0.0.1 and seeds one user per mailbox:
``--counts`` (2,000, 20,000 and 100,000) messages of 2 KB in 10 folders, and 200 messages of
1 MB in 2 folders (``--no-large`` leaves that one out). Each mailbox is then exported once
per ``--latencies`` (0 and 25 ms each way, that is a 50 ms round trip; 0 goes straight to
Dovecot, the others through the latency proxy in a process of its own) with
:func:`trio_imappool.exporter.export_maildir` (its defaults, ``--connections`` (8)) into a fresh
Maildir under ``/dev/shm``, each export in a child process of its own, so that its peak RSS
(``VmHWM`` in ``/proc/self/status``: ``ru_maxrss`` would not do, since Linux carries the
parent's peak, this process's with its seeded messages, over the child's ``execve``) is its
own. Implicit TLS unless ``--plain``.

Each cell is one run (a 100,000-message mailbox takes long enough to seed and to export
that medians would take many minutes on a small machine); on a shared machine compare rows
of one run only (``--rounds`` N: the median of N). The last lines judge the targets: time
linear in the message count (each further message costs the same: the time from one mailbox
size to the next, per message added, within 15 % of that from 2,000 to 20,000; the time per
message including the fixed costs of connecting and listing is printed too) and RSS flat (the
100,000-message export's peak within 15 % of the 2,000-message one's).

Memory bounded in bytes: ``--large`` sets the large mailboxes (``200x1000000``, or
``40x25000000`` for the 40 x 25 MB case whose peak RSS must stay under ``--rss-target`` MB,
200); ``--memory-budget`` is the export's budget in bytes (its default, 64 MiB, unless
given; 0 for none). ``--baseline DIR`` also exports every mailbox with the package found in
*DIR* (a worktree of another commit, say the one before a change), in the same run, and
prints the time and RSS ratios of this tree's export to that one's::

    git worktree add --detach /tmp/base <commit>
    .venv/bin/python benchmarks/bench_scaling.py --counts 20000 --latencies 0 \
        --large 40x25000000 --baseline /tmp/base
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
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
            if args.memory_budget is None:
                return await export_maildir(pool, args.dest)
            budget = args.memory_budget or None  # 0: none
            return await export_maildir(pool, args.dest, memory_budget=budget)

    started = time.perf_counter()
    result = trio.run(main)
    elapsed = time.perf_counter() - started
    rss = peak_rss_kib()
    print(json.dumps({"seconds": elapsed, "rss_kib": rss, "messages": result.messages_fetched}))
    return 0


def peak_rss_kib() -> int:
    """This process's peak RSS in KiB: VmHWM (Linux), which an ``execve`` starts afresh, unlike
    ``ru_maxrss`` (it keeps the peak of the process that forked, here the seeding parent's)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def run_case(
    host: str,
    port: int,
    user: str,
    ca_file: str | None,
    dest: Path,
    connections: int,
    memory_budget: int | None = None,
    package: str | None = None,
) -> dict[str, float]:
    """One export in a child process; *package*: the directory to import trio_imappool from
    (another commit's worktree) instead of this one."""
    command = [sys.executable, __file__, "--child", "--host", host, "--port", str(port)]
    command += ["--user", user, "--dest", str(dest), "--connections", str(connections)]
    if ca_file:
        command += ["--ca-file", ca_file]
    if memory_budget is not None:
        command += ["--memory-budget", str(memory_budget)]
    env = dict(os.environ)
    if package:
        env["PYTHONPATH"] = package  # ahead of the editable install's finder
    output = subprocess.run(
        command, check=True, capture_output=True, text=True, timeout=1800, env=env
    )
    value: dict[str, float] = json.loads(output.stdout.strip().splitlines()[-1])
    return value


def median_case(rounds: int, *args: object) -> dict[str, float]:
    """The median time of *rounds* exports (a fresh Maildir each), the largest peak RSS."""
    costs = []
    for _ in range(rounds):
        costs.append(run_case(*args))  # type: ignore[arg-type]
        shutil.rmtree(args[4])  # type: ignore[arg-type]
    costs.sort(key=lambda cost: cost["seconds"])
    middle = dict(costs[len(costs) // 2])
    middle["rss_kib"] = max(cost["rss_kib"] for cost in costs)
    return middle


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="2000,20000,100000", help="2 KB mailboxes")
    parser.add_argument("--no-large", action="store_true", help="leave out the large mailboxes")
    parser.add_argument(
        "--large", default="200x1000000", help="large mailboxes: COUNTxBYTES[,COUNTxBYTES]"
    )
    parser.add_argument(
        "--memory-budget", type=int, help="export_maildir(memory_budget=...); 0 for none"
    )
    parser.add_argument("--rss-target", type=float, default=200.0, help="MB, large messages")
    parser.add_argument("--baseline", help="a worktree of another commit, exported too")
    parser.add_argument("--rounds", type=int, default=1, help="runs per cell (median)")
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
        for spec in args.large.split(","):
            count, _, size = spec.partition("x")
            mailboxes.append((f"large{count}x{size}", int(count), int(size), 2))
    tls = not args.plain
    root = Path(tempfile.mkdtemp(prefix="bench-scaling-", dir="/dev/shm"))
    rows: list[tuple[str, float, dict[str, float], int, int]] = []
    base_rows: dict[tuple[str, float], dict[str, float]] = {}
    if args.baseline:
        print(f"baseline: trio_imappool from {args.baseline}", flush=True)
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
                    batch_size=max(1, min(500, 50_000_000 // size)),
                )
                print(
                    f"seeded {count} x {size} B for {user} in "
                    f"{time.perf_counter() - started:.1f} s",
                    flush=True,
                )
            port = server.imaps_port if tls else server.imap_port
            for latency in latencies:
                for user, count, size, _ in mailboxes:
                    # This tree and the baseline's in turn, so that both see the same load.
                    for package in [None, args.baseline] if args.baseline else [None]:
                        dest = root / f"{user}-{latency:g}"
                        budget = None if package else args.memory_budget
                        if latency:
                            with proxy_process(server.host, port, latency / 1000) as proxy_port:
                                cost = median_case(
                                    args.rounds, server.host, proxy_port, user, ca_file, dest,
                                    args.connections, budget, package,
                                )  # fmt: skip
                        else:
                            cost = median_case(
                                args.rounds, server.host, port, user, ca_file, dest,
                                args.connections,
                                budget, package,
                            )  # fmt: skip
                        label = "baseline" if package else "this tree"
                        print(f"  {user} at {2 * latency:g} ms, {label}: {cost}", flush=True)
                        if package:
                            base_rows[(user, latency)] = cost
                        else:
                            rows.append((user, latency, cost, count, size))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    mode = "implicit TLS" if tls else "plain IMAP"
    print()
    print(
        f"export_maildir, {args.connections} connections, {mode}, Dovecot on 127.0.0.1, "
        f"one run per cell, Maildir on tmpfs"
    )
    print()
    budget = args.memory_budget
    shown = "its default" if budget is None else ("none" if budget == 0 else f"{budget:,} B")
    print(f"memory budget: {shown}")
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
    for user, latency, cost, count, size in rows:
        base = base_rows.get((user, latency))
        if base is not None:
            time_ratio = cost["seconds"] / base["seconds"]
            rss_ratio = cost["rss_kib"] / base["rss_kib"]
            print(
                f"{count:,} x {size:,} B at {2 * latency:g} ms vs the baseline: time "
                f"{time_ratio:.2f}x ({cost['seconds']:.2f} s vs {base['seconds']:.2f} s), "
                f"peak RSS {rss_ratio:.2f}x ({cost['rss_kib'] / 1024:.0f} MB vs "
                f"{base['rss_kib'] / 1024:.0f} MB)"
            )
        if size >= 10_000_000:
            rss = cost["rss_kib"] / 1024
            print(
                f"{count:,} x {size / 1e6:g} MB at {2 * latency:g} ms: peak RSS {rss:.0f} MB, "
                f"target at most {args.rss_target:g} MB: "
                f"{'met' if rss <= args.rss_target else 'NOT met'}"
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
                f"{ratio:.2f}x (fixed costs included)"
            )
        # Linear: each further message costs the same, whatever the mailbox's size. The cost of
        # a message from one size to the next, against that from the smallest to the next.
        slopes = [
            ((c2["seconds"] - c1["seconds"]) / (n2 - n1), n1, n2)
            for (n1, c1), (n2, c2) in itertools.pairwise(small)
        ]
        first = slopes[0][0]
        for slope, n1, n2 in slopes:
            ratio = slope / first if first > 0 else float("inf")
            print(
                f"{2 * latency:g} ms: cost of a further message from {n1:,} to {n2:,}: "
                f"{slope * 1e6:.1f} us, {ratio:.2f}x that from {slopes[0][1]:,} to "
                f"{slopes[0][2]:,}; target within 15 %: "
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
