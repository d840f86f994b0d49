"""The command line: ``trio-imappool demo`` runs end to end against its own Dovecot."""

from __future__ import annotations

import subprocess
import sys

import pytest

from trio_imappool.__main__ import main


def test_demo_runs_end_to_end_and_reports_what_the_pool_did() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trio_imappool", "demo", "--folders", "3", "--messages", "20"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "seeded 3 folders x 20 messages" in out
    folder_lines = [line for line in out.splitlines() if line.startswith("  ") and "bytes" in line]
    assert len(folder_lines) == 3 and all(" 20 messages " in line for line in folder_lines)
    assert "was discarded" in out
    assert "connections_discarded  1" in out
    assert "pool size back to 3" in out


def test_bad_arguments_exit_with_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["demo", "--max-size", "0"])
    assert info.value.code == 2
    assert "at least 1" in capsys.readouterr().err
