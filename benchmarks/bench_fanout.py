"""Fetching a whole mailbox over a slow link: one connection against fan-out over eight.

Run it with ``.venv/bin/python benchmarks/bench_fanout.py`` (it needs Debian's
``dovecot-imapd``). It starts a private Dovecot on 127.0.0.1 through
:func:`trio_imappool.testing.start_dovecot`, seeds ``--folders`` folders (10) of
``--per-folder`` messages (200) of ``--size`` bytes (2,000) straight to its plain port, and then
makes every client go through :func:`trio_imappool.testing.start_proxy_thread`, the test fault
proxy (run in a process of its own, so that its forwarding competes with no client for the GIL),
delaying each direction by ``--latency`` (25 ms): a 50 ms round trip, a server in another
country. Plain IMAP by default (the numbers then measure round trips, not encryption);
``--tls`` goes to the implicit-TLS port instead, trusting the harness's test CA. Everything
listens on loopback only. The default run takes about 25 s.

Every variant fetches ``BODY.PEEK[]`` of all the messages, given the UIDs of each folder (as
seeding returned them; no variant searches), starting from nothing: the timing includes opening
and logging in its connections, and stops when the last message has arrived (the LOGOUT
afterwards is not timed). Each checks that it got every message and every byte.

``naive``
    One :class:`imapclient.IMAPClient`, SELECT each folder, one ``UID FETCH`` per message: what
    a first script does. At 50 ms a message that is 100 s for 2,000, so it is measured on the
    first ``--naive-limit`` messages (200) and extrapolated: connection set-up plus the
    measured time per message times the whole count. The extrapolation is labelled as such.
``per-folder``
    One IMAPClient, SELECT each folder, one ``UID FETCH`` of the whole folder.
``threads``
    :class:`concurrent.futures.ThreadPoolExecutor` with ``--connections`` (8) workers, each
    with an IMAPClient of its own opened on its first task. The work is split exactly as the
    fan-out splits it (batches of ``--batch-size`` UIDs of one folder, one FETCH each),
    submitted folder by folder; a worker SELECTs only when its next batch is of another folder
    than its connection has selected. With the default batch size (200, a folder a batch) that
    is ten tasks for eight workers, the split a careful hand would choose.
``fan-out``
    :func:`trio_imappool._fanout.fetch_many` with ``max_connections`` 8 on a pool opened for
    the purpose (``max_size`` 8), iterating the results.
``fan-out warm``
    The same on a pool whose eight connections were opened before the clock started. Not a
    contender (it skips the set-up that the others pay); it is printed to show what the set-up
    costs the fan-out.

How it measures. The naive variant runs once. The others run ``--rounds`` times (3),
interleaved (round 1 of each, then round 2 ...), and the median is reported, with the spread.

Targets: the fan-out at least 4 times as fast as the best single-connection variant
(``naive`` extrapolated or ``per-folder``, whichever is faster), and no slower than
``threads``. With ``--check`` the script exits with status 1 when a target is missed.

How to read it. A round trip costs 2 x ``--latency``, and a variant's time is about its
connection set-up plus the round trips on its longest chain of commands, plus the time to move
and parse the data. Plain imapclient sends one command at a time and asks for CAPABILITY after
the greeting: ``per-folder`` is one set-up plus 2 round trips a folder (SELECT, FETCH), and with
eight connections for ten folders some connection does two SELECT + FETCH pairs, which bounds
what ``threads`` (or any client built that way) can reach. The fan-out does less: the pool's
set-up takes the capabilities from the greeting, the other connections connect while the first
logs in, and each task pipelines two batches with their EXAMINEs (one round trip for EXAMINE A,
FETCH A, EXAMINE B, FETCH B). The last lines print the round trip, the measured set-up, that
bound, and the data's own time (``per-folder`` once more, straight to Dovecot), so that a
missed target can be explained rather than guessed at. On a machine with few cores, other load
shows up as noise in every variant alike.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import platform
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import imapclient
import trio
from _proxy_process import proxy_process
from imapclient import IMAPClient, SocketTimeout

import trio_imappool
from trio_imappool._fanout import fetch_many
from trio_imappool.testing import seed_folders, start_dovecot

SPEEDUP_TARGET = 4.0
CRITERIA_TARGET = 1.25
FIELDS = ["BODY.PEEK[]"]
KEY = b"BODY[]"

Work = dict[str, list[int]]


@dataclass
class Run:
    """One timed run of a variant."""

    seconds: float
    messages: int
    nbytes: int
    setup: float = 0.0  # seconds to the first connection logged in, where measured


@dataclass
class Variant:
    name: str
    label: str
    runs: list[Run] = field(default_factory=list)
    #: For the naive variant: the whole job's time extrapolated from a partial run.
    extrapolated: float | None = None

    @property
    def seconds(self) -> float:
        if self.extrapolated is not None:
            return self.extrapolated
        return statistics.median(run.seconds for run in self.runs)


def connect(settings: dict[str, Any]) -> Any:
    """A logged-in IMAPClient set up as the pool sets up its own (TCP_NODELAY, timeouts)."""
    client = IMAPClient(
        settings["host"],
        settings["port"],
        ssl=settings["ssl"],
        ssl_context=settings["ssl_context"],
        timeout=SocketTimeout(connect=10.0, read=30.0),
    )
    client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.login(settings["username"], settings["password"])
    return client


def bodies(fetched: dict[int, dict[bytes, Any]]) -> tuple[int, int]:
    return len(fetched), sum(len(data[KEY]) for data in fetched.values())


def run_naive(settings: dict[str, Any], work: Work, limit: int) -> Run:
    started = time.perf_counter()
    client = connect(settings)
    setup = time.perf_counter() - started
    messages = nbytes = 0
    for folder, uids in work.items():
        if messages >= limit:
            break
        client.select_folder(folder, readonly=True)
        for uid in uids[: limit - messages]:
            count, size = bodies(client.fetch([uid], FIELDS))
            messages += count
            nbytes += size
    elapsed = time.perf_counter() - started
    client.logout()
    return Run(elapsed, messages, nbytes, setup)


def run_per_folder(settings: dict[str, Any], work: Work) -> Run:
    started = time.perf_counter()
    client = connect(settings)
    setup = time.perf_counter() - started
    messages = nbytes = 0
    for folder, uids in work.items():
        client.select_folder(folder, readonly=True)
        count, size = bodies(client.fetch(uids, FIELDS))
        messages += count
        nbytes += size
    elapsed = time.perf_counter() - started
    client.logout()
    return Run(elapsed, messages, nbytes, setup)


def batches(work: Work, batch_size: int) -> list[tuple[str, list[int]]]:
    """The fan-out's split: batches of one folder, folder by folder."""
    return [
        (folder, uids[i : i + batch_size])
        for folder, uids in work.items()
        for i in range(0, len(uids), batch_size)
    ]


