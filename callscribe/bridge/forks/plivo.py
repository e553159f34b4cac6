"""Plivo audio streams (<Stream> XML): the Twilio shape with `streamId`/`callId` names.

Wire format: Plivo "Audio Streaming" as read by pipecat's Plivo serializer and runner.
`audio/x-l16` is taken as little-endian 16-bit PCM (unconfirmed against a Plivo capture).
Custom data arrives as `extra_headers`, a JSON string beside `start`.
"""

from __future__ import annotations

from typing import ClassVar

from callscribe.bridge.forks.base import linear_codec
from callscribe.bridge.forks.mediastream import MediaStreamParser, StartFields


class PlivoParser(MediaStreamParser):
    dialect: ClassVar[str] = "plivo"
    sequence_key: ClassVar[str | None] = "sequenceNumber"
    fields: ClassVar[StartFields] = StartFields(
        call_id="callId",
        media_format="mediaFormat",
        rate="sampleRate",
        default_encoding="audio/x-mulaw",
        parameters="extra_headers",
        meta=("streamId", "accountId"),
    )

    def codec(self, encoding: str, rate: int) -> str | None:
        # contentType may carry the rate too: "audio/x-l16;rate=16000".
        name = encoding.split(";", 1)[0].strip().lower()
        if name == "audio/x-mulaw":
            return "pcmu"
        if name == "audio/x-l16":
            return linear_codec(rate)
        return None
