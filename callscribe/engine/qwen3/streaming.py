"""The streaming algorithm for Qwen3-ASR, independent of how decodes reach the model.

Per leg (`Qwen3LegStream`): VAD segments the leg into utterances; the first partial comes
`first_chunk_sec` after the utterance opened, then one every `chunk_size_sec`; a partial
decodes at most the last `partial_window_sec` of the utterance's audio, continuing after the
seed's rollback prefix (the committed text stands for the audio before the window), and
partials together decode at most `partial_passes` times the utterance's audio (a partial
waits until it fits). When the utterance ends, one decode of the whole utterance gives its
final. Speculative finals: once the segmenter sees `speculate_silence_ms` of pause, that
final's decode starts; when the pause reaches `end_silence_ms` the utterance closes with the
very same audio and the speculative result is published (it was already running, so the
final comes a decode's time after the pause began, not after the confirmation); speech
before that aborts the speculative decode and the utterance goes on — it still gets exactly
one final, over all of its audio. docs/latency.md has the design and its figures.
Shared by all legs (`DecodeAdmission`): finals are submitted at once with the higher
priority; partials are admitted within a budget of requests in flight, so under load the
partial cadence stretches instead of the queue growing; legs beyond `max_legs` are refused.

Seed prefix rules (Qwen3-ASR's `streaming_transcribe`), inside an utterance: for chunk
index < `unfixed_chunk_num` no prefix; afterwards prefix = the previous hypothesis minus its
last `unfixed_token_num` tokens, minus a trailing U+FFFD (half a UTF-8 character). One
tightening: a prefix never gets shorter than the one before (when the model generated fewer
than `unfixed_token_num` tokens), so the `stable` words of a partial truly never change in
later partials of the utterance. The final re-decodes the utterance without prefix (offline
quality) and supersedes its partials.

When the backend's server dies (EngineRestarting), each leg with a decode in flight emits one
`engine_restart` error per death; a final it interrupted is decoded once more on the rebuilt
server (a second interruption makes it an error), an interrupted partial is dropped.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from callscribe.engine.base import (
    SAMPLE_RATE,
    Audio,
    Emit,
    Engine,
    EngineError,
    EngineUnavailable,
    Final,
    LegStream,
    Partial,
    Vocabulary,
)
from callscribe.engine.qwen3.backend import (
    DecodeBackend,
    DecodeKind,
    DecodeRequest,
    DecodeResult,
    EngineRestarting,
    Tokenizer,
)
from callscribe.engine.qwen3.prompt import build_prompt, language_name, parse_output
from callscribe.engine.segmenter import SegmenterConfig, Utterance, UtteranceSegmenter
from callscribe.engine.vad import SpeechDetector

log = logging.getLogger(__name__)

FINAL_PRIORITY = 0  # vLLM serves lower values first
PARTIAL_PRIORITY = 1
# Room for the `language X<asr_text>` header (3 tokens for most languages) and a short word:
# a model that stops writes far less, one that never stops is cut sooner (a final's time
# after the speech is mostly its output tokens, one decode step each).
FINAL_TOKENS_BASE = 8
_PREVIOUS_FINAL_CHARS = 200


@dataclass(frozen=True, slots=True)
class StreamingConfig:
    context: str = ""
    language: str | None = None
    unfixed_chunk_num: int = 2
    unfixed_token_num: int = 5
    chunk_size_sec: float = 2.0
    # The first partial of an utterance this long after it opened (its pre-roll comes on top,
    # whatever there was of it), so the first words show within ~0.5 s of the onset; None:
    # after chunk_size_sec of the utterance, pre-roll included, like the seed.
    first_chunk_sec: float | None = 0.3
    # A partial decodes at most this much audio: the utterance's end; None: all of it.
    partial_window_sec: float | None = 4.0
    # All partials of an utterance together decode at most this many times its audio so far;
    # with its one final that bounds an utterance to 1 + partial_passes passes. None: no bound.
    partial_passes: float | None = 1.5
    # Speculative finals aborted by resumed speech waste a pass of the utterance so far each;
    # another speculation starts only while that waste is at most this many passes of the
    # utterance (the first always does). None: no bound. The waste also counts against
    # partial_passes, so partials + aborted speculations stay within ~partial_passes.
    speculation_passes: float | None = 0.5
    partial_max_tokens: int = 32
    final_max_tokens: int = 256
    # Qwen3-ASR writes ~3-5 tokens per second of speech; 10/s leaves room for dense speech
    # while a model stuck repeating itself stops within the utterance's worth.
    final_tokens_per_sec: float = 10.0
    previous_final_context: bool = True
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)

    def __post_init__(self) -> None:
        if self.chunk_size_sec <= 0:
            raise ValueError(f"chunk_size_sec must be > 0, got {self.chunk_size_sec}")
        if self.unfixed_chunk_num < 0 or self.unfixed_token_num < 0:
            raise ValueError(
                f"unfixed_chunk_num {self.unfixed_chunk_num} and unfixed_token_num "
                f"{self.unfixed_token_num} must be >= 0"
            )
        if self.partial_max_tokens < 1 or self.final_max_tokens < 1:
            raise ValueError("partial_max_tokens and final_max_tokens must be >= 1")
        for name in ("first_chunk_sec", "partial_window_sec", "partial_passes", "speculation_passes"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0 or None, got {value}")

    def chunk_boundaries(self, open_samples: int, preroll_samples: int = 0) -> int:
        """Partial boundaries an utterance of `open_samples` (`preroll_samples` of them from
        before it opened) has crossed: the first chunk, then every chunk_size_sec after it."""
        if self.first_chunk_sec is None:
            first = self.chunk_samples
        else:
            first = preroll_samples + max(1, round(self.first_chunk_sec * SAMPLE_RATE))
        if open_samples < first:
            return 0
        return 1 + (open_samples - first) // self.chunk_samples

    @property
    def window_samples(self) -> int | None:
        if self.partial_window_sec is None:
            return None
        return max(1, round(self.partial_window_sec * SAMPLE_RATE))

    @property
    def chunk_samples(self) -> int:
        return max(1, round(self.chunk_size_sec * SAMPLE_RATE))

    @property
    def forced_language(self) -> str | None:
        return language_name(self.language)

    def final_tokens(self, audio_samples: int) -> int:
        seconds = audio_samples / SAMPLE_RATE
        return min(self.final_max_tokens, FINAL_TOKENS_BASE + math.ceil(seconds * self.final_tokens_per_sec))


def rollback_prefix(raw: str, tokenizer: Tokenizer, unfixed_token_num: int) -> str:
    """The seed's rollback: `raw` minus its last `unfixed_token_num` tokens (at least one token
    kept), without a trailing U+FFFD left where the cut split a multi-byte character."""
    if not raw:
        return ""
    ids = tokenizer.encode(raw)
    end = max(1, len(ids) - unfixed_token_num)
    return tokenizer.decode(ids[:end]).rstrip("\ufffd")


def split_partial(text: str, committed_text: str) -> tuple[str, str]:
    """`stable` = the words of `text` inside the committed prefix (the next decode must repeat
    them), except a last word the prefix may still extend; `unstable` = the rest."""
    words = text.split()
    committed = committed_text.split()
    if committed and not committed_text[-1:].isspace():
        committed = committed[:-1]
    agreed = 0
    for a, b in zip(committed, words, strict=False):
        if a != b:
            break
        agreed += 1
    return " ".join(words[:agreed]), " ".join(words[agreed:])


@dataclass
class DecodeStats:
    """Counters over every leg of one engine (tests and the benchmark read them)."""

    partials_submitted: int = 0
    partials_completed: int = 0
    partials_superseded: int = 0  # aborted: a newer chunk or the utterance's final replaced them
    partials_deferred: int = 0  # chunk boundaries that waited for the partial budget
    finals_completed: int = 0
    final_audio_tokens: int = 0  # audio tokens of the finals alone: one pass over each utterance
    partials_over_budget: int = 0  # chunk boundaries that waited for the partial_passes budget
    speculative_started: int = 0
    speculative_used: int = 0  # published as the utterance's final
    speculative_aborted: int = 0  # speech resumed (or the utterance closed otherwise)
    # Pauses not speculated on: speculation_passes spent, or no longer than one speech resumed after.
    speculative_skipped: int = 0
    decode_errors: int = 0
    prompt_tokens: int = 0
    audio_tokens: int = 0
    output_tokens: int = 0
    legs_refused: int = 0
    # (request_id, kind, scheduled_at, finished_at) of recent decodes, server clock.
    recent: deque[tuple[str, DecodeKind, float, float]] = field(default_factory=lambda: deque(maxlen=4096))

    def record(self, request: DecodeRequest, result: DecodeResult) -> None:
        self.prompt_tokens += result.prompt_tokens
        self.audio_tokens += result.audio_tokens
        self.output_tokens += result.output_tokens
        self.recent.append((request.request_id, request.kind, result.scheduled_at, result.finished_at))


class DecodeAdmission:
    """Shared by all legs: finals go straight to the backend (never dropped, higher
    priority); partials are admitted while fewer than `partial_budget` are in flight, and
    the legs waiting for a slot are served round-robin as slots free up. Without priority
    scheduling in the backend, partials also wait while any final is in flight."""

    def __init__(self, backend: DecodeBackend, partial_budget: int, max_legs: int) -> None:
        if partial_budget < 1 or max_legs < 1:
            raise ValueError(f"partial_budget {partial_budget} and max_legs {max_legs} must be >= 1")
        self.backend = backend
        self.partial_budget = partial_budget
        self.max_legs = max_legs
        self.stats = DecodeStats()
        self.legs = 0
        self._partials_in_flight = 0
        self._finals_in_flight = 0
        self._waiting: deque[Callable[[], None]] = deque()

    def open_leg(self) -> bool:
        if self.legs >= self.max_legs:
            self.stats.legs_refused += 1
            return False
        self.legs += 1
        return True

    def close_leg(self) -> None:
        self.legs = max(0, self.legs - 1)

    def try_admit_partial(self, wake: Callable[[], None]) -> bool:
        """Take a partial slot, or queue `wake` to be called when one may be free."""
        if self._has_partial_slot():
            self._partials_in_flight += 1
            return True
        if wake not in self._waiting:
            self._waiting.append(wake)
        return False

    def release_partial(self) -> None:
        self._partials_in_flight -= 1
        self._wake_one()

    def withdraw(self, wake: Callable[[], None]) -> None:
        if wake in self._waiting:
            self._waiting.remove(wake)

    def _wake_one(self) -> None:
        """Offer free slots to waiting legs in turn; a leg that no longer needs one passes."""
        while self._waiting and self._has_partial_slot():
            self._waiting.popleft()()

    def _has_partial_slot(self) -> bool:
        blocked_by_final = not self.backend.priority_scheduling and self._finals_in_flight > 0
        return self._partials_in_flight < self.partial_budget and not blocked_by_final

    async def decode_final(self, request: DecodeRequest, speculative: bool = False) -> DecodeResult:
        """A final's decode (finals priority); a speculative one is counted as a final only
        when it is published (`count_final`): an aborted or dropped one is cost, recorded,
        but no final."""
        self._finals_in_flight += 1
        try:
            result = await self.backend.decode(request, FINAL_PRIORITY)
        finally:
            self._finals_in_flight -= 1
            if not self.backend.priority_scheduling:
                self._wake_one()
        self.stats.record(request, result)
        if not speculative:
            self.count_final(result)
        return result

    def count_final(self, result: DecodeResult) -> None:
        self.stats.finals_completed += 1
        if not result.aborted:
            self.stats.final_audio_tokens += result.audio_tokens


@dataclass
class _PartialJob:
    request_id: str
    utt: int
    prefix: str
    start_sample: int
    end_sample: int  # the audio this partial decodes ends here
    task: asyncio.Task[DecodeResult | None] | None = None
    started: bool = False
    priority: int = PARTIAL_PRIORITY


@dataclass
class _Speculation:
    """A final decoding before its utterance's end is confirmed."""

    utterance: Utterance
    request: DecodeRequest
    task: asyncio.Task[DecodeResult | None]


