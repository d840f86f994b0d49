"""The exporter against hostile and odd servers (issue 11): folder names that try to leave the
destination, folders that would share a directory, names that cannot be used, garbled STATUS
answers, and messages the server lists but does not return.

Rules: loopback only; the scripted server (:mod:`trio_imappool.testing._scripted`) where Dovecot
refuses a name or will not misbehave, Dovecot where it accepts the name; every case checks that
nothing outside the destination changed (a snapshot of the parent tree), that every message of
every exportable folder is on disk, and that the result and the exit code say what was not.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import imapclient
import pytest
import trio

from trio_imappool import ConfigurationError, open_pool
from trio_imappool.cli import EXIT_CODES, main
from trio_imappool.exporter import (
    ExportResult,
    export_maildir,
)
from trio_imappool.testing import (
    DEFAULT_CAPABILITIES,
    DovecotServer,
    ScriptedCommand,
    ScriptedFolder,
    ScriptedMessage,
    ScriptedSession,
    open_scripted_server,
    start_scripted_server_thread,
)


def body(folder: str, i: int) -> bytes:
    return f"Subject: {folder!r} {i}\r\n\r\nmessage {i} of {folder!r}\r\n".encode()


def folder_of(key: str | bytes, count: int = 2, **options: Any) -> ScriptedFolder:
    label = key if isinstance(key, str) else key.decode("utf-8", "backslashreplace")
    return ScriptedFolder.of([body(label, i) for i in range(count)], **options)


def snapshot(parent: Path, skip: Path) -> dict[str, tuple[str, int, str]]:
    """Every entry under *parent* except *skip*'s subtree: kind, mode and content hash."""
    found: dict[str, tuple[str, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(parent):
        here = Path(dirpath)
        if here == skip:
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            path = here / name
            if path == skip:
                continue
            info = path.lstat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
            found[str(path.relative_to(parent))] = (
                "d" if path.is_dir() else "f",
                info.st_mode,
                digest,
            )
    return found


def make_neighbourhood(tmp_path: Path) -> tuple[Path, Path]:
    """A parent that is itself a Maildir++ export (as in the report: one account exported
    inside another's Maildir), with the destination inside it."""
    parent = tmp_path / "Maildir"
    for sub in ("cur", "new", "tmp", ".Other/cur", ".Other/new", ".Other/tmp"):
        (parent / sub).mkdir(parents=True)
    (parent / "cur" / "1-1.trio-imappool,S=3:2,S").write_bytes(b"one")
    (parent / ".Other" / "cur" / "1-2.trio-imappool,S=3:2,").write_bytes(b"two")
    (parent / "trio-imappool.json").write_text("{}")
    return parent, parent / ".Nested"


def on_disk(path: Path) -> set[bytes]:
    return {p.read_bytes() for sub in ("cur", "new") for p in (path / sub).iterdir()}


def expected_on_disk(folder: ScriptedFolder) -> set[bytes]:
    return {m.body for m in folder.messages if m.body is not None and m.in_fetch}


CAPABILITIES = {
    "LIST then STATUS": DEFAULT_CAPABILITIES,
    "LIST-STATUS": (*DEFAULT_CAPABILITIES, "LIST-STATUS"),
}


async def export_from(server: Any, dest: Path) -> ExportResult:
    async with open_pool(**server.pool_kwargs(), max_size=3) as pool:
        return await export_maildir(pool, dest, fsync=False)


def check_every_folder(
    result: ExportResult,
    folders: dict[str | bytes, ScriptedFolder],
    dest: Path,
    failed: set[str],
) -> None:
    """Every exportable folder has all its messages in a directory of its own inside *dest*;
    the failed ones are named in the result."""
    assert {f.name for f in result.folders_failed} == failed
    paths = [f.path for f in result.folders]
    assert len(set(paths)) == len(paths), "two folders share a directory"
    by_name = {f.name: f for f in result.folders}
    for key, folder in folders.items():
        if not isinstance(key, str) or key in failed:
            continue
        report = by_name[key]
        assert report.path == dest or report.path.parent == dest
        assert on_disk(report.path) >= expected_on_disk(folder), key


async def test_folder_patterns_with_line_breaks_are_refused(tmp_path: Path) -> None:
    async with open_scripted_server() as server, open_pool(**server.pool_kwargs()) as pool:
        for bad in (["a\r\nb"], ["x\x00"]):
            with pytest.raises(ConfigurationError):
                await export_maildir(pool, tmp_path, folders=bad)
            with pytest.raises(ConfigurationError):
                await export_maildir(pool, tmp_path, exclude=bad)
    assert server.connections == 0


# -- the hostile table ---------------------------------------------------------------------------

CJK = "漢" * 90

CASES: dict[str, tuple[dict[str | bytes, ScriptedFolder], str | None, set[str]]] = {
    # name: (folders, account delimiter, folders expected to fail)
    "slash as a name": ({"INBOX": folder_of("INBOX"), "/": folder_of("/")}, "/", set()),
    "dot as a name": ({"INBOX": folder_of("INBOX"), ".": folder_of(".")}, ".", set()),
    "dot dot": ({"INBOX": folder_of("INBOX"), "..": folder_of("..")}, "/", set()),
    "dot dot with dot": ({"INBOX": folder_of("INBOX"), "..": folder_of("..")}, ".", set()),
    "climbing": (
        {"INBOX": folder_of("INBOX"), "../../x": folder_of("../../x"), "a/../..": folder_of("a")},
        "/",
        set(),
    ),
    "slash in modified UTF-7": (
        {"INBOX": folder_of("INBOX"), b"&AC8-": folder_of(b"&AC8-"), "ok": folder_of("ok")},
        "/",
        {"&AC8-"},
    ),
    "dot dot in modified UTF-7": (
        {"INBOX": folder_of("INBOX"), b"&AC4ALg-": folder_of(b"&AC4ALg-")},
        "/",
        {"&AC4ALg-"},
    ),
    "unterminated UTF-7": (
        {"INBOX": folder_of("INBOX"), b"&Jjo": folder_of(b"&Jjo"), "ok": folder_of("ok")},
        "/",
        {"&Jjo"},
    ),
    "raw 8-bit bytes": (
        {"INBOX": folder_of("INBOX"), b"caf\xe9": folder_of(b"caf\xe9")},
        "/",
        {"caf\\xe9"},
    ),
    "line break in a name": (
        {
            "INBOX": folder_of("INBOX"),
            b"evil\r\nA1 CREATE x": folder_of(b"e"),
            "ok": folder_of("ok"),
        },
        "/",
        {"evil\r\nA1 CREATE x"},
    ),
    "empty name and INBOX": ({"INBOX": folder_of("INBOX"), "": folder_of("")}, "/", set()),
    "Inbox and INBOX": (
        {"Inbox": folder_of("Inbox", 3), "INBOX": folder_of("INBOX", 2)},
        "/",
        set(),
    ),
    "a/b and a.b across delimiters": (
        {
            "INBOX": folder_of("INBOX"),
            "a/b": folder_of("a/b", 2, delimiter="/"),
            "a.b": folder_of("a.b", 3, delimiter="."),
        },
        "/",
        set(),
    ),
    "over-long CJK names": (
        {"INBOX": folder_of("INBOX"), CJK: folder_of(CJK), CJK[:-1] + "字": folder_of("other")},
        "/",
        set(),
    ),
    "garbage STATUS": (
        {
            "INBOX": folder_of("INBOX"),
            "garbage": folder_of("garbage", status=b"(MESSAGES x UIDNEXT y UIDVALIDITY z)"),
            "short": folder_of("short", status=b"(MESSAGES 2)"),
            "ok": folder_of("ok"),
        },
        "/",
        {"garbage", "short"},
    ),
}


@pytest.mark.parametrize("listing", list(CAPABILITIES))
@pytest.mark.parametrize("case", list(CASES))
async def test_hostile_folders_never_leave_the_destination_nor_stop_the_others(
    tmp_path: Path, case: str, listing: str
) -> None:
    folders, delimiter, failed = CASES[case]
    parent, dest = make_neighbourhood(tmp_path)
    before = snapshot(parent, dest)
    with trio.fail_after(30):
        async with open_scripted_server(
            folders=folders, delimiter=delimiter, capabilities=CAPABILITIES[listing]
        ) as server:
            result = await export_from(server, dest)
            again = await export_from(server, dest)  # stable: nothing new, same directories
    assert ("STATUS" in server.command_names()) == (listing == "LIST then STATUS")
    assert snapshot(parent, dest) == before
    check_every_folder(result, folders, dest, failed)
    assert not result.messages_missing
    assert result.complete == (not failed)
    assert again.messages_fetched == 0
    assert [f.path for f in again.folders] == [f.path for f in result.folders]
    for entry in dest.iterdir():  # only Maildir++ entries of ours at the top
        assert entry.name in ("cur", "new", "tmp", "trio-imappool.json", "trio-imappool.lock") or (
            entry.name.startswith(".") and entry.name not in (".", "..")
        )


async def test_a_collision_keeps_its_directory_when_a_new_folder_claims_it(tmp_path: Path) -> None:
    folders: dict[str | bytes, ScriptedFolder] = {
        "INBOX": folder_of("INBOX"),
        "x.y": folder_of("x.y", 2, delimiter="."),
    }
    with trio.fail_after(30):
        async with open_scripted_server(folders=folders) as server:
            first = await export_from(server, tmp_path)
            # A folder that sorts first and maps to the same name appears.
            server.account.folders["x/y"] = folder_of("x/y", 3, delimiter="/")
            second = await export_from(server, tmp_path)
    path = {f.name: f.path for f in second.folders}
    assert path["x.y"] == {f.name: f.path for f in first.folders}["x.y"] == tmp_path / ".x.y"
    assert path["x/y"] != path["x.y"] and "%~" in path["x/y"].name
    assert on_disk(path["x.y"]) == expected_on_disk(folders["x.y"])
    assert on_disk(path["x/y"]) == expected_on_disk(server.account.folders["x/y"])


# -- messages the server does not return ----------------------------------------------------------


async def test_messages_left_out_or_nil_are_reported_and_asked_for_again(tmp_path: Path) -> None:
    messages = [ScriptedMessage(uid=uid, body=body("odd", uid)) for uid in range(1, 7)]
    messages[1].in_fetch = False  # UID 2 left out of the FETCH answer
    messages[4].body = None  # UID 5: BODY[] NIL
    folders: dict[str | bytes, ScriptedFolder] = {
        "INBOX": folder_of("INBOX"),
        "Odd": ScriptedFolder(messages),
    }
    with trio.fail_after(30):
        async with open_scripted_server(folders=folders) as server:
            first = await export_from(server, tmp_path)
            odd = {f.name: f for f in first.folders}["Odd"]
            assert odd.missing == 2 and first.messages_missing == 2 and not first.complete
            assert on_disk(odd.path) == {body("odd", u) for u in (1, 3, 4, 6)}
            # The next run asks for them again, and takes them when the server gives them.
            messages[1].in_fetch = True
            messages[4].body = body("odd", 5)
            start = len(server.commands)
            second = await export_from(server, tmp_path)
            fetches = [c for c in server.commands[start:] if c.name == "FETCH"]
    assert any(b"2" in c.arg(0) and b"5" in c.arg(0) for c in fetches)
    assert second.complete and second.messages_fetched == 2
    assert on_disk(odd.path) == {body("odd", u) for u in range(1, 7)}


async def test_a_missing_message_in_a_searched_folder_is_found_too(tmp_path: Path) -> None:
    # A sparse folder is fetched by search criteria: the exporter does not know the UIDs it
    # asked for, and checks with a SEARCH of its own.
    messages = [ScriptedMessage(uid=uid, body=body("sparse", uid)) for uid in (1, 5000, 9000)]
    messages[1].in_fetch = False
    folders: dict[str | bytes, ScriptedFolder] = {"INBOX": ScriptedFolder(messages)}
    with trio.fail_after(30):
        async with open_scripted_server(folders=folders) as server:
            result = await export_from(server, tmp_path)
            assert result.messages_missing == 1
            assert on_disk(tmp_path) == {body("sparse", 1), body("sparse", 9000)}
            # Later runs fetch a sparse folder by criteria (UID range, NOT the UIDs here).
            messages[1].in_fetch = True
            complete = await export_from(server, tmp_path)
            assert complete.complete and complete.messages_fetched == 1
            messages += [
                ScriptedMessage(uid=20000, body=body("sparse", 20000), in_fetch=False),
                ScriptedMessage(uid=30000, body=body("sparse", 30000)),
            ]
            later = await export_from(server, tmp_path)
            assert any(c.name == "SEARCH" and b"NOT" in c.raw[0] for c in server.commands)
    assert later.messages_missing == 1 and later.messages_fetched == 1
    assert body("sparse", 20000) not in on_disk(tmp_path)
    assert body("sparse", 30000) in on_disk(tmp_path)


async def test_a_folder_the_server_will_not_examine_fails_alone(tmp_path: Path) -> None:
    async def examine(session: ScriptedSession, command: ScriptedCommand) -> None:
        if command.arg(0) == b"Broken":
            await session.send_line(f"{command.tag} NO [SERVERBUG] cannot open this one")
        else:
            await session.default(command)

    folders: dict[str | bytes, ScriptedFolder] = {
        "INBOX": folder_of("INBOX"),
        "Broken": folder_of("Broken"),
        "Fine": folder_of("Fine"),
    }
    parent, dest = make_neighbourhood(tmp_path)
    before = snapshot(parent, dest)
    with trio.fail_after(30):
        async with open_scripted_server(folders=folders, handlers={"EXAMINE": examine}) as s:
            result = await export_from(s, dest)
    assert snapshot(parent, dest) == before
    check_every_folder(result, folders, dest, {"Broken"})
    assert "cannot open this one" in result.folders_failed[0].reason


# -- the command line ----------------------------------------------------------------------------


def test_the_cli_names_what_was_not_exported_and_exits_with_the_partial_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    messages = [ScriptedMessage(uid=1, body=b"a\r\n"), ScriptedMessage(uid=2, body=None)]
    folders: dict[str | bytes, ScriptedFolder] = {
        "INBOX": ScriptedFolder(messages),
        b"&AC8-": folder_of("x"),
        "Fine": folder_of("Fine"),
    }
    with start_scripted_server_thread(folders=folders) as server:
        monkeypatch.setenv("TRIO_IMAPPOOL_PASSWORD", "password")
        argv = ["export", "--host", server.host, "--port", str(server.port), "--plain"]
        code = main([*argv, "--user", "user", "--no-fsync", str(tmp_path / "m")])
    assert code == EXIT_CODES["partial"] == 8
    err = capsys.readouterr().err
    assert "folder '&AC8-' not exported: the name is not valid modified UTF-7" in err
    assert "folder 'INBOX': 1 message listed by the server but not returned" in err
    assert on_disk(tmp_path / "m" / ".Fine") == expected_on_disk(folders["Fine"])


# -- Dovecot, where it accepts the names -------------------------------------------------------


async def test_names_dovecot_accepts_are_exported_apart_and_inside(
    dovecot: DovecotServer, account: dict[str, Any], tmp_path: Path
) -> None:
    names = ["a/b", "a/b/c", CJK, CJK[:-1] + "字", "%", "Inbox2", "&-", "x%2Ey", "x~"]

    def seed() -> None:
        client = imapclient.IMAPClient(account["host"], account["port"], ssl=False, timeout=10)
        try:
            client.login(account["username"], account["password"])
            for name in names:
                client.create_folder(name)
                client.append(name, body(name, 0))
        finally:
            client.shutdown()

    await trio.to_thread.run_sync(seed)
    parent, dest = make_neighbourhood(tmp_path)
    before = snapshot(parent, dest)
    with trio.fail_after(60):
        async with open_pool(**account, max_size=3) as pool:
            result = await export_maildir(pool, dest, fsync=False)
    assert snapshot(parent, dest) == before
    assert result.complete
    by_name = {f.name: f for f in result.folders}
    assert len({f.path for f in result.folders}) == len(result.folders)
    for name in names:
        assert by_name[name].path.parent == dest
        assert on_disk(by_name[name].path) == {body(name, 0)}
