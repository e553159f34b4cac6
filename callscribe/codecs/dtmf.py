"""RFC 4733 telephone-event: DTMF digits sent as RTP packets beside the audio.

Payload: `[0]` event (0-9, 10 `*`, 11 `#`, 12-15 A-D), `[1]` E (end) bit 7, R bit 6,
volume bits 0-5 (dBm0 below 0), `[2..3]` duration in RTP clock ticks since the event's
timestamp. Every packet of one key press carries the same RTP timestamp; the sender repeats
the end packet (three times, §2.5.1.4) so that one survives loss.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass

from callscribe.codecs.base import CodecError, CodecSpec

TELEPHONE_EVENT = CodecSpec("telephone-event", "telephone-event", 8000, 8000, 1, None)
# WebRTC peers clock telephone-event with Opus at 48 kHz.
TELEPHONE_EVENT_48K = CodecSpec("telephone-event-48k", "telephone-event", 48000, 48000, 1, None)

DIGITS = "0123456789*#ABCD"
_PAYLOAD = struct.Struct("!BBH")
# Timestamps of finished events remembered to ignore their late repeated end packets.
_RECENT_EVENTS = 8


@dataclass(frozen=True, slots=True)
class TelephoneEvent:
    event: int
    end: bool = False
    volume: int = 10
    duration: int = 0

    @property
    def digit(self) -> str | None:
        """The DTMF key, or None for the other RFC 4733 events (flash, tones...)."""
        return DIGITS[self.event] if self.event < len(DIGITS) else None

    @classmethod
    def parse(cls, payload: bytes) -> TelephoneEvent:
        if len(payload) < _PAYLOAD.size:
            raise CodecError(f"telephone-event payload of {len(payload)} bytes, expected at least 4")
        event, flags, duration = _PAYLOAD.unpack_from(payload)
        return cls(event, bool(flags & 0x80), flags & 0x3F, duration)

    @classmethod
    def for_digit(cls, digit: str, end: bool = False, duration: int = 0, volume: int = 10) -> TelephoneEvent:
        index = DIGITS.find(digit.upper()) if len(digit) == 1 else -1
        if index < 0:
            raise CodecError(f"DTMF digit {digit!r} is not one of {DIGITS}")
        return cls(index, end, volume, duration)

    def serialize(self) -> bytes:
        if not 0 <= self.event <= 255 or not 0 <= self.volume <= 63 or not 0 <= self.duration <= 0xFFFF:
            raise CodecError(f"telephone-event fields out of range: {self}")
        return _PAYLOAD.pack(self.event, (0x80 if self.end else 0) | self.volume, self.duration)


@dataclass(frozen=True, slots=True)
class DtmfDigit:
    digit: str
    duration_ms: int


class DtmfReceiver:
    """Sans-IO: RTP (timestamp, payload) of telephone-event packets in, one DtmfDigit per key
    press out. A press is reported at its end packet, or when a packet of a new event starts
    before the end was seen (all its end packets lost), or at `flush()`."""

    def __init__(self, clock_rate: int = 8000) -> None:
        self.clock_rate = clock_rate
        self._timestamp: int | None = None
        self._current: TelephoneEvent | None = None
        self._reported = False
        self._recent: deque[int] = deque(maxlen=_RECENT_EVENTS)

    def receive(self, timestamp: int, payload: bytes) -> list[DtmfDigit]:
        """Raises CodecError for a payload shorter than 4 bytes."""
        event = TelephoneEvent.parse(payload)
        out: list[DtmfDigit] = []
        if timestamp != self._timestamp:
            if timestamp in self._recent:
                return out  # a late repeat of an event already reported
            out.extend(self.flush())
            self._timestamp = timestamp
            self._current = event
            self._reported = False
        elif self._reported or self._current is None:
            return out  # the repeated end packets
        elif event.duration > self._current.duration or event.end:
            self._current = event
        if event.end and not self._reported:
            out.extend(self._report())
        return out

    def flush(self) -> list[DtmfDigit]:
        """The event in progress, if its end packet never came."""
        if self._current is None or self._reported:
            return []
        return self._report()

    def _report(self) -> list[DtmfDigit]:
        assert self._current is not None and self._timestamp is not None
        self._reported = True
        self._recent.append(self._timestamp)
        digit = self._current.digit
        if digit is None:
            return []
        return [DtmfDigit(digit, self._current.duration * 1000 // self.clock_rate)]
