"""Legs and calls without Redis or a model: the registry, a Leg's lifecycle and its events,
driven by the deterministic ScriptedEngine and collected by an in-memory sink."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from callscribe.calls import CallRegistry, Leg
from callscribe.engine.base import SAMPLE_RATE, EngineError, Final, Partial
from callscribe.engine.segmenter import SegmenterConfig
from callscribe.events import EventType, TranscriptEvent
from callscribe.leg_events import LatencyTracker, LegEvents
from callscribe.metrics import Metrics
from tests.scripted_engine import ScriptedEngine


class ListSink:
    def __init__(self) -> None:
        self.events: list[TranscriptEvent] = []

    def publish(self, event: TranscriptEvent) -> None:
        self.events.append(event)

    def kinds(self) -> list[str]:
        return [str(event.type) for event in self.events]


def pcm(seconds: float, rate: int, amplitude: int = 8000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * 220 * t)).astype(np.int16)


def quiet(seconds: float, rate: int) -> np.ndarray:
    return np.zeros(int(seconds * rate), dtype=np.int16)


def registry(texts: tuple[str, ...] = ("hello there", "goodbye")) -> tuple[CallRegistry, ListSink, Metrics]:
    sink, metrics = ListSink(), Metrics()
    return CallRegistry(ScriptedEngine(texts), sink, metrics), sink, metrics


async def test_opening_a_leg_publishes_call_then_leg_started_once_registered() -> None:
    calls, sink, _ = registry()
    leg = calls.open_leg("c1", "caller", {"from": "alice"})
    assert sink.kinds() == ["call.started", "leg.started"]
    started = sink.events[1]
    assert (started.call_id, started.leg, started.seq, started.meta) == ("c1", "caller", 1, {"from": "alice"})
    assert calls.get(leg.leg_id) is leg and calls.calls["c1"].legs["caller"] is leg
    with pytest.raises(RuntimeError, match="already started"):
        leg.start()


async def test_a_leg_built_outside_the_registry_publishes_nothing_until_started() -> None:
    calls, sink, metrics = registry()
    call = calls.open_leg("c1", "caller").call
    sink.events.clear()
    leg = Leg(call, "agent", ScriptedEngine(), sink, metrics, {}, on_closed=lambda leg: None)
    assert sink.events == []
    leg.start()
    assert sink.kinds() == ["leg.started"] and sink.events[0].leg == "agent"


async def test_utterances_become_numbered_partials_and_finals_then_the_leg_and_call_end() -> None:
    calls, sink, metrics = registry()
    leg = calls.open_leg("c1", "caller")
    for chunk in (quiet(0.5, 8000), pcm(1.0, 8000), quiet(1.0, 8000), pcm(0.8, 8000)):
        for offset in range(0, chunk.size, 160):  # 20 ms packets at 8 kHz
            leg.feed(chunk[offset : offset + 160], 8000)
            await asyncio.sleep(
                0
            )  # packets arrive one by one: the engine's results are delivered between them
    at_dtmf = leg.audio_ms  # the resampler still holds a few ms: close() flushes them
    leg.dtmf("5", duration_ms=120)
    await leg.close("hangup")
    legs = [e for e in sink.events if e.leg == "caller"]
    assert [str(e.type) for e in legs] == [
        "leg.started", "partial", "final", "partial", "dtmf", "final", "leg.ended",
    ]  # fmt: skip
    assert [e.seq for e in legs] == list(range(1, 8))
    finals = [e for e in legs if e.type == EventType.FINAL]
    assert [(e.utt, e.text, e.stable, e.lang) for e in finals] == [
        (0, "hello there", "hello there", "en"),
        (1, "goodbye", "goodbye", "en"),
    ]
    assert all(e.engine == "scripted" for e in sink.events)
    assert finals[0].latency_ms is not None and finals[0].latency_ms >= 0
    # The tone runs 500-1500 ms; the segmenter keeps its 300 ms pre-roll and its tail.
    end = 1500 + SegmenterConfig().tail_ms
    assert (finals[0].start_ms, finals[0].end_ms) == (
        pytest.approx(260, abs=20),
        pytest.approx(end, abs=20),
    )
    dtmf = legs[4]
    assert (dtmf.text, dtmf.end_ms, dtmf.start_ms) == ("5", at_dtmf, at_dtmf - 120)
    ended = legs[-1]
    assert ended.meta == {"reason": "hangup", "audio_ms": leg.audio_ms} and ended.end_ms == leg.audio_ms
    assert abs(leg.audio_ms - 3300) <= 20  # fed at 8 kHz, counted on the 16 kHz engine clock
    assert sink.kinds()[-1] == "call.ended" and sink.events[-1].seq == 2  # the call's own numbering
    assert not calls.legs and not calls.calls
    assert metrics.registry.get_sample_value("callscribe_final_latency_seconds_count") == 2


async def test_a_codec_switch_mid_leg_keeps_one_clock() -> None:
    calls, _sink, _ = registry()
    leg = calls.open_leg("c1", "caller")
    leg.feed(pcm(0.5, 8000), 8000)
    leg.feed(pcm(0.5, 16000), 16000)
    leg.feed(pcm(0.5, 48000), 48000)
    await leg.close()
    assert abs(leg.audio_ms - 1500) <= 10


async def test_engine_errors_are_counted_and_published_with_their_code() -> None:
    calls, sink, metrics = registry()
    leg = calls.open_leg("c1", "caller")
    leg._on_recognition(EngineError("behind real time", code="overload", utt=3))
    error = sink.events[-1]
    assert (error.type, error.text, error.utt, error.meta) == (
        EventType.ERROR,
        "behind real time",
        3,
        {"code": "overload"},
    )
    assert metrics.registry.get_sample_value("callscribe_engine_errors_total", {"code": "overload"}) == 1


async def test_close_is_idempotent_and_listeners_see_events_after_the_sink() -> None:
    calls, sink, _ = registry()
    leg = calls.open_leg("c1", "caller")
    seen: list[tuple[str, int]] = []

    def listener(event: TranscriptEvent) -> None:
        seen.append((str(event.type), len(sink.events)))
        raise RuntimeError("a broken listener must not stop the leg")

    leg.add_listener(listener)
    leg.error("bad frame")
    await leg.close("hangup")
    await leg.close("shutdown")
    assert seen == [("error", 3), ("leg.ended", 4)]
    assert [e.meta.get("reason") for e in sink.events if e.type == EventType.LEG_ENDED] == ["hangup"]


def test_latency_is_measured_from_when_the_audio_reached_the_engine() -> None:
    now = [100.0]
    tracker = LatencyTracker(clock=lambda: now[0], checkpoints=3)
    assert tracker.latency_ms(0) is None
    for audio_ms in (20, 40, 60):
        tracker.fed(audio_ms)
        now[0] += 0.5
    assert tracker.latency_ms(35) == 1000  # the 40 ms checkpoint was taken 1.0 s ago
    assert tracker.latency_ms(61) is None  # not fed yet
    tracker.fed(80)  # the oldest checkpoint (20 ms) falls out
    assert tracker.latency_ms(10) == 1000


def test_leg_events_number_and_stamp_every_event() -> None:
    events = LegEvents("c9", "agent", "sphinx")
    built = [
        events.started({"k": "v"}),
        events.recognised(Partial(0, "hel", "lo", 0, 400), latency_ms=90),
        events.recognised(Final(0, "hello", 0, 500, lang="en"), latency_ms=120),
        events.recognised(EngineError("gone", code="engine"), latency_ms=None),
        events.ended("idle_timeout", 900),
    ]
    assert [e.seq for e in built] == [1, 2, 3, 4, 5]
    assert {(e.call_id, e.leg, e.engine) for e in built} == {("c9", "agent", "sphinx")}
    partial, final = built[1], built[2]
    assert (partial.text, partial.stable, partial.unstable, partial.latency_ms) == ("hel lo", "hel", "lo", 90)
    assert (final.text, final.stable, final.end_ms, final.lang) == ("hello", "hello", 500, "en")
    assert built[3].meta == {"code": "engine"} and built[3].latency_ms is None
    assert built[4].meta == {"reason": "idle_timeout", "audio_ms": 900} and built[4].end_ms == 900


def test_scripted_engine_names_each_utterance_by_its_script() -> None:
    engine = ScriptedEngine(["one"])
    assert (engine.text_for(0), engine.text_for(2)) == ("one", "utterance 2")
    assert SAMPLE_RATE == 16000
