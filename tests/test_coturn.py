"""coturn as the relay (sipmesh/lab/coturn.py): a member's SIP credentials are its TURN
credentials, because coturn's long-term key is the SIP digest HA1. Real turnserver, real
aioice TURN client, loopback only."""

from __future__ import annotations

import asyncio
import socket

import pytest
from aioice import stun, turn

from sipmesh.sip.auth import compute_ha1

REALM = "mesh.example"


class Received(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.queue.put_nowait((data, addr))


@pytest.fixture
def relay(coturn):
    return coturn(realm=REALM, users={"alice": compute_ha1("alice", REALM, "alice-secret")})


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_sip_credentials_allocate_a_relay_that_carries_data(relay, transport):
    relayed, client = await turn.create_turn_endpoint(
        Received, server_addr=relay.address, username="alice", password="alice-secret",
        transport=transport)
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.settimeout(5)
    try:
        address = relayed.get_extra_info("sockname")
        assert address[0] == "127.0.0.1" and address[1] != relay.port
        relayed.sendto(b"out through the relay", peer.getsockname())   # binds a channel
        data, source = await asyncio.to_thread(peer.recvfrom, 2048)
        assert (data, source) == (b"out through the relay", address)
        peer.sendto(b"back in", address)
        assert await asyncio.wait_for(client.queue.get(), 5) == (b"back in", peer.getsockname())
    finally:
        relayed.close()
        peer.close()


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_a_wrong_password_gets_no_relay(relay, transport):
    with pytest.raises(stun.TransactionFailed, match="401"):
        await turn.create_turn_endpoint(
            Received, server_addr=relay.address, username="alice", password="not-it",
            transport=transport)
    with pytest.raises(stun.TransactionFailed, match="401"):
        await turn.create_turn_endpoint(
            Received, server_addr=relay.address, username="mallory", password="alice-secret",
            transport=transport)


async def test_config_holds_ha1_not_passwords_and_ps_shows_none(relay):
    config = (relay.run_dir / "turnserver.conf")
    assert oct(config.stat().st_mode & 0o777) == "0o600"
    text = config.read_text()
    assert f"user=alice:0x{compute_ha1('alice', REALM, 'alice-secret')}" in text
    assert "alice-secret" not in text
    cmdline = open(f"/proc/{relay.proc.pid}/cmdline", "rb").read()
    assert b"0x" not in cmdline


async def test_coturn_answers_stun_binding(relay):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(5)
    try:
        request = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
        s.sendto(bytes(request), relay.address)
        answer = stun.parse_message(await asyncio.to_thread(lambda: s.recv(2048)))
        assert answer.transaction_id == request.transaction_id
        assert answer.attributes["XOR-MAPPED-ADDRESS"] == s.getsockname()
    finally:
        s.close()
