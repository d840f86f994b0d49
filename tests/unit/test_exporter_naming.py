"""The exporter's naming, without a server: folder names (hostile ones included) to Maildir++
directories inside the destination, personal-namespace prefixes, flags to info letters, and
message file names. (Moved from the integration files; the assertions are theirs.)"""

from __future__ import annotations

import os
from pathlib import Path

import hypothesis
import pytest
from hypothesis import strategies as st

from trio_imappool.exporter import (
    MAX_LOCAL_NAME,
    ServerFolder,
    local_folder_name,
    maildir_flags,
    maildir_folder_path,
    message_filename,
    parse_message_filename,
)
from trio_imappool.exporter._local import _assign_paths

# -- the Maildir side, no server -----------------------------------------------------------------


def test_imap_system_flags_map_to_maildir_letters_in_ascii_order() -> None:
    flags = [b"\\Seen", b"\\ANSWERED", b"\\Flagged", b"\\Deleted", b"\\Draft", b"\\Recent"]
    assert maildir_flags(flags) == "DFRST"
    assert maildir_flags([b"$Forwarded", "\\seen"]) == "S"
    assert maildir_flags([]) == ""


def test_folders_map_to_maildir_plus_plus_names_that_cannot_collide(tmp_path: Path) -> None:
    assert maildir_folder_path(tmp_path, "INBOX", "/") == tmp_path
    assert maildir_folder_path(tmp_path, "inbox", "/") == tmp_path
    assert maildir_folder_path(tmp_path, "Archive/2024", "/") == tmp_path / ".Archive.2024"
    assert maildir_folder_path(tmp_path, "Archive.2024", "/") == tmp_path / ".Archive%2E2024"
    assert maildir_folder_path(tmp_path, "a/b", ".") == tmp_path / ".a%2Fb"
    assert maildir_folder_path(tmp_path, "50%", "/") == tmp_path / ".50%25"
    assert maildir_folder_path(tmp_path, "Ünï", None) == tmp_path / ".Ünï"


def test_file_names_carry_uidvalidity_and_uid_whatever_the_flags_become() -> None:
    name = message_filename(1234, 56, 2000, "RS")
    assert name == "1234-56.trio-imappool,S=2000:2,RS"
    assert parse_message_filename(name) == (1234, 56)
    assert parse_message_filename(name.replace(":2,RS", ":2,FRST")) == (1234, 56)
    assert parse_message_filename("1234-56.trio-imappool,S=2000") == (1234, 56)
    assert parse_message_filename("1700000000.M1P2.host:2,S") is None


# -- the one mapping ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "delimiter", "local"),
    [
        ("INBOX", "/", ""),
        ("inbox", ".", ""),
        ("/", "/", ".%.%"),
        (".", ".", ".%.%"),
        ("..", "/", ".%2E%2E"),
        ("..", ".", ".%.%.%"),
        ("../x", "/", ".%2E%2E.x"),
        ("a/../../b", "/", ".a.%2E%2E.%2E%2E.b"),
        ("", "/", ".%"),
        ("a/b", "/", ".a.b"),
        ("a.b", "/", ".a%2Eb"),
        ("a.b", ".", ".a.b"),
        ("a/b", None, ".a%2Fb"),
        ("50%", "/", ".50%25"),
        ("x\x00y\r\n", "/", ".x%00y%0D%0A"),
        ("\udcff", "/", ".%uDCFF"),
        ("Ünï", None, ".Ünï"),
    ],
)
def test_the_mapping_rules(name: str, delimiter: str | None, local: str) -> None:
    assert local_folder_name(name, delimiter) == local


def test_an_over_long_name_is_shortened_stably_and_distinctly() -> None:
    long_a = "漢" * 90  # 270 bytes of UTF-8: over the file system's limit of 255
    long_b = "漢" * 89 + "字"
    a, b = local_folder_name(long_a, "/"), local_folder_name(long_b, "/")
    assert a != b
    assert a == local_folder_name(long_a, "/")  # stable
    assert len(a.encode()) <= MAX_LOCAL_NAME and len(b.encode()) <= MAX_LOCAL_NAME
    assert "%~" in a and a.startswith(".漢")
    escaped = local_folder_name("%" * 300, "/")
    assert len(escaped.encode()) <= MAX_LOCAL_NAME


@hypothesis.given(name=st.text(), delimiter=st.sampled_from(["/", ".", "\\", None, "%", "~"]))
@hypothesis.settings(max_examples=400, deadline=None)
def test_whatever_the_name_the_result_stays_inside(name: str, delimiter: str | None) -> None:
    root = Path("/dest")
    local = local_folder_name(name, delimiter)
    path = maildir_folder_path(root, name, delimiter)
    if name.upper() == "INBOX":
        assert local == "" and path == root
        return
    assert local.startswith(".") and local not in (".", "..") and not local.startswith("..")
    assert "/" not in local and "\x00" not in local
    assert len(local.encode("utf-8")) <= MAX_LOCAL_NAME
    assert path.parent == root and path.name == local
    assert Path(os.path.normpath(path)).parent == root


