"""The disk spool: events that did not fit in the outage buffer, first in, first out.

JSON lines in segment files named by a zero-padded order number, so a restarted
process replays what the previous one spooled, in order. `prepend` writes a segment
that sorts before all others (a batch that was in flight when the publisher closed is
older than everything spooled while it was in flight). Reads are `peek` then `commit`:
nothing leaves the disk before Redis has it. One spool directory per process.
"""

from __future__ import annotations

import fcntl
import json
import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from callscribe.events import TranscriptEvent

log = logging.getLogger(__name__)

SEGMENT_SUFFIX = ".jsonl"
LOCK_NAME = ".lock"
# Order numbers start mid-range so segments can be prepended as well as appended.
FIRST_ORDER = 10**15
ORDER_DIGITS = 17


@dataclass
class Segment:
    path: Path
    events: int  # not yet committed
    offset: int = 0  # bytes committed


class Spool:
    def __init__(self, directory: Path, segment_events: int = 2000) -> None:
        self.directory = directory
        self.segment_events = segment_events
        self.corrupt_lines = 0
        self.lost = 0  # events of segment files removed behind our back
        directory.mkdir(parents=True, exist_ok=True)
        # Two processes replaying and appending the same segments would duplicate and lose
        # events: the first holds an exclusive lock until close().
        self._lock = (directory / LOCK_NAME).open("a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise RuntimeError(f"spool directory {directory} is in use by another process") from None
        self._segments: deque[Segment] = deque()
        for path in sorted(directory.glob(f"*{SEGMENT_SUFFIX}")):
            with path.open("rb") as file:
                # A torn last line (a crash mid-write) is not an event.
                lines = sum(1 for line in file if line.endswith(b"\n"))
            if lines:
                self._segments.append(Segment(path, lines))
            else:
                path.unlink()
        orders = [int(s.path.stem) for s in self._segments if s.path.stem.isdigit()]
        self._low = min(orders, default=FIRST_ORDER)
        self._high = max(orders, default=FIRST_ORDER)
        self._tail: IO[bytes] | None = None  # open for appending to the last segment
        self._tail_written = 0
        self._peeked: list[int] = []  # byte offset after each peeked line
        self._length = sum(s.events for s in self._segments)

    def __len__(self) -> int:
        return self._length

    def append(self, events: Iterable[TranscriptEvent]) -> None:
        """Write events at the end; raises OSError (nothing is half-counted) if the disk fails."""
        data = [_encode(event) for event in events]
        start = 0
        while start < len(data):
            if self._tail is None or self._tail_written >= self.segment_events:
                self._open_tail()
            assert self._tail is not None
            room = self.segment_events - self._tail_written
            chunk = data[start : start + room]
            self._tail.write(b"".join(chunk))
            self._tail.flush()
            self._tail_written += len(chunk)
            self._segments[-1].events += len(chunk)
            self._length += len(chunk)
            start += len(chunk)

    def prepend(self, events: Iterable[TranscriptEvent]) -> None:
        data = [_encode(event) for event in events]
        if not data:
            return
        self._low -= 1
        path = self._path(self._low)
        path.write_bytes(b"".join(data))
        self._segments.appendleft(Segment(path, len(data)))
        self._length += len(data)
        self._peeked = []

    def peek(self, count: int) -> list[TranscriptEvent]:
        """Up to `count` oldest events, from the first segment only. Undecodable lines are
        skipped (and counted in `corrupt_lines`) but still consumed by `commit`."""
        self._peeked = []
        events: list[TranscriptEvent] = []
        while True:
            if not self._segments:
                return []
            segment = self._segments[0]
            if segment.events <= 0:
                self._drop_head()
                continue
            try:
                file = segment.path.open("rb")
                break
            except FileNotFoundError:
                log.error("spool segment %s vanished: %d events lost", segment.path, segment.events)
                self.lost += segment.events
                self._length -= segment.events
                self._drop_head()
        with file:
            file.seek(segment.offset)
            while len(self._peeked) < count:
                line = file.readline()
                if not line.endswith(b"\n"):
                    break  # end of file (a torn last line is completed or never counted)
                self._peeked.append(file.tell())
                try:
                    events.append(_decode(line))
                except ValueError as exc:
                    self.corrupt_lines += 1
                    log.error("spool %s: skipping undecodable line: %s", segment.path, exc)
        return events

    def commit(self) -> None:
        """The events of the last peek are in Redis: forget them."""
        if not self._peeked or not self._segments:
            return
        segment = self._segments[0]
        segment.offset = self._peeked[-1]
        segment.events -= len(self._peeked)
        self._length -= len(self._peeked)
        self._peeked = []
        if segment.events <= 0:
            self._drop_head()

    def close(self) -> None:
        """Close the files; the first segment loses its replayed lines, so the next process
        starts where this one stopped (after a crash it replays them again: at-least-once)."""
        if self._tail is not None:
            self._tail.close()
            self._tail = None
        if self._segments and self._segments[0].offset > 0:
            head = self._segments[0]
            with head.path.open("rb") as file:
                file.seek(head.offset)
                rest = file.read()
            partial = head.path.with_suffix(".tmp")
            partial.write_bytes(rest)
            partial.replace(head.path)
            head.offset = 0
        if not self._lock.closed:
            self._lock.close()  # releases the flock

    def _drop_head(self) -> None:
        segment = self._segments.popleft()
        if self._tail is not None and self._tail.name == str(segment.path):
            self._tail.close()
            self._tail = None
        segment.path.unlink(missing_ok=True)

    def _open_tail(self) -> None:
        if self._tail is not None:
            self._tail.close()
        self._high += 1
        path = self._path(self._high)
        self._tail = path.open("ab")
        self._tail_written = 0
        self._segments.append(Segment(path, 0))

    def _path(self, order: int) -> Path:
        return self.directory / f"{order:0{ORDER_DIGITS}d}{SEGMENT_SUFFIX}"


def _encode(event: TranscriptEvent) -> bytes:
    return (json.dumps(event.to_fields(), separators=(",", ":")) + "\n").encode()


def _decode(line: bytes) -> TranscriptEvent:
    try:
        fields = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"not JSON ({exc}): {line[:80]!r}") from None
    if not isinstance(fields, dict) or not all(isinstance(v, str) for v in fields.values()):
        raise ValueError(f"expected an object of string fields, got {line[:80]!r}")
    return TranscriptEvent.from_fields(fields)
