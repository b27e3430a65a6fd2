"""The user agent core on loopback: our UA on both sides (UDP, TCP, TLS, IPv6 once), and
scripted raw-socket peers where a test must control exactly what goes on the wire.

Timers are short (T1 = 10 ms, see tests/peers/helpers.FAST): Timer B is 0.64 s, a 2xx is
retransmitted for 0.64 s.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from sipmesh.sip.auth import DigestServer, NonceManager, compute_ha1, parse_auth_params
from sipmesh.sip.message import Request, Response, make_response
from sipmesh.sip.uri import parse_sip_uri
from sipmesh.sip.ua import ALLOW, CallFailed
from tests.lab import ipv6_loopback, wait_for_async
from tests.peers.helpers import FAST, Callee, make_ua, no_errors_logged, sdp, start_ua
from tests.peers.raw import RawPeer, is_request, is_response, raw_request

__all__ = ["make_ua", "no_errors_logged"]  # fixtures (the second, autouse, fails on errors)

# -- fixtures ----------------------------------------------------------------------------


def transport_config(transport: str, tls_contexts) -> dict:
    if transport != "TLS":
        return {"transport": transport}
    server, client = tls_contexts
    return {"transport": "TLS", "transports": ("UDP", "TCP", "TLS"), "tls_context": server,
            "tls_client_context": client}


def target(ua, transport: str = "UDP") -> str:
    return str(ua.contact(transport).uri)


async def established(callee: Callee, index: int = 0):
    await wait_for_async(lambda: len(callee.calls) > index, 3, what="the callee's Call")
    return callee.calls[index]


# -- call set-up and teardown -------------------------------------------------------------


@pytest.mark.parametrize("transport", ["UDP", "TCP", "TLS"])
async def test_call_set_up_and_caller_hangs_up(make_ua, tls_contexts, transport):
    callee = Callee()
    config = transport_config(transport, tls_contexts)
    bob = await make_ua("bob", on_invite=callee, **config)
    alice = await make_ua("alice", **config)
    progress: list[Response] = []
    call = await alice.invite(target(bob, transport), sdp("alice"), on_progress=progress.append)
    assert [r.status for r in progress] == [180]
    assert call.outgoing and call.remote_sdp == callee.answer and call.local_sdp == sdp("alice")
    theirs = await established(callee)
    assert callee.incoming[0].txn.flow.transport == transport
    assert callee.incoming[0].request.via.transport == transport
    assert not theirs.outgoing and theirs.remote_sdp == sdp("alice")
    assert theirs.call_id == call.call_id
    assert (theirs.dialog.local_tag, theirs.dialog.remote_tag) == \
        (call.dialog.remote_tag, call.dialog.local_tag)
    assert call.dialog.remote_target == parse_sip_uri(target(bob, transport)) or \
        str(call.dialog.remote_target) == target(bob, transport)
    assert call in alice.calls and theirs in bob.calls

    await call.bye()
    assert call.ended.result() == "local BYE"
    assert await asyncio.wait_for(theirs.ended, 2) == "remote BYE"
    assert alice.calls == [] and bob.calls == []


@pytest.mark.parametrize("transport", ["UDP", "TCP"])
async def test_callee_hangs_up(make_ua, tls_contexts, transport):
    callee = Callee()
    bob = await make_ua("bob", on_invite=callee, transport=transport)
    alice = await make_ua("alice", transport=transport)
    call = await alice.invite(target(bob, transport), sdp("alice"))
    theirs = await established(callee)
    await theirs.bye()
    assert await asyncio.wait_for(call.ended, 2) == "remote BYE"
    assert callee.ended == ["local BYE"] or await wait_for_async(
        lambda: callee.ended == ["local BYE"], 3, what="the local BYE")
    assert alice.calls == [] and bob.calls == []


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
async def test_call_over_ipv6_loopback(make_ua):
    callee = Callee()
    bob = await make_ua("bob", on_invite=callee, host="::1")
    alice = await make_ua("alice", host="::1")
    assert "[::1]" in str(alice.contact())
    call = await alice.invite(target(bob), sdp("alice", "::1"))
    theirs = await established(callee)
    incoming = callee.incoming[0]
    assert incoming.txn.flow.host == "::1" and incoming.request.via.host == "::1"
    assert incoming.request.contacts[0].uri.host == "::1"
    await theirs.bye()
    assert await asyncio.wait_for(call.ended, 2) == "remote BYE"


# -- failures -----------------------------------------------------------------------------


@pytest.mark.parametrize("status", [486, 404, 603])
async def test_rejection_surfaces_as_call_failed_with_the_status(make_ua, status):
    callee = Callee(mode="reject", status=status)
    bob = await make_ua("bob", on_invite=callee)
    alice = await make_ua("alice")
    with pytest.raises(CallFailed) as failed:
        await alice.invite(target(bob), sdp("alice"))
    assert failed.value.status == status
    assert failed.value.response is not None and failed.value.response.status == status
    assert failed.value.response.to.tag == callee.incoming[0].local_tag
    assert alice.calls == [] and bob.calls == []


async def test_ua_without_invite_handler_answers_480(make_ua):
    bob = await make_ua("bob")
    alice = await make_ua("alice")
    with pytest.raises(CallFailed) as failed:
        await alice.invite(target(bob), sdp("alice"))
    assert failed.value.status == 480
    assert failed.value.response.to.tag  # §8.2.6.2: the UAS adds a To tag


async def test_cancel_while_ringing(make_ua):
    callee = Callee(mode="ring")
    bob = await make_ua("bob", on_invite=callee)
    alice = await make_ua("alice")
    progress: list[Response] = []
    started = time.monotonic()
    with pytest.raises(CallFailed) as failed:
        await alice.invite(target(bob), sdp("alice"), on_progress=progress.append, timeout=0.3)
    assert failed.value.status == 487 and failed.value.response.status == 487
    assert 0.25 < time.monotonic() - started < 3
    assert [r.status for r in progress] == [180]
    incoming = callee.incoming[0]
    assert incoming.cancelled.is_set()
    await wait_for_async(lambda: callee.failures, 3, what="accept() to fail")
    assert callee.failures[0].status == 487  # accepting after the CANCEL is refused
    assert callee.calls == [] and bob.calls == [] and alice.calls == []


async def test_cancelling_the_inviting_task_sends_cancel(make_ua):
    callee = Callee(mode="ring")
    bob = await make_ua("bob", on_invite=callee)
    alice = await make_ua("alice")
    progress: list[Response] = []
    task = asyncio.ensure_future(alice.invite(target(bob), sdp("alice"),
                                              on_progress=progress.append))
    await wait_for_async(lambda: progress, 3, what="180 Ringing")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_for_async(lambda: callee.incoming[0].cancelled.is_set(), 3, what="the CANCEL")
    assert callee.calls == []


async def test_no_answer_is_408_from_timer_b(make_ua, raw_peers):
    alice = await make_ua("alice")
    hole = await raw_peers()  # receives, never answers
    started = time.monotonic()
    with pytest.raises(CallFailed) as failed:
        await alice.invite(f"sip:nobody@{hole.hostport}", sdp("alice"), timeout=0.1)
    elapsed = time.monotonic() - started
    assert failed.value.status == 408
    assert 64 * FAST.t1 * 0.9 < elapsed < 3  # Timer B; no CANCEL without a provisional (§9.1)
    invites = [m for _, m in hole.log if isinstance(m, Request) and m.method == "INVITE"]
    assert len(invites) >= 5  # Timer A: retransmitted with doubling intervals
    assert len({m.via.branch for m in invites}) == 1
    assert not [m for _, m in hole.log if isinstance(m, Request) and m.method == "CANCEL"]


# -- the 2xx/ACK handshake, scripted ----------------------------------------------------


def ack_for(ok: Response, peer: RawPeer, uri: str, call_id: str) -> bytes:
    return raw_request("ACK", str(ok.contacts[0].uri), peer, call_id=call_id, cseq=ok.cseq[0],
                       to=uri, to_tag=ok.to.tag, contact=False)


async def test_uas_retransmits_2xx_until_ack_then_gives_up_and_sends_bye(make_ua, raw_peers):
    callee = Callee()
    bob = await make_ua("bob", on_invite=callee)
    peer, sent_by = await raw_peers(), await raw_peers()
    uri = f"sip:bob@127.0.0.1:{bob.config.listen_port}"
    bob_addr = ("127.0.0.1", bob.config.listen_port)
    # Via names another port and asks for rport: every response must come to the source.
    peer.send(raw_request("INVITE", uri, peer, call_id="lost-ack", via_port=sent_by.port,
                          body=sdp("raw")), bob_addr)
    bye, addr = await peer.expect(is_request("BYE"), timeout=5, what="BYE")
    peer.send(make_response(bye, 200), addr)
    oks = [(t, m) for t, m in peer.log if isinstance(m, Response) and m.status == 200]
    assert len(oks) >= 6, [m for _, m in peer.log]
    assert len({m.to.tag for _, m in oks}) == 1 and all(m.body == callee.answer for _, m in oks)
    span = oks[-1][0] - oks[0][0]
    assert 64 * FAST.t1 * 0.5 < span < 64 * FAST.t1 * 2
    assert oks[0][1].via.rport == peer.port and oks[0][1].via.received == "127.0.0.1"
    # the BYE belongs to the dialog of the 200 and goes to our Contact
    assert bye.uri == parse_sip_uri(f"sip:raw@127.0.0.1:{peer.port}") or \
        str(bye.uri) == f"sip:raw@127.0.0.1:{peer.port}"
    assert bye.from_.tag == oks[0][1].to.tag and bye.to.tag == "rawtag"
    await wait_for_async(lambda: callee.failures, 3, what="accept() to give up")
    assert callee.failures[0].status == 408 and callee.calls == []
    assert sent_by.log == []


async def test_uas_stops_retransmitting_2xx_once_acked(make_ua, raw_peers):
    callee = Callee()
    bob = await make_ua("bob", on_invite=callee)
    peer = await raw_peers()
    uri = f"sip:bob@127.0.0.1:{bob.config.listen_port}"
    bob_addr = ("127.0.0.1", bob.config.listen_port)
    peer.send(raw_request("INVITE", uri, peer, call_id="late-ack", body=sdp("raw")), bob_addr)
    ok, _ = await peer.expect(is_response(200))
    await peer.expect(is_response(200), what="a retransmitted 200")  # the first ACK was "lost"
    peer.send(ack_for(ok, peer, uri, "late-ack"), bob_addr)
    theirs = await established(callee)  # the ACK was taken
    # a fence: what Bob sent before answering a later request (a 200 already on its way
    # when the ACK came) has arrived once that answer has
    peer.send(raw_request("OPTIONS", str(ok.contacts[0].uri), peer, call_id="late-ack", cseq=2,
                          to=uri, to_tag=ok.to.tag), bob_addr)
    await peer.expect(is_response(200, "OPTIONS"), what="the answer to the in-dialog OPTIONS")
    count = sum(1 for _, m in peer.log if isinstance(m, Response) and m.status == 200)
    # a 2xx still retransmitted would come at least every T2 (40 ms): none in 0.3 s
    await peer.quiet(is_response(200, "INVITE"), 0.3, what="a 200 retransmitted after the ACK")
    assert sum(1 for _, m in peer.log if isinstance(m, Response) and m.status == 200) == count
    assert not theirs.ended.done()
    peer.send(raw_request("BYE", str(ok.contacts[0].uri), peer, call_id="late-ack", cseq=3,
                          to=uri, to_tag=ok.to.tag), bob_addr)
    await peer.expect(is_response(200, "BYE"))
    assert await asyncio.wait_for(theirs.ended, 1) == "remote BYE"


def answer(invite: Request, peer: RawPeer, tag: str, status: int = 200) -> Response:
    ok = make_response(invite, status, to_tag=tag)
    ok.headers.add("Contact", f"<sip:raw@{peer.hostport}>")
    ok.headers.add("Content-Type", "application/sdp")
    ok.body = sdp("raw")
    return ok


async def test_uac_resends_its_ack_for_a_retransmitted_2xx(make_ua, raw_peers):
    alice = await make_ua("alice")
    peer = await raw_peers()
    task = asyncio.ensure_future(alice.invite(f"sip:raw@{peer.hostport}", sdp("alice")))
    invite, addr = await peer.expect(is_request("INVITE"))
    assert "rport" in invite.via.params and invite.via.params["rport"] is None  # RFC 3581
    assert invite.via.port == alice.config.listen_port
    assert invite.contacts[0].uri.port == alice.config.listen_port
    ok = answer(invite, peer, "uas1")
    peer.send(ok, addr)
    call = await asyncio.wait_for(task, 2)
    ack1, _ = await peer.expect(is_request("ACK"))
    assert ack1.cseq == (invite.cseq[0], "ACK") and ack1.to.tag == "uas1"
    assert ack1.via.branch != invite.via.branch  # the ACK for a 2xx is a transaction of its own
    assert str(ack1.uri) == f"sip:raw@{peer.hostport}"
    peer.send(ok, addr)  # while the INVITE transaction lives (Timer M)
    ack2, _ = await peer.expect(is_request("ACK"), what="a second ACK")
    assert ack2.to_bytes() == ack1.to_bytes()
    await asyncio.sleep(64 * FAST.t1 + 0.2)  # past Timer M: the transaction is gone, a stray 2xx now
    peer.send(ok, addr)
    ack3, _ = await peer.expect(is_request("ACK"), what="a third ACK")
    assert ack3.to_bytes() == ack1.to_bytes()
    bye_task = asyncio.ensure_future(call.bye())
    bye, addr = await peer.expect(is_request("BYE"))
    assert bye.cseq == (invite.cseq[0] + 1, "BYE") and bye.to.tag == "uas1"
    peer.send(make_response(bye, 200), addr)
    await asyncio.wait_for(bye_task, 2)


async def test_second_2xx_from_a_fork_is_acked_and_hung_up(make_ua, raw_peers):
    alice = await make_ua("alice")
    peer = await raw_peers()
    task = asyncio.ensure_future(alice.invite(f"sip:raw@{peer.hostport}", sdp("alice")))
    invite, addr = await peer.expect(is_request("INVITE"))
    peer.send(answer(invite, peer, "forkA"), addr)
    peer.send(answer(invite, peer, "forkB"), addr)
    call = await asyncio.wait_for(task, 2)
    assert call.dialog.remote_tag == "forkA"
    bye, addr = await peer.expect(is_request("BYE"), what="a BYE for the second fork")
    assert bye.to.tag == "forkB"
    peer.send(make_response(bye, 200), addr)
    acks = {m.to.tag for _, m in peer.log if isinstance(m, Request) and m.method == "ACK"}
    assert acks == {"forkA", "forkB"}
    assert not call.ended.done() and alice.calls == [call]


# -- in-dialog requests -----------------------------------------------------------------


async def test_reinvite_is_answered_with_the_same_sdp_from_either_side(make_ua):
    callee = Callee()
    bob = await make_ua("bob", on_invite=callee)
    alice = await make_ua("alice")
    call = await alice.invite(target(bob), sdp("alice"))
    theirs = await established(callee)
    response = await call.reinvite()
    assert response.status == 200 and response.body == callee.answer
    assert response.cseq == (2, "INVITE") and call.remote_sdp == callee.answer
    assert theirs.local_sdp == callee.answer and theirs.remote_sdp == sdp("alice")
    response = await theirs.reinvite()
    assert response.status == 200 and response.body == sdp("alice")
    # both 2xx were ACKed: nobody gives up and hangs up when 64*T1 have passed
    done, _ = await asyncio.wait({call.ended, theirs.ended}, timeout=64 * FAST.t1 + 0.2,
                                 return_when=asyncio.FIRST_COMPLETED)
    assert not done, f"a side ended the call: {[f.result() for f in done]}"
    assert not call.ended.done() and not theirs.ended.done()
    await call.bye()
    assert await asyncio.wait_for(theirs.ended, 2) == "remote BYE"


async def test_invite_with_replaces_moves_the_call_to_a_new_dialog_for_its_peer_only(make_ua):
    """RFC 3891 as Call.reroute uses it: the peer's INVITE with Replaces is answered by the
    UA itself with the call's own SDP, and the same Call goes on in the new dialog (the
    application's handler never sees it); anybody else gets 403, an unknown dialog 481."""
    callee = Callee()
    bob = await make_ua("bob", on_invite=callee)
    alice = await make_ua("alice")
    mallory = await make_ua("mallory")
    call = await alice.invite(target(bob), sdp("alice"))
    theirs = await established(callee)
    replaces = f"{call.call_id};to-tag={call.dialog.remote_tag};from-tag={call.dialog.local_tag}"
    with pytest.raises(CallFailed) as failed:
        await mallory.invite(target(bob), sdp("mallory"), headers=[("Replaces", replaces)])
    assert failed.value.status == 403
    with pytest.raises(CallFailed) as failed:
        await alice.invite(target(bob), sdp("alice"),
                           headers=[("Replaces", f"{call.call_id};to-tag=x;from-tag=y")])
    assert failed.value.status == 481
    new = await alice.invite(target(bob), sdp("alice"), headers=[("Replaces", replaces)])
    assert new.remote_sdp == callee.answer and len(callee.incoming) == 1
    await wait_for_async(lambda: theirs.call_id == new.call_id, 2, what="bob's Call adopting it")
    assert not theirs.ended.done() and theirs in bob.calls and len(bob.calls) == 1
    await new.bye()
    assert await asyncio.wait_for(theirs.ended, 2) == "remote BYE"
    assert bob.calls == []


