"""The one rule for call ids and leg names, wherever they enter (legs API, WHIP, websocket
forks, AudioSocket, SIP headers, SIPREC metadata, the RTP auto-leg).

Ids end up in Redis keys (`{prefix}:call:{<call_id>}` — a hash tag, so no braces), in URL
paths (`/events/calls/<call_id>` — so no `/`, `?`, `#`, `%`), on the dashboard and in log
lines (so no control characters, spaces or quotes that could forge a line). The allowed set
is URL-unreserved characters plus `:@+=!*`, enough for UUIDs, Twilio SIDs, SIP Call-IDs of
the usual `local@host` form and E.164 numbers.

Pure: no I/O, no asyncio.
"""

from __future__ import annotations

import hashlib
import re
from enum import StrEnum

MAX_ID_LENGTH = 128
ALLOWED_PUNCTUATION = "-._~:@+=!*"
ID_PATTERN = re.compile(rf"[A-Za-z0-9\-._~:@+=!*]{{1,{MAX_ID_LENGTH}}}")
ID_RULE = f"1-{MAX_ID_LENGTH} characters of A-Z a-z 0-9 {ALLOWED_PUNCTUATION}"
_NOT_ALLOWED = re.compile(r"[^A-Za-z0-9\-._~:@+=!*]+")


class IdKind(StrEnum):
    """Which id a refusal is about; the value is the public field name."""

    CALL_ID = "call_id"
    LEG = "leg"


class InvalidId(ValueError):
    """An id breaks the rule. A ValueError, so callers that map ValueError to 400 keep working."""

    def __init__(self, kind: IdKind | str, value: object) -> None:
        self.kind = str(kind)
        self.value = value
        super().__init__(f"{self.kind} {shown(value)} must be {ID_RULE}")


def is_valid_id(value: object) -> bool:
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None


def check_id(kind: IdKind | str, value: object) -> str:
    """`value` when it follows the rule, else InvalidId naming `kind`."""
    if not is_valid_id(value):
        raise InvalidId(kind, value)
    assert isinstance(value, str)
    return value


def derive_id(text: str, fallback: str, prefix: str = "") -> str:
    """An id made from text the sender did not choose as an id (a SIP Call-ID with unusual
    characters, a SIPREC participant's AOR): kept as is when it already follows the rule,
    else its disallowed runs become `_`, cut to length with a short hash so two different
    long texts stay different. Empty text gives `fallback` (which must follow the rule)."""
    if is_valid_id(text):
        return text
    cleaned = _NOT_ALLOWED.sub("_", text).strip("_")
    if not cleaned:
        return check_id("fallback", fallback)
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    room = MAX_ID_LENGTH - len(prefix) - len(digest) - 1
    return f"{prefix}{cleaned[:room]}-{digest}"


def shown(value: object, limit: int = 40) -> str:
    """An untrusted id for a log line or an error message: repr-escaped (newlines, NUL and
    quotes cannot forge a line) and cut to `limit` characters with the full length noted."""
    if not isinstance(value, str):
        return f"<{type(value).__name__}>"
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}… ({len(value)} characters)"
