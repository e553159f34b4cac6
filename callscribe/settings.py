"""Configuration: CALLSCRIBE_* environment variables, secret files in $CALLSCRIBE_SECRETS_DIR,
then an optional TOML file (never holding secrets), then defaults."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SecretsSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from callscribe.networks import parse_networks

EngineName = Literal["sphinx", "vllm", "remote"]
SECRETS_DIR_ENV = "CALLSCRIBE_SECRETS_DIR"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CALLSCRIBE_", extra="forbid")

    # Redis Streams output
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "callscribe"
    stream_maxlen: int = Field(10_000, ge=100, description="approximate MAXLEN of each call stream")
    finals_maxlen: int = Field(1_000_000, ge=1000, description="approximate MAXLEN of the finals stream")
    call_ttl_sec: int = Field(86_400, ge=1, description="a call's stream expires this long after call.ended")
    outage_buffer_events: int = Field(
        10_000, ge=10, description="events held in memory while Redis is unreachable"
    )
    spool_dir: Path | None = Field(None, description="where events beyond the buffer are spooled")

    # HTTP (health, legs API, metrics, websocket forks)
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    # Hostile-client limits of the HTTP server (docs/hostile-input.md explains each choice).
    http_header_timeout_sec: float = Field(
        10.0, gt=0, description="a request whose headers are not complete after this long is closed (408)"
    )
    http_keep_alive_sec: int = Field(5, ge=1, description="idle keep-alive connections are closed after this")
    http_max_connections: int = Field(
        2048, ge=16, description="open HTTP connections (websockets too) and tasks; beyond, requests get 503"
    )
    http_max_header_bytes: int = Field(
        16_384, ge=4096, description="request line + headers larger than this get 400"
    )

    # WebRTC (WHIP) ingest and the live dashboard
    sse_max_sec: float = Field(
        300.0, gt=0, description="dashboard event streams are recycled after this long (clients resume)"
    )

    # RTP
    rtp_host: str = "127.0.0.1"
    rtp_port: int = Field(40000, description="auto-leg port: unknown sources start a leg here")
    rtp_port_range: str = Field("40002-40999", description="ports reserved by POST /v1/legs")
    rtp_public_host: str | None = Field(None, description="address to hand out in POST /v1/legs")
    jitter_ms: int = Field(60, ge=0, le=1000, description="how long a gap is waited for reordering")
    rtp_dynamic_codec: str = Field("opus", description="codec of dynamic payload types on the auto-leg port")
    dtmf_payload_type: int = Field(101, ge=96, le=127)
    max_packet_bytes: int = Field(8192, ge=256)
    max_packets_per_sec_per_source: int = Field(500, ge=10)
    leg_idle_timeout_sec: float = Field(10.0, gt=0)

    # SIP user agent server and SIPREC recording server (callscribe.bridge.sip.server)
    sip_enabled: bool = Field(False, description="listen for SIP calls and SIPREC sessions")
    sip_host: str = Field("127.0.0.1", description="address the SIP UDP and TCP listeners bind")
    sip_port: int = Field(5060, ge=0, le=65535, description="SIP port, UDP and TCP (0: pick a free one)")
    sip_public_host: str | None = Field(
        None, description="address put in Contact and SDP c= (default: rtp_public_host, then sip_host)"
    )
    max_calls: int = Field(100, ge=1, description="SIP calls/recording sessions at once; more get 503")
    sip_retry_after_sec: int = Field(30, ge=1, description="Retry-After of a 503 at capacity")

    # Media forks: AudioSocket (TCP) and the websocket forks under /fork/* on the HTTP port
    audiosocket_host: str = "127.0.0.1"
    audiosocket_port: int = Field(9092, ge=0, le=65535, description="AudioSocket TCP port (0: any free port)")
    fork_max_connections_per_source: int = Field(
        200, ge=1, description="open fork/AudioSocket connections allowed per source address"
    )
    fork_max_frame_bytes: int = Field(
        262_144, ge=1024, description="larger websocket messages (AudioSocket frames) are dropped"
    )
    fork_start_timeout_sec: float = Field(
        5.0, gt=0, description="a fork websocket without its start message after this long is closed (1008)"
    )

    # Security (callscribe.security.AccessPolicy): who may send media or control the bridge.
    # SecretStr fields come from CALLSCRIBE_* env or files in CALLSCRIBE_SECRETS_DIR only:
    # the TOML file is refused when it holds one (config files get committed).
    allow_networks: list[str] = Field(
        default_factory=list,
        description="source networks allowed on every ingest: RTP, AudioSocket, forks, WHIP, SIP, "
        "/v1/legs (empty: any)",
    )
    api_token: SecretStr | None = Field(
        None, description="bearer token POST/GET/DELETE /v1/legs require; unset = open"
    )
    whip_token: SecretStr | None = Field(
        None, description="bearer token WHIP clients must send; unset = open"
    )
    fork_auth_token: SecretStr | None = Field(
        None, description="shared secret fork senders must present (Bearer, Basic password, ?token=)"
    )
    twilio_auth_token: SecretStr | None = Field(
        None, description="Twilio auth token: /fork/twilio then requires a valid X-Twilio-Signature"
    )
    sip_auth_realm: str = "callscribe"
    sip_auth_user: str | None = Field(None, description="digest-authenticate INVITEs when set")
    sip_auth_password: SecretStr | None = Field(None, description="the digest password of sip_auth_user")
    sip_allow_networks: list[str] = Field(
        default_factory=list,
        description="SIP only, on top of allow_networks: networks allowed to INVITE (empty: any)",
    )

    # Engine
    engine: EngineName = "sphinx"
    model: str | None = None
    vllm_args: dict[str, Any] = Field(default_factory=dict)
    language: str | None = None
    # Engine remote: `vllm serve` replicas (OpenAI-compatible base URLs, e.g. http://gpu1:8000)
    vllm_urls: list[str] = Field(default_factory=list, description="vllm serve replicas of engine remote")
    vllm_request_timeout_sec: float = Field(
        30.0, gt=0, description="a remote decode (or a silent stream) longer than this fails over"
    )
    vllm_health_interval_sec: float = Field(2.0, gt=0, description="how often replicas' /health is polled")
    vllm_priority_scheduling: bool = Field(
        False, description="replicas run with --scheduling-policy priority: finals are sent with priority 0"
    )

    log_level: str = "info"
    log_json: bool = False

    @field_validator("rtp_port_range")
    @classmethod
    def _check_range(cls, value: str) -> str:
        parse_port_range(value)
        return value

    @field_validator("allow_networks", "sip_allow_networks")
    @classmethod
    def _check_networks(cls, value: list[str]) -> list[str]:
        parse_networks(value)
        return value

    @property
    def rtp_ports(self) -> range:
        return parse_port_range(self.rtp_port_range)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Precedence: explicit arguments (CLI), CALLSCRIBE_* env, secret files, the TOML file.
        return (
            init_settings,
            env_settings,
            *secrets_dir_source(settings_cls),
            TomlWithoutSecrets(settings_cls),
        )


def secret_fields(settings_cls: type[BaseSettings]) -> frozenset[str]:
    """Fields typed SecretStr: the ones the TOML file may not hold."""
    return frozenset(
        name for name, info in settings_cls.model_fields.items() if SecretStr in get_args(info.annotation)
    )


def secrets_dir_source(settings_cls: type[BaseSettings]) -> tuple[PydanticBaseSettingsSource, ...]:
    """Files in $CALLSCRIBE_SECRETS_DIR (Docker/Kubernetes secrets), each named like the env
    variable, case ignored: /run/secrets/CALLSCRIBE_WHIP_TOKEN holds whip_token."""
    directory = os.environ.get(SECRETS_DIR_ENV)
    if not directory:
        return ()
    if not Path(directory).is_dir():
        raise SettingsError(f"{SECRETS_DIR_ENV}={directory} is not a directory")
    return (SecretsSettingsSource(settings_cls, secrets_dir=directory),)


class TomlWithoutSecrets(TomlConfigSettingsSource):
    """The TOML source, refusing secrets: config files get committed, secrets must not."""

    def __call__(self) -> dict[str, Any]:
        values = super().__call__()
        found = sorted(secret_fields(self.settings_cls) & {key.lower() for key in values})
        if found:
            names = ", ".join(found)
            env = ", ".join(f"CALLSCRIBE_{name.upper()}" for name in found)
            raise SettingsError(
                f"config file {self.toml_file_path} sets the secret {names}: remove it from the file "
                f"and set {env} in the environment or as a file in {SECRETS_DIR_ENV} instead"
            )
        return values


def parse_port_range(value: str) -> range:
    """'40002-40999' → range(40002, 41000); raises ValueError with the offending text."""
    try:
        low_text, high_text = value.split("-", 1)
        low, high = int(low_text), int(high_text)
    except ValueError:
        raise ValueError(f"port range {value!r} must look like 40002-40999") from None
    if not 1 <= low <= high <= 65535:
        raise ValueError(f"port range {value!r} must be within 1-65535, low first")
    return range(low, high + 1)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Settings from arguments, env and a TOML file (`config_file` or $CALLSCRIBE_CONFIG)."""
    path = config_file or (
        Path(os.environ["CALLSCRIBE_CONFIG"]) if os.environ.get("CALLSCRIBE_CONFIG") else None
    )
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")

    class FileSettings(Settings):
        model_config = SettingsConfigDict(toml_file=path)

    values = {k: v for k, v in overrides.items() if v is not None}
    return FileSettings(**values) if path is not None else Settings(**values)
