"""The command line's shared budget and its multi-account export (``export --accounts``).

``export --budget redis://HOST:PORT/DB --budget-limit N`` gives the export's pool a
:class:`~trio_imappool.RedisBudget`, so a cron export beside a service shares the account's cap.

``export --accounts FILE --budget URL MAILDIR`` exports many accounts, each into
``MAILDIR/<account>``. Several workers, on one machine or several, started with the same file and
the same ``--budget`` Redis share the list: a worker claims an account with a lease in Redis
(renewed while it exports), exports it, and marks it done; a worker that dies loses its claim
after the lease and another one finishes the account (the export resumes where it stopped).
Each worker prints the accounts it exported. Done marks last :data:`DONE_TTL` seconds: workers
started within that time of each other form one run.

The accounts file is TOML, one table per account::

    [accounts.alice]
    user = "alice@example.org"          # default: the table's name
    password_command = "pass show imap/alice"   # or password_env = "ALICE_PASSWORD"
    host = "imap.example.org"           # default: --host

or plain text, one user name per line (``#`` starts a comment), each password in the variable
``TRIO_IMAPPOOL_PASSWORD_<USER>`` (the name upper-cased, other characters than letters and digits
as ``_``), else from ``--password-command``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import os
import re
import sys
from pathlib import Path
from typing import Any, Final, TextIO

import trio

from trio_imappool import BudgetUnavailableError, RedisBudget, open_pool
from trio_imappool.exporter import ExportError, export_maildir

from ._errors import classify
from ._settings import EXIT_CODES, Settings, UsageError

__all__ = ["add_arguments", "budget_options", "run_accounts"]

#: Seconds a done mark stays: workers started within this time of each other form one run.
DONE_TTL: Final = 3600
#: Seconds between two looks for accounts claimed by workers that may have died.
RETRY_EVERY: Final = 0.5

# KEYS: 1 the account's claim, 2 the run's done set. ARGV: account, owner, lease ms.
_CLAIM = """
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then return 'done' end
if redis.call('SET', KEYS[1], ARGV[2], 'NX', 'PX', ARGV[3]) then return 'claimed' end
if redis.call('GET', KEYS[1]) == ARGV[2] then return 'claimed' end
return 'busy'
"""
# ARGV: owner, lease ms. Returns 1 while the claim is still ours.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
# ARGV: account, owner, done ttl s (0: give the claim up without marking it done).
_FINISH = """
if tonumber(ARGV[3]) > 0 then
  redis.call('SADD', KEYS[2], ARGV[1])
  redis.call('EXPIRE', KEYS[2], ARGV[3])
end
if redis.call('GET', KEYS[1]) == ARGV[2] then redis.call('DEL', KEYS[1]) end
return 1
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The export command's ``--budget``, ``--budget-limit``, ``--budget-lease``, ``--accounts``."""
    group = parser.add_argument_group("shared budget (Redis; needs the redis extra)")
    group.add_argument(
        "--budget",
        metavar="URL",
        help="share the account's connection limit through this Redis (redis://HOST:PORT/DB)",
    )
    group.add_argument(
        "--budget-limit",
        type=int,
        metavar="N",
        help="connections of the account across every process (default: --connections)",
    )
    group.add_argument(
        "--budget-lease",
        type=int,
        metavar="S",
        help="seconds a dead worker's places and accounts stay taken (default 30)",
    )
    group.add_argument(
        "--accounts",
        metavar="FILE",
        help="export every account of FILE into MAILDIR/<account>, shared with the other "
        "workers started with the same --budget",
    )


def _budget(settings: Any, connections: int) -> RedisBudget | None:
    url = settings.get("budget")
    if not url:
        if settings.get("accounts"):
            raise UsageError("--accounts needs --budget (the Redis the workers share)")
        return None
    limit = settings.get("budget_limit") or connections
    lease = settings.get("budget_lease") or 30
    if limit < 1 or lease < 3:
        raise UsageError("budget limit must be at least 1 and budget lease at least 3 s")
    try:
        return RedisBudget(url, limit=limit, lease=float(lease), timeout=min(1.0, lease / 3))
    except Exception as exc:
        raise UsageError(f"--budget: {exc}") from None


def budget_options(settings: Any, options: dict[str, Any]) -> dict[str, Any]:
    """``{"budget": RedisBudget}`` for open_pool when ``budget`` is set, else ``{}``."""
    budget = _budget(settings, options["max_size"])
    return {} if budget is None else {"budget": budget}


def _env_name(user: str) -> str:
    return "TRIO_IMAPPOOL_PASSWORD_" + re.sub(r"[^A-Za-z0-9]", "_", user).upper()


def _load_accounts(path: Path) -> dict[str, dict[str, str]]:
    """Account name -> its settings (``user``, ``host``, ``password_command``, ``password_env``)."""
    import tomllib  # only with --accounts: not on every run's start-up

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"accounts file {path}: {exc.strerror}") from None
    accounts: dict[str, dict[str, str]] = {}
    if path.suffix == ".toml" or "[accounts" in text:
        try:
            tables = tomllib.loads(text).get("accounts", {})
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"accounts file {path}: {exc}") from None
        for name, table in tables.items():
            if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
                raise UsageError(f"accounts file {path}: [accounts.{name}] must hold strings")
            unknown = set(table) - {"user", "host", "password_command", "password_env"}
            if unknown:
                raise UsageError(f"accounts file {path}: unknown {', '.join(sorted(unknown))}")
            accounts[name] = {"user": name, **table}
    else:
        for line in text.splitlines():
            name = line.split("#", 1)[0].strip()
            if name:
                accounts[name] = {"user": name, "password_env": _env_name(name)}
    for name in accounts:
        if not name or "/" in name or name.startswith("."):
            raise UsageError(f"accounts file {path}: {name!r} cannot name a folder")
    if not accounts:
        raise UsageError(f"accounts file {path}: no accounts")
    return accounts


