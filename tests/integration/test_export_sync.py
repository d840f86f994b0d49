"""The exporter follows the server: flag changes, deletions, and the cost of a run with none.

Against Dovecot (CONDSTORE, QRESYNC, LIST-STATUS) and against the scripted server, which has
none of them (a FLAGS-only ``UID FETCH 1:*`` compared with the files, STATUS per folder). Rules:
loopback only; every Dovecot test makes a user of its own; the command line runs in a
subprocess with the password in an environment variable and a timeout; commands on the wire
are counted through a recording relay between the pool and the server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import imapclient
import pytest
import trio

from trio_imappool import open_pool
from trio_imappool.exporter import (
    STATE_NAME,
    ExportResult,
    export_maildir,
    maildir_flags,
    maildir_folder_path,
    parse_message_filename,
    read_folder_state,
)
from trio_imappool.testing import (
    DovecotServer,
    ScriptedFolder,
    ScriptedMessage,
    ScriptedServer,
    open_scripted_server,
    seed_folders,
)
from trio_imappool.wire import parse_flag_responses, parse_uid_set

from .test_export import cli, flags_for, new_user, server_args

FOLDERS = {"INBOX": 30, "Other": 12}


# -- what the files say, what the server says ---------------------------------------------------


def local_flags(root: Path, folder: str) -> dict[int, str]:
    """UID -> the info letters of its file; fails on two files for one UID."""
    path = maildir_folder_path(root, folder, "/")
    found: dict[int, str] = {}
    for sub in ("cur", "new"):
        for file in (path / sub).iterdir():
            key = parse_message_filename(file.name)
            assert key is not None, file
            assert key[1] not in found, f"two files for UID {key[1]}"
            found[key[1]] = file.name.partition(":2,")[2]
    return found


@dataclasses.dataclass
class Changes:
    """What a test did on the server after the first export."""

    flagged: list[int]  # flags changed
    deleted: list[int]  # marked \\Deleted
    expunged: list[int]
    appended: list[int]


class DovecotAccount:
    """The test's own user on the shared Dovecot, changed with a plain imapclient."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings

    def _client(self) -> imapclient.IMAPClient:
        s = self.settings
        client = imapclient.IMAPClient(s["host"], s["port"], ssl=False, timeout=10)
        client.login(s["username"], s["password"])
        return client

    def flags(self, folder: str) -> dict[int, str]:
        client = self._client()
        try:
            client.select_folder(folder, readonly=True)
            uids = client.search("ALL")
            answer = client.fetch(uids, ["FLAGS"]) if uids else {}
            return {uid: maildir_flags(data[b"FLAGS"]) for uid, data in answer.items()}
        finally:
            client.logout()

    def change(
        self, folder: str, uids: list[int], counts: tuple[int, int, int, int] = (10, 3, 7, 5)
    ) -> Changes:
        """Flags on 10 messages, \\Deleted on 3, 7 expunged, 5 appended (or *counts*)."""
        a, b, c, new = counts
        flagged, deleted, expunged = uids[:a], uids[a : a + b], uids[a + b : a + b + c]
        client = self._client()
        try:
            client.select_folder(folder)
            for uid in flagged:
                (flags,) = client.get_flags([uid]).values()
                if b"\\Seen" in flags:
                    client.remove_flags([uid], [b"\\Seen"])
                else:
                    client.add_flags([uid], [b"\\Seen"])
                client.add_flags([uid], [b"\\Flagged", b"$Keyword"])
            if deleted:
                client.add_flags(deleted, [b"\\Deleted"])
            if expunged:
                client.add_flags(expunged, [b"\\Deleted"])
                client.uid_expunge(expunged)
        finally:
            client.logout()
        appended = []
        if new:
            appended = seed_folders(self.settings, {folder: new}, flags=[r"\Answered"])[folder]
        return Changes(flagged, deleted, expunged, appended)


