"""The types a user of the library sees, checked with mypy as a user would run it.

``typing/user_ok.py`` (beside this file) is a user program that must pass ``mypy --strict``;
``typing/user_mistakes.py`` holds mistakes that must each be reported, on the line that carries
an ``# E: <part of the message>`` comment, and nothing else may be reported. Both run in
a subprocess from the repository's root (with its mypy settings, which the typed package
needs for the untyped imapclient and trio-util).

And the same mistakes still fail at run time, where no type checker looked.
"""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import imapclient
import pytest

import trio_imappool
from trio_imappool import COMMANDS, ConfigurationError, IMAPCommands

ROOT = Path(__file__).resolve().parents[2]
TYPING = Path(__file__).resolve().parent / "typing"
_ERROR = re.compile(r"^(?P<path>[^:]+):(?P<line>\d+): error: (?P<message>.*?)(  \[[a-z-]+\])?$")


def _mypy(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _errors(output: str) -> list[tuple[int, str]]:
    found = []
    for line in output.splitlines():
        match = _ERROR.match(line)
        if match:
            found.append((int(match["line"]), match["message"]))
    return found


def _expected(path: Path) -> list[tuple[int, str]]:
    expected: list[tuple[int, str]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        for part in line.split("  # E: ", 1)[1:]:
            expected.extend((number, text.strip()) for text in part.split(" # E: "))
    return expected


def test_a_correct_user_program_passes_mypy_strict() -> None:
    result = _mypy(TYPING / "user_ok.py")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success: no issues found in 1 source file" in result.stdout


def test_every_mistake_in_a_user_program_is_reported() -> None:
    path = TYPING / "user_mistakes.py"
    expected = _expected(path)
    assert len(expected) >= 15
    result = _mypy(path)
    assert result.returncode == 1, result.stdout + result.stderr
    found = _errors(result.stdout)
    unmatched = list(found)
    missing = []
    for line, text in expected:
        hit = next((e for e in unmatched if e[0] == line and text in e[1]), None)
        if hit is None:
            missing.append((line, text))
        else:
            unmatched.remove(hit)
    assert missing == [], f"not reported:\n{missing}\nmypy said:\n{result.stdout}"
    assert unmatched == [], f"reported but not expected:\n{unmatched}"


def test_the_typed_commands_are_the_connection_commands_with_imapclients_parameters() -> None:
    declared = {
        name
        for name, value in vars(IMAPCommands).items()
        if not name.startswith("_") and callable(value)
    }
    assert declared == set(COMMANDS)
    for name in COMMANDS:
        ours = list(inspect.signature(getattr(IMAPCommands, name)).parameters)
        theirs = list(inspect.signature(getattr(imapclient.IMAPClient, name)).parameters)
        assert ours == theirs, name


async def test_the_mistakes_also_fail_at_run_time() -> None:
    options: dict[str, object] = {"usernme": "u", "password": "p"}
    with pytest.raises(ConfigurationError, match=r"unknown option.*usernme"):
        async with trio_imappool.open_pool("imap.example.org", **options):  # type: ignore[arg-type]
            pytest.fail("opened")
    with pytest.raises(ConfigurationError, match="max_size"):
        trio_imappool.PoolConfig.build(
            "imap.example.org",
            username="u",
            password="p",
            max_size="8",  # type: ignore[arg-type]
        )
