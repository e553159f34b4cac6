"""The embedded CPU engine: pocketsphinx 5 (English model shipped inside its wheel).

Why worker processes and not a thread pool: pocketsphinx 5.1's Cython bindings release the
GIL nowhere (`_pocketsphinx.pyx` has no `nogil` block), so every C call holds it. Measured on
the 7 s clip: one 30 ms `process_raw` holds it ~40 ms, `end_utt` (fwdflat + bestpath second
pass) 350-650 ms. In a thread that is event-loop lag of the same size, and all legs together
would use one core. So the engine runs `workers` spawned processes (default: one per CPU);
each owns the Decoders of the legs assigned to it (fewest open legs first), which keeps a
leg's work ordered (one process, one inbox) and uses every core. The event loop only
converts float32 to int16 and puts bytes on a multiprocessing queue (its feeder thread does
the pickling and pipe writes); one reader thread per worker hands results back to the loop
with `call_soon_threadsafe`.

Per worker, the language model is loaded once and shared by all its Decoders (`add_lm`
retains it), which saves ~33 MB and ~0.1 s per Decoder; Decoders of finished legs go back
to an idle pool (their live CMN reset to `cmninit`) so a new leg usually starts at once.

Endpointing is pocketsphinx's own `Endpointer` (WebRTC VAD, 30 ms frames, `window` s of
which `ratio` must agree to switch). Every utterance gets exactly one `Final`, also when it
has no words (text ""): `utt` numbers stay dense and a consumer can pair partials with their
final. Partials are sent every `partial_interval_ms` of speech audio decoded (when the
hypothesis is not empty); `stable`/`unstable` come from `split_stable`. An utterance longer
than `max_utterance_s` is cut there (the final pass cost grows with its length).

One pass once warm: each leg has a live decoder (tree search, or all passes with
`live_full_search`; live CMN) whose partials are sent as it goes. The model's CMN init is a
wideband mean, far from a phone channel's, so on a leg's first utterance (cold) the live
partials would read nonsense: the live decoder is restarted after `cold_warmup_s` of speech
with the mean of that audio (`_warm_up`: one batch decode of it), and partials start only
then. From then on the leg is warm: its utterances are decoded once, the final being the
live decoder's own result after `end_utt`, whose mean seeds the next utterance. Only a cold
utterance shorter than `cold_warmup_s` gets its final from one more decode of the whole
utterance (`_final_pass`: batch CMN, all passes) — the CMN a wideband model needs on the
phone band (`cold_final_pass=True`: also for the utterance that warmed the leg up;
`one_pass=False`: for every final, as before).

Backlog: each leg may have at most `max_backlog_s` of audio sent to its worker and not yet
decoded. Audio beyond that is dropped (never queued without bound), the leg gets one
`EngineError(code="overload")` per drop episode, and the worker is told of the gap: it
closes the open utterance with a final and shifts later timestamps by the dropped duration,
so times stay measured from the leg's first sample.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue as MpQueue
from typing import Any

import numpy as np

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
    TimedWord,
    split_stable,
)
from callscribe.engine.process_care import die_with_parent, rss_mb, trim_heap

log = logging.getLogger(__name__)

ENGLISH = frozenset({"en", "en-us", "en_us", "english"})
_BYTES_PER_SAMPLE = 2
_READY_TIMEOUT_S = 60.0
_TICK_S = 2.0  # a quiet worker checks its idle pool this often


@dataclass(frozen=True, slots=True)
class SphinxOptions:
    """Knobs passed to each worker process (must pickle)."""

    vad_mode: int = 0  # Vad.LOOSE: phone audio is quiet and noisy; the window ratio filters clicks
    window_s: float = 0.3
    ratio: float = 0.9
    partial_interval_ms: int = 250
    max_utterance_s: float = 20.0
    idle_decoders: int = 4
    # Pooled Decoders beyond the first are freed (and the heap trimmed) after this long with
    # no leg open on the worker: a burst must not leave ~56 MB per Decoder behind for good.
    idle_decoder_ttl_s: float = 20.0
    # A live Decoder (partials) is ~56 MB: beyond this many per worker, a leg that starts an
    # utterance gets finals only (from the shared final decoder) until one is free again.
    max_live_decoders: int = 8
    # Decoding is throughput work; the event loop (jitter buffers, publishing) is latency work
    # on the same cores, so the workers yield to it.
    worker_nice: int = 5
    # pocketsphinx's default of 30,000 active HMMs per frame costs ~0.7 CPU-s per audio second in
    # each pass; 3,000 halves that with the same words on the test clips (WER 0.386 either way),
    # which is what lets one leg (live pass + final pass) run in real time on one core.
    decoder_config: tuple[tuple[str, Any], ...] = (("maxhmmpf", 3000),)
    # Finals from the live decoder once the leg's CMN is warm (see the module docstring).
    one_pass: bool = True
    # The live decoders' search: the tree pass only; True adds the flat and best-path passes
    # at end_utt (which cost about as much as the tree pass again).
    live_full_search: bool = False
    # A leg's first utterance keeps the second pass for its final even once warmed up mid-way
    # (better WER on that utterance, fewer legs per core on short calls).
    cold_final_pass: bool = False
    # Speech on a cold leg before partials start (the CMN is estimated from it); None: partials
    # from the first speech, with the model's wideband CMN init.
    cold_warmup_s: float | None = 1.0


# ---------------------------------------------------------------- worker process side


@dataclass
class _LegDecoding:
    """One leg inside a worker: its Endpointer, Decoder and clock."""

    decoder: Any  # None until the leg's first speech: silence and noise cost no Decoder
    endpointer: Any
    utt: int = 0
    in_utt: bool = False
    offset_samples: int = 0  # dropped audio before the endpointer's clock started
    utt_start_samples: int = 0
    utt_decoded: int = 0
    since_partial: int = 0
    pending: bytes = b""  # less than one endpointer frame
    utt_audio: list[bytes] = field(default_factory=list)  # the open utterance, for its final pass
    warm_cmn: str | None = None  # this channel's cepstral mean, once one utterance was decoded
    utt_warm: bool = False  # the open utterance started with warm_cmn: one pass is enough


class _Worker:
    """Runs in the spawned process: decodes messages from `inbox`, answers on `outbox`."""

    def __init__(self, options: SphinxOptions, outbox: MpQueue[tuple[Any, ...]]) -> None:
        from pocketsphinx import Config, Decoder, NGramModel

        self.options = options
        self.outbox = outbox
        self._decoder_cls = Decoder
        self._config_cls = Config
        config = dict(options.decoder_config)
        config.setdefault("loglevel", "FATAL")
        self._config = config
        started = time.perf_counter()
        first = Decoder(**config)
        lm_path = first.config["lm"]
        self.lm = NGramModel(Config(loglevel="FATAL"), first.logmath, lm_path) if lm_path else None
        self.cmn_init = str(first.config["cmninit"])
        self.idle: list[Any] = [self._new_decoder()]
        # One full-quality decoder per worker decodes every final (they are sequential here).
        self.final_decoder = self._new_decoder(final=True)
        del first
        self.init_s = time.perf_counter() - started
        self.legs: dict[int, _LegDecoding] = {}
        self.last_busy = time.monotonic()
        self.trim_due = False
        self.live_decoders = 0  # held by legs

    def _new_decoder(self, final: bool = False) -> Any:
        # Live decoders run the first (tree) pass; with live_full_search they also run the flat
        # and best-path passes at end_utt, for their warm finals. The final decoder runs all.
        full = final or (self.options.one_pass and self.options.live_full_search)
        config = self._config if full else {**self._config, "fwdflat": False, "bestpath": False}
        if self.lm is None:
            return self._decoder_cls(**config)
        decoder = self._decoder_cls(**{**config, "lm": None})
        decoder.add_lm("shared", self.lm)
        decoder.activate_search("shared")
        return decoder

    def _new_endpointer(self) -> Any:
        from pocketsphinx import Endpointer

        o = self.options
        return Endpointer(window=o.window_s, ratio=o.ratio, vad_mode=o.vad_mode, sample_rate=SAMPLE_RATE)

    def handle(self, message: tuple[Any, ...]) -> None:
        kind, key = message[0], message[1]
        if kind == "open":
            started = time.perf_counter()
            self.legs[key] = _LegDecoding(None, self._new_endpointer())
            self.outbox.put(("opened", key, time.perf_counter() - started))
            return
        leg = self.legs.get(key)
        if leg is None:  # the leg failed earlier; finish() still waits for its answer
            if kind == "finish":
                self.outbox.put(("finished", key))
            return
        try:
            if kind == "audio":
                self._audio(key, leg, message[2])
                self.outbox.put(("consumed", key, len(message[2]) // _BYTES_PER_SAMPLE))
            elif kind == "gap":
                # ("gap", key, dropped, gap_start): the utterance ends at the gap and the new
                # endpointer's clock starts where audio resumes.
                self._close_stream(key, leg)
                leg.offset_samples = message[3] + message[2]
                leg.endpointer = self._new_endpointer()
            elif kind == "finish":
                self._close_stream(key, leg)
                del self.legs[key]
                if leg.decoder is not None:
                    self.live_decoders -= 1
                    self._release(leg.decoder)
                self.outbox.put(("finished", key))
        except Exception as exc:  # a broken decoder must not take the other legs down
            broken = self.legs.pop(key, None)
            if broken is not None and broken.decoder is not None:
                self.live_decoders -= 1  # not reused: it may be in a bad state
            self.outbox.put(("error", key, f"pocketsphinx failed on {kind}: {exc!r}"))
            if kind == "finish":
                self.outbox.put(("finished", key))

    def _release(self, decoder: Any) -> None:
        self.last_busy = time.monotonic()
        if len(self.idle) < self.options.idle_decoders:
            decoder.set_cmn(self.cmn_init)  # the next leg is another channel: forget this one's mean
            self.idle.append(decoder)
        else:
            self.trim_due = True  # trimmed at the next tick, once the caller's references are gone

    def tick(self, now: float) -> None:
        """Called when the inbox has been quiet: shrink the idle pool to one Decoder once no
        leg has been open for `idle_decoder_ttl_s`, and give the memory back."""
        if self.legs:
            self.last_busy = now
        elif len(self.idle) > 1 and now - self.last_busy >= self.options.idle_decoder_ttl_s:
            del self.idle[1:]
            self.trim_due = True
        if self.trim_due:
            self.trim_due = False
            trim_heap()

    def _audio(self, key: int, leg: _LegDecoding, pcm: bytes) -> None:
        ep = leg.endpointer
        frame_bytes = ep.frame_bytes
        data = leg.pending + pcm
        usable = len(data) - len(data) % frame_bytes
        leg.pending = data[usable:]
        for at in range(0, usable, frame_bytes):
            was_in_speech = ep.in_speech
            speech = ep.process(data[at : at + frame_bytes])
            if speech is None:
                continue
            if not was_in_speech:
                self._start_utt(leg, leg.offset_samples + round(ep.speech_start * SAMPLE_RATE))
            self._decode(key, leg, speech)
            if not ep.in_speech:
                self._end_utt(key, leg)

    def _close_stream(self, key: int, leg: _LegDecoding) -> None:
        """Flush the endpointer's buffered speech (a clip cut mid-word) into a final."""
        ep = leg.endpointer
        if ep.in_speech:
            # The binding indexes the buffer's first sample, so it cannot take b"": one silent
            # sample instead.
            rest = ep.end_stream(leg.pending or b"\0\0")
            if rest:
                self._decode(key, leg, rest)
        leg.pending = b""
        if leg.in_utt:
            self._end_utt(key, leg)

    def _start_utt(self, leg: _LegDecoding, start_samples: int) -> None:
        if leg.decoder is None and self.live_decoders < self.options.max_live_decoders:
            leg.decoder = self.idle.pop() if self.idle else self._new_decoder()
            self.live_decoders += 1
        if leg.decoder is not None:
            if leg.warm_cmn is not None:
                leg.decoder.set_cmn(leg.warm_cmn)
            leg.decoder.start_utt()
        # A leg without a live decoder (over max_live_decoders) gets its finals from the final pass.
        leg.utt_warm = self.options.one_pass and leg.warm_cmn is not None and leg.decoder is not None
        leg.in_utt = True
        leg.utt_start_samples = start_samples
        leg.utt_decoded = 0
        leg.since_partial = 0

    def _decode(self, key: int, leg: _LegDecoding, speech: bytes) -> None:
        if not leg.in_utt:  # end_stream speech after a forced cut
            self._start_utt(leg, leg.utt_start_samples + leg.utt_decoded)
        frame_bytes = leg.endpointer.frame_bytes
        # end_stream hands back up to `window` seconds at once; one frame per call keeps each
        # hold of the worker short, so partials keep their cadence.
        for at in range(0, len(speech), frame_bytes):
            chunk = speech[at : at + frame_bytes]
            if leg.decoder is not None:
                leg.decoder.process_raw(chunk)
            leg.utt_audio.append(chunk)
            samples = len(chunk) // _BYTES_PER_SAMPLE
            leg.utt_decoded += samples
            leg.since_partial += samples
            warmup = self.options.cold_warmup_s
            cold = leg.warm_cmn is None and warmup is not None
            if leg.decoder is not None and cold and leg.utt_decoded >= (warmup or 0.0) * SAMPLE_RATE:
                self._warm_up(leg)
                cold = False
            if leg.decoder is None or cold:
                leg.since_partial = 0  # finals only, or cold CMN: no partials (they would read nonsense)
            elif leg.since_partial * 1000 >= self.options.partial_interval_ms * SAMPLE_RATE:
                leg.since_partial = 0
                hyp = leg.decoder.hyp()
                if hyp is not None and hyp.hypstr:
                    start = leg.utt_start_samples
                    self.outbox.put(("partial", key, leg.utt, hyp.hypstr, start, start + leg.utt_decoded))
            if leg.utt_decoded >= self.options.max_utterance_s * SAMPLE_RATE:
                start = leg.utt_start_samples + leg.utt_decoded
                self._end_utt(key, leg)
                self._start_utt(leg, start)

    def _warm_up(self, leg: _LegDecoding) -> None:
        """Estimate the channel's cepstral mean from the speech so far (one batch decode of
        it) and decode that speech again live from it: the partials start sane."""
        assert leg.decoder is not None
        leg.warm_cmn = str(self._final_pass(b"".join(leg.utt_audio)).get_cmn())
        leg.decoder.end_utt()
        leg.decoder.set_cmn(leg.warm_cmn)
        leg.decoder.start_utt()
        for chunk in leg.utt_audio:
            leg.decoder.process_raw(chunk)
        # From its own mean on, this utterance is decoded as a warm one: no second pass.
        leg.utt_warm = self.options.one_pass and not self.options.cold_final_pass

    def _final_pass(self, speech: bytes) -> Any:
        """Decode a whole utterance at once: CMN from the utterance itself (batch mode) and
        all search passes. Live CMN starts from a wideband mean and adapts slowly, so on the
        phone band (8 kHz) the streaming hypothesis is far worse (docs/measured.md). Returns
        the decoder that holds the result."""
        decoder = self.final_decoder
        decoder.start_utt()
        decoder.process_raw(speech, full_utt=True)
        decoder.end_utt()
        return decoder

    def _end_utt(self, key: int, leg: _LegDecoding) -> None:
        if leg.decoder is not None:
            leg.decoder.end_utt()
        speech, leg.utt_audio = b"".join(leg.utt_audio), []
        # The decoder whose result is the final (its hyp, and its seg() for word timings).
        decoder = None
        if leg.utt_warm and leg.decoder is not None:
            decoder = leg.decoder  # one pass: the live decoder's own result
        elif speech:
            decoder = self._final_pass(speech)
        text, words = _result(decoder)
        if decoder is not None:
            # The channel's mean (batch over this utterance, or live and adapted): the next
            # utterance of the leg starts from it.
            leg.warm_cmn = str(decoder.get_cmn())
        start = leg.utt_start_samples
        self.outbox.put(("final", key, leg.utt, text, start, start + leg.utt_decoded, words))
        leg.utt += 1
        leg.in_utt = False


