"""Issue 16's latency features against the scripted model stand-in (not timed): speculative
finals, the short first chunk, the bounded partial window and pass budget, int16 payloads.
Speed and latency figures come from bench/latency.py, never from here."""

from __future__ import annotations

import base64
import io
import json
import wave

import numpy as np
import pytest

from callscribe.engine.base import SAMPLE_RATE, Audio
from callscribe.engine.qwen3.backend import DecodeRequest
from callscribe.engine.qwen3.prompt import build_prompt
from callscribe.engine.qwen3.remote import RemoteBackend, wav_float32, wav_pcm16
from callscribe.engine.qwen3.router import ReplicaRouter
from callscribe.engine.qwen3.streaming import FINAL_PRIORITY, StreamingConfig
from callscribe.engine.segmenter import SegmenterConfig, UtteranceSegmenter
from tests.unit.test_qwen3_streaming import (
    Collector,
    ScriptedBackend,
    count_words,
    feed_realtime,
    make_engine,
    seconds_of,
)
from tests.unit.test_segmenter import EnergyDetector, silence, tone

# Speculate at 120 ms of pause, confirm at 260 ms (explicit: the defaults are tuned by the bench).
FAST = SegmenterConfig(end_silence_ms=260, tail_ms=120, speculate_silence_ms=120)
LATENCY = {"segmenter": FAST, "first_chunk_sec": 0.5, "partial_window_sec": 4.0, "partial_passes": 1.5}


async def feed_frames(stream: object, audio: Audio, step_sec: float = 0.02) -> None:
    """Feed like an RTP leg (20 ms packets), letting decodes run between packets."""
    await feed_realtime(stream, audio, step_sec, yields=3)


def kinds_of(backend: ScriptedBackend) -> list[str]:
    return [c.request.request_id.rsplit("/", 1)[1][0] for c in backend.calls]  # p, s or f


def test_segmenter_offers_the_ending_utterance_exactly_as_it_closes() -> None:
    segmenter = UtteranceSegmenter(EnergyDetector(), FAST)
    assert segmenter.push(np.concatenate([silence(0.5), tone(1.5), silence(0.1)])) == []
    assert segmenter.ending() is None  # 100 ms of pause: not yet
    segmenter.push(silence(0.04))
    offered = segmenter.ending()
    assert offered is not None and segmenter.ending_end_sample == offered.end_sample
    (closed,) = segmenter.push(silence(0.2))
    assert (closed.utt, closed.start_sample, closed.end_sample) == (
        offered.utt,
        offered.start_sample,
        offered.end_sample,
    )
    assert np.array_equal(closed.audio, offered.audio)


def test_segmenter_withdraws_the_offer_when_speech_resumes() -> None:
    segmenter = UtteranceSegmenter(EnergyDetector(), FAST)
    segmenter.push(np.concatenate([silence(0.5), tone(1.5), silence(0.2)]))
    assert segmenter.ending_end_sample is not None
    segmenter.push(tone(0.1))
    assert segmenter.ending_end_sample is None and segmenter.is_open
    assert segmenter.longest_pause_ms == 200  # the pause speech resumed after


def test_speculation_must_sit_between_tail_and_end() -> None:
    with pytest.raises(ValueError, match="speculate_silence_ms 300"):
        SegmenterConfig(end_silence_ms=260, tail_ms=120, speculate_silence_ms=300)
    with pytest.raises(ValueError, match="speculate_silence_ms 100"):
        SegmenterConfig(end_silence_ms=260, tail_ms=120, speculate_silence_ms=100)


async def test_speculative_final_is_published_once_the_end_is_confirmed() -> None:
    backend = ScriptedBackend(count_words)
    out = Collector()
    engine = make_engine(backend, **LATENCY)
    stream = engine.open_stream("c", "a", out)
    await feed_frames(stream, np.concatenate([silence(0.5), tone(2.0), silence(0.2)]))
    assert out.finals == []  # decoded already, but the end is not confirmed yet
    assert "s" in kinds_of(backend)
    await feed_frames(stream, silence(0.1))
    assert len(out.finals) == 1  # confirmed: published without another decode
    await stream.finish()
    assert "f" not in kinds_of(backend)  # no second decode of the utterance
    assert engine.stats.speculative_used == 1 and engine.stats.finals_completed == 1


