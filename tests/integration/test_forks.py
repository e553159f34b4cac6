"""Media-fork websockets end to end: a real `websockets` client replays each sender's messages."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Subprotocol

from callscribe.bridge.forks.admission import twilio_signature
from callscribe.events import EventType, TranscriptEvent
from tests.fork_senders import (
    assert_heard,
    asterisk_websocket_stream,
    at_rate,
    encoded_frames,
    exotel_stream,
    freeswitch_stereo_stream,
    plivo_stream,
    replay,
    telnyx_stream,
    twilio_stream,
    two_legs,
    with_silence,
)
from tests.support import ServiceFactory, finals_text, load_clip, read_call_events

# The engine is fed at the pace calls happen: a sender much faster than real time would
# outrun the embedded engine's bounded backlog on a busy machine (audio dropped, by design).
REAL_TIME = 0.02
FAST = 0.002  # for streams whose words are not checked

# Other test runs share the 2 cores: a leg's last final can take a while to decode.
LOADED_MACHINE_S = 180


def url(svc: Any, dialect: str, query: str = "") -> str:
    return f"ws://127.0.0.1:{svc.http_port}/fork/{dialect}" + (f"?{query}" if query else "")


def ulaw(clip_name: str) -> list[bytes]:
    return encoded_frames(with_silence(at_rate(load_clip(clip_name), 8000), 8000), 8000, "pcmu")


async def stream(ws: ClientConnection, messages: list[str] | list[str | bytes], interval_s: float) -> None:
    await replay(ws.send, messages, interval_s)


def legs_of(events: list[TranscriptEvent]) -> set[str]:
    return {e.leg for e in events if e.type == EventType.LEG_STARTED}


async def test_freeswitch_stereo_two_legs_real_time_with_transcripts_back(
    make_service: ServiceFactory, redis: aioredis.Redis, key_prefix: str
) -> None:
    caller, agent = load_clip("librivox-0870"), load_clip("librivox-0890")
    left, right = two_legs(with_silence(caller.pcm, 16000), with_silence(agent.pcm, 16000), 16000)
    call_id = str(uuid.uuid4())
    metadata = {"call_id": call_id, "mix": "stereo", "rate": 16000, "transcripts": True, "queue": "sales"}
    async with make_service() as svc:
        async with connect(
            url(svc, "freeswitch"), subprotocols=[Subprotocol("audio.drachtio.org")], compression=None
        ) as ws:
            assert ws.subprotocol == "audio.drachtio.org"
            await stream(ws, freeswitch_stereo_stream(metadata, left, right, 16000), REAL_TIME)
            # After the graceful-shutdown frame the server sends its last finals, then closes.
            replies = [json.loads(m) async for m in ws]
        events = await read_call_events(redis, key_prefix, call_id, timeout=LOADED_MACHINE_S)
    assert legs_of(events) == {"caller", "agent"}
    assert_heard(finals_text(events, "caller"), caller.reference)
    assert_heard(finals_text(events, "agent"), agent.reference)
    # Each leg heard only its own channel: the agent's words are not in the caller's leg.
    assert "selfish" not in finals_text(events, "caller") and "disposed young" not in finals_text(
        events, "agent"
    )
    started = next(e for e in events if e.type == EventType.CALL_STARTED)
    assert started.meta["metadata"]["queue"] == "sales"
    assert all(r["type"] == "transcription" for r in replies)
    finals = [e for e in events if e.type == EventType.FINAL and e.text]
    assert sorted((r["data"]["leg"], r["data"]["text"]) for r in replies) == sorted(
        (e.leg, e.text) for e in finals
    )


async def test_mod_audio_stream_with_permessage_deflate(
    make_service: ServiceFactory, redis: aioredis.Redis, key_prefix: str
) -> None:
    clip = load_clip("librivox-0890")
    call_id = str(uuid.uuid4())
    pcm = with_silence(at_rate(clip, 8000), 8000)
    async with make_service() as svc:
        # mod_audio_stream: no subprotocol, deflate on, metadata names the call, mono 8k from the URL.
        async with connect(url(svc, "freeswitch", "mix=mono&rate=8k"), compression="deflate") as ws:
            assert ws.subprotocol is None
            await ws.send(call_id)
            for start in range(0, pcm.size - 160 + 1, 160):
                await ws.send(pcm[start : start + 160].astype("<i2").tobytes())
                await asyncio.sleep(REAL_TIME)
        events = await read_call_events(redis, key_prefix, call_id, timeout=LOADED_MACHINE_S)
    assert legs_of(events) == {"caller"}
    ended = next(e for e in events if e.type == EventType.LEG_ENDED)
    assert ended.meta["reason"] == "disconnect"
    assert_heard(finals_text(events, "caller"), clip.reference)


async def test_twilio_both_tracks_with_signature(
    make_service: ServiceFactory, redis: aioredis.Redis, key_prefix: str
) -> None:
    call_sid = "CA" + uuid.uuid4().hex
    async with make_service(twilio_auth_token="tw-secret") as svc:
        target = url(svc, "twilio")
        messages = twilio_stream(call_sid, ulaw("librivox-0870"), ulaw("librivox-0890"), {"crm_id": "77"})
        headers = {"X-Twilio-Signature": twilio_signature("tw-secret", target)}
        async with connect(target, additional_headers=headers, compression=None) as ws:
            await stream(ws, messages, REAL_TIME / 2)
            await ws.wait_closed()
        events = await read_call_events(redis, key_prefix, call_sid, timeout=LOADED_MACHINE_S)
    assert legs_of(events) == {"caller", "agent"}
    assert [(e.leg, e.text) for e in events if e.type == EventType.DTMF] == [("caller", "7")]
    started = next(e for e in events if e.type == EventType.CALL_STARTED)
    assert started.meta["custom"] == {"crm_id": "77"} and started.meta["source"] == "twilio"
    assert_heard(finals_text(events, "caller"), load_clip("librivox-0870").reference)
    assert_heard(finals_text(events, "agent"), load_clip("librivox-0890").reference)


@pytest.mark.parametrize(
    "headers",
    [{}, {"X-Twilio-Signature": "bm90IGEgc2lnbmF0dXJl"}],
    ids=["missing", "forged"],
)
async def test_twilio_without_a_valid_signature_is_refused_before_audio(
    make_service: ServiceFactory, redis: aioredis.Redis, key_prefix: str, headers: dict[str, str]
) -> None:
    async with make_service(twilio_auth_token="tw-secret") as svc:
        with pytest.raises(InvalidStatus) as refused:
            async with connect(url(svc, "twilio"), additional_headers=headers):
                pass
        assert refused.value.response.status_code == 403
        assert svc.metrics.dropped("ws-twilio", "auth") == 1
        assert not svc.registry.calls
    assert await redis.exists(f"{key_prefix}:calls") == 0


async def test_fork_token_header_query_and_in_band(
    make_service: ServiceFactory, redis: aioredis.Redis, key_prefix: str
) -> None:
    async with make_service(fork_auth_token="s3cret") as svc:
        for headers in ({"Authorization": "Bearer wrong"}, {}):
            with pytest.raises(InvalidStatus):
                async with connect(url(svc, "freeswitch", "call_id=x"), additional_headers=headers):
                    pass
        with pytest.raises(InvalidStatus):
            async with connect(url(svc, "asterisk", "token=wrong")):
                pass
        # Telnyx-style senders may carry the token in the start message instead.
        refused_call = "CA" + uuid.uuid4().hex
        async with connect(url(svc, "twilio")) as ws:
            await stream(
                ws, twilio_stream(refused_call, ulaw("librivox-0890"), parameters={"token": "nope"})[:2], 0
            )
            with pytest.raises(Exception, match="1008"):
                await ws.recv()
        accepted_call = "CA" + uuid.uuid4().hex
        async with connect(url(svc, "twilio")) as ws:
            messages = twilio_stream(accepted_call, ulaw("librivox-0890"), parameters={"token": "s3cret"})
            await stream(ws, messages, FAST)
            await ws.wait_closed()
        events = await read_call_events(redis, key_prefix, accepted_call, timeout=LOADED_MACHINE_S)
        assert svc.metrics.dropped("ws-freeswitch", "auth") == 2
        assert svc.metrics.dropped("ws-asterisk", "auth") == 1
        assert svc.metrics.dropped("ws-twilio", "auth") == 1
    started = next(e for e in events if e.type == EventType.CALL_STARTED)
    assert "token" not in started.meta["custom"]
    assert await redis.exists(f"{key_prefix}:call:{{{refused_call}}}") == 0


async def test_asterisk_chan_websocket(
    make_service: ServiceFactory, redis: aioredis.Redis, key_prefix: str
) -> None:
    clip = load_clip("librivox-0870")
    async with make_service(fork_auth_token="s3cret") as svc:
        target = url(svc, "asterisk", "call_id=ast-1&leg=caller")
        headers = {"Authorization": "Bearer s3cret"}
        async with connect(target, subprotocols=[Subprotocol("media")], additional_headers=headers) as ws:
            assert ws.subprotocol == "media"
            await stream(ws, asterisk_websocket_stream("1700000000.7", ulaw("librivox-0870")), REAL_TIME)
        events = await read_call_events(redis, key_prefix, "ast-1", timeout=LOADED_MACHINE_S)
    started = next(e for e in events if e.type == EventType.LEG_STARTED)
    assert started.meta["channel_id"] == "1700000000.7" and started.meta["format"] == "ulaw"
    assert [e.text for e in events if e.type == EventType.DTMF] == ["5"]
    assert_heard(finals_text(events, "caller"), clip.reference)


async def test_telnyx_out_of_order_frames(
    make_service: ServiceFactory, redis: aioredis.Redis, key_prefix: str
) -> None:
    clip = load_clip("librivox-0870")
    call_id = "v2:" + uuid.uuid4().hex
    messages = telnyx_stream(call_id, ulaw("librivox-0870"))
    head, media, stop = messages[:2], messages[2:-1], messages[-1:]
    # Swap neighbours and push some frames 3 places later: what a busy network does.
    shuffled = list(media)
    for i in range(0, len(shuffled) - 1, 2):
        shuffled[i], shuffled[i + 1] = shuffled[i + 1], shuffled[i]
    for i in range(5, len(shuffled) - 4, 17):
        shuffled.insert(i + 3, shuffled.pop(i))
    async with make_service() as svc:
        async with connect(url(svc, "telnyx")) as ws:
            await stream(ws, [*head, *shuffled, *stop], REAL_TIME)
            await ws.wait_closed()
        events = await read_call_events(redis, key_prefix, call_id, timeout=LOADED_MACHINE_S)
        assert svc.metrics.dropped("ws-telnyx", "late") == 0
    assert_heard(finals_text(events, "caller"), clip.reference)


async def test_plivo_and_exotel(make_service: ServiceFactory, redis: aioredis.Redis, key_prefix: str) -> None:
    clip = load_clip("librivox-0890")
    plivo_call, exotel_call = str(uuid.uuid4()), "CA" + uuid.uuid4().hex
    async with make_service() as svc:
        async with connect(url(svc, "plivo")) as plivo, connect(url(svc, "exotel")) as exotel:
            await asyncio.gather(
                stream(plivo, plivo_stream(plivo_call, ulaw("librivox-0890")), REAL_TIME),
                stream(
                    exotel, exotel_stream(exotel_call, with_silence(at_rate(clip, 8000), 8000)), REAL_TIME * 5
                ),
            )
        plivo_events = await read_call_events(redis, key_prefix, plivo_call, timeout=LOADED_MACHINE_S)
        exotel_events = await read_call_events(redis, key_prefix, exotel_call, timeout=LOADED_MACHINE_S)
    assert_heard(finals_text(plivo_events, "caller"), clip.reference)
    assert_heard(finals_text(exotel_events, "caller"), clip.reference)
    assert next(e for e in exotel_events if e.type == EventType.CALL_STARTED).meta["custom"] == {
        "campaign": "test"
    }


async def test_bad_input_and_abrupt_disconnect_leave_other_calls_alone(
    make_service: ServiceFactory, redis: aioredis.Redis, key_prefix: str
) -> None:
    good_clip = load_clip("librivox-0870")
    good_call, cut_call = "CA" + uuid.uuid4().hex, "CA" + uuid.uuid4().hex
    async with make_service(fork_max_frame_bytes=4096) as svc:

        async def good() -> None:
            async with connect(url(svc, "twilio")) as ws:
                await stream(ws, twilio_stream(good_call, ulaw("librivox-0870")), REAL_TIME)
                await ws.wait_closed()

        async def hostile() -> None:
            async with connect(url(svc, "twilio")) as ws:
                messages = twilio_stream("CA-hostile", ulaw("librivox-0890"))[:40]
                garbage = [
                    "{not json",
                    "[]",
                    json.dumps({"event": "media", "media": {"track": "inbound", "payload": "!!!notbase64"}}),
                    json.dumps({"event": "media", "media": {"payload": 12}}),
                    json.dumps({"event": "wormhole"}),
                    "x" * 10_000,
                ]
                sequence: list[str | bytes] = [*messages[:3], *garbage, b"\x00\x01", *messages[3:]]
                await stream(ws, sequence, FAST)

        async def cut() -> None:
            ws = await connect(url(svc, "twilio"))
            messages = twilio_stream(cut_call, ulaw("librivox-0870"))
            await stream(ws, messages[: len(messages) // 2], REAL_TIME)
            ws.transport.abort()  # the provider vanishes: no stop, no close frame

        await asyncio.gather(good(), hostile(), cut())
        good_events = await read_call_events(redis, key_prefix, good_call, timeout=LOADED_MACHINE_S)
        cut_events = await read_call_events(redis, key_prefix, cut_call, timeout=LOADED_MACHINE_S)
        for reason in (
            "bad_json",
            "bad_shape",
            "bad_base64",
            "unknown_event",
            "oversized",
            "unexpected_binary",
        ):
            assert svc.metrics.dropped("ws-twilio", reason) >= 1, reason
    assert_heard(finals_text(good_events, "caller"), good_clip.reference)
    ended = next(e for e in cut_events if e.type == EventType.LEG_ENDED)
    assert ended.meta["reason"] == "disconnect"
    # The half of the call that arrived was still transcribed and its last final published.
    assert finals_text(cut_events, "caller")


async def test_connection_limit_per_source(make_service: ServiceFactory) -> None:
    async with make_service(fork_max_connections_per_source=1) as svc:
        async with connect(url(svc, "freeswitch", "call_id=a")):
            with pytest.raises(InvalidStatus) as refused:
                async with connect(url(svc, "freeswitch", "call_id=b")):
                    pass
            assert refused.value.response.status_code == 403
        assert svc.metrics.dropped("ws-freeswitch", "connection_limit") == 1
        # The slot is free again once the first socket has gone.
        await asyncio.sleep(0.2)
        async with connect(url(svc, "freeswitch", "call_id=c")):
            pass


async def test_unsupported_format_closes_with_a_reason(make_service: ServiceFactory) -> None:
    async with make_service() as svc, connect(url(svc, "asterisk")) as ws:
        await ws.send(
            "MEDIA_START connection_id:c channel:WebSocket/x channel_id:1.1 format:gsm optimal_frame_size:33"
        )
        await ws.wait_closed()
        assert ws.close_code == 1003 and "gsm" in (ws.close_reason or "")
