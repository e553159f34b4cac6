"""Send a WAV file as one RTP stream: the `callscribe send` tool and a test peer.

Packets leave on absolute deadlines (start + n × ptime / speed), so scheduling delays
never accumulate into drift over a long file.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import time
import wave
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr

from callscribe.bridge.rtp.packet import RtpPacket
from callscribe.codecs import decoder_for, encoder_for, spec_by_name
from callscribe.codecs.base import CodecError, CodecSpec, Pcm16

DYNAMIC_PT = 96  # what `send` uses for codecs without a static type, unless told otherwise
# Opus gets 96 like any dynamic codec; L16 mono at 44.1 kHz has static PT 11.

# Codecs `send` can put on the wire as RTP. Not telephone-event (DTMF, not audio) nor the
# s16le-* names (little-endian PCM of websocket forks and AudioSocket, never RTP).
SEND_CODECS = ("pcmu", "pcma", "g722", "opus", "l16", "l16-8k", "l16-16k", "l16-44k", "l16-48k")
# Above this a datagram is likely fragmented on a 1500-byte Ethernet path (IP+UDP+RTP headers).
MAX_UNFRAGMENTED_PAYLOAD = 1400
RTCP_SR, RTCP_BYE = 200, 203
# Seconds between the NTP epoch (1900) and the Unix epoch (1970), for RTCP sender reports.
_NTP_UNIX_OFFSET = 2_208_988_800

Progress = Callable[[int, int], None]  # (packets sent, packets in all)


def send_codec(name: str) -> CodecSpec:
    """The spec of a codec `send` can send; CodecError listing the choices otherwise."""
    if name.lower() not in SEND_CODECS:
        raise CodecError(f"--codec {name!r} cannot be sent as RTP; choose one of {', '.join(SEND_CODECS)}")
    return spec_by_name(name)


def datagram_warning(spec: CodecSpec, ptime_ms: int) -> str | None:
    """A warning when `ptime_ms` of `spec` makes datagrams likely to be fragmented."""
    if spec.encoding.lower() != "l16":
        return None
    payload = spec.sample_rate * ptime_ms // 1000 * 2 * spec.channels
    if payload <= MAX_UNFRAGMENTED_PAYLOAD:
        return None
    fitting = max(1, MAX_UNFRAGMENTED_PAYLOAD * 1000 // (spec.sample_rate * 2 * spec.channels))
    return (
        f"{spec.name} at --ptime {ptime_ms} makes {payload + 12}-byte RTP packets, above a 1500-byte MTU: "
        f"they will be fragmented (use --ptime {fitting} or less, or a compressed codec)"
    )


def rtcp_goodbye(ssrc: int, unix_time: float, rtp_timestamp: int, packets: int, octets: int) -> bytes:
    """A compound RTCP packet ending the stream: a sender report (RFC 3550 §6.4.1; compound
    packets start with SR or RR, §6.1), then BYE (§6.6). Sent on the RTP port (rtcp-mux,
    RFC 5761), where the receiver ends the leg at once instead of waiting for its idle timeout."""
    ntp = unix_time + _NTP_UNIX_OFFSET
    seconds = int(ntp)
    fraction = int((ntp - seconds) * (1 << 32)) & 0xFFFFFFFF
    report = struct.pack(
        "!BBHIIIIII",
        0x80,  # V=2, P=0, RC=0
        RTCP_SR,
        6,  # length in 32-bit words minus one
        ssrc,
        seconds & 0xFFFFFFFF,
        fraction,
        rtp_timestamp & 0xFFFFFFFF,
        packets & 0xFFFFFFFF,
        octets & 0xFFFFFFFF,
    )
    goodbye = struct.pack("!BBHI", 0x81, RTCP_BYE, 1, ssrc)  # V=2, SC=1
    return report + goodbye


@dataclass(frozen=True, slots=True)
class SendStats:
    packets: int
    bytes: int
    audio_ms: int
    ssrc: int
    payload_type: int
    late_packets: int  # sent more than one ptime after their deadline

    def __str__(self) -> str:
        return (
            f"{self.packets} packets, {self.bytes} bytes, {self.audio_ms} ms of audio, "
            f"ssrc={self.ssrc:08x} pt={self.payload_type}, {self.late_packets} late"
        )


# WAVE format tags (RFC 2361) of the G.711 WAVs phone systems record; the stdlib reads PCM only.
_WAVE_ALAW, _WAVE_MULAW = 6, 7


def read_wav_mono(path: Path) -> tuple[Pcm16, int]:
    """16-bit PCM or G.711 (μ-law/A-law) WAV → mono int16 (channels averaged) and its rate;
    ValueError otherwise."""
    try:
        with wave.open(str(path), "rb") as wav:
            channels, width, rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
            raw = wav.readframes(wav.getnframes())
    except wave.Error as exc:
        if "unknown format: 6" in str(exc) or "unknown format: 7" in str(exc):
            return _read_g711_wav(path)
        raise ValueError(f"{path} is not a readable WAV file: {exc}") from None
    except EOFError as exc:
        raise ValueError(f"{path} is not a readable WAV file: {exc}") from None
    if width != 2:
        raise ValueError(f"{path} has {8 * width}-bit samples; 16-bit PCM or G.711 is expected")
    samples = np.frombuffer(raw, dtype="<i2").reshape(-1, channels).astype(np.int32)
    return samples.mean(axis=1).round().astype(np.int16), rate


def _read_g711_wav(path: Path) -> tuple[Pcm16, int]:
    data = path.read_bytes()
    fmt: tuple[int, int, int] | None = None
    payload: bytes | None = None
    pos = 12
    while pos + 8 <= len(data):
        chunk, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body = data[pos + 8 : pos + 8 + size]
        if chunk == b"fmt " and len(body) >= 16:
            tag, channels, rate = struct.unpack_from("<HHI", body)
            fmt = (tag, channels, rate)
        elif chunk == b"data":
            payload = body
        pos += 8 + size + (size & 1)
    if fmt is None or payload is None or fmt[1] < 1:
        raise ValueError(f"{path} is not a readable WAV file: no fmt or data chunk")
    tag, channels, rate = fmt
    decoder = decoder_for(spec_by_name("pcmu" if tag == _WAVE_MULAW else "pcma"))
    usable = len(payload) - len(payload) % channels
    samples = decoder.decode(payload[:usable]).reshape(-1, channels).astype(np.int32)
    return samples.mean(axis=1).round().astype(np.int16), rate


def packetize(pcm: Pcm16, rate: int, spec: CodecSpec, ptime_ms: int) -> list[tuple[int, bytes]]:
    """(RTP timestamp offset, payload) per packet: `pcm` resampled to the codec's rate and
    cut into `ptime_ms` frames (the last one padded with silence)."""
    if ptime_ms <= 0:
        raise ValueError(f"ptime must be a positive number of ms, got {ptime_ms}")
    if rate != spec.sample_rate:
        pcm = soxr.resample(pcm, rate, spec.sample_rate).astype(np.int16)
    frame = spec.sample_rate * ptime_ms // 1000
    ticks = spec.clock_rate * ptime_ms // 1000
    if frame <= 0 or ticks <= 0:
        raise ValueError(f"ptime {ptime_ms} ms is shorter than one sample of {spec.name}")
    encoder = encoder_for(spec, ptime_ms)
    padded = np.zeros(-(-pcm.size // frame) * frame, dtype=np.int16)
    padded[: pcm.size] = pcm
    return [
        (n * ticks, encoder.encode(padded[n * frame : (n + 1) * frame])) for n in range(padded.size // frame)
    ]


async def send_wav(
    path: Path,
    host: str,
    port: int,
    codec: str = "pcmu",
    ptime_ms: int = 20,
    speed: float = 1.0,
    ssrc: int | None = None,
    payload_type: int | None = None,
    progress: Progress | None = None,
    goodbye: bool = True,
) -> SendStats:
    """Send `path` to host:port as RTP in real time × `speed`; returns what was sent.
    `progress` is called about four times a second; `goodbye` ends the stream with RTCP BYE."""
    if speed <= 0:
        raise ValueError(f"speed must be positive, got {speed}")
    spec = send_codec(codec)
    if payload_type is None:
        payload_type = spec.static_pt if spec.static_pt is not None else DYNAMIC_PT
    if not 0 <= payload_type <= 127:
        raise CodecError(f"payload type {payload_type} is outside 0-127")
    pcm, rate = read_wav_mono(path)
    frames = packetize(pcm, rate, spec, ptime_ms)
    ssrc = random.getrandbits(32) if ssrc is None else ssrc
    seq0, ts0 = random.getrandbits(16), random.getrandbits(32)

    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    transport, _ = await loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, remote_addr=(host, port), family=family
    )
    interval = ptime_ms / 1000.0 / speed
    sent_bytes = payload_bytes = late = 0
    report_every = max(1, int(0.25 / interval))
    try:
        start = loop.time()
        for n, (offset, payload) in enumerate(frames):
            if progress is not None and n % report_every == 0:
                progress(n, len(frames))
            delay = start + n * interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -interval:
                late += 1
            packet = RtpPacket(
                payload_type=payload_type,
                sequence_number=(seq0 + n) % 65536,
                timestamp=(ts0 + offset) % (1 << 32),
                ssrc=ssrc,
                payload=payload,
                marker=n == 0,  # RFC 3551 §4.1: first packet of a talkspurt
            ).serialize()
            transport.sendto(packet)
            sent_bytes += len(packet)
            payload_bytes += len(payload)
        if progress is not None:
            progress(len(frames), len(frames))
        if goodbye:
            last_ts = ts0 + (frames[-1][0] if frames else 0)
            transport.sendto(rtcp_goodbye(ssrc, time.time(), last_ts, len(frames), payload_bytes))
    finally:
        transport.close()
    return SendStats(len(frames), sent_bytes, len(frames) * ptime_ms, ssrc, payload_type, late)
