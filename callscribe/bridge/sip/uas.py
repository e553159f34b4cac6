"""SIP (RFC 3261) user agent server core, sans-IO: bytes and a clock in, events and bytes out.

`UasCore` keeps the server transactions (RFC 3261 §17.2 with the RFC 6026 Accepted state,
an explicit state machine) and dialogs (§12). It answers what needs no application decision
itself (OPTIONS, BYE, CANCEL, ACK, 481/405/400/420) and reports INVITEs as `InviteReceived`,
which the application answers with `UasCore.respond()`. Transports call `receive()`, drain
`outgoing()`, and set one timer for `next_deadline()` that calls `handle_timers()`; every
deadline sits in a heap, so neither costs more than a few entries however many transactions
are open. Nothing here reads a clock or touches a socket.
"""

from __future__ import annotations

import heapq
import itertools
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import ClassVar

from callscribe.bridge.events import Dropped, DropReason
from callscribe.bridge.sip.events import (
    AckReceived,
    DialogEnded,
    DialogEndReason,
    InviteCancelled,
    InviteReceived,
    SipEvent,
)
from callscribe.bridge.sip.message import (
    ALLOWED_METHODS,
    MAGIC_COOKIE,
    SUPPORTED_EXTENSIONS,
    Headers,
    Peer,
    SipParseError,
    SipRequest,
    SipResponse,
    build_response,
    canonical_name,
    parse_message,
    parse_name_addr,
    parse_via,
)

# Transactions live up to 64*T1 after their answer: this bounds what a request flood can hold.
MAX_TRANSACTIONS = 20_000

# RFC 3261 §17.1.1.1 and table 4.
T1 = 0.5
T2 = 4.0
T4 = 5.0
# A transaction nobody answers still goes away (Timer H/J analogue for the application).
UNANSWERED_SEC = 64 * T1 + 300


class TxnState(Enum):
    """RFC 3261 §17.2.1 (INVITE) and §17.2.2 (non-INVITE) server transaction states, with
    RFC 6026 §7.1 Accepted (a 2xx was sent; the transaction absorbs INVITE retransmissions
    while the dialog retransmits the 2xx)."""

    TRYING = "trying"  # non-INVITE, nothing sent yet
    PROCEEDING = "proceeding"  # a provisional response sent (INVITE: our 100 Trying)
    ACCEPTED = "accepted"  # INVITE, 2xx sent
    COMPLETED = "completed"  # final sent (INVITE: 3xx-6xx retransmitted until the ACK)
    CONFIRMED = "confirmed"  # INVITE, ACK of the 3xx-6xx received: absorb copies for T4
    TERMINATED = "terminated"


class TransactionStateError(KeyError):
    """A response or input the transaction's state does not allow (a caller's bug)."""


_INVITE_TRANSITIONS: dict[TxnState, frozenset[TxnState]] = {
    TxnState.PROCEEDING: frozenset(
        {TxnState.PROCEEDING, TxnState.ACCEPTED, TxnState.COMPLETED, TxnState.TERMINATED}
    ),
    TxnState.ACCEPTED: frozenset({TxnState.TERMINATED}),
    TxnState.COMPLETED: frozenset({TxnState.CONFIRMED, TxnState.TERMINATED}),
    TxnState.CONFIRMED: frozenset({TxnState.TERMINATED}),
    TxnState.TERMINATED: frozenset(),
}
_NON_INVITE_TRANSITIONS: dict[TxnState, frozenset[TxnState]] = {
    TxnState.TRYING: frozenset({TxnState.PROCEEDING, TxnState.COMPLETED, TxnState.TERMINATED}),
    TxnState.PROCEEDING: frozenset({TxnState.PROCEEDING, TxnState.COMPLETED, TxnState.TERMINATED}),
    TxnState.COMPLETED: frozenset({TxnState.TERMINATED}),
    TxnState.TERMINATED: frozenset(),
}
WAITING = frozenset({TxnState.TRYING, TxnState.PROCEEDING})  # no final response yet


@dataclass
class _ServerTransaction:
    txn_id: str
    key: tuple[str, ...]
    request: SipRequest
    peer: Peer
    to_tag: str
    dialog_id: str | None
    state: TxnState = TxnState.TRYING
    last_response: bytes | None = None
    final_status: int | None = None
    retransmit_at: float | None = None  # Timer G
    interval: float = T1
    expires_at: float | None = None  # Timers H, I, J

    @property
    def is_invite(self) -> bool:
        return self.request.method == "INVITE"

    def move(self, to: TxnState) -> None:
        table = _INVITE_TRANSITIONS if self.is_invite else _NON_INVITE_TRANSITIONS
        if to not in table.get(self.state, frozenset()):
            raise TransactionStateError(
                f"{self.request.method} transaction {self.txn_id!r}: {self.state.value} → {to.value} "
                f"is not a transition of RFC 3261 §17.2"
            )
        self.state = to


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


