"""The dashboard's Server-Sent Events over real HTTP and real Redis: resuming from
Last-Event-ID, recycling, the calls index, bad input, shutdown with streams open. Recognition
is not under test here, so the deterministic ScriptedEngine transcribes (a final per utterance
of the real clip). The page itself, in Chromium, with the real engine, is tested in tests/e2e."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
import redis.asyncio as aioredis

from callscribe.calls import Leg
from callscribe.publish.redis_streams import call_stream_key
from callscribe.service import Service
from tests.scripted_engine import with_scripted_engine
from tests.support import ServiceFactory, load_clip


@pytest.fixture
def make_service(make_service: ServiceFactory) -> ServiceFactory:
    return with_scripted_engine(make_service)


@dataclass
class SseMessage:
    id: str | None
    event: str
    data: str

    @property
    def json(self) -> dict[str, object]:
        value = json.loads(self.data)
        assert isinstance(value, dict)
        return value


async def sse_messages(response: httpx.Response) -> AsyncIterator[SseMessage]:
    """The messages of an event stream, per the HTML spec's parsing rules (the subset used)."""
    entry_id: str | None = None
    event, data = "message", list[str]()
    async for line in response.aiter_lines():
        if line == "":
            if data:
                yield SseMessage(entry_id, event, "\n".join(data))
            entry_id, event, data = None, "message", []
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "id":
                entry_id = value
            elif name == "event":
                event = value
            elif name == "data":
                data.append(value)


async def speak(leg: Leg, pcm: np.ndarray, chunk: int = 8000, pause: float = 0.1) -> None:
    """Feed a clip at ~5x real time, then hang up."""
    for start in range(0, pcm.size, chunk):
        leg.feed(pcm[start : start + chunk], 16000)
        await asyncio.sleep(pause)
    leg.feed(np.zeros(16000, np.int16), 16000)
    await leg.close("hangup")


async def stream_ids(redis: aioredis.Redis, key_prefix: str, call_id: str) -> list[str]:
    entries: Any = await redis.xrange(call_stream_key(key_prefix, call_id))
    return [str(entry_id) for entry_id, _ in entries]


def metric(service: Service, name: str) -> float:
    return service.metrics.registry.get_sample_value(name) or 0.0


async def test_a_resumed_stream_continues_exactly_after_last_event_id(
    make_service: ServiceFactory, redis: aioredis.Redis, key_prefix: str
) -> None:
    clip = load_clip("librivox-0870")
    async with make_service() as svc, httpx.AsyncClient(timeout=30) as client:
        url = f"http://127.0.0.1:{svc.http_port}/events/calls/sse-1"
        leg = svc.registry.open_leg("sse-1", "caller", {})
        speaking = asyncio.create_task(speak(leg, clip.pcm))
        first: list[SseMessage] = []
        partials: list[SseMessage] = []
        async with client.stream("GET", url) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            async for message in sse_messages(response):
                if message.id is not None:
                    first.append(message)
                elif message.event == "message":
                    partials.append(message)  # schema v2: from the partials stream, no id
                if len(first) >= 2 and partials:
                    break  # the browser lost its connection here
        assert not speaking.done(), "the call ended before the reconnect: nothing left to resume"
        rest: list[SseMessage] = []
        headers = {"Last-Event-ID": first[-1].id or ""}
        async with client.stream("GET", url, headers=headers) as response:
            async for message in sse_messages(response):
                if message.id is not None:
                    rest.append(message)
                    if message.json["type"] == "call.ended":
                        break
        await speaking
        stored = await stream_ids(redis, key_prefix, "sse-1")
        assert metric(svc, "callscribe_dashboard_resumes_total") == 1

    assert {m.json["type"] for m in partials} == {"partial"}
    received = [m.id for m in first + rest]
    assert received == stored  # nothing missed, nothing twice, in stream order
    types = [m.json["type"] for m in first + rest]
    assert types[:2] == ["call.started", "leg.started"] and "final" in types
    final = next(m.json for m in rest if m.json["type"] == "final")
    assert final["leg"] == "caller" and isinstance(final["start_ms"], int) and final["text"]


async def test_streams_are_recycled_and_mark_when_they_are_live(
    make_service: ServiceFactory, redis: aioredis.Redis, key_prefix: str
) -> None:
    async with make_service(sse_max_sec=1.0) as svc, httpx.AsyncClient(timeout=30) as client:
        base = f"http://127.0.0.1:{svc.http_port}"
        leg = svc.registry.open_leg("sse-2", "agent", {"queue": "billing"})
        await svc.publisher.wait_flushed(timeout=10)
        # The calls index from now: call.started (replayed), then `live`; the response ends by itself.
        async with (
            asyncio.timeout(10),
            client.stream("GET", f"{base}/events/calls?history_min=5") as response,
        ):
            index = [m async for m in sse_messages(response)]
        kinds = [(m.event, m.json.get("type")) for m in index]
        assert kinds == [("message", "call.started"), ("live", None)]
        assert index[0].json["call_id"] == "sse-2" and index[0].json["meta"] == {"queue": "billing"}
        # A stream read from the last entry is live at once.
        last = (await stream_ids(redis, key_prefix, "sse-2"))[-1]
        resume = {"Last-Event-ID": last}
        async with (
            asyncio.timeout(10),
            client.stream("GET", f"{base}/events/calls/sse-2", headers=resume) as response,
        ):
            tail = [m async for m in sse_messages(response)]
        assert [m.event for m in tail] == ["live"]
        await leg.close()
        assert metric(svc, "callscribe_dashboard_clients") == 0


async def test_bad_requests_are_refused_and_the_page_is_served(make_service: ServiceFactory) -> None:
    async with make_service() as svc, httpx.AsyncClient(timeout=10) as client:
        base = f"http://127.0.0.1:{svc.http_port}"
        bad = [
            (f"{base}/events/calls/x", {"Last-Event-ID": "0-0\r\nevil"}),
            (f"{base}/events/calls/x", {"Last-Event-ID": "yesterday"}),
            (f"{base}/events/calls?history_min=-1", {}),
            (f"{base}/events/calls?history_min=lots", {}),
        ]
        for url, headers in bad:
            reply = await client.get(url, headers={k: v.replace("\r\n", "") for k, v in headers.items()})
            assert reply.status_code == 400, (url, headers, reply.text)
            assert reply.json()["error"]
        page = await client.get(f"{base}/")
        assert page.status_code == 200 and "<h1>callscribe" in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]
        for asset in ("dashboard.js", "dashboard.css", "publish.html", "publish.js"):
            assert (await client.get(f"{base}/ui/{asset}")).status_code == 200, asset


async def test_shutdown_ends_open_streams(make_service: ServiceFactory) -> None:
    opened = asyncio.Event()

    async def watch(url: str) -> int:
        async with httpx.AsyncClient(timeout=60) as client, client.stream("GET", url) as response:
            opened.set()
            return sum([1 async for _ in sse_messages(response)])

    async with make_service(sse_max_sec=3600) as svc:
        watcher = asyncio.create_task(watch(f"http://127.0.0.1:{svc.http_port}/events/calls/idle"))
        await asyncio.wait_for(opened.wait(), 10)
        stopping = asyncio.get_running_loop().time()
    # Leaving the block stopped the service: the open stream did not hold the HTTP server up.
    assert asyncio.get_running_loop().time() - stopping < 10
    assert await asyncio.wait_for(watcher, 10) == 1  # just `live`: the stream was empty
