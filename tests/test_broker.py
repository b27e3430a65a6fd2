"""The broker over real loopback sockets, in-process: sipmesh user agents and raw SIP
endpoints register, call, fork, cancel and misbehave through it."""

from __future__ import annotations

import asyncio
import re
import secrets
from pathlib import Path

import pytest

from sipmesh.broker.ratelimit import LoadShedder
from sipmesh.broker.server import Broker
from sipmesh.broker.users import UsersFile
from sipmesh.sip.auth import DigestClient, is_stale, parse_auth_params
from sipmesh.sip.message import Request, Response, parse_message
from sipmesh.sip.transport.base import response_target
from sipmesh.sip.uri import parse_sip_uri
from sipmesh.sip.ua import CallFailed, IncomingCall, UAConfig, UserAgent
from tests.peers.broker import (SDP_A, SDP_B, answering, make_broker, make_ua,  # noqa: F401 (fixtures)
                                raw_register, sip)
from tests.peers.raw import RawPeer


# ------------------------------------------------------------------ calls between sipmesh UAs

@pytest.mark.parametrize("caller_transport,callee_transport", [("UDP", "UDP"), ("TCP", "TCP"),
                                                               ("UDP", "TCP"), ("TCP", "UDP")])
async def test_two_user_agents_call_each_other_through_the_broker(make_broker, make_ua,
                                                                  caller_transport, callee_transport):
    broker = await make_broker()
    seen: list[IncomingCall] = []
    alice = await make_ua("alice", broker, transport=caller_transport)
    bob = await make_ua("bob", broker, transport=callee_transport, on_invite=answering(SDP_B, seen))
    assert (await alice.register()).status == 200
    assert (await bob.register()).status == 200
    call = await alice.invite("bob", SDP_A, timeout=10)
    assert call.remote_sdp == SDP_B  # SDP passes untouched both ways
    assert seen[0].sdp == SDP_A
    assert seen[0].request.headers.get("Record-Route")  # the broker stays in the dialog
    assert call.dialog.route_set, "the caller learned the route set"
    bob_call = bob.calls[0]
    response = await call.bye()
    assert response is None or response.status == 200
    await asyncio.wait_for(bob_call.ended, 5)


async def test_callee_hangs_up_through_the_record_route(make_broker, make_ua):
    broker = await make_broker()
    alice = await make_ua("alice", broker)
    bob = await make_ua("bob", broker, transport="TCP", on_invite=answering(SDP_B))
    await alice.register()
    await bob.register()
    call = await alice.invite("bob", SDP_A, timeout=10)
    await asyncio.wait_for(bob.calls[0].acked.wait(), 5)
    await bob.calls[0].bye()
    assert await asyncio.wait_for(call.ended, 5) == "remote BYE"


# ------------------------------------------------------------------ registrar over the wire

async def test_register_lists_every_binding_and_refreshes_and_removes(make_broker, raw_peers):
    broker = await make_broker()
    peer = await raw_peers()
    cid = "reg-" + secrets.token_hex(4)
    r = await raw_register(peer, broker, "carol", call_id=cid, cseq=1, contact="<sip:carol@127.0.0.1:5999>;q=0.3")
    assert r.status == 200 and r.to.tag
    r = await raw_register(peer, broker, "carol", call_id=cid, cseq=2,
                           contact=f"<sip:carol@127.0.0.1:{peer.port}>;q=0.8")
    contacts = r.headers.get_all("Contact")
    assert contacts == [f"<sip:carol@127.0.0.1:{peer.port}>;expires=600;q=0.8",
                        "<sip:carol@127.0.0.1:5999>;expires=600;q=0.3"]
    r = await raw_register(peer, broker, "carol", call_id=cid, cseq=3, contact="<sip:carol@127.0.0.1:5999>",
                           expires=0)
    assert r.headers.get_all("Contact") == [f"<sip:carol@127.0.0.1:{peer.port}>;expires=600;q=0.8"]
    r = await raw_register(peer, broker, "carol", call_id=cid, cseq=2,
                           contact=f"<sip:carol@127.0.0.1:{peer.port}>", expires=0)
    assert r.status == 500  # out-of-order CSeq for the same Call-ID: that binding stays
    r = await raw_register(peer, broker, "carol", call_id=cid, cseq=4, contact="*", expires=0)
    assert r.status == 200 and not r.headers.get_all("Contact")
    r = await raw_register(peer, broker, "carol", cseq=1, expires=5)
    assert r.status == 423 and r.headers.get("Min-Expires") == "60"


async def test_retransmitted_register_gets_the_same_answer(make_broker, raw_peers):
    broker = await make_broker()
    peer = await raw_peers()
    text = sip("REGISTER", f"sip:{broker.hostport}", peer, user="dave", to=f"<sip:dave@{broker.hostport}>",
               call_id="rtx-1", headers=["Expires: 600"])
    peer.send(text, broker.address())
    first = await peer.final("rtx-1")
    peer.send(text, broker.address())  # same branch, Call-ID and CSeq: not a new request
    second = await peer.final("rtx-1")
    assert first.status == second.status == 200
    assert first.to.tag == second.to.tag


async def test_register_for_another_domain_is_refused(make_broker, raw_peers):
    broker = await make_broker()
    peer = await raw_peers()
    text = sip("REGISTER", f"sip:{broker.hostport}", peer, user="eve", to="<sip:eve@example.com>",
               call_id="foreign-aor", headers=["Expires: 600"])
    peer.send(text, broker.address())
    assert (await peer.final("foreign-aor")).status == 404


