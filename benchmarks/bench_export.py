"""Exporting a mailbox to a Maildir: trio-imappool against a plain script, OfflineIMAP and mbsync.

Run it with ``.venv/bin/python benchmarks/bench_export.py`` (it needs Debian's
``dovecot-imapd``; as root it installs the peers, ``offlineimap3`` and ``isync``, if they are
missing, else it skips them and says so).

The job is the one the exporter exists for: copy a whole account into a fresh local Maildir,
one file per message. The account is seeded on a private Dovecot with ``--messages`` (2,000)
messages of about ``--size`` (2 KB) bytes in ``--folders`` (10) folders, some with flags, and
every tool talks to it through the latency proxy of :mod:`trio_imappool.testing`
(``start_proxy_thread``, run in a process of its own so that it competes with nobody for the
GIL) adding ``--latency`` (25 ms) each way: a 50 ms round trip, a server across a country.
All tools use plain IMAP through the proxy by default (it is loopback; the comparison is
about round trips and connections, not ciphers); ``--tls`` makes every one of them use
implicit TLS with the test CA instead.

The cases, each into a fresh Maildir, timed from start to the last file written and the
logout:

``imapclient, 1 connection``
    The single-connection baseline: a plain imapclient script, LIST, then per folder
    EXAMINE, ``SEARCH ALL`` and one ``UID FETCH`` of every message (``BODY.PEEK[] FLAGS``),
    a file per message written with ``open().write()`` (no fsync: what a simple script does).
``trio-imappool, N connections``
    :func:`trio_imappool.exporter.export_maildir` on a pool of N connections, in this process, with
    its defaults (each message fsynced before it counts); the ``no fsync`` row is the same
    with ``fsync=False``, the same durability as the baseline.
``trio-imappool CLI, 8 connections``
    ``python -m trio_imappool export -c 8`` in a subprocess, interpreter start-up included,
    like the peers.
``OfflineIMAP, maxconnections 8``
    ``offlineimap -o`` (Debian ``offlineimap3``), a fresh metadata folder each run, the remote
    read-only; it fsyncs by default.
``mbsync``
    ``mbsync -a`` (Debian ``isync``), ``Sync Pull``, default pipelining; it fsyncs by default.

After each run the message files (under every ``cur/`` and ``new/``) are counted: a tool that
did not get every message is marked INCOMPLETE. Dovecot builds its index and cache files as a
mailbox is first read, which makes the first exports slower whoever makes them, so
``--warm-ups`` (2) untimed rounds of the in-process cases come first. Then there are
``--rounds`` rounds (default 3), the cases taking turns within each (in reverse order every
other round), each case started after an ``os.sync()`` so that none pays for the writeback of
another's files; the table shows the median, min and max seconds.

Where the Maildirs go. By default under ``/dev/shm`` (a tmpfs), ``--maildir-root`` elsewhere;
the header names the file system. The comparison is between IMAP clients, and on the machines
this was written on the disk is an ext4 without a journal, where creating a file scans past
every inode deleted in the last minute or more (``recently_deleted()`` in the kernel's inode
allocator): after any job that deleted many files (a test run, an earlier benchmark), each new
file costs up to a millisecond, and an export of 2,000 files takes twice as long as a minute
later. On a tmpfs nothing of that sort happens, and ``fsync`` costs nothing either, so the
fsynced rows there measure the exporter's extra work, not the disk. Run it once with
``--maildir-root /tmp`` to see the disk's share.

Targets, with 8 connections: at least 4x faster than the single-connection baseline (judged
like for like, both without fsync; the default, fsynced, ratio is shown too), faster than
OfflineIMAP, and at least as fast as mbsync. Each is printed as met or NOT met; with
``--check`` the script exits with status 1 if one is missed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio
from _proxy_process import proxy_process
from imapclient import IMAPClient, SocketTimeout

import trio_imappool
from trio_imappool.exporter import export_maildir
from trio_imappool.testing import DovecotServer, seed_folders, start_dovecot

USER = "bench"
PASSWORD = "bench-password"
FOLDERS = [
    "INBOX",
    "Sent",
    "Drafts",
    "Archive/2023",
    "Archive/2024",
    "Lists/trio",
    "Lists/python",
    "Projects/alpha",
    "Projects/beta",
    "Receipts",
]
SPEEDUP_TARGET = 4.0
CLI_VS_MBSYNC_TARGET = 5.0  # at a 50 ms round trip (issue 15); printed, not part of --check
PEER_TIMEOUT = 300.0


@dataclass
class Case:
    """One tool in one setting: ``run(destination)`` exports the mailbox into it."""

    key: str
    label: str
    run: Callable[[Path], None]
    times: list[float] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def complete(self) -> bool:
        return bool(self.counts) and all(c == self.counts[0] for c in self.counts)


@dataclass(frozen=True)
class Link:
    """How the tools reach the server: through the proxy, plain or TLS.

    With TLS: *ca_file* is the test CA; *peer_file* holds the server's own certificate too,
    for the peers that cannot check the test certificate, which names its host in
    subjectAltName only (OfflineIMAP and mbsync want a commonName): OfflineIMAP pins its
    SHA-256 fingerprint, and mbsync trusts a certificate it finds in its CertificateFile.
    """

    host: str
    port: int
    tls: bool
    ca_file: Path
    peer_file: Path | None = None

    @property
    def fingerprint(self) -> str:
        assert self.peer_file is not None
        pem = self.peer_file.read_text().split("-----END CERTIFICATE-----")[0]
        der = ssl.PEM_cert_to_DER_cert(pem + "-----END CERTIFICATE-----\n")
        return hashlib.sha256(der).hexdigest()


# -- the cases -----------------------------------------------------------------------------------


def flags_for(folder: str, i: int) -> list[str]:
    flags = []
    if i % 2:
        flags.append(r"\Seen")
    if i % 10 == 0:
        flags.append(r"\Flagged")
    if i % 15 == 0:
        flags.append(r"\Answered")
    return flags


def imapclient_baseline(link: Link, dest: Path) -> None:
    context = None
    if link.tls:
        context = ssl.create_default_context(cafile=str(link.ca_file))
    client = IMAPClient(
        link.host,
        link.port,
        ssl=link.tls,
        ssl_context=context,
        timeout=SocketTimeout(connect=10.0, read=60.0),
    )
    client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.login(USER, PASSWORD)
    for _flags, _delimiter, name in client.list_folders():
        if any(flag.lower() in (b"\\noselect", b"\\nonexistent") for flag in _flags):
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


def trio_imappool_export(link: Link, dest: Path, connections: int, fsync: bool) -> None:
    async def main() -> None:
        async with trio_imappool.open_pool(
            link.host,
            link.port,
            username=USER,
            password=PASSWORD,
            ssl=link.tls,
            ca_file=str(link.ca_file) if link.tls else None,
            max_size=connections,
        ) as pool:
            await export_maildir(pool, dest, fsync=fsync)

    trio.run(main)


def trio_imappool_cli(link: Link, dest: Path, connections: int) -> None:
    command = [sys.executable, "-m", "trio_imappool", "export", "--no-progress"]
    command += ["--host", link.host, "--port", str(link.port), "--user", USER]
    command += ["-c", str(connections)]
    command += ["--ca-file", str(link.ca_file)] if link.tls else ["--plain"]
    env = {**os.environ, "TRIO_IMAPPOOL_PASSWORD": PASSWORD}
    run_peer([*command, str(dest)], env=env)


def offlineimap(link: Link, dest: Path, work: Path, connections: int) -> None:
    config = work / "offlineimap.conf"
    remote_tls = f"ssl = yes\ncert_fingerprint = {link.fingerprint}\n" if link.tls else "ssl = no\n"
    config.write_text(
        "[general]\n"
        "accounts = bench\n"
        f"metadata = {work / 'offlineimap-meta'}\n"
        "ui = quiet\n"
        "[Account bench]\n"
        "localrepository = local\n"
        "remoterepository = remote\n"
        "[Repository local]\n"
        "type = Maildir\n"
        f"localfolders = {dest}\n"
        "[Repository remote]\n"
        "type = IMAP\n"
        f"remotehost = {link.host}\n"
        f"remoteport = {link.port}\n"
        f"remoteuser = {USER}\n"
        f"remotepass = {PASSWORD}\n"
        f"{remote_tls}"
        "starttls = no\n"
        f"maxconnections = {connections}\n"
        "readonly = True\n"
    )
    dest.mkdir(parents=True, exist_ok=True)
    run_peer(["offlineimap", "-c", str(config), "-o", "-u", "quiet"])


def mbsync(link: Link, dest: Path, work: Path) -> None:
    config = work / "mbsyncrc"
    tls = f"SSLType IMAPS\nCertificateFile {link.peer_file}\n" if link.tls else "SSLType None\n"
    config.write_text(
        "IMAPAccount bench\n"
        f"Host {link.host}\n"
        f"Port {link.port}\n"
        f"User {USER}\n"
        f"Pass {PASSWORD}\n"
        f"{tls}"
        "AuthMechs LOGIN\n"
        "\n"
        "IMAPStore remote\n"
        "Account bench\n"
        "\n"
        "MaildirStore local\n"
        f"Path {dest}/\n"
        f"Inbox {dest}/INBOX\n"
        "SubFolders Verbatim\n"
        "\n"
        "Channel bench\n"
        "Far :remote:\n"
        "Near :local:\n"
        "Patterns *\n"
        "Create Near\n"
        "Sync Pull\n"
        "SyncState *\n"
    )
    dest.mkdir(parents=True, exist_ok=True)
    run_peer(["mbsync", "-c", str(config), "-a", "-q"])


def run_peer(command: Sequence[str], env: dict[str, str] | None = None) -> None:
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=PEER_TIMEOUT, env=env, check=False
    )
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{command[0]} exited with {result.returncode}: {' | '.join(output)}")


def count_messages(root: Path) -> int:
    """Message files under every ``cur/`` and ``new/`` of a Maildir tree."""
    total = 0
    for directory, _dirs, files in os.walk(root):
        if os.path.basename(directory) in ("cur", "new"):
            total += len(files)
    return total


# -- set-up: peers, server, proxy ----------------------------------------------------------------


def find_peers(install: bool) -> tuple[dict[str, bool], list[str]]:
    """Which peers are usable; installs the missing ones with apt-get when allowed."""
    wanted = {"offlineimap": "offlineimap3", "mbsync": "isync"}
    notes: list[str] = []
    missing = [package for tool, package in wanted.items() if shutil.which(tool) is None]
    if missing and install and hasattr(os, "geteuid") and os.geteuid() == 0:
        print(f"installing {', '.join(missing)} with apt-get ...", flush=True)
        command = ["apt-get", "install", "-y", *missing]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if subprocess.run(command, capture_output=True, env=env, check=False).returncode:
            subprocess.run(["apt-get", "update"], capture_output=True, env=env, check=False)
            subprocess.run(command, capture_output=True, env=env, check=False)
    found = {tool: shutil.which(tool) is not None for tool in wanted}
    for tool, ok in found.items():
        if not ok:
            why = "not root" if install else "--no-install"
            notes.append(f"{tool} skipped: not installed ({why}; apt-get install {wanted[tool]})")
    return found, notes


def build_cases(
    link: Link, work: Path, connections: Sequence[int], peers: dict[str, bool]
) -> list[Case]:
    cases = [
        Case(
            "baseline",
            "imapclient, 1 connection, 1 FETCH per folder",
            lambda d: imapclient_baseline(link, d),
        )
    ]
    for n in connections:
        cases.append(
            Case(f"ours-{n}", f"trio-imappool, {n} connections", _ours(link, n, fsync=True))
        )
    top = max(connections)
    cases.append(
        Case(
            f"ours-{top}-nofsync",
            f"trio-imappool, {top} connections, no fsync",
            _ours(link, top, fsync=False),
        )
    )
    cases.append(
        Case(
            "cli",
            f"trio-imappool CLI, {top} connections",
            lambda d: trio_imappool_cli(link, d, top),
        )
    )
    if peers.get("offlineimap"):
        cases.append(
            Case(
                "offlineimap",
                f"OfflineIMAP, maxconnections {top}",
                lambda d: offlineimap(link, d, work, top),
            )
        )
    if peers.get("mbsync"):
        cases.append(
            Case("mbsync", "mbsync (1 connection, pipelined)", lambda d: mbsync(link, d, work))
        )
    return cases


def _ours(link: Link, n: int, *, fsync: bool) -> Callable[[Path], None]:
    return lambda dest: trio_imappool_export(link, dest, n, fsync)


# -- running and reporting -----------------------------------------------------------------------


def run_rounds(cases: Sequence[Case], work: Path, rounds: int, warm_ups: int) -> list[str]:
    errors: list[str] = []
    # Dovecot builds its index and cache files as clients first read a mailbox: the first
    # exports are slower whoever makes them. Untimed warm-up exports by the in-process cases.
    for number in range(warm_ups):
        for case in cases:
            if case.key == "baseline" or case.key.startswith("ours-"):
                case.run(work / f"warm-up-{case.key}-{number}")
    for number in range(rounds):
        order = cases if number % 2 == 0 else list(reversed(cases))
        for case in order:
            if case.key in {e.split(":")[0] for e in errors}:
                continue
            dest = work / f"{case.key}-{number}"
            # Start every case with no dirty pages of an earlier one still being written back.
            os.sync()
            started = time.perf_counter()
            try:
                case.run(dest)
            except Exception as exc:
                errors.append(f"{case.key}: {type(exc).__name__}: {exc}")
                continue
            case.times.append(time.perf_counter() - started)
            case.counts.append(count_messages(dest))
            # Not removed until the end: deleting thousands of files here slowed the later
            # cases down, by up to 2x on the machine used.
            print(f"  round {number + 1}: {case.label:<48} {case.times[-1]:7.2f} s", flush=True)
    return errors


def report(cases: Sequence[Case], expected: int, header: str) -> tuple[str, bool]:
    by_key = {case.key: case for case in cases if case.times}
    baseline = by_key.get("baseline")
    lines = [header, ""]
    lines.append(
        f"| {'tool, setting':<48} | {'median s':>8} | {'min':>6} | {'max':>6} "
        f"| {'msg/s':>6} | {'vs baseline':>11} | messages |"
    )
    lines.append(f"|{'-' * 50}|{'-' * 10}|{'-' * 8}|{'-' * 8}|{'-' * 8}|{'-' * 13}|{'-' * 10}|")
    for case in cases:
        if not case.times:
            continue
        ratio = f"{baseline.median / case.median:10.2f}x" if baseline else f"{'':>11}"
        got = case.counts[-1]
        mark = "" if got == expected and case.complete else " INCOMPLETE"
        lines.append(
            f"| {case.label:<48} | {case.median:8.2f} | {min(case.times):6.2f} "
            f"| {max(case.times):6.2f} | {expected / case.median:6.0f} | {ratio} "
            f"| {got:>5}{mark} |"
        )
    lines.append("")
    all_met = True
    top = max(
        (int(k.split("-")[1]) for k in by_key if k.startswith("ours-") and k.count("-") == 1),
        default=None,
    )
    ours = by_key.get(f"ours-{top}")
    like = by_key.get(f"ours-{top}-nofsync")

    def verdict(ok: bool) -> str:
        nonlocal all_met
        all_met &= ok
        return "met" if ok else "NOT met"

    if baseline and like:
        speedup = baseline.median / like.median
        lines.append(
            f"{top} connections vs the 1-connection baseline, both without fsync: "
            f"{speedup:.2f}x (target >= {SPEEDUP_TARGET:g}x): {verdict(speedup >= SPEEDUP_TARGET)}"
        )
    if baseline and ours:
        lines.append(
            f"  (with fsync, the exporter's default: {baseline.median / ours.median:.2f}x)"
        )
    for key, name, strict in (("offlineimap", "OfflineIMAP", True), ("mbsync", "mbsync", False)):
        peer = by_key.get(key)
        if peer is None or ours is None:
            lines.append(f"{top} connections vs {name}: not measured")
            continue
        ok = ours.median < peer.median if strict else ours.median <= peer.median
        word = "faster than" if strict else "as fast as or faster than"
        lines.append(
            f"{top} connections ({ours.median:.2f} s) {word} {name} ({peer.median:.2f} s): "
            f"{peer.median / ours.median:.2f}x: {verdict(ok)}"
        )
    cli, mbsync_case = by_key.get("cli"), by_key.get("mbsync")
    if cli is not None and mbsync_case is not None:
        cli_ratio = mbsync_case.median / cli.median
        lines.append(
            f"CLI, interpreter start-up included ({cli.median:.2f} s), vs mbsync "
            f"({mbsync_case.median:.2f} s): {cli_ratio:.2f}x (target >= "
            f"{CLI_VS_MBSYNC_TARGET:g}x at a 50 ms round trip): "
            f"{'met' if cli_ratio >= CLI_VS_MBSYNC_TARGET else 'NOT met'}"
        )
    incomplete = [
        c.label for c in cases if c.times and (c.counts[-1] != expected or not c.complete)
    ]
    if incomplete:
        all_met = False
        lines.append(f"INCOMPLETE exports (not every message arrived): {', '.join(incomplete)}")
    return "\n".join(lines), all_met


def seed(server: DovecotServer, folders: int, messages: int, size: int) -> int:
    names = FOLDERS[:folders] + [f"Folder{i}" for i in range(len(FOLDERS), folders)]
    per = [messages // folders + (1 if i < messages % folders else 0) for i in range(folders)]
    seed_folders(server, dict(zip(names, per, strict=True)), user=USER, size=size, flags=flags_for)
    return sum(per)


def _default_root() -> str | None:
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


def _file_system(path: str) -> str:
    """The type of the file system *path* is on, from /proc/mounts ("unknown" without it)."""
    path = os.path.realpath(path)
    best, kind = "", "unknown"
    try:
        with open("/proc/mounts", encoding="utf-8") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mount = fields[1]
                inside = path == mount or path.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) > len(best):
                    best, kind = mount, fields[2]
    except OSError:
        pass
    return kind


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--folders", type=int, default=10)
    parser.add_argument("--size", type=int, default=2000, help="bytes per message")
    parser.add_argument("--latency", type=float, default=25.0, help="ms added each way")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--warm-ups", type=int, default=2, help="untimed rounds of the in-process cases first"
    )
    parser.add_argument(
        "--connections", type=int, nargs="+", default=[1, 4, 8], help="pool sizes to run"
    )
    parser.add_argument(
        "--maildir-root",
        default=_default_root(),
        help="where the Maildirs are written (default: /dev/shm, a tmpfs, where there is one)",
    )
    parser.add_argument("--tls", action="store_true", help="implicit TLS for every tool")
    parser.add_argument("--no-peers", action="store_true", help="skip OfflineIMAP and mbsync")
    parser.add_argument("--no-offlineimap", action="store_true", help="skip OfflineIMAP only")
    parser.add_argument("--no-install", action="store_true", help="never run apt-get")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args(argv)

    peers, notes = (
        ({}, ["peers skipped: --no-peers"]) if args.no_peers else find_peers(not args.no_install)
    )
    if args.no_offlineimap and peers.get("offlineimap"):
        peers["offlineimap"] = False
        notes.append("OfflineIMAP skipped: --no-offlineimap")
    with (
        tempfile.TemporaryDirectory(prefix="bench-export-", dir=args.maildir_root) as tmp,
        start_dovecot(users={USER: PASSWORD}, max_userip_connections=200) as server,
    ):
        work = Path(tmp)
        started = time.perf_counter()
        expected = seed(server, args.folders, args.messages, args.size)
        elapsed = time.perf_counter() - started
        print(f"seeded {expected} messages in {args.folders} folders in {elapsed:.1f} s")
        ca_file = work / "ca.pem"
        server.ca.cert_pem.write_to_path(str(ca_file))
        port = server.imaps_port if args.tls else server.imap_port
        peer_file = None
        if args.tls:
            peer_file = work / "peer.pem"
            leaf = ssl.get_server_certificate((server.host, port))
            peer_file.write_text(leaf + ca_file.read_text())
        with proxy_process(server.host, port, args.latency / 1000) as proxy_port:
            link = Link(server.host, proxy_port, args.tls, ca_file, peer_file)
            cases = build_cases(link, work, args.connections, peers)
            errors = run_rounds(cases, work, args.rounds, args.warm_ups)
    mode = "implicit TLS" if args.tls else "plain IMAP"
    fs_type = _file_system(args.maildir_root or tempfile.gettempdir())
    header = (
        f"Exporting {expected} messages of ~{args.size} bytes in {args.folders} folders from "
        f"Dovecot to a fresh Maildir, {mode} through a proxy adding {args.latency:g} ms each way; "
        f"median of {args.rounds} rounds.\n"
        f"Maildirs under {args.maildir_root or tempfile.gettempdir()} ({fs_type}); "
        f"Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs"
    )
    table, met = report(cases, expected, header)
    print()
    print(table)
    for line in notes + errors:
        print(f"note: {line}")
    return 1 if args.check and (not met or errors) else 0


if __name__ == "__main__":
    sys.exit(main())
