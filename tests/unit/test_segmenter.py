"""UtteranceSegmenter against an energy detector and synthetic audio (tone = speech)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from callscribe.engine.base import SAMPLE_RATE, Audio
from callscribe.engine.segmenter import SegmenterConfig, Utterance, UtteranceSegmenter
from callscribe.engine.vad import FRAME_SAMPLES, WebRtcVad


class EnergyDetector:
    def is_speech(self, frame: Audio) -> bool:
        return float(np.sqrt(np.mean(frame * frame))) > 0.01


def tone(seconds: float, amplitude: float = 0.3) -> Audio:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (amplitude * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def silence(seconds: float) -> Audio:
    return np.zeros(int(seconds * SAMPLE_RATE), dtype=np.float32)


def segment(audio: Audio, config: SegmenterConfig | None = None) -> list[Utterance]:
    segmenter = UtteranceSegmenter(EnergyDetector(), config)
    return [*segmenter.push(audio), *segmenter.flush()]


def test_utterance_bounds_include_pre_roll_and_tail() -> None:
    utterances = segment(np.concatenate([silence(1.0), tone(2.0), silence(1.5), tone(1.0), silence(1.0)]))
    assert [u.cut for u in utterances] == ["silence", "silence"]
    first, second = utterances
    # Onset is confirmed after 3 speech frames; pre-roll reaches 300 ms before that frame.
    assert first.start_ms == pytest.approx(1000 - 300 + 60, abs=20)
    tail = SegmenterConfig().tail_ms
    assert first.end_ms == pytest.approx(3000 + tail, abs=20)  # tail_ms after the last speech frame
    assert second.start_ms == pytest.approx(4500 - 300 + 60, abs=20)
    assert (first.utt, second.utt) == (0, 1)
    assert first.audio.size == first.end_sample - first.start_sample


def test_short_pause_does_not_split() -> None:
    pause = (SegmenterConfig().end_silence_ms - 40) / 1000  # just below the end of an utterance
    utterances = segment(np.concatenate([tone(1.0), silence(pause), tone(1.0), silence(1.0)]))
    assert len(utterances) == 1


def test_click_does_not_open_an_utterance() -> None:
    assert segment(np.concatenate([silence(0.5), tone(0.04), silence(1.0)])) == []


def test_flush_closes_open_utterance_with_every_sample() -> None:
    audio = np.concatenate([silence(0.5), tone(1.0), tone(0.0101)])
    utterances = segment(audio)
    assert len(utterances) == 1 and utterances[0].cut == "flush"
    assert utterances[0].end_sample == audio.size


def test_long_speech_is_cut_at_the_quietest_point_within_the_window() -> None:
    # 30 s of speech with one quiet dip at 17.0-17.1 s: the first cut must land there.
    speech = tone(30.0)
    speech[int(17.0 * SAMPLE_RATE) : int(17.1 * SAMPLE_RATE)] *= 0.05
    config = SegmenterConfig(max_window_sec=20.0, cut_search_sec=4.0)
    utterances = segment(speech, config)
    assert utterances[0].cut == "window"
    assert utterances[0].end_ms == pytest.approx(17060, abs=60)
    assert all(u.audio.size <= 20 * SAMPLE_RATE for u in utterances)
    # Nothing lost or duplicated across the cut.
    assert utterances[1].start_sample == utterances[0].end_sample
    assert sum(u.audio.size for u in utterances) == speech.size


def test_monologue_without_pauses_is_bounded() -> None:
    utterances = segment(tone(65.0), SegmenterConfig(max_window_sec=20.0))
    assert len(utterances) == 4
    assert max(u.audio.size for u in utterances) <= 20 * SAMPLE_RATE


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=40))
def test_push_sizes_do_not_change_segmentation(sizes: list[int]) -> None:
    audio = np.concatenate([silence(0.3), tone(1.2), silence(0.8), tone(0.7), silence(0.2)])
    expected = segment(audio)
    segmenter = UtteranceSegmenter(EnergyDetector())
    got: list[Utterance] = []
    position = 0
    for size in sizes * (audio.size // sum(sizes) + 1):
        if position >= audio.size:
            break
        got.extend(segmenter.push(audio[position : position + size]))
        position += size
    got.extend(segmenter.flush())
    assert [(u.start_sample, u.end_sample, u.cut) for u in got] == [
        (u.start_sample, u.end_sample, u.cut) for u in expected
    ]


def test_invalid_config_is_refused_with_the_value() -> None:
    with pytest.raises(ValueError, match="tail_ms 900"):
        SegmenterConfig(tail_ms=900, end_silence_ms=600)


def test_webrtc_vad_tells_speech_from_silence() -> None:
    from tests.support import load_clip

    clip = load_clip("librivox-0870")
    assert clip.rate == SAMPLE_RATE
    speech = clip.pcm.astype(np.float32) / 32768.0
    vad = WebRtcVad(2)
    frames = speech[: speech.size - speech.size % FRAME_SAMPLES].reshape(-1, FRAME_SAMPLES)
    voiced = sum(vad.is_speech(f) for f in frames) / len(frames)
    assert voiced > 0.5
    assert not any(vad.is_speech(f) for f in silence(1.0).reshape(-1, FRAME_SAMPLES))
    with pytest.raises(ValueError, match="161 samples"):
        vad.is_speech(np.zeros(161, dtype=np.float32))
