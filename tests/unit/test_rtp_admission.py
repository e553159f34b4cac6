"""RTP admission rules without sockets: per-source rates, RFC 3550 probation, per-host caps."""

from __future__ import annotations

from callscribe.bridge.events import DropReason
from callscribe.bridge.limits import SourceLimit
from callscribe.bridge.rtp.admission import Probation, SourceRates, TokenBucket
from callscribe.bridge.rtp.packet import RtpPacket

SOURCE = ("192.0.2.7", 4000)


def packet(seq: int, pt: int = 0, ssrc: int = 0x1234) -> RtpPacket:
    return RtpPacket(pt, seq % 65536, seq * 160, ssrc, b"\xff" * 160)


def test_token_bucket_allows_a_burst_of_one_second_then_the_rate() -> None:
    bucket = TokenBucket(50, now=0.0)
    assert sum(bucket.take(0.0) for _ in range(80)) == 50
    assert not bucket.take(0.0)
    assert sum(bucket.take(0.1) for _ in range(10)) == 5  # 0.1 s refills 5 tokens
    assert sum(bucket.take(100.0) for _ in range(80)) == 50  # never more than the burst


def test_source_rates_are_per_source_and_bounded() -> None:
    rates = SourceRates(rate=2, limit=3)
    assert not rates.known(SOURCE)
    assert rates.take(SOURCE, 0.0) and rates.take(SOURCE, 0.0)
    assert not rates.take(SOURCE, 0.0)
    assert rates.known(SOURCE)
    assert rates.take(("192.0.2.8", 4000), 0.0)  # another source has its own bucket
    rates.take(("192.0.2.9", 4000), 0.0)
    assert len(rates) == 3
    rates.take(("192.0.2.10", 4000), 0.0)  # a flood of new sources empties the table
    assert len(rates) == 1 and not rates.known(SOURCE)


def test_idle_buckets_are_forgotten_once_there_are_many() -> None:
    rates = SourceRates(rate=50)
    for n in range(1001):
        rates.take((f"10.0.{n // 256}.{n % 256}", 5000), 0.0)
    rates.take(SOURCE, 9.0)
    rates.forget_idle(10.5)
    assert len(rates) == 1 and rates.known(SOURCE)


def test_probation_needs_two_packets_in_sequence() -> None:
    probation = Probation()
    key = (SOURCE, 0x1234)
    assert probation.offer(key, packet(10), 0.0) == (None, [])
    first, drops = probation.offer(key, packet(11), 0.02)
    assert first is not None and first.sequence_number == 10 and drops == []
    assert len(probation) == 0


def test_probation_wraps_the_sequence_number() -> None:
    probation = Probation()
    key = (SOURCE, 1)
    probation.offer(key, packet(65535, ssrc=1), 0.0)
    first, _ = probation.offer(key, packet(65536, ssrc=1), 0.02)
    assert first is not None and first.sequence_number == 65535


def test_probation_refuses_out_of_sequence_and_unknown_payload_types() -> None:
    probation = Probation()
    key = (SOURCE, 0x1234)
    probation.offer(key, packet(10), 0.0)
    assert probation.offer(key, packet(15), 0.02) == (None, [(DropReason.UNCONFIRMED_SOURCE, 1)])
    first, _ = probation.offer(key, packet(16), 0.04)  # 15 is now the candidate
    assert first is not None and first.sequence_number == 15
    assert probation.offer(key, packet(1, pt=72), 0.0) == (None, [(DropReason.UNKNOWN_PAYLOAD_TYPE, 1)])
    assert probation.offer(key, packet(1, pt=13), 0.0)[1] == [(DropReason.UNKNOWN_PAYLOAD_TYPE, 1)]
    assert probation.offer(key, packet(1, pt=96), 0.0) == (None, [])  # dynamic: the declared codec


def test_probation_is_bounded_and_expires() -> None:
    probation = Probation(max_candidates=3, window=2.0)
    for n in range(3):
        probation.offer(((f"10.0.0.{n}", 5000), n), packet(1, ssrc=n), 0.0)
    _, drops = probation.offer((SOURCE, 9), packet(1, ssrc=9), 0.0)
    assert drops == [(DropReason.UNCONFIRMED_SOURCE, 3)]  # a flood of candidates is forgotten
    assert len(probation) == 1
    assert probation.expire(1.0) == 0
    assert probation.expire(2.5) == 1 and len(probation) == 0


def test_auto_legs_per_host_are_capped() -> None:
    cap = SourceLimit(2)
    assert cap.acquire("10.0.0.1") and cap.acquire("10.0.0.1")
    assert not cap.acquire("10.0.0.1")
    assert cap.acquire("10.0.0.2")
    cap.release("10.0.0.1")
    assert cap.count("10.0.0.1") == 1 and cap.acquire("10.0.0.1")
    cap.release("10.0.0.2")
    assert cap.count("10.0.0.2") == 0
