"""A member relay's access rule (agent/memberrelay.py, issue 12 item 4): credentials only
for the roster's members, each for itself; relaying only between the relay's own
allocations, never to a third party. Sans-I/O, then the real turnserver the member runs
(MemberRelay, on loopback) with aioice's TURN client, as members use it."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from aioice import stun, turn

from sipmesh.agent.memberrelay import (CREDENTIAL_LIFETIME, KnownRelay, MemberRelay,
                                       RelayPolicy, choose, parse_credential,
                                       parse_relay_address, offered_relay)
from sipmesh.lab.coturn import coturn_unavailable_reason
from sipmesh.lab.procs import free_port

SECRET = b"s" * 32
MEMBERS = {"p", "s1", "s2"}


def policy(address: str = "203.0.113.7", port: int = 3478) -> RelayPolicy:
    return RelayPolicy(network="lab", me="p", address=address, port=port)


def test_credentials_only_for_members_each_for_itself() -> None:
    now = 1_000_000.0
    rule = policy()
    assert rule.credential_for("mallory", MEMBERS, SECRET, now) is None   # not in the roster
    assert rule.credential_for("p", MEMBERS, SECRET, now) is None         # the relay itself
    username, password = rule.credential_for("s1", MEMBERS, SECRET, now)
    assert username == f"{int(now + CREDENTIAL_LIFETIME)}:s1"
    # s1 takes it; s2 cannot use s1's (the name is in it), nor can a stale one be used
    assert parse_credential(f"{username} {password}", "s1", now)[:2] == (username, password)
    for value, me, at in ((f"{username} {password}", "s2", now),
                          (f"{username} {password}", "s1", now + CREDENTIAL_LIFETIME + 1),
                          (f"{username} {password}x", "s1", now),
                          (f"{username}", "s1", now),
                          (f"{username} {password} more", "s1", now)):
        with pytest.raises(ValueError):
            parse_credential(value, me, at)
    # another secret (another relay, or this one restarted) gives another password
    assert rule.credential_for("s1", MEMBERS, b"t" * 32, now)[1] != password


def test_relay_sends_only_to_its_own_allocations() -> None:
    rule = policy()
    assert rule.peer_allowed("203.0.113.7")            # another member's allocation on it
    for third in ("203.0.113.8", "198.51.100.1", "10.0.0.1", "127.0.0.1", "::1", "garbage"):
        assert not rule.peer_allowed(third), third
    config = rule.config(SECRET, __import__("pathlib").Path("/run/x")).splitlines()
    assert "denied-peer-ip=0.0.0.0-255.255.255.255" in config
    assert [line for line in config if line.startswith("allowed-peer-ip=")] == \
        ["allowed-peer-ip=203.0.113.7"]
    assert "use-auth-secret" in config and "realm=lab" in config
    assert any(line.startswith("user-quota=") for line in config)


def test_roster_relay_address_is_checked() -> None:
    assert parse_relay_address("203.0.113.7:3478") == ("203.0.113.7", 3478)
    for bad in ("203.0.113.7", "203.0.113.7:0", "203.0.113.7:70000", "name:3478",
                "0.0.0.0:3478", "224.0.0.1:3478", "[::1]:3478", "1.2.3.4:34a",
                "127.0.0.1:3478"):
        assert parse_relay_address(bad) is None, bad


def test_the_offer_names_one_relay() -> None:
    assert offered_relay([("mesh-via", "p"), ("candidate", "x")]) == "p"
    for bad in ([], [("mesh-via", "p"), ("mesh-via", "q")], [("mesh-via", "p q")],
                [("mesh-via", "x" * 65)], [("mesh-via", "")]):
        assert offered_relay(bad) is None, bad


def test_nearest_usable_relay() -> None:
    now = time.time()
    far = KnownRelay("a", ("192.0.2.1", 3478), "u", "p", now + 3600, rtt=0.050)
    near = KnownRelay("b", ("192.0.2.2", 3478), "u", "p", now + 3600, rtt=0.010)
    silent = KnownRelay("c", ("192.0.2.3", 3478), "u", "p", now + 3600, rtt=None)
    nocred = KnownRelay("d", ("192.0.2.4", 3478), rtt=0.001)
    assert choose([far, near, silent, nocred], exclude=(), now=now) is near
    assert choose([far, near, silent], exclude=("b",), now=now) is far   # b is in the pair
    assert choose([silent, nocred], exclude=(), now=now) is silent
    assert choose([nocred], exclude=(), now=now) is None


class Received(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.queue.put_nowait((data, addr))

    def error_received(self, exc: Exception) -> None:
        self.queue.put_nowait((b"", ("error", str(exc))))


@pytest.fixture
async def member_relay(tmp_path):
    reason = coturn_unavailable_reason()
    if reason:
        pytest.skip(reason)
    relay = MemberRelay(policy("127.0.0.1", free_port("both")), tmp_path / "relay")
    await relay.start()
    try:
        yield relay
    finally:
        await relay.stop()


async def test_turnserver_enforces_the_rule(member_relay: MemberRelay) -> None:
    # a credential of another relay (or forged) is refused
    with pytest.raises((stun.TransactionError, ConnectionError)):
        await turn.create_turn_endpoint(Received, server_addr=member_relay.address,
                                        username=f"{int(time.time()) + 3600}:s1",
                                        password="A" * 27 + "=")
    # two members' allocations reach each other through it
    s1_user, s1_pw = member_relay.credential_for("s1", MEMBERS)
    s2_user, s2_pw = member_relay.credential_for("s2", MEMBERS)
    t1, r1 = await turn.create_turn_endpoint(Received, server_addr=member_relay.address,
                                             username=s1_user, password=s1_pw)
    t2, r2 = await turn.create_turn_endpoint(Received, server_addr=member_relay.address,
                                             username=s2_user, password=s2_pw)
    third = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    third.bind(("127.0.0.2", 0))   # loopback, but not the relay's address: a third party
    third.settimeout(1.0)
    try:
        a1, a2 = t1.get_extra_info("sockname"), t2.get_extra_info("sockname")
        t2.sendto(b"open", a1)          # s2's permission towards s1's allocation
        t1.sendto(b"hello s2", a2)
        data, source = await asyncio.wait_for(r2.queue.get(), 5)
        assert (data, source) == (b"hello s2", a1)
        assert await asyncio.wait_for(r1.queue.get(), 5) == (b"open", a2)
        # to a third party: the relay refuses the channel (403), nothing arrives
        t1.sendto(b"to a stranger", third.getsockname())
        data, source = await asyncio.wait_for(r1.queue.get(), 5)
        assert source[0] == "error" and "403" in source[1], (data, source)
        with pytest.raises(TimeoutError):
            third.recvfrom(100)
    finally:
        third.close()
        t1.close()
        t2.close()
        await asyncio.sleep(0.1)


def test_roster_advertises_the_relay() -> None:
    """`;mesh-relay=HOST:PORT` on a roster contact (agent/roster.py); a bad one is no relay."""
    from sipmesh.agent.roster import member_of
    p = member_of("sip:p@203.0.113.3:5070;mesh-ip=100.64.0.1;mesh-relay=203.0.113.3:3478")
    assert p is not None and p.relay == ("203.0.113.3", 3478)
    for bad in ("evil.example:3478", "127.0.0.1:22", "203.0.113.3"):
        member = member_of(f"sip:p@203.0.113.3:5070;mesh-ip=100.64.0.1;mesh-relay={bad}")
        assert member is not None and member.relay is None, bad
    assert member_of("sip:s1@192.0.2.9:5070;mesh-ip=100.64.0.4").relay is None
