"""How many concurrent G.711 legs one core ingests in real time.

Per packet: RTP parse → jitter buffer → μ-law decode → loss concealment → the leg's
resampler (8 → 16 kHz float32, soxr) → a sink engine that only counts samples. The UDP
syscall and the model are excluded. Packets are real speech (a LibriVox clip, μ-law),
sent 20 ms at a time to every leg in turn, with 1 % reordering, as a busy bridge sees them.
Time is CPU time of this one process (one thread), so a shared machine does not skew it.

    .venv/bin/python bench/ingest.py [--legs 2000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import gc
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr

from callscribe.bridge.events import AudioReceived
from callscribe.bridge.rtp.packet import RtpPacket
from callscribe.bridge.rtp.receiver import RtpLegReceiver
from callscribe.bridge.rtp.sender import read_wav_mono
from callscribe.calls import CallRegistry, Leg
from callscribe.codecs import encoder_for, spec_by_name
from callscribe.codecs.resample import Resampler
from callscribe.engine.base import Audio as Audio16k
from callscribe.engine.base import Emit, Engine, LegStream
from callscribe.events import TranscriptEvent
from callscribe.metrics import Metrics

PTIME_S = 0.02
CLIP = Path(__file__).resolve().parents[2] / "shared" / "audio" / "librivox-0870.wav"


class CountingStream(LegStream):
    def __init__(self) -> None:
        self.samples = 0

    def feed(self, audio: Audio16k) -> None:
        self.samples += audio.size

    async def finish(self) -> None:
        return None


class SinkEngine(Engine):
    """Stands in for the model: the bench measures ingest, not recognition."""

    name = "sink"

    def __init__(self) -> None:
        self.streams: list[CountingStream] = []

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    @property
    def ready(self) -> bool:
        return True

    def open_stream(self, call_id: str, leg: str, emit: Emit) -> LegStream:
        stream = CountingStream()
        self.streams.append(stream)
        return stream


class NullSink:
    def publish(self, event: TranscriptEvent) -> None:
        return None


def speech_packets(clip: Path, seconds: float, reorder: float, seed: int) -> list[bytes]:
    """One leg's RTP datagrams in arrival order: real speech, μ-law, 20 ms, some swapped."""
    pcm, rate = read_wav_mono(clip)
    speech = soxr.resample(pcm, rate, 8000).astype(np.int16)
    frames = int(seconds / PTIME_S)
    audio = np.resize(speech, frames * 160)  # loop the clip
    encoder = encoder_for(spec_by_name("pcmu"))
    packets = [
        RtpPacket(0, n % 65536, 160 * n, 0x5EED, encoder.encode(audio[n * 160 : (n + 1) * 160])).serialize()
        for n in range(frames)
    ]
    rng = random.Random(seed)
    for n in range(1, frames - 1):
        if rng.random() < reorder:
            packets[n], packets[n + 1] = packets[n + 1], packets[n]
    return packets


@dataclass
class Stage:
    name: str
    cpu_s: float
    packets: int
    audio_s: float

    @property
    def us_per_packet(self) -> float:
        return self.cpu_s / self.packets * 1e6

    @property
    def x_realtime(self) -> float:
        return self.audio_s / self.cpu_s


def run(name: str, legs: int, packets: list[bytes], per_packet: Callable[[int, bytes, float], None]) -> Stage:
    gc.collect()
    start = time.process_time()
    for tick, data in enumerate(packets):
        now = tick * PTIME_S
        for leg in range(legs):
            per_packet(leg, data, now)
    cpu = time.process_time() - start
    return Stage(name, cpu, legs * len(packets), legs * len(packets) * PTIME_S)


