"""The composition root builds every part up front and does no I/O until start(): a Service
can be built, inspected and its HTTP app called in-process with no Redis and no socket."""

from __future__ import annotations

import httpx

from callscribe.bridge.sip.server import SipServer
from callscribe.service import Service
from callscribe.settings import Settings
from tests.scripted_engine import ScriptedEngine

UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"


def build(**overrides: object) -> Service:
    settings = Settings(redis_url=UNREACHABLE_REDIS, **overrides)  # type: ignore[arg-type]
    return Service(settings, engine=ScriptedEngine())


def test_every_component_is_built_in_start_order_and_sip_only_when_enabled() -> None:
    service = build()
    assert service.sip is None
    assert service.components == (service.rtp, service.whip, service.dashboard, service.audiosocket)
    with_sip = build(sip_enabled=True)
    assert isinstance(with_sip.sip, SipServer)
    assert with_sip.components[:2] == (with_sip.rtp, with_sip.sip)
    assert service.phase == "not started" and service.http_port == service.settings.http_port


async def test_the_http_app_answers_in_process_before_anything_is_started() -> None:
    service = build(api_token="s3cret")
    transport = httpx.ASGITransport(app=service.app, client=("127.0.0.1", 5000))
    async with httpx.AsyncClient(transport=transport, base_url="http://bridge") as client:
        assert (await client.get("/healthz")).status_code == 200
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and ready.json() == {"ready": False, "redis": False, "engine": False}
        assert (await client.get("/v1/legs")).status_code == 401  # the policy reached the legs API
        listed = await client.get("/v1/legs", headers={"Authorization": "Bearer s3cret"})
        assert listed.status_code == 200 and listed.json() == []
        assert (await client.options("/whip")).headers["accept-post"] == "application/sdp"
        assert "callscribe_packets_received" in (await client.get("/metrics")).text
    assert not service.ready
