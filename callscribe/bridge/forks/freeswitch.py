"""FreeSWITCH mod_audio_fork (drachtio) and mod_audio_stream (amigniter): one wire format.

`uuid_audio_fork <uuid> start <url> <mono|mixed|stereo> <8k|16k> [bugname] [metadata]`
connects with subprotocol `audio.drachtio.org` (mod_audio_stream: none, permessage-deflate),
sends the metadata string verbatim as the first TEXT frame, then BINARY frames of raw L16
little-endian PCM of varying size; stereo interleaves L = read (caller) and R = write (agent).
A zero-length BINARY frame means "graceful shutdown: send your final responses now".

Nothing on the wire says the call id, the mix or the rate, so they come from the URL query
(`?call_id=<uuid>&mix=stereo&rate=16k`) or from a JSON metadata object
(`{"call_id": "<uuid>", "mix": "stereo", "rate": 16000, "transcripts": true}`);
`transcripts` asks for `{"type":"transcription","data":{...}}` replies on the socket.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from callscribe.bridge.events import AudioReceived, Dropped, DropReason, DtmfReceived
from callscribe.bridge.forks.base import AGENT, CALLER, ForkParser, linear_codec, parse_rate
from callscribe.bridge.forks.events import (
    ForkEvent,
    ForkProtocolError,
    StreamStarted,
    StreamStopped,
)

MIXES = {"mono": 1, "mixed": 1, "stereo": 2}
CALL_ID_KEYS = ("call_id", "callId", "uuid", "call_uuid", "callSid")
MIX_KEYS = ("mix", "mix_type", "mixType")
RATE_KEYS = ("rate", "sample_rate", "sampleRate", "sampling_rate")
REPLY_KEYS = ("transcripts", "send_transcripts", "sendTranscripts")
UUID_TEXT = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})


def first(source: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        if source.get(key) not in (None, ""):
            return source[key]
    return None


def truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str | int) and str(value).lower() in TRUE_WORDS)


class FreeswitchParser(ForkParser):
    dialect: ClassVar[str] = "freeswitch"
    subprotocols: ClassVar[tuple[str, ...]] = ("audio.drachtio.org",)

    def __init__(self, params: Mapping[str, str] | None = None) -> None:
        super().__init__(params)
        self.started: StreamStarted | None = None
        self.channels = 1
        self.legs: tuple[str, ...] = ()
        self.codec = ""
        self.stopped = False
        self._remainder = b""

    def receive_text(self, text: str) -> list[ForkEvent]:
        if self.started is None:
            return self._start(text)
        return self._later_text(text)

    def receive_bytes(self, data: bytes) -> list[ForkEvent]:
        events: list[ForkEvent] = []
        if self.started is None:
            events = self._start(None)
        if self.stopped:
            return [
                *events,
                Dropped(DropReason.AFTER_STOP, f"{len(data)} bytes after the graceful-shutdown frame"),
            ]
        if not data:
            self.stopped = True
            return [*events, StreamStopped("graceful")]
        # Frames carry whole samples in practice; a split sample is carried to the next frame.
        data = self._remainder + data
        frame = 2 * self.channels
        usable = len(data) - len(data) % frame
        self._remainder = data[usable:]
        if usable == 0:
            return events
        if self.channels == 1:
            return [*events, AudioReceived(self.legs[0], data[:usable], self.codec)]
        samples = np.frombuffer(data[:usable], dtype="<i2").reshape(-1, 2)
        return [
            *events,
            *(
                AudioReceived(leg, np.ascontiguousarray(samples[:, channel]).tobytes(), self.codec)
                for channel, leg in enumerate(self.legs)
            ),
        ]

    def _start(self, metadata: str | None) -> list[ForkEvent]:
        settings: dict[str, Any] = dict(self.params)
        meta: dict[str, Any] = {"source": "freeswitch"}
        if metadata is not None:
            parsed = _json_object(metadata)
            if parsed is not None:
                settings.update({k: v for k, v in parsed.items() if v not in (None, "")})
                meta["metadata"] = parsed
            else:
                meta["metadata"] = metadata
                if UUID_TEXT.match(metadata.strip()) and "call_id" not in self.params:
                    settings["call_id"] = metadata.strip()
        mix = str(first(settings, MIX_KEYS) or "mono").lower()
        if mix not in MIXES:
            raise ForkProtocolError(f"mix {mix!r} must be one of mono, mixed, stereo")
        rate_value = first(settings, RATE_KEYS)
        try:
            rate = parse_rate(str(rate_value)) if rate_value is not None else 8000
        except ValueError as exc:
            raise ForkProtocolError(str(exc)) from None
        call_id = first(settings, CALL_ID_KEYS)
        if call_id is None:
            # Without an id the audio is still transcribed; the id says it was made up.
            call_id = f"freeswitch-{uuid.uuid4()}"
            meta["call_id_generated"] = True
        self.channels = MIXES[mix]
        self.codec = linear_codec(rate)
        if mix == "stereo":
            self.legs = (CALLER, AGENT)
        else:
            self.legs = (str(settings.get("leg") or (CALLER if mix == "mono" else "mixed")),)
        meta.update({"mix": mix, "rate": rate})
        self.started = StreamStarted(
            str(call_id), meta, reply_transcripts=truthy(first(settings, REPLY_KEYS))
        )
        return [self.started]

    def _later_text(self, text: str) -> list[ForkEvent]:
        """`uuid_audio_fork send_text` frames; a `{"event": "dtmf", "digit": "5"}` is a key press."""
        message = _json_object(text)
        if message is None:
            return []
        kind = message.get("event") or message.get("type")
        if kind != "dtmf":
            return []
        digit = message.get("digit")
        if not isinstance(digit, str) or len(digit) != 1:
            return [Dropped(DropReason.BAD_SHAPE, f"dtmf digit must be one character, got {digit!r}")]
        duration = message.get("duration", 0)
        duration_ms = duration if isinstance(duration, int) and not isinstance(duration, bool) else 0
        return [DtmfReceived(self.legs[0], digit.upper(), max(0, duration_ms))]


def _json_object(text: str) -> dict[str, Any] | None:
    if not text.lstrip().startswith("{"):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None