def _result(decoder: Any) -> tuple[str, list[TimedWord]]:
    """A finished utterance's text and timed words (none when there was no decoder)."""
    hyp = decoder.hyp() if decoder is not None else None
    if hyp is None:
        return "", []
    return hyp.hypstr, segment_words(decoder.seg(), int(decoder.config["frate"]))


def segment_words(segments: Any, frame_rate: int) -> list[TimedWord]:
    """The hypothesis' words from pocketsphinx segments: times in ms from the utterance's
    first sample (frames → ms), the posterior as confidence. Silence, fillers and sentence
    markers are not words; "been(2)" (an alternate pronunciation) is "been"."""
    words: list[TimedWord] = []
    for seg in segments:
        word = seg.word
        if word.startswith(("<", "[", "++")):
            continue
        word = word.split("(", 1)[0]
        start = seg.start_frame * 1000 // frame_rate
        end = (seg.end_frame + 1) * 1000 // frame_rate
        words.append((word, start, max(start, end), round(min(1.0, max(0.0, float(seg.prob))), 3)))
    return words


def _rss_mb() -> float:
    return rss_mb()


def worker_main(
    options: SphinxOptions,
    inbox: MpQueue[tuple[Any, ...]],
    outbox: MpQueue[tuple[Any, ...]],
    parent_pid: int | None = None,
) -> None:
    """Entry point of a worker process (spawned, so it imports only this module)."""
    if parent_pid is not None:
        die_with_parent(parent_pid)  # a SIGKILLed service must not leave decoders running
        # A stop signal sent to the whole process group (Ctrl-C, systemd's control-group kill)
        # is the service's to handle: it drains its legs, then sends "stop". A worker killed
        # first would turn every open utterance's final into an engine error.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if options.worker_nice:
        os.nice(options.worker_nice)
    try:
        worker = _Worker(options, outbox)
    except Exception as exc:
        outbox.put(("failed", None, f"pocketsphinx could not load its model: {exc!r}"))
        return
    outbox.put(("ready", None, worker.init_s, _rss_mb()))
    last_tick = time.monotonic()
    while True:
        try:
            message = inbox.get(timeout=_TICK_S)
        except queue.Empty:
            message = None
        now = time.monotonic()
        if now - last_tick >= _TICK_S:
            last_tick = now
            worker.tick(now)
        if message is None:
            continue
        if message[0] == "stop":
            break
        worker.handle(message)
        if message[0] == "open":
            outbox.put(("rss", None, _rss_mb()))
    outbox.put(("stopped", None))


