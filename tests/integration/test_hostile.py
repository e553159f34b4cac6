"""Issue 17 findings 2-7 over real sockets on loopback, against a real Service (ScriptedEngine:
recognition is not under test). Each test sends what the finding's probe sent, in a bounded
loop, and asserts the protocol's answer: a close code, a SIP status, an HTTP status, a counted
drop; never a 500, a traceback or a connection held forever."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from contextlib import suppress
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from callscribe.bridge.sip.auth import parse_authorization
from callscribe.bridge.sip.message import SipResponse, parse_message
from callscribe.service import Service
from tests.fork_senders import b64
from tests.integration.test_security import SipUac
from tests.scripted_engine import with_scripted_engine
from tests.support import ServiceFactory
from tests.unit.sip_data import load

SIP_PASSWORD = "sip-hostile-secret"


@pytest.fixture
def make_service(make_service: ServiceFactory) -> ServiceFactory:
    return with_scripted_engine(make_service)


def fork_url(svc: Service, dialect: str) -> str:
    return f"ws://127.0.0.1:{svc.http_port}/fork/{dialect}"


def twilio_start(call_sid: str) -> str:
    start = {"callSid": call_sid, "streamSid": "MZ1", "accountSid": "AC1", "tracks": ["inbound"]}
    return json.dumps({"event": "start", "start": start})


def twilio_media() -> str:
    return json.dumps({"event": "media", "media": {"track": "inbound", "payload": b64(b"\xff" * 160)}})


async def closed_with(ws: ClientConnection, within: float) -> int | None:
    with suppress(ConnectionClosed):
        async with asyncio.timeout(within):
            async for _ in ws:
                pass
    return ws.close_code


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


# -- finding 3: empty Twilio callSid ----------------------------------------------------------


async def test_twilio_empty_call_sid_is_a_close_code_and_a_counted_drop(make_service: ServiceFactory) -> None:
    async with make_service() as svc:
        async with connect(fork_url(svc, "twilio")) as ws:
            await ws.send(twilio_start(""))
            with suppress(ConnectionClosed):
                await ws.send(twilio_media())  # before the fix: ValueError inside the ASGI app
            assert await closed_with(ws, 5) == 1003
            assert "empty call id" in (ws.close_reason or "")
        assert svc.metrics.dropped("ws-twilio", "protocol_error") == 1
        assert not svc.registry.calls
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"http://127.0.0.1:{svc.http_port}/healthz")).status_code == 200


# -- finding 2 (takeover part): a leg inside another sender's call ---------------------------


async def test_a_second_sender_cannot_take_or_inject_a_leg_in_another_senders_call(
    make_service: ServiceFactory,
) -> None:
    call = f"victim-{uuid.uuid4().hex[:8]}"
    async with make_service() as svc, connect(fork_url(svc, "twilio")) as owner:
        await owner.send(twilio_start(call))
        await owner.send(twilio_media())
        for _ in range(100):
            if call in svc.registry.calls:
                break
            await asyncio.sleep(0.05)
        assert svc.registry.calls[call].owner == "127.0.0.1"
        # The attacker connects from another loopback address (Linux routes all of 127/8).
        for track in ("inbound", "outbound"):
            async with connect(fork_url(svc, "twilio"), local_addr=("127.0.0.2", 0)) as intruder:
                start = json.loads(twilio_start(call))
                start["start"]["tracks"] = [track]
                await intruder.send(json.dumps(start))
                media = json.loads(twilio_media())
                media["media"]["track"] = track
                with suppress(ConnectionClosed):
                    await intruder.send(json.dumps(media))
                assert await closed_with(intruder, 5) == 1008
        assert svc.metrics.dropped("ws-twilio", "leg_conflict") == 2
        assert sorted(svc.registry.calls[call].legs) == ["caller"]
        assert svc.registry.calls[call].legs["caller"].meta["peer"] == "127.0.0.1"


# -- finding 7: fork websockets that never start ------------------------------------------------


async def test_fork_without_start_is_closed_and_frees_its_sources_slot(make_service: ServiceFactory) -> None:
    # The HTTP header deadline is shorter still: an upgraded websocket must not be cut by it.
    async with make_service(
        fork_start_timeout_sec=1.0, fork_max_connections_per_source=3, http_header_timeout_sec=0.5
    ) as svc:
        silent = [await connect(fork_url(svc, "twilio")) for _ in range(3)]
        began = time.monotonic()
        codes = await asyncio.gather(*(closed_with(ws, 10) for ws in silent))
        assert codes == [1008, 1008, 1008]
        assert time.monotonic() - began < 5
        assert svc.metrics.dropped("ws-twilio", "start_timeout") == 3
        # The slots are free again: a real sender on the same address is not refused with 403.
        async with connect(fork_url(svc, "twilio")) as real:
            await real.send(twilio_start(f"real-{uuid.uuid4().hex[:8]}"))
            await real.send(twilio_media())
            await asyncio.sleep(1.5)  # past both deadlines: a started stream stays open
            await asyncio.wait_for(await real.ping(), 5)


async def test_fork_sender_without_token_is_not_held_open(make_service: ServiceFactory) -> None:
    async with make_service(fork_start_timeout_sec=1.0, fork_auth_token="fork-hostile-token") as svc:
        # No token at the HTTP level: Twilio-family senders may still bring it in their start.
        async with connect(fork_url(svc, "twilio")) as ws:
            assert await closed_with(ws, 10) == 1008
        assert svc.metrics.dropped("ws-twilio", "start_timeout") == 1


# -- finding 3: non-ASCII nonce; finding 4: digest replay ----------------------------------------


def sip_settings() -> dict[str, object]:
    return {"sip_enabled": True, "sip_port": 0, "sip_auth_user": "pbx", "sip_auth_password": SIP_PASSWORD}


async def test_sip_digest_with_non_ascii_nonce_or_response_gets_401(make_service: ServiceFactory) -> None:
    async with make_service(**sip_settings()) as svc:
        assert svc.sip is not None
        uac = SipUac(svc.sip.port)
        try:
            challenge = await uac.invite()
            assert challenge.status == 401
            issued = parse_authorization(challenge.headers.get("www-authenticate") or "")["nonce"]
            # A nonce whose part before ':' is digits reached compare_digest with the rest;
            # a nonce we issued reached it with the response. Both were a 500, every time.
            for nonce, response in ((f"{int(time.time())}:{'é' * 32}", "0" * 32), (issued, "ä" * 32)):
                authorization = (
                    f'Digest username="pbx", realm="callscribe", nonce="{nonce}", '
                    f'uri="sip:transcribe@127.0.0.1", response="{response}", algorithm=MD5'
                )
                answer = await uac.invite(authorization)
                assert answer.status == 401, answer.reason
        finally:
            uac.sock.close()


async def test_sip_digest_replay_on_a_new_call_gets_401_stale(make_service: ServiceFactory) -> None:
    async with make_service(**sip_settings()) as svc:
        assert svc.sip is not None
        first, replay = SipUac(svc.sip.port), SipUac(svc.sip.port)
        try:
            challenge = await first.invite()
            assert challenge.status == 401
            captured = first.credentials(challenge, SIP_PASSWORD)
            assert (await first.invite(captured)).status == 200
            assert replay.call_id != first.call_id
            refused = await replay.invite(captured)  # 200 before the fix: a second call
            assert refused.status == 401
            again = refused.headers.get("www-authenticate") or ""
            assert "stale=true" in again
            assert parse_authorization(again)["nonce"] != parse_authorization(captured)["nonce"]
            # The fresh nonce works for whoever knows the password.
            assert (await replay.invite(replay.credentials(refused, SIP_PASSWORD))).status == 200
        finally:
            first.sock.close()
            replay.sock.close()


# -- finding 5: bad Content-Length over UDP ---------------------------------------------------------


async def sip_exchange(port: int, datagram: bytes, timeout: float = 3.0) -> SipResponse | None:
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        await loop.sock_sendto(sock, datagram, ("127.0.0.1", port))
        try:
            while True:
                data = await asyncio.wait_for(loop.sock_recv(sock, 65535), timeout)
                message = parse_message(data)
                if isinstance(message, SipResponse) and message.status >= 200:
                    return message
        except TimeoutError:
            return None


@pytest.mark.parametrize("length", ["9999", "abc", "-5"])
async def test_bad_content_length_over_udp_gets_400(make_service: ServiceFactory, length: str) -> None:
    async with make_service(sip_enabled=True, sip_port=0) as svc:
        assert svc.sip is not None
        datagram = (
            "OPTIONS sip:transcribe@127.0.0.1 SIP/2.0\r\n"
            "Via: SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bKcl1\r\n"
            "From: <sip:pbx@127.0.0.1>;tag=1\r\nTo: <sip:transcribe@127.0.0.1>\r\n"
            f"Call-ID: cl-{uuid.uuid4()}\r\n"
            f"CSeq: 1 OPTIONS\r\nContent-Length: {length}\r\n\r\nv=0\r\n"
        ).encode()
        response = await sip_exchange(svc.sip.port, datagram)  # None (silence) before the fix
        assert response is not None and response.status == 400
        reason = "truncated" if length == "9999" else "bad_content_length"
        assert svc.metrics.dropped("sip", reason) == 1


# -- finding 3: SIPREC participant with a blank AOR -------------------------------------------------


async def test_siprec_participant_with_blank_aor_is_answered_not_500(make_service: ServiceFactory) -> None:
    async with make_service(sip_enabled=True, sip_port=0) as svc:
        assert svc.sip is not None
        data = load("siprec_sonus").replace(b"rs-7a1c0e22@", f"rs-{uuid.uuid4().hex[:8]}@".encode())
        for aor in (b'aor="8500@198.51.100.20"', b'aor="8012@198.51.100.30"'):
            data = data.replace(aor, b'aor="sip:' + b" " * (len(aor) - 10) + b'"')  # same length
        response = await sip_exchange(svc.sip.port, data)
        assert response is not None and response.status == 200, response and response.reason
        legs = sorted(leg.name for leg in svc.registry.legs.values())
        assert len(legs) == 2 and all(legs), legs


# -- finding 6: a 200 MB body is refused while it is read ------------------------------------------


async def post_big(port: int, path: str, content_type: str, total: int, chunked: bool) -> tuple[int, int]:
    """POST `total` bytes (or until the server stops reading); (status, peak RSS growth KiB)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}"
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n{framing}\r\n\r\n".encode()
    )
    base, peak = rss_kib(), 0
    response = asyncio.create_task(reader.read(65536))
    chunk = b"{" + b" " * (1 << 20)
    sent = 0
    with suppress(ConnectionError):
        while sent < total and not response.done():
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            await asyncio.wait_for(writer.drain(), 10)
            sent += len(chunk)
            peak = max(peak, rss_kib() - base)
    head = await asyncio.wait_for(response, 10)
    writer.close()
    status = int(head.split(b" ", 2)[1])
    assert b'"error"' in head
    return status, peak


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_200_mb_body_is_refused_without_being_buffered(
    make_service: ServiceFactory, chunked: bool
) -> None:
    async with make_service() as svc:
        for path, kind in (("/v1/legs", "application/json"), ("/whip", "application/sdp")):
            status, growth_kib = await post_big(svc.http_port, path, kind, 200 * 1024 * 1024, chunked)
            assert status == 413, (path, status)
            assert growth_kib < 16 * 1024, f"{path}: RSS grew {growth_kib} KiB"  # 315 MB before the fix


