"""Configuration as operators write it: comma lists, typos warned, the shipped example loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from callscribe.settings import (
    ConfigError,
    check_public_address,
    load_settings,
    redact_url,
    unknown_env_settings,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_callscribe_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("CALLSCRIBE_"):
            monkeypatch.delenv(key)


def test_the_example_config_loads_and_passes_the_start_checks() -> None:
    check_public_address(load_settings(ROOT / "config" / "callscribe.example.toml"))


def test_list_settings_take_comma_or_json_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALLSCRIBE_ALLOW_NETWORKS", " 10.0.0.0/8, 192.168.0.0/16 ,")
    monkeypatch.setenv("CALLSCRIBE_CORS_ORIGINS", '["https://a.example", "https://b.example"]')
    settings = load_settings()
    assert settings.allow_networks == ["10.0.0.0/8", "192.168.0.0/16"]
    assert settings.cors_origins == ["https://a.example", "https://b.example"]


def test_unknown_env_names_the_closest_setting() -> None:
    warnings = unknown_env_settings(
        {"CALLSCRIBE_HTTP_PROT": "1", "CALLSCRIBE_HTTP_PORT": "1", "CALLSCRIBE_CONFIG": "x", "PATH": "/"}
    )
    assert warnings == [
        "environment variable CALLSCRIBE_HTTP_PROT is not a callscribe setting and is ignored; "
        "did you mean CALLSCRIBE_HTTP_PORT?"
    ]
    assert "did you mean" not in unknown_env_settings({"CALLSCRIBE_QQQQQQQQ": "1"})[0]


def test_wildcard_bind_needs_public_hosts() -> None:
    with pytest.raises(ConfigError, match="CALLSCRIBE_RTP_PUBLIC_HOST"):
        check_public_address(load_settings(rtp_host="0.0.0.0"))
    with pytest.raises(ConfigError, match="CALLSCRIBE_SIP_PUBLIC_HOST"):
        check_public_address(load_settings(sip_enabled=True, sip_host="::"))
    check_public_address(load_settings(rtp_host="0.0.0.0", rtp_public_host="192.0.2.1"))


def test_redis_passwords_are_not_shown() -> None:
    assert redact_url("redis://:s3cret@db:6379/0") == "redis://:***@db:6379/0"
    assert "s3cret" not in redact_url("rediss://user:s3cret@db/0")