@dataclass(order=True)
class _Deadline:
    """A heap entry. Entries are never removed early: one whose owner moved its deadline (or
    went away) is skipped when it comes up (lazy invalidation, as in asyncio's own timers)."""

    when: float
    order: int
    owner: _ServerTransaction | Dialog = field(compare=False)
    timer: str = field(compare=False)  # the owner's attribute holding the deadline


def transaction_key(request: SipRequest, method: str | None = None) -> tuple[str, ...]:
    """RFC 3261 §17.2.3 matching: branch + sent-by + method (ACK matches its INVITE), with
    the RFC 2543 fallback for branches without the magic cookie."""
    vias = request.headers.values("via")
    if not vias:
        raise SipParseError("request has no Via", DropReason.NO_VIA)
    via = parse_via(vias[0])
    method = method or ("INVITE" if request.method == "ACK" else request.method)
    if via.branch.startswith(MAGIC_COOKIE):
        return ("3261", via.branch, via.sent_by, method)
    from_tag = parse_name_addr(request.headers.get("from") or "").tag
    return ("2543", request.call_id, from_tag, str(request.cseq[0]), vias[0], method)


def new_tag() -> str:
    return secrets.token_hex(8)


_Handler = Callable[["UasCore", SipRequest, Peer, float, "Dialog | None", str], list[SipEvent]]


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
        self._deadlines: list[_Deadline] = []
        self._order = itertools.count()

    # -- input -------------------------------------------------------------------------

    def receive(self, data: bytes, peer: Peer, now: float) -> list[SipEvent]:
        if not data.strip(b"\r\n"):
            return []  # keep-alive
        try:
            message = parse_message(data, stream=peer.reliable)
        except SipParseError as exc:
            self._reply_bad_request(data, peer, exc)
            return [Dropped(exc.reason, str(exc))]
        if isinstance(message, SipResponse):
            # We send no requests that expect answers we track (our BYEs are fire-and-forget).
            return [Dropped(DropReason.UNEXPECTED_RESPONSE, f"{message.status} {message.reason}")]
        try:
            self._check_request(message)
            return self._receive_request(message, peer, now)
        except SipParseError as exc:
            if message.method != "ACK" and message.headers.get("via"):
                self._send(build_response(message, 400, f"Bad Request ({exc})"[:120]), peer)
            return [Dropped(exc.reason, str(exc))]

    def _reply_bad_request(self, data: bytes, peer: Peer, error: SipParseError) -> None:
        """A 400 when enough of the request survived to address a response, else nothing."""
        if error.reason in (DropReason.TRUNCATED, DropReason.BAD_CONTENT_LENGTH):
            # RFC 3261 §18.3: a UDP request shorter than its Content-Length SHOULD get a 400.
            # The header section is read again without the Content-Length that failed it
            # (re-parsing it with that header would fail the same way, and nothing be sent).
            head = data.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
            kept = [line for line in head.split(b"\n") if not _is_content_length(line)]
            try:
                request = parse_message(b"\n".join(kept) + b"\r\n\r\n")
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
                    f"request lacks the mandatory {canonical_name(name)} header", DropReason.MISSING_HEADER
                )
        method = request.cseq[1]
        if method != request.method:
            raise SipParseError(
                f"CSeq method {method} differs from request method {request.method}", DropReason.BAD_CSEQ
            )
        parse_via(request.headers.values("via")[0])
        parse_name_addr(request.headers.get("from") or "")
        parse_name_addr(request.headers.get("to") or "")

    def _receive_request(self, request: SipRequest, peer: Peer, now: float) -> list[SipEvent]:
        method = request.method
        if len(self._transactions) >= MAX_TRANSACTIONS and method != "ACK":
            return [Dropped(DropReason.OVERLOAD, f"{len(self._transactions)} transactions open")]
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
                txn = self._start(request, peer, now, to_tag="", dialog_id=None)
                self.respond(txn.txn_id, 481, now=now)
                return []
            if request.cseq[0] < dialog.remote_cseq:
                txn = self._start(request, peer, now, to_tag=to_tag, dialog_id=dialog.dialog_id)
                self.respond(txn.txn_id, 500, "Server Internal Error (CSeq out of order)", now=now)
                return []
            dialog.remote_cseq = request.cseq[0]
        handler = self._HANDLERS.get(method)
        if handler is None:
            txn = self._start(request, peer, now, to_tag or new_tag(), dialog.dialog_id if dialog else None)
            self.respond(txn.txn_id, 405, headers=[("Allow", ", ".join(ALLOWED_METHODS))], now=now)
            return []
        unsupported = [opt for opt in request.headers.values("require") if opt.lower() not in self.supported]
        if unsupported and method not in ("BYE", "CANCEL"):
            txn = self._start(request, peer, now, to_tag or new_tag(), None)
            self.respond(txn.txn_id, 420, headers=[("Unsupported", ", ".join(unsupported))], now=now)
            return []
        return handler(self, request, peer, now, dialog, to_tag)

    def _receive_options(
        self, request: SipRequest, peer: Peer, now: float, dialog: Dialog | None, to_tag: str
    ) -> list[SipEvent]:
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

    def _receive_bye(
        self, request: SipRequest, peer: Peer, now: float, dialog: Dialog | None, to_tag: str
    ) -> list[SipEvent]:
        if dialog is None:
            txn = self._start(request, peer, now, "", None)
            self.respond(txn.txn_id, 481, now=now)
            return []
        txn = self._start(request, peer, now, dialog.local_tag, dialog.dialog_id)
        self.respond(txn.txn_id, 200, now=now)
        self._end_dialog(dialog)
        return [DialogEnded(dialog.dialog_id, DialogEndReason.BYE)]

    def _receive_update(
        self, request: SipRequest, peer: Peer, now: float, dialog: Dialog | None, to_tag: str
    ) -> list[SipEvent]:
        # Session changes without an offer (session-timer refreshes) are accepted as they are.
        txn = self._start(request, peer, now, to_tag or new_tag(), dialog.dialog_id if dialog else None)
        if dialog is None:
            self.respond(txn.txn_id, 481, now=now)
        elif request.body:
            self.respond(txn.txn_id, 488, "Not Acceptable Here (offers in UPDATE unsupported)", now=now)
        else:
            self.respond(txn.txn_id, 200, now=now)
        return []

    def _receive_invite(
        self, request: SipRequest, peer: Peer, now: float, dialog: Dialog | None, to_tag: str
    ) -> list[SipEvent]:
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

    # ACK and CANCEL are matched to the INVITE before any dialog check (see _receive_request).
    _HANDLERS: ClassVar[dict[str, _Handler]] = {
        "OPTIONS": _receive_options,
        "BYE": _receive_bye,
        "UPDATE": _receive_update,
        "INVITE": _receive_invite,
    }

    def _receive_ack(self, request: SipRequest, now: float) -> list[SipEvent]:
        try:
            txn = self._transactions.get(transaction_key(request))
        except SipParseError:
            txn = None
        if txn is not None and txn.is_invite and txn.state is TxnState.CONFIRMED:
            return []  # a copy of the ACK, absorbed while Timer I runs
        if txn is not None and txn.is_invite and txn.state is TxnState.COMPLETED:
            # ACK of a non-2xx final: stop retransmitting, absorb copies for T4 (Timer I).
            txn.move(TxnState.CONFIRMED)
            txn.retransmit_at = None
            self._set(txn, "expires_at", now + (0 if txn.peer.reliable else T4))
            return []
        dialog = self._find_dialog(request)
        if dialog is None:
            return [Dropped(DropReason.ACK_WITHOUT_DIALOG, f"ACK for Call-ID {request.call_id!r}")]
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
        if invite.state not in WAITING:
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
        if txn.is_invite:
            txn.state = TxnState.PROCEEDING  # RFC 3261 §17.2.1: an INVITE transaction starts there
        self._transactions[key] = txn
        self._by_id[txn.txn_id] = txn
        self._set(txn, "expires_at", now + UNANSWERED_SEC)
        return txn

    # -- output ------------------------------------------------------------------------

    def pending(self, txn_id: str) -> bool:
        """True while the INVITE transaction still waits for its final response."""
        txn = self._by_id.get(txn_id)
        return txn is not None and txn.state in WAITING

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
        *,
        now: float,
    ) -> str | None:
        """Send a response within a server transaction; returns the dialog id a 2xx to an
        INVITE creates or refreshes. Raises KeyError for an unknown transaction and
        TransactionStateError (a KeyError) for one that already has its final response."""
        txn = self._by_id.get(txn_id)
        if txn is None:
            raise KeyError(f"no server transaction {txn_id!r}")
        if txn.state not in WAITING:
            raise TransactionStateError(
                f"transaction {txn_id!r} already has final response {txn.final_status} ({txn.state.value})"
            )
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
            txn.move(TxnState.PROCEEDING)
            return None
        txn.final_status = status
        if txn.is_invite:
            return self._invite_final(txn, status, data, now)
        txn.move(TxnState.COMPLETED)
        # Timer J: absorb request retransmissions over UDP; nothing to absorb over TCP.
        self._set(txn, "expires_at", now + (0 if txn.peer.reliable else 64 * T1))
        return None

    def _invite_final(self, txn: _ServerTransaction, status: int, data: bytes, now: float) -> str | None:
        existing = self.dialogs.get(txn.dialog_id or "")
        if existing is not None:
            existing.invite_in_progress = None
        if status >= 300:
            txn.move(TxnState.COMPLETED)
            if not txn.peer.reliable:
                txn.interval = T1
                self._set(txn, "retransmit_at", now + T1)  # Timer G
            self._set(txn, "expires_at", now + 64 * T1)  # Timer H
            return None
        # 2xx: the transaction only absorbs INVITE retransmissions (RFC 6026 Accepted, Timer L);
        # the dialog retransmits the 2xx until the ACK arrives.
        txn.move(TxnState.ACCEPTED)
        self._set(txn, "expires_at", now + 64 * T1)
        dialog = existing or self._create_dialog(txn)
        dialog.pending_2xx = data
        dialog.pending_cseq = txn.request.cseq[0]
        dialog.peer = txn.peer
        dialog.interval = T1
        if txn.peer.reliable:
            dialog.retransmit_at = None
        else:
            self._set(dialog, "retransmit_at", now + T1)
        self._set(dialog, "give_up_at", now + 64 * T1)
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

    def _set(self, owner: _ServerTransaction | Dialog, timer: str, when: float) -> None:
        setattr(owner, timer, when)
        heapq.heappush(self._deadlines, _Deadline(when, next(self._order), owner, timer))
        # Superseded entries wait for their time to come up; under a request flood they could
        # outnumber the live ones, so the heap is rebuilt when they do (amortised O(1)).
        if len(self._deadlines) > 4 * (len(self._transactions) + len(self.dialogs)) + 4096:
            self._deadlines = [entry for entry in self._deadlines if self._live(entry)]
            heapq.heapify(self._deadlines)

    def _live(self, entry: _Deadline) -> bool:
        owner = entry.owner
        if getattr(owner, entry.timer) != entry.when:
            return False  # moved or cleared since
        if isinstance(owner, Dialog):
            return self.dialogs.get(owner.dialog_id) is owner
        return self._transactions.get(owner.key) is owner

    def next_deadline(self) -> float | None:
        """When `handle_timers()` next has work (None: nothing pending)."""
        heap = self._deadlines
        while heap and not self._live(heap[0]):
            heapq.heappop(heap)
        return heap[0].when if heap else None

    def handle_timers(self, now: float) -> list[SipEvent]:
        events: list[SipEvent] = []
        heap = self._deadlines
        while heap and heap[0].when <= now:
            entry = heapq.heappop(heap)
            if not self._live(entry):
                continue
            owner = entry.owner
            if isinstance(owner, _ServerTransaction):
                self._transaction_timer(owner, entry.timer, now)
            else:
                events.extend(self._dialog_timer(owner, entry.timer, now))
        return events

    def _transaction_timer(self, txn: _ServerTransaction, timer: str, now: float) -> None:
        if timer == "expires_at":
            txn.move(TxnState.TERMINATED)
            del self._transactions[txn.key]
            self._by_id.pop(txn.txn_id, None)
            return
        assert txn.retransmit_at is not None and txn.last_response is not None
        self._outgoing.append((txn.last_response, txn.peer))  # Timer G
        txn.interval = min(txn.interval * 2, T2)
        self._set(txn, "retransmit_at", max(txn.retransmit_at + txn.interval, now))

    def _dialog_timer(self, dialog: Dialog, timer: str, now: float) -> list[SipEvent]:
        if timer == "give_up_at":
            # RFC 3261 §13.3.1.4: no ACK within 64*T1 → end the session with BYE.
            self.end_dialog(dialog.dialog_id)
            return [DialogEnded(dialog.dialog_id, DialogEndReason.NO_ACK)]
        assert dialog.retransmit_at is not None and dialog.pending_2xx is not None
        self._outgoing.append((dialog.pending_2xx, dialog.peer))
        dialog.interval = min(dialog.interval * 2, T2)
        self._set(dialog, "retransmit_at", max(dialog.retransmit_at + dialog.interval, now))
        return []


def _is_content_length(line: bytes) -> bool:
    name, colon, _ = line.partition(b":")
    return bool(colon) and name.strip().lower() in (b"content-length", b"l")


def dialog_key(call_id: str, local_tag: str, remote_tag: str) -> str:
    return f"{call_id};{local_tag};{remote_tag}"
