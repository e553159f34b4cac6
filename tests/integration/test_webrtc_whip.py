"""WHIP ingest with a real WebRTC peer (aiortc playing a speech WAV in real time), real engine, real Redis.

The browser (Chromium) publishing over WHIP is in tests/e2e; these tests cover the protocol edges,
a two-leg call and the metrics a call moves.
"""

from __future__ import annotations

import asyncio
import time
import wave
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import jiwer
import numpy as np
import pytest
import redis.asyncio as aioredis
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaPlayer
from prometheus_client.parser import text_string_to_metric_families

from callscribe.events import EventType
from callscribe.service import Service
from tests.support import Clip, ServiceFactory, finals_text, load_clip, read_call_events

TOKEN = "whip-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def speech_wav(path: Path, clip: Clip, lead_sec: float = 0.5, tail_sec: float = 1.2) -> Path:
    """The clip between silences: the tail lets the endpointer close the utterance."""
    silence = np.zeros(int(clip.rate * lead_sec), np.int16), np.zeros(int(clip.rate * tail_sec), np.int16)
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(clip.rate)
        wav.writeframes(np.concatenate([silence[0], clip.pcm, silence[1]]).tobytes())
    return path


@asynccontextmanager
async def whip_peer(
    base: str, wav: Path, call_id: str, leg: str, token: str = TOKEN
) -> AsyncIterator[tuple[MediaPlayer, str]]:
    """An aiortc peer publishing `wav` over WHIP; yields (player, resource URL); closes the peer."""
    pc = RTCPeerConnection()
    player = MediaPlayer(str(wav))
    assert player.audio is not None, f"{wav} has no audio"
    pc.addTransceiver(player.audio, direction="sendonly")
    try:
        await pc.setLocalDescription(await pc.createOffer())
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            reply = await client.post(
                "/whip",
                params={"call_id": call_id, "leg": leg, "meta.campaign": "spring"},
                content=pc.localDescription.sdp,
                headers={"Content-Type": "application/sdp", "Authorization": f"Bearer {token}"},
            )
        assert reply.status_code == 201, reply.text
        assert reply.headers["content-type"].startswith("application/sdp")
        await pc.setRemoteDescription(RTCSessionDescription(reply.text, "answer"))
        yield player, str(httpx.URL(base).join(reply.headers["location"]))
    finally:
        await pc.close()


