"""Qwen3-ASR engines: the streaming algorithm (streaming.py) on a decode backend (backend.py),
in-process vLLM (local.py), and the seed-compatible streaming API (seed.py).

Nothing here imports vLLM until an engine starts, so `callscribe.engine.qwen3` is importable
without it.
"""

from callscribe.engine.qwen3.seed import ASRStreamingState, Qwen3ASRModel
from callscribe.engine.qwen3.streaming import Qwen3Engine, Qwen3LegStream, StreamingConfig

__all__ = ["ASRStreamingState", "Qwen3ASRModel", "Qwen3Engine", "Qwen3LegStream", "StreamingConfig"]
