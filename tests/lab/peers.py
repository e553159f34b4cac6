"""Real peers for the lab tests of issue 14 items 3–5: a Redis Cluster from Debian's
redis-server, Kamailio from Debian's package, baresip. Each runs from a throwaway folder
on free loopback ports, started and killed by the test that uses it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.crc import key_slot as local_key_slot

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")


def free_tcp_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free right now whose cluster bus port (+10000) is free too."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port in ports or port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        ports.append(port)
    return ports


def cli(port: int, *args: str, timeout: float = 10) -> str:
    assert REDIS_CLI is not None
    out = subprocess.run(
        [REDIS_CLI, "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return out.stdout.strip()


def _info(port: int, command: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in cli(port, *command.split(), timeout=3).splitlines():
        name, sep, value = line.partition(":")
        if sep:
            values[name.strip()] = value.strip()
    return values


@dataclass
class RedisClusterLab:
    """3 masters + 3 replicas, cluster mode, short node timeout so a killed master's
    replica takes over within a few seconds."""

    root: Path
    node_timeout_ms: int = 1000
    ports: list[int] = field(default_factory=list)
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    started_sec: float = 0.0

    @property
    def url(self) -> str:
        # Two seeds: the client can rediscover the cluster if one of them is the killed node.
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[:2])

    def start(self) -> None:
        assert REDIS_SERVER is not None and REDIS_CLI is not None, "redis-server/redis-cli not installed"
        began = time.monotonic()
        self.ports = free_tcp_ports(6)
        for port in self.ports:
            folder = self.root / str(port)
            folder.mkdir(parents=True)
            log = (folder / "redis.log").open("wb")
            self.procs[port] = subprocess.Popen(
                [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
                 "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                 "--cluster-node-timeout", str(self.node_timeout_ms),
                 "--save", "", "--appendonly", "no", "--protected-mode", "no", "--daemonize", "no"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        for port in self.ports:
            self._wait(lambda p=port: cli(p, "ping") == "PONG", f"redis-server on {port}", 10)  # type: ignore[misc]
        out = subprocess.run(
            [REDIS_CLI, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", "1", "--cluster-yes"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, f"redis-cli --cluster create failed: {out.stdout}\n{out.stderr}"
        self._wait(self._settled, "cluster_state:ok on every node with 3 replicas", 30)
        self._wait_replicas_streaming(30)
        self.started_sec = time.monotonic() - began

    def _settled(self) -> bool:
        live = [p for p in self.ports if self.procs[p].poll() is None]
        if any(_info(p, "cluster info").get("cluster_state") != "ok" for p in live):
            return False
        # A replica whose first sync has not finished would refuse to fail over (its data
        # age is unbounded), so wait for every link to be up.
        replication = [_info(p, "info replication") for p in live]
        return sum(r.get("role") == "slave" and r.get("master_link_status") == "up" for r in replication) == 3

    def _wait_replicas_streaming(self, timeout: float) -> None:
        """`master_link_status:up` is not enough: after a diskless (socket) full sync a Redis 7
        master holds the replication stream until the replica's first REPLCONF ACK (sent once
        a second), so for up to ~1 s every write exists on the master alone and a master
        killed then takes it with it (the replica is promoted with an empty data set). Write
        a probe key through every master and WAIT for its replica to acknowledge it."""
        for port in self.ports:
            own = next(line for line in cli(port, "cluster", "nodes").splitlines() if "myself" in line)
            parts = own.split()
            if "master" not in parts[2]:
                continue
            spans = [span.partition("-") for span in parts[8:] if span[:1].isdigit()]
            owned = [(int(low), int(high or low)) for low, _, high in spans]
            probe = next(
                name
                for name in (f"lab-probe-{i}" for i in range(100_000))
                if any(low <= local_key_slot(name.encode()) <= high for low, high in owned)
            )
            client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=timeout)
            try:
                client.set(probe, "1")
                client.delete(probe)
                acked = int(client.execute_command("WAIT", 1, int(timeout * 1000)))
            finally:
                client.close()
            assert acked >= 1, f"the replica of master {port} did not acknowledge a write in {timeout} s"

    def master_of_slot(self, slot: int) -> int | None:
        """The port of the master serving `slot` as a live node sees it (None mid-failover)."""
        for port in self.ports:
            if self.procs[port].poll() is not None:
                continue
            for line in cli(port, "cluster", "nodes").splitlines():
                parts = line.split()
                if "master" not in parts[2] or "fail" in parts[2]:
                    continue
                for span in parts[8:]:
                    low, _, high = span.partition("-")
                    if low.isdigit() and int(low) <= slot <= int(high or low):
                        return int(parts[1].split(":")[1].split("@")[0])
        return None

    def replicas_of(self, master_port: int) -> list[int]:
        return [
            p
            for p in self.ports
            if p != master_port
            and self.procs[p].poll() is None
            and _info(p, "info replication").get("master_port") == str(master_port)
        ]

    def kill(self, port: int) -> None:
        self.procs[port].send_signal(signal.SIGKILL)
        self.procs[port].wait(5)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        for proc in self.procs.values():
            proc.wait(5)

    @staticmethod
    def _wait(check: object, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if check():  # type: ignore[operator]
                    return
            except (subprocess.SubprocessError, OSError):
                pass
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}")


def key_slot(port: int, key: str) -> int:
    return int(cli(port, "cluster", "keyslot", key))


def env_without(*names: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in names}


KAMAILIO = shutil.which("kamailio")
ROOT = Path(__file__).resolve().parents[2]
KAMAILIO_CONFIG = ROOT / "config" / "kamailio"


def kamailio_version() -> str:
    assert KAMAILIO is not None
    out = subprocess.run([KAMAILIO, "-v"], capture_output=True, text=True)
    return out.stdout.splitlines()[0].removeprefix("version: ").strip()


def kamailio_config(folder: Path, port: int, instances: list[int]) -> Path:
    """config/kamailio/ as shipped, with only addresses, ports and file paths substituted;
    checked with `kamailio -c` before use."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = (KAMAILIO_CONFIG / "kamailio-callscribe.cfg").read_text()
    substituted = cfg.replace("0.0.0.0:5060", f"127.0.0.1:{port}").replace("/etc/kamailio/", f"{folder}/")
    assert substituted.count(f"127.0.0.1:{port}") == 2 and f"{folder}/" in substituted, "config changed shape"
    (folder / "kamailio.cfg").write_text(substituted)
    dispatcher = (KAMAILIO_CONFIG / "dispatcher.list").read_text()
    for shipped, port_of in zip(("10.0.0.21:5060", "10.0.0.22:5060"), instances, strict=True):
        assert shipped in dispatcher
        dispatcher = dispatcher.replace(shipped, f"127.0.0.1:{port_of}")
    (folder / "dispatcher.list").write_text(dispatcher)
    address = (KAMAILIO_CONFIG / "address.list").read_text()
    assert "10.0.0.0 24" in address
    (folder / "address.list").write_text(address.replace("10.0.0.0 24", "127.0.0.1 32"))
    assert KAMAILIO is not None
    check = subprocess.run(
        [KAMAILIO, "-c", "-f", str(folder / "kamailio.cfg")], capture_output=True, text=True
    )
    assert check.returncode == 0, f"kamailio -c rejects the config:\n{check.stdout}\n{check.stderr}"
    return folder / "kamailio.cfg"