class ScriptedAccountView:
    """The scripted server's in-memory account, changed directly between runs."""

    def __init__(self, server: ScriptedServer) -> None:
        self.server = server

    def flags(self, folder: str) -> dict[int, str]:
        messages = self.server.account.folders[folder].messages
        return {m.uid: maildir_flags(m.flags) for m in messages}

    def change(self, folder: str, uids: list[int]) -> Changes:
        box = self.server.account.folders[folder]
        by_uid = {m.uid: m for m in box.messages}
        flagged, deleted, expunged = uids[:10], uids[10:13], uids[13:20]
        for uid in flagged:
            message = by_uid[uid]
            flags = set(message.flags) ^ {"\\Seen"}
            message.flags = tuple(sorted(flags | {"\\Flagged", "$Keyword"}))
        for uid in deleted:
            by_uid[uid].flags = (*by_uid[uid].flags, "\\Deleted")
        box.messages = [m for m in box.messages if m.uid not in expunged]
        start = box.next_uid()
        appended = list(range(start, start + 5))
        for uid in appended:
            box.messages.append(
                ScriptedMessage(uid, b"Subject: new\r\n\r\nnew\r\n", ("\\Answered",))
            )
        return Changes(flagged, deleted, expunged, appended)


def scripted_folders() -> dict[str | bytes, ScriptedFolder]:
    out: dict[str | bytes, ScriptedFolder] = {}
    for name, count in FOLDERS.items():
        messages = [
            ScriptedMessage(i + 1, f"Subject: {name} {i}\r\n\r\nbody\r\n".encode(), tuple(f))
            for i in range(count)
            for f in [flags_for(name, i)]
        ]
        out[name] = ScriptedFolder(messages, uidvalidity=77)
    return out


async def export(settings: dict[str, Any], root: Path, **kwargs: Any) -> ExportResult:
    async with open_pool(**settings, max_size=4) as pool:
        return await export_maildir(pool, root, **kwargs)


def report(result: ExportResult, folder: str) -> tuple[int, int, int, int, int]:
    """(new, flags changed, gone from the server, gone and kept, removed) of one folder."""
    (f,) = [f for f in result.folders if f.name == folder]
    return f.fetched, f.flags_changed, f.gone, f.gone_kept, f.removed


async def follow_the_server(account: Any, settings: dict[str, Any], root: Path) -> None:
    """The scenario of the issue: change flags on 10, mark 3 \\Deleted, expunge 7, append 5;
    the next run follows; --delete removes the 7."""
    first = await export(settings, root)
    assert first.complete and first.flags_changed == 0
    uids = sorted(account.flags("INBOX"))
    other_before = local_flags(root, "Other")
    before = local_flags(root, "INBOX")
    changes = account.change("INBOX", uids)
    server = account.flags("INBOX")
    renames = sum(before[uid] != letters for uid, letters in server.items() if uid in before)
    assert renames >= 12  # 10 changed, and \Deleted on those of the 3 that lacked it

    second = await export(settings, root)

    assert second.complete
    local = local_flags(root, "INBOX")
    assert {uid: local[uid] for uid in server} == server  # every message: the server's flags
    assert set(local) - set(server) == set(changes.expunged)  # kept by default
    assert set(changes.appended) <= set(local)
    # The 5 new and the 7 gone were not renamed.
    assert report(second, "INBOX") == (5, renames, 7, 7, 0)
    assert report(second, "Other") == (0, 0, 0, 0, 0)
    assert local_flags(root, "Other") == other_before
    state = read_folder_state(root)
    assert state is not None and state.gone == frozenset(changes.expunged)

    again = await export(settings, root)
    assert report(again, "INBOX") == (0, 0, 0, 7, 0)
    assert again.gone_kept == 7 and again.messages_gone == 0

    deleting = await export(settings, root, delete=True)

    assert report(deleting, "INBOX") == (0, 0, 0, 0, 7)
    assert local_flags(root, "INBOX") == server
    state = read_folder_state(root)
    assert state is not None and state.gone == frozenset()
    after = await export(settings, root, delete=True)
    assert report(after, "INBOX") == (0, 0, 0, 0, 0)
    assert local_flags(root, "INBOX") == server


