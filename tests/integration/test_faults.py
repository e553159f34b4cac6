"""Faults, in a short form (seconds each), with real parts: a Redis killed mid-load and restarted,
and SIGTERM to a `callscribe serve` process in the middle of a call. `make soak` runs the long forms
(bench/soak.py)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import time
import wave
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis.asyncio as aioredis

from callscribe.bridge.rtp.sender import send_wav
from callscribe.events import EventType, TranscriptEvent
from tests.support import (
    CLIPS,
    REDIS_URL,
    ServiceFactory,
    free_port,
    load_clip,
    serve_command,
    wait_serve_ready,
)

ROOT = Path(__file__).resolve().parents[2]
FinalKey = tuple[str, str, int]


def speech_wav(path: Path, pause_s: float = 1.5) -> Path:
    """The real clips one after another with pauses between them: several utterances per leg."""
    parts = []
    for name in CLIPS:
        clip = load_clip(name)
        parts += [clip.pcm, np.zeros(int(clip.rate * pause_s), dtype=np.int16)]
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(16000)
        wav.writeframes(np.concatenate(parts).astype("<i2").tobytes())
    return path


class RedisServer:
    """A redis-server of this test's own, on a free port, that can be SIGKILLed and restarted
    on the same port and data directory (append-only file fsynced on every write)."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port(socket.SOCK_STREAM)
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ping = subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True, text=True)
            if ping.stdout.strip() == "PONG":
                return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


async def gauge(client: httpx.AsyncClient, url: str, name: str) -> float:
    for line in (await client.get(url)).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not on {url}")


async def finals_in_redis(client: aioredis.Redis, prefix: str) -> dict[FinalKey, int]:
    """(call, leg, utt) → how many times that final is in the call streams."""
    counts: dict[FinalKey, int] = {}
    async for key in client.scan_iter(match=f"{prefix}:call:*", count=1000):
        for _id, fields in await client.xrange(key):
            event = TranscriptEvent.from_fields(fields)
            if event.type == EventType.FINAL:
                final = (event.call_id, event.leg, int(event.utt or 0))
                counts[final] = counts.get(final, 0) + 1
    return counts


async def test_redis_killed_mid_load_loses_no_final(
    make_service: ServiceFactory, own_redis: RedisServer, key_prefix: str, tmp_path: Path
) -> None:
    wav = speech_wav(tmp_path / "speech.wav")
    async with make_service(redis_url=own_redis.url, leg_idle_timeout_sec=1.5) as svc:
        emitted: list[TranscriptEvent] = []
        publish = svc.publisher.publish

        def recording_publish(event: TranscriptEvent) -> None:
            emitted.append(event)
            publish(event)

        svc.publisher.publish = recording_publish  # type: ignore[method-assign]
        metrics_url = f"http://127.0.0.1:{svc.http_port}/metrics"
        senders = [
            asyncio.create_task(send_wav(wav, "127.0.0.1", svc.settings.rtp_port, codec="pcmu"))
            for _ in range(2)
        ]
        async with httpx.AsyncClient(timeout=5) as http:
            await asyncio.sleep(2.5)
            own_redis.kill()
            killed_at = len(emitted)
            depths = []
            outage_end = time.monotonic() + 4
            while time.monotonic() < outage_end:
                depths.append(await gauge(http, metrics_url, "callscribe_outage_buffer_depth"))
                await asyncio.sleep(0.25)
            during_outage = len(emitted) - killed_at
            redis_up = await gauge(http, metrics_url, "callscribe_redis_up")
            own_redis.start()
            await asyncio.gather(*senders)
            deadline = time.monotonic() + 60
            while sum(e.type == EventType.CALL_ENDED for e in emitted) < 2 and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.2)
            assert await svc.publisher.wait_flushed(30), "the outage buffer never drained"
            final_depth = await gauge(http, metrics_url, "callscribe_outage_buffer_depth")

    assert during_outage > 0, "no event was published while Redis was down: the test saw no outage"
    assert max(depths) > 0, f"buffer depth never showed on /metrics during the outage: {depths}"
    assert redis_up == 0
    assert final_depth == 0
    expected = {(e.call_id, e.leg, int(e.utt or 0)) for e in emitted if e.type == EventType.FINAL}
    errors = [(e.text, e.meta) for e in emitted if e.type == EventType.ERROR]
    assert len(expected) >= 3, f"too few finals to judge: {expected}; engine errors: {errors}"
    client = aioredis.from_url(own_redis.url, decode_responses=True)
    try:
        stored = await finals_in_redis(client, key_prefix)
    finally:
        await client.aclose()
    lost = expected - set(stored)
    assert not lost, f"{len(lost)} of {len(expected)} finals lost in the outage: {sorted(lost)}"
    duplicated = {final: n for final, n in stored.items() if n > 1}
    assert not duplicated, f"finals written twice: {duplicated}"


