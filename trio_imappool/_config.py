"""The pool's configuration: one frozen, validated object, checked before anything is opened."""

from __future__ import annotations

import dataclasses
import math
import ssl as ssl_lib
from typing import Any

from ._errors import ConfigurationError

__all__ = ["PoolConfig"]

DEFAULT_MAX_SIZE = 10
"""Dovecot's default per-user-and-IP limit; Gmail allows about 15, Yahoo reportedly 5."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PoolConfig:
    """Everything :func:`~trio_imappool.open_pool` was told, validated.

    The password never appears in ``repr()`` (nor in any message of the pool).

    Attributes:
        host: The server's host name or address.
        port: The server's port (993 with implicit TLS, 143 otherwise, unless given).
        username: The account to log in as.
        password: Its password (masked in ``repr``).
        ssl: Implicit TLS (the default).
        starttls: Plain connection upgraded with STARTTLS (``ssl`` must then be False).
        ssl_context: The context for TLS; ``None`` means :func:`ssl.create_default_context`.
        min_size: Connections opened in the background and kept open.
        max_size: At most this many connections exist or are being opened at once.
        acquire_timeout: How long :meth:`~trio_imappool.Pool.connection` waits for a connection
            before :class:`~trio_imappool.PoolTimeout` (``math.inf`` to wait for ever; the
            caller's own cancel scopes apply either way).
        connect_timeout: Bound on TCP connect, TLS handshake and greeting.
        login_timeout: Bound on the login exchange.
        read_timeout: The socket timeout of every command: a server silent for this long makes
            the command fail with :class:`TimeoutError` and the connection is discarded.
        logout_timeout: How long closing the pool waits for LOGOUT before dropping connections.
        reset_on_release: Unselect the folder of a connection when it comes back to the pool.
        noop_check_after: A connection idle for longer than this is checked with a NOOP before
            it is handed out (``math.inf``: never).
        max_idle: Idle connections beyond ``min_size`` are closed after this long unused
            (``math.inf``: never).
        max_lifetime: Connections are closed and replaced after this long, each after a random
            90-100 % of it so that they do not all reconnect at once (``math.inf``: never).
        keepalive: Idle connections unused for this long get a NOOP, so that the server does
            not log them out (servers may after 30 minutes); ``None``: off.
        name: The pool's name, used in its log records and error messages.
    """

    host: str
    port: int
    username: str
    password: str = dataclasses.field(repr=False)
    ssl: bool = True
    starttls: bool = False
    ssl_context: ssl_lib.SSLContext | None = None
    min_size: int = 0
    max_size: int = DEFAULT_MAX_SIZE
    acquire_timeout: float = 30.0
    connect_timeout: float = 10.0
    login_timeout: float = 10.0
    read_timeout: float = 30.0
    logout_timeout: float = 5.0
    reset_on_release: bool = False
    noop_check_after: float = 60.0
    max_idle: float = 600.0
    max_lifetime: float = 3600.0
    keepalive: float | None = None
    name: str = ""

    @classmethod
    def build(cls, host: str, port: int | None = None, **options: Any) -> PoolConfig:
        """Validate the arguments of :func:`open_pool` and fill in the defaults.

        Raises:
            ConfigurationError: An argument is missing, of the wrong type or out of range.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigurationError(f"unknown option(s) for open_pool: {', '.join(unknown)}")
        _check_str("host", host)
        use_ssl = options.get("ssl", True)
        starttls = options.get("starttls", False)
        _check_bool("ssl", use_ssl)
        _check_bool("starttls", starttls)
        if use_ssl and starttls:
            raise ConfigurationError("ssl=True (implicit TLS) and starttls=True exclude each other")
        if port is None:
            port = 993 if use_ssl else 143
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ConfigurationError(f"port must be an int from 1 to 65535, not {port!r}")
        if "username" not in options or "password" not in options:
            raise ConfigurationError("open_pool needs username= and password=")
        _check_str("username", options["username"])
        if not isinstance(options["password"], str):
            raise ConfigurationError("password must be a str")
        context = options.get("ssl_context")
        if context is not None:
            if not isinstance(context, ssl_lib.SSLContext):
                raise ConfigurationError("ssl_context must be an ssl.SSLContext")
            if not (use_ssl or starttls):
                raise ConfigurationError("ssl_context was given but neither ssl nor starttls is on")
        min_size = options.get("min_size", 0)
        max_size = options.get("max_size", DEFAULT_MAX_SIZE)
        _check_int("min_size", min_size, minimum=0)
        _check_int("max_size", max_size, minimum=1)
        if min_size > max_size:
            raise ConfigurationError(f"min_size ({min_size}) is larger than max_size ({max_size})")
        for key in ("connect_timeout", "login_timeout", "read_timeout", "logout_timeout"):
            if key in options:
                _check_timeout(key, options[key], allow_inf=False)
        for key in ("acquire_timeout", "noop_check_after", "max_idle", "max_lifetime"):
            if key in options:
                _check_timeout(key, options[key], allow_inf=True)
        if options.get("keepalive") is not None:
            _check_timeout("keepalive", options["keepalive"], allow_inf=False)
        _check_bool("reset_on_release", options.get("reset_on_release", False))
        name = options.pop("name", None)
        if name is None:
            name = f"{options['username']}@{host}:{port}"
        _check_str("name", name)
        return cls(host=host, port=port, name=name, **options)


def _check_str(key: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"{key} must be a non-empty str, not {value!r}")


def _check_bool(key: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigurationError(f"{key} must be True or False, not {value!r}")


def _check_int(key: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{key} must be an int >= {minimum}, not {value!r}")


def _check_timeout(key: str, value: object, *, allow_inf: bool) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
    if ok and not allow_inf:
        ok = math.isfinite(value)  # type: ignore[arg-type]
    if not ok:
        kind = "a positive number of seconds" + (" (or math.inf)" if allow_inf else "")
        raise ConfigurationError(f"{key} must be {kind}, not {value!r}")