def run_threads(settings: dict[str, Any], work: Work, connections: int, batch_size: int) -> Run:
    local = threading.local()
    clients: list[Any] = []
    lock = threading.Lock()

    def fetch_batch(folder: str, uids: list[int]) -> tuple[int, int]:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = connect(settings)
            local.folder = None
            with lock:
                clients.append(client)
        if local.folder != folder:
            client.select_folder(folder, readonly=True)
            local.folder = folder
        return bodies(client.fetch(uids, FIELDS))

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=connections) as executor:
        futures = [executor.submit(fetch_batch, f, uids) for f, uids in batches(work, batch_size)]
        done = [future.result() for future in futures]
        elapsed = time.perf_counter() - started
        for client in clients:
            executor.submit(client.logout)
    return Run(elapsed, sum(n for n, _ in done), sum(b for _, b in done))


async def run_fanout(
    settings: dict[str, Any],
    work: Work | dict[str, Any],
    connections: int,
    batch_size: int,
    warm: bool,
) -> Run:
    started = time.perf_counter()
    async with trio_imappool.open_pool(
        **settings, max_size=connections, min_size=connections if warm else 0
    ) as pool:
        if warm:
            with trio.fail_after(30):
                await pool.counts.wait_value(lambda c: c.idle == connections)
            started = time.perf_counter()
        messages = nbytes = 0
        async with fetch_many(
            pool, work, FIELDS, batch_size=batch_size, max_connections=connections
        ) as results:
            async for _, _, data in results:
                messages += 1
                nbytes += len(data[KEY])
        elapsed = time.perf_counter() - started
    return Run(elapsed, messages, nbytes)


def check(variant: Variant, run: Run, messages: int, nbytes: int) -> None:
    if (run.messages, run.nbytes) != (messages, nbytes):
        raise SystemExit(
            f"{variant.name}: got {run.messages} messages / {run.nbytes} bytes, "
            f"expected {messages} / {nbytes}"
        )


