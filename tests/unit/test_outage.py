"""The outage buffer: coalescing, bounds and order, without Redis."""

from __future__ import annotations

from collections import Counter, defaultdict

from hypothesis import example, given, settings
from hypothesis import strategies as st

from callscribe.events import EventType, TranscriptEvent
from callscribe.publish.outage import OutageBuffer

LEGS = (("c1", "caller"), ("c1", "callee"), ("c2", "caller"))
KINDS = (EventType.PARTIAL, EventType.FINAL, EventType.DTMF, EventType.ERROR)


class EventMaker:
    def __init__(self) -> None:
        self.seq: dict[tuple[str, str], int] = defaultdict(int)

    def __call__(self, kind: EventType, call_id: str = "c1", leg: str = "caller") -> TranscriptEvent:
        self.seq[(call_id, leg)] += 1
        return TranscriptEvent(type=kind, call_id=call_id, leg=leg, seq=self.seq[(call_id, leg)], ts=0)


def test_newer_partial_supersedes_pending_one_of_same_leg_only() -> None:
    make = EventMaker()
    buffer = OutageBuffer(limit=100, spooling=False)
    first = make(EventType.PARTIAL)
    other_leg = make(EventType.PARTIAL, leg="callee")
    assert buffer.push(first).dropped == []
    buffer.push(other_leg)
    newer = make(EventType.PARTIAL)
    displaced = buffer.push(newer)
    assert displaced.dropped == [(first, "superseded_partial")]
    assert [e for _, e in buffer.take(10)] == [other_leg, newer]


def test_finals_and_lifecycle_are_never_coalesced() -> None:
    make = EventMaker()
    buffer = OutageBuffer(limit=100, spooling=False)
    events = [make(k) for k in (EventType.LEG_STARTED, EventType.FINAL, EventType.FINAL, EventType.DTMF)]
    for event in events:
        assert buffer.push(event).dropped == []
    assert [e for _, e in buffer.drain()] == events


def test_without_spool_oldest_partials_go_first_then_oldest_events_past_hard_limit() -> None:
    make = EventMaker()
    buffer = OutageBuffer(limit=3, spooling=False, hard_limit=5)
    partial = make(EventType.PARTIAL, leg="callee")
    buffer.push(partial)
    finals = [make(EventType.FINAL) for _ in range(3)]
    dropped = [d for f in finals for d in buffer.push(f).dropped]
    assert dropped == [(partial, "overflow_partial")]
    more = [make(EventType.FINAL) for _ in range(3)]
    dropped = [d for f in more for d in buffer.push(f).dropped]
    assert dropped == [(finals[0], "overflow")]
    assert len(buffer) == 5
    assert [e for _, e in buffer.drain()] == [*finals[1:], *more]


def test_spooling_hands_out_oldest_in_chunks_and_marks_superseded_spooled_partials() -> None:
    make = EventMaker()
    buffer = OutageBuffer(limit=10, spooling=True)
    old_partial = make(EventType.PARTIAL)
    spooled = [(0, e) for e in [*buffer.push(old_partial).spool]]
    events = [make(EventType.FINAL, leg="callee") for _ in range(10)]
    for event in events:
        spooled += buffer.push(event).spool
    assert [e for _, e in spooled] == [old_partial, events[0]]
    assert len(buffer) == 9
    assert not buffer.is_stale(old_partial)
    displaced = buffer.push(make(EventType.PARTIAL))
    assert [(e.seq, reason) for e, reason in displaced.dropped] == [(old_partial.seq, "superseded_partial")]
    assert buffer.is_stale(old_partial)
    buffer.settle([old_partial])
    assert not buffer.is_stale(old_partial)


def test_spool_failure_puts_events_back_in_front_and_stops_spooling() -> None:
    make = EventMaker()
    buffer = OutageBuffer(limit=4, spooling=True)
    events = [make(EventType.FINAL) for _ in range(5)]
    spooled = [item for e in events for item in buffer.push(e).spool]
    assert [e for _, e in spooled] == events[:2]
    displaced = buffer.spool_failed(spooled)
    assert not buffer.spooling
    assert displaced.dropped == [] and displaced.spool == []
    assert [e for _, e in buffer.drain()] == events


