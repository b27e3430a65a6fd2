"""The SIP core against real third-party software, on loopback:

* SIPp's built-in `uac` calls a sipmesh UAS, SIPp's built-in `uas` answers a sipmesh UAC
  (UDP and TCP);
* two sipmesh UAs register with digest auth at a real Kamailio (db_text and static
  credentials) and call each other through it, Record-Route and all (UDP and TCP);
* sippy (PyPI `sippy`), an independent Python UA, in both directions (UDP; it runs in a
  subprocess, tests/peers/sippy_peer.py, because it has its own reactor and threads).

Our UAs live in the test's event loop; blocking lab helpers (SIPp runs, Kamailio start,
`ss` polls) run in threads so that the loop keeps answering. RFC default timers here.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from sipmesh.sip.message import Request, Response
from sipmesh.sip.transaction.timers import TimerValues
from sipmesh.sip.ua import CallFailed, UserAgent
from tests.lab import free_port, listening_sockets, wait_for, wait_for_async
from tests.peers.helpers import Callee, no_errors_logged, sdp, ua_fixture
from tests.peers.sippy_run import needs_sippy, sippy_events, start_sippy

__all__ = ["no_errors_logged"]  # an autouse fixture: fail tests that log errors

RFC_TIMERS = TimerValues()
SIPP_TRANSPORT = {"UDP": "u1", "TCP": "t1"}
make_ua = ua_fixture(timers=RFC_TIMERS)  # a fixture: UAs with the RFC's timers


def record_requests(ua: UserAgent) -> list[Request]:
    """Every request `ua` receives from now on, ACKs for 2xx included."""
    seen: list[Request] = []
    on_request, on_ack = ua.on_request, ua.on_ack

    def request(txn) -> None:
        seen.append(txn.request)
        on_request(txn)

    def ack(message, flow) -> None:
        seen.append(message)
        on_ack(message, flow)

    ua.on_request, ua.on_ack = request, ack  # type: ignore[method-assign]
    return seen


def of(requests: list[Request], method: str, call_id: str) -> list[Request]:
    return [r for r in requests if r.method == method and r.call_id == call_id]


# -- SIPp ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["UDP", "TCP"])
async def test_sipp_uac_calls_a_sipmesh_uas(sipp, make_ua, transport):
    callee = Callee()
    bob = await make_ua("bob", on_invite=callee)
    args = ["-sn", "uac", f"127.0.0.1:{bob.config.listen_port}", "-i", "127.0.0.1",
            "-p", str(free_port("both")), "-t", SIPP_TRANSPORT[transport],
            "-m", "50", "-r", "20"]
    result = await asyncio.to_thread(sipp.run, args, timeout=60, name=f"uac_{transport}")
    assert result.returncode == 0 and not result.timed_out, str(result)
    counts = (result.created, result.successful, result.failed, result.unexpected)
    assert counts == (50, 50, 0, 0), str(result)
    await wait_for_async(lambda: len(callee.ended) == 50, 3, what="50 ended calls")
    assert callee.ended == ["remote BYE"] * 50  # the UAS saw every BYE
    assert callee.failures == [] and len(callee.incoming) == 50 and bob.calls == []
    assert {i.txn.flow.transport for i in callee.incoming} == {transport}


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["UDP", "TCP"])
async def test_sipmesh_uac_calls_sipp_uas(sipp, make_ua, transport):
    port = free_port("both")
    args = ["-sn", "uas", "-i", "127.0.0.1", "-p", str(port), "-t", SIPP_TRANSPORT[transport]]
    uas = await asyncio.to_thread(sipp.start, args, name=f"uas_{transport}")
    await asyncio.to_thread(
        wait_for, lambda: ("127.0.0.1", port) in listening_sockets(transport.lower()), 10,
        what=f"SIPp listening on {transport} {port}", abort=uas.exit_reason)
    alice = await make_ua("alice", transport=transport)
    target = f"sip:service@127.0.0.1:{port}" + (";transport=tcp" if transport == "TCP" else "")
    calls = 5
    for _ in range(calls):
        progress: list[Response] = []
        call = await alice.invite(target, sdp("alice"), on_progress=progress.append, timeout=10)
        assert [r.status for r in progress] == [180]  # then the 200 that made the Call
        assert b"m=audio" in call.remote_sdp
        response = await call.bye()
        assert response is not None and response.status == 200
    assert alice.calls == []
    await asyncio.to_thread(uas.quit)
    result = uas.result()
    assert (result.successful, result.failed, result.unexpected) == (calls, 0, 0), str(result)


# -- Kamailio --------------------------------------------------------------------------

USERS = {"alice": "alice-secret", "bob": "bob-secret"}


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["UDP", "TCP"])
@pytest.mark.parametrize("auth", ["db_text", "static"])
async def test_registered_uas_call_each_other_through_kamailio(kamailio, make_ua, auth, transport):
    k = await asyncio.to_thread(kamailio, auth=auth, users=USERS)
    callee = Callee()
    bob = await make_ua("bob", on_invite=callee, domain=k.hostport, password=k.password_for("bob"),
                        transport=transport)
    alice = await make_ua("alice", domain=k.hostport, password=k.password_for("alice"),
                          transport=transport)
    at_bob, at_alice = record_requests(bob), record_requests(alice)
    for ua in (alice, bob):
        response = await ua.register()
        assert response.status == 200, response
        assert response.cseq[0] == 2  # the first REGISTER was challenged (401)
    kamailio_via = k.hostport

    for hangup in ("caller", "callee"):
        call = await alice.invite("bob", sdp("alice"), timeout=10)
        assert call.invite.headers.get("Proxy-Authorization")  # answered Kamailio's 407
        # the route set holds Kamailio's Record-Route (one entry: same transport both legs)
        routes = [a.uri for a in call.dialog.route_set]
        assert routes and all(f"{u.host}:{u.port}" == kamailio_via and u.lr for u in routes), routes
        theirs = await wait_for_async(
            lambda: next((c for c in callee.calls if c.call_id == call.call_id), None), 3,
            what="the callee's Call")
        assert [a.uri for a in reversed(theirs.dialog.route_set)] == routes
        (invite,) = of(at_bob, "INVITE", call.call_id)
        assert invite.headers.get_all("Record-Route") and invite.via.host == "127.0.0.1"
        assert f"{invite.via.host}:{invite.via.port}" == kamailio_via
        # the ACK for the 2xx went through Kamailio: it carries Kamailio's Via over Alice's
        (ack,) = await wait_for_async(lambda: of(at_bob, "ACK", call.call_id), 3, what="the ACK at Bob")
        vias = ack.vias
        assert len(vias) == 2 and f"{vias[0].host}:{vias[0].port}" == kamailio_via
        assert vias[1].port == alice.config.listen_port

        if hangup == "caller":
            response = await call.bye()
            assert await asyncio.wait_for(theirs.ended, 5) == "remote BYE"
            received = of(at_bob, "BYE", call.call_id)
            receiver = bob
        else:
            response = await theirs.bye()
            assert await asyncio.wait_for(call.ended, 5) == "remote BYE"
            received = of(at_alice, "BYE", call.call_id)
            receiver = alice
        assert response is not None and response.status == 200
        (bye,) = received
        assert f"{bye.vias[0].host}:{bye.vias[0].port}" == kamailio_via and len(bye.vias) == 2
        assert bye.headers.get("Route") is None  # Kamailio consumed the Route to itself
        assert bye.uri.port == receiver.config.listen_port  # Request-URI: the remote target
        assert alice.calls == [] and bob.calls == []
    assert k.alive()


@pytest.mark.slow
@pytest.mark.parametrize("auth", ["db_text", "static"])
async def test_kamailio_refuses_a_wrong_password(kamailio, make_ua, auth):
    k = await asyncio.to_thread(kamailio, auth=auth, users=USERS)
    callee = Callee()
    bob = await make_ua("bob", on_invite=callee, domain=k.hostport, password=k.password_for("bob"))
    assert (await bob.register()).status == 200
    mallory = await make_ua("alice", domain=k.hostport, password="not-the-password")
    response = await mallory.register()
    assert response.status == 401 and response.cseq[0] == 2  # answered once, refused again
    with pytest.raises(CallFailed) as failed:
        await mallory.invite("bob", sdp("alice"), timeout=10)
    assert failed.value.status == 407
    assert callee.incoming == []


# -- sippy ------------------------------------------------------------------------------

@pytest.mark.slow
@needs_sippy
@pytest.mark.parametrize("hangup", ["sippy", "peer"])
async def test_sippy_uac_calls_a_sipmesh_uas(spawn_proc, make_ua, hangup):
    callee = Callee(hangup_after=0.3 if hangup == "peer" else None)
    bob = await make_ua("bob", on_invite=callee)
    calls = 3
    proc = await start_sippy(spawn_proc, "uac", "--port", str(free_port("udp")),
                           "--target-port", str(bob.config.listen_port), "--calls", str(calls),
                           "--hangup", hangup, "--timeout", "30")
    assert await asyncio.to_thread(proc.wait, 40) == 0, proc.log_tail(60)
    events = sippy_events(proc)
    connected = [e for e in events if e["event"] == "connected"]
    assert len(connected) == calls and all("o=callee" in e["sdp"] for e in connected)
    assert [e["event"] for e in events].count("disconnected") == calls
    assert not [e for e in events if e["event"] == "failed"], events
    await wait_for_async(lambda: len(callee.ended) == calls, 3, what="every call ended")
    expected = "remote BYE" if hangup == "sippy" else "local BYE"
    assert callee.ended == [expected] * calls and callee.failures == []
    assert all(b"a=x-peer:sippy" in i.sdp for i in callee.incoming)
    assert bob.calls == []


@pytest.mark.slow
@needs_sippy
async def test_sipmesh_uac_calls_a_sippy_uas(spawn_proc, make_ua):
    port = free_port("udp")
    calls = 3
    proc = await start_sippy(spawn_proc, "uas", "--port", str(port), "--calls", str(calls),
                           "--timeout", "30")
    alice = await make_ua("alice")
    for _ in range(calls):
        progress: list[Response] = []
        call = await alice.invite(f"sip:callee@127.0.0.1:{port}", sdp("alice"),
                                  on_progress=progress.append, timeout=10)
        # sippy sends 180 and 200 back to back from its sender threads, so now and then
        # the 200 arrives first; a 1xx after the 2xx is then rightly ignored (RFC 6026).
        assert [r.status for r in progress] in ([180], []), progress
        assert b"a=x-peer:sippy" in call.remote_sdp
        response = await call.bye()
        assert response is not None and response.status == 200
    assert await asyncio.to_thread(proc.wait, 20) == 0, proc.log_tail(60)
    events = sippy_events(proc)
    invites = [e for e in events if e["event"] == "invite"]
    assert len(invites) == calls and all("o=alice" in e["sdp"] for e in invites)
    assert [e["origin"] for e in events if e["event"] == "disconnected"] == ["caller"] * calls
    assert alice.calls == []
