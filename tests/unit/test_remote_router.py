"""Engine remote, pure parts: routing, the chat messages of a prompt, WAV, stream parsing."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from callscribe.engine.qwen3.prompt import build_prompt
from callscribe.engine.qwen3.remote import (
    ReplicaFailure,
    StreamParser,
    chat_messages,
    leg_of,
    served_model_name,
    wav_float32,
)
from callscribe.engine.qwen3.router import ReplicaRouter

AUDIO_PART = {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}


def render(messages: list[dict[str, object]]) -> str:
    """The tiny fixture's ChatML template with add_generation_prompt=False, in Python."""
    out = []
    for index, message in enumerate(messages):
        content = message["content"]
        text = content if isinstance(content, str) else "<|audio_start|><|audio_pad|><|audio_end|>"
        out.append(f"<|im_start|>{message['role']}\n{text}")
        if not (index == len(messages) - 1 and message["role"] == "assistant"):
            out.append("<|im_end|>\n")
    return "".join(out)


def test_legs_stick_to_their_replica_and_new_legs_go_to_the_least_loaded() -> None:
    router = ReplicaRouter(["http://a:8000/", "http://b:8000"])
    a, b = router.replicas
    assert a.url == "http://a:8000"
    assert router.pick("leg1") is a
    a.in_flight = 3
    assert router.pick("leg2") is b
    assert router.pick("leg1") is a  # sticky despite the load
    b.in_flight = 3
    assert router.pick("leg3") is a  # equal load and legs: the first
    assert router.pick("leg4") is b  # equal load: the replica with fewer legs
    assert router.replica_of("leg4") is b


def test_a_failed_replica_loses_its_legs_and_comes_back_after_a_growing_backoff() -> None:
    router = ReplicaRouter(["http://a", "http://b"], backoff_sec=1.0, max_backoff_sec=4.0)
    a, b = router.replicas
    assert router.pick("leg") is a
    assert router.failed(a, "ConnectError", now=100.0) is True
    assert router.failed(a, "ConnectError again", now=100.1) is False  # same outage
    assert router.pick("leg") is b and router.replica_of("leg") is b
    assert router.due_for_probe(101.0) == [] and router.due_for_probe(101.1) == [a]  # from the last failure
    assert router.probe_ok(a) is True
    assert router.pick("leg") is b  # stays where it moved while b is up
    router.failed(a, "malformed stream", now=200.0)  # /health fine but streams fail: longer out
    assert a.retry_at == 202.0
    router.probe_ok(a)
    router.failed(a, "malformed stream", now=300.0)
    router.probe_ok(a)
    router.failed(a, "malformed stream", now=400.0)
    assert a.retry_at == 404.0  # capped
    router.probe_ok(a)
    router.succeeded(a)
    router.failed(a, "blip", now=500.0)
    assert a.retry_at == 501.0  # a completed decode resets the backoff
    router.failed(b, "down", now=500.0)
    assert router.pick("other") is None and router.next_retry_at() == 501.0


def test_router_refuses_no_urls_and_duplicates() -> None:
    with pytest.raises(ValueError, match="at least one"):
        ReplicaRouter([])
    with pytest.raises(ValueError, match="distinct"):
        ReplicaRouter(["http://a/", "http://a"])


@pytest.mark.parametrize(
    ("context", "language", "prefix"),
    [("", None, ""), ("names: Ada", None, "language English<asr_text>hello wor"), ("x", "English", "hi")],
)
def test_chat_messages_render_back_to_the_exact_prompt(
    context: str, language: str | None, prefix: str
) -> None:
    prompt = build_prompt(context, language, prefix)
    messages = chat_messages(prompt, AUDIO_PART)
    assert messages[-1]["role"] == "assistant"
    assert [m["role"] for m in messages][-2:] == ["user", "assistant"]
    assert render(messages) == prompt


def test_chat_messages_refuse_a_prompt_of_another_shape() -> None:
    with pytest.raises(ValueError, match="audio turn"):
        chat_messages("<|im_start|>user\nhello<|im_end|>\n", AUDIO_PART)


def test_wav_float32_carries_the_samples_losslessly() -> None:
    audio = np.array([0.0, 0.5, -1.0, 1e-7], dtype=np.float32)
    wav = wav_float32(audio)
    assert wav[:4] == b"RIFF" and wav[8:12] == b"WAVE"
    fmt, channels, rate = struct.unpack("<HHI", wav[20:28])
    assert (fmt, channels, rate) == (3, 1, 16000)
    assert np.array_equal(np.frombuffer(wav[44:], dtype="<f4"), audio)


def test_leg_of_request_ids() -> None:
    assert leg_of("call/a/1234abcd/u3/p7") == "call/a/1234abcd"
    assert leg_of("call/u2/x/u10/final") == "call/u2/x"


def test_stream_parser_collects_text_usage_and_prompt_ids() -> None:
    parser = StreamParser()
    assert not parser.line('data: {"choices":[{"delta":{"role":"assistant"}}],"prompt_token_ids":[1,2]}')
    assert parser.line('data: {"choices":[{"delta":{"content":"lang"}}]}')
    assert parser.line('data: {"choices":[{"delta":{"content":"uage"},"finish_reason":"length"}]}')
    parser.line('data: {"choices":[],"usage":{"prompt_tokens":40,"completion_tokens":2}}')
    parser.line("")
    parser.line("data: [DONE]")
    assert "".join(parser.text) == "language" and parser.done and parser.finish_reason == "length"
    assert (parser.prompt_tokens, parser.output_tokens, parser.prompt_token_ids) == (40, 2, [1, 2])


def test_stream_parser_counts_a_token_without_text_as_started() -> None:
    # A special token or half a UTF-8 character: vLLM streams its id with empty content.
    parser = StreamParser()
    assert parser.line('data: {"choices":[{"delta":{"content":""},"token_ids":[151645]}]}')
    assert not parser.line('data: {"choices":[{"delta":{},"token_ids":[]}]}')
    assert parser.text == []


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("data: {not json", "expected JSON"),
        ("event: nope", "expected 'data: ...'"),
        ('data: {"object":"x"}', "expected 'choices'"),
        ('data: {"choices":["x"]}', "expected a delta"),
        ('data: {"error":{"message":"boom"}}', "boom"),
        ("data: [1, 2]", "expected an object"),
    ],
)
def test_stream_parser_names_malformed_input(line: str, expected: str) -> None:
    with pytest.raises(ReplicaFailure, match=expected.replace("(", r"\(")):
        StreamParser().line(line)


def test_served_model_name() -> None:
    assert served_model_name({"data": [{"id": "Qwen/Qwen3-ASR-0.6B"}]}) == "Qwen/Qwen3-ASR-0.6B"
    assert served_model_name({"data": []}) is None
    assert served_model_name(["x"]) is None


def test_engine_remote_from_settings() -> None:
    from callscribe.engine.base import EngineUnavailable
    from callscribe.engine.qwen3.remote import RemoteQwen3Engine
    from callscribe.settings import Settings

    with pytest.raises(EngineUnavailable, match="--vllm-url"):
        RemoteQwen3Engine.from_settings(Settings(engine="remote"))
    settings = Settings(
        engine="remote",
        vllm_urls=["http://gpu1:8000", "http://gpu2:8000/"],
        vllm_request_timeout_sec=5,
        vllm_priority_scheduling=True,
    )
    engine = RemoteQwen3Engine.from_settings(settings)
    assert [r.url for r in engine.router.replicas] == ["http://gpu1:8000", "http://gpu2:8000"]
    assert engine.request_timeout == 5 and engine.priority_scheduling and not engine.ready
