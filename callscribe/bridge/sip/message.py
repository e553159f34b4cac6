"""SIP (RFC 3261) wire format, sans-IO: `parse_message()` / `SipMessage.serialize()`, the
header grammar (Via, CSeq, name-addr, parameters), TCP framing and `build_response()`.
Nothing here keeps state across messages, reads a clock or touches a socket.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from callscribe.bridge.events import DropReason

SIP_VERSION = "SIP/2.0"
MAGIC_COOKIE = "z9hG4bK"
MAX_HEADERS = 256
MAX_HEADER_BYTES = 32 * 1024
MAX_BODY_BYTES = 256 * 1024
# RFC 3261 §7.3.3 compact header names.
COMPACT_NAMES = {
    "i": "call-id",
    "m": "contact",
    "e": "content-encoding",
    "l": "content-length",
    "c": "content-type",
    "f": "from",
    "s": "subject",
    "k": "supported",
    "t": "to",
    "v": "via",
    "r": "refer-to",
    "o": "event",
    "u": "allow-events",
}
CANONICAL_NAMES = {
    "call-id": "Call-ID",
    "cseq": "CSeq",
    "www-authenticate": "WWW-Authenticate",
    "mime-version": "MIME-Version",
}
REASONS = {
    100: "Trying",
    180: "Ringing",
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    405: "Method Not Allowed",
    415: "Unsupported Media Type",
    420: "Bad Extension",
    481: "Call/Transaction Does Not Exist",
    486: "Busy Here",
    487: "Request Terminated",
    488: "Not Acceptable Here",
    491: "Request Pending",
    500: "Server Internal Error",
    503: "Service Unavailable",
    513: "Message Too Large",
}
ALLOWED_METHODS = ("INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "UPDATE")
SUPPORTED_EXTENSIONS = frozenset({"siprec"})
_TOKEN = re.compile(r"^[A-Za-z0-9.!%*_+`'~-]+$")
_STATUS_LINE = re.compile(r"^SIP/2\.0 ([1-6][0-9]{2}) ?(.*)$")


class SipParseError(ValueError):
    """Bytes that are not a SIP message we can act on. `reason` is a short metric label."""

    def __init__(self, message: str, reason: DropReason = DropReason.MALFORMED) -> None:
        super().__init__(message)
        self.reason = reason


def canonical_name(name: str) -> str:
    lower = name.lower()
    lower = COMPACT_NAMES.get(lower, lower)
    return CANONICAL_NAMES.get(lower, "-".join(part.capitalize() for part in lower.split("-")))


@dataclass
class Headers:
    """Header fields in wire order; names compare case-insensitively and compact forms expand."""

    items: list[tuple[str, str]] = field(default_factory=list)

    @staticmethod
    def _key(name: str) -> str:
        lower = name.lower()
        return COMPACT_NAMES.get(lower, lower)

    def get(self, name: str) -> str | None:
        key = self._key(name)
        for item_name, value in self.items:
            if self._key(item_name) == key:
                return value
        return None

    def get_all(self, name: str) -> list[str]:
        key = self._key(name)
        return [value for item_name, value in self.items if self._key(item_name) == key]

    def values(self, name: str) -> list[str]:
        """Every comma-separated value of every field of that name (Via, Require, ...)."""
        return [v for field_value in self.get_all(name) for v in split_values(field_value)]

    def add(self, name: str, value: str) -> None:
        self.items.append((canonical_name(name), value))

    def set(self, name: str, value: str) -> None:
        self.remove(name)
        self.add(name, value)

    def remove(self, name: str) -> None:
        key = self._key(name)
        self.items = [(n, v) for n, v in self.items if self._key(n) != key]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.items)


@dataclass
class SipMessage:
    headers: Headers
    body: bytes

    @property
    def call_id(self) -> str:
        return self.headers.get("call-id") or ""

    @property
    def cseq(self) -> tuple[int, str]:
        return parse_cseq(self.headers.get("cseq") or "")

    @property
    def content_type(self) -> str:
        return (self.headers.get("content-type") or "").split(";", 1)[0].strip().lower()

    def start_line(self) -> str:
        raise NotImplementedError

    def serialize(self) -> bytes:
        lines = [self.start_line()]
        lines.extend(
            f"{name}: {value}" for name, value in self.headers if self.headers._key(name) != "content-length"
        )
        lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + self.body


@dataclass
class SipRequest(SipMessage):
    method: str = ""
    uri: str = ""

    def start_line(self) -> str:
        return f"{self.method} {self.uri} {SIP_VERSION}"


@dataclass
class SipResponse(SipMessage):
    status: int = 0
    reason: str = ""

    def start_line(self) -> str:
        return f"{SIP_VERSION} {self.status} {self.reason}"


def split_values(value: str) -> list[str]:
    """Split a header value on commas that are outside quotes and angle brackets."""
    parts: list[str] = []
    depth = 0
    quoted = False
    start = 0
    i = 0
    while i < len(value):
        ch = value[i]
        if quoted:
            if ch == "\\":
                i += 1
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif ch == "<":
            depth += 1
        elif ch == ">":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            parts.append(value[start:i].strip())
            start = i + 1
        i += 1
    parts.append(value[start:].strip())
    return [p for p in parts if p]


def parse_params(text: str) -> dict[str, str]:
    """';a=1;b' → {'a': '1', 'b': ''} (names lower-cased, quotes kept off)."""
    params: dict[str, str] = {}
    for raw in text.split(";"):
        raw = raw.strip()
        if not raw:
            continue
        name, _, value = raw.partition("=")
        params[name.strip().lower()] = value.strip().strip('"')
    return params


@dataclass(frozen=True)
class NameAddr:
    display: str
    uri: str
    params: dict[str, str]

    @property
    def tag(self) -> str:
        return self.params.get("tag", "")

    @property
    def user(self) -> str:
        """The user part of a sip:/sips:/tel: URI ('' when there is none)."""
        rest = self.uri.split(":", 1)[1] if ":" in self.uri else self.uri
        return rest.split("@", 1)[0].split(";", 1)[0] if "@" in rest or self.uri.startswith("tel:") else ""


def parse_name_addr(value: str) -> NameAddr:
    """From/To/Contact: '"Bob" <sip:bob@h>;tag=x' or 'sip:bob@h;tag=x' (RFC 3261 §20.10)."""
    value = value.strip()
    if "<" in value:
        display, _, rest = value.partition("<")
        uri, closed, params = rest.partition(">")
        if not closed:
            raise SipParseError(f"name-addr {value!r} has '<' without '>'")
        return NameAddr(display.strip().strip('"'), uri.strip(), parse_params(params))
    # addr-spec without brackets: URI parameters cannot be told from header parameters,
    # RFC 3261 §20.10 says they are header parameters.
    uri, _, params = value.partition(";")
    return NameAddr("", uri.strip(), parse_params(params))


@dataclass(frozen=True)
class Via:
    transport: str
    host: str
    port: int | None
    params: dict[str, str]

    @property
    def branch(self) -> str:
        return self.params.get("branch", "")

    @property
    def sent_by(self) -> str:
        return f"{self.host}:{self.port or 5060}"


def parse_via(value: str) -> Via:
    """One Via value: 'SIP/2.0/UDP host:port;branch=...' (RFC 3261 §20.42)."""
    proto, _, rest = value.strip().partition(" ")
    parts = proto.split("/")
    if len(parts) != 3 or parts[0].upper() != "SIP":
        raise SipParseError(f"Via {value!r} does not start with SIP/2.0/<transport>", DropReason.BAD_VIA)
    sent_by, _, params = rest.strip().partition(";")
    sent_by = sent_by.strip()
    host, port = sent_by, None
    if sent_by.startswith("["):
        host, _, tail = sent_by[1:].partition("]")
        if tail.startswith(":"):
            port = _port(tail[1:], value)
    elif sent_by.count(":") == 1:
        host, port_text = sent_by.split(":")
        port = _port(port_text, value)
    if not host:
        raise SipParseError(f"Via {value!r} has no sent-by host", DropReason.BAD_VIA)
    return Via(parts[2].strip().upper(), host, port, parse_params(params))


def _port(text: str, value: str) -> int:
    text = text.strip()
    # ASCII only: "²".isdigit() is true and int("²") raises ValueError (a traceback, not a 400).
    if not (text.isascii() and text.isdigit()) or len(text) > 5 or not 0 < int(text) < 65536:
        raise SipParseError(f"Via {value!r} has port {text!r}, expected 1-65535", DropReason.BAD_VIA)
    return int(text)


def parse_cseq(value: str) -> tuple[int, str]:
    number, _, method = value.strip().partition(" ")
    method = method.strip()
    if not (number.isascii() and number.isdigit()) or len(number) > 10 or not _TOKEN.match(method or " "):
        raise SipParseError(f"CSeq {value!r} is not '<number> <method>'", DropReason.BAD_CSEQ)
    return int(number), method.upper()


def parse_message(data: bytes, *, stream: bool = False) -> SipRequest | SipResponse:
    """One SIP message from one datagram (or one framed stream message).

    Over UDP a missing Content-Length means "the rest of the datagram"; a Content-Length
    longer than what arrived is an error (RFC 3261 §18.3).
    """
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = data.partition(b"\n\n")
    if len(head) > MAX_HEADER_BYTES:
        raise SipParseError(
            f"header section of {len(head)} bytes exceeds {MAX_HEADER_BYTES}", DropReason.OVERSIZED
        )
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SipParseError(
            f"header bytes are not UTF-8 at offset {exc.start}", DropReason.NOT_UTF8
        ) from None
    raw_lines = text.replace("\r\n", "\n").split("\n")
    while raw_lines and not raw_lines[0].strip():
        raw_lines.pop(0)  # RFC 3261 §7.5: ignore CRLFs before the start line
    if not raw_lines:
        raise SipParseError("empty message", DropReason.EMPTY)
    lines: list[str] = []
    for line in raw_lines[1:]:
        if line[:1] in (" ", "\t") and lines:
            lines[-1] += " " + line.strip()  # header folding
        else:
            lines.append(line)
    if len(lines) > MAX_HEADERS:
        raise SipParseError(f"{len(lines)} header lines exceed {MAX_HEADERS}", DropReason.TOO_MANY_HEADERS)
    headers = Headers()
    for line in lines:
        if not line.strip():
            continue
        name, colon, value = line.partition(":")
        name = name.strip()
        if not colon or not _TOKEN.match(name):
            raise SipParseError(f"header line {line[:80]!r} is not 'Name: value'", DropReason.BAD_HEADER)
        headers.items.append((name, value.strip()))
    length_text = headers.get("content-length")
    if length_text is not None:
        # ASCII digits only (RFC 3261 §20.14 1*DIGIT): str.isdigit() also takes "٣" or "²".
        if not (length_text.isascii() and length_text.isdigit()) or len(length_text) > 9:
            raise SipParseError(
                f"Content-Length {length_text!r} is not a number", DropReason.BAD_CONTENT_LENGTH
            )
        length = int(length_text)
        if length > len(body):
            raise SipParseError(
                f"Content-Length {length} but only {len(body)} body bytes arrived", DropReason.TRUNCATED
            )
        body = body[:length]
    elif stream:
        raise SipParseError("Content-Length is required on stream transports", DropReason.BAD_CONTENT_LENGTH)
    if len(body) > MAX_BODY_BYTES:
        raise SipParseError(f"body of {len(body)} bytes exceeds {MAX_BODY_BYTES}", DropReason.OVERSIZED)
    start = raw_lines[0].strip()
    if start.startswith("SIP/"):
        match = _STATUS_LINE.match(start)
        if not match:
            raise SipParseError(
                f"status line {start[:80]!r} is not 'SIP/2.0 <code> <reason>'", DropReason.BAD_START_LINE
            )
        return SipResponse(headers, body, status=int(match.group(1)), reason=match.group(2))
    parts = start.split(" ")
    if len(parts) != 3 or parts[2] != SIP_VERSION or not _TOKEN.match(parts[0]) or not parts[1]:
        raise SipParseError(
            f"request line {start[:80]!r} is not '<METHOD> <URI> SIP/2.0'", DropReason.BAD_START_LINE
        )
    return SipRequest(headers, body, method=parts[0].upper(), uri=parts[1])


class StreamFramer:
    """Cuts SIP messages out of a TCP byte stream by Content-Length (RFC 3261 §18.3)."""

    def __init__(self, max_buffer: int = MAX_HEADER_BYTES + MAX_BODY_BYTES) -> None:
        self._buffer = bytearray()
        self._max = max_buffer

    def feed(self, data: bytes) -> list[bytes]:
        """Complete messages; raises SipParseError when the stream cannot be framed any more."""
        self._buffer += data
        messages: list[bytes] = []
        while True:
            # RFC 5626 §3.5.1 keep-alives: CRLF pings between messages.
            while self._buffer[:2] == b"\r\n":
                del self._buffer[:2]
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HEADER_BYTES:
                    raise SipParseError(
                        "no end of headers within the header size limit", DropReason.OVERSIZED
                    )
                return messages
            head = bytes(self._buffer[:end])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() in (b"content-length", b"l"):
                    text = value.strip()
                    if not text.isdigit() or len(text) > 9:
                        raise SipParseError(
                            f"Content-Length {text!r} is not a number", DropReason.BAD_CONTENT_LENGTH
                        )
                    length = int(text)
            total = end + 4 + length
            if total > self._max:
                raise SipParseError(f"message of {total} bytes exceeds {self._max}", DropReason.OVERSIZED)
            if len(self._buffer) < total:
                return messages
            messages.append(bytes(self._buffer[:total]))
            del self._buffer[:total]


def build_response(
    request: SipRequest,
    status: int,
    reason: str | None = None,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    to_tag: str = "",
) -> SipResponse:
    """A response copying Via, From, To (+ our tag), Call-ID and CSeq (RFC 3261 §8.2.6.2)."""
    out = Headers()
    for name in ("via", "from", "to", "call-id", "cseq"):
        for value in request.headers.get_all(name):
            if name == "to" and to_tag and "tag=" not in value.split(">")[-1]:
                value = f"{value};tag={to_tag}"
            out.add(name, value)
    if 100 < status < 300:
        # RFC 3261 §12.1.1: a proxy that record-routed (Kamailio, an SBC) stays in the dialog
        # (sees the ACK and the BYE) only if the UAS copies Record-Route, in order, into the
        # responses that set the dialog up.
        for value in request.headers.get_all("record-route"):
            out.add("record-route", value)
    for name, value in headers:
        out.add(name, value)
    return SipResponse(out, body, status=status, reason=reason or REASONS.get(status, "Unknown"))


@dataclass(frozen=True)
class Peer:
    """Where a message came from and where its responses go (symmetric, like rport)."""

    transport: str  # "udp" | "tcp"
    host: str
    port: int

    @property
    def reliable(self) -> bool:
        return self.transport != "udp"
