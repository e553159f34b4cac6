"""Codec round trips and known vectors, through the registry other modules use."""

from __future__ import annotations

import numpy as np
import pytest

from callscribe.codecs import (
    CodecError,
    decoder_for,
    encoder_for,
    spec_by_name,
    spec_for_encoding,
    spec_for_static_pt,
)
from tests.support import load_clip


def tone(rate: int, ms: int, hz: float = 440.0, amplitude: float = 8000.0) -> np.ndarray:
    t = np.arange(rate * ms // 1000) / rate
    return (np.sin(2 * np.pi * hz * t) * amplitude).astype(np.int16)


def snr_db(reference: np.ndarray, decoded: np.ndarray) -> float:
    ref = reference.astype(np.float64)
    noise = ref - decoded.astype(np.float64)
    return float(10 * np.log10(np.sum(ref**2) / max(np.sum(noise**2), 1e-9)))


REQUIRED_NAMES = [
    "pcmu", "pcma", "opus", "g722", "l16", "l16-8k", "l16-16k", "l16-48k",
    "s16le-8k", "s16le-16k", "s16le-24k", "s16le-32k", "s16le-44k", "s16le-48k", "s16le-96k", "s16le-192k",
]  # fmt: skip


@pytest.mark.parametrize("name", REQUIRED_NAMES)
def test_every_named_codec_has_a_decoder_and_encoder(name: str) -> None:
    spec = spec_by_name(name)
    assert spec.name == name
    assert decoder_for(spec).spec.sample_rate == spec.sample_rate
    assert encoder_for(spec).spec == spec


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(CodecError, match=r"gsm.*pcmu"):
        spec_by_name("gsm")


def test_static_payload_types() -> None:
    assert spec_by_name("pcmu") == spec_for_static_pt(0)
    assert spec_by_name("pcma") == spec_for_static_pt(8)
    g722 = spec_for_static_pt(9)
    assert g722 is not None and (g722.clock_rate, g722.sample_rate) == (8000, 16000)
    stereo, mono = spec_for_static_pt(10), spec_for_static_pt(11)
    assert stereo is not None and (stereo.clock_rate, stereo.channels) == (44100, 2)
    assert mono is not None and (mono.clock_rate, mono.channels) == (44100, 1)
    assert spec_for_static_pt(3) is None  # GSM: not decoded
    assert spec_for_static_pt(96) is None


def test_sdp_encodings() -> None:
    assert spec_for_encoding("pcmu", 8000) == spec_by_name("pcmu")
    assert spec_for_encoding("PCMA", 8000) == spec_by_name("pcma")
    assert spec_for_encoding("G722", 8000) == spec_by_name("g722")
    assert spec_for_encoding("opus", 48000, 2) == spec_by_name("opus")
    assert spec_for_encoding("L16", 16000) == spec_by_name("l16-16k")
    assert spec_for_encoding("l16", 8000) == spec_by_name("l16-8k")
    odd = spec_for_encoding("L16", 22050, 2)
    assert odd is not None and spec_by_name(odd.name) == odd and odd.channels == 2
    assert spec_for_encoding("PCMU", 16000) is None
    assert spec_for_encoding("opus", 16000) is None
    assert spec_for_encoding("GSM", 8000) is None
    dtmf = spec_for_encoding("telephone-event", 8000)
    assert dtmf is not None and dtmf.name == "telephone-event"


def test_g711_known_vectors() -> None:
    # G.711 tables: μ-law 0xFF and A-law 0xD5 are zero; μ-law 0x00 is -32124, 0x80 is +32124.
    assert decoder_for(spec_by_name("pcmu")).decode(b"\xff\x7f\x00\x80").tolist() == [0, 0, -32124, 32124]
    assert decoder_for(spec_by_name("pcma")).decode(b"\xd5\x55").tolist() == [8, -8]
    assert encoder_for(spec_by_name("pcmu")).encode(np.zeros(3, np.int16)) == b"\xff\xff\xff"


@pytest.mark.parametrize("name", ["pcmu", "pcma"])
def test_g711_round_trip_of_speech(name: str) -> None:
    clip = load_clip("librivox-0870")
    import soxr

    speech = soxr.resample(clip.pcm[: 16000 * 3], 16000, 8000).astype(np.int16)
    spec = spec_by_name(name)
    payload = encoder_for(spec).encode(speech)
    assert len(payload) == speech.size
    decoded = decoder_for(spec).decode(payload)
    assert decoded.dtype == np.int16 and decoded.size == speech.size
    assert snr_db(speech, decoded) > 30  # G.711 is ~38 dB SNR on speech levels


def test_l16_byte_orders() -> None:
    pcm = np.array([1, -2, 0x1234], dtype=np.int16)
    big = encoder_for(spec_by_name("l16-8k")).encode(pcm)
    little = encoder_for(spec_by_name("s16le-8k")).encode(pcm)
    assert big == b"\x00\x01\xff\xfe\x12\x34"
    assert little == b"\x01\x00\xfe\xff\x34\x12"
    assert decoder_for(spec_by_name("l16")).decode(big).tolist() == pcm.tolist()
    assert decoder_for(spec_by_name("s16le-48k")).decode(little).tolist() == pcm.tolist()


def test_l16_stereo_is_downmixed() -> None:
    stereo = spec_for_static_pt(10)
    assert stereo is not None
    payload = np.array([100, 300, -50, -150], dtype=">i2").tobytes()
    assert decoder_for(stereo).decode(payload).tolist() == [200, -100]


def test_l16_odd_payload_is_a_codec_error() -> None:
    with pytest.raises(CodecError, match="3 bytes"):
        decoder_for(spec_by_name("l16")).decode(b"\x00\x01\x02")


def test_g722_round_trip_of_speech() -> None:
    spec = spec_by_name("g722")
    encoder, decoder = encoder_for(spec), decoder_for(spec)
    speech = load_clip("librivox-0870").pcm[16000 : 16000 + 320 * 100]
    payloads = [encoder.encode(speech[i : i + 320]) for i in range(0, speech.size, 320)]
    assert all(len(p) == 160 for p in payloads)  # 64 kbit/s: 160 bytes per 20 ms
    decoded = np.concatenate([decoder.decode(p) for p in payloads])
    assert decoded.size == speech.size
    # The QMF filter bank delays the output a few dozen samples: align, then compare.
    window = speech[1000:-1000].astype(float)
    lag = max(range(64), key=lambda d: float(np.dot(window, decoded[1000 + d : -1000 + d])))
    assert snr_db(speech[1000:-1000], decoded[1000 + lag : -1000 + lag]) > 10


def test_opus_round_trip_at_48k_mono() -> None:
    spec = spec_by_name("opus")
    assert (spec.clock_rate, spec.sample_rate, spec.channels) == (48000, 48000, 2)
    encoder, decoder = encoder_for(spec), decoder_for(spec)
    signal = tone(48000, 600, hz=440)
    decoded = []
    for i in range(0, signal.size, 960):
        payload = encoder.encode(signal[i : i + 960])
        assert 0 < len(payload) < 400
        pcm = decoder.decode(payload)
        assert pcm.dtype == np.int16 and pcm.size == 960
        decoded.append(pcm)
    out = np.concatenate(decoded)
    # Lossy and delayed: compare levels of the settled tone, not samples.
    rms_in = np.sqrt(np.mean(signal[24000:].astype(float) ** 2))
    rms_out = np.sqrt(np.mean(out[24000:].astype(float) ** 2))
    assert 0.7 < rms_out / rms_in < 1.3


def test_opus_garbage_is_a_codec_error() -> None:
    decoder = decoder_for(spec_by_name("opus"))
    with pytest.raises(CodecError):
        decoder.decode(b"")
    with pytest.raises(CodecError, match="does not decode"):
        decoder.decode(b"\xff\xff\xff")


def test_opus_frame_durations() -> None:
    spec = spec_by_name("opus")
    for ms in (10, 40, 60):
        encoder = encoder_for(spec, ms)
        pcm = decoder_for(spec).decode(encoder.encode(tone(48000, ms)))
        assert pcm.size == 48 * ms
    with pytest.raises(CodecError, match="30 ms"):
        encoder_for(spec, 30)


def test_conceal_is_silence_of_the_requested_length() -> None:
    for name in ("pcmu", "opus", "g722"):
        out = decoder_for(spec_by_name(name)).conceal(123)
        assert out.dtype == np.int16 and out.size == 123 and not out.any()
