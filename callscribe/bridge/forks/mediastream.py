"""The JSON "media stream" family: Twilio Media Streams and its relatives (Telnyx, Plivo, Exotel).

All of them send `{"event": "connected"|"start"|"media"|"dtmf"|"mark"|"stop", ...}` text
frames with base64 audio; they differ in field names and codecs. A dialect subclass says how
to read its `start`, `media` and `dtmf` messages; this base does the JSON, the shape checks,
base64 and (for senders whose frames may arrive out of order) sequence-number reordering.
"""

from __future__ import annotations

import base64
import binascii
import json
from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from callscribe.bridge.events import AudioReceived, Dropped, DropReason, DtmfReceived
from callscribe.bridge.forks.base import AGENT, CALLER, ForkParser
from callscribe.bridge.forks.events import (
    ForkEvent,
    ForkProtocolError,
    RemoteError,
    StreamStarted,
    StreamStopped,
)

T = TypeVar("T")

# Track names → legs. Twilio/Plivo/Telnyx say inbound (what the caller says) and outbound
# (what is played to the caller: the agent side); dtmf frames say inbound_track.
TRACK_LEGS = {
    "inbound": CALLER,
    "inbound_track": CALLER,
    "outbound": AGENT,
    "outbound_track": AGENT,
}
# Names the in-band auth token may have among a start message's custom parameters.
TOKEN_PARAMETERS = ("token", "callscribe_token")
DTMF_DIGITS = frozenset("0123456789*#ABCDabcd")


class BadShape(ValueError):
    """A message whose JSON is valid but not shaped as the dialect documents."""


def field(obj: Mapping[str, Any], key: str, kind: type[T], where: str) -> T:
    value = obj.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise BadShape(f"{where}.{key} must be {kind.__name__}, got {value!r}")
    return value


def optional(obj: Mapping[str, Any], key: str, kind: type[T], where: str, default: T) -> T:
    if obj.get(key) is None:
        return default
    return field(obj, key, kind, where)


def number(obj: Mapping[str, Any], key: str, where: str) -> int:
    """Numbers that senders write as strings ("sequenceNumber": "3") or as JSON numbers."""
    value = obj.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    raise BadShape(f"{where}.{key} must be an integer or a decimal string, got {value!r}")


