"""Issue 17 item 9: DELETE /v1/legs/{id} says 204 only when the leg's events are in Redis."""

from __future__ import annotations

import socket

import httpx

from tests.support import ServiceFactory, free_port


async def test_delete_answers_202_queued_while_redis_is_down_and_204_when_up(
    make_service: ServiceFactory,
) -> None:
    down = f"redis://127.0.0.1:{free_port(socket.SOCK_STREAM)}/0"  # nothing listens there
    async with (
        make_service(redis_url=down) as svc,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{svc.http_port}", timeout=30) as http,
    ):
        leg = (await http.post("/v1/legs", json={"call_id": "del-down", "codec": "pcmu"})).json()
        reply = await http.delete(f"/v1/legs/{leg['leg_id']}")
        assert reply.status_code == 202, reply.text
        body = reply.json()
        assert body["status"] == "queued" and body["leg_id"] == leg["leg_id"]
        assert body["queued_events"] >= 3  # call.started, leg.started, leg.ended at least
    async with (
        make_service() as svc,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{svc.http_port}", timeout=30) as http,
    ):
        leg = (await http.post("/v1/legs", json={"call_id": "del-up", "codec": "pcmu"})).json()
        assert (await http.delete(f"/v1/legs/{leg['leg_id']}")).status_code == 204
