"""The codec interface: one Decoder (and Encoder, for `callscribe send`) per codec.

A decoder turns one RTP payload (or one fork frame) into mono int16 PCM at the codec's
`sample_rate`. Decoders may keep state (Opus), so there is one instance per leg.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Pcm16 = npt.NDArray[np.int16]


class CodecError(ValueError):
    """A payload that the codec cannot decode (the caller counts and drops it)."""


@dataclass(frozen=True, slots=True)
class CodecSpec:
    """What a codec is called and how it is clocked.

    `name` is callscribe's own short name (pcmu, pcma, opus, l16, l16-8k, g722, ...),
    `encoding` the SDP/RTP encoding name (PCMU, opus, L16), `clock_rate` the RTP clock
    (48000 for Opus per RFC 7587, 8000 for G.722 per RFC 3551), `sample_rate` the rate of
    the PCM the decoder returns, `static_pt` the RFC 3551 payload type if there is one.
    """

    name: str
    encoding: str
    clock_rate: int
    sample_rate: int
    channels: int = 1
    static_pt: int | None = None

    @property
    def samples_per_tick(self) -> float:
        """PCM samples per RTP timestamp unit (0.5 for G.722, 1/3 for Opus → 16 k)."""
        return self.sample_rate / self.clock_rate


class Decoder(ABC):
    spec: CodecSpec

    @abstractmethod
    def decode(self, payload: bytes) -> Pcm16:
        """Mono int16 PCM at `spec.sample_rate`; raises CodecError on a bad payload."""

    def conceal(self, samples: int) -> Pcm16:
        """PCM to stand in for `samples` lost samples (silence unless the codec has PLC)."""
        return np.zeros(samples, dtype=np.int16)


class Encoder(ABC):
    spec: CodecSpec

    @abstractmethod
    def encode(self, pcm: Pcm16) -> bytes:
        """One frame of mono int16 PCM at `spec.sample_rate` → one payload."""
