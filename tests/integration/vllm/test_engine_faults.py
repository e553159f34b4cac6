"""Engine failure, with real parts (CPU vLLM, tiny random-weight Qwen3-ASR): the engine process
SIGKILLed under legs streaming real speech. Legs get one `error`, nothing hangs, and decoding
continues once the engine is back. Words are random; the assertions are on events and utts.

- engine `vllm`: vLLM's engine-core process (a child of this test process) is killed; the
  in-process engine rebuilds its AsyncLLM.
- engine `remote`, whole service: the only `vllm serve` replica is killed mid-call under a real
  Service (RTP in, Redis out) and restarted on the same port; the same leg reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import random
import signal
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis.asyncio as aioredis

from callscribe.bridge.rtp.packet import RtpPacket
from callscribe.bridge.rtp.sender import packetize
from callscribe.codecs import spec_by_name
from callscribe.engine.base import SAMPLE_RATE, Audio, EngineError, Final, Recognition
from callscribe.engine.qwen3.local import RESTART_MESSAGE, LocalQwen3Engine
from callscribe.engine.qwen3.streaming import StreamingConfig
from callscribe.events import EventType, TranscriptEvent
from callscribe.service import Service
from callscribe.settings import Settings
from tests.integration.vllm.conftest import TINY_ENGINE_ARGS, TINY_MODEL
from tests.integration.vllm.test_remote import Server, _start_server, _wait_healthy
from tests.support import REDIS_URL, free_port, free_port_range, load_clip

pytestmark = pytest.mark.vllm

_RESTART_TIMEOUT = 300.0  # an engine or `vllm serve` start on two shared cores (~50 s idle)


def speech(name: str) -> Audio:
    return (load_clip(name).pcm.astype(np.float32) / 32768.0).astype(np.float32)


def silence(seconds: float) -> Audio:
    return np.zeros(int(seconds * SAMPLE_RATE), dtype=np.float32)


@dataclass
class Collector:
    events: list[tuple[float, Recognition]] = field(default_factory=list)

    def __call__(self, result: Recognition) -> None:
        self.events.append((time.monotonic(), result))

    def finals(self, after: float = 0.0) -> list[Final]:
        return [e for t, e in self.events if isinstance(e, Final) and t >= after]

    @property
    def errors(self) -> list[EngineError]:
        return [e for _, e in self.events if isinstance(e, EngineError)]


def descendants(pid: int) -> set[int]:
    """Pids of every process below `pid`, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def engine_cores() -> set[int]:
    """Pids of vLLM engine-core processes under this test process (vLLM titles them EngineCore)."""
    found = set()
    for pid in descendants(os.getpid()):
        with contextlib.suppress(OSError):
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if "EngineCore" in title or "EngineCore" in Path(f"/proc/{pid}/comm").read_text():
                found.add(pid)
    return found


async def wait_until(condition: object, timeout: float, what: str) -> float:
    """Poll `condition()` until true; fails with `what` after `timeout` seconds. Returns when."""
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what} (waited {timeout:.0f} s)"
        await asyncio.sleep(0.01)
    return time.monotonic()


async def feed(streams: list, audio: Audio, step_sec: float = 0.5, pause: float = 0.1) -> None:
    step = int(step_sec * SAMPLE_RATE)
    for start in range(0, audio.size, step):
        for stream in streams:
            stream.feed(audio[start : start + step])
        await asyncio.sleep(pause)


@pytest.fixture
async def own_engine(tiny_model: Path) -> AsyncIterator[tuple[LocalQwen3Engine, int]]:
    """An engine of this test's own (the session's must not be killed) and its engine-core
    pid. Long decodes (1500 tokens: seconds on the CPU) so every leg has a request in flight."""
    config = StreamingConfig(partial_max_tokens=1500, final_max_tokens=1500, final_tokens_per_sec=300.0)
    engine = LocalQwen3Engine(str(tiny_model), dict(TINY_ENGINE_ARGS), config)
    before = engine_cores()
    await engine.start()
    try:
        (core,) = engine_cores() - before
        yield engine, core
    finally:
        await engine.close()