def measure(
    args: argparse.Namespace, settings: dict[str, Any], work: Work, direct: dict[str, Any]
) -> tuple[list[Variant], float]:
    """Run the variants; also return the time to move the data itself, with no latency."""
    total = sum(len(uids) for uids in work.values())
    total_bytes = total * args.size
    limit = min(args.naive_limit, total)
    n, bs = args.connections, args.batch_size
    naive = Variant("naive", "one FETCH per message, 1 connection")
    per_folder = Variant("per-folder", "one FETCH per folder, 1 connection")
    threads = Variant("threads", f"ThreadPoolExecutor, {n} connections")
    fanout = Variant("fan-out", f"fetch_many, {n} connections")
    warm = Variant("fan-out warm", "fetch_many, pool already open (set-up not timed)")
    every = {folder: "ALL" for folder in work}
    searched = {folder: ["NOT", "DELETED"] for folder in work}
    warm_all = Variant("warm ALL", 'the same, each folder given as "ALL"')
    warm_search = Variant("warm criteria", 'the same, each folder as ["NOT", "DELETED"]')

    run = run_naive(settings, work, limit)
    check(naive, run, limit, limit * args.size)
    naive.runs.append(run)
    naive.extrapolated = run.setup + (run.seconds - run.setup) / limit * total

    contenders: list[tuple[Variant, Callable[[], Run]]] = [
        (per_folder, lambda: run_per_folder(settings, work)),
        (threads, lambda: run_threads(settings, work, n, bs)),
        (fanout, lambda: trio.run(run_fanout, settings, work, n, bs, False)),
        (warm, lambda: trio.run(run_fanout, settings, work, n, bs, True)),
        (warm_all, lambda: trio.run(run_fanout, settings, every, n, bs, True)),
        (warm_search, lambda: trio.run(run_fanout, settings, searched, n, bs, True)),
    ]
    for _ in range(args.rounds):
        for variant, fn in contenders:
            run = fn()
            check(variant, run, total, total_bytes)
            variant.runs.append(run)
    data = statistics.median(
        run.seconds - run.setup for run in (run_per_folder(direct, work) for _ in range(3))
    )
    return [naive, per_folder, threads, fanout, warm, warm_all, warm_search], data


