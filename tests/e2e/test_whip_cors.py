"""CORS for WHIP in a real browser: a page served from another origin (another port) publishes
Chromium's microphone to /whip when `cors_origins` allows that origin, reads the session's
`Location` and hangs up with DELETE (both preflighted); with the origin not allowed, Chromium
itself blocks the request and no leg is opened."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.chromium import CHROMIUM, Chromium
from tests.integration.test_webrtc_whip import speech_wav
from tests.support import ServiceFactory, load_clip

OUTPUT = Path(__file__).resolve().parents[2] / "test-output" / "e2e"
TOKEN = "cors-test-token"

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>cross-origin WHIP</title></head>
<body><script>
window.result = null;
(async () => {
  const whip = new URLSearchParams(location.search).get("whip");
  const auth = {"Authorization": "Bearer %(token)s"};
  try {
    const stream = await navigator.mediaDevices.getUserMedia({audio: true});
    const pc = new RTCPeerConnection();
    for (const track of stream.getTracks()) pc.addTrack(track, stream);
    await pc.setLocalDescription(await pc.createOffer());
    await new Promise((done) => {
      if (pc.iceGatheringState === "complete") return done();
      pc.addEventListener("icegatheringstatechange", () => pc.iceGatheringState === "complete" && done());
      setTimeout(done, 3000);
    });
    const reply = await fetch(whip + "?call_id=cors-browser", {
      method: "POST", headers: {...auth, "Content-Type": "application/sdp"}, body: pc.localDescription.sdp});
    const sessionUrl = reply.headers.get("Location");
    await pc.setRemoteDescription({type: "answer", sdp: await reply.text()});
    for (let i = 0; i < 100 && pc.connectionState !== "connected"; i++) {
      await new Promise((r) => setTimeout(r, 100));
    }
    const state = pc.connectionState;
    const hangup = await fetch(new URL(sessionUrl, whip), {method: "DELETE", headers: auth});
    pc.close();
    window.result = {status: reply.status, location: sessionUrl, state, hangup: hangup.status};
  } catch (error) {
    window.result = {error: String(error)};
  }
})();
</script></body></html>"""


@contextlib.asynccontextmanager
async def page_server(html: str) -> AsyncIterator[str]:
    """A one-page HTTP server on its own port: the other origin."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while (await reader.readline()) not in (b"\r\n", b""):
                pass
            body = html.encode()
            head = (
                "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


async def publish_from_other_origin(
    make_service: ServiceFactory, tmp_path: Path, allow: bool
) -> dict[str, Any]:
    microphone = speech_wav(tmp_path / "microphone.wav", load_clip("librivox-0880"), 0.3, 0.5)
    async with page_server(PAGE % {"token": TOKEN}) as origin:
        cors = [origin] if allow else ["http://127.0.0.1:1"]
        async with make_service(whip_token=TOKEN, cors_origins=cors) as svc:
            whip = f"http://127.0.0.1:{svc.http_port}/whip"
            assert origin != f"http://127.0.0.1:{svc.http_port}"
            async with Chromium.launch(microphone, OUTPUT / f"cors-{allow}" / "chromium.log") as browser:
                page = await browser.new_page(f"{origin}/?whip={whip}")
                result = await page.wait_for("window.result", 40, "the page's publish attempt")
                if not allow:
                    assert svc.registry.legs == {} and svc.whip.sessions == {}
                return dict(json.loads(json.dumps(result))) | {"console": page.console}


pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make system-deps)")


@pytest.mark.timeout(180)
async def test_allowed_origin_publishes_over_whip(make_service: ServiceFactory, tmp_path: Path) -> None:
    result = await publish_from_other_origin(make_service, tmp_path, allow=True)
    assert result.get("status") == 201, result
    assert result["location"] and result["location"].startswith("/whip/"), result  # Location is exposed
    assert result["state"] == "connected", result
    assert result["hangup"] == 200, result  # DELETE was preflighted and allowed


@pytest.mark.timeout(180)
async def test_other_origin_is_refused_by_the_browser(make_service: ServiceFactory, tmp_path: Path) -> None:
    result = await publish_from_other_origin(make_service, tmp_path, allow=False)
    assert "error" in result and "Failed to fetch" in result["error"], result