async def test_a_new_offer_in_a_reinvite_is_answered_by_the_calls_on_reoffer(make_ua):
    """A re-INVITE with a new offer (a peer that moved, with an ICE restart) gets the answer
    `on_reoffer` gives, and a refused one the hook's status; the same offer again is a
    refresh answered with our current SDP without asking."""
    callee = Callee()
    bob = await make_ua("bob", on_invite=callee)
    alice = await make_ua("alice")
    call = await alice.invite(target(bob), sdp("alice"))
    theirs = await established(callee)
    offers: list[bytes] = []

    async def reoffer(offer: bytes) -> bytes:
        offers.append(offer)
        if b"refuse" in offer:
            raise CallFailed(488, "Not Acceptable Here")
        return sdp("bob-moved")

    theirs.on_reoffer = reoffer
    response = await call.reinvite(sdp("alice-moved"))
    assert response.status == 200 and response.body == sdp("bob-moved")
    assert offers == [sdp("alice-moved")] and theirs.remote_sdp == sdp("alice-moved")
    assert theirs.local_sdp == sdp("bob-moved") == call.remote_sdp
    response = await call.reinvite()   # the same offer: a refresh
    assert response.status == 200 and response.body == sdp("bob-moved") and len(offers) == 1
    response = await call.reinvite(sdp("refuse"))
    assert response.status == 488 and theirs.remote_sdp == sdp("alice-moved")
    assert not theirs.ended.done()
    await call.bye()


