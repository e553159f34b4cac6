"""RTP packet parsing and building (RFC 3550 §5.1), including hostile input."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from callscribe.bridge.rtp.packet import RtpError, RtpPacket, is_rtcp, seq_delta

# A real PCMU packet header (Asterisk): V=2, PT 0, marker, seq 0x1234, ts 0xdeadbeef, SSRC 0x01020304.
VECTOR = bytes.fromhex("80801234deadbeef01020304") + b"\xff" * 160


def test_known_vector() -> None:
    packet = RtpPacket.parse(VECTOR)
    assert (packet.payload_type, packet.marker, packet.sequence_number) == (0, True, 0x1234)
    assert (packet.timestamp, packet.ssrc, len(packet.payload)) == (0xDEADBEEF, 0x01020304, 160)
    assert packet.serialize() == VECTOR


def test_csrc_extension_padding_round_trip() -> None:
    packet = RtpPacket(
        payload_type=111,
        sequence_number=65535,
        timestamp=4294967295,
        ssrc=7,
        payload=b"opus!",
        csrc=(1, 2, 3),
        extension_profile=0xBEDE,
        extension=b"\x10\xff\x00\x00",
        padding=3,
    )
    data = packet.serialize()
    assert data[0] == 0x80 | 0x20 | 0x10 | 3
    assert data[-1] == 3
    assert RtpPacket.parse(data) == packet


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "truncated"),
        (VECTOR[:11], "truncated"),
        (bytes([0x40]) + VECTOR[1:], "bad_version"),
        (bytes([0x00]) + VECTOR[1:], "bad_version"),
        (bytes([0x8F]) + VECTOR[1:12] + b"\x00" * 8, "bad_csrc"),  # 15 CSRCs announced, 2 present
        (bytes([0x90]) + VECTOR[1:12] + b"\xbe\xde", "bad_extension"),
        (bytes([0x90]) + VECTOR[1:12] + b"\xbe\xde\xff\xff" + b"\x00" * 8, "bad_extension"),
        (bytes([0xA0]) + VECTOR[1:12] + b"\x00\x00\x00", "bad_padding"),  # zero padding count
        (bytes([0xA0]) + VECTOR[1:12] + b"\x00\x09", "bad_padding"),  # more padding than payload
    ],
)
def test_malformed_packets_have_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(RtpError) as info:
        RtpPacket.parse(data)
    assert info.value.reason == reason
    assert reason in str(info.value)


@given(st.binary(max_size=200))
def test_random_bytes_parse_or_raise_rtp_error(data: bytes) -> None:
    try:
        packet = RtpPacket.parse(data)
    except RtpError as exc:
        assert exc.reason in {"truncated", "bad_version", "bad_csrc", "bad_extension", "bad_padding"}
    else:
        assert len(packet.payload) <= len(data) - 12


@given(
    st.integers(0, 127),
    st.integers(0, 65535),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.binary(max_size=64),
    st.booleans(),
    st.lists(st.integers(0, 2**32 - 1), max_size=15),
)
def test_serialize_parse_round_trip(
    pt: int, seq: int, ts: int, ssrc: int, payload: bytes, marker: bool, csrc: list[int]
) -> None:
    packet = RtpPacket(pt, seq, ts, ssrc, payload, marker, tuple(csrc))
    assert RtpPacket.parse(packet.serialize()) == packet


def test_rtcp_is_recognised_by_packet_type() -> None:
    sender_report = bytes([0x80, 200]) + bytes(26)
    assert is_rtcp(sender_report)
    assert is_rtcp(bytes([0x81, 201, 0, 7]))  # receiver report
    assert not is_rtcp(VECTOR)
    assert not is_rtcp(bytes([0x80, 0x7F]))  # PT 127 without marker
    assert not is_rtcp(b"\x80")


def test_seq_delta_wraps() -> None:
    assert seq_delta(0, 65535) == 1
    assert seq_delta(65535, 0) == -1
    assert seq_delta(100, 50) == 50
    assert seq_delta(50, 100) == -50


def test_rtcp_bye_ssrcs_walks_compound_packets() -> None:
    from callscribe.bridge.rtp.packet import rtcp_bye_ssrcs

    receiver_report = bytes([0x80, 201, 0, 1]) + (7).to_bytes(4, "big")
    bye = bytes([0x82, 203, 0, 2]) + (7).to_bytes(4, "big") + (8).to_bytes(4, "big")
    assert rtcp_bye_ssrcs(receiver_report + bye) == [7, 8]
    assert rtcp_bye_ssrcs(bye + b"reason") == [7, 8]  # trailing bytes past the BYE are ignored
    assert rtcp_bye_ssrcs(receiver_report) is None
    assert rtcp_bye_ssrcs(bytes([0x82, 203, 0, 9]) + bytes(8)) is None  # length past the end
    assert rtcp_bye_ssrcs(bytes([0x40, 203, 0, 0])) is None  # not version 2
    assert rtcp_bye_ssrcs(b"") is None
