"""TLS by default, OAuth2 with token refresh, and secrets kept out of sight, against Dovecot
with a trustme test CA."""

from __future__ import annotations

import base64
import functools
import logging
import ssl
import warnings
from typing import Any, Literal

import pytest
import trio
from imapclient import IMAPClient

from trio_imappool import (
    AuthenticationError,
    ConfigurationError,
    ConnectError,
    PoolConfig,
    TLSError,
    open_pool,
)
from trio_imappool._client import authenticate
from trio_imappool.testing import DovecotServer, open_scripted_server
from trio_imappool.testing._dovecot import DovecotFactory

from .conftest import assert_settled

OAUTH_CONFIG = "auth_mechanisms = plain login xoauth2 oauthbearer\n"


def _same(token: str, refresh: bool) -> str:
    """A token provider that always returns *token* (bound with functools.partial)."""
    return token


def _logins(server: DovecotServer, user: str) -> list[str]:
    return [
        line
        for line in server.log_path.read_text().splitlines()
        if "Login: user=<" + user + ">" in line
    ]


# -- transport -----------------------------------------------------------------------------------


async def test_implicit_tls_is_verified_and_at_least_tls_1_2(
    tls_account: dict[str, Any],
) -> None:
    async with open_pool(**tls_account) as pool:
        version, cert = await pool.run_sync(
            lambda c: (c._imap.sock.version(), c._imap.sock.getpeercert())
        )
        assert pool.config.ssl_context is not None
        assert pool.config.ssl_context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert version in ("TLSv1.2", "TLSv1.3")
    assert cert  # a verified certificate (CERT_NONE would give {})


async def test_implicit_tls_is_the_default() -> None:
    config = PoolConfig.build("imap.example.org", username="u", password="p")
    assert config.ssl and config.port == 993
    assert config.ssl_context is not None
    assert config.ssl_context.verify_mode == ssl.CERT_REQUIRED
    assert config.ssl_context.check_hostname
    assert config.ssl_context.minimum_version == ssl.TLSVersion.TLSv1_2


async def test_starttls_is_verified(dovecot: DovecotServer, account: dict[str, Any]) -> None:
    settings = dict(account, starttls=True, ssl_context=dovecot.ssl_context())
    async with open_pool(**settings) as pool:
        cert = await pool.run_sync(lambda c: c._imap.sock.getpeercert())
    assert cert


async def test_a_ca_file_can_be_given(
    dovecot: DovecotServer, tls_account: dict[str, Any], tmp_path: Any
) -> None:
    ca_file = tmp_path / "ca.pem"
    dovecot.ca.cert_pem.write_to_path(str(ca_file))
    settings = dict(tls_account, ssl_context=None, ca_file=str(ca_file))
    async with open_pool(**settings) as pool:
        await pool.run_sync(IMAPClient.noop)


async def test_a_certificate_for_another_host_name_is_refused_and_not_retried(
    dovecot_factory: DovecotFactory,
) -> None:
    server = dovecot_factory(tls_identities=("imap.example.test",))
    async with open_pool(**server.pool_kwargs(), max_size=3) as pool:
        for _ in range(2):
            with pytest.raises(TLSError) as info:
                await pool.run_sync(IMAPClient.noop)
        stats = pool.statistics()
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
    assert "mismatch" in str(info.value.__cause__)
    assert stats.open_failures == 2  # one per checkout asked for, none by the pool itself


async def test_an_untrusted_ca_is_refused(tls_account: dict[str, Any]) -> None:
    settings = dict(tls_account, ssl_context=ssl.create_default_context())  # no test CA
    async with open_pool(**settings) as pool:
        with pytest.raises(TLSError) as info:
            await pool.run_sync(IMAPClient.noop)
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)


async def test_starttls_from_a_server_without_it_is_refused_never_plaintext(
    dovecot_factory: DovecotFactory,
) -> None:
    server = dovecot_factory(tls=False)
    settings = dict(server.pool_kwargs(tls=False), starttls=True, ssl_context=server.ssl_context())
    async with open_pool(**settings) as pool:
        with pytest.raises(TLSError, match="does not offer STARTTLS"):
            await pool.run_sync(IMAPClient.noop)
        await assert_settled(pool)
    assert _logins(server, server.username) == [_logins(server, server.username)[0]]  # the
    # harness's own readiness check logged in once; the pool never did


