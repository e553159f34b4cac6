"""Issue 17 item 1: RSS of `callscribe serve` (sphinx) and its workers before, during and
after a burst of RTP packets from many source ports to the auto-leg port.

    .venv/bin/python -m bench.burst_rss [--sources 500] [--packets 2000] [--after 60]

Prints one line per sample: seconds since the burst, serve RSS, each worker's RSS (MB, /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import time
from pathlib import Path

import httpx

from tests.support import free_port, serve_command, stop_process, wait_serve_ready

ROOT = Path(__file__).resolve().parents[1]


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0.0


def children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return found
    return found


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except FileNotFoundError:
        return ""


def workers(pid: int) -> list[int]:
    """The sphinx worker processes (not the resource tracker)."""
    return sorted(p for p in children(pid) if "resource_tracker" not in cmdline(p))


def snapshot(pid: int) -> tuple[float, list[float]]:
    return rss_mb(pid), [rss_mb(w) for w in workers(pid)]


def total(snap: tuple[float, list[float]]) -> float:
    return snap[0] + sum(snap[1])


def speech_payloads(count: int) -> list[bytes]:
    """`count` 20 ms PCMU payloads of a real speech clip (looped), so legs get Decoders."""
    from callscribe.codecs.g711 import PcmuEncoder
    from tests.support import CLIPS, load_clip

    clip = load_clip(CLIPS[0])
    pcm8k = clip.pcm[:: clip.rate // 8000]
    encoded = PcmuEncoder().encode(pcm8k)
    while len(encoded) < count * 160:
        encoded += encoded
    return [encoded[i * 160 : (i + 1) * 160] for i in range(count)]


def burst(rtp_port: int, sources: int, packets: int, pace: bool) -> None:
    """`packets` PCMU packets spread over `sources` sockets, consecutive sequence numbers per
    source (so each passes the auto-leg probation), as fast as the loop sends them."""
    socks = []
    try:
        for _ in range(sources):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        per_source = max(1, packets // sources)
        payloads = speech_payloads(per_source)
        for seq in range(per_source):
            for index, sock in enumerate(socks):
                header = bytes([0x80, 0]) + seq.to_bytes(2, "big") + (seq * 160).to_bytes(4, "big")
                header += (0x1000 + index).to_bytes(4, "big")
                sock.sendto(header + payloads[seq], ("127.0.0.1", rtp_port))
            if pace:
                time.sleep(0.02)
    finally:
        for sock in socks:
            sock.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sources", type=int, default=500)
    parser.add_argument("--packets", type=int, default=2000)
    parser.add_argument("--pace", action="store_true", help="20 ms between rounds (real-time speech)")
    parser.add_argument("--after", type=float, default=60.0)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    http_port, rtp_port = free_port(socket.SOCK_STREAM), free_port()
    env = {**os.environ, "CALLSCRIBE_AUDIOSOCKET_PORT": "0", "CALLSCRIBE_LEG_IDLE_TIMEOUT_SEC": "2"}
    prefix = f"bench-burst-{os.getpid()}"
    process = subprocess.Popen(  # noqa: ASYNC220 - started once, before any I/O
        serve_command(args.redis_url, prefix, http_port, rtp_port), cwd=ROOT, env=env
    )
    try:
        await wait_serve_ready(process, http_port)
        async with httpx.AsyncClient(timeout=2) as http:
            await asyncio.sleep(3)
            idle = snapshot(process.pid)
            workers_mb = [round(w) for w in idle[1]]
            print(f"idle    serve={idle[0]:.0f} workers={workers_mb} total={total(idle):.0f} MB")
            start = time.monotonic()
            burst(rtp_port, args.sources, args.packets, args.pace)
            peak = idle
            while (elapsed := time.monotonic() - start) < args.after:
                await asyncio.sleep(2)
                snap = snapshot(process.pid)
                peak = max(peak, snap, key=total)
                legs = (await http.get(f"http://127.0.0.1:{http_port}/v1/legs")).json()
                print(
                    f"t={elapsed:5.1f}s serve={snap[0]:.0f} workers={[round(w) for w in snap[1]]} "
                    f"total={total(snap):.0f} MB legs={len(legs)}",
                    flush=True,
                )
            after = snapshot(process.pid)
            print(
                f"peak total={total(peak):.0f} MB; after {args.after:.0f}s total={total(after):.0f} MB "
                f"({100 * (total(after) / total(idle) - 1):+.1f}% of idle)"
            )
    finally:
        stop_process(process, 45)


if __name__ == "__main__":
    asyncio.run(main())
