"""The pool group's options, checked before anything opens, and each account's pool options."""

from __future__ import annotations

import math
from typing import Any

import pytest

from trio_imappool import ConfigurationError
from trio_imappool._group_options import (
    OWNED,
    GroupStatistics,
    account_options,
    check_group_options,
)


def credentials(account: str) -> dict[str, Any]:
    return {"password": "p"}


GOOD: dict[str, Any] = {
    "host": "localhost",
    "port": None,
    "per_account_max": 5,
    "max_connections": 50,
    "max_threads": None,
    "account_idle_timeout": 300.0,
    "pool_options": {},
}


def check(**changes: Any) -> None:
    check_group_options(credentials, **{**GOOD, **changes})


def test_the_defaults_pass() -> None:
    check()
    check(host=None, port=1143, max_threads=4, account_idle_timeout=math.inf)
    check(pool_options={"ssl": False, "acquire_timeout": 5.0, "budget": object()})


def test_credentials_must_be_callable() -> None:
    with pytest.raises(ConfigurationError, match="credentials callable"):
        check_group_options({"alice": "secret"}, **GOOD)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"host": ""}, "host must be"),
        ({"host": 5}, "host must be"),
        ({"port": "993"}, "port must be"),
        ({"port": True}, "port must be"),
        ({"per_account_max": 0}, "per_account_max must be an int >= 1"),
        ({"max_connections": 2.5}, "max_connections must be an int >= 1"),
        ({"max_threads": 0}, "max_threads must be an int >= 1"),
        ({"max_threads": True}, "max_threads must be an int >= 1"),
        ({"account_idle_timeout": 0}, "account_idle_timeout must be a positive number"),
        ({"account_idle_timeout": -math.inf}, "account_idle_timeout"),
        ({"account_idle_timeout": math.nan}, "account_idle_timeout"),
        ({"account_idle_timeout": False}, "account_idle_timeout"),
    ],
)
def test_invalid_arguments_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        check(**changes)


@pytest.mark.parametrize(("option", "instead"), sorted(OWNED.items()))
def test_options_the_group_sets_itself_name_the_groups_own(option: str, instead: str) -> None:
    with pytest.raises(ConfigurationError, match=f"sets {option} itself: use {instead}="):
        check(pool_options={option: 3})


def test_unknown_pool_options_are_refused_by_name() -> None:
    refusal = r"unknown option\(s\) for open_pool_group: colour, size"
    with pytest.raises(ConfigurationError, match=refusal):
        check(pool_options={"size": 1, "colour": "red", "ssl": True})


def make(result: object, **changes: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "defaults": {"ssl": False, "acquire_timeout": 5.0},
        "host": "imap.example.org",
        "port": 1143,
        "per_account_max": 4,
        **changes,
    }
    return account_options("alice", result, **settings)


def test_an_accounts_options_are_the_groups_with_the_credentials_on_top() -> None:
    assert make({"password": "p"}) == {
        "ssl": False,
        "acquire_timeout": 5.0,
        "host": "imap.example.org",
        "port": 1143,
        "username": "alice",
        "max_size": 4,
        "password": "p",
    }
    mine = make({"password": "p", "username": "a.l", "max_size": 2, "host": "other", "ssl": True})
    assert (mine["username"], mine["max_size"], mine["host"], mine["ssl"]) == (
        "a.l",
        2,
        "other",
        True,
    )


def test_the_credentials_may_name_the_host_the_group_lacks() -> None:
    assert make({"password": "p", "host": "mine"}, host=None)["host"] == "mine"
    with pytest.raises(ConfigurationError, match="no host for 'alice'"):
        make({"password": "p"}, host=None)


@pytest.mark.parametrize("result", [None, "password", [("password", "p")]])
def test_credentials_that_are_not_a_mapping_are_refused(result: object) -> None:
    with pytest.raises(ConfigurationError, match="not a mapping of open_pool options"):
        make(result)


def test_credentials_cannot_set_the_groups_limiters() -> None:
    with pytest.raises(ConfigurationError, match="set connection_limiter, thread_limiter"):
        make({"password": "p", "thread_limiter": 1, "connection_limiter": 2})


def test_group_statistics_print_the_counts_that_matter() -> None:
    stats = GroupStatistics(
        accounts=2,
        connections=3,
        max_connections=10,
        per_account_max=5,
        idle=1,
        in_use=2,
        waiting=4,
        places_waiting=1,
        credential_lookups=2,
        pools_opened=2,
        accounts_expired=0,
        accounts_rejected=0,
        places_freed=0,
        closed=False,
        pools={},
    )
    assert str(stats) == ("accounts=2 connections=3/10 idle=1 in_use=2 waiting=4 places_waiting=1")