class Qwen3LegStream(LegStream):
    """One leg: segmenter + partial/final scheduling + prefix rollback. Runs on the event loop."""

    def __init__(
        self,
        admission: DecodeAdmission,
        config: StreamingConfig,
        detector: SpeechDetector,
        emit: Emit,
        name: str,
    ) -> None:
        self._admission = admission
        self._config = config
        self._language = config.forced_language
        self._emit = emit
        self._name = f"{name}/{uuid.uuid4().hex[:8]}"
        self._segmenter = UtteranceSegmenter(detector, config.segmenter)
        self._refused = not admission.open_leg()
        self._closed = False
        self._finishing: asyncio.Task[None] | None = None
        self._ids = itertools.count()
        # The open utterance.
        self._chunks_seen = 0  # chunk boundaries crossed so far
        self._raw = ""  # latest partial hypothesis, raw model output incl. its prefix
        self._committed = ""  # prefix the next partial must continue from
        self._partial: _PartialJob | None = None
        self._pending = False  # a chunk boundary waits for the partial in flight or a slot
        self._held: Partial | None = None  # a partial that must wait for the previous final
        self._due = False  # a chunk boundary was crossed and its partial is not requested yet
        self._partial_audio = 0  # samples decoded by this utterance's partials (the budget)
        self._spec: _Speculation | None = None
        self._spec_waste = 0  # samples decoded by this utterance's aborted speculations
        self._spec_skipped_at: int | None = None
        self._spec_aborts = 0  # this utterance's speculations ended by resumed speech
        self._background: set[asyncio.Task[DecodeResult | None]] = set()
        # Finals, in order.
        self._finals: asyncio.Queue[tuple[Utterance, _Speculation | None] | None] = asyncio.Queue()
        self._final_worker: asyncio.Task[None] | None = None
        self._finals_outstanding = 0
        self._previous_final = ""
        self._restart_reported: int | None = None  # epoch of the last server death told
        if self._refused:
            # Not synchronously: the leg is still being built when it opens its stream.
            asyncio.get_running_loop().call_soon(
                emit,
                EngineError(
                    f"engine at capacity: {admission.legs} legs open (max {admission.max_legs}); "
                    "this leg is not transcribed",
                    code="capacity",
                ),
            )

    @property
    def name(self) -> str:
        """Unique per leg stream; every request id of the leg starts with it."""
        return self._name

    # -- LegStream --------------------------------------------------------------------------

    def feed(self, audio: Audio) -> None:
        if self._refused or self._closed:
            return
        for utterance in self._segmenter.push(audio):
            self._close_utterance(utterance)
        self._speculate()
        self._on_audio()

    async def finish(self) -> None:
        """Safe to call more than once: every caller waits for the same flush."""
        if self._finishing is None:
            self._closed = True
            self._finishing = asyncio.get_running_loop().create_task(self._finish())
        await asyncio.shield(self._finishing)

    async def _finish(self) -> None:
        if self._refused:
            return
        for utterance in self._segmenter.flush():
            self._close_utterance(utterance)
        self._drop_speculation()
        self._cancel_partial()
        try:
            await self._drain()
        finally:
            self._admission.close_leg()

    async def settle(self) -> None:
        """Wait until every decode this leg asked for so far has been emitted (the seed
        facade and the benchmark use this for the seed's synchronous semantics)."""
        while self._partial is not None or (self._pending and not self._closed):
            job = self._partial
            if job is not None and job.task is not None:
                await asyncio.wait({job.task})
            else:
                await asyncio.sleep(0.005)
        await self._finals.join()

    # -- partials ---------------------------------------------------------------------------

    def _on_audio(self) -> None:
        if not self._segmenter.is_open:
            return
        boundaries = self._config.chunk_boundaries(
            self._segmenter.open_samples, self._segmenter.open_preroll_samples
        )
        if boundaries > self._chunks_seen:
            self._chunks_seen = boundaries
            if not self._due and not self._fits_budget():
                self._admission.stats.partials_over_budget += 1
            self._due = True
        # No partial while the utterance's final is being decoded speculatively: if speech
        # resumes, the speculation ends and the boundary's partial follows.
        if not self._due or self._spec is not None or not self._fits_budget():
            return
        self._due = False
        job = self._partial
        if job is not None:
            if job.started:
                self._pending = True  # coalesce: the newest audio goes in the next request
                self._admission.stats.partials_deferred += 1
                return
            # Still queued: its audio is already stale, replace it by the newer chunk.
            self._abort_partial(job)
        self._request_partial()

    def _partial_samples(self) -> int:
        window = self._config.window_samples
        open_samples = self._segmenter.open_samples
        return open_samples if window is None else min(open_samples, window)

    def _fits_budget(self) -> bool:
        passes = self._config.partial_passes
        if passes is None:
            return True
        # Aborted speculative finals spend from the same budget: partials wait for them too.
        spent = self._partial_audio + self._spec_waste
        return spent + self._partial_samples() <= passes * self._segmenter.open_samples

    def _request_partial(self) -> None:
        if self._closed or not self._segmenter.is_open or self._spec is not None:
            self._pending = False
            return
        if not self._admission.try_admit_partial(self._wake):
            if not self._pending:
                self._admission.stats.partials_deferred += 1
            self._pending = True
            return
        self._pending = False
        chunk_index = self._chunks_seen - 1
        prefix = self._committed if chunk_index >= self._config.unfixed_chunk_num else ""
        utt = self._segmenter.open_utt
        audio = self._segmenter.open_audio()
        start = self._segmenter.open_start_sample
        end = start + audio.size
        window = self._config.window_samples
        if window is not None and audio.size > window:
            # The committed prefix stands for the audio before the window (bounded cost per
            # partial); the partial's text still covers the utterance from its start.
            audio = audio[-window:]
        self._partial_audio += audio.size
        job = _PartialJob(f"{self._name}/u{utt}/p{next(self._ids)}", utt, prefix, start, end)
        if chunk_index == 0 and self._config.first_chunk_sec is not None:
            # An utterance's first words (the short first chunk) are as urgent as a final.
            job.priority = FINAL_PRIORITY
        request = DecodeRequest(
            job.request_id,
            "partial",
            build_prompt(self._context(), self._language, prefix),
            audio,
            self._partial_tokens(prefix, end - start),
        )
        self._partial = job
        self._admission.stats.partials_submitted += 1
        job.task = asyncio.get_running_loop().create_task(self._run_partial(job, request))

    def _partial_tokens(self, prefix: str, utterance_samples: int) -> int:
        """The partial's output cap: the whole hypothesis (prefix + output) no longer than the
        utterance so far can hold (the finals' rule), so a short first chunk is a short decode
        and the prefix grows with the speech, not by the cap every chunk; at least
        `unfixed_token_num` (the rolled-back tail is written again), at most partial_max_tokens."""
        prefix_tokens = len(self._admission.backend.tokenizer.encode(prefix)) if prefix else 0
        room = self._config.final_tokens(utterance_samples) - prefix_tokens
        return max(1, min(self._config.partial_max_tokens, max(self._config.unfixed_token_num, room)))

    def _wake(self) -> None:
        if self._pending and self._partial is None:
            self._request_partial()

    async def _run_partial(self, job: _PartialJob, request: DecodeRequest) -> DecodeResult | None:
        def started() -> None:
            job.started = True

        try:
            result = await self._admission.backend.decode(request, job.priority, started)
        except asyncio.CancelledError:
            raise
        except EngineRestarting as exc:
            self._admission.stats.decode_errors += 1
            self._report_restart(exc, job.utt)
            result = None
        except Exception as exc:
            self._admission.stats.decode_errors += 1
            log.warning("partial %s failed: %s", request.request_id, exc)
            result = None
        finally:
            self._admission.release_partial()
            if self._partial is job:
                self._partial = None
        if result is not None:
            self._admission.stats.record(request, result)
            if result.aborted:
                self._admission.stats.partials_superseded += 1
            else:
                self._admission.stats.partials_completed += 1
                self._apply_partial(job, result)
        if self._pending and self._partial is None:
            self._request_partial()
        return result

    def _apply_partial(self, job: _PartialJob, result: DecodeResult) -> None:
        if job.utt != self._segmenter.open_utt or not self._segmenter.is_open:
            return  # its utterance has ended; the final speaks for it
        self._raw = job.prefix + result.text
        rolled = rollback_prefix(self._raw, self._admission.backend.tokenizer, self._config.unfixed_token_num)
        if rolled.startswith(self._committed):
            self._committed = rolled
        parsed = parse_output(self._raw, self._language)
        committed = parse_output(self._committed, self._language).text if self._committed else ""
        stable, unstable = split_partial(parsed.text, committed)
        partial = Partial(job.utt, stable, unstable, _ms(job.start_sample), _ms(job.end_sample))
        if self._finals_outstanding:
            self._held = partial
        else:
            self._emit(partial)

    def _abort_partial(self, job: _PartialJob) -> None:
        """Abort the request; its task then returns `aborted` and frees the slot."""
        if self._partial is job:
            self._partial = None
        asyncio.get_running_loop().create_task(self._admission.backend.abort(job.request_id))

    def _cancel_partial(self) -> None:
        self._pending = False
        self._admission.withdraw(self._wake)
        if self._partial is not None:
            self._abort_partial(self._partial)

    # -- finals -----------------------------------------------------------------------------

    def _speculate(self) -> None:
        """Start the final's decode at the first pause long enough; abort it when speech
        resumes (or the pause ends the utterance at other bounds)."""
        end = self._segmenter.ending_end_sample
        spec = self._spec
        if spec is not None:
            if end == spec.utterance.end_sample and self._segmenter.open_utt == spec.utterance.utt:
                return
            # The open utterance's speculation with other bounds: speech came back in the pause
            # (a closing utterance's speculation was already taken in _close_utterance).
            self._drop_speculation()
            self._spec_aborts += 1
        if end is None or self._closed:
            return
        bound = self._config.speculation_passes
        spent = bound is not None and self._spec_waste > bound * self._segmenter.open_samples
        if spent or self._phrase_pause():
            if self._spec_skipped_at != end:
                self._spec_skipped_at = end
                self._admission.stats.speculative_skipped += 1
            return
        utterance = self._segmenter.ending()
        if utterance is None:
            return
        request = self._final_request(utterance, f"s{next(self._ids)}")
        self._cancel_partial()  # this utterance's final is on its way; its partial is moot
        self._admission.stats.speculative_started += 1
        task = asyncio.get_running_loop().create_task(self._run_speculation(request, utterance.utt))
        # Held here too: a dropped speculation's task runs on until its abort lands.
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        self._spec = _Speculation(utterance, request, task)

    def _phrase_pause(self) -> bool:
        """A speaker whose speech came back during a speculation's pause may pause like that
        again: from the second such abort on, a pause no longer than the longest one speech
        resumed after in this utterance is not speculated on (each would waste a pass of the
        utterance so far); a longer pause still is, so the real end keeps its early final."""
        return self._spec_aborts >= 2 and self._segmenter.pause_ms <= self._segmenter.longest_pause_ms

    async def _run_speculation(self, request: DecodeRequest, utt: int) -> DecodeResult | None:
        """None when it failed or was aborted: the final is then decoded the usual way."""
        try:
            result = await self._admission.decode_final(request, speculative=True)
        except asyncio.CancelledError:
            raise
        except EngineRestarting as exc:
            self._admission.stats.decode_errors += 1
            self._report_restart(exc, utt)
            return None
        except Exception as exc:
            self._admission.stats.decode_errors += 1
            log.warning("speculative final %s failed: %s", request.request_id, exc)
            return None
        return None if result.aborted else result

    def _drop_speculation(self) -> None:
        spec, self._spec = self._spec, None
        if spec is None:
            return
        self._admission.stats.speculative_aborted += 1
        self._spec_waste += spec.utterance.audio.size
        asyncio.get_running_loop().create_task(self._admission.backend.abort(spec.request.request_id))

    def _take_speculation(self, utterance: Utterance) -> _Speculation | None:
        """The speculation for exactly this utterance (same number and bounds), if any."""
        spec = self._spec
        if spec is None:
            return None
        ours = spec.utterance
        if (ours.utt, ours.start_sample, ours.end_sample) != (
            utterance.utt,
            utterance.start_sample,
            utterance.end_sample,
        ):
            self._drop_speculation()
            return None
        self._spec = None
        return spec

    def _close_utterance(self, utterance: Utterance) -> None:
        spec = self._take_speculation(utterance)
        self._cancel_partial()
        self._chunks_seen = 0
        self._due = False
        self._partial_audio = 0
        self._spec_waste = 0
        self._spec_aborts = 0
        self._raw = self._committed = ""
        self._held = None
        self._finals_outstanding += 1
        self._finals.put_nowait((utterance, spec))
        if self._final_worker is None:
            self._final_worker = asyncio.get_running_loop().create_task(self._run_finals())

    async def _run_finals(self) -> None:
        while True:
            item = await self._finals.get()
            try:
                if item is None:
                    return
                await self._final(*item)
            finally:
                if item is not None:
                    self._finals_outstanding -= 1
                self._finals.task_done()
            if not self._finals_outstanding and self._held is not None:
                held, self._held = self._held, None
                if held.utt == self._segmenter.open_utt and self._segmenter.is_open:
                    self._emit(held)

    def _final_request(self, utterance: Utterance, tag: str = "final") -> DecodeRequest:
        return DecodeRequest(
            f"{self._name}/u{utterance.utt}/{tag}",
            "final",
            build_prompt(self._context(), self._language),
            utterance.audio,
            self._config.final_tokens(utterance.audio.size),
        )

    async def _speculative_result(self, spec: _Speculation, request: DecodeRequest) -> DecodeResult | None:
        """The speculation's result when it decoded what this final would (the context may
        have changed since: the previous final was still being decoded when it started)."""
        if spec.request.prompt != request.prompt:
            self._admission.stats.speculative_aborted += 1
            await self._admission.backend.abort(spec.request.request_id)
            return None
        result = await spec.task
        if result is not None:
            self._admission.stats.speculative_used += 1
            self._admission.count_final(result)
        return result

    async def _final(self, utterance: Utterance, spec: _Speculation | None = None) -> None:
        request = self._final_request(utterance)
        speculated = await self._speculative_result(spec, request) if spec is not None else None
        try:
            try:
                result = speculated or await self._admission.decode_final(request)
            except EngineRestarting as exc:
                self._admission.stats.decode_errors += 1
                self._report_restart(exc, utterance.utt)
                # The audio is still here: once more on the rebuilt server, which the backend awaits.
                log.warning("final %s cut by the engine's death; decoding it again", request.request_id)
                result = await self._admission.decode_final(request)
        except Exception as exc:
            self._admission.stats.decode_errors += 1
            log.warning("final %s failed: %s", request.request_id, exc)
            self._emit(EngineError(f"final decode failed: {exc}", code="engine", utt=utterance.utt))
            return
        parsed = parse_output(result.text, self._language)
        if parsed.text:
            self._previous_final = parsed.text
        self._emit(Final(utterance.utt, parsed.text, utterance.start_ms, utterance.end_ms, parsed.language))

    def _report_restart(self, exc: EngineRestarting, utt: int) -> None:
        """One error per leg per server death, however many of its requests it cut."""
        if self._restart_reported == exc.epoch:
            return
        self._restart_reported = exc.epoch
        log.warning("leg %s: %s (utt %d in flight)", self._name, exc, utt)
        self._emit(EngineError(str(exc), code="engine_restart", utt=utt))

    async def _drain(self) -> None:
        if self._final_worker is not None:
            self._finals.put_nowait(None)
            await self._final_worker
        while self._partial is not None and self._partial.task is not None:
            await asyncio.wait({self._partial.task})

    def _context(self) -> str:
        if not self._config.previous_final_context or not self._previous_final:
            return self._config.context
        previous = self._previous_final[-_PREVIOUS_FINAL_CHARS:]
        return f"{self._config.context}\n{previous}".strip()


