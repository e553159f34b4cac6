"""What the SIP UAS core reports to the application: one small dataclass per event."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from callscribe.bridge.events import Dropped
from callscribe.bridge.sip.message import Peer, SipRequest


class DialogEndReason(StrEnum):
    """Why the core ended a dialog (logged by the session; legs end `released`)."""

    BYE = "bye"  # the peer sent BYE
    NO_ACK = "no_ack"  # no ACK for our 2xx within 64*T1 (RFC 3261 §13.3.1.4): we sent BYE
    NO_CODEC = "no_codec"  # the answer in the ACK offers no codec we decode: we sent BYE
    SHUTDOWN = "shutdown"  # the service is stopping: we sent BYE


@dataclass(frozen=True)
class InviteReceived:
    """An INVITE for the application to answer with `UasCore.respond(txn_id, ...)`.
    `dialog_id` is None for a new call and set for a re-INVITE."""

    txn_id: str
    request: SipRequest
    peer: Peer
    dialog_id: str | None


@dataclass(frozen=True)
class AckReceived:
    dialog_id: str
    request: SipRequest


@dataclass(frozen=True)
class InviteCancelled:
    """CANCEL arrived before the final response: the core already sent 487."""

    txn_id: str


@dataclass(frozen=True)
class DialogEnded:
    dialog_id: str
    reason: DialogEndReason


# A message the core could not act on is reported as the shared `Dropped`.
SipEvent = InviteReceived | AckReceived | InviteCancelled | DialogEnded | Dropped
