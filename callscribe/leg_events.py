"""The two bookkeeping jobs a `Leg` delegates: timing results and building its events.

`LatencyTracker` remembers when each stretch of audio reached the engine, so a result ending
at audio position `end_ms` can be timed from the moment that audio arrived. `LegEvents` stamps
and numbers every event of one leg (call_id, leg, engine and a `seq` monotonic per leg) and
turns engine recognitions into TranscriptEvents. Neither does I/O; the clock is passed in.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from callscribe.bridge.events import EndReason
from callscribe.engine.base import EngineError, Partial, Recognition
from callscribe.events import EventType, TranscriptEvent, Word

# Enough (audio position → wall clock) checkpoints to time results up to ~2 minutes back.
LATENCY_CHECKPOINTS = 6000


class LatencyTracker:
    def __init__(
        self, clock: Callable[[], float] = time.monotonic, checkpoints: int = LATENCY_CHECKPOINTS
    ) -> None:
        self._clock = clock
        self._checkpoints: deque[tuple[int, float]] = deque(maxlen=checkpoints)

    def fed(self, audio_ms: int) -> None:
        """The leg's audio up to `audio_ms` has just reached the engine."""
        self._checkpoints.append((audio_ms, self._clock()))

    def latency_ms(self, end_ms: int) -> int | None:
        """Wall time since the audio ending at `end_ms` reached the engine; None when that audio
        is older than the checkpoints kept (or was never fed)."""
        for audio_ms, wall in self._checkpoints:
            if audio_ms >= end_ms:
                return max(0, int((self._clock() - wall) * 1000))
        return None


class LegEvents:
    """Builds the numbered events of one leg; `seq` counts every event built, from 1."""

    def __init__(self, call_id: str, leg: str, engine: str) -> None:
        self.call_id = call_id
        self.leg = leg
        self.engine = engine
        self.seq = 0

    def build(self, kind: EventType, **fields: Any) -> TranscriptEvent:
        self.seq += 1
        return TranscriptEvent(
            type=kind, call_id=self.call_id, leg=self.leg, seq=self.seq, engine=self.engine, **fields
        )

    def started(self, meta: dict[str, Any]) -> TranscriptEvent:
        return self.build(EventType.LEG_STARTED, meta=meta)

    def ended(self, reason: EndReason, audio_ms: int) -> TranscriptEvent:
        return self.build(
            EventType.LEG_ENDED, end_ms=audio_ms, meta={"reason": str(reason), "audio_ms": audio_ms}
        )

    def dtmf(self, digit: str, duration_ms: int, end_ms: int) -> TranscriptEvent:
        return self.build(EventType.DTMF, text=digit, start_ms=max(0, end_ms - duration_ms), end_ms=end_ms)

    def error(self, message: str, code: str, utt: int | None = None) -> TranscriptEvent:
        return self.build(EventType.ERROR, utt=utt, text=message, meta={"code": code})

    def recognised(self, result: Recognition, latency_ms: int | None) -> TranscriptEvent:
        """The event of one engine result (`latency_ms` is not part of an error event)."""
        if isinstance(result, EngineError):
            return self.error(result.message, result.code, utt=result.utt)
        extra: dict[str, Any]
        if isinstance(result, Partial):
            kind, extra = EventType.PARTIAL, {"stable": result.stable, "unstable": result.unstable}
        else:  # a final's text is all stable
            timed = tuple(Word(w=w, start_ms=s, end_ms=e, conf=round(c, 3)) for w, s, e, c in result.words)
            kind, extra = (
                EventType.FINAL,
                {
                    "stable": result.text,
                    "lang": result.lang,
                    "words": timed,
                    "conf": result.conf,
                },
            )
        return self.build(
            kind,
            utt=result.utt,
            text=result.text,
            start_ms=result.start_ms,
            end_ms=result.end_ms,
            latency_ms=latency_ms,
            **extra,
        )