# ------------------------------------------------------------------ the broker as a UAS

async def test_options_to_the_broker_lists_what_it_supports(make_broker, raw_peers):
    broker = await make_broker()
    peer = await raw_peers()
    peer.send(sip("OPTIONS", f"sip:{broker.hostport}", peer, call_id="opt-1",
                  headers=["Accept: application/sdp"]), broker.address())
    r = await peer.final("opt-1")
    assert r.status == 200
    for name in ("Allow", "Accept", "Supported"):
        assert name in r.headers, name
    assert "INVITE" in r.headers.get("Allow") and "REGISTER" in r.headers.get("Allow")


async def test_known_method_to_the_broker_is_405_unknown_is_501(make_broker, raw_peers):
    broker = await make_broker()
    peer = await raw_peers()
    peer.send(sip("MESSAGE", f"sip:{broker.hostport}", peer, call_id="m-1"), broker.address())
    r = await peer.final("m-1")
    assert r.status == 405 and "REGISTER" in (r.headers.get("Allow") or "")
    peer.send(sip("FROBNICATE", f"sip:{broker.hostport}", peer, call_id="m-2"), broker.address())
    assert (await peer.final("m-2")).status == 501


async def test_unknown_method_to_a_user_is_forwarded(make_broker, raw_peers):
    broker = await make_broker()
    bob, caller = await raw_peers(), await raw_peers()
    await raw_register(bob, broker, "bob")
    caller.send(sip("FROBNICATE", f"sip:bob@{broker.hostport}", caller, call_id="frob"), broker.address())
    request = await bob.request("FROBNICATE")
    bob.reply(request, 200, to_tag="b1")
    assert (await caller.final("frob")).status == 200


# ------------------------------------------------------------------ routing decisions

async def test_unknown_user_404_and_user_without_binding_480(make_broker, raw_peers, make_ua):
    broker = await make_broker()
    peer = await raw_peers()
    peer.send(sip("INVITE", f"sip:nobody@{broker.hostport}", peer, call_id="inv-404", body=SDP_A),
              broker.address())
    assert (await peer.final("inv-404")).status == 404
    gone = await make_ua("gone", broker)
    assert (await gone.register()).status == 200
    assert (await gone.register(expires=0)).status == 200
    peer.send(sip("INVITE", f"sip:gone@{broker.hostport}", peer, call_id="inv-480", body=SDP_A),
              broker.address())
    assert (await peer.final("inv-480")).status == 480


async def test_max_forwards_zero_is_483(make_broker, raw_peers):
    broker = await make_broker()
    bob, caller = await raw_peers(), await raw_peers()
    await raw_register(bob, broker, "bob")
    text = sip("INVITE", f"sip:bob@{broker.hostport}", caller, call_id="mf0", body=SDP_A)
    caller.send(text.replace("Max-Forwards: 70", "Max-Forwards: 0"), broker.address())
    assert (await caller.final("mf0")).status == 483


async def test_a_loop_back_to_the_broker_is_482(make_broker, raw_peers):
    """`loop` forwards its calls to itself through a proxy (here: `relay`, a dumb
    stateless proxy): the same request comes back to the broker."""
    broker = await make_broker()
    relay, caller = await raw_peers(), await raw_peers()
    await raw_register(relay, broker, "loop")

    async def relaying() -> None:
        while True:
            message, _ = await relay.recv(timeout=10)
            if isinstance(message, Request):
                message.uri = parse_sip_uri(f"sip:loop@{broker.hostport}")  # "forward to myself"
                branch = "z9hG4bKrelay" + secrets.token_hex(4)
                message.headers.add("Via", f"SIP/2.0/UDP 127.0.0.1:{relay.port};branch={branch}", first=True)
                relay.send(message, broker.address())
            elif message.status > 100:
                message.headers.pop_first("Via")
                flow = response_target(message)
                relay.send(message, (flow.host, flow.port))

    task = asyncio.ensure_future(relaying())
    try:
        caller.send(sip("INVITE", f"sip:loop@{broker.hostport}", caller, call_id="loop-1", body=SDP_A),
                    broker.address())
        assert (await caller.final("loop-1", timeout=5)).status == 482
    finally:
        task.cancel()


async def test_foreign_domains_are_not_relayed(make_broker, raw_peers):
    broker = await make_broker()
    caller = await raw_peers()
    caller.send(sip("INVITE", "sip:bob@example.com", caller, call_id="relay", body=SDP_A), broker.address())
    r = await caller.final("relay")
    assert r.status == 403 and "relay" in r.reason.lower()


async def test_foreign_domains_are_forwarded_when_configured(make_broker, raw_peers):
    broker = await make_broker(forward_foreign=True)
    other, caller = await raw_peers(), await raw_peers()
    # 127.0.0.1 with another port is another server, not us
    caller.send(sip("INVITE", f"sip:bob@127.0.0.1:{other.port}", caller, call_id="fwd", body=SDP_A),
                broker.address())
    invite = await other.request("INVITE")
    assert str(invite.uri) == f"sip:bob@127.0.0.1:{other.port}" and invite.headers.get("Max-Forwards") == "69"
    other.reply(invite, 404, to_tag="o")
    assert (await caller.final("fwd")).status == 404


