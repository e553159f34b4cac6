"""A deterministic Engine for ingest and session plumbing tests: text per utterance.

It implements callscribe.engine.base.Engine without a model. Utterances are found by the
real UtteranceSegmenter over an energy detector (any frame louder than `threshold` RMS is
speech), so a tone or a speech clip with pauses gives the same utterances every run. The
n-th utterance of a leg is reported as `texts[n]` (or "utterance n" past the end): one
Partial when it opens, its Final when it closes. Results reach the leg on the event loop
after feed() returns, as with the real engines, and finish() returns once all are emitted.

`TimedScriptEngine` below cuts utterances by the clock instead, with word timings on its finals.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

import numpy as np

from callscribe.engine.base import (
    SAMPLE_RATE,
    Audio,
    Emit,
    Engine,
    Final,
    LegStream,
    Partial,
    Recognition,
    Vocabulary,
)
from callscribe.engine.segmenter import SegmenterConfig, Utterance, UtteranceSegmenter
from tests.support import ServiceFactory

if TYPE_CHECKING:
    from callscribe.service import Service


class EnergyDetector:
    def __init__(self, threshold: float = 0.01) -> None:
        self.threshold = threshold

    def is_speech(self, frame: Audio) -> bool:
        return float(np.sqrt(np.mean(frame * frame))) > self.threshold


class ScriptedEngine(Engine):
    name = "scripted"

    def __init__(
        self,
        texts: Sequence[str] = (),
        threshold: float = 0.01,
        config: SegmenterConfig | None = None,
    ) -> None:
        self.texts = tuple(texts)
        self.threshold = threshold
        self.config = config
        self.started = False
        self.closed = False
        self.streams: list[ScriptedLegStream] = []

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True

    @property
    def ready(self) -> bool:
        return self.started and not self.closed

    def text_for(self, utt: int) -> str:
        return self.texts[utt] if utt < len(self.texts) else f"utterance {utt}"

    def open_stream(self, call_id: str, leg: str, emit: Emit) -> LegStream:
        stream = ScriptedLegStream(self, f"{call_id}/{leg}", emit)
        self.streams.append(stream)
        return stream


class ScriptedLegStream(LegStream):
    def __init__(self, engine: ScriptedEngine, label: str, emit: Emit) -> None:
        self._engine = engine
        self.label = label
        self._emit = emit
        self._segmenter = UtteranceSegmenter(EnergyDetector(engine.threshold), engine.config)
        self._loop = asyncio.get_running_loop()
        self._pending: list[Recognition] = []
        self._partial_sent_for = -1
        self._finishing = False
        self.samples_fed = 0

    def feed(self, audio: Audio) -> None:
        if self._finishing:
            raise RuntimeError(f"leg {self.label} was finished; feed() after finish() is not allowed")
        samples = np.asarray(audio, dtype=np.float32)
        if samples.ndim != 1:
            raise ValueError(f"leg {self.label}: expected mono 1-D audio, got shape {samples.shape}")
        self.samples_fed += samples.size
        for utterance in self._segmenter.push(samples):
            self._final(utterance)
        segmenter = self._segmenter
        if segmenter.is_open and self._partial_sent_for < segmenter.open_utt:
            self._partial_sent_for = segmenter.open_utt
            start = segmenter.open_start_sample
            words = self._engine.text_for(segmenter.open_utt).split()
            self._queue(
                Partial(
                    segmenter.open_utt,
                    "",
                    " ".join(words[:1]),
                    start * 1000 // SAMPLE_RATE,
                    (start + segmenter.open_samples) * 1000 // SAMPLE_RATE,
                )
            )

    async def finish(self) -> None:
        if not self._finishing:
            self._finishing = True
            for utterance in self._segmenter.flush():
                self._final(utterance)
        self._deliver()

    def _final(self, utterance: Utterance) -> None:
        text = self._engine.text_for(utterance.utt)
        self._queue(Final(utterance.utt, text, utterance.start_ms, utterance.end_ms, lang="en"))

    def _queue(self, result: Recognition) -> None:
        if not self._pending:
            self._loop.call_soon(self._deliver)
        self._pending.append(result)

    def _deliver(self) -> None:
        pending, self._pending = self._pending, []
        for result in pending:
            self._emit(result)


def with_scripted_engine(make_service: ServiceFactory) -> ServiceFactory:
    """`make_service` whose bridges each run on a new ScriptedEngine (no model to load), for
    modules where recognition itself is not under test."""

    def factory(**overrides: Any) -> AbstractAsyncContextManager[Service]:
        overrides.setdefault("engine", ScriptedEngine())
        return make_service(**overrides)

    return factory


class TimedScriptStream(LegStream):
    def __init__(self, engine: TimedScriptEngine, emit: Emit, script: list[str]) -> None:
        self._engine = engine
        self._script = script
        self._emit = emit
        self._samples = 0
        self._utt = 0
        self._utt_start = 0  # ms
        self._next_partial = engine.partial_ms

    @property
    def _now_ms(self) -> int:
        return self._samples * 1000 // SAMPLE_RATE

    def feed(self, audio: Audio) -> None:
        self._samples += audio.size
        engine = self._engine
        while self._now_ms >= self._next_partial:
            end = self._next_partial
            self._next_partial += engine.partial_ms
            if end - self._utt_start >= engine.utterance_ms:
                self._final(end)
            else:
                words = self._text().split()
                self._emit(Partial(self._utt, " ".join(words[:1]), " ".join(words[1:]), self._utt_start, end))

    async def finish(self) -> None:
        if self._now_ms > self._utt_start:
            self._final(self._now_ms)

    def _text(self) -> str:
        script = self._script
        return script[self._utt % len(script)]

    def _final(self, end: int) -> None:
        words = self._text().split()
        step = max(1, (end - self._utt_start) // max(1, len(words)))
        timed = tuple(
            (w, self._utt_start + i * step, self._utt_start + (i + 1) * step, 0.9)
            for i, w in enumerate(words)
        )
        self._emit(Final(self._utt, " ".join(words), self._utt_start, end, words=timed, conf=0.9))
        self._engine.finals += 1
        self._utt += 1
        self._utt_start = end


class TimedScriptEngine(Engine):
    """By the clock, not by the audio: every `partial_ms` of audio a partial, every
    `utterance_ms` a final whose text and words come from `script` (cycled; per call from
    `calls`). For tests that need many finals fast (long calls, redaction, the supervisor)."""

    name = "scripted"

    def __init__(
        self,
        script: Sequence[str],
        utterance_ms: int = 5000,
        partial_ms: int = 270,
        calls: dict[str, Sequence[str]] | None = None,
    ) -> None:
        self.script = list(script)
        self.calls = {call_id: list(lines) for call_id, lines in (calls or {}).items()}  # per-call scripts
        self.utterance_ms = utterance_ms
        self.partial_ms = partial_ms
        self.finals = 0
        self.vocabularies: dict[tuple[str, str], Vocabulary] = {}  # what each leg was opened with

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    @property
    def ready(self) -> bool:
        return True

    def open_stream(self, call_id: str, leg: str, emit: Emit) -> LegStream:
        return TimedScriptStream(self, emit, self.calls.get(call_id, self.script))

    def open_stream_for(self, call_id: str, leg: str, emit: Emit, vocabulary: Vocabulary) -> LegStream:
        self.vocabularies[(call_id, leg)] = vocabulary
        return self.open_stream(call_id, leg, emit)
