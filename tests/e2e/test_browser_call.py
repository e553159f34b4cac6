"""A real browser call: Chromium publishes its (fake, file-fed) microphone over WHIP from the
publish page, an aiortc peer publishes the agent leg, and the dashboard in a second tab shows
both legs' transcripts live. What the page shows is checked against what Redis holds."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import jiwer
import pytest
import redis.asyncio as aioredis

from callscribe.events import EventType, TranscriptEvent
from callscribe.publish.redis_streams import call_stream_key, partials_stream_key
from callscribe.service import Service
from tests.e2e.chromium import Chromium, Page
from tests.integration.test_webrtc_whip import TOKEN, played, speech_wav, whip_peer
from tests.support import ServiceFactory, finals_text, load_clip, read_call_events

OUTPUT = Path(__file__).resolve().parents[2] / "test-output" / "e2e"
CALLER = load_clip("librivox-0870")
AGENT = load_clip("librivox-0890")
# Silence before and after the caller's speech in the file Chromium loops as its microphone.
LEAD_SEC, TAIL_SEC = 0.5, 1.5


def card(call_id: str) -> str:
    return f"document.querySelector('[data-call-id=\"{call_id}\"]')"


async def dom_state(page: Page, call_id: str) -> dict[str, Any]:
    """What the dashboard shows for one call: counters and, per leg, its final lines."""
    script = f"""(() => {{
        const c = {card(call_id)};
        if (!c) return null;
        const legs = {{}};
        for (const leg of c.querySelectorAll('.leg')) {{
            legs[leg.dataset.leg] = [...leg.querySelectorAll('li.final .text')].map((t) => t.textContent);
        }}
        return {{...c.dataset, legs, text: c.innerText}};
    }})()"""
    return dict(await page.evaluate(script) or {})


async def stored_events(redis: aioredis.Redis, prefix: str, call_id: str) -> list[TranscriptEvent]:
    entries: Any = await redis.xrange(call_stream_key(prefix, call_id))
    return [TranscriptEvent.from_fields(fields) for _, fields in entries]


@asynccontextmanager
async def browser_call(
    svc: Service, tmp_path: Path, call_id: str
) -> AsyncIterator[tuple[Chromium, Page, Page]]:
    """Chromium with the dashboard open and live, then a publish tab connected as the caller."""
    microphone = speech_wav(tmp_path / "microphone.wav", CALLER, LEAD_SEC, TAIL_SEC)
    base = f"http://127.0.0.1:{svc.http_port}"
    out = OUTPUT / call_id
    async with Chromium.launch(microphone, out / "chromium.log") as browser:
        dashboard = await browser.new_page(f"{base}/")
        await dashboard.wait_for(
            "document.getElementById('feed-status').dataset.state === 'live'", 10, "dashboard feed live"
        )
        publisher = await browser.new_page(
            f"{base}/ui/publish.html?call_id={call_id}&leg=caller&token={TOKEN}&autostart=1"
        )
        await publisher.wait_for(
            "document.getElementById('status').dataset.state === 'connected'", 20, "WHIP publish connected"
        )
        yield browser, dashboard, publisher


async def hang_up(publisher: Page, agent_url: str) -> None:
    """The caller hangs up with the page's button code, the agent with DELETE (waiting on its last final)."""
    await publisher.evaluate("window.callscribeHangUp(), true")  # the page does not wait on the decode
    async with httpx.AsyncClient(timeout=120) as client:
        reply = await client.delete(agent_url, headers={"Authorization": f"Bearer {TOKEN}"})
    assert reply.status_code == 200, reply.text


async def check_page_matches_redis(
    dashboard: Page, redis: aioredis.Redis, prefix: str, call_id: str
) -> dict[str, Any]:
    shown = await dom_state(dashboard, call_id)
    stored = await stored_events(redis, prefix, call_id)
    partials: Any = await redis.xlen(partials_stream_key(prefix, call_id))
    assert shown["state"] == "ended"
    # Schema v2: every entry of the call stream, and partials from their own stream; a resumed
    # stream picks partials up at the newest (older ones are superseded), so not all of them.
    assert len(stored) <= int(shown["events"]) <= len(stored) + partials, (
        "the page applied a different number of events than Redis holds"
    )
    # Every entry applied once: a resume that skipped entries shows fewer events, one that
    # restarted shows duplicates. (`gaps` may be non-zero: the publisher coalesces superseded
    # partials while Redis is slow, so `seq` can jump without anything being lost here.)
    assert shown["duplicates"] == "0", shown
    for leg in ("caller", "agent"):
        finals = [e.text for e in stored if e.type == EventType.FINAL and e.leg == leg and e.text]
        assert shown["legs"][leg] == finals, leg
    return shown


