"""RTP ingest against the full Service: hostile and impaired input, real peers, and the real
engine wherever finals are checked (the ScriptedEngine where only the ingest's plumbing is).

Bad datagrams are counted and dropped with a reason and never stop another leg from
transcribing; a lossy, reordering, duplicating network still yields every utterance's
final and keeps the leg's audio time true; ffmpeg feeds a leg reserved over HTTP.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import time
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
import redis.asyncio as aioredis
import soxr

from callscribe.bridge.rtp.packet import RtpPacket
from callscribe.codecs import encoder_for, spec_by_name
from callscribe.codecs.dtmf import TelephoneEvent
from callscribe.events import EventType, TranscriptEvent
from callscribe.service import Service
from tests.scripted_engine import ScriptedEngine
from tests.support import ServiceFactory, finals_text, free_port, free_port_range, load_clip, read_call_events

PTIME = 0.02
SAMPLES = 160  # 20 ms at 8 kHz
# Other listeners on free ports, so that tests run beside each other and beside a dev server.
ISOLATED = {"audiosocket_port": 0}


def ulaw_frames(pcm16k: np.ndarray) -> list[bytes]:
    """16 kHz speech → 20 ms μ-law payloads, as a phone network carries it."""
    narrow = soxr.resample(pcm16k, 16000, 8000).astype(np.int16)
    narrow = np.concatenate([narrow, np.zeros(-narrow.size % SAMPLES, np.int16)])
    encoder = encoder_for(spec_by_name("pcmu"))
    return [encoder.encode(frame) for frame in narrow.reshape(-1, SAMPLES)]


@dataclass
class Impairment:
    loss: float = 0.0
    reorder: float = 0.0  # share of packets held back 20-60 ms (within the jitter buffer's 60 ms)
    duplicate: float = 0.0
    seed: int = 1


def schedule(payloads: list[bytes], ssrc: int, impairment: Impairment) -> list[tuple[float, bytes]]:
    """(send time, datagram) in send order: a seeded lossy, reordering, duplicating network.
    The last packet always arrives, so the stream's length is known to the receiver."""
    rng = random.Random(impairment.seed)
    seq0, ts0 = rng.getrandbits(16), rng.getrandbits(32)
    plan: list[tuple[float, int, bytes]] = []
    for n, payload in enumerate(payloads):
        data = RtpPacket(
            0, (seq0 + n) % 65536, (ts0 + n * SAMPLES) % 2**32, ssrc, payload, n == 0
        ).serialize()
        last = n == len(payloads) - 1
        if not last and rng.random() < impairment.loss:
            continue
        at = n * PTIME
        if not last and rng.random() < impairment.reorder:
            at += rng.choice((0.021, 0.041, 0.055))
        plan.append((at, n, data))
        if rng.random() < impairment.duplicate:
            plan.append((at + rng.uniform(0.0, 0.05), n, data))
    plan.sort()
    return [(at, data) for at, _n, data in plan]


async def send_schedule(port: int, plan: list[tuple[float, bytes]], speed: float = 1.0) -> None:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, remote_addr=("127.0.0.1", port)
    )
    try:
        start = loop.time()
        for at, data in plan:
            delay = start + at / speed - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            transport.sendto(data)
    finally:
        transport.close()


