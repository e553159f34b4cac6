"""The reorder jitter buffer, with time as a parameter."""

from __future__ import annotations

import pytest

from callscribe.bridge.rtp.jitter import JitterBuffer
from callscribe.bridge.rtp.packet import RtpPacket


def pkt(seq: int) -> RtpPacket:
    return RtpPacket(0, seq % 65536, seq * 160, 1, b"x")


def seqs(packets: list[RtpPacket]) -> list[int]:
    return [p.sequence_number for p in packets]


def test_in_order_packets_are_released_at_once() -> None:
    jb = JitterBuffer(60)
    for seq in range(10, 15):
        assert jb.push(pkt(seq), 0.0) is None
        assert seqs(jb.pop(0.0)) == [seq]
    assert jb.lost == 0 and len(jb) == 0


def test_reordering_within_depth_is_repaired() -> None:
    jb = JitterBuffer(60)
    jb.push(pkt(1), 0.00)
    assert seqs(jb.pop(0.00)) == [1]
    jb.push(pkt(3), 0.02)
    jb.push(pkt(4), 0.03)
    assert jb.pop(0.04) == []  # 2 is awaited
    jb.push(pkt(2), 0.05)
    assert seqs(jb.pop(0.05)) == [2, 3, 4]
    assert jb.lost == 0


def test_gap_is_skipped_after_depth_and_straggler_is_late() -> None:
    jb = JitterBuffer(60)
    jb.push(pkt(1), 0.0)
    jb.pop(0.0)
    jb.push(pkt(3), 0.1)
    assert jb.pop(0.159) == []
    assert seqs(jb.pop(0.160)) == [3]
    assert jb.lost == 1
    assert jb.push(pkt(2), 0.2) == "late"
    assert jb.push(pkt(3), 0.2) == "duplicate"
    assert jb.pop(0.3) == []


def test_duplicates_are_dropped_held_or_released() -> None:
    jb = JitterBuffer(60)
    jb.push(pkt(1), 0.0)
    assert jb.push(pkt(1), 0.0) == "duplicate"
    jb.push(pkt(3), 0.0)
    assert jb.push(pkt(3), 0.0) == "duplicate"
    assert seqs(jb.pop(0.0)) == [1]


def test_sequence_wraparound() -> None:
    jb = JitterBuffer(60)
    order = [65533, 65534, 0, 65535, 1, 2]
    released: list[int] = []
    for seq in order:
        assert jb.push(pkt(seq), 0.0) is None
        released += seqs(jb.pop(0.0))
    assert released == [65533, 65534, 65535, 0, 1, 2]


def test_capacity_bounds_the_buffer() -> None:
    jb = JitterBuffer(10_000, capacity=8)
    jb.push(pkt(0), 0.0)
    jb.pop(0.0)
    for seq in range(2, 12):  # 1 never comes; depth is long, capacity is not
        jb.push(pkt(seq), 0.0)
        assert len(jb) <= 8
    assert seqs(jb.pop(0.0)) == list(range(2, 12))
    assert jb.lost == 1


def test_zero_depth_never_waits() -> None:
    jb = JitterBuffer(0)
    jb.push(pkt(5), 0.0)
    jb.push(pkt(7), 0.0)
    assert seqs(jb.pop(0.0)) == [5, 7]
    assert jb.push(pkt(6), 0.0) == "late"


def test_jump_ahead_resyncs_without_waiting() -> None:
    jb = JitterBuffer(60, capacity=64)
    jb.push(pkt(100), 0.0)
    jb.push(pkt(10_100), 0.01)
    assert seqs(jb.pop(0.01)) == [100, 10_100]


def test_sender_restart_far_behind_is_accepted_after_probation() -> None:
    jb = JitterBuffer(60)
    for seq in range(40_000, 40_005):
        jb.push(pkt(seq), 0.0)
    jb.pop(0.0)
    # 20,000 behind on the 16-bit circle: a stray late packet once, a restart when it goes on.
    assert jb.push(pkt(20_000), 0.1) == "late"
    assert jb.push(pkt(20_001), 0.12) is None
    assert seqs(jb.pop(0.12)) == [20_001]
    jb.push(pkt(20_002), 0.14)
    assert seqs(jb.pop(0.14)) == [20_002]


def test_flush_releases_everything_in_order() -> None:
    jb = JitterBuffer(1000)
    for seq in (1, 4, 3, 6):
        jb.push(pkt(seq), 0.0)
    assert seqs(jb.pop(0.0)) == [1]
    assert seqs(jb.flush()) == [3, 4, 6]
    assert jb.lost == 2


def test_invalid_configuration() -> None:
    with pytest.raises(ValueError, match="-1"):
        JitterBuffer(-1)
