"""Transcript events, schema version 1 (see README "Redis Streams contract").

Every event becomes one Redis Stream entry of flat string fields. Consumers dedupe on
(call_id, leg, seq); `seq` is monotonic per leg (call-level events use leg "").

The dataclass below is the one list of the schema's fields: each field names its `Wire`
codec (how it is written to a stream entry, read back, and shown as JSON), and `FIELDS`,
`to_fields`, `from_fields` and `to_json` are all derived from it. Adding a field is one line
(appended last, so existing consumers see the same fields in the same order).
Version 2 only adds fields (`words`, `conf`) to version 1, so `from_fields` reads both.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any, TypedDict

SCHEMA_VERSION = 2
# Versions from_fields reads: v1 entries lack `words` and `conf` and get their defaults.
READABLE_VERSIONS = ("1", "2")


class EventType(StrEnum):
    CALL_STARTED = "call.started"
    LEG_STARTED = "leg.started"
    PARTIAL = "partial"
    FINAL = "final"
    DTMF = "dtmf"
    LEG_ENDED = "leg.ended"
    CALL_ENDED = "call.ended"
    ERROR = "error"


_EVENT_TYPES = frozenset(EventType)


class Word(TypedDict):
    """One recognised word of a final; times in ms from the leg's first sample."""

    w: str
    start_ms: int
    end_ms: int
    conf: float


def now_ms() -> int:
    return int(time.time() * 1000)


def _same(value: Any) -> Any:
    return value


def _text(name: str, raw: str | None) -> str:
    return raw or ""


def _optional_int(name: str, raw: str | None) -> int | None:
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"field {name}={raw!r} is not an integer") from None


def _int(name: str, raw: str | None) -> int:
    return _optional_int(name, raw) or 0


def _number(value: int | None) -> str:
    return "" if value is None else str(value)


def _event_type(name: str, raw: str | None) -> EventType:
    if raw in _EVENT_TYPES:
        return EventType(raw)
    raise ValueError(f"unknown event type {raw!r}")


def _json_object(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _words_text(words: tuple[Word, ...]) -> str:
    return json.dumps(list(words), separators=(",", ":"))


def _words(name: str, raw: str | None) -> tuple[Word, ...]:
    try:
        return tuple(
            Word(w=str(i["w"]), start_ms=int(i["start_ms"]), end_ms=int(i["end_ms"]), conf=float(i["conf"]))
            for i in json.loads(raw or "[]")
        )
    except (ValueError, TypeError, KeyError):
        raise ValueError(
            f"field {name}={(raw or '')[:80]!r} is not a list of {{w,start_ms,end_ms,conf}}"
        ) from None


def _conf_text(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def _conf(name: str, raw: str | None) -> float | None:
    try:
        return float(raw) if raw else None
    except ValueError:
        raise ValueError(f"field {name}={raw!r} is not a number") from None


@dataclass(frozen=True, slots=True)
class Wire:
    """How one field is encoded in a stream entry (`encode`), parsed back from it (`decode`,
    given the field's name for the error and None when the entry lacks the field) and rendered
    for JSON consumers such as the dashboard (`json`)."""

    encode: Callable[[Any], str]
    decode: Callable[[str, str | None], Any]
    json: Callable[[Any], Any] = _same


# Field metadata naming each field's codec: `field(metadata=TEXT)` and so on.
TEXT = {"wire": Wire(str, _text)}
INT = {"wire": Wire(str, _int)}
OPTIONAL_INT = {"wire": Wire(_number, _optional_int)}  # None is written as ""
KIND = {"wire": Wire(str, _event_type, json=str)}
JSON_OBJECT = {"wire": Wire(_json_object, lambda name, raw: json.loads(raw or "{}"))}
WORDS = {"wire": Wire(_words_text, _words, json=list)}
CONFIDENCE = {"wire": Wire(_conf_text, _conf)}  # None is written as ""


@dataclass(frozen=True, slots=True)
class TranscriptEvent:
    """One published event. Optional numbers are None when they do not apply and
    are written as empty strings, so every entry carries every field of the schema."""

    type: EventType = field(metadata=KIND)
    call_id: str = field(metadata=TEXT)
    leg: str = field(default="", metadata=TEXT)
    seq: int = field(default=0, metadata=INT)
    utt: int | None = field(default=None, metadata=OPTIONAL_INT)
    text: str = field(default="", metadata=TEXT)
    stable: str = field(default="", metadata=TEXT)
    unstable: str = field(default="", metadata=TEXT)
    start_ms: int | None = field(default=None, metadata=OPTIONAL_INT)
    end_ms: int | None = field(default=None, metadata=OPTIONAL_INT)
    ts: int = field(default_factory=now_ms, metadata=INT)
    lang: str = field(default="", metadata=TEXT)
    engine: str = field(default="", metadata=TEXT)
    latency_ms: int | None = field(default=None, metadata=OPTIONAL_INT)
    meta: dict[str, Any] = field(default_factory=dict, metadata=JSON_OBJECT)
    words: tuple[Word, ...] = field(default=(), metadata=WORDS)  # v2: finals only
    conf: float | None = field(default=None, metadata=CONFIDENCE)  # v2: finals only

    def to_fields(self) -> dict[str, str]:
        entry = {"v": _VERSION}
        for name, codec in _SCHEMA:
            entry[name] = codec.encode(getattr(self, name))
        return entry

    def to_json(self) -> dict[str, Any]:
        """The event as a JSON object (numbers as numbers, meta as an object; no "v")."""
        return {name: codec.json(getattr(self, name)) for name, codec in _SCHEMA}

    @classmethod
    def from_fields(cls, entry: dict[str, str] | dict[bytes, bytes]) -> TranscriptEvent:
        """Parse a stream entry; raises ValueError naming the bad field."""
        f = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in entry.items()
        }
        if f.get("v") not in READABLE_VERSIONS:
            raise ValueError(
                f"unsupported schema version v={f.get('v')!r}, expected one of {READABLE_VERSIONS}"
            )
        return cls(**{name: codec.decode(name, f.get(name)) for name, codec in _SCHEMA})


_VERSION = str(SCHEMA_VERSION)
_SCHEMA: tuple[tuple[str, Wire], ...] = tuple(
    (spec.name, spec.metadata["wire"]) for spec in fields(TranscriptEvent)
)
# Every stream entry's fields, in order: the schema version first, then the event's fields.
FIELDS: tuple[str, ...] = ("v", *(name for name, _codec in _SCHEMA))
