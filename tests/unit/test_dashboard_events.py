"""How the dashboard turns stream entries into Server-Sent Events and where a stream resumes."""

from __future__ import annotations

import json

import pytest
from starlette.requests import Request

from callscribe.events import EventType, TranscriptEvent
from callscribe.web.dashboard import entry_key, event_json, resume_point, sse_message


def request(headers: dict[str, str] | None = None, query: str = "") -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return Request(
        {"type": "http", "method": "GET", "path": "/", "query_string": query.encode(), "headers": raw}
    )


def test_an_entry_becomes_one_sse_message_with_the_entry_id() -> None:
    event = TranscriptEvent(
        EventType.PARTIAL,
        "c1",
        "caller",
        seq=4,
        utt=0,
        text="hello wor",
        stable="hello",
        unstable="wor",
        start_ms=0,
        end_ms=900,
        meta={"note": "line\nbreak"},
    )
    message = sse_message(json.dumps(event_json(event)), entry_id="1700000000000-3")
    lines = message.decode().split("\n")
    assert lines[0] == "id: 1700000000000-3" and lines[1].startswith("data: {") and lines[2:] == ["", ""]
    data = json.loads(lines[1][6:])
    assert data["type"] == "partial" and data["stable"] == "hello" and data["unstable"] == "wor"
    assert data["utt"] == 0 and data["latency_ms"] is None and data["meta"] == {"note": "line\nbreak"}
    assert sse_message("{}", event="live") == b"event: live\ndata: {}\n\n"


def test_entry_ids_order_numerically() -> None:
    assert entry_key("1700000000000-10") > entry_key("1700000000000-9")
    assert entry_key("1700000000001-0") > entry_key("1700000000000-99")
    assert entry_key("0") == (0, 0)


def test_resume_point_prefers_last_event_id_and_checks_it() -> None:
    assert resume_point(request(), "0-0") == "0-0"
    assert resume_point(request({"Last-Event-ID": "1700000000000-3"}), "0-0") == "1700000000000-3"
    assert resume_point(request(query="last_event_id=5-1"), "0-0") == "5-1"
    for bad in ("$", "1700000000000", "-1-0", "1-0 ", "x" * 80):
        with pytest.raises(ValueError, match="Last-Event-ID"):
            resume_point(request({"Last-Event-ID": bad}), "0-0")
