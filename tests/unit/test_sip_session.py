"""SIP session logic (SipCallHandler) over the real UAS core, without sockets or Redis.

`PortBook` is a working in-memory RtpPorts: it hands out even ports and remembers which legs
are open, which is all the session logic may rely on.
"""

from __future__ import annotations

from typing import Any

import pytest

from callscribe.bridge.events import DropReason, EndReason
from callscribe.bridge.limits import AtCapacity, LegConflict
from callscribe.bridge.rtp.ports import ReservedLeg
from callscribe.bridge.sip.events import DialogEnded, DialogEndReason, InviteReceived
from callscribe.bridge.sip.message import Peer, SipResponse, parse_message, parse_name_addr
from callscribe.bridge.sip.sdp import parse_sdp
from callscribe.bridge.sip.session import SipCallHandler
from callscribe.bridge.sip.uas import UasCore
from callscribe.metrics import Metrics
from callscribe.security import AccessPolicy, parse_networks
from callscribe.settings import Settings
from tests.unit.sip_data import load

PEER = Peer("udp", "198.51.100.5", 5060)


class PortBook:
    def __init__(self, ports: int = 16) -> None:
        self.free = [30000 + 2 * n for n in range(ports)]
        self.open: dict[str, tuple[str, str, str, dict[int, str], int]] = {}
        self.released: list[str] = []
        self.reasons: list[EndReason] = []
        self.conflict_on: str | None = None
        self._next = 0

    async def reserve(
        self,
        call_id: str,
        leg: str,
        codec: str,
        meta: dict[str, Any] | None = None,
        payload_types: dict[int, str] | None = None,
        owner: str | None = None,
    ) -> ReservedLeg:
        if leg == self.conflict_on:
            raise LegConflict(f"leg {leg!r} of call {call_id!r} is already open")
        if not self.free:
            raise AtCapacity("no free RTP port")
        self._next += 1
        leg_id = f"leg{self._next}"
        port = self.free.pop(0)
        self.open[leg_id] = (call_id, leg, codec, dict(payload_types or {}), port)
        return ReservedLeg(leg_id, "0.0.0.0", port)

    async def release(self, leg_id: str, reason: EndReason = EndReason.RELEASED) -> bool:
        call = self.open.pop(leg_id, None)
        if call is None:
            return False
        self.free.append(call[4])
        self.released.append(leg_id)
        self.reasons.append(reason)
        return True


class Rig:
    """A core, a handler and what went out on the wire."""

    def __init__(self, policy: AccessPolicy | None = None, **settings: Any) -> None:
        self.now = 100.0
        self.settings = Settings(sip_host="192.0.2.10", **settings)
        self.core = UasCore("<sip:callscribe@192.0.2.10:5060>")
        self.ports = PortBook()
        self.metrics = Metrics()
        self.wire: list[SipResponse] = []
        self.handler = SipCallHandler(
            self.settings,
            self.core,
            self.ports,
            self.metrics,
            policy or AccessPolicy(),
            self.flush,
            lambda: self.now,
            leg_open=lambda leg_id: leg_id in self.ports.open,
        )

    def flush(self) -> None:
        for data, _peer in self.core.outgoing():
            message = parse_message(data)
            if isinstance(message, SipResponse):
                self.wire.append(message)

    async def invite(self, data: bytes, peer: Peer = PEER) -> SipResponse:
        events = self.core.receive(data, peer, self.now)
        self.flush()
        [event] = [e for e in events if isinstance(e, InviteReceived)]
        await self.handler.on_invite(event)
        return self.wire[-1]


def plain_invite(body: bytes | None = None, extra: str = "", call_id: str = "call-1@pbx") -> bytes:
    sdp = (
        body
        if body is not None
        else (
            b"v=0\r\no=pbx 1 1 IN IP4 198.51.100.5\r\ns=-\r\nc=IN IP4 198.51.100.5\r\nt=0 0\r\n"
            b"m=audio 40000 RTP/AVP 8 0 101\r\na=rtpmap:101 telephone-event/8000\r\na=sendonly\r\n"
        )
    )
    head = (
        "INVITE sip:callscribe@192.0.2.10 SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 198.51.100.5:5060;branch=z9hG4bK-s1\r\n"
        "From: <sip:pbx@198.51.100.5>;tag=pbx1\r\n"
        "To: <sip:callscribe@192.0.2.10>\r\n"
        f"Call-ID: {call_id}\r\n"
        "CSeq: 1 INVITE\r\n"
        "Contact: <sip:pbx@198.51.100.5:5060>\r\n"
        f"{extra}"
    )
    if sdp:
        head += "Content-Type: application/sdp\r\n"
    return (head + f"Content-Length: {len(sdp)}\r\n\r\n").encode() + sdp


