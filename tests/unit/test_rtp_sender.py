"""The WAV → RTP sender behind `callscribe send`: packetizing, clocks, pacing."""

from __future__ import annotations

import asyncio
import itertools
import socket
import struct
import subprocess
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from callscribe.bridge.events import AudioReceived
from callscribe.bridge.rtp.packet import RtpPacket, is_rtcp
from callscribe.bridge.rtp.receiver import RtpLegReceiver
from callscribe.bridge.rtp.sender import (
    datagram_warning,
    packetize,
    read_wav_mono,
    rtcp_goodbye,
    send_codec,
    send_wav,
)
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
    # The stream ends with RTCP (SR + BYE for its SSRC), on the same port (rtcp-mux).
    *datagrams, goodbye = datagrams
    assert is_rtcp(goodbye) and goodbye[1] == 200 and goodbye[28 + 1] == 203
    assert struct.unpack("!I", goodbye[32:36])[0] == 0x1234
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


def test_rtcp_goodbye_is_a_compound_sender_report_and_bye() -> None:
    packet = rtcp_goodbye(0xCAFEBABE, 1_700_000_000.5, 12345, 50, 8000)
    assert len(packet) == 28 + 8
    version_rc, pt, words = struct.unpack("!BBH", packet[:4])
    assert version_rc >> 6 == 2 and pt == 200 and (words + 1) * 4 == 28
    ssrc, ntp_s, ntp_f, rtp_ts, count, octets = struct.unpack("!IIIIII", packet[4:28])
    assert (ssrc, rtp_ts, count, octets) == (0xCAFEBABE, 12345, 50, 8000)
    assert ntp_s == 1_700_000_000 + 2_208_988_800 and ntp_f == 1 << 31
    version_sc, pt, words, bye_ssrc = struct.unpack("!BBHI", packet[28:])
    assert version_sc == 0x81 and pt == 203 and words == 1 and bye_ssrc == 0xCAFEBABE


def test_send_codecs_are_rtp_codecs_only() -> None:
    assert send_codec("PCMU").name == "pcmu"
    for internal in ("telephone-event", "s16le-192k", "s16le-8k"):
        with pytest.raises(CodecError, match="cannot be sent as RTP; choose one of pcmu"):
            send_codec(internal)
    assert datagram_warning(spec_by_name("pcmu"), 20) is None
    warning = datagram_warning(spec_by_name("l16-48k"), 20)
    assert warning is not None and "1932-byte" in warning and "--ptime 14" in warning


async def test_send_reports_progress_to_the_end(tmp_path: Path) -> None:
    path = write_wav(tmp_path / "t.wav", np.zeros(8000, np.int16), 8000)
    seen: list[tuple[int, int]] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", 0))
        await send_wav(
            path, "127.0.0.1", sink.getsockname()[1], speed=8.0, progress=lambda n, t: seen.append((n, t))
        )
    assert seen[0] == (0, 50) and seen[-1] == (50, 50)
    assert [n for n, _ in seen] == sorted(n for n, _ in seen)


def test_g711_wav_reads_like_its_pcm_source(tmp_path: Path) -> None:
    tone = (np.sin(np.arange(8000) / 3) * 8000).astype(np.int16)
    pcm_path = write_wav(tmp_path / "pcm.wav", tone, 8000)
    ulaw_path = tmp_path / "ulaw.wav"
    subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-i", str(pcm_path), "-c:a", "pcm_mulaw", str(ulaw_path)], check=True
    )
    decoded, rate = read_wav_mono(ulaw_path)
    assert rate == 8000 and decoded.size == tone.size
    # μ-law keeps ~13 bits: the error stays within a few percent of full scale.
    assert np.max(np.abs(decoded.astype(np.int32) - tone)) < 400


def test_the_bundled_demo_call_is_8k_ulaw_of_a_few_seconds() -> None:
    from callscribe.demo import default_clip

    clip = default_clip()
    assert clip is not None and clip.stat().st_size < 100_000
    pcm, rate = read_wav_mono(clip)
    assert rate == 8000 and 5 < pcm.size / rate < 10 and np.abs(pcm).max() > 5000
