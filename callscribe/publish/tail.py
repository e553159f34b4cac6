"""Follow transcripts as they arrive: one call's stream, or every call that starts.

Used by `callscribe tail`, `callscribe demo`, the dashboard and the tests. Without a
call_id it reads `{prefix}:calls` and, for each call.started seen there, reads that
call's stream from its beginning in the same blocking XREAD, until the call.ended
written to the index says the call's stream is complete. It never ends by itself.

In a Redis Cluster the index and each call's stream live in different hash slots, and one
XREAD may only name keys of one slot (CROSSSLOT otherwise): there every stream gets its own
blocking XREAD, all in flight at once, and whichever answers first is yielded first.

Schema v2 keeps a call's partials in a stream of their own (`partials_stream_key`), read in
the same XREAD; the two streams interleave, consumers order a leg's events by `seq`.
v1 entries (everything in the call stream) read the same way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ClusterDownError, SlotNotCoveredError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from callscribe.events import EventType, TranscriptEvent
from callscribe.publish.connect import AnyRedis
from callscribe.publish.redis_streams import call_stream_key, calls_stream_key, partials_stream_key

log = logging.getLogger(__name__)

BLOCK_MS = 1000
READ_COUNT = 500
# A cluster master failing over: its slots answer again once a replica is promoted.
FAILOVER_ERRORS = (
    RedisConnectionError,
    RedisTimeoutError,
    ClusterDownError,
    SlotNotCoveredError,
    TryAgainError,
)
FAILOVER_RETRY_SEC = 0.5


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


Entry = tuple[str, dict[str, str] | dict[bytes, bytes]]


async def _xread(
    redis: AnyRedis, streams: dict[str, str], block: int | None
) -> list[tuple[str, list[Entry]]]:
    """XREAD with keys and ids as str whether or not the client decodes responses."""
    reply: Any = await redis.xread(streams, block=block, count=READ_COUNT)  # type: ignore[arg-type]
    return [(_text(key), [(_text(i), f) for i, f in entries]) for key, entries in reply or []]


async def _xread_through_failover(
    redis: AnyRedis, streams: dict[str, str], block: int | None
) -> list[tuple[str, list[Entry]]]:
    """`_xread` on a cluster, where a master dying is routine: an empty reply (read again
    from the same id) until the cluster client has found the promoted replica."""
    try:
        return await _xread(redis, streams, block)
    except FAILOVER_ERRORS as exc:
        log.warning("reading %s: %s; retrying", ", ".join(streams), exc)
        await asyncio.sleep(FAILOVER_RETRY_SEC)
        return []


def _parse(key: str, entry_id: str, fields: dict[str, str] | dict[bytes, bytes]) -> TranscriptEvent | None:
    try:
        return TranscriptEvent.from_fields(fields)
    except (ValueError, TypeError) as exc:
        log.warning("skipping entry %s of %s: %s", entry_id, key, exc)
        return None


async def follow(
    redis: AnyRedis, prefix: str, call_id: str | None = None, start: str = "$"
) -> AsyncGenerator[tuple[str, TranscriptEvent], None]:
    """Yield (entry id, event) as events arrive. `start` is the first id to read after:
    of the call's stream with `call_id`, else of the calls index ("0" replays every call
    still in the index, "$" only calls that start from now on)."""
    if call_id is not None:
        key = call_stream_key(prefix, call_id)
        partials = partials_stream_key(prefix, call_id)
        cursors = {key: await _resolve(redis, key, start), partials: await _resolve(redis, partials, start)}
        # The two keys share the call's hash tag: one XREAD names both, in a cluster too.
        read = _xread_through_failover if isinstance(redis, RedisCluster) else _xread
        while True:
            for stream, entries in await read(redis, cursors, BLOCK_MS):
                for last, fields in entries:
                    cursors[stream] = last
                    event = _parse(stream, last, fields)
                    if event is not None:
                        yield last, event
        return

    index = calls_stream_key(prefix)
    if isinstance(redis, RedisCluster):
        async for item in _follow_cluster(redis, prefix, await _resolve(redis, index, start)):
            yield item
        return
    streams: dict[str, str] = {index: await _resolve(redis, index, start)}
    while True:
        reply = await _xread(redis, streams, BLOCK_MS)
        # Call streams before the index: a call.ended in the index may retire a call stream,
        # which must first give every entry of this reply.
        for key, entries in sorted(reply, key=lambda item: item[0] == index):
            for entry_id, fields in entries:
                streams[key] = entry_id
                event = _parse(key, entry_id, fields)
                if event is None:
                    continue
                if key != index:
                    yield entry_id, event
                    continue
                call_key = call_stream_key(prefix, event.call_id)
                if event.type == EventType.CALL_STARTED:
                    # The call stream holds this call.started too (written just before).
                    streams.setdefault(call_key, "0-0")
                    streams.setdefault(partials_stream_key(prefix, event.call_id), "0-0")
                elif event.type == EventType.CALL_ENDED and call_key in streams:
                    streams.pop(partials_stream_key(prefix, event.call_id), None)
                    async for item in _drain(redis, call_key, streams.pop(call_key)):
                        yield item


async def _follow_cluster(
    redis: AnyRedis, prefix: str, index_start: str
) -> AsyncGenerator[tuple[str, TranscriptEvent], None]:
    """`follow` without a call_id for a cluster: one single-key blocking XREAD per stream.

    Each stream has at most one read in flight, issued after its last entry, so nothing is
    read twice; a read still blocked on a stream that is not answering stays in flight
    across iterations instead of being cancelled (cancelling a blocked read would cost its
    connection). A call.ended in the index waits for that call's read in flight, then
    drains the rest of the call's stream, as the single-server loop does."""
    index = calls_stream_key(prefix)
    streams: dict[str, str] = {index: index_start}
    reads: dict[str, asyncio.Task[list[tuple[str, list[Entry]]]]] = {}
    try:
        while True:
            for key, last in streams.items():
                if key not in reads:
                    reads[key] = asyncio.create_task(_xread_through_failover(redis, {key: last}, BLOCK_MS))
            done, _pending = await asyncio.wait(reads.values(), return_when=asyncio.FIRST_COMPLETED)
            # Call streams before the index, as in `follow`.
            finished = sorted((k for k, t in reads.items() if t in done), key=lambda k: k == index)
            for key in finished:
                reply = reads.pop(key).result()
                for _stream, entries in reply:
                    for entry_id, fields in entries:
                        if key in streams:
                            streams[key] = entry_id
                        event = _parse(key, entry_id, fields)
                        if event is None:
                            continue
                        if key != index:
                            yield entry_id, event
                            continue
                        call_key = call_stream_key(prefix, event.call_id)
                        partials_key = partials_stream_key(prefix, event.call_id)
                        if event.type == EventType.CALL_STARTED:
                            streams.setdefault(call_key, "0-0")
                            streams.setdefault(partials_key, "0-0")
                        elif event.type == EventType.CALL_ENDED and call_key in streams:
                            streams.pop(partials_key, None)
                            stale = reads.pop(partials_key, None)
                            if stale is not None:
                                stale.cancel()  # partials of an ended call are of no use
                            last = streams.pop(call_key)
                            in_flight = reads.pop(call_key, None)
                            if in_flight is not None:
                                for _s, found in await in_flight:
                                    for last, call_fields in found:
                                        call_event = _parse(call_key, last, call_fields)
                                        if call_event is not None:
                                            yield last, call_event
                            async for item in _drain(redis, call_key, last):
                                yield item
    finally:
        for task in reads.values():
            task.cancel()
        await asyncio.gather(*reads.values(), return_exceptions=True)


async def _resolve(redis: AnyRedis, key: str, start: str) -> str:
    """ "$" as the id of the stream's current last entry: passing "$" to every XREAD of the
    loop would skip entries added between two reads."""
    if start != "$":
        return start
    newest: Any = await redis.xrevrange(key, count=1)
    return _text(newest[0][0]) if newest else "0-0"


async def _drain(redis: AnyRedis, key: str, last: str) -> AsyncGenerator[tuple[str, TranscriptEvent], None]:
    """What is left of an ended call's stream (written before its call.ended reached the index)."""
    while True:
        entries = [entry for _stream, found in await _xread(redis, {key: last}, None) for entry in found]
        if not entries:
            return
        for last, fields in entries:
            event = _parse(key, last, fields)
            if event is not None:
                yield last, event