async def test_plain_call_reserves_one_leg_and_answers_with_its_port() -> None:
    rig = Rig()
    ok = await rig.invite(plain_invite())
    assert [r.status for r in rig.wire] == [100, 200]
    [(call_id, leg, codec, payload_types, port)] = rig.ports.open.values()
    assert (call_id, leg, codec) == ("call-1@pbx", "caller", "pcma")  # the offer's first codec
    assert payload_types == {8: "pcma", 0: "pcmu", 101: "telephone-event"}
    answer = parse_sdp(ok.body)
    assert answer.media[0].port == port and answer.media[0].formats[0] == "8"
    assert rig.handler.active_calls == 1


async def test_leg_and_call_headers_name_the_leg() -> None:
    rig = Rig()
    await rig.invite(plain_invite(extra="X-Callscribe-Leg: agent\r\nX-Callscribe-Call-ID: conf-9\r\n"))
    [(call_id, leg, *_rest)] = rig.ports.open.values()
    assert (call_id, leg) == ("conf-9", "agent")
    bad = Rig()
    response = await bad.invite(plain_invite(extra="X-Callscribe-Leg: no spaces allowed\r\n"))
    assert response.status == 400 and not bad.ports.open


async def test_siprec_session_opens_one_leg_per_recorded_stream() -> None:
    rig = Rig()
    ok = await rig.invite(load("siprec_sonus"))
    assert ok.status == 200
    legs = sorted(leg for _call, leg, *_rest in rig.ports.open.values())
    assert len(legs) == 2 and legs[0] != legs[1]
    assert all(m.port > 0 for m in parse_sdp(ok.body).media)


async def test_no_codec_in_common_is_488_and_nothing_stays_reserved() -> None:
    rig = Rig()
    sdp = (
        b"v=0\r\no=pbx 1 1 IN IP4 198.51.100.5\r\ns=-\r\nc=IN IP4 198.51.100.5\r\nt=0 0\r\n"
        b"m=audio 40000 RTP/AVP 18\r\na=rtpmap:18 G729/8000\r\n"
    )
    response = await rig.invite(plain_invite(sdp))
    assert response.status == 488 and not rig.ports.open and rig.handler.active_calls == 0


async def test_a_body_that_does_not_parse_is_400_and_counted() -> None:
    rig = Rig()
    response = await rig.invite(plain_invite(b"this is not sdp"))
    assert response.status == 400
    assert rig.metrics.dropped("sip", DropReason.BAD_BODY) == 1


async def test_capacity_and_leg_conflicts_are_refused_cleanly() -> None:
    rig = Rig(max_calls=1)
    assert (await rig.invite(plain_invite())).status == 200
    busy = await rig.invite(plain_invite(call_id="call-2@pbx").replace(b"z9hG4bK-s1", b"z9hG4bK-s2"))
    assert busy.status == 503 and busy.headers.get("retry-after") == "30"
    conflicted = Rig()
    conflicted.ports.conflict_on = "caller"
    response = await conflicted.invite(plain_invite())
    assert response.status == 488 and "already open" in response.reason


async def test_sources_outside_sip_allow_networks_get_403() -> None:
    policy = AccessPolicy(sip_allow_networks=parse_networks(["203.0.113.0/24"]))
    rig = Rig(policy)
    response = await rig.invite(plain_invite())
    assert response.status == 403 and not rig.ports.open


async def test_digest_auth_challenges_first() -> None:
    from pydantic import SecretStr

    policy = AccessPolicy(sip_auth_user="pbx", sip_auth_password=SecretStr("s3cret"))
    rig = Rig(policy)
    response = await rig.invite(plain_invite())
    assert response.status == 401 and "Digest realm=" in (response.headers.get("www-authenticate") or "")
    assert not rig.ports.open


