from __future__ import annotations

import pytest

from callscribe.bridge.sip.message import SipRequest, parse_message
from callscribe.bridge.sip.sdp import SdpError, build_answer, parse_sdp, select_media
from callscribe.bridge.sip.siprec import (
    SiprecError,
    parse_rs_metadata,
    parse_siprec_body,
    recorded_streams,
    split_multipart,
)
from tests.unit.sip_data import load


def siprec_parts(name: str) -> tuple[SipRequest, bytes]:
    message = parse_message(load(name))
    assert isinstance(message, SipRequest)
    return message, message.body


def test_plain_offer_answer_keeps_offered_numbers_and_dtmf() -> None:
    message = parse_message(load("plain_invite"))
    offer = parse_sdp(message.body)
    [choice] = select_media(offer)
    assert choice.codec == "pcmu" and choice.payload_type == 0
    assert choice.payload_types == {0: "pcmu", 8: "pcma", 101: "telephone-event"}
    assert choice.remote == ("198.51.100.9", 49170)
    answer = build_answer(offer, [choice], [40010], "192.0.2.10", "77", 0)
    text = answer.serialize().decode()
    assert "m=audio 40010 RTP/AVP 0 101\r\n" in text
    assert "a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\n" in text
    assert "a=recvonly" in text and "c=IN IP4 192.0.2.10" in text
    assert parse_sdp(text).media[0].port == 40010


def test_opus_g722_and_rejections() -> None:
    offer = parse_sdp(
        "v=0\r\no=- 1 1 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 10.0.0.1\r\nt=0 0\r\n"
        "m=audio 5000 RTP/AVP 111 9\r\na=rtpmap:111 opus/48000/2\r\na=fmtp:111 useinbandfec=1\r\n"
        "m=video 5002 RTP/AVP 96\r\na=rtpmap:96 VP8/90000\r\n"
        "m=audio 5004 RTP/AVP 97\r\na=rtpmap:97 iLBC/8000\r\n"
        "m=audio 5006 RTP/AVP 9\r\n"
    )
    selected = select_media(offer)
    assert [c.codec for c in selected] == ["opus", None, None, "g722"]
    answer = (
        build_answer(offer, selected, [4000, None, None, 4002], "192.0.2.10", "1", 0).serialize().decode()
    )
    assert "m=audio 4000 RTP/AVP 111\r\na=rtpmap:111 opus/48000/2\r\na=fmtp:111 useinbandfec=1" in answer
    assert "m=video 0 RTP/AVP 96" in answer
    assert "m=audio 0 RTP/AVP 97" in answer
    assert "m=audio 4002 RTP/AVP 9\r\na=rtpmap:9 G722/8000" in answer


@pytest.mark.parametrize(
    ("direction", "connection", "answered"),
    [
        ("sendrecv", "10.0.0.1", "recvonly"),
        ("sendonly", "10.0.0.1", "recvonly"),
        ("inactive", "10.0.0.1", "inactive"),
        ("recvonly", "10.0.0.1", "inactive"),
        ("sendrecv", "0.0.0.0", "inactive"),
    ],
)
def test_hold_directions(direction: str, connection: str, answered: str) -> None:
    offer = parse_sdp(
        f"v=0\r\no=- 1 2 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 {connection}\r\nt=0 0\r\n"
        f"m=audio 5000 RTP/AVP 8\r\na={direction}\r\n"
    )
    selected = select_media(offer)
    answer = build_answer(offer, selected, [4000], "192.0.2.10", "1", 0).serialize().decode()
    assert f"a={answered}\r\n" in answer


@pytest.mark.parametrize(
    "text",
    ["", "x=1", "v=1\r\n", "v=0\r\nm=audio notaport RTP/AVP 0", "v=0\r\nc=IN IP4", "v=0\r\no=a b c"],
)
def test_bad_sdp(text: str) -> None:
    with pytest.raises(SdpError):
        parse_sdp(text)


