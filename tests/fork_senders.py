"""What each media-fork sender puts on the wire, built from real speech, for the integration tests.

Every function returns the exact message sequence of one sender (Asterisk AudioSocket and
chan_websocket, FreeSWITCH mod_audio_fork, Twilio, Telnyx, Plivo, Exotel) with 20 ms of audio
per media message, as the senders do; `replay()` plays them at a chosen pace.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import jiwer
import numpy as np
import numpy.typing as npt
import soxr

from callscribe.codecs import encoder_for, spec_by_name
from tests.support import CLIPS, Clip, load_clip

FRAME_MS = 20
Pcm = npt.NDArray[np.int16]


def at_rate(clip: Clip, rate: int) -> Pcm:
    if rate == clip.rate:
        return clip.pcm
    out = soxr.resample(clip.pcm.astype(np.float32) / 32768.0, clip.rate, rate)
    pcm: Pcm = np.clip(np.round(out * 32768.0), -32768, 32767).astype(np.int16)
    return pcm


def frames(pcm: Pcm, rate: int) -> Iterator[Pcm]:
    step = rate * FRAME_MS // 1000
    for start in range(0, pcm.size - step + 1, step):
        yield pcm[start : start + step]


def encoded_frames(pcm: Pcm, rate: int, codec: str) -> list[bytes]:
    encoder = encoder_for(spec_by_name(codec))
    return [encoder.encode(frame) for frame in frames(pcm, rate)]


def with_silence(pcm: Pcm, rate: int, before_s: float = 0.3, after_s: float = 0.8) -> Pcm:
    """Clips are trimmed tight; senders stream the silence around speech too."""
    return np.concatenate(
        [np.zeros(int(rate * before_s), np.int16), pcm, np.zeros(int(rate * after_s), np.int16)]
    )


def two_legs(caller: Pcm, agent: Pcm, rate: int, gap_s: float = 0.5) -> tuple[Pcm, Pcm]:
    """A conversation: the caller speaks, then the agent; each leg silent while the other talks."""
    gap = np.zeros(int(rate * gap_s), np.int16)
    left = np.concatenate([caller, gap, np.zeros(agent.size, np.int16), gap])
    right = np.concatenate([np.zeros(caller.size, np.int16), gap, agent, gap])
    return left, right


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# -- Asterisk ------------------------------------------------------------------------------
def audiosocket_stream(call_id: uuid.UUID, pcm8k: Pcm, digits: str = "") -> list[bytes]:
    """AudioSocket(): UUID frame, 320-byte kind 0x10 frames, DTMF frames, then a hangup."""

    def frame(kind: int, payload: bytes) -> bytes:
        return struct.pack("!BH", kind, len(payload)) + payload

    out = [frame(0x01, call_id.bytes)]
    out += [frame(0x10, f.astype("<i2").tobytes()) for f in frames(pcm8k, 8000)]
    out += [frame(0x03, d.encode()) for d in digits]
    return [*out, frame(0x00, b"")]


def asterisk_websocket_stream(channel_id: str, ulaw: Sequence[bytes]) -> list[str | bytes]:
    """chan_websocket with the default plain-text control messages, format ulaw."""
    start = (
        f"MEDIA_START connection_id:{uuid.uuid4()} channel:WebSocket/callscribe/0x55d0 "
        f"channel_id:{channel_id} format:ulaw optimal_frame_size:160 ptime:20"
    )
    return [start, *ulaw, f"DTMF_END digit:5 channel_id:{channel_id}"]


# -- FreeSWITCH ------------------------------------------------------------------------------
def freeswitch_stereo_stream(metadata: dict[str, Any], left: Pcm, right: Pcm, rate: int) -> list[str | bytes]:
    """mod_audio_fork stereo: metadata text frame, interleaved L16 LE frames, then the
    zero-length binary frame of a graceful shutdown."""
    interleaved = np.column_stack([left, right]).astype("<i2")
    step = rate * FRAME_MS // 1000
    out: list[str | bytes] = [json.dumps(metadata)]
    out += [interleaved[i : i + step].tobytes() for i in range(0, len(interleaved) - step + 1, step)]
    return [*out, b""]


# -- Twilio family ---------------------------------------------------------------------------
def twilio_stream(
    call_sid: str,
    caller: Sequence[bytes],
    agent: Sequence[bytes] = (),
    parameters: dict[str, str] | None = None,
) -> list[str]:
    """Twilio <Start><Stream track="both_tracks">: connected, start, media per track, dtmf, stop."""
    stream_sid = "MZ" + uuid.uuid4().hex
    tracks = ["inbound", "outbound"] if agent else ["inbound"]
    out = [json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})]
    start = {
        "accountSid": "AC" + "0" * 32,
        "streamSid": stream_sid,
        "callSid": call_sid,
        "tracks": tracks,
        "customParameters": parameters or {},
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
    }
    out.append(json.dumps({"event": "start", "sequenceNumber": "1", "start": start, "streamSid": stream_sid}))
    seq = 1
    for index in range(max(len(caller), len(agent))):
        for track, payloads in (("inbound", caller), ("outbound", agent)):
            if index < len(payloads):
                seq += 1
                media = {
                    "track": track,
                    "chunk": str(index + 1),
                    "timestamp": str(index * FRAME_MS),
                    "payload": b64(payloads[index]),
                }
                out.append(
                    json.dumps(
                        {
                            "event": "media",
                            "sequenceNumber": str(seq),
                            "media": media,
                            "streamSid": stream_sid,
                        }
                    )
                )
    dtmf = {"track": "inbound_track", "digit": "7"}
    out.append(
        json.dumps({"event": "dtmf", "streamSid": stream_sid, "sequenceNumber": str(seq + 1), "dtmf": dtmf})
    )
    stop = {"accountSid": start["accountSid"], "callSid": call_sid}
    out.append(
        json.dumps({"event": "stop", "sequenceNumber": str(seq + 2), "streamSid": stream_sid, "stop": stop})
    )
    return out


def telnyx_stream(call_control_id: str, pcmu: Sequence[bytes]) -> list[str]:
    """Telnyx media streaming, inbound track, PCMU 8 kHz, in sending order (seq 1 = start)."""
    stream_id = str(uuid.uuid4())
    start = {
        "user_id": str(uuid.uuid4()),
        "call_control_id": call_control_id,
        "call_session_id": str(uuid.uuid4()),
        "from": "+13122010094",
        "to": "+13122123456",
        "client_state": b64(b"callscribe"),
        "media_format": {"encoding": "PCMU", "sample_rate": 8000, "channels": 1},
    }
    out = [
        json.dumps({"event": "connected", "version": "1.0.0"}),
        json.dumps({"event": "start", "sequence_number": "1", "start": start, "stream_id": stream_id}),
    ]
    for index, payload in enumerate(pcmu):
        media = {
            "track": "inbound",
            "chunk": str(index + 1),
            "timestamp": str(index * FRAME_MS),
            "payload": b64(payload),
        }
        out.append(
            json.dumps(
                {"event": "media", "sequence_number": str(index + 2), "media": media, "stream_id": stream_id}
            )
        )
    stop = {"user_id": start["user_id"], "call_control_id": call_control_id}
    out.append(
        json.dumps(
            {"event": "stop", "sequence_number": str(len(pcmu) + 2), "stop": stop, "stream_id": stream_id}
        )
    )
    return out


def plivo_stream(call_id: str, pcmu: Sequence[bytes]) -> list[str]:
    stream_id = str(uuid.uuid4())
    start = {
        "callId": call_id,
        "streamId": stream_id,
        "accountId": "MA" + "0" * 18,
        "tracks": ["inbound"],
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000},
    }
    out = [json.dumps({"event": "start", "sequenceNumber": 0, "start": start, "extra_headers": "{}"})]
    for index, payload in enumerate(pcmu):
        media = {
            "track": "inbound",
            "timestamp": str(index * FRAME_MS),
            "chunk": index + 1,
            "payload": b64(payload),
        }
        out.append(
            json.dumps({"event": "media", "sequenceNumber": index + 1, "streamId": stream_id, "media": media})
        )
    return [*out, json.dumps({"event": "stop", "sequenceNumber": len(pcmu) + 1, "streamId": stream_id})]


def exotel_stream(call_sid: str, pcm8k: Pcm) -> list[str]:
    """Exotel Stream applet: raw 16-bit PCM at 8 kHz, 100 ms per media message."""
    stream_sid = "MZ" + uuid.uuid4().hex
    start = {
        "stream_sid": stream_sid,
        "call_sid": call_sid,
        "account_sid": "exotel-acct",
        "from": "+919876543210",
        "to": "+918047491899",
        "custom_parameters": {"campaign": "test"},
        "media_format": {"encoding": "audio/x-raw", "sample_rate": "8000", "bit_rate": "16"},
    }
    out = [
        json.dumps({"event": "connected"}),
        json.dumps({"event": "start", "sequence_number": "1", "stream_sid": stream_sid, "start": start}),
    ]
    step = 800
    for index, start_at in enumerate(range(0, pcm8k.size - step + 1, step)):
        chunk = pcm8k[start_at : start_at + step].astype("<i2").tobytes()
        media = {"chunk": str(index + 1), "timestamp": str(index * 100), "payload": b64(chunk)}
        out.append(
            json.dumps(
                {
                    "event": "media",
                    "sequence_number": str(index + 2),
                    "stream_sid": stream_sid,
                    "media": media,
                }
            )
        )
    return [*out, json.dumps({"event": "stop", "sequence_number": str(len(out)), "stream_sid": stream_sid})]


def assert_heard(text: str, reference: str, max_wer: float = 0.6) -> None:
    """The leg's finals are this clip: closer to its reference than to any other clip's, and
    about as accurate as the embedded engine is on the phone path (8 kHz μ-law, per clip, offline:
    0.29-0.50 WER, tests/integration/test_sphinx_engine.py). A wrong leg, a lost utterance or
    garbled audio fails this."""
    assert text, f"nothing heard for {reference!r}"
    wer = float(jiwer.wer(reference, text))
    others = {name: float(jiwer.wer(load_clip(name).reference, text)) for name in CLIPS}
    closest = min(others, key=lambda name: others[name])
    assert load_clip(closest).reference == reference, f"heard {text!r}, closest to {closest}: {others}"
    assert wer <= max_wer, f"WER {wer:.2f} > {max_wer}: heard {text!r} for {reference!r}"


async def replay(send: Any, messages: Sequence[str | bytes], interval_s: float) -> None:
    """Send each message, `interval_s` apart (0.02 per 20 ms message is real time)."""
    loop = asyncio.get_running_loop()
    begin = loop.time()
    for index, message in enumerate(messages):
        await send(message)
        delay = begin + (index + 1) * interval_s - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
