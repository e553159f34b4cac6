"""G.722 (PT 9) through PyAV: 16 kHz audio, but an RTP clock of 8000 (RFC 3551 §4.5.2 keeps
the value G.722 had by mistake), so one RTP tick is two samples. 64 kbit/s: a byte per
two samples, 160 bytes per 20 ms."""

from __future__ import annotations

import fractions

import av
import numpy as np
from av import AudioFrame, CodecContext

from callscribe.codecs.base import CodecError, CodecSpec, Decoder, Encoder, Pcm16

G722 = CodecSpec("g722", "G722", 8000, 16000, 1, 9)


class G722Decoder(Decoder):
    spec = G722

    def __init__(self) -> None:
        self._codec = CodecContext.create("g722", "r")
        self._codec.sample_rate = G722.sample_rate
        self._codec.layout = "mono"
        self._codec.format = "s16"

    def decode(self, payload: bytes) -> Pcm16:
        if not payload:
            return np.zeros(0, dtype=np.int16)
        try:
            frames = self._codec.decode(av.Packet(payload))
        except av.FFmpegError as exc:
            raise CodecError(f"G.722 payload of {len(payload)} bytes does not decode: {exc}") from None
        chunks = [np.asarray(frame.to_ndarray(), dtype=np.int16).reshape(-1) for frame in frames]
        if not chunks:
            return np.zeros(0, dtype=np.int16)
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


class G722Encoder(Encoder):
    spec = G722

    def __init__(self) -> None:
        self._codec = CodecContext.create("g722", "w")
        self._codec.sample_rate = G722.sample_rate
        self._codec.layout = "mono"
        self._codec.format = "s16"
        self._codec.time_base = fractions.Fraction(1, G722.sample_rate)
        self._pts = 0

    def encode(self, pcm: Pcm16) -> bytes:
        if pcm.size % 2:
            raise CodecError(f"G.722 encodes sample pairs; got an odd frame of {pcm.size} samples")
        frame = AudioFrame.from_ndarray(
            np.ascontiguousarray(pcm, dtype=np.int16).reshape(1, -1), format="s16", layout="mono"
        )
        frame.sample_rate = G722.sample_rate
        frame.pts = self._pts
        self._pts += pcm.size
        return b"".join(bytes(packet) for packet in self._codec.encode(frame))
