"""The live dashboard: a static page at `/` fed by Server-Sent Events read from Redis Streams.

Two kinds of event stream, each the SSE rendering of one Redis Stream, so that an SSE `id` is
that stream's entry id and `Last-Event-ID` (sent by the browser when it reconnects) resumes
exactly after the last entry the page saw:

- `GET /events/calls` — the calls index (call.started / call.ended), from `history_min` minutes
  back (default 240) so a page opened mid-call finds the calls already running;
- `GET /events/calls/{call_id}` — every event of one call from its beginning. Schema v2 keeps
  partials in a stream of their own, read in the same XREAD; they are sent without an SSE `id`
  (so `Last-Event-ID` stays an entry of the call stream) and a resumed stream starts its
  partials at the newest, since older ones are superseded anyway.

Each stream first replays what is stored, then sends `event: live` once it has caught up (so
the page knows which calls are still active), then follows. Streams are recycled after
`sse_max_sec` so proxies never hold a response forever; the browser reconnects and resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import FileResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from callscribe.events import TranscriptEvent
from callscribe.metrics import Metrics
from callscribe.publish.connect import AnyRedis, connect
from callscribe.publish.redis_streams import call_stream_key, calls_stream_key, partials_stream_key
from callscribe.settings import Settings
from callscribe.web.app import error

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
ENTRY_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
HEARTBEAT_SEC = 15.0
RETRY_MS = 1000
# XREAD blocks this long at most, so a recycled or closing stream ends within it.
_BLOCK_MS = 1000
_READ_COUNT = 200
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def entry_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def event_json(event: TranscriptEvent) -> dict[str, Any]:
    return event.to_json()


def sse_message(data: str, *, entry_id: str | None = None, event: str | None = None) -> bytes:
    """One SSE message; `data` must hold no newline (JSON from json.dumps never does)."""
    lines = []
    if entry_id is not None:
        lines.append(f"id: {entry_id}")
    if event is not None:
        lines.append(f"event: {event}")
    lines.append(f"data: {data}")
    return ("\n".join(lines) + "\n\n").encode()


class Dashboard:
    """Owns the Redis client the event streams read with (a `Component` of the Service)."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.redis: AnyRedis | None = None
        self.closing = asyncio.Event()
        self.open_streams = 0
        self._no_streams = asyncio.Event()
        self._no_streams.set()

    async def start(self) -> None:
        # Each SSE stream reads one key, so the same code serves a single Redis and a cluster.
        self.redis = connect(self.settings.redis_url, decode_responses=True)

    async def stop(self) -> None:
        # Open streams end within one XREAD block, before the HTTP server's graceful shutdown
        # (which would otherwise wait on them forever) and before their Redis client closes.
        self.closing.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._no_streams.wait(), 5 * _BLOCK_MS / 1000)
        if self.redis is not None:
            await self.redis.aclose()

    @contextlib.contextmanager
    def counted_stream(self) -> Iterator[None]:
        """Bookkeeping of one open event stream (metrics; stop() waits for none to be open)."""
        self.metrics.dashboard_clients.inc()
        self.open_streams += 1
        self._no_streams.clear()
        try:
            yield
        finally:
            self.open_streams -= 1
            if not self.open_streams:
                self._no_streams.set()
            self.metrics.dashboard_clients.dec()

    def key(self, call_id: str | None) -> str:
        prefix = self.settings.key_prefix
        return calls_stream_key(prefix) if call_id is None else call_stream_key(prefix, call_id)

    async def last_entry(self, key: str) -> str | None:
        assert self.redis is not None
        entries = await self.redis.xrevrange(key, count=1)
        return str(entries[0][0]) if entries else None

    async def stream(self, call_id: str | None, start: str) -> AsyncIterator[bytes]:
        """The SSE body for one Redis Stream, entries strictly after `start`.

        XREAD runs inline with a short block rather than in a reader task: a task cancelled
        inside a blocking XREAD (redis-py 8.1, Python 3.11) was seen never to finish, which
        left responses, and so the HTTP server's shutdown, hanging.
        """
        assert self.redis is not None
        key = self.key(call_id)
        self.metrics.dashboard_clients.inc()
        self.open_streams += 1
        self._no_streams.clear()
        try:
            yield f"retry: {RETRY_MS}\n\n".encode()
            caught_up_at = await self.last_entry(key)
            live = caught_up_at is None or entry_key(caught_up_at) <= entry_key(start)
            if live:
                yield sse_message("{}", event="live")
            loop = asyncio.get_running_loop()
            recycle_at = loop.time() + self.settings.sse_max_sec
            last_sent = loop.time()
            cursors = {key: start}
            if call_id is not None:
                partials = partials_stream_key(self.settings.key_prefix, call_id)
                cursors[partials] = "0-0" if start == "0-0" else (await self.last_entry(partials) or "0-0")
            while not self.closing.is_set() and loop.time() < recycle_at:
                reply: Any = await self.redis.xread(cursors, block=_BLOCK_MS, count=_READ_COUNT)  # type: ignore[arg-type]
                entries = [
                    (stream, entry) for stream, stream_entries in reply or [] for entry in stream_entries
                ]
                for stream, (entry_id, fields) in entries:
                    cursors[stream] = entry_id
                    try:
                        event = TranscriptEvent.from_fields(fields)
                    except ValueError as exc:
                        log.warning("dashboard skips entry %s of %s: %s", entry_id, stream, exc)
                        continue
                    data = json.dumps(event_json(event), separators=(",", ":"))
                    if stream != key:
                        yield sse_message(data)
                        continue
                    yield sse_message(data, entry_id=entry_id)
                    if (
                        not live
                        and caught_up_at is not None
                        and entry_key(entry_id) >= entry_key(caught_up_at)
                    ):
                        live = True
                        yield sse_message("{}", event="live")
                if entries:
                    last_sent = loop.time()
                elif loop.time() - last_sent >= HEARTBEAT_SEC:
                    last_sent = loop.time()
                    yield b": keepalive\n\n"
        except RedisError as exc:
            # End the response cleanly: the browser reconnects and resumes from its last id.
            log.warning("dashboard stream of %s ended by a Redis error: %s", key, exc)
        finally:
            self.open_streams -= 1
            if not self.open_streams:
                self._no_streams.set()
            self.metrics.dashboard_clients.dec()


