"""Soak and scale: N concurrent RTP legs against one `callscribe serve` (embedded sphinx engine).

Each leg sends μ-law in 20 ms packets from its own UDP source to the auto-leg port: real speech
(the clips of /work/shared/audio, separated by pauses of silence, looped, each leg starting at
its own offset) with seeded 1 % loss and up to `--jitter-ms` of send jitter (which reorders).
While the legs run, the server and its sphinx worker processes are sampled from /proc (CPU,
RSS) and the server's /metrics (packets, drops, engine queue, overload errors); finals are read
back from Redis with their latency_ms.

Real time criterion (a step of --find-max passes when all hold):
  * no engine overload errors (the engine dropped audio because it fell behind),
  * p95 final latency <= --max-p95-ms (3000 by default),
  * every leg open at the end and every leg got finals,
  * the engine queue did not grow over the second half of the run (no backlog building up).

    .venv/bin/python bench/soak.py --legs 4 --seconds 60
    .venv/bin/python bench/soak.py --find-max --start 2 --step 2 --seconds 45

The last line is `RESULT ...`. Figures from a short run extrapolate memory growth to MB/hour
from a least-squares slope after warm-up; the 30-minute single-leg soak is `--legs 1 --seconds 1800`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from callscribe.bridge.rtp.packet import RtpPacket  # noqa: E402
from callscribe.bridge.rtp.sender import packetize  # noqa: E402
from callscribe.codecs import spec_by_name  # noqa: E402
from tests.support import CLIPS, free_port, load_clip, serve_command  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 1e6
PTIME_S = 0.020
LEGS_PER_SOURCE_HOST = 60  # the auto-leg port admits 64 legs per source address


# -- the looped speech ---------------------------------------------------------------------
def speech_payloads(pause_s: float) -> list[bytes]:
    """μ-law 20 ms payloads of every clip followed by `pause_s` of silence, in one loop."""
    parts = []
    for name in CLIPS:
        clip = load_clip(name)
        parts += [clip.pcm, np.zeros(int(clip.rate * pause_s), dtype=np.int16)]
    pcm = np.concatenate(parts)
    return [payload for _ts, payload in packetize(pcm, load_clip(CLIPS[0]).rate, spec_by_name("pcmu"), 20)]


@dataclass
class SenderStats:
    sent: int = 0
    lost: int = 0


async def run_legs(
    legs: int, port: int, seconds: float, payloads: list[bytes], loss: float, jitter_ms: float, seed: int
) -> SenderStats:
    """Every leg paced on one 20 ms clock; loss and jitter from a seeded generator."""
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    socks = []
    for i in range(legs):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((f"127.0.0.{1 + i // LEGS_PER_SOURCE_HOST}", 0))
        sock.setblocking(False)
        socks.append(sock)
    offsets = [rng.randrange(len(payloads)) for _ in range(legs)]
    ssrcs = [rng.getrandbits(32) for _ in range(legs)]
    seq0 = [rng.getrandbits(16) for _ in range(legs)]
    ts0 = [rng.getrandbits(32) for _ in range(legs)]
    stats = SenderStats()
    start = loop.time()
    k = 0
    try:
        while k * PTIME_S < seconds:
            for i, sock in enumerate(socks):
                if rng.random() < loss:
                    stats.lost += 1
                    continue
                packet = RtpPacket(
                    0,
                    (seq0[i] + k) & 0xFFFF,
                    (ts0[i] + 160 * k) & 0xFFFFFFFF,
                    ssrcs[i],
                    payloads[(offsets[i] + k) % len(payloads)],
                ).serialize()
                delay = rng.uniform(0, jitter_ms / 1000)
                loop.call_later(delay, _send, sock, packet, port)
                stats.sent += 1
            k += 1
            await asyncio.sleep(max(0.0, start + k * PTIME_S - loop.time()))
        await asyncio.sleep(jitter_ms / 1000 + 0.05)
    finally:
        for sock in socks:
            sock.close()
    return stats


def _send(sock: socket.socket, packet: bytes, port: int) -> None:
    # The socket may be closed already: the run ended while this packet was delayed by jitter.
    with contextlib.suppress(OSError):
        sock.sendto(packet, ("127.0.0.1", port))


# -- process sampling ------------------------------------------------------------------------
def process_tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        # Children are listed under the thread that forked them, not only the main thread.
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo += [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                continue
    return pids


def cpu_and_rss(pids: list[int]) -> tuple[float, float]:
    """Total CPU seconds and RSS (MB) of these processes."""
    cpu = rss = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            statm = Path(f"/proc/{pid}/statm").read_text().split()
        except OSError:
            continue
        cpu += (int(fields[11]) + int(fields[12])) / CLK_TCK
        rss += int(statm[1]) * PAGE_MB
    return cpu, rss


def metric_values(text: str) -> dict[str, float]:
    """name{labels} → value, and name → the sum over labels."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}"] = sample.value
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


