"""``trio-imappool export --budget`` and ``--accounts``: workers sharing accounts through Redis.

Rules: loopback only; a Dovecot of the test's own with 20 seeded users and a private Redis;
the workers are real ``python -m trio_imappool`` processes; every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from trio_imappool.cli import main
from trio_imappool.testing import DovecotServer, RedisServer, seed_folders
from trio_imappool.testing._dovecot import DovecotFactory

USERS = {f"u{i}": f"pw{i}" for i in range(20)}
FOLDERS = {"INBOX": 40, "Archive": 40}


@pytest.fixture
def server(dovecot_factory: DovecotFactory) -> DovecotServer:
    server = dovecot_factory(users=USERS, max_userip_connections=3)
    for user in USERS:
        seed_folders(server, FOLDERS, user=user, size=1000)
    return server


def messages_in(maildir: Path) -> list[str]:
    return sorted(p.name for p in maildir.rglob("*") if p.parent.name in ("cur", "new"))


def environ(server: DovecotServer) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_IMAPPOOL_")}
    for user, password in USERS.items():
        env[f"TRIO_IMAPPOOL_PASSWORD_{user.upper()}"] = password
    return env


def test_export_with_a_budget_shares_the_account_limit(
    server: DovecotServer,
    redis_server: RedisServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("TRIO_IMAPPOOL_PASSWORD", USERS["u0"])
    argv = ["export", "--host", "127.0.0.1", "--port", str(server.imap_port), "--plain"]
    argv += ["--user", "u0", "-c", "4", "--budget", redis_server.url, "--budget-limit", "2"]
    assert main([*argv, str(tmp_path / "out")]) == 0
    assert len(messages_in(tmp_path / "out")) == 80
    # Redis unreachable: the export fails as a connection error naming Redis (exit status 4).
    redis_server.stop()
    assert main([*argv, str(tmp_path / "again")]) == 4
    assert "Redis at redis://127.0.0.1" in capsys.readouterr().err


def test_three_workers_export_twenty_accounts_once_each_even_when_one_is_killed(
    server: DovecotServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    accounts = tmp_path / "accounts.txt"
    accounts.write_text("\n".join(USERS) + "\n", encoding="utf-8")
    out = tmp_path / "mail"
    argv = [sys.executable, "-m", "trio_imappool", "export", "--accounts", str(accounts)]
    argv += ["--budget", redis_server.url, "--budget-lease", "3", "--budget-limit", "2"]
    argv += ["--host", "127.0.0.1", "--port", str(server.imap_port), "--plain", "-c", "2"]
    argv += [str(out)]
    env = environ(server)
    workers = [
        subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    lines: list[list[str]] = [[] for _ in workers]

    def read(i: int) -> None:
        stdout = workers[i].stdout
        assert stdout is not None
        for line in stdout:
            lines[i].append(line.strip())

    readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(3)]
    for reader in readers:
        reader.start()
    try:
        deadline = time.monotonic() + 60
        while not lines[0] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert lines[0], "worker 0 exported nothing"
        workers[0].send_signal(signal.SIGKILL)  # most likely in the middle of its next account
        for worker in workers[1:]:
            assert worker.wait(90) == 0, worker.stderr.read() if worker.stderr else ""
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
            worker.wait(5)
        for reader in readers:
            reader.join(5)
        for worker in workers:
            for stream in (worker.stdout, worker.stderr):
                if stream is not None:
                    stream.close()
    done = [line.split(":")[0] for worker_lines in lines for line in worker_lines]
    print(f"worker 0 (killed) did {lines[0]}; 1 did {len(lines[1])}, 2 did {len(lines[2])}")
    assert sorted(done) == sorted(USERS)  # each account reported once, by one worker
    assert all("exported" in line for worker_lines in lines for line in worker_lines)
    assert lines[1] and lines[2]
    for user in USERS:
        names = messages_in(out / user)
        assert len(names) == 80, (user, len(names))
