"""SIP calls and SIPREC recording sessions → legs: admission, SDP answers, RTP ports.

`SipCallHandler` is what the UAS core's events mean for callscribe. An initial INVITE passes
the allow-list, digest authentication and the capacity check, then gets one RTP port per
accepted m-line from the RTP ingest (`rtp.reserve`, which opens the leg) and a 200 with the
SDP answer. A re-INVITE changes hold state, codecs, m-lines or SIPREC metadata of the same
session; BYE, CANCEL and a missing ACK release the ports (closing the legs, which publishes
their last finals).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from callscribe.bridge.events import CALLER, DropReason, EndReason
from callscribe.bridge.limits import AtCapacity, LegConflict
from callscribe.bridge.rtp.ports import ReservedLeg, RtpPorts
from callscribe.bridge.sip.auth import AuthVerdict, DigestAuthenticator
from callscribe.bridge.sip.events import (
    AckReceived,
    DialogEnded,
    DialogEndReason,
    InviteCancelled,
    InviteReceived,
)
from callscribe.bridge.sip.message import SipRequest
from callscribe.bridge.sip.sdp import (
    MediaAnswer,
    SdpError,
    SessionDescription,
    build_answer,
    build_offer,
    offered_payload_types,
    parse_sdp,
    select_media,
)
from callscribe.bridge.sip.siprec import (
    RecordedStream,
    RecordingMetadata,
    SiprecError,
    parse_siprec_body,
    recorded_streams,
)
from callscribe.bridge.sip.uas import UasCore
from callscribe.ids import ID_RULE, derive_id, is_valid_id, shown
from callscribe.ingest_options import OPTIONS, SIP_HEADER_PREFIX
from callscribe.metrics import Metrics
from callscribe.security import AccessPolicy
from callscribe.settings import Settings

log = logging.getLogger(__name__)

TRANSPORT = "sip"
INGEST_OPTION_HEADERS = tuple(SIP_HEADER_PREFIX + name for name in OPTIONS)
ACCEPTED_BODIES = "application/sdp, multipart/mixed, application/rs-metadata+xml"
PLAIN_CALL_LEG = CALLER
# A PBX forking each side of a call as its own SIP call (Asterisk ChanSpy, FreeSWITCH
# eavesdrop) names the side and joins them into one callscribe call with these headers.
LEG_HEADER = "X-Callscribe-Leg"
CALL_ID_HEADER = "X-Callscribe-Call-ID"


# What a dialog's end means for its legs: the peer's BYE is a hangup like any other ingest's.
LEG_END_REASONS = {
    DialogEndReason.BYE: EndReason.HANGUP,
    DialogEndReason.NO_ACK: EndReason.PROTOCOL_ERROR,
    DialogEndReason.NO_CODEC: EndReason.PROTOCOL_ERROR,
    DialogEndReason.SHUTDOWN: EndReason.SHUTDOWN,
}


class Rejected(Exception):
    """An INVITE we answer with a final error response."""

    def __init__(self, status: int, reason: str | None = None, headers: list[tuple[str, str]] | None = None):
        super().__init__(f"{status} {reason or ''}".strip())
        self.status = status
        self.reason = reason
        self.headers = headers or []


@dataclass
class StreamState:
    """One m-line of a session and the leg behind it (None when rejected)."""

    leg: str
    reserved: ReservedLeg | None
    payload_types: dict[int, str]
    participant: dict[str, str] | None = None


@dataclass
class SipSession:
    call_id: str
    siprec: bool
    meta: dict[str, Any]
    streams: list[StreamState] = field(default_factory=list)
    sdp_session_id: str = field(default_factory=lambda: str(secrets.randbelow(2**31)))
    sdp_version: int = 0
    last_answer: bytes = b""
    dialog_id: str | None = None
    our_offer: SessionDescription | None = None
    leg: str = PLAIN_CALL_LEG
    owner: str | None = None  # the INVITE's source host: the call's legs belong to it


class SipCallHandler:
    def __init__(
        self,
        settings: Settings,
        core: UasCore,
        rtp: RtpPorts,
        metrics: Metrics,
        policy: AccessPolicy,
        flush: Callable[[], None],
        clock: Callable[[], float],
        leg_open: Callable[[str], bool] = lambda leg_id: True,
    ) -> None:
        self.settings = settings
        self.core = core
        self.rtp = rtp
        self.metrics = metrics
        self._flush = flush
        self._clock = clock
        # The RTP side may end a leg on its own (idle timeout during a long hold).
        self._leg_open = leg_open
        self.sessions: dict[str, SipSession] = {}  # dialog id → session
        self._setting_up: dict[str, SipSession | None] = {}  # INVITE txn id → session being set up
        self._policy = policy
        self._auth: DigestAuthenticator | None = None
        if policy.sip_auth_user:
            self._auth = DigestAuthenticator(policy.sip_auth_realm, policy.sip_auth_user, policy.sip_password)
        self.public_host = settings.sip_public_host or settings.rtp_public_host or settings.sip_host

    @property
    def active_calls(self) -> int:
        return len(self.sessions) + len(self._setting_up)

    def _respond(
        self,
        txn_id: str,
        status: int,
        reason: str | None = None,
        headers: list[tuple[str, str]] | None = None,
        body: bytes = b"",
        content_type: str | None = None,
    ) -> str | None:
        if not self.core.pending(txn_id):
            return None  # cancelled or timed out meanwhile
        dialog_id = self.core.respond(
            txn_id, status, reason, headers or [], body, content_type, now=self._clock()
        )
        self._flush()
        return dialog_id

    # -- initial INVITE -----------------------------------------------------------------

    async def on_invite(self, event: InviteReceived) -> None:
        try:
            if event.dialog_id is None:
                await self._new_session(event)
            else:
                await self._update_session(event)
        except Rejected as rejection:
            self._respond(event.txn_id, rejection.status, rejection.reason, rejection.headers)
        except Exception:
            log.exception("INVITE handling failed call_id=%s", event.request.call_id)
            self._respond(event.txn_id, 500)

    def _admit(self, event: InviteReceived) -> None:
        host = event.peer.host
        if not self._policy.sip_source_allowed(host):
            self.metrics.legs_refused.labels(reason="sip_not_allowed").inc()
            which = "sip_allow_networks" if self._policy.source_allowed(host) else "allow_networks"
            # Info, not warning: SIP scanners knock on public 5060 all day long.
            log.info("SIP INVITE from %s refused: not in %s", host, which)
            raise Rejected(403, f"Forbidden ({host} is not in {which})")
        if self._auth is not None:
            verdict = self._auth.check(event.request, self._clock_wall())
            if verdict is not AuthVerdict.OK:
                raise Rejected(
                    401,
                    headers=[self._auth.challenge(self._clock_wall(), stale=verdict is AuthVerdict.STALE)],
                )
        if self.active_calls >= self.settings.max_calls:
            self.metrics.legs_refused.labels(reason="sip_capacity").inc()
            raise Rejected(
                503,
                f"Service Unavailable (max_calls={self.settings.max_calls} reached)",
                [("Retry-After", str(self.settings.sip_retry_after_sec))],
            )

    @staticmethod
    def _clock_wall() -> float:
        return time.time()

    def _session_meta(self, request: SipRequest, metadata: RecordingMetadata | None) -> dict[str, Any]:
        sip: dict[str, str] = {
            "call_id": request.call_id,
            "from": request.headers.get("from") or "",
            "to": request.headers.get("to") or "",
        }
        # x-callscribe-*: per-call options (callscribe.ingest_options).
        for name in ("user-agent", "p-asserted-identity", "x-call-id", *INGEST_OPTION_HEADERS):
            value = request.headers.get(name)
            if value:
                sip[name] = value
        meta: dict[str, Any] = {"sip": sip, "original_call_id": request.call_id}
        if metadata is not None:
            meta.update(metadata.as_meta())
        return meta

    async def _new_session(self, event: InviteReceived) -> None:
        if not self.core.pending(event.txn_id):
            return  # CANCEL arrived before we started
        self._admit(event)
        request = event.request
        session = SipSession(call_id=request.call_id, siprec=False, meta={}, owner=event.peer.host)
        session.call_id, session.leg = self._chosen_names(request)
        self._setting_up[event.txn_id] = session
        try:
            if not request.body:
                await self._late_offer(event, session)
                return
            offer, metadata = self._parse_offer(request, session)
            session.meta = self._session_meta(request, metadata)
            selected = select_media(offer)
            if not any(choice.codec for choice in selected):
                raise Rejected(488, "Not Acceptable Here (no PCMU, PCMA, G722 or opus audio offered)")
            names = self._leg_names(offer, metadata, session)
            await self._apply_offer(session, offer, selected, names)
            if not self.core.pending(event.txn_id):
                await self._release(session)  # CANCEL won the race
                return
            body = self._answer(session, offer, selected)
            session.dialog_id = self._respond(event.txn_id, 200, body=body, content_type="application/sdp")
            if session.dialog_id is None:
                await self._release(session)
                return
            self.sessions[session.dialog_id] = session
        except BaseException:
            await self._release(session)
            raise
        finally:
            self._setting_up.pop(event.txn_id, None)

    def _full(self, exc: Exception) -> Rejected:
        return Rejected(
            503,
            f"Service Unavailable ({exc})"[:160],
            [("Retry-After", str(self.settings.sip_retry_after_sec))],
        )

    @staticmethod
    def _chosen_names(request: SipRequest) -> tuple[str, str]:
        """(call id, leg name) for events: the SIP Call-ID and "caller" unless the sender
        names them (LEG_HEADER / CALL_ID_HEADER)."""
        chosen = request.headers.get(CALL_ID_HEADER)
        leg = request.headers.get(LEG_HEADER) or PLAIN_CALL_LEG
        for header, value in ((CALL_ID_HEADER, chosen), (LEG_HEADER, leg)):
            if value is not None and not is_valid_id(value):
                why = f"{header} {shown(value)} breaks the id rule: {ID_RULE}"
                raise Rejected(400, f"Bad Request ({why})"[:200])
        if chosen:
            return chosen, leg
        # A Call-ID is whatever the sender made it: one outside the id rule is not refused but
        # turned into a valid id (the original stays in the call's meta as original_call_id).
        if len(request.call_id) > 1024:
            raise Rejected(400, f"Bad Request (Call-ID of {len(request.call_id)} characters)")
        return derive_id(request.call_id, "sip-call", prefix="sip-"), leg

    def _parse_offer(
        self, request: SipRequest, session: SipSession
    ) -> tuple[SessionDescription, RecordingMetadata | None]:
        content_type = request.headers.get("content-type") or ""
        kind = request.content_type
        try:
            if kind == "multipart/mixed":
                siprec = parse_siprec_body(content_type, request.body)
                session.siprec = True
                return parse_sdp(siprec.sdp), siprec.metadata
            if kind == "application/sdp":
                session.siprec = session.siprec or "siprec" in [
                    r.lower() for r in request.headers.values("require")
                ]
                return parse_sdp(request.body), None
        except (SdpError, SiprecError) as exc:
            self.metrics.drop(TRANSPORT, DropReason.BAD_BODY)
            raise Rejected(400, f"Bad Request ({exc})"[:160]) from None
        raise Rejected(415, headers=[("Accept", ACCEPTED_BODIES)])

    def _leg_names(
        self, offer: SessionDescription, metadata: RecordingMetadata | None, session: SipSession
    ) -> list[RecordedStream]:
        if session.siprec:
            return recorded_streams(offer, metadata)
        streams = []
        for index, media in enumerate(offer.media):
            name = session.leg if index == 0 else f"{session.leg}-{index + 1}"
            streams.append(RecordedStream(index, name, media.label, None))
        return streams

    async def _apply_offer(
        self,
        session: SipSession,
        offer: SessionDescription,
        selected: list[MediaAnswer],
        names: list[RecordedStream],
    ) -> None:
        """Make session.streams match the offer: keep legs whose name and codecs still fit,
        release the rest, reserve ports for new or changed m-lines."""
        for index, (choice, named) in enumerate(zip(selected, names, strict=True)):
            current = session.streams[index] if index < len(session.streams) else None
            wanted = choice.codec is not None
            if current is not None and current.reserved is not None:
                fits = (
                    wanted
                    and self._leg_open(current.reserved.leg_id)
                    and current.leg == named.leg
                    and set(choice.payload_types.items()) <= set(current.payload_types.items())
                )
                if fits:
                    continue
                await self.rtp.release(current.reserved.leg_id)
                current.reserved = None
            participant = named.participant.as_meta() if named.participant else None
            state = StreamState(named.leg, None, dict(choice.payload_types), participant)
            if wanted and choice.codec is not None:
                meta = dict(session.meta)
                meta.update({"label": choice.label, "codec": choice.codec, "m_line": index})
                if participant:
                    meta["participant"] = participant
                try:
                    state.reserved = await self.rtp.reserve(
                        session.call_id,
                        named.leg,
                        choice.codec,
                        meta,
                        payload_types=dict(choice.payload_types),
                        owner=session.owner,
                    )
                except AtCapacity as exc:
                    raise self._full(exc) from None
                except LegConflict as exc:
                    raise Rejected(488, f"Not Acceptable Here ({exc})"[:160]) from None
                except ValueError as exc:  # a call id or leg name the registry refuses (InvalidId)
                    self.metrics.drop(TRANSPORT, DropReason.INVALID_ID)
                    raise Rejected(400, f"Bad Request ({exc})"[:160]) from None
            if index < len(session.streams):
                session.streams[index] = state
            else:
                session.streams.append(state)
        for extra in session.streams[len(selected) :]:
            if extra.reserved is not None:
                await self.rtp.release(extra.reserved.leg_id)
        del session.streams[len(selected) :]

    def _answer(self, session: SipSession, offer: SessionDescription, selected: list[MediaAnswer]) -> bytes:
        ports = [s.reserved.rtp_port if s.reserved else None for s in session.streams]
        address = self._media_address(session)
        answer = build_answer(offer, selected, ports, address, session.sdp_session_id, session.sdp_version)
        body = answer.serialize()
        if session.last_answer and _without_origin(body) != _without_origin(session.last_answer):
            # RFC 3264 §8: a changed answer carries a higher o= version.
            session.sdp_version += 1
            answer.session_version = session.sdp_version
            body = answer.serialize()
        session.last_answer = body
        return body

    def _media_address(self, session: SipSession) -> str:
        for stream in session.streams:
            if stream.reserved is not None and stream.reserved.rtp_host not in ("0.0.0.0", "::", ""):
                return self.settings.rtp_public_host or stream.reserved.rtp_host
        return self.settings.rtp_public_host or self.public_host

    async def _late_offer(self, event: InviteReceived, session: SipSession) -> None:
        """INVITE without SDP: offer every codec in the 200, expect the answer in the ACK."""
        session.meta = self._session_meta(event.request, None)
        probe = build_offer(0, self.public_host, session.sdp_session_id, self.settings.dtmf_payload_type)
        payload_types = offered_payload_types(probe)
        meta = dict(session.meta, codec="pcmu", m_line=0)
        try:
            reserved = await self.rtp.reserve(
                session.call_id, session.leg, "pcmu", meta, payload_types=payload_types, owner=session.owner
            )
        except AtCapacity as exc:
            raise self._full(exc) from None
        session.streams.append(StreamState(session.leg, reserved, payload_types))
        offer = build_offer(
            reserved.rtp_port,
            self._media_address(session),
            session.sdp_session_id,
            self.settings.dtmf_payload_type,
        )
        session.our_offer = offer
        if not self.core.pending(event.txn_id):
            await self._release(session)
            return
        session.last_answer = offer.serialize()
        session.dialog_id = self._respond(
            event.txn_id, 200, body=session.last_answer, content_type="application/sdp"
        )
        if session.dialog_id is None:
            await self._release(session)
            return
        self.sessions[session.dialog_id] = session

    # -- re-INVITE ------------------------------------------------------------------------

    async def _update_session(self, event: InviteReceived) -> None:
        session = self.sessions.get(event.dialog_id or "")
        if session is None:
            raise Rejected(481)
        request = event.request
        if not request.body:
            # RFC 3261 §14.2: re-INVITE without an offer → our current description as the offer.
            self._respond(event.txn_id, 200, body=session.last_answer, content_type="application/sdp")
            return
        offer, metadata = self._parse_offer(request, session)
        if metadata is not None:
            session.meta.update(metadata.as_meta())
        selected = select_media(offer)
        if not any(choice.codec for choice in selected):
            raise Rejected(488, "Not Acceptable Here (no PCMU, PCMA, G722 or opus audio offered)")
        names = self._leg_names(offer, metadata, session) if metadata or not session.siprec else None
        if names is None:
            # Metadata unchanged: keep the names the legs already have.
            names = [
                RecordedStream(
                    i,
                    session.streams[i].leg if i < len(session.streams) else f"stream-{i + 1}",
                    m.label,
                    None,
                )
                for i, m in enumerate(offer.media)
            ]
        await self._apply_offer(session, offer, selected, names)
        body = self._answer(session, offer, selected)
        self._respond(event.txn_id, 200, body=body, content_type="application/sdp")

    # -- the rest of the dialog -------------------------------------------------------------

    async def on_ack(self, event: AckReceived) -> None:
        session = self.sessions.get(event.dialog_id)
        if session is None or session.our_offer is None or not event.request.body:
            return
        # The answer to our late offer: its payload types may renumber ours.
        try:
            answer = parse_sdp(event.request.body)
        except SdpError:
            self.metrics.drop(TRANSPORT, DropReason.BAD_ACK_SDP)
            return
        selected = select_media(answer)
        if not selected or selected[0].codec is None:
            await self.on_ended(DialogEnded(event.dialog_id, DialogEndReason.NO_CODEC))
            self.core.end_dialog(event.dialog_id)
            self._flush()
            return
        stream = session.streams[0]
        if stream.reserved is not None and not set(selected[0].payload_types.items()) <= set(
            stream.payload_types.items()
        ):
            names = [RecordedStream(0, session.leg, None, None)]
            session.streams[0].payload_types = {}
            await self._apply_offer(session, answer, selected[:1], names)
        session.our_offer = None

    def on_cancel(self, event: InviteCancelled) -> None:
        log.info("INVITE cancelled txn=%s", event.txn_id)

    async def on_ended(self, event: DialogEnded) -> None:
        session = self.sessions.pop(event.dialog_id, None)
        if session is not None:
            log.info("SIP session ended call_id=%s reason=%s", session.call_id, event.reason)
            await self._release(session, LEG_END_REASONS[event.reason])

    async def _release(self, session: SipSession, reason: EndReason = EndReason.RELEASED) -> None:
        for stream in session.streams:
            if stream.reserved is not None:
                reserved, stream.reserved = stream.reserved, None
                try:
                    await self.rtp.release(reserved.leg_id, reason)
                except Exception:  # one failing release must not keep the others open
                    log.exception("releasing leg %s failed", reserved.leg_id)

    async def close(self) -> None:
        """Hang up every session (BYE) and release its legs: the service is stopping."""
        for dialog_id in list(self.sessions):
            self.core.end_dialog(dialog_id)
            await self.on_ended(DialogEnded(dialog_id, DialogEndReason.SHUTDOWN))
        self._flush()


def _without_origin(sdp: bytes) -> bytes:
    return b"\n".join(line for line in sdp.splitlines() if not line.startswith(b"o="))
