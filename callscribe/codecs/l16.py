"""Linear 16-bit PCM: big-endian L16 over RTP (RFC 3551 §4.5.11, network byte order) and
little-endian s16le as media forks and AudioSocket send it, at any rate, mono or interleaved stereo
(downmixed to mono: a leg is one speaker, and both channels of an L16 stereo stream carry it)."""

from __future__ import annotations

import numpy as np

from callscribe.codecs.base import CodecError, CodecSpec, Decoder, Encoder, Pcm16


def _dtype(big_endian: bool) -> np.dtype[np.int16]:
    return np.dtype(">i2") if big_endian else np.dtype("<i2")


class L16Decoder(Decoder):
    def __init__(self, spec: CodecSpec, big_endian: bool) -> None:
        self.spec = spec
        self._dtype = _dtype(big_endian)
        self._frame_bytes = 2 * spec.channels

    def decode(self, payload: bytes) -> Pcm16:
        if len(payload) % self._frame_bytes:
            raise CodecError(
                f"{self.spec.name} payload of {len(payload)} bytes is not a multiple of "
                f"{self._frame_bytes} ({self.spec.channels} channel(s) × 2 bytes)"
            )
        samples = np.frombuffer(payload, dtype=self._dtype)
        if self.spec.channels > 1:
            frames = samples.reshape(-1, self.spec.channels).astype(np.int32)
            mixed: Pcm16 = (frames.sum(axis=1) // self.spec.channels).astype(np.int16)
            return mixed
        native: Pcm16 = samples.astype(np.int16)
        return native


class L16Encoder(Encoder):
    def __init__(self, spec: CodecSpec, big_endian: bool) -> None:
        self.spec = spec
        self._dtype = _dtype(big_endian)

    def encode(self, pcm: Pcm16) -> bytes:
        samples = np.asarray(pcm, dtype=np.int16)
        if self.spec.channels > 1:
            samples = np.repeat(samples, self.spec.channels)
        return samples.astype(self._dtype).tobytes()
