"""Voice activity detection: is this 20 ms frame speech?

callscribe uses WebRTC's VAD (the `webrtcvad-wheels` package) rather than silero-vad:
- it runs inline on the event loop for every leg: a 20 ms frame costs a few microseconds of C,
  where silero's network costs about a millisecond per 32 ms window and needs torch (or
  onnxruntime), which the default install (no vLLM) does not have;
- it is a ~100 kB wheel with no model file, on every platform callscribe supports;
- the segmenter only needs speech/non-speech per frame plus a hangover, which WebRTC's
  GMM does well on telephone-band speech (it was built for it); silero's better noise
  robustness matters less because Qwen3-ASR itself outputs nothing for non-speech.
The `SpeechDetector` protocol keeps the choice swappable.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from callscribe.engine.base import SAMPLE_RATE, Audio

FRAME_MS = 20
FRAME_SAMPLES = SAMPLE_RATE * FRAME_MS // 1000


class SpeechDetector(Protocol):
    def is_speech(self, frame: Audio) -> bool:
        """`frame` is exactly FRAME_SAMPLES float32 samples at 16 kHz."""
        ...


class WebRtcVad:
    """WebRTC VAD; `aggressiveness` 0 (keeps most audio) to 3 (drops most non-speech)."""

    def __init__(self, aggressiveness: int = 2) -> None:
        if aggressiveness not in range(4):
            raise ValueError(f"VAD aggressiveness {aggressiveness} must be 0, 1, 2 or 3")
        import webrtcvad

        self._vad = webrtcvad.Vad(aggressiveness)

    def is_speech(self, frame: Audio) -> bool:
        if frame.size != FRAME_SAMPLES:
            raise ValueError(f"VAD frame has {frame.size} samples, expected {FRAME_SAMPLES}")
        pcm = (np.clip(frame, -1.0, 1.0) * 32767.0).astype("<i2")
        return bool(self._vad.is_speech(pcm.tobytes(), SAMPLE_RATE))
