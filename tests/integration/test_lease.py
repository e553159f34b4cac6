"""Instance leases and the sweeper against a real Redis; the publisher's spool-when-down rule."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import redis.asyncio as aioredis

from callscribe.events import EventType, TranscriptEvent
from callscribe.metrics import Metrics
from callscribe.publish.lease import InstanceLease, calls_key, lease_key, legs_key, resolve_instance_id
from callscribe.publish.redis_streams import RedisStreamsPublisher
from callscribe.settings import Settings
from tests.support import free_port


def event(kind: EventType, call_id: str, leg: str = "", seq: int = 1, **fields: object) -> TranscriptEvent:
    return TranscriptEvent(type=kind, call_id=call_id, leg=leg, seq=seq, **fields)  # type: ignore[arg-type]


async def write(client: aioredis.Redis, lease: InstanceLease, events: list[TranscriptEvent]) -> None:
    """What the publisher does: each event's XADD and its tracking commands, in one pipeline."""
    pipe = client.pipeline(transaction=False)
    for e in events:
        fields: list[str] = []
        for name, value in e.to_fields().items():
            fields += (name, value)
        pipe.execute_command("XADD", f"{lease.prefix}:call:{{{e.call_id}}}", "*", *fields)
        for command in lease.tracking_commands(e):
            pipe.execute_command(*command)
    await pipe.execute()


async def open_call(client: aioredis.Redis, lease: InstanceLease, call_id: str) -> None:
    await write(
        client,
        lease,
        [
            event(EventType.CALL_STARTED, call_id),
            event(EventType.LEG_STARTED, call_id, "caller", 1),
            event(EventType.FINAL, call_id, "caller", 2, utt=0, text="hello"),
        ],
    )


async def test_one_of_two_racing_sweepers_ends_a_dead_instances_call_once(
    redis: aioredis.Redis, key_prefix: str
) -> None:
    dead = InstanceLease(key_prefix, "dead", lease_sec=1)
    await dead.refresh(redis)
    await open_call(redis, dead, "c1")
    b, c = InstanceLease(key_prefix, "b", 15), InstanceLease(key_prefix, "c", 15)
    published: dict[str, list[TranscriptEvent]] = {"b": [], "c": []}

    assert await b.sweep(redis, published["b"].append) == 0, "a live lease was swept"
    await asyncio.sleep(1.2)  # the lease expires
    await asyncio.gather(b.sweep(redis, published["b"].append), c.sweep(redis, published["c"].append))

    winners = [name for name, events in published.items() if events]
    assert len(winners) == 1, published
    events = published[winners[0]]
    assert [(e.type, e.leg, e.seq) for e in events] == [
        (EventType.LEG_ENDED, "caller", 3),
        (EventType.CALL_ENDED, "", 2),
    ]
    assert all(e.meta == {"reason": "bridge_lost"} for e in events)
    assert not await redis.exists(calls_key(key_prefix, "dead"), legs_key(key_prefix, "dead"))
    # Until the ended events are written the entries stay with the winner; a second sweep
    # does not publish them again, and once written they are gone.
    winner = b if winners == ["b"] else c
    again: list[TranscriptEvent] = []
    await winner.sweep(redis, again.append)
    assert again == []
    await write(redis, winner, events)
    assert not await redis.hlen(calls_key(key_prefix, winner.instance_id))
    assert not await redis.hlen(legs_key(key_prefix, winner.instance_id))


async def test_a_restart_with_the_same_id_ends_its_earlier_runs_calls(
    redis: aioredis.Redis, key_prefix: str, tmp_path: Path
) -> None:
    instance_id = resolve_instance_id(None, tmp_path)
    assert resolve_instance_id(None, tmp_path) == instance_id, "the id is not kept in the spool dir"
    killed = InstanceLease(key_prefix, instance_id, 15)
    await killed.refresh(redis)
    await open_call(redis, killed, "old")
    restarted = InstanceLease(key_prefix, instance_id, 15)
    await restarted.refresh(redis)  # the lease is alive (same id): only the token tells them apart
    await open_call(redis, restarted, "new")
    published: list[TranscriptEvent] = []
    assert await restarted.sweep(redis, published.append) == 1
    assert {(e.type, e.call_id) for e in published} == {
        (EventType.LEG_ENDED, "old"),
        (EventType.CALL_ENDED, "old"),
    }
    lease_value = json.loads(await redis.get(lease_key(key_prefix, instance_id)))
    assert lease_value["token"] == restarted.token


async def test_publisher_spools_a_final_at_once_while_redis_is_down(key_prefix: str, tmp_path: Path) -> None:
    closed_port = free_port(socket.SOCK_STREAM)  # nothing listens there
    settings = Settings(
        redis_url=f"redis://127.0.0.1:{closed_port}/0", key_prefix=key_prefix, spool_dir=tmp_path / "spool"
    )
    publisher = RedisStreamsPublisher(settings, Metrics())
    await publisher.start()
    try:
        assert not publisher.connected
        publisher.publish(event(EventType.PARTIAL, "c", "caller", 1, utt=0, text="hel"))
        assert not list((tmp_path / "spool").glob("*.jsonl")), "a partial alone was written to disk"
        publisher.publish(event(EventType.FINAL, "c", "caller", 2, utt=0, text="hello"))
        # On disk before publish() returned: read the files, not the publisher's counters.
        lines = [
            json.loads(line)
            for path in sorted((tmp_path / "spool").glob("*.jsonl"))
            for line in path.read_bytes().splitlines()
        ]
        assert [(f["type"], f["seq"]) for f in lines] == [("partial", "1"), ("final", "2")]
    finally:
        await publisher.close(timeout=0.5)
