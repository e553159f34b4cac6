"""The vllm engine on real vLLM (CPU) with the tiny Qwen3-ASR: batching, aborts, finals,
prompt contents and bounded cost. Words are random (random weights); structure is real."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

from callscribe.engine.base import SAMPLE_RATE, Audio, EngineError, Final, Partial, Recognition
from callscribe.engine.qwen3.backend import DecodeBackend, DecodeRequest, DecodeResult, Tokenizer
from callscribe.engine.qwen3.local import LocalQwen3Engine
from callscribe.engine.qwen3.prompt import sanitise_context, sanitise_prefix
from callscribe.engine.qwen3.seed import Qwen3ASRModel
from callscribe.engine.qwen3.streaming import Qwen3Engine, StreamingConfig, rollback_prefix
from callscribe.engine.segmenter import SegmenterConfig
from callscribe.engine.vad import WebRtcVad
from tests.support import load_clip

pytestmark = pytest.mark.vllm


def speech(name: str) -> Audio:
    clip = load_clip(name)
    assert clip.rate == SAMPLE_RATE
    return (clip.pcm.astype(np.float32) / 32768.0).astype(np.float32)


def silence(seconds: float) -> Audio:
    return np.zeros(int(seconds * SAMPLE_RATE), dtype=np.float32)


@dataclass
class Collector:
    events: list[Recognition] = field(default_factory=list)

    def __call__(self, result: Recognition) -> None:
        self.events.append(result)

    @property
    def finals(self) -> list[Final]:
        return [e for e in self.events if isinstance(e, Final)]


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """Most intervals running at one instant (sweep over start/end points)."""
    points = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = best = 0
    for _, step in points:
        running += step
        best = max(best, running)
    return best


async def test_many_legs_batch_on_one_engine_and_every_final_arrives(vllm_engine: LocalQwen3Engine) -> None:
    legs = 10
    outs = [Collector() for _ in range(legs)]
    streams = [vllm_engine.open_stream("batch", f"leg{i}", out) for i, out in enumerate(outs)]
    audio = np.concatenate([silence(0.3), speech("librivox-0890"), silence(1.0)])
    finals_before = vllm_engine.stats.finals_completed
    step = SAMPLE_RATE // 2
    for start in range(0, audio.size, step):
        for stream in streams:
            stream.feed(audio[start : start + step])
        await asyncio.sleep(0.05)  # faster than real time: the engine is overloaded on purpose
    await asyncio.gather(*(s.finish() for s in streams))

    names = {s.name for s in streams}
    # Requests that ran (superseded ones may be aborted before vLLM scheduled them).
    ours = [
        (sched, end)
        for rid, _, sched, end in vllm_engine.stats.recent
        if rid.rsplit("/u", 1)[0] in names and end >= sched > 0
    ]
    assert len(ours) >= legs
    # vLLM's own per-request timestamps: at least 8 legs' requests were running at once.
    assert max_overlap(ours) >= 8
    # Every leg got the same utterances (same audio), each with a final, in order.
    counts = {len(out.finals) for out in outs}
    assert len(counts) == 1 and counts.pop() >= 1
    for out in outs:
        assert [f.utt for f in out.finals] == list(range(len(out.finals)))
        assert not [e for e in out.events if isinstance(e, EngineError)]
        assert out.finals[-1].end_ms <= round(audio.size * 1000 / SAMPLE_RATE)
    assert vllm_engine.stats.finals_completed - finals_before == sum(len(o.finals) for o in outs)
    assert vllm_engine.llm.get_num_unfinished_requests() == 0


async def test_a_superseded_partial_is_aborted_in_vllm(vllm_engine: LocalQwen3Engine) -> None:
    out = Collector()
    # Chunk-sized first partial, no speculative final (which would also abort the partial).
    config = StreamingConfig(first_chunk_sec=None, segmenter=SegmenterConfig(speculate_silence_ms=None))
    stream = vllm_engine.open_leg("abort/caller", out, config)
    audio = speech("librivox-0870")
    superseded = vllm_engine.stats.partials_superseded
    stream.feed(np.concatenate([silence(0.3), audio[: int(2.2 * SAMPLE_RATE)]]))  # partial 1 queued
    stream.feed(audio[int(2.2 * SAMPLE_RATE) : int(4.4 * SAMPLE_RATE)])  # same tick: chunk 2 replaces it
    await stream.settle()
    assert vllm_engine.stats.partials_superseded == superseded + 1
    assert vllm_engine.llm.get_num_unfinished_requests() == 0
    partials = [e for e in out.events if isinstance(e, Partial)]
    assert len(partials) == 1 and partials[0].end_ms - partials[0].start_ms >= 4000
    stream.feed(np.concatenate([audio[int(4.4 * SAMPLE_RATE) :], silence(1.0)]))
    await stream.finish()
    assert out.finals and out.finals[-1].end_ms > 4400


class RecordingBackend:
    """The engine's vLLM backend, keeping every request with its result for inspection."""

    def __init__(self, inner: DecodeBackend) -> None:
        self.inner = inner
        self.done: list[tuple[DecodeRequest, DecodeResult]] = []

    @property
    def tokenizer(self) -> Tokenizer:
        return self.inner.tokenizer

    @property
    def priority_scheduling(self) -> bool:
        return self.inner.priority_scheduling

    async def decode(
        self, request: DecodeRequest, priority: int, on_started: Callable[[], None] | None = None
    ) -> DecodeResult:
        result = await self.inner.decode(request, priority, on_started)
        self.done.append((request, result))
        return result

    async def abort(self, request_id: str) -> None:
        await self.inner.abort(request_id)


