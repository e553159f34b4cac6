"""The Redis Streams publisher against real Redis servers: the schema, trimming, TTL,
order under load, an outage with SIGKILL and restart, the disk spool, and the tail reader."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import subprocess
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from callscribe.events import FIELDS, EventType, TranscriptEvent
from callscribe.metrics import Metrics
from callscribe.publish.redis_streams import (
    RedisStreamsPublisher,
    call_stream_key,
    calls_stream_key,
    finals_stream_key,
    partials_stream_key,
)
from callscribe.publish.tail import follow
from callscribe.settings import Settings
from tests.support import REDIS_URL, free_port

LOGGER = "callscribe.publish.redis_streams"


class RedisProcess:
    """A redis-server of the test's own, to kill and restart. The append-only file is
    fsynced before each reply, so whatever Redis acknowledged survives SIGKILL and the test
    can demand that every final arrives (with `--appendonly no` a kill would also erase
    writes that had succeeded, which no publisher can prevent)."""

    def __init__(self, port: int, workdir: Path) -> None:
        self.port = port
        self.workdir = workdir
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""),
            *("--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.workdir)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = aioredis.from_url(self.url)
        try:
            for _ in range(200):
                try:
                    if await client.ping():
                        return
                except (OSError, aioredis.ConnectionError):
                    await asyncio.sleep(0.05)
            raise RuntimeError(f"redis-server on port {self.port} did not answer within 10 s")
        finally:
            await client.aclose()

    async def entries(self, key: str) -> list[TranscriptEvent]:
        client = aioredis.from_url(self.url, decode_responses=True)
        try:
            return await entries(client, key)
        finally:
            await client.aclose()

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
            async with asyncio.timeout(10):
                await self.process.wait()
        self.process = None


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[RedisProcess]:
    server = RedisProcess(free_port(socket.SOCK_STREAM), tmp_path / "redis")
    server.workdir.mkdir()
    yield server
    await server.kill()


@asynccontextmanager
async def running(settings: Settings, metrics: Metrics | None = None) -> AsyncIterator[RedisStreamsPublisher]:
    publisher = RedisStreamsPublisher(settings, metrics or Metrics())
    await publisher.start()
    try:
        yield publisher
    finally:
        await publisher.close(timeout=5)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def entries(client: aioredis.Redis, key: str) -> list[TranscriptEvent]:
    """The events of `key`; of a call stream, followed by those of its partials stream (two
    streams have no common order: their entry ids are numbered apart)."""
    raw: Any = await client.xrange(key)
    if key.endswith("}"):
        raw = [*raw, *await client.xrange(f"{key}:partials")]
    return [TranscriptEvent.from_fields(fields) for _id, fields in raw]


class Talker:
    """Publishes legs' events in publish order, remembering what it published."""

    def __init__(self, publisher: RedisStreamsPublisher) -> None:
        self.publisher = publisher
        self.seq: dict[tuple[str, str], int] = defaultdict(int)
        self.published: list[TranscriptEvent] = []

    def say(self, kind: EventType, call_id: str, leg: str, **fields: Any) -> TranscriptEvent:
        self.seq[(call_id, leg)] += 1
        event = TranscriptEvent(type=kind, call_id=call_id, leg=leg, seq=self.seq[(call_id, leg)], **fields)
        self.published.append(event)
        self.publisher.publish(event)
        return event

    def of(self, kind: EventType) -> list[TranscriptEvent]:
        return [e for e in self.published if e.type == kind]


def assert_order_and_finals(written: list[TranscriptEvent], published: list[TranscriptEvent]) -> None:
    """Per leg and stream (partials have their own), first occurrences are in publish order (a
    retried batch may repeat entries: consumers dedupe on call_id+leg+seq) and every
    non-partial event is there."""
    first_seen: dict[tuple[str, str, bool], list[int]] = defaultdict(list)
    seen: set[tuple[str, str, int]] = set()
    for event in written:
        identity = (event.call_id, event.leg, event.seq)
        if identity not in seen:
            seen.add(identity)
            first_seen[(event.call_id, event.leg, event.type == EventType.PARTIAL)].append(event.seq)
    for leg, seqs in first_seen.items():
        assert seqs == sorted(seqs), f"leg {leg} out of order: {seqs[:50]}"
    missing = [e for e in published if e.type != EventType.PARTIAL and (e.call_id, e.leg, e.seq) not in seen]
    assert missing == [], f"{len(missing)} non-partial events lost, first {missing[:3]}"


