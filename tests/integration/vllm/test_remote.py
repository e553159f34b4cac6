"""Engine remote on two real `vllm serve` replicas (CPU, tiny random-weight Qwen3-ASR).

The servers start once for this module, concurrently (~50 s each, shared cores), and every
server process group is killed at the end, whatever happened. The replica kill runs last.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest

from callscribe.engine.base import SAMPLE_RATE, Audio, EngineError, Final, Partial, Recognition
from callscribe.engine.qwen3.backend import DecodeRequest
from callscribe.engine.qwen3.prompt import AUDIO_PLACEHOLDER, AUDIO_TOKEN, build_prompt
from callscribe.engine.qwen3.remote import RemoteQwen3Engine
from tests.integration.vllm.conftest import REPO, TINY_MODEL
from tests.support import free_port, load_clip, vllm_server_command

pytestmark = pytest.mark.vllm

_START_TIMEOUT = 420.0  # two servers starting together on two shared cores


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def kill(self) -> None:
        """SIGKILL the whole process group: the API server and its engine-core process."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


def _start_server(port: int, log: Path) -> Server:
    command = vllm_server_command(str(TINY_MODEL), port)
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Server(f"http://127.0.0.1:{port}", process, log)


def _wait_healthy(servers: list[Server]) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    waiting = list(servers)
    while waiting:
        for server in list(waiting):
            if server.process.poll() is not None:
                tail = server.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"vllm serve {server.url} exited {server.process.returncode}:\n{tail}")
            try:
                if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                    waiting.remove(server)
            except httpx.HTTPError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"vllm serve not healthy after {_START_TIMEOUT:.0f} s: {[s.url for s in waiting]}"
            )
        time.sleep(1.0)


@pytest.fixture(scope="module")
def replicas(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Server]]:
    logs = tmp_path_factory.mktemp("vllm-serve")
    servers: list[Server] = []
    try:
        for index in range(2):
            servers.append(_start_server(free_port(socket.SOCK_STREAM), logs / f"replica{index}.log"))
        _wait_healthy(servers)
        yield servers
    finally:
        for server in servers:
            server.kill()


@pytest.fixture
async def remote_engine(replicas: list[Server]) -> AsyncIterator[RemoteQwen3Engine]:
    engine = RemoteQwen3Engine(
        [s.url for s in replicas],
        str(TINY_MODEL),
        request_timeout=20.0,
        health_interval=0.5,
        priority_scheduling=True,
    )
    await engine.start()
    yield engine
    await engine.close()


@dataclass
class Collector:
    events: list[tuple[float, Recognition]] = field(default_factory=list)

    def __call__(self, result: Recognition) -> None:
        self.events.append((time.monotonic(), result))

    def of(self, kind: type) -> list[tuple[float, Recognition]]:
        return [(t, e) for t, e in self.events if isinstance(e, kind)]


def speech(name: str) -> Audio:
    return (load_clip(name).pcm.astype(np.float32) / 32768.0).astype(np.float32)


def silence(seconds: float) -> Audio:
    return np.zeros(int(seconds * SAMPLE_RATE), dtype=np.float32)


def three_utterances() -> Audio:
    return np.concatenate(
        [
            silence(0.3),
            speech("librivox-0870"),
            silence(1.2),
            speech("librivox-0890"),
            silence(1.2),
            speech("librivox-0880"),
            silence(1.0),
        ]
    )


