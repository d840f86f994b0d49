"""The exporter on servers that keep folders under a personal namespace prefix (issue 12, point
4): Courier-IMAP's ``INBOX.`` with ``.`` as delimiter.

Local names are relative to the personal namespace (``INBOX.Archive`` is ``.Archive``), folder
patterns are written with ``/`` and relative to it, and a ``--folder`` that matches nothing is an
error. Rules: loopback only; the scripted server (Courier's NAMESPACE answer, a server without
NAMESPACE, one that refuses it) and a real Cyrus configured as Courier is (``altnamespace`` and
``unixhierarchysep`` off); every export has a deadline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from trio_imappool import open_pool
from trio_imappool.cli import EXIT_CODES, main
from trio_imappool.exporter import (
    ExportResult,
    FolderNotFoundError,
    export_maildir,
    parse_message_filename,
)
from trio_imappool.testing import (
    DEFAULT_CAPABILITIES,
    CyrusFactory,
    ScriptedAccount,
    ScriptedCommand,
    ScriptedFolder,
    ScriptedSession,
    open_scripted_server,
    seed_folders,
    start_scripted_server_thread,
)

#: Courier-IMAP 5.0's answer: personal ``INBOX.``, no other users' namespace, shared ``shared.``.
COURIER_NAMESPACE = b'(("INBOX." ".")) NIL (("shared." "."))'


def body(folder: str, i: int) -> bytes:
    return f"Subject: {folder} {i}\r\n\r\nmessage {i} of {folder}\r\n".encode()


def courier_account(names: tuple[str, ...] | None = None) -> ScriptedAccount:
    """INBOX and its subfolders as Courier lists them, plus a shared folder outside the
    personal namespace; each folder holds two messages."""
    names = names or (
        "INBOX",
        "INBOX.Archive",
        "INBOX.Archive.2024",
        "INBOX.Sent",
        "shared.team",
    )
    folders: dict[str | bytes, ScriptedFolder] = {
        name: ScriptedFolder.of([body(name, 0), body(name, 1)]) for name in names
    }
    return ScriptedAccount(folders=folders, delimiter=".", namespace=COURIER_NAMESPACE)


def subfolders(root: Path) -> set[str]:
    """The Maildir++ subfolder directories of *root*."""
    return {p.name for p in root.iterdir() if p.is_dir() and p.name.startswith(".")}


def messages_in(path: Path) -> int:
    return sum(1 for f in (path / "cur").iterdir() if parse_message_filename(f.name))


async def export(server: Any, root: Path, **kwargs: Any) -> ExportResult:
    with trio.fail_after(30):
        async with open_pool(**server.pool_kwargs(), max_size=3) as pool:
            return await export_maildir(pool, root, fsync=False, **kwargs)


# -- a Courier-like scripted server --------------------------------------------------------------


async def test_courier_folders_are_exported_without_the_inbox_prefix(tmp_path: Path) -> None:
    root = tmp_path / "Mail"
    async with open_scripted_server(courier_account()) as server:
        result = await export(server, root)

    assert result.complete
    assert subfolders(root) == {".Archive", ".Archive.2024", ".Sent", ".shared.team"}
    assert messages_in(root) == 2
    for local in subfolders(root):
        assert messages_in(root / local) == 2
    paths = {f.name: f.path for f in result.folders}
    assert paths["INBOX.Archive.2024"] == root / ".Archive.2024"
    assert paths["INBOX"] == root


@pytest.mark.parametrize(
    ("include", "exclude", "chosen"),
    [
        (["Archive/*"], [], {"INBOX.Archive.2024"}),
        (["Archive"], [], {"INBOX.Archive"}),
        (["Archive*"], ["*/2024"], {"INBOX.Archive"}),
        (["inbox", "Sent"], [], {"INBOX", "INBOX.Sent"}),
        (["shared/*"], [], {"shared.team"}),
        (["INBOX.Sent"], [], {"INBOX.Sent"}),  # the name as the server lists it works too
        (None, ["Archive/*", "shared/team"], {"INBOX", "INBOX.Archive", "INBOX.Sent"}),
    ],
)
async def test_patterns_use_slash_and_are_relative_to_the_namespace(
    tmp_path: Path, include: list[str] | None, exclude: list[str], chosen: set[str]
) -> None:
    async with open_scripted_server(courier_account()) as server:
        result = await export(server, tmp_path / "Mail", folders=include, exclude=exclude)
    assert {f.name for f in result.folders} == chosen
    assert result.complete


async def test_a_pattern_that_matches_no_folder_is_an_error_before_anything_is_written(
    tmp_path: Path,
) -> None:
    root = tmp_path / "Mail"
    async with open_scripted_server(courier_account()) as server:
        with pytest.raises(FolderNotFoundError, match=r"no folder on the server matches 'Nope/\*'"):
            await export(server, root, folders=["Archive/*", "Nope/*"])
        with pytest.raises(FolderNotFoundError, match="no such folder on the server: 'Nope'"):
            await export(server, root, folders=["Nope"])
        # Every folder the pattern matches is excluded: not an error, nothing to export.
        result = await export(server, root, folders=["Archive/*"], exclude=["*"])
    assert result.folders == ()
    assert subfolders(root) == set()


async def test_a_matched_folder_that_cannot_be_exported_is_a_failure_not_a_missing_folder(
    tmp_path: Path,
) -> None:
    account = courier_account()
    account.folders["INBOX.Broken"] = ScriptedFolder(status=b"(MESSAGES 1)")
    async with open_scripted_server(account) as server:
        result = await export(server, tmp_path / "Mail", folders=["Broken", "Sent"])
    assert [f.name for f in result.folders_failed] == ["INBOX.Broken"]
    assert [f.name for f in result.folders] == ["INBOX.Sent"]


async def refuse_namespace(session: ScriptedSession, command: ScriptedCommand) -> None:
    await session.send_line(f"{command.tag} NO NAMESPACE not today")


@pytest.mark.parametrize("how", ["no capability", "refused"])
async def test_without_a_namespace_answer_names_keep_their_prefix(tmp_path: Path, how: str) -> None:
    root = tmp_path / "Mail"
    options: dict[str, Any] = {}
    if how == "no capability":
        options["capabilities"] = [c for c in DEFAULT_CAPABILITIES if c != "NAMESPACE"]
    else:
        options["handlers"] = {"NAMESPACE": refuse_namespace}
    async with open_scripted_server(courier_account(), **options) as server:
        result = await export(server, root)
        names = server.command_names()
    assert result.complete
    assert (how == "refused") == ("NAMESPACE" in names)
    assert subfolders(root) == {
        ".INBOX.Archive",
        ".INBOX.Archive.2024",
        ".INBOX.Sent",
        ".shared.team",
    }


async def test_a_personal_folder_and_a_folder_outside_with_the_same_rest_stay_apart(
    tmp_path: Path,
) -> None:
    account = courier_account(("INBOX", "INBOX.team", "team"))
    root = tmp_path / "Mail"
    async with open_scripted_server(account) as server:
        first = await export(server, root)
        second = await export(server, root)
    paths = {f.name: f.path for f in first.folders}
    assert paths["INBOX.team"] != paths["team"]
    # Both want ".team"; the one that does not get it has ".team" with its hash appended.
    assert {paths["INBOX.team"].name, paths["team"].name} & {".team"}
    assert paths["INBOX.team"].name.startswith(".team")
    assert {p.name for p in paths.values()} - {"Mail"} <= subfolders(root)
    assert {f.name: f.path for f in second.folders} == paths  # the same on every run
    assert second.messages_fetched == 0


# -- the command line ----------------------------------------------------------------------------


def run_cli(server: Any, root: Path, *extra: str) -> int:
    argv = ["export", "--host", server.host, "--port", str(server.port), "--plain"]
    return main([*argv, "--user", "user", "--no-fsync", *extra, str(root)])


def test_the_cli_exports_courier_folders_chosen_with_slash_patterns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TRIO_IMAPPOOL_PASSWORD", "password")
    with start_scripted_server_thread(courier_account()) as server:
        assert run_cli(server, tmp_path / "a", "--folder", "Archive/*") == 0
        assert run_cli(server, tmp_path / "b", "--folder", "Archive") == 0
        capsys.readouterr()
        missing = run_cli(server, tmp_path / "c", "--folder", "Nope/*")
    assert subfolders(tmp_path / "a") == {".Archive.2024"}
    assert subfolders(tmp_path / "b") == {".Archive"}
    assert missing == EXIT_CODES["usage"] == 2
    err = capsys.readouterr().err
    assert "no folder on the server matches 'Nope/*'" in err
    assert "relative to the namespace 'INBOX.'" in err


def test_the_help_says_how_patterns_are_written(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "'/' between levels whatever the server's delimiter" in text
    assert "matches no folder" in text


# -- a real server: Cyrus configured as Courier is ------------------------------------------------


async def test_cyrus_with_an_inbox_prefix_exports_relative_names(
    cyrus_factory: CyrusFactory, tmp_path: Path
) -> None:
    server = cyrus_factory(altnamespace=False, unixhierarchysep=False)
    uids = seed_folders(server, {"INBOX": 1, "INBOX.Archive.2024": 3, "INBOX.Sent": 2})
    settings = server.pool_kwargs(tls=False)

    async def run(root: Path, **kwargs: Any) -> ExportResult:
        with trio.fail_after(60):
            async with open_pool(**settings, max_size=3) as pool:
                return await export_maildir(pool, root, fsync=False, **kwargs)

    everything = await run(tmp_path / "all")
    # Cyrus made INBOX.Archive a real (empty) folder when INBOX.Archive.2024 was created.
    assert subfolders(tmp_path / "all") == {".Archive", ".Archive.2024", ".Sent"}
    assert messages_in(tmp_path / "all" / ".Archive.2024") == len(uids["INBOX.Archive.2024"])
    assert messages_in(tmp_path / "all") == 1
    assert everything.complete

    chosen = await run(tmp_path / "chosen", folders=["Archive/*"])
    assert [f.name for f in chosen.folders] == ["INBOX.Archive.2024"]
    assert subfolders(tmp_path / "chosen") == {".Archive.2024"}
    with pytest.raises(FolderNotFoundError, match="matches 'Nope/\\*'"):
        await run(tmp_path / "none", folders=["Nope/*"])
