"""Handing the ICE path to a program (sipmesh.agent.handover), on loopback: the flow watch
(a raw socket with a BPF filter) sees exactly the peer's datagrams without taking them;
the relay proxy carries a program's datagrams through coturn both ways; plus the small
pure pieces (TURN URIs, the status lines)."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from sipmesh.agent.handover import FlowWatch, Handover
from sipmesh.agent.ice import IceConfig, IceSession, parse_turn_uri, render
from sipmesh.cli.status import path_lines
from sipmesh.sip.auth import compute_ha1


def udp(port: int = 0) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", port))
    s.settimeout(5)
    return s


@pytest.mark.parametrize("text, expected", [
    ("turn:203.0.113.2", ("203.0.113.2", 3478, "auto")),
    ("turn:relay.example:443?transport=tcp", ("relay.example", 443, "tcp")),
    ("turn:[2001:db8::1]:3479?transport=udp", ("2001:db8::1", 3479, "udp")),
    ("203.0.113.2:3479", ("203.0.113.2", 3479, "auto")),    # as sipmesh netcheck --turn
])
def test_turn_uris(text, expected):
    assert parse_turn_uri(text) == expected


@pytest.mark.parametrize("text", ["stun:203.0.113.2", "turn:", "turn:h:99999",
                                  "turn:h?transport=sctp", "turn:h?x=1"])
def test_bad_turn_uris(text):
    with pytest.raises(ValueError):
        parse_turn_uri(text)


@pytest.mark.skipif(os.geteuid() != 0, reason="a raw socket needs CAP_NET_RAW")
def test_the_flow_watch_sees_the_peers_datagrams_only_and_takes_none():
    program, peer, stranger = udp(), udp(), udp()
    try:
        watch = FlowWatch.open(peer.getsockname(), program.getsockname()[1])
        assert watch is not None
        stranger.sendto(b"not the peer", program.getsockname())
        assert program.recv(100) == b"not the peer"
        watch.poll(1.0)
        assert watch.last_seen is None                    # another source: not seen
        for n in range(3):
            peer.sendto(b"from the peer %d" % n, program.getsockname())
        assert [program.recv(100) for _ in range(3)][-1] == b"from the peer 2"  # still delivered
        watch.poll(2.0)
        assert (watch.last_seen, watch.packets) == (2.0, 3)
        watch.close()
    finally:
        for s in (program, peer, stranger):
            s.close()


async def test_relayed_path_proxy_carries_datagrams_both_ways(coturn):
    """The answering side gathers only a relay candidate, so the pair runs through our
    allocation: its program talks to the proxy on 127.0.0.1, the caller's program to the
    relayed address from the caller's own port."""
    server = coturn(realm="mesh.example", users={"bob": compute_ha1("bob", "mesh.example", "pw")})
    base = IceConfig(host_addresses=("127.0.0.1",), connect_timeout=5)
    relay_only = IceConfig(host_addresses=(), turn_server=server.address, turn_username="bob",
                           turn_password="pw", turn_transport="udp", connect_timeout=5)
    caller, callee = IceSession(base, controlling=True), IceSession(relay_only, controlling=False)
    handovers: list[Handover] = []
    sockets: list[socket.socket] = []
    try:
        offer, answer = await asyncio.gather(caller.gather(), callee.gather())
        assert [c.type for c in answer.candidates] == ["relay"]
        await asyncio.gather(caller.connect(caller.read_remote(render(answer))),
                             callee.connect(callee.read_remote(render(offer))))
        handovers = list(await asyncio.gather(Handover.take(caller), Handover.take(callee)))
        mine, theirs = (h.endpoint for h in handovers)
        assert (mine.kind, mine.proxied, theirs.kind, theirs.proxied) == \
            ("relayed", False, "relayed", True)
        assert mine.remote == (answer.candidates[0].host, answer.candidates[0].port)
        a, b = udp(mine.local_port), udp(theirs.local_port)   # the programs, on the ports given
        sockets += [a, b]
        b.sendto(b"first", theirs.remote)                        # via our proxy and coturn
        data, source = await asyncio.to_thread(a.recvfrom, 2048)
        assert data == b"first" and source == mine.remote
        a.sendto(b"answer", mine.remote)
        assert await asyncio.to_thread(b.recv, 2048) == b"answer"
        # a run of datagrams: the proxy forwards every one it gets (drained in bursts, no
        # task), and counts them for `sipmesh status`; UDP may drop some beyond it
        count = 1000
        received = asyncio.ensure_future(asyncio.to_thread(_drain, a, count))
        for n in range(count):
            b.sendto(n.to_bytes(4, "big") * 250, theirs.remote)
            if n % 50 == 49:
                await asyncio.sleep(0.005)
        got = await received
        status = handovers[1].describe()
        assert status["proxy"]["to_peer"]["packets"] == count + 1, status
        assert got >= count * 0.8, got
        assert status["watched"]
        assert status["kind"] == "relayed" and status["local"].startswith("relay ")
    finally:
        for s in sockets:
            s.close()
        for h in handovers:
            await h.close()
        await caller.close()
        await callee.close()