async def test_in_dialog_options_and_out_of_order_cseq(make_ua):
    callee = Callee()
    bob = await make_ua("bob", on_invite=callee)
    alice = await make_ua("alice")
    call = await alice.invite(target(bob), sdp("alice"))
    await established(callee)
    response = await call.request("OPTIONS")
    assert response.status == 200 and "INVITE" in (response.headers.get("Allow") or "")
    assert response.cseq == (2, "OPTIONS")
    call.dialog.local_seq = 0  # the next request goes out with CSeq 1 < 2 (§12.2.2)
    response = await call.request("OPTIONS")
    assert response.cseq == (1, "OPTIONS") and response.status == 500
    assert not call.ended.done()
    await call.bye()


async def test_bye_for_an_unknown_dialog_is_481(make_ua, raw_peers):
    bob = await make_ua("bob")
    peer = await raw_peers()
    uri = f"sip:bob@127.0.0.1:{bob.config.listen_port}"
    addr = ("127.0.0.1", bob.config.listen_port)
    peer.send(raw_request("BYE", uri, peer, call_id="nosuch", cseq=2, to_tag="nosuchtag"), addr)
    response, _ = await peer.expect(is_response(481))
    assert response.to.tag == "nosuchtag"
    peer.send(raw_request("BYE", uri, peer, call_id="nosuch2", cseq=2), addr)  # no To tag
    response, _ = await peer.expect(is_response(481))
    assert response.to.tag


