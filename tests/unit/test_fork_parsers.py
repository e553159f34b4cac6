"""Media-fork parsers: the message sequences each sender produces, and what bad input becomes."""

from __future__ import annotations

import base64
import json
import random
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from callscribe.bridge.events import AudioReceived, Dropped, DtmfReceived
from callscribe.bridge.forks import DIALECTS
from callscribe.bridge.forks.asterisk import AsteriskWebsocketParser, parse_control
from callscribe.bridge.forks.base import linear_codec, parse_rate
from callscribe.bridge.forks.events import (
    ForkEvent,
    ForkProtocolError,
    RemoteError,
    StreamStarted,
    StreamStopped,
)
from callscribe.bridge.forks.exotel import ExotelParser
from callscribe.bridge.forks.freeswitch import FreeswitchParser
from callscribe.bridge.forks.mediastream import SequenceReorder
from callscribe.bridge.forks.plivo import PlivoParser
from callscribe.bridge.forks.telnyx import TelnyxParser
from callscribe.bridge.forks.twilio import TwilioParser
from callscribe.codecs import spec_by_name


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def feed(parser: Any, *messages: str | bytes) -> list[ForkEvent]:
    events: list[ForkEvent] = []
    for message in messages:
        events += parser.receive_text(message) if isinstance(message, str) else parser.receive_bytes(message)
    return events


def drops(events: list[ForkEvent]) -> list[str]:
    return [e.reason for e in events if isinstance(e, Dropped)]


# -- Twilio -------------------------------------------------------------------------------
def twilio_start(**start: Any) -> str:
    body = {
        "accountSid": "AC0",
        "streamSid": "MZ1",
        "callSid": "CA42",
        "tracks": ["inbound", "outbound"],
        "customParameters": {"agent": "ann", "token": "s3cret"},
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        **start,
    }
    return json.dumps({"event": "start", "sequenceNumber": "1", "streamSid": "MZ1", "start": body})


def twilio_media(seq: int, track: str, payload: bytes) -> str:
    media = {"track": track, "chunk": str(seq), "timestamp": str(20 * seq), "payload": b64(payload)}
    return json.dumps({"event": "media", "sequenceNumber": str(seq), "streamSid": "MZ1", "media": media})


def test_twilio_call_sequence() -> None:
    events = feed(
        TwilioParser(),
        json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}),
        twilio_start(),
        twilio_media(2, "inbound", b"\xff" * 160),
        twilio_media(3, "outbound", b"\x7f" * 160),
        json.dumps(
            {
                "event": "dtmf",
                "streamSid": "MZ1",
                "sequenceNumber": "4",
                "dtmf": {"track": "inbound_track", "digit": "5"},
            }
        ),
        json.dumps({"event": "mark", "sequenceNumber": "5", "streamSid": "MZ1", "mark": {"name": "m"}}),
        json.dumps(
            {
                "event": "stop",
                "sequenceNumber": "6",
                "streamSid": "MZ1",
                "stop": {"accountSid": "AC0", "callSid": "CA42"},
            }
        ),
    )
    started = events[0]
    assert isinstance(started, StreamStarted)
    assert started.call_id == "CA42" and started.token == "s3cret"
    assert started.meta["custom"] == {"agent": "ann"}  # the token is never published
    assert started.meta["streamSid"] == "MZ1"
    assert events[1:] == [
        AudioReceived("caller", b"\xff" * 160, "pcmu"),
        AudioReceived("agent", b"\x7f" * 160, "pcmu"),
        DtmfReceived("caller", "5", 0),
        StreamStopped("stop"),
    ]


def test_twilio_inbound_only_refuses_outbound_media() -> None:
    parser = TwilioParser()
    feed(parser, twilio_start(tracks=["inbound"]))
    assert drops(feed(parser, twilio_media(2, "outbound", b"\x00"))) == ["bad_shape"]


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("not json", "bad_json"),
        ("[1, 2]", "bad_shape"),
        ('{"no": "event"}', "bad_shape"),
        ('{"event": 7}', "bad_shape"),
        ('{"event": "media", "media": "flat"}', "bad_shape"),
        ('{"event": "media", "media": {"track": "inbound", "payload": 5}}', "bad_shape"),
        ('{"event": "media", "media": {"track": "sideways", "payload": "AA=="}}', "bad_shape"),
        ('{"event": "media", "media": {"track": "inbound", "payload": "%%%not-base64"}}', "bad_base64"),
        ('{"event": "media", "media": {"track": "inbound", "payload": ""}}', "empty"),
        ('{"event": "dtmf", "dtmf": {"digit": "55"}}', "bad_shape"),
        ('{"event": "dtmf", "dtmf": {"digit": "X"}}', "bad_shape"),
        ('{"event": "teleport", "sequenceNumber": "9"}', "unknown_event"),
    ],
)
def test_twilio_bad_messages_are_counted_drops(message: str, reason: str) -> None:
    parser = TwilioParser()
    feed(parser, twilio_start())
    assert drops(feed(parser, message)) == [reason]
    # The stream goes on.
    assert feed(parser, twilio_media(10, "inbound", b"\x01")) == [AudioReceived("caller", b"\x01", "pcmu")]