async def test_bye_and_shutdown_release_every_leg() -> None:
    rig = Rig()
    ok = await rig.invite(load("siprec_sonus"))
    dialog_id = next(iter(rig.handler.sessions))
    assert parse_name_addr(ok.headers.get("to") or "").tag
    await rig.handler.on_ended(DialogEnded(dialog_id, DialogEndReason.BYE))
    assert not rig.ports.open and len(rig.ports.released) == 2 and rig.handler.active_calls == 0
    assert rig.ports.reasons == [EndReason.HANGUP, EndReason.HANGUP]  # the peer's BYE is a hangup
    await rig.invite(plain_invite())
    await rig.handler.close()
    assert not rig.ports.open and not rig.handler.sessions


def ack(rig: Rig, to_tag: str, cseq: int) -> None:
    rig.core.receive(
        b"ACK sip:callscribe@192.0.2.10 SIP/2.0\r\n"
        + f"Via: SIP/2.0/UDP 198.51.100.5:5060;branch=z9hG4bK-a{cseq}\r\n".encode()
        + b"From: <sip:pbx@198.51.100.5>;tag=pbx1\r\n"
        + f"To: <sip:callscribe@192.0.2.10>;tag={to_tag}\r\n".encode()
        + f"Call-ID: call-1@pbx\r\nCSeq: {cseq} ACK\r\nContent-Length: 0\r\n\r\n".encode(),
        PEER,
        rig.now,
    )


async def test_reinvite_keeps_fitting_legs_and_reopens_changed_ones() -> None:
    rig = Rig()
    ok = await rig.invite(plain_invite())
    [leg_id] = rig.ports.open
    to_tag = parse_name_addr(ok.headers.get("to") or "").tag
    ack(rig, to_tag, 1)  # RFC 3261 §14.2: no re-INVITE while the first 2xx waits for its ACK
    same = (
        plain_invite()
        .replace(b"z9hG4bK-s1", b"z9hG4bK-s2")
        .replace(b"CSeq: 1 INVITE", b"CSeq: 2 INVITE")
        .replace(b"To: <sip:callscribe@192.0.2.10>", f"To: <sip:callscribe@192.0.2.10>;tag={to_tag}".encode())
    )
    again = await rig.invite(same)
    assert again.status == 200 and list(rig.ports.open) == [leg_id]  # nothing changed: same leg
    assert parse_sdp(again.body).session_version == parse_sdp(ok.body).session_version
    # A codec the leg was not opened for: released and reserved anew; the answer's version rises.
    g722 = (
        b"v=0\r\no=pbx 1 2 IN IP4 198.51.100.5\r\ns=-\r\nc=IN IP4 198.51.100.5\r\nt=0 0\r\n"
        b"m=audio 40000 RTP/AVP 9\r\na=sendonly\r\n"
    )
    changed = (
        plain_invite(g722)
        .replace(b"z9hG4bK-s1", b"z9hG4bK-s3")
        .replace(b"CSeq: 1 INVITE", b"CSeq: 3 INVITE")
        .replace(b"To: <sip:callscribe@192.0.2.10>", f"To: <sip:callscribe@192.0.2.10>;tag={to_tag}".encode())
    )
    ack(rig, to_tag, 2)
    third = await rig.invite(changed)
    assert third.status == 200 and rig.ports.released == [leg_id]
    [(_call, _leg, codec, *_rest)] = rig.ports.open.values()
    assert codec == "g722"
    assert parse_sdp(third.body).session_version > parse_sdp(ok.body).session_version


async def test_late_offer_is_answered_in_the_ack() -> None:
    rig = Rig()
    ok = await rig.invite(plain_invite(b""))
    offer = parse_sdp(ok.body)
    assert offer.media[0].formats[:4] == ["111", "9", "0", "8"]
    assert [codec for *_r, codec, _pts, _port in rig.ports.open.values()] == ["pcmu"]
    assert rig.handler.sessions and next(iter(rig.handler.sessions.values())).our_offer is not None


@pytest.mark.parametrize("reason", list(DialogEndReason))
def test_dialog_end_reasons_are_public_strings(reason: DialogEndReason) -> None:
    assert str(reason) == reason.value and reason.value.islower()
