"""RSS of one sphinx worker as Decoders are built, freed and the heap trimmed.

.venv/bin/python -m bench.decoder_memory [--decoders 20]
"""

from __future__ import annotations

import argparse
import gc
import time
from typing import Any

from callscribe.engine.process_care import rss_mb, trim_heap
from callscribe.engine.sphinx import SphinxOptions, _Worker


class _Discard:
    def put(self, message: Any) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--decoders", type=int, default=20)
    args = parser.parse_args()
    worker = _Worker(SphinxOptions(), _Discard())  # type: ignore[arg-type]
    print(f"worker loaded: {rss_mb():.0f} MB")
    started = time.perf_counter()
    decoders = [worker._new_decoder() for _ in range(args.decoders)]
    each = (time.perf_counter() - started) / args.decoders
    print(f"{args.decoders} more Decoders: {rss_mb():.0f} MB ({each:.2f} s each)")
    del decoders
    gc.collect()
    print(f"freed: {rss_mb():.0f} MB")
    trim_heap()
    print(f"malloc_trim(0): {rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
