"""The streaming algorithm when the model server dies under a leg (EngineRestarting): one
error per leg per death, an interrupted final decoded once more, a second cut an error.
On real vLLM with its engine process killed: tests/integration/vllm/test_engine_faults.py."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from callscribe.engine.base import EngineError
from callscribe.engine.qwen3.backend import DecodeRequest, DecodeResult, EngineRestarting
from tests.unit.test_qwen3_streaming import Call, Collector, ScriptedBackend, count_words, make_engine
from tests.unit.test_segmenter import silence, tone


class DyingBackend(ScriptedBackend):
    """The next request of each kind listed in `cut` dies with the server of that epoch."""

    def __init__(self, cut: list[tuple[str, int]]) -> None:
        super().__init__(count_words)
        self.cut = cut

    async def decode(
        self, request: DecodeRequest, priority: int, on_started: Callable[[], None] | None = None
    ) -> DecodeResult:
        for index, (kind, epoch) in enumerate(self.cut):
            if kind == request.kind:
                del self.cut[index]
                self.calls.append(Call(request, priority))
                raise EngineRestarting("server died; restarting", epoch)
        return await super().decode(request, priority, on_started)


async def test_one_error_per_death_and_the_cut_final_is_decoded_again() -> None:
    backend = DyingBackend([("partial", 0), ("final", 0)])
    out = Collector()
    stream = make_engine(backend).open_stream("c", "a", out)
    stream.feed(np.concatenate([silence(0.5), tone(2.5), silence(1.0)]))
    await stream.finish()
    errors = [e for e in out.events if isinstance(e, EngineError)]
    assert errors == [EngineError("server died; restarting", code="engine_restart", utt=0)]
    assert [f.utt for f in out.finals] == [0] and out.finals[0].text.startswith("w0")
    assert backend.kinds().count("final") == 2  # cut, then decoded again


async def test_a_final_cut_by_two_deaths_becomes_an_error() -> None:
    backend = DyingBackend([("final", 0), ("final", 1)])
    out = Collector()
    stream = make_engine(backend).open_stream("c", "a", out)
    stream.feed(np.concatenate([silence(0.5), tone(1.0), silence(1.0)]))
    await stream.finish()
    errors = [e for e in out.events if isinstance(e, EngineError)]
    assert [(e.code, e.utt) for e in errors] == [("engine_restart", 0), ("engine", 0)]
    assert "final decode failed" in errors[1].message
    assert not out.finals and backend.kinds() == ["final", "final"]