def _account_options(args: argparse.Namespace, account: dict[str, str]) -> dict[str, Any]:
    """open_pool options for one account: the command line's, with its user and secret."""
    ns = copy.copy(args)
    ns.user = account["user"]
    if account.get("host"):
        ns.host = account["host"]
    environ = {k: v for k, v in os.environ.items() if k != "TRIO_IMAPPOOL_PASSWORD"}
    if account.get("password_command"):
        ns.password_command = account["password_command"]
    elif account.get("password_env"):
        secret = os.environ.get(account["password_env"])
        if secret is None and not getattr(args, "password_command", None):
            raise UsageError(f"no password for {account['user']}: set {account['password_env']}")
        if secret is not None:
            environ["TRIO_IMAPPOOL_PASSWORD"] = secret
            ns.password_command = None
    options: dict[str, Any] = Settings(ns, environ).pool_options()
    return options


def run_accounts(args: argparse.Namespace, settings: Any, out: TextIO) -> int:
    """``export --accounts``: export the accounts this worker can claim; returns the status."""
    maildir = args.maildir or settings.get("maildir")
    if not maildir:
        raise UsageError("no destination: give MAILDIR (or maildir in the config file)")
    path = Path(os.path.expanduser(settings.get("accounts")))
    accounts = _load_accounts(path)
    connections = settings.get("connections")
    budget = _budget(settings, connections)
    assert budget is not None
    options = {name: _account_options(args, account) for name, account in accounts.items()}
    run = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    with budget:
        return trio.run(
            _work, budget, run, options, Path(os.path.expanduser(maildir)), settings, out
        )


async def _work(
    budget: RedisBudget,
    run: str,
    options: dict[str, dict[str, Any]],
    root: Path,
    settings: Any,
    out: TextIO,
) -> int:
    owner = budget.new_place()
    lease_ms = int(budget.lease * 1000)
    done_key = f"trio-imappool:accounts:{run}:done"
    status = 0

    def claim_key(name: str) -> str:
        return f"trio-imappool:accounts:{run}:claim:{name}"

    async def keep_claim(name: str, cancel: trio.CancelScope) -> None:
        while True:
            await trio.sleep(budget.lease / 3)
            try:
                ours = await budget.run_script(_RENEW, [claim_key(name)], [owner, lease_ms])
            except BudgetUnavailableError:
                continue
            if not ours:  # another worker has it now: stop, it will finish the account
                cancel.cancel()
                return

    left = set(options)
    while left:
        busy = False
        for name in sorted(left):
            keys = [claim_key(name), done_key]
            try:
                state = await budget.run_script(_CLAIM, keys, [name, owner, lease_ms])
            except BudgetUnavailableError as exc:
                print(f"{name}: {exc}; trying again", file=sys.stderr)
                busy = True
                break
            state = state.decode() if isinstance(state, bytes) else str(state)
            if state == "done":
                left.discard(name)
                continue
            if state == "busy":
                busy = True
                continue
            opts = dict(options[name])
            host, port = opts.pop("host"), opts.pop("port")
            finished = False
            report = ""
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(keep_claim, name, nursery.cancel_scope)
                    async with open_pool(host, port, **opts, budget=budget) as pool:
                        result = await export_maildir(
                            pool,
                            root / name,
                            folders=settings.get("folders"),
                            exclude=settings.get("exclude") or (),
                            batch_size=settings.get("batch_size"),
                            memory_budget=settings.get("memory_budget") * 1024 * 1024,
                            max_connections=opts["max_size"],
                            fsync=settings.get("fsync"),
                            delete=bool(settings.get("delete")),
                        )
                    finished = True
                    nursery.cancel_scope.cancel()
            except ExportError as exc:
                if "cannot lock" not in str(exc):
                    raise
                # Another worker is on it (a claim that lapsed): leave it to that one.
                busy = True
                await budget.run_script(_FINISH, keys, [name, owner, 0])
                continue
            except Exception as exc:
                kind, message = classify(exc)
                report = f"{name}: FAILED: {message}"
                status = status or EXIT_CODES[kind]
                finished = True
            else:
                if finished:
                    report = f"{name}: exported {result.messages_fetched} messages"
                    removed = sum(f.removed for f in result.folders)
                    if removed:  # only with --delete
                        report += f", removed {removed} gone from the server"
            if finished:
                await budget.run_script(_FINISH, keys, [name, owner, DONE_TTL])
                left.discard(name)
                # Reported once marked done: a worker killed after its line leaves no account
                # for another worker to export (and report) again.
                print(report, file=out, flush=True)
            else:
                busy = True  # our claim lapsed: another worker has the account
        if left and busy:
            await trio.sleep(RETRY_EVERY)
    return status
