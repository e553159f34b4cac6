"""Exotel Stream/Voicebot applets: a Twilio clone in snake_case, one track, raw PCM by default.

Wire format: Exotel developer docs "AgentStream WebSocket protocol"; pipecat's Exotel
serializer. `audio/x-raw` payloads are 16-bit little-endian PCM at `media_format.sample_rate`;
media messages name no track (the caller's leg).
"""

from __future__ import annotations

from typing import ClassVar

from callscribe.bridge.forks.base import linear_codec
from callscribe.bridge.forks.mediastream import MediaStreamParser, StartFields

RAW_ENCODINGS = frozenset({"audio/x-raw", "raw", "slin", "base64", "audio/l16"})


class ExotelParser(MediaStreamParser):
    dialect: ClassVar[str] = "exotel"
    sequence_key: ClassVar[str | None] = "sequence_number"
    fields: ClassVar[StartFields] = StartFields(
        call_id="call_sid",
        media_format="media_format",
        rate="sample_rate",
        default_encoding="audio/x-raw",
        parameters="custom_parameters",
        meta=("stream_sid", "account_sid", "from", "to"),
    )

    def codec(self, encoding: str, rate: int) -> str | None:
        name = encoding.split(";", 1)[0].strip().lower()
        if name in RAW_ENCODINGS:
            return linear_codec(rate)
        if name == "audio/x-mulaw":
            return "pcmu"
        return None
