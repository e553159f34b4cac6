"""AudioSocket framing: bytes in, events out, whatever the TCP segmentation."""

from __future__ import annotations

import contextlib
import itertools
import struct
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from callscribe.bridge.audiosocket.parser import (
    AudioSocketError,
    AudioSocketParser,
    CallIdentified,
    ErrorReceived,
    HangupReceived,
    hangup_frame,
)
from callscribe.bridge.events import CALLER, AudioReceived, Dropped, DtmfReceived
from callscribe.codecs import s16le, spec_by_name

CALL = uuid.UUID("6f1c4a52-9c1e-4b5e-8d7a-3f2b1c0d9e8f")


def frame(kind: int, payload: bytes = b"") -> bytes:
    return struct.pack("!BH", kind, len(payload)) + payload


def call_stream() -> bytes:
    """What AudioSocket() sends: UUID, two 20 ms slin frames, a digit, slin16, error, hangup."""
    pcm8 = struct.pack("<160h", *range(-80, 80))
    pcm16 = struct.pack("<320h", *range(320))
    return b"".join(
        [
            frame(0x01, CALL.bytes),
            frame(0x10, pcm8),
            frame(0x10, pcm8[::-1]),
            frame(0x03, b"7"),
            frame(0x12, pcm16),
            frame(0xFF, b"\x02"),
            frame(0x00),
        ]
    )


def expected_events() -> list[object]:
    pcm8 = struct.pack("<160h", *range(-80, 80))
    return [
        CallIdentified(str(CALL)),
        AudioReceived(CALLER, pcm8, "s16le-8k"),
        AudioReceived(CALLER, pcm8[::-1], "s16le-8k"),
        DtmfReceived(CALLER, "7"),
        AudioReceived(CALLER, struct.pack("<320h", *range(320)), "s16le-16k"),
        ErrorReceived(2),
        HangupReceived(),
    ]


def test_a_whole_call_in_one_read() -> None:
    assert AudioSocketParser().receive_data(call_stream()) == expected_events()


def test_split_at_every_byte_boundary() -> None:
    data = call_stream()
    for cut in range(len(data) + 1):
        parser = AudioSocketParser()
        events = parser.receive_data(data[:cut]) + parser.receive_data(data[cut:])
        assert events == expected_events(), f"split at byte {cut}"


def test_one_byte_at_a_time() -> None:
    parser = AudioSocketParser()
    events = [event for byte in call_stream() for event in parser.receive_data(bytes([byte]))]
    assert events == expected_events()


@given(cuts=st.lists(st.integers(min_value=0, max_value=1400), max_size=12))
def test_any_segmentation(cuts: list[int]) -> None:
    data = call_stream()
    bounds = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    parser = AudioSocketParser()
    events = [e for a, b in itertools.pairwise(bounds) for e in parser.receive_data(data[a:b])]
    assert events == expected_events()


@pytest.mark.parametrize(
    ("kind", "rate"),
    [
        (0x10, 8000),
        (0x11, 12000),
        (0x12, 16000),
        (0x13, 24000),
        (0x14, 32000),
        (0x15, 44100),
        (0x16, 48000),
        (0x17, 96000),
        (0x18, 192000),
    ],
)
def test_every_slin_rate(kind: int, rate: int) -> None:
    events = AudioSocketParser().receive_data(frame(0x01, CALL.bytes) + frame(kind, b"\x01\x00" * 4))
    assert events[1] == AudioReceived(CALLER, b"\x01\x00" * 4, s16le(rate).name)
    assert spec_by_name(events[1].codec).sample_rate == rate


def test_audio_before_uuid_is_a_protocol_error() -> None:
    with pytest.raises(AudioSocketError, match=r"first frame must be kind 0x01 \(UUID\), got kind 0x10"):
        AudioSocketParser().receive_data(frame(0x10, b"\x00\x00"))


def test_uuid_of_the_wrong_size_is_a_protocol_error() -> None:
    with pytest.raises(AudioSocketError, match="16 bytes, got 4"):
        AudioSocketParser().receive_data(frame(0x01, b"abcd"))


def test_bad_frames_are_skipped_with_a_reason() -> None:
    parser = AudioSocketParser(max_payload=1000)
    events = parser.receive_data(
        frame(0x01, CALL.bytes)
        + frame(0x10)  # zero-length audio: Asterisk itself rejects these
        + frame(0x10, b"\x01\x02\x03")  # half a sample
        + frame(0x42, b"??")  # unknown kind
        + frame(0x03, b"xy")  # not one digit
        + frame(0x10, b"\x00" * 1200)  # oversized: read past, stays in frame
        + frame(0x01, CALL.bytes)  # duplicate UUID
        + frame(0x10, b"\x05\x00")
    )
    reasons = [e.reason for e in events if isinstance(e, Dropped)]
    assert reasons == ["empty", "odd_length", "unknown_kind", "bad_dtmf", "oversized", "duplicate_uuid"]
    assert events[-1] == AudioReceived(CALLER, b"\x05\x00", "s16le-8k")


def test_oversized_frame_split_across_reads_is_read_past() -> None:
    parser = AudioSocketParser(max_payload=100)
    data = frame(0x01, CALL.bytes) + frame(0x10, b"\x00" * 500) + frame(0x10, b"\x09\x00")
    events = [e for i in range(0, len(data), 7) for e in parser.receive_data(data[i : i + 7])]
    assert [type(e) for e in events] == [CallIdentified, Dropped, AudioReceived]


def test_nothing_after_hangup() -> None:
    parser = AudioSocketParser()
    events = parser.receive_data(frame(0x01, CALL.bytes) + hangup_frame() + frame(0x10, b"\x00\x00"))
    assert events == [CallIdentified(str(CALL)), HangupReceived()]
    assert parser.ended and parser.receive_data(frame(0x10, b"\x00\x00")) == []


def test_error_message_names_the_code() -> None:
    assert "0x04: memory error" in ErrorReceived(4).message
    assert "no code" in ErrorReceived(None).message


@settings(max_examples=300)
@given(data=st.binary(max_size=600))
def test_garbage_raises_only_protocol_errors(data: bytes) -> None:
    parser = AudioSocketParser()
    with contextlib.suppress(AudioSocketError):
        parser.receive_data(frame(0x01, CALL.bytes) + data)


@settings(max_examples=300)
@given(data=st.binary(max_size=200))
def test_garbage_before_uuid_is_refused_or_waited_for(data: bytes) -> None:
    try:
        AudioSocketParser().receive_data(data)
    except AudioSocketError:
        return
    # Accepted only while no complete header has arrived, or when it is a UUID frame.
    assert len(data) < 3 or data[0] == 0x01


def test_mid_frame_tells_a_clean_close_from_a_cut_one() -> None:
    # Asterisk hangs up by closing the socket after a whole frame (no 0x00 frame): only a
    # close with part of a frame buffered (or an oversized one being skipped) is a cut.
    parser = AudioSocketParser(max_payload=16)
    parser.receive_data(frame(0x01, CALL.bytes) + frame(0x10, b"\x00\x00"))
    assert not parser.mid_frame
    parser.receive_data(frame(0x10, b"\x00\x00\x00\x00")[:4])
    assert parser.mid_frame
    parser.receive_data(b"\x00\x00\x00")
    assert not parser.mid_frame
    parser.receive_data(frame(0x10, bytes(40))[:10])  # oversized: its payload is being skipped
    assert parser.mid_frame