class MisbehavingReplica:
    """A real HTTP server on a local port answering like a broken `vllm serve`: /health
    is fine, but every chat completion fails in the configured way."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.requests = 0
        self._server: asyncio.Server | None = None
        self.url = ""
        self._closing = asyncio.Event()

    async def __aenter__(self) -> MisbehavingReplica:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._closing.set()
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.decode().split("\r\n"):
                    if line.lower().startswith("content-length:"):
                        length = int(line.split(":", 1)[1])
                await reader.readexactly(length)
                if b"GET /health" in head:
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    await writer.drain()
                    continue
                if b"GET /v1/models" in head:
                    body = json.dumps({"data": [{"id": str(TINY_MODEL)}]}).encode()
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                    await writer.drain()
                    continue
                self.requests += 1
                if self.mode == "error":
                    writer.write(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 4\r\n\r\noops")
                elif self.mode == "malformed":
                    writer.write(
                        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
                        b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\ndata: {not json\n\n'
                    )
                    await writer.drain()
                    return
                elif self.mode == "hang":
                    await self._closing.wait()
                    return
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()


async def feed_realtime(
    streams: list, audio: Audio, step_sec: float = 0.5, pace: float = 0.5, until: float | None = None
) -> None:
    """Feed every leg `step_sec` of audio each `step_sec * pace` seconds (2x real time)."""
    step = int(step_sec * SAMPLE_RATE)
    for start in range(0, audio.size, step):
        for stream in streams:
            stream.feed(audio[start : start + step])
        await asyncio.sleep(step_sec * pace)


async def test_server_sees_exactly_callscribes_prompt_with_the_rollback_prefix(
    remote_engine: RemoteQwen3Engine,
) -> None:
    backend = remote_engine.admission.backend
    tokenizer = backend.tokenizer
    audio = speech("librivox-0880")
    prefix = "language English<asr_text>he said"
    prompt = build_prompt("Ada Lovelace", None, prefix)
    result = await backend.decode(DecodeRequest("prompt/leg/x/u0/p0", "partial", prompt, audio, 4), 1)
    assert not result.aborted and result.output_tokens == 4
    before, _, after = prompt.partition(AUDIO_PLACEHOLDER)
    seen = list(result.prompt_token_ids)
    pad = tokenizer.encode(AUDIO_TOKEN)[0]
    first, last = seen.index(pad), len(seen) - 1 - seen[::-1].index(pad)
    # Same tokens around the audio as the in-process prompt, ending in the prefix to continue.
    assert seen[:first] == tokenizer.encode(before + "<|audio_start|>")
    assert seen[last + 1 :] == tokenizer.encode("<|audio_end|>" + after)
    assert tokenizer.decode(seen[last + 1 :]).endswith(f"assistant\n{prefix}")
    assert result.audio_tokens == last - first + 1 > 20  # ~13 per second of audio


def server_metric(url: str, name: str, label: str = "") -> float:
    """Sum of a Prometheus metric's samples on a replica (those whose labels hold `label`)."""
    total = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith(name) and label in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


async def settled_metric(urls: list[str], name: str, timeout: float = 20) -> float:
    """A counter summed over replicas once nothing runs on them and it has stopped moving
    (vLLM adds a request's generated tokens when the request finishes)."""
    deadline = time.monotonic() + timeout
    last = -1.0
    while True:
        running = sum(server_metric(url, "vllm:num_requests_running") for url in urls)
        now = sum(server_metric(url, name) for url in urls)
        if running == 0 and now == last:
            return now
        assert time.monotonic() < deadline, f"replicas still busy after {timeout} s"
        last = now
        await asyncio.sleep(1.0)


async def test_superseding_closes_the_stream_and_vllm_aborts_the_request(
    remote_engine: RemoteQwen3Engine,
) -> None:
    backend = remote_engine.admission.backend
    urls = [replica.url for replica in remote_engine.router.replicas]
    generated = "vllm:generation_tokens_total"
    before = await settled_metric(urls, generated)
    started = asyncio.Event()
    # The random model (almost) never emits EOS: left alone this request generates all 3000
    # tokens (~5 s at the tiny model's ~550 tokens/s here).
    request = DecodeRequest("abort/leg/x/u0/p0", "partial", build_prompt(), speech("librivox-0880"), 3000)
    decode = asyncio.create_task(backend.decode(request, 1, started.set))
    await asyncio.wait_for(started.wait(), 60)
    # Abort at once: nothing may block this loop here. (An earlier version read the servers'
    # /metrics first; on this CPU a busy server took up to 4 s to answer, the request had
    # finished by then and the test failed for a reason of its own.)
    await backend.abort(request.request_id)
    result = await asyncio.wait_for(decode, 10)
    assert result.aborted
    # The server stopped the request: it generated a fraction of the 3000 tokens (counted by
    # the servers, not by what callscribe received).
    spent = await settled_metric(urls, generated) - before
    assert 1 <= spent < 1500, f"vLLM generated {spent:.0f} tokens for the request whose stream was closed"


