"""Following a mailbox that changed little or not at all: trio-imappool, mbsync, OfflineIMAP.

Run it with ``.venv/bin/python benchmarks/bench_sync.py`` (it needs Debian's ``dovecot-imapd``;
as root it installs the peers, ``isync`` and ``offlineimap3``, if they are missing, else it
skips them and says so).

The job: keep a local Maildir of an account up to date, run after run, when most runs find
little or nothing new. The account is seeded on a private Dovecot (CONDSTORE, QRESYNC and
LIST-STATUS, as Dovecot, Gmail (without QRESYNC) and Fastmail have) with ``--messages``
(20,000) messages of ``--size`` (1,000) bytes in ``--folders`` (50) folders. Each tool first
copies it into a Maildir of its own, directly on loopback (untimed: it is the first export's
job, measured by ``bench_export.py``). Then, through the latency proxy of
:mod:`trio_imappool.testing` (in a process of its own) adding ``--latency`` (25 ms) each way,
a 50 ms round trip, there are ``--rounds`` (3) rounds of two timed runs of every tool:

``no change``
    Nothing changed on the server since the tool's last run.
``1 % changed``
    Before the run, the flags of 1 % of the messages (``--changed``, spread evenly across the
    folders, different messages every round) were changed on the server (``\\Seen`` toggled,
    ``\\Flagged`` added); every tool then copies those flag changes.

The tools, each in a process of its own (interpreter start-up included), plain IMAP:

``trio-imappool``
    ``python -m trio_imappool export -c 8`` (its defaults: fsync on).
``mbsync``
    ``mbsync -a`` (Debian ``isync``), ``Sync Pull``, its state in the Maildir, default
    pipelining.
``OfflineIMAP``
    ``offlineimap -o`` (Debian ``offlineimap3``), ``maxconnections 8``, the remote read-only.

After every ``1 % changed`` run, each tool's Maildir is checked: the number of files with the
``F`` flag must equal the number of ``\\Flagged`` messages on the server (a tool that did not
copy the changes is marked INCOMPLETE); trio-imappool's files are compared message by message
too. The table shows medians, min and max, and each peer's time divided by trio-imappool's.
Targets: no change at least 10x faster than mbsync, 1 % changed at least 5x; printed as met or
NOT met (``--check``: exit status 1 if one is missed).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio
from _proxy_process import proxy_process
from bench_export import Link, count_messages, find_peers, mbsync, offlineimap, run_peer
from imapclient import IMAPClient

import trio_imappool
from trio_imappool.exporter import (
    export_maildir,
    maildir_flags,
    maildir_folder_path,
    parse_message_filename,
)
from trio_imappool.testing import DovecotServer, seed_folders, start_dovecot

USER = "bench"
PASSWORD = "bench-password"
TARGETS = {"no change": 10.0, "1 % changed": 5.0}
PHASES = ("no change", "1 % changed")


@dataclass
class Tool:
    """One tool: ``run(link)`` brings its Maildir up to date."""

    key: str
    label: str
    dest: Path
    run: Callable[[Link], None]
    times: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PHASES})
    incomplete: list[str] = field(default_factory=list)


def ours(dest: Path, connections: int, pycache: Path) -> Callable[[Link], None]:
    # Byte-code written (to a folder of its own) and used, as in any installation: an
    # environment that sets PYTHONDONTWRITEBYTECODE would make every run compile the package.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(TRIO_IMAPPOOL_PASSWORD=PASSWORD, PYTHONPYCACHEPREFIX=str(pycache))

    def run(link: Link) -> None:
        command = [sys.executable, "-m", "trio_imappool", "export", "--no-progress", "--plain"]
        command += ["--host", link.host, "--port", str(link.port), "--user", USER]
        command += ["-c", str(connections), str(dest)]
        run_peer(command, env=env)

    return run


def ours_in_process(dest: Path, connections: int) -> Callable[[Link], None]:
    def run(link: Link) -> None:
        async def main() -> None:
            async with trio_imappool.open_pool(
                link.host, link.port, username=USER, password=PASSWORD, ssl=False,
                max_size=connections,
            ) as pool:  # fmt: skip
                await export_maildir(pool, dest)

        trio.run(main)

    return run


def folder_names(count: int) -> list[str]:
    return ["INBOX"] + [f"Folder{i:02}" for i in range(1, count)]


def client(server: DovecotServer) -> IMAPClient:
    imap = IMAPClient(server.host, server.imap_port, ssl=False, timeout=60)
    imap.login(USER, PASSWORD)
    return imap


def change_flags(
    server: DovecotServer, folders: Sequence[str], per_folder: int, round_: int
) -> int:
    """Toggle ``\\Seen`` and add ``\\Flagged`` on *per_folder* messages of every folder."""
    imap = client(server)
    changed = 0
    try:
        for name in folders:
            imap.select_folder(name)
            uids = imap.search("ALL")
            start = (round_ * per_folder * 7) % max(1, len(uids) - per_folder)
            chosen = uids[start : start + per_folder]
            flags = imap.get_flags(chosen)
            seen = [uid for uid in chosen if b"\\Seen" in flags[uid]]
            unseen = [uid for uid in chosen if b"\\Seen" not in flags[uid]]
            if seen:
                imap.remove_flags(seen, [b"\\Seen"])
            if unseen:
                imap.add_flags(unseen, [b"\\Seen"])
            imap.add_flags(chosen, [b"\\Flagged"])
            changed += len(chosen)
    finally:
        imap.logout()
    return changed


def server_flags(server: DovecotServer, folders: Sequence[str]) -> dict[str, dict[int, str]]:
    imap = client(server)
    try:
        out = {}
        for name in folders:
            imap.select_folder(name, readonly=True)
            uids = imap.search("ALL")
            answer = imap.fetch(uids, ["FLAGS"])
            out[name] = {uid: maildir_flags(data[b"FLAGS"]) for uid, data in answer.items()}
        return out
    finally:
        imap.logout()


def flagged_files(root: Path) -> int:
    """Message files under every ``cur/`` and ``new/`` whose Maildir info has ``F``."""
    total = 0
    for directory, _dirs, files in os.walk(root):
        if os.path.basename(directory) in ("cur", "new"):
            total += sum("F" in name.partition(":2,")[2] for name in files)
    return total


def ours_match(dest: Path, flags: dict[str, dict[int, str]]) -> bool:
    for name, expected in flags.items():
        got = {}
        for sub in ("cur", "new"):
            for file in (maildir_folder_path(dest, name, "/") / sub).iterdir():
                key = parse_message_filename(file.name)
                if key is not None:
                    got[key[1]] = file.name.partition(":2,")[2]
        if got != expected:
            return False
    return True


def run_phase(tools: Sequence[Tool], link: Link, phase: str, reverse: bool) -> list[str]:
    errors = []
    for tool in reversed(tools) if reverse else tools:
        os.sync()
        started = time.perf_counter()
        try:
            tool.run(link)
        except Exception as exc:
            errors.append(f"{tool.key} ({phase}): {type(exc).__name__}: {exc}")
            continue
        tool.times[phase].append(time.perf_counter() - started)
        print(f"  {phase:<12} {tool.label:<44} {tool.times[phase][-1]:7.2f} s", flush=True)
    return errors


def report(tools: Sequence[Tool], header: str) -> tuple[str, bool]:
    lines = [header, ""]
    lines.append(
        f"| {'tool':<44} | {'case':<12} | {'median s':>8} | {'min':>6} | {'max':>6} "
        f"| {'vs trio-imappool':>16} |"
    )
    lines.append(f"|{'-' * 46}|{'-' * 14}|{'-' * 10}|{'-' * 8}|{'-' * 8}|{'-' * 18}|")
    by_key = {t.key: t for t in tools}
    mine = by_key["ours"]
    for phase in PHASES:
        for tool in tools:
            times = tool.times[phase]
            if not times:
                continue
            ratio = ""
            if mine.times[phase]:
                ratio = f"{statistics.median(times) / statistics.median(mine.times[phase]):.1f}x"
            mark = " INCOMPLETE" if any(phase in i for i in tool.incomplete) else ""
            lines.append(
                f"| {tool.label + mark:<44} | {phase:<12} | {statistics.median(times):8.2f} "
                f"| {min(times):6.2f} | {max(times):6.2f} | {ratio:>16} |"
            )
    lines.append("")
    met = True
    for phase, target in TARGETS.items():
        peer = by_key.get("mbsync")
        for key, what in (("ours", "CLI"), ("inside", "in-process")):
            found = by_key.get(key)
            if peer is None or found is None or not peer.times[phase] or not found.times[phase]:
                lines.append(f"{phase}: {what} vs mbsync not measured")
                continue
            speedup = statistics.median(peer.times[phase]) / statistics.median(found.times[phase])
            ok = speedup >= target and not found.incomplete
            if key == "ours":  # like for like: a process per run, start-up included
                met &= ok
            lines.append(
                f"{phase}: trio-imappool ({what}) {speedup:.1f}x faster than mbsync "
                f"(target >= {target:g}x): {'met' if ok else 'NOT met'}"
            )
    incomplete = [f"{t.label}: {', '.join(t.incomplete)}" for t in tools if t.incomplete]
    if incomplete:
        lines.append("INCOMPLETE (flag changes not copied): " + "; ".join(incomplete))
    return "\n".join(lines), met


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--folders", type=int, default=50)
    parser.add_argument("--size", type=int, default=1000, help="bytes per message")
    parser.add_argument("--changed", type=float, default=1.0, help="percent of messages changed")
    parser.add_argument("--latency", type=float, default=25.0, help="ms added each way")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--maildir-root", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    parser.add_argument("--no-peers", action="store_true", help="skip OfflineIMAP and mbsync")
    parser.add_argument("--no-offlineimap", action="store_true", help="skip OfflineIMAP only")
    parser.add_argument("--no-install", action="store_true", help="never run apt-get")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args(argv)

    peers, notes = (
        ({}, ["peers skipped: --no-peers"]) if args.no_peers else find_peers(not args.no_install)
    )
    if args.no_offlineimap:
        peers["offlineimap"] = False
        notes.append("OfflineIMAP skipped: --no-offlineimap")
    names = folder_names(args.folders)
    per = args.messages // args.folders
    per_changed = max(1, round(per * args.changed / 100))
    errors: list[str] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-sync-", dir=args.maildir_root) as tmp,
        start_dovecot(users={USER: PASSWORD}, max_userip_connections=200) as server,
    ):
        work = Path(tmp)
        started = time.perf_counter()
        seed_folders(server, dict.fromkeys(names, per), user=USER, size=args.size)
        total = per * len(names)
        took = time.perf_counter() - started
        print(f"seeded {total} messages in {len(names)} folders in {took:.1f} s")
        ca_file = work / "ca.pem"
        server.ca.cert_pem.write_to_path(str(ca_file))
        direct = Link(server.host, server.imap_port, False, ca_file)
        n = args.connections
        cli = ours(work / "ours", n, work / "pycache")
        tools = [Tool("ours", f"trio-imappool CLI, {n} connections", work / "ours", cli)]
        inside = ours_in_process(work / "inside", n)
        label = f"trio-imappool in-process, {n} connections"
        tools.append(Tool("inside", label, work / "inside", inside))
        if peers.get("mbsync"):
            (work / "mbsync-work").mkdir()

            def run_mbsync(link: Link) -> None:
                mbsync(link, work / "mbsync", work / "mbsync-work")

            tools.append(
                Tool("mbsync", "mbsync (1 connection, pipelined)", work / "mbsync", run_mbsync)
            )
        if peers.get("offlineimap"):
            (work / "offlineimap-work").mkdir()

            def run_offlineimap(link: Link) -> None:
                offlineimap(link, work / "offlineimap", work / "offlineimap-work", n)

            label = f"OfflineIMAP, maxconnections {n}"
            tools.append(Tool("offlineimap", label, work / "offlineimap", run_offlineimap))
        for tool in tools:  # the first export, on loopback, untimed
            started = time.perf_counter()
            tool.run(direct)
            got = count_messages(tool.dest)
            took = time.perf_counter() - started
            print(f"first export: {tool.label:<44} {took:7.2f} s, {got} files")
            if got != total:
                errors.append(f"{tool.key}: first export has {got} of {total} messages")
        with proxy_process(server.host, server.imap_port, args.latency / 1000) as proxy_port:
            link = Link(server.host, proxy_port, False, ca_file)
            for number in range(args.rounds):
                errors += run_phase(tools, link, "no change", reverse=number % 2 == 1)
                changed = change_flags(server, names, per_changed, number)
                errors += run_phase(tools, link, "1 % changed", reverse=number % 2 == 1)
                truth = server_flags(server, names)
                flagged = sum("F" in f for box in truth.values() for f in box.values())
                for tool in tools:
                    if flagged_files(tool.dest) != flagged:
                        tool.incomplete.append(f"1 % changed, round {number + 1}")
                for tool in tools[:2]:  # ours: every message's flags
                    if not ours_match(tool.dest, truth):
                        tool.incomplete.append(f"1 % changed, round {number + 1} (flags differ)")
                print(f"  round {number + 1}: {changed} messages changed", flush=True)
    header = (
        f"Following {total} messages of {args.size} bytes in {len(names)} folders on Dovecot, "
        f"plain IMAP through a proxy adding {args.latency:g} ms each way; {per_changed} messages "
        f"per folder changed ({per_changed * len(names)} in all); median of {args.rounds} rounds.\n"
        f"Maildirs under {args.maildir_root or tempfile.gettempdir()}; "
        f"Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs"
    )
    table, met = report(tools, header)
    print()
    print(table)
    for line in notes + errors:
        print(f"note: {line}")
    return 1 if args.check and (not met or errors) else 0


if __name__ == "__main__":
    sys.exit(main())
