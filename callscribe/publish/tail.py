"""Follow transcripts as they arrive: one call's stream, or every call that starts.

Used by `callscribe tail`, `callscribe demo`, the dashboard and the tests. Without a
call_id it reads `{prefix}:calls` and, for each call.started seen there, reads that
call's stream from its beginning in the same blocking XREAD, until the call.ended
written to the index says the call's stream is complete. It never ends by itself.

Schema v2 keeps a call's partials in a stream of their own (`partials_stream_key`), read in
the same XREAD; the two streams interleave, consumers order a leg's events by `seq`.
v1 entries (everything in the call stream) read the same way.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from typing import Any

import redis.asyncio as aioredis

from callscribe.events import EventType, TranscriptEvent
from callscribe.publish.redis_streams import call_stream_key, calls_stream_key, partials_stream_key

log = logging.getLogger(__name__)

BLOCK_MS = 1000
READ_COUNT = 500


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


Entry = tuple[str, dict[str, str] | dict[bytes, bytes]]


async def _xread(
    redis: aioredis.Redis, streams: dict[str, str], block: int | None
) -> list[tuple[str, list[Entry]]]:
    """XREAD with keys and ids as str whether or not the client decodes responses."""
    reply: Any = await redis.xread(streams, block=block, count=READ_COUNT)  # type: ignore[arg-type]
    return [(_text(key), [(_text(i), f) for i, f in entries]) for key, entries in reply or []]


def _parse(key: str, entry_id: str, fields: dict[str, str] | dict[bytes, bytes]) -> TranscriptEvent | None:
    try:
        return TranscriptEvent.from_fields(fields)
    except (ValueError, TypeError) as exc:
        log.warning("skipping entry %s of %s: %s", entry_id, key, exc)
        return None


async def follow(
    redis: aioredis.Redis, prefix: str, call_id: str | None = None, start: str = "$"
) -> AsyncGenerator[tuple[str, TranscriptEvent], None]:
    """Yield (entry id, event) as events arrive. `start` is the first id to read after:
    of the call's stream with `call_id`, else of the calls index ("0" replays every call
    still in the index, "$" only calls that start from now on)."""
    if call_id is not None:
        key = call_stream_key(prefix, call_id)
        partials = partials_stream_key(prefix, call_id)
        cursors = {key: await _resolve(redis, key, start), partials: await _resolve(redis, partials, start)}
        while True:
            for stream, entries in await _xread(redis, cursors, BLOCK_MS):
                for last, fields in entries:
                    cursors[stream] = last
                    event = _parse(stream, last, fields)
                    if event is not None:
                        yield last, event
        return

    index = calls_stream_key(prefix)
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


async def _resolve(redis: aioredis.Redis, key: str, start: str) -> str:
    """ "$" as the id of the stream's current last entry: passing "$" to every XREAD of the
    loop would skip entries added between two reads."""
    if start != "$":
        return start
    newest: Any = await redis.xrevrange(key, count=1)
    return _text(newest[0][0]) if newest else "0-0"


async def _drain(
    redis: aioredis.Redis, key: str, last: str
) -> AsyncGenerator[tuple[str, TranscriptEvent], None]:
    """What is left of an ended call's stream (written before its call.ended reached the index)."""
    while True:
        entries = [entry for _stream, found in await _xread(redis, {key: last}, None) for entry in found]
        if not entries:
            return
        for last, fields in entries:
            event = _parse(key, last, fields)
            if event is not None:
                yield last, event
