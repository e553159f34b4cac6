"""CORS for WHIP (RFC 9725 §4.9 expects it): a browser page on another origin may POST an offer,
read the `Location` of its session and DELETE it, when its origin is in `cors_origins`.

Only the WHIP paths get CORS headers: the legs API and the forks are for servers, not pages.
"""

from __future__ import annotations

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

WHIP_PATH = "/whip"
# What a WHIP client page sends and must be able to read (RFC 9725 §4.2, §4.3).
ALLOW_METHODS = ["POST", "DELETE", "PATCH", "OPTIONS"]
ALLOW_HEADERS = ["Authorization", "Content-Type", "If-Match", "X-Callscribe-Call-Id", "X-Callscribe-Leg"]
EXPOSE_HEADERS = ["Location", "Link", "ETag", "Accept-Patch", "X-Callscribe-Call-Id", "X-Callscribe-Legs"]
PREFLIGHT_MAX_AGE_S = 600


class WhipCors:
    """ASGI middleware: CORS (Starlette's, with the lists above) on /whip and /whip/*; every
    other path passes through untouched. No origins configured: no CORS headers at all, so
    browsers refuse cross-origin WHIP (the safe default)."""

    def __init__(self, app: ASGIApp, origins: list[str]) -> None:
        self.app = app
        self.cors: ASGIApp | None = None
        if origins:
            self.cors = CORSMiddleware(
                app,
                allow_origins=origins,
                allow_methods=ALLOW_METHODS,
                allow_headers=ALLOW_HEADERS,
                expose_headers=EXPOSE_HEADERS,
                max_age=PREFLIGHT_MAX_AGE_S,
            )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (
            self.cors is not None
            and scope["type"] == "http"
            and (path == WHIP_PATH or path.startswith(WHIP_PATH + "/"))
        ):
            await self.cors(scope, receive, send)
        else:
            await self.app(scope, receive, send)
