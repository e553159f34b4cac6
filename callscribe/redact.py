"""PCI and SSN redaction of transcript text: pure functions over word lists, no I/O.

Numbers reach us two ways: as number words the way pocketsphinx writes them ("four one one
one", "oh four", "twenty seven") and as digits the way Qwen3-ASR writes them ("4111 1111",
"4111-1111-1111-1111", "04/27"). Both become *numeric tokens* (a token's digits); a run of
consecutive numeric tokens is one spoken/written number. Redaction replaces every token of a
run it decides on by `MASK`, one for one, so a final's `words` and a partial's stable/unstable
split keep their alignment with `text`.

What is redacted (docs/contract.md, "Redaction"):
- pci: any run of 13 or more digits: a superset of Luhn-valid 13–19 digit card numbers that
  also catches spoken cards whose checksum a recognition error broke (a phone number has
  at most 15 digits with its country code and is rarely said as one run of 13+). While a
  card is in context (a card word such as "card", "visa", "cvv", "expiry" in the utterance,
  or a card or card word in the call's last `CARD_CONTEXT_MS`), any run of 3 or more digits:
  the CVV, the expiry ("oh four twenty seven", "04/27"), the rest of a card split over two
  utterances.
- ssn: a run of exactly 9 digits, or the written ddd-dd-dddd pattern.
- both: a run that may still be growing is masked once it has `OPEN_RUN_MIN_DIGITS`: any run
  of a partial, and the run a final ends with (the speaker may go on in the next utterance:
  the segmenter closes an utterance after a short pause, or at its window, mid-number).
Shorter numbers out of context ("room four", "press two") are left alone.

Numbers do not stop at utterance ends (`Redactor`): a leg's final or partial that starts with
digits, within `CONTINUE_GAP_MS` of the digits the leg's previous utterance ended with,
continues that run. The run's digits so far (the *carry*) count toward every length above, so
a card split over two, three or more finals is still 13+ digits, and a continuation of a run
already masked is masked too. What was published before the run grew cannot be taken back:
hence the open-run rule, which leaves at most `OPEN_RUN_MIN_DIGITS - 1` leading digits of a
split number in clear.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from callscribe.events import EventType, TranscriptEvent, Word
from callscribe.ingest_options import ingest_option

log = logging.getLogger(__name__)


class Redaction(StrEnum):
    PCI = "pci"
    SSN = "ssn"


MASK = "[redacted]"
CARD_CONTEXT_MS = 60_000
CARD_MIN_DIGITS = 13
CARD_MAX_DIGITS = 19
IN_CONTEXT_MIN_DIGITS = 3
# A run that may continue (a partial's, a final's last) is masked from this many digits: a
# card split across utterances shows at most its first 3 digits (PCI DSS allows the first 6).
OPEN_RUN_MIN_DIGITS = 4
# A final or partial starting with digits continues the run its leg's previous utterance ended
# with when it starts at most this long (leg audio time) after that run's end.
CONTINUE_GAP_MS = 5_000

_UNITS = {
    "zero": 0, "oh": 0, "o": 0, "one": 1, "two": 2, "three": 3, "four": 4,
    "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
}  # fmt: skip
_TEENS = {
    "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15,
    "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19,
}  # fmt: skip
_TENS = {"twenty": 2, "thirty": 3, "forty": 4, "fifty": 5, "sixty": 6, "seventy": 7, "eighty": 8, "ninety": 9}
# Words that put a card in context (said by either leg: the agent usually asks).
CARD_CUES = frozenset(
    {"card", "cards", "visa", "mastercard", "amex", "discover", "credit", "debit", "cvv", "cvc",
     "expiry", "expiration", "expires", "security"}
)  # fmt: skip
_WRITTEN_DIGITS = re.compile(r"^\d[\d\-/.]*$")
_SSN_WRITTEN = re.compile(r"^\d{3}-\d{2}-\d{4}$")
_PUNCT = ".,;:!?\"'()"


def parse_redactions(value: object) -> frozenset[Redaction]:
    """A setting or ingest value: a list, a JSON list or a comma list ("pci,ssn"), or ""/"none"
    for no redaction; ValueError names the unknown kind."""
    if isinstance(value, str):
        text = value.strip().strip("[]")
        items: Iterable[object] = [part.strip().strip("\"'") for part in text.split(",") if part.strip()]
    elif isinstance(value, list | tuple | set | frozenset):
        items = value
    else:
        raise ValueError(f"redact must be a list such as ['pci', 'ssn'], got {value!r}")
    kinds = set()
    for item in items:
        name = str(item).strip().lower()
        if name in ("", "none", "off"):
            continue
        try:
            kinds.add(Redaction(name))
        except ValueError:
            raise ValueError(f"unknown redaction {item!r}: expected one of pci, ssn") from None
    return frozenset(kinds)


def luhn_valid(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if index % 2:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def has_card(digits: str) -> bool:
    """A Luhn-valid window of 13–19 digits inside `digits`."""
    for length in range(CARD_MIN_DIGITS, min(CARD_MAX_DIGITS, len(digits)) + 1):
        for start in range(len(digits) - length + 1):
            if luhn_valid(digits[start : start + length]):
                return True
    return False


def _numeric(tokens: Sequence[str]) -> list[str | None]:
    """Each token's digits, or None for a word that is not part of a number ("" for the unit
    of "twenty seven", whose digits its ten carries)."""
    words = [raw.lower().strip(_PUNCT) for raw in tokens]
    out: list[str | None] = []
    for index, word in enumerate(words):
        if word in _UNITS:
            joined = index > 0 and words[index - 1] in _TENS and _UNITS[word] != 0
            out.append("" if joined else str(_UNITS[word]))
        elif word in _TEENS:
            out.append(str(_TEENS[word]))
        elif word in _TENS:
            following = words[index + 1] if index + 1 < len(words) else ""
            unit = _UNITS.get(following, 0)
            out.append(f"{_TENS[word]}{unit}")
        elif word and _WRITTEN_DIGITS.match(word):
            out.append(re.sub(r"\D", "", word))
        else:
            out.append(None)
    return out


def _runs(numeric: Sequence[str | None]) -> list[tuple[int, int, str]]:
    """(first token, end token, digits) of each run of consecutive numeric tokens."""
    runs, start = [], None
    for index, digits in enumerate([*numeric, None]):
        if digits is not None and start is None:
            start = index
        elif digits is None and start is not None:
            runs.append((start, index, "".join(d or "" for d in numeric[start:index])))
            start = None
    return runs


@dataclass(frozen=True, slots=True)
class Carry:
    """The digit run an utterance ended with, which the leg's next utterance may continue."""

    digits: int  # the run's length, counting what it continued in turn
    masked: bool  # it was masked (then so is its continuation)
    end_ms: int | None = None  # where it ended (leg audio time), when known