@pytest.mark.timeout(180)
async def test_browser_call_shows_live_on_the_dashboard(
    make_service: ServiceFactory, redis: aioredis.Redis, key_prefix: str, tmp_path: Path
) -> None:
    call_id = "browser-call-1"
    agent_wav = speech_wav(tmp_path / "agent.wav", AGENT, lead_sec=2.0)
    async with (
        make_service(whip_token=TOKEN) as svc,
        browser_call(svc, tmp_path, call_id) as (_, dashboard, pub),
    ):
        connected = time.monotonic()
        base = f"http://127.0.0.1:{svc.http_port}"
        async with whip_peer(base, agent_wav, call_id, "agent") as (agent, agent_url):
            await dashboard.wait_for(
                f"{card(call_id)}?.dataset.state === 'live'", 10, "the call on the dashboard"
            )
            # "Within seconds": the first words of the caller on the page.
            await dashboard.wait_for(
                f"{card(call_id)}.querySelector('[data-leg=caller] .partial, [data-leg=caller] li.final')"
                "?.textContent.trim().length > 3",
                15,
                "caller text on the dashboard",
            )
            first_text_sec = time.monotonic() - connected
            # One pass of the caller's file (it loops), then hang up both legs the way a user would.
            await asyncio.sleep(max(0.0, LEAD_SEC + CALLER.seconds + TAIL_SEC - 0.3 - first_text_sec))
            await dashboard.screenshot(OUTPUT / call_id / "dashboard-live.png")
            await played(agent)
            await hang_up(pub, agent_url)
        await dashboard.wait_for(f"{card(call_id)}.dataset.state === 'ended'", 90, "the call to end")
        await dashboard.screenshot(OUTPUT / call_id / "dashboard.png")
        events = await read_call_events(redis, key_prefix, call_id, timeout=5)
        shown = await check_page_matches_redis(dashboard, redis, key_prefix, call_id)

    print(f"first caller text on the dashboard {first_text_sec:.1f}s after the browser connected")
    (OUTPUT / call_id / "dom.json").write_text(json.dumps(shown, indent=2))
    caller_text = " ".join(shown["legs"]["caller"])
    assert jiwer.wer(CALLER.reference, caller_text) < 0.6, caller_text
    assert jiwer.wer(AGENT.reference, " ".join(shown["legs"]["agent"])) < 0.6, shown["legs"]["agent"]
    assert finals_text(events, "caller") == caller_text
    # Lifecycle lines and final times are on the page too.
    assert "leg started (webrtc)" in shown["text"] and "leg ended (hangup)" in shown["text"]
    assert "0:00–0:0" in shown["text"] or "0:01–0:0" in shown["text"]


@pytest.mark.timeout(180)
async def test_dashboard_misses_nothing_across_reload_and_reconnects(
    make_service: ServiceFactory, redis: aioredis.Redis, key_prefix: str, tmp_path: Path
) -> None:
    call_id = "browser-call-2"
    agent_wav = speech_wav(tmp_path / "agent.wav", AGENT)
    # Streams recycled every 2 s: the page reconnects (Last-Event-ID) several times during the call.
    async with (
        make_service(whip_token=TOKEN, sse_max_sec=2.0) as svc,
        browser_call(svc, tmp_path, call_id) as (
            _,
            dashboard,
            pub,
        ),
    ):
        base = f"http://127.0.0.1:{svc.http_port}"
        async with whip_peer(base, agent_wav, call_id, "agent") as (agent, agent_url):
            await dashboard.wait_for(f"{card(call_id)}?.dataset.events > 3", 20, "some events on the page")
            await dashboard.reload()  # mid-call
            await dashboard.wait_for(
                f"{card(call_id)}?.dataset.state === 'live'", 10, "the call after reload"
            )
            await played(agent)
            await asyncio.sleep(max(0.0, LEAD_SEC + CALLER.seconds + TAIL_SEC - AGENT.seconds - 1.7))
            await hang_up(pub, agent_url)
        await dashboard.wait_for(f"{card(call_id)}.dataset.state === 'ended'", 90, "the call to end")
        shown = await check_page_matches_redis(dashboard, redis, key_prefix, call_id)
        resumes = svc.metrics.registry.get_sample_value("callscribe_dashboard_resumes_total") or 0
        await dashboard.screenshot(OUTPUT / call_id / "dashboard.png")

    assert int(shown["reconnects"]) >= 1, shown
    assert resumes >= int(shown["reconnects"])
    assert shown["legs"]["caller"] and shown["legs"]["agent"]
