"""The disk spool behind the outage buffer: FIFO across segments, prepend, restart, damage."""

from __future__ import annotations

from pathlib import Path

import pytest

from callscribe.events import EventType, TranscriptEvent
from callscribe.publish.spool import Spool


def finals(first: int, count: int) -> list[TranscriptEvent]:
    return [
        TranscriptEvent(
            type=EventType.FINAL, call_id="c1", leg="caller", seq=seq, text=f"utterance {seq}", ts=1
        )
        for seq in range(first, first + count)
    ]


def read_all(spool: Spool, batch: int = 4) -> list[TranscriptEvent]:
    out: list[TranscriptEvent] = []
    while len(spool):
        out += spool.peek(batch)
        spool.commit()
    return out


def test_fifo_across_segments_and_consumed_segments_are_deleted(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment_events=3)
    events = finals(1, 10)
    spool.append(events[:4])
    spool.append(events[4:])
    assert len(spool) == 10
    assert len(list(tmp_path.glob("*.jsonl"))) == 4
    assert spool.peek(2) == events[:2]
    assert spool.peek(2) == events[:2], "peek without commit must not consume"
    assert read_all(spool) == events
    assert list(tmp_path.glob("*.jsonl")) == []


def test_prepend_goes_before_everything(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment_events=3)
    spool.append(finals(10, 5))
    spool.prepend(finals(1, 2))
    assert [e.seq for e in read_all(spool)] == [1, 2, 10, 11, 12, 13, 14]


def test_a_new_process_replays_what_the_last_one_spooled(tmp_path: Path) -> None:
    first = Spool(tmp_path, segment_events=3)
    first.append(finals(5, 4))
    first.prepend(finals(1, 4))
    assert first.peek(3) == finals(1, 3)
    first.commit()
    first.close()
    second = Spool(tmp_path, segment_events=3)
    assert len(second) == 5
    assert [e.seq for e in read_all(second)] == [4, 5, 6, 7, 8]


def test_torn_and_corrupt_lines_are_skipped_not_fatal(tmp_path: Path) -> None:
    good = finals(1, 2)
    Spool(tmp_path).append(good)
    segment = next(tmp_path.glob("*.jsonl"))
    with segment.open("ab") as file:
        file.write(b'{"v":"1","type":"bogus"}\n')
        file.write(b"not json\n")
        file.write(b'{"v":"1","type":"final","call_id":"c1"')  # torn by a crash mid-write
    spool = Spool(tmp_path)
    assert len(spool) == 4
    assert read_all(spool, batch=10) == good
    assert spool.corrupt_lines == 2
    assert list(tmp_path.glob("*.jsonl")) == []


def test_one_process_per_spool_directory(tmp_path: Path) -> None:
    first = Spool(tmp_path)
    with pytest.raises(RuntimeError, match="in use by another process"):
        Spool(tmp_path)
    first.close()
    Spool(tmp_path).close()


def test_a_segment_removed_behind_its_back_is_counted_as_lost(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment_events=2)
    spool.append(finals(1, 4))
    first_segment = sorted(tmp_path.glob("*.jsonl"))[0]
    first_segment.unlink()
    assert read_all(spool) == finals(3, 2)
    assert spool.lost == 2
    spool.close()
