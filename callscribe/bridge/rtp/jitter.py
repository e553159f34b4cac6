"""The reorder jitter buffer of one RTP stream, sans-IO (time is a parameter)."""

from __future__ import annotations

from callscribe.bridge.events import DropReason
from callscribe.bridge.rtp.packet import SEQ_MOD, RtpPacket, seq_delta


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

    def push(self, packet: RtpPacket, now: float) -> DropReason | None:
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
            return DropReason.DUPLICATE
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

    def _behind(self, packet: RtpPacket, delta: int) -> DropReason | None:
        seq = packet.sequence_number
        if delta > -self.RESTART_DISTANCE:
            if seq in self._skipped:
                self._skipped.discard(seq)
                return DropReason.LATE
            return DropReason.DUPLICATE
        if self._restart_seq is not None and seq == (self._restart_seq + 1) % SEQ_MOD:
            self._restart_count += 1
        else:
            self._restart_count = 1
        self._restart_seq = seq
        if self._restart_count < self.RESTART_PROBATION:
            return DropReason.LATE
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
