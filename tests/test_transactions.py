"""RFC 3261 §17 / RFC 6026 transaction state machines, driven with a fake clock."""

from __future__ import annotations

import re

import pytest

from sipmesh.sip.message import Request, Response, make_response, parse_message
from sipmesh.sip.transaction import (MAGIC_COOKIE, ClientInviteTransaction,
                                     ClientNonInviteTransaction, Deliver, Send,
                                     ServerInviteTransaction, ServerNonInviteTransaction, State,
                                     Terminated, Timeout, TimerValues, TransportFailed,
                                     ack_server_key, client_key, invite_key_for_cancel, make_ack,
                                     make_cancel, new_branch, server_key)
from sipmesh.sip.transaction.base import Transaction

BRANCH = "z9hG4bK776asdhds"
VIA = f"SIP/2.0/UDP pc33.Atlanta.com:5070;branch={BRANCH}"


def request(method: str = "INVITE", *, via: str = VIA, to: str = "Bob <sip:bob@biloxi.com>",
            extra: str = "", body: str = "") -> Request:
    raw = (f"{method} sip:bob@biloxi.com SIP/2.0\r\n"
           f"Via: {via}\r\n"
           "Via: SIP/2.0/UDP proxy.atlanta.com;branch=z9hG4bKproxy1\r\n"
           "Route: <sip:p1.example.com;lr>, <sip:p2.example.com;lr>\r\n"
           "Max-Forwards: 69\r\n"
           f"To: {to}\r\n"
           "From: Alice <sip:alice@atlanta.com>;tag=1928301774\r\n"
           "Call-ID: a84b4c76e66710@pc33.atlanta.com\r\n"
           f"CSeq: 314159 {method}\r\n"
           "Contact: <sip:alice@pc33.atlanta.com>\r\n"
           f"{extra}"
           f"Content-Length: {len(body)}\r\n\r\n{body}")
    msg = parse_message(raw.encode())
    assert isinstance(msg, Request)
    return msg


def response(req: Request, status: int, tag: str | None = "a6c85cf") -> Response:
    return make_response(req, status, to_tag=tag)


def drive(txn: Transaction, until: float) -> list[tuple[float, object]]:
    """Tick the transaction at each of its deadlines up to `until`; (time, effect) pairs."""
    out: list[tuple[float, object]] = []
    while (at := txn.next_deadline()) is not None and at <= until:
        out += [(at, effect) for effect in txn.on_timer(at)]
    return out


# -- INVITE client transaction ---------------------------------------------------------

def test_invite_client_retransmits_with_doubling_and_times_out_at_32():
    req = request()
    txn = ClientInviteTransaction(req, reliable=False, now=0.0)
    assert txn.state is State.CALLING
    assert txn.start() == [Send(req)]
    assert txn.next_deadline() == 0.5
    assert drive(txn, 100) == [(0.5, Send(req)), (1.5, Send(req)), (3.5, Send(req)),
                               (7.5, Send(req)), (15.5, Send(req)), (31.5, Send(req)),
                               (32.0, Timeout("B")), (32.0, Terminated())]
    assert txn.state is State.TERMINATED
    assert txn.next_deadline() is None


def test_invite_client_interval_not_capped_by_t2():
    txn = ClientInviteTransaction(request(), reliable=False, now=10.0,
                                  timers=TimerValues(t1=1.0, t2=2.0))
    txn.start()
    assert [at for at, e in drive(txn, 1000) if isinstance(e, Send)] == [11, 13, 17, 25, 41, 73]
    assert txn.state is State.TERMINATED


def test_invite_client_reliable_never_retransmits():
    req = request()
    txn = ClientInviteTransaction(req, reliable=True, now=5.0)
    assert txn.start() == [Send(req)]
    assert txn.next_deadline() == 37.0
    assert txn.on_timer(36.9) == []
    assert drive(txn, 100) == [(37.0, Timeout("B")), (37.0, Terminated())]


def test_invite_client_late_tick_fires_due_timers_in_order_and_coalesces():
    req = request()
    txn = ClientInviteTransaction(req, reliable=False, now=0.0)
    txn.start()
    assert txn.on_timer(4.0) == [Send(req)]  # 0.5, 1.5 and 3.5 were missed: one send
    assert txn.next_deadline() == 5.0  # re-armed an interval after the late tick
    assert txn.on_timer(40.0) == [Send(req), Timeout("B"), Terminated()]