@pytest.mark.parametrize("method", ["OPTIONS", "INVITE"])
async def test_require_of_an_unknown_extension_is_420(make_ua, raw_peers, method):
    callee = Callee()
    bob = await make_ua("bob", on_invite=callee)
    peer = await raw_peers()
    uri = f"sip:bob@127.0.0.1:{bob.config.listen_port}"
    addr = ("127.0.0.1", bob.config.listen_port)
    peer.send(raw_request(method, uri, peer, call_id=f"require-{method}", extra="Require: foo",
                          body=sdp("raw") if method == "INVITE" else b""), addr)
    response, _ = await peer.expect(is_response(420))
    assert response.headers.get("Unsupported") == "foo"
    assert callee.incoming == []
    if method == "INVITE":
        peer.send(raw_request("ACK", uri, peer, call_id="require-INVITE", to_tag=response.to.tag,
                              branch=response.via.branch, contact=False), addr)


@pytest.mark.parametrize("uri", ["tel:+15551234", "soap.beep://192.0.2.103:3002"])
async def test_request_uri_of_an_unsupported_scheme_is_416(make_ua, raw_peers, uri):
    bob = await make_ua("bob")
    peer = await raw_peers()
    peer.send(raw_request("OPTIONS", uri, peer, call_id="scheme", to=target(bob)),
              ("127.0.0.1", bob.config.listen_port))
    response, _ = await peer.expect(is_response(416))
    assert response.to.tag


