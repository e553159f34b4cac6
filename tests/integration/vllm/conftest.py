"""Real vLLM on the CPU with the tiny random-weight Qwen3-ASR: one engine per test session.

These tests skip (with the reason) where `vllm` cannot be imported, e.g. the default .venv;
scripts/test-vllm.sh runs them in the cached vllm-cpu virtualenv and fails if they skip.
"""

from __future__ import annotations

import importlib.util
import os
import runpy
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
SHARED = REPO.parent / "shared"
SHIM = SHARED / "tools" / "vllm_cpu_shim"
TINY_MODEL = REPO / "build" / "tiny-qwen3-asr"
_SHIM_GLOBALS: dict[str, object] = {}

# The tiny model's engine: small batch, float32, no compilation (seconds to start, not minutes).
TINY_ENGINE_ARGS = {
    "load_format": "dummy",
    "dtype": "float32",
    "max_model_len": 4096,
    "enforce_eager": True,
    "max_num_seqs": 16,
}


def _prepare_cpu_vllm() -> str | None:
    """Set what vLLM needs on this CPU machine (before its import); None, or why it cannot run."""
    if importlib.util.find_spec("vllm") is None:
        return f"vLLM is not installed in {sys.prefix}; run scripts/test-vllm.sh"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if SHIM.is_dir():
        # Spawned workers read PYTHONPATH; this process needs the registration itself.
        paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
        if str(SHIM) not in paths:
            os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [str(SHIM), *paths] if p)
            # Keep its globals: the torch.library object it creates must outlive this call.
            _SHIM_GLOBALS.update(runpy.run_path(str(SHIM / "sitecustomize.py")))
    try:
        import vllm  # noqa: F401
    except Exception as exc:
        return f"vLLM is not importable here ({type(exc).__name__}: {exc}); run scripts/test-vllm.sh"
    return None


VLLM_MISSING = _prepare_cpu_vllm()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.vllm)
            if VLLM_MISSING:
                item.add_marker(pytest.mark.skip(reason=VLLM_MISSING))


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    if not (TINY_MODEL / "config.json").is_file():
        subprocess.run(
            [sys.executable, str(SHARED / "tools" / "make_tiny_qwen3_asr.py"), str(TINY_MODEL)],
            check=True,
            capture_output=True,
            timeout=300,
        )
    return TINY_MODEL


@pytest.fixture(scope="session")
async def vllm_engine(tiny_model: Path) -> AsyncIterator[object]:
    from callscribe.engine.qwen3.local import LocalQwen3Engine

    engine = LocalQwen3Engine(str(tiny_model), dict(TINY_ENGINE_ARGS))
    await engine.start()
    yield engine
    await engine.close()