def udp_send(port: int, datagrams: list[bytes]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for data in datagrams:
            sock.sendto(data, ("127.0.0.1", port))


async def udp_send_drained(port: int, datagrams: list[bytes]) -> None:
    """Send in small bursts and let the bridge read them: a full kernel receive buffer would
    drop datagrams before the bridge could count them."""
    for start in range(0, len(datagrams), 20):
        udp_send(port, datagrams[start : start + 20])
        await asyncio.sleep(0.01)


def dropped(svc: Service, reason: str) -> float:
    return svc.metrics.dropped("rtp", reason)


def leg_end_ms(events: list[TranscriptEvent], leg: str = "caller") -> int:
    ended = [e for e in events if e.type == EventType.LEG_ENDED and e.leg == leg]
    assert len(ended) == 1, [e.type for e in events]
    assert ended[0].end_ms is not None
    return ended[0].end_ms


async def test_bad_input_is_counted_and_another_leg_keeps_transcribing(
    make_service: ServiceFactory, redis: aioredis.Redis, key_prefix: str
) -> None:
    clip = load_clip("librivox-0870")
    async with make_service(leg_idle_timeout_sec=3.0, **ISOLATED) as svc:
        good = await svc.rtp.reserve("good-call", "caller", "pcmu")
        victim = await svc.rtp.reserve("victim-call", "caller", "pcmu")
        plan = schedule(ulaw_frames(clip.pcm), 0x600D, Impairment())
        sending = asyncio.create_task(send_schedule(good.rtp_port, plan))
        await asyncio.sleep(0.3)  # the good leg latches its source first

        auto = svc.settings.rtp_port
        header = RtpPacket(0, 1, 160, 0xBAD, b"\xff" * 160).serialize()
        rng = random.Random(7)
        await udp_send_drained(auto, [b"", b"\x80", header[:11]])  # truncated
        await udp_send_drained(auto, [bytes([0x40]) + header[1:], bytes([0xC0]) + header[1:]])  # version 1, 3
        await udp_send_drained(auto, [bytes([0x8F]) + header[1:16]])  # 15 CSRCs announced, 1 present
        await udp_send_drained(
            auto, [bytes([0x90]) + header[1:12] + b"\xbe\xde\xff\xff"]
        )  # extension past the end
        await udp_send_drained(
            auto,
            [bytes([0x80 | rng.randrange(0x40)]) + rng.randbytes(rng.randrange(1, 300)) for _ in range(200)],
        )
        await udp_send_drained(auto, [os.urandom(65000)])  # one 64 KB datagram
        await udp_send_drained(
            victim.rtp_port, [RtpPacket(3, n, n * 160, 0xD0D0, b"\x00" * 33).serialize() for n in range(5)]
        )
        await udp_send_drained(
            good.rtp_port, [RtpPacket(0, 9, 9, 0xE71, b"\xff" * 160).serialize()]
        )  # hijack attempt
        flood = [RtpPacket(0, n % 65536, n * 160, 0xF100D, b"\xd5" * 160).serialize() for n in range(10_000)]
        received = svc.metrics.packets_received.labels(transport="rtp")
        before, flood_start = received._value.get(), time.monotonic()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as flooder:  # one source
            for start in range(0, len(flood), 50):  # ~5,000 packets/s, 10 times the limit
                for data in flood[start : start + 50]:
                    flooder.sendto(data, ("127.0.0.1", auto))
                await asyncio.sleep(0.01)
        flood_seconds = time.monotonic() - flood_start
        await asyncio.sleep(0.1)
        arrived = received._value.get() - before

        await sending
        for reason in ("truncated", "bad_version", "bad_csrc", "bad_extension", "oversized", "rate_limited"):
            assert dropped(svc, reason) >= 1, f"no drop counted as {reason}"
        assert dropped(svc, "unknown_payload_type") >= 5  # the victim's, and random datagrams'
        assert len(svc.registry.legs) <= 3  # random bytes that parse as RTP opened no legs
        assert dropped(svc, "foreign_source") == 1
        assert dropped(svc, "truncated") >= 3 and dropped(svc, "bad_version") >= 2
        # One source's flood is cut to its rate (500/s after a one-second burst); the kernel
        # may drop some datagrams before the bridge sees them, and the good leg sends too.
        rate = svc.settings.max_packets_per_sec_per_source
        assert arrived >= len(flood) // 2  # most reached the bridge
        assert dropped(svc, "rate_limited") >= arrived - rate * (1 + flood_seconds) - 500

        assert await svc.rtp.release(good.leg_id)
        events = await read_call_events(redis, key_prefix, "good-call", timeout=60)
        errors = [(e.text, e.meta) for e in events if e.type == EventType.ERROR]
        assert finals_text(events), f"no final from the good leg; errors: {errors}"
        assert abs(leg_end_ms(events) - clip.seconds * 1000) <= 100
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{svc.http_port}") as http:
            assert (await http.get("/healthz")).status_code == 200
            metrics = (await http.get("/metrics")).text
        assert 'callscribe_packets_dropped_total{reason="rate_limited",transport="rtp"}' in metrics


async def test_lossy_reordering_network_keeps_every_utterance_and_the_leg_time(
    make_service: ServiceFactory, redis: aioredis.Redis, key_prefix: str
) -> None:
    first, second = load_clip("librivox-0870"), load_clip("librivox-0890")
    pause = np.zeros(int(1.5 * 16000), np.int16)
    call_audio = np.concatenate([first.pcm, pause, second.pcm, pause[:8000]])
    payloads = ulaw_frames(call_audio)
    plan = schedule(payloads, 0x1055, Impairment(loss=0.05, reorder=0.05, duplicate=0.03, seed=42))
    assert len(plan) < len(payloads)  # the network really lost packets
    async with make_service(jitter_ms=60, **ISOLATED) as svc:
        leg = await svc.rtp.reserve("lossy-call", "caller", "pcmu")
        await send_schedule(leg.rtp_port, plan)
        await asyncio.sleep(0.2)
        assert dropped(svc, "duplicate") >= 1
        assert await svc.rtp.release(leg.leg_id)
        events = await read_call_events(redis, key_prefix, "lossy-call", timeout=90)
    duration_ms = len(payloads) * 20
    assert abs(leg_end_ms(events) - duration_ms) <= 100
    finals = [e for e in events if e.type == EventType.FINAL and e.text]
    first_end = first.seconds * 1000
    second_start = first_end + 1500
    assert any(e.start_ms is not None and e.start_ms < first_end for e in finals), finals
    assert any(e.end_ms is not None and e.end_ms > second_start for e in finals), finals
    # Lost packets became silence, not shifted speech: the second clip's words sit in its span.
    assert all(e.end_ms is not None and e.end_ms <= duration_ms + 100 for e in finals)


async def test_dtmf_and_idle_timeout_on_the_auto_leg_port(
    make_service: ServiceFactory, redis: aioredis.Redis, key_prefix: str
) -> None:
    async with make_service(
        engine=ScriptedEngine(), leg_idle_timeout_sec=1.0, dtmf_payload_type=101, **ISOLATED
    ) as svc:
        ssrc = 0xD7AF
        silence = b"\xff" * 160
        packets = [RtpPacket(0, n, n * 160, ssrc, silence).serialize() for n in range(10)]
        for k, (duration, end) in enumerate(
            [(160, False), (480, False), (800, True), (800, True), (800, True)]
        ):
            event = TelephoneEvent.for_digit("7", end, duration).serialize()
            packets.append(RtpPacket(101, 10 + k, 1600, ssrc, event).serialize())
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            for data in packets:
                sock.sendto(data, ("127.0.0.1", svc.settings.rtp_port))
        call_id = f"rtp-127.0.0.1-{port}-{ssrc:08x}"
        events = await read_call_events(redis, key_prefix, call_id, timeout=30)
    digits = [e for e in events if e.type == EventType.DTMF]
    assert [(e.text, e.leg) for e in digits] == [("7", "caller")]
    ended = [e for e in events if e.type == EventType.LEG_ENDED]
    assert ended[0].meta["reason"] == "idle_timeout"
    assert ended[0].end_ms == 200


async def test_reserved_leg_idles_out_from_reservation(
    make_service: ServiceFactory, redis: aioredis.Redis, key_prefix: str
) -> None:
    async with make_service(engine=ScriptedEngine(), leg_idle_timeout_sec=0.5, **ISOLATED) as svc:
        await svc.rtp.reserve("silent-call", "agent", "opus")
        events = await read_call_events(redis, key_prefix, "silent-call", timeout=20)
        assert not svc.registry.legs
    ended = [e for e in events if e.type == EventType.LEG_ENDED]
    assert ended[0].meta["reason"] == "idle_timeout" and ended[0].leg == "agent"


async def test_ssrc_spray_from_one_address_is_capped(make_service: ServiceFactory) -> None:
    async with make_service(engine=ScriptedEngine(), leg_idle_timeout_sec=5.0, **ISOLATED) as svc:
        svc.rtp.max_auto_legs_per_source = 3
        port = svc.settings.rtp_port
        # 20 streams of two packets in sequence each (confirmed sources), then 30 lone packets.
        await udp_send_drained(
            port,
            [
                RtpPacket(0, seq, 160 * seq, ssrc, b"\xff" * 160).serialize()
                for ssrc in range(20)
                for seq in (1, 2)
            ],
        )
        await udp_send_drained(
            port, [RtpPacket(0, 1, 160, 1000 + n, b"\xff" * 160).serialize() for n in range(30)]
        )
        for _ in range(200):
            if dropped(svc, "unconfirmed_source") >= 30:
                break
            await asyncio.sleep(0.02)
        assert len(svc.registry.legs) == 3
        assert dropped(svc, "auto_leg_limit") == 17
        assert dropped(svc, "unconfirmed_source") == 30  # expired after their probation


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")
async def test_ffmpeg_into_a_leg_reserved_over_http(
    make_service: ServiceFactory, redis: aioredis.Redis, key_prefix: str
) -> None:
    clip = load_clip("librivox-0890")
    async with (
        make_service(**ISOLATED) as svc,
        # DELETE returns once the leg's last final is in Redis: allow a slow engine time.
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{svc.http_port}", timeout=60) as http,
    ):
        # ffmpeg ends with an RTCP BYE, which ends a leg by itself (test_rtcp_bye_ends_the_leg);
        # this test is about DELETE, so ffmpeg's RTCP goes to a port nobody listens on.
        reply = await http.post("/v1/legs", json={"call_id": "ffmpeg-call", "leg": "caller", "codec": "pcmu"})
        assert reply.status_code == 201, reply.text
        leg = reply.json()
        bad = await http.post("/v1/legs", json={"call_id": "x", "codec": "gsm"})
        assert bad.status_code == 400 and "pcmu" in bad.json()["error"]
        proc = await asyncio.create_subprocess_exec(
            "ffmpeg", "-hide_banner", "-loglevel", "error", "-re", "-i", str(clip.path),
            "-ar", "8000", "-ac", "1", "-acodec", "pcm_mulaw", "-f", "rtp",
            f"rtp://127.0.0.1:{leg['rtp_port']}?rtcpport={free_port()}",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, stderr = await asyncio.wait_for(proc.communicate(), timeout=60)
        assert proc.returncode == 0, stderr.decode()
        assert (await http.delete(f"/v1/legs/{leg['leg_id']}")).status_code == 204
        assert (await http.delete(f"/v1/legs/{leg['leg_id']}")).status_code == 404
    events = await read_call_events(redis, key_prefix, "ffmpeg-call", timeout=60)
    assert finals_text(events)
    assert abs(leg_end_ms(events) - clip.seconds * 1000) <= 100
    ended = [e for e in events if e.type == EventType.LEG_ENDED]
    assert ended[0].meta["reason"] == "released"


async def test_port_range_exhaustion_is_a_clear_503(make_service: ServiceFactory) -> None:
    async with (
        make_service(engine=ScriptedEngine(), rtp_port_range=free_port_range(4), **ISOLATED) as svc,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{svc.http_port}", timeout=60) as http,
    ):
        replies = [
            await http.post("/v1/legs", json={"call_id": f"full-{n}", "codec": "pcma"}) for n in range(3)
        ]
        assert [r.status_code for r in replies] == [201, 201, 503]  # two even ports in four
        assert "no free RTP port" in replies[2].json()["error"]
        assert all(r.json()["rtp_port"] % 2 == 0 for r in replies[:2])
        assert (await http.delete(f"/v1/legs/{replies[0].json()['leg_id']}")).status_code == 204
        again = await http.post("/v1/legs", json={"call_id": "full-3", "codec": "pcma"})
        assert again.status_code == 201 and again.json()["rtp_port"] == replies[0].json()["rtp_port"]


def rtcp_bye(ssrc: int) -> bytes:
    """RR + BYE, the compound packet a sender ends with (RFC 3550 §6.6)."""
    report = bytes([0x80, 201, 0, 1]) + ssrc.to_bytes(4, "big")
    return report + bytes([0x81, 203, 0, 1]) + ssrc.to_bytes(4, "big")


async def test_rtcp_bye_ends_the_leg(
    make_service: ServiceFactory, redis: aioredis.Redis, key_prefix: str
) -> None:
    """A BYE on the RTCP port (RTP port + 1) of a reserved leg, and one muxed on the auto-leg
    port (RFC 5761), end their legs at once with reason hangup: no idle timeout involved."""
    async with make_service(leg_idle_timeout_sec=60.0, **ISOLATED) as svc:
        reserved = await svc.rtp.reserve("bye-call", "agent", "pcmu")
        silence = b"\xff" * 160
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rtp,
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rtcp,
        ):
            rtp.bind(("127.0.0.1", 0))
            rtcp.bind(("127.0.0.1", 0))
            for n in range(25):
                rtp.sendto(
                    RtpPacket(0, n, n * 160, 0xB1E, silence).serialize(), ("127.0.0.1", reserved.rtp_port)
                )
            await asyncio.sleep(0.3)  # the bridge reads the RTP (a BYE comes after the media)
            # Someone else's BYE changes nothing; ours ends the leg.
            rtcp.sendto(rtcp_bye(0x5EE), ("127.0.0.1", reserved.rtp_port + 1))
            rtcp.sendto(rtcp_bye(0xB1E), ("127.0.0.1", reserved.rtp_port + 1))
            auto_port = svc.settings.rtp_port
            for n in range(25):
                rtp.sendto(RtpPacket(0, n, n * 160, 0xA070, silence).serialize(), ("127.0.0.1", auto_port))
            await asyncio.sleep(0.3)
            rtp.sendto(rtcp_bye(0xA070), ("127.0.0.1", auto_port))
            auto_call = f"rtp-127.0.0.1-{rtp.getsockname()[1]}-{0xA070:08x}"
        started = time.monotonic()
        reserved_events = await read_call_events(redis, key_prefix, "bye-call", timeout=30)
        auto_events = await read_call_events(redis, key_prefix, auto_call, timeout=30)
        assert time.monotonic() - started < 30  # well before the 60 s idle timeout
        assert dropped(svc, "rtcp") >= 1  # the stranger's BYE
    for events, leg in ((reserved_events, "agent"), (auto_events, "caller")):
        [ended] = [e for e in events if e.type == EventType.LEG_ENDED]
        assert ended.leg == leg and ended.meta["reason"] == "hangup"
        assert ended.end_ms == 500  # every packet before the BYE was heard
