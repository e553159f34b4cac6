"""What a media-fork parser reports: one small dataclass per thing that happened on the wire.

Every dialect (Asterisk chan_websocket, FreeSWITCH mod_audio_fork/mod_audio_stream, Twilio,
Telnyx, Plivo, Exotel) turns its frames into these events and the shared `AudioReceived`,
`DtmfReceived` and `Dropped` (callscribe.bridge.events), so one endpoint drives them all.
Media stays encoded: `codec` is a callscribe codec name (pcmu, l16-16k, s16le-8k...) and the
endpoint decodes it with `callscribe.codecs`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from callscribe.bridge.events import AudioReceived, Dropped, DtmfReceived


@dataclass(frozen=True, slots=True)
class StreamStarted:
    """The sender said which call this is. Arrives once, before any media event."""

    call_id: str
    meta: dict[str, Any] = field(default_factory=dict)
    # Whether the sender asked to be sent transcripts back on the same socket.
    reply_transcripts: bool = False
    # A shared-secret token carried in the start message (Twilio-family customParameters),
    # for senders that cannot set headers or query parameters on the websocket URL.
    token: str | None = None


@dataclass(frozen=True, slots=True)
class StreamStopped:
    """The sender ended the stream on purpose (stop event, graceful-shutdown frame)."""

    reason: str = "stop"


@dataclass(frozen=True, slots=True)
class RemoteError:
    """The sender reported an error of its own (Telnyx `error`, Asterisk `ERROR`)."""

    message: str


ForkEvent = StreamStarted | AudioReceived | DtmfReceived | StreamStopped | RemoteError | Dropped


class ForkProtocolError(ValueError):
    """The sender broke the protocol so badly that the stream cannot go on (the endpoint
    closes the socket with this message as the reason)."""
