"""docker-compose.yml is a valid Compose file for each profile, as `docker compose config` sees it.

Validated with whichever Compose is installed: the v2 plugin (`docker compose`) or Debian's
`docker-compose` 1.29 (scripts/system-deps.sh installs the latter); neither needs a Docker daemon.
"""

from __future__ import annotations

import os
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
    assert yaml.safe_load(env["CALLSCRIBE_VLLM_URLS"]) == ["http://vllm:8000"]


def test_pbx_profile_mounts_the_asterisk_config() -> None:
    lab = config("pbx")
    assert active(lab, "pbx") == {"redis", "callscribe", "asterisk"}
    volumes = lab["services"]["asterisk"]["volumes"]
    sources = [v["source"] if isinstance(v, dict) else v.split(":")[0] for v in volumes]
    assert any(Path(source).resolve() == ROOT / "config" / "asterisk" for source in sources)
    assert (ROOT / "config" / "asterisk" / "pjsip_callscribe.conf").is_file()
