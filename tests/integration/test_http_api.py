"""The HTTP API on a real Service: 409 for a duplicate leg on every ingest, one id rule on every
ingest, JSON for every error (404 and 405 too), unknown JSON fields refused, /openapi.json
describing every route and valid OpenAPI 3, CORS only on WHIP and only for allowed origins."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from aiortc import RTCPeerConnection
from openapi_spec_validator import validate
from starlette.routing import Mount, Route, WebSocketRoute
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.fork_senders import twilio_stream
from tests.support import ServiceFactory, whip_offer

BAD_IDS = ["c 2/../x", "x\nERROR forged", "a" * 129, "{tag}"]


def base(svc: object) -> str:
    return f"http://127.0.0.1:{svc.http_port}"  # type: ignore[attr-defined]


async def fork_close(svc: object, call_sid: str) -> tuple[int, str]:
    """Replay a Twilio stream for `call_sid`; the close code and reason the server ended it with."""
    url = f"ws://127.0.0.1:{svc.http_port}/fork/twilio"  # type: ignore[attr-defined]
    messages = twilio_stream(call_sid, [b"\xff" * 160] * 5)
    async with connect(url, compression=None) as ws:
        try:
            for message in messages:
                await ws.send(message)
                await asyncio.sleep(0.005)
            async with asyncio.timeout(10):
                async for _ in ws:
                    pass
        except ConnectionClosed:
            pass
        assert ws.close_code is not None
        return ws.close_code, ws.close_reason or ""


async def test_duplicate_leg_is_409_on_http_ingests_and_a_policy_close_on_forks(
    make_service: ServiceFactory,
) -> None:
    async with make_service() as svc, httpx.AsyncClient(base_url=base(svc), timeout=30) as http:
        first = await http.post("/v1/legs", json={"call_id": "dup-1", "leg": "caller"})
        assert first.status_code == 201, first.text
        again = await http.post("/v1/legs", json={"call_id": "dup-1", "leg": "caller"})
        assert again.status_code == 409 and "already open" in again.json()["error"]

        offer = await whip_offer()
        headers = {"Content-Type": "application/sdp"}
        whip = await http.post("/whip?call_id=dup-1&leg=caller", content=offer, headers=headers)
        assert whip.status_code == 409 and "already open" in whip.json()["error"]
        # The fork's inbound track is the leg "caller" of its callSid: taken by the legs API.
        code, reason = await fork_close(svc, "dup-1")
        assert code == 1008 and "already open" in reason


@pytest.mark.parametrize("bad", BAD_IDS)
async def test_one_id_rule_on_every_ingest(make_service: ServiceFactory, bad: str) -> None:
    async with make_service() as svc, httpx.AsyncClient(base_url=base(svc), timeout=30) as http:
        for body in ({"call_id": bad}, {"call_id": "ok-1", "leg": bad}):
            reply = await http.post("/v1/legs", json=body)
            assert reply.status_code == 400, reply.text
            assert "must be 1-128 characters" in reply.json()["error"]
        offer = await whip_offer()
        headers = {"Content-Type": "application/sdp"}
        for params in ({"call_id": bad}, {"call_id": "ok-2", "leg": bad}):
            reply = await http.post("/whip", params=params, content=offer, headers=headers)
            assert reply.status_code == 400, reply.text
            assert "must be 1-128 characters" in reply.json()["error"]
        code, reason = await fork_close(svc, bad)
        assert code == 1008 and "call id must be" in reason
        assert svc.registry.legs == {}  # nothing was opened under a bad id


async def test_errors_are_json_and_unknown_fields_refused(make_service: ServiceFactory) -> None:
    async with make_service() as svc, httpx.AsyncClient(base_url=base(svc), timeout=30) as http:
        missing = await http.get("/no/such/route")
        assert missing.status_code == 404
        assert missing.headers["content-type"].startswith("application/json")
        assert missing.json() == {"error": "no route /no/such/route"}
        wrong = await http.put("/v1/legs")
        assert wrong.status_code == 405 and wrong.headers["content-type"].startswith("application/json")
        assert "PUT" in wrong.json()["error"] and "GET" in wrong.headers["allow"]
        extra = await http.post("/v1/legs", json={"call_id": "x1", "codek": "pcma"})
        assert extra.status_code == 400 and "'codek'" in extra.json()["error"]
        assert svc.registry.legs == {}
        icon = await http.get("/favicon.ico")
        assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")


async def test_openapi_describes_every_route_and_is_valid(make_service: ServiceFactory) -> None:
    async with make_service() as svc, httpx.AsyncClient(base_url=base(svc), timeout=30) as http:
        reply = await http.get("/openapi.json")
        assert reply.status_code == 200
        document = reply.json()
        app = svc.app
    validate(document)  # raises on anything that is not valid OpenAPI 3
    described = {(path, method) for path, ops in document["paths"].items() for method in ops}
    served: set[tuple[str, str]] = set()
    for route in app.routes:
        if isinstance(route, Route):
            methods = (route.methods or {"GET"}) - {"HEAD"}
            served |= {(route.path, method.lower()) for method in methods}
        elif isinstance(route, WebSocketRoute):
            served.add((route.path, "get"))
        elif isinstance(route, Mount):
            served.add((f"{route.path}/{{path}}", "get"))
    assert served - described == set(), "routes missing from /openapi.json"
    assert described - served == set(), "/openapi.json describes routes the app does not serve"


async def test_cors_only_for_allowed_origins_on_whip(make_service: ServiceFactory) -> None:
    allowed, other = "http://127.0.0.1:9", "http://evil.example"
    async with make_service(cors_origins=[allowed]) as svc, httpx.AsyncClient(base_url=base(svc)) as http:
        for method in ("POST", "DELETE", "PATCH"):
            path = "/whip" if method == "POST" else "/whip/abc"
            preflight = await http.options(
                path,
                headers={
                    "Origin": allowed,
                    "Access-Control-Request-Method": method,
                    "Access-Control-Request-Headers": "authorization,content-type",
                },
            )
            assert preflight.status_code == 200, (method, preflight.text)
            assert preflight.headers["access-control-allow-origin"] == allowed
            assert method in preflight.headers["access-control-allow-methods"]
            assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        refused = await http.options(
            "/whip", headers={"Origin": other, "Access-Control-Request-Method": "POST"}
        )
        assert "access-control-allow-origin" not in refused.headers
        offer = await whip_offer()
        posted = await http.post(
            "/whip?call_id=cors-1",
            content=offer,
            headers={"Content-Type": "application/sdp", "Origin": allowed},
        )
        assert posted.status_code == 201, posted.text
        assert "location" in posted.headers["access-control-expose-headers"].lower()
        # Not the legs API: it is for servers, never for pages.
        legs = await http.get("/v1/legs", headers={"Origin": allowed})
        assert "access-control-allow-origin" not in legs.headers
        await http.delete(posted.headers["location"])


async def test_no_cors_headers_without_cors_origins(make_service: ServiceFactory) -> None:
    async with make_service() as svc, httpx.AsyncClient(base_url=base(svc)) as http:
        preflight = await http.options(
            "/whip", headers={"Origin": "http://127.0.0.1:9", "Access-Control-Request-Method": "POST"}
        )
        assert "access-control-allow-origin" not in preflight.headers
        assert json.dumps(dict(preflight.headers)).count("access-control") == 0


async def test_loopback_client_gets_and_can_use_a_loopback_candidate(make_service: ServiceFactory) -> None:
    from aiortc import RTCSessionDescription
    from aiortc.mediastreams import AudioStreamTrack

    async with make_service() as svc, httpx.AsyncClient(base_url=base(svc), timeout=30) as http:
        pc = RTCPeerConnection()
        pc.addTrack(AudioStreamTrack())
        await pc.setLocalDescription(await pc.createOffer())
        reply = await http.post(
            "/whip?call_id=loop-1",
            content=pc.localDescription.sdp,
            headers={"Content-Type": "application/sdp"},
        )
        assert reply.status_code == 201, reply.text
        lines = reply.text.splitlines()
        loopback = [line for line in lines if line.startswith("a=candidate:") and " 127.0.0.1 " in line]
        assert loopback, "no 127.0.0.1 host candidate offered to a client on loopback"
        # Keep only the loopback candidate: the session must connect over it alone.
        only_loopback = "\r\n".join(
            line for line in lines if not line.startswith("a=candidate:") or " 127.0.0.1 " in line
        )
        await pc.setRemoteDescription(RTCSessionDescription(sdp=only_loopback + "\r\n", type="answer"))
        try:
            async with asyncio.timeout(20):
                while pc.connectionState != "connected":
                    assert pc.connectionState not in ("failed", "closed"), pc.connectionState
                    await asyncio.sleep(0.1)
        finally:
            await pc.close()
        await http.delete(reply.headers["location"])


async def test_empty_twilio_call_sid_is_a_protocol_close_not_a_crash(make_service: ServiceFactory) -> None:
    async with make_service() as svc:
        code, reason = await fork_close(svc, "")
        # No call id at all is a broken start message (1003), not an id the rule refuses (1008).
        assert code == 1003 and "names no call" in reason
        assert svc.registry.legs == {}