# ---------------------------------------------------------------- event loop side


@dataclass
class _WorkerHandle:
    index: int
    process: BaseProcess
    inbox: MpQueue[tuple[Any, ...]]
    outbox: MpQueue[tuple[Any, ...]]
    ready: asyncio.Future[None]
    reader: threading.Thread | None = None
    legs: set[int] = field(default_factory=set)
    alive: bool = True
    init_s: float = 0.0
    rss_mb: float = 0.0


class SphinxEngine(Engine):
    name = "sphinx"

    def __init__(
        self,
        language: str | None = None,
        *,
        workers: int | None = None,
        max_backlog_s: float = 5.0,
        options: SphinxOptions | None = None,
    ) -> None:
        self.language = language
        self.workers = workers or os.cpu_count() or 1
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.max_backlog_samples = int(max_backlog_s * SAMPLE_RATE)
        self.options = options or SphinxOptions()
        self._handles: list[_WorkerHandle] = []
        self._streams: dict[int, SphinxLegStream] = {}
        self._keys = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = False
        self.open_latency_s: list[float] = []

    @property
    def ready(self) -> bool:
        return self._ready and all(h.alive for h in self._handles)

    @property
    def worker_init_s(self) -> list[float]:
        """Time each worker took to load the model and its first Decoder."""
        return [h.init_s for h in self._handles]

    @property
    def worker_pids(self) -> list[int | None]:
        return [h.process.pid for h in self._handles]

    @property
    def worker_rss_mb(self) -> list[float]:
        """Resident memory of each worker at its last leg open."""
        return [h.rss_mb for h in self._handles]

    async def start(self) -> None:
        if self.language is not None and self.language.lower() not in ENGLISH:
            raise EngineUnavailable(
                f"sphinx ships only an English model; language {self.language!r} is not available"
            )
        try:
            import pocketsphinx  # noqa: F401
        except ImportError as exc:
            raise EngineUnavailable(f"pocketsphinx is not installed: {exc}") from exc
        self._loop = asyncio.get_running_loop()
        context = mp.get_context("spawn")  # fork would copy the event loop's threads and locks
        for index in range(self.workers):
            inbox: MpQueue[tuple[Any, ...]] = context.Queue()
            outbox: MpQueue[tuple[Any, ...]] = context.Queue()
            process = context.Process(
                target=worker_main,
                args=(self.options, inbox, outbox, os.getpid()),
                name=f"callscribe-sphinx-{index}",
                daemon=True,
            )
            handle = _WorkerHandle(index, process, inbox, outbox, self._loop.create_future())
            await asyncio.to_thread(process.start)
            handle.reader = threading.Thread(
                target=self._read, args=(handle,), name=f"sphinx-reader-{index}", daemon=True
            )
            handle.reader.start()
            self._handles.append(handle)
        try:
            async with asyncio.timeout(_READY_TIMEOUT_S):
                await asyncio.gather(*(h.ready for h in self._handles))
        except (TimeoutError, EngineUnavailable) as exc:
            await self.close()
            if isinstance(exc, EngineUnavailable):
                raise
            raise EngineUnavailable(f"sphinx workers not ready within {_READY_TIMEOUT_S:.0f}s") from exc
        self._ready = True

    async def close(self) -> None:
        self._ready = False
        for stream in list(self._streams.values()):
            stream.abandon("engine closed")
        for handle in self._handles:
            if handle.alive:
                handle.inbox.put(("stop", None))
        for handle in self._handles:
            await asyncio.to_thread(handle.process.join, 5)
            if handle.process.is_alive():
                handle.process.kill()
                await asyncio.to_thread(handle.process.join, 5)
            if handle.reader is not None:
                await asyncio.to_thread(handle.reader.join, 5)
            handle.inbox.close()
            handle.outbox.close()
        self._handles.clear()

    def open_stream(self, call_id: str, leg: str, emit: Emit) -> LegStream:
        if not self.ready:
            raise RuntimeError(f"sphinx engine is not ready; cannot open leg {call_id}/{leg}")
        handle = min((h for h in self._handles if h.alive), key=lambda h: len(h.legs))
        key = next(self._keys)
        stream = SphinxLegStream(self, handle, key, f"{call_id}/{leg}", emit)
        handle.legs.add(key)
        self._streams[key] = stream
        handle.inbox.put(("open", key))
        return stream

    def _read(self, handle: _WorkerHandle) -> None:
        """Reader thread: moves a worker's results onto the event loop, notices its death."""
        assert self._loop is not None
        while True:
            try:
                message = handle.outbox.get(timeout=0.5)
            except queue.Empty:
                if handle.process.is_alive():
                    continue
                message = ("died", None, handle.process.exitcode)
            except (EOFError, OSError, ValueError):
                message = ("died", None, handle.process.exitcode)
            try:
                self._loop.call_soon_threadsafe(self._dispatch, handle, message)
            except RuntimeError:  # loop closed
                return
            if message[0] in ("stopped", "died", "failed"):
                return

    def _dispatch(self, handle: _WorkerHandle, message: tuple[Any, ...]) -> None:
        kind, key = message[0], message[1]
        if key is None:
            self._worker_event(handle, kind, message)
            return
        stream = self._streams.get(key)
        if stream is not None:
            stream.on_result(kind, message)
            if kind == "finished":
                del self._streams[key]
                handle.legs.discard(key)
        if kind == "opened":
            self.open_latency_s.append(message[2])

    def _worker_event(self, handle: _WorkerHandle, kind: str, message: tuple[Any, ...]) -> None:
        if kind == "ready":
            handle.init_s, handle.rss_mb = message[2], message[3]
            if not handle.ready.done():
                handle.ready.set_result(None)
        elif kind == "rss":
            handle.rss_mb = message[2]
        elif kind == "failed":
            handle.alive = False
            if not handle.ready.done():
                handle.ready.set_exception(EngineUnavailable(message[2]))
        elif kind in ("died", "stopped"):
            handle.alive = False
            if not handle.ready.done():
                handle.ready.set_exception(
                    EngineUnavailable(f"sphinx worker {handle.index} exited with code {message[2]}")
                )
            for key in list(handle.legs):
                stream = self._streams.pop(key, None)
                if stream is not None:
                    stream.abandon(f"sphinx worker {handle.index} exited (code {message[2]})")
            handle.legs.clear()
            if kind == "died" and message[2] in (-signal.SIGTERM, -signal.SIGINT):
                # A stop signal sent to the whole process group (Ctrl-C, systemd, `kill -- -PGID`)
                # reaches the workers too: an ordinary stop, not a crash.
                log.info("sphinx worker %d stopped by %s", handle.index, signal.Signals(-message[2]).name)
            elif kind == "died":
                log.error("sphinx worker %d died with exit code %s", handle.index, message[2])


