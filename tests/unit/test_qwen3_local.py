"""The vllm engine's start-up errors are one clear line, whether or not vLLM is installed."""

from __future__ import annotations

import importlib.util

import pytest

from callscribe.engine.base import EngineUnavailable
from callscribe.engine.qwen3.local import LocalQwen3Engine, model_location
from callscribe.settings import Settings


async def test_missing_model_path_is_named() -> None:
    engine = LocalQwen3Engine("/nonexistent/qwen3-asr", {"load_format": "dummy"})
    with pytest.raises(EngineUnavailable, match=r"^model path /nonexistent/qwen3-asr does not exist$"):
        await engine.start()
    assert not engine.ready


def test_engine_vllm_without_a_model_says_how_to_give_one() -> None:
    with pytest.raises(EngineUnavailable, match="--model PATH"):
        LocalQwen3Engine.from_settings(Settings(engine="vllm"))


def test_settings_reach_the_engine() -> None:
    engine = LocalQwen3Engine.from_settings(
        Settings(engine="vllm", model="Qwen/Qwen3-ASR-0.6B", language="de", vllm_args={"max_num_seqs": 8})
    )
    assert engine.name == "vllm"
    assert engine.engine_args["max_num_seqs"] == 8
    assert engine.engine_args["scheduling_policy"] == "priority"
    assert engine.config.forced_language == "German"


def test_model_location() -> None:
    assert model_location("Qwen/Qwen3-ASR-0.6B") == "Qwen/Qwen3-ASR-0.6B"  # a hub id
    for path in ("./models/asr", "models/a/b", "~/nothing-here"):
        with pytest.raises(EngineUnavailable, match="does not exist"):
            model_location(path)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
async def test_without_vllm_installed_the_reason_is_one_line() -> None:
    engine = LocalQwen3Engine("Qwen/Qwen3-ASR-0.6B")
    with pytest.raises(EngineUnavailable, match=r"vLLM is not installed .*callscribe\[vllm\]") as info:
        await engine.start()
    assert "\n" not in str(info.value)


def test_seed_llm_constructor_reports_errors_like_the_engine() -> None:
    from callscribe.engine.qwen3.seed import Qwen3ASRModel

    with pytest.raises(EngineUnavailable, match="does not exist"):
        Qwen3ASRModel.LLM(model="/nonexistent/qwen3-asr", max_new_tokens=256)
    with pytest.raises(ValueError, match="timestamps"):
        Qwen3ASRModel.LLM(model="/nonexistent/qwen3-asr", forced_aligner="Qwen/Qwen3-ForcedAligner-0.6B")
