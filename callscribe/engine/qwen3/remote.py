"""Engine `remote`: the Qwen3-ASR streaming algorithm on one or more `vllm serve` replicas.

The algorithm (segmentation, prefix rollback, bounded windows, supersede, finals first) is
streaming.py's, unchanged; this module is its decode backend over HTTP. Each decode is one
streamed `POST /v1/chat/completions` carrying callscribe's own prompt as chat messages: the
context as the system turn, the utterance as an `input_audio` part (a 16-bit PCM WAV: the
leg's audio came from 16-bit or 8-bit G.711 samples, so int16 carries it to within one
step of the float32 the in-process engine sees, at half the bytes; `wire_format="float32"`
sends the exact samples), and the rollback prefix as a
final assistant message continued with `continue_final_message` — the chat template renders
exactly the prompt `build_prompt` writes. `/v1/audio/transcriptions` would not do: it builds
its own prompt and cannot continue a prefix. Superseding a partial closes its HTTP stream;
vLLM aborts a request whose client went away.

Replicas (router.py): legs are sticky per replica, new legs go to the least loaded one; a
replica is taken out on a failed request (connection refused or reset, 5xx, timeout,
malformed stream) or health probe and probed again with backoff. A failed decode is retried
on another replica with the same audio, so an utterance open on a replica that died is
re-decoded elsewhere: its final is not lost and its partials resume.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np

from callscribe.engine.base import SAMPLE_RATE, Audio, EngineUnavailable
from callscribe.engine.qwen3.backend import DecodeRequest, DecodeResult, Tokenizer
from callscribe.engine.qwen3.prompt import AUDIO_PLACEHOLDER, AUDIO_TOKEN
from callscribe.engine.qwen3.router import Replica, ReplicaRouter
from callscribe.engine.qwen3.streaming import Qwen3Engine, StreamingConfig
from callscribe.engine.vad import WebRtcVad
from callscribe.settings import Settings

log = logging.getLogger(__name__)

_SYSTEM_OPEN = "<|im_start|>system\n"
_USER_TURN = f"<|im_start|>user\n{AUDIO_PLACEHOLDER}<|im_end|>\n"
_ASSISTANT_OPEN = "<|im_start|>assistant\n"
_TURN_END = "<|im_end|>\n"
# Partials may use this share of the replicas' batch slots; the rest stays free for finals.
_PARTIAL_BUDGET_PER_REPLICA = 12
_MAX_REMEMBERED_ABORTS = 4096


class ReplicaFailure(Exception):
    """The replica failed the request (not the request's fault): take it out, retry elsewhere."""


class RequestRejected(Exception):
    """The replica refused the request itself (4xx): retrying elsewhere would not help."""


class RemoteUnavailable(Exception):
    """No replica could run the decode within its attempts."""


def chat_messages(prompt: str, audio_url_part: dict[str, Any]) -> list[dict[str, Any]]:
    """`build_prompt`'s text as chat messages: [system], user (the audio), assistant (to continue).

    Raises ValueError for a prompt not shaped like `build_prompt`'s (the template could not
    render it back byte for byte)."""
    messages: list[dict[str, Any]] = []
    rest = prompt
    if rest.startswith(_SYSTEM_OPEN):
        system, sep, rest = rest[len(_SYSTEM_OPEN) :].partition(_TURN_END)
        if not sep:
            raise ValueError(f"prompt system turn is not closed: {prompt[:80]!r}")
        messages.append({"role": "system", "content": system})
    if not rest.startswith(_USER_TURN + _ASSISTANT_OPEN):
        raise ValueError(f"prompt must hold the audio turn then the assistant turn, got {rest[:80]!r}")
    assistant = rest[len(_USER_TURN) + len(_ASSISTANT_OPEN) :]
    messages.append({"role": "user", "content": [audio_url_part]})
    messages.append({"role": "assistant", "content": assistant})
    return messages


WireFormat = Literal["pcm16", "float32"]


def wav_pcm16(audio: Audio, rate: int = SAMPLE_RATE) -> bytes:
    """A mono 16-bit PCM WAV (clipped to [-1, 1], rounded to the nearest step): 2 bytes a
    sample, what telephone audio held before it was widened to float32."""
    pcm = np.round(np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0) * 32767.0).astype("<i2")
    data = pcm.tobytes()
    header = b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE"
    fmt = b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
    return header + fmt + b"data" + struct.pack("<I", len(data)) + data


