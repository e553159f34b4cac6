"""The HTTP server's limits against hostile clients: what uvicorn offers, and the one it lacks.

uvicorn (0.54, h11) times out only idle keep-alive connections (`timeout_keep_alive` is
armed after a response and cancelled by the first byte of the next request): a connection
that sends half a request line and then one byte a minute (slowloris) is held forever.
`HeaderDeadlineProtocol` gives every request `header_timeout` seconds from its first byte (or
from the connection) to complete its headers, then answers 408 and closes. The deadline is not
moved by more bytes, so trickling does not extend it. h11 (`h11_max_incomplete_event_size`)
bounds what such a connection can buffer; `limit_concurrency` caps connections and tasks (a
request beyond it gets 503, /healthz included, so the cap sits far above normal use).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

if TYPE_CHECKING:
    from callscribe.settings import Settings

_BODY = b'{"error":"request headers not received in time"}'
REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: " + str(len(_BODY)).encode() + b"\r\n\r\n" + _BODY
)


class HeaderDeadlineProtocol(H11Protocol):
    header_timeout: ClassVar[float] = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._waiting_for_headers():
            if self._header_timer is None:
                self._arm()  # the first bytes of a keep-alive connection's next request
        else:
            self._disarm()  # headers complete (or upgraded to a websocket): the app decides now

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _waiting_for_headers(self) -> bool:
        return self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)

    def _arm(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or not self._waiting_for_headers():
            return
        if self.timeout_keep_alive_task is not None:
            return  # idle between requests, no byte of a new one yet: keep-alive's job
        self.transport.write(REQUEST_TIMEOUT)
        self.transport.close()


def http_limits(settings: Settings) -> dict[str, Any]:
    """uvicorn.Config keyword arguments for the limits in `settings`."""
    protocol = type(
        "HeaderDeadlineProtocol",
        (HeaderDeadlineProtocol,),
        {"header_timeout": settings.http_header_timeout_sec},
    )
    return {
        "http": protocol,
        "timeout_keep_alive": settings.http_keep_alive_sec,
        "limit_concurrency": settings.http_max_connections,
        "h11_max_incomplete_event_size": settings.http_max_header_bytes,
    }