def test_invite_client_provisional_stops_timer_a_and_b():
    req = request()
    txn = ClientInviteTransaction(req, reliable=False, now=0.0)
    txn.start()
    assert txn.on_timer(0.5) == [Send(req)]
    ringing = response(req, 180)
    assert txn.receive(ringing, 1.0) == [Deliver(ringing)]
    assert txn.state is State.PROCEEDING
    assert txn.next_deadline() is None
    assert txn.on_timer(100.0) == []
    again = response(req, 183)
    assert txn.receive(again, 2.0) == [Deliver(again)]
    assert txn.state is State.PROCEEDING


def test_invite_client_non_2xx_builds_ack_and_absorbs_retransmissions():
    req = request(body="v=0\r\n")
    txn = ClientInviteTransaction(req, reliable=False, now=0.0)
    txn.start()
    txn.receive(response(req, 180), 0.2)
    busy = response(req, 486)
    effects = txn.receive(busy, 2.0)
    ack = txn.ack
    assert ack is not None
    assert effects == [Send(ack), Deliver(busy)]
    assert txn.state is State.COMPLETED
    assert ack.method == "ACK" and str(ack.uri) == "sip:bob@biloxi.com"
    assert ack.uri is not req.uri
    assert list(ack.headers) == [
        ("Via", VIA),
        ("Route", "<sip:p1.example.com;lr>"),
        ("Route", "<sip:p2.example.com;lr>"),
        ("Max-Forwards", "70"),
        ("From", "Alice <sip:alice@atlanta.com>;tag=1928301774"),
        ("To", "Bob <sip:bob@biloxi.com>;tag=a6c85cf"),  # as the request wrote it, plus the tag
        ("Call-ID", "a84b4c76e66710@pc33.atlanta.com"),
        ("CSeq", "314159 ACK"),
    ]
    assert ack.body == b""
    assert client_key(ack) == (BRANCH, "ACK")
    # A retransmitted final response is re-ACKed (the same ACK), never delivered again.
    assert txn.receive(response(req, 486), 3.0) == [Send(ack)]
    assert txn.receive(response(req, 180), 3.5) == []
    assert txn.next_deadline() == 34.0  # Timer D = 32 s after the final response
    assert drive(txn, 100) == [(34.0, Terminated())]


def test_invite_client_timer_d_zero_on_reliable():
    req = request()
    txn = ClientInviteTransaction(req, reliable=True, now=0.0)
    txn.start()
    final = response(req, 603)
    effects = txn.receive(final, 1.0)
    assert txn.ack is not None
    assert effects == [Send(txn.ack), Deliver(final)]
    assert txn.next_deadline() == 1.0
    assert txn.on_timer(1.0) == [Terminated()]


def test_invite_client_2xx_accepted_delivers_every_2xx():
    req = request()
    txn = ClientInviteTransaction(req, reliable=False, now=0.0)
    txn.start()
    ok = response(req, 200)
    assert txn.receive(ok, 1.0) == [Deliver(ok)]
    assert txn.state is State.ACCEPTED
    assert txn.ack is None
    assert txn.next_deadline() == 33.0  # Timer M = 64*T1
    ok_again = response(req, 200)
    other_fork = response(req, 200, tag="fork2")
    assert txn.receive(ok_again, 2.0) == [Deliver(ok_again)]
    assert txn.receive(other_fork, 3.0) == [Deliver(other_fork)]
    assert txn.receive(response(req, 486), 3.0) == []
    assert txn.receive(response(req, 180), 3.0) == []
    assert drive(txn, 100) == [(33.0, Terminated())]


def test_client_transport_error_terminates():
    txn = ClientInviteTransaction(request(), reliable=True, now=0.0)
    txn.start()
    assert txn.transport_error(0.1) == [TransportFailed(), Terminated()]
    assert txn.next_deadline() is None
    assert txn.transport_error(0.2) == []


# -- non-INVITE client transaction -----------------------------------------------------