def string_map(value: Any, where: str) -> dict[str, str]:
    """customParameters-style objects; values are kept as the strings they should be."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        # Some senders (Exotel, Plivo extra_headers) pass them as one string.
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return {"raw": value}
    if not isinstance(value, dict):
        raise BadShape(f"{where} must be an object, got {value!r}")
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in value.items()}


class SequenceReorder:
    """Puts frames back in sequence-number order (sans-IO: no timers).

    A frame whose number is the next expected passes at once; a later one waits until the gap
    fills, or until more than `window` frames wait (the gap is then taken as lost). Frames
    numbered below the next expected one arrived too late to be played in order and are
    refused (push returns None)."""

    def __init__(self, window: int = 10) -> None:
        self.window = window
        self._next: int | None = None
        self._held: dict[int, list[ForkEvent]] = {}

    def expect(self, seq: int) -> None:
        self._next = seq

    def push(self, seq: int, events: list[ForkEvent]) -> list[ForkEvent] | None:
        if self._next is None:
            self._next = seq
        if seq < self._next or seq in self._held:
            return None
        self._held[seq] = events
        out: list[ForkEvent] = []
        while True:
            while self._next in self._held:
                out.extend(self._held.pop(self._next))
                self._next += 1
            if len(self._held) <= self.window:
                return out
            self._next = min(self._held)

    def flush(self) -> list[ForkEvent]:
        out = [event for seq in sorted(self._held) for event in self._held[seq]]
        if self._held:
            self._next = max(self._held) + 1
        self._held.clear()
        return out


@dataclass(frozen=True, slots=True)
class StartFields:
    """Where a dialect keeps what callscribe needs in its `start` message."""

    call_id: str  # key in start
    media_format: str  # key in start of {encoding, <rate>}
    rate: str  # key in media_format
    default_encoding: str
    parameters: str | None  # key of the custom parameters (in start, else in the message)
    meta: tuple[str, ...] = ()  # keys copied into meta (from start, else from the message)
    tracks: bool = True  # start lists its tracks; otherwise both legs may carry media


class MediaStreamParser(ForkParser):
    """Base of the JSON dialects: a dialect names its fields and maps its encodings."""

    fields: ClassVar[StartFields]
    # Key of the per-message sequence number (None: the dialect's order is TCP order).
    sequence_key: ClassVar[str | None] = None
    reorders: ClassVar[bool] = False
    in_band_token: ClassVar[bool] = True

    def __init__(self, params: Mapping[str, str] | None = None) -> None:
        super().__init__(params)
        self.started: StreamStarted | None = None
        self.codecs: dict[str, str] = {}  # leg → codec name, from the start message
        self.stopped = False
        self._reorder = SequenceReorder() if self.reorders else None

    # -- what a dialect says -------------------------------------------------------------
    @abstractmethod
    def codec(self, encoding: str, rate: int) -> str | None:
        """The callscribe codec of the start message's encoding, None if unsupported."""

    def read_start(self, message: Mapping[str, Any]) -> tuple[StreamStarted, dict[str, str]]:
        """→ (the StreamStarted event, codec name per leg the stream may carry)."""
        names = self.fields
        start = field(message, "start", dict, "start")
        call_id = field(start, names.call_id, str, "start.start")
        where = f"start.start.{names.media_format}"
        media_format = optional(start, names.media_format, dict, "start.start", {})
        encoding = optional(media_format, "encoding", str, where, names.default_encoding)
        rate = number(media_format, names.rate, where) if names.rate in media_format else 8000
        try:
            codec = self.codec(encoding, rate)
        except ValueError as exc:  # linear_codec on "sampleRate": 0 (found by fuzz/run.sh)
            raise ForkProtocolError(
                f"unsupported media format encoding={encoding!r} rate={rate}: {exc}"
            ) from None
        if codec is None:
            raise ForkProtocolError(f"unsupported media format encoding={encoding!r} rate={rate}")
        parameters: dict[str, str] = {}
        if names.parameters is not None:
            raw = start.get(names.parameters, message.get(names.parameters))
            parameters = string_map(raw, f"start.{names.parameters}")
        meta: dict[str, Any] = {"source": self.dialect}
        for key in names.meta:
            value = start.get(key, message.get(key))
            meta[key] = value if isinstance(value, str) else ""
        meta["custom"] = without_token(parameters)
        legs = track_legs(start.get("tracks"), "start.start.tracks") if names.tracks else [CALLER, AGENT]
        return StreamStarted(call_id, meta, token=token_from(parameters)), dict.fromkeys(legs, codec)

    def read_media(self, message: Mapping[str, Any]) -> tuple[str, str]:
        """→ (leg, base64 payload)."""
        media = field(message, "media", dict, "media")
        track = optional(media, "track", str, "media.media", "inbound")
        leg = TRACK_LEGS.get(track)
        if leg is None:
            raise BadShape(f"media.media.track must be inbound or outbound, got {track!r}")
        return leg, field(media, "payload", str, "media.media")

    def read_dtmf(self, message: Mapping[str, Any]) -> DtmfReceived:
        dtmf = field(message, "dtmf", dict, "dtmf")
        digit = field(dtmf, "digit", str, "dtmf.dtmf")
        if len(digit) != 1 or digit not in DTMF_DIGITS:
            raise BadShape(f"dtmf.dtmf.digit must be one of 0-9 * # A-D, got {digit!r}")
        track = optional(dtmf, "track", str, "dtmf.dtmf", "inbound_track")
        leg = TRACK_LEGS.get(track)
        if leg is None:
            raise BadShape(f"dtmf.dtmf.track must be inbound_track or outbound_track, got {track!r}")
        duration = dtmf.get("duration")
        duration_ms = number(dtmf, "duration", "dtmf.dtmf") if duration is not None else 0
        return DtmfReceived(leg, digit.upper(), max(0, duration_ms))

    def read_error(self, message: Mapping[str, Any]) -> RemoteError:
        detail = {k: v for k, v in message.items() if k not in ("event", self.sequence_key)}
        return RemoteError(json.dumps(detail, sort_keys=True)[:500])

    # -- the interface -------------------------------------------------------------------
    def receive_bytes(self, data: bytes) -> list[ForkEvent]:
        return [
            Dropped(DropReason.UNEXPECTED_BINARY, f"{self.dialect} sends JSON text, got {len(data)} bytes")
        ]

    def receive_text(self, text: str) -> list[ForkEvent]:
        try:
            message = json.loads(text)
        except json.JSONDecodeError as exc:
            return [Dropped(DropReason.BAD_JSON, f"{exc.msg} at position {exc.pos} in {text[:80]!r}")]
        if not isinstance(message, dict):
            return [Dropped(DropReason.BAD_SHAPE, f"message must be a JSON object, got {text[:80]!r}")]
        try:
            return self._dispatch(message)
        except BadShape as exc:
            return [Dropped(DropReason.BAD_SHAPE, str(exc))]

    def finish(self) -> list[ForkEvent]:
        return self._reorder.flush() if self._reorder is not None else []

    # -- internals -----------------------------------------------------------------------
    def _dispatch(self, message: dict[str, Any]) -> list[ForkEvent]:
        event = field(message, "event", str, "message")
        if event == "connected":
            return []
        if event == "start":
            return self._start(message)
        if self.started is None:
            return [Dropped(DropReason.BEFORE_START, f"{event!r} message before the start message")]
        if self.stopped:
            return [Dropped(DropReason.AFTER_STOP, f"{event!r} message after the stop message")]
        if event == "media":
            events = self._media(message)
        elif event == "dtmf":
            events = [self.read_dtmf(message)]
        elif event == "stop":
            self.stopped = True
            return [*self.finish(), StreamStopped("stop")]
        elif event == "mark":
            events = []
        elif event == "error":
            events = [self.read_error(message)]
        else:
            return [Dropped(DropReason.UNKNOWN_EVENT, f"unknown event {event[:40]!r}")]
        return self._in_order(message, events)

    def _in_order(self, message: Mapping[str, Any], events: list[ForkEvent]) -> list[ForkEvent]:
        if self._reorder is None or self.sequence_key is None or self.sequence_key not in message:
            return events
        seq = number(message, self.sequence_key, "message")
        ordered = self._reorder.push(seq, events)
        if ordered is None:
            return [
                Dropped(DropReason.LATE, f"{self.sequence_key}={seq} arrived after later frames were used")
            ]
        return ordered

    def _start(self, message: Mapping[str, Any]) -> list[ForkEvent]:
        if self.started is not None:
            return [Dropped(DropReason.DUPLICATE_START, "a second start message on one stream")]
        started, codecs = self.read_start(message)
        self.started, self.codecs = started, codecs
        if self._reorder is not None and self.sequence_key is not None and self.sequence_key in message:
            self._reorder.expect(number(message, self.sequence_key, "start") + 1)
        return [started]

    def _media(self, message: Mapping[str, Any]) -> list[ForkEvent]:
        leg, encoded = self.read_media(message)
        codec = self.codecs.get(leg)
        if codec is None:
            raise BadShape(f"media for leg {leg!r}, which the start message did not announce")
        try:
            payload = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as exc:
            return [Dropped(DropReason.BAD_BASE64, f"media.payload is not base64 ({exc}): {encoded[:40]!r}")]
        if not payload:
            return [Dropped(DropReason.EMPTY, "media.payload is empty")]
        return [AudioReceived(leg, payload, codec)]


def track_legs(tracks: Any, where: str) -> list[str]:
    if tracks is None:
        return [CALLER]
    if not isinstance(tracks, list) or not all(isinstance(t, str) for t in tracks):
        raise BadShape(f"{where} must be a list of track names, got {tracks!r}")
    legs = [TRACK_LEGS.get(t) for t in tracks]
    if None in legs or not legs:
        raise BadShape(f"{where} must name inbound and/or outbound, got {tracks!r}")
    return [leg for leg in legs if leg is not None]


def token_from(parameters: Mapping[str, str]) -> str | None:
    for name in TOKEN_PARAMETERS:
        if name in parameters:
            return parameters[name]
    return None


def without_token(parameters: Mapping[str, str]) -> dict[str, str]:
    """Custom parameters as published in `meta`: the shared secret is never published."""
    return {k: v for k, v in parameters.items() if k not in TOKEN_PARAMETERS}
