"""The supervisor's console: every active call in one grid, fed by ONE multiplexed SSE stream.

`GET /events/active` follows the calls index and, in the same blocking XREAD, the call
stream and partials stream of every call started in the last `history_min` minutes (default
60) that has not ended. So a page needs one connection however many calls run: the
dashboard's one-stream-per-call design stopped at 4 calls against the browser's limit of 6
connections per host. Each message is one event (the dashboard's JSON, `call_id` included).
A resumed stream replays from the history window again and the page dedupes on
call_id+leg+seq, so `Last-Event-ID` is not used. A call's streams are dropped from the XREAD
once the call's own stream gives its call.ended.

`GET /supervisor/config` gives the page its alert phrases (setting `alert_phrases`).
`GET /supervisor` serves the page.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from callscribe.events import EventType, TranscriptEvent
from callscribe.publish.redis_streams import call_stream_key, calls_stream_key, partials_stream_key
from callscribe.web.app import error
from callscribe.web.dashboard import (
    _PAGE_HEADERS,
    HEARTBEAT_SEC,
    RETRY_MS,
    STATIC_DIR,
    event_json,
    sse_message,
)

if TYPE_CHECKING:
    from callscribe.web.dashboard import Dashboard

log = logging.getLogger(__name__)

_BLOCK_MS = 1000
_READ_COUNT = 500
# A call in the index older than this many minutes without call.ended is not followed.
DEFAULT_HISTORY_MIN = 60.0


async def active_stream(dashboard: Dashboard, since_ms: int) -> AsyncIterator[bytes]:
    """The SSE body: events of every active call, multiplexed, until recycled or closing."""
    prefix = dashboard.settings.key_prefix
    index = calls_stream_key(prefix)
    cursors: dict[str, str] = {index: f"{since_ms}-0"}
    with dashboard.counted_stream():
        async for chunk in _follow_active(dashboard, cursors, index, prefix):
            yield chunk


async def _follow_active(
    dashboard: Dashboard, cursors: dict[str, str], index: str, prefix: str
) -> AsyncIterator[bytes]:
    assert dashboard.redis is not None
    redis = dashboard.redis
    try:
        yield f"retry: {RETRY_MS}\n\n".encode()
        loop = asyncio.get_running_loop()
        recycle_at = loop.time() + dashboard.settings.sse_max_sec
        last_sent = loop.time()
        while not dashboard.closing.is_set() and loop.time() < recycle_at:
            reply: Any = await redis.xread(cursors, block=_BLOCK_MS, count=_READ_COUNT)  # type: ignore[arg-type]
            sent = False
            # Call streams before the index, so a call.ended read from the index retires a call
            # only after its own stream gave every entry of this reply.
            for stream, entries in sorted(reply or [], key=lambda item: item[0] == index):
                for entry_id, fields in entries:
                    if stream in cursors:
                        cursors[stream] = entry_id
                    try:
                        event = TranscriptEvent.from_fields(fields)
                    except ValueError as exc:
                        log.warning("supervisor skips entry %s of %s: %s", entry_id, stream, exc)
                        continue
                    if stream == index:
                        _track(cursors, prefix, event)
                        continue
                    yield sse_message(json.dumps(event_json(event), separators=(",", ":")))
                    sent = True
                    if event.type == EventType.CALL_ENDED:
                        cursors.pop(call_stream_key(prefix, event.call_id), None)
                        cursors.pop(partials_stream_key(prefix, event.call_id), None)
            if sent:
                last_sent = loop.time()
            elif loop.time() - last_sent >= HEARTBEAT_SEC:
                last_sent = loop.time()
                yield b": keepalive\n\n"
    except RedisError as exc:
        log.warning("supervisor stream ended by a Redis error: %s", exc)


def _track(cursors: dict[str, str], prefix: str, event: TranscriptEvent) -> None:
    """An entry of the calls index: follow a call that started (from its first entry, which
    is this call.started; its partials from now). Its call.ended is read from its own stream,
    which retires it: the index's copy may arrive before the call stream's rest."""
    if event.type == EventType.CALL_STARTED:
        cursors.setdefault(call_stream_key(prefix, event.call_id), "0-0")
        cursors.setdefault(partials_stream_key(prefix, event.call_id), "$")


def supervisor_routes(dashboard: Dashboard, alert_phrases: Sequence[str]) -> list[BaseRoute]:
    async def active_events(request: Request) -> Response:
        if dashboard.closing.is_set():
            return error(503, "callscribe is shutting down")
        try:
            history_min = float(request.query_params.get("history_min", str(DEFAULT_HISTORY_MIN)))
            if not 0 <= history_min <= 24 * 60:
                raise ValueError
        except ValueError:
            return error(400, "history_min must be a number of minutes between 0 and 1440")
        since_ms = int(time.time() * 1000 - history_min * 60_000)
        return StreamingResponse(
            active_stream(dashboard, since_ms),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    async def config(request: Request) -> Response:
        return JSONResponse({"alert_phrases": list(alert_phrases)})

    async def page(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "supervisor.html", headers=_PAGE_HEADERS)

    return [
        Route("/supervisor", page),
        Route("/supervisor/config", config),
        Route("/events/active", active_events),
    ]
