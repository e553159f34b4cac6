"""The embedded sphinx engine, one pass once warm vs a second pass for every final, side by
side on the same audio: worker CPU per audio second (→ real-time legs per core) and WER.

Each leg is the three shared clips with pauses, twice (so all but a leg's first utterance
are decoded with a warm CMN), sent on the phone path: 16 kHz → 8 kHz μ-law → 16 kHz, as a
SIP leg arrives. One worker process (one core); legs fed as fast as the backlog allows.

    .venv/bin/python bench/sphinx_passes.py --legs 4

Variants: one_pass (the default: tree search live, warm CMN after the first second),
one_pass_full_search (live decoders also run the flat and best-path passes),
one_pass_cold_final_pass (a leg's first utterance keeps the second pass), two_pass (the
engine before issue 16).
The last line is `RESULT legs_per_core_one_pass=… legs_per_core_two_pass=… wer_one_pass=…
wer_two_pass=… cold_partials_bad=…` (cold_partials_bad: partials of a leg's first utterance
with under half their words in the reference).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import jiwer
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.support's clips

from sphinx_engine import cpu_seconds

from callscribe.codecs.g711 import PcmuDecoder, PcmuEncoder
from callscribe.codecs.resample import Resampler
from callscribe.engine.base import SAMPLE_RATE, Final, Partial, Recognition
from callscribe.engine.sphinx import SphinxEngine, SphinxOptions
from tests.support import CLIPS, load_clip

FRAME = SAMPLE_RATE // 50


def phone_band(audio16: np.ndarray) -> np.ndarray:
    """16 kHz int16 → 8 kHz μ-law → 16 kHz float32, through callscribe's own codecs."""
    down = np.asarray(audio16, dtype=np.int16).reshape(-1, 2).mean(axis=1).astype(np.int16)
    mulaw = PcmuEncoder().encode(down)
    pcm8 = PcmuDecoder().decode(mulaw)
    up = Resampler(8000)
    return np.concatenate([up.process(pcm8), up.flush()])


VARIANTS = {
    "one_pass": SphinxOptions(worker_nice=0),
    "one_pass_full_search": SphinxOptions(worker_nice=0, live_full_search=True),
    "one_pass_cold_final_pass": SphinxOptions(worker_nice=0, cold_final_pass=True),
    # The engine before issue 16: a second pass for every final, partials from a cold CMN.
    "two_pass": SphinxOptions(worker_nice=0, one_pass=False, cold_warmup_s=None),
}


async def run_engine(
    options: SphinxOptions, legs: int, audio: np.ndarray
) -> tuple[float, list[list[Recognition]]]:
    engine = SphinxEngine(workers=1, max_backlog_s=3600, options=options)
    await engine.start()
    results: list[list[Recognition]] = [[] for _ in range(legs)]
    streams = [engine.open_stream("bench", f"leg{i}", results[i].append) for i in range(legs)]
    await asyncio.sleep(1.0)
    pid = engine.worker_pids[0]
    assert pid is not None
    cpu_before = cpu_seconds(pid)
    for at in range(0, audio.size, FRAME):
        for stream in streams:
            stream.feed(audio[at : at + FRAME])
        await asyncio.sleep(0)
    await asyncio.gather(*(s.finish() for s in streams))
    cpu = cpu_seconds(pid) - cpu_before
    await engine.close()
    return legs * audio.size / SAMPLE_RATE / cpu, results


def wer_of(results: list[list[Recognition]], reference: str) -> float:
    hyps = [" ".join(e.text for e in r if isinstance(e, Final) and e.text) for r in results]
    return float(jiwer.wer([reference] * len(hyps), hyps))


def cold_partials_bad(results: list[list[Recognition]], reference: str) -> tuple[int, int]:
    """(bad, all) partials of each leg's first utterance: bad = under half its words in the reference."""
    words = set(reference.split())
    bad = total = 0
    for events in results:
        for event in events:
            if isinstance(event, Partial) and event.utt == 0:
                total += 1
                said = event.text.split()
                bad += sum(w in words for w in said) * 2 < len(said)
    return bad, total


async def main(legs: int, variants: list[str]) -> None:
    clips = [load_clip(name) for name in CLIPS]
    pause = np.zeros(SAMPLE_RATE, dtype=np.int16)
    pcm = np.concatenate([part for clip in clips * 2 for part in (clip.pcm, pause)])
    audio = phone_band(pcm)
    reference = " ".join(clip.reference for clip in clips * 2)
    out = {}
    for name in variants:
        options = VARIANTS[name]
        started = time.perf_counter()
        per_core, results = await run_engine(options, legs, audio)
        bad, total = cold_partials_bad(results, reference)
        out[name] = (per_core, wer_of(results, reference), bad, total)
        finals = sum(isinstance(e, Final) for e in results[0])
        first = [e.text for e in results[0] if isinstance(e, Partial) and e.utt == 0]
        print(
            f"{name}: {per_core:.2f} real-time legs per core (worker CPU), WER {out[name][1]:.3f}, "
            f"{finals} finals per leg, cold partials bad {bad}/{total}, "
            f"wall {time.perf_counter() - started:.0f}s; "
            f"leg 0's first partials: {first[:3]}",
            file=sys.stderr,
        )
    if set(out) != set(VARIANTS):
        return
    one, two = out["one_pass"], out["two_pass"]
    full, cold = out["one_pass_full_search"], out["one_pass_cold_final_pass"]
    print(
        f"RESULT legs_per_core_one_pass={one[0]:.2f} legs_per_core_two_pass={two[0]:.2f} "
        f"wer_one_pass={one[1]:.3f} wer_two_pass={two[1]:.3f} "
        f"cold_partials_bad={one[2]}/{one[3]} (two pass: {two[2]}/{two[3]}; full live search: "
        f"{full[0]:.2f} legs/core, WER {full[1]:.3f}; cold final pass: {cold[0]:.2f}, WER {cold[1]:.3f})"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--legs", type=int, default=4)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args()
    asyncio.run(main(args.legs, args.variants))
