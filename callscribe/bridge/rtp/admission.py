"""Who may feed the RTP ingest, sans-IO: per-source packet rates and RFC 3550 probation of
new sources at the auto-leg port. Time is a parameter; the ingest counts what these refuse.
(The per-host cap on auto-legs is a `callscribe.bridge.limits.SourceLimit`.)
"""

from __future__ import annotations

from typing import Any

from callscribe.bridge.events import DropReason
from callscribe.bridge.rtp.packet import SEQ_MOD, RtpPacket
from callscribe.codecs import spec_for_static_pt

Address = tuple[Any, ...]  # (host, port) for IPv4, (host, port, flow, scope) for IPv6
MAX_CANDIDATES = 1024  # new sources on probation at the auto-leg port
PROBATION_SEC = 2.0
IDLE_BUCKET_SEC = 10.0


class TokenBucket:
    """`rate` packets per second with a burst of one second's worth."""

    __slots__ = ("last", "rate", "tokens")

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.last = now

    def take(self, now: float) -> bool:
        tokens = min(self.rate, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if tokens < 1.0:
            self.tokens = tokens
            return False
        self.tokens = tokens - 1.0
        return True


class SourceRates:
    """One TokenBucket per source address, at most `limit` of them: a spoofed-source flood
    empties the table (buckets refill at the full rate) instead of growing it."""

    def __init__(self, rate: float, limit: int = 100_000) -> None:
        self.rate = rate
        self.limit = limit
        self._buckets: dict[Address, TokenBucket] = {}

    def known(self, source: Address) -> bool:
        """Whether the source already has a bucket (its allow-list check passed before)."""
        return source in self._buckets

    def take(self, source: Address, now: float) -> bool:
        bucket = self._buckets.get(source)
        if bucket is None:
            if len(self._buckets) >= self.limit:
                self._buckets.clear()
            bucket = self._buckets[source] = TokenBucket(self.rate, now)
        return bucket.take(now)

    def forget_idle(self, now: float) -> None:
        """Drop buckets idle for IDLE_BUCKET_SEC (once there are enough to matter)."""
        if len(self._buckets) > 1000:
            for source in [s for s, b in self._buckets.items() if now - b.last > IDLE_BUCKET_SEC]:
                del self._buckets[source]

    def __len__(self) -> int:
        return len(self._buckets)


class Probation:
    """RFC 3550 A.1 probation: a new (source, SSRC) starts a leg only with two packets in
    sequence of a payload type the bridge decodes, so stray or random datagrams that happen to
    parse open no legs. `offer()` returns the first packet once confirmed, and the drops to count."""

    def __init__(self, max_candidates: int = MAX_CANDIDATES, window: float = PROBATION_SEC) -> None:
        self.max_candidates = max_candidates
        self.window = window
        self._candidates: dict[tuple[Address, int], tuple[RtpPacket, float]] = {}

    def offer(
        self, key: tuple[Address, int], packet: RtpPacket, now: float
    ) -> tuple[RtpPacket | None, list[tuple[DropReason, int]]]:
        pt = packet.payload_type
        if not (spec_for_static_pt(pt) or 96 <= pt <= 127):
            return None, [(DropReason.UNKNOWN_PAYLOAD_TYPE, 1)]
        drops: list[tuple[DropReason, int]] = []
        held = self._candidates.pop(key, None)
        if held is not None and packet.sequence_number == (held[0].sequence_number + 1) % SEQ_MOD:
            return held[0], drops
        if held is not None:
            drops.append((DropReason.UNCONFIRMED_SOURCE, 1))
        if len(self._candidates) >= self.max_candidates:
            drops.append((DropReason.UNCONFIRMED_SOURCE, len(self._candidates)))
            self._candidates.clear()
        self._candidates[key] = (packet, now)
        return None, drops

    def expire(self, now: float) -> int:
        """Forget candidates whose second packet did not come within the window; how many."""
        if not self._candidates:
            return 0
        expired = [key for key, (_packet, seen) in self._candidates.items() if now - seen > self.window]
        for key in expired:
            del self._candidates[key]
        return len(expired)

    def __len__(self) -> int:
        return len(self._candidates)
