"""RTP for one call leg, sans-IO: a receiver that turns datagrams into audio, DTMF and
counted drops (packets in `packet`, reordering in `jitter`). Time is always a parameter
(seconds, any monotonic origin) so that every behaviour tests deterministically.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable, Mapping

from callscribe.bridge.events import (
    CALLER,
    AudioReceived,
    Dropped,
    DropReason,
    DtmfReceived,
    EndReason,
    SenderEnded,
)
from callscribe.bridge.rtp.jitter import JitterBuffer
from callscribe.bridge.rtp.packet import TS_MOD, RtpError, RtpPacket, is_rtcp, rtcp_bye_ssrcs
from callscribe.codecs import decoder_for, s16le, spec_by_name, spec_for_static_pt
from callscribe.codecs.base import CodecError, CodecSpec, Decoder
from callscribe.codecs.dtmf import TELEPHONE_EVENT, DtmfReceiver
from callscribe.codecs.g711 import G711Decoder

_PLAIN_HEADER = struct.Struct("!BHII")  # after the first byte: M+PT, seq, timestamp, SSRC
COMFORT_NOISE_PT = 13  # RFC 3389: the sender went quiet; the timestamp gap is concealed anyway
# Decoders return native int16; AudioReceived names it s16le, true on every platform we ship.
assert sys.byteorder == "little", "RtpLegReceiver reports native int16 as s16le"

LegEvent = AudioReceived | DtmfReceived | Dropped | SenderEnded


def _native_bytes(decoder: Decoder) -> Callable[[bytes], bytes]:
    if isinstance(decoder, G711Decoder):
        return decoder.linear
    return lambda payload: decoder.decode(payload).tobytes()


class RtpLegReceiver:
    """One leg's RTP: datagram bytes in, AudioReceived / DtmfReceived / Dropped events out, and
    SenderEnded when the latched source says goodbye (RTCP BYE, RFC 3550 §6.6).

    Payload types: `payload_types` (from SDP: {pt: codec name}) first, then the RFC 3551
    static types, then any other dynamic type (96-127) is the leg's declared `codec`.
    `dtmf_payload_type` carries RFC 4733 events. Lost packets are concealed by the RTP
    timestamp gap, so the leg's audio time stays true to the sender's clock; gaps longer
    than `max_gap_ms` are counted (timestamp_jump) and filled only up to that cap.

    The first SSRC is latched. Another SSRC takes over only after the current one has been
    silent for `ssrc_takeover_ms`: longer than the longest Opus packet (120 ms) plus the
    jitter depth, so a live stream never looks silent, yet short enough that a legitimate
    change (re-INVITE, transfer, SBC failover) loses a quarter second at most.

    `batch_ms` > 0 joins decoded audio into AudioReceived events of at least that length (or
    as old, when `poll()` runs): each costs the leg one resampler call whatever its length, so
    joining packets multiplies the legs a core carries (measured by bench/ingest.py).
    """

    def __init__(
        self,
        codec: str | CodecSpec,
        payload_types: Mapping[int, str] | None = None,
        dtmf_payload_type: int | None = 101,
        jitter_ms: float = 60,
        max_gap_ms: int = 5000,
        ssrc_takeover_ms: int = 250,
        jitter_capacity: int = 512,
        batch_ms: int = 0,
    ) -> None:
        self.codec = codec if isinstance(codec, CodecSpec) else spec_by_name(codec)
        # 64-95 collide with RTCP packet types under rtcp-mux (RFC 5761 §4): never audio.
        self._specs = {
            pt: spec_by_name(name)
            for pt, name in (payload_types or {}).items()
            if 0 <= pt < 64 or 96 <= pt < 128
        }
        if dtmf_payload_type is not None and dtmf_payload_type not in self._specs:
            self._specs[dtmf_payload_type] = TELEPHONE_EVENT
        # Per payload type: its decoder, codec, and a function payload → native int16 bytes.
        self._linear: dict[int, tuple[Decoder, CodecSpec, Callable[[bytes], bytes]]] = {}
        self._jitter = JitterBuffer(jitter_ms, jitter_capacity)
        self._max_gap_s = max_gap_ms / 1000.0
        self._takeover_s = ssrc_takeover_ms / 1000.0
        self._batch_s = batch_ms / 1000.0
        self._dtmf: DtmfReceiver | None = None
        self.ssrc: int | None = None
        self._last_seen = 0.0  # when the latched SSRC was last heard
        self._spec: CodecSpec | None = None  # codec of the last audio packet
        self._codec_name = ""  # how its decoded audio is reported: s16le-<rate>
        self._next_ts: int | None = None  # RTP timestamp where the next audio should start
        self._pending: list[bytes] = []  # decoded native int16, not yet emitted (batch_ms)
        self._pending_samples = 0
        self._pending_limit = 0
        self._pending_since = 0.0
        self.packets = 0
        self.concealed_samples = 0
        self.ssrc_changes = 0

    @property
    def lost(self) -> int:
        return self._jitter.lost

    def receive(self, data: bytes, now: float) -> list[LegEvent]:
        """One datagram. Returns what is ready now (usually the packet's own audio)."""
        if len(data) > 12 and data[0] == 0x80:
            # The usual packet skips RtpPacket and the jitter buffer's queue (bench/ingest.py):
            # plain header, latched SSRC, next in sequence with nothing held, a known codec.
            second, seq, timestamp, ssrc = _PLAIN_HEADER.unpack_from(data, 1)
            linear = self._linear.get(second & 0x7F)
            if linear is not None and ssrc == self.ssrc and self._jitter.take_next(seq):
                self._last_seen = now
                self.packets += 1
                events: list[LegEvent] = []
                try:
                    raw = linear[2](data[12:])
                except CodecError:
                    events.append(Dropped(DropReason.UNDECODABLE))
                    return events
                self._on_audio(timestamp, linear[0], raw, now, events)
                return events
        if is_rtcp(data):
            return self.receive_rtcp(data)
        try:
            packet = RtpPacket.parse(data)
        except RtpError as exc:
            return [Dropped(exc.reason)]
        return self.receive_packet(packet, now)

    def receive_rtcp(self, data: bytes) -> list[LegEvent]:
        """An RTCP datagram (muxed, or from the RTCP port): only a BYE of the latched SSRC
        matters; reports are counted and dropped."""
        byes = rtcp_bye_ssrcs(data)
        if byes is not None and self.ssrc is not None and self.ssrc in byes:
            events = self.flush()
            events.append(SenderEnded(EndReason.HANGUP))
            return events
        return [Dropped(DropReason.RTCP)]

    def receive_packet(self, packet: RtpPacket, now: float) -> list[LegEvent]:
        events: list[LegEvent] = []
        if packet.ssrc != self.ssrc:
            if self.ssrc is not None:
                if now - self._last_seen < self._takeover_s:
                    return [Dropped(DropReason.SSRC_CONFLICT)]
                self._release(self._jitter.flush(), now, events)
                self._flush_dtmf(events)
                self._jitter.reset()
                self._next_ts = None
                self.ssrc_changes += 1
            self.ssrc = packet.ssrc
        self._last_seen = now
        self.packets += 1
        reason = self._jitter.push(packet, now)
        if reason:
            events.append(Dropped(reason))
        ready = self._jitter.pop(now)
        if ready:
            self._release(ready, now, events)
        return events

    def poll(self, now: float) -> list[LegEvent]:
        """Release packets whose gap has waited long enough, and audio batched long enough
        (call every ~20 ms)."""
        events: list[LegEvent] = []
        if len(self._jitter):
            self._release(self._jitter.pop(now), now, events)
        if self._pending and now - self._pending_since >= self._batch_s:
            self._emit_pending(events)
        return events

    def flush(self) -> list[LegEvent]:
        """Everything held back: the leg is ending."""
        events: list[LegEvent] = []
        self._release(self._jitter.flush(), self._last_seen, events)
        self._flush_dtmf(events)
        self._emit_pending(events)
        return events

    def _spec_for(self, pt: int) -> CodecSpec | None:
        spec = self._specs.get(pt)
        if spec is None:
            spec = spec_for_static_pt(pt)
            if spec is None and 96 <= pt <= 127:
                spec = self.codec
            if spec is not None:
                self._specs[pt] = spec
        return spec

    def _release(self, packets: list[RtpPacket], now: float, events: list[LegEvent]) -> None:
        for packet in packets:
            pt = packet.payload_type
            linear = self._linear.get(pt)
            if linear is None:
                spec = self._spec_for(pt)
                if spec is None:
                    events.append(
                        Dropped(
                            DropReason.COMFORT_NOISE
                            if pt == COMFORT_NOISE_PT
                            else DropReason.UNKNOWN_PAYLOAD_TYPE
                        )
                    )
                    continue
                if spec.encoding == TELEPHONE_EVENT.encoding:
                    self._on_dtmf(packet, spec, events)
                    continue
                try:
                    decoder = decoder_for(spec)
                except CodecError:
                    events.append(Dropped(DropReason.UNSUPPORTED_CODEC))
                    continue
                linear = self._linear[pt] = (decoder, spec, _native_bytes(decoder))
            if not packet.payload:
                events.append(Dropped(DropReason.EMPTY_PAYLOAD))
                continue
            try:
                raw = linear[2](packet.payload)
            except CodecError:
                events.append(Dropped(DropReason.UNDECODABLE))
                continue
            self._on_audio(packet.timestamp, linear[0], raw, now, events)

    def _on_audio(
        self, timestamp: int, decoder: Decoder, raw: bytes, now: float, events: list[LegEvent]
    ) -> None:
        """Queue one packet's decoded audio; the fast path of receive() ends here too, so the
        continuous case (same codec, timestamp where the last packet ended) is tested first."""
        spec = decoder.spec
        if spec is not self._spec or timestamp != self._next_ts:
            self._discontinuity(timestamp, decoder, now, events)
        size = len(raw) >> 1
        self._next_ts = (timestamp + size * spec.clock_rate // spec.sample_rate) % TS_MOD
        if size:
            if not self._pending:
                self._pending_since = now
            self._pending.append(raw)
            self._pending_samples += size
        if self._pending_samples >= self._pending_limit:
            self._emit_pending(events)

    def _discontinuity(self, timestamp: int, decoder: Decoder, now: float, events: list[LegEvent]) -> None:
        """A codec switch restarts the timeline; a timestamp gap is concealed (up to max_gap)."""
        spec = decoder.spec
        if spec is not self._spec:
            # A payload type switch: the new codec's clock may differ, so its timeline starts here.
            self._emit_pending(events)
            self._spec = spec
            self._codec_name = s16le(spec.sample_rate).name
            self._next_ts = None
            self._pending_limit = int(self._batch_s * spec.sample_rate)
            return
        if self._next_ts is None:
            return
        gap = (timestamp - self._next_ts + (TS_MOD >> 1)) % TS_MOD - (TS_MOD >> 1)
        if gap > 0:
            if gap > self._max_gap_s * spec.clock_rate:
                events.append(Dropped(DropReason.TIMESTAMP_JUMP))
                gap = int(self._max_gap_s * spec.clock_rate)
            missing = gap * spec.sample_rate // spec.clock_rate
            self.concealed_samples += missing
            self._queue(decoder.conceal(missing).tobytes(), now)

    def _queue(self, raw: bytes, now: float) -> None:
        if not raw:
            return
        if not self._pending:
            self._pending_since = now
        self._pending.append(raw)
        self._pending_samples += len(raw) >> 1

    def _emit_pending(self, events: list[LegEvent]) -> None:
        pending = self._pending
        if not pending or self._spec is None:
            return
        raw = pending[0] if len(pending) == 1 else b"".join(pending)
        events.append(AudioReceived(CALLER, raw, self._codec_name))
        self._pending = []
        self._pending_samples = 0

    def _on_dtmf(self, packet: RtpPacket, spec: CodecSpec, events: list[LegEvent]) -> None:
        if self._dtmf is None or self._dtmf.clock_rate != spec.clock_rate:
            self._dtmf = DtmfReceiver(spec.clock_rate)
        try:
            digits = self._dtmf.receive(packet.timestamp, packet.payload)
        except CodecError:
            events.append(Dropped(DropReason.BAD_DTMF))
            return
        if digits:
            self._emit_pending(events)  # the digit is stamped with the leg's audio time
            events.extend(DtmfReceived(CALLER, d.digit, d.duration_ms) for d in digits)

    def _flush_dtmf(self, events: list[LegEvent]) -> None:
        if self._dtmf is not None:
            digits = self._dtmf.flush()
            if digits:
                self._emit_pending(events)
                events.extend(DtmfReceived(CALLER, d.digit, d.duration_ms) for d in digits)
