"""Who may send us media or control us: source allow-lists and shared secrets, decided once.

`AccessPolicy.from_settings` is built by the Service and handed to every ingest (RTP, AudioSocket,
/fork/*, /whip, SIP, /v1/legs). Its methods are pure: no I/O, no logging. Secrets stay
`SecretStr` (repr `'**********'`), so logging the policy or its settings reveals nothing;
protocol-specific algorithms (Twilio signatures, SIP digest) live with their protocol and take
the secret from here.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import SecretStr

from callscribe.networks import Network, address_allowed, parse_networks

if TYPE_CHECKING:
    from callscribe.settings import Settings


def secret_matches(presented: str | None, expected: SecretStr) -> bool:
    """Constant-time comparison (no timing oracle on how much of a guess was right)."""
    if presented is None:
        return False
    return hmac.compare_digest(presented.encode("utf-8"), expected.get_secret_value().encode("utf-8"))


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, None for anything else."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def bearer_authorized(authorization: str | None, token: SecretStr | None) -> bool:
    """Open when `token` is unset, else only `Authorization: Bearer <token>`."""
    return token is None or secret_matches(bearer_token(authorization), token)


def _secret(value: SecretStr | None) -> SecretStr | None:
    # An empty secret (CALLSCRIBE_API_TOKEN= in an env file) means unset, not "the empty token".
    return value if value is not None and value.get_secret_value() else None


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    allow_networks: tuple[Network, ...] = ()
    # SIP only, on top of allow_networks: e.g. INVITEs from the SBC while RTP comes from elsewhere.
    sip_allow_networks: tuple[Network, ...] = ()
    api_token: SecretStr | None = None
    whip_token: SecretStr | None = None
    fork_token: SecretStr | None = None
    twilio_token: SecretStr | None = None
    sip_auth_realm: str = "callscribe"
    sip_auth_user: str | None = None
    sip_auth_password: SecretStr | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> AccessPolicy:
        return cls(
            allow_networks=parse_networks(settings.allow_networks),
            sip_allow_networks=parse_networks(settings.sip_allow_networks),
            api_token=_secret(settings.api_token),
            whip_token=_secret(settings.whip_token),
            fork_token=_secret(settings.fork_auth_token),
            twilio_token=_secret(settings.twilio_auth_token),
            sip_auth_realm=settings.sip_auth_realm,
            sip_auth_user=settings.sip_auth_user or None,
            sip_auth_password=settings.sip_auth_password,
        )

    def source_allowed(self, host: str) -> bool:
        """May `host` reach any ingest at all (the global allow_networks; empty = anyone)."""
        return address_allowed(host, self.allow_networks)

    def sip_source_allowed(self, host: str) -> bool:
        return self.source_allowed(host) and address_allowed(host, self.sip_allow_networks)

    def fork_token_matches(self, presented: str | None) -> bool:
        return self.fork_token is not None and secret_matches(presented, self.fork_token)

    def describe(self) -> str:
        """One line for the startup log: what is enforced, never a secret's value."""

        def networks(values: tuple[Network, ...]) -> str:
            return ",".join(str(network) for network in values) or "any"

        def state(secret: SecretStr | None) -> str:
            return "set" if secret is not None else "unset"

        return (
            f"allow_networks={networks(self.allow_networks)} "
            f"sip_allow_networks={networks(self.sip_allow_networks)} api_token={state(self.api_token)} "
            f"whip_token={state(self.whip_token)} fork_auth_token={state(self.fork_token)} "
            f"twilio_auth_token={state(self.twilio_token)} sip_digest={'on' if self.sip_auth_user else 'off'}"
        )

    @property
    def sip_password(self) -> str:
        """For the digest authenticator only (it hashes it at once)."""
        return self.sip_auth_password.get_secret_value() if self.sip_auth_password else ""