class SphinxLegStream(LegStream):
    def __init__(self, engine: SphinxEngine, handle: _WorkerHandle, key: int, label: str, emit: Emit) -> None:
        self._engine = engine
        self._handle = handle
        self._key = key
        self._label = label
        self._emit = emit
        self._sent_samples = 0  # everything fed, dropped audio included: the leg clock
        self._backlog = 0  # sent to the worker, not yet decoded
        self._dropping = False
        self._dropped_samples = 0
        self._finishing = False
        self._done = asyncio.get_running_loop().create_future()
        self._last_hyp: dict[int, str] = {}

    def feed(self, audio: Audio) -> None:
        if self._finishing:
            raise RuntimeError(f"leg {self._label} was finished; feed() after finish() is not allowed")
        samples = np.asarray(audio, dtype=np.float32)
        if samples.ndim != 1:
            raise ValueError(f"leg {self._label}: expected mono 1-D audio, got shape {samples.shape}")
        if samples.size == 0 or self._done.done():
            return
        start = self._sent_samples
        self._sent_samples += samples.size
        if self._backlog + samples.size > self._engine.max_backlog_samples:
            self._drop(samples.size)
            return
        if self._dropping:
            # Tell the worker where the gap was so later times stay on the leg clock.
            self._handle.inbox.put(("gap", self._key, self._dropped_samples, start - self._dropped_samples))
            self._dropping = False
        pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
        self._backlog += samples.size
        self._handle.inbox.put(("audio", self._key, pcm))

    def _drop(self, samples: int) -> None:
        if not self._dropping:
            self._dropping = True
            self._dropped_samples = 0
            limit_s = self._engine.max_backlog_samples / SAMPLE_RATE
            self._emit(
                EngineError(
                    f"leg {self._label} is {self._backlog / SAMPLE_RATE:.1f}s behind real time "
                    f"(limit {limit_s:.1f}s): dropping audio until it catches up",
                    code="overload",
                )
            )
        self._dropped_samples += samples

    async def finish(self) -> None:
        if not self._finishing:
            self._finishing = True
            if not self._done.done():
                self._handle.inbox.put(("finish", self._key))
        await asyncio.shield(self._done)

    def on_result(self, kind: str, message: tuple[Any, ...]) -> None:
        if kind == "consumed":
            self._backlog -= message[2]
        elif kind == "partial":
            _, _, utt, text, start, end = message
            stable, unstable = split_stable(self._last_hyp.get(utt, ""), text)
            self._last_hyp[utt] = text
            self._emit(Partial(utt, stable, unstable, _ms(start), _ms(end)))
        elif kind == "final":
            _, _, utt, text, start, end, relative = message
            self._last_hyp.pop(utt, None)
            offset = _ms(start)
            words = tuple((w, offset + s, offset + e, conf) for w, s, e, conf in relative)
            conf = round(sum(w[3] for w in words) / len(words), 3) if words else None
            self._emit(Final(utt, text, offset, _ms(end), lang="en", words=words, conf=conf))
        elif kind == "error":
            self._emit(EngineError(f"leg {self._label}: {message[2]}", code="engine"))
        elif kind == "finished" and not self._done.done():
            self._done.set_result(None)

    def abandon(self, reason: str) -> None:
        """The worker is gone: say so once and release anyone waiting in finish()."""
        if not self._done.done():
            self._emit(EngineError(f"leg {self._label}: {reason}", code="engine"))
            self._done.set_result(None)


def _ms(samples: int) -> int:
    return samples * 1000 // SAMPLE_RATE
