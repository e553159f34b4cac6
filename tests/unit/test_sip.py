from __future__ import annotations

import pytest

from callscribe.bridge.events import Dropped
from callscribe.bridge.sip.events import AckReceived, DialogEnded, InviteCancelled, InviteReceived
from callscribe.bridge.sip.message import (
    Peer,
    SipParseError,
    SipRequest,
    SipResponse,
    StreamFramer,
    parse_message,
    parse_name_addr,
    parse_via,
    split_values,
)
from callscribe.bridge.sip.uas import T1, T2, T4, TransactionStateError, TxnState, UasCore
from tests.unit.sip_data import load

PEER = Peer("udp", "198.51.100.9", 5062)


def request(
    method: str,
    *,
    branch: str = "z9hG4bK-1",
    call_id: str = "call-1@example.com",
    cseq: int = 1,
    cseq_method: str | None = None,
    to_tag: str = "",
    from_tag: str = "ft1",
    body: bytes = b"",
    extra: str = "",
) -> bytes:
    to = "<sip:srs@192.0.2.10>" + (f";tag={to_tag}" if to_tag else "")
    head = (
        f"{method} sip:srs@192.0.2.10 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 198.51.100.9:5062;branch={branch};rport\r\n"
        f"From: <sip:alice@example.com>;tag={from_tag}\r\n"
        f"To: {to}\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: {cseq} {cseq_method or method}\r\n"
        f"Contact: <sip:alice@198.51.100.9:5062>\r\n"
        f"Max-Forwards: 70\r\n{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def sent(core: UasCore) -> list[SipResponse]:
    out = []
    for data, _peer in core.outgoing():
        message = parse_message(data)
        assert isinstance(message, SipResponse)
        out.append(message)
    return out


def statuses(core: UasCore) -> list[int]:
    return [r.status for r in sent(core)]


def test_parse_compact_headers_and_body() -> None:
    message = parse_message(load("plain_invite"))
    assert isinstance(message, SipRequest)
    assert message.method == "INVITE"
    assert message.call_id == "a84b4c76e66710@pc33.example.com"
    assert message.cseq == (314159, "INVITE")
    assert message.content_type == "application/sdp"
    assert message.body.startswith(b"v=0\r\n")
    assert parse_name_addr(message.headers.get("from") or "").tag == "1928301774"
    assert parse_name_addr(message.headers.get("from") or "").display == "Alice"


def test_serialize_round_trip_recomputes_content_length() -> None:
    message = parse_message(load("siprec_sonus"))
    again = parse_message(message.serialize())
    assert isinstance(again, SipRequest)
    assert again.body == message.body
    assert again.headers.get("content-length") == str(len(message.body))


def test_via_and_name_addr_forms() -> None:
    via = parse_via("SIP/2.0/TCP [2001:db8::1]:5070;branch=z9hG4bKx;received=1.2.3.4")
    assert (via.transport, via.host, via.port, via.branch) == ("TCP", "2001:db8::1", 5070, "z9hG4bKx")
    assert parse_via("SIP/2.0/UDP host.example").sent_by == "host.example:5060"
    assert parse_name_addr("sip:bob@h;tag=7").tag == "7"
    assert parse_name_addr('"A, B" <sip:ab@h;lr>;tag=9').uri == "sip:ab@h;lr"
    assert split_values('"A, B" <sip:a@h>, <sip:b,c@h>') == ['"A, B" <sip:a@h>', "<sip:b,c@h>"]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"\xff\xfe INVITE", "not_utf8"),
        (b"INVITE sip:a SIP/3.0\r\n\r\n", "bad_start_line"),
        (b"SIP/2.0 99 Odd\r\n\r\n", "bad_start_line"),
        (b"INVITE sip:a SIP/2.0\r\nVia SIP/2.0/UDP h\r\n\r\n", "bad_header"),
        (b"INVITE sip:a SIP/2.0\r\nContent-Length: 10\r\n\r\nabc", "truncated"),
        (b"INVITE sip:a SIP/2.0\r\nContent-Length: -1\r\n\r\n", "bad_content_length"),
    ],
)
def test_malformed_messages_name_their_reason(data: bytes, reason: str) -> None:
    with pytest.raises(SipParseError) as info:
        parse_message(data)
    assert info.value.reason == reason