def assert_partials_accounted(
    written: list[TranscriptEvent], published: list[TranscriptEvent], metrics: Metrics
) -> float:
    """Every partial is written or counted as superseded; returns the superseded count."""
    written_partials = {(e.call_id, e.leg, e.seq) for e in written if e.type == EventType.PARTIAL}
    superseded = sample(metrics, "callscribe_events_dropped_total", reason="superseded_partial")
    assert len(written_partials) + superseded == len([e for e in published if e.type == EventType.PARTIAL])
    return superseded


async def test_schema_fields_keys_and_ttl(redis: aioredis.Redis, key_prefix: str) -> None:
    metrics = Metrics()
    settings = Settings(redis_url=REDIS_URL, key_prefix=key_prefix, call_ttl_sec=30)
    call_key = f"{key_prefix}:call:{{call-7}}"
    assert call_stream_key(key_prefix, "call-7") == call_key
    assert calls_stream_key(key_prefix) == f"{key_prefix}:calls"
    assert finals_stream_key(key_prefix) == f"{key_prefix}:finals"
    started = TranscriptEvent(
        EventType.CALL_STARTED, "call-7", seq=1, engine="sphinx", meta={"sip": {"From": "<sip:a@b>"}}
    )
    leg_events = [
        TranscriptEvent(EventType.LEG_STARTED, "call-7", "caller", 1, meta={"codec": "pcmu"}),
        TranscriptEvent(EventType.PARTIAL, "call-7", "caller", 2, utt=0, text="hello wor", stable="hello",
                        unstable="wor", start_ms=120, end_ms=900, lang="en", engine="sphinx", latency_ms=80),
        TranscriptEvent(EventType.FINAL, "call-7", "caller", 3, utt=0, text="hello world é", start_ms=120,
                        end_ms=1500, lang="en", engine="sphinx", latency_ms=210, conf=0.875,
                        words=({"w": "hello", "start_ms": 120, "end_ms": 600, "conf": 0.9},
                               {"w": "world", "start_ms": 600, "end_ms": 1000, "conf": 0.8},
                               {"w": "é", "start_ms": 1000, "end_ms": 1500, "conf": 1.0})),
        TranscriptEvent(EventType.DTMF, "call-7", "caller", 4, text="5", start_ms=1600, end_ms=1700),
        TranscriptEvent(EventType.ERROR, "call-7", "caller", 5, utt=1, text="busy", meta={"code": "x"}),
        TranscriptEvent(EventType.LEG_ENDED, "call-7", "caller", 6, meta={"reason": "bye"}),
    ]  # fmt: skip
    ended = TranscriptEvent(EventType.CALL_ENDED, "call-7", seq=2, meta={"duration_ms": 1800})
    async with running(settings, metrics) as publisher:
        for event in [started, *leg_events]:
            publisher.publish(event)
        assert await publisher.wait_flushed(10)
        assert await redis.ttl(call_key) == -1, "a call stream must not expire before call.ended"
        publisher.publish(ended)
        assert await publisher.wait_flushed(10)
        assert publisher.connected and publisher.buffer_depth == 0

    raw: Any = await redis.xrange(call_key)
    partials: Any = await redis.xrange(partials_stream_key(key_prefix, "call-7"))
    assert partials_stream_key(key_prefix, "call-7") == f"{call_key}:partials"
    assert all(list(fields) == list(FIELDS) for _id, fields in raw + partials)
    assert all(fields["v"] == "2" for _id, fields in raw + partials)
    not_partials = [e for e in leg_events if e.type != EventType.PARTIAL]
    assert [TranscriptEvent.from_fields(fields) for _id, fields in raw] == [started, *not_partials, ended]
    assert [TranscriptEvent.from_fields(fields) for _id, fields in partials] == [leg_events[1]]
    assert raw[2][1]["utt"] == "0" and raw[4][1]["utt"] == "1" and raw[1][1]["start_ms"] == ""
    assert raw[2][1]["conf"] == "0.875" and raw[1][1]["conf"] == "" and raw[1][1]["words"] == "[]"
    assert raw[2][1]["words"].startswith('[{"w":"hello","start_ms":120,"end_ms":600,"conf":0.9}')
    assert await entries(redis, f"{key_prefix}:calls") == [started, ended]
    assert await entries(redis, f"{key_prefix}:finals") == [leg_events[2]]
    assert 0 < await redis.ttl(call_key) <= 30
    assert await redis.ttl(f"{key_prefix}:calls") == -1
    assert await redis.ttl(f"{key_prefix}:finals") == -1
    assert sample(metrics, "callscribe_events_published_total", type="final") == 1
    assert sample(metrics, "callscribe_events_published_total", type="call.started") == 1
    assert sample(metrics, "callscribe_redis_up") == 1


