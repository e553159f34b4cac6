"""Per-call options an ingest passes along with its metadata: `redact`, `context`, `keyterms`.

Every ingest already turns what it is told into leg metadata (POST /v1/legs `meta`, WHIP
`meta.<key>` query parameters, SIP headers under `sip`, fork custom parameters under `custom`,
a FreeSWITCH fork's JSON metadata under `metadata`); an option is looked up in those places
in that order, so no ingest needs to know about options:

- `meta[name]` (POST /v1/legs top-level fields are copied there; WHIP `?meta.redact=pci`),
- `meta["custom"][name]` (Twilio/Telnyx/Vonage/Exotel custom parameters),
- `meta["metadata"][name]` (FreeSWITCH mod_audio_fork metadata object),
- `meta["sip"]["x-callscribe-" + name]` (SIP/SIPREC INVITE header `X-Callscribe-Redact: pci`).
"""

from __future__ import annotations

from typing import Any

OPTIONS = ("redact", "context", "keyterms")
SIP_HEADER_PREFIX = "x-callscribe-"


def ingest_option(meta: dict[str, Any], name: str) -> Any:
    """The value of option `name` in leg/call metadata, or None when no ingest set it."""
    if name in meta:
        return meta[name]
    for nested in ("custom", "metadata"):
        inner = meta.get(nested)
        if isinstance(inner, dict) and name in inner:
            return inner[name]
    sip = meta.get("sip")
    if isinstance(sip, dict) and SIP_HEADER_PREFIX + name in sip:
        return sip[SIP_HEADER_PREFIX + name]
    return None


def keyterms(meta: dict[str, Any]) -> tuple[str, ...]:
    """`keyterms` as a list, or a comma-separated string (headers, query parameters)."""
    value = ingest_option(meta, "keyterms")
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else []
    return tuple(str(item).strip()[:100] for item in items if str(item).strip())[:100]


def context(meta: dict[str, Any]) -> str:
    value = ingest_option(meta, "context")
    return str(value)[:2000] if value is not None else ""
