"""One fuzz target per parser: bytes in; a parsed value, a documented error, or a counted drop out.

A target raises only when the parser does something a hostile peer could exploit: an exception
other than the parser's own error type (which the transports turn into a 400, a counted drop, or a
closed connection), or an invariant broken (unbounded buffering). Each target is a plain function,
so pytest can replay regression inputs without atheris.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable

from callscribe.bridge.audiosocket.parser import AudioSocketError, AudioSocketParser
from callscribe.bridge.forks import DIALECTS
from callscribe.bridge.forks.events import ForkProtocolError
from callscribe.bridge.rtp.jitter import JitterBuffer
from callscribe.bridge.rtp.packet import RtpError, RtpPacket, is_rtcp
from callscribe.bridge.rtp.receiver import RtpLegReceiver
from callscribe.bridge.sip.auth import AuthVerdict, DigestAuthenticator
from callscribe.bridge.sip.message import (
    Peer,
    SipParseError,
    SipRequest,
    StreamFramer,
    parse_message,
)
from callscribe.bridge.sip.sdp import SdpError, parse_sdp, select_media
from callscribe.bridge.sip.siprec import SiprecError, parse_rs_metadata, parse_siprec_body, recorded_streams
from callscribe.bridge.sip.uas import UasCore
from callscribe.codecs.base import CodecError
from callscribe.codecs.dtmf import DtmfReceiver, TelephoneEvent

Target = Callable[[bytes], None]
PEER = Peer("udp", "198.51.100.9", 5062)


def rtp_packet(data: bytes) -> None:
    try:
        packet = RtpPacket.parse(data)
    except RtpError:
        return
    # What parses must serialize back to a packet that parses to the same fields.
    again = RtpPacket.parse(packet.serialize())
    if (again.payload_type, again.sequence_number, again.timestamp, again.ssrc, again.payload) != (
        packet.payload_type,
        packet.sequence_number,
        packet.timestamp,
        packet.ssrc,
        packet.payload,
    ):
        raise AssertionError(f"RTP round trip changed {packet!r} into {again!r}")


def rtcp_detection(data: bytes) -> None:
    if is_rtcp(data) and not 192 <= data[1] <= 223:
        raise AssertionError(f"{data[:2]!r} taken for RTCP")


def dtmf_payload(data: bytes) -> None:
    with contextlib.suppress(CodecError):
        TelephoneEvent.parse(data)
    receiver = DtmfReceiver()
    # Several events at successive timestamps, as a stream of 4-byte payloads.
    for i in range(0, len(data) - 5, 6):
        timestamp = struct.unpack_from("!H", data, i)[0] * 160
        with contextlib.suppress(CodecError):
            receiver.receive(timestamp, data[i + 2 : i + 6])
    receiver.flush()


def _datagrams(data: bytes) -> list[tuple[float, bytes]]:
    """Input framing for the receiver targets: [u8 time step ms][u16 length][datagram]..."""
    out: list[tuple[float, bytes]] = []
    now, i = 0.0, 0
    while i + 3 <= len(data):
        step, length = data[i], struct.unpack_from("!H", data, i + 1)[0] % 1500
        now += step / 1000
        out.append((now, data[i + 3 : i + 3 + length]))
        i += 3 + length
    return out


def jitter_buffer(data: bytes) -> None:
    buffer = JitterBuffer(60, capacity=64)
    for now, datagram in _datagrams(data):
        try:
            packet = RtpPacket.parse(datagram)
        except RtpError:
            continue
        buffer.push(packet, now)
        buffer.pop(now)
        if len(buffer) > 64:
            raise AssertionError(f"jitter buffer holds {len(buffer)} packets, capacity 64")
    buffer.flush()


def rtp_receiver(data: bytes) -> None:
    receiver = RtpLegReceiver("pcmu", payload_types={0: "pcmu", 8: "pcma", 9: "g722", 96: "l16"}, batch_ms=60)
    for now, datagram in _datagrams(data):
        receiver.receive(datagram, now)
        receiver.poll(now)
    receiver.flush()


def audiosocket(data: bytes) -> None:
    parser = AudioSocketParser(max_payload=4096)
    # Fed in uneven chunks, as TCP delivers them.
    for i in range(0, len(data), 37):
        try:
            parser.receive_data(data[i : i + 37])
        except AudioSocketError:
            return


def sip_message(data: bytes) -> None:
    for stream in (False, True):
        with contextlib.suppress(SipParseError):
            parse_message(data, stream=stream)
    framer = StreamFramer()
    with contextlib.suppress(SipParseError):
        framer.feed(data)
    # The UAS core answers garbage with a 400 or a counted drop, never an exception.
    core = UasCore("<sip:callscribe@192.0.2.10:5060>")
    core.receive(data, PEER, 0.0)
    core.outgoing()


def sdp(data: bytes) -> None:
    try:
        offer = parse_sdp(data)
    except SdpError:
        return
    select_media(offer)


def siprec_metadata(data: bytes) -> None:
    with contextlib.suppress(SiprecError):
        parse_rs_metadata(data)


def siprec_body(data: bytes) -> None:
    # First line: the Content-Type (with its boundary); the rest: the multipart body.
    head, _, body = data.partition(b"\n")
    try:
        offer = parse_siprec_body(head.decode("latin-1"), body)
    except (SiprecError, SdpError):
        return
    with contextlib.suppress(SdpError):
        names = [stream.leg for stream in recorded_streams(parse_sdp(offer.sdp), offer.metadata)]
        # Every m-line gets a leg name, unique in the session (a blank AOR once named a leg "").
        assert all(names) and len(set(names)) == len(names), names


def sip_digest(data: bytes) -> None:
    """An Authorization header value as a hostile UAC writes it, alone and after a valid nonce
    (to reach the response and nc checks), in an INVITE that went through `parse_message`
    (what the server hands the authenticator): always a verdict, never an exception (a
    non-ASCII nonce was a TypeError, a 500 on every INVITE); the nonce table stays bounded."""
    auth = DigestAuthenticator("callscribe", "pbx", "s3cret", secret=b"k" * 32, max_nonces=4)
    nonce = auth.nonce(1000.0).encode()
    for value in (data, b'Digest username="pbx", realm="callscribe", nonce="' + nonce + b'", ' + data):
        wire = (
            b"INVITE sip:transcribe@192.0.2.10 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.5;branch=z9hG4bKf\r\n"
            b"From: <sip:pbx@10.0.0.5>;tag=1\r\nTo: <sip:transcribe@192.0.2.10>\r\nCall-ID: f\r\n"
            b"CSeq: 1 INVITE\r\nAuthorization: " + value + b"\r\nContent-Length: 0\r\n\r\n"
        )
        try:
            request = parse_message(wire)
        except SipParseError:
            continue
        if not isinstance(request, SipRequest):
            continue
        for now in (1000.5, 1001.0):
            assert isinstance(auth.check(request, now), AuthVerdict)
    assert auth.nonces_tracked <= 4


def _fork_messages(data: bytes) -> tuple[str, list[str | bytes]]:
    """[u8 dialect][u16 length][u8 kind: even text, odd binary][message]..."""
    names = sorted(DIALECTS)
    dialect = names[data[0] % len(names)] if data else names[0]
    out: list[str | bytes] = []
    i = 1
    while i + 3 <= len(data):
        length, kind = struct.unpack_from("!HB", data, i)
        chunk = data[i + 3 : i + 3 + length]
        out.append(chunk if kind & 1 else chunk.decode("utf-8", "replace"))
        i += 3 + length
    return dialect, out


def websocket_fork(data: bytes) -> None:
    dialect, messages = _fork_messages(data)
    parser = DIALECTS[dialect]({"call_id": "fuzz", "leg": "caller", "rate": "8000"})
    try:
        for message in messages:
            if isinstance(message, str):
                parser.receive_text(message)
            else:
                parser.receive_bytes(message)
        parser.finish()
    except ForkProtocolError:
        pass


TARGETS: dict[str, Target] = {
    "rtp_packet": rtp_packet,
    "rtcp_detection": rtcp_detection,
    "dtmf_payload": dtmf_payload,
    "jitter_buffer": jitter_buffer,
    "rtp_receiver": rtp_receiver,
    "audiosocket": audiosocket,
    "sip_message": sip_message,
    "sdp": sdp,
    "siprec_metadata": siprec_metadata,
    "siprec_body": siprec_body,
    "websocket_fork": websocket_fork,
    "sip_digest": sip_digest,
}