def _ms(sample: int) -> int:
    return sample * 1000 // SAMPLE_RATE


class Qwen3Engine(Engine):
    """Qwen3-ASR on any decode backend; subclasses say how the backend starts and stops."""

    name = "qwen3"

    def __init__(
        self,
        config: StreamingConfig,
        detector_factory: Callable[[], SpeechDetector],
        partial_budget: int = 16,
        max_legs: int = 256,
    ) -> None:
        self.config = config
        self._detector_factory = detector_factory
        self._partial_budget = partial_budget
        self._max_legs = max_legs
        self._admission: DecodeAdmission | None = None

    def attach(self, backend: DecodeBackend) -> None:
        self._admission = DecodeAdmission(backend, self._partial_budget, self._max_legs)

    @property
    def admission(self) -> DecodeAdmission:
        if self._admission is None:
            raise EngineUnavailable(f"engine {self.name} is not started")
        return self._admission

    @property
    def stats(self) -> DecodeStats:
        return self.admission.stats

    @property
    def ready(self) -> bool:
        return self._admission is not None

    def open_stream(self, call_id: str, leg: str, emit: Emit) -> Qwen3LegStream:
        return self.open_leg(f"{call_id}/{leg}", emit)

    def open_stream_for(self, call_id: str, leg: str, emit: Emit, vocabulary: Vocabulary) -> Qwen3LegStream:
        """The call's context and key terms join the engine's in the prompt's system turn,
        as the Qwen3-ASR SDK's `context` (sanitised by build_prompt like any context)."""
        config = (
            replace(self.config, context=vocabulary.prompt_context(self.config.context))
            if vocabulary
            else None
        )
        return self.open_leg(f"{call_id}/{leg}", emit, config)

    def open_leg(self, name: str, emit: Emit, config: StreamingConfig | None = None) -> Qwen3LegStream:
        """A leg with its own streaming parameters (the seed facade's per-state settings)."""
        return Qwen3LegStream(self.admission, config or self.config, self._detector_factory(), emit, name)
