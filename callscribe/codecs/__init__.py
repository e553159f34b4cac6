"""The codec registry: callscribe's codec names, RTP static payload types and SDP rtpmap
encodings → CodecSpec, and CodecSpec → a fresh Decoder/Encoder (one per leg: some keep state)."""

from __future__ import annotations

import re

from callscribe.codecs.base import CodecError, CodecSpec, Decoder, Encoder
from callscribe.codecs.dtmf import TELEPHONE_EVENT, TELEPHONE_EVENT_48K
from callscribe.codecs.g711 import PCMA, PCMU, PcmaDecoder, PcmaEncoder, PcmuDecoder, PcmuEncoder
from callscribe.codecs.g722 import G722, G722Decoder, G722Encoder
from callscribe.codecs.l16 import L16Decoder, L16Encoder
from callscribe.codecs.opus import OPUS, OpusDecoder, OpusEncoder

__all__ = [
    "CodecError",
    "CodecSpec",
    "Decoder",
    "Encoder",
    "decoder_for",
    "encoder_for",
    "s16le",
    "spec_by_name",
    "spec_for_encoding",
    "spec_for_static_pt",
]

L16 = "L16"  # big-endian, RTP (RFC 3551 §4.5.11)
S16LE = "s16le"  # little-endian, media forks and AudioSocket: never in SDP

# RFC 3551 table 4: L16 at 44.1 kHz, stereo (PT 10) and mono (PT 11).
L16_44K_STEREO = CodecSpec("l16-44k-stereo", L16, 44100, 44100, 2, 10)
L16_44K = CodecSpec("l16-44k", L16, 44100, 44100, 1, 11)

_S16LE_RATES = {
    "8k": 8000,
    "12k": 12000,
    "16k": 16000,
    "24k": 24000,
    "32k": 32000,
    "44k": 44100,
    "48k": 48000,
    "96k": 96000,
    "192k": 192000,
}

_BY_NAME: dict[str, CodecSpec] = {
    spec.name: spec
    for spec in (
        PCMU,
        PCMA,
        OPUS,
        G722,
        CodecSpec("l16", L16, 16000, 16000),
        CodecSpec("l16-8k", L16, 8000, 8000),
        CodecSpec("l16-16k", L16, 16000, 16000),
        CodecSpec("l16-48k", L16, 48000, 48000),
        L16_44K,
        L16_44K_STEREO,
        *(CodecSpec(f"s16le-{suffix}", S16LE, rate, rate) for suffix, rate in _S16LE_RATES.items()),
        TELEPHONE_EVENT,
        TELEPHONE_EVENT_48K,
    )
}

_BY_STATIC_PT = {spec.static_pt: spec for spec in _BY_NAME.values() if spec.static_pt is not None}


def spec_by_name(name: str) -> CodecSpec:
    """A codec by callscribe's name (case-insensitive); CodecError lists the known names."""
    spec = _BY_NAME.get(name.lower()) or _l16_by_name(name.lower())
    if spec is None:
        raise CodecError(f"unknown codec {name!r}; known codecs: {', '.join(sorted(_BY_NAME))}")
    return spec


def _l16_by_name(name: str) -> CodecSpec | None:
    """The names spec_for_encoding gives L16 at other rates: l16-<rate>[-<n>ch], and the
    names s16le() gives little-endian PCM at rates without a short name: s16le-<rate>."""
    match = re.fullmatch(r"s16le-([1-9][0-9]{3,5})", name)
    if match is not None:
        return s16le(int(match[1]))
    match = re.fullmatch(r"l16-([1-9][0-9]{3,5})(?:-([2-8])ch)?", name)
    if match is None:
        return None
    return spec_for_encoding(L16, int(match[1]), int(match[2] or 1))


def s16le(rate: int) -> CodecSpec:
    """Little-endian 16-bit mono PCM at `rate`: what decoders produce (on little-endian hosts)."""
    for spec in _BY_NAME.values():
        if spec.encoding == S16LE and spec.sample_rate == rate:
            return spec
    return CodecSpec(f"s16le-{rate}", S16LE, rate, rate)


def spec_for_static_pt(pt: int) -> CodecSpec | None:
    """The RFC 3551 static payload type callscribe decodes (0, 8, 9, 10, 11), else None."""
    return _BY_STATIC_PT.get(pt)


def spec_for_encoding(encoding: str, clock_rate: int, channels: int = 1) -> CodecSpec | None:
    """The codec of an SDP `a=rtpmap:<pt> <encoding>/<clock_rate>[/<channels>]`, else None.
    L16 is accepted at any rate and channel count (big-endian, as RTP requires)."""
    wanted = encoding.lower()
    if wanted == "opus":
        # RFC 7587 §7: always opus/48000/2; the channel count says nothing about the stream.
        return OPUS if clock_rate == OPUS.clock_rate else None
    if wanted == "l16":
        for spec in _BY_NAME.values():
            # "l16" is an alias of l16-16k: answer with the explicit name.
            if (
                spec.encoding == L16
                and spec.name != "l16"
                and (spec.clock_rate, spec.channels)
                == (
                    clock_rate,
                    channels,
                )
            ):
                return spec
        if clock_rate <= 0 or not 1 <= channels <= 8:
            return None
        suffix = f"-{channels}ch" if channels > 1 else ""
        return CodecSpec(f"l16-{clock_rate}{suffix}", L16, clock_rate, clock_rate, channels)
    for spec in _BY_NAME.values():
        if spec.encoding.lower() == wanted and spec.clock_rate == clock_rate and spec.channels == channels:
            return spec
    return None


def decoder_for(spec: CodecSpec) -> Decoder:
    """A new decoder (per leg and payload type). CodecError if callscribe cannot decode it."""
    if spec.encoding == PCMU.encoding:
        return PcmuDecoder()
    if spec.encoding == PCMA.encoding:
        return PcmaDecoder()
    if spec.encoding == G722.encoding:
        return G722Decoder()
    if spec.encoding == OPUS.encoding:
        return OpusDecoder()
    if spec.encoding in (L16, S16LE):
        return L16Decoder(spec, big_endian=spec.encoding == L16)
    raise CodecError(f"no decoder for {spec.name!r} ({spec.encoding}/{spec.clock_rate})")


def encoder_for(spec: CodecSpec, frame_ms: int = 20) -> Encoder:
    """A new encoder; `frame_ms` matters only to Opus, which fixes its frame duration."""
    if spec.encoding == PCMU.encoding:
        return PcmuEncoder()
    if spec.encoding == PCMA.encoding:
        return PcmaEncoder()
    if spec.encoding == G722.encoding:
        return G722Encoder()
    if spec.encoding == OPUS.encoding:
        return OpusEncoder(frame_ms)
    if spec.encoding in (L16, S16LE):
        return L16Encoder(spec, big_endian=spec.encoding == L16)
    raise CodecError(f"no encoder for {spec.name!r} ({spec.encoding}/{spec.clock_rate})")
