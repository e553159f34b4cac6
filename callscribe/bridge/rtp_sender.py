"""Send a WAV file as one RTP stream: the `callscribe send` tool and a test peer.

Packets leave on absolute deadlines (start + n × ptime / speed), so scheduling delays
never accumulate into drift over a long file.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr

from callscribe.bridge.rtp import RtpPacket
from callscribe.codecs import decoder_for, encoder_for, spec_by_name
from callscribe.codecs.base import CodecError, CodecSpec, Pcm16

DYNAMIC_PT = 96  # what `send` uses for codecs without a static type, unless told otherwise
# Opus gets 96 like any dynamic codec; L16 mono at 44.1 kHz has static PT 11.


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
) -> SendStats:
    """Send `path` to host:port as RTP in real time × `speed`; returns what was sent."""
    if speed <= 0:
        raise ValueError(f"speed must be positive, got {speed}")
    spec = spec_by_name(codec)
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
    sent_bytes = late = 0
    try:
        start = loop.time()
        for n, (offset, payload) in enumerate(frames):
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
    finally:
        transport.close()
    return SendStats(len(frames), sent_bytes, len(frames) * ptime_ms, ssrc, payload_type, late)
