"""The sphinx engine on real speech: real pocketsphinx worker processes, no mocks."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator

import jiwer
import numpy as np
import pytest
import pytest_asyncio

from callscribe.codecs.resample import Resampler
from callscribe.engine.base import (
    SAMPLE_RATE,
    Audio,
    EngineError,
    EngineUnavailable,
    Final,
    Partial,
    Recognition,
)
from callscribe.engine.sphinx import SphinxEngine
from tests.support import CLIPS, load_clip

FRAME = SAMPLE_RATE // 50  # 20 ms, the size ingest hands over
MAX_PARTIAL_GAP_MS = 500
# Measured per clip (0870/0880/0890): 16 kHz 0.41/0.38/0.36, phone path 0.50/0.38/0.29, thanks
# to the engine's whole-utterance final pass (streaming alone gave 0.55/0.38/0.57 on the phone path).
MAX_WER = {"16k": 0.5, "8k": 0.5}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def engine() -> AsyncIterator[SphinxEngine]:
    # A generous backlog: on this shared 2-core box decoding can run slower than the
    # faster-than-real-time feed, and these tests are about recognition, not overload.
    sphinx = SphinxEngine(workers=2, max_backlog_s=120)
    await sphinx.start()
    yield sphinx
    await sphinx.close()


def clip_audio(name: str) -> Audio:
    return load_clip(name).pcm.astype(np.float32) / 32768.0


def phone_path(name: str) -> Audio:
    """16 kHz → 8 kHz int16 → 16 kHz, 20 ms frames through the per-leg Resampler."""
    pcm = load_clip(name).pcm
    down, up = Resampler(SAMPLE_RATE, 8000), Resampler(8000)
    out: list[Audio] = []
    step = FRAME
    for at in range(0, pcm.size, step):
        narrow = down.process(pcm[at : at + step])
        out.append(up.process((np.clip(narrow, -1, 1) * 32767).astype(np.int16)))
    narrow = down.flush()
    out.append(up.process((np.clip(narrow, -1, 1) * 32767).astype(np.int16)))
    out.append(up.flush())
    return np.concatenate(out)


async def transcribe(engine: SphinxEngine, audio: Audio, leg: str = "caller") -> list[Recognition]:
    """Feed 20 ms frames at ~4x real time and return everything emitted, in order."""
    results: list[Recognition] = []
    stream = engine.open_stream("call-1", leg, results.append)
    for at in range(0, audio.size, FRAME):
        stream.feed(audio[at : at + FRAME])
        await asyncio.sleep(0.005)
    await stream.finish()
    return results


def text_of(results: list[Recognition]) -> str:
    return " ".join(r.text for r in results if isinstance(r, Final) and r.text)


def check_partial_cadence(results: list[Recognition]) -> None:
    """Within each utterance: partial to partial, and last partial to final, ≤ 500 ms of audio."""
    finals = {r.utt: r for r in results if isinstance(r, Final)}
    for utt, final in finals.items():
        ends = [r.end_ms for r in results if isinstance(r, Partial) and r.utt == utt]
        if final.end_ms - final.start_ms < 2 * MAX_PARTIAL_GAP_MS:
            continue  # too short to need a partial
        assert ends, f"utterance {utt} ({final.start_ms}-{final.end_ms} ms) got no partial"
        marks = [*ends, final.end_ms]
        gaps = [b - a for a, b in itertools.pairwise(marks)]
        assert max(gaps, default=0) <= MAX_PARTIAL_GAP_MS, f"partial gaps {gaps} in utterance {utt}"


@pytest.mark.parametrize("path", ["16k", "8k"])
@pytest.mark.parametrize("name", CLIPS)
async def test_clip_is_recognised(engine: SphinxEngine, name: str, path: str) -> None:
    clip = load_clip(name)
    audio = clip_audio(name) if path == "16k" else phone_path(name)
    started = time.perf_counter()
    results = await transcribe(engine, audio)
    wall = time.perf_counter() - started

    hypothesis = text_of(results)
    wer = jiwer.wer(clip.reference, hypothesis)
    print(f"\n{name} {path}: WER {wer:.3f} wall/audio {wall / clip.seconds:.2f} hyp={hypothesis!r}")
    assert wer <= MAX_WER[path], f"{name} {path}: WER {wer:.3f} > {MAX_WER[path]} for {hypothesis!r}"
    assert not [r for r in results if isinstance(r, EngineError)]

    finals = [r for r in results if isinstance(r, Final)]
    assert finals, f"no final for {name} {path}"
    assert [f.utt for f in finals] == list(range(len(finals))), "one final per utterance, numbered from 0"
    clip_ms = clip.seconds * 1000
    for final in finals:
        assert 0 <= final.start_ms < final.end_ms <= clip_ms + 100, (final, clip_ms)
        assert final.lang == "en"
        # Words with times: the final's text word for word, monotonic inside the utterance.
        assert [w for w, *_ in final.words] == final.text.split(), final
        times = [t for _, start, end, _ in final.words for t in (start, end)]
        assert times == sorted(times) and all(final.start_ms <= t <= final.end_ms + 10 for t in times), final
        assert all(0.0 <= conf <= 1.0 for *_, conf in final.words)
        assert (final.conf is None) == (not final.words)
    # The reference starts with speech near the clip start and runs to its end.
    assert finals[0].start_ms < 1000 and finals[-1].end_ms > clip_ms - 1000, finals
    check_partial_cadence(results)
    for partial in (r for r in results if isinstance(r, Partial)):
        final = next(f for f in finals if f.utt == partial.utt)
        assert final.start_ms == partial.start_ms and partial.end_ms <= final.end_ms


async def test_finish_flushes_a_clip_cut_mid_word(engine: SphinxEngine) -> None:
    audio = clip_audio("librivox-0870")[: 2 * SAMPLE_RATE + 1234]  # "...dashwood had th|"
    results = await transcribe(engine, audio)
    finals = [r for r in results if isinstance(r, Final)]
    assert len(finals) == 1, results
    assert finals[0].text, "the speech before the cut was recognised"
    assert "john" in finals[0].text.split()
    assert 2000 <= finals[0].end_ms <= 2 * 1000 + 1234 * 1000 // SAMPLE_RATE + 30
    assert results[-1] == finals[0], "finish() returned after the final, with nothing after it"
    count = len(results)
    await asyncio.sleep(0.3)
    assert len(results) == count


async def test_two_legs_are_independent_and_the_loop_stays_responsive(engine: SphinxEngine) -> None:
    lags: list[float] = []
    running = True

    async def ticker() -> None:
        while running:
            before = time.perf_counter()
            await asyncio.sleep(0.01)
            lags.append(time.perf_counter() - before - 0.01)

    tick = asyncio.create_task(ticker())
    caller_clip, agent_clip = load_clip("librivox-0870"), load_clip("librivox-0880")
    caller, agent = await asyncio.gather(
        transcribe(engine, clip_audio(caller_clip.name), "caller"),
        transcribe(engine, phone_path(agent_clip.name), "agent"),
    )
    running = False
    await tick

    caller_text, agent_text = text_of(caller), text_of(agent)
    p50, p99 = (float(np.percentile(lags, q)) * 1000 for q in (50, 99))
    print(f"\nloop lag p50 {p50:.1f} ms p99 {p99:.1f} ms")
    print(f"max {max(lags) * 1000:.1f} ms over {len(lags)} ticks")
    print(f"caller {caller_text!r}\nagent {agent_text!r}")
    assert jiwer.wer(caller_clip.reference, caller_text) <= 0.5
    assert jiwer.wer(agent_clip.reference, agent_text) <= 0.5
    # Each leg heard only its own speaker.
    assert jiwer.wer(agent_clip.reference, caller_text) > 0.8
    assert jiwer.wer(caller_clip.reference, agent_text) > 0.8
    # p99, not max: on this shared box (load average ~9 on 2 cores) the OS alone preempts the
    # process for 200 ms now and then. Decoding inline would lag every tick by a frame's
    # decode (~40 ms) and the utterance ends by 350-650 ms (measured).
    assert p99 < 100, f"event loop lagged {p99:.0f} ms (p99) while decoding"


async def test_feed_checks_its_input(engine: SphinxEngine) -> None:
    results: list[Recognition] = []
    stream = engine.open_stream("call-2", "caller", results.append)
    with pytest.raises(ValueError, match="mono"):
        stream.feed(np.zeros((2, FRAME), dtype=np.float32))
    stream.feed(np.zeros(FRAME * 10, dtype=np.float32))
    await stream.finish()
    assert results == [], "silence makes no utterance"
    with pytest.raises(RuntimeError, match="finished"):
        stream.feed(np.zeros(FRAME, dtype=np.float32))


async def test_a_leg_behind_real_time_drops_audio_and_says_so() -> None:
    sphinx = SphinxEngine(workers=1, max_backlog_s=1.0)
    await sphinx.start()
    try:
        results: list[Recognition] = []
        stream = sphinx.open_stream("call-3", "caller", results.append)
        first = clip_audio("librivox-0870")
        for at in range(0, first.size, FRAME):  # 7.1 s at once: far more than the 1 s allowed
            stream.feed(first[at : at + FRAME])
        errors = [r for r in results if isinstance(r, EngineError)]
        assert len(errors) == 1 and errors[0].code == "overload", results
        assert "behind real time" in errors[0].message

        await asyncio.sleep(6)  # the backlog drains; the next audio is accepted again
        second = clip_audio("librivox-0880")
        for at in range(0, second.size, FRAME):  # real time: this box may still fall behind
            stream.feed(second[at : at + FRAME])
            await asyncio.sleep(0.02)
        await stream.finish()
    finally:
        await sphinx.close()

    errors = [r for r in results if isinstance(r, EngineError)]
    assert all(e.code == "overload" for e in errors), errors
    finals = [r for r in results if isinstance(r, Final)]
    assert [f.utt for f in finals] == list(range(len(finals)))
    later = [f for f in finals if f.start_ms >= first.size * 1000 // SAMPLE_RATE]
    # The second clip's times are on the leg clock: after the 7.1 s of the first, dropped or not.
    assert later, finals
    assert later[-1].end_ms <= (first.size + second.size) * 1000 // SAMPLE_RATE + 100
    assert {"was", "not"} <= set(" ".join(f.text for f in later).split()), later


async def test_only_english_is_available() -> None:
    with pytest.raises(EngineUnavailable, match="only an English model"):
        await SphinxEngine(language="de").start()