async def played(player: MediaPlayer, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while player.audio is not None and player.audio.readyState != "ended":
        assert time.monotonic() < deadline, "the WAV did not finish playing"
        await asyncio.sleep(0.1)


class Scrape:
    """One GET /metrics, parsed the way Prometheus reads it."""

    def __init__(self, text: str) -> None:
        self.values = {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def __call__(self, name: str, **labels: str) -> float:
        return self.values.get((name, frozenset(labels.items())), 0.0)


async def scrape(service: Service) -> Scrape:
    async with httpx.AsyncClient(timeout=30) as client:
        reply = await client.get(f"http://127.0.0.1:{service.http_port}/metrics")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    return Scrape(reply.text)


async def test_two_leg_webrtc_call_is_transcribed_and_moves_the_metrics(
    make_service: ServiceFactory, redis: aioredis.Redis, key_prefix: str, tmp_path: Path
) -> None:
    caller_clip, agent_clip = load_clip("librivox-0880"), load_clip("librivox-0890")
    caller_wav = speech_wav(tmp_path / "caller.wav", caller_clip)
    agent_wav = speech_wav(tmp_path / "agent.wav", agent_clip)
    async with make_service(whip_token=TOKEN) as svc:
        base = f"http://127.0.0.1:{svc.http_port}"
        async with (
            whip_peer(base, caller_wav, "web-call-1", "caller") as (caller, caller_url),
            whip_peer(base, agent_wav, "web-call-1", "agent") as (agent, agent_url),
        ):
            during = await scrape(svc)
            assert during("callscribe_active_calls") == 1
            assert during("callscribe_active_legs") == 2
            await asyncio.gather(played(caller), played(agent))
            async with httpx.AsyncClient(timeout=120) as client:
                hangups = await asyncio.gather(
                    client.delete(caller_url, headers=AUTH), client.delete(agent_url, headers=AUTH)
                )
            assert [r.status_code for r in hangups] == [200, 200]
        events = await read_call_events(redis, key_prefix, "web-call-1", timeout=30)
        sample = await scrape(svc)

    assert [e.type for e in events].count(EventType.CALL_ENDED) == 1
    legs = {e.leg: e for e in events if e.type == EventType.LEG_STARTED}
    assert set(legs) == {"caller", "agent"}
    assert legs["caller"].meta["campaign"] == "spring"
    assert legs["agent"].meta["transport"] == "webrtc"
    for leg, clip in (("caller", caller_clip), ("agent", agent_clip)):
        heard = finals_text(events, leg)
        # Real speech got through the WebRTC path (the engine's accuracy is benched elsewhere;
        # one word of an 8-word clip is 12.5% WER).
        assert jiwer.wer(clip.reference, heard) < 0.75, f"{leg} heard {heard!r}, said {clip.reference!r}"
        ended = next(e for e in events if e.type == EventType.LEG_ENDED and e.leg == leg)
        assert ended.meta["reason"] == "hangup"
        # The whole WAV reached the engine: its length, give or take the jitter buffer's start.
        wav_ms = 1000 * (clip.seconds + 1.7)
        assert wav_ms - 400 <= ended.meta["audio_ms"] <= wav_ms + 400, (leg, ended.meta, wav_ms)

    # Metrics moved by what the call carried.
    audio_ms = sum(e.meta["audio_ms"] for e in events if e.type == EventType.LEG_ENDED)
    assert sample("callscribe_audio_seconds_total") == pytest.approx(audio_ms / 1000, abs=0.01)
    frames = sample("callscribe_packets_received_total", transport="webrtc")
    assert frames == pytest.approx(audio_ms / 20, rel=0.05)  # one 20 ms Opus frame per packet
    assert sample("callscribe_packets_dropped_total", transport="webrtc", reason="lost") == 0
    for kind in (EventType.PARTIAL, EventType.FINAL, EventType.LEG_STARTED, EventType.CALL_ENDED):
        # Distinct (leg, seq): delivery is at-least-once, a retried write may store an entry twice.
        stored = len({(e.leg, e.seq) for e in events if e.type == kind})
        assert sample("callscribe_events_published_total", type=str(kind)) == stored, kind
    timed_finals = sum(1 for e in events if e.type == EventType.FINAL and e.latency_ms is not None)
    assert timed_finals > 0
    assert sample("callscribe_final_latency_seconds_count") == timed_finals
    assert sample("callscribe_active_calls") == 0
    assert sample("callscribe_active_legs") == 0


async def test_whip_requires_the_bearer_token(make_service: ServiceFactory, tmp_path: Path) -> None:
    async with make_service(whip_token=TOKEN) as svc, httpx.AsyncClient(timeout=10) as client:
        url = f"http://127.0.0.1:{svc.http_port}/whip"
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
            reply = await client.post(
                url, content="v=0\r\n", headers={"Content-Type": "application/sdp", **headers}
            )
            assert reply.status_code == 401, (headers, reply.text)
            assert reply.headers["www-authenticate"].startswith("Bearer")
        reply = await client.delete(f"{url}/anything")
        assert reply.status_code == 401
        assert not svc.registry.legs


async def test_whip_rejects_bad_requests_without_harm(
    make_service: ServiceFactory, key_prefix: str, tmp_path: Path
) -> None:
    async with make_service(whip_token=TOKEN) as svc, httpx.AsyncClient(timeout=10) as client:
        url = f"http://127.0.0.1:{svc.http_port}/whip"
        sdp = {"Content-Type": "application/sdp", **AUTH}
        video_only = await _offer(audio=False)
        recv_only = await _offer(audio=True, direction="recvonly")
        cases = [
            ({"Content-Type": "application/json", **AUTH}, "{}", {}, 415),
            (sdp, "this is not SDP", {}, 400),
            (sdp, "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n", {}, 400),
            (sdp, video_only, {}, 400),
            (sdp, recv_only, {}, 400),
            (sdp, "v=0\r\n" + "a=x\r\n" * 20000, {}, 413),
            (sdp, recv_only, {"call_id": "bad id with spaces"}, 400),
            (sdp, recv_only, {"leg": "caller,caller"}, 400),
        ]
        for headers, body, params, status in cases:
            reply = await client.post(url, content=body, headers=headers, params=params)
            assert reply.status_code == status, (body[:40], params, reply.text)
            assert reply.json()["error"]
        assert (await client.patch(f"{url}/x", headers=AUTH)).status_code == 405
        assert (await client.delete(f"{url}/no-such-session", headers=AUTH)).status_code == 404
        assert (await client.options(url)).headers["accept-post"] == "application/sdp"
        assert not svc.registry.legs and not svc.whip.sessions
        assert (await client.get(f"http://127.0.0.1:{svc.http_port}/healthz")).status_code == 200


async def test_a_second_session_for_an_open_leg_is_refused(
    make_service: ServiceFactory, redis: aioredis.Redis, key_prefix: str, tmp_path: Path
) -> None:
    wav = speech_wav(tmp_path / "caller.wav", load_clip("librivox-0880"))
    async with make_service(whip_token=TOKEN) as svc:
        base = f"http://127.0.0.1:{svc.http_port}"
        async with whip_peer(base, wav, "web-call-2", "caller") as (_player, resource):
            offer = await _offer(audio=True)
            async with httpx.AsyncClient(timeout=120) as client:
                reply = await client.post(
                    f"{base}/whip",
                    params={"call_id": "web-call-2", "leg": "caller"},
                    content=offer,
                    headers={"Content-Type": "application/sdp", **AUTH},
                )
                assert reply.status_code == 409, reply.text
                assert len(svc.whip.sessions) == 1
                assert (await client.delete(resource, headers=AUTH)).status_code == 200
                assert (await client.delete(resource, headers=AUTH)).status_code == 404
        events = await read_call_events(redis, key_prefix, "web-call-2", timeout=30)
    assert next(e.type for e in events if e.leg == "caller") == EventType.LEG_STARTED
    assert sum(1 for e in events if e.type == EventType.LEG_STARTED) == 1


async def _offer(audio: bool, direction: str = "sendonly") -> str:
    """A real SDP offer from aiortc: one audio m-line (with `direction`) or one video m-line."""
    pc = RTCPeerConnection()
    try:
        pc.addTransceiver("audio" if audio else "video", direction=direction)
        await pc.setLocalDescription(await pc.createOffer())
        return str(pc.localDescription.sdp)
    finally:
        await pc.close()


async def test_video_is_declined_and_a_vanished_peer_ends_its_leg(
    make_service: ServiceFactory, redis: aioredis.Redis, key_prefix: str, tmp_path: Path
) -> None:
    wav = speech_wav(tmp_path / "caller.wav", load_clip("librivox-0880"))
    async with make_service(whip_token=TOKEN, leg_idle_timeout_sec=2.0) as svc:
        pc = RTCPeerConnection()
        player = MediaPlayer(str(wav))
        assert player.audio is not None
        pc.addTransceiver(player.audio, direction="sendonly")
        pc.addTransceiver("video", direction="sendonly")
        await pc.setLocalDescription(await pc.createOffer())
        async with httpx.AsyncClient(timeout=10) as client:
            reply = await client.post(
                f"http://127.0.0.1:{svc.http_port}/whip?call_id=web-call-3",
                content=pc.localDescription.sdp,
                headers={"Content-Type": "application/sdp", **AUTH},
            )
        assert reply.status_code == 201, reply.text
        video = reply.text[reply.text.index("m=video") :]
        assert "a=inactive" in video
        await pc.setRemoteDescription(RTCSessionDescription(reply.text, "answer"))
        await asyncio.sleep(1.5)
        await pc.close()  # gone, without DELETE
        events = await read_call_events(redis, key_prefix, "web-call-3", timeout=20)
        assert not svc.whip.sessions
    ended = next(e for e in events if e.type == EventType.LEG_ENDED)
    assert ended.leg == "caller" and ended.meta["reason"] in (
        "track_ended",
        "idle_timeout",
        "connection_closed",
    )