@dataclass(frozen=True, slots=True)
class Verdict:
    tokens: tuple[str, ...]
    card: bool  # a card number was redacted: puts a card in context for what follows
    cue: bool  # a card word was said
    tail: Carry | None = None  # the run the tokens end with (None: they end with a word)


def redact_tokens(
    tokens: Sequence[str],
    kinds: frozenset[Redaction],
    *,
    card_context: bool,
    partial: bool = False,
    carry: Carry | None = None,
    open_end: bool = False,
) -> Verdict:
    """`tokens` with redacted ones replaced by MASK, one for one.

    `carry`: the run a leading digit run continues (its digits count toward that run's
    length). `open_end`: the last run may go on in a later utterance (a final's); a partial's
    runs all may."""
    if not kinds or not tokens:
        return Verdict(tuple(tokens), False, False, carry if kinds and not tokens else None)
    numeric = _numeric(tokens)
    cue = any(t.lower().strip(_PUNCT) in CARD_CUES for t in tokens)
    masked = list(tokens)
    card = False
    tail = None
    for start, end, digits in _runs(numeric):
        continued = carry if start == 0 and carry is not None else None
        length = len(digits) + (continued.digits if continued else 0)
        growing = partial or (open_end and end == len(tokens))
        hit = bool(continued and continued.masked) or (growing and length >= OPEN_RUN_MIN_DIGITS)
        if Redaction.PCI in kinds:
            # Every Luhn-valid 13–19 digit card has 13+ digits; not asking for the checksum
            # also catches spoken cards the recogniser got a digit of wrong.
            if length >= CARD_MIN_DIGITS:
                hit = card = True
            elif (card_context or cue) and length >= IN_CONTEXT_MIN_DIGITS:
                hit = True
        if Redaction.SSN in kinds and (
            length == 9 or any(_SSN_WRITTEN.match(t.strip(_PUNCT)) for t in tokens[start:end])
        ):
            hit = True
        if hit:
            masked[start:end] = [MASK] * (end - start)
        if end == len(tokens):
            tail = Carry(length, hit)
    return Verdict(tuple(masked), card, cue, tail)


def redact_text(
    text: str,
    kinds: frozenset[Redaction],
    *,
    card_context: bool,
    partial: bool = False,
    carry: Carry | None = None,
    open_end: bool = False,
) -> str:
    tokens = text.split()
    verdict = redact_tokens(
        tokens, kinds, card_context=card_context, partial=partial, carry=carry, open_end=open_end
    )
    return " ".join(verdict.tokens)


def redact_words(
    words: Sequence[Word],
    kinds: frozenset[Redaction],
    *,
    card_context: bool,
    carry: Carry | None = None,
    open_end: bool = False,
) -> tuple[tuple[Word, ...], Verdict]:
    verdict = redact_tokens(
        [w["w"] for w in words], kinds, card_context=card_context, carry=carry, open_end=open_end
    )
    masked = tuple(
        word
        if token == word["w"]
        else Word(w=token, start_ms=word["start_ms"], end_ms=word["end_ms"], conf=word["conf"])
        for word, token in zip(words, verdict.tokens, strict=True)
    )
    return masked, verdict


