"""Run one target under atheris: `python -m fuzz.fuzz TARGET [libFuzzer args: CORPUS_DIR -max_total_time=N]`.

Inputs that crash are written by libFuzzer as crash-<sha1> in the working directory; replay one
with `python -m fuzz.fuzz TARGET crash-<sha1>`.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["callscribe"]):
    from fuzz.targets import TARGETS


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        raise SystemExit(
            f"usage: python -m fuzz.fuzz TARGET [libFuzzer args]; TARGET is one of {sorted(TARGETS)}"
        )
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
