"""Issue 17 findings 2-5 at the sans-IO level: each input as it was found, and what it gets now.
(The same inputs over real sockets: tests/integration/test_hostile.py.)"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json

import pytest

from callscribe.bridge.events import Dropped, DropReason
from callscribe.bridge.forks import DIALECTS
from callscribe.bridge.forks.endpoint import ForkSession
from callscribe.bridge.limits import LegConflict
from callscribe.bridge.sip.auth import AuthVerdict, DigestAuthenticator, parse_authorization
from callscribe.bridge.sip.message import Peer, SipRequest, SipResponse, parse_message
from callscribe.bridge.sip.sdp import SdpError, parse_sdp
from callscribe.bridge.sip.siprec import Participant, leg_name, parse_siprec_body, recorded_streams
from callscribe.bridge.sip.uas import UasCore
from callscribe.calls import CallRegistry
from callscribe.metrics import Metrics
from tests.scripted_engine import ScriptedEngine
from tests.unit.sip_data import load
from tests.unit.test_calls import ListSink

URI = "sip:transcribe@192.0.2.10"
PEER = Peer("udp", "198.51.100.5", 5062)


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def invite(authorization: str, call_id: str = "a") -> SipRequest:
    message = parse_message(
        (
            f"INVITE {URI} SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.5;branch=z9hG4bK{call_id}\r\n"
            f"From: <sip:pbx@10.0.0.5>;tag=1\r\nTo: <{URI}>\r\nCall-ID: {call_id}\r\n"
            f"CSeq: 2 INVITE\r\nAuthorization: {authorization}\r\nContent-Length: 0\r\n\r\n"
        ).encode()
    )
    assert isinstance(message, SipRequest)
    return message


def credentials(nonce: str, password: str = "s3cret", nc: str | None = "00000001", response: str = "") -> str:
    ha1, ha2 = md5(f"pbx:callscribe:{password}"), md5(f"INVITE:{URI}")
    if nc is None:
        digest = response or md5(f"{ha1}:{nonce}:{ha2}")
        extra = ""
    else:
        digest = response or md5(f"{ha1}:{nonce}:{nc}:abc:auth:{ha2}")
        extra = f', qop=auth, nc={nc}, cnonce="abc"'
    return (
        f'Digest username="pbx", realm="callscribe", nonce="{nonce}", uri="{URI}", '
        f'response="{digest}", algorithm=MD5{extra}'
    )


def fresh_nonce(auth: DigestAuthenticator, now: float) -> str:
    return parse_authorization(auth.challenge(now)[1])["nonce"]


# -- finding 3: a non-ASCII nonce or response was a TypeError (500 every time) -------------


@pytest.mark.parametrize(
    "authorization",
    [
        credentials("1000000.0123456789abcdef:é" + "0" * 31),
        credentials("é", response="x"),
        credentials("123:ü" * 10),
        credentials("1000000.0123456789abcdef:" + "0" * 32, response="ünïcödé"),
    ],
)
def test_non_ascii_nonce_or_response_is_denied_not_a_type_error(authorization: str) -> None:
    auth = DigestAuthenticator("callscribe", "pbx", "s3cret")
    assert auth.check(invite(authorization), 1000.0) is AuthVerdict.DENIED
    # A nonce we issued (any 401 hands one out) with a non-ASCII response: TypeError before.
    issued = fresh_nonce(auth, 1000.0)
    assert auth.check(invite(credentials(issued, response="ä" * 32)), 1000.0) is AuthVerdict.DENIED


# -- finding 4: the same Authorization header started a second call -------------------------


@pytest.mark.parametrize("qop", [True, False])
def test_a_captured_authorization_cannot_start_a_second_call(qop: bool) -> None:
    auth = DigestAuthenticator("callscribe", "pbx", "s3cret")
    nonce = fresh_nonce(auth, 1000.0)
    header = credentials(nonce, nc="00000001" if qop else None)
    assert auth.check(invite(header, call_id="first"), 1001.0) is AuthVerdict.OK
    # Replayed on a new INVITE with another Call-ID: right password, used nonce → stale.
    assert auth.check(invite(header, call_id="second"), 1002.0) is AuthVerdict.STALE
    if qop:
        # A real UA reusing the nonce counts up (RFC 7616 §3.4): that is allowed.
        assert auth.check(invite(credentials(nonce, nc="00000002")), 1003.0) is AuthVerdict.OK
        assert auth.check(invite(credentials(nonce, nc="00000002")), 1004.0) is AuthVerdict.STALE
        assert auth.check(invite(credentials(nonce, nc="00000001")), 1004.0) is AuthVerdict.STALE


def test_nonces_expire_and_malformed_nc_is_denied() -> None:
    auth = DigestAuthenticator("callscribe", "pbx", "s3cret", nonce_ttl_sec=60)
    nonce = fresh_nonce(auth, 1000.0)
    assert auth.check(invite(credentials(nonce)), 1061.0) is AuthVerdict.STALE
    nonce = fresh_nonce(auth, 2000.0)
    for nc in ("1", "zzzzzzzz", "٠٠٠٠٠٠٠١"):  # short, not hex, Arabic-Indic digits
        assert auth.check(invite(credentials(nonce, nc=nc)), 2001.0) is AuthVerdict.DENIED


def test_the_nonce_table_is_bounded_and_eviction_does_not_reopen_replays() -> None:
    auth = DigestAuthenticator("callscribe", "pbx", "s3cret", max_nonces=50)
    used: list[str] = []
    for n in range(200):
        nonce = fresh_nonce(auth, 1000.0 + n)
        assert auth.check(invite(credentials(nonce)), 1000.5 + n) is AuthVerdict.OK
        used.append(nonce)
    assert auth.nonces_tracked <= 50
    # The oldest nonces were evicted: their replay is refused all the same (below the floor).
    for nonce in used[:150]:
        assert auth.check(invite(credentials(nonce)), 1200.0) is AuthVerdict.STALE
    # Challenges to unauthenticated requests add nothing to the table.
    for n in range(1000):
        auth.challenge(1300.0 + n)
        auth.check(invite(credentials(fresh_nonce(auth, 1300.0 + n), password="guess")), 1300.0 + n)
    assert auth.nonces_tracked <= 50


# -- finding 5: a bad Content-Length over UDP was dropped silently --------------------------


@pytest.mark.parametrize("length", ["9999", "abc", "-5", "٣"])
def test_bad_content_length_over_udp_gets_400(length: str) -> None:
    core = UasCore("<sip:callscribe@192.0.2.10:5060>")
    data = (
        f"OPTIONS {URI} SIP/2.0\r\nVia: SIP/2.0/UDP 198.51.100.5:5062;branch=z9hG4bKcl\r\n"
        f"From: <sip:pbx@198.51.100.5>;tag=1\r\nTo: <{URI}>\r\nCall-ID: cl-{length}\r\n"
        f"CSeq: 1 OPTIONS\r\nContent-Length: {length}\r\n\r\nv=0\r\n"
    ).encode()
    events = core.receive(data, PEER, 0.0)
    assert [type(e) for e in events] == [Dropped]
    assert events[0].reason in (DropReason.TRUNCATED, DropReason.BAD_CONTENT_LENGTH)
    [(wire, peer)] = core.outgoing()
    response = parse_message(wire)
    assert isinstance(response, SipResponse) and response.status == 400 and peer == PEER
    assert response.call_id == f"cl-{length}"


# -- finding 3: a SIPREC participant with a blank AOR named its leg "" ----------------------


@pytest.mark.parametrize("aor", [" ", "sip: ", "sips:\t", "tel:"])
def test_blank_aor_falls_back_to_name_id_or_position(aor: str) -> None:
    assert leg_name(Participant("p1", aor, "Alice")) == "Alice"
    assert leg_name(Participant("p1", aor, " ")) == "p1"
    assert leg_name(Participant(" ", aor, "")) == ""


def test_siprec_offer_with_blank_aors_still_names_every_leg() -> None:
    data = load("siprec_sonus")
    for aor in (b'aor="8500@198.51.100.20"', b'aor="8012@198.51.100.30"'):
        data = data.replace(aor, b'aor="sip:' + b" " * (len(aor) - 10) + b'"')
    request = parse_message(data)
    assert isinstance(request, SipRequest)
    offer = parse_siprec_body(request.headers.get("content-type") or "", request.body)
    assert offer.metadata is not None
    for participant in offer.metadata.participants.values():
        object.__setattr__(participant, "name", "")
    streams = recorded_streams(parse_sdp(offer.sdp), offer.metadata)
    names = [stream.leg for stream in streams]
    assert all(names) and len(set(names)) == len(names), names


# -- finding 2: a leg name inside another sender's call could be taken ----------------------


async def test_only_the_calls_owner_adds_legs_to_it() -> None:
    metrics = Metrics()
    registry = CallRegistry(ScriptedEngine(("hello",)), ListSink(), metrics)
    caller = registry.open_leg("call-1", "caller", owner="10.0.0.5")
    with pytest.raises(LegConflict):
        registry.open_leg("call-1", "agent", owner="10.6.6.6")  # inject a new leg
    with pytest.raises(LegConflict):
        registry.open_leg("call-1", "caller", owner="10.6.6.6")  # take the open one
    with pytest.raises(LegConflict):
        registry.open_leg("call-1", "agent")  # no owner is not the owner either
    agent = registry.open_leg("call-1", "agent", owner="10.0.0.5")  # the PBX's own second leg
    assert sorted(registry.calls["call-1"].legs) == ["agent", "caller"]
    await caller.close()
    await agent.close()
    # Once the call has ended, its id is free again.
    other = registry.open_leg("call-1", "caller", owner="10.6.6.6")
    await other.close()


# -- found while fixing 5: non-ASCII digits passed str.isdigit() and crashed int() ---------


@pytest.mark.parametrize(("cseq", "port"), [("² INVITE", "5062"), ("1 INVITE", "²"), ("٣ INVITE", "٥٠٦٠")])
def test_non_ascii_digits_in_cseq_or_via_port_get_400(cseq: str, port: str) -> None:
    core = UasCore("<sip:callscribe@192.0.2.10:5060>")
    data = (
        f"INVITE {URI} SIP/2.0\r\nVia: SIP/2.0/UDP 198.51.100.5:{port};branch=z9hG4bKd\r\n"
        f"From: <sip:pbx@198.51.100.5>;tag=1\r\nTo: <{URI}>\r\nCall-ID: digits\r\n"
        f"CSeq: {cseq}\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    events = core.receive(data, PEER, 0.0)  # raised ValueError before
    assert [type(e) for e in events] == [Dropped]
    [(wire, _)] = core.outgoing()
    assert wire.startswith(b"SIP/2.0 400 ")


@pytest.mark.parametrize("media", ["m=audio ² RTP/AVP 0", "m=audio 4000/² RTP/AVP 0"])
def test_non_ascii_digits_in_sdp_are_an_sdp_error(media: str) -> None:
    text = f"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n{media}\r\n"
    with pytest.raises(SdpError):  # a bare ValueError before (an INVITE got 500), now a 400
        parse_sdp(text.encode())


# -- findings 3 and 7 at the fork session: empty callSid, no start message ------------------


class ScriptedSocket:
    """A ForkConnection that delivers `messages`, then waits until `hang_up` is set."""

    def __init__(self, messages: list[str]) -> None:
        self.messages = list(messages)
        self.hang_up = asyncio.Event()
        self.closed: tuple[int, str] | None = None
        self.peer_close_code: int | None = None  # the peer never closes: the session does

    async def receive(self) -> str | bytes | None:
        if self.messages:
            return self.messages.pop(0)
        await self.hang_up.wait()
        return None

    async def send_text(self, text: str) -> None:
        pass

    async def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


def twilio(call_sid: str) -> list[str]:
    start = {"callSid": call_sid, "streamSid": "MZ1", "tracks": ["inbound"]}
    media = {"track": "inbound", "payload": base64.b64encode(b"\xff" * 160).decode()}
    return [json.dumps({"event": "start", "start": start}), json.dumps({"event": "media", "media": media})]


def fork_session(start_timeout: float | None = None) -> tuple[ForkSession, CallRegistry, Metrics]:
    metrics = Metrics()
    registry = CallRegistry(ScriptedEngine(("hello",)), ListSink(), metrics)
    session = ForkSession(
        DIALECTS["twilio"](),
        registry,
        metrics,
        max_frame_bytes=65536,
        peer="10.0.0.5",
        start_timeout=start_timeout,
    )
    return session, registry, metrics


async def test_empty_call_sid_closes_the_fork_with_1003_and_a_counted_drop() -> None:
    session, registry, metrics = fork_session()
    socket = ScriptedSocket(twilio(""))
    await asyncio.wait_for(session.run(socket), 5)  # raised ValueError out of the app before
    assert socket.closed is not None and socket.closed[0] == 1003 and "empty call id" in socket.closed[1]
    assert metrics.dropped("ws-twilio", "protocol_error") == 1
    assert not registry.calls


async def test_a_fork_without_start_is_closed_at_its_deadline_and_a_started_one_is_not() -> None:
    silent, _, metrics = fork_session(start_timeout=0.1)
    socket = ScriptedSocket([])
    await asyncio.wait_for(silent.run(socket), 5)
    assert socket.closed is not None and socket.closed[0] == 1008
    assert metrics.dropped("ws-twilio", "start_timeout") == 1

    started, registry, metrics = fork_session(start_timeout=0.1)
    socket = ScriptedSocket(twilio("call-7"))
    running = asyncio.create_task(started.run(socket))
    await asyncio.sleep(0.3)  # well past the deadline
    assert not running.done() and "call-7" in registry.calls
    socket.hang_up.set()
    await asyncio.wait_for(running, 5)
    assert metrics.dropped("ws-twilio", "start_timeout") == 0