def test_stream_framer_splits_by_content_length_and_skips_keepalives() -> None:
    first = request("OPTIONS")
    second = request("INVITE", body=b"v=0\r\n")
    framer = StreamFramer()
    stream = b"\r\n\r\n" + first + second
    got: list[bytes] = []
    for i in range(0, len(stream), 7):
        got += framer.feed(stream[i : i + 7])
    assert got == [first, second]


def test_options_answered_by_core() -> None:
    core = UasCore("<sip:callscribe@192.0.2.10:5060>")
    assert core.receive(request("OPTIONS"), PEER, 0.0) == []
    [response] = sent(core)
    assert response.status == 200
    assert "INVITE" in (response.headers.get("allow") or "")
    assert "siprec" in (response.headers.get("supported") or "")
    # rport filled in with the source port (RFC 3581)
    assert "rport=5062" in (response.headers.get("via") or "")


def test_invite_200_ack_bye() -> None:
    core = UasCore("<sip:callscribe@192.0.2.10:5060>")
    [event] = core.receive(request("INVITE", body=b"v=0\r\n"), PEER, 0.0)
    assert isinstance(event, InviteReceived) and event.dialog_id is None
    assert statuses(core) == [100]
    dialog_id = core.respond(event.txn_id, 200, body=b"v=0\r\n", content_type="application/sdp", now=0.1)
    [ok] = sent(core)
    assert ok.status == 200 and ok.headers.get("contact") == "<sip:callscribe@192.0.2.10:5060>"
    to_tag = parse_name_addr(ok.headers.get("to") or "").tag
    assert to_tag and dialog_id
    # No ACK yet: the 2xx is retransmitted at T1, 2*T1 ... capped at T2 (RFC 3261 §13.3.1.4)
    retransmits = []
    for step in range(1, 100):
        now = round(0.1 + step * 0.05, 2)
        core.handle_timers(now)
        if core.outgoing():
            retransmits.append(round(now, 2))
    assert retransmits[:3] == [0.6, 1.6, 3.6]
    ack = request("ACK", branch="z9hG4bK-ack", to_tag=to_tag)
    [acked] = core.receive(ack, PEER, now)
    assert isinstance(acked, AckReceived) and acked.dialog_id == dialog_id
    core.handle_timers(now + 10)
    assert core.outgoing() == []
    [ended] = core.receive(request("BYE", branch="z9hG4bK-bye", cseq=2, to_tag=to_tag), PEER, now + 11)
    assert ended == DialogEnded(dialog_id, "bye")
    assert statuses(core) == [200]
    # A retransmitted BYE gets the same 200 again, without a second DialogEnded
    assert core.receive(request("BYE", branch="z9hG4bK-bye", cseq=2, to_tag=to_tag), PEER, now + 11.5) == []
    assert statuses(core) == [200]


def test_invite_retransmission_repeats_last_response() -> None:
    core = UasCore("<sip:c@h>")
    [event] = core.receive(request("INVITE"), PEER, 0.0)
    assert isinstance(event, InviteReceived)
    core.outgoing()
    assert core.receive(request("INVITE"), PEER, 0.3) == []
    assert statuses(core) == [100]
    core.respond(event.txn_id, 200, now=0.4)
    core.outgoing()
    assert core.receive(request("INVITE"), PEER, 0.5) == []
    assert statuses(core) == [200]


def test_no_ack_ends_dialog_with_bye() -> None:
    core = UasCore("<sip:c@192.0.2.10:5060>")
    [event] = core.receive(request("INVITE"), PEER, 0.0)
    assert isinstance(event, InviteReceived)
    dialog_id = core.respond(event.txn_id, 200, now=0.0)
    events = core.handle_timers(64 * T1 + 0.01)
    assert DialogEnded(str(dialog_id), "no_ack") in events
    bye = parse_message(core.outgoing()[-1][0])
    assert isinstance(bye, SipRequest) and bye.method == "BYE"
    assert bye.call_id == "call-1@example.com"


def test_cancel_before_answer_sends_200_and_487() -> None:
    core = UasCore("<sip:c@h>")
    [invite] = core.receive(request("INVITE"), PEER, 0.0)
    assert isinstance(invite, InviteReceived)
    core.outgoing()
    [cancelled] = core.receive(request("CANCEL"), PEER, 0.2)
    assert cancelled == InviteCancelled(invite.txn_id)
    responses = sent(core)
    assert [(r.status, r.cseq[1]) for r in responses] == [(200, "CANCEL"), (487, "INVITE")]
    assert not core.pending(invite.txn_id)
    with pytest.raises(KeyError):
        core.respond(invite.txn_id, 200, now=0.3)
    # 487 retransmitted (Timer G) until the ACK, which matches the INVITE transaction
    core.handle_timers(0.2 + T1)
    assert statuses(core) == [487]
    assert core.receive(request("ACK", cseq_method="ACK"), PEER, 0.8) == []
    core.handle_timers(2.0)
    assert core.outgoing() == []


