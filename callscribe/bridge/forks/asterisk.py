"""Asterisk chan_websocket (Asterisk 20.16+/21.11+/22.6+/23): subprotocol `media`.

Wire format (asterisk `channels/chan_websocket.c`): BINARY frames are raw codec bytes (160 B
of μ-law per 20 ms...); TEXT frames are control events, either plain text
`MEDIA_START connection_id:<id> channel:<name> channel_id:<uniqueid> format:ulaw
optimal_frame_size:160 ptime:20` or, with `control_message_format=json` / the `f(json)` dial
option, `{"event":"MEDIA_START","connection_id":..., "channel_variables":{...}}`.
The channel's own identity is `channel_id`; the call id to publish under can be passed
instead as the URL parameter `call_id` (dial option `v(call_id=...)`) or the channel
variable CALLSCRIBE_CALL_ID (JSON format only).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, ClassVar

from callscribe.bridge.events import AudioReceived, Dropped, DropReason, DtmfReceived
from callscribe.bridge.forks.base import CALLER, ForkParser, linear_codec
from callscribe.bridge.forks.events import (
    ForkEvent,
    ForkProtocolError,
    RemoteError,
    StreamStarted,
)

# Asterisk format names (format_cache.c) → callscribe codec names. slin* is host byte order:
# little-endian on every platform Asterisk ships for.
FORMATS: dict[str, str] = {
    "ulaw": "pcmu",
    "alaw": "pcma",
    "g722": "g722",
    "opus": "opus",
    "slin": linear_codec(8000),
    **{
        f"slin{khz}": linear_codec(rate)
        for khz, rate in (
            ("12", 12000),
            ("16", 16000),
            ("24", 24000),
            ("32", 32000),
            ("44", 44100),
            ("48", 48000),
            ("96", 96000),
            ("192", 192000),
        )
    },
}
# Notifications that need nothing from a transcriber.
IGNORED = frozenset(
    {
        "MEDIA_XON",
        "MEDIA_XOFF",
        "STATUS",
        "QUEUE_DRAINED",
        "MEDIA_BUFFERING_COMPLETED",
        "MEDIA_MARK_PROCESSED",
    }
)


def parse_control(text: str) -> tuple[str, dict[str, Any]]:
    """A control message in either format → (event name, fields)."""
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            message = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise ValueError(f"control message is not JSON: {exc.msg} at position {exc.pos}") from None
        if not isinstance(message, dict) or not isinstance(message.get("event"), str):
            raise ValueError(f"JSON control message needs a string 'event', got {stripped[:80]!r}")
        return message["event"], message
    name, _, rest = stripped.partition(" ")
    if not name:
        raise ValueError("empty control message")
    fields: dict[str, Any] = {}
    # error_text is free text and always comes last; everything else is key:value words.
    rest, _, error_text = rest.partition("error_text:")
    for word in rest.split():
        key, sep, value = word.partition(":")
        if not sep:
            raise ValueError(f"control field {word!r} of {name} is not key:value")
        fields[key] = value
    if error_text:
        fields["error_text"] = error_text.strip()
    return name, fields


class AsteriskWebsocketParser(ForkParser):
    dialect: ClassVar[str] = "asterisk"
    subprotocols: ClassVar[tuple[str, ...]] = ("media",)
    # chan_websocket sends no event at hangup: webchan_hangup() closes the websocket.
    close_is_hangup: ClassVar[bool] = True

    def __init__(self, params: Mapping[str, str] | None = None) -> None:
        super().__init__(params)
        self.leg = self.params.get("leg") or CALLER
        self.codec: str | None = None

    def receive_text(self, text: str) -> list[ForkEvent]:
        try:
            name, fields = parse_control(text)
        except ValueError as exc:
            return [Dropped(DropReason.BAD_CONTROL, f"{exc}: {text[:80]!r}")]
        if name == "MEDIA_START":
            return self._start(fields)
        if name == "DTMF_END":
            digit = str(fields.get("digit", ""))
            if len(digit) != 1:
                return [
                    Dropped(DropReason.BAD_CONTROL, f"DTMF_END digit must be one character, got {digit!r}")
                ]
            if self.codec is None:
                return [Dropped(DropReason.BEFORE_START, "DTMF_END before MEDIA_START")]
            return [DtmfReceived(self.leg, digit.upper())]
        if name == "ERROR":
            return [RemoteError(str(fields.get("error_text", text))[:500])]
        if name in IGNORED:
            return []
        return [Dropped(DropReason.UNKNOWN_EVENT, f"unknown control message {name[:40]!r}")]

    def receive_bytes(self, data: bytes) -> list[ForkEvent]:
        if self.codec is None:
            return [Dropped(DropReason.BEFORE_START, f"{len(data)} media bytes before MEDIA_START")]
        if not data:
            return [Dropped(DropReason.EMPTY, "empty media frame")]
        return [AudioReceived(self.leg, data, self.codec)]

    def _start(self, fields: Mapping[str, Any]) -> list[ForkEvent]:
        if self.codec is not None:
            return [Dropped(DropReason.DUPLICATE_START, "a second MEDIA_START on one connection")]
        fmt = str(fields.get("format", ""))
        codec = FORMATS.get(fmt.lower())
        if codec is None:
            raise ForkProtocolError(f"unsupported Asterisk format {fmt!r}; expected one of {sorted(FORMATS)}")
        variables = fields.get("channel_variables")
        variables = variables if isinstance(variables, dict) else {}
        channel_id = str(fields.get("channel_id") or fields.get("connection_id") or "")
        call_id = self.params.get("call_id") or str(variables.get("CALLSCRIBE_CALL_ID") or "") or channel_id
        if not call_id:
            raise ForkProtocolError("MEDIA_START names no channel_id and the URL has no call_id parameter")
        self.codec = codec
        meta = {
            "source": "asterisk-websocket",
            "channel": str(fields.get("channel", "")),
            "channel_id": channel_id,
            "connection_id": str(fields.get("connection_id", "")),
            "format": fmt,
        }
        return [StreamStarted(call_id, meta)]
