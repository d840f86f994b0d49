"""The pytest plugin costs nothing in test suites that do not use it, and says what is missing.

pytest loads the ``trio_imappool`` entry point in every run of every project whose environment
has trio-imappool installed. These tests run small user test suites in subprocesses (a
temporary folder with one trivial test, outside this repository, so that none of our own
configuration applies) and check what the plugin imports and what it costs; and they check that
the fixtures name the package to install when a part of the test server is missing.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import _trio_imappool_pytest_plugin
from trio_imappool.testing import DovecotNotFoundError, _dovecot, start_dovecot

# What a test suite that never asks for a Dovecot must not pay for.
HEAVY = ("trio_imappool", "trio", "imapclient", "trio_util", "trustme", "outcome")

# The budget of the issue: a trivial suite with the plugin loaded at most this much slower.
BUDGET = 0.020


def _clean_env() -> dict[str, str]:
    env = dict(os.environ)
    for key in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS", "PYTHONPATH"):
        env.pop(key, None)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


@pytest.fixture
def user_suite(tmp_path: Path) -> Path:
    """A user's project: one trivial test, and an ini file so that pytest stops looking here."""
    (tmp_path / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    (tmp_path / "test_trivial.py").write_text(
        "def test_trivial():\n    assert 1 + 1 == 2\n", encoding="utf-8"
    )
    return tmp_path


def test_loading_the_plugin_imports_nothing_of_the_library(tmp_path: Path) -> None:
    code = (
        "import sys, time\n"
        "import pytest\n"
        "start = time.perf_counter()\n"
        "import _trio_imappool_pytest_plugin\n"
        "print(time.perf_counter() - start)\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    seconds, imported = result.stdout.splitlines()
    assert imported == "[]"
    # Once pytest is imported, the plugin is a few small definitions.
    assert float(seconds) < BUDGET, seconds


def test_the_entry_point_names_the_light_module() -> None:
    from importlib.metadata import entry_points

    (entry,) = [e for e in entry_points(group="pytest11") if e.name == "trio_imappool"]
    assert entry.value == "_trio_imappool_pytest_plugin"
    assert entry.load() is _trio_imappool_pytest_plugin


def _imports_of_a_run(suite: Path, *extra: str) -> dict[str, float]:
    """Run the suite under ``-X importtime``; return each module it imported, with the seconds
    its own import took."""
    result = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            *extra,
        ],
        cwd=suite,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout, result.stdout
    imports: dict[str, float] = {}
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and "|" in line and "self [us]" not in line:
            own, _cumulative, name = line.removeprefix("import time:").split("|")
            imports[name.strip()] = int(own) / 1e6
    return imports


def test_a_trivial_user_suite_is_at_most_20_ms_slower_with_the_plugin(user_suite: Path) -> None:
    # Wall and CPU time of whole runs vary by hundreds of milliseconds on a shared machine, so
    # compare what the runs import: the plugin's cost is the modules only its run imports.
    with_plugin = _imports_of_a_run(user_suite)
    without_plugin = _imports_of_a_run(user_suite, "-p", "no:trio_imappool")
    # (pytest imports the plugin module itself through importlib, which -X importtime does not
    # list; test_loading_the_plugin_imports_nothing_of_the_library times that import.)
    extra = {name: with_plugin[name] for name in with_plugin.keys() - without_plugin.keys()}
    assert set(extra) <= {"_trio_imappool_pytest_plugin"}, sorted(extra)
    assert sum(extra.values()) <= BUDGET, extra


# -- what is missing is named ---------------------------------------------------------------


def _fake_dovecot_without_imap(root: Path) -> tuple[Path, Path]:
    """A prefix that has ``sbin/dovecot`` and ``bin/doveadm`` but no ``lib/dovecot/imap``:
    what Debian's ``dovecot-core`` leaves without ``dovecot-imapd``."""
    (root / "sbin").mkdir()
    (root / "bin").mkdir()
    (root / "lib" / "dovecot").mkdir(parents=True)
    (root / "lib" / "dovecot" / "imap-hibernate").write_text("", encoding="utf-8")
    paths = root / "sbin" / "dovecot", root / "bin" / "doveadm"
    for path in paths:
        path.write_text("#!/bin/sh\nexit 1\n", encoding="utf-8")
        path.chmod(0o755)
    return paths


def test_dovecot_without_its_imap_server_is_named(tmp_path: Path) -> None:
    dovecot, doveadm = _fake_dovecot_without_imap(tmp_path)
    with (
        pytest.raises(DovecotNotFoundError, match="apt-get install dovecot-imapd") as missing,
        start_dovecot(dovecot_binary=dovecot, doveadm_binary=doveadm),
    ):
        pytest.fail("started")
    assert "dovecot-core" in str(missing.value)
    assert str(tmp_path / "lib" / "dovecot" / "imap") in str(missing.value)
    # With the program in place, the same layout passes this check.
    imap = tmp_path / "lib" / "dovecot" / "imap"
    imap.write_text("", encoding="utf-8")
    imap.chmod(0o755)
    assert _dovecot._find_imap(str(dovecot)) == str(imap)


def test_the_fixtures_name_the_missing_imap_server(tmp_path: Path) -> None:
    dovecot, doveadm = _fake_dovecot_without_imap(tmp_path)
    with contextlib.ExitStack() as stack, pytest.raises(pytest.fail.Exception) as failed:
        _trio_imappool_pytest_plugin._start(stack, dovecot_binary=dovecot, doveadm_binary=doveadm)
    assert "dovecot-imapd" in str(failed.value)


def test_the_fixtures_name_the_testing_extra_when_trustme_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "trustme", None)  # what a plain install looks like
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'trio-imappool\[testing\]'"):
        _dovecot._import_trustme()
    with contextlib.ExitStack() as stack, pytest.raises(pytest.fail.Exception) as failed:
        _trio_imappool_pytest_plugin._start(stack)
    assert "pip install 'trio-imappool[testing]'" in str(failed.value)


def test_the_demo_names_the_missing_imap_server(tmp_path: Path) -> None:
    dovecot, _doveadm = _fake_dovecot_without_imap(tmp_path)
    env = _clean_env()
    env["PATH"] = f"{dovecot.parent}{os.pathsep}{env.get('PATH', '')}"  # found first
    result = subprocess.run(
        [sys.executable, "-m", "trio_imappool", "demo", "--no-progress"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr  # not 1, "a bug"
    assert "apt-get install dovecot-imapd" in result.stderr
    assert "Traceback" not in result.stderr
