"""Cost of appending one event line to a spool file, with and without fsync.

.venv/bin/python -m bench.spool_fsync [--events 500] [--dir .]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=500)
    parser.add_argument("--dir", default=".")
    args = parser.parse_args()
    head = b'{"type":"final","call_id":"x","leg":"caller","seq":"12","utt":"3","text":"'
    line = head + b"w" * 120 + b'"}\n'
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        for sync in (False, True):
            with open(os.path.join(directory, f"spool-{sync}.jsonl"), "ab") as file:
                started = time.perf_counter()
                for _ in range(args.events):
                    file.write(line)
                    file.flush()
                    if sync:
                        os.fsync(file.fileno())
                each = (time.perf_counter() - started) / args.events
            label = "write+flush+fsync" if sync else "write+flush"
            print(f"{label}: {each * 1e6:.0f} us per {len(line)}-byte event")


if __name__ == "__main__":
    main()