def test_twilio_order_of_life() -> None:
    parser = TwilioParser()
    assert drops(feed(parser, twilio_media(1, "inbound", b"\x01"))) == ["before_start"]
    assert drops(feed(parser, b"\x00\x01")) == ["unexpected_binary"]
    feed(parser, twilio_start())
    assert drops(feed(parser, twilio_start())) == ["duplicate_start"]
    feed(parser, json.dumps({"event": "stop", "sequenceNumber": "3"}))
    assert drops(feed(parser, twilio_media(4, "inbound", b"\x01"))) == ["after_stop"]


def test_twilio_bad_start_shape_is_dropped_and_media_waits() -> None:
    parser = TwilioParser()
    assert drops(feed(parser, json.dumps({"event": "start", "start": {"streamSid": "MZ1"}}))) == ["bad_shape"]
    assert drops(feed(parser, twilio_media(2, "inbound", b"\x01"))) == ["before_start"]


def test_twilio_unsupported_encoding_ends_the_stream() -> None:
    with pytest.raises(ForkProtocolError, match="audio/x-speex"):
        feed(TwilioParser(), twilio_start(mediaFormat={"encoding": "audio/x-speex"}))


# -- Telnyx -------------------------------------------------------------------------------
def telnyx_start(encoding: str = "PCMU", rate: int = 8000) -> str:
    start = {
        "user_id": "u",
        "call_control_id": "v2:abc",
        "call_session_id": "s",
        "from": "+1312",
        "to": "+1313",
        "custom_parameters": {"customer_id": "c1"},
        "media_format": {"encoding": encoding, "sample_rate": rate, "channels": 1},
    }
    return json.dumps({"event": "start", "sequence_number": "1", "stream_id": "S1", "start": start})


def telnyx_media(seq: int, track: str = "inbound") -> str:
    media = {
        "track": track,
        "chunk": str(seq),
        "timestamp": str(seq * 20),
        "payload": b64(struct.pack("!H", seq)),
    }
    return json.dumps({"event": "media", "sequence_number": str(seq), "stream_id": "S1", "media": media})


def payload_seqs(events: list[ForkEvent]) -> list[int]:
    return [struct.unpack("!H", e.payload)[0] for e in events if isinstance(e, AudioReceived)]


def test_telnyx_start_and_codecs() -> None:
    started = feed(TelnyxParser(), telnyx_start())[0]
    assert isinstance(started, StreamStarted) and started.call_id == "v2:abc"
    assert started.meta["custom"] == {"customer_id": "c1"} and started.meta["from"] == "+1312"
    for encoding, rate, codec in [
        ("PCMA", 8000, "pcma"),
        ("G722", 16000, "g722"),
        ("OPUS", 16000, "opus"),
        ("L16", 16000, "l16-16k"),
    ]:
        parser = TelnyxParser()
        feed(parser, telnyx_start(encoding, rate))
        assert parser.codecs == {"caller": codec, "agent": codec}
        spec_by_name(codec)  # every codec named here exists in the registry
    with pytest.raises(ForkProtocolError, match="AMR-WB"):
        feed(TelnyxParser(), telnyx_start("AMR-WB", 16000))


def test_telnyx_out_of_order_frames_are_sorted() -> None:
    parser = TelnyxParser()
    feed(parser, telnyx_start())
    order = [3, 2, 5, 4, 7, 6, 8, 10, 9]
    events = feed(parser, *(telnyx_media(seq) for seq in order))
    events += feed(parser, json.dumps({"event": "stop", "sequence_number": "11", "stream_id": "S1"}))
    assert payload_seqs(events) == sorted(order)
    assert isinstance(events[-1], StreamStopped)


def test_telnyx_first_media_out_of_order_is_not_lost() -> None:
    parser = TelnyxParser()
    feed(parser, telnyx_start())
    assert payload_seqs(feed(parser, telnyx_media(3))) == []
    assert payload_seqs(feed(parser, telnyx_media(2))) == [2, 3]