async def test_timer_c_cancels_a_branch_that_rings_forever(make_broker, raw_peers):
    broker = await make_broker(timer_c=0.5)
    bob, caller = await raw_peers(), await raw_peers()
    await raw_register(bob, broker, "bob")
    caller.send(sip("INVITE", f"sip:bob@{broker.hostport}", caller, call_id="timer-c", body=SDP_A),
                broker.address())
    invite = await bob.request("INVITE")
    bob.reply(invite, 180, to_tag="b")
    cancel = await bob.request("CANCEL", timeout=3)
    bob.reply(cancel, 200)
    bob.reply(invite, 487, to_tag="b")
    assert (await caller.final("timer-c")).status == 487


async def test_responses_follow_via_received_and_rport(make_broker, raw_peers):
    """A client behind NAT puts an unreachable address in its Via; the answer goes to
    where the request really came from."""
    broker = await make_broker()
    peer = await raw_peers()
    text = sip("OPTIONS", f"sip:{broker.hostport}", peer, call_id="nat-1", via_port=9)
    peer.send(text.replace("Via: SIP/2.0/UDP 127.0.0.1:9", "Via: SIP/2.0/UDP 10.99.0.1:9"), broker.address())
    r = await peer.final("nat-1")
    assert r.status == 200 and r.via.received == "127.0.0.1" and r.via.rport == peer.port


async def invite_natted(broker: Broker, raw_peers, call_id: str) -> tuple[RawPeer, RawPeer, Request]:
    """A UA registered from behind NAT (`natted`; its Contact names a private address, its
    REGISTER came from natted's port), INVITEd by `caller`: (natted, caller, the INVITE)."""
    natted, caller = await raw_peers(), await raw_peers()
    await raw_register(natted, broker, "nat", contact="<sip:nat@10.99.0.1:5060>")
    caller.send(sip("INVITE", f"sip:nat@{broker.hostport}", caller, call_id=call_id, body=SDP_A),
                broker.address())
    return natted, caller, await natted.request("INVITE")


async def test_nated_user_is_reached_where_its_register_came_from(make_broker, raw_peers):
    broker = await make_broker()
    natted, caller, invite = await invite_natted(broker, raw_peers, "nat-inv")
    assert str(invite.uri) == "sip:nat@10.99.0.1:5060"
    assert invite.body == SDP_A
    natted.reply(invite, 486, to_tag="n1")
    assert (await caller.final("nat-inv")).status == 486


def in_dialog(method: str, target: str, routes: list[str], peer: RawPeer, invite: Request,
              response: Response, *, cseq: int, from_caller: bool = True) -> str:
    """An in-dialog request as text: Request-URI `target`, Route `routes` (§12.2.1.1)."""
    ours, theirs = ((invite.headers.get("From"), response.headers.get("To")) if from_caller
                    else (response.headers.get("To"), invite.headers.get("From")))
    lines = [f"{method} {target} SIP/2.0",
             f"Via: SIP/2.0/UDP 127.0.0.1:{peer.port};branch=z9hG4bK{secrets.token_hex(8)};rport",
             "Max-Forwards: 70", f"From: {ours}", f"To: {theirs}",
             f"Call-ID: {invite.call_id}", f"CSeq: {cseq} {method}",
             *[f"Route: {route}" for route in routes], "Content-Length: 0"]
    return "\r\n".join(lines) + "\r\n\r\n"


async def test_in_dialog_requests_reach_a_natted_callee_on_its_flow(make_broker, raw_peers):
    """The callee's 200 names its private address; the broker marks that Contact with the
    flow it came on (;alias=, like Kamailio's set_contact_alias), and the caller's ACK and
    BYE, sent to that Contact through the broker, arrive on the callee's flow."""
    broker = await make_broker()
    natted, caller, invite = await invite_natted(broker, raw_peers, "nat-dlg")
    natted.reply(invite, 200, to_tag="n1", body=SDP_B, headers=[
        ("Contact", "<sip:nat@10.99.0.1:5060>"), *[("Record-Route", v) for v in invite.headers.get_all("Record-Route")]])
    ok = await caller.final("nat-dlg")
    assert ok.status == 200
    target = ok.contacts[0].uri
    assert target.host == "10.99.0.1" and target.params["alias"] == f"127.0.0.1~{natted.port}~1"
    routes = list(reversed(ok.headers.get_all("Record-Route")))
    for method, cseq in (("ACK", 1), ("INFO", 2), ("BYE", 3)):
        caller.send(in_dialog(method, str(target), routes, caller, invite, ok, cseq=cseq),
                    broker.address())
        request = await natted.request(method)
        assert str(request.uri) == "sip:nat@10.99.0.1:5060"  # its own Contact, alias removed
        if method != "ACK":
            natted.reply(request, 200)
            assert (await caller.final("nat-dlg", method=method)).status == 200


