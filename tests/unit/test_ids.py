"""The id rule (callscribe.ids) and its use at the registry, the one place every ingest opens legs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from callscribe.ids import (
    ID_PATTERN,
    MAX_ID_LENGTH,
    InvalidId,
    check_id,
    derive_id,
    is_valid_id,
    shown,
)

VALID = [
    "a",
    "CA1234567890abcdef",
    "3c26b1f0-7d6e-4b8a-9d51-6c0e1f2a3b4c",
    "a84b4c76e66710@pc33.atlanta.com",
    "+15551234567",
    "rtp-::1-40000-0000abcd",
    "x" * MAX_ID_LENGTH,
]
INVALID = [
    "",
    "c 2/../x",
    "x\n2026 ERROR forged",
    "nul\x00",
    "a/b",
    "{hashtag}",
    "per%cent",
    "q?x",
    "é",
    "x" * (MAX_ID_LENGTH + 1),
    "x" * 60_000,
    "tab\there",
    'quote"d',
]


@pytest.mark.parametrize("value", VALID)
def test_valid_ids_pass_unchanged(value: str) -> None:
    assert check_id("call_id", value) == value


@pytest.mark.parametrize("value", INVALID)
def test_invalid_ids_are_refused_naming_the_field(value: str) -> None:
    with pytest.raises(InvalidId) as raised:
        check_id("leg", value)
    message = str(raised.value)
    assert message.startswith("leg ")
    assert "\n" not in message and "\x00" not in message
    assert len(message) < 200  # a 60 KB id is not echoed back


def test_non_strings_are_refused() -> None:
    for value in (None, 5, ["a"]):
        assert not is_valid_id(value)
        with pytest.raises(InvalidId):
            check_id("call_id", value)


def test_derive_keeps_valid_and_repairs_the_rest() -> None:
    assert derive_id("alice@example.com", "p") == "alice@example.com"
    assert derive_id("   ", "participant") == "participant"
    assert derive_id("", "participant") == "participant"
    repaired = derive_id("alice@example.com;user=phone", "p")
    assert is_valid_id(repaired) and repaired.startswith("alice@example.com_user=phone-")
    # Two texts that clean to the same characters stay different ids.
    assert derive_id("a/b", "p") != derive_id("a?b", "p")


@given(st.text(max_size=400))
def test_derive_always_follows_the_rule(text: str) -> None:
    assert ID_PATTERN.fullmatch(derive_id(text, "fallback", prefix="sip-"))


@given(st.text(max_size=300))
def test_shown_is_one_escaped_bounded_line(text: str) -> None:
    out = shown(text)
    assert "\n" not in out and "\r" not in out and "\x00" not in out
    assert len(out) <= 4 * 40 + 40


def test_registry_applies_the_rule() -> None:
    from callscribe.calls import CallRegistry
    from callscribe.engine.sphinx import SphinxEngine
    from callscribe.metrics import Metrics

    class Sink:
        def publish(self, event: object) -> None:
            raise AssertionError("no event may be published for a refused id")

    # The rule is checked before the engine is asked for anything: an unstarted engine will do.
    registry = CallRegistry(engine=SphinxEngine(), sink=Sink(), metrics=Metrics())
    with pytest.raises(InvalidId, match="call_id"):
        registry.open_leg("c 2/../x", "caller")
    with pytest.raises(InvalidId, match="leg"):
        registry.open_leg("ok", "caller\nERROR forged")
    assert registry.calls == {} and registry.legs == {}


def _invite(call_id: str, *headers: str) -> object:
    from callscribe.bridge.sip.message import parse_message
    from tests.unit.sip_data import load

    text = load("plain_invite").decode("latin-1")
    lines = text.split("\r\n")
    lines = [f"Call-ID: {call_id}" if line.lower().startswith(("call-id:", "i:")) else line for line in lines]
    lines[1:1] = list(headers)
    return parse_message("\r\n".join(lines).encode("latin-1"))


def test_sip_headers_follow_the_rule_and_odd_call_ids_are_made_to() -> None:
    from callscribe.bridge.sip.session import Rejected, SipCallHandler

    call_id, leg = SipCallHandler._chosen_names(_invite("a84b4c76e66710@pc33.atlanta.com"))  # type: ignore[arg-type]
    assert (call_id, leg) == ("a84b4c76e66710@pc33.atlanta.com", "caller")
    odd = "{abc}/def ghi@host"
    derived, _ = SipCallHandler._chosen_names(_invite(odd))  # type: ignore[arg-type]
    assert is_valid_id(derived) and derived.startswith("sip-")
    assert derived == SipCallHandler._chosen_names(_invite(odd))[0]  # type: ignore[arg-type]
    for header in ("X-Callscribe-Call-ID: c 2/x", "X-Callscribe-Leg: a/b"):
        with pytest.raises(Rejected) as refused:
            SipCallHandler._chosen_names(_invite("ok@host", header))  # type: ignore[arg-type]
        assert refused.value.status == 400


def test_siprec_leg_names_follow_the_rule() -> None:
    from callscribe.bridge.sip.siprec import Participant, leg_name

    assert leg_name(Participant("p1", "sip:alice@example.com", "Alice")) == "alice@example.com"
    assert leg_name(Participant("p1", "", "")) == "p1"
    assert leg_name(Participant("", " ", " ")) == ""  # all blank: named by position (recorded_streams)
    assert is_valid_id(leg_name(Participant("p1", "sip:bob@example.com;user=phone", "")))
    assert is_valid_id(leg_name(Participant("p1", "", "Bob Smith <bob>")))
