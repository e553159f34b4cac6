"""The outage buffer: events waiting for Redis, bounded, in publish order (sans-IO).

While Redis is slow or unreachable, events queue here. Only the newest partial of each
(call_id, leg) is worth sending, so a newer partial supersedes a pending one; finals,
lifecycle, dtmf and error events are always kept. Beyond `limit` events the oldest are
handed back to the caller for the disk spool (when there is one); without a spool the
oldest partials go first, and only past `hard_limit` are non-partial events dropped
(returned so the caller can say so loudly). Every pushed event gets an ordinal: the
publisher uses it to know when everything published before a point has been written.

No IO and no clock: the publisher moves events between this buffer, the spool and Redis.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from callscribe.events import EventType, TranscriptEvent

LegKey = tuple[str, str]

# Without a spool, finals and lifecycle events may use this many times `limit` before the
# oldest of them is dropped: losing a final is worse than holding a few MB more.
HARD_LIMIT_FACTOR = 10


def leg_key(event: TranscriptEvent) -> LegKey:
    return (event.call_id, event.leg)


@dataclass
class Displaced:
    """What one push moved out of memory: events for the spool (oldest first) and events
    dropped, each with its reason ("superseded_partial", "overflow_partial", "overflow")."""

    spool: list[tuple[int, TranscriptEvent]] = field(default_factory=list)
    dropped: list[tuple[TranscriptEvent, str]] = field(default_factory=list)


class OutageBuffer:
    def __init__(self, limit: int, spooling: bool, hard_limit: int | None = None) -> None:
        if limit < 1:
            raise ValueError(f"outage buffer limit must be >= 1, got {limit}")
        self.limit = limit
        self.hard_limit = hard_limit if hard_limit is not None else limit * HARD_LIMIT_FACTOR
        if self.hard_limit < limit:
            raise ValueError(f"hard_limit {self.hard_limit} is below limit {limit}")
        self.spooling = spooling
        self._events: OrderedDict[int, TranscriptEvent] = OrderedDict()
        # The pending partial of each leg, and all pending partials oldest first.
        self._partial_of_leg: dict[LegKey, int] = {}
        self._partials: OrderedDict[int, None] = OrderedDict()
        # Partials handed to the spool that are still the newest of their leg (leg → seq),
        # and spooled partials superseded since (skipped when the spool is replayed).
        self._spooled_partial: dict[LegKey, int] = {}
        self._stale: set[tuple[str, str, int]] = set()
        self._next_ordinal = 1

    def __len__(self) -> int:
        return len(self._events)

    @property
    def last_ordinal(self) -> int:
        """Ordinal of the newest event ever pushed (0 before the first)."""
        return self._next_ordinal - 1

    @property
    def first_ordinal(self) -> int | None:
        """Ordinal of the oldest event in memory, None when memory is empty."""
        return next(iter(self._events), None)

    def push(self, event: TranscriptEvent) -> Displaced:
        displaced = Displaced()
        ordinal = self._next_ordinal
        self._next_ordinal += 1
        if event.type == EventType.PARTIAL:
            key = leg_key(event)
            older = self._partial_of_leg.pop(key, None)
            if older is not None:
                displaced.dropped.append((self._remove(older), "superseded_partial"))
            spooled_seq = self._spooled_partial.pop(key, None)
            if spooled_seq is not None:
                self._stale.add((*key, spooled_seq))
                displaced.dropped.append((_stub(key, spooled_seq), "superseded_partial"))
            self._partial_of_leg[key] = ordinal
            self._partials[ordinal] = None
        self._events[ordinal] = event
        self._enforce_bound(displaced)
        return displaced

    def take(self, count: int) -> list[tuple[int, TranscriptEvent]]:
        """Remove and return up to `count` oldest events with their ordinals."""
        taken: list[tuple[int, TranscriptEvent]] = []
        while self._events and len(taken) < count:
            ordinal, event = self._events.popitem(last=False)
            self._forget_partial(ordinal, event)
            taken.append((ordinal, event))
        return taken

    def spool_failed(self, events: Iterable[tuple[int, TranscriptEvent]]) -> Displaced:
        """The spool could not take `events`: stop spooling and put them back in front, in
        order. A returned partial whose leg has a newer pending partial is superseded."""
        self.spooling = False
        displaced = Displaced()
        restored: OrderedDict[int, TranscriptEvent] = OrderedDict()
        restored_partial: dict[LegKey, int] = {}
        for ordinal, event in events:
            if event.type == EventType.PARTIAL:
                key = leg_key(event)
                if self._spooled_partial.get(key) == event.seq:
                    del self._spooled_partial[key]
                if key in self._partial_of_leg:
                    displaced.dropped.append((event, "superseded_partial"))
                    continue
                earlier = restored_partial.pop(key, None)
                if earlier is not None:
                    displaced.dropped.append((restored.pop(earlier), "superseded_partial"))
                restored_partial[key] = ordinal
            restored[ordinal] = event
        self._partial_of_leg.update(restored_partial)
        restored.update(self._events)
        self._events = restored
        self._partials = OrderedDict(
            (ordinal, None) for ordinal, event in self._events.items() if event.type == EventType.PARTIAL
        )
        self._enforce_bound(displaced)
        return displaced

    def is_stale(self, event: TranscriptEvent) -> bool:
        """True for a spooled partial superseded after it was spooled (skip it on replay)."""
        return event.type == EventType.PARTIAL and (*leg_key(event), event.seq) in self._stale

    def settle(self, events: Iterable[TranscriptEvent]) -> None:
        """Forget spool bookkeeping of events that were written or skipped."""
        for event in events:
            if event.type != EventType.PARTIAL:
                continue
            key = leg_key(event)
            self._stale.discard((*key, event.seq))
            if self._spooled_partial.get(key) == event.seq:
                del self._spooled_partial[key]

    def spill(self) -> Displaced:
        """Everything in memory, for the spool now (Redis is down and a final or lifecycle
        event arrived: it must be on disk before the caller moves on). Spooled partials
        stay tracked, so a newer partial still supersedes them."""
        displaced = Displaced()
        if self.spooling:
            self._spool_down_to(0, displaced)
        return displaced

    def drain(self) -> list[tuple[int, TranscriptEvent]]:
        """Everything in memory, oldest first (used at shutdown)."""
        return self.take(len(self._events))

    def _remove(self, ordinal: int) -> TranscriptEvent:
        event = self._events.pop(ordinal)
        self._forget_partial(ordinal, event)
        return event

    def _forget_partial(self, ordinal: int, event: TranscriptEvent) -> None:
        if event.type != EventType.PARTIAL:
            return
        self._partials.pop(ordinal, None)
        key = leg_key(event)
        if self._partial_of_leg.get(key) == ordinal:
            del self._partial_of_leg[key]

    def _spool_down_to(self, keep: int, displaced: Displaced) -> None:
        while len(self._events) > keep:
            ordinal, event = self._events.popitem(last=False)
            self._forget_partial(ordinal, event)
            if event.type == EventType.PARTIAL:
                self._spooled_partial[leg_key(event)] = event.seq
            displaced.spool.append((ordinal, event))

    def _enforce_bound(self, displaced: Displaced) -> None:
        if len(self._events) <= self.limit:
            return
        if self.spooling:
            # Spool in chunks so an outage costs one file write per tenth of the buffer.
            self._spool_down_to(max(1, self.limit - max(1, self.limit // 10)), displaced)
            return
        while len(self._events) > self.limit and self._partials:
            oldest, _ = self._partials.popitem(last=False)
            displaced.dropped.append((self._remove(oldest), "overflow_partial"))
        while len(self._events) > self.hard_limit:
            ordinal, event = self._events.popitem(last=False)
            self._forget_partial(ordinal, event)
            displaced.dropped.append((event, "overflow"))


def _stub(key: LegKey, seq: int) -> TranscriptEvent:
    return TranscriptEvent(type=EventType.PARTIAL, call_id=key[0], leg=key[1], seq=seq, ts=0)
