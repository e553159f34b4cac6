"""RFC 4733 telephone-event payloads and the per-key-press receiver."""

from __future__ import annotations

import pytest

from callscribe.codecs.base import CodecError
from callscribe.codecs.dtmf import DtmfDigit, DtmfReceiver, TelephoneEvent


def test_payload_vector() -> None:
    # RFC 4733 §2.3: event 5, E=1, volume 10, duration 800 ticks (100 ms at 8 kHz).
    assert TelephoneEvent.parse(b"\x05\x8a\x03\x20") == TelephoneEvent(5, True, 10, 800)
    assert TelephoneEvent(11, False, 7, 160).serialize() == b"\x0b\x07\x00\xa0"
    assert TelephoneEvent.for_digit("#").event == 11
    assert TelephoneEvent.for_digit("d").digit == "D"
    assert TelephoneEvent(16).digit is None  # flash: not a key


def test_bad_payloads() -> None:
    with pytest.raises(CodecError, match="3 bytes"):
        TelephoneEvent.parse(b"\x01\x02\x03")
    with pytest.raises(CodecError, match="'x'"):
        TelephoneEvent.for_digit("x")


def press(digit: str, ts: int, steps: int = 3, end_repeats: int = 3) -> list[tuple[int, bytes]]:
    packets = [(ts, TelephoneEvent.for_digit(digit, False, 160 * (i + 1)).serialize()) for i in range(steps)]
    end = TelephoneEvent.for_digit(digit, True, 160 * (steps + 1)).serialize()
    return packets + [(ts, end)] * end_repeats


def feed(receiver: DtmfReceiver, packets: list[tuple[int, bytes]]) -> list[DtmfDigit]:
    return [digit for ts, payload in packets for digit in receiver.receive(ts, payload)]


def test_one_digit_per_press_despite_repeated_end() -> None:
    receiver = DtmfReceiver()
    digits = feed(receiver, press("1", 1000) + press("2", 5000) + press("2", 9000))
    assert digits == [DtmfDigit("1", 80), DtmfDigit("2", 80), DtmfDigit("2", 80)]
    assert receiver.flush() == []


def test_lost_end_packets_report_at_next_event() -> None:
    receiver = DtmfReceiver()
    digits = feed(receiver, press("7", 1000, end_repeats=0))
    assert digits == []
    assert feed(receiver, press("8", 3000)) == [DtmfDigit("7", 60), DtmfDigit("8", 80)]


def test_flush_reports_the_pending_press_once() -> None:
    receiver = DtmfReceiver()
    feed(receiver, press("*", 1000, end_repeats=0))
    assert receiver.flush() == [DtmfDigit("*", 60)]
    assert receiver.flush() == []


def test_late_repeat_of_a_finished_event_is_ignored() -> None:
    receiver = DtmfReceiver()
    first = press("4", 1000)
    digits = feed(receiver, first + press("5", 2000) + [first[-1]])
    assert digits == [DtmfDigit("4", 80), DtmfDigit("5", 80)]


def test_48k_clock_durations() -> None:
    receiver = DtmfReceiver(clock_rate=48000)
    assert receiver.receive(0, TelephoneEvent.for_digit("9", True, 4800).serialize()) == [DtmfDigit("9", 100)]