def test_cancel_without_invite_is_481() -> None:
    core = UasCore("<sip:c@h>")
    core.receive(request("CANCEL", branch="z9hG4bK-nothing"), PEER, 0.0)
    assert statuses(core) == [481]


def test_bye_for_unknown_dialog_is_481() -> None:
    core = UasCore("<sip:c@h>")
    assert core.receive(request("BYE", to_tag="nope"), PEER, 0.0) == []
    assert statuses(core) == [481]


def test_reinvite_in_dialog_and_cseq_order() -> None:
    core = UasCore("<sip:c@h>")
    [invite] = core.receive(request("INVITE", cseq=5), PEER, 0.0)
    assert isinstance(invite, InviteReceived)
    dialog_id = core.respond(invite.txn_id, 200, now=0.0)
    to_tag = parse_name_addr(sent(core)[-1].headers.get("to") or "").tag
    core.receive(request("ACK", branch="z9hG4bK-a1", cseq=5, to_tag=to_tag), PEER, 0.1)
    [reinvite] = core.receive(request("INVITE", branch="z9hG4bK-2", cseq=6, to_tag=to_tag), PEER, 1.0)
    assert isinstance(reinvite, InviteReceived) and reinvite.dialog_id == dialog_id
    # A second offer while the first is open: 500 + Retry-After (RFC 3261 §14.2)
    core.receive(request("INVITE", branch="z9hG4bK-3", cseq=7, to_tag=to_tag), PEER, 1.1)
    assert statuses(core) == [100, 500]
    assert core.respond(reinvite.txn_id, 200, now=1.2) == dialog_id
    # An old CSeq in the dialog is refused
    core.outgoing()
    core.receive(request("INVITE", branch="z9hG4bK-4", cseq=4, to_tag=to_tag), PEER, 1.3)
    assert statuses(core) == [500]


def test_unknown_method_405_unsupported_require_420() -> None:
    core = UasCore("<sip:c@h>")
    core.receive(request("SUBSCRIBE"), PEER, 0.0)
    [r405] = sent(core)
    assert r405.status == 405 and "OPTIONS" in (r405.headers.get("allow") or "")
    core.receive(request("INVITE", branch="z9hG4bK-r", extra="Require: siprec, 100rel\r\n"), PEER, 0.0)
    [r420] = sent(core)
    assert r420.status == 420 and r420.headers.get("unsupported") == "100rel"


def test_missing_mandatory_header_gets_400_and_is_counted() -> None:
    core = UasCore("<sip:c@h>")
    data = request("INVITE").replace(b"Call-ID: call-1@example.com\r\n", b"")
    [dropped] = core.receive(data, PEER, 0.0)
    assert isinstance(dropped, Dropped) and dropped.reason == "missing_header"
    assert statuses(core) == [400]


def test_garbage_is_dropped_without_response() -> None:
    core = UasCore("<sip:c@h>")
    [dropped] = core.receive(b"\x00\x01 hello", PEER, 0.0)
    assert isinstance(dropped, Dropped)
    assert core.outgoing() == []


def test_transactions_expire() -> None:
    core = UasCore("<sip:c@h>")
    core.receive(request("OPTIONS"), PEER, 0.0)
    core.handle_timers(64 * T1 + 1)
    assert core.next_deadline() is None
    assert T2 > T1


def test_request_flood_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import callscribe.bridge.sip.uas as sip

    monkeypatch.setattr(sip, "MAX_TRANSACTIONS", 5)
    core = UasCore("<sip:c@h>")
    for n in range(5):
        assert core.receive(request("OPTIONS", branch=f"z9hG4bK-{n}"), PEER, 0.0) == []
    [dropped] = core.receive(request("OPTIONS", branch="z9hG4bK-6"), PEER, 0.0)
    assert isinstance(dropped, Dropped) and dropped.reason == "overload"
    core.handle_timers(64 * T1 + 1)  # answered transactions expire (Timer J) and make room
    assert core.receive(request("OPTIONS", branch="z9hG4bK-7"), PEER, 64 * T1 + 2) == []