def call_overhead_ns() -> float:
    """Cost of one empty Python call here: compare runs across machines with it."""

    def nothing(value: int) -> int:
        return value

    start = time.process_time()
    for n in range(1_000_000):
        nothing(n)
    return (time.process_time() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--legs", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--reorder", type=float, default=0.01)
    parser.add_argument("--clip", type=Path, default=CLIP, help="16-bit WAV of speech")
    parser.add_argument("--batch-ms", type=int, default=60, help="RtpLegReceiver batch_ms (as RtpIngest)")
    args = parser.parse_args()
    packets = speech_packets(args.clip, args.seconds, args.reorder, seed=1)
    legs = args.legs
    stages: list[Stage] = []

    def parse(leg: int, data: bytes, now: float) -> None:
        RtpPacket.parse(data)

    stages.append(run("parse", legs, packets, parse))

    def new_receivers(batch_ms: int) -> list[RtpLegReceiver]:
        return [RtpLegReceiver("pcmu", jitter_ms=60, batch_ms=batch_ms) for _ in range(legs)]

    receivers = new_receivers(args.batch_ms)

    def receive(leg: int, data: bytes, now: float) -> None:
        receivers[leg].receive(data, now)
        receivers[leg].poll(now)

    stages.append(run("parse+jitter+decode", legs, packets, receive))

    resamplers: list[Resampler] = []
    decoded = [0]

    def receive_resample(leg: int, data: bytes, now: float) -> None:
        for event in (*receivers[leg].receive(data, now), *receivers[leg].poll(now)):
            if isinstance(event, AudioReceived):
                pcm = np.frombuffer(event.payload, dtype=np.int16)
                decoded[0] += pcm.size
                resamplers[leg].process(pcm)

    for batch_ms in sorted({0, args.batch_ms}):
        receivers = new_receivers(batch_ms)
        resamplers = [Resampler(8000) for _ in range(legs)]
        decoded[0] = 0
        stages.append(run(f"+resample, batch {batch_ms} ms", legs, packets, receive_resample))
        for receiver in receivers:
            decoded[0] += sum(len(e.payload) // 2 for e in receiver.flush() if isinstance(e, AudioReceived))
        # Nothing lost, 1 % reordered: every sample must come out, none invented.
        assert decoded[0] == legs * len(packets) * 160, (decoded[0], legs * len(packets) * 160)

    engine = SinkEngine()
    registry = CallRegistry(engine, NullSink(), Metrics(), max_legs=legs)
    receivers = new_receivers(args.batch_ms)
    open_legs: list[Leg] = [registry.open_leg(f"bench-{n}", "caller") for n in range(legs)]

    def full_leg(leg: int, data: bytes, now: float) -> None:
        target = open_legs[leg]
        for event in (*receivers[leg].receive(data, now), *receivers[leg].poll(now)):
            if isinstance(event, AudioReceived):
                target.feed(np.frombuffer(event.payload, dtype=np.int16), 8000)

    stages.append(run(f"+Leg.feed, batch {args.batch_ms} ms", legs, packets, full_leg))
    fed = sum(stream.samples for stream in engine.streams) / 16000
    expected = legs * len(packets) * PTIME_S

    print(f"{legs} legs × {args.seconds:.0f} s of μ-law speech, 20 ms packets, {args.reorder:.0%} reordered")
    print(f"this machine: {call_overhead_ns():.0f} ns per empty Python call (compare machines by it)")
    print(f"{'stage':<30}{'µs/packet':>10}{'x real time':>13}{'legs/core':>11}")
    for stage in stages:
        print(
            f"{stage.name:<30}{stage.us_per_packet:>10.2f}{stage.x_realtime:>13.0f}{stage.x_realtime:>11.0f}"
        )
    print(
        f"16 kHz audio at the sink: {fed:.0f} s of {expected:.0f} s sent (the rest waits in batches/filters)"
    )
    final = stages[-1]
    # One leg needs one second of audio per second: legs/core = × real time of one core.
    print(f"RESULT legs_per_core={final.x_realtime:.0f} x_realtime={final.x_realtime:.0f}")


if __name__ == "__main__":
    main()
