"""Seed corpora built from real messages: the SIP/SIPREC captures in tests/unit/sip_data, RTP
packets of real speech, and the websocket streams the fork senders in tests/ replay.

`python -m fuzz.corpus DIR` writes DIR/<target>/seed-N files (regenerated on every run, so
nothing binary lives in the repository).
"""

from __future__ import annotations

import struct
import sys
import uuid
from pathlib import Path

import numpy as np

from callscribe.bridge.rtp.packet import RtpPacket
from callscribe.bridge.rtp.sender import packetize
from callscribe.bridge.sip.message import parse_message
from callscribe.bridge.sip.siprec import split_multipart
from callscribe.codecs import spec_by_name
from callscribe.codecs.dtmf import TelephoneEvent
from fuzz.targets import TARGETS
from tests import fork_senders
from tests.support import load_clip
from tests.unit.sip_data import MESSAGES, load


def _speech_8k(seconds: float = 0.4) -> np.ndarray:
    clip = load_clip("librivox-0870")
    return fork_senders.at_rate(clip, 8000)[: int(8000 * seconds)]


def _rtp_packets(count: int = 12) -> list[bytes]:
    clip = load_clip("librivox-0870")
    frames = packetize(clip.pcm[: clip.rate], clip.rate, spec_by_name("pcmu"), 20)[:count]
    packets = [
        RtpPacket(0, 1000 + i, 8000 + ts, 0x1234ABCD, payload).serialize()
        for i, (ts, payload) in enumerate(frames)
    ]
    dtmf = [
        RtpPacket(
            101, 1000 + count + i, 8000 + count * 160, 0x1234ABCD, event.serialize(), marker=i == 0
        ).serialize()
        for i, event in enumerate(
            [
                TelephoneEvent.for_digit("5", duration=160),
                TelephoneEvent.for_digit("5", end=True, duration=800),
            ]
        )
    ]
    return packets + dtmf


def _framed_datagrams(packets: list[bytes]) -> bytes:
    return b"".join(struct.pack("!BH", 20, len(p)) + p for p in packets)


def _fork_input(dialect_index: int, messages: list[str | bytes]) -> bytes:
    out = bytearray([dialect_index])
    for message in messages:
        raw, kind = (message.encode(), 0) if isinstance(message, str) else (message, 1)
        out += struct.pack("!HB", len(raw), kind) + raw
    return bytes(out)


def seeds() -> dict[str, list[bytes]]:
    from callscribe.bridge.forks import DIALECTS

    sip = [load(name) for name in MESSAGES]
    bodies = [m.partition(b"\r\n\r\n")[2] for m in sip]
    content_types = [(parse_message(m).headers.get("content-type") or "").encode() for m in sip]
    sdp_bodies: list[bytes] = [bodies[0]]
    metadata: list[bytes] = []
    for content_type, body in zip(content_types[1:], bodies[1:], strict=True):
        for part in split_multipart(content_type.decode(), body):
            (sdp_bodies if "sdp" in part.content_type else metadata).append(part.content)
    rtp = _rtp_packets()
    pcm8k = _speech_8k()
    ulaw = [p[12:] for p in rtp[:10]]
    names = sorted(DIALECTS)
    left = pcm8k[: 8000 // 5]
    fork_streams: dict[str, list[str | bytes]] = {
        "asterisk": fork_senders.asterisk_websocket_stream("1700000000.1", ulaw),
        "freeswitch": fork_senders.freeswitch_stereo_stream({"callId": "fs-1"}, left, left, 8000),
        "twilio": [*fork_senders.twilio_stream("CA" + "0" * 32, ulaw, ulaw)],
        "telnyx": [*fork_senders.telnyx_stream("v3:abc", ulaw)],
        "plivo": [*fork_senders.plivo_stream("plivo-1", ulaw)],
        "exotel": [*fork_senders.exotel_stream("exo-1", pcm8k[:1600])],
    }
    return {
        "rtp_packet": rtp,
        "rtcp_detection": [rtp[0], bytes.fromhex("80c8000600000001") + bytes(20)],
        "dtmf_payload": [bytes.fromhex("0000") + p[12:] for p in rtp[-2:]],
        "jitter_buffer": [_framed_datagrams(rtp), _framed_datagrams(rtp[::-1])],
        "rtp_receiver": [_framed_datagrams(rtp), _framed_datagrams([rtp[1], rtp[0], *rtp[3:]])],
        "audiosocket": [b"".join(fork_senders.audiosocket_stream(uuid.UUID(int=7), pcm8k[:1600], "12"))],
        "sip_message": sip,
        "sdp": sdp_bodies,
        "siprec_metadata": metadata,
        "siprec_body": [ct + b"\n" + body for ct, body in zip(content_types, bodies, strict=True)],
        "websocket_fork": [
            _fork_input(names.index(name), messages)
            for name, messages in fork_streams.items()
            if name in names
        ],
        # What follows the nonce in a UAC's header (RFC 2617 §3.5), and whole headers.
        "sip_digest": [
            b'uri="sip:transcribe@192.0.2.10", response="6629fae49393a05397450978507c4ef1", '
            b'algorithm=MD5, qop=auth, nc=00000001, cnonce="0a4f113b"',
            b'Digest username="pbx", realm="callscribe", nonce="\xc3\xa9", uri="sip:x", response="\xc3\xa4"',
            b'uri="sip:transcribe@192.0.2.10", response="0", nc=ffffffff, qop=auth',
        ],
    }


def write(directory: Path) -> None:
    all_seeds = seeds()
    missing = set(TARGETS) - set(all_seeds)
    if missing:
        raise RuntimeError(f"targets without seeds: {sorted(missing)}")
    for target, inputs in all_seeds.items():
        folder = directory / target
        folder.mkdir(parents=True, exist_ok=True)
        for i, data in enumerate(inputs):
            (folder / f"seed-{i}").write_bytes(data)


if __name__ == "__main__":
    write(Path(sys.argv[1]))
