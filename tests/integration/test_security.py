"""Access control end to end, on a real Service: every ingest refuses sources outside
allow_networks, and no secret ever reaches the logs, the settings' repr or an HTTP endpoint.
Recognition is not under test here: the bridges run on the ScriptedEngine (no model to load)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import struct
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from callscribe.bridge.forks.admission import twilio_signature
from callscribe.bridge.rtp.packet import RtpPacket
from callscribe.bridge.sip.auth import parse_authorization
from callscribe.bridge.sip.message import SipResponse, parse_message
from callscribe.logs import configure_logging
from callscribe.service import Service
from tests.scripted_engine import with_scripted_engine
from tests.support import ServiceFactory, whip_offer


@pytest.fixture
def make_service(make_service: ServiceFactory) -> ServiceFactory:
    return with_scripted_engine(make_service)


SECRETS = {
    "api_token": "api-Zq7xK2-secret",
    "whip_token": "whip-Hn4vR8-secret",
    "fork_auth_token": "fork-Tb9mW3-secret",
    "twilio_auth_token": "twilio-Lp6sD1-secret",
    "sip_auth_password": "sip-Gc5yJ0-secret",
}
# Outside loopback: every test connection comes from 127.0.0.1.
ELSEWHERE = ["10.0.0.0/8"]


CLIENT_LOGGERS = ("websockets.client", "httpx", "httpcore")


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name}: {self.format(record)}")


@contextmanager
def debug_logs() -> Iterator[Collect]:
    """Every log record at DEBUG, as `callscribe serve` with log_level=debug writes them: the
    root logger and uvicorn's own (which does not propagate), with tracebacks."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    configure_logging("debug")
    collect = Collect()
    collect.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root.addHandler(collect)
    uvicorn_loggers = [logging.getLogger(name) for name in ("uvicorn", "uvicorn.error", "uvicorn.access")]
    for logger in uvicorn_loggers:
        logger.addHandler(collect)
    try:
        yield collect
    finally:
        for logger in uvicorn_loggers:
            logger.removeHandler(collect)
        root.handlers[:], _ = saved
        root.setLevel(saved[1])


def rtp(ssrc: int, seq: int) -> bytes:
    return RtpPacket(0, seq, seq * 160, ssrc, b"\xff" * 160).serialize()


