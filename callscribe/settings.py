"""Configuration: CALLSCRIBE_* environment variables, secret files in $CALLSCRIBE_SECRETS_DIR,
then an optional TOML file (never holding secrets), then defaults."""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SecretsSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from callscribe.networks import parse_networks
from callscribe.publish.connect import cluster_seeds, is_cluster_url
from callscribe.redact import parse_redactions

EngineName = Literal["sphinx", "vllm", "remote"]
ENV_PREFIX = "CALLSCRIBE_"
SECRETS_DIR_ENV = "CALLSCRIBE_SECRETS_DIR"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
REDIS_URL_SCHEMES = ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")
# CALLSCRIBE_* variables that are read by callscribe but are not settings.
NOT_SETTINGS = frozenset(
    {"CALLSCRIBE_CONFIG", SECRETS_DIR_ENV, "CALLSCRIBE_DEMO_CLIP", "CALLSCRIBE_CACHE", "CALLSCRIBE_SHARED"}
    | {"CALLSCRIBE_FUZZ_SECONDS"}
)


class ConfigError(ValueError):
    """A configuration mistake, as one line naming what to change (flag, env variable, TOML key
    or file)."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    # Redis Streams output
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "callscribe"
    stream_maxlen: int = Field(
        10_000, ge=100, description="approximate MAXLEN of each call's partials stream (finals: never)"
    )
    finals_maxlen: int = Field(1_000_000, ge=1000, description="approximate MAXLEN of the finals stream")
    call_ttl_sec: int = Field(86_400, ge=1, description="a call's stream expires this long after call.ended")
    outage_buffer_events: int = Field(
        10_000, ge=10, description="events held in memory while Redis is unreachable"
    )
    spool_dir: Path | None = Field(None, description="where events beyond the buffer are spooled")
    instance_id: str | None = Field(
        None, description="this instance's lease id (default: kept in spool_dir, else random)"
    )
    instance_lease_sec: float = Field(
        15.0, ge=1, description="calls of an instance silent this long are ended (bridge_lost)"
    )

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
    max_auto_legs: int = Field(64, ge=1, description="auto-legs open at once, all sources together")

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
    partial_window_sec: float | None = Field(
        4.0, gt=0, description="Qwen3 engines: a partial decodes at most this much of the utterance's end"
    )

    # Transcripts (docs/contract.md): what is redacted before anything is published or spooled
    redact: list[str] = Field(
        default_factory=list,
        description='redaction of every call unless its ingest says otherwise: "pci", "ssn" (env: JSON list)',
    )

    alert_phrases: list[str] = Field(
        default_factory=list,
        description='phrases the supervisor view highlights in finals, e.g. ["cancel my account"]',
    )

    # Browser origins allowed to call WHIP (CORS), e.g. https://app.example.com; "*" for any.
    cors_origins: list[str] = Field(
        default_factory=list, description="origins allowed to use WHIP from a browser page (CORS)"
    )

    log_level: str = Field("info", description="debug, info, warning, error")
    log_json: bool = False

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        if not value.startswith(REDIS_URL_SCHEMES):
            raise ValueError(f"{value!r} is not a Redis URL like redis://127.0.0.1:6379/0")
        if is_cluster_url(value):
            cluster_seeds(value)  # a redis+cluster:// URL without a node or with /db: say so now
        return value

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        if value.lower() not in LOG_LEVELS:
            raise ValueError(f"{value!r} is not one of {', '.join(LOG_LEVELS)}")
        return value.lower()

    @field_validator("rtp_port_range")
    @classmethod
    def _check_range(cls, value: str) -> str:
        parse_port_range(value)
        return value

    @field_validator("redact")
    @classmethod
    def _check_redact(cls, value: list[str]) -> list[str]:
        return sorted(parse_redactions(value))

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
            CommaListEnvSource(settings_cls),
            *secrets_dir_source(settings_cls),
            TomlWithoutSecrets(settings_cls),
        )


class CommaListEnvSource(EnvSettingsSource):
    """CALLSCRIBE_* variables, where list settings also take a comma list
    (CALLSCRIBE_ALLOW_NETWORKS=10.0.0.0/8,192.168.0.0/16) besides a JSON list."""

    def decode_complex_value(self, field_name: str, field: FieldInfo, value: Any) -> Any:
        if get_origin(field.annotation) is list and isinstance(value, str):
            text = value.strip()
            if not text.startswith("["):
                return [item.strip() for item in text.split(",") if item.strip()]
        try:
            return super().decode_complex_value(field_name, field, value)
        except ValueError as exc:
            env = f"{ENV_PREFIX}{field_name.upper()}"
            raise ConfigError(f"{env}={value!r} is not valid JSON ({exc})") from None


def unknown_env_settings(environ: Mapping[str, str]) -> list[str]:
    """A warning line for each CALLSCRIBE_* variable that is no setting (a typo is otherwise
    silently ignored), naming the closest valid one."""
    valid = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields} | NOT_SETTINGS
    warnings = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in valid:
            continue
        # Compared without the shared prefix, which would make every name look close.
        suffixes = {key.removeprefix(ENV_PREFIX): key for key in valid}
        close = [
            suffixes[match]
            for match in difflib.get_close_matches(upper.removeprefix(ENV_PREFIX), sorted(suffixes), n=1)
        ]
        hint = f"; did you mean {close[0]}?" if close else ""
        warnings.append(f"environment variable {name} is not a callscribe setting and is ignored{hint}")
    return warnings


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
    """Settings from arguments, env and a TOML file (`config_file` or $CALLSCRIBE_CONFIG);
    ConfigError, one line naming the flag, variable, key or file, for any mistake."""
    path = config_file or (
        Path(os.environ["CALLSCRIBE_CONFIG"]) if os.environ.get("CALLSCRIBE_CONFIG") else None
    )
    if path is not None and not path.is_file():
        raise ConfigError(f"config file {path} does not exist (--config or CALLSCRIBE_CONFIG)")

    class FileSettings(Settings):
        model_config = SettingsConfigDict(toml_file=path)

    values = {k: v for k, v in overrides.items() if v is not None}
    try:
        return FileSettings(**values) if path is not None else Settings(**values)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: TOML syntax error: {exc}") from None
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, values, os.environ, path)) from None
    except SettingsError as exc:
        raise ConfigError(_describe_settings_error(exc, path)) from None


def setting_source(
    name: str, overrides: Mapping[str, Any], environ: Mapping[str, str], path: Path | None
) -> str:
    """Where the user wrote setting `name`, in their terms: a flag, an env variable or a TOML key."""
    if name in overrides:
        return "--" + name.replace("_", "-")
    env = f"{ENV_PREFIX}{name.upper()}"
    if any(key.upper() == env for key in environ):
        return env
    if path is not None:
        return f"{name} in {path}"
    return name


def describe_validation_error(
    exc: ValidationError, overrides: Mapping[str, Any], environ: Mapping[str, str], path: Path | None
) -> str:
    parts = []
    for error in exc.errors():
        loc = [str(item) for item in error["loc"]]
        name = loc[0] if loc else "?"
        if error["type"] == "extra_forbidden":
            close = difflib.get_close_matches(name, list(Settings.model_fields), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            where = f"in {path}" if path is not None else "given"
            parts.append(f"unknown setting {name!r} {where}{hint}")
            continue
        message = str(error["msg"]).removeprefix("Value error, ")
        parts.append(f"{setting_source(name, overrides, environ, path)}: {message}")
    return "; ".join(parts)


def _describe_settings_error(exc: SettingsError, path: Path | None) -> str:
    text = str(exc)
    # pydantic-settings words a bad env value as 'error parsing value for field "x" from source
    # "EnvSettingsSource"': say which variable instead.
    match = re.search(r'error parsing value for field "(\w+)" from source "(\w+)"', text)
    if match:
        name, source = match.groups()
        if source == "EnvSettingsSource" or source == "CommaListEnvSource":
            return f"{ENV_PREFIX}{name.upper()}: not a valid value (a list takes a JSON list or a comma list)"
        return f"{name} in {path or source}: not a valid value"
    cause = exc.__cause__
    if isinstance(cause, ConfigError):
        return str(cause)
    return text


def redact_url(url: str) -> str:
    """`url` for a log line: a password in it (redis://:secret@host) becomes ***."""
    return re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1***@", url)


_WILDCARDS = ("0.0.0.0", "::", "")


def check_public_address(settings: Settings) -> None:
    """Binding every interface leaves no address to hand out in POST /v1/legs answers and SDP
    (peers would be told to send to 0.0.0.0): refuse, naming the setting that fixes it."""
    if settings.rtp_host in _WILDCARDS and not settings.rtp_public_host:
        raise ConfigError(
            f"rtp_host {settings.rtp_host!r} binds every interface, so the address peers must send "
            "RTP to is unknown: set CALLSCRIBE_RTP_PUBLIC_HOST (--rtp-public-host, rtp_public_host)"
        )
    if (
        settings.sip_enabled
        and settings.sip_host in _WILDCARDS
        and not (settings.sip_public_host or settings.rtp_public_host)
    ):
        raise ConfigError(
            f"sip_host {settings.sip_host!r} binds every interface, so the SIP Contact address is "
            "unknown: set CALLSCRIBE_SIP_PUBLIC_HOST (--sip-public-host, sip_public_host)"
        )
