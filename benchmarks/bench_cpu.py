"""CPU per message at zero added latency: the exporter against a plain imapclient script.

Run it with ``.venv/bin/python benchmarks/bench_cpu.py`` (it needs Debian's ``dovecot-imapd``;
mbsync from Debian's ``isync`` is timed too where it is installed). It seeds ``--messages``
(20,000) messages of ``--size`` (2,000) bytes in ``--folders`` (10) folders on a private
Dovecot and exports them straight to it (no proxy: a same-host or LAN server, where the cost is
CPU, not round trips), TLS unless ``--plain``, into fresh Maildirs under ``/dev/shm``:

``imapclient script``
    One imapclient connection, per folder EXAMINE, ``SEARCH ALL``, one ``UID FETCH`` of
    everything (``BODY.PEEK[] FLAGS``), a file per message with ``open().write()``.
``export``
    :func:`trio_imappool.exporter.export_maildir` in this process, ``--connections`` (4),
    ``fsync=False`` (like the script).
``mbsync``
    ``mbsync -a``, ``Sync Pull`` (if installed).

The cases take turns for ``--rounds`` (3) rounds after one untimed warm-up; medians are
printed, and the targets as ratios measured in this run: the exporter at least 1.5x the
script and at least as fast as mbsync. ``--profile FILE`` instead runs the export once under
cProfile (every thread) and writes the top entries to FILE.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import os
import pstats
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import trio
from imapclient import IMAPClient, SocketTimeout

import trio_imappool
from trio_imappool.exporter import export_maildir
from trio_imappool.testing import DovecotServer, seed_folders, start_dovecot

USER = "bench"
PASSWORD = "bench-password"


def script(server: DovecotServer, tls: bool, dest: Path) -> None:
    context = server.ssl_context() if tls else None
    client = IMAPClient(
        server.host,
        server.imaps_port if tls else server.imap_port,
        ssl=tls,
        ssl_context=context,
        timeout=SocketTimeout(connect=10.0, read=60.0),
    )
    client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.login(USER, PASSWORD)
    for flags, _delimiter, name in client.list_folders():
        if any(flag.lower() in (b"\\noselect", b"\\nonexistent") for flag in flags):
            continue
        client.select_folder(name, readonly=True)
        uids = client.search("ALL")
        messages = client.fetch(uids, ["BODY.PEEK[]", "FLAGS"])
        cur = dest / name.replace("/", ".") / "cur"
        cur.mkdir(parents=True, exist_ok=True)
        for uid, data in messages.items():
            with open(cur / f"{uid}:2,", "wb") as file:
                file.write(data[b"BODY[]"])
    client.logout()


def export(server: DovecotServer, tls: bool, dest: Path, connections: int) -> None:
    async def main() -> None:
        async with trio_imappool.open_pool(
            **server.pool_kwargs(tls=tls), max_size=connections
        ) as pool:
            await export_maildir(pool, dest, fsync=False)

    trio.run(main)


def mbsync(server: DovecotServer, tls: bool, dest: Path, work: Path, peer: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    config = work / "mbsyncrc"
    port = server.imaps_port if tls else server.imap_port
    tls_lines = f"SSLType IMAPS\nCertificateFile {peer}\n" if tls else "SSLType None\n"
    config.write_text(
        f"IMAPAccount a\nHost {server.host}\nPort {port}\nUser {USER}\nPass {PASSWORD}\n"
        "AuthMechs LOGIN\n"
        f"{tls_lines}\nIMAPStore remote\nAccount a\n\n"
        f"MaildirStore local\nPath {dest}/\nInbox {dest}/INBOX\nSubFolders Verbatim\n\n"
        f"Channel c\nFar :remote:\nNear :local:\nPatterns *\nCreate Near\nSync Pull\n"
        "SyncState *\n"
    )
    subprocess.run(["mbsync", "-q", "-c", str(config), "-a"], check=True, timeout=600, cwd=work)


def count(root: Path) -> int:
    return sum(
        len(files) for path, _, files in os.walk(root) if os.path.basename(path) in ("cur", "new")
    )


def profile_export(server: DovecotServer, tls: bool, dest: Path, n: int, out: Path) -> None:
    """Export once under py-spy (every thread, sampled; cProfile where py-spy is missing) and
    write the functions with the most samples: on their own (self) and with what they call."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not os.path.exists(spy):
        prof = cProfile.Profile()
        prof.enable()
        export(server, tls, dest, n)
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
        out.write_text(text.getvalue())
        return
    raw = out.with_suffix(".raw")
    command = [spy, "record", "-r", "250", "--nonblocking", "--format", "raw"]
    command += ["-o", str(raw), "--pid", str(os.getpid())]
    recorder = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.5)
    started = time.perf_counter()
    export(server, tls, dest, n)
    elapsed = time.perf_counter() - started
    recorder.send_signal(signal.SIGINT)
    recorder.wait(timeout=30)
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if "export (" not in stack and "_in_thread" not in stack and "worker" not in stack:
            continue  # py-spy's own start-up, the idle main thread before the export
        samples = int(count_text)
        frames = [
            frame.split(" (")[0] + " " + frame.rsplit("/", 1)[-1] for frame in stack.split(";")
        ]
        total += samples
        own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
    lines = [f"export under py-spy: {elapsed:.2f} s, {count(dest)} files, {total} samples"]
    lines.append("self (function itself), % of samples:")
    lines += [f"  {100 * c / total:5.1f}  {name}" for name, c in own.most_common(25)]
    lines.append("inclusive (with callees), % of samples:")
    lines += [f"  {100 * c / total:5.1f}  {name}" for name, c in inclusive.most_common(45)]
    out.write_text("\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--folders", type=int, default=10)
    parser.add_argument("--size", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--plain", action="store_true", help="plain IMAP instead of TLS")
    parser.add_argument("--profile", type=Path, help="profile the export into this file")
    args = parser.parse_args(argv)
    tls = not args.plain
    per = args.messages // args.folders
    root = Path(
        tempfile.mkdtemp(prefix="bench-cpu-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    )
    try:
        with start_dovecot(users={USER: PASSWORD}, max_userip_connections=40) as server:
            t = time.perf_counter()
            seed_folders(server, {f"F{i:02d}": per for i in range(args.folders)}, size=args.size)
            seeded = time.perf_counter() - t
            total = per * args.folders
            print(f"seeded {total} x {args.size} B in {seeded:.1f} s; {'TLS' if tls else 'plain'}")
            if args.profile:
                export(server, tls, root / "warm", args.connections)
                profile_export(server, tls, root / "prof", args.connections, args.profile)
                print(args.profile.read_text()[:6000])
                return 0
            cases: dict[str, Callable[[Path], None]] = {
                "imapclient script": lambda d: script(server, tls, d),
                f"export, {args.connections} connections": lambda d: export(
                    server, tls, d, args.connections
                ),
            }
            if shutil.which("mbsync"):
                peer = root / "peer.pem"
                ca = root / "ca.pem"
                server.ca.cert_pem.write_to_path(str(ca))
                leaf = ssl.get_server_certificate((server.host, server.imaps_port))
                peer.write_text(leaf + ca.read_text())
                cases["mbsync"] = lambda d: mbsync(server, tls, d, d.parent / (d.name + "-w"), peer)
            times: dict[str, list[float]] = {name: [] for name in cases}
            for round_ in range(args.rounds + 1):
                for name, fn in cases.items():
                    dest = root / f"{round_}-{len(times[name])}-{name[:6].strip()}"
                    (dest.parent / (dest.name + "-w")).mkdir(parents=True, exist_ok=True)
                    os.sync()
                    t = time.perf_counter()
                    fn(dest)
                    elapsed = time.perf_counter() - t
                    got = count(dest)
                    if got != total:
                        raise SystemExit(f"{name}: {got} files, expected {total}")
                    if round_:
                        times[name].append(elapsed)
                    shutil.rmtree(dest)
            medians = {name: statistics.median(ts) for name, ts in times.items()}
            print(f"{'case':<26} {'median s':>9} {'min..max':>13} {'msg/s':>8} {'us/msg':>7}")
            for name, ts in times.items():
                m = medians[name]
                print(
                    f"{name:<26} {m:9.2f} {min(ts):6.2f}..{max(ts):<6.2f} {total / m:8.0f} "
                    f"{m / total * 1e6:7.0f}"
                )
            ours = medians[f"export, {args.connections} connections"]
            ratio = medians["imapclient script"] / ours
            print(
                f"export vs imapclient script: {ratio:.2f}x, target >= 1.50x: "
                f"{'met' if ratio >= 1.5 else 'NOT met'}"
            )
            if "mbsync" in medians:
                ratio = medians["mbsync"] / ours
                print(
                    f"export vs mbsync: {ratio:.2f}x, target >= 1.00x: "
                    f"{'met' if ratio >= 1.0 else 'NOT met'}"
                )
            else:
                print("mbsync: not installed, target not measured")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
