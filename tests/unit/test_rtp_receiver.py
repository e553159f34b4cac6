"""RtpLegReceiver: payload types, loss concealment by timestamp, DTMF, SSRC latching."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from callscribe.bridge.events import CALLER, AudioReceived, Dropped, DtmfReceived
from callscribe.bridge.rtp.packet import RtpPacket
from callscribe.bridge.rtp.receiver import LegEvent, RtpLegReceiver
from callscribe.codecs import encoder_for, spec_by_name
from callscribe.codecs.dtmf import TelephoneEvent

TONE = (np.sin(np.arange(160) / 3) * 8000).astype(np.int16)
ULAW = encoder_for(spec_by_name("pcmu")).encode(TONE)


def pcm(event: AudioReceived) -> np.ndarray:
    """The int16 samples of a decoded AudioReceived (the receiver reports s16le-<rate>)."""
    assert event.codec.startswith("s16le-")
    return np.frombuffer(event.payload, dtype="<i2")


def rate(event: AudioReceived) -> int:
    return spec_by_name(event.codec).sample_rate


def rtp(seq: int, ts: int, payload: bytes = ULAW, pt: int = 0, ssrc: int = 0xABC) -> bytes:
    return RtpPacket(pt, seq % 65536, ts % 2**32, ssrc, payload).serialize()


def audio_samples(events: list[LegEvent]) -> int:
    return sum(pcm(e).size for e in events if isinstance(e, AudioReceived))


def drops(events: list[LegEvent]) -> list[str]:
    return [e.reason for e in events if isinstance(e, Dropped)]


def test_in_order_pcmu_is_decoded_at_once() -> None:
    rx = RtpLegReceiver("pcmu")
    events = rx.receive(rtp(1, 1000), 0.0)
    assert len(events) == 1 and isinstance(events[0], AudioReceived)
    assert rate(events[0]) == 8000 and pcm(events[0]).size == 160
    assert np.max(np.abs(pcm(events[0]).astype(int) - TONE)) < 300


def test_loss_is_concealed_so_leg_time_stays_true() -> None:
    rx = RtpLegReceiver("pcmu", jitter_ms=60)
    events: list[LegEvent] = []
    now = 0.0
    for n in range(50):
        now = n * 0.02
        if n in (10, 11, 30):
            continue  # lost in the network
        events += rx.receive(rtp(n, 160 * n), now)
        events += rx.poll(now)
    events += rx.flush()
    assert audio_samples(events) == 50 * 160
    assert rx.concealed_samples == 3 * 160
    assert rx.lost == 3


def test_reordered_packets_keep_their_place() -> None:
    rx = RtpLegReceiver("pcmu", jitter_ms=60)
    marked = [encoder_for(spec_by_name("pcmu")).encode(np.full(160, 1000 * k, np.int16)) for k in range(4)]
    events = rx.receive(rtp(0, 0, marked[0]), 0.0)
    events += rx.receive(rtp(2, 320, marked[2]), 0.02)
    events += rx.receive(rtp(1, 160, marked[1]), 0.03)
    events += rx.receive(rtp(3, 480, marked[3]), 0.04)
    levels = [round(float(np.median(pcm(e))) / 1000) for e in events if isinstance(e, AudioReceived)]
    assert levels == [0, 1, 2, 3]
    assert rx.concealed_samples == 0


def test_payload_type_map_switch_and_declared_codec() -> None:
    rx = RtpLegReceiver("l16-16k", payload_types={111: "opus", 118: "l16-8k"})
    opus = encoder_for(spec_by_name("opus")).encode(np.zeros(960, np.int16))
    events = rx.receive(rtp(1, 0, opus, pt=111), 0.0)
    assert [(rate(e), pcm(e).size) for e in events if isinstance(e, AudioReceived)] == [(48000, 960)]
    events = rx.receive(rtp(2, 960, b"\x00\x01" * 80, pt=118), 0.02)  # switch mid-stream
    assert [(rate(e), pcm(e).size) for e in events if isinstance(e, AudioReceived)] == [(8000, 80)]
    events = rx.receive(rtp(3, 1040, ULAW, pt=0), 0.04)  # static PT
    assert [(rate(e), pcm(e).size) for e in events if isinstance(e, AudioReceived)] == [(8000, 160)]
    events = rx.receive(rtp(4, 2000, b"\x00\x01" * 320, pt=99), 0.06)  # unmapped dynamic → declared
    assert [(rate(e), pcm(e).size) for e in events if isinstance(e, AudioReceived)] == [(16000, 320)]


def test_g722_timestamps_are_half_the_samples() -> None:
    rx = RtpLegReceiver("pcmu")
    g722 = encoder_for(spec_by_name("g722")).encode(np.zeros(320, np.int16))
    events = rx.receive(rtp(1, 0, g722, pt=9), 0.0)
    events += rx.receive(rtp(3, 320, g722, pt=9), 0.02)  # one packet (160 ticks) lost
    events += rx.flush()
    assert audio_samples(events) == 3 * 320


def test_unknown_and_bad_payloads_are_dropped_with_reasons() -> None:
    rx = RtpLegReceiver("pcmu")
    events = rx.receive(rtp(1, 0, pt=3), 0.0)  # GSM: no decoder
    events += rx.receive(rtp(2, 160, b"\x00", pt=13), 0.01)  # comfort noise
    events += rx.receive(rtp(3, 320, b"", pt=0), 0.02)
    events += rx.receive(b"\x80\xc8" + bytes(26), 0.03)  # RTCP sender report (rtcp-mux)
    events += rx.receive(b"\x40" + bytes(20), 0.04)
    events += rx.receive(rtp(4, 480, b"\x01\x02\x03", pt=118), 0.05)  # dynamic → pcmu is fine
    assert drops(events) == ["unknown_payload_type", "comfort_noise", "empty_payload", "rtcp", "bad_version"]
    rx2 = RtpLegReceiver("l16")
    assert drops(rx2.receive(rtp(1, 0, b"\x00\x01\x02", pt=96), 0.0)) == ["undecodable"]


def test_dtmf_events_once_per_press() -> None:
    rx = RtpLegReceiver("pcmu", dtmf_payload_type=101)
    events: list[LegEvent] = []
    seq = 0
    for duration, end in [(160, False), (320, False), (640, True), (640, True), (640, True)]:
        payload = TelephoneEvent.for_digit("5", end, duration).serialize()
        events += rx.receive(rtp(seq, 8000, payload, pt=101), seq * 0.02)
        seq += 1
    assert [e for e in events if isinstance(e, DtmfReceived)] == [DtmfReceived(CALLER, "5", 80)]
    assert drops(rx.receive(rtp(seq, 9000, b"\x01", pt=101), 1.0)) == ["bad_dtmf"]


def test_absurd_timestamp_jump_is_capped_and_counted() -> None:
    rx = RtpLegReceiver("pcmu", max_gap_ms=1000)
    events = rx.receive(rtp(1, 0), 0.0)
    events += rx.receive(rtp(2, 2**31 - 5), 0.02)
    assert drops(events) == ["timestamp_jump"]
    assert audio_samples(events) == 160 + 8000 + 160
    # Silence suppression within the cap is real time and is filled exactly.
    events = rx.receive(rtp(3, 2**31 - 5 + 160 + 4000), 0.5)
    assert audio_samples(events) == 4000 + 160 and not drops(events)


def test_ssrc_is_latched_and_taken_over_only_after_silence() -> None:
    rx = RtpLegReceiver("pcmu", ssrc_takeover_ms=250)
    rx.receive(rtp(1, 0, ssrc=1), 0.0)
    assert drops(rx.receive(rtp(500, 0, ssrc=2), 0.1)) == ["ssrc_conflict"]
    rx.receive(rtp(2, 160, ssrc=1), 0.12)
    assert drops(rx.receive(rtp(501, 0, ssrc=2), 0.3)) == ["ssrc_conflict"]
    events = rx.receive(rtp(502, 777, ssrc=2), 0.4)  # ssrc 1 silent for 280 ms
    assert audio_samples(events) == 160 and rx.ssrc == 2 and rx.ssrc_changes == 1
    assert drops(rx.receive(rtp(3, 320, ssrc=1), 0.45)) == ["ssrc_conflict"]
    # The new stream has its own numbering: in order from 502 on, nothing concealed.
    events = rx.receive(rtp(503, 937, ssrc=2), 0.42)
    assert audio_samples(events) == 160 and rx.concealed_samples == 0


def test_sequence_and_timestamp_wrap_together() -> None:
    rx = RtpLegReceiver("pcmu")
    events: list[LegEvent] = []
    for n in range(10):
        events += rx.receive(rtp(65530 + n, 2**32 - 800 + 160 * n), n * 0.02)
    assert audio_samples(events) == 1600 and not drops(events)


def test_batching_joins_packets_and_poll_releases_old_audio() -> None:
    rx = RtpLegReceiver("pcmu", batch_ms=60)
    assert rx.receive(rtp(1, 0), 0.00) == []
    assert rx.receive(rtp(2, 160), 0.02) == []
    events = rx.receive(rtp(3, 320), 0.04)
    assert [(rate(e), pcm(e).size) for e in events if isinstance(e, AudioReceived)] == [(8000, 480)]
    assert rx.receive(rtp(4, 480), 0.06) == []
    assert rx.poll(0.10) == []
    assert audio_samples(rx.poll(0.12)) == 160  # waited the batch time
    rx.receive(rtp(5, 640), 0.14)
    digit = TelephoneEvent.for_digit("3", True, 800).serialize()
    events = rx.receive(rtp(6, 800, digit, pt=101), 0.16)
    # AudioReceived before the digit comes out first, so the digit is stamped after it.
    assert [type(e).__name__ for e in events] == ["AudioReceived", "DtmfReceived"]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 127),
            st.integers(0, 65535),
            st.integers(0, 2**32 - 1),
            st.sampled_from([1, 2]),
            st.binary(max_size=400),
            st.floats(0, 0.5),
        ),
        max_size=40,
    )
)
def test_hostile_packet_streams_never_raise(packets: list[tuple[int, int, int, int, bytes, float]]) -> None:
    rx = RtpLegReceiver(
        "opus", payload_types={111: "opus", 118: "l16-16k", 9: "g722"}, batch_ms=60, max_gap_ms=500
    )
    now = 0.0
    produced = 0
    for pt, seq, ts, ssrc, payload, step in packets:
        now += step
        for event in [*rx.receive(RtpPacket(pt, seq, ts, ssrc, payload).serialize(), now), *rx.poll(now)]:
            if isinstance(event, AudioReceived):
                produced += pcm(event).size
    for event in rx.flush():
        if isinstance(event, AudioReceived):
            produced += pcm(event).size
    # Concealment is capped: at most the cap per packet plus the largest decoded payload.
    assert produced <= len(packets) * (48000 // 2 + 48000 * 120 // 1000 + 400)


def rtcp_bye(*ssrcs: int, after_report: bool = True) -> bytes:
    """A compound RTCP packet as senders emit it: an empty RR, then a BYE (RFC 3550 §6.6)."""
    report = bytes([0x80, 201, 0, 1]) + (ssrcs[0] if ssrcs else 0).to_bytes(4, "big")
    bye = bytes([0x80 | len(ssrcs), 203]) + len(ssrcs).to_bytes(2, "big")
    bye += b"".join(s.to_bytes(4, "big") for s in ssrcs)
    return (report if after_report else b"") + bye


def test_rtcp_bye_of_the_latched_source_flushes_and_ends() -> None:
    from callscribe.bridge.events import EndReason, SenderEnded

    rx = RtpLegReceiver("pcmu", jitter_ms=60, batch_ms=60)
    events = rx.receive(rtp(1, 0), 0.0)
    assert not events  # batched, held
    events = rx.receive(rtcp_bye(0xABC), 0.02)  # muxed on the RTP port (RFC 5761)
    assert [type(e).__name__ for e in events] == ["AudioReceived", "SenderEnded"]
    assert events[-1] == SenderEnded(EndReason.HANGUP) and audio_samples(events) == 160
    # From the RTCP port the same datagram goes to receive_rtcp().
    rx = RtpLegReceiver("pcmu")
    rx.receive(rtp(1, 0), 0.0)
    assert rx.receive_rtcp(rtcp_bye(0x999, 0xABC, after_report=False))[-1] == SenderEnded()


def test_rtcp_other_than_bye_of_our_source_is_a_counted_drop() -> None:
    rx = RtpLegReceiver("pcmu")
    assert drops(rx.receive(rtcp_bye(0xABC), 0.0)) == ["rtcp"]  # nothing latched yet
    rx.receive(rtp(1, 0), 0.0)
    assert drops(rx.receive(rtcp_bye(0x999), 0.02)) == ["rtcp"]  # someone else's goodbye
    assert drops(rx.receive(bytes([0x80, 200, 0, 0]), 0.04)) == ["rtcp"]  # a sender report
    assert drops(rx.receive_rtcp(bytes([0x81, 203, 0, 9]) + b"\x00" * 4)) == ["rtcp"]  # bad length