async def test_options_out_of_dialog_is_200_with_allow(make_ua, raw_peers):
    bob = await make_ua("bob")
    alice = await make_ua("alice")
    request = alice.new_request("OPTIONS", parse_sip_uri(target(bob)))
    response = await alice.request(request)
    assert response.status == 200
    assert {m.strip() for m in (response.headers.get("Allow") or "").split(",")} == \
        {m.strip() for m in ALLOW.split(",")}
    assert response.to.tag
    # and to a scripted peer: the answer goes back with our Via untouched apart from rport
    peer = await raw_peers()
    peer.send(raw_request("OPTIONS", target(bob), peer, call_id="options-raw"),
              ("127.0.0.1", bob.config.listen_port))
    response, _ = await peer.expect(is_response(200))
    assert "INVITE" in (response.headers.get("Allow") or "")


# -- digest authentication against a scripted server ------------------------------------


class DigestPeer:
    """A scripted registrar/proxy on a RawPeer: challenges REGISTER or INVITE with `status`
    (401 or 407), checks the answer with sipmesh's DigestServer, answers 200, or to wrong
    credentials `on_bad` (403, or the challenge again as Kamailio does)."""

    def __init__(self, peer: RawPeer, status: int, algorithm: str, password: str = "secret",
                 realm: str = "sipmesh.test", on_bad: int = 403) -> None:
        self.peer = peer
        self.status = status
        self.on_bad = on_bad
        self.password = password
        self.realm = realm
        self.server = DigestServer(realm, NonceManager(), algorithms=(algorithm,))
        self.requests: list[Request] = []
        self.task = asyncio.ensure_future(self.run())

    @property
    def credentials_header(self) -> str:
        return "Authorization" if self.status == 401 else "Proxy-Authorization"

    def ha1(self, username: str, realm: str, algorithm: str) -> str | None:
        if username != "alice":
            return None
        return compute_ha1(username, realm, self.password, algorithm)

    async def run(self) -> None:
        while True:
            message, _, addr = await self.peer.inbox.get()
            if not isinstance(message, Request):
                continue
            if not any(r.via.branch == message.via.branch and r.method == message.method
                       for r in self.requests):  # a retransmission is not a new request
                self.requests.append(message)
            if message.method == "ACK":
                continue
            if message.method in ("BYE", "CANCEL"):
                self.peer.send(make_response(message, 200), addr)
                continue
            credentials = message.headers.get(self.credentials_header)
            good = credentials is not None and \
                self.server.verify(credentials, message.method, self.ha1, message.body).ok
            if credentials is None or (not good and self.on_bad == self.status):
                response = make_response(message, self.status, to_tag="challenger")
                name = "WWW-Authenticate" if self.status == 401 else "Proxy-Authenticate"
                for challenge in self.server.challenges():
                    response.headers.add(name, challenge)
            elif good:
                response = make_response(message, 200, to_tag="uas")
                response.headers.add("Contact", f"<sip:uas@{self.peer.hostport}>")
                if message.method == "INVITE":
                    response.headers.add("Content-Type", "application/sdp")
                    response.body = sdp("uas")
            else:
                response = make_response(message, self.on_bad, to_tag="uas")
            self.peer.send(response, addr)

    def of(self, method: str) -> list[Request]:
        return [r for r in self.requests if r.method == method]

    def close(self) -> None:
        self.task.cancel()


