"""`engine=vllm` end to end: ffmpeg sends RTP legs, the bridge runs them on the shared vLLM
engine, the events are read back from Redis."""

from __future__ import annotations

import shutil

import pytest
import redis.asyncio as aioredis

from callscribe.engine.base import Emit, Engine, LegStream
from callscribe.engine.qwen3.local import LocalQwen3Engine
from callscribe.events import EventType
from tests.integration.test_transcription import transcribe_call
from tests.support import ServiceFactory, load_clip

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed"),
]


class Borrowed(Engine):
    """The session's engine, lent to one Service: its stop() must not shut vLLM down."""

    def __init__(self, engine: LocalQwen3Engine) -> None:
        self.engine = engine
        self.name = engine.name

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    @property
    def ready(self) -> bool:
        return self.engine.ready

    def open_stream(self, call_id: str, leg: str, emit: Emit) -> LegStream:
        return self.engine.open_stream(call_id, leg, emit)


async def test_rtp_call_on_the_vllm_engine(
    vllm_engine: LocalQwen3Engine, redis: aioredis.Redis, make_service: ServiceFactory
) -> None:
    legs = {"caller": (load_clip("librivox-0870"), "pcmu"), "agent": (load_clip("librivox-0890"), "pcma")}
    async with make_service(engine=Borrowed(vllm_engine)) as service:
        events = await transcribe_call(service, redis, "vllm-call", legs)
    kinds = [(e.type, e.leg) for e in events]
    assert kinds.count((EventType.CALL_STARTED, "")) == 1 and kinds.count((EventType.CALL_ENDED, "")) == 1
    for leg, (clip, _) in legs.items():
        leg_events = [e for e in events if e.leg == leg]
        finals = [e for e in leg_events if e.type == EventType.FINAL]
        partials = [e for e in leg_events if e.type == EventType.PARTIAL]
        assert finals and partials, f"{leg}: {len(finals)} finals, {len(partials)} partials"
        assert {e.engine for e in finals + partials} == {"vllm"}
        assert [f.utt for f in finals] == sorted({f.utt for f in finals})
        assert finals[-1].end_ms is not None and finals[-1].end_ms <= clip.seconds * 1000 + 500
        for final in finals:
            assert all(p.seq < final.seq for p in partials if p.utt == final.utt)
        for partial in partials:
            assert partial.text.startswith(partial.stable)
        assert not [e for e in leg_events if e.type == EventType.ERROR]
