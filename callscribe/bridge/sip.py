"""SIP (RFC 3261) for a user agent server, sans-IO: bytes and a clock in, events and bytes out.

`parse_message()` / `SipMessage.serialize()` handle the wire format; `UasCore` keeps the
server transactions (retransmissions, RFC 3261 §17.2 with the RFC 6026 "accepted" state) and
dialogs (§12). The core answers what needs no application decision itself (OPTIONS, BYE,
CANCEL, ACK, 481/405/400/420) and reports INVITEs as `InviteReceived`, which the application
answers with `UasCore.respond()`. Transports call `receive()`, `handle_timers()` and drain
`outgoing()`; nothing here reads a clock or touches a socket.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

SIP_VERSION = "SIP/2.0"
MAGIC_COOKIE = "z9hG4bK"
MAX_HEADERS = 256
MAX_HEADER_BYTES = 32 * 1024
MAX_BODY_BYTES = 256 * 1024
# Transactions live up to 64*T1 after their answer: this bounds what a request flood can hold.
MAX_TRANSACTIONS = 20_000

# RFC 3261 §17.1.1.1 and table 4.
T1 = 0.5
T2 = 4.0
T4 = 5.0

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

    def __init__(self, message: str, reason: str = "malformed") -> None:
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
        raise SipParseError(f"Via {value!r} does not start with SIP/2.0/<transport>", "bad_via")
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
        raise SipParseError(f"Via {value!r} has no sent-by host", "bad_via")
    return Via(parts[2].strip().upper(), host, port, parse_params(params))


def _port(text: str, value: str) -> int:
    if not text.strip().isdigit() or not 0 < int(text) < 65536:
        raise SipParseError(f"Via {value!r} has port {text!r}, expected 1-65535", "bad_via")
    return int(text)


def parse_cseq(value: str) -> tuple[int, str]:
    number, _, method = value.strip().partition(" ")
    method = method.strip()
    if not number.isdigit() or len(number) > 10 or not _TOKEN.match(method or " "):
        raise SipParseError(f"CSeq {value!r} is not '<number> <method>'", "bad_cseq")
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
        raise SipParseError(f"header section of {len(head)} bytes exceeds {MAX_HEADER_BYTES}", "too_large")
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SipParseError(f"header bytes are not UTF-8 at offset {exc.start}", "not_utf8") from None
    raw_lines = text.replace("\r\n", "\n").split("\n")
    while raw_lines and not raw_lines[0].strip():
        raw_lines.pop(0)  # RFC 3261 §7.5: ignore CRLFs before the start line
    if not raw_lines:
        raise SipParseError("empty message", "empty")
    lines: list[str] = []
    for line in raw_lines[1:]:
        if line[:1] in (" ", "\t") and lines:
            lines[-1] += " " + line.strip()  # header folding
        else:
            lines.append(line)
    if len(lines) > MAX_HEADERS:
        raise SipParseError(f"{len(lines)} header lines exceed {MAX_HEADERS}", "too_many_headers")
    headers = Headers()
    for line in lines:
        if not line.strip():
            continue
        name, colon, value = line.partition(":")
        name = name.strip()
        if not colon or not _TOKEN.match(name):
            raise SipParseError(f"header line {line[:80]!r} is not 'Name: value'", "bad_header")
        headers.items.append((name, value.strip()))
    length_text = headers.get("content-length")
    if length_text is not None:
        if not length_text.isdigit() or len(length_text) > 9:
            raise SipParseError(f"Content-Length {length_text!r} is not a number", "bad_content_length")
        length = int(length_text)
        if length > len(body):
            raise SipParseError(
                f"Content-Length {length} but only {len(body)} body bytes arrived", "truncated"
            )
        body = body[:length]
    elif stream:
        raise SipParseError("Content-Length is required on stream transports", "bad_content_length")
    if len(body) > MAX_BODY_BYTES:
        raise SipParseError(f"body of {len(body)} bytes exceeds {MAX_BODY_BYTES}", "too_large")
    start = raw_lines[0].strip()
    if start.startswith("SIP/"):
        match = _STATUS_LINE.match(start)
        if not match:
            raise SipParseError(
                f"status line {start[:80]!r} is not 'SIP/2.0 <code> <reason>'", "bad_start_line"
            )
        return SipResponse(headers, body, status=int(match.group(1)), reason=match.group(2))
    parts = start.split(" ")
    if len(parts) != 3 or parts[2] != SIP_VERSION or not _TOKEN.match(parts[0]) or not parts[1]:
        raise SipParseError(f"request line {start[:80]!r} is not '<METHOD> <URI> SIP/2.0'", "bad_start_line")
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
                    raise SipParseError("no end of headers within the header size limit", "too_large")
                return messages
            head = bytes(self._buffer[:end])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() in (b"content-length", b"l"):
                    text = value.strip()
                    if not text.isdigit() or len(text) > 9:
                        raise SipParseError(f"Content-Length {text!r} is not a number", "bad_content_length")
                    length = int(text)
            total = end + 4 + length
            if total > self._max:
                raise SipParseError(f"message of {total} bytes exceeds {self._max}", "too_large")
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


# --- events -------------------------------------------------------------------------------


@dataclass(frozen=True)
class InviteReceived:
    """An INVITE for the application to answer with `UasCore.respond(txn_id, ...)`.
    `dialog_id` is None for a new call and set for a re-INVITE."""

    txn_id: str
    request: SipRequest
    peer: Peer
    dialog_id: str | None


@dataclass(frozen=True)
class AckReceived:
    dialog_id: str
    request: SipRequest


@dataclass(frozen=True)
class InviteCancelled:
    """CANCEL arrived before the final response: the core already sent 487."""

    txn_id: str


@dataclass(frozen=True)
class DialogEnded:
    dialog_id: str
    reason: str  # "bye" | "no_ack"


@dataclass(frozen=True)
class MessageDropped:
    reason: str
    detail: str


SipEvent = InviteReceived | AckReceived | InviteCancelled | DialogEnded | MessageDropped


# --- transactions and dialogs --------------------------------------------------------------


@dataclass
class _ServerTransaction:
    txn_id: str
    key: tuple[str, ...]
    request: SipRequest
    peer: Peer
    to_tag: str
    dialog_id: str | None
    last_response: bytes | None = None
    final_status: int | None = None
    retransmit_at: float | None = None
    interval: float = T1
    expires_at: float | None = None
    acked: bool = False

    @property
    def is_invite(self) -> bool:
        return self.request.method == "INVITE"


@dataclass
class Dialog:
    dialog_id: str
    call_id: str
    local_tag: str
    remote_tag: str
    peer: Peer
    remote_target: str
    local_uri: str
    remote_uri: str
    remote_cseq: int
    local_cseq: int = 0
    confirmed: bool = False
    # A 2xx to an INVITE waits here for its ACK (RFC 3261 §13.3.1.4).
    pending_2xx: bytes | None = None
    pending_cseq: int = 0
    retransmit_at: float | None = None
    interval: float = T1
    give_up_at: float | None = None
    invite_in_progress: str | None = None


def transaction_key(request: SipRequest, method: str | None = None) -> tuple[str, ...]:
    """RFC 3261 §17.2.3 matching: branch + sent-by + method (ACK matches its INVITE), with
    the RFC 2543 fallback for branches without the magic cookie."""
    vias = request.headers.values("via")
    if not vias:
        raise SipParseError("request has no Via", "no_via")
    via = parse_via(vias[0])
    method = method or ("INVITE" if request.method == "ACK" else request.method)
    if via.branch.startswith(MAGIC_COOKIE):
        return ("3261", via.branch, via.sent_by, method)
    from_tag = parse_name_addr(request.headers.get("from") or "").tag
    return ("2543", request.call_id, from_tag, str(request.cseq[0]), vias[0], method)


def new_tag() -> str:
    return secrets.token_hex(8)


class UasCore:
    def __init__(
        self,
        contact: str,
        user_agent: str = "callscribe",
        supported: Iterable[str] = SUPPORTED_EXTENSIONS,
        accept: str = "application/sdp",
    ) -> None:
        self.contact = contact
        self.user_agent = user_agent
        self.supported = frozenset(supported)
        self.accept = accept
        self._transactions: dict[tuple[str, ...], _ServerTransaction] = {}
        self._by_id: dict[str, _ServerTransaction] = {}
        self.dialogs: dict[str, Dialog] = {}
        self._outgoing: list[tuple[bytes, Peer]] = []

    # -- input -------------------------------------------------------------------------

    def receive(self, data: bytes, peer: Peer, now: float) -> list[SipEvent]:
        if not data.strip(b"\r\n"):
            return []  # keep-alive
        try:
            message = parse_message(data, stream=peer.reliable)
        except SipParseError as exc:
            self._reply_bad_request(data, peer, exc)
            return [MessageDropped(exc.reason, str(exc))]
        if isinstance(message, SipResponse):
            # We send no requests that expect answers we track (our BYEs are fire-and-forget).
            return [MessageDropped("unexpected_response", f"{message.status} {message.reason}")]
        try:
            self._check_request(message)
            return self._receive_request(message, peer, now)
        except SipParseError as exc:
            if message.method != "ACK" and message.headers.get("via"):
                self._send(build_response(message, 400, f"Bad Request ({exc})"[:120]), peer)
            return [MessageDropped(exc.reason, str(exc))]

    def _reply_bad_request(self, data: bytes, peer: Peer, error: SipParseError) -> None:
        """A 400 when enough of the request survived to address a response, else nothing."""
        if error.reason in ("truncated", "bad_content_length"):
            try:
                head = data.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
                request = parse_message(head)
            except SipParseError:
                return
            if isinstance(request, SipRequest) and request.method != "ACK" and request.headers.get("via"):
                self._send(build_response(request, 400, f"Bad Request ({error.reason})"), peer)

    def _send(self, response: SipResponse, peer: Peer) -> None:
        """A response outside any transaction (400 to a request we could not accept)."""
        response.headers.add("User-Agent", self.user_agent)
        self._outgoing.append((response.serialize(), peer))

    @staticmethod
    def _check_request(request: SipRequest) -> None:
        for name in ("via", "from", "to", "call-id", "cseq"):
            if not request.headers.get(name):
                raise SipParseError(
                    f"request lacks the mandatory {canonical_name(name)} header", "missing_header"
                )
        method = request.cseq[1]
        if method != request.method:
            raise SipParseError(
                f"CSeq method {method} differs from request method {request.method}", "bad_cseq"
            )
        parse_via(request.headers.values("via")[0])
        parse_name_addr(request.headers.get("from") or "")
        parse_name_addr(request.headers.get("to") or "")

    def _receive_request(self, request: SipRequest, peer: Peer, now: float) -> list[SipEvent]:
        method = request.method
        if len(self._transactions) >= MAX_TRANSACTIONS and method != "ACK":
            return [MessageDropped("overload", f"{len(self._transactions)} transactions open")]
        if method == "ACK":
            return self._receive_ack(request, now)
        key = transaction_key(request)
        txn = self._transactions.get(key)
        if txn is not None:
            # A retransmission: repeat our last response, if any (RFC 3261 §17.2.1, §17.2.2).
            if txn.last_response is not None:
                self._outgoing.append((txn.last_response, peer))
            return []
        if method == "CANCEL":
            return self._receive_cancel(request, peer, now)
        to_tag = parse_name_addr(request.headers.get("to") or "").tag
        dialog: Dialog | None = None
        if to_tag:
            dialog = self._find_dialog(request)
            if dialog is None or dialog.local_tag != to_tag:
                self._start(request, peer, now, to_tag="", dialog_id=None)
                self.respond_key(key, 481, now=now)
                return []
            if request.cseq[0] < dialog.remote_cseq:
                self._start(request, peer, now, to_tag=to_tag, dialog_id=dialog.dialog_id)
                self.respond_key(key, 500, "Server Internal Error (CSeq out of order)", now=now)
                return []
            dialog.remote_cseq = request.cseq[0]
        unsupported = [opt for opt in request.headers.values("require") if opt.lower() not in self.supported]
        if method not in ALLOWED_METHODS:
            txn = self._start(request, peer, now, to_tag or new_tag(), dialog.dialog_id if dialog else None)
            self.respond(txn.txn_id, 405, headers=[("Allow", ", ".join(ALLOWED_METHODS))], now=now)
            return []
        if unsupported and method not in ("BYE", "CANCEL"):
            txn = self._start(request, peer, now, to_tag or new_tag(), None)
            self.respond(txn.txn_id, 420, headers=[("Unsupported", ", ".join(unsupported))], now=now)
            return []
        if method == "OPTIONS":
            txn = self._start(request, peer, now, to_tag or new_tag(), None)
            self.respond(
                txn.txn_id,
                200,
                headers=[
                    ("Allow", ", ".join(ALLOWED_METHODS)),
                    ("Accept", self.accept),
                    ("Supported", ", ".join(sorted(self.supported))),
                ],
                now=now,
            )
            return []
        if method == "BYE":
            if dialog is None:
                txn = self._start(request, peer, now, "", None)
                self.respond(txn.txn_id, 481, now=now)
                return []
            txn = self._start(request, peer, now, dialog.local_tag, dialog.dialog_id)
            self.respond(txn.txn_id, 200, now=now)
            self._end_dialog(dialog)
            return [DialogEnded(dialog.dialog_id, "bye")]
        if method == "UPDATE":
            # Session changes without an offer (session-timer refreshes) are accepted as they are.
            txn = self._start(request, peer, now, to_tag or new_tag(), dialog.dialog_id if dialog else None)
            if dialog is None:
                self.respond(txn.txn_id, 481, now=now)
            elif request.body:
                self.respond(txn.txn_id, 488, "Not Acceptable Here (offers in UPDATE unsupported)", now=now)
            else:
                self.respond(txn.txn_id, 200, now=now)
            return []
        # INVITE
        if dialog is not None and (dialog.invite_in_progress or dialog.pending_2xx is not None):
            # RFC 3261 §14.2: a second offer while one is open.
            txn = self._start(request, peer, now, dialog.local_tag, dialog.dialog_id)
            self.respond(txn.txn_id, 500, headers=[("Retry-After", "1")], now=now)
            return []
        txn = self._start(request, peer, now, to_tag or new_tag(), dialog.dialog_id if dialog else None)
        if dialog is not None:
            dialog.invite_in_progress = txn.txn_id
        self.respond(txn.txn_id, 100, now=now)
        return [InviteReceived(txn.txn_id, request, peer, txn.dialog_id)]

    def _receive_ack(self, request: SipRequest, now: float) -> list[SipEvent]:
        try:
            txn = self._transactions.get(transaction_key(request))
        except SipParseError:
            txn = None
        if txn is not None and txn.is_invite and txn.final_status is not None and txn.final_status >= 300:
            # ACK of a non-2xx final: stop retransmitting, absorb copies for T4 (Timer I).
            txn.acked = True
            txn.retransmit_at = None
            txn.expires_at = now + (0 if txn.peer.reliable else T4)
            return []
        dialog = self._find_dialog(request)
        if dialog is None:
            return [MessageDropped("ack_without_dialog", f"ACK for Call-ID {request.call_id!r}")]
        if dialog.pending_2xx is not None and request.cseq[0] == dialog.pending_cseq:
            dialog.pending_2xx = None
            dialog.retransmit_at = None
            dialog.give_up_at = None
            dialog.confirmed = True
            return [AckReceived(dialog.dialog_id, request)]
        return []  # a retransmitted ACK

    def _receive_cancel(self, request: SipRequest, peer: Peer, now: float) -> list[SipEvent]:
        invite = self._transactions.get(transaction_key(request, method="INVITE"))
        to_tag = invite.to_tag if invite else ""
        txn = self._start(request, peer, now, to_tag, None)
        if invite is None:
            self.respond(txn.txn_id, 481, now=now)
            return []
        self.respond(txn.txn_id, 200, now=now)
        if invite.final_status is not None:
            return []  # too late: the INVITE already has its answer (RFC 3261 §9.2)
        self.respond(invite.txn_id, 487, now=now)
        return [InviteCancelled(invite.txn_id)]

    def _find_dialog(self, request: SipRequest) -> Dialog | None:
        local = parse_name_addr(request.headers.get("to") or "").tag
        remote = parse_name_addr(request.headers.get("from") or "").tag
        return self.dialogs.get(dialog_key(request.call_id, local, remote))

    def _start(
        self, request: SipRequest, peer: Peer, now: float, to_tag: str, dialog_id: str | None
    ) -> _ServerTransaction:
        key = transaction_key(request)
        txn = _ServerTransaction(secrets.token_hex(8), key, request, peer, to_tag, dialog_id)
        # Timer H / J analogue: a transaction nobody answers still goes away.
        txn.expires_at = now + 64 * T1 + 300
        self._transactions[key] = txn
        self._by_id[txn.txn_id] = txn
        return txn

    # -- output ------------------------------------------------------------------------

    def pending(self, txn_id: str) -> bool:
        """True while the INVITE transaction still waits for its final response."""
        txn = self._by_id.get(txn_id)
        return txn is not None and txn.final_status is None

    def request_of(self, txn_id: str) -> SipRequest | None:
        txn = self._by_id.get(txn_id)
        return txn.request if txn else None

    def respond(
        self,
        txn_id: str,
        status: int,
        reason: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        content_type: str | None = None,
        now: float = 0.0,
    ) -> str | None:
        """Send a response within a server transaction; returns the dialog id a 2xx to an
        INVITE creates or refreshes. Raises KeyError for an unknown or finished transaction."""
        txn = self._by_id.get(txn_id)
        if txn is None:
            raise KeyError(f"no server transaction {txn_id!r}")
        if txn.final_status is not None:
            raise KeyError(f"transaction {txn_id!r} already has final response {txn.final_status}")
        extra = list(headers)
        extra.append(("User-Agent", self.user_agent))
        if status >= 200 and txn.is_invite and status < 300:
            extra.append(("Contact", self.contact))
            extra.append(("Allow", ", ".join(ALLOWED_METHODS)))
            extra.append(("Supported", ", ".join(sorted(self.supported))))
        if content_type and body:
            extra.append(("Content-Type", content_type))
        to_tag = txn.to_tag if status > 100 else ""
        response = build_response(txn.request, status, reason, extra, body, to_tag)
        self._add_received(response, txn.peer)
        data = response.serialize()
        txn.last_response = data
        self._outgoing.append((data, txn.peer))
        if status < 200:
            return None
        txn.final_status = status
        dialog_id: str | None = None
        if txn.is_invite:
            dialog_id = self._invite_final(txn, status, data, now)
        elif not txn.peer.reliable:
            txn.expires_at = now + 64 * T1  # Timer J
        else:
            txn.expires_at = now
        return dialog_id

    def respond_key(
        self, key: tuple[str, ...], status: int, reason: str | None = None, now: float = 0.0
    ) -> None:
        self.respond(self._transactions[key].txn_id, status, reason, now=now)

    def _invite_final(self, txn: _ServerTransaction, status: int, data: bytes, now: float) -> str | None:
        existing = self.dialogs.get(txn.dialog_id or "")
        if existing is not None:
            existing.invite_in_progress = None
        if status >= 300:
            if not txn.peer.reliable:
                txn.retransmit_at = now + T1  # Timer G
                txn.interval = T1
            txn.expires_at = now + 64 * T1  # Timer H
            return None
        # 2xx: the transaction only absorbs INVITE retransmissions (RFC 6026 "Accepted");
        # the dialog retransmits the 2xx until the ACK arrives.
        txn.expires_at = now + 64 * T1
        dialog = existing or self._create_dialog(txn)
        dialog.pending_2xx = data
        dialog.pending_cseq = txn.request.cseq[0]
        dialog.peer = txn.peer
        dialog.interval = T1
        dialog.retransmit_at = None if txn.peer.reliable else now + T1
        dialog.give_up_at = now + 64 * T1
        return dialog.dialog_id

    def _create_dialog(self, txn: _ServerTransaction) -> Dialog:
        request = txn.request
        remote = parse_name_addr(request.headers.get("from") or "")
        contacts = request.headers.values("contact")
        target = parse_name_addr(contacts[0]).uri if contacts else remote.uri
        dialog = Dialog(
            dialog_id=dialog_key(request.call_id, txn.to_tag, remote.tag),
            call_id=request.call_id,
            local_tag=txn.to_tag,
            remote_tag=remote.tag,
            peer=txn.peer,
            remote_target=target,
            local_uri=parse_name_addr(request.headers.get("to") or "").uri,
            remote_uri=remote.uri,
            remote_cseq=request.cseq[0],
        )
        self.dialogs[dialog.dialog_id] = dialog
        return dialog

    def _add_received(self, response: SipResponse, peer: Peer) -> None:
        """RFC 3581 rport / RFC 3261 §18.2.1 received on the top Via of a response."""
        vias = response.headers.get_all("via")
        if not vias or peer.reliable:
            return
        top, sep, rest = vias[0].partition(",")
        if ";rport" in top and "rport=" not in top:
            top = top.replace(";rport", f";rport={peer.port}", 1)
            if "received=" not in top:
                top += f";received={peer.host}"
        items = [(n, v) for n, v in response.headers.items if response.headers._key(n) != "via"]
        first = top + (sep + rest if sep else "")
        response.headers.items = [("Via", first)] + [("Via", v) for v in vias[1:]] + items

    def end_dialog(self, dialog_id: str) -> None:
        """Send BYE (fire-and-forget) and forget the dialog: the application hangs up."""
        dialog = self.dialogs.get(dialog_id)
        if dialog is None:
            return
        dialog.local_cseq = max(dialog.local_cseq, 1) + 1
        headers = Headers()
        branch = MAGIC_COOKIE + secrets.token_hex(8)
        headers.add("Via", f"SIP/2.0/{dialog.peer.transport.upper()} {self._contact_host()};branch={branch}")
        headers.add("Max-Forwards", "70")
        headers.add("From", f"<{dialog.local_uri}>;tag={dialog.local_tag}")
        headers.add("To", f"<{dialog.remote_uri}>;tag={dialog.remote_tag}")
        headers.add("Call-ID", dialog.call_id)
        headers.add("CSeq", f"{dialog.local_cseq} BYE")
        headers.add("User-Agent", self.user_agent)
        bye = SipRequest(headers, b"", method="BYE", uri=dialog.remote_target)
        self._outgoing.append((bye.serialize(), dialog.peer))
        self._end_dialog(dialog)

    def _contact_host(self) -> str:
        uri = parse_name_addr(self.contact).uri
        return uri.split("@", 1)[-1].split(";", 1)[0]

    def _end_dialog(self, dialog: Dialog) -> None:
        self.dialogs.pop(dialog.dialog_id, None)

    def outgoing(self) -> list[tuple[bytes, Peer]]:
        """Messages to send, in order; the transport calls this after every input."""
        out, self._outgoing = self._outgoing, []
        return out

    # -- timers ------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        times = [
            t
            for txn in self._transactions.values()
            for t in (txn.retransmit_at, txn.expires_at)
            if t is not None
        ]
        times += [t for d in self.dialogs.values() for t in (d.retransmit_at, d.give_up_at) if t is not None]
        return min(times) if times else None

    def handle_timers(self, now: float) -> list[SipEvent]:
        events: list[SipEvent] = []
        for key, txn in list(self._transactions.items()):
            if txn.retransmit_at is not None and now >= txn.retransmit_at and txn.last_response:
                self._outgoing.append((txn.last_response, txn.peer))
                txn.interval = min(txn.interval * 2, T2)
                txn.retransmit_at = max(txn.retransmit_at + txn.interval, now)
            if txn.expires_at is not None and now >= txn.expires_at:
                del self._transactions[key]
                self._by_id.pop(txn.txn_id, None)
        for dialog in list(self.dialogs.values()):
            if dialog.give_up_at is not None and now >= dialog.give_up_at:
                # RFC 3261 §13.3.1.4: no ACK within 64*T1 → end the session with BYE.
                self.end_dialog(dialog.dialog_id)
                events.append(DialogEnded(dialog.dialog_id, "no_ack"))
            elif dialog.retransmit_at is not None and now >= dialog.retransmit_at and dialog.pending_2xx:
                self._outgoing.append((dialog.pending_2xx, dialog.peer))
                dialog.interval = min(dialog.interval * 2, T2)
                dialog.retransmit_at = max(dialog.retransmit_at + dialog.interval, now)
        return events


def dialog_key(call_id: str, local_tag: str, remote_tag: str) -> str:
    return f"{call_id};{local_tag};{remote_tag}"