async def test_a_natted_callers_contact_is_marked_so_the_callees_bye_reaches_it(make_broker, raw_peers):
    broker = await make_broker()
    callee, natted = await raw_peers(), await raw_peers()
    await raw_register(callee, broker, "bob")
    # Sent from natted's port, but its Via and Contact name a private address.
    text = sip("INVITE", f"sip:bob@{broker.hostport}", natted, call_id="nat-caller", body=SDP_A,
               via_port=5060)
    text = text.replace("Via: SIP/2.0/UDP 127.0.0.1:5060", "Via: SIP/2.0/UDP 10.99.0.2:5060")
    text = text.replace(f"Contact: <sip:alice@127.0.0.1:{natted.port}>", "Contact: <sip:alice@10.99.0.2:5060>")
    natted.send(text, broker.address())
    invite = await callee.request("INVITE")
    contact = invite.contacts[0].uri
    assert contact.host == "10.99.0.2" and contact.params["alias"] == f"127.0.0.1~{natted.port}~1"
    ok = callee.reply(invite, 200, to_tag="b1", body=SDP_B, headers=[
        ("Contact", f"<sip:bob@127.0.0.1:{callee.port}>"),
        *[("Record-Route", v) for v in invite.headers.get_all("Record-Route")]])
    assert (await natted.final("nat-caller")).status == 200
    routes = invite.headers.get_all("Record-Route")
    callee.send(in_dialog("BYE", str(contact), routes, callee, invite, ok, cseq=1, from_caller=False),
                broker.address())
    bye = await natted.request("BYE")
    assert str(bye.uri) == "sip:alice@10.99.0.2:5060"


async def test_a_bye_reaches_a_natted_caller_on_the_tcp_connection_its_invite_came_on(
        make_broker, raw_peers):
    """A UA behind NAT sends a large INVITE over TCP (RFC 3261 §18.1.1) with its usual
    Contact, no ;transport=tcp (a mesh member's, with ICE candidates): the alias names its
    TCP connection, and the callee's BYE arrives there, not over UDP at the Contact."""
    broker = await make_broker()
    callee = await raw_peers()
    await raw_register(callee, broker, "bob")
    reader, writer = await asyncio.open_connection(*broker.address("TCP"))
    try:
        text = sip("INVITE", f"sip:bob@{broker.hostport}", callee, call_id="nat-tcp",
                   body=SDP_A)   # Via and Contact: a private address of the caller's own
        text = re.sub(r"Via: SIP/2.0/UDP [\d.:]+", "Via: SIP/2.0/TCP 127.0.0.2:5060", text)
        text = re.sub(r"Contact: <[^>]*>", "Contact: <sip:alice@127.0.0.2:5060>", text)
        writer.write(text.encode())
        await writer.drain()
        invite = await callee.request("INVITE")
        contact = invite.contacts[0].uri
        assert contact.params["alias"].endswith("~2"), contact   # Kamailio's PROTO_TCP
        ok = callee.reply(invite, 200, to_tag="b1", body=SDP_B, headers=[
            ("Contact", f"<sip:bob@127.0.0.1:{callee.port}>"),
            *[("Record-Route", v) for v in invite.headers.get_all("Record-Route")]])
        callee.send(in_dialog("BYE", str(contact), invite.headers.get_all("Record-Route"),
                              callee, invite, ok, cseq=1, from_caller=False), broker.address())
        received = b""
        while b"BYE sip:" not in received:
            chunk = await asyncio.wait_for(reader.read(65536), 5)
            assert chunk, received.decode()
            received += chunk
        assert b"BYE sip:alice@127.0.0.2:5060 SIP/2.0\r\n" in received, received.decode()
    finally:
        writer.close()


async def test_an_in_dialog_request_takes_its_alias_flow_whatever_the_contact_names(
        make_broker, raw_peers):
    """A UA behind NAT whose INVITE was large went over TCP: its Contact names no
    transport (UDP), its alias the TCP connection. A request to it in the dialog (the
    peer's BYE, the re-INVITE of a peer that moved) takes that connection, as Kamailio's
    handle_ruri_alias() does, not the Contact's address over UDP."""
    broker = await make_broker()
    host, port = broker.address()
    caller = await raw_peers()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        natted = writer.get_extra_info("sockname")[1]
        options = sip("OPTIONS", f"sip:{host}:{port}", caller, call_id="alias-hold")
        writer.write(options.replace("SIP/2.0/UDP", "SIP/2.0/TCP").encode())
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)  # the broker holds it now
        idle = await raw_peers()   # where the Contact points: the BYE must not go there
        text = sip("BYE", f"sip:nat@127.0.0.1:{idle.port};alias=127.0.0.1~{natted}~2", caller,
                   call_id="alias-tcp", to="<sip:nat@127.0.0.1>;tag=x1",
                   headers=[f"Route: <sip:{host}:{port};lr>"])
        caller.send(text, broker.address())
        data = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
        assert data.startswith(f"BYE sip:nat@127.0.0.1:{idle.port} SIP/2.0".encode()), data
        assert idle.inbox.empty()
    finally:
        writer.close()


async def test_a_request_for_a_lost_tcp_flow_fails_with_430(make_broker, raw_peers):
    """An alias naming a TCP connection the broker does not hold: it is never opened
    towards a NAT; 430 Flow Failed tells the caller (RFC 5626 §5.3)."""
    broker = await make_broker()
    caller = await raw_peers()
    host, port = broker.address()
    text = sip("BYE", f"sip:nat@10.99.0.1:5060;transport=tcp;alias=127.0.0.1~9~2", caller,
               call_id="lost-flow", to="<sip:nat@127.0.0.1>;tag=x1",
               headers=[f"Route: <sip:{host}:{port};lr>"])
    caller.send(text, broker.address())
    assert (await caller.final("lost-flow")).status == 430


