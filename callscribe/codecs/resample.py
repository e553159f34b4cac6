"""Per-leg stateful resampling to the engine's 16 kHz float32."""

from __future__ import annotations

import numpy as np
import soxr

from callscribe.codecs.base import Pcm16
from callscribe.engine.base import SAMPLE_RATE, Audio

_INT16_SCALE = np.float32(1.0 / 32768.0)


class Resampler:
    """Wraps soxr.ResampleStream so that consecutive 20 ms frames resample exactly as the
    whole signal would: the filter state crosses frame edges, so there are no clicks."""

    def __init__(self, in_rate: int, out_rate: int = SAMPLE_RATE) -> None:
        if in_rate <= 0:
            raise ValueError(f"input sample rate must be positive, got {in_rate}")
        self.in_rate = in_rate
        self.out_rate = out_rate
        self._stream = (
            None if in_rate == out_rate else soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32")
        )

    def process(self, pcm: Pcm16) -> Audio:
        audio = pcm.astype(np.float32) * _INT16_SCALE
        if self._stream is None:
            return audio
        return np.asarray(self._stream.resample_chunk(audio), dtype=np.float32)

    def flush(self) -> Audio:
        """The filter's tail; call once when the leg (or its input rate) ends."""
        if self._stream is None:
            return np.zeros(0, dtype=np.float32)
        return np.asarray(
            self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True), dtype=np.float32
        )