@dataclass
class _LegRuns:
    """A leg's digit runs at utterance ends, by utterance number: its final's, or its latest
    partial's until the final comes (the next utterance's partials may come first)."""

    tails: dict[int, tuple[Carry | None, bool]] = field(default_factory=dict)  # utt: (tail, final)
    finals: int = 0  # numbers utterances for events without `utt`

    def utt(self, event: TranscriptEvent) -> int:
        return event.utt if event.utt is not None else self.finals

    def carry(self, event: TranscriptEvent) -> Carry | None:
        """The run `event` would continue: the previous utterance's tail, if close enough."""
        utt = self.utt(event)
        before = [number for number in self.tails if number < utt]
        if not before:
            return None
        tail, _ = self.tails[max(before)]
        if tail is None:
            return None
        too_late = (
            tail.end_ms is not None
            and event.start_ms is not None
            and event.start_ms - tail.end_ms > CONTINUE_GAP_MS
        )
        return None if too_late else tail  # timing unknown: it continues (mask more, not less)

    def record(self, event: TranscriptEvent, tail: Carry | None, *, final: bool) -> None:
        utt = self.utt(event)
        if not final and self.tails.get(utt, (None, False))[1]:
            return  # a late partial of an utterance whose final is in
        self.tails[utt] = (tail, final)
        for number in list(self.tails):
            # Older ones are done with; a final's later numbers were an engine's restart.
            if number < utt - 1 or (final and number > utt):
                del self.tails[number]
        if final and event.utt is None:
            self.finals += 1


@dataclass
class _CallState:
    kinds: frozenset[Redaction]
    card_at: int | None = None  # ts (ms) of the last card or card word in the call
    legs: dict[str, frozenset[Redaction]] = field(default_factory=dict)
    runs: dict[str, _LegRuns] = field(default_factory=dict)


class Redactor:
    """Redacts a call's events in publish order, before any sink sees them (CallRegistry
    applies it to every event it makes; docs/contract.md "Redaction").

    Which kinds apply: the `redact` ingest option of the leg (leg.started meta), else of the
    call (call.started meta), else the `default`. Card context spans the legs of a call (the
    agent asks, the caller answers) and is timed by the events' `ts`, so the redactor reads no
    clock. A leg's number runs continue across its utterances (`_LegRuns`, timed by the
    events' leg audio `start_ms`/`end_ms`). State is dropped at call.ended.
    """

    def __init__(self, default: frozenset[Redaction]) -> None:
        self.default = default
        self._calls: dict[str, _CallState] = {}

    def __call__(self, event: TranscriptEvent) -> TranscriptEvent:
        state = self._calls.get(event.call_id)
        if event.type == EventType.CALL_STARTED:
            self._calls[event.call_id] = _CallState(self._kinds(event.meta, self.default))
            return event
        if event.type == EventType.CALL_ENDED:
            self._calls.pop(event.call_id, None)
            return event
        if state is None:  # a call.started this redactor did not see: the default applies
            state = self._calls.setdefault(event.call_id, _CallState(self.default))
        if event.type == EventType.LEG_STARTED:
            state.legs[event.leg] = self._kinds(event.meta, state.kinds)
            return event
        kinds = state.legs.get(event.leg, state.kinds)
        if not kinds:
            return event
        if event.type == EventType.DTMF:
            return replace(event, text=MASK) if Redaction.PCI in kinds and event.text else event
        if event.type not in (EventType.PARTIAL, EventType.FINAL):
            return event
        in_context = state.card_at is not None and 0 <= event.ts - state.card_at <= CARD_CONTEXT_MS
        partial = event.type == EventType.PARTIAL
        runs = state.runs.setdefault(event.leg, _LegRuns())
        carry = runs.carry(event)

        def verdict(tokens: list[str]) -> Verdict:
            # Every utterance may end mid-number: its last run is open (a partial's: all).
            return redact_tokens(
                tokens, kinds, card_context=in_context, partial=partial, carry=carry, open_end=True
            )

        text = verdict(event.text.split())
        # stable/unstable are redacted as the text they make up, then split back: a card
        # number straddling the two must be seen whole.
        stable_words = event.stable.split()
        joined = verdict(stable_words + event.unstable.split())
        words, word_verdict = redact_words(
            event.words, kinds, card_context=in_context, carry=carry, open_end=True
        )
        tail = text.tail
        if tail is not None and event.text.split():
            tail = replace(tail, end_ms=event.end_ms)
        runs.record(event, tail, final=not partial)
        if not partial and (text.card or text.cue or word_verdict.card):
            state.card_at = event.ts
        return replace(
            event,
            text=" ".join(text.tokens),
            stable=" ".join(joined.tokens[: len(stable_words)]),
            unstable=" ".join(joined.tokens[len(stable_words) :]),
            words=words,
        )

    @staticmethod
    def _kinds(meta: dict[str, Any], fallback: frozenset[Redaction]) -> frozenset[Redaction]:
        value = ingest_option(meta, "redact")
        if value is None:
            return fallback
        try:
            return parse_redactions(value)
        except ValueError as exc:
            # An ingest asked for something unknown: redact more, never less.
            log.warning("%s; applying %s and the default", exc, sorted(fallback | {Redaction.PCI}))
            return fallback | {Redaction.PCI}