def wav_float32(audio: Audio, rate: int = SAMPLE_RATE) -> bytes:
    """A mono IEEE-float WAV: lossless, so the server decodes exactly these samples."""
    data = np.ascontiguousarray(audio, dtype="<f4").tobytes()
    header = b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE"
    fmt = b"fmt " + struct.pack("<IHHIIHH", 16, 3, 1, rate, rate * 4, 4, 32)
    return header + fmt + b"data" + struct.pack("<I", len(data)) + data


def leg_of(request_id: str) -> str:
    """`call/leg/abcd1234/u3/p7` → `call/leg/abcd1234` (every request id starts with its leg)."""
    return request_id.rsplit("/u", 1)[0]


def served_model_name(models: Any) -> str | None:
    """The first model id of a `/v1/models` answer, or None."""
    data = models.get("data") if isinstance(models, dict) else None
    if isinstance(data, list) and data and isinstance(data[0], dict) and data[0].get("id"):
        return str(data[0]["id"])
    return None


class StreamParser:
    """Server-sent events of a streamed chat completion → text, usage and prompt token ids.
    Anything else on the stream is a ReplicaFailure naming what came and what was expected."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.done = False
        self.finish_reason: str | None = None
        self.prompt_tokens = 0
        self.output_tokens = 0
        self.prompt_token_ids: list[int] = []

    def line(self, line: str) -> bool:
        """Feed one line; True when it carried generated tokens: text, or token ids whose text is
        still empty (a special token, half a UTF-8 character), which vLLM streams with
        return_token_ids. The first such line is when the request has started on the server."""
        line = line.strip()
        if not line or line.startswith(":"):
            return False
        if not line.startswith("data:"):
            raise ReplicaFailure(f"malformed stream line {line[:120]!r}: expected 'data: ...'")
        payload = line[5:].strip()
        if payload == "[DONE]":
            self.done = True
            return False
        try:
            chunk = json.loads(payload)
        except json.JSONDecodeError:
            raise ReplicaFailure(f"malformed stream chunk {payload[:120]!r}: expected JSON") from None
        if not isinstance(chunk, dict):
            raise ReplicaFailure(f"malformed stream chunk {payload[:120]!r}: expected an object")
        if "error" in chunk:
            raise ReplicaFailure(f"replica error in stream: {str(chunk['error'])[:200]}")
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.output_tokens = int(usage.get("completion_tokens") or 0)
        if isinstance(chunk.get("prompt_token_ids"), list):
            self.prompt_token_ids = [int(t) for t in chunk["prompt_token_ids"]]
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            raise ReplicaFailure(f"malformed stream chunk {payload[:120]!r}: expected 'choices'")
        got_tokens = False
        for choice in choices:
            if not isinstance(choice, dict) or not isinstance(choice.get("delta", {}), dict):
                raise ReplicaFailure(f"malformed choice {str(choice)[:120]!r}: expected a delta object")
            content = choice.get("delta", {}).get("content")
            if isinstance(content, str) and content:
                self.text.append(content)
                got_tokens = True
            if isinstance(choice.get("token_ids"), list) and choice["token_ids"]:
                got_tokens = True
            if choice.get("finish_reason"):
                self.finish_reason = str(choice["finish_reason"])
        return got_tokens


class TokenizersTokenizer:
    """The model's tokenizer (tokenizer.json) with special tokens kept, as VllmTokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=False))

    def token_id(self, token: str) -> int | None:
        value = self._tokenizer.token_to_id(token)
        return None if value is None else int(value)


