"""OutageBuffer.spill: everything in memory goes to the spool at once, in order, and a spooled
partial is still superseded by a newer one of its leg (skipped on replay)."""

from __future__ import annotations

from callscribe.events import EventType, TranscriptEvent
from callscribe.publish.outage import OutageBuffer


def ev(kind: EventType, seq: int, leg: str = "caller") -> TranscriptEvent:
    return TranscriptEvent(type=kind, call_id="c1", leg=leg, seq=seq)


def test_spill_hands_every_event_to_the_spool_oldest_first() -> None:
    buffer = OutageBuffer(limit=100, spooling=True)
    for seq, kind in enumerate([EventType.LEG_STARTED, EventType.PARTIAL, EventType.FINAL], start=1):
        buffer.push(ev(kind, seq))
    displaced = buffer.spill()
    assert [(o, e.seq) for o, e in displaced.spool] == [(1, 1), (2, 2), (3, 3)]
    assert not displaced.dropped and len(buffer) == 0 and buffer.first_ordinal is None
    # A newer partial of the leg makes the spooled one stale.
    newer = buffer.push(ev(EventType.PARTIAL, 4))
    assert [reason for _, reason in newer.dropped] == ["superseded_partial"]
    assert buffer.is_stale(ev(EventType.PARTIAL, 2))


def test_spill_without_a_spool_keeps_everything_in_memory() -> None:
    buffer = OutageBuffer(limit=100, spooling=False)
    buffer.push(ev(EventType.FINAL, 1))
    displaced = buffer.spill()
    assert not displaced.spool and not displaced.dropped and len(buffer) == 1
