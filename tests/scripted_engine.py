"""A deterministic engine for plumbing tests: it recognises nothing, it says what it is told.

Every `partial_ms` of audio a leg emits a partial, every `utterance_ms` a final whose text
and words come from `script` (cycled); `finish()` closes the open utterance. Results are
emitted synchronously from `feed()`, on the event loop thread as the Engine contract asks.
"""

from __future__ import annotations

from collections.abc import Sequence

from callscribe.engine.base import SAMPLE_RATE, Audio, Emit, Engine, Final, LegStream, Partial, Vocabulary


class ScriptedStream(LegStream):
    def __init__(self, engine: ScriptedEngine, emit: Emit, script: list[str]) -> None:
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


class ScriptedEngine(Engine):
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
        return ScriptedStream(self, emit, self.calls.get(call_id, self.script))

    def open_stream_for(self, call_id: str, leg: str, emit: Emit, vocabulary: Vocabulary) -> LegStream:
        self.vocabularies[(call_id, leg)] = vocabulary
        return self.open_stream(call_id, leg, emit)