def test_sonus_metadata_without_colon_one_namespace() -> None:
    message, body = siprec_parts("siprec_sonus")
    offer = parse_siprec_body(message.headers.get("content-type") or "", body)
    assert offer.metadata is not None
    sdp = parse_sdp(offer.sdp)
    streams = recorded_streams(sdp, offer.metadata)
    # label 1 is sent by participant b (8012), label 2 by participant a (8500)
    assert [s.leg for s in streams] == ["8012@198.51.100.30", "8500@198.51.100.20"]
    assert streams[1].participant is not None and streams[1].participant.name == "Extension 8500"
    meta = offer.metadata.as_meta()
    assert meta["call_data"]["callid"] == "orig-2da553f7@198.51.100.20"
    assert len(meta["participants"]) == 2


def test_cisco_metadata_with_extra_part_and_dtmf() -> None:
    message, body = siprec_parts("siprec_cisco")
    offer = parse_siprec_body(message.headers.get("content-type") or "", body)
    sdp = parse_sdp(offer.sdp)
    streams = recorded_streams(sdp, offer.metadata)
    assert [s.leg for s in streams] == ["7301@203.0.113.50", "7300@203.0.113.50"]
    assert offer.metadata is not None
    assert offer.metadata.as_meta()["original_call_id"] == "e9fffff2020a598b"
    assert [c.payload_types for c in select_media(sdp)] == [{0: "pcmu", 101: "telephone-event"}] * 2


def test_no_metadata_names_caller_and_callee() -> None:
    message, body = siprec_parts("siprec_cisco")
    ctype = message.headers.get("content-type") or ""
    parts = split_multipart(ctype, body)
    offer = parse_siprec_body("application/sdp", parts[0].content)
    assert offer.metadata is None
    streams = recorded_streams(parse_sdp(offer.sdp), None)
    assert [s.leg for s in streams] == ["caller", "callee"]


def test_legacy_audiocodes_content_type_and_duplicate_aors() -> None:
    xml = (
        b"<?xml version='1.0'?><recording xmlns='urn:ietf:params:xml:ns:recording'>"
        b"<participant id='p1'><nameID aor='sip:100@pbx'/></participant>"
        b"<participant id='p2'><nameID aor='sip:100@pbx'/></participant>"
        b"<stream stream_id='s1'><label>10</label></stream><stream stream_id='s2'><label>11</label></stream>"
        b"<participantstreamassoc participant_id='p1'><send>s1</send></participantstreamassoc>"
        b"<participantstreamassoc participant_id='p2'><send>s2</send></participantstreamassoc>"
        b"</recording>"
    )
    sdp = (
        b"v=0\r\no=- 1 1 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 10.0.0.1\r\nt=0 0\r\n"
        b"m=audio 5000 RTP/AVP 0\r\na=label:10\r\na=sendonly\r\n"
        b"m=audio 5002 RTP/AVP 0\r\na=label:11\r\na=sendonly\r\n"
    )
    body = (
        b"--X\r\nContent-Type: application/sdp\r\n\r\n" + sdp + b"\r\n--X\r\n"
        b"Content-Type: application/rs-metadata\r\nContent-Disposition: recording-session\r\n\r\n"
        + xml
        + b"\r\n--X--\r\n"
    )
    offer = parse_siprec_body('multipart/mixed; boundary="X"', body)
    streams = recorded_streams(parse_sdp(offer.sdp), offer.metadata)
    assert [s.leg for s in streams] == ["100@pbx", "100@pbx-2"]


@pytest.mark.parametrize(
    "document",
    [
        b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]>'
        b'<recording xmlns="urn:ietf:params:xml:ns:recording:1">&b;</recording>',
        b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        b'<recording xmlns="urn:ietf:params:xml:ns:recording:1">&x;</recording>',
        b"<recording",
        b"<other xmlns='urn:x'/>",
    ],
)
def test_metadata_entities_and_junk_refused(document: bytes) -> None:
    with pytest.raises(SiprecError):
        parse_rs_metadata(document)


def test_multipart_without_sdp_or_boundary() -> None:
    with pytest.raises(SiprecError):
        parse_siprec_body("multipart/mixed", b"--X\r\n\r\n--X--")
    with pytest.raises(SiprecError):
        parse_siprec_body("multipart/mixed;boundary=X", b"--X\r\nContent-Type: text/plain\r\n\r\nhi\r\n--X--")
    with pytest.raises(SiprecError):
        parse_siprec_body("text/html", b"<b>")
