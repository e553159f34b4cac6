"""`callscribe demo`: a real bridge process, a real RTP call, the transcript read back from Redis.

Everything crosses a real boundary: `callscribe serve` runs as its own process, the call is
sent as paced RTP over UDP, and what is printed comes from Redis Streams, as any consumer sees it.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import httpx

from callscribe.bridge.rtp.sender import send_wav
from callscribe.events import EventType, TranscriptEvent
from callscribe.publish.connect import connect
from callscribe.publish.tail import follow
from callscribe.settings import redact_url

# Its own key prefix: on a shared Redis the demo never writes into a deployment's keys.
DEMO_PREFIX = "callscribe-demo"


def default_clip() -> Path | None:
    """$CALLSCRIBE_DEMO_CLIP, else the call bundled in the package (callscribe/data/README.md)."""
    override = os.environ.get("CALLSCRIBE_DEMO_CLIP")
    if override:
        return Path(override)
    bundled = resources.files("callscribe") / "data" / "demo-call.wav"
    return Path(str(bundled)) if bundled.is_file() else None


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _free_port_range(size: int = 8) -> str:
    """A LOW-HIGH range of even UDP ports free now, for the one leg the demo reserves."""
    for _ in range(50):
        low = _free_port(socket.SOCK_DGRAM) & ~1
        if low + size > 65535:
            continue
        try:
            for port in range(low, low + size):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return f"{low}-{low + size - 1}"
    raise RuntimeError("no free range of UDP ports for the demo's RTP leg")


async def _wait_ready(http: httpx.AsyncClient, server: asyncio.subprocess.Process, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if server.returncode is not None:
            raise RuntimeError(f"callscribe serve exited with code {server.returncode} before it was ready")
        try:
            reply = await http.get("/readyz")
            if reply.status_code == 200:
                return
            last = reply.text
        except httpx.TransportError as exc:
            last = str(exc) or type(exc).__name__
        await asyncio.sleep(0.2)
    raise RuntimeError(f"callscribe serve not ready after {timeout:.0f}s: {last}")


async def run_demo(
    clip: Path,
    *,
    redis_url: str,
    speed: float,
    codec: str,
    echo: Callable[[str], None],
    fmt: Callable[[TranscriptEvent], str],
) -> None:
    redis = connect(redis_url)
    try:
        await redis.ping()
    except Exception as exc:
        raise RuntimeError(
            f"Redis is not reachable at {redis_url} ({exc}); start it or set --redis-url"
        ) from None

    http_port = _free_port(socket.SOCK_STREAM)
    api_token = secrets.token_urlsafe(24)
    env = {
        **os.environ,
        "CALLSCRIBE_REDIS_URL": redis_url,
        "CALLSCRIBE_KEY_PREFIX": DEMO_PREFIX,
        "CALLSCRIBE_HTTP_PORT": str(http_port),
        "CALLSCRIBE_HTTP_HOST": "127.0.0.1",
        "CALLSCRIBE_RTP_HOST": "127.0.0.1",
        "CALLSCRIBE_RTP_PORT": str(_free_port(socket.SOCK_DGRAM)),
        "CALLSCRIBE_RTP_PORT_RANGE": _free_port_range(),
        # Free ports, never a fixed one another program may hold: AudioSocket on any port, no SIP.
        "CALLSCRIBE_AUDIOSOCKET_HOST": "127.0.0.1",
        "CALLSCRIBE_AUDIOSOCKET_PORT": "0",
        "CALLSCRIBE_SIP_ENABLED": "false",
        "CALLSCRIBE_ENGINE": "sphinx",
        # The demo's private bridge: only this machine, and its legs API behind a one-off token.
        "CALLSCRIBE_ALLOW_NETWORKS": "127.0.0.0/8",
        "CALLSCRIBE_API_TOKEN": api_token,
        "CALLSCRIBE_LOG_LEVEL": os.environ.get("CALLSCRIBE_LOG_LEVEL", "warning"),
    }
    echo(f"starting callscribe serve (HTTP :{http_port}, embedded sphinx engine)")
    server = await asyncio.create_subprocess_exec(sys.executable, "-m", "callscribe", "serve", env=env)
    # SIGTERM (a CI timeout, `kill`) cancels the demo so its bridge is stopped, not orphaned.
    demo = asyncio.current_task()
    if demo is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, demo.cancel)
    call_id = f"demo-{uuid.uuid4().hex[:8]}"
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{http_port}",
            headers={"Authorization": f"Bearer {api_token}"},
            timeout=30,
        ) as http:
            await _wait_ready(http, server, timeout=120)
            reply = await http.post("/v1/legs", json={"call_id": call_id, "leg": "caller", "codec": codec})
            if reply.status_code != 201:
                raise RuntimeError(f"POST /v1/legs failed: {reply.status_code} {reply.text}")
            leg = reply.json()
            echo(f"call {call_id}: sending {clip.name} as RTP {codec} to {leg['rtp_host']}:{leg['rtp_port']}")
            stream = f"{DEMO_PREFIX}:call:{{{call_id}}}"
            echo(f"events: Redis {redact_url(redis_url)}, stream {stream} (key prefix {DEMO_PREFIX}):")

            finals = 0

            async def print_events() -> None:
                nonlocal finals
                async for _entry, event in follow(redis, DEMO_PREFIX, call_id=call_id, start="0-0"):
                    echo(fmt(event))
                    finals += event.type == EventType.FINAL
                    if event.type == EventType.CALL_ENDED:
                        return

            printer = asyncio.create_task(print_events())
            await send_wav(clip, leg["rtp_host"], leg["rtp_port"], codec=codec, speed=speed)
            reply = await http.delete(f"/v1/legs/{leg['leg_id']}")
            if reply.status_code != 204:
                raise RuntimeError(f"DELETE /v1/legs failed: {reply.status_code} {reply.text}")
            try:
                await asyncio.wait_for(printer, timeout=30)
            except TimeoutError:
                raise RuntimeError("no call.ended event within 30 s of hanging up") from None
            if finals == 0:
                raise RuntimeError("the call ended without a single final transcript")
            echo(
                f"done: {finals} finals; replay with `callscribe tail --redis-url {redis_url} "
                f"--key-prefix {DEMO_PREFIX} --call-id {call_id} --from-start`"
            )
    finally:
        if server.returncode is None:
            server.terminate()
            await server.wait()
        await redis.aclose()
