"""Issue 17 item 1: a burst of 2,000 RTP packets from 500 source ports to the auto-leg port of
a real `callscribe serve` (sphinx). Before the fix each worker grew from ~230 MB to ~2 GB and
kept it; now the service (workers included) is back within 10 % of its idle RSS a minute
after the burst, and the global auto-leg cap holds."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from pathlib import Path

import httpx

from bench.burst_rss import burst, snapshot, total
from tests.support import REDIS_URL, free_port, serve_command, stop_process, wait_serve_ready

ROOT = Path(__file__).resolve().parents[2]


async def test_burst_from_500_sources_returns_to_idle_rss_within_a_minute(key_prefix: str) -> None:
    http_port, rtp_port = free_port(socket.SOCK_STREAM), free_port()
    process = subprocess.Popen(  # noqa: ASYNC220 - started once, before the test's I/O
        serve_command(REDIS_URL, key_prefix, http_port, rtp_port),
        cwd=ROOT,
        env={
            "PATH": "/usr/bin:/bin",
            "CALLSCRIBE_AUDIOSOCKET_PORT": "0",
            "CALLSCRIBE_LEG_IDLE_TIMEOUT_SEC": "5",
            "CALLSCRIBE_MAX_AUTO_LEGS": "48",
        },
    )
    try:
        await wait_serve_ready(process, http_port)
        async with httpx.AsyncClient(timeout=5) as http:
            await asyncio.sleep(3)
            idle = snapshot(process.pid)
            assert len(idle[1]) >= 1 and all(idle[1]), f"no sphinx worker found: {idle}"
            # Real speech from 500 ports (PCMU), 4 packets each: every source passes probation.
            await asyncio.to_thread(burst, rtp_port, 500, 2000, False)
            await asyncio.sleep(0.5)
            during = snapshot(process.pid)
            legs = (await http.get(f"http://127.0.0.1:{http_port}/v1/legs")).json()
            assert 0 < len(legs) <= 48, f"the global auto-leg cap did not hold: {len(legs)} legs"
            await asyncio.sleep(60)
            after = snapshot(process.pid)
            left = (await http.get(f"http://127.0.0.1:{http_port}/v1/legs")).json()
    finally:
        stop_process(process, 45)
    print(f"RSS MB idle={idle} during={during} after={after}")
    assert not left, f"{len(left)} legs still open a minute after the burst"
    assert total(after) <= 1.10 * total(idle), (
        f"RSS not back within 10% of idle: idle {total(idle):.0f} MB, after {total(after):.0f} MB"
    )
