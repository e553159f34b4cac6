"""The decode backend: the one thing the streaming algorithm needs from a model server.

A backend runs one decode (prompt text + one utterance's audio → generated text) as an
independent request, so the server batches the requests of every leg together, and can
abort a request by id. The in-process `vllm.AsyncLLM` (local.py) is one backend; `vllm
serve` replicas over HTTP are another. Everything else — segmentation, prefix rollback,
stable/unstable text, supersede, admission — lives in streaming.py and is shared.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from callscribe.engine.base import Audio

DecodeKind = Literal["partial", "final"]


class Tokenizer(Protocol):
    """The model's own tokenizer: prefix rollback counts the model's tokens, not words."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True, slots=True)
class DecodeRequest:
    request_id: str
    kind: DecodeKind
    prompt: str  # full prompt text with the audio placeholder and any rollback prefix
    audio: Audio  # 16 kHz float32, one utterance (or its first part, for a partial)
    max_tokens: int


@dataclass(frozen=True, slots=True)
class DecodeResult:
    text: str  # generated text only; the prompt's prefix is not repeated
    aborted: bool = False
    prompt_tokens: int = 0
    audio_tokens: int = 0
    output_tokens: int = 0
    # Monotonic times (seconds) the server reports, for overlap/latency evidence; 0 when unknown.
    scheduled_at: float = 0.0
    finished_at: float = 0.0
    prompt_token_ids: Sequence[int] = ()  # what the model saw, audio placeholders expanded


class EngineRestarting(Exception):
    """The model server died with this request in flight and is being rebuilt; the request
    did not complete. `epoch` names the server instance that died, so a leg reports one
    death once however many of its requests it interrupted."""

    def __init__(self, message: str, epoch: int) -> None:
        super().__init__(message)
        self.epoch = epoch


class DecodeBackend(Protocol):
    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def priority_scheduling(self) -> bool:
        """True when the server orders requests by `priority` (finals 0 before partials 1)."""
        ...

    async def decode(
        self, request: DecodeRequest, priority: int, on_started: Callable[[], None] | None = None
    ) -> DecodeResult:
        """Run one request to completion. `on_started` is called when the first token exists
        (the request left the queue). Returns `aborted=True` after `abort(request_id)`;
        raises EngineRestarting when the server died under the request and is being
        rebuilt (the same request may be sent again), any other exception on failure."""
        ...

    async def abort(self, request_id: str) -> None: ...
