"""examples/consumer.py against real Redis and the real publisher: a consumer is SIGKILLed
mid-stream, another claims its pending finals with XAUTOCLAIM; every final is processed
exactly once (a duplicate entry, as an at-least-once retry writes, changes nothing), and an
ended call's transcript is rebuilt from its stream."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis

from callscribe.events import EventType, TranscriptEvent
from callscribe.metrics import Metrics
from callscribe.publish.redis_streams import RedisStreamsPublisher
from callscribe.settings import Settings
from tests.support import REDIS_URL

sys.path.insert(0, str(Path(__file__).parents[2] / "examples"))
from consumer import FinalsConsumer, rebuild

CALLS = 3
FINALS_PER_CALL = 100


async def publish_calls(prefix: str) -> None:
    publisher = RedisStreamsPublisher(Settings(redis_url=REDIS_URL, key_prefix=prefix), Metrics())
    await publisher.start()
    for c in range(CALLS):
        call_id = f"qa-{c}"
        publisher.publish(TranscriptEvent(EventType.CALL_STARTED, call_id, seq=1))
        for n in range(FINALS_PER_CALL):
            leg = ("caller", "agent")[n % 2]
            publisher.publish(
                TranscriptEvent(
                    EventType.FINAL, call_id, leg, n + 1, utt=n, text=f"{leg} says {n}",
                    start_ms=n * 3000, end_ms=n * 3000 + 2500,
                )
            )  # fmt: skip
        publisher.publish(TranscriptEvent(EventType.CALL_ENDED, call_id, seq=2))
    assert await publisher.wait_flushed(30)
    await publisher.close()


async def test_a_killed_consumers_finals_are_claimed_and_processed_once(
    redis: aioredis.Redis, key_prefix: str
) -> None:
    example = Path(__file__).parents[2] / "examples" / "consumer.py"
    first = await asyncio.create_subprocess_exec(
        *(sys.executable, str(example), "--redis-url", REDIS_URL, "--prefix", key_prefix),
        *("--group", "qa", "--name", "first", "--min-idle-ms", "500", "--slow-ms", "20"),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert first.stdout is not None and b"consumer first" in await first.stdout.readline()
        await publish_calls(key_prefix)
        async with asyncio.timeout(30):
            while len(await processed(redis, key_prefix)) < 30:  # noqa: ASYNC110 (polling Redis)
                await asyncio.sleep(0.05)
        first.send_signal(signal.SIGKILL)  # mid-batch: it read 50 at a time, 20 ms each
        await first.wait()
    finally:
        if first.returncode is None:
            first.kill()
            await first.wait()
    pending: Any = await redis.xpending(f"{key_prefix}:finals", "qa")
    assert pending["pending"] > 0 and {c["name"] for c in pending["consumers"]} == {"first"}

    client = redis_sync()
    second = FinalsConsumer(client, key_prefix, "qa", "second", min_idle_ms=500)
    second.ensure_group()
    # A retry of the publisher can write an entry twice: a copy of one final, added again.
    entries: Any = client.xrange(f"{key_prefix}:finals", count=1)
    client.xadd(f"{key_prefix}:finals", entries[0][1])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        await asyncio.to_thread(second.run_once, 200)
        done = len(await processed(redis, key_prefix)) >= CALLS * FINALS_PER_CALL
        if done and (await redis.xpending(f"{key_prefix}:finals", "qa"))["pending"] == 0:
            break
    lines = await processed(redis, key_prefix)
    ids = [line.split("@")[0] for line in lines]
    assert len(ids) == len(set(ids)) == CALLS * FINALS_PER_CALL, "a final lost or processed twice"
    assert {line.split("@")[1] for line in lines} == {"first", "second"}
    assert second.duplicates >= 1  # the copy (and any entry `first` processed but did not ack)
    assert (await redis.xpending(f"{key_prefix}:finals", "qa"))["pending"] == 0

    transcript = list(rebuild(client, key_prefix, "qa-1"))
    assert len(transcript) == FINALS_PER_CALL
    assert transcript[0] == (0, "caller", "caller says 0") and transcript[-1][2] == "agent says 99"
    assert [t[0] for t in transcript] == sorted(t[0] for t in transcript)
    client.close()


async def processed(client: aioredis.Redis, prefix: str) -> list[str]:
    """call_id/leg:seq@consumer of every final the group processed (the example's record)."""
    out = []
    for c in range(CALLS):
        out += [f"qa-{c}/{line}" for line in await client.lrange(f"{prefix}:processed:{{qa-{c}}}:qa", 0, -1)]
    return out


def redis_sync() -> redis.Redis:
    return redis.Redis.from_url(REDIS_URL, decode_responses=True)
