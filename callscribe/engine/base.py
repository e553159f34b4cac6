"""The engine interface: one shared Engine (one model), one LegStream per call leg.

A LegStream takes 16 kHz float32 mono audio with `feed()` (synchronous, never blocks the
event loop: heavy work runs in the engine's own threads or processes) and reports what it
recognises through the `emit` callback it was opened with, always on the event loop thread.
`finish()` closes the open utterance with a final and returns once every result of the leg
has been emitted. Times are milliseconds from the leg's first sample.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

SAMPLE_RATE = 16000
Audio = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class Partial:
    """A hypothesis for the open utterance; `stable` will not change, `unstable` may."""

    utt: int
    stable: str
    unstable: str
    start_ms: int
    end_ms: int

    @property
    def text(self) -> str:
        return " ".join(part for part in (self.stable, self.unstable) if part)


# One recognised word: (word, start_ms, end_ms, confidence 0..1), times from the leg's start.
TimedWord = tuple[str, int, int, float]


@dataclass(frozen=True, slots=True)
class Final:
    """The recognised text of one finished utterance (may be empty: noise, no words).
    `words` and `conf` are empty/None when the engine has no word timings (Qwen3-ASR)."""

    utt: int
    text: str
    start_ms: int
    end_ms: int
    lang: str = ""
    words: tuple[TimedWord, ...] = ()
    conf: float | None = None


@dataclass(frozen=True, slots=True)
class EngineError:
    """Something the leg's subscribers should know (overload refusal, model failure)."""

    message: str
    code: str = "engine"
    utt: int | None = None


Recognition = Partial | Final | EngineError
Emit = Callable[[Recognition], None]


class EngineUnavailable(RuntimeError):
    """The engine cannot start (model missing, package not installed); one-line reason."""


class LegStream(ABC):
    @abstractmethod
    def feed(self, audio: Audio) -> None:
        """Append audio (any length) to the leg; returns at once."""

    @abstractmethod
    async def finish(self) -> None:
        """Flush the open utterance to a final and wait until all results are emitted."""


@dataclass(frozen=True, slots=True)
class Vocabulary:
    """Per-call recognition hints from the ingest (callscribe.ingest_options): free-text
    `context` (product, agent and account names) and `keyterms`."""

    context: str = ""
    keyterms: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.context or self.keyterms)

    def prompt_context(self, base: str = "") -> str:
        """The engine-wide context, then the call's, then its key terms, as one text."""
        terms = f"Key terms: {', '.join(self.keyterms)}" if self.keyterms else ""
        return "\n".join(part for part in (base.strip(), self.context.strip(), terms) if part)


class Engine(ABC):
    name: str

    @abstractmethod
    async def start(self) -> None:
        """Load the model; raises EngineUnavailable with a one-line reason."""

    @abstractmethod
    async def close(self) -> None: ...

    @property
    @abstractmethod
    def ready(self) -> bool: ...

    @abstractmethod
    def open_stream(self, call_id: str, leg: str, emit: Emit) -> LegStream:
        """A recognition state for one leg; `emit` is called on the event loop."""

    def open_stream_for(self, call_id: str, leg: str, emit: Emit, vocabulary: Vocabulary) -> LegStream:
        """`open_stream` with the call's vocabulary. Engines that cannot use one (sphinx: its
        n-gram LM is shared by every leg and its dictionary has no entry for unknown names)
        ignore it, which is this default."""
        return self.open_stream(call_id, leg, emit)


def split_stable(previous: str, current: str, unstable_words: int = 2) -> tuple[str, str]:
    """Stable/unstable split for engines without a committed prefix: words that two
    consecutive hypotheses agree on, minus the last `unstable_words` of `current`."""
    prev_words, words = previous.split(), current.split()
    agreed = 0
    for a, b in zip(prev_words, words, strict=False):
        if a != b:
            break
        agreed += 1
    agreed = min(agreed, max(0, len(words) - unstable_words))
    return " ".join(words[:agreed]), " ".join(words[agreed:])
