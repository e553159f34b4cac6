"""The lab: real peers in real processes. Asterisk is built from ../shared/vendor by
scripts/asterisk.sh (cached), configured per test from the files in config/asterisk/ as shipped
(only addresses, ports and secrets substituted) and run unprivileged in the foreground from a
temporary folder; callscribe runs as a `callscribe serve` subprocess with the embedded engine.

Lab tests run only when selected with `-m lab` (scripts/test-lab.sh, part of `make test`, which
fails when any of them is skipped): in a plain `pytest tests` they are skipped with that reason,
so the main run does not pay for them twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from callscribe.events import EventType, TranscriptEvent

# The lab runs real bridges against the real Redis: the integration fixtures (including the
# session check that Redis answers) apply here too.
from tests.integration import conftest as integration
from tests.support import AUDIO_DIR, free_port, free_udp_block, serve_command, stop_process

_redis_is_up = integration._redis_is_up
key_prefix = integration.key_prefix
make_service = integration.make_service
redis = integration.redis

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "config" / "asterisk"
EXAMPLE_TOML = REPO / "config" / "callscribe.example.toml"
REDIS_URL = "redis://127.0.0.1:6379/0"
# How long a peer may take to start on a loaded 2-core machine.
START_TIMEOUT_S = 90


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "lab: real peers (Asterisk from source...): run by scripts/test-lab.sh"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    selected = "lab" in str(config.getoption("markexpr") or "")
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.lab)
            if not selected:
                item.add_marker(pytest.mark.skip(reason="lab test: run with -m lab (scripts/test-lab.sh)"))


# -- files as shipped --------------------------------------------------------------------


def shipped(name: str, substitutions: Mapping[str, str] | None = None) -> str:
    """config/asterisk/<name> with each `old` text replaced by `new`. Every `old` must occur:
    when the shipped file changes, the lab fails here instead of running something else."""
    text = (SHIPPED / name).read_text()
    for old, new in (substitutions or {}).items():
        if old not in text:
            raise AssertionError(f"config/asterisk/{name} no longer contains {old!r}; update the lab test")
        text = text.replace(old, new)
    return text


def phone_wav(name: str, folder: Path) -> Path:
    """A clip of ../shared/audio as 8 kHz 16-bit mono WAV (what Playback() reads without
    transcoding); returns the path without `.wav`, as Playback() wants it."""
    out = folder / f"{name}-8k"
    subprocess.run(
        ["sox", str(AUDIO_DIR / f"{name}.wav"), "-r", "8000", "-c", "1", "-b", "16", f"{out}.wav"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return out


def tail(path: Path, lines: int = 60) -> str:
    if not path.is_file():
        return f"({path} does not exist)"
    # The lab's own `asterisk -rx` polls would fill the tail of Asterisk's console.
    kept = [
        line for line in path.read_text(errors="replace").splitlines() if "Remote UNIX connection" not in line
    ]
    return "\n".join(kept[-lines:])


# -- Asterisk ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def asterisk_prefix() -> Path:
    """The installed tree of scripts/asterisk.sh (built on first use, then cached)."""
    if shutil.which("sox") is None:
        pytest.fail("sox is missing (scripts/system-deps.sh installs it)")
    # Built beforehand by scripts/test-lab.sh: a build here would run under a test's timeout.
    done = subprocess.run([str(REPO / "scripts" / "asterisk.sh"), "--cached"], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"Asterisk is not built ({done.stderr.strip()}); scripts/test-lab.sh builds it first")
    prefix = Path(done.stdout.strip().splitlines()[-1])
    assert (prefix / "usr" / "sbin" / "asterisk").is_file(), f"no asterisk binary under {prefix}"
    return prefix


# Modules that would listen on fixed well-known ports (two lab runs at once would clash) and
# that no lab test uses.
NOLOAD = ("chan_iax2.so", "chan_skinny.so", "chan_mgcp.so", "chan_unistim.so", "pbx_dundi.so", "res_hep.so")


@dataclass
class Asterisk:
    """One Asterisk process with its own configuration folder. Write the test's files with
    `write()`, then `start()`; `cli()` is `asterisk -rx`."""

    prefix: Path
    root: Path
    run_dir: Path  # short: the control socket path must fit in sun_path
    process: subprocess.Popen[bytes] | None = None
    rtp_ports: tuple[int, int] = (0, 0)

    @property
    def etc(self) -> Path:
        return self.root / "etc"

    @property
    def console_log(self) -> Path:
        return self.root / "console.log"

    def write(self, name: str, text: str) -> Path:
        path = self.etc / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def write_base(self) -> None:
        var, spool, log = self.root / "var", self.root / "spool", self.root / "log"
        for folder in (self.etc, var, var / "keys", var / "agi-bin", spool, log, self.run_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.write(
            "asterisk.conf",
            f"""[directories]
