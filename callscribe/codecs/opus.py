"""Opus over RTP (RFC 7587) through PyAV's libopus.

The RTP clock is always 48 kHz and SDP always says `opus/48000/2`, whatever the sender
encodes. The decoder returns mono int16 at 48 kHz: ffmpeg's libopus wrapper decodes at
48 kHz whatever rate is asked for, and libopus itself downmixes a stereo stream when the
decoder is opened with one channel. The leg's soxr resampler then takes 48 → 16 kHz with a
proper filter, so RTP timestamps map 1:1 to samples (one tick = one sample).
Lost packets are concealed with silence: avcodec has no way to ask libopus for PLC (an empty
packet means end of stream to it).
"""

from __future__ import annotations

import fractions

import av
import numpy as np
from av import AudioFrame, CodecContext

from callscribe.codecs.base import CodecError, CodecSpec, Decoder, Encoder, Pcm16

OPUS = CodecSpec("opus", "opus", 48000, 48000, 2, None)
# Frame durations libopus can encode (RFC 6716 §2.1.4).
FRAME_MS = (10, 20, 40, 60)


class OpusDecoder(Decoder):
    spec = OPUS

    def __init__(self) -> None:
        self._codec = CodecContext.create("libopus", "r")
        self._codec.sample_rate = OPUS.sample_rate
        self._codec.layout = "mono"
        self._codec.format = "s16"

    def decode(self, payload: bytes) -> Pcm16:
        if not payload:
            raise CodecError("empty Opus payload (a TOC byte at least is expected)")
        try:
            frames = self._codec.decode(av.Packet(payload))
        except av.FFmpegError as exc:
            raise CodecError(f"Opus payload of {len(payload)} bytes does not decode: {exc}") from None
        if not frames:
            return np.zeros(0, dtype=np.int16)
        chunks = [np.asarray(frame.to_ndarray(), dtype=np.int16).reshape(-1) for frame in frames]
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


class OpusEncoder(Encoder):
    """Mono 48 kHz frames of `frame_ms` (10/20/40/60) → one Opus packet each, VoIP tuned."""

    spec = OPUS

    def __init__(self, frame_ms: int = 20, bitrate: int = 32000) -> None:
        if frame_ms not in FRAME_MS:
            raise CodecError(f"Opus frame of {frame_ms} ms is not one of {FRAME_MS}")
        self.frame_samples = OPUS.sample_rate * frame_ms // 1000
        self._codec = CodecContext.create("libopus", "w")
        self._codec.sample_rate = OPUS.sample_rate
        self._codec.layout = "mono"
        self._codec.format = "s16"
        self._codec.bit_rate = bitrate
        self._codec.time_base = fractions.Fraction(1, OPUS.sample_rate)
        self._codec.options = {"application": "voip", "frame_duration": str(frame_ms)}
        self._pts = 0

    def encode(self, pcm: Pcm16) -> bytes:
        if pcm.size != self.frame_samples:
            raise CodecError(f"Opus encoder takes frames of {self.frame_samples} samples, got {pcm.size}")
        frame = AudioFrame.from_ndarray(
            np.ascontiguousarray(pcm, dtype=np.int16).reshape(1, -1), format="s16", layout="mono"
        )
        frame.sample_rate = OPUS.sample_rate
        frame.pts = self._pts
        self._pts += pcm.size
        packets = self._codec.encode(frame)
        # libopus emits exactly one packet per frame of a supported duration.
        return b"".join(bytes(packet) for packet in packets)
