"""Router port mapping (sipmesh.agent.portmap): the PCP, NAT-PMP and SSDP messages as pure
functions; then miniupnpd on a symmetric NAT router of the NAT lab, asked by real ICE
sessions (tests/lab/iceprobe.py) over each protocol."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import struct
import subprocess
import sys
import time

import pytest
from aioice.candidate import Candidate

from sipmesh.agent import portmap
from sipmesh.agent.ice import IceConfig, IceSession
from sipmesh.agent.portmap import (PROTOCOLS, PortmapError, PortMapper, default_gateway,
                                   natpmp_address_request, natpmp_map_request,
                                   parse_natpmp_address, parse_natpmp_map, parse_pcp,
                                   parse_ssdp, pcp_announce_request, pcp_map_request,
                                   ssdp_search)
from tests.lab import wait_for_async
from tests.lab.icepair import lab, session  # noqa: F401 - the ICE lab fixture, reused
from tests.lab.miniupnpd import miniupnpd_unavailable_reason

NONCE = bytes(range(12))

# ----------------------------------------------------------------------- the gateway

ROUTES = """Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
wlan0\t00000000\t0101000A\t0003\t0\t0\t600\t00000000\t0\t0\t0
eth0\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0
"""


def test_the_gateway_is_the_default_route_with_the_lowest_metric():
    assert default_gateway(ROUTES) == "192.168.1.1"
    assert default_gateway(ROUTES.splitlines()[0] + "\n" + ROUTES.splitlines()[1]) is None
    assert default_gateway("") is None
    assert default_gateway("header\ngarbage here and there x y z w\n") is None


# ----------------------------------------------------------------------- NAT-PMP


def test_natpmp_requests_are_rfc_6886_bytes():
    assert natpmp_address_request() == b"\x00\x00"
    assert natpmp_map_request(40000, 40000, 7200) == bytes.fromhex("0001 0000 9c40 9c40 00001c20")
    assert natpmp_map_request(40000, 0, 0) == bytes.fromhex("0001 0000 9c40 0000 00000000")


def test_natpmp_answers_are_read_and_checked():
    address = bytes.fromhex("0080 0000 00000e10") + bytes([203, 0, 113, 3])
    assert parse_natpmp_address(address) == "203.0.113.3"
    mapped = bytes.fromhex("0081 0000 00000e10 9c40 9c41 00001c20")
    assert parse_natpmp_map(mapped, 40000) == (40001, 7200)
    with pytest.raises(PortmapError, match="not authorized"):
        parse_natpmp_map(bytes.fromhex("0081 0002 00000e10 9c40 0000 00000000"), 40000)
    with pytest.raises(PortmapError, match="for port 40001"):
        parse_natpmp_map(bytes.fromhex("0081 0000 00000e10 9c41 9c41 00001c20"), 40000)
    with pytest.raises(PortmapError, match="not a NAT-PMP answer"):
        parse_natpmp_map(address, 40000)
    with pytest.raises(PortmapError, match="too short"):
        parse_natpmp_map(mapped[:12], 40000)
    for bad in ([127, 0, 0, 1], [0, 0, 0, 0], [224, 0, 0, 1], [169, 254, 0, 1]):
        with pytest.raises(PortmapError, match="external address"):
            parse_natpmp_address(address[:8] + bytes(bad))


# ----------------------------------------------------------------------- PCP


def test_pcp_requests_are_rfc_6887_bytes():
    announce = pcp_announce_request("192.168.1.2")
    assert announce == bytes.fromhex("02 00 0000 00000000") + \
        ipaddress.IPv6Address("::ffff:192.168.1.2").packed
    request = pcp_map_request("192.168.1.2", NONCE, 40000, 7200, ("0.0.0.0", 40000))
    assert len(request) == 60 and request[:8] == bytes.fromhex("02 01 0000 00001c20")
    assert request[24:36] == NONCE
    assert request[36:40] == bytes([17, 0, 0, 0])                 # UDP, reserved
    assert struct.unpack("!HH", request[40:44]) == (40000, 40000)
    assert request[44:60] == ipaddress.IPv6Address("::ffff:0.0.0.0").packed


def pcp_answer(opcode: int = 1, result: int = 0, lifetime: int = 7200, nonce: bytes = NONCE,
               internal: int = 40000, external: tuple[str, int] = ("203.0.113.3", 40000)) -> bytes:
    header = struct.pack("!BBBBII", 2, 128 + opcode, 0, result, lifetime, 3600) + bytes(12)
    if opcode == 0:
        return header
    return header + nonce + struct.pack("!B3xHH", 17, internal, external[1]) + \
        ipaddress.IPv6Address(f"::ffff:{external[0]}").packed


def test_pcp_answers_are_read_and_checked():
    answer = parse_pcp(pcp_answer(), 1, NONCE, 40000)
    assert (answer.external, answer.lifetime) == (("203.0.113.3", 40000), 7200)
    assert parse_pcp(pcp_answer(opcode=0, lifetime=0), 0).external is None
    with pytest.raises(PortmapError, match="NOT_AUTHORIZED"):
        parse_pcp(pcp_answer(result=2), 1, NONCE, 40000)
    with pytest.raises(PortmapError, match="another mapping"):
        parse_pcp(pcp_answer(nonce=bytes(12)), 1, NONCE, 40000)
    with pytest.raises(PortmapError, match="another mapping"):
        parse_pcp(pcp_answer(internal=40001), 1, NONCE, 40000)
    with pytest.raises(PortmapError, match="NAT-PMP only"):
        parse_pcp(bytes.fromhex("0081 0001 00000e10"), 1, NONCE, 40000)
    with pytest.raises(PortmapError, match="not a PCP answer"):
        parse_pcp(pcp_answer()[:20], 1, NONCE, 40000)
    with pytest.raises(PortmapError, match="too short"):
        parse_pcp(pcp_answer()[:50], 1, NONCE, 40000)
    with pytest.raises(PortmapError, match="external address"):
        parse_pcp(pcp_answer(external=("127.0.0.1", 40000)), 1, NONCE, 40000)
    ipv6 = pcp_answer()[:44] + ipaddress.IPv6Address("2001:db8::1").packed
    with pytest.raises(PortmapError, match="not IPv4"):
        parse_pcp(ipv6, 1, NONCE, 40000)


# ----------------------------------------------------------------------- SSDP


def test_ssdp_search_and_the_location_it_finds():
    assert ssdp_search("192.168.1.1").startswith(b"M-SEARCH * HTTP/1.1\r\nHOST: 192.168.1.1:1900")
    ok = (b"HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\n"
          b"Location: http://192.168.1.1:5000/rootDesc.xml\r\nST: x\r\n\r\n")
    assert parse_ssdp(ok, "192.168.1.1") == "http://192.168.1.1:5000/rootDesc.xml"


@pytest.mark.parametrize("location", [
    "http://192.168.1.9:5000/rootDesc.xml",      # another host than the gateway
    "https://192.168.1.1/rootDesc.xml", "file:///etc/passwd", "",
    "http://192.168.1.1:99999/x", "http://192.168.1.1/" + "x" * 300,
])
def test_ssdp_locations_off_the_gateway_are_refused(location):
    answer = f"HTTP/1.1 200 OK\r\nLOCATION: {location}\r\n\r\n".encode()
    with pytest.raises(PortmapError):
        parse_ssdp(answer, "192.168.1.1")


def test_unknown_protocol_is_refused():
    with pytest.raises(ValueError, match="unknown port mapping protocol"):
        PortMapper(["upnp", "igd"])


# ----------------------------------------------------------------------- on loopback


class ScriptedServer(asyncio.DatagramProtocol):
    """A PCP/NAT-PMP server on loopback answering what `answer` makes of each request."""

    def __init__(self, answer) -> None:
        self.answer, self.requests = answer, []

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.requests.append(data)
        reply = self.answer(data)
        if reply:
            self.transport.sendto(reply, addr)


async def scripted_server(answer) -> tuple[asyncio.DatagramTransport, ScriptedServer, int]:
    loop = asyncio.get_running_loop()
    transport, server = await loop.create_datagram_endpoint(lambda: ScriptedServer(answer),
                                                            local_addr=("127.0.0.1", 0))
    return transport, server, transport.get_extra_info("sockname")[1]


def host_candidate(ip: str, port: int) -> Candidate:
    return Candidate(foundation="1", component=1, transport="udp", priority=1, host=ip,
                     port=port, type="host")


async def test_a_router_that_never_answers_costs_a_bounded_wait_and_no_candidate(
        caplog, monkeypatch):
    """PCP and NAT-PMP asked on loopback where nothing answers, UPnP refused (ICMP): no
    candidate after the 250 ms discovery, and one log line that says why."""
    transport, server, port = await scripted_server(lambda data: None)
    monkeypatch.setattr(portmap, "SERVER_PORT", port)
    mapper = PortMapper(gateway="127.0.0.1")
    try:
        start = time.monotonic()
        with caplog.at_level("INFO", "sipmesh.agent.portmap"):
            found = await mapper.candidate([host_candidate("127.0.0.1", 40000)])
        took = time.monotonic() - start
        assert found is None and took < 0.4, took
        assert len(server.requests) >= 2   # PCP and NAT-PMP were asked (and retried)
        [line] = [r.getMessage() for r in caplog.records]
        assert line.startswith("no router port mapping from 127.0.0.1"), line
        assert "PCP: no answer within 250 ms" in line and "NAT-PMP: no answer" in line
        assert "UPnP-IGD: nothing listens" in line
    finally:
        transport.close()
        await mapper.close()


async def test_pcp_on_loopback_maps_renews_and_deletes(monkeypatch):
    """A scripted PCP server granting 1 s: the mapping is renewed after half of it with
    the same nonce, and deleted (lifetime 0, same nonce) by close()."""
    def answer(data: bytes) -> bytes:
        if data[1] == 0:
            return pcp_answer(opcode=0, lifetime=0)
        lifetime = struct.unpack_from("!I", data, 4)[0]
        return pcp_answer(nonce=data[24:36], internal=struct.unpack_from("!H", data, 40)[0],
                          lifetime=min(lifetime, 1), external=("203.0.113.3", 41000))

    transport, server, port = await scripted_server(answer)
    monkeypatch.setattr(portmap, "SERVER_PORT", port)
    monkeypatch.setattr(portmap, "MIN_RENEW", 0.1)
    mapper = PortMapper(["pcp"], gateway="127.0.0.1")
    try:
        candidate = await mapper.candidate([host_candidate("127.0.0.1", 40000)])
        assert (candidate.type, candidate.host, candidate.port) == ("srflx", "203.0.113.3", 41000)
        assert (candidate.related_address, candidate.related_port) == ("127.0.0.1", 40000)
        assert [(r[1], struct.unpack_from("!I", r, 4)[0]) for r in server.requests] == \
            [(0, 0), (1, portmap.LIFETIME)]
        nonce = server.requests[1][24:36]
        await wait_for_async(lambda: len(server.requests) >= 3, 5, what="the renewal")
        renewal = server.requests[2]
        assert renewal[1] == 1 and renewal[24:36] == nonce
        assert struct.unpack_from("!H", renewal, 42)[0] == 41000   # asks for what it has
        await mapper.close()
        delete = server.requests[-1]
        assert struct.unpack_from("!I", delete, 4)[0] == 0 and delete[24:36] == nonce
    finally:
        transport.close()
        await mapper.close()


async def test_no_mapping_is_asked_for_loopback_host_candidates():
    """Host candidates on loopback only face no router: nothing is sent at all."""
    session = IceSession(IceConfig(host_addresses=("127.0.0.1",), portmap=PROTOCOLS),
                         controlling=True)
    try:
        description = await session.gather()
        assert [c.type for c in description.candidates] == ["host"]
        assert session.connection.port_mapper.mapping is None
    finally:
        await session.close()


# ----------------------------------------------------------------------- miniupnpd in the NAT lab


@pytest.fixture
def upnp_lab(lab):
    """The ICE lab (tests/lab/icepair.py: broker with STUN and coturn, home hosts a and b, ...)
    plus m, behind a symmetric NAT router that runs miniupnpd."""
    reason = miniupnpd_unavailable_reason()
    if reason:
        pytest.skip(reason)
    router = lab.add_router("symmetric", upnp=True)
    lab.add_host("m", behind=router)
    return lab


def mapped(result: dict) -> list[str]:
    """The srflx candidates of one side's description that carry the router's mapping."""
    return [value for name, value in result["local"] if name == "candidate"
            and "typ srflx" in value]


@pytest.mark.slow
@pytest.mark.netns
@pytest.mark.parametrize("protocols, used", [
    (list(PROTOCOLS), "PCP"), (["nat-pmp"], "NAT-PMP"), (["upnp"], "UPnP-IGD")])
def test_a_mapped_port_makes_a_host_behind_a_symmetric_nat_reachable(upnp_lab, protocols, used):
    router = upnp_lab["m"].router
    results = session(upnp_lab, "a", "m", portmap={"m": protocols})
    a, m = results
    assert m["mapping"] and m["mapping"].startswith(f"{used} {router.wan_ip}:"), m["mapping"]
    for side in results:
        assert "error" not in side, side
        assert side["path"]["kind"] == "direct", side["path"]
    external = m["mapping"].split()[1]
    assert a["path"]["remote_address"] == [router.wan_ip, int(external.split(":")[1])]
    assert m["data"] == ["ping 0", "ping 1", "ping 2"]
    assert m["closed"] and router.upnp.redirects() == [], router.upnp.log_tail()


@pytest.mark.slow
@pytest.mark.netns
def test_without_port_mapping_the_same_pair_is_relayed(upnp_lab):
    results = session(upnp_lab, "a", "m")
    for side in results:
        assert "error" not in side, side
        assert side["path"]["kind"] == "relayed", side["path"]
    assert results[1]["mapping"] is None
    assert upnp_lab["m"].router.upnp.redirects() == []


@pytest.mark.slow
@pytest.mark.netns
def test_the_host_behind_the_mapping_can_call_too(upnp_lab):
    results = session(upnp_lab, "m", "a", portmap={"m": list(PROTOCOLS)})
    for side in results:
        assert "error" not in side, side
        assert side["path"]["kind"] == "direct", side["path"]
    assert results[1]["data"] == ["ping 0", "ping 1", "ping 2"]
    assert upnp_lab["m"].router.upnp.redirects() == []


@pytest.mark.slow
@pytest.mark.netns
def test_a_router_that_maps_nothing_is_not_fatal(upnp_lab):
    """s's symmetric router runs no miniupnpd (ICMP port unreachable for all three): no
    mapping, the session goes through the relay as before."""
    start = time.monotonic()
    results = session(upnp_lab, "a", "s", portmap={"s": list(PROTOCOLS)})
    for side in results:
        assert "error" not in side, side
        assert side["path"]["kind"] == "relayed", side["path"]
    assert results[1]["mapping"] is None and results[1]["closed"]
    assert time.monotonic() - start < 10


EXIT_SCRIPT = """
import asyncio, json, sys
from aioice.candidate import Candidate
from sipmesh.agent.portmap import PortMapper

