"""Configuration: defaults, validation, and the password kept out of sight."""

from __future__ import annotations

import math
import ssl
from typing import Any

import pytest

from trio_imappool import ConfigurationError, PoolConfig


def test_defaults_are_conservative_and_tls_on() -> None:
    config = PoolConfig.build("imap.example.org", username="u", password="p")
    assert (config.port, config.ssl, config.starttls) == (993, True, False)
    assert (config.min_size, config.max_size) == (0, 10)
    assert math.isfinite(config.acquire_timeout)
    assert config.name == "u@imap.example.org:993"


def test_plain_and_starttls_default_to_port_143() -> None:
    assert PoolConfig.build("localhost", username="u", password="p", ssl=False).port == 143
    starttls = PoolConfig.build("h", username="u", password="p", ssl=False, starttls=True)
    assert starttls.port == 143


def test_the_password_is_not_in_the_repr() -> None:
    config = PoolConfig.build("h", username="u", password="hunter2-secret")
    assert "hunter2-secret" not in repr(config)
    assert "hunter2-secret" not in str(config)


def test_an_infinite_acquire_timeout_is_allowed() -> None:
    config = PoolConfig.build("h", username="u", password="p", acquire_timeout=math.inf)
    assert config.acquire_timeout == math.inf


@pytest.mark.parametrize(
    "options",
    [
        {"ssl_context": "not a context"},
        {"ssl": False, "ssl_context": ssl.create_default_context()},
        {"reset_on_release": 1},
        {"max_size": True},
        {"min_size": 1.5},
        {"logout_timeout": -1},
        {"name": ""},
    ],
)
def test_invalid_options_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        PoolConfig.build("h", username="u", password="p", **options)


def test_missing_credentials_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="either password= or oauth2_token="):
        PoolConfig.build("h", username="u")
    with pytest.raises(ConfigurationError, match="either password= or oauth2_token="):
        PoolConfig.build("h", username="u", password="p", oauth2_token=lambda refresh: "t")
    with pytest.raises(ConfigurationError, match="username="):
        PoolConfig.build("h", password="p")  # type: ignore[call-arg]
    with pytest.raises(ConfigurationError, match="host"):
        PoolConfig.build("", username="u", password="p")
