"""WebRTC ingest over WHIP (RFC 9725): each received audio track of a browser or softphone is a leg.

aiortc does ICE, DTLS-SRTP, the jitter buffer and Opus decoding; this module only maps a WHIP
session onto legs and turns decoded `av.AudioFrame`s (48 kHz s16, usually stereo) into the mono
int16 PCM that `Leg.feed()` takes. A session is offered once (no trickle ICE: aiortc answers with
every host candidate) and ends with DELETE on its resource, when its tracks end, or when ICE fails.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

import av
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from callscribe.bridge.events import DropReason, EndReason
from callscribe.bridge.ice_loopback import offer_loopback_candidates
from callscribe.calls import CallRegistry, Leg
from callscribe.codecs.base import Pcm16
from callscribe.metrics import Metrics

log = logging.getLogger(__name__)

TRANSPORT = "webrtc"
# RTP timestamps are 32-bit; a frame's pts is its RTP timestamp.
_RTP_TS_MODULO = 1 << 32
# Gaps up to this long are filled with silence so finals keep their place on the leg's clock;
# longer ones are a muted or re-started sender, not lost packets.
_MAX_GAP_SEC = 2.0


class WhipError(Exception):
    """A WHIP request that cannot be served; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def mono_pcm(frame_pcm: np.ndarray[Any, Any], channels: int) -> Pcm16:
    """Packed s16 samples of one frame (shape (1, samples*channels)) → mono int16.

    Channels are averaged, not summed: a browser sends the same microphone on both.
    """
    if frame_pcm.dtype != np.int16:
        raise ValueError(f"frame samples are {frame_pcm.dtype}, expected int16 (s16)")
    if channels < 1 or frame_pcm.size % channels:
        raise ValueError(f"{frame_pcm.size} samples do not split into {channels} channels")
    interleaved = frame_pcm.reshape(-1, channels)
    if channels == 1:
        return interleaved[:, 0].copy()
    mono: Pcm16 = interleaved.astype(np.int32).mean(axis=1).astype(np.int16)
    return mono


@dataclass
class FrameTimeline:
    """Follows the RTP timestamps of decoded frames and says how much audio went missing.

    `gap()` returns the samples between the end of the previous frame and the start of
    this one (0 when contiguous, and 0 for reordered, repeated or implausibly far frames).
    """

    rate: int
    next_pts: int | None = None

    def gap(self, pts: int | None, samples: int) -> int:
        if pts is None:
            return 0
        missing = 0
        if self.next_pts is not None:
            delta = (pts - self.next_pts) % _RTP_TS_MODULO
            if 0 < delta <= _MAX_GAP_SEC * self.rate:
                missing = delta
        self.next_pts = (pts + samples) % _RTP_TS_MODULO
        return missing


@dataclass
class WhipSession:
    session_id: str
    call_id: str
    pc: RTCPeerConnection
    legs: list[Leg] = field(default_factory=list)
    pumps: list[asyncio.Task[None]] = field(default_factory=list)
    ending: asyncio.Task[None] | None = None


def leg_names(requested: list[str], tracks: int) -> list[str]:
    """Names for `tracks` audio tracks in m-line order: the requested names first, then
    `<first>-2`, `<first>-3`... so a second microphone never collides with the first."""
    if tracks <= 0:
        return []
    names = list(requested[:tracks]) or ["caller"]
    base = names[0]
    while len(names) < tracks:
        names.append(f"{base}-{len(names) + 1}")
    return names


