"""sippy (an independent Python SIP stack, PyPI `sippy`) calls and is called through the
broker. sippy runs in its own process (tests/peers/sippy_peer.py); it cannot register,
so its AOR is registered on its behalf (a third-party registration, RFC 3261 §10.2)."""

from __future__ import annotations

import asyncio

from sipmesh.broker.server import Broker
from tests.lab import free_port
from tests.peers.broker import (SDP_A, SDP_B, answering, make_broker, make_ua,  # noqa: F401 (fixtures)
                                raw_register)
from tests.peers.sippy_run import needs_sippy, sippy_events, start_sippy

pytestmark = needs_sippy


async def test_a_sipmesh_agent_calls_sippy_through_the_broker(make_broker, make_ua, raw_peers, spawn_proc):
    broker: Broker = await make_broker()
    port = free_port("udp")
    sippy = await start_sippy(spawn_proc, "uas", "--port", str(port), "--calls", "1", "--timeout", "20")
    registrar = await raw_peers()
    reply = await raw_register(registrar, broker, "callee", contact=f"<sip:callee@127.0.0.1:{port}>")
    assert reply.status == 200
    alice = await make_ua("alice", broker)
    call = await alice.invite("callee", SDP_A, timeout=10)
    assert b"a=x-peer:sippy" in call.remote_sdp
    assert call.dialog.route_set  # record-routed: the BYE goes through the broker too
    response = await call.bye()
    assert response is not None and response.status == 200
    assert await asyncio.to_thread(sippy.wait, 15) == 0, sippy.log_tail(40)
    invites = [e for e in sippy_events(sippy) if e["event"] == "invite"]
    assert len(invites) == 1 and "a=PORT:7001" in invites[0]["sdp"]


async def test_sippy_calls_a_sipmesh_agent_through_the_broker(make_broker, make_ua, spawn_proc):
    broker: Broker = await make_broker()
    callee = await make_ua("callee", broker, on_invite=answering(SDP_B))
    assert (await callee.register()).status == 200
    sippy = await start_sippy(spawn_proc, "uac", "--port", str(free_port("udp")),
                              "--target-port", str(broker.address()[1]), "--calls", "1",
                              "--hangup", "sippy", "--timeout", "20")
    assert await asyncio.to_thread(sippy.wait, 25) == 0, sippy.log_tail(40)
    connected = [e for e in sippy_events(sippy) if e["event"] == "connected"]
    assert len(connected) == 1 and "a=PORT:7002" in connected[0]["sdp"]
    assert not [e for e in sippy_events(sippy) if e["event"] == "failed"]