async def test_call_stream_expires_after_call_ended(redis: aioredis.Redis, key_prefix: str) -> None:
    settings = Settings(redis_url=REDIS_URL, key_prefix=key_prefix, call_ttl_sec=1)
    async with running(settings) as publisher:
        publisher.publish(TranscriptEvent(EventType.CALL_STARTED, "c", seq=1))
        publisher.publish(TranscriptEvent(EventType.CALL_ENDED, "c", seq=2))
        assert await publisher.wait_flushed(10)
    key = call_stream_key(key_prefix, "c")
    for _ in range(50):
        if not await redis.exists(key):
            break
        await asyncio.sleep(0.1)
    assert not await redis.exists(key)
    assert await redis.xlen(calls_stream_key(key_prefix)) == 2


async def test_maxlen_trims_partials_and_finals_index_never_the_call(
    redis: aioredis.Redis, key_prefix: str
) -> None:
    settings = Settings(redis_url=REDIS_URL, key_prefix=key_prefix, stream_maxlen=100, finals_maxlen=1000)
    async with running(settings) as publisher:
        talker = Talker(publisher)
        talker.say(EventType.CALL_STARTED, "long-call", "")
        for i in range(1500):
            leg = ("caller", "callee")[i % 2]
            # A partial of a leg of its own: a later event of the same leg would supersede it.
            talker.say(EventType.PARTIAL, "long-call", f"partial-{i}", text=f"utter {i}")
            talker.say(EventType.FINAL, "long-call", leg, text=f"utterance {i}")
            if i % 100 == 0:
                await asyncio.sleep(0)
        assert await publisher.wait_flushed(30)
    call_key = call_stream_key(key_prefix, "long-call")
    # The call stream keeps call.started and every final; only partials are trimmed.
    assert await redis.xlen(call_key) == 1501
    kept = await entries(redis, call_key)
    assert kept[0].type == EventType.CALL_STARTED
    # MAXLEN ~ trims whole radix-tree nodes (100 entries by default): never below the limit.
    assert 100 <= await redis.xlen(partials_stream_key(key_prefix, "long-call")) < 300
    assert 1000 <= await redis.xlen(finals_stream_key(key_prefix)) < 1200
    newest: Any = await redis.xrevrange(call_key, count=1)
    assert TranscriptEvent.from_fields(newest[0][1]) == talker.published[-1]


async def test_order_per_leg_under_load(redis: aioredis.Redis, key_prefix: str) -> None:
    """50 legs x 200 events, interleaved, published while the sender runs."""
    metrics = Metrics()
    settings = Settings(redis_url=REDIS_URL, key_prefix=key_prefix)
    legs = [(f"call-{c}", f"leg-{n}") for c in range(10) for n in range(5)]
    async with running(settings, metrics) as publisher:
        talker = Talker(publisher)
        for step in range(200):
            for call_id, leg in legs:
                kind = EventType.FINAL if step % 5 == 4 else EventType.PARTIAL
                talker.say(kind, call_id, leg, text=f"{leg} says {step}")
            await asyncio.sleep(0)
        assert await publisher.wait_flushed(60)
    written = [e for c in range(10) for e in await entries(redis, call_stream_key(key_prefix, f"call-{c}"))]
    assert_order_and_finals(written, talker.published)
    assert len(written) == len({(e.call_id, e.leg, e.seq) for e in written}), "duplicates without an outage"
    assert_partials_accounted(written, talker.published, metrics)
    finals = await entries(redis, finals_stream_key(key_prefix))
    assert len(finals) == 50 * 40
    assert_order_and_finals(finals, talker.of(EventType.FINAL))


async def talk(talker: Talker, legs: list[str], stop: asyncio.Event) -> None:
    """Partials every 5 ms per leg, a final every 10th event, until stopped."""
    step = 0
    while not stop.is_set():
        for leg in legs:
            kind = EventType.FINAL if step % 10 == 9 else EventType.PARTIAL
            talker.say(kind, "outage-call", leg, text=f"{leg} {step}")
        step += 1
        await asyncio.sleep(0.005)