astetcdir => {self.etc}
astmoddir => {self.prefix}/usr/lib/asterisk/modules
astvarlibdir => {var}
astdbdir => {var}
astkeydir => {var}/keys
astdatadir => {self.prefix}/var/lib/asterisk
astagidir => {var}/agi-bin
astspooldir => {spool}
astrundir => {self.run_dir}
astlogdir => {log}
astsbindir => {self.prefix}/usr/sbin

[options]
verbose = 3
; Wait() and friends send silence: a real call's media never stops while it is up, and
; AudioSocket() gives up after 2 s without a frame.
transmit_silence = yes
""",
        )
        noload = "".join(f"noload => {name}\n" for name in NOLOAD)
        self.write("modules.conf", f"[modules]\nautoload = yes\n{noload}")
        self.write(
            "logger.conf",
            "[general]\n[logfiles]\nconsole => notice,warning,error,verbose\n"
            "messages.log => notice,warning,error,verbose,dtmf\n",
        )
        low = free_udp_block(200, 30000, 39000, even=True, stride=10)
        self.rtp_ports = (low, low + 199)
        self.write("rtp.conf", f"[general]\nrtpstart = {low}\nrtpend = {low + 199}\n")

    def command(self, *args: str) -> list[str]:
        return [str(self.prefix / "usr" / "sbin" / "asterisk"), "-C", str(self.etc / "asterisk.conf"), *args]

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "LD_LIBRARY_PATH": str(self.prefix / "usr" / "lib")}

    def start(self) -> None:
        assert self.process is None, "already started"
        with self.console_log.open("wb") as out:
            self.process = subprocess.Popen(
                self.command("-f", "-n"),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"asterisk exited with {self.process.returncode}:\n{tail(self.console_log)}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"asterisk not up in {START_TIMEOUT_S} s:\n{tail(self.console_log)}")
            done = subprocess.run(
                self.command("-rx", "core waitfullybooted"),
                capture_output=True,
                text=True,
                env=self.env,
                timeout=60,
            )
            if done.returncode == 0 and "fully booted" in done.stdout.lower():
                return
            time.sleep(0.3)

    def cli(self, command: str, timeout: float = 30) -> str:
        done = subprocess.run(
            self.command("-rx", command), capture_output=True, text=True, env=self.env, timeout=timeout
        )
        if done.returncode != 0:
            raise AssertionError(f"asterisk -rx {command!r} failed: {done.stdout}{done.stderr}")
        return done.stdout

    async def acli(self, command: str, timeout: float = 30) -> str:
        return await asyncio.to_thread(self.cli, command, timeout)

    async def wait_db(self, family: str, key: str, timeout: float = 120) -> str:
        """Wait until the dialplan has written DB(family/key) (the lab's "got this far" marker)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = await self.acli(f"database get {family} {key}")
            if out.strip().startswith("Value:"):
                return out.split(":", 1)[1].strip()
            await asyncio.sleep(0.3)
        channels = await self.acli("core show channels verbose")
        raise AssertionError(
            f"DB {family}/{key} not set in {timeout} s; channels:\n{channels}\n{self.log_tail()}"
        )

    async def hangup_all(self) -> float:
        """Hang up every channel from the PBX side; returns the wall time just before."""
        at = time.time()
        await self.acli("channel request hangup all")
        return at

    def log_tail(self, lines: int = 80) -> str:
        return f"--- asterisk console (last {lines} lines)\n{tail(self.console_log, lines)}"

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(Exception):
            self.cli("core stop now", timeout=10)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def asterisk(asterisk_prefix: Path, tmp_path: Path) -> Iterator[Asterisk]:
    """An unstarted Asterisk with its base files (asterisk.conf, modules.conf, logger.conf,
    rtp.conf) written; the test writes the rest and calls start(). Stopped at teardown."""
    run_dir = Path(tempfile.mkdtemp(prefix="ast-"))
    pbx = Asterisk(asterisk_prefix, tmp_path / "asterisk", run_dir)
    pbx.write_base()
    try:
        yield pbx
    finally:
        pbx.stop()
        print(pbx.log_tail())
        shutil.rmtree(run_dir, ignore_errors=True)


# -- callscribe serve --------------------------------------------------------------------


@dataclass
class Callscribe:
    process: subprocess.Popen[bytes]
    log: Path
    key_prefix: str
    http_port: int
    audiosocket_port: int
    sip_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def log_tail(self, lines: int = 60) -> str:
        return f"--- callscribe serve (last {lines} lines)\n{tail(self.log, lines)}"


ServeFactory = Callable[..., Awaitable[Callscribe]]


@pytest.fixture
async def serve(key_prefix: str, tmp_path: Path) -> AsyncIterator[ServeFactory]:
    """`await serve(CALLSCRIBE_X="...")`: a real `callscribe serve` from the shipped
    config/callscribe.example.toml (embedded sphinx engine; this test's Redis key prefix,
    loopback addresses and free ports) with those settings in its environment, ready."""
    started: list[Callscribe] = []

    async def start(**settings: str) -> Callscribe:
        http_port, audiosocket_port = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_STREAM)
        sip_port = free_port()
        log = tmp_path / f"callscribe-{len(started)}.log"
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/root"),
            "CALLSCRIBE_HTTP_HOST": "127.0.0.1",
            "CALLSCRIBE_RTP_HOST": "127.0.0.1",
            # The example's public address (203.0.113.10, a documentation address) is what SIP
            # answers and /v1/legs hand out: here it is this machine.
            "CALLSCRIBE_RTP_PUBLIC_HOST": "127.0.0.1",
            "CALLSCRIBE_AUDIOSOCKET_PORT": str(audiosocket_port),
            "CALLSCRIBE_SIP_PORT": str(sip_port),
            **settings,
        }
        # The shipped example settings, with addresses and ports of this test substituted.
        command = serve_command(
            REDIS_URL, key_prefix, http_port, free_port(), "--engine", "sphinx", "--config", str(EXAMPLE_TOML)
        )
        with log.open("wb") as out:
            process = subprocess.Popen(  # noqa: ASYNC220 - started once, before the test's I/O
                command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        bridge = Callscribe(process, log, key_prefix, http_port, audiosocket_port, sip_port)
        started.append(bridge)
        async with httpx.AsyncClient(timeout=2) as client:
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                if process.poll() is not None:
                    raise AssertionError(
                        f"callscribe serve exited with {process.returncode}\n{bridge.log_tail()}"
                    )
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"callscribe serve not ready in {START_TIMEOUT_S} s\n{bridge.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{bridge.url}/readyz")).status_code == 200:
                        return bridge
                await asyncio.sleep(0.2)

    try:
        yield start
    finally:
        for bridge in started:
            stop_process(bridge.process, 30)
            print(bridge.log_tail())


