"""Calls and legs: the one place where ingest, engine and publishing meet.

Every ingest path (RTP, AudioSocket, websocket forks, WebRTC, SIP) does the same three
things: `CallRegistry.open_leg()`, `Leg.feed()` decoded PCM at its source rate, and
`Leg.close()`. The leg resamples to 16 kHz, drives its engine stream and turns what the
engine recognises into numbered TranscriptEvents for the publisher.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from callscribe.bridge.events import EndReason
from callscribe.bridge.limits import AtCapacity as AtCapacity  # re-exported: raised by open_leg
from callscribe.bridge.limits import LegConflict as LegConflict
from callscribe.codecs.base import Pcm16
from callscribe.codecs.resample import Resampler
from callscribe.engine.base import SAMPLE_RATE, Engine, Final, Partial, Recognition, Vocabulary
from callscribe.events import EventType, TranscriptEvent
from callscribe.ids import IdKind, check_id
from callscribe.ingest_options import context, keyterms
from callscribe.leg_events import LatencyTracker, LegEvents
from callscribe.metrics import Metrics

log = logging.getLogger(__name__)


class EventSink(Protocol):
    def publish(self, event: TranscriptEvent) -> None: ...


@dataclass
class Call:
    call_id: str
    meta: dict[str, Any]
    legs: dict[str, Leg] = field(default_factory=dict)
    seq: int = 0
    started: float = field(default_factory=time.time)
    # Applied to every event of the call before the sink and any listener sees it.
    redact: Callable[[TranscriptEvent], TranscriptEvent] = field(default=lambda event: event)
    # The sender (source host) that opened the call's first leg: only it may add legs, so
    # nobody else can take a leg name inside its call or inject audio into it (issue 17).
    owner: str | None = None

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq


class Leg:
    """One leg's lifecycle: opened by the registry, `start()`ed (leg.started), fed, closed
    (leg.ended). Resampling and the engine stream live here; timing results is the
    LatencyTracker's job and building numbered events the LegEvents'."""

    def __init__(
        self,
        call: Call,
        name: str,
        engine: Engine,
        sink: EventSink,
        metrics: Metrics,
        meta: dict[str, Any],
        on_closed: Callable[[Leg], None],
    ) -> None:
        self.call = call
        self.name = name
        self.leg_id = uuid.uuid4().hex[:16]
        self.meta = meta
        self.engine_name = engine.name
        self._sink = sink
        self._metrics = metrics
        self._on_closed = on_closed
        self._events = LegEvents(call.call_id, name, engine.name)
        self._latency = LatencyTracker()
        self._samples = 0  # 16 kHz samples fed to the engine: the leg's clock
        self._resampler: Resampler | None = None
        self._started = False
        self._closing: asyncio.Task[None] | None = None
        self._listeners: list[Callable[[TranscriptEvent], None]] = []
        # Per-call vocabulary: the leg's options, else the call's (callscribe.ingest_options).
        vocabulary = Vocabulary(context(meta) or context(call.meta), keyterms(meta) or keyterms(call.meta))
        self._stream = engine.open_stream_for(call.call_id, name, self._on_recognition, vocabulary)
        self.started = time.time()

    def start(self) -> None:
        """Publish leg.started: the leg's first event (the registry calls this once it has
        registered the leg, so a subscriber never sees a leg the registry does not know)."""
        if self._started:
            raise RuntimeError(f"leg {self.call_id}/{self.name} was already started")
        self._started = True
        self._emit(self._events.started(self.meta))

    @property
    def call_id(self) -> str:
        return self.call.call_id

    @property
    def audio_ms(self) -> int:
        return self._samples * 1000 // SAMPLE_RATE

    @property
    def closed(self) -> bool:
        return self._closing is not None

    def feed(self, pcm: Pcm16, rate: int) -> None:
        """Mono int16 PCM at `rate` (which may change mid-leg: a codec switch)."""
        if self._closing is not None or pcm.size == 0:
            return
        if self._resampler is None or self._resampler.in_rate != rate:
            if self._resampler is not None:
                self._to_engine(self._resampler.flush())
            self._resampler = Resampler(rate)
        self._to_engine(self._resampler.process(pcm))

    def dtmf(self, digit: str, duration_ms: int) -> None:
        self._emit(self._events.dtmf(digit, duration_ms, end_ms=self.audio_ms))

    def error(self, message: str, code: str = "ingest") -> None:
        self._emit(self._events.error(message, code))

    async def close(self, reason: EndReason = EndReason.HANGUP) -> None:
        """Flush the open utterance, publish leg.ended (and call.ended for the last leg).
        Safe to call more than once; every caller waits for the same flush."""
        if self._closing is None:
            self._closing = asyncio.create_task(self._close(reason))
        await asyncio.shield(self._closing)

    async def _close(self, reason: EndReason) -> None:
        if self._resampler is not None:
            self._to_engine(self._resampler.flush())
        try:
            await self._stream.finish()
        except Exception:  # the leg must still end cleanly for its subscribers
            log.exception("engine failed to finish leg %s/%s", self.call_id, self.name)
            self.error("engine failed to finish the leg; the last utterance may be missing", "engine")
        self._emit(self._events.ended(reason, self.audio_ms))
        self._on_closed(self)

    def _to_engine(self, audio: np.ndarray[Any, np.dtype[np.float32]]) -> None:
        if audio.size == 0:
            return
        self._samples += audio.size
        self._latency.fed(self.audio_ms)
        self._metrics.audio_seconds.inc(audio.size / SAMPLE_RATE)
        self._stream.feed(audio)

    def _on_recognition(self, result: Recognition) -> None:
        latency: int | None = None
        if isinstance(result, Partial | Final):
            latency = self._latency.latency_ms(result.end_ms)
            if latency is not None:
                histogram = (
                    self._metrics.partial_latency
                    if isinstance(result, Partial)
                    else self._metrics.final_latency
                )
                histogram.observe(latency / 1000)
        else:
            self._metrics.engine_errors.labels(code=result.code).inc()
        self._emit(self._events.recognised(result, latency))

    def add_listener(self, listener: Callable[[TranscriptEvent], None]) -> None:
        """Also hand every later event of this leg to `listener`, after the publisher (an
        ingest that talks back, e.g. a FreeSWITCH fork echoing finals, subscribes here)."""
        self._listeners.append(listener)

    def _emit(self, event: TranscriptEvent) -> None:
        event = self.call.redact(event)  # before any sink or listener sees it
        self._sink.publish(event)
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:  # a listener's failure must not stop the leg's events
                log.exception("event listener failed on leg %s/%s", self.call_id, self.name)


class CallRegistry:
    """Open calls and legs. A call starts with its first leg and ends with its last."""

    def __init__(
        self,
        engine: Engine,
        sink: EventSink,
        metrics: Metrics,
        max_legs: int = 1000,
        redactor: Callable[[TranscriptEvent], TranscriptEvent] | None = None,
    ) -> None:
        self._engine = engine
        # callscribe.redact.Redactor: the sink, the spool behind it, logs and listeners (a fork
        # echoing finals to the PBX) only ever see redacted events.
        self._redactor = redactor
        self._sink = sink
        self._metrics = metrics
        self.max_legs = max_legs
        self.calls: dict[str, Call] = {}
        self.legs: dict[str, Leg] = {}
        self.accepting = True

    def open_leg(
        self, call_id: str, leg: str, meta: dict[str, Any] | None = None, owner: str | None = None
    ) -> Leg:
        """`owner`: who opens it (the ingest's source host). A call opened with an owner
        accepts legs from that owner only; LegConflict for anyone else, as for a duplicate."""
        # Every ingest ends here, so the id rule holds whatever the entry point checked.
        check_id(IdKind.CALL_ID, call_id)
        check_id(IdKind.LEG, leg)
        if not self.accepting:
            self._metrics.legs_refused.labels(reason="draining").inc()
            raise AtCapacity("callscribe is shutting down and accepts no new legs")
        if len(self.legs) >= self.max_legs:
            self._metrics.legs_refused.labels(reason="capacity").inc()
            raise AtCapacity(f"at capacity: {len(self.legs)} legs open (max_legs={self.max_legs})")
        call = self.calls.get(call_id)
        if call is None:
            call = Call(call_id, dict(meta or {}), owner=owner)
            if self._redactor is not None:
                call.redact = self._redactor
            self.calls[call_id] = call
            self._publish_call(call, EventType.CALL_STARTED, meta=call.meta)
        elif call.owner is not None and owner != call.owner:
            self._metrics.legs_refused.labels(reason="foreign_call").inc()
            raise LegConflict(f"call {call_id!r} is open from another sender; it cannot add leg {leg!r}")
        elif leg in call.legs:
            raise LegConflict(f"leg {leg!r} of call {call_id!r} is already open")
        opened = Leg(call, leg, self._engine, self._sink, self._metrics, dict(meta or {}), self._leg_closed)
        call.legs[leg] = opened
        self.legs[opened.leg_id] = opened
        opened.start()
        self._update_gauges()
        log.info("leg opened call_id=%s leg=%s leg_id=%s", call_id, leg, opened.leg_id)
        return opened

    def get(self, leg_id: str) -> Leg | None:
        return self.legs.get(leg_id)

    async def close_all(self, reason: EndReason | str) -> None:
        end = EndReason(reason)  # ValueError for a reason that is not a published value
        await asyncio.gather(*(leg.close(end) for leg in list(self.legs.values())))

    def _leg_closed(self, leg: Leg) -> None:
        self.legs.pop(leg.leg_id, None)
        call = leg.call
        call.legs.pop(leg.name, None)
        log.info("leg ended call_id=%s leg=%s audio_ms=%d", leg.call_id, leg.name, leg.audio_ms)
        if not call.legs and self.calls.get(call.call_id) is call:
            del self.calls[call.call_id]
            self._publish_call(
                call, EventType.CALL_ENDED, meta={"duration_ms": int((time.time() - call.started) * 1000)}
            )
        self._update_gauges()

    def _publish_call(self, call: Call, kind: EventType, meta: dict[str, Any]) -> None:
        self._sink.publish(
            call.redact(
                TranscriptEvent(
                    type=kind, call_id=call.call_id, seq=call.next_seq(), engine=self._engine.name, meta=meta
                )
            )
        )

    def _update_gauges(self) -> None:
        self._metrics.active_calls.set(len(self.calls))
        self._metrics.active_legs.set(len(self.legs))
