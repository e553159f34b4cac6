"""SIP digest authentication (RFC 3261 §22, RFC 2617 MD5, qop=auth), sans-IO.

Nonces are stateless: `<issued-at>:<hmac(issued-at)>` with a per-process secret, so a
challenge needs no storage and a stale nonce is recognised by its age.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from enum import Enum

from callscribe.bridge.sip.message import SipRequest, parse_params, split_values

NONCE_TTL_SEC = 300.0


def _md5(text: str) -> str:
    return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()


def parse_authorization(value: str) -> dict[str, str]:
    """'Digest username="a", realm="r", ...' → {'username': 'a', ...}; {} when not Digest."""
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != "digest":
        return {}
    params: dict[str, str] = {}
    for item in split_values(rest):
        params.update(parse_params(item))
    return params


class AuthVerdict(Enum):
    OK = "ok"
    STALE = "stale"  # right password, old nonce: challenge again with stale=true (RFC 2617 §3.2.1)
    DENIED = "denied"


class _NonceState(Enum):
    FRESH = "fresh"
    STALE = "stale"
    INVALID = "invalid"


class DigestAuthenticator:
    def __init__(self, realm: str, username: str, password: str, secret: bytes | None = None) -> None:
        self.realm = realm
        self.username = username
        self._ha1 = _md5(f"{username}:{realm}:{password}")
        self._secret = secret or secrets.token_bytes(32)

    def nonce(self, now: float) -> str:
        issued = f"{now:.0f}"
        mac = hmac.new(self._secret, issued.encode(), hashlib.sha256).hexdigest()[:32]
        return f"{issued}:{mac}"

    def challenge(self, now: float, stale: bool = False) -> tuple[str, str]:
        value = f'Digest realm="{self.realm}", nonce="{self.nonce(now)}", algorithm=MD5, qop="auth"'
        if stale:
            value += ", stale=true"
        return ("WWW-Authenticate", value)

    def _nonce_state(self, nonce: str, now: float) -> _NonceState:
        issued, _, mac = nonce.partition(":")
        expected = hmac.new(self._secret, issued.encode(), hashlib.sha256).hexdigest()[:32]
        if not issued.isdigit() or not hmac.compare_digest(mac, expected):
            return _NonceState.INVALID
        return _NonceState.STALE if now - int(issued) > NONCE_TTL_SEC else _NonceState.FRESH

    def check(self, request: SipRequest, now: float) -> AuthVerdict:
        for value in request.headers.get_all("authorization"):
            params = parse_authorization(value)
            if params.get("username") != self.username or params.get("realm") != self.realm:
                continue
            nonce = params.get("nonce", "")
            state = self._nonce_state(nonce, now)
            if state is _NonceState.INVALID:
                continue
            ha2 = _md5(f"{request.method}:{params.get('uri', '')}")
            if params.get("qop") == "auth":
                expected = _md5(
                    f"{self._ha1}:{nonce}:{params.get('nc', '')}:{params.get('cnonce', '')}:auth:{ha2}"
                )
            else:
                expected = _md5(f"{self._ha1}:{nonce}:{ha2}")
            if hmac.compare_digest(expected, params.get("response", "")):
                return AuthVerdict.OK if state is _NonceState.FRESH else AuthVerdict.STALE
        return AuthVerdict.DENIED