@pytest.mark.parametrize("mode", ["error", "malformed", "hang"])
async def test_broken_replica_is_taken_out_and_decodes_retry_on_a_good_one(
    replicas: list[Server], mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with MisbehavingReplica(mode) as broken:
        engine = RemoteQwen3Engine(
            [broken.url, replicas[1].url],
            str(TINY_MODEL),
            request_timeout=3.0,
            health_interval=0.5,
            priority_scheduling=True,
        )
        await engine.start()
        try:
            outs = [Collector() for _ in range(2)]
            streams = [engine.open_stream("broken", f"leg{i}", out) for i, out in enumerate(outs)]
            audio = np.concatenate([silence(0.3), speech("librivox-0890"), silence(1.0)])
            with caplog.at_level(logging.WARNING, logger="callscribe.engine.qwen3.remote"):
                await feed_realtime(streams, audio, pace=0.25)
                await asyncio.wait_for(asyncio.gather(*(s.finish() for s in streams)), 60)
        finally:
            await engine.close()
    assert broken.requests >= 1  # the broken replica was tried ...
    assert not engine.router.replicas[0].up or engine.router.replicas[0].failures >= 1
    taken_out = [r.getMessage() for r in caplog.records if "taken out" in r.getMessage()]
    assert taken_out and broken.url in taken_out[0]  # ... said so clearly ...
    for out in outs:  # ... and nothing was lost: every leg got its final from the good replica
        finals = [e for _, e in out.of(Final)]
        assert [f.utt for f in finals] == [0]
        assert not out.of(EngineError)


async def test_when_every_replica_fails_the_final_becomes_an_error_event_not_a_hang(
    tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with MisbehavingReplica("error") as broken:
        engine = RemoteQwen3Engine([broken.url], str(tiny_model), request_timeout=1.0, health_interval=0.2)
        await engine.start()
        out = Collector()
        try:
            stream = engine.open_stream("dead", "leg", out)
            with caplog.at_level(logging.WARNING, logger="callscribe.engine.qwen3.remote"):
                stream.feed(np.concatenate([silence(0.3), speech("librivox-0880"), silence(1.0)]))
                await asyncio.wait_for(stream.finish(), 30)
        finally:
            await engine.close()
    errors = [e for _, e in out.of(EngineError)]
    assert len(errors) == 1 and errors[0].utt == 0 and "final decode failed" in errors[0].message
    assert broken.url in errors[0].message and "HTTP 500" in errors[0].message
    assert not out.of(Final)
    assert any("retrying" in r.getMessage() for r in caplog.records)


async def test_eight_legs_survive_a_replica_killed_mid_utterance(
    replicas: list[Server], remote_engine: RemoteQwen3Engine
) -> None:
    legs = 8
    outs = [Collector() for _ in range(legs)]
    streams = [remote_engine.open_stream("failover", f"leg{i}", out) for i, out in enumerate(outs)]
    audio = three_utterances()
    # Real time: the first utterance is 7 s long, so the kill lands inside it.
    feeding = asyncio.create_task(feed_realtime(streams, audio, pace=1.0))
    # Legs are decoding on both replicas before the kill.
    while sum(bool(out.of(Partial)) for out in outs) < legs // 2:
        assert not feeding.done(), "fewer than half the legs had a partial before the audio ended"
        await asyncio.sleep(0.05)
    deadline = time.monotonic() + 30
    victim = replicas[0]
    router = remote_engine.router
    on_victim = [i for i, s in enumerate(streams) if router.replica_of(s.name) is router.replicas[0]]
    assert 0 < len(on_victim) < legs
    # Mid-utterance and mid-request: kill while the victim is decoding for one of its legs.
    while router.replicas[0].in_flight == 0:
        assert time.monotonic() < deadline, "the victim never had a request in flight"
        await asyncio.sleep(0.01)
    open_utts = {i: outs[i].of(Partial)[-1][1].utt for i in on_victim if outs[i].of(Partial)}
    assert not feeding.done()
    victim.kill()
    killed_at = time.monotonic()
    await feeding
    await asyncio.wait_for(asyncio.gather(*(s.finish() for s in streams)), 120)

    assert not router.replicas[0].up
    backend = remote_engine.backend
    assert backend is not None and backend.retries >= 1  # a request in flight failed over
    expected = None
    for i, out in enumerate(outs):
        finals = [e for _, e in out.of(Final)]
        assert isinstance(finals[0], Final)
        utts = Counter(f.utt for f in finals)
        assert all(n == 1 for n in utts.values()), f"leg {i}: a final arrived twice: {utts}"
        assert sorted(utts) == list(range(len(utts))), f"leg {i}: a final is missing: {sorted(utts)}"
        expected = expected or sorted(utts)
        assert sorted(utts) == expected, f"leg {i} utterances {sorted(utts)} differ from {expected}"
        assert not out.of(EngineError), f"leg {i}: {out.of(EngineError)}"
    assert expected is not None and len(expected) >= 2
    for i in on_victim:
        # The utterance open on the dead replica got its final anyway (re-decoded elsewhere) ...
        assert open_utts.get(i, 0) in expected
        # ... and the leg went on producing partials on the surviving replica, soon.
        after = [t for t, _ in outs[i].of(Partial) if t > killed_at]
        assert after, f"leg {i}: no partial after the kill"
        delay = after[0] - killed_at
        print(f"leg {i}: first partial {delay:.2f} s after the kill")  # shown with -s
        assert delay < 15.0, f"leg {i}: first partial {delay:.1f} s after the kill"
        assert router.replica_of(streams[i].name) is router.replicas[1]
