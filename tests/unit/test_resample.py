"""The per-leg resampler: frame-by-frame output equals one-piece output (no clicks at edges)."""

from __future__ import annotations

import numpy as np
import pytest

from callscribe.codecs.resample import Resampler


@pytest.mark.parametrize("rate", [8000, 44100, 48000])
def test_frames_resample_like_one_piece(rate: int) -> None:
    t = np.arange(rate * 2) / rate
    sine = (np.sin(2 * np.pi * 300 * t) * 12000).astype(np.int16)
    whole = Resampler(rate)
    one_piece = np.concatenate([whole.process(sine), whole.flush()])
    framed = Resampler(rate)
    frame = rate // 50  # 20 ms
    chunks = [framed.process(sine[i : i + frame]) for i in range(0, sine.size, frame)]
    in_frames = np.concatenate([*chunks, framed.flush()])
    assert in_frames.size == one_piece.size
    assert np.max(np.abs(in_frames - one_piece)) < 1e-4
    # No discontinuity: the largest step between samples stays that of a 300 Hz sine.
    settled = in_frames[1000:-1000]
    max_step = 2 * np.pi * 300 / 16000 * 12000 / 32768
    assert np.max(np.abs(np.diff(settled))) < max_step * 1.05
    assert abs(in_frames.size - 32000) <= 64


def test_16k_passes_through() -> None:
    pcm = np.array([0, 16384, -32768], dtype=np.int16)
    resampler = Resampler(16000)
    assert resampler.process(pcm).tolist() == [0.0, 0.5, -1.0]
    assert resampler.flush().size == 0
