"""The pool's configuration: one frozen, validated object, checked before anything is opened."""

from __future__ import annotations

import dataclasses
import math
import ssl as ssl_lib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal, Required, TypeAlias, TypedDict, Unpack

from ._errors import ConfigurationError
from ._util import is_loopback

if TYPE_CHECKING:
    import trio

    from ._budget_redis import RedisBudget

__all__ = [
    "AccountOptions",
    "AuthMechanism",
    "ConfigOptions",
    "GroupOptions",
    "PoolConfig",
    "PoolOptions",
    "TokenProvider",
    "check_wire_text",
]

#: ``provider(refresh) -> token``, sync or async: see ``PoolConfig.oauth2_token``.
TokenProvider: TypeAlias = Callable[[bool], str | Awaitable[str]]

#: The values of ``auth_mechanism``.
AuthMechanism: TypeAlias = Literal["auto", "LOGIN", "PLAIN", "XOAUTH2", "OAUTHBEARER"]


class AccountOptions(TypedDict, total=False):
    """The options of one account's pool that a pool group passes on (see
    :func:`~trio_imappool.open_pool_group`): every field of :class:`PoolConfig` but ``host``,
    ``port``, ``username`` and ``max_size``. All optional; see :class:`PoolConfig` for each.

    A type checker holds the keyword arguments of :func:`~trio_imappool.open_pool`,
    :func:`~trio_imappool.open_pool_group` and :meth:`PoolConfig.build` to these names and
    types; at run time the same checks raise :class:`~trio_imappool.ConfigurationError`.
    """

    password: str | None
    oauth2_token: TokenProvider | None
    auth_mechanism: AuthMechanism
    ssl: bool
    starttls: bool
    ssl_context: ssl_lib.SSLContext | None
    ca_file: str | None
    insecure_skip_tls_verify: bool
    insecure_plaintext: bool
    min_size: int
    acquire_timeout: float
    connect_timeout: float
    login_timeout: float
    read_timeout: float
    logout_timeout: float
    wait_for_logout: bool
    reset_on_release: bool
    noop_check_after: float
    max_idle: float
    max_lifetime: float
    keepalive: float | None
    name: str | None


class ConfigOptions(AccountOptions, total=False):
    """The keyword arguments of :meth:`PoolConfig.build`: :class:`AccountOptions`, plus
    ``username`` (required) and ``max_size``."""

    username: Required[str]
    max_size: int


class PoolOptions(ConfigOptions, total=False):
    """The keyword arguments of :func:`~trio_imappool.open_pool`: :class:`ConfigOptions`, plus
    the limiters shared between pools."""

    #: A :class:`trio.CapacityLimiter` for the worker threads (default: the pool's own, with
    #: ``max_size`` tokens).
    thread_limiter: trio.CapacityLimiter | None
    #: A :class:`trio.CapacityLimiter` shared with other pools as a global cap on their
    #: connections.
    connection_limiter: trio.CapacityLimiter | None
    #: A :class:`~trio_imappool.RedisBudget`: the account's connections shared with other
    #: processes and hosts.
    budget: RedisBudget | None


class GroupOptions(AccountOptions, total=False):
    """The keyword arguments of :func:`~trio_imappool.open_pool_group` passed on to every
    account's pool: :class:`AccountOptions`, plus a budget shared by every process."""

    #: A :class:`~trio_imappool.RedisBudget` (without a ``key``): one budget per account, in
    #: Redis, with its ``limit`` as the cap of each account across all processes.
    budget: RedisBudget | None


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
        password: Its password (masked in ``repr``). Either this or ``oauth2_token``.
        oauth2_token: A token provider for XOAUTH2/OAUTHBEARER: called as
            ``oauth2_token(refresh)`` each time a connection is opened, sync or async, it returns
            an access token; ``refresh`` is True when the server rejected the last one.
        auth_mechanism: ``"auto"`` (LOGIN, or AUTHENTICATE PLAIN where the server disables
            LOGIN; XOAUTH2 with a token), or one of ``"LOGIN"``, ``"PLAIN"``, ``"XOAUTH2"``,
            ``"OAUTHBEARER"``.
        ssl: Implicit TLS (the default).
        starttls: Plain connection upgraded with STARTTLS (``ssl`` must then be False). The
            upgrade is required: a server without STARTTLS is refused, never used in plaintext.
        ssl_context: The context for TLS, used as given (it must verify certificates unless
            ``insecure_skip_tls_verify``, and allow nothing older than TLS 1.2). Without it the
            pool makes one: the system's trust store (or ``ca_file``), host names checked,
            TLS 1.2 or newer.
        ca_file: A PEM file of CA certificates to trust instead of the system's.
        insecure_skip_tls_verify: Accept any certificate for any name. Anyone on the network
            path can then read the credentials; logged as a warning once per pool.
        insecure_plaintext: Allow a connection without TLS to a host that is not a loopback
            address (credentials in the clear); logged as a warning once per pool.
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
        wait_for_logout: Whether the pool waits for the server's answer to the LOGOUT it sends
            when it closes a healthy connection (at close, and when one is retired). False: it
            writes LOGOUT and closes the socket at once, one round trip sooner; the server
            ends the session on reading the LOGOUT (or the close). For a program that exits
            when its pool closes (the command line does). With a ``budget`` the connection's
            place still goes back only once the server has closed its end.
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
    password: str | None = dataclasses.field(default=None, repr=False)
    oauth2_token: TokenProvider | None = dataclasses.field(default=None, repr=False)
    auth_mechanism: AuthMechanism = "auto"
    ssl: bool = True
    starttls: bool = False
    ssl_context: ssl_lib.SSLContext | None = None
    ca_file: str | None = None
    insecure_skip_tls_verify: bool = False
    insecure_plaintext: bool = False
    min_size: int = 0
    max_size: int = DEFAULT_MAX_SIZE
    acquire_timeout: float = 30.0
    connect_timeout: float = 10.0
    login_timeout: float = 10.0
    read_timeout: float = 30.0
    logout_timeout: float = 5.0
    wait_for_logout: bool = True
    reset_on_release: bool = False
    noop_check_after: float = 60.0
    max_idle: float = 600.0
    max_lifetime: float = 3600.0
    keepalive: float | None = None
    name: str = ""

    @classmethod
    def build(
        cls, host: str, port: int | None = None, **settings: Unpack[ConfigOptions]
    ) -> PoolConfig:
        """Validate the arguments of :func:`open_pool` and fill in the defaults.

        Args:
            host: The server's host name or address.
            port: The server's port; 993 with implicit TLS (the default), else 143.
            **settings: The other fields (:class:`ConfigOptions`): ``username`` and
                ``password`` or ``oauth2_token`` are required.

        Raises:
            ConfigurationError: An argument is missing, unknown, of the wrong type or out of
                range (also when a type checker would have said so).
        """
        options: dict[str, Any] = dict(settings)
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
        _check_credentials(options)
        for key in ("insecure_skip_tls_verify", "insecure_plaintext"):
            _check_bool(key, options.get(key, False))
        if not (use_ssl or starttls):
            if options.get("ssl_context") is not None or options.get("ca_file") is not None:
                raise ConfigurationError(
                    "ssl_context or ca_file was given but neither ssl nor starttls is on"
                )
            if not is_loopback(host) and not options.get("insecure_plaintext", False):
                raise ConfigurationError(
                    f"refusing to send credentials without TLS to {host}: use ssl=True "
                    "(port 993) or starttls=True, or pass insecure_plaintext=True if you must"
                )
        else:
            options["ssl_context"] = _tls_context(options)
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
        _check_bool("wait_for_logout", options.get("wait_for_logout", True))
        name = options.pop("name", None)
        if name is None:
            name = f"{options['username']}@{host}:{port}"
        _check_str("name", name)
        return cls(host=host, port=port, name=name, **options)


