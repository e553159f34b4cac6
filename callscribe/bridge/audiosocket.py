"""Asterisk AudioSocket: Asterisk connects over TCP, callscribe listens (`audiosocket_port`).

Wire format (asterisk `include/asterisk/res_audiosocket.h`, `res/res_audiosocket.c`): frames
of `[kind u8][payload length u16 big-endian][payload]`. The first frame is kind 0x01 with
the 16 raw bytes of the call's UUID, the only identity the connection has. Audio is signed
16-bit little-endian mono PCM: kind 0x10 at 8 kHz (the AudioSocket() dialplan application),
0x11-0x18 at 12/16/24/32/44.1/48/96/192 kHz (channel driver, Asterisk 20.17/21.12/22.7+).
0x03 carries one ASCII DTMF digit, 0xff an error (optional code byte), 0x00 a hangup.

`AudioSocketParser` is the sans-IO core (bytes in, events out, frames split across reads
reassembled); `AudioSocketServer` is the asyncio shell that feeds a leg per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from callscribe.bridge.forks.admission import SourceLimit
from callscribe.calls import AtCapacity, CallRegistry, Leg, LegConflict
from callscribe.ids import InvalidId
from callscribe.metrics import Metrics
from callscribe.security import AccessPolicy
from callscribe.settings import Settings

log = logging.getLogger(__name__)

TRANSPORT = "audiosocket"
HEADER = struct.Struct("!BH")

KIND_HANGUP = 0x00
KIND_UUID = 0x01
KIND_DTMF = 0x03
KIND_ERROR = 0xFF
AUDIO_RATES = {
    0x10: 8000,
    0x11: 12000,
    0x12: 16000,
    0x13: 24000,
    0x14: 32000,
    0x15: 44100,
    0x16: 48000,
    0x17: 96000,
    0x18: 192000,
}
# Asterisk-generated error codes (AudioSocket protocol definition, CyCoreSystems/audiosocket).
ERROR_CODES = {0x01: "hangup of the calling party", 0x02: "frame forwarding error", 0x04: "memory error"}


@dataclass(frozen=True, slots=True)
class CallIdentified:
    call_id: str


@dataclass(frozen=True, slots=True)
class AudioReceived:
    pcm: bytes  # s16le mono
    rate: int


@dataclass(frozen=True, slots=True)
class DigitReceived:
    digit: str


@dataclass(frozen=True, slots=True)
class HangupReceived:
    pass


@dataclass(frozen=True, slots=True)
class ErrorReceived:
    code: int | None

    @property
    def message(self) -> str:
        if self.code is None:
            return "Asterisk reported an AudioSocket error (no code)"
        return (
            f"Asterisk reported AudioSocket error 0x{self.code:02x}: {ERROR_CODES.get(self.code, 'unknown')}"
        )


@dataclass(frozen=True, slots=True)
class FrameSkipped:
    """A frame that was read past and counted (reason is the metrics label)."""

    reason: str
    detail: str


AudioSocketEvent = (
    CallIdentified | AudioReceived | DigitReceived | HangupReceived | ErrorReceived | FrameSkipped
)


class AudioSocketError(ValueError):
    """The peer is not speaking AudioSocket (the connection is closed)."""


class AudioSocketParser:
    """h11-style: `receive_data(bytes)` returns every event completed by those bytes."""

    def __init__(self, max_payload: int = 65535) -> None:
        self.max_payload = max_payload
        self.call_id: str | None = None
        self.ended = False
        self._buffer = bytearray()
        self._skip = 0  # payload bytes of an oversized frame still to read past

    def receive_data(self, data: bytes) -> list[AudioSocketEvent]:
        if self.ended:
            return []
        self._buffer += data
        events: list[AudioSocketEvent] = []
        while not self.ended:
            if self._skip:
                skipped = min(self._skip, len(self._buffer))
                del self._buffer[:skipped]
                self._skip -= skipped
                if self._skip:
                    break
            if len(self._buffer) < HEADER.size:
                break
            kind, length = HEADER.unpack_from(self._buffer)
            if self.call_id is None and kind != KIND_UUID:
                raise AudioSocketError(f"first frame must be kind 0x01 (UUID), got kind 0x{kind:02x}")
            if length > self.max_payload:
                # The length field is all the framing there is, so reading past the payload
                # keeps the stream in frame: the frame is dropped, the call goes on.
                del self._buffer[: HEADER.size]
                self._skip = length
                events.append(
                    FrameSkipped(
                        "oversized", f"kind 0x{kind:02x} frame of {length} bytes, over {self.max_payload}"
                    )
                )
                continue
            if len(self._buffer) < HEADER.size + length:
                break
            payload = bytes(self._buffer[HEADER.size : HEADER.size + length])
            del self._buffer[: HEADER.size + length]
            events.append(self._frame(kind, payload))
        return events

    def _frame(self, kind: int, payload: bytes) -> AudioSocketEvent:
        if kind == KIND_UUID:
            if self.call_id is not None:
                return FrameSkipped("duplicate-uuid", "a second UUID frame on one connection")
            if len(payload) != 16:
                raise AudioSocketError(f"UUID frame must carry 16 bytes, got {len(payload)}")
            self.call_id = str(uuid.UUID(bytes=payload))
            return CallIdentified(self.call_id)
        rate = AUDIO_RATES.get(kind)
        if rate is not None:
            if not payload:
                return FrameSkipped("empty", f"zero-length audio frame of kind 0x{kind:02x}")
            if len(payload) % 2:
                return FrameSkipped("odd-length", f"audio frame of {len(payload)} bytes is not whole samples")
            return AudioReceived(payload, rate)
        if kind == KIND_DTMF:
            digit = payload[:1].decode("ascii", "replace")
            if len(payload) != 1 or digit.upper() not in "0123456789*#ABCD":
                return FrameSkipped("bad-dtmf", f"DTMF frame must carry one digit, got {payload[:8]!r}")
            return DigitReceived(digit.upper())
        if kind == KIND_HANGUP:
            self.ended = True
            return HangupReceived()
        if kind == KIND_ERROR:
            return ErrorReceived(payload[0] if payload else None)
        return FrameSkipped("unknown-kind", f"unknown frame kind 0x{kind:02x} ({len(payload)} bytes)")


def hangup_frame() -> bytes:
    return HEADER.pack(KIND_HANGUP, 0)


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
        await asyncio.gather(*(c.leg.close("shutdown") for c in self._open if c.leg is not None))
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
                self.metrics.drop(TRANSPORT, "not_allowed")
                log.warning("AudioSocket connection from %s refused: not in allow_networks", source)
                return
            if not self.limit.acquire(source):
                self.metrics.drop(TRANSPORT, "connection-limit")
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

    async def run(self) -> None:
        metrics = self.server.metrics
        reason = "hangup"
        try:
            while True:
                try:
                    data = await asyncio.wait_for(
                        self.reader.read(65536), self.server.settings.leg_idle_timeout_sec
                    )
                except TimeoutError:
                    reason = "timeout"
                    log.warning(
                        "AudioSocket %s: no data for %.0fs",
                        self.source,
                        self.server.settings.leg_idle_timeout_sec,
                    )
                    break
                if not data:
                    reason = "disconnect" if not self.parser.ended else "hangup"
                    break
                try:
                    events = self.parser.receive_data(data)
                except AudioSocketError as exc:
                    metrics.drop(TRANSPORT, "protocol-error")
                    log.warning("AudioSocket %s: %s; closing", self.source, exc)
                    if self.leg is not None:
                        self.leg.error(str(exc), "protocol")
                    reason = "protocol-error"
                    break
                for event in events:
                    if not self._handle(event):
                        reason = "refused"
                        return
                if self.parser.ended:
                    break
        except ConnectionError:
            reason = "disconnect"
        finally:
            if self.leg is not None:
                await self.leg.close(reason)

    def _handle(self, event: AudioSocketEvent) -> bool:
        """False when the connection must end (its leg could not be opened)."""
        metrics = self.server.metrics
        if isinstance(event, AudioReceived):
            metrics.packets_received.labels(transport=TRANSPORT).inc()
            if self.leg is not None:
                self.leg.feed(np.frombuffer(event.pcm, dtype="<i2").astype(np.int16), event.rate)
        elif isinstance(event, CallIdentified):
            try:
                self.leg = self.server.registry.open_leg(
                    event.call_id, "caller", {"source": "audiosocket", "peer": self.source}
                )
            except (LegConflict, AtCapacity, InvalidId) as exc:
                metrics.drop(TRANSPORT, "refused")
                log.warning("AudioSocket %s call %s refused: %s", self.source, event.call_id, exc)
                # Asterisk's AudioSocket() returns to the dialplan when the socket closes.
                self.writer.write(hangup_frame())
                return False
        elif isinstance(event, DigitReceived):
            if self.leg is not None and not self.leg.closed:
                self.leg.dtmf(event.digit, 0)
        elif isinstance(event, ErrorReceived):
            log.warning("AudioSocket %s: %s", self.source, event.message)
            if self.leg is not None and not self.leg.closed:
                self.leg.error(event.message, "sender")
        elif isinstance(event, FrameSkipped):
            metrics.drop(TRANSPORT, event.reason)
            log.debug("AudioSocket %s: dropped frame: %s", self.source, event.detail)
        return True