async def test_flags_and_deletions_follow_dovecot_with_condstore_and_qresync(
    dovecot: DovecotServer, tmp_path: Path
) -> None:
    settings = new_user(dovecot)
    seed_folders(settings, FOLDERS, flags=flags_for)
    await follow_the_server(DovecotAccount(settings), settings, tmp_path / "Mail")


async def test_flags_and_deletions_follow_a_server_without_condstore_qresync_or_list_status(
    tmp_path: Path,
) -> None:
    async with open_scripted_server(folders=scripted_folders()) as server:
        assert not {"CONDSTORE", "QRESYNC", "LIST-STATUS"} & set(server.capabilities)
        settings = server.pool_kwargs()
        await follow_the_server(ScriptedAccountView(server), settings, tmp_path / "Mail")
        fetches = [c for c in server.commands if c.name == "FETCH"]
        flag_passes = [c for c in fetches if c.args[1:2] == [[b"FLAGS"]]]
        assert flag_passes and all(c.uid and c.arg(0) == b"1:*" for c in flag_passes)
        assert all(len(c.args) == 2 for c in flag_passes)  # no CHANGEDSINCE modifier


# -- the cost of a run: commands on the wire -----------------------------------------------------


@dataclasses.dataclass
class Relay:
    port: int
    sent: list[bytearray]  # what each client connection sent
    # Every chunk passed on, in order: (True for client to server, the bytes).
    events: list[tuple[bool, bytes]] = dataclasses.field(default_factory=list)
    delay: float = 0.0  # added to each answer of the server: a round trip to see

    def round_trips(self) -> int:
        """How many times the clients waited for the server: runs of server chunks that
        follow client chunks (the greeting's included)."""
        trips, last = 0, True
        for up, _data in self.events:
            if not up and last:
                trips += 1
            last = up
        return trips

    def commands(self) -> list[str]:
        """Each command's name (``UID FETCH`` for the UID forms), LOGIN's arguments left out."""
        names = []
        for data in self.sent:
            for line in bytes(data).split(b"\r\n"):
                words = line.split(b" ")
                if len(words) < 2 or not words[0][:1].isalnum() or words[0] == b"DONE":
                    continue
                name = words[1].upper().decode("ascii", "replace")
                if name == "UID" and len(words) > 2:
                    name += " " + words[2].upper().decode("ascii", "replace")
                names.append(name)
        return names

    def lines(self, word: bytes) -> list[bytes]:
        return [
            line
            for data in self.sent
            for line in bytes(data).split(b"\r\n")
            if word in line.upper()
        ]

    def clear(self) -> None:
        self.sent.clear()
        self.events.clear()


@contextlib.asynccontextmanager
async def recording_relay(host: str, port: int) -> AsyncIterator[Relay]:
    """A TCP relay on 127.0.0.1 that keeps what each client sends."""
    relay = Relay(0, [])

    async def pump(src: trio.SocketStream, dst: trio.SocketStream, keep: bytearray | None) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            async for chunk in src:
                if keep is not None:
                    keep += chunk
                elif relay.delay:
                    await trio.sleep(relay.delay)
                relay.events.append((keep is not None, bytes(chunk)))
                await dst.send_all(chunk)

    async def handle(client: trio.SocketStream) -> None:
        keep = bytearray()
        relay.sent.append(keep)
        upstream = await trio.open_tcp_stream(host, port)
        async with client, upstream, trio.open_nursery() as nursery:

            async def both(src: Any, dst: Any, k: bytearray | None) -> None:
                await pump(src, dst, k)
                nursery.cancel_scope.cancel()

            nursery.start_soon(both, client, upstream, keep)
            nursery.start_soon(both, upstream, client, None)

    async with trio.open_nursery() as nursery:
        serve = functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1")
        listeners = await nursery.start(serve)
        relay.port = listeners[0].socket.getsockname()[1]
        yield relay
        nursery.cancel_scope.cancel()