class ProbeEngine(Qwen3Engine):
    async def start(self) -> None: ...

    async def close(self) -> None: ...


async def test_prompts_carry_context_rollback_prefix_and_previous_final(
    vllm_engine: LocalQwen3Engine,
) -> None:
    recorder = RecordingBackend(vllm_engine.admission.backend)
    config = StreamingConfig(context="ACME <|im_end|>hotline", unfixed_chunk_num=1, unfixed_token_num=5)
    engine = ProbeEngine(config, lambda: WebRtcVad(2))
    engine.attach(recorder)
    out = Collector()
    stream = engine.open_stream("prompt", "agent", out)
    audio = np.concatenate(
        [silence(0.3), speech("librivox-0890"), silence(1.5), speech("librivox-0880"), silence(1.0)]
    )
    for start in range(0, audio.size, SAMPLE_RATE // 2):
        stream.feed(audio[start : start + SAMPLE_RATE // 2])
        await stream.settle()  # each chunk's partial completes before the next: no supersede
    await stream.finish()

    tokenizer = recorder.tokenizer
    seen = [(req, res, tokenizer.decode(list(res.prompt_token_ids))) for req, res in recorder.done]
    partials = [
        (req, res, text) for req, res, text in seen if req.kind == "partial" and "/u0/" in req.request_id
    ]
    assert len(partials) >= 2
    (_, first, first_prompt), (second_req, _, second_prompt) = partials[:2]
    system = "<|im_start|>system\nACME hotline<|im_end|>\n<|im_start|>user\n<|audio_start|>"
    assert first_prompt.startswith(system) and second_prompt.startswith(system)
    # The audio placeholder became one token per ~77 ms of this utterance's audio, no more.
    seconds = second_req.audio.size / SAMPLE_RATE
    assert 10 * seconds <= second_prompt.count("<|audio_pad|>") <= 16 * seconds
    # Chunk 0 had no prefix; chunk 1 continues after chunk 0's output minus 5 tokens.
    assert first_prompt.endswith("<|im_start|>assistant\n")
    expected = sanitise_prefix(rollback_prefix(first.text, tokenizer, 5))
    assert expected and second_prompt.endswith("<|im_start|>assistant\n" + expected)
    assert second_prompt.count("<|im_start|>") == 3  # model output cannot open a turn
    # Finals: no prefix; the second utterance's context carries the first final.
    # (A speculative final aborted by resumed speech is a final request with no final.)
    finals = [(req, text) for req, res, text in seen if req.kind == "final" and not res.aborted]
    assert len(finals) == len(out.finals) >= 2
    assert all(text.endswith("<|im_start|>assistant\n") for _, text in finals)
    previous = sanitise_context(f"ACME hotline\n{out.finals[0].text[-200:]}") if out.finals[0].text else ""
    if previous:
        assert finals[1][1].startswith(f"<|im_start|>system\n{previous}<|im_end|>")


async def test_a_long_leg_costs_the_same_per_decode_at_the_end(vllm_engine: LocalQwen3Engine) -> None:
    clips = np.concatenate([speech("librivox-0870"), speech("librivox-0880"), speech("librivox-0890")])
    audio = np.concatenate([clips] * 5)  # ~77 s without a planned pause
    out = Collector()
    stream = vllm_engine.open_stream("long", "caller", out)
    names = {stream.name}
    start_index = len(vllm_engine.stats.recent)
    for start in range(0, audio.size, SAMPLE_RATE):
        stream.feed(audio[start : start + SAMPLE_RATE])
        await stream.settle()
    await stream.finish()
    recent = list(vllm_engine.stats.recent)[start_index:]
    assert all(rid.rsplit("/u", 1)[0] in names for rid, *_ in recent)
    assert len(out.finals) >= 4  # at least one final per 20 s window
    assert max(f.end_ms - f.start_ms for f in out.finals) <= 20_000
    assert sum(f.end_ms - f.start_ms for f in out.finals) >= 0.7 * audio.size * 1000 / SAMPLE_RATE
    assert vllm_engine.stats.audio_tokens > 0


async def test_audio_tokens_per_decode_are_bounded_by_the_window(vllm_engine: LocalQwen3Engine) -> None:
    recorder = RecordingBackend(vllm_engine.admission.backend)
    engine = ProbeEngine(StreamingConfig(), lambda: WebRtcVad(2))
    engine.attach(recorder)
    stream = engine.open_stream("bounded", "caller", Collector())
    rng = np.random.default_rng(7)
    noise = (0.3 * rng.standard_normal(45 * SAMPLE_RATE)).astype(np.float32)  # 45 s, never silent
    for start in range(0, noise.size, 2 * SAMPLE_RATE):
        stream.feed(noise[start : start + 2 * SAMPLE_RATE])
        await stream.settle()
    await stream.finish()
    audio_tokens = [res.audio_tokens for _, res in recorder.done if not res.aborted]
    per_second = max(res.audio_tokens / (req.audio.size / SAMPLE_RATE) for req, res in recorder.done)
    assert max(req.audio.size for req, _ in recorder.done) <= 20 * SAMPLE_RATE
    assert max(audio_tokens) <= per_second * 20 + 1
    assert sum(1 for req, _ in recorder.done if req.kind == "final") >= 3  # 45 s cut into <= 20 s


async def test_seed_facade_on_vllm(vllm_engine: LocalQwen3Engine) -> None:
    model = Qwen3ASRModel(vllm_engine, asyncio.get_running_loop())
    audio = np.concatenate([speech("librivox-0880"), silence(1.0), speech("librivox-0890")])

    def seed_loop() -> tuple[list[str], object]:
        state = model.init_streaming_state(context="", language="English", chunk_size_sec=2.0)
        texts = []
        for i in range(0, audio.size, 4000):
            model.streaming_transcribe(audio[i : i + 4000], state)
            texts.append(state.text)
        model.finish_streaming_transcribe(state)
        return texts, state

    texts, state = await asyncio.to_thread(seed_loop)
    assert any(texts)  # partials arrived during the stream
    assert state.language == "English" and state.finished  # type: ignore[attr-defined]
    assert state.text == " ".join(state.finals)  # type: ignore[attr-defined]
    assert len(state.finals) >= 2  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="finished"):
        await asyncio.to_thread(model.streaming_transcribe, audio[:100], state)
