"""Configuration: defaults, validation, and the password kept out of sight."""

from __future__ import annotations

import math
import ssl
import warnings
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


def test_unknown_options_are_named_in_the_refusal() -> None:
    refusal = r"unknown option\(s\) for open_pool: colour, size"
    with pytest.raises(ConfigurationError, match=refusal):
        PoolConfig.build("h", username="u", password="p", size=3, colour="red")  # type: ignore[call-arg]


def test_implicit_tls_and_starttls_exclude_each_other() -> None:
    with pytest.raises(ConfigurationError, match="exclude each other"):
        PoolConfig.build("h", username="u", password="p", ssl=True, starttls=True)


@pytest.mark.parametrize("port", [0, 65536, -1, True, "993", 993.0])
def test_a_port_outside_1_to_65535_is_refused(port: Any) -> None:
    with pytest.raises(ConfigurationError, match="port"):
        PoolConfig.build("h", port, username="u", password="p")


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "127.8.9.10", "::1"])
def test_plaintext_to_a_loopback_address_is_allowed(host: str) -> None:
    config = PoolConfig.build(host, username="u", password="p", ssl=False)
    assert config.ssl_context is None and not config.insecure_plaintext


@pytest.mark.parametrize("host", ["imap.example.org", "10.0.0.1", "localhost.example.org"])
def test_plaintext_elsewhere_needs_insecure_plaintext(host: str) -> None:
    with pytest.raises(ConfigurationError, match="without TLS"):
        PoolConfig.build(host, username="u", password="p", ssl=False)
    config = PoolConfig.build(host, username="u", password="p", ssl=False, insecure_plaintext=True)
    assert config.insecure_plaintext


def test_tls_settings_without_tls_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="neither ssl nor starttls"):
        PoolConfig.build("localhost", username="u", password="p", ssl=False, ca_file="ca.pem")


def test_the_context_made_for_tls_verifies_and_needs_tls_1_2() -> None:
    settings: list[dict[str, Any]] = [{}, {"ssl": False, "starttls": True}]
    for options in settings:
        context = PoolConfig.build("h", username="u", password="p", **options).ssl_context
        assert context is not None
        assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_insecure_skip_tls_verify_makes_a_context_that_checks_nothing() -> None:
    config = PoolConfig.build("h", username="u", password="p", insecure_skip_tls_verify=True)
    assert config.ssl_context is not None
    assert config.ssl_context.verify_mode == ssl.CERT_NONE
    assert not config.ssl_context.check_hostname


def test_a_given_context_is_used_as_given_when_it_verifies() -> None:
    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    assert PoolConfig.build("h", username="u", password="p", ssl_context=context).ssl_context is (
        context
    )


def test_a_given_context_that_does_not_verify_needs_the_insecure_flag() -> None:
    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    with pytest.raises(ConfigurationError, match="does not verify"):
        PoolConfig.build("h", username="u", password="p", ssl_context=context)
    config = PoolConfig.build(
        "h", username="u", password="p", ssl_context=context, insecure_skip_tls_verify=True
    )
    assert config.ssl_context is context


def test_a_given_context_that_allows_old_tls_is_refused() -> None:
    context = ssl.create_default_context()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 is, which is the point
        context.minimum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(ConfigurationError, match=r"older than 1\.2"):
        PoolConfig.build("h", username="u", password="p", ssl_context=context)


def test_a_context_and_a_ca_file_exclude_each_other() -> None:
    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ConfigurationError, match="not both"):
        PoolConfig.build("h", username="u", password="p", ssl_context=context, ca_file="ca.pem")


def test_an_unreadable_ca_file_is_refused(tmp_path: Any) -> None:
    with pytest.raises(ConfigurationError, match="cannot read ca_file"):
        PoolConfig.build("h", username="u", password="p", ca_file=str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigurationError, match="ca_file must be a path"):
        PoolConfig.build("h", username="u", password="p", ca_file=5)  # type: ignore[arg-type]


def test_min_size_cannot_exceed_max_size() -> None:
    with pytest.raises(ConfigurationError, match=r"min_size \(3\) is larger than max_size \(2\)"):
        PoolConfig.build("h", username="u", password="p", min_size=3, max_size=2)
    config = PoolConfig.build("h", username="u", password="p", min_size=2, max_size=2)
    assert (config.min_size, config.max_size) == (2, 2)


@pytest.mark.parametrize("key", ["acquire_timeout", "noop_check_after", "max_idle", "max_lifetime"])
def test_waits_that_may_be_endless_take_infinity(key: str) -> None:
    options: dict[str, Any] = {key: math.inf}
    config = PoolConfig.build("h", username="u", password="p", **options)
    assert getattr(config, key) == math.inf


@pytest.mark.parametrize(
    "key", ["connect_timeout", "login_timeout", "read_timeout", "logout_timeout", "keepalive"]
)
@pytest.mark.parametrize("value", [math.inf, 0, -1, math.nan, True, "5"])
def test_bounds_on_io_must_be_finite_positive_numbers(key: str, value: Any) -> None:
    with pytest.raises(ConfigurationError, match=key):
        PoolConfig.build("h", username="u", password="p", **{key: value})


def test_keepalive_is_off_by_default_and_takes_seconds() -> None:
    assert PoolConfig.build("h", username="u", password="p").keepalive is None
    config = PoolConfig.build("h", username="u", password="p", keepalive=240)
    assert config.keepalive == 240


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"auth_mechanism": "CRAM-MD5", "password": "p"}, "auth_mechanism must be one of"),
        ({"auth_mechanism": "XOAUTH2", "password": "p"}, "needs oauth2_token="),
        ({"auth_mechanism": "LOGIN", "oauth2_token": lambda refresh: "t"}, "needs password="),
        ({"oauth2_token": "a token, not a callable"}, "oauth2_token must be a callable"),
        ({"password": b"bytes"}, "password must be a str"),
    ],
)
def test_the_login_settings_must_fit_together(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        PoolConfig.build("h", username="u", **options)


@pytest.mark.parametrize("mechanism", ["XOAUTH2", "OAUTHBEARER", "auto"])
def test_a_token_provider_goes_with_the_oauth_mechanisms(mechanism: Any) -> None:
    config = PoolConfig.build(
        "h", username="u", oauth2_token=lambda refresh: "t", auth_mechanism=mechanism
    )
    assert config.password is None and config.auth_mechanism == mechanism


@pytest.mark.parametrize("bad", ["a\rb", "a\nb", "a\0b"])
def test_credentials_that_would_break_the_command_line_are_refused_unquoted(bad: str) -> None:
    settings: list[dict[str, Any]] = [
        {"username": bad, "password": "p"},
        {"username": "u", "password": bad},
    ]
    for options in settings:
        with pytest.raises(ConfigurationError, match="line break") as refused:
            PoolConfig.build("h", **options)
        assert bad not in str(refused.value)


def test_the_name_defaults_to_user_at_host_and_port() -> None:
    assert PoolConfig.build("h", 1143, username="u", password="p").name == "u@h:1143"
    assert PoolConfig.build("h", username="u", password="p", name="mine").name == "mine"


def test_a_configuration_is_frozen() -> None:
    config = PoolConfig.build("h", username="u", password="p")
    with pytest.raises(AttributeError):
        config.max_size = 3  # type: ignore[misc]
