"""Real calls end to end: ffmpeg sends RTP, the bridge transcribes, the words are read back from Redis."""

from __future__ import annotations

import asyncio
import shutil
from typing import Any

import httpx
import jiwer
import pytest
import redis.asyncio as aioredis

from callscribe.events import EventType
from tests.support import CLIPS, Clip, ServiceFactory, finals_text, load_clip, read_call_events

pytestmark = pytest.mark.skipif(
    shutil.which("ffmpeg") is None, reason="ffmpeg is not installed (make test installs it)"
)

# ffmpeg arguments per callscribe codec: what a PBX or SBC would put on the wire.
FFMPEG_CODECS: dict[str, list[str]] = {
    "pcmu": ["-ar", "8000", "-acodec", "pcm_mulaw"],
    "pcma": ["-ar", "8000", "-acodec", "pcm_alaw"],
    "l16": ["-ar", "16000", "-acodec", "pcm_s16be"],
    "opus": ["-ar", "48000", "-acodec", "libopus", "-b:a", "32k"],
}


async def ffmpeg_rtp(clip: Clip, port: int, codec: str) -> None:
    """Send the clip as one real-time RTP stream, exactly as the issue's reference command does."""
    proc = await asyncio.create_subprocess_exec(
        "ffmpeg", "-hide_banner", "-loglevel", "error", "-re", "-i", str(clip.path), "-ac", "1",
        *FFMPEG_CODECS[codec], "-f", "rtp", f"rtp://127.0.0.1:{port}",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await proc.communicate()
    assert proc.returncode == 0, f"ffmpeg failed: {stderr.decode()}"


async def transcribe_call(
    service: Any, redis: aioredis.Redis, call_id: str, legs: dict[str, tuple[Clip, str]]
) -> list[Any]:
    """Reserve one RTP leg per entry, stream them concurrently with ffmpeg, hang up, return the events."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{service.http_port}", timeout=120) as http:
        reserved = {}
        for leg, (_clip, codec) in legs.items():
            reply = await http.post("/v1/legs", json={"call_id": call_id, "leg": leg, "codec": codec})
            assert reply.status_code == 201, reply.text
            reserved[leg] = reply.json()
        await asyncio.gather(
            *(ffmpeg_rtp(clip, reserved[leg]["rtp_port"], codec) for leg, (clip, codec) in legs.items())
        )
        replies = await asyncio.gather(*(http.delete(f"/v1/legs/{r['leg_id']}") for r in reserved.values()))
        for reply in replies:
            assert reply.status_code == 204, reply.text
    return await read_call_events(redis, service.settings.key_prefix, call_id, until=EventType.CALL_ENDED)


async def corpus_wer(make_service: ServiceFactory, redis: aioredis.Redis, codec: str) -> float:
    clips = [load_clip(name) for name in CLIPS]
    hypotheses = []
    async with make_service() as service:
        for clip in clips:
            events = await transcribe_call(
                service, redis, f"wer-{codec}-{clip.name}", {"caller": (clip, codec)}
            )
            hypotheses.append(finals_text(events))
    wer = float(jiwer.wer([c.reference for c in clips], hypotheses))
    print(f"\n{codec}: WER {wer:.3f}")
    for clip, hypothesis in zip(clips, hypotheses, strict=True):
        print(f"  {clip.name}: {hypothesis!r}")
    return wer


async def test_ulaw_calls_are_transcribed_and_16k_l16_is_no_worse(
    make_service: ServiceFactory, redis: aioredis.Redis
) -> None:
    ulaw = await corpus_wer(make_service, redis, "pcmu")
    l16 = await corpus_wer(make_service, redis, "l16")
    assert ulaw <= 0.50
    # Wideband audio must not lose to the phone path: if it did, resampling would be wrong.
    assert l16 <= ulaw


@pytest.mark.parametrize("codec", ["pcma", "opus"])
async def test_other_codecs_transcribe(
    make_service: ServiceFactory, redis: aioredis.Redis, codec: str
) -> None:
    clip = load_clip("librivox-0890")
    async with make_service() as service:
        events = await transcribe_call(service, redis, f"codec-{codec}", {"caller": (clip, codec)})
    wer = jiwer.wer(clip.reference, finals_text(events))
    print(f"{codec}: WER {wer:.3f} {finals_text(events)!r}")
    assert wer <= 0.5


async def test_two_legs_of_one_call_are_transcribed_separately(
    make_service: ServiceFactory, redis: aioredis.Redis
) -> None:
    caller, agent = load_clip("librivox-0870"), load_clip("librivox-0890")
    async with make_service() as service:
        events = await transcribe_call(
            service, redis, "two-legs", {"caller": (caller, "pcmu"), "agent": (agent, "pcma")}
        )
    assert jiwer.wer(caller.reference, finals_text(events, "caller")) <= 0.5
    assert jiwer.wer(agent.reference, finals_text(events, "agent")) <= 0.5
    kinds = [(e.type, e.leg) for e in events]
    assert kinds.count((EventType.CALL_STARTED, "")) == 1
    assert kinds.count((EventType.CALL_ENDED, "")) == 1
    for leg in ("caller", "agent"):
        assert (EventType.LEG_STARTED, leg) in kinds and (EventType.LEG_ENDED, leg) in kinds
        seqs = [e.seq for e in events if e.leg == leg]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), f"{leg} events out of order: {seqs}"
    # Each leg's partials come before its final of the same utterance.
    for leg in ("caller", "agent"):
        leg_events = [e for e in events if e.leg == leg]
        finals = [e for e in leg_events if e.type == EventType.FINAL]
        partials = [e for e in leg_events if e.type == EventType.PARTIAL]
        assert finals and partials
        for final in finals:
            assert all(p.seq < final.seq for p in partials if p.utt == final.utt)
