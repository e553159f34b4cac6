"""Redaction with real speech: espeak-ng says a card number, its CVV and a room number;
the audio goes over RTP (μ-law, 8 kHz) through the real sphinx engine into Redis. No card
digits may appear anywhere in Redis, the spool folder or the logs; DTMF is masked; the
room number is kept. A second check sends card events into a publisher whose Redis is down,
so they land in the outage spool on disk: redacted there too."""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import subprocess
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis
import soxr

from callscribe.bridge.rtp.packet import RtpPacket
from callscribe.calls import CallRegistry
from callscribe.codecs.dtmf import TelephoneEvent
from callscribe.events import EventType, TranscriptEvent
from callscribe.metrics import Metrics
from callscribe.publish.redis_streams import RedisStreamsPublisher
from callscribe.redact import MASK, Redaction, Redactor, luhn_valid
from callscribe.settings import Settings
from tests.integration.test_rtp_ingest import ISOLATED, Impairment, schedule, send_schedule, ulaw_frames
from tests.scripted_engine import TimedScriptEngine
from tests.support import ServiceFactory

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")

CARD = "4111111111111111"
SPOKEN = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# What sphinx hears of espeak-ng's en-us voice at 130 wpm, sent as μ-law (checked by hand):
# "my daughter i'm married or one one one one one one one one one one one one one one one":
# fifteen of the card's sixteen digits. Its CVV and "room four" come out as other words.
SAYINGS = (
    "my card number is four one one one one one one one one one one one one one one one",
    "the security code is seven three one",
    "room four please",
)


def espeak(text: str, path: Path) -> np.ndarray:
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "130", "-w", str(path), text], check=True)
    with wave.open(str(path)) as wav:
        rate = wav.getframerate()
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), np.int16)
    return soxr.resample(pcm, rate, 16000).astype(np.int16)


def digit_runs(text: str) -> list[str]:
    """Runs of digits a reader recovers from `text`: written digits and spoken digit words."""
    runs, current = [], ""
    for token in re.findall(r"[a-z]+|\d+", text.lower()):
        if token.isdigit():
            current += token
        elif token in SPOKEN or token == "oh":
            current += "0" if token == "oh" else str(SPOKEN.index(token))
        else:
            if current:
                runs.append(current)
            current = ""
    return [*runs, current] if current else runs


def assert_no_card(text: str, where: str) -> None:
    for run in digit_runs(text):
        windows = [run[i : i + n] for n in range(13, 20) for i in range(len(run) - n + 1)]
        assert not any(luhn_valid(w) for w in windows), f"Luhn-valid card digits in {where}: {run}"
        assert "111111" not in run, f"a spoken card digit run in {where}: {run}"


async def everything_in_redis(redis: aioredis.Redis, prefix: str) -> tuple[str, list[TranscriptEvent]]:
    """Every field value of every stream under `prefix`, and the call streams' events."""
    out, events = [], []
    async for key in redis.scan_iter(match=f"{prefix}*"):
        if await redis.type(key) == "stream":
            entries: Any = await redis.xrange(key)
            out += [value for _id, fields in entries for value in fields.values()]
            if ":call:" in key:
                events += [TranscriptEvent.from_fields(fields) for _id, fields in entries]
    return "\n".join(out), events


async def test_spoken_card_over_rtp_is_redacted_everywhere(
    make_service: ServiceFactory,
    redis: aioredis.Redis,
    key_prefix: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="callscribe")
    pause = np.zeros(24000, np.int16)
    speech = np.concatenate(
        [part for text in SAYINGS for part in (espeak(text, tmp_path / "say.wav"), pause)]
    )
    spool = tmp_path / "spool"
    async with make_service(redact=["pci"], spool_dir=spool, leg_idle_timeout_sec=1.0, **ISOLATED) as svc:
        ssrc = 0xCA4D
        payloads = ulaw_frames(np.concatenate([np.zeros(8000, np.int16), speech, np.zeros(16000, np.int16)]))
        plan = schedule(payloads, ssrc, Impairment())
        # Two keyed digits after the speech (RFC 4733, payload type 101).
        _, last = plan[-1]
        seq, ts = int.from_bytes(last[2:4], "big"), int.from_bytes(last[4:8], "big")
        for k, digit in enumerate("41"):
            event = TelephoneEvent.for_digit(digit, True, 800).serialize()
            plan.append(
                (plan[-1][0] + 0.1, RtpPacket(101, seq + 1 + k, ts + 1600 * (k + 1), ssrc, event).serialize())
            )
        await send_schedule(svc.settings.rtp_port, plan)  # real time, as a phone sends
        stored, events = "", []
        for _ in range(240):
            stored, events = await everything_in_redis(redis, key_prefix)
            if any(e.type == EventType.CALL_ENDED for e in events):
                break
            await asyncio.sleep(0.5)
    finals = [e.text for e in events if e.type == EventType.FINAL]
    print("\nfinals in redis:", finals)
    assert any(e.type == EventType.CALL_ENDED for e in events), "the call did not end"
    assert [e.text for e in events if e.type == EventType.DTMF] == [MASK, MASK]
    # The card was heard as a digit run and masked word for word, in text and words alike.
    masked = [e for e in events if e.type == EventType.FINAL and f"{MASK} " * 13 in f"{e.text} "]
    assert masked, f"no final with 13+ masked digits: was the card heard at all? {finals}"
    assert all(sum(w["w"] == MASK for w in e.words) >= 13 for e in masked)
    # Every text-bearing field of every event (ids and timestamps are digit runs by design).
    # (An error's text names the leg, "leg rtp-127.0.0.1-39223-0000ca4d/caller: ...": the call
    # id is taken out, its digits once made a Luhn-valid run by chance.)
    texts = [
        f"{e.text}\n{e.stable}\n{e.unstable}\n{' '.join(w['w'] for w in e.words)}".replace(e.call_id, "")
        for e in events
    ]
    assert_no_card("\n\n".join(texts), "redis")
    # One assert each: pytest's message for `a not in s and b not in s` claims `a` "is
    # contained here" when only `b` is.
    assert CARD not in stored
    assert "one one one one" not in stored
    spooled = "\n".join(p.read_text() for p in spool.rglob("*") if p.is_file()) if spool.exists() else ""
    assert_no_card(spooled, "spool")
    assert CARD not in caplog.text
    assert "one one one one" not in caplog.text
    # A number that is not a card is kept (when the recogniser heard it).
    room = [t for t in finals if "room" in t.split()]
    assert all(MASK not in t.split()[t.split().index("room") :][:2] for t in room), room


