"""Sizing the sphinx engine: Decoder init time, memory per leg, real-time factor per core.

    .venv/bin/python bench/sphinx_engine.py --legs 4

One worker process (one core's worth of decoding) takes `--legs` legs at once, each fed the
three test clips back to back as fast as the backlog allows. Reports the worker's start time,
the time to open a leg (pooled Decoder vs new one), resident memory per extra leg, and the
audio seconds decoded per wall second (≈ legs one core sustains in real time).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.support's clips

from callscribe.engine.base import SAMPLE_RATE, Recognition
from callscribe.engine.sphinx import SphinxEngine, SphinxOptions
from tests.support import CLIPS, load_clip

FRAME = SAMPLE_RATE // 50


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process: wall time means little on a shared box."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(legs: int) -> None:
    audio = np.concatenate([load_clip(name).pcm for name in CLIPS]).astype(np.float32) / 32768.0
    engine = SphinxEngine(workers=1, max_backlog_s=3600, options=SphinxOptions(worker_nice=0))
    started = time.perf_counter()
    await engine.start()
    print(f"worker start (spawn + model + first Decoder): {time.perf_counter() - started:.2f}s wall, ")
    print(f"  in worker {engine.worker_init_s[0]:.2f}s, RSS {engine.worker_rss_mb[0]:.0f} MB")
    results: list[list[Recognition]] = [[] for _ in range(legs)]
    streams = []
    rss = [engine.worker_rss_mb[0]]
    for index in range(legs):
        streams.append(engine.open_stream("bench", f"leg{index}", results[index].append))
        await asyncio.sleep(2.0)  # let the worker build the Decoder and report its RSS
        rss.append(engine.worker_rss_mb[0])
    print(f"open leg (s, first from the pool): {[round(s, 3) for s in engine.open_latency_s]}")
    print(f"worker RSS after each open (MB): {[round(r) for r in rss]}")
    pid = engine.worker_pids[0]
    assert pid is not None
    cpu_before = cpu_seconds(pid)
    started = time.perf_counter()
    for at in range(0, audio.size, FRAME):
        for stream in streams:
            stream.feed(audio[at : at + FRAME])
        await asyncio.sleep(0)
    await asyncio.gather(*(s.finish() for s in streams))
    wall = time.perf_counter() - started
    cpu = cpu_seconds(pid) - cpu_before
    seconds = audio.size / SAMPLE_RATE
    print(f"{legs} legs x {seconds:.1f}s audio in {wall:.1f}s on one worker")
    print(f"  wall per audio second per leg (RTF per leg): {wall / (legs * seconds):.3f}")
    print(f"  audio seconds per wall second (legs per core in real time): {legs * seconds / wall:.2f}")
    print(f"  worker CPU per audio second per leg (CPU RTF): {cpu / (legs * seconds):.3f}")
    print(f"  => legs one core sustains in real time: {legs * seconds / cpu:.2f}")
    await engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--legs", type=int, default=4)
    asyncio.run(run(parser.parse_args().legs))


if __name__ == "__main__":
    main()
