"""Every atheris target runs for a few seconds from its real-message seed corpus without a crash.

Longer runs on demand: `fuzz/run.sh SECONDS`. An input that crashes a parser is fixed with a
regression test holding that input next to the parser's unit tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz.corpus import seeds, write
from fuzz.targets import TARGETS

ROOT = Path(__file__).resolve().parents[2]
SECONDS_EACH = int(os.environ.get("CALLSCRIBE_FUZZ_SECONDS", "3"))


@pytest.fixture(scope="module")
def seed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("seeds")
    write(directory)
    return directory


def test_every_target_has_real_seeds_that_parse() -> None:
    corpus = seeds()
    assert set(corpus) == set(TARGETS)
    for name, inputs in corpus.items():
        assert inputs and all(isinstance(data, bytes) and data for data in inputs), name
        for data in inputs:
            TARGETS[name](data)  # the real messages themselves go through without an exception


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz_target_runs_clean(target: str, seed_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "fuzz.fuzz",
            target,
            str(corpus),
            str(seed_dir / target),
            f"-max_total_time={SECONDS_EACH}",
            "-timeout=10",
            "-rss_limit_mb=2048",
            "-print_final_stats=1",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=SECONDS_EACH + 90,
    )
    assert run.returncode == 0, f"{target} crashed:\n{run.stderr[-4000:]}"
    executed = [line for line in run.stderr.splitlines() if line.startswith("stat::number_of_executed_units")]
    assert executed and int(executed[0].split(":")[-1]) > 100, run.stderr[-2000:]
    assert not list(tmp_path.glob("crash-*"))
