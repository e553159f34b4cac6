"""The WAV → RTP sender behind `callscribe send`: packetizing, clocks, pacing."""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from callscribe.bridge.events import AudioReceived
from callscribe.bridge.rtp.packet import RtpPacket
from callscribe.bridge.rtp.receiver import RtpLegReceiver
from callscribe.bridge.rtp.sender import packetize, read_wav_mono, send_wav
from callscribe.codecs import CodecError, spec_by_name


def pcm(event: AudioReceived) -> np.ndarray:
    """The int16 samples of a decoded AudioReceived (the receiver reports s16le-<rate>)."""
    assert event.codec.startswith("s16le-")
    return np.frombuffer(event.payload, dtype="<i2")


def rate(event: AudioReceived) -> int:
    return spec_by_name(event.codec).sample_rate


def write_wav(path: Path, pcm: np.ndarray, rate: int, channels: int = 1) -> Path:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(pcm.astype("<i2").tobytes())
    return path


@pytest.mark.parametrize(
    ("codec", "ticks", "payload_bytes"),
    [("pcmu", 160, 160), ("g722", 160, 160), ("l16", 320, 640), ("opus", 960, None)],
)
def test_packetize_uses_the_codec_clock(codec: str, ticks: int, payload_bytes: int | None) -> None:
    pcm = (np.sin(np.arange(44100) / 5) * 5000).astype(np.int16)  # 1 s at 44.1 kHz
    frames = packetize(pcm, 44100, spec_by_name(codec), 20)
    assert len(frames) == 50
    assert [offset for offset, _ in frames[:3]] == [0, ticks, 2 * ticks]
    if payload_bytes is not None:
        assert all(len(payload) == payload_bytes for _, payload in frames)


def test_stereo_wav_is_mixed_to_mono(tmp_path: Path) -> None:
    stereo = np.array([[1000, 3000], [-10, -30]], dtype=np.int16).reshape(-1)
    pcm, rate = read_wav_mono(write_wav(tmp_path / "s.wav", stereo, 22050, channels=2))
    assert rate == 22050 and pcm.tolist() == [2000, -20]
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF junk")
    with pytest.raises(ValueError, match="not a readable WAV"):
        read_wav_mono(junk)


async def test_send_wav_paces_and_decodes_back(tmp_path: Path) -> None:
    tone = (np.sin(np.arange(16000) / 4) * 8000).astype(np.int16)  # 1 s at 16 kHz
    path = write_wav(tmp_path / "t.wav", tone, 16000)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", 0))
        sink.setblocking(False)
        started = time.monotonic()
        stats = await send_wav(path, "127.0.0.1", sink.getsockname()[1], codec="pcma", speed=4.0, ssrc=0x1234)
        elapsed = time.monotonic() - started
        datagrams = []
        while True:
            try:
                datagrams.append(sink.recv(2048))
            except BlockingIOError:
                break
    assert stats.packets == 50 and stats.ssrc == 0x1234 and stats.payload_type == 8
    assert 0.2 <= elapsed < 1.0  # 1 s of audio at 4× real time, on absolute deadlines
    packets = [RtpPacket.parse(d) for d in datagrams]
    assert len(packets) == 50
    assert packets[0].marker and not any(p.marker for p in packets[1:])
    assert all((b.sequence_number - a.sequence_number) % 65536 == 1 for a, b in itertools.pairwise(packets))
    assert all((b.timestamp - a.timestamp) % 2**32 == 160 for a, b in itertools.pairwise(packets))
    receiver = RtpLegReceiver("pcmu")
    decoded = [e for d in datagrams for e in receiver.receive(d, 0.0) if isinstance(e, AudioReceived)]
    assert sum(pcm(e).size for e in decoded) == 8000


async def test_send_wav_rejects_bad_arguments(tmp_path: Path) -> None:
    path = write_wav(tmp_path / "t.wav", np.zeros(160, np.int16), 8000)
    with pytest.raises(CodecError, match="gsm"):
        await send_wav(path, "127.0.0.1", 9, codec="gsm")
    with pytest.raises(ValueError, match="speed"):
        await send_wav(path, "127.0.0.1", 9, speed=0)
    with pytest.raises(CodecError, match="128"):
        await send_wav(path, "127.0.0.1", 9, payload_type=128)
    await asyncio.sleep(0)
