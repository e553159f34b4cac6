"""RTP for one call leg, sans-IO: packets (RFC 3550), a reorder jitter buffer, and a leg
receiver that turns datagrams into audio, DTMF and counted drops. Time is always a
parameter (seconds, any monotonic origin) so that every behaviour tests deterministically.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from callscribe.codecs import decoder_for, spec_by_name, spec_for_static_pt
from callscribe.codecs.base import CodecError, CodecSpec, Decoder, Pcm16
from callscribe.codecs.dtmf import TELEPHONE_EVENT, DtmfReceiver
from callscribe.codecs.g711 import G711Decoder

RTP_VERSION = 2
HEADER = struct.Struct("!BBHII")
_EXTENSION = struct.Struct("!HH")
_PLAIN_HEADER = struct.Struct("!BHII")  # after the first byte: M+PT, seq, timestamp, SSRC
SEQ_MOD = 1 << 16
TS_MOD = 1 << 32
COMFORT_NOISE_PT = 13  # RFC 3389: the sender went quiet; the timestamp gap is concealed anyway


class RtpError(ValueError):
    """A datagram that is not a valid RTP packet. `reason` is a short metric label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(slots=True)
class RtpPacket:
    payload_type: int
    sequence_number: int
    timestamp: int
    ssrc: int
    payload: bytes = b""
    marker: bool = False
    csrc: tuple[int, ...] = ()
    extension_profile: int | None = None
    extension: bytes = b""
    padding: int = 0

    @classmethod
    def parse(cls, data: bytes) -> RtpPacket:
        size = len(data)
        if size < 12:
            raise RtpError("truncated", f"{size} bytes, an RTP header needs 12")
        first, second, seq, timestamp, ssrc = HEADER.unpack_from(data)
        if first >> 6 != RTP_VERSION:
            raise RtpError("bad_version", f"RTP version {first >> 6}, expected 2")
        offset = 12
        csrc: tuple[int, ...] = ()
        count = first & 0x0F
        if count:
            offset += 4 * count
            if offset > size:
                raise RtpError("bad_csrc", f"{count} CSRCs need {offset} bytes, packet has {size}")
            csrc = struct.unpack_from(f"!{count}I", data, 12)
        profile: int | None = None
        extension = b""
        if first & 0x10:
            if offset + 4 > size:
                raise RtpError("bad_extension", f"extension header at {offset} beyond {size} bytes")
            profile, words = _EXTENSION.unpack_from(data, offset)
            end = offset + 4 + 4 * words
            if end > size:
                raise RtpError(
                    "bad_extension", f"extension of {words} words ends at {end}, packet has {size}"
                )
            extension = data[offset + 4 : end]
            offset = end
        padding = 0
        if first & 0x20:
            padding = data[-1]
            if padding == 0 or offset + padding > size:
                raise RtpError(
                    "bad_padding", f"padding count {padding} with {size - offset} bytes after header"
                )
            size -= padding
        return cls(
            second & 0x7F,
            seq,
            timestamp,
            ssrc,
            data[offset:size],
            bool(second & 0x80),
            csrc,
            profile,
            extension,
            padding,
        )

    def serialize(self) -> bytes:
        if len(self.csrc) > 15:
            raise RtpError("bad_csrc", f"{len(self.csrc)} CSRCs, at most 15 fit")
        if len(self.extension) % 4:
            raise RtpError("bad_extension", f"extension of {len(self.extension)} bytes is not 32-bit words")
        has_extension = self.extension_profile is not None
        first = (
            RTP_VERSION << 6 | (0x20 if self.padding else 0) | (0x10 if has_extension else 0) | len(self.csrc)
        )
        parts = [
            HEADER.pack(
                first,
                (0x80 if self.marker else 0) | self.payload_type,
                self.sequence_number,
                self.timestamp,
                self.ssrc,
            )
        ]
        if self.csrc:
            parts.append(struct.pack(f"!{len(self.csrc)}I", *self.csrc))
        if has_extension:
            parts.append(_EXTENSION.pack(self.extension_profile or 0, len(self.extension) // 4))
            parts.append(self.extension)
        parts.append(self.payload)
        if self.padding:
            parts.append(bytes(self.padding - 1) + bytes([self.padding]))
        return b"".join(parts)


def is_rtcp(data: bytes) -> bool:
    """With rtcp-mux (RFC 5761 §4) RTCP shares the port; its packet types 192-223 sit where
    RTP has marker + payload type, and no RTP payload type uses those values."""
    return len(data) >= 2 and 192 <= data[1] <= 223


def seq_delta(seq: int, reference: int) -> int:
    """Signed distance from `reference` to `seq` on the 16-bit sequence circle."""
    return (seq - reference + 0x8000) % SEQ_MOD - 0x8000


class JitterBuffer:
    """Releases packets in sequence order: at once while they arrive in order; a gap is waited
    for up to `depth_ms` from the arrival of the first packet behind it, then skipped.
    Sequence numbers are extended past the 16-bit wrap. Holds at most `capacity` packets."""

    # A packet this far behind the expected number is a sender restart, not a late one, once
    # a couple of them follow each other (RFC 3550 A.1 probation, simplified).
    RESTART_DISTANCE = 3000
    RESTART_PROBATION = 2

    def __init__(self, depth_ms: float, capacity: int = 512) -> None:
        if depth_ms < 0 or capacity < 1:
            raise ValueError(f"depth_ms must be >= 0 and capacity >= 1, got {depth_ms}, {capacity}")
        self.depth = depth_ms / 1000.0
        self.capacity = capacity
        self._next: int | None = None  # extended sequence number expected next
        self._held: dict[int, tuple[RtpPacket, float]] = {}
        self._ready: list[RtpPacket] = []
        self._restart_seq: int | None = None
        self._restart_count = 0
        self._skipped: set[int] = set()
        self.lost = 0  # sequence numbers skipped

    def __len__(self) -> int:
        return len(self._held)

    def push(self, packet: RtpPacket, now: float) -> str | None:
        """Queue a packet; returns a drop reason (duplicate, late) or None. Collect with pop()."""
        seq = packet.sequence_number
        expected = self._next
        if expected is None:
            self._next = expected = seq
        delta = seq_delta(seq, expected & 0xFFFF)
        if delta == 0 and not self._held:
            self._ready.append(packet)
            self._next = expected + 1
            return None
        if delta < 0:
            return self._behind(packet, delta)
        self._restart_count = 0
        extended = expected + delta
        if extended in self._held:
            return "duplicate"
        if delta >= self.capacity:
            # Far ahead: a jump in numbering. Waiting for the gap would only delay everything.
            self._release_all()
            self._next = extended
        self._held[extended] = (packet, now)
        self._drain(now)
        return None

    def take_next(self, seq: int) -> bool:
        """Fast path: accept `seq` without queueing it if it is the one expected and nothing
        waits; False means "use push()"."""
        expected = self._next
        if expected is None or self._held or self._ready or seq != expected & 0xFFFF:
            return False
        self._next = expected + 1
        return True

    def pop(self, now: float) -> list[RtpPacket]:
        """Packets ready in order, including those whose gap has now waited `depth_ms`."""
        if self._held:
            self._drain(now)
        ready = self._ready
        if ready:
            self._ready = []
        return ready

    def flush(self) -> list[RtpPacket]:
        """Everything held, in order (the leg is ending or changing source)."""
        self._release_all()
        return self.pop(0.0)

    def reset(self) -> None:
        self._next = None
        self._held.clear()
        self._restart_seq = None
        self._restart_count = 0
        self._skipped.clear()

    def _behind(self, packet: RtpPacket, delta: int) -> str | None:
        seq = packet.sequence_number
        if delta > -self.RESTART_DISTANCE:
            if seq in self._skipped:
                self._skipped.discard(seq)
                return "late"
            return "duplicate"
        if self._restart_seq is not None and seq == (self._restart_seq + 1) % SEQ_MOD:
            self._restart_count += 1
        else:
            self._restart_count = 1
        self._restart_seq = seq
        if self._restart_count < self.RESTART_PROBATION:
            return "late"
        self._release_all()
        self.reset()
        return self.push(packet, 0.0)

    def _drain(self, now: float) -> None:
        held = self._held
        assert self._next is not None
        while held:
            entry = held.pop(self._next, None)
            if entry is not None:
                self._ready.append(entry[0])
                self._next += 1
                continue
            oldest = min(held)
            if len(held) <= self.capacity and now - held[oldest][1] < self.depth:
                return
            self._skip(self._next, oldest)
            self._next = oldest

    def _skip(self, first: int, end: int) -> None:
        """Give up on [first, end): remembered so that a straggler counts as late."""
        self.lost += end - first
        if len(self._skipped) > self.capacity:
            self._skipped.clear()
        self._skipped.update(extended % SEQ_MOD for extended in range(first, min(end, first + self.capacity)))

    def _release_all(self) -> None:
        if self._held:
            for extended in sorted(self._held):
                self._ready.append(self._held[extended][0])
            assert self._next is not None
            for extended in range(self._next, max(self._held)):
                if extended not in self._held:
                    self._skip(extended, extended + 1)
            self._next = max(self._held) + 1
            self._held.clear()


@dataclass(frozen=True, slots=True)
class Audio:
    pcm: Pcm16
    rate: int


@dataclass(frozen=True, slots=True)
class Dtmf:
    digit: str
    duration_ms: int


@dataclass(frozen=True, slots=True)
class Drop:
    reason: str


LegEvent = Audio | Dtmf | Drop


def _native_bytes(decoder: Decoder) -> Callable[[bytes], bytes]:
    if isinstance(decoder, G711Decoder):
        return decoder.linear
    return lambda payload: decoder.decode(payload).tobytes()


class RtpLegReceiver:
    """One leg's RTP: datagram bytes in, Audio / Dtmf / Drop events out.

    Payload types: `payload_types` (from SDP: {pt: codec name}) first, then the RFC 3551
    static types, then any other dynamic type (96-127) is the leg's declared `codec`.
    `dtmf_payload_type` carries RFC 4733 events. Lost packets are concealed by the RTP
    timestamp gap, so the leg's audio time stays true to the sender's clock; gaps longer
    than `max_gap_ms` are counted (timestamp_jump) and filled only up to that cap.

    The first SSRC is latched. Another SSRC takes over only after the current one has been
    silent for `ssrc_takeover_ms`: longer than the longest Opus packet (120 ms) plus the
    jitter depth, so a live stream never looks silent, yet short enough that a legitimate
    change (re-INVITE, transfer, SBC failover) loses a quarter second at most.

    `batch_ms` > 0 joins decoded audio into Audio events of at least that length (or as old,
    when `poll()` runs): each Audio costs the leg one resampler call of ~10 µs whatever its
    length, so three 20 ms packets per call triple the legs a core carries (bench/ingest.py).
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
            # The usual packet, kept free of per-packet objects and calls (bench/ingest.py):
            # plain header, latched SSRC, next in sequence with nothing held, a known codec,
            # no timestamp gap.
            second, seq, timestamp, ssrc = _PLAIN_HEADER.unpack_from(data, 1)
            linear = self._linear.get(second & 0x7F)
            if linear is not None and ssrc == self.ssrc and self._jitter.take_next(seq):
                self._last_seen = now
                self.packets += 1
                events: list[LegEvent] = []
                decoder, spec, to_bytes = linear
                try:
                    raw = to_bytes(data[12:])
                except CodecError:
                    events.append(Drop("undecodable"))
                    return events
                size = len(raw) >> 1
                if spec is self._spec and timestamp == self._next_ts and size:
                    self._next_ts = (timestamp + size * spec.clock_rate // spec.sample_rate) % TS_MOD
                    if not self._pending:
                        self._pending_since = now
                    self._pending.append(raw)
                    self._pending_samples += size
                    if self._pending_samples >= self._pending_limit:
                        self._emit_pending(events)
                else:
                    self._on_audio(timestamp, decoder, raw, now, events)
                return events
        if is_rtcp(data):
            return [Drop("rtcp")]
        try:
            packet = RtpPacket.parse(data)
        except RtpError as exc:
            return [Drop(exc.reason)]
        return self.receive_packet(packet, now)

    def receive_packet(self, packet: RtpPacket, now: float) -> list[LegEvent]:
        events: list[LegEvent] = []
        if packet.ssrc != self.ssrc:
            if self.ssrc is not None:
                if now - self._last_seen < self._takeover_s:
                    return [Drop("ssrc_conflict")]
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
            events.append(Drop(reason))
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
                    events.append(Drop("comfort_noise" if pt == COMFORT_NOISE_PT else "unknown_payload_type"))
                    continue
                if spec.encoding == TELEPHONE_EVENT.encoding:
                    self._on_dtmf(packet, spec, events)
                    continue
                try:
                    decoder = decoder_for(spec)
                except CodecError:
                    events.append(Drop("unsupported_codec"))
                    continue
                linear = self._linear[pt] = (decoder, spec, _native_bytes(decoder))
            if not packet.payload:
                events.append(Drop("empty_payload"))
                continue
            try:
                raw = linear[2](packet.payload)
            except CodecError:
                events.append(Drop("undecodable"))
                continue
            self._on_audio(packet.timestamp, linear[0], raw, now, events)

    def _on_audio(
        self, timestamp: int, decoder: Decoder, raw: bytes, now: float, events: list[LegEvent]
    ) -> None:
        spec = decoder.spec
        if spec is not self._spec:
            # A payload type switch: the new codec's clock may differ, so its timeline starts here.
            self._emit_pending(events)
            self._spec = spec
            self._next_ts = None
            self._pending_limit = int(self._batch_s * spec.sample_rate)
        if self._next_ts is not None and timestamp != self._next_ts:
            gap = (timestamp - self._next_ts + (TS_MOD >> 1)) % TS_MOD - (TS_MOD >> 1)
            if gap > 0:
                if gap > self._max_gap_s * spec.clock_rate:
                    events.append(Drop("timestamp_jump"))
                    gap = int(self._max_gap_s * spec.clock_rate)
                missing = gap * spec.sample_rate // spec.clock_rate
                self.concealed_samples += missing
                self._queue(decoder.conceal(missing).tobytes(), now)
        size = len(raw) >> 1
        self._next_ts = (timestamp + size * spec.clock_rate // spec.sample_rate) % TS_MOD
        self._queue(raw, now)
        if self._pending_samples >= self._pending_limit:
            self._emit_pending(events)

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
        events.append(Audio(np.frombuffer(raw, dtype=np.int16), self._spec.sample_rate))
        self._pending = []
        self._pending_samples = 0

    def _on_dtmf(self, packet: RtpPacket, spec: CodecSpec, events: list[LegEvent]) -> None:
        if self._dtmf is None or self._dtmf.clock_rate != spec.clock_rate:
            self._dtmf = DtmfReceiver(spec.clock_rate)
        try:
            digits = self._dtmf.receive(packet.timestamp, packet.payload)
        except CodecError:
            events.append(Drop("bad_dtmf"))
            return
        if digits:
            self._emit_pending(events)  # the digit is stamped with the leg's audio time
            events.extend(Dtmf(d.digit, d.duration_ms) for d in digits)

    def _flush_dtmf(self, events: list[LegEvent]) -> None:
        if self._dtmf is not None:
            digits = self._dtmf.flush()
            if digits:
                self._emit_pending(events)
                events.extend(Dtmf(d.digit, d.duration_ms) for d in digits)