async def test_speculative_final_aborted_by_resumed_speech_gives_one_final_with_every_word() -> None:
    backend = ScriptedBackend(count_words)
    backend.hold = True  # the speculation is still running when the speaker goes on
    out = Collector()
    engine = make_engine(backend, **LATENCY)
    stream = engine.open_stream("c", "a", out)
    first, pause, second = tone(2.0), silence(0.2), tone(1.5)
    await feed_frames(stream, np.concatenate([silence(0.5), first, pause]))
    speculations = [c for c in backend.calls if "/s" in c.request.request_id]
    assert len(speculations) == 1 and not speculations[0].aborted
    await feed_frames(stream, second)  # speech before the 260 ms confirmation
    assert speculations[0].aborted and engine.stats.speculative_aborted == 1
    backend.hold = False
    for call in backend.calls:
        call.release.set()
    await feed_frames(stream, silence(1.0))
    await stream.finish()

    assert len(out.finals) == 1 and out.finals[0].utt == 0
    final_requests = [c.request for c in backend.calls if not c.aborted and c.request.kind == "final"]
    # The published final decoded the whole utterance: both stretches of speech and the pause.
    assert seconds_of(final_requests[-1]) >= (first.size + pause.size + second.size) / SAMPLE_RATE
    spoken = (out.finals[0].end_ms - out.finals[0].start_ms) / 1000
    assert len(out.finals[0].text.split()) == int(spoken * 2)  # count_words: 2 per second, none lost
    assert engine.stats.speculative_used in (0, 1)  # the second pause's speculation may be the final


async def test_pauses_a_speaker_resumed_after_twice_are_not_speculated_on_again() -> None:
    """Phrase pauses between the speculation point and the confirmation: each speculation
    is aborted and wastes a pass. After the second, a pause no longer than those is not
    speculated on; a longer one (the real end) still is, and it is the one final."""
    backend = ScriptedBackend(count_words)
    out = Collector()
    engine = make_engine(backend, **LATENCY, speculation_passes=None)  # this rule alone
    stream = engine.open_stream("c", "a", out)
    phrase = np.concatenate([tone(1.0), silence(0.16)])  # 160 ms: past 120, short of 260
    await feed_frames(stream, np.concatenate([silence(0.5), phrase, phrase]))
    assert engine.stats.speculative_started == 2
    await feed_frames(stream, np.concatenate([phrase, phrase, tone(1.0)]))
    assert engine.stats.speculative_started == 2  # two more 160 ms pauses: none
    assert engine.stats.speculative_skipped >= 2
    await feed_frames(stream, silence(0.3))  # the end: longer than any pause before
    await stream.finish()
    assert engine.stats.speculative_started == 3 and engine.stats.speculative_used == 1
    assert "f" not in kinds_of(backend)  # the speculation was the final
    assert len(out.finals) == 1 and engine.stats.finals_completed == 1  # aborted ones are no finals
    spoken = (out.finals[0].end_ms - out.finals[0].start_ms) / 1000
    assert len(out.finals[0].text.split()) == int(spoken * 2)


async def test_first_partial_comes_after_the_short_first_chunk() -> None:
    backend = ScriptedBackend(count_words)
    out = Collector()
    stream = make_engine(backend, **LATENCY).open_stream("c", "a", out)
    await feed_frames(stream, np.concatenate([silence(0.5), tone(1.2)]))
    partials = [c for c in backend.calls if c.request.kind == "partial"]
    partial_secs = [seconds_of(c.request) for c in partials]
    # 0.3 s of pre-roll (the onset's 3 frames included), then first_chunk_sec.
    assert partial_secs and partial_secs[0] == pytest.approx(0.8, abs=0.02)
    assert partials[0].priority == FINAL_PRIORITY  # the first words go with the finals
    assert out.partials and out.partials[0].end_ms - out.partials[0].start_ms == pytest.approx(800, abs=20)
    await stream.finish()


async def test_first_chunk_counts_from_the_onset_when_the_pre_roll_is_short() -> None:
    """A leg that starts mid-speech (or an utterance right after another) has little
    pre-roll: its first partial must not wait for the missing pre-roll."""
    backend = ScriptedBackend(count_words)
    out = Collector()
    stream = make_engine(backend, **LATENCY).open_stream("c", "a", out)
    await feed_frames(stream, tone(1.2))
    partials = [c.request for c in backend.calls if c.request.kind == "partial"]
    # Opened at its third speech frame (60 ms of pre-roll), then first_chunk_sec.
    assert partials and seconds_of(partials[0]) == pytest.approx(0.56, abs=0.02)
    await stream.finish()