# -- reading the calls back --------------------------------------------------------------


@dataclass
class CallLog:
    """Every event of every call under one key prefix, as read so far."""

    redis: aioredis.Redis
    prefix: str
    calls: dict[str, list[TranscriptEvent]] = field(default_factory=dict)

    async def refresh(self) -> dict[str, list[TranscriptEvent]]:
        async for key in self.redis.scan_iter(match=f"{self.prefix}:call:*", count=1000):
            if key.endswith(b":partials" if isinstance(key, bytes) else ":partials"):
                continue  # a call's partials stream: finals and lifecycle are in the call stream
            events = [TranscriptEvent.from_fields(fields) for _id, fields in await self.redis.xrange(key)]
            if events:
                self.calls[events[0].call_id] = events
        return self.calls

    async def wait(
        self, check: Callable[[dict[str, list[TranscriptEvent]]], bool], what: str, timeout: float = 120
    ) -> dict[str, list[TranscriptEvent]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check(await self.refresh()):
                return self.calls
            await asyncio.sleep(0.25)
        summary = {cid: [(e.type.value, e.leg, e.text) for e in ev][-12:] for cid, ev in self.calls.items()}
        raise AssertionError(f"{what}: not within {timeout} s; events so far: {summary}")

    async def wait_settled(self, legs: int, quiet_s: float = 1.5, timeout: float = 120) -> None:
        """Wait until `legs` legs have spoken and are quiet: each one's last recognition is a
        final, with no new event for `quiet_s` (the played speech has all been decoded)."""
        last_change = time.monotonic()
        seen: tuple[int, ...] = ()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            calls = await self.refresh()
            counts = tuple(len(events) for events in calls.values())
            if counts != seen:
                seen, last_change = counts, time.monotonic()
            finished = 0
            for events in calls.values():
                for leg in {e.leg for e in events if e.leg}:
                    speech = [
                        e for e in events if e.leg == leg and e.type in (EventType.PARTIAL, EventType.FINAL)
                    ]
                    if speech and speech[-1].type == EventType.FINAL:
                        finished += 1
            if finished >= legs and time.monotonic() - last_change >= quiet_s:
                return
            await asyncio.sleep(0.25)
        raise AssertionError(f"{legs} legs not settled within {timeout} s: {self.calls}")


@pytest.fixture
def call_log(redis: aioredis.Redis, key_prefix: str) -> CallLog:
    return CallLog(redis, key_prefix)


def leg_events(calls: Mapping[str, list[TranscriptEvent]], kind: EventType) -> list[TranscriptEvent]:
    return [e for events in calls.values() for e in events if e.type == kind]


def contains(path: Path, text: str) -> bool:
    return path.is_file() and text in path.read_text(errors="replace")


async def wait_script_ready(
    process: subprocess.Popen[bytes], log: Path, marker: str, timeout: float = 30
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{log.name} exited with {process.returncode}:\n{tail(log)}")
        if contains(log, marker):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"{log.name} did not log {marker!r} in {timeout} s:\n{tail(log)}")


PYTHON = sys.executable