async def send_udp(port: int, datagrams: list[bytes]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for datagram in datagrams:
            sock.sendto(datagram, ("127.0.0.1", port))
            await asyncio.sleep(0.005)
    await asyncio.sleep(0.2)  # let the service read them


async def test_no_secret_is_ever_logged_or_served(make_service: ServiceFactory) -> None:
    settings = {
        "sip_enabled": True,
        "sip_port": 0,
        "sip_auth_user": "pbx",
        **SECRETS,
        "allow_networks": ["127.0.0.0/8"],
        "log_level": "debug",
    }
    with debug_logs() as logs:
        async with make_service(**settings) as svc, httpx.AsyncClient(timeout=30) as client:
            base = f"http://127.0.0.1:{svc.http_port}"
            await exercise_legs_api(client, base)
            await exercise_whip(client, base)
            await exercise_forks(svc)
            await exercise_sip(svc)
            served = [
                (await client.get(f"{base}{path}")).text for path in ("/metrics", "/healthz", "/readyz")
            ]
            shown = [repr(svc.settings), str(svc.settings), repr(svc.policy), str(svc.settings.model_dump())]
    # The checks above did run, and their refusals were logged (naming the source).
    assert any("refused" in line and "127.0.0.1" in line for line in logs.lines), logs.lines
    assert any(line.startswith("callscribe.") for line in logs.lines)
    assert any(" DEBUG " in f" {line}" for line in logs.lines)
    # The test's own clients log what they send (websockets.client logs the Authorization
    # header at DEBUG); only what the service logs counts.
    service_lines = [line for line in logs.lines if not line.startswith(CLIENT_LOGGERS)]
    text = "\n".join(service_lines + served + shown)
    for name, secret in SECRETS.items():
        assert secret not in text, f"{name} leaked"
        assert secret[:-7] not in text, f"part of {name} leaked"


async def exercise_legs_api(client: httpx.AsyncClient, base: str) -> None:
    good = {"Authorization": f"Bearer {SECRETS['api_token']}"}
    for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": SECRETS["api_token"]}):
        refused = await client.get(f"{base}/v1/legs", headers=headers)
        assert refused.status_code == 401, refused.text
        assert refused.headers["www-authenticate"] == 'Bearer realm="callscribe-api"'
    refused = await client.post(f"{base}/v1/legs", json={"call_id": "sec-1"})
    assert refused.status_code == 401
    created = await client.post(f"{base}/v1/legs", json={"call_id": "sec-1"}, headers=good)
    assert created.status_code == 201, created.text
    leg_id = created.json()["leg_id"]
    listed = await client.get(f"{base}/v1/legs", headers=good)
    assert [leg["leg_id"] for leg in listed.json()] == [leg_id]
    assert (await client.delete(f"{base}/v1/legs/{leg_id}")).status_code == 401
    assert (await client.delete(f"{base}/v1/legs/{leg_id}", headers=good)).status_code == 204


async def exercise_whip(client: httpx.AsyncClient, base: str) -> None:
    sdp = {"Content-Type": "application/sdp"}
    offer = await whip_offer()
    refused = await client.post(
        f"{base}/whip", content=offer, headers={**sdp, "Authorization": "Bearer wrong-token"}
    )
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"] == 'Bearer realm="callscribe-whip"'
    good = {"Authorization": f"Bearer {SECRETS['whip_token']}"}
    created = await client.post(
        f"{base}/whip", params={"call_id": "sec-whip"}, content=offer, headers={**sdp, **good}
    )
    assert created.status_code == 201, created.text
    location = created.headers["location"]
    assert (await client.delete(f"{base}{location}")).status_code == 401
    assert (await client.delete(f"{base}{location}", headers=good)).status_code == 200


async def exercise_forks(svc: Service) -> None:
    base = f"ws://127.0.0.1:{svc.http_port}/fork"
    token = SECRETS["fork_auth_token"]
    for target, headers in (
        (f"{base}/freeswitch?call_id=sec-f1", {"Authorization": "Bearer wrong-token"}),
        (f"{base}/asterisk?call_id=sec-f2&token=wrong-token", {}),
        (f"{base}/twilio", {"X-Twilio-Signature": twilio_signature("wrong-token", f"{base}/twilio")}),
    ):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(target, additional_headers=headers):
                pass
        assert refused.value.response.status_code == 403
    for target, headers in (
        (f"{base}/freeswitch?call_id=sec-f3", {"Authorization": f"Bearer {token}"}),
        (f"{base}/asterisk?call_id=sec-f4&token={token}", {}),
        (
            f"{base}/twilio",
            {"X-Twilio-Signature": twilio_signature(SECRETS["twilio_auth_token"], f"{base}/twilio")},
        ),
    ):
        async with connect(target, additional_headers=headers) as ws:
            assert ws.protocol.state.name == "OPEN"
    assert svc.metrics.dropped("ws-freeswitch", "auth") == 1
    assert svc.metrics.dropped("ws-twilio", "auth") == 1


def md5(text: str) -> str:
    return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()


class SipUac:
    """Just enough of a UDP user agent to INVITE with digest credentials (RFC 2617, qop=auth)."""

    def __init__(self, port: int) -> None:
        self.server = ("127.0.0.1", port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.call_id = f"sec-sip-{uuid.uuid4().hex[:8]}"
        self.cseq = 0

    async def invite(self, authorization: str | None = None) -> SipResponse:
        """Send one INVITE; its final response (ACKed when not 2xx)."""
        self.cseq += 1
        branch = f"z9hG4bK-{uuid.uuid4().hex[:12]}"
        port = self.sock.getsockname()[1]
        sdp = "v=0\r\no=pbx 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
        sdp += "m=audio 49170 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n"
        head = (
            f"INVITE sip:transcribe@127.0.0.1 SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch={branch};rport\r\n"
            f"From: <sip:pbx@127.0.0.1>;tag=sec1\r\nTo: <sip:transcribe@127.0.0.1>\r\n"
            f"Call-ID: {self.call_id}\r\nCSeq: {self.cseq} INVITE\r\n"
            f"Contact: <sip:pbx@127.0.0.1:{port}>\r\nMax-Forwards: 70\r\n"
        )
        if authorization:
            head += f"Authorization: {authorization}\r\n"
        head += f"Content-Type: application/sdp\r\nContent-Length: {len(sdp)}\r\n\r\n"
        loop = asyncio.get_running_loop()
        await loop.sock_sendto(self.sock, (head + sdp).encode(), self.server)
        while True:
            response = parse_message(await asyncio.wait_for(loop.sock_recv(self.sock, 65535), 10))
            assert isinstance(response, SipResponse)
            if response.status >= 200:
                break
        if response.status >= 300:  # RFC 3261 §17.1.1.3: the ACK of a non-2xx final
            to = response.headers.get("to") or ""
            ack = (
                f"ACK sip:transcribe@127.0.0.1 SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch={branch}\r\n"
                f"From: <sip:pbx@127.0.0.1>;tag=sec1\r\nTo: {to}\r\nCall-ID: {self.call_id}\r\n"
                f"CSeq: {self.cseq} ACK\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
            )
            await loop.sock_sendto(self.sock, ack.encode(), self.server)
        return response

    def credentials(self, challenge: SipResponse, password: str) -> str:
        nonce = parse_authorization(challenge.headers.get("www-authenticate") or "")["nonce"]
        uri = "sip:transcribe@127.0.0.1"
        ha1, ha2 = md5(f"pbx:callscribe:{password}"), md5(f"INVITE:{uri}")
        response = md5(f"{ha1}:{nonce}:00000001:c0ffee:auth:{ha2}")
        return (
            f'Digest username="pbx", realm="callscribe", nonce="{nonce}", uri="{uri}", '
            f'response="{response}", algorithm=MD5, qop=auth, nc=00000001, cnonce="c0ffee"'
        )


async def exercise_sip(svc: Service) -> None:
    uac = SipUac(svc.sip.port)
    try:
        challenge = await uac.invite()
        assert challenge.status == 401
        refused = await uac.invite(uac.credentials(challenge, "wrong-password"))
        assert refused.status == 401
        answered = await uac.invite(uac.credentials(refused, SECRETS["sip_auth_password"]))
        assert answered.status == 200, answered.reason
    finally:
        uac.sock.close()


async def test_rtp_from_outside_allow_networks_is_a_counted_drop(make_service: ServiceFactory) -> None:
    async with make_service(allow_networks=ELSEWHERE) as svc:
        # The auto-leg port: a valid stream that would otherwise start a leg.
        await send_udp(svc.rtp.port, [rtp(0x1234, seq) for seq in range(5)])
        # A reserved port (as POST /v1/legs or SIP would open one).
        reserved = await svc.rtp.reserve("sec-rtp", "caller", "pcmu")
        await send_udp(reserved.rtp_port, [rtp(0x5678, seq) for seq in range(3)])
        assert svc.metrics.dropped("rtp", "not_allowed") == 8
        legs = [leg for leg in svc.registry.legs.values() if leg.call_id != "sec-rtp"]
        assert legs == []
        assert svc.registry.legs[reserved.leg_id].audio_ms == 0
    async with make_service(allow_networks=["127.0.0.0/8"]) as svc:
        await send_udp(svc.rtp.port, [rtp(0x1234, seq) for seq in range(5)])
        assert svc.metrics.dropped("rtp", "not_allowed") == 0
        assert len(svc.registry.legs) == 1  # the allowed source started its auto-leg


async def test_audiosocket_from_outside_allow_networks_is_closed(make_service: ServiceFactory) -> None:
    async with make_service(allow_networks=ELSEWHERE) as svc:
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.audiosocket.port)
        writer.write(struct.pack("!BH", 0x01, 16) + uuid.uuid4().bytes)
        # Closed without a word (a reset when the frame was still unread).
        with suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        assert svc.metrics.dropped("audiosocket", "not_allowed") == 1
        assert not svc.registry.legs


async def test_forks_whip_and_legs_api_refuse_sources_outside_allow_networks(
    make_service: ServiceFactory,
) -> None:
    async with make_service(allow_networks=ELSEWHERE) as svc, httpx.AsyncClient(timeout=30) as client:
        base = f"http://127.0.0.1:{svc.http_port}"
        with pytest.raises(InvalidStatus) as refused:
            async with connect(f"ws://127.0.0.1:{svc.http_port}/fork/freeswitch?call_id=sec-x"):
                pass
        assert refused.value.response.status_code == 403
        assert svc.metrics.dropped("ws-freeswitch", "not_allowed") == 1
        offer = await whip_offer()
        whip = await client.post(f"{base}/whip", content=offer, headers={"Content-Type": "application/sdp"})
        assert whip.status_code == 403, whip.text
        assert (await client.delete(f"{base}/whip/any")).status_code == 403
        assert (await client.post(f"{base}/v1/legs", json={"call_id": "sec-x"})).status_code == 403
        assert (await client.get(f"{base}/v1/legs")).status_code == 403
        assert (await client.delete(f"{base}/v1/legs/any")).status_code == 403
        # Health and metrics are not ingest: probes and scrapers still reach them.
        assert (await client.get(f"{base}/healthz")).status_code == 200
        assert (await client.get(f"{base}/metrics")).status_code == 200
        assert not svc.registry.legs


@pytest.mark.parametrize(
    ("lists", "named"),
    [
        ({"allow_networks": ELSEWHERE}, "not in allow_networks"),
        # The SIP-only list restricts further even when the global one lets loopback in.
        ({"allow_networks": ["127.0.0.0/8"], "sip_allow_networks": ELSEWHERE}, "not in sip_allow_networks"),
    ],
)
async def test_sip_invite_from_outside_allow_networks_gets_403(
    make_service: ServiceFactory, lists: dict[str, list[str]], named: str
) -> None:
    async with make_service(sip_enabled=True, sip_port=0, **lists) as svc:
        uac = SipUac(svc.sip.port)
        try:
            refused = await uac.invite()
        finally:
            uac.sock.close()
        assert refused.status == 403 and named in refused.reason, refused.reason
        assert not svc.registry.calls
        count = svc.metrics.registry.get_sample_value(
            "callscribe_legs_refused_total", {"reason": "sip_not_allowed"}
        )
        assert count == 1
