"""Asterisk AudioSocket end to end: a raw TCP client sends what AudioSocket() sends."""

from __future__ import annotations

import asyncio
import struct
import uuid

import redis.asyncio as aioredis

from callscribe.events import EventType
from tests.fork_senders import assert_heard, at_rate, audiosocket_stream, with_silence
from tests.scripted_engine import ScriptedEngine
from tests.support import ServiceFactory, finals_text, load_clip, read_call_events

# Other test runs share the 2 cores: a leg's last final can take a while to decode.
LOADED_MACHINE_S = 180


async def send_tcp(
    port: int, frames: list[bytes], interval_s: float, tiny_writes: bool = False, close_abruptly: bool = False
) -> None:
    """Send one frame per `interval_s` (0.02: real time, the pace the engine is built for).
    With `tiny_writes` each frame goes out as writes of 1..7 bytes, so headers and payloads
    reach the server cut at many places."""
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    loop = asyncio.get_running_loop()
    begin = loop.time()
    size = 0
    for index, frame in enumerate(frames):
        if tiny_writes:
            at = 0
            while at < len(frame):
                size = size % 7 + 1
                writer.write(frame[at : at + size])
                await writer.drain()
                at += size
        else:
            writer.write(frame)
            await writer.drain()
        delay = begin + (index + 1) * interval_s - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
    if close_abruptly:
        writer.transport.abort()
        return
    writer.close()
    await writer.wait_closed()


async def test_audiosocket_call_at_real_time(
    make_service: ServiceFactory, redis: aioredis.Redis, key_prefix: str
) -> None:
    clip = load_clip("librivox-0890")
    call = uuid.uuid4()
    async with make_service() as svc:
        frames = audiosocket_stream(call, with_silence(at_rate(clip, 8000), 8000), digits="42")
        await send_tcp(svc.audiosocket.port, frames, 0.02)
        events = await read_call_events(redis, key_prefix, str(call), timeout=LOADED_MACHINE_S)
    legs = {e.leg for e in events if e.type == EventType.LEG_STARTED}
    assert legs == {"caller"}
    assert [e.text for e in events if e.type == EventType.DTMF] == ["4", "2"]
    ended = next(e for e in events if e.type == EventType.LEG_ENDED)
    assert ended.meta["reason"] == "hangup"
    assert_heard(finals_text(events, "caller"), clip.reference)


async def test_frames_split_into_tiny_segments_and_abrupt_disconnect(
    make_service: ServiceFactory, redis: aioredis.Redis, key_prefix: str
) -> None:
    clip = load_clip("librivox-0890")
    call = uuid.uuid4()
    async with make_service() as svc:
        frames = audiosocket_stream(call, with_silence(at_rate(clip, 8000), 8000))[:-1]  # no hangup
        # Every frame in writes of 1..7 bytes, then the peer vanishes in the middle of a frame
        # (a close between whole frames is how Asterisk hangs up: tested in tests/lab).
        frames[-1] = frames[-1][: len(frames[-1]) // 2]
        await send_tcp(svc.audiosocket.port, frames, 0.02, tiny_writes=True, close_abruptly=True)
        events = await read_call_events(redis, key_prefix, str(call), timeout=LOADED_MACHINE_S)
    ended = next(e for e in events if e.type == EventType.LEG_ENDED)
    assert ended.meta["reason"] == "disconnect"
    assert_heard(finals_text(events, "caller"), clip.reference)


async def test_garbage_connections_do_not_disturb_a_call(
    make_service: ServiceFactory, redis: aioredis.Redis, key_prefix: str
) -> None:
    clip = load_clip("librivox-0890")
    call = uuid.uuid4()
    async with make_service() as svc:
        port = svc.audiosocket.port
        good = asyncio.create_task(
            send_tcp(port, audiosocket_stream(call, with_silence(at_rate(clip, 8000), 8000)), 0.02)
        )
        # Audio before the UUID: refused.
        await send_tcp(port, [struct.pack("!BH", 0x10, 4) + b"\x00" * 4], 0.0)
        # An HTTP request on the AudioSocket port: refused.
        await send_tcp(port, [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"], 0.0)
        # A valid call with unknown kinds and an empty audio frame: dropped, counted.
        other = uuid.uuid4()
        odd = [struct.pack("!BH", 0x01, 16) + other.bytes, struct.pack("!BH", 0x42, 2) + b"??",
               struct.pack("!BH", 0x10, 0), struct.pack("!BH", 0x00, 0)]  # fmt: skip
        await send_tcp(port, odd, 0.0)
        await good
        events = await read_call_events(redis, key_prefix, str(call), timeout=LOADED_MACHINE_S)
        assert svc.metrics.dropped("audiosocket", "protocol_error") == 2
        assert svc.metrics.dropped("audiosocket", "unknown_kind") == 1
        assert svc.metrics.dropped("audiosocket", "empty") == 1
    assert_heard(finals_text(events, "caller"), clip.reference)


async def test_duplicate_uuid_and_connection_limit(make_service: ServiceFactory) -> None:
    call = uuid.uuid4()
    async with make_service(engine=ScriptedEngine(), fork_max_connections_per_source=2) as svc:
        port = svc.audiosocket.port
        first = await asyncio.open_connection("127.0.0.1", port)
        first[1].write(struct.pack("!BH", 0x01, 16) + call.bytes)
        await first[1].drain()
        # Same UUID again while the first is live: refused with a hangup frame.
        second = await asyncio.open_connection("127.0.0.1", port)
        second[1].write(struct.pack("!BH", 0x01, 16) + call.bytes)
        await second[1].drain()
        assert await asyncio.wait_for(second[0].read(), 5) == b"\x00\x00\x00"
        second[1].close()
        # Two connections from one source are the limit: a third is closed at once.
        holder = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(0.1)
        third = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(third[0].read(), 5) == b""
        assert svc.metrics.dropped("audiosocket", "connection_limit") == 1
        assert svc.metrics.dropped("audiosocket", "refused") == 1
        for _reader, writer in (first, holder, third):
            writer.close()


async def test_shutdown_ends_open_calls_with_their_last_final(
    make_service: ServiceFactory, redis: aioredis.Redis, key_prefix: str
) -> None:
    clip = load_clip("librivox-0890")
    call = uuid.uuid4()
    frames = audiosocket_stream(call, at_rate(clip, 8000))[:-1]  # Asterisk never hangs up
    async with make_service() as svc:
        _reader, writer = await asyncio.open_connection("127.0.0.1", svc.audiosocket.port)
        for frame in frames:
            writer.write(frame)
            await writer.drain()
            await asyncio.sleep(0.02)
    # The service has stopped while the socket was still open.
    events = await read_call_events(redis, key_prefix, str(call), timeout=LOADED_MACHINE_S)
    writer.close()
    ended = next(e for e in events if e.type == EventType.LEG_ENDED)
    assert ended.meta["reason"] == "shutdown"
    assert_heard(finals_text(events, "caller"), clip.reference)