async def _ice_pair(config: IceConfig) -> tuple[IceSession, IceSession]:
    caller, callee = IceSession(config, controlling=True), IceSession(config, controlling=False)
    offer, answer = await asyncio.gather(caller.gather(), callee.gather())
    await asyncio.gather(caller.connect(caller.read_remote(render(answer))),
                         callee.connect(callee.read_remote(render(offer))))
    return caller, callee


async def _exchange(a: socket.socket, a_to: tuple[str, int], b: socket.socket,
                    b_to: tuple[str, int], text: bytes) -> None:
    a.sendto(text, a_to)
    assert await asyncio.to_thread(b.recv, 2048) == text
    b.sendto(text + b" back", b_to)
    assert await asyncio.to_thread(a.recv, 2048) == text + b" back"


async def test_a_program_through_the_agent_follows_a_new_path():
    """`follow`: each program talks to the agent's local end on 127.0.0.1 on a direct path;
    a second ICE session (what an ICE restart after a move makes) takes the same local ends
    over, the first path closes, and the same two program sockets, unchanged, still reach
    each other: over the new path's ports."""
    config = IceConfig(host_addresses=("127.0.0.1",), connect_timeout=5)
    handovers: list[Handover] = []
    sockets: list[socket.socket] = []
    try:
        handovers = list(await asyncio.gather(*(Handover.take(ice, follow=True)
                                                for ice in await _ice_pair(config))))
        mine, theirs = (h.endpoint for h in handovers)
        assert (mine.kind, mine.proxied, mine.remote_ip) == ("direct", True, "127.0.0.1")
        first_ports = {h.ice.local_port for h in handovers}
        assert mine.local_port not in first_ports      # the path's port stays the agent's
        a, b = udp(mine.local_port), udp(theirs.local_port)
        sockets += [a, b]
        await _exchange(a, mine.remote, b, theirs.remote, b"on the first path")

        restarted = await _ice_pair(config)
        moved = list(await asyncio.gather(*(Handover.take(ice, local=old.local)
                                            for ice, old in zip(restarted, handovers))))
        for old in handovers:
            await old.close()
        handovers = moved
        assert [h.endpoint for h in moved] == [mine, theirs]   # the programs are not told
        assert {h.ice.local_port for h in moved}.isdisjoint(first_ports)
        await _exchange(a, mine.remote, b, theirs.remote, b"on the new path")
        status = moved[0].describe()
        assert status["proxy"]["to_peer"]["packets"] == 1, status   # this path's count
        assert path_lines({"call_id": "c", "path": status})[2].endswith(
            "(the agent's end of the path: it follows moves)")
        assert status["proxy"]["from_peer"]["packets"] == 1, status
    finally:
        for s in sockets:
            s.close()
        for h in handovers:
            await h.close()
    # the local ends closed with the last path that used them
    assert all(h.local is not None and h.local.closed for h in handovers)


def _drain(s: socket.socket, count: int) -> int:
    s.settimeout(1.0)
    got = 0
    try:
        while got < count:
            s.recv(2048)
            got += 1
    except socket.timeout:
        pass
    return got


def test_status_says_the_path_in_words():
    lines = path_lines({"call_id": "c1", "path": {
        "kind": "relayed", "reason": "our NAT maps per destination (symmetric): only a relay "
                                     "reaches us",
        "rtt": 0.0123, "local": "relay 203.0.113.2:50000", "remote": "srflx 203.0.113.6:4000",
        "relay_transport": "tcp",
        "program": {"local_port": 41000, "remote": "127.0.0.1:5555", "proxied": True}}})
    assert lines == [
        "c1: relayed relay 203.0.113.2:50000 -> srflx 203.0.113.6:4000 (our relay over TCP), "
        "rtt 12.3 ms",
        "  our NAT maps per destination (symmetric): only a relay reaches us",
        "  program: binds UDP 41000, sends to 127.0.0.1:5555 (our relay proxy)"]
    none = path_lines({"call_id": "c2", "path": {"kind": "none", "reason": "no check succeeded",
                                                 "rtt": None, "checks": ["host a -> host b: failed"]}})
    assert none == ["c2: none", "  no check succeeded", "  check host a -> host b: failed"]
