"""G.711 μ-law (PCMU, PT 0) and A-law (PCMA, PT 8): one byte per sample at 8 kHz (ITU-T G.711).

`audioop` is in the standard library up to 3.12 and provided by `audioop-lts` from 3.13;
it converts a whole payload in C, which keeps the per-packet cost to a microsecond.
"""

from __future__ import annotations

import warnings

import numpy as np

with warnings.catch_warnings():
    # 3.11-3.12 warn that audioop leaves the stdlib in 3.13, where audioop-lts takes over.
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

from callscribe.codecs.base import CodecSpec, Decoder, Encoder, Pcm16

PCMU = CodecSpec("pcmu", "PCMU", 8000, 8000, 1, 0)
PCMA = CodecSpec("pcma", "PCMA", 8000, 8000, 1, 8)


class G711Decoder(Decoder):
    """Every byte string is valid G.711, so decoding never fails. `linear()` returns native
    int16 bytes: the RTP receiver joins several packets' bytes before making one array,
    which saves a numpy array per packet on the hot path (bench/ingest.py)."""

    def linear(self, payload: bytes) -> bytes:
        raise NotImplementedError

    def decode(self, payload: bytes) -> Pcm16:
        return np.frombuffer(self.linear(payload), dtype=np.int16)


class PcmuDecoder(G711Decoder):
    spec = PCMU

    def linear(self, payload: bytes) -> bytes:
        return audioop.ulaw2lin(payload, 2)


class PcmaDecoder(G711Decoder):
    spec = PCMA

    def linear(self, payload: bytes) -> bytes:
        return audioop.alaw2lin(payload, 2)


class PcmuEncoder(Encoder):
    spec = PCMU

    def encode(self, pcm: Pcm16) -> bytes:
        return audioop.lin2ulaw(np.ascontiguousarray(pcm, dtype=np.int16).tobytes(), 2)


class PcmaEncoder(Encoder):
    spec = PCMA

    def encode(self, pcm: Pcm16) -> bytes:
        return audioop.lin2alaw(np.ascontiguousarray(pcm, dtype=np.int16).tobytes(), 2)