def test_telnyx_gap_is_given_up_after_the_window_and_late_frames_dropped() -> None:
    parser = TelnyxParser()
    feed(parser, telnyx_start())
    # 2 does not come in time: frames wait while at most 10 are held, then the gap is given up.
    waiting = feed(parser, *(telnyx_media(seq) for seq in range(3, 13)))
    assert payload_seqs(waiting) == []
    assert payload_seqs(feed(parser, telnyx_media(13))) == list(range(3, 14))
    assert payload_seqs(feed(parser, telnyx_media(14))) == [14]
    assert drops(feed(parser, telnyx_media(2))) == ["late"]
    assert parser.finish() == []


@settings(max_examples=200)
@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_reorder_restores_any_bounded_shuffle(seed: int) -> None:
    rng = random.Random(seed)
    seqs = list(range(2, 80))
    # Each frame is displaced by at most 5 places: within the reorder window.
    shuffled = sorted(seqs, key=lambda s: s + rng.uniform(0, 5))
    reorder = SequenceReorder(window=10)
    reorder.expect(2)
    out: list[ForkEvent] = []
    for seq in shuffled:
        released = reorder.push(seq, [AudioReceived("caller", struct.pack("!H", seq), "pcmu")])
        assert released is not None
        out += released
    out += reorder.flush()
    assert payload_seqs(out) == seqs


def test_reorder_refuses_duplicates() -> None:
    reorder = SequenceReorder()
    reorder.expect(1)
    assert reorder.push(1, []) == []
    assert reorder.push(1, []) is None
    assert reorder.push(3, []) == [] and reorder.push(3, []) is None


# -- Plivo, Exotel ------------------------------------------------------------------------
def test_plivo_stream() -> None:
    start = {
        "event": "start",
        "sequenceNumber": 0,
        "start": {
            "callId": "c-1",
            "streamId": "s-1",
            "accountId": "A",
            "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-l16", "sampleRate": 16000},
        },
        "extra_headers": json.dumps({"token": "s3cret", "crm": "42"}),
    }
    media = {
        "event": "media",
        "sequenceNumber": 1,
        "streamId": "s-1",
        "media": {"track": "inbound", "timestamp": "20", "chunk": 1, "payload": b64(b"\x01\x00")},
    }
    events = feed(PlivoParser(), json.dumps(start), json.dumps(media))
    started = events[0]
    assert isinstance(started, StreamStarted)
    assert (started.call_id, started.token, started.meta["custom"]) == ("c-1", "s3cret", {"crm": "42"})
    assert events[1] == AudioReceived("caller", b"\x01\x00", "s16le-16k")


def test_exotel_stream_is_raw_pcm_on_one_leg() -> None:
    start = {
        "event": "start",
        "sequence_number": "1",
        "stream_sid": "MZ",
        "start": {
            "stream_sid": "MZ",
            "call_sid": "CA9",
            "account_sid": "AC",
            "from": "+91",
            "to": "+92",
            "custom_parameters": {"k": "v"},
            "media_format": {"encoding": "audio/x-raw", "sample_rate": "8000", "bit_rate": "16"},
        },
    }
    media = {
        "event": "media",
        "sequence_number": "3",
        "stream_sid": "MZ",
        "media": {"chunk": "2", "timestamp": "200", "payload": b64(b"\x02\x00" * 800)},
    }
    dtmf = {
        "event": "dtmf",
        "sequence_number": "4",
        "stream_sid": "MZ",
        "dtmf": {"digit": "5", "duration": "100"},
    }
    events = feed(ExotelParser(), json.dumps(start), json.dumps(media), json.dumps(dtmf))
    assert isinstance(events[0], StreamStarted) and events[0].call_id == "CA9"
    assert events[1:] == [
        AudioReceived("caller", b"\x02\x00" * 800, "s16le-8k"),
        DtmfReceived("caller", "5", 100),
    ]


def test_exotel_custom_parameters_as_a_string() -> None:
    start = {"event": "start", "start": {"call_sid": "CA9", "custom_parameters": "crm=42"}}
    started = feed(ExotelParser(), json.dumps(start))[0]
    assert isinstance(started, StreamStarted) and started.meta["custom"] == {"raw": "crm=42"}


# -- Asterisk chan_websocket --------------------------------------------------------------
PLAIN_START = (
    "MEDIA_START connection_id:e226e283-c90a-4ea9-9e37-389000b9ef47 channel:WebSocket/media_connection1/0x7f "
    "channel_id:1700000000.42 format:ulaw optimal_frame_size:160 ptime:20"
)