async def main():
    mapper = PortMapper([sys.argv[1]])
    host = Candidate(foundation="1", component=1, transport="udp", priority=1,
                     host=sys.argv[2], port=int(sys.argv[3]), type="host")
    found = await mapper.candidate([host])
    print(json.dumps([found.host, found.port] if found else None), flush=True)
    sys.stdin.readline()
    print(json.dumps([await mapper.renew(), mapper.mapping.external]), flush=True)
    sys.stdin.readline()   # exits without closing the mapper: atexit deletes the mapping

asyncio.run(main())
"""


@pytest.mark.slow
@pytest.mark.netns
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_mapping_is_renewed_and_deleted_at_process_exit_if_left_open(upnp_lab, protocol):
    m = upnp_lab["m"]
    proc = upnp_lab.popen(m, [sys.executable, "-c", EXIT_SCRIPT, protocol, m.ip, "41234"],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        found = json.loads(proc.stdout.readline())
        assert found and found[0] == m.router.wan_ip, found
        assert m.router.upnp.redirects() == [(found[1], m.ip, 41234)]
        proc.stdin.write("renew\n")
        proc.stdin.flush()
        assert json.loads(proc.stdout.readline()) == [True, found]   # the same port again
        assert m.router.upnp.redirects() == [(found[1], m.ip, 41234)]
        proc.stdin.close()
        assert proc.wait(10) == 0
        assert m.router.upnp.redirects() == []
    finally:
        proc.kill()
        proc.wait()


async def test_a_router_that_refuses_pcp_is_asked_by_nat_pmp(monkeypatch, caplog):
    """PCP says NOT_AUTHORIZED to the MAP (its ANNOUNCE was answered): NAT-PMP, the next
    in order, makes the mapping."""
    def answer(data: bytes) -> bytes:
        if data[0] == 2:
            return pcp_answer(opcode=0, lifetime=0) if data[1] == 0 else \
                pcp_answer(result=2, nonce=data[24:36])
        if data[1] == 0:
            return bytes.fromhex("0080 0000 00000e10") + bytes([203, 0, 113, 3])
        return bytes.fromhex("0081 0000 00000e10") + data[4:6] + data[4:6] + data[8:12]

    transport, server, port = await scripted_server(answer)
    monkeypatch.setattr(portmap, "SERVER_PORT", port)
    mapper = PortMapper(["pcp", "nat-pmp"], gateway="127.0.0.1")
    try:
        with caplog.at_level("INFO", "sipmesh.agent.portmap"):
            candidate = await mapper.candidate([host_candidate("127.0.0.1", 40000)])
        assert (candidate.host, candidate.port) == ("203.0.113.3", 40000)
        assert mapper.mapping.protocol == "nat-pmp" and mapper.mapping.lifetime == 7200
        assert [r.getMessage() for r in caplog.records] == [
            "router port mapping: NAT-PMP 203.0.113.3:40000 -> 127.0.0.1:40000 for 7200 s"]
        await mapper.close()
        assert server.requests[-1] == natpmp_map_request(40000, 0, 0)
    finally:
        transport.close()
        await mapper.close()
