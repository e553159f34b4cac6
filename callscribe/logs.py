"""Logging set-up: one line per record, plain text for terminals or JSON for log shippers.

Lines about a call carry `call_id` and `leg` as JSON fields. They come from, in order: the
record's `extra={"call_id": ..., "leg": ...}`, the `call_context()` of the task that logs, or
the `call_id=… leg=…` words of the message (the house style of every log line about a call;
ids follow callscribe.ids, so they hold no spaces and the words parse back exactly).
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import logging
import re
import sys
from collections.abc import Iterator

# (call_id, leg) of the call the current task works for; set with call_context().
_CALL: contextvars.ContextVar[tuple[str, str | None] | None] = contextvars.ContextVar(
    "callscribe_log_call", default=None
)
_WORDS = re.compile(r"\b(call_id|leg)=([^\s,;()\[\]]+)")
# Control characters in a message (an id or a peer's text) must not start a forged line.
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]")

# Libraries that log every request or ICE check at INFO; their warnings still show.
NOISY_LOGGERS = ("aioice", "aiortc", "uvicorn.access", "httpx", "httpcore")


@contextlib.contextmanager
def call_context(call_id: str, leg: str | None = None) -> Iterator[None]:
    """Every line logged inside (and in tasks created inside) names this call and leg."""
    token = _CALL.set((call_id, leg))
    try:
        yield
    finally:
        _CALL.reset(token)


def call_fields(record: logging.LogRecord, message: str) -> dict[str, str]:
    """The call_id/leg a record is about, if any."""
    fields: dict[str, str] = {}
    for name in ("call_id", "leg"):
        value = getattr(record, name, None)
        if isinstance(value, str) and value:
            fields[name] = value
    current = _CALL.get()
    if current is not None:
        fields.setdefault("call_id", current[0])
        if current[1]:
            fields.setdefault("leg", current[1])
    for name, value in _WORDS.findall(message):
        fields.setdefault(name, value)
    return fields


def escape_controls(text: str) -> str:
    return _CONTROL.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        # ISO 8601 with milliseconds and the UTC offset: sortable and unambiguous across hosts.
        ts = datetime.datetime.fromtimestamp(record.created).astimezone()
        entry: dict[str, object] = {
            "ts": ts.isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": message,
            **call_fields(record, message),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class TextFormatter(logging.Formatter):
    """Plain lines; control characters in the message are escaped so one record stays one line."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


def configure_logging(level: str = "info", as_json: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if as_json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
