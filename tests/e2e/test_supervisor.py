"""The supervisor view in Chromium: 12 concurrent calls in one grid over one event stream,
all visible and updating; an alert phrase in one call's final highlights that call within
2 s of the final; redacted card digits show as redacted; transcript text that looks like
HTML stays text. The calls run on the scripted engine (plumbing, not recognition)."""

from __future__ import annotations

import asyncio
import wave
from pathlib import Path
from typing import Any

import numpy as np
import redis.asyncio as aioredis

from callscribe.calls import Leg
from callscribe.events import EventType, TranscriptEvent
from callscribe.publish.redis_streams import call_stream_key
from tests.e2e.chromium import Chromium, Page
from tests.scripted_engine import TimedScriptEngine
from tests.support import ServiceFactory

OUTPUT = Path(__file__).resolve().parents[2] / "test-output" / "e2e" / "supervisor"
CALLS = 12
SCRIPT = [
    "thank you for calling",
    "how can i help you today",
    "<img src=x onerror=window.pwned=1>",
    "my card is four one one one one one one one one one one one one one one one",
    "let me check that for you",
]
ALERT_CALL = "sv-07"
ALERT_SCRIPT = [*SCRIPT[:4], "i want to Cancel my account", *SCRIPT[4:]]


def silent_wav(path: Path) -> Path:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(16000)
        wav.writeframes(np.zeros(16000, np.int16).tobytes())
    return path


async def talk(legs: list[Leg], stop: asyncio.Event) -> None:
    """0.25 s of audio per leg every 0.1 s: 2.5x real time, a final per leg every 0.4 s."""
    chunk = np.full(2000, 500, np.int16)
    while not stop.is_set():
        for leg in legs:
            leg.feed(chunk, 8000)
        await asyncio.sleep(0.1)


async def shown(page: Page) -> dict[str, Any]:
    return dict(
        await page.evaluate(
            """(() => Object.fromEntries([...document.querySelectorAll('.sv-call')].map((c) => [
                c.dataset.callId,
                {finals: c.querySelectorAll('.final').length, updated: Number(c.dataset.updated),
                 alert: c.dataset.alert ? Number(c.dataset.alert) : null,
                 visible: c.offsetParent !== null, redacted: c.querySelectorAll('.redacted').length,
                 text: c.textContent}])))()"""
        )
    )


async def test_twelve_calls_one_stream_alerts_and_redaction(
    make_service: ServiceFactory, redis: aioredis.Redis, key_prefix: str, tmp_path: Path
) -> None:
    engine = TimedScriptEngine(SCRIPT, utterance_ms=1000, partial_ms=250, calls={ALERT_CALL: ALERT_SCRIPT})
    async with make_service(engine=engine, alert_phrases=["Cancel my account"], redact=["pci"]) as svc:
        base = f"http://127.0.0.1:{svc.http_port}"
        async with Chromium.launch(silent_wav(tmp_path / "mic.wav"), OUTPUT / "chromium.log") as browser:
            page = await browser.new_page(f"{base}/supervisor")
            await page.wait_for("document.getElementById('feed-status').dataset.state === 'live'", 10, "live")
            legs = []
            for i in range(CALLS):
                call_id = f"sv-{i:02d}"
                meta = {
                    "sip": {"from": f"<sip:+1555000{i:02d}@pbx>"},
                    "queue": "billing" if i % 2 else "sales",
                }
                legs.append(svc.registry.open_leg(call_id, "caller", meta))
                legs.append(svc.registry.open_leg(call_id, "agent", {"agent": f"agent-{i}"}))
            stop = asyncio.Event()
            talking = asyncio.create_task(talk(legs, stop))
            try:
                await page.wait_for(
                    f"document.querySelectorAll('.sv-call .final').length >= {CALLS * 2}",
                    20,
                    "finals in all calls",
                )
                first = await shown(page)
                await asyncio.sleep(1.5)
                second = await shown(page)
                await page.wait_for(
                    "document.querySelectorAll('.sv-call[data-alert]').length > 0", 20, "an alert"
                )
                flagged = await shown(page)
                await page.screenshot(OUTPUT / "supervisor.png")
                # The filter hides calls that do not match (metadata here), and shows them again.
                await page.evaluate(
                    "(() => { const f = document.getElementById('filter'); f.value = '+155500003';"
                    " f.dispatchEvent(new Event('input')); })()"
                )
                filtered = await shown(page)
                pwned = await page.evaluate("window.pwned === undefined")
                # The server's count of open event streams: the page holds one for every call.
                connections = svc.dashboard.open_streams
            finally:
                stop.set()
                await talking
                for leg in legs:
                    await leg.close("hangup")
        await svc.publisher.wait_flushed(10)

    assert sorted(first) == [f"sv-{i:02d}" for i in range(CALLS)]
    assert all(v["visible"] and v["finals"] >= 1 for v in first.values()), first
    assert all(second[c]["updated"] > first[c]["updated"] for c in first), "every call keeps updating"
    assert connections == 1, "one event stream for every call"
    # Each flagged call was flagged within 2 s of the final that said the phrase.
    alerts = {c: v["alert"] for c, v in flagged.items() if v["alert"]}
    assert list(alerts) == [ALERT_CALL], "only the call that said the phrase is flagged"
    for call_id, alert_at in alerts.items():
        entries: Any = await redis.xrange(call_stream_key(key_prefix, call_id))
        finals = [TranscriptEvent.from_fields(f) for _, f in entries]
        said = min(e.ts for e in finals if e.type == EventType.FINAL and "Cancel my account" in e.text)
        print(f"\n{call_id}: highlighted {alert_at - said} ms after its final was made")
        assert 0 <= alert_at - said <= 2000, (call_id, alert_at - said)
    assert any(v["redacted"] for v in flagged.values()), "a redacted card shows as redacted"
    assert all("4111" not in v["text"] and "one one one one" not in v["text"] for v in flagged.values())
    assert pwned, "transcript text was run as HTML"
    assert any("<img src=x" in v["text"] for v in flagged.values()), "the HTML-looking text shows as text"
    assert [c for c, v in filtered.items() if v["visible"]] == ["sv-03"]
