"""The access policy (allow-lists, constant-time secrets) and where its secrets may come from."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from callscribe.security import (
    AccessPolicy,
    address_allowed,
    bearer_authorized,
    bearer_token,
    parse_networks,
    secret_matches,
)
from callscribe.settings import Settings, load_settings, secret_fields


def test_allow_list() -> None:
    networks = parse_networks(["10.0.0.0/24", "2001:db8::/32", "192.0.2.7"])
    assert address_allowed("10.0.0.99", networks)
    assert address_allowed("192.0.2.7", networks)
    assert address_allowed("2001:db8::1", networks)
    assert address_allowed("fe80::1%eth0", parse_networks(["fe80::/10"]))
    # A dual-stack socket reports IPv4 peers as IPv4-mapped IPv6.
    assert address_allowed("::ffff:10.0.0.7", networks)
    assert not address_allowed("::ffff:10.0.1.7", networks)
    assert not address_allowed("10.0.1.1", networks)
    assert not address_allowed("not-an-address", networks)
    assert not address_allowed("unknown", networks)
    assert address_allowed("203.0.113.1", [])
    with pytest.raises(ValueError, match=r"10\.0\.0\.0/33"):
        parse_networks(["10.0.0.0/33"])


def test_secret_and_bearer_checks() -> None:
    secret = SecretStr("s3cret")
    assert secret_matches("s3cret", secret)
    assert not secret_matches("s3cre", secret)
    assert not secret_matches("", secret)
    assert not secret_matches(None, secret)
    assert bearer_token("Bearer s3cret") == "s3cret"
    assert bearer_token("bearer  s3cret ") == "s3cret"
    assert bearer_token("Basic s3cret") is None
    assert bearer_token("Bearer ") is None
    assert bearer_token(None) is None
    assert bearer_authorized(None, None)  # no token configured: open
    assert bearer_authorized("Bearer s3cret", secret)
    assert not bearer_authorized("Bearer s3cre", secret)
    assert not bearer_authorized("Basic s3cret", secret)
    assert not bearer_authorized(None, secret)


def test_policy_from_settings() -> None:
    settings = Settings(
        allow_networks=["127.0.0.0/8", "10.0.0.0/8"],
        sip_allow_networks=["10.1.0.0/16"],
        api_token="api-secret",
        whip_token="",  # empty in an env file means unset, not "the empty token"
        fork_auth_token="fork-secret",
        sip_auth_user="pbx",
        sip_auth_password="sip-secret",
    )
    policy = AccessPolicy.from_settings(settings)
    assert policy.source_allowed("127.0.0.1") and policy.source_allowed("10.2.3.4")
    assert not policy.source_allowed("192.0.2.1")
    # SIP needs both lists.
    assert policy.sip_source_allowed("10.1.2.3")
    assert not policy.sip_source_allowed("10.2.3.4") and not policy.sip_source_allowed("192.0.2.1")
    assert policy.api_token is not None and policy.api_token.get_secret_value() == "api-secret"
    assert policy.whip_token is None
    assert policy.fork_token_matches("fork-secret") and not policy.fork_token_matches("fork")
    assert policy.sip_password == "sip-secret"
    assert "secret" not in repr(policy)
    assert policy.describe() == (
        "allow_networks=127.0.0.0/8,10.0.0.0/8 sip_allow_networks=10.1.0.0/16 api_token=set "
        "whip_token=unset fork_auth_token=set twilio_auth_token=unset sip_digest=on"
    )
    open_policy = AccessPolicy.from_settings(Settings())
    assert open_policy.source_allowed("192.0.2.1") and open_policy.sip_source_allowed("192.0.2.1")
    assert not open_policy.fork_token_matches("anything")


def test_bad_network_names_the_setting() -> None:
    with pytest.raises(ValidationError, match=r"allow_networks[\s\S]*10\.0\.0\.0/33"):
        Settings(allow_networks=["10.0.0.0/33"])


def test_every_secret_is_a_secretstr() -> None:
    assert secret_fields(Settings) == {
        "api_token",
        "whip_token",
        "fork_auth_token",
        "twilio_auth_token",
        "sip_auth_password",
    }


@pytest.mark.parametrize("field", sorted(secret_fields(Settings)))
def test_config_file_may_not_hold_a_secret(tmp_path: Path, field: str) -> None:
    config = tmp_path / "callscribe.toml"
    config.write_text(f'http_port = 8081\n{field} = "committed-by-mistake"\n')
    with pytest.raises(ValueError, match=rf"{field}[\s\S]*CALLSCRIBE_{field.upper()}") as caught:
        load_settings(config)
    assert "committed-by-mistake" not in str(caught.value)


def test_config_file_holds_the_rest(tmp_path: Path) -> None:
    config = tmp_path / "callscribe.toml"
    config.write_text('allow_networks = ["10.0.0.0/8"]\nsip_auth_user = "pbx"\n')
    settings = load_settings(config)
    assert settings.allow_networks == ["10.0.0.0/8"] and settings.sip_auth_user == "pbx"


def test_secrets_dir_files_named_like_the_env_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "CALLSCRIBE_API_TOKEN").write_text("api-from-file\n")  # Docker: upper case
    (secrets / "callscribe_fork_auth_token").write_text("fork-from-file")  # case is ignored
    monkeypatch.setenv("CALLSCRIBE_SECRETS_DIR", str(secrets))
    monkeypatch.setenv("CALLSCRIBE_FORK_AUTH_TOKEN", "fork-from-env")  # env wins over files
    config = tmp_path / "callscribe.toml"
    config.write_text("http_port = 8081\n")
    settings = load_settings(config)
    assert settings.api_token is not None and settings.api_token.get_secret_value() == "api-from-file"
    assert settings.fork_auth_token is not None
    assert settings.fork_auth_token.get_secret_value() == "fork-from-env"
    assert settings.http_port == 8081
    assert "api-from-file" not in repr(settings) and "fork-from-env" not in repr(settings)


def test_missing_secrets_dir_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALLSCRIBE_SECRETS_DIR", str(tmp_path / "absent"))
    with pytest.raises(ValueError, match=r"CALLSCRIBE_SECRETS_DIR=.*absent is not a directory"):
        Settings()
