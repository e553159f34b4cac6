"""Kamailio (Debian package) with config/kamailio/ as shipped in front of two `callscribe
serve` instances (issue 14 item 3).

Plain calls and SIPREC sessions from sipp go to Kamailio, which spreads them over both
instances (dispatcher round-robin) and stays in the dialog (record_route): ACK, the speech's
finals and BYE all make it. Then one instance is SIGKILLed: the calls placed right after go
to the other one (the first one sent to the dead instance fails over after tm's fr_timer and
marks it inactive; OPTIONS probing keeps it out), every call is answered, transcribed and
ended, and the surviving instance is left with no call open.

Each instance has its own key prefix, so Redis also says which instance took which call.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from callscribe.events import EventType, TranscriptEvent
from tests.integration.sip_peers import SCENARIOS, PcapStream, write_pcmu_pcap
from tests.lab.peers import KAMAILIO, ROOT, kamailio_command, kamailio_config, kamailio_version, run_sipp_here
from tests.support import REDIS_URL, free_port, load_clip, serve_command, stop_process

pytestmark = pytest.mark.lab

LAB_SCENARIOS = Path(__file__).parent / "sipp"


@dataclass
class Instance:
    name: str
    prefix: str
    sip_port: int
    http_port: int
    process: subprocess.Popen[bytes]


@dataclass
class KamailioLog:
    """Kamailio's stderr, each line stamped with when it arrived."""

    lines: list[tuple[float, str]] = field(default_factory=list)

    def follow(self, stream: object) -> threading.Thread:
        def run() -> None:
            for raw in stream:  # type: ignore[attr-defined]
                self.lines.append((time.monotonic(), raw.decode(errors="replace").rstrip()))

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def first(self, pattern: str, after: float = 0.0) -> float | None:
        return next((t for t, line in self.lines if t >= after and re.search(pattern, line)), None)

    def text(self) -> str:
        return "\n".join(line for _t, line in self.lines[-80:])


def proxied_siprec_scenario(workdir: Path) -> str:
    """tests/integration/sipp/siprec_uac.xml taught to follow a route set: record the routes
    of the 200 and send ACK and BYE to its Contact along them (what any SBC does behind a
    proxy). The offer, the metadata and the media are the shipped scenario's."""
    xml = (SCENARIOS / "siprec_uac.xml").read_text()
    xml = xml.replace('<recv response="200" rtd="true">', '<recv response="200" rtd="true" rrs="true">')
    xml = xml.replace(
        '<ereg regexp="a=label:2" search_in="body" check_it="true" assign_to="label2"/>',
        '<ereg regexp="a=label:2" search_in="body" check_it="true" assign_to="label2"/>\n'
        '      <ereg regexp="Contact: &lt;sip:[^@]*@[^:]*:([0-9]+)" search_in="msg" check_it="true"'
        ' assign_to="contact,answered"/>\n'
        '      <log message="answered-by [$answered] [call_id]"/>',
    )
    for method in ("ACK", "BYE"):
        xml = xml.replace(
            f"{method} sip:srs@[remote_ip]:[remote_port] SIP/2.0", f"{method} [next_url] SIP/2.0"
        )
    xml = xml.replace(
        "      Max-Forwards: 70\n      Content-Length: 0",
        "      [routes]\n      Max-Forwards: 70\n      Content-Length: 0",
    )
    xml = xml.replace(
        '<Reference variables="recvonly,label2"/>', '<Reference variables="recvonly,label2,contact"/>'
    )
    assert xml.count("[next_url]") == 2 and xml.count("[routes]") == 2 and "answered-by" in xml
    (workdir / "siprec_proxy_uac.xml").write_text(xml)
    return "siprec_proxy_uac.xml"


async def wait_log(log: KamailioLog, pattern: str, after: float, timeout: float) -> float:
    """Seconds from `after` until Kamailio logs a line matching `pattern`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = log.first(pattern, after)
        if seen is not None:
            return seen - after
        await asyncio.sleep(0.2)
    raise AssertionError(f"kamailio logged no {pattern!r} within {timeout} s:\n{log.text()}")


def copy_files(folder: Path, sources: list[Path]) -> None:
    """sipp finds a scenario's pcaps in its working folder."""
    folder.mkdir()
    for source in sources:
        (folder / source.name).write_bytes(source.read_bytes())


async def place_calls(folder: Path, kam_port: int, name: str, calls: int, hold: list[str]) -> tuple[int, str]:
    """`calls` plain calls through Kamailio, one a second, from their own folder."""
    copy_files(folder, [folder.parent / "call.pcap", LAB_SCENARIOS / "plain_proxy_uac.xml"])
    call_id = f"{name}-{uuid.uuid4().hex[:6]}"
    return await run_sipp_here(
        folder / "plain_proxy_uac.xml", kam_port, folder, call_id=call_id, calls=calls, rate=1, extra=hold
    )


