"""The RTP ingest's wiring, without sockets or Redis: datagrams handed to RtpIngest open
auto-legs in a real CallRegistry, their audio reaches the (scripted) engine, and the ingest's
clock ends idle legs and its stop() ends the rest, each with its last final.

(Admission rules themselves, rate, probation and per-host caps, have their own unit tests.)
"""

from __future__ import annotations

import asyncio

import numpy as np

from callscribe.bridge.rtp.ingest import RtpIngest
from callscribe.bridge.rtp.packet import RtpPacket
from callscribe.bridge.rtp.sender import packetize
from callscribe.calls import CallRegistry
from callscribe.codecs import spec_by_name
from callscribe.events import EventType, TranscriptEvent
from callscribe.metrics import Metrics
from callscribe.security import AccessPolicy
from callscribe.settings import Settings
from tests.scripted_engine import ScriptedEngine

SOURCE = ("127.0.0.1", 40000)


class ListSink:
    def __init__(self) -> None:
        self.events: list[TranscriptEvent] = []

    def publish(self, event: TranscriptEvent) -> None:
        self.events.append(event)


def speech_then_pause(rate: int = 8000) -> np.ndarray:
    t = np.arange(rate) / rate
    tone = (8000 * np.sin(2 * np.pi * 220 * t)).astype(np.int16)
    return np.concatenate([np.zeros(rate // 4, np.int16), tone, np.zeros(rate, np.int16)])


def datagrams(ssrc: int, first_seq: int = 1000) -> list[bytes]:
    spec = spec_by_name("pcmu")
    return [
        RtpPacket(spec.static_pt or 0, (first_seq + n) % 65536, ts, ssrc, payload).serialize()
        for n, (ts, payload) in enumerate(packetize(speech_then_pause(), 8000, spec, 20))
    ]


def ingest(**settings: object) -> tuple[RtpIngest, ListSink, Metrics]:
    sink, metrics = ListSink(), Metrics()
    config = Settings(**settings)  # type: ignore[arg-type]
    registry = CallRegistry(ScriptedEngine(["hello", "again"]), sink, metrics)
    return RtpIngest(config, registry, metrics, AccessPolicy.from_settings(config)), sink, metrics


async def test_an_rtp_stream_becomes_a_leg_whose_idle_timeout_ends_it_with_its_final() -> None:
    rtp, sink, metrics = ingest(leg_idle_timeout_sec=2.0, jitter_ms=40)
    for data in datagrams(ssrc=0xABCD):
        rtp.on_auto_datagram(data, SOURCE)
    now = asyncio.get_running_loop().time()
    rtp.tick(now + 0.5)  # the jitter buffer releases what it held; the leg is not idle yet
    await asyncio.sleep(0)
    assert [str(e.type) for e in sink.events][:3] == ["call.started", "leg.started", "partial"]
    rtp.tick(now + 3.0)  # no packet for longer than the idle timeout
    await rtp.stop()
    kinds = [str(e.type) for e in sink.events]
    assert kinds == ["call.started", "leg.started", "partial", "final", "leg.ended", "call.ended"]
    started, final, ended = sink.events[1], sink.events[3], sink.events[4]
    assert started.call_id == "rtp-127.0.0.1-40000-0000abcd"
    assert started.meta == {"source": "127.0.0.1:40000", "ssrc": 0xABCD}
    assert (final.text, final.leg) == ("hello", "caller")
    assert ended.meta["reason"] == "idle_timeout" and abs(ended.meta["audio_ms"] - 2250) <= 30
    assert metrics.registry.get_sample_value("callscribe_packets_received_total", {"transport": "rtp"}) == 113


async def test_two_ssrcs_are_two_calls_and_stop_ends_both_after_their_last_final() -> None:
    rtp, sink, _ = ingest(leg_idle_timeout_sec=30.0)
    first, second = datagrams(ssrc=1), datagrams(ssrc=2, first_seq=65530)  # wraps around
    for a, b in zip(first[:60], second[:60], strict=True):  # 1.2 s each: the tone, no pause yet
        rtp.on_auto_datagram(a, SOURCE)
        rtp.on_auto_datagram(b, SOURCE)
    await rtp.stop()
    ended = [e for e in sink.events if e.type == EventType.LEG_ENDED]
    assert sorted(e.call_id for e in ended) == [
        "rtp-127.0.0.1-40000-00000001",
        "rtp-127.0.0.1-40000-00000002",
    ]
    assert {e.meta["reason"] for e in ended} == {"shutdown"}
    for event in ended:
        texts = [e.text for e in sink.events if e.call_id == event.call_id and e.type == EventType.FINAL]
        assert texts == ["hello"]  # flushed at shutdown: the utterance was still open


async def test_a_source_outside_allow_networks_opens_no_leg() -> None:
    rtp, sink, metrics = ingest(allow_networks=["10.0.0.0/8"])
    for data in datagrams(ssrc=7)[:10]:
        rtp.on_auto_datagram(data, SOURCE)
    await rtp.stop()
    assert sink.events == []
    assert (
        metrics.registry.get_sample_value(
            "callscribe_packets_dropped_total", {"transport": "rtp", "reason": "not_allowed"}
        )
        == 10
    )