@dataclass
class Sample:
    t: float
    cpu_s: float
    rss_mb: float
    queue: float
    legs: float


@dataclass
class StepResult:
    legs: int
    seconds: float
    legs_sustained: int
    cpu_per_leg_pct: float
    rss_mb: float
    mem_mb_per_hour: float
    drop_rate: float
    p95_final_ms: float | None
    finals: int
    overload_errors: int
    queue_growth: float
    sender: SenderStats
    drops_by_reason: dict[str, float] = field(default_factory=dict)

    @property
    def real_time(self) -> bool:
        return (
            self.overload_errors == 0
            and self.p95_final_ms is not None
            and self.p95_final_ms <= ARGS.max_p95_ms
            and self.legs_sustained == self.legs
            and self.queue_growth <= 2.0
        )

    def line(self) -> str:
        p95 = f"{self.p95_final_ms:.0f}" if self.p95_final_ms is not None else "none"
        return (
            f"legs={self.legs} sustained={self.legs_sustained} seconds={self.seconds:.0f} "
            f"cpu_per_leg={self.cpu_per_leg_pct:.1f}% rss={self.rss_mb:.0f}MB "
            f"mem_growth={self.mem_mb_per_hour:+.1f}MB/h drop_rate={self.drop_rate:.4%} "
            f"p95_final_latency_ms={p95} finals={self.finals} overload_errors={self.overload_errors} "
            f"queue_growth={self.queue_growth:+.1f} real_time={'yes' if self.real_time else 'no'}"
        )


def slope_per_hour(samples: list[Sample]) -> float:
    if len(samples) < 3:
        return 0.0
    t = np.array([s.t for s in samples])
    y = np.array([s.rss_mb for s in samples])
    return float(np.polyfit(t, y, 1)[0] * 3600)


# -- one step --------------------------------------------------------------------------------
async def soak_step(legs: int, seconds: float, payloads: list[bytes]) -> StepResult:
    prefix = f"soak-{uuid.uuid4().hex[:8]}"
    http_port, rtp_port = free_port(socket.SOCK_STREAM), free_port()
    env = {
        **os.environ,
        "CALLSCRIBE_AUDIOSOCKET_PORT": "0",
        "CALLSCRIBE_MAX_CALLS": str(max(100, legs)),
        "CALLSCRIBE_LOG_LEVEL": "warning",
    }
    server = subprocess.Popen(  # noqa: ASYNC220 - started once, before the legs
        serve_command(ARGS.redis_url, prefix, http_port, rtp_port, "--engine", "sphinx"),
        env=env,
        cwd=ROOT,
    )
    redis = aioredis.from_url(ARGS.redis_url, decode_responses=True)
    base = f"http://127.0.0.1:{http_port}"
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            await wait_ready(client, base, server)
            sampler_stop = asyncio.Event()
            samples: list[Sample] = []
            sampler = asyncio.create_task(sample_loop(client, base, server.pid, samples, sampler_stop))
            t0 = time.monotonic()
            cpu0, _ = cpu_and_rss(process_tree(server.pid))
            sender = await run_legs(legs, rtp_port, seconds, payloads, ARGS.loss, ARGS.jitter_ms, ARGS.seed)
            elapsed = time.monotonic() - t0
            cpu1, rss = cpu_and_rss(process_tree(server.pid))
            metrics = metric_values((await client.get(f"{base}/metrics")).text)
            sampler_stop.set()
            await sampler
        finals = await read_finals(redis, prefix)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        await cleanup(redis, prefix)
        await redis.aclose()
    latencies = [f[1] for f in finals if f[1] is not None]
    legs_with_finals = {f[0] for f in finals}
    half = [s for s in samples if s.t >= elapsed / 2]
    warm = [s for s in samples if s.t >= min(60.0, elapsed / 3)]  # after decoders and LMs load
    received = metrics.get("callscribe_packets_received_total", 0.0)
    dropped = metrics.get("callscribe_packets_dropped_total", 0.0)
    reasons = {
        k.split("{", 1)[1].rstrip("}"): v
        for k, v in metrics.items()
        if k.startswith("callscribe_packets_dropped_total{") and v
    }
    overload = int(
        sum(
            v
            for k, v in metrics.items()
            if k.startswith("callscribe_engine_errors_total{") and "overload" in k
        )
    )
    active = int(metrics.get("callscribe_active_legs", 0))
    return StepResult(
        legs=legs,
        seconds=elapsed,
        legs_sustained=min(active, len(legs_with_finals)),
        cpu_per_leg_pct=100 * (cpu1 - cpu0) / elapsed / legs,
        rss_mb=rss,
        mem_mb_per_hour=slope_per_hour(warm),
        drop_rate=dropped / received if received else 0.0,
        p95_final_ms=float(np.percentile(latencies, 95)) if latencies else None,
        finals=len(finals),
        overload_errors=overload,
        queue_growth=(half[-1].queue - half[0].queue) if len(half) >= 2 else 0.0,
        sender=sender,
        drops_by_reason=reasons,
    )


