"""How a fork's socket ends decides the leg's end reason. chan_websocket has no stop message:
Asterisk hangs up by closing the websocket (close frame), so that is "hangup"; a connection
that drops without a close frame is "disconnect". Dialects with a stop message keep
"disconnect" for a close without it. (tests/lab checks the same against a real Asterisk.)"""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import connect

from callscribe.events import EventType
from tests.fork_senders import asterisk_websocket_stream, encoded_frames, replay, twilio_stream
from tests.support import ServiceFactory, read_call_events

SILENCE = encoded_frames(np.zeros(8000, dtype=np.int16), 8000, "pcmu")  # 1 s


@pytest.mark.parametrize(("abort", "reason"), [(False, "hangup"), (True, "disconnect")])
async def test_asterisk_close_frame_is_its_hangup(
    make_service: ServiceFactory, redis: aioredis.Redis, key_prefix: str, abort: bool, reason: str
) -> None:
    channel_id = f"{uuid.uuid4().int % 10**10}.1"
    async with make_service() as svc:
        ws = await connect(f"ws://127.0.0.1:{svc.http_port}/fork/asterisk", subprotocols=["media"])  # type: ignore[list-item]
        await replay(ws.send, asterisk_websocket_stream(channel_id, SILENCE)[:-1], 0.002)
        if abort:
            ws.transport.abort()  # no close frame: the PBX vanished
        else:
            await ws.close(code=1000)  # what chan_websocket's webchan_hangup() sends
        events = await read_call_events(redis, key_prefix, channel_id, timeout=60)
    [ended] = [e for e in events if e.type == EventType.LEG_ENDED]
    assert ended.meta["reason"] == reason


async def test_twilio_close_without_stop_is_still_a_disconnect(
    make_service: ServiceFactory, redis: aioredis.Redis, key_prefix: str
) -> None:
    call_sid = "CA" + uuid.uuid4().hex
    async with make_service() as svc:
        async with connect(f"ws://127.0.0.1:{svc.http_port}/fork/twilio") as ws:
            await replay(ws.send, twilio_stream(call_sid, SILENCE)[:-1], 0.002)  # no "stop"
        events = await read_call_events(redis, key_prefix, call_sid, timeout=60)
    [ended] = [e for e in events if e.type == EventType.LEG_ENDED]
    assert ended.meta["reason"] == "disconnect"
