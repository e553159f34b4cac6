"""Instance leases: calls left open by a dead instance are ended, by whoever notices first.

Each running service holds a lease, `{prefix}:{instances}:{id}` (TTL `lease_sec`, refreshed every
third of it), and records what it has open in two hashes written in the same pipeline as the
lifecycle events themselves (`tracking_commands`): `{prefix}:{instances}:{id}:calls` (call_id)
and `{prefix}:{instances}:{id}:legs` (JSON [call_id, leg]); each value is the token of the run
that opened it. `{prefix}:{instances}` is the set of ids to look at.

The sweeper (every refresh, once this instance's own spool is replayed):
- another id whose lease key has expired: one Lua script (atomic, so of several sweepers
  exactly one wins) moves its entries into this instance's hashes and forgets the id;
- this instance's own id, entries of an earlier run (the token differs): an instance with a
  spool directory keeps its id across restarts (`instance-id` file in the spool), so its
  restart finds the calls the killed run had open;
and then publishes `leg.ended` and `call.ended` with reason `bridge_lost` through the
publisher's normal path. Those events delete the entries when they are written, so a sweeper
that dies half-way leaves them for the next sweeper (at-least-once, never lost).

Redis Cluster: every lease key carries the hash tag `{instances}`, so the script's keys share
one slot.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

from callscribe.bridge.events import EndReason
from callscribe.events import EventType, TranscriptEvent
from callscribe.publish.connect import AnyRedis

log = logging.getLogger(__name__)

# How far back the sweeper reads a call's stream for the last seq of each leg.
SEQ_SCAN_ENTRIES = 1000
ID_FILE = "instance-id"
REPLAYED_TOKEN = "replayed"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# Every lease key carries the hash tag {instances}: in a Redis Cluster they share one slot, so
# the claim script may touch the keys of two instances.
def instances_key(prefix: str) -> str:
    return f"{prefix}:{{instances}}"


def lease_key(prefix: str, instance_id: str) -> str:
    return f"{prefix}:{{instances}}:{instance_id}"


def calls_key(prefix: str, instance_id: str) -> str:
    return f"{prefix}:{{instances}}:{instance_id}:calls"


def legs_key(prefix: str, instance_id: str) -> str:
    return f"{prefix}:{{instances}}:{instance_id}:legs"


def leg_field(call_id: str, leg: str) -> str:
    return json.dumps([call_id, leg], separators=(",", ":"))


def resolve_instance_id(configured: str | None, spool_dir: Path | None) -> str:
    """The configured id; else the one kept in the spool directory (created once), so a
    restart with the same spool is the same instance; else a new random one."""
    if configured:
        return configured
    if spool_dir is not None:
        path = spool_dir / ID_FILE
        try:
            existing = path.read_text().strip()
            if existing:
                return existing
        except FileNotFoundError:
            pass
        spool_dir.mkdir(parents=True, exist_ok=True)
        fresh = f"{socket.gethostname()}-{uuid.uuid4().hex[:12]}"
        path.write_text(fresh + "\n")
        return fresh
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:12]}"


# KEYS: dead lease, dead calls, dead legs, my calls, my legs, instances; ARGV: dead id, my token.
# Returns nil if the lease is alive (or the id was already taken), else {calls, legs} (flat).
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
if redis.call('SREM', KEYS[6], ARGV[1]) == 0 then return false end
local calls = redis.call('HKEYS', KEYS[2])
local legs = redis.call('HKEYS', KEYS[3])
for _, c in ipairs(calls) do redis.call('HSET', KEYS[4], c, ARGV[2]) end
for _, l in ipairs(legs) do redis.call('HSET', KEYS[5], l, ARGV[2]) end
redis.call('DEL', KEYS[2], KEYS[3])
return {calls, legs}
"""