def transaction_state(core: UasCore, txn_id: str) -> TxnState | None:
    txn = core._by_id.get(txn_id)
    return txn.state if txn else None


def test_invite_transaction_states_follow_rfc_3261_17_2_1() -> None:
    core = UasCore("<sip:c@h>")
    [invite] = core.receive(request("INVITE"), PEER, 0.0)
    assert isinstance(invite, InviteReceived)
    assert transaction_state(core, invite.txn_id) is TxnState.PROCEEDING
    core.respond(invite.txn_id, 486, now=0.1)
    assert transaction_state(core, invite.txn_id) is TxnState.COMPLETED
    with pytest.raises(TransactionStateError):
        core.respond(invite.txn_id, 200, now=0.2)  # one final response per transaction
    core.receive(request("ACK", cseq_method="ACK"), PEER, 0.3)
    assert transaction_state(core, invite.txn_id) is TxnState.CONFIRMED
    core.receive(request("ACK", cseq_method="ACK"), PEER, 0.4)  # a copy, absorbed
    assert transaction_state(core, invite.txn_id) is TxnState.CONFIRMED
    core.handle_timers(0.3 + T4)  # Timer I
    assert transaction_state(core, invite.txn_id) is None


def test_2xx_moves_the_invite_transaction_to_accepted() -> None:
    core = UasCore("<sip:c@h>")
    [invite] = core.receive(request("INVITE"), PEER, 0.0)
    assert isinstance(invite, InviteReceived)
    core.respond(invite.txn_id, 180, now=0.05)
    assert transaction_state(core, invite.txn_id) is TxnState.PROCEEDING
    core.respond(invite.txn_id, 200, now=0.1)
    assert transaction_state(core, invite.txn_id) is TxnState.ACCEPTED  # RFC 6026 §7.1
    txn = core._by_id[invite.txn_id]
    with pytest.raises(TransactionStateError, match="accepted → completed"):
        txn.move(TxnState.COMPLETED)


def test_non_invite_transaction_starts_trying_and_completes() -> None:
    core = UasCore("<sip:c@h>")
    core.receive(request("OPTIONS"), PEER, 0.0)
    [txn] = core._transactions.values()
    assert txn.state is TxnState.COMPLETED and txn.final_status == 200
    with pytest.raises(TransactionStateError, match="completed → proceeding"):
        txn.move(TxnState.PROCEEDING)


def test_now_is_a_required_argument() -> None:
    core = UasCore("<sip:c@h>")
    [invite] = core.receive(request("INVITE"), PEER, 0.0)
    assert isinstance(invite, InviteReceived)
    with pytest.raises(TypeError, match="now"):
        core.respond(invite.txn_id, 200)  # type: ignore[call-arg]


def test_deadlines_come_from_a_heap_and_moved_ones_are_skipped() -> None:
    core = UasCore("<sip:c@h>")
    assert core.next_deadline() is None
    [invite] = core.receive(request("INVITE"), PEER, 0.0)
    assert isinstance(invite, InviteReceived)
    core.respond(invite.txn_id, 200, now=1.0)
    assert core.next_deadline() == 1.0 + T1  # the 2xx retransmission
    [ok] = [r for r in sent(core) if r.status == 200]
    to_tag = parse_name_addr(ok.headers.get("to") or "").tag
    [acked] = core.receive(request("ACK", branch="z9hG4bK-ack", to_tag=to_tag), PEER, 1.2)
    assert isinstance(acked, AckReceived)
    # The ACK cleared the retransmission and give-up timers: what is left is Timer L's expiry.
    assert core.next_deadline() == 1.0 + 64 * T1
    assert core.handle_timers(1.0 + T1) == [] and core.outgoing() == []
    core.handle_timers(1.0 + 64 * T1)
    assert core.next_deadline() is None and not core._transactions


def test_many_transactions_cost_one_deadline_lookup() -> None:
    core = UasCore("<sip:c@h>")
    for n in range(2000):
        core.receive(request("OPTIONS", branch=f"z9hG4bK-{n}"), PEER, n * 0.001)
    assert core.next_deadline() == 64 * T1  # Timer J of the first
    core.handle_timers(64 * T1 + 0.5)  # expires the first 501 only
    assert len(core._transactions) == 2000 - 501
    assert core.next_deadline() == pytest.approx(64 * T1 + 0.501)
    # Superseded heap entries (the unanswered-timeout of each) do not pile up without bound.
    assert len(core._deadlines) <= 4 * len(core._transactions) + 4096