def report(
    args: argparse.Namespace, variants: list[Variant], data: float, header: str
) -> tuple[str, bool]:
    naive, per_folder, threads, fanout, warm, warm_all, warm_search = variants
    total = args.folders * args.per_folder
    best_single = min(naive, per_folder, key=lambda v: v.seconds)
    lines = [header, ""]
    lines.append(
        f"{'variant':<13} {'what':<49} {'seconds':>8} {'spread':>13} {'msg/s':>7} "
        f"{'vs ' + best_single.name:>14}"
    )
    for v in variants:
        speedup = best_single.seconds / v.seconds
        if v.extrapolated is not None:
            spread = "extrapolated"
        else:
            times = [run.seconds for run in v.runs]
            spread = f"{min(times):.2f}..{max(times):.2f}"
        lines.append(
            f"{v.name:<13} {v.label:<49} {v.seconds:8.2f} {spread:>13} "
            f"{total / v.seconds:7.0f} {speedup:13.{2 if speedup < 0.1 else 1}f}x"
        )
    partial = naive.runs[0]
    lines.append(
        f"  (naive measured: {partial.seconds:.2f} s for its first {partial.messages} messages, "
        f"{partial.messages / partial.seconds:.1f} msg/s; 2,000-message time extrapolated "
        f"as set-up + per-message time x {total})"
    )
    lines.append("")
    speedup = best_single.seconds / fanout.seconds
    vs_threads = fanout.seconds / threads.seconds
    target_speed = speedup >= SPEEDUP_TARGET
    target_threads = fanout.seconds <= threads.seconds
    lines.append(
        f"fan-out vs best single connection ({best_single.name}): {speedup:.1f}x, "
        f"target >= {SPEEDUP_TARGET:.0f}x: {'met' if target_speed else 'NOT met'}"
    )
    lines.append(
        f"fan-out vs thread executor: {vs_threads:.2f} of its time, target <= 1.00: "
        f"{'met' if target_threads else 'NOT met'}"
    )
    vs_uids = warm_all.seconds / warm.seconds
    target_all = vs_uids <= CRITERIA_TARGET
    lines.append(
        f'"ALL" vs UID lists (both warm): {vs_uids:.2f}x the time, target <= '
        f"{CRITERIA_TARGET:.2f}x: {'met' if target_all else 'NOT met'}"
    )
    vs_uids = warm_search.seconds / warm.seconds
    lines.append(
        f"other criteria (search and first batch in one round trip) vs UID lists: {vs_uids:.2f}x "
        f"the time, target <= {CRITERIA_TARGET:.2f}x: "
        f"{'met' if vs_uids <= CRITERIA_TARGET else 'NOT met'}"
    )
    rtt = 2 * args.latency
    setup = statistics.median(run.setup for run in per_folder.runs)
    per_conn = -(-args.folders // args.connections)  # folders on the busiest connection
    single = setup + args.folders * 2 * rtt
    best = setup + per_conn * 2 * rtt
    lines.append("")
    lines.append(
        f"round trip {rtt * 1000:.0f} ms; plain imapclient's set-up (connect, greeting, "
        f"CAPABILITY, LOGIN) {setup * 1000:.0f} ms = {setup / rtt:.1f} round trips"
    )
    lines.append(
        f"one command at a time: per-folder = set-up + {args.folders} x (SELECT + FETCH) = "
        f"{single:.2f} s; {args.connections} connections = set-up + {per_conn} x (SELECT + "
        f"FETCH) on the busiest = {best:.2f} s: at most {single / best:.1f}x faster, before "
        f"the data is counted"
    )
    lines.append(
        "fetch_many: no CAPABILITY round trip, the other connections connecting while the "
        "first logs in, and EXAMINE + FETCH of two batches pipelined in one round trip"
    )
    lines.append(
        f"the data itself (transfer and imapclient parsing, one GIL for all threads): "
        f"{data * 1000:.0f} ms on one connection without latency, paid by every variant and "
        f"overlapping round trips only in part"
    )
    return "\n".join(lines), target_speed and target_threads and target_all


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Fetch a seeded mailbox over a 50 ms link: one connection vs fan-out.",
    )
    parser.add_argument("--folders", type=int, default=10, help="folders (default 10)")
    parser.add_argument(
        "--per-folder", type=int, default=200, help="messages per folder (default 200)"
    )
    parser.add_argument("--size", type=int, default=2000, help="message size (default 2000)")
    parser.add_argument(
        "--latency", type=float, default=0.025, help="delay each way, s (default 0.025)"
    )
    parser.add_argument(
        "--naive-limit", type=int, default=200, help="messages the naive loop fetches (200)"
    )
    parser.add_argument("--connections", type=int, default=8, help="connections (default 8)")
    parser.add_argument(
        "--batch-size", type=int, default=200, help="UIDs per FETCH, fan-out and threads (200)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--tls", action="store_true", help="implicit TLS instead of plain IMAP")
    parser.add_argument(
        "--check", action="store_true", help="exit with status 1 when a target is missed"
    )
    args = parser.parse_args(argv)
    for name in ("folders", "per_folder", "naive_limit", "connections", "batch_size", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.size < 600 or args.latency < 0:
        parser.error("--size must be at least 600 and --latency not negative")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    folders = {f"Folder{i:02d}": args.per_folder for i in range(args.folders)}
    with start_dovecot(
        users={"bench": "bench-pw"}, max_userip_connections=4 * args.connections + 10
    ) as server:
        work = seed_folders(server, folders, size=args.size)
        target = server.imaps_port if args.tls else server.imap_port
        direct = server.pool_kwargs(tls=args.tls)
        with proxy_process(server.host, target, args.latency) as proxy_port:
            settings = dict(direct, port=proxy_port)
            variants, data = measure(args, settings, work, direct)
    header = (
        f"trio-imappool {trio_imappool.__version__} on Python {platform.python_version()}, "
        f"trio {trio.__version__}, imapclient {imapclient.__version__}; Dovecot on "
        f"127.0.0.1 ({'implicit TLS' if args.tls else 'plain IMAP'}) through the fault proxy, "
        f"{args.latency * 1000:.0f} ms each way\n"
        f"{args.folders} folders x {args.per_folder} messages x {args.size} bytes; "
        f"batch size {args.batch_size}; median of {args.rounds} interleaved rounds; "
        f"{time.perf_counter() - started:.1f} s in all"
    )
    text, met = report(args, variants, data, header)
    print(text)
    return 1 if args.check and not met else 0


if __name__ == "__main__":
    sys.exit(main())
