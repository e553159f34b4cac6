"""The seed's streaming API (Qwen3-ASR's `Qwen3ASRModel.LLM(...)` streaming methods) on
callscribe's batched engine, for code being ported from the seed.

    model = Qwen3ASRModel.LLM(model="Qwen/Qwen3-ASR-0.6B", max_model_len=4096)
    state = model.init_streaming_state(context="", language=None, unfixed_chunk_num=2,
                                       unfixed_token_num=5, chunk_size_sec=2.0)
    for pcm16k in chunks:
        model.streaming_transcribe(pcm16k, state)    # blocks like the seed; state.text updated
    model.finish_streaming_transcribe(state)          # state.text, state.language final

Same parameter names and meanings; `state.text` is the whole stream's text so far (the
finals of finished utterances, then the open utterance's partial). What differs is the
cost: each decode sees one utterance, never the whole stream, and the decodes of every
state (and every thread using this model) are batched together on one engine. The methods
block, so call them from plain threads, not from the engine's event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from callscribe.engine.base import EngineError, Final, Partial, Recognition
from callscribe.engine.qwen3.streaming import Qwen3Engine, Qwen3LegStream, StreamingConfig

T = TypeVar("T")


@dataclass
class ASRStreamingState:
    unfixed_chunk_num: int
    unfixed_token_num: int
    chunk_size_sec: float
    context: str
    force_language: str | None
    language: str = ""
    text: str = ""
    finals: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    partial: str = ""
    finished: bool = False
    stream: Qwen3LegStream | None = field(default=None, repr=False)

    def on_recognition(self, result: Recognition) -> None:
        if isinstance(result, Final):
            if result.text:
                self.finals.append(result.text)
            self.partial = ""
            if result.lang:
                self.language = result.lang
        elif isinstance(result, Partial):
            self.partial = result.text
        elif isinstance(result, EngineError):
            self.errors.append(result.message)
        self.text = " ".join([*self.finals, self.partial]).strip()


class Qwen3ASRModel:
    """Seed-compatible streaming on a started Qwen3Engine whose event loop runs in `loop`."""

    def __init__(self, engine: Qwen3Engine, loop: asyncio.AbstractEventLoop) -> None:
        self._engine = engine
        self._loop = loop
        self._owned_thread: threading.Thread | None = None
        self._ids = itertools.count()

    @classmethod
    def LLM(
        cls,
        model: str,
        forced_aligner: str | None = None,
        max_inference_batch_size: int = -1,
        max_new_tokens: int | None = None,
        **vllm_args: Any,
    ) -> Qwen3ASRModel:
        """Start an in-process vLLM engine (its own event loop thread) for `model`. The
        seed's own arguments keep their meaning: `max_new_tokens` caps each final (partials
        keep their short cap), `max_inference_batch_size` is moot (vLLM batches), and the
        forced aligner (timestamps) is not part of streaming in the seed either."""
        from callscribe.engine.qwen3.local import LocalQwen3Engine

        if forced_aligner is not None:
            raise ValueError(f"forced_aligner {forced_aligner!r}: timestamps are not supported in streaming")
        del max_inference_batch_size
        config = StreamingConfig()
        if max_new_tokens is not None:
            config = StreamingConfig(final_max_tokens=max_new_tokens)
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="callscribe-qwen3", daemon=True)
        thread.start()
        engine = LocalQwen3Engine(model, vllm_args, config)
        try:
            asyncio.run_coroutine_threadsafe(engine.start(), loop).result()
        except BaseException:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            loop.close()
            raise
        instance = cls(engine, loop)
        instance._owned_thread = thread
        return instance

    def init_streaming_state(
        self,
        context: str = "",
        language: str | None = None,
        unfixed_chunk_num: int = 2,
        unfixed_token_num: int = 5,
        chunk_size_sec: float = 2.0,
    ) -> ASRStreamingState:
        config = StreamingConfig(
            context=context or "",
            language=language,
            unfixed_chunk_num=int(unfixed_chunk_num),
            unfixed_token_num=int(unfixed_token_num),
            chunk_size_sec=float(chunk_size_sec),
            segmenter=self._engine.config.segmenter,
            # The seed decodes every chunk_size_sec, and streaming_transcribe returns once each
            # chunk is decoded: no short first chunk, no partial deferred by the pass budget.
            first_chunk_sec=None,
            partial_passes=None,
            partial_window_sec=self._engine.config.partial_window_sec,
            partial_max_tokens=self._engine.config.partial_max_tokens,
            final_max_tokens=self._engine.config.final_max_tokens,
        )
        state = ASRStreamingState(
            unfixed_chunk_num=config.unfixed_chunk_num,
            unfixed_token_num=config.unfixed_token_num,
            chunk_size_sec=config.chunk_size_sec,
            context=config.context,
            force_language=config.forced_language,
        )
        name = f"seed/{next(self._ids)}"

        async def open_stream() -> Qwen3LegStream:
            return self._engine.open_leg(name, state.on_recognition, config)

        state.stream = self._call(open_stream())
        return state

    def streaming_transcribe(self, pcm16k: npt.ArrayLike, state: ASRStreamingState) -> ASRStreamingState:
        """Feed audio (float in [-1, 1] or int16, 16 kHz mono); returns once every chunk it
        completed has been decoded, with `state.text`/`state.language` updated."""
        stream = self._stream_of(state)
        audio = _as_float32(pcm16k)

        async def step() -> None:
            stream.feed(audio)
            await stream.settle()

        self._call(step())
        return state

    def finish_streaming_transcribe(self, state: ASRStreamingState) -> ASRStreamingState:
        """Decode the rest (the open utterance becomes a final); the state is then closed."""
        stream = self._stream_of(state)
        self._call(stream.finish())
        state.finished = True
        return state

    def close(self) -> None:
        """Stop the engine this object started (no-op for one it was given)."""
        if self._owned_thread is None:
            return
        self._call(self._engine.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._owned_thread.join(timeout=10)
        self._owned_thread = None

    def _stream_of(self, state: ASRStreamingState) -> Qwen3LegStream:
        if state.stream is None or state.finished:
            raise ValueError("state must come from init_streaming_state() and not be finished")
        return state.stream

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            coroutine.close()
            raise RuntimeError("the seed API blocks: call it from a thread, e.g. asyncio.to_thread()")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()


def _as_float32(pcm16k: npt.ArrayLike) -> npt.NDArray[np.float32]:
    x = np.asarray(pcm16k).reshape(-1)
    if x.dtype == np.int16:
        return x.astype(np.float32) / 32768.0
    return x.astype(np.float32, copy=False)