def resume_point(request: Request, default: str) -> str:
    """Where a stream starts: after `Last-Event-ID` when the browser resumes, else `default`."""
    last = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    if not last:
        return default
    if not ENTRY_ID.match(last):
        raise ValueError(f"Last-Event-ID {last[:60]!r} is not a Redis stream entry id like 1700000000000-0")
    return last


def dashboard_routes(dashboard: Dashboard, metrics: Metrics) -> list[BaseRoute]:

    def sse(request: Request, call_id: str | None, default_start: str) -> Response:
        if dashboard.closing.is_set():
            # Not 200: EventSource stops retrying instead of hammering a server going away.
            return error(503, "callscribe is shutting down")
        try:
            start = resume_point(request, default_start)
        except ValueError as exc:
            return error(400, str(exc))
        if start != default_start:
            metrics.dashboard_resumes.inc()
        return StreamingResponse(
            dashboard.stream(call_id, start),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    async def calls_events(request: Request) -> Response:
        try:
            history_min = float(request.query_params.get("history_min", "240"))
            if not 0 <= history_min <= 7 * 24 * 60:
                raise ValueError
        except ValueError:
            return error(400, "history_min must be a number of minutes between 0 and 10080")
        since_ms = int(time.time() * 1000 - history_min * 60_000)
        return sse(request, None, f"{since_ms}-0")

    async def call_events(request: Request) -> Response:
        return sse(request, request.path_params["call_id"], "0-0")

    async def page(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", headers=_PAGE_HEADERS)

    return [
        Route("/", page),
        Route("/events/calls", calls_events),
        Route("/events/calls/{call_id}", call_events),
        Mount("/ui", StaticFiles(directory=STATIC_DIR), name="ui"),
    ]
