"""The pool group's vocabulary without trio: its options, checked, and its statistics.

:func:`~trio_imappool.open_pool_group` checks its arguments here before anything is opened,
and each account's pool options are made here from what the credentials callable returned.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, TypeAlias

from ._config import PoolConfig
from ._errors import ConfigurationError

if TYPE_CHECKING:
    from ._stats import PoolStatistics

__all__ = [
    "OWNED",
    "CredentialsProvider",
    "GroupStatistics",
    "account_options",
    "check_group_options",
]

#: ``credentials(account) -> options``, sync or async: the :func:`~trio_imappool.open_pool`
#: options of one account (``username``, ``password`` or ``oauth2_token``, and optionally
#: ``host``, ``port``, ``ssl``, ``max_size``, ...).
CredentialsProvider: TypeAlias = Callable[[str], Mapping[str, Any] | Awaitable[Mapping[str, Any]]]

#: Options of the accounts' pools that the group sets itself -> the group's own option.
OWNED: Final = {
    "max_size": "per_account_max",
    "thread_limiter": "max_threads",
    "connection_limiter": "max_connections",
}


@dataclasses.dataclass(frozen=True, slots=True)
class GroupStatistics:
    """A snapshot of a pool group, returned by :meth:`PoolGroup.statistics`.

    ========================  ===============================================================
    field                     meaning
    ========================  ===============================================================
    ``accounts``              accounts with an open pool
    ``connections``           connections that exist or are being opened, each holding one of
                              the ``max_connections`` places (pools being closed included)
    ``max_connections``       the global cap
    ``per_account_max``       the default ``max_size`` of an account's pool
    ``idle``                  idle connections, summed over the open pools
    ``in_use``                checked-out connections, summed over the open pools
    ``waiting``               tasks waiting for a connection, summed over the open pools
    ``places_waiting``        openers waiting for a place under ``max_connections``
    ``credential_lookups``    calls of the credentials callable
    ``pools_opened``          pools opened (one per account, again after each close)
    ``accounts_expired``      pools closed after ``account_idle_timeout`` without a checkout
    ``accounts_rejected``     pools closed because the server rejected their credentials
    ``places_freed``          idle connections closed to give their place to another account
    ``closed``                whether the group is closed
    ``pools``                 account -> :class:`~trio_imappool.PoolStatistics`, open pools
    ========================  ===============================================================
    """

    accounts: int
    connections: int
    max_connections: int
    per_account_max: int
    idle: int
    in_use: int
    waiting: int
    places_waiting: int
    credential_lookups: int
    pools_opened: int
    accounts_expired: int
    accounts_rejected: int
    places_freed: int
    closed: bool
    pools: Mapping[str, PoolStatistics]

    def __str__(self) -> str:
        return (
            f"accounts={self.accounts} connections={self.connections}/{self.max_connections} "
            f"idle={self.idle} in_use={self.in_use} waiting={self.waiting} "
            f"places_waiting={self.places_waiting}"
        )


def check_group_options(
    credentials: object,
    *,
    host: object,
    port: object,
    per_account_max: object,
    max_connections: object,
    max_threads: object,
    account_idle_timeout: object,
    pool_options: Mapping[str, Any],
) -> None:
    """Check the arguments of :func:`~trio_imappool.open_pool_group`.

    Raises:
        ConfigurationError: An argument is invalid.
    """
    if not callable(credentials):
        raise ConfigurationError("open_pool_group needs a credentials callable")
    if host is not None and (not isinstance(host, str) or not host):
        raise ConfigurationError(f"host must be a non-empty str or None, not {host!r}")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int)):
        raise ConfigurationError(f"port must be an int or None, not {port!r}")
    for key, value in (
        ("per_account_max", per_account_max),
        ("max_connections", max_connections),
        ("max_threads", 1 if max_threads is None else max_threads),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigurationError(f"{key} must be an int >= 1, not {value!r}")
    timeout = account_idle_timeout
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise ConfigurationError(
            f"account_idle_timeout must be a positive number of seconds (or math.inf), "
            f"not {timeout!r}"
        )
    for key, instead in OWNED.items():
        if key in pool_options:
            raise ConfigurationError(f"open_pool_group sets {key} itself: use {instead}=")
    # ``budget`` (a RedisBudget) goes to every account's pool; with its key left
    # None each account gets a budget of its own in Redis, ``limit`` places per account.
    known = {field.name for field in dataclasses.fields(PoolConfig)} | {"budget"}
    unknown = sorted(set(pool_options) - known)
    if unknown:
        raise ConfigurationError(f"unknown option(s) for open_pool_group: {', '.join(unknown)}")


def account_options(
    account: str,
    result: object,
    *,
    defaults: Mapping[str, Any],
    host: str | None,
    port: int | None,
    per_account_max: int,
) -> dict[str, Any]:
    """The :func:`~trio_imappool.open_pool` options of *account*'s pool (but the group's
    limiters): the group's *defaults*, *host*, *port*, the account as user name and
    *per_account_max* as ``max_size``, overridden by *result*, what the credentials callable
    returned.

    Raises:
        ConfigurationError: *result* is not a mapping, sets a limiter the group sets itself,
            or leaves the pool without a host.
    """
    if not isinstance(result, Mapping):
        raise ConfigurationError(
            f"pool group: the credentials callable returned a {type(result).__name__} for "
            f"{account!r}, not a mapping of open_pool options"
        )
    owned = sorted(key for key in ("thread_limiter", "connection_limiter") if key in result)
    if owned:
        raise ConfigurationError(
            f"pool group: the credentials for {account!r} set {', '.join(owned)}, "
            "which the group sets itself"
        )
    options = {
        **defaults,
        "host": host,
        "port": port,
        "username": account,
        "max_size": per_account_max,
        **result,
    }
    if options["host"] is None:
        raise ConfigurationError(
            f"pool group: no host for {account!r}: give open_pool_group(host=...) or "
            "return host from the credentials callable"
        )
    return options