async def test_the_broker_answers_stun_binding_requests_on_its_sip_port(make_broker):
    """RFC 5626 §8 / RFC 7983: the first byte tells STUN from SIP on the same UDP port."""
    from aioice import stun

    broker = await make_broker()
    client = RawPeer()  # its socket read here, by hand: STUN is no SIP for its parser
    loop = asyncio.get_running_loop()

    async def datagram() -> bytes:
        return await asyncio.wait_for(loop.sock_recv(client.sock, 65535), 3)

    request = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    client.send(bytes(request), broker.address())
    answer = stun.parse_message(await datagram())
    assert answer.message_class == stun.Class.RESPONSE
    assert answer.transaction_id == request.transaction_id
    assert answer.attributes["XOR-MAPPED-ADDRESS"] == ("127.0.0.1", client.port)
    # An RFC 3489 client (no magic cookie) gets the plain MAPPED-ADDRESS.
    old = bytearray(bytes(request))
    old[4:8] = b"\x00\x01\x02\x03"
    client.send(bytes(old), broker.address())
    assert stun.parse_message(await datagram()).attributes["MAPPED-ADDRESS"] == ("127.0.0.1", client.port)
    # Responses, indications and garbage are not answered; SIP on the port still works
    # (UDP on loopback keeps the order: the OPTIONS answer is the next datagram).
    for junk in (bytes(stun.Message(stun.Method.BINDING, stun.Class.RESPONSE)),
                 bytes(stun.Message(stun.Method.BINDING, stun.Class.INDICATION)),
                 b"\x00\x01\x00\x08" + b"\xff" * 16):
        client.send(junk, broker.address())
    client.send(sip("OPTIONS", f"sip:{broker.hostport}", client, call_id="after-stun"), broker.address())
    assert parse_message(await datagram()).headers.get("Call-ID") == "after-stun"
    client.close()


# ------------------------------------------------------------------ forking and CANCEL

async def _two_contacts(broker: Broker, raw_peers) -> tuple[RawPeer, RawPeer, RawPeer]:
    a, b, caller = await raw_peers(), await raw_peers(), await raw_peers()
    await raw_register(a, broker, "fork", call_id="fork-a")
    await raw_register(b, broker, "fork", call_id="fork-b")
    return a, b, caller


async def test_forking_first_200_wins_and_the_other_branch_is_cancelled(make_broker, raw_peers):
    broker = await make_broker()
    a, b, caller = await _two_contacts(broker, raw_peers)
    caller.send(sip("INVITE", f"sip:fork@{broker.hostport}", caller, call_id="fork-1", body=SDP_A),
                broker.address())
    inv_a, inv_b = await a.request("INVITE"), await b.request("INVITE")
    assert inv_a.body == inv_b.body == SDP_A
    a.reply(inv_a, 180, to_tag="ta")
    b.reply(inv_b, 180, to_tag="tb")
    ringing, _ = await caller.expect(lambda m: isinstance(m, Response) and m.status == 180, 3.0)
    assert ringing.call_id == "fork-1"
    a.reply(inv_a, 200, to_tag="ta", body=SDP_B, headers=[("Contact", f"<sip:fork@127.0.0.1:{a.port}>")])
    ok = await caller.final("fork-1")
    assert ok.status == 200 and ok.body == SDP_B and ok.to.tag == "ta"
    cancel = await b.request("CANCEL")
    assert cancel.via.branch == inv_b.via.branch and "Call completed elsewhere" in (cancel.headers.get("Reason") or "")
    b.reply(cancel, 200)
    b.reply(inv_b, 487, to_tag="tb")
    ack = await b.request("ACK")  # hop-by-hop ACK for the 487 from the broker
    assert ack.via.branch == inv_b.via.branch


async def test_6xx_ends_the_search_and_cancels_the_other_branches(make_broker, raw_peers):
    broker = await make_broker()
    a, b, caller = await _two_contacts(broker, raw_peers)
    caller.send(sip("INVITE", f"sip:fork@{broker.hostport}", caller, call_id="fork-6", body=SDP_A),
                broker.address())
    inv_a, inv_b = await a.request("INVITE"), await b.request("INVITE")
    b.reply(inv_b, 180, to_tag="tb")
    a.reply(inv_a, 603, to_tag="ta")
    cancel = await b.request("CANCEL")
    b.reply(cancel, 200)
    b.reply(inv_b, 487, to_tag="tb")
    assert (await caller.final("fork-6")).status == 603


async def test_best_response_prefers_4xx_over_5xx_and_never_passes_503(make_broker, raw_peers):
    broker = await make_broker()
    a, b, caller = await _two_contacts(broker, raw_peers)
    caller.send(sip("INVITE", f"sip:fork@{broker.hostport}", caller, call_id="best-1", body=SDP_A),
                broker.address())
    inv_a, inv_b = await a.request("INVITE"), await b.request("INVITE")
    a.reply(inv_a, 503, to_tag="ta")
    b.reply(inv_b, 486, to_tag="tb")
    assert (await caller.final("best-1")).status == 486
    caller.send(sip("INVITE", f"sip:fork@{broker.hostport}", caller, call_id="best-2", body=SDP_A),
                broker.address())
    inv_a, inv_b = await a.request("INVITE"), await b.request("INVITE")
    a.reply(inv_a, 503, to_tag="ta")
    b.reply(inv_b, 503, to_tag="tb")
    assert (await caller.final("best-2")).status == 500


