"""A two-hour two-leg call, fed faster than real time through the real leg, publisher and
Redis (schema v2): its call stream keeps call.started, every final and call.ended, while
partials stay capped in their own stream."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import redis.asyncio as aioredis

from callscribe.calls import CallRegistry
from callscribe.events import EventType, TranscriptEvent
from callscribe.metrics import Metrics
from callscribe.publish.redis_streams import RedisStreamsPublisher, call_stream_key, partials_stream_key
from callscribe.settings import Settings
from tests.scripted_engine import TimedScriptEngine
from tests.support import REDIS_URL

CALL_SEC = 2 * 3600
CHUNK_SEC = 2
RATE = 8000
UTTERANCE_MS = 4000


async def test_two_hour_call_keeps_every_final(redis: aioredis.Redis, key_prefix: str) -> None:
    settings = Settings(redis_url=REDIS_URL, key_prefix=key_prefix)  # stream_maxlen: the default
    metrics = Metrics()
    engine = TimedScriptEngine(
        ["thank you for calling", "my account number is", "please hold"], UTTERANCE_MS, partial_ms=250
    )
    publisher = RedisStreamsPublisher(settings, metrics)
    await publisher.start()
    try:
        registry = CallRegistry(engine, publisher, metrics)
        legs = [registry.open_leg("long", name, {"label": name}) for name in ("caller", "agent")]
        rng = np.random.default_rng(7)
        chunk = (rng.normal(0, 2000, RATE * CHUNK_SEC)).astype(np.int16)
        for step in range(CALL_SEC // CHUNK_SEC):
            for leg in legs:
                leg.feed(chunk, RATE)
            if step % 50 == 0:
                await asyncio.sleep(0)  # let the sender write
        for leg in legs:
            await leg.close("hangup")
        assert await publisher.wait_flushed(120)
    finally:
        await publisher.close(timeout=10)

    key = call_stream_key(key_prefix, "long")
    raw: Any = await redis.xrange(key)
    events = [TranscriptEvent.from_fields(fields) for _id, fields in raw]
    finals = [e for e in events if e.type == EventType.FINAL]
    # Per leg: one final per whole utterance of the 2 hours, none left open at hangup.
    assert len(finals) == engine.finals == 2 * (CALL_SEC * 1000 // UTTERANCE_MS)
    assert events[0].type == EventType.CALL_STARTED and events[-1].type == EventType.CALL_ENDED
    assert [e.type for e in events].count(EventType.LEG_ENDED) == 2
    for leg in ("caller", "agent"):
        ends = [e.end_ms for e in finals if e.leg == leg]
        assert ends == sorted(ends) and ends[-1] == CALL_SEC * 1000
    assert all(len(e.words) == len(e.text.split()) and e.conf == 0.9 for e in finals)
    partials = partials_stream_key(key_prefix, "long")
    partial_count = await redis.xlen(partials)
    assert 0 < partial_count <= settings.stream_maxlen + 200  # ~ trims whole 100-entry nodes
    call_bytes = await redis.memory_usage(key)
    partial_bytes = await redis.memory_usage(partials) or 0
    print(
        f"\n2 h two-leg call: {len(events)} entries in {key} ({len(finals)} finals), MEMORY USAGE "
        f"{call_bytes} B; {partial_count} partials, MEMORY USAGE {partial_bytes} B"
    )
    assert call_bytes is not None and call_bytes < 8 * 1024 * 1024