@pytest.mark.parametrize("algorithm", ["MD5", "SHA-256"])
async def test_register_answers_a_401_challenge(make_ua, raw_peers, algorithm):
    server = DigestPeer(await raw_peers(), 401, algorithm)
    try:
        alice = await make_ua("alice", domain=server.peer.hostport, password="secret")
        response = await alice.register(expires=600)
        assert response.status == 200
        first, second = server.of("REGISTER")
        assert first.call_id == second.call_id and first.from_.tag == second.from_.tag
        assert (first.cseq[0] + 1, "REGISTER") == second.cseq
        assert first.headers.get("Authorization") is None
        _, params = parse_auth_params(second.headers.get("Authorization") or "")
        assert params["username"] == "alice" and params["realm"] == "sipmesh.test"
        assert params.get("algorithm", "MD5") == algorithm and params["qop"] == "auth"
        assert second.headers.get("Expires") == "600"
        assert second.contacts[0].uri.port == alice.config.listen_port
        response = await alice.register(expires=0)  # the registration's CSeq keeps counting
        assert response.status == 200
        assert [r.cseq[0] for r in server.of("REGISTER")] == [1, 2, 3, 4]
    finally:
        server.close()


@pytest.mark.parametrize("on_bad", [401, 403])
async def test_register_with_a_wrong_password_returns_the_failure(make_ua, raw_peers, on_bad):
    server = DigestPeer(await raw_peers(), 401, "MD5", on_bad=on_bad)
    try:
        alice = await make_ua("alice", domain=server.peer.hostport, password="wrong")
        response = await alice.register()
        assert response.status == on_bad
        assert len(server.of("REGISTER")) == 2  # one answer to the challenge, no loop
    finally:
        server.close()