async def test_a_branch_failing_at_once_does_not_end_the_search(make_broker, raw_peers):
    broker = await make_broker()  # no TLS listener: a tls contact fails at once
    live, caller = await raw_peers(), await raw_peers()
    await raw_register(live, broker, "mix", call_id="mix-1", contact="<sip:mix@127.0.0.1:5999;transport=tls>")
    await raw_register(live, broker, "mix", call_id="mix-2")
    caller.send(sip("INVITE", f"sip:mix@{broker.hostport}", caller, call_id="mix-inv", body=SDP_A),
                broker.address())
    invite = await live.request("INVITE")
    live.reply(invite, 200, to_tag="m", body=SDP_B, headers=[("Contact", f"<sip:mix@127.0.0.1:{live.port}>")])
    assert (await caller.final("mix-inv")).status == 200


async def test_caller_cancel_reaches_the_callee(make_broker, make_ua, raw_peers):
    broker = await make_broker()
    bob = await raw_peers()
    await raw_register(bob, broker, "bob")
    alice = await make_ua("alice", broker)
    calling = asyncio.ensure_future(alice.invite("bob", SDP_A, timeout=1.0))
    invite = await bob.request("INVITE")
    bob.reply(invite, 180, to_tag="bt")
    cancel = await bob.request("CANCEL", timeout=5)
    assert cancel.via.branch == invite.via.branch
    bob.reply(cancel, 200)
    bob.reply(invite, 487, to_tag="bt")
    with pytest.raises(CallFailed) as failed:
        await calling
    assert failed.value.status == 487


# ------------------------------------------------------------------ redirect mode

async def test_redirect_mode_answers_302_with_the_contacts(make_broker, raw_peers):
    broker = await make_broker(mode="redirect")
    a, b, caller = await raw_peers(), await raw_peers(), await raw_peers()
    await raw_register(a, broker, "red", call_id="red-a", contact=f"<sip:red@127.0.0.1:{a.port}>;q=0.4")
    await raw_register(b, broker, "red", call_id="red-b", contact=f"<sip:red@127.0.0.1:{b.port}>;q=0.9")
    caller.send(sip("INVITE", f"sip:red@{broker.hostport}", caller, call_id="red-1", body=SDP_A),
                broker.address())
    r = await caller.final("red-1")
    assert r.status == 302
    contacts = r.headers.get_all("Contact")
    assert contacts[0].startswith(f"<sip:red@127.0.0.1:{b.port}>;q=0.9;expires=")
    assert contacts[1].startswith(f"<sip:red@127.0.0.1:{a.port}>;q=0.4;expires=")
    assert a.inbox.empty() and b.inbox.empty()  # nothing was forwarded


# ------------------------------------------------------------------ protection

async def test_rate_limit_answers_503_with_retry_after(make_broker, raw_peers):
    broker = await make_broker(rate_limit=5.0, rate_burst=5.0)
    peer = await raw_peers()
    for i in range(30):
        peer.send(sip("OPTIONS", f"sip:{broker.hostport}", peer, call_id=f"burst-{i}"), broker.address())
    statuses = []
    for _ in range(30):
        r, _ = await peer.expect(lambda m: isinstance(m, Response), 3.0)
        statuses.append(r.status)
        if r.status == 503:
            assert int(r.headers.get("Retry-After")) >= 1
    assert statuses.count(200) >= 5 and statuses.count(503) >= 15


async def test_an_overloaded_broker_refuses_new_work_with_503_and_recovers(make_broker, raw_peers):
    broker = await make_broker()
    bob, caller = await raw_peers(), await raw_peers()
    await raw_register(bob, broker, "bob")
    load = [1.0]  # pretend the receive queue is full
    broker.shedder = LoadShedder([], interval=0.0, measure=lambda: load[0])
    caller.send(sip("INVITE", f"sip:bob@{broker.hostport}", caller, call_id="shed-1", body=SDP_A),
                broker.address())
    refused = await caller.final("shed-1")
    assert refused.status == 503 and refused.headers.get("Retry-After") == "2" and refused.to.tag
    r = await raw_register(caller, broker, "carol")
    assert r.status == 503
    assert bob.inbox.empty()  # nothing was forwarded
    load[0] = 0.0
    caller.send(sip("INVITE", f"sip:bob@{broker.hostport}", caller, call_id="shed-2", body=SDP_A),
                broker.address())
    invite = await bob.request("INVITE")
    bob.reply(invite, 486, to_tag="b")
    assert (await caller.final("shed-2")).status == 486
    assert broker.counters.shed == 2


async def test_malformed_datagrams_do_not_stop_the_broker(make_broker, raw_peers):
    broker = await make_broker()
    peer = await raw_peers()
    garbage = [b"\x00\xff" * 200, b"INVITE\r\n\r\n", b"SIP/2.0 200 OK\r\n\r\n", b"REGISTER sip:x SIP/2.0\r\n",
               b"OPTIONS sip:a SIP/2.0\r\nVia: garbage\r\nContent-Length: 99999\r\n\r\n",
               b"X" * 60_000, b"\r\n\r\n",
               ("INVITE sip:bob@127.0.0.1 SIP/2.0\r\n" + "X-Many: 1\r\n" * 500 + "\r\n").encode()]
    for data in garbage:
        peer.send(data, broker.address())
    peer.send(sip("OPTIONS", f"sip:{broker.hostport}", peer, call_id="after-garbage"), broker.address())
    assert (await peer.final("after-garbage", timeout=5)).status == 200