async def test_partials_never_decode_more_than_the_window_and_passes_stay_bounded() -> None:
    backend = ScriptedBackend(count_words)
    out = Collector()
    engine = make_engine(backend, **LATENCY)
    stream = engine.open_stream("c", "a", out)
    await feed_frames(stream, np.concatenate([silence(0.3), tone(19.0), silence(0.6)]), step_sec=0.1)
    await stream.finish()
    partials = [c.request for c in backend.calls if c.request.kind == "partial"]
    finals = [c.request for c in backend.calls if c.request.kind == "final" and not c.aborted]
    assert len(partials) >= 6 and len(out.finals) == 1
    assert max(seconds_of(r) for r in partials) <= 4.0  # the window, never the utterance
    utterance = seconds_of(finals[-1])
    passes = (sum(seconds_of(r) for r in partials) + utterance) / utterance
    assert passes <= 2.5
    # A windowed partial continues the committed prefix: its text still covers the utterance.
    late = [p for p in out.partials if p.end_ms - p.start_ms > 8000]
    assert late and all(p.text.startswith("w0 w1") for p in late)


def test_window_and_budget_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="partial_window_sec"):
        StreamingConfig(partial_window_sec=0)
    with pytest.raises(ValueError, match="first_chunk_sec"):
        StreamingConfig(first_chunk_sec=-1.0)
    config = StreamingConfig(first_chunk_sec=0.8, chunk_size_sec=2.0)
    seconds = (0.7, 0.8, 2.7, 2.8, 4.8)
    assert [config.chunk_boundaries(int(s * SAMPLE_RATE)) for s in seconds] == [0, 1, 1, 2, 3]
    preroll = int(0.3 * SAMPLE_RATE)  # the first chunk counts from the opening
    assert [config.chunk_boundaries(int(s * SAMPLE_RATE), preroll) for s in (1.0, 1.1, 3.1)] == [0, 1, 2]
    seed_cadence = StreamingConfig(first_chunk_sec=None, chunk_size_sec=2.0)
    assert seed_cadence.chunk_boundaries(int(1.9 * SAMPLE_RATE), preroll) == 0  # pre-roll included
    assert seed_cadence.chunk_boundaries(int(2.0 * SAMPLE_RATE), preroll) == 1


class _NoTokenizer:
    """Body building needs the audio token's id and nothing else of the tokenizer."""

    def token_id(self, token: str) -> int | None:
        return None


async def test_remote_request_body_carries_int16_pcm() -> None:
    audio = (0.4 * np.sin(np.arange(SAMPLE_RATE) / 7.0)).astype(np.float32)
    backend = RemoteBackend(ReplicaRouter(["http://127.0.0.1:9"]), "m", _NoTokenizer())  # type: ignore[arg-type]
    request = DecodeRequest("c/a/x/u0/final", "final", build_prompt(), audio, 8)
    body = backend._body(request, 0)
    (part,) = body["messages"][0]["content"]
    wav_bytes = base64.b64decode(part["input_audio"]["data"])
    with wave.open(io.BytesIO(wav_bytes)) as wav:
        assert (wav.getsampwidth(), wav.getnchannels(), wav.getframerate()) == (2, 1, SAMPLE_RATE)
        samples = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    assert np.max(np.abs(samples / 32767.0 - audio)) <= 0.5 / 32767 + 1e-7  # within half a step
    # Half the float32 WAV's bytes on the wire (both base64 inside the JSON body).
    as_float = {**part["input_audio"], "data": base64.b64encode(wav_float32(audio)).decode()}
    ratio = len(json.dumps(part["input_audio"])) / len(json.dumps(as_float))
    assert ratio == pytest.approx(0.5, abs=0.01)
    assert wav_pcm16(np.array([2.0, -2.0], dtype=np.float32))[44:] == b"\xff\x7f\x01\x80"  # clipped
    await backend.close()


async def test_aborted_speculations_are_bounded_by_speculation_passes() -> None:
    backend = ScriptedBackend(count_words)
    out = Collector()
    engine = make_engine(backend, **LATENCY, speculation_passes=0.5)
    stream = engine.open_stream("c", "a", out)
    phrase = np.concatenate([tone(1.0), silence(0.16)])  # a pause long enough to speculate on
    await feed_frames(stream, np.concatenate([silence(0.5), *[phrase] * 8, tone(1.0), silence(0.6)]))
    await stream.finish()
    stats = engine.stats
    assert len(out.finals) == 1  # one utterance: no pause reached the confirmation
    assert stats.speculative_skipped > 0 and stats.speculative_started < 9
    wasted = sum(seconds_of(c.request) for c in backend.calls if "/s" in c.request.request_id and c.aborted)
    spoken = (out.finals[0].end_ms - out.finals[0].start_ms) / 1000
    # The last waste allowed came when it was at most 0.5 passes; that speculation added one more.
    assert wasted <= 0.5 * spoken + spoken / 2
