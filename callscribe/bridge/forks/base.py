"""The one interface every media-fork dialect implements (sans-IO: frames in, events out)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from enum import IntEnum
from typing import ClassVar

from callscribe.bridge.events import CALLER
from callscribe.bridge.forks.events import ForkEvent

__all__ = ["AGENT", "CALLER", "CloseCode", "ForkParser", "fork_transport", "linear_codec", "parse_rate"]

AGENT = "agent"


class CloseCode(IntEnum):
    """Websocket close codes a fork ends with (RFC 6455 §7.4.1)."""

    NORMAL = 1000
    PROTOCOL_ERROR = 1002
    UNSUPPORTED = 1003
    POLICY = 1008  # refused: source, token, leg conflict
    TRY_LATER = 1013  # refused for now: capacity, connections per source
    # Reported, never sent: no code in the peer's close frame, or (uvicorn reports 1005 for this
    # too once the handshake is done) the connection dropped without a close frame.
    NO_STATUS = 1005
    ABNORMAL = 1006


def fork_transport(dialect: str) -> str:
    """The `transport` metrics label of a fork dialect."""
    return f"ws-{dialect}"


class ForkParser(ABC):
    """One websocket connection's worth of protocol state.

    `params` are the query parameters of the URL the sender connected to: senders that carry
    no call identity or audio format on the wire (FreeSWITCH, Asterisk) are told them there
    (`call_id`, `leg`, `rate`, `mix`). The endpoint feeds every text and binary message in
    arrival order and calls `finish()` once when the socket ends.
    """

    dialect: ClassVar[str]
    # Websocket subprotocols this dialect speaks; the endpoint echoes the first one offered.
    subprotocols: ClassVar[tuple[str, ...]] = ()
    # Whether the start message can carry the auth token (for senders that cannot set headers).
    in_band_token: ClassVar[bool] = False
    # Whether the sender hangs up by closing the socket (no stop message in the protocol): a
    # close frame from it then ends the legs as "hangup", a dropped connection as "disconnect".
    close_is_hangup: ClassVar[bool] = False

    def __init__(self, params: Mapping[str, str] | None = None) -> None:
        self.params: Mapping[str, str] = params or {}

    @property
    def transport(self) -> str:
        """The `transport` label of this dialect's metrics."""
        return fork_transport(self.dialect)

    @abstractmethod
    def receive_text(self, text: str) -> list[ForkEvent]: ...

    @abstractmethod
    def receive_bytes(self, data: bytes) -> list[ForkEvent]: ...

    def finish(self) -> list[ForkEvent]:
        """Events still held back (reordering buffers) when the socket ends."""
        return []


def linear_codec(rate: int, big_endian: bool = False) -> str:
    """The callscribe codec name of 16-bit linear PCM at `rate` (l16-* is big-endian, as on RTP)."""
    if rate <= 0:
        raise ValueError(f"sample rate must be positive, got {rate}")
    # The registry's names truncate to whole kHz: 44100 Hz is "44k".
    return f"{'l16' if big_endian else 's16le'}-{rate // 1000}k"


def parse_rate(text: str) -> int:
    """'8k' / '16k' / '8000' (as uuid_audio_fork and URL parameters write them) → Hz."""
    value = text.strip().lower()
    try:
        rate = round(float(value[:-1]) * 1000) if value.endswith("k") else int(value)
    except ValueError:
        raise ValueError(f"sample rate {text!r} is not a number like 8000 or 16k") from None
    if not 8000 <= rate <= 192000:
        raise ValueError(f"sample rate {text!r} is outside 8000-192000 Hz")
    return rate
