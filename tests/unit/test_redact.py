"""Redaction of card numbers, CVV/expiry and SSNs in spoken (pocketsphinx) and written
(Qwen3-ASR) forms; properties with hypothesis, no server."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from callscribe.events import EventType, TranscriptEvent, Word
from callscribe.ingest_options import context, ingest_option, keyterms
from callscribe.redact import MASK, Redaction, Redactor, luhn_valid, parse_redactions, redact_text

PCI = frozenset({Redaction.PCI})
BOTH = frozenset({Redaction.PCI, Redaction.SSN})
SPOKEN = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def luhn_complete(prefix: str) -> str:
    return next(prefix + str(d) for d in range(10) if luhn_valid(prefix + str(d)))


cards = (
    st.integers(12, 18).flatmap(lambda n: st.text("0123456789", min_size=n, max_size=n)).map(luhn_complete)
)
filler = st.lists(st.sampled_from(["my", "card", "is", "the", "thanks", "room", "please"]), max_size=4)


def spoken(digits: str) -> str:
    return " ".join("oh" if d == "0" and i % 3 == 0 else SPOKEN[int(d)] for i, d in enumerate(digits))


def leaked_digits(text: str) -> str:
    """Every digit a reader could recover from `text`, spoken or written, in order."""
    out = []
    for token in text.split():
        word = token.lower()
        if word in SPOKEN or word == "oh":
            out.append("0" if word == "oh" else str(SPOKEN.index(word)))
        out.extend(re.findall(r"\d", token))
    return "".join(out)


@given(cards, filler, filler, st.sampled_from(["spoken", "grouped", "dashed", "plain"]))
def test_no_card_survives_in_any_form(card: str, before: list[str], after: list[str], form: str) -> None:
    assert luhn_valid(card)
    written = {
        "spoken": spoken(card),
        "grouped": " ".join(card[i : i + 4] for i in range(0, len(card), 4)),
        "dashed": "-".join(card[i : i + 4] for i in range(0, len(card), 4)),
        "plain": card,
    }[form]
    text = " ".join([*before, written, *after])
    redacted = redact_text(text, PCI, card_context=False)
    assert card not in leaked_digits(redacted)
    assert MASK in redacted
    # Words around the card are kept, one mask per token of the card.
    assert redacted.split()[: len(before)] == before
    assert len(redacted.split()) == len(text.split())


@given(st.text("0123456789", min_size=1, max_size=12), filler)
def test_short_numbers_out_of_context_are_kept(digits: str, words: list[str]) -> None:
    text = " ".join([w for w in words if w != "card"] + [spoken(digits)])
    assert redact_text(text, PCI, card_context=False) == text


def test_room_four_and_press_two_untouched() -> None:
    for text in ("i am in room four", "press two for billing", "call me at five five five one two one two"):
        assert redact_text(text, BOTH, card_context=False) == text


def test_cvv_and_expiry_in_card_context() -> None:
    assert (
        redact_text("the cvv is one two three", PCI, card_context=False) == f"the cvv is {MASK} {MASK} {MASK}"
    )
    assert redact_text("it expires oh four twenty seven", PCI, card_context=False).endswith(
        " ".join([MASK] * 4)
    )
    assert redact_text("and 04/27", PCI, card_context=True) == f"and {MASK}"
    assert redact_text("and 04/27", PCI, card_context=False) == "and 04/27"


def test_ssn_written_and_spoken() -> None:
    ssn = frozenset({Redaction.SSN})
    assert redact_text("it is 123-45-6789", ssn, card_context=False) == f"it is {MASK}"
    assert MASK in redact_text(spoken("123456789"), ssn, card_context=False)
    assert redact_text("it is 123-45-6789", PCI, card_context=False) == "it is 123-45-6789"


def test_parse_redactions() -> None:
    assert parse_redactions('["pci", "ssn"]') == BOTH
    assert parse_redactions("pci") == PCI
    assert parse_redactions(["PCI"]) == PCI
    assert parse_redactions("none") == frozenset() == parse_redactions([])
    with pytest.raises(ValueError, match="unknown redaction 'cards'"):
        parse_redactions(["cards"])


def event(kind: EventType, ts: int = 0, **fields: object) -> TranscriptEvent:
    return TranscriptEvent(kind, "c1", "caller" if kind != EventType.CALL_STARTED else "", ts=ts, **fields)  # type: ignore[arg-type]


def test_redactor_spans_legs_and_utterances_and_masks_dtmf() -> None:
    redactor = Redactor(PCI)
    redactor(event(EventType.CALL_STARTED))
    redactor(event(EventType.LEG_STARTED))
    card = "4111111111111111"
    words = tuple(
        Word(w=w, start_ms=i * 300, end_ms=i * 300 + 250, conf=0.9)
        for i, w in enumerate(spoken(card).split())
    )
    final = redactor(event(EventType.FINAL, 1000, text=spoken(card), stable=spoken(card), words=words))
    assert card not in leaked_digits(final.text) and final.stable == final.text
    assert [w["w"] for w in final.words] == [MASK] * 16 and final.words[3]["start_ms"] == 900
    # The CVV in the next utterance, with no card word in it: the card keeps the context.
    cvv = redactor(event(EventType.FINAL, 5000, text="one two three"))
    assert cvv.text == " ".join([MASK] * 3)
    # A minute later the context is gone.
    later = redactor(event(EventType.FINAL, 70_000, text="room one two three"))
    assert later.text == "room one two three"
    assert redactor(event(EventType.DTMF, text="7")).text == MASK
    # A card straddling stable and unstable in a partial is seen whole.
    partial = redactor(
        event(EventType.PARTIAL, 80_000, stable="four one one one one one one", unstable="one one")
    )
    assert partial.stable.split() == [MASK] * 7 and partial.unstable.split() == [MASK] * 2


def test_redactor_per_call_and_per_leg_override() -> None:
    redactor = Redactor(frozenset())
    redactor(TranscriptEvent(EventType.CALL_STARTED, "on", meta={"custom": {"redact": "pci"}}))
    redactor(TranscriptEvent(EventType.CALL_STARTED, "off", meta={}))
    redactor(
        TranscriptEvent(EventType.LEG_STARTED, "off", "agent", meta={"sip": {"x-callscribe-redact": "pci"}})
    )
    text = spoken("4111111111111111")
    assert MASK in redactor(TranscriptEvent(EventType.FINAL, "on", "caller", text=text)).text
    assert redactor(TranscriptEvent(EventType.FINAL, "off", "caller", text=text)).text == text
    assert MASK in redactor(TranscriptEvent(EventType.FINAL, "off", "agent", text=text)).text
    redactor(
        TranscriptEvent(EventType.CALL_STARTED, "bad", meta={"redact": ["cards"]})
    )  # unknown: pci applies
    assert MASK in redactor(TranscriptEvent(EventType.FINAL, "bad", "x", text=text)).text


def test_ingest_options_lookup() -> None:
    meta = {"metadata": {"context": "Acme Bank"}, "custom": {"keyterms": "Zelle, overdraft"}}
    assert context(meta) == "Acme Bank" and keyterms(meta) == ("Zelle", "overdraft")
    assert keyterms({"keyterms": ["a", " ", "b"]}) == ("a", "b")
    assert ingest_option({}, "redact") is None and context({}) == ""
