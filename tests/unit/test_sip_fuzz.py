"""Fuzzing the SIP, SDP and SIPREC parsers: random bytes and mutations of real messages must
end in a parsed message, a 400, or a counted drop, never in an exception or a hang."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from callscribe.bridge.events import Dropped
from callscribe.bridge.sip.message import Peer, SipParseError, SipResponse, StreamFramer, parse_message
from callscribe.bridge.sip.sdp import SdpError, parse_sdp, select_media
from callscribe.bridge.sip.siprec import SiprecError, parse_siprec_body, recorded_streams
from callscribe.bridge.sip.uas import UasCore
from tests.unit.sip_data import MESSAGES, load

REAL = [load(name) for name in MESSAGES]
PEERS = [Peer("udp", "198.51.100.9", 5062), Peer("tcp", "198.51.100.9", 40000)]
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(REAL)))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "cut", "dup", "insert", "swap_lines"]))
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[i : i + draw(st.integers(1, 64))]
        elif op == "dup":
            data[i:i] = data[i : i + draw(st.integers(1, 64))]
        elif op == "insert":
            data[i:i] = draw(
                st.sampled_from(
                    [
                        b"\r\n",
                        b":",
                        b";",
                        b"<",
                        b">",
                        b",",
                        b"\x00",
                        b"--",
                        b"=",
                        b"Content-Length: 9999\r\n",
                        b"&amp;",
                        b"<!DOCTYPE x [<!ENTITY a 'b'>]>",
                        b"m=audio 0 RTP/AVP\r\n",
                        b"\xff\xfe",
                    ]
                )
            )
        else:
            lines = bytes(data).split(b"\r\n")
            j = draw(st.integers(0, len(lines) - 1))
            k = draw(st.integers(0, len(lines) - 1))
            lines[j], lines[k] = lines[k], lines[j]
            data = bytearray(b"\r\n".join(lines))
    return bytes(data)


messages = st.one_of(mutated(), st.binary(max_size=2048))


def exercise_core(data: bytes, peer: Peer) -> None:
    core = UasCore("<sip:callscribe@192.0.2.10:5060>")
    events = core.receive(data, peer, 0.0)
    for event in events:
        if isinstance(event, Dropped):
            assert event.reason and event.detail
    for out, _ in core.outgoing():
        reply = parse_message(out)  # whatever we send must itself parse
        assert isinstance(reply, SipResponse)
    core.handle_timers(100.0)


@FUZZ
@given(messages, st.sampled_from(PEERS))
def test_core_never_raises(data: bytes, peer: Peer) -> None:
    exercise_core(data, peer)


@FUZZ
@given(messages, st.integers(1, 97))
def test_framer_never_raises_and_loses_nothing_framed(data: bytes, chunk: int) -> None:
    framer = StreamFramer()
    try:
        for i in range(0, len(data), chunk):
            for message in framer.feed(data[i : i + chunk]):
                exercise_core(message, PEERS[1])
    except SipParseError as exc:
        assert exc.reason


@FUZZ
@given(mutated())
def test_sdp_and_siprec_bodies(data: bytes) -> None:
    try:
        message = parse_message(data)
    except SipParseError:
        return
    content_type = message.headers.get("content-type") or "application/sdp"
    try:
        offer = parse_siprec_body(content_type, message.body)
        sdp = parse_sdp(offer.sdp)
        selected = select_media(sdp)
        streams = recorded_streams(sdp, offer.metadata)
    except (SdpError, SiprecError):
        return
    assert len(selected) == len(streams) == len(sdp.media)
    assert len({s.leg for s in streams}) == len(streams)


@FUZZ
@given(st.text(max_size=600))
def test_sdp_text(text: str) -> None:
    try:
        sdp = parse_sdp(text)
    except SdpError:
        return
    select_media(sdp)
