"""Fork admission: tokens, Twilio signatures (vectors from twilio-python's own tests), limits."""

from __future__ import annotations

import base64

from pydantic import SecretStr

from callscribe.bridge.forks.admission import (
    Verdict,
    admit,
    presented_token,
    twilio_signature,
    twilio_signature_valid,
)
from callscribe.bridge.limits import SourceLimit
from callscribe.security import AccessPolicy

TOKEN = "12345"
URI = "https://mycompany.com/myapp.php?foo=1&bar=2"
PARAMS = {
    "CallSid": "CA1234567890ABCDE",
    "Digits": "1234",
    "From": "+14158675309",
    "To": "+18005551212",
    "Caller": "+14158675309",
}


def test_signature_matches_twilio_reference_vector() -> None:
    assert twilio_signature(TOKEN, URI, PARAMS) == "RSOYDt4T1cUTdK1PDd93/VVr8B8="


def test_signature_validation_with_and_without_ports() -> None:
    assert twilio_signature_valid(TOKEN, URI, "RSOYDt4T1cUTdK1PDd93/VVr8B8=", PARAMS)
    # Twilio signed without the port the request arrived on.
    assert twilio_signature_valid(
        TOKEN, URI.replace(".com", ".com:1234"), "RSOYDt4T1cUTdK1PDd93/VVr8B8=", PARAMS
    )
    # Twilio signed with the default port.
    assert twilio_signature_valid(TOKEN, URI, "kvajT1Ptam85bY51eRf/AJRuM3w=", PARAMS)
    assert twilio_signature_valid(TOKEN, URI.replace("https", "http"), "0ZXoZLH/DfblKGATFgpif+LLRf4=", PARAMS)


def test_signature_refused_when_anything_differs() -> None:
    good = "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    assert not twilio_signature_valid("54321", URI, good, PARAMS)
    assert not twilio_signature_valid(TOKEN, URI.replace("foo=1", "foo=2"), good, PARAMS)
    assert not twilio_signature_valid(TOKEN, URI, good, {**PARAMS, "Digits": "9"})
    assert not twilio_signature_valid(TOKEN, URI, None, PARAMS)
    assert not twilio_signature_valid(TOKEN, URI, "", PARAMS)


def test_websocket_url_signed_as_wss_arriving_as_ws_behind_a_proxy() -> None:
    signed = twilio_signature(TOKEN, "wss://bridge.example.com/fork/twilio")
    assert twilio_signature_valid(TOKEN, "ws://bridge.example.com/fork/twilio", signed)
    assert twilio_signature_valid(TOKEN, "ws://bridge.example.com:8080/fork/twilio", signed)
    assert not twilio_signature_valid(TOKEN, "ws://evil.example.com/fork/twilio", signed)


def test_presented_token_sources() -> None:
    basic = base64.b64encode(b"freeswitch:s3cret").decode()
    assert presented_token({"authorization": "Bearer s3cret"}, {}) == "s3cret"
    assert presented_token({"authorization": f"Basic {basic}"}, {}) == "s3cret"
    assert presented_token({"authorization": "Basic !!!"}, {}) == ""
    assert presented_token({"x-telnyx-streaming-auth-token": "s3cret"}, {}) == "s3cret"
    assert presented_token({}, {"token": "s3cret"}) == "s3cret"
    assert presented_token({}, {}) is None


def decide(
    dialect: str,
    headers: dict[str, str],
    query: dict[str, str] | None = None,
    fork_token: str | None = "s3cret",
    twilio_token: str | None = None,
    in_band_token: bool = False,
) -> Verdict:
    policy = AccessPolicy(
        fork_token=SecretStr(fork_token) if fork_token else None,
        twilio_token=SecretStr(twilio_token) if twilio_token else None,
    )
    return admit(
        dialect=dialect,
        url="ws://127.0.0.1:8080/fork/" + dialect,
        headers=headers,
        query=query or {},
        policy=policy,
        in_band_token=in_band_token,
    ).verdict


def test_admission_decisions() -> None:
    assert decide("freeswitch", {}, fork_token=None) is Verdict.ALLOWED
    assert decide("freeswitch", {"authorization": "Bearer s3cret"}) is Verdict.ALLOWED
    assert decide("freeswitch", {}, {"token": "s3cret"}) is Verdict.ALLOWED
    assert decide("freeswitch", {"authorization": "Bearer nope"}) is Verdict.REFUSED
    assert decide("freeswitch", {}) is Verdict.REFUSED
    assert decide("telnyx", {}, in_band_token=True) is Verdict.TOKEN_IN_START
    assert decide("telnyx", {"authorization": "Bearer nope"}, in_band_token=True) is Verdict.REFUSED


def test_twilio_needs_a_signature_once_its_token_is_set() -> None:
    url = "ws://127.0.0.1:8080/fork/twilio"
    signature = twilio_signature("tw-token", url)
    assert decide("twilio", {"x-twilio-signature": signature}, twilio_token="tw-token") is Verdict.ALLOWED
    assert decide("twilio", {}, twilio_token="tw-token") is Verdict.REFUSED
    assert decide("twilio", {"x-twilio-signature": "AAAA"}, twilio_token="tw-token") is Verdict.REFUSED
    # A valid fork token does not stand in for the signature.
    assert decide("twilio", {"authorization": "Bearer s3cret"}, twilio_token="tw-token") is Verdict.REFUSED


def test_source_limit() -> None:
    limit = SourceLimit(2)
    assert limit.acquire("10.0.0.1") and limit.acquire("10.0.0.1")
    assert not limit.acquire("10.0.0.1")
    assert limit.acquire("10.0.0.2")
    limit.release("10.0.0.1")
    assert limit.count("10.0.0.1") == 1 and limit.acquire("10.0.0.1")
