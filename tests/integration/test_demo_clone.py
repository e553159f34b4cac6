"""`make demo` on a plain clone, as anyone who clones the repository gets it: no ../shared
beside it, its own virtualenv, its own Redis port. Exit 0 and at least one final printed.

The clone takes the committed HEAD of this checkout (uncommitted changes are not in it).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from tests.support import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(1500)
def test_make_demo_on_a_plain_clone(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")  # scripts/ensure-redis.sh would apt-get it
    clone = tmp_path / "callscribe"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(clone)], check=True)
    assert not (tmp_path / "shared").exists()
    redis_port = free_port(socket.SOCK_STREAM)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CALLSCRIBE_", "VIRTUAL_ENV"))}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if ".venv" not in p)
    try:
        result = subprocess.run(
            ["make", "demo", f"REDIS_PORT={redis_port}"],
            cwd=clone,
            env=env,
            capture_output=True,
            text=True,
            timeout=1400,
        )
    finally:
        subprocess.run(["redis-cli", "-p", str(redis_port), "shutdown", "nosave"], capture_output=True)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    finals = [line for line in result.stdout.splitlines() if line.startswith("FINAL")]
    assert finals, output[-3000:]
    assert "Traceback" not in output
    assert "callscribe-demo:call:" in result.stdout  # where its events are, under its own prefix
    assert "deprecated" not in output.lower()  # no setuptools licence box
    # Only what running needs: the [test] extra is not installed.
    frozen = subprocess.run(
        [str(clone / ".venv/bin/pip"), "list", "--format=freeze"], capture_output=True, text=True
    ).stdout
    installed = {line.split("==")[0].lower() for line in frozen.splitlines()}
    assert "callscribe" in installed and not installed & {"pytest", "mypy", "ruff", "hypothesis"}
    print(result.stdout)  # shown with -s: the demo as a user sees it
