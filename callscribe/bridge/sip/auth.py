"""SIP digest authentication (RFC 3261 §22, RFC 2617/7616 MD5, qop=auth), sans-IO.

A nonce is `<issued-ms>.<random>:<hmac>` with a per-process secret: a challenge needs no
storage, a forged nonce is refused by its MAC and a stale one recognised by its age. Replays
need state (RFC 7616 §3.3, §5.6): the nonces that authenticated a request are kept with the
highest `nc` accepted for each, so a captured Authorization header cannot start a second call
(same nonce, same nc) and a nonce without qop authenticates once. Only nonces that carried the
right password enter the table (a flood of unauthenticated INVITEs adds nothing); it is
bounded by `max_nonces`, and evicting an entry raises a floor below which every nonce counts
as stale, so an evicted nonce cannot be replayed either.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections import OrderedDict
from enum import Enum

from callscribe.bridge.sip.message import SipRequest, parse_params, split_values

NONCE_TTL_SEC = 300.0
MAX_NONCES = 10_000
_NONCE = re.compile(r"^([0-9]{1,16})\.[0-9a-f]{16}:[0-9a-f]{32}$")
_NC = re.compile(r"^[0-9a-fA-F]{8}$")


def _md5(text: str) -> str:
    return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()


def _same(a: str, b: str) -> bool:
    """Constant-time equality of any two strings: `hmac.compare_digest` raises TypeError on a
    `str` with non-ASCII characters (a hostile nonce or response), bytes never do."""
    return hmac.compare_digest(a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass"))


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
    # Right password, but the nonce is too old, evicted or already used with that nc: challenge
    # again with stale=true (RFC 2617 §3.2.1), so a real UA retries with the fresh nonce at once.
    STALE = "stale"
    DENIED = "denied"


class DigestAuthenticator:
    def __init__(
        self,
        realm: str,
        username: str,
        password: str,
        secret: bytes | None = None,
        max_nonces: int = MAX_NONCES,
        nonce_ttl_sec: float = NONCE_TTL_SEC,
    ) -> None:
        self.realm = realm
        self.username = username
        self._ha1 = _md5(f"{username}:{realm}:{password}")
        self._secret = secret or secrets.token_bytes(32)
        self.max_nonces = max_nonces
        self.nonce_ttl_sec = nonce_ttl_sec
        # nonce → highest nc accepted (0: used without qop), in order of first use.
        self._used: OrderedDict[str, int] = OrderedDict()
        self._floor_ms = -1  # nonces issued at or before this were evicted: stale

    def _mac(self, text: str) -> str:
        return hmac.new(self._secret, text.encode(), hashlib.sha256).hexdigest()[:32]

    def nonce(self, now: float) -> str:
        issued = f"{int(now * 1000)}.{secrets.token_hex(8)}"
        return f"{issued}:{self._mac(issued)}"

    def challenge(self, now: float, stale: bool = False) -> tuple[str, str]:
        value = f'Digest realm="{self.realm}", nonce="{self.nonce(now)}", algorithm=MD5, qop="auth"'
        if stale:
            value += ", stale=true"
        return ("WWW-Authenticate", value)

    def _issued_ms(self, nonce: str) -> int | None:
        """When we issued `nonce`; None when we did not (bad shape or MAC)."""
        match = _NONCE.match(nonce)
        if match is None:
            return None
        signed, _, mac = nonce.rpartition(":")
        if not _same(mac, self._mac(signed)):
            return None
        return int(match.group(1))

    @property
    def nonces_tracked(self) -> int:
        return len(self._used)

    def check(self, request: SipRequest, now: float) -> AuthVerdict:
        verdict = AuthVerdict.DENIED
        for value in request.headers.get_all("authorization"):
            params = parse_authorization(value)
            if params.get("username") != self.username or params.get("realm") != self.realm:
                continue
            nonce = params.get("nonce", "")
            issued_ms = self._issued_ms(nonce)
            if issued_ms is None:
                continue
            qop = params.get("qop")
            nc_text = params.get("nc", "")
            if qop is not None and (qop != "auth" or not _NC.match(nc_text)):
                continue  # RFC 7616 §3.4: qop=auth needs an 8-hex-digit nc
            ha2 = _md5(f"{request.method}:{params.get('uri', '')}")
            if qop == "auth":
                expected = _md5(f"{self._ha1}:{nonce}:{nc_text}:{params.get('cnonce', '')}:auth:{ha2}")
            else:
                expected = _md5(f"{self._ha1}:{nonce}:{ha2}")
            if not _same(expected, params.get("response", "")):
                continue
            if self._use(nonce, issued_ms, int(nc_text, 16) if qop == "auth" else 0, now):
                return AuthVerdict.OK
            verdict = AuthVerdict.STALE
        return verdict

    def _use(self, nonce: str, issued_ms: int, nc: int, now: float) -> bool:
        """Record one use of a nonce that carried the right password; False when it may not be
        used: too old, issued before the eviction floor, or this nc (or a higher one) seen."""
        now_ms = int(now * 1000)
        if now_ms - issued_ms > self.nonce_ttl_sec * 1000:
            return False
        last = self._used.get(nonce)
        if last is None:
            if issued_ms <= self._floor_ms:
                return False  # its first use may have been evicted: cannot tell, refuse
        elif nc == 0 or nc <= last:
            return False  # a replay: no qop means one use, with qop nc must grow
        self._used[nonce] = nc
        if len(self._used) > self.max_nonces:
            self._evict(now_ms)
        return True

    def _evict(self, now_ms: int) -> None:
        ttl_ms = self.nonce_ttl_sec * 1000
        for nonce in [n for n in self._used if now_ms - self._issued_of(n) > ttl_ms]:
            del self._used[nonce]  # expired: refused by age anyway
        while len(self._used) > self.max_nonces:
            nonce, _ = self._used.popitem(last=False)
            self._floor_ms = max(self._floor_ms, self._issued_of(nonce))

    @staticmethod
    def _issued_of(nonce: str) -> int:
        return int(nonce.split(".", 1)[0])