async def test_the_outage_spool_and_listeners_get_only_redacted_text(tmp_path: Path) -> None:
    """Redis is down: the legs' events overflow to the spool on disk. A listener (a fork
    echoing finals to the PBX) sees them too. Neither holds a card digit."""
    settings = Settings(
        redis_url="redis://127.0.0.1:1/0", spool_dir=tmp_path / "spool", outage_buffer_events=10
    )
    publisher = RedisStreamsPublisher(settings, Metrics())
    await publisher.start()
    spoken = " ".join(SPOKEN[int(d)] for d in CARD)
    engine = TimedScriptEngine([f"my card is {spoken}", f"or {CARD} then", "room four"], 1000, 250)
    registry = CallRegistry(engine, publisher, Metrics(), redactor=Redactor(frozenset({Redaction.PCI})))
    leg = registry.open_leg("down", "caller", {})
    heard: list[TranscriptEvent] = []
    leg.add_listener(heard.append)
    for _ in range(60):
        leg.feed(np.full(4000, 500, np.int16), 8000)  # 0.5 s
    leg.dtmf("4", 100)
    await leg.close("hangup")
    await publisher.close(timeout=0.5)
    spooled = "\n".join(p.read_text() for p in (tmp_path / "spool").rglob("*") if p.is_file())
    finals = [e for e in heard if e.type == EventType.FINAL]
    assert len(finals) == 30 and spooled.count(MASK) >= 10 * 16, "the finals should be in the spool, masked"
    assert CARD not in spooled and "one one one" not in spooled and '"text":"4"' not in spooled
    assert all(CARD not in e.text and "one one one" not in e.text for e in heard)
    assert [e.text for e in finals[2::3]] == ["room four"] * 10  # not a card: kept
    assert [e.text for e in heard if e.type == EventType.DTMF] == [MASK]


async def test_a_card_split_across_finals_is_masked_in_redis(
    redis: aioredis.Redis, key_prefix: str, tmp_path: Path
) -> None:
    """The segmenter ends an utterance at a short pause: a card said with pauses reaches the
    redactor as three finals, with no card word (the recogniser missed it), partials first.
    Redis gets no digit of it past the third, and the CVV after it is masked as in context."""
    settings = Settings(key_prefix=key_prefix, spool_dir=tmp_path / "spool")
    publisher = RedisStreamsPublisher(settings, Metrics())
    await publisher.start()
    script = [
        "it is four one one one one",
        "one one one one one one",
        "one one one one one",
        "the code is seven three one",
        "room four please",
    ]
    engine = TimedScriptEngine(script, 1500, 250)
    registry = CallRegistry(engine, publisher, Metrics(), redactor=Redactor(frozenset({Redaction.PCI})))
    leg = registry.open_leg(f"{key_prefix}-split", "caller", {})
    for _ in range(15):
        leg.feed(np.full(4000, 500, np.int16), 8000)  # 0.5 s
    await leg.close("hangup")
    await publisher.close(timeout=2.0)
    stored, events = await everything_in_redis(redis, key_prefix)
    finals = [e.text for e in events if e.type == EventType.FINAL]
    assert finals == [
        f"it is {' '.join([MASK] * 5)}",
        " ".join([MASK] * 6),
        " ".join([MASK] * 5),
        f"the code is {MASK} {MASK} {MASK}",
        "room four please",
    ]
    assert any(e.type == EventType.PARTIAL for e in events)
    texts = [f"{e.text}\n{e.stable}\n{e.unstable}\n{' '.join(w['w'] for w in e.words)}" for e in events]
    assert_no_card("\n\n".join(texts), "redis")  # not the ids and timestamps: digits by design
    assert CARD not in stored
    assert "one one one one" not in stored and "four one one one" not in stored