async def test_a_no_change_run_on_50_folders_selects_nothing_and_a_flag_change_fetches_flags(
    dovecot: DovecotServer, tmp_path: Path
) -> None:
    settings = new_user(dovecot)
    names = ["INBOX"] + [f"Box{i:02}" for i in range(49)]
    seed_folders(settings, dict.fromkeys(names, 2), flags=flags_for)
    root = tmp_path / "Mail"
    async with recording_relay(settings["host"], settings["port"]) as relay:
        through = {**settings, "port": relay.port}
        await export(through, root)
        relay.clear()
        relay.delay = 0.05  # a round trip not to be missed

        result = await export(through, root)

        relay.delay = 0.0
        assert len(result.folders) == 50 and result.complete
        commands = relay.commands()
        assert "SELECT" not in commands and "EXAMINE" not in commands
        # After LOGIN: NAMESPACE and LIST ... RETURN (STATUS ... HIGHESTMODSEQ) pipelined (one
        # round trip), then LOGOUT. Round trips: greeting, LOGIN, the listing, LOGOUT.
        assert commands == ["LOGIN", "NAMESPACE", "LIST", "LOGOUT"], commands
        assert relay.round_trips() == 4, relay.events
        (listing,) = relay.lines(b"LIST")
        assert b"RETURN (STATUS (" in listing and b"HIGHESTMODSEQ" in listing

        # One folder's flags change: only it is examined, and only flags are fetched.
        client = imapclient.IMAPClient(settings["host"], settings["port"], ssl=False, timeout=10)
        client.login(settings["username"], settings["password"])
        client.select_folder("Box17")
        client.add_flags(client.search("ALL")[:1], [b"\\Draft"])
        client.logout()
        relay.clear()

        changed = await export(through, root)

        assert changed.flags_changed == 1 and changed.messages_fetched == 0
        examined = relay.lines(b"EXAMINE")
        assert [line.split(b" ", 2)[2] for line in examined] == [b'"Box17"']
        fetches = relay.lines(b"FETCH")
        assert len(fetches) == 1 and b"CHANGEDSINCE" in fetches[0] and b"VANISHED" in fetches[0]
        assert b"BODY" not in fetches[0]


# -- the state: versioned, upgraded without fetching again -------------------------------------


async def test_a_format_1_state_is_upgraded_without_fetching_a_message_again(
    dovecot: DovecotServer, tmp_path: Path
) -> None:
    settings = new_user(dovecot)
    seed_folders(settings, FOLDERS, flags=flags_for)
    root = tmp_path / "Mail"
    await export(settings, root)
    for folder in FOLDERS:  # the state as the previous release wrote it
        path = maildir_folder_path(root, folder, "/") / STATE_NAME
        raw = json.loads(path.read_text())
        old = {k: raw[k] for k in ("folder", "uidvalidity", "synced_below", "uids")}
        path.write_text(json.dumps({"format": 1, **old}))
    account = DovecotAccount(settings)
    account.change("Other", sorted(account.flags("Other")), (10, 0, 2, 0))  # 10 flags, 2 gone

    result = await export(settings, root)

    assert result.messages_fetched == 0 and result.complete
    assert report(result, "Other")[1:3] == (10, 2)
    for folder in FOLDERS:
        server = account.flags(folder)
        local = local_flags(root, folder)
        assert {uid: local[uid] for uid in server} == server
        state = json.loads((maildir_folder_path(root, folder, "/") / STATE_NAME).read_text())
        assert state["format"] == 2 and state["highestmodseq"] > 0


# -- a run killed during the flag pass ----------------------------------------------------------

