"""Telnyx media streaming: the Twilio shape in snake_case, more codecs, frames not in order.

Wire format: Telnyx "Stream call media over WebSocket" (AsyncAPI). Payloads are RTP payloads
without headers, so L16 is big-endian. "Media frame order is not guaranteed": frames are put
back in `sequence_number` order here.
"""

from __future__ import annotations

from typing import ClassVar

from callscribe.bridge.forks.base import linear_codec
from callscribe.bridge.forks.mediastream import MediaStreamParser, StartFields

FIXED_RATE_ENCODINGS = {"PCMU": "pcmu", "PCMA": "pcma", "G722": "g722", "OPUS": "opus"}


class TelnyxParser(MediaStreamParser):
    dialect: ClassVar[str] = "telnyx"
    sequence_key: ClassVar[str | None] = "sequence_number"
    reorders: ClassVar[bool] = True
    fields: ClassVar[StartFields] = StartFields(
        call_id="call_control_id",
        media_format="media_format",
        rate="sample_rate",
        default_encoding="PCMU",
        parameters="custom_parameters",
        meta=("stream_id", "call_session_id", "from", "to"),
        # The start frame does not list tracks (stream_track is chosen in Call Control).
        tracks=False,
    )

    def codec(self, encoding: str, rate: int) -> str | None:
        if encoding.upper() == "L16":
            return linear_codec(rate, big_endian=True)
        return FIXED_RATE_ENCODINGS.get(encoding.upper())
