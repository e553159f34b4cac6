"""Transcript events, schema version 2 (docs/contract-v2.md).

Every event becomes one Redis Stream entry of flat string fields. Consumers dedupe on
(call_id, leg, seq); `seq` is monotonic per leg (call-level events use leg "").
Version 2 only adds fields (`words`, `conf`) to version 1, so `from_fields` reads both.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
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


FIELDS = (
    "v",
    "type",
    "call_id",
    "leg",
    "seq",
    "utt",
    "text",
    "stable",
    "unstable",
    "start_ms",
    "end_ms",
    "ts",
    "lang",
    "engine",
    "latency_ms",
    "meta",
    "words",
    "conf",
)


class Word(TypedDict):
    """One recognised word of a final; times in ms from the leg's first sample."""

    w: str
    start_ms: int
    end_ms: int
    conf: float


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True)
class TranscriptEvent:
    """One published event. Optional numbers are None when they do not apply and
    are written as empty strings, so every entry carries every field of the schema."""

    type: EventType
    call_id: str
    leg: str = ""
    seq: int = 0
    utt: int | None = None
    text: str = ""
    stable: str = ""
    unstable: str = ""
    start_ms: int | None = None
    end_ms: int | None = None
    ts: int = field(default_factory=now_ms)
    lang: str = ""
    engine: str = ""
    latency_ms: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    words: tuple[Word, ...] = ()
    conf: float | None = None

    def to_fields(self) -> dict[str, str]:
        def num(value: int | None) -> str:
            return "" if value is None else str(value)

        return {
            "v": str(SCHEMA_VERSION),
            "type": str(self.type),
            "call_id": self.call_id,
            "leg": self.leg,
            "seq": str(self.seq),
            "utt": num(self.utt),
            "text": self.text,
            "stable": self.stable,
            "unstable": self.unstable,
            "start_ms": num(self.start_ms),
            "end_ms": num(self.end_ms),
            "ts": str(self.ts),
            "lang": self.lang,
            "engine": self.engine,
            "latency_ms": num(self.latency_ms),
            "meta": json.dumps(self.meta, separators=(",", ":"), sort_keys=True),
            "words": json.dumps(list(self.words), separators=(",", ":")),
            "conf": "" if self.conf is None else f"{self.conf:.3f}",
        }

    @classmethod
    def from_fields(cls, fields: dict[str, str] | dict[bytes, bytes]) -> TranscriptEvent:
        """Parse a stream entry; raises ValueError naming the bad field."""
        f = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in fields.items()
        }
        if f.get("v") not in READABLE_VERSIONS:
            raise ValueError(
                f"unsupported schema version v={f.get('v')!r}, expected one of {READABLE_VERSIONS}"
            )

        def opt(name: str) -> int | None:
            raw = f.get(name, "")
            try:
                return int(raw) if raw != "" else None
            except ValueError:
                raise ValueError(f"field {name}={raw!r} is not an integer") from None

        try:
            kind = EventType(f["type"])
        except (KeyError, ValueError):
            raise ValueError(f"unknown event type {f.get('type')!r}") from None
        return cls(
            type=kind,
            call_id=f.get("call_id", ""),
            leg=f.get("leg", ""),
            seq=opt("seq") or 0,
            utt=opt("utt"),
            text=f.get("text", ""),
            stable=f.get("stable", ""),
            unstable=f.get("unstable", ""),
            start_ms=opt("start_ms"),
            end_ms=opt("end_ms"),
            ts=opt("ts") or 0,
            lang=f.get("lang", ""),
            engine=f.get("engine", ""),
            latency_ms=opt("latency_ms"),
            meta=json.loads(f.get("meta") or "{}"),
            words=_words(f.get("words") or "[]"),
            conf=_conf(f.get("conf", "")),
        )


def _words(raw: str) -> tuple[Word, ...]:
    try:
        items = json.loads(raw)
        return tuple(
            Word(w=str(i["w"]), start_ms=int(i["start_ms"]), end_ms=int(i["end_ms"]), conf=float(i["conf"]))
            for i in items
        )
    except (ValueError, TypeError, KeyError):
        raise ValueError(f"field words={raw[:80]!r} is not a list of {{w,start_ms,end_ms,conf}}") from None


def _conf(raw: str) -> float | None:
    try:
        return float(raw) if raw != "" else None
    except ValueError:
        raise ValueError(f"field conf={raw!r} is not a number") from None
