"""Utterance segmentation: a leg's audio in, finished utterances out (sans-IO, no clock).

The recogniser decodes utterances, never the whole call, so the cost of every decode is
bounded whatever the call length. An utterance opens when most of the last few 20 ms
frames are speech (with `pre_roll_ms` of audio before, so soft onsets are kept), closes
after `end_silence_ms` of non-speech (keeping `tail_ms` after the last speech frame), and
is cut at the quietest point of its last `cut_search_sec` when it reaches `max_window_sec`
(a monologue without pauses still gets finals, and no decode sees more than the window).
Sample positions count from the leg's first sample.

Speculative ends: once `speculate_silence_ms` of non-speech follows the last speech frame,
`ending()` offers the utterance exactly as it will close if no speech comes before
`end_silence_ms` (same audio, same bounds), so a recogniser can start decoding the final
while the end is still being confirmed. Speech before the confirmation withdraws the offer
(`ending_end_sample` goes back to None); the utterance then simply goes on.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal

import numpy as np

from callscribe.engine.base import SAMPLE_RATE, Audio
from callscribe.engine.vad import FRAME_MS, FRAME_SAMPLES, SpeechDetector

Cut = Literal["silence", "window", "flush"]


@dataclass(frozen=True, slots=True)
class Utterance:
    utt: int
    audio: Audio
    start_sample: int
    cut: Cut

    @property
    def end_sample(self) -> int:
        return self.start_sample + self.audio.size

    @property
    def start_ms(self) -> int:
        return self.start_sample * 1000 // SAMPLE_RATE

    @property
    def end_ms(self) -> int:
        return self.end_sample * 1000 // SAMPLE_RATE


@dataclass(frozen=True, slots=True)
class SegmenterConfig:
    pre_roll_ms: int = 300
    onset_frames: int = 3  # speech frames among the last `onset_window` that open an utterance
    onset_window: int = 5
    # Confirmation of an utterance's end: a pause this long closes it. Shorter pauses inside a
    # sentence do not; docs/latency.md has the trade-off (finals latency vs split sentences).
    end_silence_ms: int = 240
    tail_ms: int = 80
    # Offer the ending utterance for a speculative decode after this much silence (None: never).
    speculate_silence_ms: int | None = 80
    max_window_sec: float = 20.0
    cut_search_sec: float = 4.0

    def __post_init__(self) -> None:
        if not 0 < self.onset_frames <= self.onset_window:
            raise ValueError(f"onset_frames {self.onset_frames} must be within 1..onset_window")
        if self.tail_ms > self.end_silence_ms:
            raise ValueError(f"tail_ms {self.tail_ms} must not exceed end_silence_ms {self.end_silence_ms}")
        spec = self.speculate_silence_ms
        if spec is not None and not self.tail_ms <= spec < self.end_silence_ms:
            raise ValueError(
                f"speculate_silence_ms {spec} must be within tail_ms {self.tail_ms} and "
                f"end_silence_ms {self.end_silence_ms} (below it)"
            )
        if not 0 < self.cut_search_sec < self.max_window_sec:
            raise ValueError(
                f"cut_search_sec {self.cut_search_sec} must be > 0 and below "
                f"max_window_sec {self.max_window_sec}"
            )

    @property
    def max_window_frames(self) -> int:
        return int(self.max_window_sec * 1000) // FRAME_MS


class UtteranceSegmenter:
    def __init__(self, detector: SpeechDetector, config: SegmenterConfig | None = None) -> None:
        self.config = config or SegmenterConfig()
        self._detector = detector
        self._remainder = np.zeros(0, dtype=np.float32)
        self._position = 0  # leg sample index where the next whole frame starts
        pre_roll_frames = max(self.config.onset_window, self.config.pre_roll_ms // FRAME_MS)
        self._idle: deque[Audio] = deque(maxlen=pre_roll_frames)
        self._idle_voiced: deque[bool] = deque(maxlen=self.config.onset_window)
        self._frames: list[Audio] = []  # the open utterance, frame by frame
        self._energy: list[float] = []
        self._start_sample = 0
        self._preroll_frames = 0  # frames the open utterance held when it opened (before the onset)
        self._silence_run = 0
        self._longest_pause = 0  # frames: the longest pause in the open utterance speech ended
        self._last_speech = -1  # frame index (in the open utterance) of its last speech frame
        self._next_utt = 0

    @property
    def is_open(self) -> bool:
        return bool(self._frames)

    @property
    def open_utt(self) -> int:
        """The number the open (or next) utterance has."""
        return self._next_utt

    @property
    def open_start_sample(self) -> int:
        return self._start_sample

    @property
    def open_samples(self) -> int:
        return len(self._frames) * FRAME_SAMPLES

    @property
    def open_preroll_samples(self) -> int:
        """Samples of the open utterance from before it opened: its pre-roll, shorter than
        `pre_roll_ms` when the leg or the previous utterance ended less than that before the
        onset, none after a window cut (the utterance goes on mid-speech)."""
        return self._preroll_frames * FRAME_SAMPLES if self._frames else 0

    def open_audio(self) -> Audio:
        """A copy of the open utterance's audio so far (empty when none is open)."""
        if not self._frames:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(self._frames)

    @property
    def pause_ms(self) -> int:
        """How long the open utterance's current pause is (0 while speech goes on)."""
        return self._silence_run * FRAME_MS if self._frames else 0

    @property
    def longest_pause_ms(self) -> int:
        """The longest pause inside the open utterance that speech resumed after."""
        return self._longest_pause * FRAME_MS if self._frames else 0

    @property
    def ending_end_sample(self) -> int | None:
        """Where the open utterance will end if it closes at the current pause: set once the
        pause reaches `speculate_silence_ms`, None while speech goes on (cheap, no copy)."""
        spec = self.config.speculate_silence_ms
        if not self._frames or spec is None or self._silence_run * FRAME_MS < spec:
            return None
        return self._start_sample + self._keep_at_silence() * FRAME_SAMPLES

    def ending(self) -> Utterance | None:
        """The utterance `push` will return if the current pause reaches `end_silence_ms`
        (identical audio and bounds), or None (see `ending_end_sample`)."""
        if self.ending_end_sample is None:
            return None
        keep = self._keep_at_silence()
        return Utterance(self._next_utt, np.concatenate(self._frames[:keep]), self._start_sample, "silence")

    def push(self, audio: Audio) -> list[Utterance]:
        """Add audio (any length); returns the utterances this audio closed, in order."""
        samples = np.concatenate([self._remainder, np.asarray(audio, dtype=np.float32).reshape(-1)])
        whole = samples.size - samples.size % FRAME_SAMPLES
        self._remainder = samples[whole:].copy()
        closed: list[Utterance] = []
        for offset in range(0, whole, FRAME_SAMPLES):
            frame = samples[offset : offset + FRAME_SAMPLES].copy()
            closed.extend(self._frame(frame, self._detector.is_speech(frame)))
            self._position += FRAME_SAMPLES
        return closed

    def flush(self) -> list[Utterance]:
        """End of the leg: close the open utterance with every sample received."""
        tail, self._remainder = self._remainder, np.zeros(0, dtype=np.float32)
        if not self._frames:
            self._position += tail.size
            return []
        audio = np.concatenate([*self._frames, tail])
        self._position += tail.size
        return [self._close(audio, "flush")]

    def _frame(self, frame: Audio, speech: bool) -> list[Utterance]:
        if not self._frames:
            self._idle.append(frame)
            self._idle_voiced.append(speech)
            if sum(self._idle_voiced) >= self.config.onset_frames:
                self._open()
            return []
        self._frames.append(frame)
        self._energy.append(float(np.sqrt(np.mean(frame * frame))))
        if speech:
            self._longest_pause = max(self._longest_pause, self._silence_run)
            self._silence_run = 0
            self._last_speech = len(self._frames) - 1
        else:
            self._silence_run += 1
        if self._silence_run * FRAME_MS >= self.config.end_silence_ms:
            return [self._end_at_silence()]
        if len(self._frames) >= self.config.max_window_frames:
            return [self._cut_window()]
        return []

    def _open(self) -> None:
        self._frames = list(self._idle)
        self._energy = [float(np.sqrt(np.mean(f * f))) for f in self._frames]
        self._start_sample = self._position + FRAME_SAMPLES - len(self._frames) * FRAME_SAMPLES
        self._last_speech = len(self._frames) - 1
        self._preroll_frames = len(self._frames)
        self._silence_run = self._longest_pause = 0
        self._idle.clear()
        self._idle_voiced.clear()

    def _keep_at_silence(self) -> int:
        return min(len(self._frames), self._last_speech + 1 + self.config.tail_ms // FRAME_MS)

    def _end_at_silence(self) -> Utterance:
        keep = self._keep_at_silence()
        rest = self._frames[keep:]
        utterance = self._close(np.concatenate(self._frames[:keep]), "silence")
        # The silence after the tail is where the next onset's pre-roll comes from.
        self._idle.extend(rest)
        self._idle_voiced.extend([False] * len(rest))
        return utterance

    def _cut_window(self) -> Utterance:
        """Cut where a 60 ms window is quietest within the last `cut_search_sec`: a pause
        between words there, if any, so no word is split between two finals."""
        frames = len(self._frames)
        search = int(self.config.cut_search_sec * 1000) // FRAME_MS
        energy = np.convolve(np.asarray(self._energy), np.ones(3) / 3, mode="same")
        lo = max(1, frames - search)
        cut = lo + int(np.argmin(energy[lo:frames])) + 1  # frames [0, cut) go to this utterance
        cut = min(cut, frames - 1)
        head, rest, rest_energy = self._frames[:cut], self._frames[cut:], self._energy[cut:]
        start = self._start_sample
        last_speech = self._last_speech - cut
        utterance = Utterance(self._next_utt, np.concatenate(head), start, "window")
        self._next_utt += 1
        self._frames, self._energy = rest, rest_energy
        self._preroll_frames = self._longest_pause = 0
        self._start_sample = start + cut * FRAME_SAMPLES
        self._last_speech = max(0, last_speech)
        return utterance

    def _close(self, audio: Audio, cut: Cut) -> Utterance:
        utterance = Utterance(self._next_utt, audio, self._start_sample, cut)
        self._next_utt += 1
        self._frames, self._energy = [], []
        self._silence_run = 0
        self._last_speech = -1
        return utterance
