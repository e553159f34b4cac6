"""The HTTP app: health, the legs API, metrics. Feature modules add their own routes.

Every route factory takes only the parts it uses (never the Service), so `callscribe.web`
does not depend on the composition root that assembles it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Match, Route

# RtpPorts: the narrow view of the RTP ingest that SIP uses too (reserve a leg's port, release it).
from callscribe.bridge.rtp.ports import RtpPorts
from callscribe.calls import AtCapacity, CallRegistry, LegConflict
from callscribe.codecs.base import CodecError
from callscribe.ingest_options import OPTIONS
from callscribe.metrics import Metrics
from callscribe.redact import parse_redactions
from callscribe.security import AccessPolicy, bearer_authorized
from callscribe.web.bodies import BodyError, read_body
from callscribe.web.cors import WhipCors

log = logging.getLogger(__name__)

# Waits (up to `timeout` seconds) until every event published so far is written to Redis.
WaitFlushed = Callable[[float], Awaitable[object]]


PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LEG_FIELDS = frozenset({"call_id", "leg", "codec", "meta", *OPTIONS})


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def refusal(request: Request, policy: AccessPolicy, token: SecretStr | None, realm: str) -> Response | None:
    """403 for a source outside allow_networks, 401 without the bearer `token` (when one is
    set), None when the request may go on. The log line names the source, never what it sent."""
    source = request.client.host if request.client else "unknown"
    if not policy.source_allowed(source):
        log.warning("%s %s from %s refused: not in allow_networks", request.method, request.url.path, source)
        return error(403, f"source {source} is not allowed")
    if not bearer_authorized(request.headers.get("authorization"), token):
        log.info(
            "%s %s from %s refused: missing or wrong bearer token", request.method, request.url.path, source
        )
        response = error(401, "a valid 'Authorization: Bearer <token>' header is required")
        response.headers["WWW-Authenticate"] = f'Bearer realm="{realm}"'
        return response
    return None


async def read_json_object(request: Request, max_bytes: int = 65536) -> dict[str, Any]:
    """The request body as a JSON object; ValueError with a reason a client can act on,
    BodyError (413/408) for a body too large or too slow (refused while it is read)."""
    body = await read_body(request, max_bytes)
    try:
        data = json.loads(body or b"null")
    except json.JSONDecodeError as exc:
        raise ValueError(f"body is not JSON: {exc.msg} at position {exc.pos}") from None
    if not isinstance(data, dict):
        raise ValueError("body must be a JSON object")
    return data


def health_routes(checks: Callable[[], Mapping[str, bool]], metrics: Metrics) -> list[BaseRoute]:
    """/healthz (the process answers), /readyz (every named check is true), /metrics."""

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def readyz(request: Request) -> Response:
        results = dict(checks())
        status = 200 if all(results.values()) else 503
        return JSONResponse({"ready": status == 200, **results}, status_code=status)

    async def render_metrics(request: Request) -> Response:
        return Response(metrics.render(), media_type=PROMETHEUS_CONTENT_TYPE)

    return [Route("/healthz", healthz), Route("/readyz", readyz), Route("/metrics", render_metrics)]


class Delivery(Protocol):
    """What the legs API needs of the publisher: are the events published so far in Redis?"""

    @property
    def connected(self) -> bool: ...
    @property
    def buffer_depth(self) -> int: ...
    async def wait_flushed(self, timeout: float) -> bool: ...


def leg_routes(
    ports: RtpPorts, registry: CallRegistry, policy: AccessPolicy, delivery: Delivery
) -> list[BaseRoute]:
    def refused(request: Request) -> Response | None:
        return refusal(request, policy, policy.api_token, "callscribe-api")

    async def create_leg(request: Request) -> Response:
        if response := refused(request):
            return response
        try:
            body = await read_json_object(request)
            unknown = sorted(set(body) - LEG_FIELDS)
            if unknown:
                raise ValueError(
                    f"unknown field {unknown[0]!r}; known fields: {', '.join(sorted(LEG_FIELDS))}"
                )
            call_id, leg, codec = body.get("call_id"), body.get("leg", "caller"), body.get("codec", "pcmu")
            meta = body.get("meta", {})
            if not isinstance(call_id, str) or not call_id:
                raise ValueError("call_id (non-empty string) is required")
            if not isinstance(leg, str) or not leg or not isinstance(codec, str):
                raise ValueError("leg and codec must be non-empty strings")
            if not isinstance(meta, dict):
                raise ValueError("meta must be a JSON object")
            # Per-call options (docs/contract.md) travel in the leg's metadata.
            meta.update({name: body[name] for name in OPTIONS if name in body})
            if "redact" in meta:
                parse_redactions(meta["redact"])  # a bad value is the caller's 400, not a silent default
            owner = request.client.host if request.client else None
            reserved = await ports.reserve(call_id, leg, codec, meta, owner=owner)
        except BodyError as exc:
            return error(exc.status, str(exc))
        except LegConflict as exc:
            return error(409, str(exc))
        except (ValueError, CodecError) as exc:
            return error(400, str(exc))
        except AtCapacity as exc:
            return error(503, str(exc))
        return JSONResponse(
            {"leg_id": reserved.leg_id, "rtp_host": reserved.rtp_host, "rtp_port": reserved.rtp_port},
            status_code=201,
        )

    async def delete_leg(request: Request) -> Response:
        if response := refused(request):
            return response
        leg_id = request.path_params["leg_id"]
        if not await ports.release(leg_id):
            return error(404, f"no open leg {leg_id!r}")
        # A short wait when Redis is known to be down: the answer will be 202 anyway.
        wait = 10.0 if delivery.connected else 1.0
        if await delivery.wait_flushed(timeout=wait):
            return Response(status_code=204)
        # Not in Redis yet (Redis down or slow): the events wait in the outage buffer/spool.
        return JSONResponse(
            {
                "leg_id": leg_id,
                "status": "queued",
                "detail": "the leg ended; its last events are queued and not yet in Redis",
                "queued_events": delivery.buffer_depth,
            },
            status_code=202,
        )

    async def list_legs(request: Request) -> Response:
        if response := refused(request):
            return response
        return JSONResponse(
            [
                {"leg_id": leg.leg_id, "call_id": leg.call_id, "leg": leg.name, "audio_ms": leg.audio_ms}
                for leg in registry.legs.values()
            ]
        )

    return [
        Route("/v1/legs", create_leg, methods=["POST"]),
        Route("/v1/legs", list_legs, methods=["GET"]),
        Route("/v1/legs/{leg_id}", delete_leg, methods=["DELETE"]),
    ]


async def _http_error(request: Request, exc: Exception) -> Response:
    """404, 405 and other HTTP errors as {"error": ...}, like every other error of the API."""
    assert isinstance(exc, HTTPException)
    message = {
        404: f"no route {request.url.path}",
        405: f"{request.method} is not allowed on {request.url.path}",
    }
    response = error(exc.status_code, message.get(exc.status_code, str(exc.detail)))
    for name, value in (exc.headers or {}).items():
        response.headers[name] = value
    if exc.status_code == 405:
        # Starlette names only the first route of the path; a path served by several routes
        # (GET and POST /v1/legs) allows the methods of all of them.
        allowed: set[str] = set()
        for route in request.app.routes:
            if isinstance(route, Route) and route.matches(request.scope)[0] is Match.PARTIAL:
                allowed |= route.methods or set()
        if allowed:
            response.headers["Allow"] = ", ".join(sorted(allowed))
    return response


def meta_routes(routes: list[BaseRoute]) -> list[BaseRoute]:
    """/openapi.json (describing `routes` and itself) and /favicon.ico."""
    from importlib import metadata

    from starlette.routing import WebSocketRoute

    from callscribe.web.openapi import openapi_document

    dialects = [
        route.path.removeprefix("/fork/")
        for route in routes
        if isinstance(route, WebSocketRoute) and route.path.startswith("/fork/")
    ]
    document = openapi_document(metadata.version("callscribe"), dialects)
    favicon_path = Path(__file__).parent / "static" / "favicon.svg"

    async def openapi(request: Request) -> Response:
        return JSONResponse(document)

    async def favicon(request: Request) -> Response:
        return FileResponse(
            favicon_path, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"}
        )

    return [Route("/openapi.json", openapi), Route("/favicon.ico", favicon)]


def create_app(*route_groups: Iterable[BaseRoute], cors_origins: Sequence[str] = ()) -> Starlette:
    routes = [route for group in route_groups for route in group]
    routes.extend(meta_routes(routes))
    return Starlette(
        routes=routes,
        exception_handlers={HTTPException: _http_error},
        middleware=[Middleware(WhipCors, origins=list(cors_origins))],
    )