async def test_invite_answers_a_407_and_acks_with_the_credentials(make_ua, raw_peers):
    server = DigestPeer(await raw_peers(), 407, "SHA-256")
    try:
        alice = await make_ua("alice", domain=server.peer.hostport, password="secret")
        call = await alice.invite(f"sip:bob@{server.peer.hostport}", sdp("alice"))
        assert call.remote_sdp == sdp("uas")
        transactions: dict[str, Request] = {}
        for invite in server.of("INVITE"):  # a loaded machine may retransmit one
            transactions.setdefault(invite.via.branch, invite)
        first, second = transactions.values()
        assert first.call_id == second.call_id and first.from_.tag == second.from_.tag
        assert second.cseq == (2, "INVITE")
        await wait_for_async(lambda: len(server.of("ACK")) == 2, 3, what="two ACKs")  # the 407's ACK and the 200's
        ack_407, ack_200 = server.of("ACK")
        assert ack_407.via.branch == first.via.branch and ack_407.to.tag == "challenger"
        assert ack_200.cseq == (2, "ACK") and ack_200.to.tag == "uas"
        credentials = second.headers.get("Proxy-Authorization")
        assert credentials and ack_200.headers.get("Proxy-Authorization") == credentials
        await call.bye()
        (bye,) = server.of("BYE")
        assert bye.cseq == (3, "BYE")
    finally:
        server.close()


