"""Writing a batch of messages into Maildirs (``exporter._local._write_batch``), on the local
file system only."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from trio_imappool.exporter import ExportError
from trio_imappool.exporter._local import _Folder, _Pending, _write_batch
from trio_imappool.exporter._server import ServerFolder


def folder(root: Path, name: str) -> _Folder:
    path = root / name
    for sub in ("tmp", "cur", "new"):
        (path / sub).mkdir(parents=True)
    server = ServerFolder(name, "/", uidvalidity=7, uidnext=10, messages=3)
    return _Folder(server, path, set(), 1, None)


@pytest.mark.parametrize("broken_step", ["tmp", "cur"])
def test_a_write_batch_names_the_folder_it_could_not_write(
    tmp_path: Path, broken_step: str
) -> None:
    """A batch may hold several folders' messages: the error names the one that failed (it
    named the batch's first folder), and nothing of the batch reaches a ``cur/``."""
    first, second = folder(tmp_path, "Aaa"), folder(tmp_path, "Zzz")
    shutil.rmtree(second.path / broken_step)
    batch = [
        _Pending(first, 1, b"Subject: a\r\n\r\na\r\n", "S"),
        _Pending(second, 1, b"Subject: z\r\n\r\nz\r\n", ""),
    ]
    with pytest.raises(ExportError) as caught:
        _write_batch(batch, fsync=False)
    assert str(second.path) in str(caught.value)
    assert str(first.path) + ":" not in str(caught.value)
    assert isinstance(caught.value.__cause__, OSError)
    if broken_step == "tmp":
        assert os.listdir(first.path / "cur") == []  # written to tmp/ only, never linked


def test_a_write_batch_puts_every_message_in_its_folders_cur(tmp_path: Path) -> None:
    first, second = folder(tmp_path, "A"), folder(tmp_path, "B")
    batch = [_Pending(f, uid, b"m%d" % uid, "S") for f in (first, second) for uid in (1, 2)]
    _write_batch(batch, fsync=True)
    for f in (first, second):
        names = sorted(os.listdir(f.path / "cur"))
        assert names == [f"7-{uid}.trio-imappool,S=2:2,S" for uid in (1, 2)]
        assert os.listdir(f.path / "tmp") == []


def test_maildir_letters_are_remembered_for_a_bounded_number_of_flag_sets() -> None:
    from trio_imappool.exporter._run import _LETTERS_KEPT, _Run

    run = _Run([], fsync=False, progress=None)
    assert run._letters((b"\\Seen", b"\\Flagged")) == "FS"
    assert run._letters((b"\\Seen", b"\\Flagged")) == "FS"  # remembered
    assert run._letters([b"\\Answered"]) == "R"  # a list cannot be a key: worked out
    # A server making up a new keyword for every message does not grow the memory.
    for n in range(3 * _LETTERS_KEPT):
        assert run._letters((b"\\Draft", b"$k%d" % n)) == "D"
    assert len(run._letters_of) <= _LETTERS_KEPT
