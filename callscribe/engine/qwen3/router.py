"""Which `vllm serve` replica a leg's decode goes to (sans-IO: time is passed in).

Legs are sticky: every decode of a leg goes to the replica it was first given while that
replica stays up, so its requests share a server (and its prefix cache). A new leg, or one
whose replica went down, goes to the up replica with the fewest requests in flight. A
replica is taken out on its first failed request or health probe and may come back after a
backoff that doubles with each consecutive failure; only a completed decode resets the
backoff, so a replica whose /health answers but whose streams keep failing stays out longer
and longer instead of flapping.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

# Sticky assignments remembered at most (oldest forgotten first: a forgotten leg simply
# gets the least loaded replica again).
_MAX_STICKY_LEGS = 65_536


@dataclass
class Replica:
    url: str
    up: bool = True
    in_flight: int = 0
    failures: int = 0  # consecutive, reset by a completed decode
    retry_at: float = 0.0  # while down: the next health probe may bring it back from here
    last_error: str = ""
    completed: int = 0
    failed: int = 0


class ReplicaRouter:
    def __init__(self, urls: list[str], backoff_sec: float = 1.0, max_backoff_sec: float = 30.0) -> None:
        if not urls:
            raise ValueError("engine remote needs at least one vllm serve URL (--vllm-url)")
        self.replicas = [Replica(url.rstrip("/")) for url in urls]
        if len({r.url for r in self.replicas}) != len(self.replicas):
            raise ValueError(f"vllm serve URLs must be distinct, got {urls}")
        self._backoff = backoff_sec
        self._max_backoff = max_backoff_sec
        self._sticky: OrderedDict[str, Replica] = OrderedDict()

    @property
    def up(self) -> list[Replica]:
        return [r for r in self.replicas if r.up]

    def pick(self, leg: str) -> Replica | None:
        """The leg's replica while it is up, else the least loaded up replica (None: all down)."""
        current = self._sticky.get(leg)
        if current is not None and current.up:
            self._sticky.move_to_end(leg)
            return current
        candidates = self.up
        if not candidates:
            return None
        legs_on = {id(r): 0 for r in candidates}
        for replica in self._sticky.values():
            if id(replica) in legs_on:
                legs_on[id(replica)] += 1
        chosen = min(candidates, key=lambda r: (r.in_flight, legs_on[id(r)]))
        self._sticky[leg] = chosen
        self._sticky.move_to_end(leg)
        while len(self._sticky) > _MAX_STICKY_LEGS:
            self._sticky.popitem(last=False)
        return chosen

    def replica_of(self, leg: str) -> Replica | None:
        return self._sticky.get(leg)

    def forget(self, leg: str) -> None:
        self._sticky.pop(leg, None)

    def succeeded(self, replica: Replica) -> None:
        replica.failures = 0
        replica.completed += 1

    def failed(self, replica: Replica, reason: str, now: float) -> bool:
        """Take the replica out; True when it was up until now (callers log the transition)."""
        was_up = replica.up
        replica.failed += 1
        replica.last_error = reason
        if was_up or now >= replica.retry_at:
            # One backoff step per outage observed, not per request failing in it.
            replica.failures += 1
        replica.up = False
        replica.retry_at = now + min(self._max_backoff, self._backoff * 2 ** (replica.failures - 1))
        return was_up

    def due_for_probe(self, now: float) -> list[Replica]:
        """Down replicas whose backoff has passed."""
        return [r for r in self.replicas if not r.up and now >= r.retry_at]

    def probe_ok(self, replica: Replica) -> bool:
        """Health probe answered: back in. True when it was down."""
        was_down = not replica.up
        replica.up = True
        return was_down

    def next_retry_at(self) -> float | None:
        down = [r.retry_at for r in self.replicas if not r.up]
        return min(down) if down else None