# ------------------------------------------------------------------ digest authentication

REALM = "127.0.0.1"


@pytest.fixture
def users_file(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    users = UsersFile(path)
    users.add(REALM, "alice", "alice-pw")
    users.add(REALM, "bob", "bob-pw")
    users.add("localhost", "carol", "carol-pw")
    users.save()
    return path


async def test_user_agents_authenticate_register_and_call(make_broker, make_ua, users_file):
    broker = await make_broker(users_file=users_file)
    alice = await make_ua("alice", broker, password="alice-pw")
    bob = await make_ua("bob", broker, password="bob-pw", on_invite=answering(SDP_B))
    assert (await alice.register()).status == 200
    assert (await bob.register()).status == 200
    call = await alice.invite("bob", SDP_A, timeout=10)  # 407, then with credentials
    assert call.remote_sdp == SDP_B
    await call.bye()


async def test_wrong_password_is_refused(make_broker, make_ua, users_file):
    broker = await make_broker(users_file=users_file)
    alice = await make_ua("alice", broker, password="not-it")
    assert (await alice.register()).status == 401
    assert broker.location.count() == 0


async def test_unauthenticated_invite_gets_407(make_broker, raw_peers, users_file):
    broker = await make_broker(users_file=users_file)
    peer = await raw_peers()
    peer.send(sip("INVITE", f"sip:bob@{broker.hostport}", peer, call_id="noauth", body=SDP_A),
              broker.address())
    r = await peer.final("noauth")
    assert r.status == 407
    algorithms = {parse_auth_params(v)[1].get("algorithm") for v in r.headers.get_all("Proxy-Authenticate")}
    assert algorithms == {"SHA-256", "MD5"}


async def test_callers_from_other_domains_are_refused_when_auth_is_on(make_broker, raw_peers, users_file):
    broker = await make_broker(users_file=users_file)
    peer = await raw_peers()
    peer.send(sip("INVITE", f"sip:bob@{broker.hostport}", peer, call_id="alien", body=SDP_A,
                  domain="example.com"), broker.address())
    assert (await peer.final("alien")).status == 403


async def _challenge(peer: RawPeer, broker: Broker, user: str, call_id: str, *, to_user: str | None = None,
                     domain: str = "127.0.0.1") -> tuple[str, Response]:
    host, port = broker.address()
    uri = f"sip:{domain}:{port}"
    text = sip("REGISTER", uri, peer, user=user, to=f"<sip:{to_user or user}@{domain}:{port}>",
               call_id=call_id, cseq=1, headers=["Expires: 600"], domain=f"{domain}:{port}")
    peer.send(text, (host, port))
    r = await peer.final(call_id)
    assert r.status == 401
    return uri, r


def _pick(response: Response, algorithm: str) -> str:
    for value in response.headers.get_all("WWW-Authenticate"):
        if parse_auth_params(value)[1].get("algorithm") == algorithm:
            return value
    raise AssertionError(f"no {algorithm} challenge")


async def _authorized_register(peer: RawPeer, broker: Broker, uri: str, user: str, call_id: str, cseq: int,
                               authorization: str, *, to_user: str | None = None,
                               domain: str = "127.0.0.1") -> Response:
    host, port = broker.address()
    text = sip("REGISTER", uri, peer, user=user, to=f"<sip:{to_user or user}@{domain}:{port}>",
               call_id=call_id, cseq=cseq, headers=["Expires: 600", f"Authorization: {authorization}"],
               domain=f"{domain}:{port}")
    peer.send(text, (host, port))
    return await peer.final(call_id)


@pytest.mark.parametrize("algorithm", ["MD5", "SHA-256"])
async def test_md5_and_sha256_both_work(make_broker, raw_peers, users_file, algorithm):
    broker = await make_broker(users_file=users_file)
    peer = await raw_peers()
    uri, challenge = await _challenge(peer, broker, "alice", f"alg-{algorithm}")
    auth = DigestClient("alice", "alice-pw").authorize(_pick(challenge, algorithm), "REGISTER", uri)
    assert f"algorithm={algorithm}" in auth
    r = await _authorized_register(peer, broker, uri, "alice", f"alg-{algorithm}", 2, auth)
    assert r.status == 200 and r.headers.get_all("Contact")


async def test_a_retransmitted_register_is_challenged_afresh_and_either_nonce_works(make_broker, raw_peers,
                                                                                      users_file):
    broker = await make_broker(users_file=users_file)
    peer = await raw_peers()
    host, port = broker.address()
    uri = f"sip:127.0.0.1:{port}"
    text = sip("REGISTER", uri, peer, user="alice", to=f"<sip:alice@127.0.0.1:{port}>", call_id="rtx-401",
               cseq=1, headers=["Expires: 600"], domain=f"127.0.0.1:{port}")
    peer.send(text, (host, port))
    first = await peer.final("rtx-401")
    peer.send(text, (host, port))  # its 401 was lost: a challenge costs nothing, so a new one
    second = await peer.final("rtx-401")
    assert first.status == second.status == 401 and first.to.tag == second.to.tag
    nonces = [parse_auth_params(_pick(r, "MD5"))[1]["nonce"] for r in (first, second)]
    assert nonces[0] != nonces[1]
    auth = DigestClient("alice", "alice-pw").authorize(_pick(first, "MD5"), "REGISTER", uri)
    assert (await _authorized_register(peer, broker, uri, "alice", "rtx-401", 2, auth)).status == 200


async def test_replayed_credentials_are_refused(make_broker, raw_peers, users_file):
    broker = await make_broker(users_file=users_file)
    peer = await raw_peers()
    uri, challenge = await _challenge(peer, broker, "alice", "replay")
    auth = DigestClient("alice", "alice-pw").authorize(_pick(challenge, "SHA-256"), "REGISTER", uri)
    assert (await _authorized_register(peer, broker, uri, "alice", "replay", 2, auth)).status == 200
    # The same Authorization again in a new request (new branch, higher CSeq): a replay.
    again = await _authorized_register(peer, broker, uri, "alice", "replay", 3, auth)
    assert again.status == 401
    assert not any(is_stale(v) for v in again.headers.get_all("WWW-Authenticate"))


async def test_stale_nonce_gets_401_with_stale_true(make_broker, raw_peers, users_file):
    broker = await make_broker(users_file=users_file, nonce_lifetime=0.3)
    peer = await raw_peers()
    uri, challenge = await _challenge(peer, broker, "alice", "stale")
    await asyncio.sleep(0.5)
    auth = DigestClient("alice", "alice-pw").authorize(_pick(challenge, "MD5"), "REGISTER", uri)
    r = await _authorized_register(peer, broker, uri, "alice", "stale", 2, auth)
    assert r.status == 401
    assert all(is_stale(v) for v in r.headers.get_all("WWW-Authenticate"))


async def test_registering_someone_elses_aor_is_403(make_broker, raw_peers, users_file):
    broker = await make_broker(users_file=users_file)
    peer = await raw_peers()
    uri, challenge = await _challenge(peer, broker, "alice", "theft", to_user="bob")
    auth = DigestClient("alice", "alice-pw").authorize(_pick(challenge, "SHA-256"), "REGISTER", uri)
    r = await _authorized_register(peer, broker, uri, "alice", "theft", 2, auth, to_user="bob")
    assert r.status == 403
    assert broker.location.count() == 0


async def test_sending_as_someone_else_is_403(make_broker, make_ua, raw_peers, users_file):
    broker = await make_broker(users_file=users_file)
    bob = await make_ua("bob", broker, password="bob-pw", on_invite=answering(SDP_B))
    await bob.register()
    peer = await raw_peers()
    # alice's credentials on an INVITE whose From says bob
    peer.send(sip("INVITE", f"sip:bob@{broker.hostport}", peer, user="bob", call_id="spoof",
                  body=SDP_A, domain=broker.hostport), broker.address())
    r = await peer.final("spoof")
    assert r.status == 407
    challenge = next(v for v in r.headers.get_all("Proxy-Authenticate") if "MD5" in v)
    auth = DigestClient("alice", "alice-pw").authorize(challenge, "INVITE", f"sip:bob@{broker.hostport}")
    peer.send(sip("INVITE", f"sip:bob@{broker.hostport}", peer, user="bob", call_id="spoof", cseq=2,
                  body=SDP_A, domain=broker.hostport, headers=[f"Proxy-Authorization: {auth}"]),
              broker.address())
    assert (await peer.final("spoof")).status == 403


async def test_each_realm_has_its_own_users(make_broker, make_ua, raw_peers, users_file):
    broker = await make_broker(users_file=users_file, domains=["127.0.0.1", "localhost"])
    peer = await raw_peers()
    # carol exists in realm "localhost" only
    uri, challenge = await _challenge(peer, broker, "carol", "realm-1", domain="localhost")
    assert parse_auth_params(_pick(challenge, "MD5"))[1]["realm"] == "localhost"
    auth = DigestClient("carol", "carol-pw").authorize(_pick(challenge, "MD5"), "REGISTER", uri)
    r = await _authorized_register(peer, broker, uri, "carol", "realm-1", 2, auth, domain="localhost")
    assert r.status == 200
    carol_here = await make_ua("carol", broker, password="carol-pw")
    assert (await carol_here.register()).status == 401  # no carol in realm 127.0.0.1


# ------------------------------------------------------------------ TLS

def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (subjectAltName IP), made with `cryptography`."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def test_a_tls_user_calls_a_udp_user(make_broker, make_ua, tmp_path):
    import ssl

    cert, key = _self_signed(tmp_path)
    broker = await make_broker(transports=("UDP", "TCP", "TLS"), tls_cert=cert, tls_key=key)
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(str(cert), str(key))
    client_side = ssl.create_default_context(cafile=str(cert))
    tls_host, tls_port = broker.address("TLS")
    alice = UserAgent(UAConfig(user="alice", domain=f"{tls_host}:{tls_port}", transport="TLS",
                               transports=("UDP", "TLS"), tls_context=server_side,
                               tls_client_context=client_side, listen_port=0))
    await alice.start()
    bob = await make_ua("bob", broker, on_invite=answering(SDP_B))
    try:
        assert (await alice.register()).status == 200
        assert (await bob.register()).status == 200
        binding = broker.location.lookup("sip:alice@127.0.0.1")[0]
        assert binding.transport == "TLS"
        call = await alice.invite("bob", SDP_A, timeout=10)
        assert call.remote_sdp == SDP_B
        await asyncio.wait_for(bob.calls[0].acked.wait(), 5)
        await call.bye()
        await asyncio.wait_for(bob.calls[0].ended if bob.calls else asyncio.sleep(0), 5)
    finally:
        await alice.stop()