@hypothesis.given(a=st.text(), b=st.text(), delimiter=st.sampled_from(["/", ".", None]))
@hypothesis.settings(max_examples=300, deadline=None)
def test_distinct_names_map_to_distinct_directories(a: str, b: str, delimiter: str | None) -> None:
    hypothesis.assume(a != b and not (a.upper() == b.upper() == "INBOX"))
    assert local_folder_name(a, delimiter) != local_folder_name(b, delimiter)


@hypothesis.given(
    listed=st.lists(
        st.tuples(
            st.sampled_from(["INBOX", "Inbox", "a/b", "a.b", "", "/", ".", "..", "漢" * 90])
            | st.text(max_size=30),
            st.sampled_from(["/", ".", None]),
        ),
        max_size=12,
        unique_by=lambda pair: pair[0],
    )
)
@hypothesis.settings(max_examples=300, deadline=None)
def test_no_two_folders_ever_share_a_directory(listed: list[tuple[str, str | None]]) -> None:
    root = Path("/nonexistent-destination")
    servers = [ServerFolder(name, delimiter, 1, 1, 0) for name, delimiter in listed]
    placed, failures = _assign_paths(root, servers)
    assert not failures
    assert sorted(s.name for s, _ in placed) == sorted(name for name, _ in listed)
    paths = [path for _, path in placed]
    assert len(set(paths)) == len(paths)
    assert all(path == root or path.parent == root for path in paths)
    reordered = _assign_paths(root, list(reversed(servers)))[0]
    assert sorted((s.name, p) for s, p in reordered) == sorted((s.name, p) for s, p in placed)


# -- the naming rule -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("folder", "expected"),
    [
        ("INBOX", ""),
        ("INBOX.Archive", ".Archive"),
        ("INBOX.Archive.2024", ".Archive.2024"),
        ("inbox.Archive", ".Archive"),  # the INBOX of the prefix in any case
        ("shared.team", ".shared.team"),  # outside the personal namespace: the whole name
        ("INBOX.INBOX", ".INBOX.INBOX"),  # never the destination itself
        ("INBOXArchive", ".INBOXArchive"),
        ("INBOX.a/b", ".a%2Fb"),
    ],
)
def test_local_names_are_relative_to_the_personal_namespace(folder: str, expected: str) -> None:
    assert local_folder_name(folder, ".", "INBOX.") == expected
    assert maildir_folder_path("/m", folder, ".", "INBOX.") == Path("/m", expected)


def test_without_a_prefix_local_names_are_what_they_were() -> None:
    """Dovecot, Cyrus with altnamespace, Gmail: prefix ``""``, the names of earlier exports."""
    for name, delimiter in [("INBOX", "/"), ("Archive/2024", "/"), ("INBOX.Archive", ".")]:
        assert local_folder_name(name, delimiter, "") == local_folder_name(name, delimiter)
    assert local_folder_name("INBOX.Archive", ".") == ".INBOX.Archive"
    long = "INBOX." + "x" * 300  # shortened with the hash of the whole name: stable, distinct
    assert local_folder_name(long, ".", "INBOX.") != local_folder_name("x" * 300, ".", "INBOX.")


PREFIXES = st.sampled_from(["INBOX.", "inbox.", "INBOX/", "~/", "#mh/", ""])
NAMES = st.sampled_from(["INBOX", "INBOX.", "INBOX.INBOX", "INBOX..", "INBOX./", "x"]) | st.text()


@hypothesis.given(name=NAMES, delimiter=st.sampled_from(["/", ".", None]), prefix=PREFIXES)
@hypothesis.settings(max_examples=400, deadline=None)
def test_whatever_the_name_and_prefix_the_result_stays_inside(
    name: str, delimiter: str | None, prefix: str
) -> None:
    local = local_folder_name(name, delimiter, prefix)
    if name.upper() == "INBOX":
        assert local == ""
        return
    assert local.startswith(".") and local not in (".", "..") and not local.startswith("..")
    assert "/" not in local and "\x00" not in local
    assert len(local.encode("utf-8")) <= MAX_LOCAL_NAME


@hypothesis.given(
    names=st.lists(NAMES, max_size=10, unique=True),
    delimiter=st.sampled_from(["/", "."]),
    prefix=PREFIXES,
)
@hypothesis.settings(max_examples=300, deadline=None)
def test_under_a_prefix_no_two_folders_share_a_directory(
    names: list[str], delimiter: str, prefix: str
) -> None:
    root = Path("/nonexistent-destination")
    servers = [ServerFolder(name, delimiter, 1, 1, 0, namespace=prefix) for name in names]
    placed, failures = _assign_paths(root, servers)
    assert not failures
    paths = [path for _, path in placed]
    assert sorted(s.name for s, _ in placed) == sorted(names)
    assert len(set(paths)) == len(paths)
    assert all(path == root or path.parent == root for path in paths)
