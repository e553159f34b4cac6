"""Limits every ingest shares: connections per source, and the refusals of the leg registry.

Pure state, no I/O: the shells (AudioSocket server, fork routes, RTP ingest, SIP session)
ask before they accept, and count a refusal with its `DropReason`.
"""

from __future__ import annotations

from collections import Counter


class LegConflict(Exception):
    """A leg of that name is already open in that call: 409 on HTTP ingest. Not a ValueError,
    so no ingest can mistake it for a bad request (400)."""


class AtCapacity(RuntimeError):
    """The bridge is at its configured leg limit."""


class SourceLimit:
    """Open connections per source address, capped (a flood from one PBX cannot starve others)."""

    def __init__(self, per_source: int) -> None:
        self.per_source = per_source
        self._open: Counter[str] = Counter()

    def acquire(self, source: str) -> bool:
        if self._open[source] >= self.per_source:
            return False
        self._open[source] += 1
        return True

    def release(self, source: str) -> None:
        self._open[source] -= 1
        if self._open[source] <= 0:
            del self._open[source]

    def count(self, source: str) -> int:
        return self._open[source]
