"""Asterisk AudioSocket: Asterisk connects over TCP, callscribe listens (`audiosocket_port`).

Wire format (asterisk `include/asterisk/res_audiosocket.h`, `res/res_audiosocket.c`): frames
of `[kind u8][payload length u16 big-endian][payload]`. The first frame is kind 0x01 with
the 16 raw bytes of the call's UUID, the only identity the connection has. Audio is signed
16-bit little-endian mono PCM: kind 0x10 at 8 kHz (the AudioSocket() dialplan application),
0x11-0x18 at 12/16/24/32/44.1/48/96/192 kHz (channel driver, Asterisk 20.17/21.12/22.7+).
0x03 carries one ASCII DTMF digit, 0xff an error (optional code byte), 0x00 a hangup.
Asterisk itself never sends 0x00: on a hangup `apps/app_audiosocket.c` just closes the socket,
so a close between whole frames is the call's hangup; a close in the middle of a frame, or a
reset, is a lost connection.

`AudioSocketParser` is the sans-IO core (bytes in, events out, frames split across reads
reassembled); `audiosocket.server` is the asyncio shell that feeds a leg per connection.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

from callscribe.bridge.events import CALLER, AudioReceived, Dropped, DropReason, DtmfReceived
from callscribe.codecs import s16le

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


AudioSocketEvent = CallIdentified | AudioReceived | DtmfReceived | HangupReceived | ErrorReceived | Dropped


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

    @property
    def mid_frame(self) -> bool:
        """Part of a frame has arrived and the rest has not."""
        return bool(self._buffer) or self._skip > 0

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
                    Dropped(
                        DropReason.OVERSIZED,
                        f"kind 0x{kind:02x} frame of {length} bytes, over {self.max_payload}",
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
                return Dropped(DropReason.DUPLICATE_UUID, "a second UUID frame on one connection")
            if len(payload) != 16:
                raise AudioSocketError(f"UUID frame must carry 16 bytes, got {len(payload)}")
            self.call_id = str(uuid.UUID(bytes=payload))
            return CallIdentified(self.call_id)
        rate = AUDIO_RATES.get(kind)
        if rate is not None:
            if not payload:
                return Dropped(DropReason.EMPTY, f"zero-length audio frame of kind 0x{kind:02x}")
            if len(payload) % 2:
                return Dropped(
                    DropReason.ODD_LENGTH, f"audio frame of {len(payload)} bytes is not whole samples"
                )
            return AudioReceived(CALLER, payload, s16le(rate).name)
        if kind == KIND_DTMF:
            digit = payload[:1].decode("ascii", "replace")
            if len(payload) != 1 or digit.upper() not in "0123456789*#ABCD":
                return Dropped(DropReason.BAD_DTMF, f"DTMF frame must carry one digit, got {payload[:8]!r}")
            return DtmfReceived(CALLER, digit.upper())
        if kind == KIND_HANGUP:
            self.ended = True
            return HangupReceived()
        if kind == KIND_ERROR:
            return ErrorReceived(payload[0] if payload else None)
        return Dropped(DropReason.UNKNOWN_KIND, f"unknown frame kind 0x{kind:02x} ({len(payload)} bytes)")


def hangup_frame() -> bytes:
    return HEADER.pack(KIND_HANGUP, 0)
