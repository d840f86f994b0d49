"""Settings: the command line, then TRIO_IMAPPOOL_* variables, then the TOML config file,
then the defaults; the password from a command, the environment or the terminal."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from trio_imappool.wire import DEFAULT_BATCH_SIZE, is_loopback

PROG = "trio-imappool"
ENV_PREFIX = "TRIO_IMAPPOOL_"

#: Exit status per kind of failure (see the module's documentation).
EXIT_CODES = {
    "ok": 0,
    "bug": 1,
    "usage": 2,
    "authentication": 3,
    "connection": 4,
    "tls": 5,
    "imap": 6,
    "local": 7,
    "partial": 8,
    "interrupted": 130,
    "output_closed": 141,
}

DEFAULT_CONNECTIONS = 4
_TLS_MODES = ("implicit", "starttls", "plain")
_AUTH_MODES = ("auto", "login", "plain", "xoauth2", "oauthbearer")


class UsageError(Exception):
    """A setting is missing or wrong; exit status 2."""


# -- settings: flags, then environment, then config file, then defaults ------------------------


@dataclasses.dataclass(frozen=True)
class _Key:
    name: str
    kind: type
    default: Any = None
    env: bool = True


_KEYS = {
    key.name: key
    for key in (
        _Key("host", str),
        _Key("port", int),
        _Key("user", str),
        _Key("password_command", str),
        _Key("auth", str, "auto"),
        _Key("tls", str, "implicit"),
        _Key("ca_file", str),
        _Key("insecure_plaintext", bool, False),
        _Key("insecure_skip_tls_verify", bool, False),
        _Key("connections", int, DEFAULT_CONNECTIONS),
        _Key("batch_size", int, DEFAULT_BATCH_SIZE),
        _Key("memory_budget", int, 64),  # MiB
        _Key("fsync", bool, True),
        _Key("delete", bool, False),
        _Key("maildir", str),
        _Key("folders", list, env=False),
        _Key("exclude", list, env=False),
        # The shared budget and the multi-account export (see _accounts).
        _Key("budget", str),
        _Key("budget_limit", int),
        _Key("budget_lease", int),
        _Key("accounts", str),
    )
}


def _parse_bool(text: str, where: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise UsageError(f"{where}: expected true or false, not {text!r}")


def _load_config(path: str) -> dict[str, Any]:
    import tomllib  # only with a config file: not on every run's start-up

    try:
        with open(os.path.expanduser(path), "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise UsageError(f"cannot read the config file {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path}: {exc}") from exc
    if "password" in data:
        raise UsageError(
            f"config file {path}: no passwords in config files; use password_command, "
            f"{ENV_PREFIX}PASSWORD or the prompt"
        )
    config: dict[str, Any] = {}
    for name, value in data.items():
        key = _KEYS.get(name.replace("-", "_"))
        if key is None:
            raise UsageError(f"config file {path}: unknown setting {name!r}")
        if key.kind is list:
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise UsageError(f"config file {path}: {name} must be a list of folder names")
        elif key.kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise UsageError(f"config file {path}: {name} must be an integer")
        elif not isinstance(value, key.kind):
            raise UsageError(f"config file {path}: {name} must be a {key.kind.__name__}")
        config[key.name] = value
    return config


class Settings:
    """The effective settings: each from a flag, else the environment, else the config file."""

    def __init__(
        self, args: argparse.Namespace, environ: dict[str, str] | os._Environ[str]
    ) -> None:
        self._args = args
        self._env = environ
        path = getattr(args, "config", None) or environ.get(f"{ENV_PREFIX}CONFIG")
        path = path or _default_config_file(args, environ)
        self._config = _load_config(path) if path else {}

    def get(self, name: str) -> Any:
        key = _KEYS[name]
        value = getattr(self._args, name, None)
        if value is not None:
            return value
        raw = self._env.get(ENV_PREFIX + name.upper()) if key.env else None
        if raw is not None and raw != "":
            where = ENV_PREFIX + name.upper()
            if key.kind is bool:
                return _parse_bool(raw, where)
            if key.kind is int:
                try:
                    return int(raw)
                except ValueError:
                    raise UsageError(f"{where}: expected an integer, not {raw!r}") from None
            return raw
        return self._config.get(name, key.default)

    def has_server(self) -> bool:
        return self.get("host") is not None

    def _secret(self, user: str, host: str) -> Callable[[], str]:
        """How to get the password or token: env, command, prompt; checked now."""
        command_flag = getattr(self._args, "password_command", None)
        env_password = self._env.get(f"{ENV_PREFIX}PASSWORD")
        command = command_flag or (None if env_password else self.get("password_command"))
        if command:
            return lambda: _run_password_command(command)
        if env_password:
            return lambda: env_password
        if sys.stdin is not None and sys.stdin.isatty():
            import getpass  # only when asking

            password = getpass.getpass(f"Password for {user} on {host}: ")
            return lambda: password
        raise UsageError(
            f"no password: set {ENV_PREFIX}PASSWORD, use --password-command, "
            "or run in a terminal to be asked"
        )

    def pool_options(self) -> dict[str, Any]:
        """Keyword arguments for open_pool (the secret included)."""
        host = self.get("host")
        user = self.get("user")
        if not host:
            raise UsageError(f"no server: give --host or set {ENV_PREFIX}HOST")
        if not user:
            raise UsageError(f"no user: give --user or set {ENV_PREFIX}USER")
        tls = self.get("tls")
        if tls not in _TLS_MODES:
            raise UsageError(f"tls must be one of {', '.join(_TLS_MODES)}, not {tls!r}")
        auth = str(self.get("auth")).lower()
        if auth not in _AUTH_MODES:
            raise UsageError(f"auth must be one of {', '.join(_AUTH_MODES)}, not {auth!r}")
        connections = self.get("connections")
        if connections < 1:
            raise UsageError("connections must be at least 1")
        if self.get("batch_size") < 1:
            raise UsageError("batch size must be at least 1")
        if self.get("memory_budget") < 1:
            raise UsageError("memory budget must be at least 1 MiB")
        if tls == "plain" and not self.get("insecure_plaintext") and not is_loopback(host):
            raise UsageError(
                f"refusing to send the password without TLS to {host}: use TLS (the default), "
                "--starttls, or --insecure-plaintext if you must"
            )
        options: dict[str, Any] = {
            "host": host,
            "port": self.get("port"),
            "username": user,
            "ssl": tls == "implicit",
            "starttls": tls == "starttls",
            "max_size": connections,
            "insecure_plaintext": self.get("insecure_plaintext"),
            "insecure_skip_tls_verify": self.get("insecure_skip_tls_verify"),
            # The command exits when its pool closes: LOGOUT is sent, its answer not awaited.
            "wait_for_logout": False,
        }
        if self.get("ca_file"):
            options["ca_file"] = os.path.expanduser(self.get("ca_file"))
        secret = self._secret(user, host)
        if auth in ("xoauth2", "oauthbearer"):
            first = secret()

            def token(refresh: bool) -> str:
                return secret() if refresh else first

            options["oauth2_token"] = token
            options["auth_mechanism"] = auth.upper()
        else:
            options["password"] = secret()
            options["auth_mechanism"] = "auto" if auth == "auto" else auth.upper()
        return options


def _run_password_command(command: str) -> str:
    """The first line of the command's standard output, without its line ending.

    The first line is the secret, as ``pass`` and tools like it print it (an entry's other lines
    hold metadata). Nothing of the output, nor the command's standard error, goes into an error
    message.
    """
    try:
        result = subprocess.run(
            command, shell=True, capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        reason = "timed out" if isinstance(exc, subprocess.TimeoutExpired) else type(exc).__name__
        raise UsageError(f"the password command failed ({reason})") from None
    if result.returncode != 0:
        raise UsageError(f"the password command failed with exit status {result.returncode}")
    secret = result.stdout.split("\n", 1)[0].rstrip("\r")
    if not secret:
        raise UsageError("the password command printed nothing on its first line")
    return secret


def _default_config_file(
    args: argparse.Namespace, environ: dict[str, str] | os._Environ[str]
) -> str | None:
    """The default config file, if it exists: ``$XDG_CONFIG_HOME/trio-imappool/config.toml``,
    else ``$HOME/.config/trio-imappool/config.toml``. Only for export and folders (the demo
    never reaches a real account unless told to)."""
    if getattr(args, "command", None) not in ("export", "folders"):
        return None
    base = environ.get("XDG_CONFIG_HOME", "")
    if not os.path.isabs(base):  # the XDG spec: a relative path is ignored
        home = environ.get("HOME", "")
        if not os.path.isabs(home):
            return None
        base = os.path.join(home, ".config")
    path = os.path.join(base, PROG, "config.toml")
    return path if os.path.isfile(path) else None
