"""Twilio Media Streams (TwiML <Stream>): camelCase JSON, μ-law 8 kHz, inbound/outbound tracks.

Wire format: Twilio docs "Media Streams - WebSocket Messages"; numbers arrive as strings.
"""

from __future__ import annotations

from typing import ClassVar

from callscribe.bridge.forks.mediastream import MediaStreamParser, StartFields

ENCODINGS = {"audio/x-mulaw": "pcmu", "audio/x-alaw": "pcma"}


class TwilioParser(MediaStreamParser):
    dialect: ClassVar[str] = "twilio"
    sequence_key: ClassVar[str | None] = "sequenceNumber"
    fields: ClassVar[StartFields] = StartFields(
        call_id="callSid",
        media_format="mediaFormat",
        rate="sampleRate",
        default_encoding="audio/x-mulaw",
        parameters="customParameters",
        meta=("streamSid", "accountSid"),
    )

    def codec(self, encoding: str, rate: int) -> str | None:
        return ENCODINGS.get(encoding.lower())
