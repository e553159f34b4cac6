"""docker-compose.yml is a valid Compose file for each profile, as `docker compose config` sees it.

Validated with whichever Compose is installed: the v2 plugin (`docker compose`) or Debian's
`docker-compose` 1.29 (scripts/system-deps.sh installs the latter); neither needs a Docker daemon.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"


def compose_command() -> list[str]:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    if legacy:
        return [legacy]
    pytest.fail("neither `docker compose` nor `docker-compose` is installed (scripts/system-deps.sh)")


def config(*profiles: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    args = [*compose_command(), "-f", str(COMPOSE_FILE)]
    for profile in profiles:
        args += ["--profile", profile]
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith(("CALLSCRIBE_", "COMPOSE_"))}
    run = subprocess.run(
        [*args, "config"], capture_output=True, text=True, timeout=60, env={**clean_env, **(env or {})}
    )
    assert run.returncode == 0, f"docker compose config failed:\n{run.stderr}"
    parsed: dict[str, Any] = yaml.safe_load(run.stdout)
    return parsed


def active(lab: dict[str, Any], *profiles: str) -> set[str]:
    """Services that `up` starts with these profiles (compose 1.29's `config` lists them all)."""
    return {
        name
        for name, service in lab["services"].items()
        if not service.get("profiles") or set(service["profiles"]) & set(profiles)
    }


def test_default_profile_is_redis_and_callscribe_with_the_embedded_engine() -> None:
    lab = config()
    assert active(lab) == {"redis", "callscribe"}
    callscribe = lab["services"]["callscribe"]
    assert callscribe["environment"]["CALLSCRIBE_ENGINE"] == "sphinx"
    assert callscribe["environment"]["CALLSCRIBE_REDIS_URL"] == "redis://redis:6379/0"
    assert "build" in callscribe
    assert "--appendonly" in lab["services"]["redis"]["command"]


def test_gpu_profile_adds_vllm_and_points_callscribe_at_it() -> None:
    lab = config("gpu", env={"CALLSCRIBE_ENGINE": "remote"})
    assert active(lab, "gpu") == {"redis", "callscribe", "vllm"}
    vllm = lab["services"]["vllm"]
    assert vllm["image"].startswith("vllm/vllm-openai")
    assert any("Qwen3-ASR" in str(arg) for arg in vllm["command"])
    devices = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    env = lab["services"]["callscribe"]["environment"]
    assert env["CALLSCRIBE_ENGINE"] == "remote"
    # What callscribe makes of the environment compose gives it (comma list, model for the tokenizer).
    settings = settings_from(env)
    assert settings.vllm_urls == ["http://vllm:8000"]
    assert settings.model is not None and "Qwen3-ASR" in settings.model
    assert settings.vllm_priority_scheduling  # the vllm service runs --scheduling-policy priority
    tag = vllm["image"].partition(":")[2]
    assert tag and tag != "latest", "the vLLM image tag is pinned"


def settings_from(env: dict[str, Any]) -> Any:
    from callscribe.settings import check_public_address, load_settings

    saved = {k: v for k, v in os.environ.items() if k.startswith("CALLSCRIBE_")}
    for key in saved:
        del os.environ[key]
    os.environ.update({k: str(v) for k, v in env.items()})
    try:
        settings = load_settings()
        check_public_address(settings)  # would refuse to start on 0.0.0.0 without a public host
        return settings
    finally:
        for key in env:
            os.environ.pop(key, None)
        os.environ.update(saved)


def test_callscribe_in_the_lab_hands_out_a_reachable_address_and_listens_everywhere() -> None:
    env = config()["services"]["callscribe"]["environment"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    image_env = dict(re.findall(r"(CALLSCRIBE_[A-Z_]+)=(\S+)", dockerfile))
    settings = settings_from({**image_env, **env})
    assert settings.rtp_public_host == "127.0.0.1"  # the ports are published on loopback
    for host in (settings.http_host, settings.rtp_host, settings.audiosocket_host, settings.sip_host):
        assert host == "0.0.0.0"  # reachable through the published ports, not container-local
    assert "[remote]" in dockerfile  # the gpu profile's engine remote needs its tokenizer
    for text in (dockerfile, COMPOSE_FILE.read_text()):
        for cited in re.findall(r"docs/[\w-]+\.md", text):
            assert (ROOT / cited).is_file(), f"{cited} is cited but does not exist"


def test_pbx_profile_mounts_the_asterisk_config() -> None:
    lab = config("pbx")
    assert active(lab, "pbx") == {"redis", "callscribe", "asterisk"}
    volumes = lab["services"]["asterisk"]["volumes"]
    sources = [v["source"] if isinstance(v, dict) else v.split(":")[0] for v in volumes]
    assert any(Path(source).resolve() == ROOT / "config" / "asterisk" for source in sources)
    assert (ROOT / "config" / "asterisk" / "pjsip_callscribe.conf").is_file()