async def wait_ready(client: httpx.AsyncClient, base: str, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"callscribe serve exited with {server.returncode} before it was ready")
        try:
            if (await client.get(f"{base}/readyz")).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError("callscribe serve not ready within 90 s")


async def sample_loop(
    client: httpx.AsyncClient, base: str, pid: int, samples: list[Sample], stop: asyncio.Event
) -> None:
    t0 = time.monotonic()
    while not stop.is_set():
        cpu, rss = cpu_and_rss(process_tree(pid))
        try:
            metrics = metric_values((await client.get(f"{base}/metrics")).text)
        except httpx.HTTPError:
            metrics = {}
        samples.append(
            Sample(
                time.monotonic() - t0,
                cpu,
                rss,
                metrics.get("callscribe_engine_queue_depth", 0.0),
                metrics.get("callscribe_active_legs", 0.0),
            )
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), ARGS.sample_every)


async def read_finals(redis: aioredis.Redis, prefix: str) -> list[tuple[str, int | None]]:
    """(call_id, latency_ms) of every final published so far."""
    out: list[tuple[str, int | None]] = []
    entries = await redis.xrange(f"{prefix}:finals") or []
    for _id, fields in entries:
        if fields and fields.get("type") == "final":
            latency = fields.get("latency_ms")
            out.append((str(fields.get("call_id", "")), int(latency) if latency else None))
    return out


async def cleanup(redis: aioredis.Redis, prefix: str) -> None:
    keys = [key async for key in redis.scan_iter(match=f"{prefix}:*", count=1000)]
    if keys:
        await redis.delete(*keys)


# -- main ------------------------------------------------------------------------------------
async def main() -> None:
    payloads = speech_payloads(ARGS.pause_s)
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} cores, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} (shared)")
    if not ARGS.find_max:
        result = await soak_step(ARGS.legs, ARGS.seconds, payloads)
        print(result.line(), f"drops={result.drops_by_reason}", f"sender_lost={result.sender.lost}")
        print(f"RESULT {result.line()}")
        return
    best: StepResult | None = None
    legs = ARGS.start
    while legs <= ARGS.max_legs:
        result = await soak_step(legs, ARGS.seconds, payloads)
        print(f"step {result.line()} drops={result.drops_by_reason}", flush=True)
        if not result.real_time:
            break
        best = result
        legs += ARGS.step
    if best is None:
        print(f"RESULT max_realtime_legs=0 (even {ARGS.start} legs fell behind)")
    else:
        print(f"RESULT max_realtime_legs={best.legs} {best.line()}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--legs", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--find-max", action="store_true", help="step legs up until they stop keeping up")
    parser.add_argument("--start", type=int, default=2)
    parser.add_argument("--step", type=int, default=2)
    parser.add_argument("--max-legs", type=int, default=200)
    parser.add_argument("--loss", type=float, default=0.01)
    parser.add_argument("--jitter-ms", type=float, default=30)
    parser.add_argument("--pause-s", type=float, default=2.0, help="silence after each clip")
    parser.add_argument("--max-p95-ms", type=float, default=3000)
    parser.add_argument("--sample-every", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    return parser.parse_args()


ARGS = parse_args() if __name__ == "__main__" else argparse.Namespace()

if __name__ == "__main__":
    asyncio.run(main())
