"""Redaction of card numbers, CVV/expiry and SSNs in spoken (pocketsphinx) and written
(Qwen3-ASR) forms; properties with hypothesis, no server."""

from __future__ import annotations

import re
from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from callscribe.events import EventType, TranscriptEvent, Word
from callscribe.ingest_options import context, ingest_option, keyterms
from callscribe.redact import (
    CONTINUE_GAP_MS,
    MASK,
    Redaction,
    Redactor,
    luhn_valid,
    parse_redactions,
    redact_text,
)

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


# A card split across finals: the segmenter ends an utterance after a short pause (or at its
# window), so a number said with pauses reaches the redactor in pieces.


class Leg:
    """One leg of a call through a Redactor: finals (each after partials growing word by
    word, as an engine sends them) at `gap_ms` of leg audio from one another."""

    def __init__(self, kinds: frozenset[Redaction] = PCI, gap_ms: int = 300) -> None:
        self.redactor = Redactor(kinds)
        self.redactor(event(EventType.CALL_STARTED))
        self.redactor(event(EventType.LEG_STARTED))
        self.gap_ms, self.utt, self.at_ms = gap_ms, 0, 0
        self.published: list[tuple[list[str], str]] = []  # (words said so far, text published)

    def say(self, text: str, *, partials: bool = True, gap_ms: int | None = None) -> str:
        self.at_ms += self.gap_ms if gap_ms is None else gap_ms
        start, tokens = self.at_ms, text.split()
        self.at_ms += 300 * len(tokens)
        timing = {"utt": self.utt, "start_ms": start, "ts": 1_000_000 + self.at_ms}
        for n in range(1, len(tokens) + 1) if partials else ():
            stable, unstable = " ".join(tokens[: n - 1]), tokens[n - 1]
            out = self.redactor(
                event(
                    EventType.PARTIAL,
                    text=" ".join(tokens[:n]),
                    stable=stable,
                    unstable=unstable,
                    end_ms=start + 300 * n,
                    **timing,
                )
            )
            # stable and unstable are the text's words, masked alike
            assert " ".join(part for part in (out.stable, out.unstable) if part) == out.text
            self.published.append((tokens[:n], out.text))
        words = tuple(
            Word(w=w, start_ms=start + 300 * i, end_ms=start + 300 * i + 250, conf=0.9)
            for i, w in enumerate(tokens)
        )
        final = self.redactor(
            event(EventType.FINAL, text=text, stable=text, words=words, end_ms=self.at_ms, **timing)
        )
        assert [w["w"] for w in final.words] == final.text.split()
        assert final.stable == final.text
        self.published.append((tokens, final.text))
        self.utt += 1
        return final.text


def pieces(tokens: list[str], cuts: list[int]) -> list[list[str]]:
    bounds = [0, *sorted(set(cuts)), len(tokens)]
    return [tokens[a:b] for a, b in pairwise(bounds) if b > a]


@given(
    cards,
    st.sampled_from(["spoken", "grouped"]),
    st.sampled_from([["my", "card", "number", "is"], ["it", "is"], []]),
    st.lists(st.integers(1, 18), min_size=1, max_size=2),
    st.booleans(),
)
def test_card_split_across_finals_is_masked_from_its_fourth_digit(
    card: str, form: str, intro: list[str], cuts: list[int], words_after: bool
) -> None:
    width = 1 if form == "spoken" else 4
    tokens = spoken(card).split() if form == "spoken" else [card[i : i + 4] for i in range(0, len(card), 4)]
    said = pieces(tokens, [c % len(tokens) for c in cuts if c % len(tokens)])
    leg = Leg()
    position = 0  # of the piece's first digit in the card
    for index, piece in enumerate(said):
        before = len(leg.published)
        text = " ".join(
            [
                *(intro if index == 0 else []),
                *piece,
                *(["thanks"] if words_after and index == len(said) - 1 else []),
            ]
        )
        leg.say(text)
        # Nothing published, partials included, shows a digit after the card's first 3.
        lead = len(intro) if index == 0 else 0
        for words, published in leg.published[before:]:
            for j, (word, out) in enumerate(zip(words, published.split(), strict=True)):
                if lead <= j < lead + len(piece) and position + (j - lead + 1) * width > 3:
                    assert out == MASK, (said, words, published)
                elif not lead <= j < lead + len(piece):
                    assert out == word  # the words around the card are kept
        position += len(piece) * width
    # The split card puts a card in context: a CVV said after a longer pause is masked.
    assert leg.say("the code is seven three one", gap_ms=10_000) == f"the code is {MASK} {MASK} {MASK}"


def test_card_over_two_finals_without_a_card_word() -> None:
    leg = Leg()
    assert leg.say("it is four one one one one one one one") == "it is " + " ".join([MASK] * 8)
    assert leg.say("one one one one one one one one please") == " ".join([MASK] * 8) + " please"


def test_card_over_three_finals_with_a_card_word_and_a_noise_final_between() -> None:
    leg = Leg()
    assert leg.say("my card is four one") == "my card is four one"  # 2 digits, even in context
    assert leg.say("one one one one one") == " ".join([MASK] * 5)
    assert leg.say("") == ""  # noise: no words, the run is still open
    assert leg.say("one one one one one one one one one") == " ".join([MASK] * 9)
    assert {leaked_digits(text) for _, text in leg.published} <= {"", "4", "41"}


def test_a_short_first_piece_is_kept_and_the_rest_masked() -> None:
    leg = Leg()
    assert leg.say("four one one") == "four one one"  # 3 digits: could be anything
    assert leg.say("one one one one one one one one one one one one one") == " ".join([MASK] * 13)
    assert {leaked_digits(text) for _, text in leg.published} == {"", "4", "41", "411"}


def test_a_partial_of_the_next_utterance_before_the_final_continues_the_run() -> None:
    redactor = Redactor(PCI)
    redactor(event(EventType.CALL_STARTED))
    first = redactor(
        event(EventType.PARTIAL, utt=0, start_ms=0, end_ms=900, text="four one one", unstable="four one one")
    )
    assert first.text == "four one one"
    # utt 1's partial overtakes utt 0's final (a slow final decode): it continues utt 0's partial.
    second = redactor(event(EventType.PARTIAL, utt=1, start_ms=1200, end_ms=1500, text="one", unstable="one"))
    assert second.text == second.unstable == MASK


def test_numbers_apart_in_time_or_words_are_not_joined() -> None:
    leg = Leg()
    assert leg.say("room four") == "room four"
    assert leg.say("one two") == "one two"  # room four, then "one two": 3 digits, no card
    assert leg.say("press two") == "press two"
    assert leg.say("i said two one") == "i said two one"
    # A number at an utterance's end may go on in the next one: from 4 digits it is masked.
    assert leg.say("call me at five five five") == "call me at five five five"
    assert leg.say("one two one two", gap_ms=CONTINUE_GAP_MS + 1) == " ".join([MASK] * 4)
    assert leg.say("thanks", gap_ms=0) == "thanks"
    assert leg.say("seven seven", gap_ms=CONTINUE_GAP_MS + 1) == "seven seven"


@given(st.text("0123456789", min_size=1, max_size=3), st.text("0123456789", min_size=1, max_size=3))
def test_short_numbers_in_separate_utterances_are_kept(first: str, second: str) -> None:
    leg = Leg(gap_ms=CONTINUE_GAP_MS + 1)
    assert leg.say(f"room {spoken(first)}") == f"room {spoken(first)}"
    assert leg.say(f"{spoken(second)} please") == f"{spoken(second)} please"