class InstanceLease:
    def __init__(self, prefix: str, instance_id: str, lease_sec: float) -> None:
        self.prefix = prefix
        self.instance_id = instance_id
        self.lease_ms = max(1000, int(lease_sec * 1000))
        self.token = uuid.uuid4().hex  # this run
        # ("call", call_id) / ("leg", call_id, leg) whose ended events were published here;
        # their entries go when those events are written.
        self._swept: set[tuple[str, ...]] = set()
        self.swept_calls = 0

    # -- inside the publisher's pipeline (sans-IO) -------------------------------------------

    def tracking_commands(self, event: TranscriptEvent, replayed: bool = False) -> list[tuple[Any, ...]]:
        """Commands to write with `event`. `replayed`: it comes from a spool an earlier run
        left, so what it opens belongs to that run (swept once the spool is replayed)."""
        p, me = self.prefix, self.instance_id
        token = REPLAYED_TOKEN if replayed else self.token
        if event.type == EventType.CALL_STARTED:
            return [("SADD", instances_key(p), me), ("HSET", calls_key(p, me), event.call_id, token)]
        if event.type == EventType.LEG_STARTED:
            return [("HSET", legs_key(p, me), leg_field(event.call_id, event.leg), token)]
        if event.type == EventType.LEG_ENDED:
            return [("HDEL", legs_key(p, me), leg_field(event.call_id, event.leg))]
        if event.type == EventType.CALL_ENDED:
            return [("HDEL", calls_key(p, me), event.call_id)]
        return []

    # -- IO -------------------------------------------------------------------------------

    async def refresh(self, client: AnyRedis) -> None:
        value = json.dumps({"pid": os.getpid(), "token": self.token})
        pipe = client.pipeline(transaction=False)
        pipe.set(lease_key(self.prefix, self.instance_id), value, px=self.lease_ms)
        pipe.sadd(instances_key(self.prefix), self.instance_id)
        await pipe.execute()

    async def release(self, client: AnyRedis) -> None:
        """Clean shutdown: every call was ended, nothing to sweep."""
        await client.delete(lease_key(self.prefix, self.instance_id))

    async def sweep(self, client: AnyRedis, publish: Callable[[TranscriptEvent], None]) -> int:
        """End the calls of dead instances and of this instance's earlier runs; returns how
        many calls were ended."""
        p, me = self.prefix, self.instance_id
        lost_calls: set[str] = set()
        lost_legs: set[tuple[str, str]] = set()
        for raw in await client.smembers(instances_key(p)):
            other = _text(raw)
            if other == me:
                continue
            keys = [lease_key(p, other), calls_key(p, other), legs_key(p, other)]
            keys += [calls_key(p, me), legs_key(p, me), instances_key(p)]
            claimed = await client.eval(_CLAIM, len(keys), *keys, other, self.token)
            if claimed:
                log.warning("instance %s lost its lease: ending its open calls", other)
                lost_calls.update(_text(c) for c in claimed[0])
                lost_legs.update(tuple(json.loads(_text(f))) for f in claimed[1])
        # Entries of this id from an earlier run (or replayed from its spool) carry another token.
        for field, token in (await client.hgetall(calls_key(p, me))).items():
            if _text(token) != self.token:
                lost_calls.add(_text(field))
        for field, token in (await client.hgetall(legs_key(p, me))).items():
            if _text(token) != self.token:
                lost_legs.add(tuple(json.loads(_text(field))))
        lost_calls -= {c for kind, c, *_ in self._swept if kind == "call"}
        lost_legs = {leg for leg in lost_legs if ("leg", *leg) not in self._swept}
        ended = 0
        for call_id in sorted({c for c, _ in lost_legs} | lost_calls):
            legs = [leg for c, leg in lost_legs if c == call_id]
            await self._end(client, publish, call_id, legs, call_id in lost_calls)
            ended += call_id in lost_calls
        return ended

    async def _end(
        self,
        client: AnyRedis,
        publish: Callable[[TranscriptEvent], None],
        call_id: str,
        legs: list[str],
        end_call: bool,
    ) -> None:
        call_seq, leg_seqs = await self._last_seqs(client, call_id)
        for leg in sorted(legs):
            publish(
                TranscriptEvent(
                    type=EventType.LEG_ENDED,
                    call_id=call_id,
                    leg=leg,
                    seq=leg_seqs.get(leg, 0) + 1,
                    meta={"reason": str(EndReason.BRIDGE_LOST)},
                )
            )
            self._swept.add(("leg", call_id, leg))
        if end_call:
            publish(
                TranscriptEvent(
                    type=EventType.CALL_ENDED,
                    call_id=call_id,
                    seq=call_seq + 1,
                    meta={"reason": str(EndReason.BRIDGE_LOST)},
                )
            )
            self._swept.add(("call", call_id))
            self.swept_calls += 1
        log.warning("call %s ended: %s (%d open legs)", call_id, str(EndReason.BRIDGE_LOST), len(legs))

    async def _last_seqs(self, client: AnyRedis, call_id: str) -> tuple[int, dict[str, int]]:
        """The last seq of the call's own events and of each leg, from the newest entries."""
        key = f"{self.prefix}:call:{{{call_id}}}"
        entries = await client.xrevrange(key, count=SEQ_SCAN_ENTRIES) or []
        call_seq, leg_seqs = 0, dict[str, int]()
        for _id, stored in entries:
            fields = {_text(k): _text(v) for k, v in (stored or {}).items()}
            leg = fields.get("leg", "")
            try:
                seq = int(fields.get("seq", "0"))
            except ValueError:
                continue
            if leg:
                leg_seqs[leg] = max(leg_seqs.get(leg, 0), seq)
            else:
                call_seq = max(call_seq, seq)
        return call_seq, leg_seqs


async def keep_lease(
    lease: InstanceLease,
    client: AnyRedis,
    publish: Callable[[TranscriptEvent], None],
    may_sweep: Callable[[], bool],
) -> None:
    """Refresh the lease every third of its TTL and sweep when `may_sweep()` (Redis up and
    this instance's spool replayed). Redis errors are retried at the next round."""
    period = lease.lease_ms / 3000
    while True:
        try:
            await lease.refresh(client)
            if may_sweep():
                await lease.sweep(client, publish)
        except (RedisError, OSError) as exc:
            log.debug("instance lease round failed: %s", exc)
        except Exception:
            log.exception("instance lease round failed")
        await asyncio.sleep(period)
