"""Real SIP peers for the SIP/SIPREC tests: sipp scenarios and μ-law RTP pcaps built from the
speech clips at test time (sipp's play_pcap_audio replays a pcap's UDP packets to the media
port of the answer; packets to a higher destination port than the lowest go that much above it,
which is how one pcap feeds both m-lines of a SIPREC session)."""

from __future__ import annotations

import asyncio
import random
import shutil
import socket
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from callscribe.bridge.rtp.packet import RtpPacket
from tests.support import Clip, free_port

SCENARIOS = Path(__file__).parent / "sipp"
SIPP = shutil.which("sipp")
FRAME = 160  # bytes of μ-law in 20 ms

PCAP_HEADER = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)  # LINKTYPE_ETHERNET


@dataclass(frozen=True)
class PcapStream:
    """One RTP stream of a pcap: `port_offset` above the first m-line's port, starting
    `start_sec` into the capture, a clip's speech as PCMU."""

    clip: Clip
    port_offset: int = 0
    start_sec: float = 0.0
    lead_silence_sec: float = 0.3
    tail_silence_sec: float = 1.0
    max_sec: float | None = None  # only the clip's first seconds


def _udp_frame(payload: bytes, dport: int, sport: int) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    total = 20 + len(udp)
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, 17, 0, bytes([127, 0, 0, 1]), bytes([127, 0, 0, 1])
    )
    checksum = sum(struct.unpack("!10H", ip))
    checksum = (checksum & 0xFFFF) + (checksum >> 16)
    ip = ip[:10] + struct.pack("!H", ~checksum & 0xFFFF) + ip[12:]
    ethernet = b"\x02\x00\x00\x00\x00\x02" + b"\x02\x00\x00\x00\x00\x01" + b"\x08\x00"
    return ethernet + ip + udp


def pcmu_frames(stream: PcapStream) -> list[bytes]:
    """20 ms μ-law payloads of the clip, encoded by ffmpeg as a PBX would put it on the wire,
    with the stream's leading and trailing silence."""
    limit = ["-t", str(stream.max_sec)] if stream.max_sec else []
    encoded = subprocess.run(
        ["ffmpeg", "-hide_banner", "-loglevel", "error", "-i", str(stream.clip.path), *limit, "-ac", "1",
         "-ar", "8000", "-f", "mulaw", "-"],
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    silence = b"\xff"  # μ-law zero
    audio = (
        silence * int(8000 * stream.lead_silence_sec)
        + encoded
        + silence * int(8000 * stream.tail_silence_sec)
    )
    audio += silence * (-len(audio) % FRAME)
    return [audio[i : i + FRAME] for i in range(0, len(audio), FRAME)]


def write_pcmu_pcap(path: Path, streams: list[PcapStream], base_port: int = 6000) -> float:
    """Write the streams as one pcap; returns its duration in seconds."""
    packets: list[tuple[float, bytes]] = []
    for index, stream in enumerate(streams):
        ssrc, seq, ts = random.getrandbits(32), random.getrandbits(16), random.getrandbits(32)
        for n, payload in enumerate(pcmu_frames(stream)):
            rtp = RtpPacket(
                payload_type=0,
                sequence_number=(seq + n) & 0xFFFF,
                timestamp=(ts + n * FRAME) & 0xFFFFFFFF,
                ssrc=ssrc,
                payload=payload,
                marker=n == 0,
            ).serialize()
            when = stream.start_sec + n * 0.020
            packets.append((when, _udp_frame(rtp, base_port + stream.port_offset, 7000 + 2 * index)))
    packets.sort(key=lambda item: item[0])
    with path.open("wb") as out:
        out.write(PCAP_HEADER)
        for when, frame in packets:
            seconds = int(when)
            micros = round((when - seconds) * 1_000_000)
            out.write(struct.pack("<IIII", 1_700_000_000 + seconds, micros, len(frame), len(frame)))
            out.write(frame)
    return max(when for when, _ in packets) if packets else 0.0


@dataclass
class SippResult:
    returncode: int
    stdout: str
    stderr: str
    log: str


async def run_sipp(
    scenario: str,
    sip_port: int,
    workdir: Path,
    *,
    call_id: str,
    calls: int = 1,
    rate: int = 10,
    transport: str = "u1",
    keys: dict[str, str] | None = None,
    extra: list[str] | None = None,
    sipp_timeout: float = 90,
) -> SippResult:
    """Run one sipp UAC scenario against 127.0.0.1:`sip_port`; `call_id` becomes the Call-ID
    of call 1 (more calls get '-<n>' suffixes)."""
    assert SIPP is not None, "sipp (Debian package sip-tester) is not installed"
    args = [
        SIPP,
        "-sf",
        str(workdir / scenario),
        f"127.0.0.1:{sip_port}",
        "-i",
        "127.0.0.1",
        "-mi",
        "127.0.0.1",
        "-p",
        str(free_port(socket.SOCK_STREAM if transport.startswith("t") else socket.SOCK_DGRAM)),
        "-mp",
        str(free_port()),
        "-t",
        transport,
        "-m",
        str(calls),
        "-r",
        str(rate),
        "-l",
        str(calls),
        "-cid_str",
        f"{call_id}-%u",
        "-nostdin",
        "-timeout",
        f"{int(sipp_timeout)}s",
        "-timeout_error",
        "-trace_logs",
        "-log_file",
        str(workdir / "sipp.log"),
        "-trace_err",
        "-error_file",
        str(workdir / "sipp-errors.log"),
        "-nd",
        "-aa",
    ]
    for name, value in (keys or {}).items():
        args += ["-key", name, value]
    args += extra or []
    # sipp finds play_pcap_audio files next to the scenario and in its working directory.
    shutil.copy(SCENARIOS / scenario, workdir / scenario)
    process = await asyncio.create_subprocess_exec(
        *args, cwd=workdir, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), sipp_timeout + 30)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    log_file = workdir / "sipp.log"
    errors = workdir / "sipp-errors.log"
    log = (log_file.read_text(errors="replace") if log_file.exists() else "") + (
        errors.read_text(errors="replace") if errors.exists() else ""
    )
    return SippResult(
        process.returncode or 0, stdout.decode(errors="replace"), stderr.decode(errors="replace"), log
    )
