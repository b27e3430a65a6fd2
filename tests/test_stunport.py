"""ICE checks on a port another program owns (sipmesh.agent.stunport), on loopback: a
session whose host candidate is a port a plain UDP socket (standing in for wireguard-go)
holds finds its path to an ordinary session, from exactly that port, while the owner
keeps its socket; and the UDP datagrams it writes itself carry a correct checksum."""

from __future__ import annotations

import asyncio
import socket
import struct

from sipmesh.agent.ice import IceConfig, IceSession
from sipmesh.agent.stunport import SharedPort, udp_datagram

LOOPBACK = IceConfig(host_addresses=("127.0.0.1",), use_ipv6=False, connect_timeout=5)


def test_udp_datagram_checksum_verifies():
    datagram = udp_datagram(("10.1.0.2", 51820), ("203.0.113.5", 40000), b"abc")
    sport, dport, length, _ = struct.unpack("!HHHH", datagram[:8])
    assert (sport, dport, length, datagram[8:]) == (51820, 40000, 11, b"abc")
    pseudo = socket.inet_aton("10.1.0.2") + socket.inet_aton("203.0.113.5") + \
        struct.pack("!BBH", 0, socket.IPPROTO_UDP, length)
    data = pseudo + datagram + b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    assert total == 0xFFFF    # the receiver's sum over everything, checksum included


async def test_checks_leave_from_the_owned_port_and_the_owner_keeps_it():
    owner = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    owner.bind(("127.0.0.1", 0))
    owner.setblocking(False)
    port = owner.getsockname()[1]
    shared = SharedPort(port, ("127.0.0.1",))
    shared.open()
    ours = IceSession(LOOPBACK, controlling=True, shared=shared)
    theirs = IceSession(LOOPBACK, controlling=False)
    try:
        mine, peer = await ours.gather(), await theirs.gather()
        assert [(c.type, c.port) for c in mine.candidates] == [("host", port)]
        paths = await asyncio.gather(ours.connect(peer), theirs.connect(mine))
        assert [p.kind for p in paths] == ["direct", "direct"]
        assert paths[0].local_address == ("127.0.0.1", port)
        assert paths[1].remote_address == ("127.0.0.1", port)   # the checks came from it
        copies = 0
        while True:     # the owner got the STUN datagrams too (it drops them: WireGuard)
            try:
                owner.recv(2048)
            except BlockingIOError:
                break
            copies += 1
        assert copies > 0
    finally:
        await asyncio.gather(ours.close(), theirs.close())
        shared.close()
        owner.close()