async def test_vllm_engine_process_killed_mid_utterance_restarts_and_legs_continue(
    own_engine: tuple[LocalQwen3Engine, int], caplog: pytest.LogCaptureFixture
) -> None:
    engine, victim = own_engine
    outs = [Collector() for _ in range(4)]
    streams = [engine.open_stream("enginekill", f"leg{i}", out) for i, out in enumerate(outs)]
    first, second = speech("librivox-0870"), speech("librivox-0890")  # 7.1 s, 5.3 s
    head, rest = first[: 4 * SAMPLE_RATE], first[4 * SAMPLE_RATE :]
    caplog.set_level(logging.WARNING, logger="callscribe.engine.qwen3")

    # Every leg mid-utterance (partials decoding); then legs 0 and 1 end theirs (finals decoding).
    await feed(streams, np.concatenate([silence(0.3), head]))
    await feed(streams[:2], np.concatenate([rest, silence(1.0)]))
    await wait_until(
        lambda: engine.llm.get_num_unfinished_requests() == len(streams),
        30,
        "not every leg had a request in flight",
    )
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()

    # Each leg: one clear error, soon; the engine says it is not ready while it rebuilds.
    await wait_until(lambda: all(out.errors for out in outs), 30, "a leg got no error after the kill")
    await wait_until(lambda: not engine.ready, 10, "engine still ready with its process dead")
    # Legs 2 and 3 go on talking meanwhile: their utterance ends while the engine is down.
    await feed(streams[2:], np.concatenate([rest, silence(1.0)]))
    back_at = await wait_until(lambda: engine.ready, _RESTART_TIMEOUT, "the engine never came back")
    print(f"engine back {back_at - killed_at:.1f} s after the kill")  # shown with -s
    assert victim not in engine_cores()

    # The utterance open at the kill gets its final on the new engine, for every leg ...
    await wait_until(lambda: all(out.finals(killed_at) for out in outs), 120, "open utterance lost")
    # ... and later speech gets new finals.
    before = {i: max(f.utt for f in out.finals()) for i, out in enumerate(outs)}
    await feed(streams, np.concatenate([silence(1.0), second, silence(1.0)]))
    await asyncio.wait_for(asyncio.gather(*(s.finish() for s in streams)), 120)

    for i, out in enumerate(outs):
        errors = out.errors
        assert len(errors) == 1, f"leg {i}: {errors}"  # one per leg, not one per request
        assert errors[0].code == "engine_restart" and errors[0].message == RESTART_MESSAGE
        utts = [f.utt for f in out.finals()]
        assert utts == list(range(len(utts))), f"leg {i}: a final is missing or repeated: {utts}"
        assert errors[0].utt is not None and errors[0].utt in utts  # the cut utterance has its final
        assert max(utts) > before[i], f"leg {i}: no final for the speech after the restart"
        assert all(t > back_at for t, f in out.events if isinstance(f, Final) and f.utt > before[i])
    messages = [r.getMessage() for r in caplog.records]
    # Legs 0 and 1 had their final in flight: it was decoded again, not turned into an error.
    for stream in streams[:2]:
        assert any("cut by the engine's death" in m and stream.name in m for m in messages), stream.name
    assert sum("vLLM engine process died" in m and "restarting it" in m for m in messages) == 1
    assert any("vLLM engine restarted in" in m for m in messages)
    assert engine.llm.get_num_unfinished_requests() == 0


# -- engine remote: the whole service, its only replica killed and restarted ------------------


