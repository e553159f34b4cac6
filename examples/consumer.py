"""A consumer of callscribe's finals: consumer group, crash recovery, dedupe, rebuild.

    python examples/consumer.py --group qa --name worker-1           # consume finals
    python examples/consumer.py --rebuild <call_id>                  # one call's transcript

What it shows (docs/contract-v2.md):
- A consumer group on `{prefix}:finals`. Each final goes to one consumer of the group
  (`XREADGROUP ... >`) and stays in the group's pending list until it is XACKed.
- A consumer that crashed leaves entries pending. The others take them over with
  `XAUTOCLAIM` once those entries have been idle for `--min-idle-ms`, before they read new
  entries.
- Dedupe on call_id+leg+seq. The publisher writes at least once: a retried batch can repeat
  an entry. A claimed entry may already have been processed. So "process" is one Lua
  script: HSETNX of the final into `{prefix}:transcript:{<call_id>}` under `leg:seq`, and
  only when that field is new, a `leg:seq@consumer` line on
  `{prefix}:processed:{<call_id>}:<group>`. A redelivered final
  therefore changes nothing. The script runs atomically, so a crash cannot leave a final
  marked as processed without its effect.
- `--rebuild`: read one call's stream after call.ended (schema v2 keeps every final and
  call.started there) and print its transcript in time order.

Only `redis` (redis-py) is needed; it reads v1 and v2 entries.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis

# Record one final once. KEYS: transcript hash, processed list. ARGV: field, value.
# Returns 1 when the final is new, 0 when it was processed before.
PROCESS_ONCE = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('RPUSH', KEYS[2], ARGV[1] .. '@' .. ARGV[3])
  return 1
end
return 0
"""


@dataclass(frozen=True)
class Final:
    call_id: str
    leg: str
    seq: int
    start_ms: int
    end_ms: int
    text: str

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> Final:
        if fields.get("v") not in ("1", "2") or fields.get("type") != "final":
            raise ValueError(f"not a v1/v2 final: v={fields.get('v')!r} type={fields.get('type')!r}")
        return cls(
            fields["call_id"],
            fields["leg"],
            int(fields["seq"]),
            int(fields.get("start_ms") or 0),
            int(fields.get("end_ms") or 0),
            fields.get("text", ""),
        )


class FinalsConsumer:
    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        group: str,
        name: str,
        min_idle_ms: int = 30_000,
        slow_ms: int = 0,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.stream = f"{prefix}:finals"
        self.group = group
        self.name = name
        self.min_idle_ms = min_idle_ms
        self.slow_ms = slow_ms  # a stand-in for real work, so a test can kill us mid-batch
        self.processed = 0
        self.duplicates = 0
        self._process_once = client.register_script(PROCESS_ONCE)

    def ensure_group(self) -> None:
        try:
            # From the start of the stream: a new group sees every final still stored.
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def claim_abandoned(self) -> int:
        """Take over entries that another consumer read and did not ack within min_idle_ms."""
        claimed, cursor = 0, "0-0"
        while True:
            reply: Any = self.client.xautoclaim(
                self.stream, self.group, self.name, self.min_idle_ms, start_id=cursor, count=100
            )
            cursor, entries = reply[0], reply[1]
            self._handle(entries)
            claimed += len(entries)
            if cursor in ("0-0", b"0-0"):
                return claimed

    def run_once(self, block_ms: int = 1000) -> int:
        """Claim what crashed consumers left, then read new finals; returns entries handled."""
        handled = self.claim_abandoned()
        reply: Any = self.client.xreadgroup(
            self.group, self.name, {self.stream: ">"}, count=50, block=block_ms
        )
        for _stream, entries in reply or []:
            self._handle(entries)
            handled += len(entries)
        return handled

    def _handle(self, entries: list[tuple[str, dict[str, str]]]) -> None:
        for entry_id, fields in entries:
            try:
                final = Final.from_fields(fields)
            except (ValueError, KeyError) as exc:
                print(f"skipping entry {entry_id}: {exc}", file=sys.stderr)
                self.client.xack(self.stream, self.group, entry_id)
                continue
            if self.slow_ms:
                time.sleep(self.slow_ms / 1000)
            value = json.dumps({"start_ms": final.start_ms, "end_ms": final.end_ms, "text": final.text})
            # Both keys carry the call's hash tag: one slot, so the script also runs on a Cluster.
            keys = [
                f"{self.prefix}:transcript:{{{final.call_id}}}",
                f"{self.prefix}:processed:{{{final.call_id}}}:{self.group}",
            ]
            new = self._process_once(keys=keys, args=[f"{final.leg}:{final.seq}", value, self.name])
            if new:
                self.processed += 1
            else:
                self.duplicates += 1
            # Acked only once processed: a crash before this line leaves the entry pending.
            self.client.xack(self.stream, self.group, entry_id)


def rebuild(client: redis.Redis, prefix: str, call_id: str) -> Iterator[tuple[int, str, str]]:
    """(start_ms, leg, text) of every final of an ended call, in time order, each once."""
    seen: set[tuple[str, str]] = set()
    finals = []
    entries: Any = client.xrange(f"{prefix}:call:{{{call_id}}}")
    for _id, fields in entries:
        if fields.get("type") != "final":
            continue
        final = Final.from_fields(fields)
        if (final.leg, str(final.seq)) in seen or not final.text:
            continue
        seen.add((final.leg, str(final.seq)))
        finals.append(final)
    for final in sorted(finals, key=lambda f: (f.start_ms, f.leg, f.seq)):
        yield final.start_ms, final.leg, final.text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--prefix", default="callscribe")
    parser.add_argument("--group", default="consumers")
    parser.add_argument("--name", default="consumer-1")
    parser.add_argument("--min-idle-ms", type=int, default=30_000)
    parser.add_argument("--slow-ms", type=int, default=0)
    parser.add_argument("--rebuild", metavar="CALL_ID")
    args = parser.parse_args()
    client = redis.Redis.from_url(args.redis_url, decode_responses=True)
    if args.rebuild:
        for start_ms, leg, text in rebuild(client, args.prefix, args.rebuild):
            print(f"[{start_ms // 60000:02d}:{start_ms // 1000 % 60:02d}] {leg}: {text}")
        return
    consumer = FinalsConsumer(client, args.prefix, args.group, args.name, args.min_idle_ms, args.slow_ms)
    consumer.ensure_group()
    stop = False

    def on_signal(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"consumer {args.name} of group {args.group} on {consumer.stream}", flush=True)
    while not stop:
        consumer.run_once()
    print(f"processed {consumer.processed}, duplicates skipped {consumer.duplicates}", flush=True)


if __name__ == "__main__":
    main()