class WhipIngest:
    """The WHIP sessions of one service (a `Component`: started and stopped by the Service)."""

    def __init__(self, registry: CallRegistry, metrics: Metrics, idle_timeout_sec: float = 10.0) -> None:
        self._registry = registry
        self._metrics = metrics
        self._idle_timeout = idle_timeout_sec
        self.sessions: dict[str, WhipSession] = {}

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        await asyncio.gather(*(self.end(sid, EndReason.SHUTDOWN) for sid in list(self.sessions)))

    async def publish(
        self,
        offer_sdp: str,
        call_id: str,
        requested_legs: list[str],
        meta: dict[str, Any],
        loopback_client: bool = False,
        owner: str | None = None,
    ) -> tuple[WhipSession, str]:
        """Accept an SDP offer: open one leg per audio track; returns the session and the SDP answer.
        `loopback_client`: the client is on this machine, so 127.0.0.1 is offered too."""
        if "m=audio" not in offer_sdp:
            raise WhipError(400, "the SDP offer has no m=audio section; WHIP ingest takes audio")
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        session = WhipSession(uuid.uuid4().hex, call_id, pc)
        tracks: list[MediaStreamTrack] = []
        pc.on("track", lambda track: tracks.append(track) if track.kind == "audio" else None)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        except Exception as exc:  # aiortc raises ValueError, KeyError, IndexError... on bad SDP
            await pc.close()
            raise WhipError(400, f"SDP offer rejected: {type(exc).__name__}: {exc}") from None
        if not tracks:
            await pc.close()
            raise WhipError(400, "the SDP offer sends no audio (every m=audio is recvonly or inactive)")
        try:
            for name in leg_names(requested_legs, len(tracks)):
                session.legs.append(
                    self._registry.open_leg(call_id, name, {**meta, "transport": TRANSPORT}, owner=owner)
                )
            for transceiver in pc.getTransceivers():
                if transceiver.kind != "audio":
                    # Answered inactive: the sender keeps its video to itself instead of making
                    # aiortc decode frames nobody reads.
                    transceiver.direction = "inactive"
            if loopback_client:
                offer_loopback_candidates(pc)
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception:
            await asyncio.gather(*(leg.close(EndReason.REFUSED) for leg in session.legs))
            await pc.close()
            raise
        self.sessions[session.session_id] = session

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                log.info("WHIP session %s: connection %s", session.session_id, pc.connectionState)
                await self.end(
                    session.session_id,
                    EndReason.CONNECTION_FAILED
                    if pc.connectionState == "failed"
                    else EndReason.CONNECTION_CLOSED,
                )

        for track, leg in zip(tracks, session.legs, strict=True):
            session.pumps.append(asyncio.create_task(self._pump(session, track, leg)))
        log.info(
            "WHIP session %s call_id=%s legs=%s",
            session.session_id,
            call_id,
            [leg.name for leg in session.legs],
        )
        return session, pc.localDescription.sdp

    async def end(self, session_id: str, reason: EndReason) -> bool:
        """End a session and its legs (their last finals are flushed); False if unknown."""
        session = self.sessions.get(session_id)
        if session is None:
            return False
        if session.ending is None:
            session.ending = asyncio.create_task(self._end(session, reason))
        await asyncio.shield(session.ending)
        return True

    async def _end(self, session: WhipSession, reason: EndReason) -> None:
        for pump in session.pumps:
            pump.cancel()
        await asyncio.gather(*session.pumps, return_exceptions=True)
        await asyncio.gather(*(leg.close(reason) for leg in session.legs))
        await session.pc.close()
        self.sessions.pop(session.session_id, None)
        log.info("WHIP session %s ended: %s", session.session_id, reason)

    async def _pump(self, session: WhipSession, track: MediaStreamTrack, leg: Leg) -> None:
        received = self._metrics.packets_received.labels(transport=TRANSPORT)
        timeline: FrameTimeline | None = None
        # Checked as well as cancelled: on Python 3.11 wait_for() swallows a cancellation that
        # arrives as a frame does (every 20 ms here), and the pump would feed a closed leg forever.
        while session.ending is None:
            try:
                frame = await asyncio.wait_for(track.recv(), self._idle_timeout)
            except MediaStreamError:
                # The sender stopped the track (or the connection closed): the leg is over.
                await leg.close(EndReason.TRACK_ENDED)
                return
            except TimeoutError:
                # No frame for that long: the peer vanished without DELETE (consent freshness
                # would notice too, but later) or stopped sending.
                log.info("WHIP session %s: no audio for %.0fs", session.session_id, self._idle_timeout)
                if session.ending is None:
                    session.ending = asyncio.create_task(self._end(session, EndReason.IDLE_TIMEOUT))
                return
            if session.ending is not None:
                return  # _end() closes the leg, with its reason
            received.inc()
            if not isinstance(frame, av.AudioFrame):
                self._metrics.drop(TRANSPORT, DropReason.NOT_AUDIO)
                continue
            try:
                pcm = mono_pcm(frame.to_ndarray(), len(frame.layout.channels))
            except ValueError as exc:
                self._metrics.drop(TRANSPORT, DropReason.BAD_FRAME)
                log.debug("WHIP session %s: frame dropped: %s", session.session_id, exc)
                continue
            rate = int(frame.sample_rate)
            if timeline is None or timeline.rate != rate:
                timeline = FrameTimeline(rate)
            missing = timeline.gap(frame.pts, pcm.size)
            if missing:
                self._metrics.drop(TRANSPORT, DropReason.LOST, max(1, missing // max(1, pcm.size)))
                leg.feed(np.zeros(missing, dtype=np.int16), rate)
            leg.feed(pcm, rate)
