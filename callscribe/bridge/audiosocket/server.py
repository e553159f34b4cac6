"""The asyncio side of Asterisk AudioSocket: one TCP listener, one leg per connection.

Bytes from each connection go to an `AudioSocketParser`; its events are applied to the
connection's leg ("caller", named by the call's UUID). See `audiosocket.parser` for the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from callscribe.bridge.audiosocket.parser import (
    AudioSocketError,
    AudioSocketEvent,
    AudioSocketParser,
    CallIdentified,
    ErrorReceived,
    hangup_frame,
)
from callscribe.bridge.events import CALLER, AudioReceived, Dropped, DropReason, DtmfReceived, EndReason
from callscribe.bridge.limits import AtCapacity, LegConflict, SourceLimit
from callscribe.calls import CallRegistry, Leg
from callscribe.codecs import Decoder, decoder_for, spec_by_name
from callscribe.ids import InvalidId
from callscribe.metrics import Metrics
from callscribe.security import AccessPolicy
from callscribe.settings import Settings

log = logging.getLogger(__name__)

TRANSPORT = "audiosocket"


class AudioSocketServer:
    """The Component: one TCP listener, one leg ("caller") per connection, named by its UUID."""

    def __init__(
        self, settings: Settings, registry: CallRegistry, metrics: Metrics, policy: AccessPolicy
    ) -> None:
        self.settings = settings
        self.policy = policy
        self.registry = registry
        self.metrics = metrics
        self.limit = SourceLimit(settings.fork_max_connections_per_source)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()
        self._open: set[AudioSocketConnection] = set()

    @property
    def port(self) -> int:
        """The bound port (differs from settings when they ask for port 0)."""
        if self._server is not None and self._server.sockets:
            return int(self._server.sockets[0].getsockname()[1])
        return self.settings.audiosocket_port

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, self.settings.audiosocket_host, self.settings.audiosocket_port
        )
        log.info("AudioSocket listening on %s:%d", self.settings.audiosocket_host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        # Legs first, with the reason subscribers should see, then the sockets.
        await asyncio.gather(*(c.leg.close(EndReason.SHUTDOWN) for c in self._open if c.leg is not None))
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        peer = writer.get_extra_info("peername")
        source = str(peer[0]) if peer else "unknown"
        try:
            if not self.policy.source_allowed(source):
                self.metrics.drop(TRANSPORT, DropReason.NOT_ALLOWED)
                log.warning("AudioSocket connection from %s refused: not in allow_networks", source)
                return
            if not self.limit.acquire(source):
                self.metrics.drop(TRANSPORT, DropReason.CONNECTION_LIMIT)
                log.warning(
                    "AudioSocket connection from %s refused: %d connections open (limit %d per source)",
                    source,
                    self.limit.count(source),
                    self.limit.per_source,
                )
                return
            connection = AudioSocketConnection(self, reader, writer, source)
            self._open.add(connection)
            try:
                await connection.run()
            finally:
                self._open.discard(connection)
                self.limit.release(source)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._connections.discard(task)


class AudioSocketConnection:
    def __init__(
        self,
        server: AudioSocketServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        source: str,
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.source = source
        self.parser = AudioSocketParser(min(65535, server.settings.fork_max_frame_bytes))
        self.leg: Leg | None = None
        self._decoder: Decoder | None = None

    async def run(self) -> None:
        metrics = self.server.metrics
        reason = EndReason.HANGUP
        try:
            while True:
                try:
                    data = await asyncio.wait_for(
                        self.reader.read(65536), self.server.settings.leg_idle_timeout_sec
                    )
                except TimeoutError:
                    reason = EndReason.IDLE_TIMEOUT
                    log.warning(
                        "AudioSocket %s: no data for %.0fs",
                        self.source,
                        self.server.settings.leg_idle_timeout_sec,
                    )
                    break
                if not data:
                    # Asterisk's hangup is a close after a whole frame (see the parser's docstring).
                    parser = self.parser
                    clean = parser.ended or (parser.call_id is not None and not parser.mid_frame)
                    reason = EndReason.HANGUP if clean else EndReason.DISCONNECT
                    break
                try:
                    events = self.parser.receive_data(data)
                except AudioSocketError as exc:
                    metrics.drop(TRANSPORT, DropReason.PROTOCOL_ERROR)
                    log.warning("AudioSocket %s: %s; closing", self.source, exc)
                    if self.leg is not None:
                        self.leg.error(str(exc), "protocol")
                    reason = EndReason.PROTOCOL_ERROR
                    break
                for event in events:
                    if not self._handle(event):
                        reason = EndReason.REFUSED
                        return
                if self.parser.ended:
                    break
        except ConnectionError:
            reason = EndReason.DISCONNECT
        finally:
            if self.leg is not None:
                await self.leg.close(reason)

    def _handle(self, event: AudioSocketEvent) -> bool:
        """False when the connection must end (its leg could not be opened)."""
        metrics = self.server.metrics
        if isinstance(event, AudioReceived):
            metrics.packets_received.labels(transport=TRANSPORT).inc()
            if self.leg is not None:
                decoder = self._decoder
                if decoder is None or decoder.spec.name != event.codec:
                    decoder = self._decoder = decoder_for(spec_by_name(event.codec))
                self.leg.feed(decoder.decode(event.payload), decoder.spec.sample_rate)
        elif isinstance(event, CallIdentified):
            try:
                self.leg = self.server.registry.open_leg(
                    event.call_id, CALLER, {"source": "audiosocket", "peer": self.source}, owner=self.source
                )
            except (LegConflict, AtCapacity, InvalidId) as exc:
                metrics.drop(TRANSPORT, DropReason.REFUSED)
                log.warning("AudioSocket %s call %s refused: %s", self.source, event.call_id, exc)
                # Asterisk's AudioSocket() returns to the dialplan when the socket closes.
                self.writer.write(hangup_frame())
                return False
        elif isinstance(event, DtmfReceived):
            if self.leg is not None and not self.leg.closed:
                self.leg.dtmf(event.digit, 0)
        elif isinstance(event, ErrorReceived):
            log.warning("AudioSocket %s: %s", self.source, event.message)
            if self.leg is not None and not self.leg.closed:
                self.leg.error(event.message, "sender")
        elif isinstance(event, Dropped):
            metrics.drop(TRANSPORT, event.reason)
            log.debug("AudioSocket %s: dropped frame: %s", self.source, event.detail)
        return True