def load_tokenizer(location: str) -> TokenizersTokenizer:
    """From a model directory holding tokenizer.json, or a hub id the machine can reach."""
    try:
        from tokenizers import Tokenizer as HfTokenizer
    except ImportError:
        raise EngineUnavailable(
            "engine remote needs 'tokenizers': pip install 'callscribe[remote]'"
        ) from None
    path = Path(location).expanduser()
    try:
        if path.is_dir():
            return TokenizersTokenizer(HfTokenizer.from_file(str(path / "tokenizer.json")))
        if path.is_file():
            return TokenizersTokenizer(HfTokenizer.from_file(str(path)))
        return TokenizersTokenizer(HfTokenizer.from_pretrained(location))
    except Exception as exc:
        raise EngineUnavailable(
            f"cannot load the tokenizer of {location!r} ({type(exc).__name__}: {exc}); "
            "give --model a local directory holding the model's tokenizer.json"
        ) from None


class RemoteBackend:
    """DecodeBackend over `vllm serve` replicas."""

    def __init__(
        self,
        router: ReplicaRouter,
        model: str,
        tokenizer: TokenizersTokenizer,
        request_timeout: float = 30.0,
        priority_scheduling: bool = False,
        max_attempts: int | None = None,
        wire_format: WireFormat = "pcm16",
    ) -> None:
        self.router = router
        self.wire_format = wire_format
        self.body_bytes = 0  # request bodies sent (JSON), for the payload measurements
        self.body_audio_samples = 0
        self.model = model
        self._tokenizer = tokenizer
        self._audio_token_id = tokenizer.token_id(AUDIO_TOKEN)
        self._timeout = request_timeout
        self._priority = priority_scheduling
        # Every replica once, plus two more (a replica back from backoff, a transient error).
        self._max_attempts = max_attempts or len(router.replicas) + 2
        self._clients = {
            r.url: httpx.AsyncClient(
                base_url=r.url,
                timeout=httpx.Timeout(request_timeout, connect=min(3.0, request_timeout)),
                limits=httpx.Limits(max_connections=512, max_keepalive_connections=64),
            )
            for r in router.replicas
        }
        self._streams: dict[str, asyncio.Task[DecodeResult]] = {}
        self._aborted: OrderedDict[str, None] = OrderedDict()
        self._replica_up = asyncio.Event()
        self.retries = 0

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def priority_scheduling(self) -> bool:
        return self._priority

    async def close(self) -> None:
        for task in list(self._streams.values()):
            task.cancel()
        await asyncio.gather(*(c.aclose() for c in self._clients.values()), return_exceptions=True)

    # -- decode -----------------------------------------------------------------------------

    async def decode(
        self, request: DecodeRequest, priority: int, on_started: Callable[[], None] | None = None
    ) -> DecodeResult:
        rid = request.request_id
        leg = leg_of(rid)
        body = self._body(request, priority)
        self.body_audio_samples += request.audio.size
        last_error = "none"
        attempt = 0
        try:
            for attempt in range(1, self._max_attempts + 1):
                if rid in self._aborted:
                    return DecodeResult("", aborted=True)
                replica = await self._replica_for(leg)
                if replica is None:
                    # Name why they are down: a health probe may have taken them out, not this request.
                    down = "; ".join(f"{r.url}: {r.last_error}" for r in self.router.replicas if not r.up)
                    last_error = f"no replica up for {self._timeout:.0f} s ({down or last_error})"
                    break
                body["request_id"] = f"{rid}#{attempt}"  # a retry may land on the same replica
                stream = asyncio.get_running_loop().create_task(
                    self._stream(replica, body, on_started), name=f"remote {rid}"
                )
                self._streams[rid] = stream
                replica.in_flight += 1
                try:
                    result = await stream
                except asyncio.CancelledError:
                    current = asyncio.current_task()
                    if current is not None and current.cancelling():
                        raise  # our caller was cancelled, not the request superseded
                    return DecodeResult("", aborted=True)
                except ReplicaFailure as exc:
                    last_error = f"{replica.url}: {exc}"
                    self.retries += 1
                    if self.router.failed(replica, str(exc), time.monotonic()):
                        log.warning("replica %s taken out: %s", replica.url, exc)
                    log.warning(
                        "%s %s failed on %s (attempt %d/%d): %s; retrying",
                        request.kind,
                        rid,
                        replica.url,
                        attempt,
                        self._max_attempts,
                        exc,
                    )
                    continue
                finally:
                    replica.in_flight -= 1
                    self._streams.pop(rid, None)
                self.router.succeeded(replica)
                return result
        finally:
            self._aborted.pop(rid, None)
        raise RemoteUnavailable(f"{request.kind} {rid} gave up after {attempt} attempt(s): {last_error}")

    async def abort(self, request_id: str) -> None:
        """Closing the stream makes vLLM abort the request on its side."""
        self._aborted[request_id] = None
        while len(self._aborted) > _MAX_REMEMBERED_ABORTS:
            self._aborted.popitem(last=False)
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.cancel()

    async def _replica_for(self, leg: str) -> Replica | None:
        """The leg's replica; while all are down, wait (up to the request timeout) for one."""
        deadline = time.monotonic() + self._timeout
        while True:
            replica = self.router.pick(leg)
            if replica is not None:
                return replica
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self._replica_up.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._replica_up.wait(), min(remaining, 0.5))

    def _body(self, request: DecodeRequest, priority: int) -> dict[str, Any]:
        wav = wav_pcm16(request.audio) if self.wire_format == "pcm16" else wav_float32(request.audio)
        audio = base64.b64encode(wav).decode("ascii")
        part = {"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}}
        body: dict[str, Any] = {
            "model": self.model,
            "messages": chat_messages(request.prompt, part),
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": request.max_tokens,
            "temperature": 0.0,
            # `<asr_text>` may be a special token; the output parser needs it.
            "skip_special_tokens": False,
            "add_generation_prompt": False,
            "continue_final_message": True,
            "return_token_ids": True,
        }
        if self._priority:
            body["priority"] = priority
        return body

    async def _stream(
        self, replica: Replica, body: dict[str, Any], on_started: Callable[[], None] | None
    ) -> DecodeResult:
        client = self._clients[replica.url]
        parser = StreamParser()
        sent = time.monotonic()
        started = False
        try:
            async with asyncio.timeout(self._timeout):
                content = json.dumps(body, separators=(",", ":")).encode()
                self.body_bytes += len(content)
                headers = {"content-type": "application/json"}
                async with client.stream(
                    "POST", "/v1/chat/completions", content=content, headers=headers
                ) as response:
                    if response.status_code != 200:
                        detail = (await response.aread()).decode("utf-8", "replace")[:300]
                        if 400 <= response.status_code < 500 and response.status_code not in (408, 429):
                            raise RequestRejected(f"{replica.url} answered {response.status_code}: {detail}")
                        raise ReplicaFailure(f"HTTP {response.status_code}: {detail}")
                    async for line in response.aiter_lines():
                        if parser.line(line) and not started:
                            started = True
                            if on_started is not None:
                                on_started()
                        if parser.done:
                            break
        except TimeoutError:
            raise ReplicaFailure(f"no complete answer within {self._timeout:.0f} s") from None
        except httpx.HTTPError as exc:
            raise ReplicaFailure(f"{type(exc).__name__}: {exc or 'connection lost'}") from None
        if not parser.done:
            raise ReplicaFailure("stream ended before [DONE]")
        ids = parser.prompt_token_ids
        audio_tokens = ids.count(self._audio_token_id) if self._audio_token_id is not None else 0
        return DecodeResult(
            text="".join(parser.text),
            aborted=parser.finish_reason == "abort",
            prompt_tokens=parser.prompt_tokens or len(ids),
            audio_tokens=audio_tokens,
            output_tokens=parser.output_tokens,
            scheduled_at=sent,
            finished_at=time.monotonic(),
            prompt_token_ids=ids,
        )

    # -- health -----------------------------------------------------------------------------

    async def probe(self, replica: Replica) -> str | None:
        """None when /health answers 200, else why not."""
        try:
            response = await self._clients[replica.url].get("/health", timeout=min(3.0, self._timeout))
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc or 'no answer'}"
        if response.status_code != 200:
            return f"/health answered {response.status_code}"
        return None

    async def check_health(self) -> None:
        """One round: probe up replicas, and down ones whose backoff has passed."""
        now = time.monotonic()
        due = [r for r in self.router.replicas if r.up] + self.router.due_for_probe(now)
        reasons = await asyncio.gather(*(self.probe(r) for r in due))
        for replica, reason in zip(due, reasons, strict=True):
            if reason is None:
                if self.router.probe_ok(replica):
                    log.warning("replica %s back in service", replica.url)
            elif self.router.failed(replica, reason, time.monotonic()):
                log.warning("replica %s taken out: %s", replica.url, reason)
        if self.router.up:
            self._replica_up.set()


