from __future__ import annotations

import hashlib

import pytest

from callscribe.bridge.sip.auth import NONCE_TTL_SEC, AuthVerdict, DigestAuthenticator, parse_authorization
from callscribe.bridge.sip.message import SipRequest, parse_message


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def invite_with(authorization: str) -> SipRequest:
    message = parse_message(
        (
            "INVITE sip:transcribe@192.0.2.10 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.5;branch=z9hG4bK1\r\n"
            "From: <sip:pbx@10.0.0.5>;tag=1\r\nTo: <sip:transcribe@192.0.2.10>\r\nCall-ID: a\r\n"
            f"CSeq: 2 INVITE\r\nAuthorization: {authorization}\r\nContent-Length: 0\r\n\r\n"
        ).encode()
    )
    assert isinstance(message, SipRequest)
    return message


def answer(nonce: str, password: str, qop: bool = True) -> str:
    """What a UAC computes (RFC 2617 §3.2.2), written out independently of the module."""
    ha1 = md5(f"pbx:callscribe:{password}")
    ha2 = md5("INVITE:sip:transcribe@192.0.2.10")
    if qop:
        response = md5(f"{ha1}:{nonce}:00000001:abc:auth:{ha2}")
        extra = ', qop=auth, nc=00000001, cnonce="abc"'
    else:
        response, extra = md5(f"{ha1}:{nonce}:{ha2}"), ""
    return (
        f'Digest username="pbx", realm="callscribe", nonce="{nonce}", '
        f'uri="sip:transcribe@192.0.2.10", response="{response}", algorithm=MD5{extra}'
    )


@pytest.mark.parametrize("qop", [True, False])
def test_digest_accepts_the_right_password_only(qop: bool) -> None:
    auth = DigestAuthenticator("callscribe", "pbx", "s3cret")
    name, challenge = auth.challenge(1000.0)
    assert name == "WWW-Authenticate" and 'qop="auth"' in challenge
    nonce = parse_authorization(challenge)["nonce"]
    assert auth.check(invite_with(answer(nonce, "s3cret", qop)), 1001.0) is AuthVerdict.OK
    assert auth.check(invite_with(answer(nonce, "guess", qop)), 1001.0) is AuthVerdict.DENIED
    assert (
        auth.check(invite_with(answer(nonce, "s3cret", qop)), 1000.0 + NONCE_TTL_SEC + 1) is AuthVerdict.STALE
    )
    forged = nonce.split(":")[0] + ":" + "0" * 32
    assert auth.check(invite_with(answer(forged, "s3cret", qop)), 1001.0) is AuthVerdict.DENIED
    assert auth.check(invite_with("Basic cGJ4OnMzY3JldA=="), 1001.0) is AuthVerdict.DENIED
