"""SIP messages shaped like real SRCs and phones send them (Sonus/Ribbon, Cisco CUBE, RFC 3261
examples), with documentation addresses. `load()` gives them CRLF line ends and a correct
Content-Length, as they appear on the wire."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent
MESSAGES = ("plain_invite", "siprec_sonus", "siprec_cisco")


def load(name: str) -> bytes:
    text = (HERE / f"{name}.txt").read_text()
    head, _, body = text.partition("\n\n")
    body_bytes = body.replace("\n", "\r\n").encode()
    lines = []
    for line in head.split("\n"):
        name_part = line.split(":", 1)[0].strip().lower()
        if name_part in ("content-length", "l"):
            line = f"{line.split(':', 1)[0]}: {len(body_bytes)}"
        lines.append(line)
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body_bytes