class RemoteQwen3Engine(Qwen3Engine):
    name = "remote"

    def __init__(
        self,
        urls: list[str],
        tokenizer: str | None = None,
        config: StreamingConfig | None = None,
        request_timeout: float = 30.0,
        health_interval: float = 2.0,
        priority_scheduling: bool = False,
        start_timeout: float = 60.0,
        vad_aggressiveness: int = 2,
        max_legs: int = 256,
    ) -> None:
        router = ReplicaRouter(urls)
        super().__init__(
            config or StreamingConfig(),
            lambda: WebRtcVad(vad_aggressiveness),
            partial_budget=_PARTIAL_BUDGET_PER_REPLICA * len(router.replicas),
            max_legs=max_legs,
        )
        self.router = router
        self.tokenizer_location = tokenizer
        self.request_timeout = request_timeout
        self.health_interval = health_interval
        self.priority_scheduling = priority_scheduling
        self.start_timeout = start_timeout
        self.backend: RemoteBackend | None = None
        self._health: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> RemoteQwen3Engine:
        if not settings.vllm_urls:
            raise EngineUnavailable("engine remote needs at least one --vllm-url (or CALLSCRIBE_VLLM_URLS)")
        return cls(
            list(settings.vllm_urls),
            settings.model,
            StreamingConfig(language=settings.language, partial_window_sec=settings.partial_window_sec),
            request_timeout=settings.vllm_request_timeout_sec,
            health_interval=settings.vllm_health_interval_sec,
            priority_scheduling=settings.vllm_priority_scheduling,
        )

    @property
    def ready(self) -> bool:
        return self.backend is not None and bool(self.router.up)

    async def start(self) -> None:
        if self.backend is not None:
            return
        model = await self._served_model()
        tokenizer = await asyncio.to_thread(load_tokenizer, self.tokenizer_location or model)
        self.backend = RemoteBackend(
            self.router, model, tokenizer, self.request_timeout, self.priority_scheduling
        )
        await self.backend.check_health()
        self.attach(self.backend)
        self._health = asyncio.get_running_loop().create_task(self._watch_health(self.backend))
        log.info(
            "remote engine ready model=%s replicas=%s up=%d",
            model,
            ",".join(r.url for r in self.router.replicas),
            len(self.router.up),
        )

    async def _served_model(self) -> str:
        """The model name the replicas serve (GET /v1/models), waiting up to start_timeout for one."""
        deadline = time.monotonic() + self.start_timeout
        errors: dict[str, str] = {}
        async with httpx.AsyncClient(timeout=3.0) as client:
            while True:
                for replica in self.router.replicas:
                    try:
                        response = await client.get(f"{replica.url}/v1/models")
                        data = response.json().get("data") if response.status_code == 200 else None
                        if (
                            isinstance(data, list)
                            and data
                            and isinstance(data[0], dict)
                            and data[0].get("id")
                        ):
                            return str(data[0]["id"])
                        errors[replica.url] = (
                            f"/v1/models answered {response.status_code}: {response.text[:120]}"
                        )
                    except (httpx.HTTPError, ValueError) as exc:
                        errors[replica.url] = f"{type(exc).__name__}: {exc}"
                if time.monotonic() >= deadline:
                    raise EngineUnavailable(
                        f"no vllm serve replica answered within {self.start_timeout:.0f} s: {errors}"
                    )
                await asyncio.sleep(1.0)

    async def _watch_health(self, backend: RemoteBackend) -> None:
        while True:
            await asyncio.sleep(self.health_interval)
            try:
                await backend.check_health()
            except Exception:  # a probe bug must not end health checking for good
                log.exception("health check round failed")

    async def close(self) -> None:
        if self._health is not None:
            self._health.cancel()
            self._health = None
        backend, self.backend = self.backend, None
        if backend is not None:
            await backend.close()