def test_plaintext_credentials_to_another_host_need_the_scary_option(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with pytest.raises(ConfigurationError, match="insecure_plaintext"):
        PoolConfig.build("imap.example.org", username="u", password="p", ssl=False)
    config = PoolConfig.build(
        "imap.example.org", username="u", password="p", ssl=False, insecure_plaintext=True
    )
    assert not config.ssl and config.ssl_context is None
    # Loopback needs no option (test servers, SSH tunnels).
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.53"):
        PoolConfig.build(host, username="u", password="p", ssl=False)


async def test_the_insecure_options_are_logged_once_per_pool(
    dovecot: DovecotServer, tls_account: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    settings = dict(tls_account, ssl_context=None, insecure_skip_tls_verify=True)
    with caplog.at_level(logging.WARNING, logger="trio_imappool"):
        # The test CA is not trusted, and yet: nothing is verified.
        async with (
            open_pool(**settings, max_size=2) as pool,
            pool.connection() as a,
            pool.connection() as b,
        ):
            await a.noop()
            await b.noop()
        async with open_pool(
            "imap.example.org", username="u", password="p", ssl=False, insecure_plaintext=True
        ):
            pass  # nothing is opened before it is needed: no traffic leaves this machine
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("NOT verified" in w for w in warnings) == 1
    assert sum("WITHOUT TLS" in w for w in warnings) == 1


def _no_verification(context: ssl.SSLContext) -> None:
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE


@pytest.mark.parametrize(
    "change",
    [
        lambda c: setattr(c, "check_hostname", False),
        _no_verification,
        lambda c: setattr(c, "minimum_version", ssl.TLSVersion.TLSv1_1),
    ],
)
def test_a_weak_ssl_context_is_refused(change: Any) -> None:
    context = ssl.create_default_context()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 is, rightly
        change(context)
    with pytest.raises(ConfigurationError):
        PoolConfig.build("imap.example.org", username="u", password="p", ssl_context=context)


# -- authentication -------------------------------------------------------------------------------


async def test_authenticate_plain_works_when_asked_for(
    dovecot: DovecotServer, tls_account: dict[str, Any]
) -> None:
    async with open_pool(**tls_account, auth_mechanism="PLAIN") as pool:
        await pool.run_sync(IMAPClient.noop)


def test_auto_uses_authenticate_plain_where_login_is_disabled() -> None:
    """Dovecot treats 127.0.0.1 as secure and never sends LOGINDISABLED there, so the choice is
    checked on a stand-in client that records what it was asked to do."""

    class Recorder:
        def __init__(self, caps: set[str]) -> None:
            self.caps = caps
            self.calls: list[str] = []

        def has_capability(self, name: str) -> bool:
            return name in self.caps

        def login(self, user: str, password: str) -> None:
            self.calls.append("LOGIN")

        def plain_login(self, user: str, password: str) -> None:
            self.calls.append("PLAIN")

    config = PoolConfig.build("localhost", username="u", password="p", ssl=False)
    normal, disabled = Recorder({"AUTH=PLAIN"}), Recorder({"LOGINDISABLED", "AUTH=PLAIN"})
    authenticate(normal, config, None)
    authenticate(disabled, config, None)
    assert (normal.calls, disabled.calls) == (["LOGIN"], ["PLAIN"])
    with pytest.raises(Exception, match="wants TLS"):
        authenticate(Recorder({"LOGINDISABLED"}), config, None)


@pytest.mark.parametrize("mechanism", ["XOAUTH2", "OAUTHBEARER"])
async def test_oauth2_logs_in_with_the_providers_token(
    dovecot_factory: DovecotFactory, mechanism: Literal["XOAUTH2", "OAUTHBEARER"]
) -> None:
    # Dovecot checks an XOAUTH2/OAUTHBEARER token like a password: the user's "password" in
    # its passwd-file is the valid access token.
    server = dovecot_factory(users={"ann": "token-1"}, extra_config=OAUTH_CONFIG)
    settings = server.pool_kwargs()
    del settings["password"]
    asked: list[bool] = []

    def provider(refresh: bool) -> str:
        asked.append(refresh)
        return "token-1"

    async with open_pool(**settings, oauth2_token=provider, auth_mechanism=mechanism) as pool:
        await pool.run_sync(IMAPClient.noop)
    assert asked == [False]
    assert f"method={mechanism}" in _logins(server, "ann")[-1]


async def test_an_expired_token_is_refreshed_once(dovecot_factory: DovecotFactory) -> None:
    server = dovecot_factory(users={"ann": "token-2"}, extra_config=OAUTH_CONFIG)
    settings = server.pool_kwargs()
    del settings["password"]
    asked: list[bool] = []

    async def provider(refresh: bool) -> str:  # async providers work too
        asked.append(refresh)
        await trio.lowlevel.checkpoint()
        return "token-2" if refresh else "token-1 (expired)"

    async with open_pool(**settings, oauth2_token=provider) as pool:
        await pool.run_sync(IMAPClient.noop)
        stats = pool.statistics()
    assert asked == [False, True]
    assert stats.open_failures == 0


async def test_a_token_still_rejected_after_refresh_fails_clearly(
    dovecot_factory: DovecotFactory,
) -> None:
    server = dovecot_factory(users={"ann": "token-3"}, extra_config=OAUTH_CONFIG)
    settings = server.pool_kwargs()
    del settings["password"]
    asked: list[bool] = []

    def provider(refresh: bool) -> str:
        asked.append(refresh)
        return "revoked-token"

    async with open_pool(**settings, oauth2_token=provider) as pool:
        with pytest.raises(AuthenticationError, match="AUTHENTICATIONFAILED"):
            await pool.run_sync(IMAPClient.noop)
        stats = pool.statistics()
        await assert_settled(pool)
    assert asked == [False, True]  # one refresh, then no more tries
    assert stats.open_failures == 1


async def test_a_failing_token_provider_is_a_connect_error(account: dict[str, Any]) -> None:
    settings = dict(account)
    del settings["password"]

    def provider(refresh: bool) -> str:
        raise RuntimeError("the identity provider is down")

    async with open_pool(**settings, oauth2_token=provider) as pool:
        with pytest.raises(ConnectError) as info:
            await pool.run_sync(IMAPClient.noop)
    assert "oauth2_token provider failed" in str(info.value)


# -- secrets -------------------------------------------------------------------------------------


async def test_secrets_never_appear_in_logs_reprs_errors_or_statistics(
    dovecot_factory: DovecotFactory, caplog: pytest.LogCaptureFixture
) -> None:
    password, token = "pw-Secr3t-Value", "tok-Secr3t-Value"
    server = dovecot_factory(users={"ann": password, "tom": token}, extra_config=OAUTH_CONFIG)
    texts: list[str] = []
    with caplog.at_level(logging.DEBUG):  # every logger, imapclient's protocol log included
        for secret in (password, "wrong-" + password):
            async with open_pool(**dict(server.pool_kwargs("ann"), password=secret)) as pool:
                try:
                    await pool.run_sync(IMAPClient.noop)
                except AuthenticationError as exc:
                    texts += [str(exc), repr(exc), str(exc.__cause__), repr(exc.__cause__)]
                texts += [repr(pool), repr(pool.config), str(pool.config), repr(pool.statistics())]
        for secret in (token, "wrong-" + token):
            settings = server.pool_kwargs("tom")
            del settings["password"]
            async with open_pool(**settings, oauth2_token=functools.partial(_same, secret)) as pool:
                try:
                    await pool.run_sync(IMAPClient.noop)
                except AuthenticationError as exc:
                    texts += [str(exc), repr(exc), str(exc.__cause__), repr(exc.__cause__)]
                texts += [repr(pool), repr(pool.config), repr(pool.statistics())]
    texts += [record.getMessage() for record in caplog.records]
    assert any("AUTHENTICATE" in t or "LOGIN" in t for t in texts)  # the protocol log was on
    haystack = "\n".join(texts)
    for secret in (password, token):
        sasl = f"user=tom\x01auth=Bearer {secret}\x01\x01"
        for form in (secret, base64.b64encode(sasl.encode()).decode(), secret[:10]):
            assert form not in haystack


# -- injection and non-ASCII secrets (issue 11) --------------------------------------------------

INJECTIONS = [
    ("username", "u\r\nA1 CREATE InjectedByUser"),
    ("username", "u\nA1 CREATE InjectedByUserLF"),
    ("username", "u\x00"),
    ("password", "p\r\nA1 CREATE InjectedByPassword"),
    ("password", "p\rA1 CREATE InjectedByPasswordCR"),
    ("password", "p\x00x"),
]


@pytest.mark.parametrize(("field", "value"), INJECTIONS)
async def test_cr_lf_nul_in_credentials_are_refused_before_anything_connects(
    dovecot: DovecotServer, account: dict[str, Any], field: str, value: str
) -> None:
    def folders() -> list[str]:
        client = IMAPClient(account["host"], account["port"], ssl=False, timeout=5)
        try:
            client.login(account["username"], account["password"])
            return sorted(name for _, _, name in client.list_folders())
        finally:
            client.shutdown()

    before = await trio.to_thread.run_sync(folders)
    settings = dict(account, **{field: value})
    with pytest.raises(ConfigurationError) as info:
        async with open_pool(**settings):
            pass  # pragma: no cover
    assert await trio.to_thread.run_sync(folders) == before
    assert "Injected" not in str(info.value) and "\r" not in str(info.value)
    # And before any connection: a scripted server sees none.
    async with open_scripted_server() as server:
        with pytest.raises(ConfigurationError):
            async with open_pool(**dict(server.pool_kwargs(), **{field: value})):
                pass  # pragma: no cover
        assert server.connections == 0


def test_a_token_with_a_line_break_is_refused_at_login() -> None:
    class Client:
        def oauth2_login(self, user: str, token: str) -> None:  # pragma: no cover
            raise AssertionError("sent")

    config = PoolConfig.build(
        "127.0.0.1", 143, username="u", oauth2_token=lambda refresh: "t", ssl=False
    )
    with pytest.raises(ConfigurationError, match="token"):
        authenticate(Client(), config, "tok\r\nA1 CREATE X")


NON_ASCII = "pä§wörd-ß"


def _leaks(text: str, secret: str) -> bool:
    """Whether *text* holds a non-ASCII character of *secret* or 4 characters of it in a row."""
    if any(ch in text for ch in secret if not ch.isascii()):
        return True
    return any(secret[i : i + 4] in text for i in range(len(secret) - 3))


async def test_a_non_ascii_password_logs_in_with_auto_on_dovecot(
    dovecot: DovecotServer,
) -> None:
    dovecot.add_user("utf8user", NON_ASCII)
    async with open_pool(**dovecot.pool_kwargs("utf8user", tls=False)) as pool:
        assert pool.config.auth_mechanism == "auto"
        await pool.run_sync(IMAPClient.noop)


async def test_a_non_ascii_password_logs_in_with_login_literals_on_dovecot(
    dovecot: DovecotServer,
) -> None:
    dovecot.add_user("utf8literal", NON_ASCII)
    settings = dict(dovecot.pool_kwargs("utf8literal", tls=False), auth_mechanism="LOGIN")
    async with open_pool(**settings) as pool:
        await pool.run_sync(IMAPClient.noop)


@pytest.mark.parametrize("mechanism", ["auto", "LOGIN"])
async def test_a_non_ascii_password_goes_as_a_literal_where_there_is_no_plain(
    mechanism: str,
) -> None:
    users = {"jörg": NON_ASCII, "ann": NON_ASCII}
    async with open_scripted_server(users=users, capabilities=("IMAP4rev1",)) as server:
        for user in users:
            settings = dict(server.pool_kwargs(user), auth_mechanism=mechanism)
            async with open_pool(**settings) as pool:
                await pool.run_sync(IMAPClient.noop)
    logins = [c for c in server.commands if c.name == "LOGIN"]
    assert [c.args for c in logins] == [[u.encode(), NON_ASCII.encode()] for u in users]
    assert all(NON_ASCII.encode() in c.raw for c in logins)  # a literal of its own


async def test_no_part_of_a_wrong_non_ascii_password_reaches_an_error_or_log(
    dovecot: DovecotServer, caplog: pytest.LogCaptureFixture
) -> None:
    dovecot.add_user("utf8wrong", "right-pässword")
    texts: list[str] = []
    capabilities = [("IMAP4rev1",), ("IMAP4rev1", "AUTH=PLAIN")]
    with caplog.at_level(logging.DEBUG):
        async with (
            open_scripted_server(users={"u": "x"}, capabilities=capabilities[0]) as a,
            open_scripted_server(users={"u": "x"}, capabilities=capabilities[1]) as b,
        ):
            targets = [
                dict(dovecot.pool_kwargs("utf8wrong", tls=False), password=NON_ASCII),
                dict(a.pool_kwargs(), password=NON_ASCII),
                dict(b.pool_kwargs(), password=NON_ASCII),
            ]
            for settings in targets:
                async with open_pool(**settings) as pool:
                    with pytest.raises(AuthenticationError) as info:
                        await pool.run_sync(IMAPClient.noop)
                error: BaseException | None = info.value
                while error is not None:
                    texts += [str(error), repr(error)]
                    error = error.__cause__ or error.__context__
    texts += [record.getMessage() for record in caplog.records]
    texts += [str(record.exc_info) for record in caplog.records if record.exc_info]
    assert not _leaks("\n".join(texts), NON_ASCII)


async def test_a_token_provider_that_hangs_is_a_connect_error_by_the_login_timeout(
    account: dict[str, Any],
) -> None:
    settings = dict(account)
    del settings["password"]

    async def provider(refresh: bool) -> str:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    with trio.fail_after(10):
        async with open_pool(
            **settings, oauth2_token=provider, login_timeout=0.5, acquire_timeout=5
        ) as pool:
            with pytest.raises(ConnectError) as info:
                await pool.run_sync(IMAPClient.noop)
    assert "gave no token within the login timeout (0.5 s)" in str(info.value)
