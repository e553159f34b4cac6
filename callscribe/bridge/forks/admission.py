"""Who may open a media fork: shared-secret tokens, Twilio request signatures, per-source limits.

Pure functions over headers, URL and query; the websocket endpoint applies them before it
accepts the socket, so a refused sender never gets to send audio. The secrets come from the
service's `AccessPolicy` (callscribe.security).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from urllib.parse import urlsplit, urlunsplit

from callscribe.security import AccessPolicy

DEFAULT_PORTS = {"ws": 80, "http": 80, "wss": 443, "https": 443}
# Headers a token may arrive in, besides Authorization (Bearer or Basic).
TOKEN_HEADERS = ("x-callscribe-token", "x-telnyx-streaming-auth-token")


def presented_token(headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
    """The token a sender presented: `Authorization: Bearer <t>`, Basic auth whose password
    is the token (mod_audio_fork's user:pass@ URLs), a token header, or `?token=<t>`."""
    authorization = headers.get("authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    if scheme.lower() == "basic" and credentials.strip():
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return ""  # present but unreadable: refused, not "missing"
        return decoded.partition(":")[2]
    for name in TOKEN_HEADERS:
        if headers.get(name):
            return headers[name]
    return query.get("token")


def twilio_signature(auth_token: str, url: str, params: Mapping[str, str] | None = None) -> str:
    """X-Twilio-Signature: base64(HMAC-SHA1(auth token, URL + each POST param name+value,
    sorted by name)). A websocket upgrade is a GET, so params is empty and the query string
    is part of the URL."""
    data = url + "".join(name + (params or {})[name] for name in sorted(params or {}))
    digest = hmac.new(auth_token.encode("utf-8"), data.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def url_variants(url: str) -> Iterable[str]:
    """The URL as Twilio may have signed it. Like Twilio's own validators, the URL counts
    without any port and with its port (the scheme's default if none). A TLS-terminating
    proxy makes wss:// arrive as ws://, and some deployments write https:// URLs, so each
    scheme of the pair is tried too."""
    parts = urlsplit(url)
    pairs = {"ws": "wss", "wss": "ws", "http": "https", "https": "http"}
    host = parts.hostname or ""
    for scheme in (parts.scheme, pairs.get(parts.scheme, parts.scheme)):
        port = parts.port if scheme == parts.scheme else None
        port = port or DEFAULT_PORTS.get(scheme)
        for netloc in (host, f"{host}:{port}" if port else host):
            yield urlunsplit((scheme, netloc, parts.path, parts.query, ""))


def twilio_signature_valid(
    auth_token: str, url: str, signature: str | None, params: Mapping[str, str] | None = None
) -> bool:
    if not signature:
        return False
    return any(
        hmac.compare_digest(twilio_signature(auth_token, variant, params).encode(), signature.encode())
        for variant in url_variants(url)
    )


class Verdict(Enum):
    ALLOWED = "allowed"
    # No credentials at the HTTP level, but the dialect can carry a token in its start message.
    TOKEN_IN_START = "token-in-start"
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class Admission:
    verdict: Verdict
    reason: str = ""


def admit(
    *,
    dialect: str,
    url: str,
    headers: Mapping[str, str],
    query: Mapping[str, str],
    policy: AccessPolicy,
    in_band_token: bool,
) -> Admission:
    """Decide before accepting a fork websocket. `headers` keys are lower-case."""
    if dialect == "twilio" and policy.twilio_token is not None:
        twilio_token = policy.twilio_token.get_secret_value()
        if twilio_signature_valid(twilio_token, url, headers.get("x-twilio-signature")):
            return Admission(Verdict.ALLOWED)
        if "x-twilio-signature" not in headers:
            return Admission(Verdict.REFUSED, "missing X-Twilio-Signature")
        return Admission(Verdict.REFUSED, "X-Twilio-Signature does not match the URL and auth token")
    if policy.fork_token is None:
        return Admission(Verdict.ALLOWED)
    presented = presented_token(headers, query)
    if presented is None:
        if in_band_token:
            return Admission(Verdict.TOKEN_IN_START)
        return Admission(Verdict.REFUSED, "missing token (Authorization: Bearer, Basic password or ?token=)")
    if policy.fork_token_matches(presented):
        return Admission(Verdict.ALLOWED)
    return Admission(Verdict.REFUSED, "invalid token")
