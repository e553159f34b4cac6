"""Websocket routes of the media forks: /fork/asterisk, /fork/freeswitch, /fork/twilio,
/fork/telnyx, /fork/plivo, /fork/exotel. Auth and per-source limits are decided before the
socket is accepted (a refused sender gets HTTP 403 and never sends audio)."""

from __future__ import annotations

import logging

from starlette.routing import BaseRoute, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from callscribe.bridge.events import DropReason
from callscribe.bridge.forks import DIALECTS, ForkParser
from callscribe.bridge.forks.admission import Verdict, admit
from callscribe.bridge.forks.base import CloseCode, fork_transport
from callscribe.bridge.forks.endpoint import ForkSession
from callscribe.bridge.limits import SourceLimit
from callscribe.calls import CallRegistry
from callscribe.metrics import Metrics
from callscribe.security import AccessPolicy

log = logging.getLogger(__name__)


class StarletteForkConnection:
    """ForkConnection over a starlette WebSocket (raw ASGI messages: text and bytes alike)."""

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        self.peer_close_code: int | None = None

    async def receive(self) -> str | bytes | None:
        try:
            message = await self.websocket.receive()
        except WebSocketDisconnect as exc:
            self.peer_close_code = exc.code
            return None
        except RuntimeError:
            return None
        if message["type"] == "websocket.disconnect":
            # ASGI: the peer's close code; 1005/1006 when it sent none or the connection dropped.
            self.peer_close_code = int(message.get("code", CloseCode.NO_STATUS))
            return None
        if message.get("bytes") is not None:
            return bytes(message["bytes"])
        return str(message.get("text") or "")

    async def send_text(self, text: str) -> None:
        await self.websocket.send_text(text)

    async def close(self, code: int, reason: str) -> None:
        if self.websocket.application_state == WebSocketState.CONNECTED:
            await self.websocket.close(code, reason)


def fork_routes(
    registry: CallRegistry,
    metrics: Metrics,
    policy: AccessPolicy,
    max_connections_per_source: int,
    max_frame_bytes: int,
    start_timeout_sec: float | None = None,
) -> list[BaseRoute]:
    limit = SourceLimit(max_connections_per_source)

    def endpoint_for(parser_class: type[ForkParser]) -> WebSocketRoute:
        transport = fork_transport(parser_class.dialect)

        async def endpoint(websocket: WebSocket) -> None:
            source = websocket.client.host if websocket.client else "unknown"
            if not policy.source_allowed(source):
                metrics.drop(transport, DropReason.NOT_ALLOWED)
                log.warning("fork %s from %s refused: not in allow_networks", parser_class.dialect, source)
                await websocket.close(code=CloseCode.POLICY, reason="source not allowed")
                return
            query = dict(websocket.query_params)
            admission = admit(
                dialect=parser_class.dialect,
                url=str(websocket.url),
                headers={k.lower(): v for k, v in websocket.headers.items()},
                query=query,
                policy=policy,
                in_band_token=parser_class.in_band_token,
            )
            if admission.verdict is Verdict.REFUSED:
                metrics.drop(transport, DropReason.AUTH)
                log.warning("fork %s from %s refused: %s", parser_class.dialect, source, admission.reason)
                await websocket.close(code=CloseCode.POLICY, reason=admission.reason)
                return
            if not limit.acquire(source):
                metrics.drop(transport, DropReason.CONNECTION_LIMIT)
                log.warning(
                    "fork %s from %s refused: %d connections open (limit %d per source)",
                    parser_class.dialect,
                    source,
                    limit.count(source),
                    limit.per_source,
                )
                await websocket.close(
                    code=CloseCode.TRY_LATER, reason="too many connections from this source"
                )
                return
            try:
                offered = websocket.scope.get("subprotocols") or []
                subprotocol = next((p for p in offered if p in parser_class.subprotocols), None)
                await websocket.accept(subprotocol=subprotocol)
                session = ForkSession(
                    parser_class(query),
                    registry,
                    metrics,
                    max_frame_bytes=max_frame_bytes,
                    peer=source,
                    policy=policy if admission.verdict is Verdict.TOKEN_IN_START else None,
                    start_timeout=start_timeout_sec,
                )
                await session.run(StarletteForkConnection(websocket))
            finally:
                limit.release(source)

        return WebSocketRoute(f"/fork/{parser_class.dialect}", endpoint)

    return [endpoint_for(parser_class) for parser_class in DIALECTS.values()]