def kamailio_command(config: Path) -> list[str]:
    """Kamailio in the foreground, logging to stderr, few children, small memory, runtime
    files in the config's folder (never /run/kamailio)."""
    assert KAMAILIO is not None
    folder = config.parent
    return [
        KAMAILIO, "-f", str(config), "-DD", "-E", "-n", "2", "-m", "64", "-M", "8",
        "-Y", str(folder), "-P", str(folder / "kamailio.pid"), "-w", str(folder),
    ]  # fmt: skip


async def run_sipp_here(
    scenario: Path, target_port: int, workdir: Path, *, call_id: str, calls: int, rate: int, extra: list[str]
) -> tuple[int, str]:
    """sipp UAC `scenario` (already in `workdir`, next to its pcaps) against 127.0.0.1:port
    over UDP; returns (exit code, its message and error logs). tests/integration's run_sipp
    takes scenarios only from its own folder; the lab's proxied scenarios live here."""
    import asyncio

    from tests.integration.sip_peers import SIPP
    from tests.support import free_port

    assert SIPP is not None, "sipp (Debian package sip-tester) is not installed"
    log_file, errors = workdir / "sipp.log", workdir / "sipp-errors.log"
    args = [
        SIPP, "-sf", str(scenario), f"127.0.0.1:{target_port}", "-i", "127.0.0.1", "-mi", "127.0.0.1",
        "-p", str(free_port()), "-mp", str(free_port()), "-t", "u1",
        "-m", str(calls), "-r", str(rate), "-l", str(calls), "-cid_str", f"{call_id}-%u",
        "-nostdin", "-timeout", "90s", "-timeout_error", "-trace_logs", "-log_file", str(log_file),
        "-trace_err", "-error_file", str(errors), "-nd", "-aa", *extra,
    ]  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        *args, cwd=workdir, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), 120)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    logs = "".join(p.read_text(errors="replace") for p in (log_file, errors) if p.exists())
    return process.returncode or 0, logs + output.decode(errors="replace")[-3000:]