# -- finding 7: slowloris ---------------------------------------------------------------------------


async def test_slowloris_connections_are_timed_out_and_healthz_keeps_answering(
    make_service: ServiceFactory,
) -> None:
    async with make_service(http_header_timeout_sec=2.0) as svc:
        port = svc.http_port
        conns = []
        for n in range(500):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow-{n}: ".encode())
            conns.append((reader, writer))
        began = time.monotonic()
        async with httpx.AsyncClient() as client:
            for _ in range(3):
                assert (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200

        async def trickle(writer: asyncio.StreamWriter) -> None:
            with suppress(ConnectionError):
                for _ in range(40):  # a byte every 0.25 s does not move the deadline
                    writer.write(b"a")
                    await writer.drain()
                    await asyncio.sleep(0.25)

        async def answer(reader: asyncio.StreamReader) -> bytes:
            try:
                return await asyncio.wait_for(reader.read(), 15)
            except ConnectionResetError:
                return b"reset"  # the trickler wrote after the 408: its kernel answered RST

        trickler = asyncio.create_task(trickle(conns[0][1]))
        answers = await asyncio.gather(*(answer(r) for r, _ in conns))
        elapsed = time.monotonic() - began
        trickler.cancel()
        for _, writer in conns:
            writer.close()
        assert answers[0].startswith(b"HTTP/1.1 408 ") or answers[0] == b"reset"
        assert all(answer.startswith(b"HTTP/1.1 408 ") for answer in answers[1:])
        assert elapsed < 10, elapsed
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200