def test_asterisk_plain_text_session() -> None:
    events = feed(
        AsteriskWebsocketParser(),
        PLAIN_START,
        b"\xff" * 160,
        "DTMF_END digit:# channel_id:1700000000.42",
        "MEDIA_XOFF",
        "STATUS queue_length:43 xon_level:800",
        b"\x7f" * 160,
    )
    started = events[0]
    assert isinstance(started, StreamStarted) and started.call_id == "1700000000.42"
    assert started.meta["format"] == "ulaw" and started.meta["channel"] == "WebSocket/media_connection1/0x7f"
    assert events[1:] == [
        AudioReceived("caller", b"\xff" * 160, "pcmu"),
        DtmfReceived("caller", "#", 0),
        AudioReceived("caller", b"\x7f" * 160, "pcmu"),
    ]


def test_asterisk_json_session_with_call_id_from_channel_variables() -> None:
    start = {
        "event": "MEDIA_START",
        "connection_id": "c",
        "channel": "WebSocket/x",
        "channel_id": "17.1",
        "format": "slin16",
        "optimal_frame_size": 640,
        "ptime": 20,
        "channel_variables": {"CALLSCRIBE_CALL_ID": "call-77"},
    }
    parser = AsteriskWebsocketParser({"leg": "agent"})
    events = feed(
        parser,
        json.dumps(start),
        b"\x00\x01" * 320,
        json.dumps({"event": "ERROR", "channel_id": "17.1", "error_text": "boom"}),
    )
    assert isinstance(events[0], StreamStarted) and events[0].call_id == "call-77"
    assert events[1:] == [AudioReceived("agent", b"\x00\x01" * 320, "s16le-16k"), RemoteError("boom")]


def test_asterisk_url_call_id_wins_and_bad_input_is_dropped() -> None:
    parser = AsteriskWebsocketParser({"call_id": "from-url"})
    assert drops(feed(parser, b"\x00" * 160)) == ["before_start"]
    assert drops(feed(parser, "DTMF_END digit:1")) == ["before_start"]
    started = feed(parser, PLAIN_START)[0]
    assert isinstance(started, StreamStarted) and started.call_id == "from-url"
    assert drops(feed(parser, "{broken json", "MEDIA_START what", "FLY_AWAY now:1", b"", PLAIN_START)) == [
        "bad_control",
        "bad_control",
        "unknown_event",
        "empty",
        "duplicate_start",
    ]


def test_asterisk_unsupported_format() -> None:
    with pytest.raises(ForkProtocolError, match="'gsm'"):
        feed(AsteriskWebsocketParser(), PLAIN_START.replace("format:ulaw", "format:gsm"))


def test_asterisk_error_text_keeps_its_spaces() -> None:
    assert parse_control("ERROR channel_id:1.2 error_text:queue is full, dropping") == (
        "ERROR",
        {"channel_id": "1.2", "error_text": "queue is full, dropping"},
    )


# -- FreeSWITCH mod_audio_fork / mod_audio_stream -----------------------------------------
def test_freeswitch_stereo_splits_into_caller_and_agent() -> None:
    parser = FreeswitchParser()
    metadata = json.dumps(
        {"call_id": "fs-uuid", "mix": "stereo", "rate": "16k", "transcripts": True, "crm": 1}
    )
    left, right = [1, 2, 3], [-1, -2, -3]
    interleaved = struct.pack("<6h", *(s for pair in zip(left, right, strict=True) for s in pair))
    events = feed(parser, metadata, interleaved[:5], interleaved[5:])  # a sample split across frames
    started = events[0]
    assert isinstance(started, StreamStarted)
    assert started.call_id == "fs-uuid" and started.reply_transcripts
    assert started.meta["metadata"]["crm"] == 1 and started.meta["mix"] == "stereo"
    media = [e for e in events if isinstance(e, AudioReceived)]
    caller = b"".join(e.payload for e in media if e.leg == "caller")
    agent = b"".join(e.payload for e in media if e.leg == "agent")
    assert struct.unpack("<3h", caller) == tuple(left) and struct.unpack("<3h", agent) == tuple(right)
    assert {e.codec for e in media} == {"s16le-16k"}