@contextlib.asynccontextmanager
async def serve_process(
    key_prefix: str, drain_timeout: float
) -> AsyncIterator[tuple[subprocess.Popen[bytes], int, int]]:
    http_port, rtp_port = free_port(socket.SOCK_STREAM), free_port()
    process = subprocess.Popen(  # noqa: ASYNC220 - started once, before the test's I/O
        serve_command(REDIS_URL, key_prefix, http_port, rtp_port, "--drain-timeout", str(drain_timeout)),
        cwd=ROOT,
        env={
            "PATH": "/usr/bin:/bin",
            "CALLSCRIBE_AUDIOSOCKET_PORT": "0",
            "CALLSCRIBE_LEG_IDLE_TIMEOUT_SEC": "60",
        },
    )
    try:
        await wait_serve_ready(process, http_port)
        yield process, http_port, rtp_port
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def call_events(redis: aioredis.Redis, prefix: str) -> dict[str, list[TranscriptEvent]]:
    """Each call's events from its call stream (finals and lifecycle; partials are not read)."""
    calls: dict[str, list[TranscriptEvent]] = {}
    async for key in redis.scan_iter(match=f"{prefix}:call:*", count=1000):
        if key.endswith(":partials"):  # schema v2: same call_id, would replace the call stream's events
            continue
        events = [TranscriptEvent.from_fields(fields) for _id, fields in await redis.xrange(key)]
        if events:
            calls[events[0].call_id] = events
    return calls


async def test_sigterm_drains_open_legs_to_finals_and_exits_zero(
    redis: aioredis.Redis, key_prefix: str, tmp_path: Path
) -> None:
    drain_timeout = 20.0
    clip = load_clip("librivox-0870")  # 7 s of continuous speech: the utterance is open at SIGTERM
    async with serve_process(key_prefix, drain_timeout) as (process, _http_port, rtp_port):
        sender = asyncio.create_task(send_wav(clip.path, "127.0.0.1", rtp_port, codec="pcmu"))
        deadline = time.monotonic() + 20
        while not (calls := await call_events(redis, key_prefix)) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.2)
        assert calls, "the leg never started"
        await asyncio.sleep(2.5)
        assert not sender.done()
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        # A new source right after SIGTERM: a new leg must not be opened for it.
        late = asyncio.create_task(send_wav(clip.path, "127.0.0.1", rtp_port, codec="pcmu", speed=4))
        returncode = await asyncio.to_thread(process.wait, drain_timeout + 15)
        took = time.monotonic() - signalled
        sender.cancel()
        late.cancel()
        await asyncio.gather(sender, late, return_exceptions=True)

    assert returncode == 0, f"callscribe serve exited {returncode} after SIGTERM"
    assert took < drain_timeout + 5, f"drain took {took:.1f}s, timeout {drain_timeout}s"
    calls = await call_events(redis, key_prefix)
    assert len(calls) == 1, f"a leg was accepted after SIGTERM: {sorted(calls)}"
    (events,) = calls.values()
    types = [e.type for e in events]
    finals = [e for e in events if e.type == EventType.FINAL]
    assert finals and all(f.text for f in finals), f"the open utterance was not flushed to a final: {types}"
    assert max(f.end_ms or 0 for f in finals) >= 2000, (
        "the final does not cover the audio sent before SIGTERM"
    )
    assert EventType.LEG_ENDED in types and types[-1] == EventType.CALL_ENDED, types
    assert types.index(EventType.LEG_ENDED) > types.index(finals[-1].type)