def test_ordinals_follow_publish_order() -> None:
    make = EventMaker()
    buffer = OutageBuffer(limit=10, spooling=False)
    assert buffer.last_ordinal == 0 and buffer.first_ordinal is None
    buffer.push(make(EventType.PARTIAL))
    buffer.push(make(EventType.FINAL, leg="callee"))
    buffer.push(make(EventType.PARTIAL))  # supersedes ordinal 1
    assert buffer.first_ordinal == 2 and buffer.last_ordinal == 3
    assert [o for o, _ in buffer.take(5)] == [2, 3]


# A step is an event to publish or the sender taking a batch (possibly failing and retrying it).
# Publishing is several times likelier than taking, so buffers fill and spill.
publish_step = st.tuples(st.just("event"), st.sampled_from(KINDS), st.sampled_from(LEGS))
take_step = st.tuples(st.just("take"), st.integers(1, 8), st.booleans())
step = st.one_of(publish_step, publish_step, publish_step, publish_step, take_step)
SPOOLED_PARTIAL_SUPERSEDED = [
    ("event", EventType.PARTIAL, LEGS[0]),
    ("event", EventType.FINAL, LEGS[1]),
    ("event", EventType.FINAL, LEGS[1]),
    ("event", EventType.PARTIAL, LEGS[0]),
]


@settings(max_examples=400, deadline=None)
@given(steps=st.lists(step, max_size=200), limit=st.integers(1, 12), spooling=st.booleans())
@example(steps=SPOOLED_PARTIAL_SUPERSEDED, limit=1, spooling=True)
def test_random_sequences_keep_finals_order_and_bound(
    steps: list[tuple[object, ...]], limit: int, spooling: bool
) -> None:
    """Drives the buffer like the publisher does: spool (a list here) before memory, a
    taken batch written or retried whole, stale spooled partials skipped."""
    make = EventMaker()
    buffer = OutageBuffer(limit=limit, spooling=spooling, hard_limit=limit * 3)
    spool: list[TranscriptEvent] = []
    written: list[TranscriptEvent] = []
    published: list[TranscriptEvent] = []
    dropped: list[tuple[TranscriptEvent, str]] = []

    def take(count: int) -> list[TranscriptEvent]:
        if spool:
            batch, spool[:count] = spool[:count], []
            fresh = [e for e in batch if not buffer.is_stale(e)]
            buffer.settle(batch)
            return fresh
        return [e for _, e in buffer.take(count)]

    for item in steps:
        if item[0] == "event":
            _, kind, (call_id, leg) = item
            assert isinstance(kind, EventType) and isinstance(call_id, str) and isinstance(leg, str)
            event = make(kind, call_id, leg)
            published.append(event)
            displaced = buffer.push(event)
            spool.extend(e for _, e in displaced.spool)
            dropped.extend(displaced.dropped)
            assert len(buffer) <= (limit if spooling else buffer.hard_limit)
        else:
            _, count, fails = item
            assert isinstance(count, int)
            batch = take(count)
            if fails:
                # The sender keeps a failed batch and writes it again: events published
                # meanwhile cannot overtake it.
                event = make(EventType.PARTIAL, *LEGS[0])
                published.append(event)
                displaced = buffer.push(event)
                spool.extend(e for _, e in displaced.spool)
                dropped.extend(displaced.dropped)
            written.extend(batch)
    while spool or len(buffer):
        written.extend(take(50))

    # Every event is written once or dropped once, for a stated reason.
    assert len(written) + len(dropped) == len(published)
    assert len({(e.call_id, e.leg, e.seq) for e in written}) == len(written)
    reasons = Counter(reason for _, reason in dropped)
    if spooling:
        assert set(reasons) <= {"superseded_partial"}
    # Finals and other non-partials are lost only past the hard limit without a spool.
    lost = [e for e, _ in dropped if e.type != EventType.PARTIAL]
    assert all(reason == "overflow" for e, reason in dropped if e.type != EventType.PARTIAL)
    if spooling or not reasons["overflow"]:
        assert lost == []
    # Per-leg order is publish order.
    for call_id, leg in LEGS:
        seqs = [e.seq for e in written if (e.call_id, e.leg) == (call_id, leg)]
        assert seqs == sorted(seqs)
    # The newest partial of each leg survives whenever a spool exists.
    if spooling:
        for call_id, leg in LEGS:
            partials = [e for e in published if (e.call_id, e.leg) == (call_id, leg)]
            partials = [e for e in partials if e.type == EventType.PARTIAL]
            if partials:
                assert partials[-1] in written
