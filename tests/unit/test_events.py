"""The schema v2 stream entry: one field list, written, read back and rendered as JSON."""

from __future__ import annotations

import json

import pytest

from callscribe.events import FIELDS, EventType, TranscriptEvent

# A v1 entry exactly as consumers have always received it: the order and spelling are the contract.
V1_FIELDS = (
    "v", "type", "call_id", "leg", "seq", "utt", "text", "stable", "unstable",
    "start_ms", "end_ms", "ts", "lang", "engine", "latency_ms", "meta",
)  # fmt: skip
# v2 appends, never reorders: a v1 consumer reading by name or by position keeps working.
V2_FIELDS = (*V1_FIELDS, "words", "conf")


def final() -> TranscriptEvent:
    return TranscriptEvent(
        EventType.FINAL,
        "call-1",
        "caller",
        seq=7,
        utt=2,
        text="hello there",
        stable="hello there",
        start_ms=1200,
        end_ms=2480,
        ts=1700000000123,
        lang="en",
        engine="sphinx",
        latency_ms=None,
        meta={"z": 1, "a": "é"},
    )


def test_the_field_list_is_the_v2_contract() -> None:
    assert FIELDS == V2_FIELDS


def test_an_event_is_written_as_the_v2_entry() -> None:
    assert final().to_fields() == {
        "v": "2",
        "type": "final",
        "call_id": "call-1",
        "leg": "caller",
        "seq": "7",
        "utt": "2",
        "text": "hello there",
        "stable": "hello there",
        "unstable": "",
        "start_ms": "1200",
        "end_ms": "2480",
        "ts": "1700000000123",
        "lang": "en",
        "engine": "sphinx",
        "latency_ms": "",
        "meta": '{"a":"\\u00e9","z":1}',
        "words": "[]",
        "conf": "",
    }
    assert list(final().to_fields()) == list(FIELDS)


def test_an_entry_reads_back_as_the_same_event_from_str_or_bytes() -> None:
    fields = final().to_fields()
    assert TranscriptEvent.from_fields(fields) == final()
    assert TranscriptEvent.from_fields({k.encode(): v.encode() for k, v in fields.items()}) == final()


def test_missing_fields_read_as_their_empty_values() -> None:
    event = TranscriptEvent.from_fields({"v": "1", "type": "call.ended", "call_id": "c"})
    assert (event.leg, event.seq, event.utt, event.ts, event.meta) == ("", 0, None, 0, {})


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"v": "3", "type": "final"}, "unsupported schema version v='3'"),
        ({"v": "1"}, "unknown event type None"),
        ({"v": "1", "type": "shout"}, "unknown event type 'shout'"),
        ({"v": "1", "type": "final", "end_ms": "12.5"}, "field end_ms='12.5' is not an integer"),
    ],
)
def test_a_bad_entry_is_refused_naming_what_is_wrong(entry: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        TranscriptEvent.from_fields(entry)


def test_json_has_every_field_but_the_version_with_numbers_as_numbers() -> None:
    data = final().to_json()
    assert list(data) == list(FIELDS[1:])
    assert json.loads(json.dumps(data)) == {
        "type": "final", "call_id": "call-1", "leg": "caller", "seq": 7, "utt": 2,
        "text": "hello there", "stable": "hello there", "unstable": "", "start_ms": 1200,
        "end_ms": 2480, "ts": 1700000000123, "lang": "en", "engine": "sphinx", "latency_ms": None,
        "meta": {"z": 1, "a": "é"}, "words": [], "conf": None,
    }  # fmt: skip
