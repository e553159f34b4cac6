"""WHIP endpoints (RFC 9725): POST /whip with an SDP offer, DELETE /whip/{session} to hang up.

Which call and leg a session feeds comes from query parameters or headers, because WHIP clients
(browsers, OBS, GStreamer whipsink) can set a URL and usually a bearer token, rarely a body:
`call_id` / `X-Callscribe-Call-Id` (a new id when absent), `leg` / `X-Callscribe-Leg` (comma-separated
names for several audio tracks, in m-line order; default `caller`), and any `meta.<key>` query
parameter becomes leg metadata.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from callscribe.bridge.events import EndReason
from callscribe.bridge.ice_loopback import is_loopback
from callscribe.bridge.webrtc import WhipError, WhipIngest
from callscribe.calls import AtCapacity, LegConflict
from callscribe.ids import IdKind, check_id
from callscribe.ingest_options import OPTIONS
from callscribe.redact import parse_redactions
from callscribe.security import AccessPolicy
from callscribe.web.app import WaitFlushed, error, refusal
from callscribe.web.bodies import BodyError, read_body

log = logging.getLogger(__name__)

MAX_OFFER_BYTES = 64 * 1024


def session_params(request: Request) -> tuple[str, list[str], dict[str, Any]]:
    """(call_id, leg names, meta) of a WHIP request; ValueError names the bad parameter."""
    query, headers = request.query_params, request.headers
    call_id = query.get("call_id") or headers.get("x-callscribe-call-id") or uuid.uuid4().hex
    legs_text = query.get("leg") or headers.get("x-callscribe-leg") or "caller"
    legs = [check_id(IdKind.LEG, name.strip()) for name in legs_text.split(",")]
    if len(set(legs)) != len(legs):
        raise ValueError(f"leg names {legs_text!r} repeat a name")
    meta: dict[str, Any] = {key[5:]: value for key, value in query.items() if key.startswith("meta.")}
    # Per-call options (callscribe.ingest_options): ?redact=pci&context=...&keyterms=a,b
    meta.update({name: query[name] for name in OPTIONS if name in query})
    if "redact" in meta:
        parse_redactions(meta["redact"])  # the client's 400, not a silent default
    if request.headers.get("user-agent"):
        meta.setdefault("user_agent", request.headers["user-agent"][:200])
    return check_id(IdKind.CALL_ID, call_id), legs, meta


def whip_routes(
    ingest: WhipIngest, policy: AccessPolicy, wait_flushed: WaitFlushed, http_host: str
) -> list[BaseRoute]:
    """`http_host`: the address HTTP listens on, to warn when WHIP is open beyond this host."""
    if policy.whip_token is None and http_host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("WHIP ingest on %s accepts any client: set CALLSCRIBE_WHIP_TOKEN", http_host)

    def refused(request: Request) -> Response | None:
        return refusal(request, policy, policy.whip_token, "callscribe-whip")

    async def offer(request: Request) -> Response:
        if response := refused(request):
            return response
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/sdp":
            return error(415, f"content type {content_type or 'none'!r} is not application/sdp")
        try:
            body = await read_body(request, MAX_OFFER_BYTES)
        except BodyError as exc:
            return error(exc.status, f"SDP offer: {exc}")
        try:
            call_id, legs, meta = session_params(request)
            client = request.client.host if request.client else None
            session, answer = await ingest.publish(
                body.decode("utf-8", "replace"),
                call_id,
                legs,
                meta,
                loopback_client=is_loopback(client),
                owner=client,
            )
        except WhipError as exc:
            return error(exc.status, str(exc))
        except LegConflict as exc:
            return error(409, str(exc))
        except ValueError as exc:
            return error(400, str(exc))
        except AtCapacity as exc:
            return error(503, str(exc))
        location = f"/whip/{session.session_id}"
        return Response(
            answer,
            status_code=201,
            media_type="application/sdp",
            headers={
                "Location": location,
                "X-Callscribe-Call-Id": session.call_id,
                "X-Callscribe-Legs": ",".join(leg.name for leg in session.legs),
            },
        )

    async def hangup(request: Request) -> Response:
        if response := refused(request):
            return response
        session_id = request.path_params["session_id"]
        if not await ingest.end(session_id, EndReason.HANGUP):
            return error(404, f"no WHIP session {session_id!r}")
        await wait_flushed(10.0)
        return Response(status_code=200)

    async def trickle(request: Request) -> Response:
        # RFC 9725 §4.3.1: a server without trickle ICE answers PATCH with 405; the answer
        # already holds every candidate.
        return error(405, "trickle ICE is not supported; the SDP answer carries all candidates")

    async def options(request: Request) -> Response:
        return Response(status_code=204, headers={"Accept-Post": "application/sdp"})

    return [
        Route("/whip", offer, methods=["POST"]),
        Route("/whip", options, methods=["OPTIONS"]),
        Route("/whip/{session_id}", hangup, methods=["DELETE"]),
        Route("/whip/{session_id}", trickle, methods=["PATCH"]),
    ]