SLOW_RENAMES = """
import os, sys, time
real = os.rename
def rename(src, dst, *args, **kwargs):
    real(src, dst, *args, **kwargs)
    with open(sys.argv[1], "a") as done:
        done.write("x")
    time.sleep(0.25)  # a window of seconds to kill it in, even on a loaded machine
os.rename = rename
from trio_imappool.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_run_killed_during_the_flag_pass_ends_the_same_when_run_again(
    dovecot: DovecotServer, tmp_path: Path
) -> None:
    settings = new_user(dovecot)
    seed_folders(settings, FOLDERS, flags=flags_for)
    root = tmp_path / "Mail"
    args = ["export", "--plain", *server_args(settings), str(root)]
    assert cli(*args, password=settings["password"]).returncode == 0
    account = DovecotAccount(settings)
    changes = account.change("INBOX", sorted(account.flags("INBOX")))
    server = account.flags("INBOX")
    renames = tmp_path / "renames"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_IMAPPOOL_")}
    env["TRIO_IMAPPOOL_PASSWORD"] = settings["password"]
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_RENAMES, str(renames), *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not (renames.exists() and len(renames.read_text()) >= 3):
        assert process.poll() is None, "the run ended before it was killed"
        assert time.monotonic() < deadline, "no flag was changed"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    assert process.returncode == -signal.SIGKILL
    done = len(renames.read_text())
    assert 3 <= done < 12  # killed mid-way: some files renamed, some not
    local = local_flags(root, "INBOX")  # one file per UID: the old name or the new one
    assert set(local) == (set(server) - set(changes.appended)) | set(changes.expunged)

    again = cli(*args, "-v", password=settings["password"])

    assert again.returncode == 0, again.stderr
    local = local_flags(root, "INBOX")
    assert {uid: local[uid] for uid in server} == server
    assert set(local) - set(server) == set(changes.expunged)
    assert "7 messages gone from the server kept in" in again.stdout
    assert "5 new" in again.stdout and "gone from the server" in again.stdout

    removed = cli(*args, "--delete", password=settings["password"])

    assert removed.returncode == 0, removed.stderr
    assert "7 files removed locally" in removed.stdout
    assert local_flags(root, "INBOX") == server


def test_the_help_says_the_export_is_one_way_and_names_delete() -> None:
    result = cli("export", "--help", password=None)
    text = " ".join(result.stdout.split())
    assert result.returncode == 0
    assert "one-way" in text and "never sent to the server" in text
    assert "--delete" in text


# -- the wire parsing, without a server -----------------------------------------------------------


def test_flag_responses_without_a_uid_are_never_attributed_to_a_message() -> None:
    lines: list[Any] = [
        b"1 (UID 7 FLAGS (\\Seen) MODSEQ (12))",
        b"7 (FLAGS (\\Deleted))",  # another session's news about message number 7: no UID
        b"2 (MODSEQ (13) FLAGS () UID 9)",
        b'3 (UID 11 FLAGS (\\Flagged "odd"))',  # not the plain shape: imapclient's parser
        b"2 (UID 9 FLAGS (\\Answered))",  # a later answer for the same UID wins
    ]
    assert parse_flag_responses(lines) == {
        7: (b"\\Seen",),
        9: (b"\\Answered",),
        11: (b"\\Flagged", b"odd"),
    }
    assert parse_uid_set(b" 41,45:43 ") == {41, 43, 44, 45}
    with pytest.raises(Exception, match="UID set"):
        parse_uid_set(b"1:*")


DOVECOT_WITHOUT_QRESYNC = (
    "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT SORT=DISPLAY THREAD=REFERENCES "
    "THREAD=REFS THREAD=ORDEREDSUBJECT MULTIAPPEND URL-PARTIAL CATENATE UNSELECT CHILDREN "
    "NAMESPACE UIDPLUS LIST-EXTENDED I18NLEVEL=1 CONDSTORE ESEARCH ESORT SEARCHRES WITHIN "
    "CONTEXT=SEARCH LIST-STATUS BINARY MOVE SPECIAL-USE"
)


async def test_flags_and_deletions_follow_a_condstore_server_without_qresync(
    dovecot_factory: Any, tmp_path: Path
) -> None:
    """Gmail's case: CONDSTORE and LIST-STATUS, no QRESYNC. Expunges show in the counts, and
    then the folder's UID set is compared; flag changes alone are asked for by modseq."""
    server = dovecot_factory(extra_config=f"imap_capability = {DOVECOT_WITHOUT_QRESYNC}\n")
    settings = new_user(server)
    seed_folders(settings, FOLDERS, flags=flags_for)
    async with recording_relay(settings["host"], settings["port"]) as relay:
        through = {**settings, "port": relay.port}
        await follow_the_server(DovecotAccount(settings), through, tmp_path / "Mail")
        fetches = relay.lines(b"(FLAGS)")
        assert fetches and not any(b"VANISHED" in line for line in fetches)
        assert not relay.lines(b"QRESYNC")
        # A flag change alone: asked for by modseq, no full listing.
        account = DovecotAccount(settings)
        account.change("Other", sorted(account.flags("Other")), (2, 0, 0, 0))
        relay.clear()
        result = await export(through, tmp_path / "Mail")
        assert report(result, "Other") == (0, 2, 0, 0, 0)
        (fetch,) = relay.lines(b"(FLAGS)")
        assert b"(CHANGEDSINCE " in fetch


