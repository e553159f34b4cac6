"""What the RTP ingest offers to signalling (SIP, SIPREC, POST /v1/legs): a leg with its own
port, and its release. An interface module so that the SIP session logic needs no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from callscribe.bridge.events import EndReason


@dataclass(frozen=True, slots=True)
class ReservedLeg:
    leg_id: str
    rtp_host: str
    rtp_port: int


class RtpPorts(Protocol):
    async def reserve(
        self,
        call_id: str,
        leg: str,
        codec: str,
        meta: dict[str, Any] | None = None,
        payload_types: dict[int, str] | None = None,
        owner: str | None = None,
    ) -> ReservedLeg: ...

    async def release(self, leg_id: str, reason: EndReason = EndReason.RELEASED) -> object: ...