class LiveRtpLeg:
    """One RTP stream in real time (one socket, one SSRC: one leg): queued speech, and
    silence whenever nothing is queued, so the leg stays open for as long as the test needs."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._spec = spec_by_name("pcmu")
        self._queue: deque[bytes] = deque()
        self._silence = packetize(np.zeros(160, dtype=np.int16), 8000, self._spec, 20)[0][1]

    def say(self, audio: Audio) -> None:
        pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
        self._queue.extend(payload for _, payload in packetize(pcm, SAMPLE_RATE, self._spec, 20))

    @property
    def speaking(self) -> bool:
        return bool(self._queue)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        ssrc, start = random.getrandbits(32), loop.time()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for n in itertools.count():
                payload = self._queue.popleft() if self._queue else self._silence
                packet = RtpPacket(0, n & 0xFFFF, (160 * n) & 0xFFFFFFFF, ssrc, payload, marker=n == 0)
                sock.sendto(packet.serialize(), ("127.0.0.1", self.port))
                await asyncio.sleep(max(0.0, start + (n + 1) * 0.02 - loop.time()))


async def leg_events(redis: aioredis.Redis, prefix: str) -> list[TranscriptEvent]:
    """Every event of the one call under `prefix` (this test opens one leg)."""
    events = []
    async for key in redis.scan_iter(match=f"{prefix}:call:*", count=1000):
        events += [TranscriptEvent.from_fields(fields) for _id, fields in await redis.xrange(key)]
    # The call stream and the partials stream share no order: a leg's order is its seq.
    return sorted((e for e in events if e.leg), key=lambda e: e.seq)


async def wait_for_events(
    redis: aioredis.Redis,
    prefix: str,
    condition: Callable[[list[TranscriptEvent]], bool],
    timeout: float,
    what: str,
) -> list[TranscriptEvent]:
    deadline = time.monotonic() + timeout
    while not condition(events := await leg_events(redis, prefix)):
        assert time.monotonic() < deadline, f"{what} within {timeout:.0f} s; got {[e.type for e in events]}"
        await asyncio.sleep(0.2)
    return events


async def readiness(http: httpx.AsyncClient, url: str) -> int:
    return (await http.get(url)).status_code


@pytest.fixture
def replica(tiny_model: Path, tmp_path: Path) -> Iterator[Server]:
    server = _start_server(free_port(socket.SOCK_STREAM), tmp_path / "replica.log")
    try:
        _wait_healthy([server])
        yield server
    finally:
        server.kill()


async def test_remote_service_leg_gets_an_error_then_finals_after_its_replica_restarts(
    replica: Server, redis: aioredis.Redis, key_prefix: str, tmp_path: Path
) -> None:
    settings = Settings(
        redis_url=REDIS_URL,
        key_prefix=key_prefix,
        http_port=0,
        rtp_port=free_port(),
        rtp_port_range=free_port_range(),
        audiosocket_port=0,
        engine="remote",
        vllm_urls=[replica.url],
        model=str(TINY_MODEL),  # the tokenizer
        vllm_request_timeout_sec=5.0,
        vllm_health_interval_sec=0.5,
        vllm_priority_scheduling=True,
    )
    async with Service(settings) as service, httpx.AsyncClient(timeout=5) as http:
        readyz = f"http://127.0.0.1:{service.http_port}/readyz"
        assert await readiness(http, readyz) == 200
        leg = LiveRtpLeg(settings.rtp_port)
        sender = asyncio.create_task(leg.run())
        try:
            leg.say(np.concatenate([silence(0.3), speech("librivox-0870")]))  # 7 s of speech
            # Mid-utterance, with the leg decoding on the replica: kill it.
            await wait_for_events(
                redis, key_prefix, lambda es: any(e.type == EventType.PARTIAL for e in es), 30, "no partial"
            )
            assert leg.speaking
            replica.kill()
            killed_at = time.monotonic()
            deadline = time.monotonic() + 15
            while await readiness(http, readyz) != 503:
                assert time.monotonic() < deadline, "/readyz still 200 with the only replica dead"
                await asyncio.sleep(0.2)
            # The utterance ends while no replica is up: its final becomes the leg's error event.
            before = await wait_for_events(
                redis, key_prefix, lambda es: any(e.type == EventType.ERROR for e in es), 60, "no error event"
            )
            # The replica comes back on the same port; the service takes it in again.
            port = int(replica.url.rsplit(":", 1)[1])
            restarted = _start_server(port, tmp_path / "replica-restarted.log")
            replica.process = restarted.process  # the fixture kills whichever runs last
            await asyncio.to_thread(_wait_healthy, [restarted])
            deadline = time.monotonic() + 60  # the router's probe backoff is at most 30 s
            while await readiness(http, readyz) != 200:
                assert time.monotonic() < deadline, "/readyz not 200 with the replica back"
                await asyncio.sleep(0.2)
            back_at = time.monotonic()
            print(f"replica back in service {back_at - killed_at:.1f} s after the kill")  # shown with -s
            last_utt = max(e.utt for e in before if e.utt is not None)
            # The same leg goes on talking: its new utterances get finals again.
            leg.say(np.concatenate([silence(0.5), speech("librivox-0890"), silence(1.0)]))
            events = await wait_for_events(
                redis,
                key_prefix,
                lambda es: any(e.type == EventType.FINAL and (e.utt or 0) > last_utt for e in es),
                90,
                "no final for the speech after the restart",
            )
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender

    assert len({(e.call_id, e.leg) for e in events}) == 1, "the leg did not stay one leg"
    errors = [e for e in events if e.type == EventType.ERROR]
    assert errors and all(e.meta.get("code") == "engine" for e in errors), errors
    assert all("final decode failed" in e.text and replica.url in e.text for e in errors), errors
    error_utts = {e.utt for e in errors}
    finals = [e for e in events if e.type == EventType.FINAL]
    later = [f for f in finals if (f.utt or 0) > last_utt]
    assert later and {f.engine for f in later} == {"remote"}
    # Every utterance has exactly one outcome: a final, or the error that replaced it.
    outcomes = sorted([f.utt for f in finals] + [e.utt for e in errors])  # type: ignore[type-var]
    assert outcomes == list(range(len(outcomes))), outcomes
    assert not error_utts & {f.utt for f in finals}