async def test_delete_never_removes_a_message_a_short_flags_listing_leaves_out(
    tmp_path: Path,
) -> None:
    """A server whose FLAGS listing leaves a message out (fewer than EXAMINE counted) proves
    nothing about it: the file stays, even with delete=True, and nothing is reported gone."""
    async with open_scripted_server(folders=scripted_folders()) as server:
        settings = server.pool_kwargs()
        root = tmp_path / "Mail"
        await export(settings, root)
        before = local_flags(root, "INBOX")
        server.account.folders["INBOX"].messages[4].in_fetch = False

        result = await export(settings, root, delete=True)

        assert report(result, "INBOX") == (0, 0, 0, 0, 0)
        assert local_flags(root, "INBOX") == before
        # Truly expunged, it goes; so do all of a folder emptied on the server.
        del server.account.folders["INBOX"].messages[4]
        server.account.folders["Other"].messages.clear()
        result = await export(settings, root, delete=True)
        assert report(result, "INBOX") == (0, 0, 1, 0, 1)
        assert len(local_flags(root, "INBOX")) == len(before) - 1
        assert report(result, "Other") == (0, 0, 12, 0, 12)
        assert local_flags(root, "Other") == {}


def age_directories(root: Path, seconds: float = 10) -> None:
    """Make every folder's cur/ and new/ look untouched for *seconds* (file times are what
    tells a run whether it must list the files)."""
    past = time.time() - seconds
    for sub in root.rglob("*"):
        if sub.is_dir() and sub.name in ("cur", "new"):
            os.utime(sub, (past, past))


async def test_unchanged_directories_are_not_listed_and_any_change_to_them_is_noticed(
    dovecot: DovecotServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trio_imappool.exporter import _local as _export

    settings = new_user(dovecot)
    seed_folders(settings, FOLDERS, flags=flags_for)
    root = tmp_path / "Mail"
    await export(settings, root)
    age_directories(root)
    await export(settings, root)  # lists the files, and notes the directories' times
    listed: list[Path] = []
    real_scan = _export._scan

    def scan(path: Path) -> Any:
        listed.append(path)
        return real_scan(path)

    monkeypatch.setattr(_export, "_scan", scan)

    quiet = await export(settings, root)

    assert listed == [] and quiet.complete
    assert sum(f.exported for f in quiet.folders) == sum(FOLDERS.values())
    # A flag change on the server: the folder's files are listed to be renamed.
    account = DovecotAccount(settings)
    account.change("Other", sorted(account.flags("Other")), (3, 0, 0, 0))
    changed = await export(settings, root)
    assert report(changed, "Other")[1] == 3 and listed == [root / ".Other"]
    assert local_flags(root, "Other") == account.flags("Other")
    # A file removed behind the exporter's back changes cur/'s time: listed, fetched again.
    age_directories(root)
    await export(settings, root)
    listed.clear()
    victim = next((root / "cur").iterdir())
    victim.unlink()
    again = await export(settings, root)
    assert root in listed and report(again, "INBOX")[0] == 1
    assert victim.exists()