@pytest.mark.parametrize("on_bad", [407, 403])
async def test_invite_with_a_wrong_password_fails_with_the_status(make_ua, raw_peers, on_bad):
    server = DigestPeer(await raw_peers(), 407, "MD5", on_bad=on_bad)
    try:
        alice = await make_ua("alice", domain=server.peer.hostport, password="wrong")
        with pytest.raises(CallFailed) as failed:
            await alice.invite(f"sip:bob@{server.peer.hostport}", sdp("alice"))
        assert failed.value.status == on_bad
        assert len(server.of("INVITE")) == 2
    finally:
        server.close()


# -- transport selection and RFC 3581 -----------------------------------------------------


async def test_large_udp_request_goes_over_tcp(make_ua):
    callee = Callee()
    bob = await make_ua("bob", on_invite=callee)
    alice = await make_ua("alice")
    big = sdp("alice", extra="".join(f"a=x-filler:{i:03d} {'x' * 60}\r\n" for i in range(25)))
    assert len(big) > 1300
    call = await alice.invite(target(bob, "UDP"), big)  # the URI says UDP
    incoming = callee.incoming[0]
    assert incoming.txn.flow.transport == "TCP" and incoming.request.via.transport == "TCP"
    assert incoming.sdp == big
    theirs = await established(callee)
    await call.bye()
    assert await asyncio.wait_for(theirs.ended, 2) == "remote BYE"


async def test_responses_honour_rport_and_otherwise_the_via_port(make_ua, raw_peers):
    bob = await make_ua("bob")
    peer, sent_by = await raw_peers(), await raw_peers()
    uri = f"sip:bob@127.0.0.1:{bob.config.listen_port}"
    addr = ("127.0.0.1", bob.config.listen_port)
    peer.send(raw_request("OPTIONS", uri, peer, call_id="rport-1", via_port=sent_by.port), addr)
    response, _ = await peer.expect(is_response(200))
    assert response.via.rport == peer.port and response.via.received == "127.0.0.1"
    assert response.via.port == sent_by.port
    # without rport the response goes to the sent-by port (§18.2.2)
    peer.send(raw_request("OPTIONS", uri, peer, call_id="rport-2", via_port=sent_by.port,
                          rport=False), addr)
    response, _ = await sent_by.expect(is_response(200))
    assert "rport" not in response.via.params
    # a fence: a third answer reaches `peer` after anything Bob sent it for rport-2
    peer.send(raw_request("OPTIONS", uri, peer, call_id="rport-3"), addr)
    await peer.expect(lambda m: isinstance(m, Response) and m.call_id == "rport-3",
                      what="the answer to rport-3")
    assert [m.call_id for _, m in peer.log] == ["rport-1", "rport-3"]
