"""baresip (Debian) as a plain SIP caller (issue 14 item 4): a softphone whose microphone is
a speech clip (the aufile module) calls callscribe's SIP server, its finals arrive in Redis,
and hanging up on the phone (ctrl_tcp "hangup" → BYE) ends the leg promptly."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import jiwer
import pytest
import redis.asyncio as aioredis

from callscribe.events import EventType, TranscriptEvent
from tests.support import ServiceFactory, finals_text, free_port, free_port_range, load_clip

pytestmark = pytest.mark.lab

BARESIP = shutil.which("baresip")
MODULES = Path("/usr/lib/baresip/modules")


def baresip_version() -> str:
    assert BARESIP is not None
    out = subprocess.run([BARESIP, "-h"], capture_output=True, text=True)
    return (out.stdout + out.stderr).split()[1]


def baresip_folder(folder: Path, microphone: Path, sip_port: int, ctrl_port: int) -> Path:
    """A baresip config folder: no sound card (aufile as microphone), G.711, commands over
    ctrl_tcp, one account that does not register."""
    folder.mkdir()
    low, high = (int(p) for p in free_port_range(10).split("-"))
    (folder / "config").write_text(
        f"poll_method\tepoll\n"
        f"sip_listen\t127.0.0.1:{sip_port}\n"
        f"audio_source\taufile,{microphone}\n"
        # No player module on a headless machine: what callscribe sends back (nothing) is
        # not played; baresip logs that and keeps the call.
        f"audio_player\taufile,{folder / 'unused.wav'}\n"
        f"rtp_ports\t{low}-{high}\n"
        f"module_path\t{MODULES}\n"
        "module\tg711.so\n"
        "module\taufile.so\n"
        "module_app\taccount.so\n"
        "module_app\tmenu.so\n"
        "module_app\tctrl_tcp.so\n"
        f"ctrl_tcp_listen\t127.0.0.1:{ctrl_port}\n"
    )
    (folder / "accounts").write_text("<sip:alice@127.0.0.1>;regint=0;audio_codecs=PCMU\n")
    return folder


async def ctrl(port: int, command: str, params: str = "") -> None:
    """One ctrl_tcp command (a JSON netstring)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps({"command": command, "params": params, "token": command}).encode()
    writer.write(f"{len(body)}:".encode() + body + b",")
    await writer.drain()
    with contextlib.suppress(TimeoutError):  # the reply only tells us it was read
        await asyncio.wait_for(reader.read(4096), 3)
    writer.close()
    await writer.wait_closed()


async def connect_ctrl(port: int, process: asyncio.subprocess.Process, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.returncode is None, "baresip exited"
        try:
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.2)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise AssertionError("baresip's ctrl_tcp did not open")


async def test_baresip_call_is_transcribed_and_hangup_ends_the_leg(
    make_service: ServiceFactory, redis: aioredis.Redis, key_prefix: str, tmp_path: Path
) -> None:
    assert BARESIP is not None, "baresip (Debian package baresip) is not installed"
    clip = load_clip("librivox-0870")
    microphone = tmp_path / "mic.wav"
    # aufile plays the file at its own rate: give it the phone's 8 kHz mono.
    sox = await asyncio.create_subprocess_exec(
        "sox", str(clip.path), "-r", "8000", "-c", "1", "-b", "16", str(microphone)
    )
    assert await sox.wait() == 0
    ctrl_port = free_port(socket.SOCK_STREAM)
    folder = baresip_folder(tmp_path / "baresip", microphone, free_port(), ctrl_port)
    print("baresip", baresip_version())
    async with make_service(sip_enabled=True, sip_port=free_port(), jitter_ms=400) as svc:
        log = (tmp_path / "baresip.log").open("wb")
        phone = await asyncio.create_subprocess_exec(
            BARESIP, "-f", str(folder), "-n", "127.0.0.1", "-v",
            stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            await connect_ctrl(ctrl_port, phone)
            await ctrl(ctrl_port, "dial", f"sip:transcribe@127.0.0.1:{svc.sip.port}")
            index = f"{key_prefix}:calls"
            call_id = await first_call(redis, index)
            key = f"{key_prefix}:call:{{{call_id}}}"
            events, last = await read_until(
                redis, key, "0-0", lambda es: has_final_after(es, clip.seconds), 90
            )
            hung_up_at = time.monotonic()
            await ctrl(ctrl_port, "hangup")
            more, last = await read_until(
                redis, key, last, lambda es: any(e.type == EventType.LEG_ENDED for e in es), 30
            )
            latency = time.monotonic() - hung_up_at
            if not any(e.type == EventType.CALL_ENDED for e in more):
                more += (
                    await read_until(
                        redis, key, last, lambda es: any(e.type == EventType.CALL_ENDED for e in es), 10
                    )
                )[0]
        finally:
            if phone.returncode is None:
                phone.terminate()
                await phone.wait()
            log.close()
    events += more
    heard = finals_text(events, "caller")
    ended = next(e for e in events if e.type == EventType.LEG_ENDED)
    wer = jiwer.wer(clip.reference, heard)
    print(
        f"baresip call: WER {wer:.2f}, heard {heard!r};",
        f"hangup → leg.ended {latency * 1000:.0f} ms, {ended.meta}",
    )
    assert events[0].type == EventType.CALL_STARTED
    assert "baresip" in json.dumps(events[0].meta).lower(), events[0].meta  # its User-Agent
    assert wer <= 0.6, (heard, clip.reference)
    assert ended.meta["reason"] == "hangup", ended.meta
    assert latency < 2.0, f"leg.ended {latency:.2f} s after the hangup"
    assert events[-1].type == EventType.CALL_ENDED, [e.type.value for e in events[-3:]]


def has_final_after(events: list[TranscriptEvent], seconds: float) -> bool:
    """A final whose utterance ends near the clip's end: the whole clip was heard."""
    return any(e.type == EventType.FINAL and (e.end_ms or 0) >= (seconds - 2.0) * 1000 for e in events)


async def first_call(redis: aioredis.Redis, index: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for _id, fields in await redis.xrange(index):
            return str(fields["call_id"])
        await asyncio.sleep(0.2)
    raise AssertionError("baresip's call never started in callscribe")


async def read_until(
    redis: aioredis.Redis, key: str, last: str, done: object, timeout: float
) -> tuple[list[TranscriptEvent], str]:
    events: list[TranscriptEvent] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reply = await redis.xread({key: last}, block=200, count=1000)
        for _stream, entries in reply:
            for entry_id, fields in entries:
                last = entry_id
                events.append(TranscriptEvent.from_fields(fields))
        if done(events):  # type: ignore[operator]
            return events, last
    raise AssertionError(f"timed out reading {key}; got {[e.type.value for e in events]}")