def test_freeswitch_settings_from_the_url_and_no_metadata() -> None:
    parser = FreeswitchParser({"call_id": "u-1", "rate": "8000", "leg": "agent"})
    events = feed(parser, b"\x01\x00\x02\x00")
    assert isinstance(events[0], StreamStarted) and events[0].call_id == "u-1"
    assert events[1] == AudioReceived("agent", b"\x01\x00\x02\x00", "s16le-8k")
    assert events[0].reply_transcripts is False


def test_freeswitch_plain_uuid_metadata_and_graceful_shutdown() -> None:
    parser = FreeswitchParser({"mix": "mixed"})
    uuid_text = "0d4e3c8a-1b2c-4d5e-8f90-a1b2c3d4e5f6"
    events = feed(
        parser, uuid_text, b"\x01\x00", json.dumps({"event": "dtmf", "digit": "9"}), b"", b"\x01\x00"
    )
    assert isinstance(events[0], StreamStarted) and events[0].call_id == uuid_text
    assert events[1:4] == [
        AudioReceived("mixed", b"\x01\x00", "s16le-8k"),
        DtmfReceived("mixed", "9", 0),
        StreamStopped("graceful"),
    ]
    assert drops(events[4:]) == ["after_stop"]


def test_freeswitch_without_any_call_id_gets_a_made_up_one() -> None:
    started = feed(FreeswitchParser(), "just some words")[0]
    assert isinstance(started, StreamStarted)
    assert started.call_id.startswith("freeswitch-") and started.meta["call_id_generated"]
    assert started.meta["metadata"] == "just some words"


@pytest.mark.parametrize("metadata", ['{"mix": "surround"}', '{"rate": "fast"}', '{"rate": 4000}'])
def test_freeswitch_bad_settings_end_the_stream(metadata: str) -> None:
    with pytest.raises(ForkProtocolError):
        feed(FreeswitchParser(), metadata)


def test_rates_and_codec_names() -> None:
    assert [parse_rate(t) for t in ("8k", "16k", "16000", "44.1k")] == [8000, 16000, 16000, 44100]
    assert linear_codec(44100) == "s16le-44k" and linear_codec(8000, big_endian=True) == "l16-8k"
    for rate in (8000, 16000, 24000, 32000, 44100, 48000, 96000, 192000):
        assert spec_by_name(linear_codec(rate)).sample_rate == rate


# -- every dialect: garbage in, never a crash ----------------------------------------------
@settings(max_examples=150, deadline=None)
@given(
    dialect=st.sampled_from(sorted(DIALECTS)),
    messages=st.lists(
        st.one_of(
            st.binary(max_size=64),
            st.text(max_size=64),
            st.builds(
                lambda event, body: json.dumps({"event": event, **body}),
                st.sampled_from(["start", "media", "dtmf", "stop", "mark", "connected", "MEDIA_START", "x"]),
                st.dictionaries(
                    st.sampled_from(
                        ["start", "media", "dtmf", "sequence_number", "sequenceNumber", "stream_id"]
                    ),
                    st.one_of(
                        st.none(),
                        st.integers(),
                        st.text(max_size=8),
                        st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3),
                    ),
                    max_size=4,
                ),
            ),
        ),
        max_size=12,
    ),
)
def test_any_input_gives_events_or_a_protocol_error(dialect: str, messages: list[str | bytes]) -> None:
    parser = DIALECTS[dialect]({})
    try:
        events = feed(parser, *messages) + parser.finish()
    except ForkProtocolError:
        return
    media = [e for e in events if isinstance(e, AudioReceived)]
    started = [e for e in events if isinstance(e, StreamStarted)]
    assert len(started) <= 1
    assert not media or started, "media only ever follows a start"


@pytest.mark.parametrize(
    ("parser_class", "call_key", "format_key", "rate_key", "encoding"),
    [
        (ExotelParser, "call_sid", "media_format", "sample_rate", "raw"),  # fuzz/run.sh found it
        (PlivoParser, "callId", "mediaFormat", "sampleRate", "audio/x-l16"),
        (TelnyxParser, "call_control_id", "media_format", "sample_rate", "L16"),
    ],
)
@pytest.mark.parametrize("rate", [0, -8000])
def test_linear_audio_at_a_rate_of_zero_or_less_is_a_protocol_error(
    parser_class: type[ExotelParser | PlivoParser | TelnyxParser],
    call_key: str,
    format_key: str,
    rate_key: str,
    encoding: str,
    rate: int,
) -> None:
    start = {call_key: "c1", format_key: {"encoding": encoding, rate_key: rate}}
    with pytest.raises(ForkProtocolError, match="rate"):  # was a bare ValueError from linear_codec
        parser_class().receive_text(json.dumps({"event": "start", "start": start}))