def test_non_invite_client_retransmits_capped_at_t2_and_times_out_at_32():
    req = request("OPTIONS")
    txn = ClientNonInviteTransaction(req, reliable=False, now=0.0)
    assert txn.state is State.TRYING
    assert txn.start() == [Send(req)]
    effects = drive(txn, 100)
    assert [at for at, e in effects if e == Send(req)] == [
        0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    assert effects[-2:] == [(32.0, Timeout("F")), (32.0, Terminated())]
    assert len(effects) == 12


def test_non_invite_client_reliable_never_retransmits():
    req = request("REGISTER")
    txn = ClientNonInviteTransaction(req, reliable=True, now=0.0)
    assert txn.start() == [Send(req)]
    assert drive(txn, 100) == [(32.0, Timeout("F")), (32.0, Terminated())]


def test_non_invite_client_proceeding_retransmits_every_t2():
    req = request("OPTIONS")
    txn = ClientNonInviteTransaction(req, reliable=False, now=0.0)
    txn.start()
    assert drive(txn, 0.5) == [(0.5, Send(req))]
    trying = response(req, 100, tag=None)
    assert txn.receive(trying, 1.0) == [Deliver(trying)]
    assert txn.state is State.PROCEEDING
    # E keeps its deadline (1.5), then fires every T2.
    sends = [at for at, e in drive(txn, 20) if isinstance(e, Send)]
    assert sends == [1.5, 5.5, 9.5, 13.5, 17.5]


def test_non_invite_client_final_absorbs_retransmissions_and_timer_k():
    req = request("OPTIONS")
    txn = ClientNonInviteTransaction(req, reliable=False, now=0.0)
    txn.start()
    ok = response(req, 200)
    assert txn.receive(ok, 2.0) == [Deliver(ok)]
    assert txn.state is State.COMPLETED
    assert txn.receive(response(req, 200), 2.5) == []
    assert txn.next_deadline() == 7.0  # Timer K = T4
    assert drive(txn, 100) == [(7.0, Terminated())]


def test_non_invite_client_timer_k_zero_on_reliable():
    req = request("OPTIONS")
    txn = ClientNonInviteTransaction(req, reliable=True, now=0.0)
    txn.start()
    txn.receive(response(req, 404), 2.0)
    assert txn.next_deadline() == 2.0
    assert txn.on_timer(2.0) == [Terminated()]


# -- INVITE server transaction ---------------------------------------------------------

def test_invite_server_start_sends_100_and_delivers_once():
    req = request(extra="Timestamp: 54\r\n")
    txn = ServerInviteTransaction(req, reliable=False, now=0.0)
    assert txn.state is State.PROCEEDING
    effects = txn.start()
    trying = txn.last_response
    assert trying is not None
    assert effects == [Send(trying), Deliver(req)]
    assert trying.status == 100 and trying.reason == "Trying"
    assert trying.headers.get("Timestamp") == "54"
    assert trying.to.tag is None
    assert txn.next_deadline() is None
    # A retransmitted INVITE is answered with the last response, never delivered.
    assert txn.receive(request(), 0.5) == [Send(trying)]
    ringing = response(req, 180)
    assert txn.respond(ringing, 1.0) == [Send(ringing)]
    assert txn.state is State.PROCEEDING
    assert txn.receive(request(), 1.5) == [Send(ringing)]


def test_invite_server_non_2xx_timer_g_schedule_and_timer_h():
    req = request()
    txn = ServerInviteTransaction(req, reliable=False, now=0.0)
    txn.start()
    busy = response(req, 486)
    assert txn.respond(busy, 0.0) == [Send(busy)]
    assert txn.state is State.COMPLETED
    effects = drive(txn, 100)
    assert [at for at, e in effects if e == Send(busy)] == [
        0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    assert effects[-2:] == [(32.0, Timeout("H")), (32.0, Terminated())]
    assert len(effects) == 12


def test_invite_server_completed_answers_retransmission_and_ack_confirms():
    req = request()
    txn = ServerInviteTransaction(req, reliable=False, now=0.0)
    txn.start()
    busy = response(req, 486)
    txn.respond(busy, 1.0)
    assert txn.receive(request(), 1.2) == [Send(busy)]
    assert txn.respond(response(req, 500), 1.3) == []  # a second final is dropped
    ack = make_ack(req, busy)
    assert server_key(ack) == txn.key == txn.ack_key
    assert txn.receive(ack, 2.0) == []
    assert txn.state is State.CONFIRMED
    assert txn.next_deadline() == 7.0  # Timer I = T4; G and H cancelled
    assert txn.receive(ack, 3.0) == []
    assert txn.receive(request(), 3.0) == []
    assert drive(txn, 100) == [(7.0, Terminated())]


def test_invite_server_reliable_has_no_timer_g_and_zero_timer_i():
    req = request()
    txn = ServerInviteTransaction(req, reliable=True, now=0.0)
    txn.start()
    txn.respond(response(req, 404), 1.0)
    assert txn.next_deadline() == 33.0  # only H
    txn.receive(make_ack(req, response(req, 404)), 2.0)
    assert txn.next_deadline() == 2.0
    assert txn.on_timer(2.0) == [Terminated()]


def test_invite_server_2xx_accepted_absorbs_invites_and_timer_l():
    req = request()
    txn = ServerInviteTransaction(req, reliable=False, now=0.0)
    txn.start()
    ok = response(req, 200)
    assert txn.respond(ok, 1.0) == [Send(ok)]
    assert txn.state is State.ACCEPTED
    assert txn.next_deadline() == 33.0  # Timer L = 64*T1, no Timer G
    assert txn.receive(request(), 2.0) == []
    ok_again = response(req, 200)
    assert txn.respond(ok_again, 2.0) == [Send(ok_again)]  # the TU's own retransmission
    assert txn.respond(response(req, 486), 2.0) == []
    ack = request("ACK", to="Bob <sip:bob@biloxi.com>;tag=a6c85cf")
    assert txn.receive(ack, 3.0) == [Deliver(ack)]
    assert drive(txn, 100) == [(33.0, Terminated())]


def test_invite_server_transport_error_keeps_state():
    req = request()
    txn = ServerInviteTransaction(req, reliable=True, now=0.0)
    txn.start()
    busy = response(req, 486)
    txn.respond(busy, 1.0)
    assert txn.transport_error(1.0) == [TransportFailed()]
    assert txn.state is State.COMPLETED
    assert txn.receive(request(), 2.0) == [Send(busy)]
    assert drive(txn, 100) == [(33.0, Timeout("H")), (33.0, Terminated())]
    assert txn.transport_error(40.0) == []


# -- non-INVITE server transaction -----------------------------------------------------

def test_non_invite_server_absorbs_until_answered_then_timer_j():
    req = request("OPTIONS")
    txn = ServerNonInviteTransaction(req, reliable=False, now=0.0)
    assert txn.state is State.TRYING
    assert txn.start() == [Deliver(req)]
    assert txn.receive(request("OPTIONS"), 0.5) == []
    trying = response(req, 100, tag=None)
    assert txn.respond(trying, 0.6) == [Send(trying)]
    assert txn.state is State.PROCEEDING
    assert txn.receive(request("OPTIONS"), 0.7) == [Send(trying)]
    ok = response(req, 200)
    assert txn.respond(ok, 1.0) == [Send(ok)]
    assert txn.state is State.COMPLETED
    assert txn.respond(response(req, 500), 1.1) == []
    assert txn.receive(request("OPTIONS"), 2.0) == [Send(ok)]
    assert txn.next_deadline() == 33.0  # Timer J = 64*T1
    assert drive(txn, 100) == [(33.0, Terminated())]
    assert txn.receive(request("OPTIONS"), 40.0) == []


def test_non_invite_server_timer_j_zero_on_reliable_and_transport_error():
    req = request("BYE")
    txn = ServerNonInviteTransaction(req, reliable=True, now=0.0)
    txn.start()
    txn.respond(response(req, 200), 4.0)
    assert txn.next_deadline() == 4.0
    assert txn.on_timer(4.0) == [Terminated()]
    other = ServerNonInviteTransaction(request("BYE"), reliable=False, now=0.0)
    other.start()
    assert other.transport_error(1.0) == [TransportFailed(), Terminated()]


# -- matching --------------------------------------------------------------------------

def test_new_branch_has_cookie_and_entropy():
    branches = {new_branch() for _ in range(100)}
    assert len(branches) == 100
    for branch in branches:
        assert branch.startswith(MAGIC_COOKIE)
        assert re.fullmatch(r"z9hG4bK[0-9a-f]{32}", branch)


def test_client_key_from_request_and_response():
    req = request()
    assert client_key(req) == (BRANCH, "INVITE")
    assert client_key(response(req, 180)) == (BRANCH, "INVITE")
    assert client_key(make_cancel(req)) == (BRANCH, "CANCEL")


def test_server_key_magic_cookie_and_ack_mapping():
    invite = request()
    assert server_key(invite) == (BRANCH, "pc33.atlanta.com", 5070, "INVITE")
    ack = request("ACK", to="Bob <sip:bob@biloxi.com>;tag=a6c85cf")
    assert server_key(ack) == server_key(invite)
    assert server_key(request("OPTIONS")) == (BRANCH, "pc33.atlanta.com", 5070, "OPTIONS")
    other_port = request(via=f"SIP/2.0/UDP pc33.atlanta.com;branch={BRANCH}")
    assert server_key(other_port) == (BRANCH, "pc33.atlanta.com", None, "INVITE")


def test_cancel_keys():
    invite = request()
    cancel = make_cancel(invite)
    assert server_key(cancel) == (BRANCH, "pc33.atlanta.com", 5070, "CANCEL")
    assert invite_key_for_cancel(cancel) == server_key(invite)


def test_server_key_rfc2543_fallback():
    via = "SIP/2.0/UDP old.example.com:5060;branch=1234"
    invite = request(via=via)
    key = server_key(invite)
    assert key == ("sip:bob@biloxi.com", None, "1928301774", "a84b4c76e66710@pc33.atlanta.com",
                   314159, via, "INVITE")
    assert server_key(request(via=via)) == key  # a retransmission matches
    assert server_key(request("OPTIONS", via=via))[-1] == "OPTIONS"
    no_branch = request(via="SIP/2.0/UDP old.example.com")
    assert server_key(no_branch)[5] == "SIP/2.0/UDP old.example.com"
    # The ACK carries the To tag of the response: it matches via ack_server_key.
    busy = response(invite, 486, tag="srv1")
    ack = make_ack(invite, busy)
    assert server_key(ack) != key
    assert server_key(ack) == ack_server_key(invite, busy)
    txn = ServerInviteTransaction(invite, reliable=False, now=0.0)
    txn.start()
    assert txn.ack_key == key
    txn.respond(busy, 1.0)
    assert txn.ack_key == server_key(ack)
    assert txn.receive(ack, 1.5) == []
    assert txn.state is State.CONFIRMED
    # CANCEL (same To, no tag) finds the INVITE.
    cancel = make_cancel(invite)
    assert server_key(cancel)[-1] == "CANCEL"
    assert invite_key_for_cancel(cancel) == key


def test_make_cancel_headers():
    invite = request(body="v=0\r\n", extra="Require: 100rel\r\nContent-Type: application/sdp\r\n")
    cancel = make_cancel(invite)
    assert cancel.method == "CANCEL" and str(cancel.uri) == "sip:bob@biloxi.com"
    assert list(cancel.headers) == [
        ("Via", VIA),
        ("Route", "<sip:p1.example.com;lr>"),
        ("Route", "<sip:p2.example.com;lr>"),
        ("Max-Forwards", "70"),
        ("From", "Alice <sip:alice@atlanta.com>;tag=1928301774"),
        ("To", "Bob <sip:bob@biloxi.com>"),
        ("Call-ID", "a84b4c76e66710@pc33.atlanta.com"),
        ("CSeq", "314159 CANCEL"),
    ]
    assert cancel.body == b""
    reparsed = parse_message(cancel.to_bytes())
    assert isinstance(reparsed, Request) and reparsed.cseq == (314159, "CANCEL")


def test_timer_values_defaults_are_frozen():
    t = TimerValues()
    assert (t.t1, t.t2, t.t4) == (0.5, 4.0, 5.0)
    with pytest.raises(AttributeError):
        t.t1 = 1.0  # type: ignore[misc]