def answered_by(log: str) -> dict[str, int]:
    """Call-ID → SIP port of the instance whose Contact answered it (the scenarios log it)."""
    return {m.group(2): int(m.group(1)) for m in re.finditer(r"answered-by (\d+) (\S+)", log)}


def start_instance(name: str, workdir: Path, again: Instance | None = None) -> Instance:
    """A `callscribe serve` with SIP on; `again`: restart that instance on its ports."""
    prefix = again.prefix if again else f"cslab-kam-{name}-{uuid.uuid4().hex[:6]}"
    sip_port, http_port = (again.sip_port, again.http_port) if again else (free_port(), free_port())
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLSCRIBE_")}
    env.update(
        CALLSCRIBE_SIP_ENABLED="true",
        CALLSCRIBE_SIP_HOST="127.0.0.1",
        CALLSCRIBE_SIP_PORT=str(sip_port),
        CALLSCRIBE_AUDIOSOCKET_PORT="0",
        # sipp paces RTP by the wall clock of a loaded machine (see tests/integration/test_sip.py).
        CALLSCRIBE_JITTER_MS="400",
    )
    log = (workdir / f"serve-{name}.log").open("ab")
    process = subprocess.Popen(
        serve_command(REDIS_URL, prefix, http_port, free_port()),
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    return Instance(name, prefix, sip_port, http_port, process)


def start_kamailio(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(kamailio_command(config), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def wait_ready(instance: Instance, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2) as http:
        while time.monotonic() < deadline:
            assert instance.process.poll() is None, f"callscribe serve {instance.name} exited"
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(f"http://127.0.0.1:{instance.http_port}/readyz")).status_code == 200:
                    return
            await asyncio.sleep(0.3)
    raise AssertionError(f"callscribe serve {instance.name} not ready within {timeout} s")


async def open_calls(instance: Instance) -> tuple[float, float]:
    async with httpx.AsyncClient(timeout=5) as http:
        text = (await http.get(f"http://127.0.0.1:{instance.http_port}/metrics")).text
    values = {}
    for name in ("callscribe_active_calls", "callscribe_active_legs"):
        match = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
        assert match, f"{name} missing from /metrics"
        values[name] = float(match.group(1))
    return values["callscribe_active_calls"], values["callscribe_active_legs"]


async def call_events(
    redis: aioredis.Redis, prefix: str, call_id: str, timeout: float = 120
) -> list[TranscriptEvent]:
    key = f"{prefix}:call:{{{call_id}}}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = [TranscriptEvent.from_fields(f) for _id, f in await redis.xrange(key)]
        if any(e.type == EventType.CALL_ENDED for e in events):
            return events
        await asyncio.sleep(0.3)
    raise AssertionError(f"no call.ended for {call_id} under {prefix} within {timeout} s")


@pytest.fixture
async def redis_client() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(REDIS_URL, decode_responses=True)
    yield client
    keys = [k async for k in client.scan_iter(match="cslab-kam-*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()


async def test_kamailio_spreads_calls_and_fails_over(tmp_path: Path, redis_client: aioredis.Redis) -> None:
    assert KAMAILIO is not None, "kamailio (Debian package kamailio) is not installed"
    print("kamailio", kamailio_version())
    a, b = start_instance("a", tmp_path), start_instance("b", tmp_path)
    kamailio: subprocess.Popen[bytes] | None = None
    try:
        kam_port = free_port()
        config = kamailio_config(tmp_path / "kamailio", kam_port, [a.sip_port, b.sip_port])
        await wait_ready(a)
        await wait_ready(b)
        kamailio = start_kamailio(config)
        kam_log = KamailioLog()
        kam_log.follow(kamailio.stderr)
        assert kamailio.poll() is None, kam_log.text()

        clip = load_clip("librivox-0870")
        seconds = write_pcmu_pcap(tmp_path / "call.pcap", [PcapStream(clip, max_sec=4)])
        write_pcmu_pcap(
            tmp_path / "siprec.pcap",
            [
                PcapStream(clip, port_offset=0, max_sec=4),
                PcapStream(load_clip("librivox-0890"), port_offset=2, max_sec=4),
            ],
        )
        hold = ["-d", str(int((seconds + 1.0) * 1000))]
        siprec = proxied_siprec_scenario(tmp_path)
        by_port = {a.sip_port: a, b.sip_port: b}

        # 1. Both instances up: plain calls and SIPREC sessions are spread over both.
        placed: dict[str, str] = {}
        plain_id, siprec_id = f"kam-plain-{uuid.uuid4().hex[:6]}", f"kam-rec-{uuid.uuid4().hex[:6]}"
        plain_dir, rec_dir = tmp_path / "plain1", tmp_path / "rec1"
        copy_files(plain_dir, [tmp_path / "call.pcap", LAB_SCENARIOS / "plain_proxy_uac.xml"])
        copy_files(rec_dir, [tmp_path / "siprec.pcap", tmp_path / siprec])
        (plain_rc, plain_log), (rec_rc, rec_log) = await asyncio.gather(
            run_sipp_here(
                plain_dir / "plain_proxy_uac.xml",
                kam_port,
                plain_dir,
                call_id=plain_id,
                calls=4,
                rate=2,
                extra=hold,
            ),
            run_sipp_here(
                rec_dir / siprec, kam_port, rec_dir, call_id=siprec_id, calls=2, rate=1, extra=hold
            ),
        )
        assert plain_rc == 0, plain_log + kam_log.text()
        assert rec_rc == 0, rec_log + kam_log.text()
        answered = answered_by(plain_log) | answered_by(rec_log)
        assert len(answered) == 6, answered
        for call_id, port in answered.items():
            placed[call_id] = by_port[port].prefix
        assert {port for port in answered.values()} == {a.sip_port, b.sip_port}, answered
        for call_id, prefix in placed.items():
            events = await call_events(redis_client, prefix, call_id)
            assert any(e.type == EventType.FINAL and e.text for e in events), (call_id, events)
            if call_id.startswith("kam-rec"):
                assert {e.leg for e in events if e.type == EventType.LEG_STARTED} == {
                    "alice@example.com",
                    "bob@example.com",
                }
        spread = {i.name: sum(p == i.prefix for p in placed.values()) for i in (a, b)}
        print("phase 1 spread (instance: calls):", spread)

        # 2. SIGKILL instance a; the calls placed right after all land on b.
        killed_at = time.monotonic()
        a.process.send_signal(signal.SIGKILL)
        a.process.wait(5)
        after_rc, after_log = await place_calls(tmp_path / "after", kam_port, "kam-after", 4, hold)
        assert after_rc == 0, after_log + kam_log.text()
        answered_after = answered_by(after_log)
        assert len(answered_after) == 4 and set(answered_after.values()) == {b.sip_port}, answered_after
        for call_id in answered_after:
            events = await call_events(redis_client, b.prefix, call_id)
            assert any(e.type == EventType.FINAL and e.text for e in events), (call_id, events)
            assert not await redis_client.exists(f"{a.prefix}:call:{{{call_id}}}")
        # Round-robin sent one of them to a: that INVITE went to b after fr_timer.
        marked = kam_log.first(rf"127\.0\.0\.1:{a.sip_port}.*marked inactive", killed_at)
        assert marked is not None, kam_log.text()
        # 3. a comes back on the same address: OPTIONS probing puts it back in the pool.
        restarted_at = time.monotonic()
        a = start_instance("a", tmp_path, again=a)
        await wait_ready(a)
        ready_sec = time.monotonic() - restarted_at
        up = await wait_log(kam_log, rf"instance sip:127\.0\.0\.1:{a.sip_port}.* up", restarted_at, 30)
        back_rc, back_log = await place_calls(tmp_path / "back", kam_port, "kam-back", 2, hold)
        assert back_rc == 0, back_log + kam_log.text()
        assert set(answered_by(back_log).values()) == {a.sip_port, b.sip_port}, answered_by(back_log)

        # 4. SIGKILL a again with no call in flight: OPTIONS probing alone takes it out, and
        # the calls after that go straight to b (no INVITE waits on a, nothing marked).
        a.process.send_signal(signal.SIGKILL)
        a.process.wait(5)
        killed_again_at = time.monotonic()
        down = await wait_log(kam_log, rf"instance sip:127\.0\.0\.1:{a.sip_port}.* down", killed_again_at, 40)
        marks_before = sum("marked inactive" in line for _t, line in kam_log.lines)
        last_rc, last_log = await place_calls(tmp_path / "last", kam_port, "kam-last", 2, hold)
        assert last_rc == 0, last_log + kam_log.text()
        assert set(answered_by(last_log).values()) == {b.sip_port}, answered_by(last_log)
        assert sum("marked inactive" in line for _t, line in kam_log.lines) == marks_before, kam_log.text()
        for call_id in answered_by(last_log):
            events = await call_events(redis_client, b.prefix, call_id)
            assert any(e.type == EventType.FINAL and e.text for e in events), (call_id, events)

        # No half-set-up call: every call b took has ended and b holds nothing open.
        await asyncio.sleep(1.0)
        assert await open_calls(b) == (0.0, 0.0)
        print(
            "SIGKILL during calls: failure route marked a inactive",
            f"{marked - killed_at:.1f} s after the kill",
            f"| restarted a: ready after {ready_sec:.1f} s, back in the pool (probe) after {up:.1f} s",
            f"| SIGKILL idle: probing took a out after {down:.1f} s",
        )
    finally:
        if kamailio is not None:
            stop_process(kamailio, 10)
        for instance in (a, b):
            stop_process(instance.process, 30)
