"""callscribe against a real Redis Cluster (issue 14 item 5): 3 masters + 3 replicas from
Debian's redis-server, selected with a `redis+cluster://` URL.

One call's events are published by the real publisher (with its outage buffer and spool)
while `callscribe tail` follows every call and the dashboard streams the call; mid-call the
master serving the call's hash slot is SIGKILLed and its replica takes over (cluster-node-
timeout 1 s). Every final published must be in Redis afterwards, in the call's stream and in
the finals stream, and `tail` must have printed every one of them.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from callscribe.events import EventType, TranscriptEvent
from callscribe.metrics import Metrics
from callscribe.publish.connect import connect
from callscribe.publish.redis_streams import RedisStreamsPublisher, call_stream_key, finals_stream_key
from callscribe.settings import Settings
from callscribe.web.dashboard import Dashboard
from tests.lab.peers import RedisClusterLab, key_slot

pytestmark = pytest.mark.lab

FINALS_BEFORE_KILL = 10
FINALS_AFTER_KILL = 50
EVENT_GAP_SEC = 0.05


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisClusterLab]:
    lab = RedisClusterLab(tmp_path / "cluster")
    try:
        lab.start()
        print(f"redis cluster up in {lab.started_sec:.1f} s on ports {lab.ports}")
        yield lab
    finally:
        lab.stop()


def _final(call_id: str, seq: int, n: int) -> TranscriptEvent:
    return TranscriptEvent(
        type=EventType.FINAL, call_id=call_id, leg="caller", seq=seq, utt=n, text=f"final number {n}"
    )


def _partial(call_id: str, seq: int, n: int) -> TranscriptEvent:
    return TranscriptEvent(
        type=EventType.PARTIAL, call_id=call_id, leg="caller", seq=seq, utt=n, stable=f"final num {n}"
    )


async def _lines(proc: asyncio.subprocess.Process, into: list[str]) -> None:
    assert proc.stdout is not None
    async for raw in proc.stdout:
        into.append(raw.decode(errors="replace").rstrip())


async def _wait_for(check: object, what: str, timeout: float) -> float:
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if await asyncio.to_thread(check):  # type: ignore[arg-type]
            return time.monotonic() - began
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


async def test_master_killed_mid_call_loses_no_final(cluster: RedisClusterLab, tmp_path: Path) -> None:
    prefix = f"cslab-{uuid.uuid4().hex[:8]}"
    call_id = uuid.uuid4().hex
    key = call_stream_key(prefix, call_id)
    settings = Settings(redis_url=cluster.url, key_prefix=prefix, spool_dir=tmp_path / "spool")
    publisher = RedisStreamsPublisher(settings, Metrics())
    await publisher.start()
    assert publisher.connected, "the publisher did not reach the cluster"

    tail_out: list[str] = []
    tail = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "callscribe", "tail", "--redis-url", cluster.url,
        "--key-prefix", prefix, "--from-start", "--no-partials",
        stdout=asyncio.subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    tail_reader = asyncio.create_task(_lines(tail, tail_out))

    dashboard = Dashboard(settings, Metrics())
    await dashboard.start()
    sse: list[bytes] = []

    async def watch_dashboard() -> None:
        # As a browser's EventSource does: when a stream ends (a Redis error during the
        # failover ends it cleanly), reconnect and resume after the last id received.
        last = "0-0"
        while True:
            async for chunk in dashboard.stream(call_id, last):
                sse.append(chunk)
                if chunk.startswith(b"id: "):
                    last = chunk.split(b"\n", 1)[0][4:].decode()
            await asyncio.sleep(0.5)

    watcher = asyncio.create_task(watch_dashboard())

    published: list[TranscriptEvent] = []
    seq = 0

    def publish(event: TranscriptEvent) -> None:
        nonlocal seq
        publisher.publish(event)
        published.append(event)
        seq += 1

    try:
        publish(TranscriptEvent(type=EventType.CALL_STARTED, call_id=call_id, seq=seq))
        for n in range(FINALS_BEFORE_KILL):
            publish(_partial(call_id, seq, n))
            publish(_final(call_id, seq, n))
            await asyncio.sleep(EVENT_GAP_SEC)
        assert await publisher.wait_flushed(10)
        await _wait_for(
            lambda: any(f"final number {FINALS_BEFORE_KILL - 1}" in line for line in tail_out),
            "tail to print the finals written before the kill",
            15,
        )

        victim = cluster.master_of_slot(key_slot(cluster.ports[0], key))
        assert victim is not None
        replicas = cluster.replicas_of(victim)
        assert replicas, f"master {victim} has no replica"
        killed_at = time.monotonic()
        cluster.kill(victim)
        promoted: list[float] = []

        async def watch_promotion() -> None:
            promoted.append(
                await _wait_for(
                    lambda: cluster.master_of_slot(key_slot(replicas[0], key)) not in (None, victim),
                    "a replica to take over the call's slot",
                    30,
                )
            )

        promotion = asyncio.create_task(watch_promotion())
        for n in range(FINALS_BEFORE_KILL, FINALS_BEFORE_KILL + FINALS_AFTER_KILL):
            publish(_partial(call_id, seq, n))
            publish(_final(call_id, seq, n))
            await asyncio.sleep(EVENT_GAP_SEC)
        publish(TranscriptEvent(type=EventType.CALL_ENDED, call_id=call_id, seq=seq, meta={"reason": "bye"}))
        await promotion
        assert await publisher.wait_flushed(30), f"events still unwritten: {publisher.buffer_depth}"
        flushed_sec = time.monotonic() - killed_at
        # /readyz follows `connected`: the idle ping must succeed against the new topology.
        await _wait_for(lambda: publisher.connected, "the publisher to report Redis up again", 10)
        print(
            f"master {victim} killed; replica promoted after {promoted[0]:.1f} s; "
            f"everything written {flushed_sec:.1f} s after the kill"
        )

        finals_sent = {(e.seq, e.text) for e in published if e.type == EventType.FINAL}
        reader = connect(cluster.url, decode_responses=True)
        try:
            in_call = [TranscriptEvent.from_fields(f) for _id, f in await reader.xrange(key)]
            in_finals = [
                TranscriptEvent.from_fields(f)
                for _id, f in await reader.xrange(finals_stream_key(prefix))
                if f["call_id"] == call_id
            ]
        finally:
            await reader.aclose()
        # At-least-once: a batch cut by the kill may be written twice; sets compare content.
        assert {(e.seq, e.text) for e in in_call if e.type == EventType.FINAL} == finals_sent
        assert {(e.seq, e.text) for e in in_finals} == finals_sent
        assert any(e.type == EventType.CALL_ENDED for e in in_call)

        await _wait_for(
            lambda: all(any(text + " " in line + " " for line in tail_out) for _s, text in finals_sent),
            "tail to print every final",
            20,
        )
        await _wait_for(
            lambda: sum(b'"type":"final"' in chunk for chunk in sse) >= len(finals_sent),
            "the dashboard stream to carry every final",
            20,
        )
        streamed = {
            json.loads(chunk.decode().split("data: ", 1)[1])["text"]
            for chunk in sse
            if b'"type":"final"' in chunk
        }
        assert streamed == {text for _s, text in finals_sent}
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await dashboard.stop()
        await publisher.close(5)
        if tail.returncode is None:
            tail.terminate()
        await tail.wait()
        await tail_reader
        print("tail printed:", *tail_out[-5:], sep="\n  ")
