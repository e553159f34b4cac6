"""Events per second into Redis: the publisher's batched sender vs one awaited XADD per event.

Both write the same finals (50 legs interleaved, each to its call stream and the finals
stream) to the local Redis, side by side, under unique key prefixes deleted afterwards.
The ratio is what matters on a shared machine; absolute numbers move with its load.

    .venv/bin/python bench/publish.py [--events 20000] [--redis redis://127.0.0.1:6379/0]
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

import redis.asyncio as aioredis

from callscribe.events import EventType, TranscriptEvent
from callscribe.metrics import Metrics
from callscribe.publish.redis_streams import RedisStreamsPublisher, call_stream_key, finals_stream_key
from callscribe.settings import Settings

LEGS = 50


def finals(count: int) -> list[TranscriptEvent]:
    return [
        TranscriptEvent(
            type=EventType.FINAL,
            call_id=f"bench-call-{i % LEGS // 2}",
            leg=("caller", "callee")[i % 2],
            seq=i // LEGS + 1,
            utt=i // LEGS,
            text="the quick brown fox jumps over the lazy dog " * 2,
            start_ms=i * 10,
            end_ms=i * 10 + 2000,
            lang="en",
            engine="sphinx",
            latency_ms=250,
        )
        for i in range(count)
    ]


async def publisher_rate(url: str, events: list[TranscriptEvent], prefix: str) -> float:
    settings = Settings(redis_url=url, key_prefix=prefix)  # type: ignore[call-arg]
    publisher = RedisStreamsPublisher(settings, Metrics())
    await publisher.start()
    started = time.perf_counter()
    for index, event in enumerate(events):
        publisher.publish(event)
        if index % 100 == 99:
            await asyncio.sleep(0)  # legs publish from many callbacks, not one loop
    if not await publisher.wait_flushed(120):
        raise RuntimeError("publisher did not flush within 120 s")
    elapsed = time.perf_counter() - started
    await publisher.close()
    return len(events) / elapsed


async def naive_rate(url: str, events: list[TranscriptEvent], prefix: str) -> float:
    client = aioredis.from_url(url)
    started = time.perf_counter()
    for event in events:
        fields = event.to_fields()
        await client.xadd(call_stream_key(prefix, event.call_id), fields, maxlen=10_000)  # type: ignore[arg-type]
        await client.xadd(finals_stream_key(prefix), fields, maxlen=1_000_000)  # type: ignore[arg-type]
    elapsed = time.perf_counter() - started
    await client.aclose()
    return len(events) / elapsed


async def cleanup(url: str, prefixes: list[str]) -> None:
    client = aioredis.from_url(url)
    for prefix in prefixes:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await client.delete(*keys)
    await client.aclose()


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    events = finals(args.events)
    prefixes = [f"bench-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    try:
        batched = await publisher_rate(args.redis, events, prefixes[0])
        naive = await naive_rate(args.redis, events, prefixes[1])
    finally:
        await cleanup(args.redis, prefixes)
    print(f"publisher (batched pipeline): {batched:10.0f} events/s")
    print(f"one awaited XADD per event:   {naive:10.0f} events/s")
    print(f"ratio: {batched / naive:.1f}x")


if __name__ == "__main__":
    asyncio.run(main())