MECHANISMS = ("auto", "LOGIN", "PLAIN", "XOAUTH2", "OAUTHBEARER")


def _check_credentials(options: dict[str, Any]) -> None:
    if "username" not in options:
        raise ConfigurationError("open_pool needs username=")
    _check_str("username", options["username"])
    password = options.get("password")
    token = options.get("oauth2_token")
    if (password is None) == (token is None):
        raise ConfigurationError("open_pool needs either password= or oauth2_token=")
    if password is not None and not isinstance(password, str):
        raise ConfigurationError("password must be a str")
    check_wire_text("username", options["username"])
    if password is not None:
        check_wire_text("password", password)
    if token is not None and not callable(token):
        raise ConfigurationError("oauth2_token must be a callable returning an access token")
    mechanism = options.get("auth_mechanism", "auto")
    if mechanism not in MECHANISMS:
        raise ConfigurationError(f"auth_mechanism must be one of {', '.join(MECHANISMS)}")
    oauth = mechanism in ("XOAUTH2", "OAUTHBEARER")
    if mechanism != "auto" and oauth != (token is not None):
        need = "oauth2_token=" if oauth else "password="
        raise ConfigurationError(f"auth_mechanism={mechanism!r} needs {need}")


_FORBIDDEN = ("\r", "\n", "\0")


def check_wire_text(what: str, value: str) -> None:
    """Refuse a string that would break the IMAP command it is put into.

    CR and LF end a command line, so a user name, password, token or folder name holding one
    would let the rest be read as a command of its own (imaplib sends the user name of LOGIN
    unquoted and keeps CR/LF inside a quoted password); NUL is not allowed in IMAP text at
    all. The message names *what* was refused and never any part of the value (it may be a
    secret).

    Raises:
        ConfigurationError: *value* holds CR, LF or NUL.
    """
    if any(ch in value for ch in _FORBIDDEN):
        raise ConfigurationError(
            f"{what} contains a line break (CR or LF) or NUL, which IMAP cannot carry: refused"
        )


def _tls_context(options: dict[str, Any]) -> ssl_lib.SSLContext:
    """The context the pool will use: the caller's, checked, or one made here."""
    context = options.get("ssl_context")
    ca_file = options.get("ca_file")
    insecure = options.get("insecure_skip_tls_verify", False)
    if context is not None:
        if not isinstance(context, ssl_lib.SSLContext):
            raise ConfigurationError("ssl_context must be an ssl.SSLContext")
        if ca_file is not None:
            raise ConfigurationError("give ssl_context or ca_file, not both")
        if not insecure and (
            context.verify_mode != ssl_lib.CERT_REQUIRED or not context.check_hostname
        ):
            raise ConfigurationError(
                "ssl_context does not verify certificates and host names: pass "
                "insecure_skip_tls_verify=True if that is really meant"
            )
        if context.minimum_version < ssl_lib.TLSVersion.TLSv1_2:
            raise ConfigurationError("ssl_context allows TLS older than 1.2: set minimum_version")
        return context
    if ca_file is not None and not isinstance(ca_file, str):
        raise ConfigurationError("ca_file must be a path (str)")
    try:
        context = ssl_lib.create_default_context(cafile=ca_file)
    except (OSError, ssl_lib.SSLError) as exc:
        raise ConfigurationError(f"cannot read ca_file {ca_file!r}: {exc}") from exc
    context.minimum_version = ssl_lib.TLSVersion.TLSv1_2
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl_lib.CERT_NONE
    return context


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