async def wait_until(condition: Callable[[], bool], what: str, within: float = 10.0) -> None:
    for _ in range(int(within / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not within {within} s: {what}")


async def test_outage_sigkill_and_restart_loses_no_final(
    own_redis: RedisProcess, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    await own_redis.start()
    metrics = Metrics()
    settings = Settings(redis_url=own_redis.url, key_prefix=key_prefix)
    stop = asyncio.Event()
    async with running(settings, metrics) as publisher:
        talker = Talker(publisher)
        speaking = asyncio.create_task(talk(talker, ["caller", "callee", "agent"], stop))
        try:
            await asyncio.sleep(1.0)
            assert publisher.connected
            await own_redis.kill()
            await wait_until(lambda: not publisher.connected, "publisher noticed the outage")
            partials_at_outage = len(talker.of(EventType.PARTIAL))
            await asyncio.sleep(2.0)
            assert sample(metrics, "callscribe_redis_up") == 0
            assert publisher.buffer_depth > 0
            assert sample(metrics, "callscribe_outage_buffer_depth") == publisher.buffer_depth
            published_during_outage = len(talker.published)
            # Counted before the restart: a partial published while the replay runs is
            # written, not coalesced (CI once counted 6 such into "while down").
            partials_while_down = len(talker.of(EventType.PARTIAL)) - partials_at_outage
            await own_redis.start()
            await wait_until(lambda: publisher.connected, "publisher noticed the recovery")
            await asyncio.sleep(0.5)
        finally:
            stop.set()
            await speaking
        assert await publisher.wait_flushed(30)
        assert sample(metrics, "callscribe_redis_up") == 1
        assert sample(metrics, "callscribe_outage_buffer_depth") == 0
        assert sample(metrics, "callscribe_publish_failures_total") >= 1

    written = await own_redis.entries(call_stream_key(key_prefix, "outage-call"))
    finals = await own_redis.entries(finals_stream_key(key_prefix))
    assert len(talker.published) > published_during_outage > 0
    assert_order_and_finals(written, talker.published)
    assert_order_and_finals(finals, talker.of(EventType.FINAL))
    # While Redis was down, partials coalesced to the newest of each of the 3 legs.
    superseded = assert_partials_accounted(written, talker.published, metrics)
    assert superseded >= partials_while_down - 3 > 100
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len([m for m in messages if m.startswith("redis unreachable, buffering")]) == 1, messages
    assert len([m for m in messages if m.startswith("redis back after")]) == 1, messages


async def test_spool_takes_overflow_and_replays_in_order(
    own_redis: RedisProcess, key_prefix: str, tmp_path: Path
) -> None:
    """Redis down from the start: a 10-event buffer spills to disk; all arrives when Redis does."""
    spool_dir = tmp_path / "spool"
    metrics = Metrics()
    settings = Settings(
        redis_url=own_redis.url, key_prefix=key_prefix, outage_buffer_events=10, spool_dir=spool_dir
    )
    async with running(settings, metrics) as publisher:
        assert not publisher.connected
        talker = Talker(publisher)
        for step in range(100):
            for leg in ("caller", "callee", "agent"):
                kind = EventType.FINAL if step % 4 == 3 else EventType.PARTIAL
                talker.say(kind, "spooled-call", leg, text=f"{leg} {step}")
            await asyncio.sleep(0)
        assert list(spool_dir.glob("*.jsonl")), "overflow went to the spool"
        assert publisher.buffer_depth > 10
        assert sample(metrics, "callscribe_outage_buffer_depth") == publisher.buffer_depth
        await own_redis.start()
        assert await publisher.wait_flushed(30)
    written = await own_redis.entries(call_stream_key(key_prefix, "spooled-call"))
    assert_order_and_finals(written, talker.published)
    assert_partials_accounted(written, talker.published, metrics)
    assert list(spool_dir.glob("*.jsonl")) == []


async def test_close_while_down_spools_and_next_start_replays(
    own_redis: RedisProcess, key_prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    """The batch in flight, the overflow spool and memory all go to disk, in that order."""
    settings = Settings(
        redis_url=own_redis.url, key_prefix=key_prefix, spool_dir=tmp_path / "spool", outage_buffer_events=10
    )
    first = RedisStreamsPublisher(settings, Metrics())
    await first.start()
    talker = Talker(first)
    for step in range(50):
        talker.say(EventType.FINAL, "restarted-call", "caller", text="kept")
        if step == 0:
            await asyncio.sleep(0.1)  # the sender takes the first event and fails to write it
    await first.close(timeout=0.3)
    assert any("spooled" in r.getMessage() for r in caplog.records if r.name == LOGGER)
    assert list((tmp_path / "spool").glob("*.jsonl"))

    await own_redis.start()
    async with running(settings) as second:
        talker.publisher = second
        for _ in range(5):
            talker.say(EventType.FINAL, "restarted-call", "caller", text="after restart")
        assert await second.wait_flushed(30)
    written = await own_redis.entries(call_stream_key(key_prefix, "restarted-call"))
    assert [e.seq for e in written] == list(range(1, 56))


async def test_close_while_down_without_spool_counts_and_logs_the_loss(
    own_redis: RedisProcess, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    metrics = Metrics()
    publisher = RedisStreamsPublisher(Settings(redis_url=own_redis.url, key_prefix=key_prefix), metrics)
    await publisher.start()
    for seq in range(1, 8):
        publisher.publish(TranscriptEvent(EventType.FINAL, "lost-call", "caller", seq))
    await publisher.close(timeout=0.3)
    assert sample(metrics, "callscribe_events_dropped_total", reason="shutdown") == 7
    errors = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.ERROR]
    assert any(m.startswith("LOST 7 events") for m in errors), errors


async def test_follow_discovers_calls_and_follows_each_stream(redis: aioredis.Redis, key_prefix: str) -> None:
    settings = Settings(redis_url=REDIS_URL, key_prefix=key_prefix)
    seen: list[TranscriptEvent] = []

    async def watch(call_id: str | None, until_ended: int) -> list[TranscriptEvent]:
        events: list[TranscriptEvent] = []
        async with aclosing(follow(redis, key_prefix, call_id)) as stream:
            async for _entry_id, event in stream:
                events.append(event)
                if len([e for e in events if e.type == EventType.CALL_ENDED]) == until_ended:
                    return events
        raise AssertionError("follow() ended by itself")

    all_calls = asyncio.create_task(watch(None, 2))
    one_call = asyncio.create_task(watch("b", 1))
    await asyncio.sleep(0.3)  # both readers are blocked in XREAD now
    async with running(settings) as publisher:
        talker = Talker(publisher)
        for call_id in ("a", "b"):
            talker.say(EventType.CALL_STARTED, call_id, "")
        for i in range(20):
            for call_id in ("a", "b"):
                talker.say(EventType.FINAL if i % 2 else EventType.PARTIAL, call_id, "caller", text=str(i))
            await asyncio.sleep(0.01)
        for call_id in ("a", "b"):
            talker.say(EventType.CALL_ENDED, call_id, "")
        assert await publisher.wait_flushed(10)
    async with asyncio.timeout(10):
        seen = await all_calls
        only_b = await one_call
    for call_id in ("a", "b"):
        mine = [e for e in seen if e.call_id == call_id]
        assert mine[0].type == EventType.CALL_STARTED and mine[-1].type == EventType.CALL_ENDED
        assert_order_and_finals(mine, [e for e in talker.published if e.call_id == call_id])
    assert len(seen) == len({(e.call_id, e.leg, e.seq) for e in seen}), "an entry was yielded twice"
    assert only_b == [e for e in seen if e.call_id == "b"]


async def test_slow_redis_coalesces_partials_without_an_outage(
    own_redis: RedisProcess, key_prefix: str
) -> None:
    """CLIENT PAUSE holds every write for 1.5 s: events queue behind the batch in flight,
    partials coalesce, nothing fails and nothing is lost."""
    await own_redis.start()
    metrics = Metrics()
    stop = asyncio.Event()
    admin = aioredis.from_url(own_redis.url)
    try:
        async with running(Settings(redis_url=own_redis.url, key_prefix=key_prefix), metrics) as publisher:
            talker = Talker(publisher)
            speaking = asyncio.create_task(talk(talker, ["caller", "callee"], stop))
            try:
                await asyncio.sleep(0.3)
                await admin.execute_command("CLIENT", "PAUSE", 1500, "WRITE")
                await asyncio.sleep(1.0)
                assert publisher.buffer_depth > 0
                assert publisher.connected
                await asyncio.sleep(1.0)
            finally:
                stop.set()
                await speaking
            assert await publisher.wait_flushed(30)
    finally:
        await admin.aclose()
    written = await own_redis.entries(call_stream_key(key_prefix, "outage-call"))
    assert_order_and_finals(written, talker.published)
    assert assert_partials_accounted(written, talker.published, metrics) > 50
    assert sample(metrics, "callscribe_publish_failures_total") == 0
    assert sample(metrics, "callscribe_redis_up") == 1
