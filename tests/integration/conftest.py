"""Shared fixtures and checks.

Rules for every test module here: only loopback addresses; servers on free ports chosen by the
harness; every test that does I/O runs under a deadline (pytest-timeout, plus ``fail_after``
where a hang is the failure being tested); cancellation tests end with
:func:`assert_settled`.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from trio_imappool import Pool
from trio_imappool.testing import DovecotServer, ImapServer

_accounts = itertools.count(1)


@pytest.fixture
def account(dovecot: DovecotServer) -> dict[str, Any]:
    """Pool settings (plain IMAP) for a fresh user of the shared Dovecot.

    A user of the test's own: kicking it or hitting its limits touches no other test.
    """
    name = f"user{next(_accounts)}"
    dovecot.add_user(name, f"{name}-pw")
    return dovecot.pool_kwargs(name, tls=False)


@pytest.fixture
def tls_account(dovecot: DovecotServer, account: dict[str, Any]) -> dict[str, Any]:
    """The same user as ``account``, over implicit TLS with the test CA."""
    return dovecot.pool_kwargs(account["username"], tls=True)


@pytest.fixture
def imap_account(imap_server: ImapServer) -> dict[str, Any]:
    """Pool settings (plain IMAP) for a fresh user of the shared Dovecot, then of the shared
    Cyrus: a test that takes it runs against both servers."""
    name = f"user{next(_accounts)}"
    imap_server.add_user(name, f"{name}-pw")
    return imap_server.pool_kwargs(name, tls=False)


@pytest.fixture
def python3_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the ``python3`` Jupyter kernel this interpreter, ahead of any other installed spec
    (for the notebook tests)."""
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (trio-imappool tests)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    # IPython's profile and history, and Jupyter's connection files, stay out of $HOME.
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))


def assert_consistent(pool: Pool) -> None:
    """The counts add up, whatever the pool is doing."""
    stats = pool.statistics()
    assert stats.size == stats.idle + stats.in_use + stats.opening, stats
    assert 0 <= stats.size <= stats.max_size, stats
    assert min(stats.idle, stats.in_use, stats.opening, stats.waiting) >= 0, stats
    assert pool.counts.value == (stats.size, stats.idle, stats.in_use, stats.opening, stats.waiting)


async def assert_settled(pool: Pool) -> None:
    """Nothing is checked out, nobody waits, and no worker thread is left running."""
    with trio.move_on_after(5):
        await pool.counts.wait_value(lambda c: c.in_use == 0 and c.waiting == 0 and c.opening == 0)
        await trio.testing.wait_all_threads_completed()
    counts = pool.counts.value
    assert (counts.in_use, counts.waiting, counts.opening) == (0, 0, 0), pool.statistics()
    assert trio.testing.active_thread_count() == 0
    assert_consistent(pool)
