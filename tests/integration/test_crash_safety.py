"""Issue 17 item 8: SIGKILL `callscribe serve` mid-call (real RTP, real sphinx), with Redis up
and with Redis down at the kill. Each uses a redis-server of its own (it is killed in the
second case). On restart the open call gets call.ended (reason bridge_lost), no worker or
resource tracker outlives the killed process, and every final is in Redis exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import wave
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from callscribe.bridge.rtp.sender import send_wav
from callscribe.events import EventType, TranscriptEvent
from tests.integration.test_faults import RedisServer, finals_in_redis, speech_wav
from tests.support import free_port, serve_command, stop_process, wait_serve_ready

ROOT = Path(__file__).resolve().parents[2]
LEASE_SEC = 3


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(FileNotFoundError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                for child in map(int, f.read().split()):
                    found += [child, *descendants(child)]
    return found


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for a reaper we don't control)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in status)
    except FileNotFoundError:
        return False


def start_serve(redis_url: str, prefix: str, spool: Path) -> tuple[subprocess.Popen[bytes], int, int]:
    http_port, rtp_port = free_port(socket.SOCK_STREAM), free_port()
    process = subprocess.Popen(
        serve_command(redis_url, prefix, http_port, rtp_port),
        cwd=ROOT,
        env={
            "PATH": "/usr/bin:/bin",
            "CALLSCRIBE_AUDIOSOCKET_PORT": "0",
            "CALLSCRIBE_LEG_IDLE_TIMEOUT_SEC": "60",
            "CALLSCRIBE_SPOOL_DIR": str(spool),
            "CALLSCRIBE_INSTANCE_LEASE_SEC": str(LEASE_SEC),
        },
    )
    return process, http_port, rtp_port


def long_speech_wav(directory: Path) -> Path:
    """The test clips with pauses, twice (~50 s): the call is still open at the kill even
    when the first final is slow to come on a loaded machine."""
    once = speech_wav(directory / "once.wav")
    with wave.open(str(once), "rb") as wav:
        params, frames = wav.getparams(), wav.readframes(wav.getnframes())
    path = directory / "speech.wav"
    with wave.open(str(path), "wb") as wav:
        wav.setparams(params)
        wav.writeframes(frames + frames)
    return path


def spooled_finals(spool: Path) -> set[tuple[str, str, int]]:
    found = set()
    for path in spool.glob("*.jsonl"):
        for line in path.read_bytes().splitlines():
            fields = json.loads(line)
            if fields.get("type") == EventType.FINAL:
                found.add((fields["call_id"], fields["leg"], int(fields["utt"])))
    return found


async def call_stream(client: aioredis.Redis, prefix: str, call_id: str) -> list[TranscriptEvent]:
    key = f"{prefix}:call:{{{call_id}}}"
    return [TranscriptEvent.from_fields(fields) for _id, fields in await client.xrange(key)]


@pytest.mark.parametrize("redis_down_at_kill", [False, True], ids=["redis-up", "redis-down"])
async def test_sigkill_mid_call_ends_call_on_restart_and_loses_no_final(
    tmp_path: Path, redis_down_at_kill: bool
) -> None:
    server = RedisServer(tmp_path)
    server.start()
    client = aioredis.from_url(server.url)
    prefix, spool = "crash", tmp_path / "spool"
    wav = long_speech_wav(tmp_path)
    first, http_port, rtp_port = start_serve(server.url, prefix, spool)
    second: subprocess.Popen[bytes] | None = None
    try:
        await wait_serve_ready(first, http_port)
        sender = asyncio.create_task(send_wav(wav, "127.0.0.1", rtp_port, codec="pcmu"))
        deadline = time.monotonic() + 60
        while not await finals_in_redis(client, prefix):
            assert time.monotonic() < deadline, "no final within 60 s"
            await asyncio.sleep(0.3)
        if redis_down_at_kill:
            server.kill()
            # The call goes on without Redis: finals made now must reach the spool.
            await asyncio.sleep(7)
        else:
            await asyncio.sleep(2)
        assert not sender.done(), "the call ended before the kill"
        helpers = descendants(first.pid)
        assert len(helpers) >= 2, f"expected sphinx workers under serve, found {helpers}"
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        deadline = time.monotonic() + 5
        while any(running(pid) for pid in helpers) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        assert not [pid for pid in helpers if running(pid)], "a worker or the resource tracker outlived serve"
        on_disk = spooled_finals(spool)
        if redis_down_at_kill:
            assert on_disk, "no final reached the spool while Redis was down"
            server.start()  # same port, same append-only file
            await client.aclose()  # its connections died with the server
            client = aioredis.from_url(server.url)

        second, http_port, _ = start_serve(server.url, prefix, spool)
        await wait_serve_ready(second, http_port)
        (call_id,) = {call for call, _leg, _utt in await finals_in_redis(client, prefix)}
        deadline = time.monotonic() + LEASE_SEC * 4 + 20
        while True:
            events = await call_stream(client, prefix, call_id)
            if any(e.type == EventType.CALL_ENDED for e in events):
                break
            assert time.monotonic() < deadline, f"no call.ended after restart: {[e.type for e in events]}"
            await asyncio.sleep(0.3)
        await asyncio.sleep(LEASE_SEC)  # a second sweep must not end it again
        events = await call_stream(client, prefix, call_id)
    finally:
        for process in (first, second):
            if process is not None:
                stop_process(process, 30)
        await client.aclose()
        server.stop()

    ended = [e for e in events if e.type == EventType.CALL_ENDED]
    leg_ended = [e for e in events if e.type == EventType.LEG_ENDED]
    assert len(ended) == 1 and ended[0].meta.get("reason") == "bridge_lost", ended
    assert len(leg_ended) == 1 and leg_ended[0].meta.get("reason") == "bridge_lost", leg_ended
    assert events[-1].type == EventType.CALL_ENDED
    finals = [e for e in events if e.type == EventType.FINAL]
    utts = [int(e.utt or 0) for e in finals]
    assert len(utts) == len(set(utts)), f"a final is in Redis twice: {utts}"
    assert utts == list(range(len(utts))), f"a final is missing (utts not dense): {utts}"
    assert {(call_id, "caller", u) for u in utts} >= on_disk, "a spooled final never reached Redis"
    assert leg_ended[0].seq > max(e.seq for e in events if e.leg == "caller" and e is not leg_ended[0])
