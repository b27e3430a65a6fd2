"""Mesh network members in a test (issue 12): user agents with their network passwords
(`member_ua`), a member as a process (`member_process`, tests/peers/roster_member.py), and
the roster scenario that runs against our broker and Kamailio alike (`roster_scenario`), a
pair's INVITE to one member's public GRUU (`gruu_scenario`, both servers too), and a request
to the network's AOR made by hand, with the member's digest (`raw_with_auth`)."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from sipmesh.agent.roster import RosterClient
from sipmesh.broker.networks import NetworkStore
from sipmesh.broker.registrar import RegistrarPolicy
from sipmesh.broker.users import UsersFile
from sipmesh.sip.gruu import instance_of
from sipmesh.sip.message import Response
from sipmesh.sip.ua import CallFailed, IncomingCall, UserAgent
from tests.lab import Kamailio, shipped_kamailio, spawn, wait_for_async
from tests.peers.broker import SDP_A, SDP_B, answering, make_ua, sip  # noqa: F401 (fixture)
from tests.peers.raw import RawPeer

PASSWORDS = {"alice": "a-pw", "bob": "b-pw", "carol": "c-pw", "mallory": "m-pw", "dave": "d-pw"}
FAST = RegistrarPolicy(min_expires=2, max_expires=3600, default_expires=3600)
USRLOC_TIMER = 1  # how often Kamailio looks for expired bindings

# Kamailio 5.6's pua_reginfo writes this (usrloc_cb.c: build_reginfo_full), other attributes and all.
KAMAILIO_DOC = b"""<?xml version="1.0"?>
<reginfo xmlns="urn:ietf:params:xml:ns:reginfo" version="0" state="full">
  <registration aor="sip:net-lab@127.0.0.1" id="0x7f0" state="active">
    <contact id="0x7f1" state="active" event="registered" expires="298" callid="x" cseq="2" received="" path="" user_agent="sipmesh/0.1">
      <uri>sip:alice@127.0.0.1:40001;mesh-ip=100.64.1.1</uri>
    </contact>
    <contact id="0x7f2" state="terminated" event="unregistered" expires="-1" callid="y" cseq="3">
      <uri>sip:bob@127.0.0.1:40002</uri>
    </contact>
  </registration>
</reginfo>"""


@pytest.fixture
def member_ua(make_ua):  # noqa: F811
    """A started UA of a member on the SIP server at "host:port", with its network password."""
    async def make(user: str, domain: str, password: str | None = None, transport: str = "UDP",
                   on_invite=None) -> UserAgent:
        return await make_ua(user, domain, password=password or PASSWORDS[user], transport=transport,
                             transports=(transport,), on_invite=on_invite)
    return make


def member_process(tmp_path: Path, domain: str, user: str, network: str = "lab", *extra: str):
    env = dict(os.environ, ROSTER_PASSWORD=PASSWORDS[user])
    return spawn([sys.executable, "-m", "tests.peers.roster_member", domain, user, network, *extra],
                 cwd=Path(__file__).resolve().parents[2], env=env, log_path=tmp_path / f"{user}.log",
                 name=f"member-{user}")


async def roster_scenario(domain: str, member_ua, tmp_path: Path, *, register_expires: int,
                          expiry_bound: float, addresses: dict[str, str], own_addresses: bool) -> None:
    """Three members see each other; one unregisters, one vanishes (SIGKILL): the others
    see both leave, the second within `expiry_bound` of its last registration."""
    clients = {}
    for name in ("alice", "carol"):
        ua = await member_ua(name, domain)
        clients[name] = RosterClient(ua, "lab", register_expires=register_expires, subscribe_expires=60,
                                     mesh_ip=addresses[name] if own_addresses else None)
        await clients[name].start()
        assert clients[name].mode == "push"
    bob = member_process(tmp_path, domain, "bob", "lab", "--register-expires", str(register_expires),
                         *(["--mesh-ip", addresses["bob"]] if own_addresses else []))
    try:
        await wait_for_async(lambda: "ready push" in bob.log_text(), 15, what="bob's roster client",
                             abort=bob.exit_reason)
        for name, client in clients.items():
            others = {n: addresses[n] for n in ("alice", "bob", "carol") if n != name}
            await wait_for_async(lambda: {m.name: m.mesh_ip for m in client.members.values()} == others, 10,
                                 what=f"{name} sees {others} (has {client.members})")
            assert client.mesh_ip == addresses[name]
        await wait_for_async(lambda: "joined alice" in bob.log_text() and "joined carol" in bob.log_text(), 10,
                             what="bob sees alice and carol", abort=bob.exit_reason)

        await clients["carol"].stop()  # leaves: unsubscribe, unregister
        await wait_for_async(lambda: set(clients["alice"].members) == {"bob"}, 5, what="alice sees carol leave")
        await wait_for_async(lambda: "left carol unregistered" in bob.log_text(), 5, what="bob sees carol leave",
                             abort=bob.exit_reason)

        # bob refreshes its binding at half its lifetime; once it is killed, the binding runs out
        killed = time.monotonic()
        bob.signal_group(signal.SIGKILL)
        bob.wait(5)
        left = []
        async def bob_left() -> bool:
            async for event in clients["alice"].events():
                if event.kind == "left" and event.member.name == "bob":
                    left.append(event)
                    return True
            return False
        await asyncio.wait_for(bob_left(), expiry_bound + 5)
        took = time.monotonic() - killed
        assert left[0].reason == "expired", left
        assert took <= expiry_bound, f"bob's expiry seen after {took:.1f} s (bound {expiry_bound} s)"
        assert clients["alice"].members == {}
    finally:
        bob.stop(grace=1)
        await clients["alice"].stop()


async def gruu_scenario(domain: str, member_ua, *, addresses: dict[str, str] | None = None) -> int:
    """alice, bob and carol in network lab; alice INVITEs bob at his public GRUU (what
    `sipmesh up` does for a pair): bob alone gets the INVITE and answers, carol, another
    binding of the same network AOR, gets nothing; so again after bob vanished and came
    back on another port (his binding replaced, by its instance). Returns the final status of alice's
    INVITE to the GRUU of zed, who is no member (the caller asserts the server's answer)."""
    invited: dict[str, list[IncomingCall]] = {"bob": [], "carol": []}
    uas, clients = {}, {}
    try:
        for name in ("alice", "bob", "carol"):
            handler = answering(SDP_B, invited[name]) if name in invited else None
            uas[name] = await member_ua(name, domain, on_invite=handler)
            clients[name] = RosterClient(uas[name], "lab", mesh_ip=(addresses or {}).get(name))
            await clients[name].start()
        await wait_for_async(lambda: set(clients["alice"].members) == {"bob", "carol"}, 10,
                             what="alice sees bob and carol")
        target = clients["alice"].gruu("bob")
        assert target.user == "net-lab" and instance_of(target) == clients["bob"].instance
        call = await uas["alice"].invite(target, SDP_A, timeout=10)
        assert call.remote_sdp == SDP_B
        await call.bye()   # a round trip more: a forked branch would have reached carol by now
        assert len(invited["bob"]) == 1 and invited["carol"] == [], invited
        assert instance_of(invited["bob"][0].request.to.uri) == clients["bob"].instance

        # bob vanishes (his binding stays until it runs out) and comes back on another port,
        # with the same instance: his GRUU reaches the new binding, not the dead one
        await uas["bob"].stop()
        del clients["bob"]
        uas["bob"] = await member_ua("bob", domain, on_invite=answering(SDP_B, invited["bob"]))
        clients["bob"] = RosterClient(uas["bob"], "lab", mesh_ip=(addresses or {}).get("bob"))
        await clients["bob"].start()
        call = await uas["alice"].invite(target, SDP_A, timeout=5)
        await call.bye()
        assert len(invited["bob"]) == 2 and invited["carol"] == [], invited
        try:
            await uas["alice"].invite(clients["alice"].gruu("zed"), SDP_A, timeout=10)
        except CallFailed as exc:
            status = exc.status
        else:
            raise AssertionError("the GRUU of no member was answered")
        assert len(invited["bob"]) == 2 and invited["carol"] == [], invited
        return status
    finally:
        for client in clients.values():
            await client.stop()


async def raw_with_auth(peer: RawPeer, broker, user: str, method: str, headers: list[str],
                        body: bytes = b"") -> Response:
    """`method` to sip:net-lab@broker from `user`, answering the digest challenge."""
    from sipmesh.sip.auth import DigestClient

    host, port = broker.address()
    uri = f"sip:net-lab@{host}:{port}"
    if method == "REGISTER":
        uri, to = f"sip:{host}:{port}", f"<sip:net-lab@{host}:{port}>"
    else:
        to = f"<{uri}>"
    call_id = secrets.token_hex(8)
    for cseq in (1, 2):
        extra = list(headers)
        if cseq == 2:
            name = "WWW-Authenticate" if response.status == 401 else "Proxy-Authenticate"
            value = DigestClient(user, PASSWORDS[user]).authorize(response.headers.get(name), method, uri,
                                                                  body)
            extra.append(f"{'Authorization' if response.status == 401 else 'Proxy-Authorization'}: {value}")
        peer.send(sip(method, uri, peer, user=user, to=to, call_id=call_id, cseq=cseq, headers=extra, body=body,
                      domain=f"{host}:{port}"), (host, port))
        response = await peer.final(call_id)
        if response.status not in (401, 407):
            return response
    return response


# ------------------------------------------------------------------ the network on each server

@pytest.fixture
async def lab_broker(make_broker, tmp_path):  # noqa: F811
    """An in-process broker with network lab (alice, bob, carol; mallory has credentials in
    the realm but is no member; dave is a member in another network)."""
    users = UsersFile(tmp_path / "users")
    for user, password in PASSWORDS.items():
        users.add("lab", user, password)
    users.add("127.0.0.1", "alice", "domain-pw")
    users.save()
    db = tmp_path / "broker.db"
    store = NetworkStore(db)
    store.create("lab", "100.64.1.0/24")
    store.add_members("lab", ["alice", "bob", "carol"])
    store.create("other", "100.64.2.0/24")
    store.add_members("other", ["dave"])
    store.close()
    return await make_broker(users_file=tmp_path / "users", db_path=db, registrar=FAST)


@pytest.fixture
def lab_kamailio(tmp_path) -> Iterator[Kamailio]:
    """Kamailio with the documented config; alice, bob, carol are members of lab (their
    credentials are in realm lab); mallory's are in the served domain only."""
    users = UsersFile(tmp_path / "users")
    for user in ("alice", "bob", "carol"):
        users.add("lab", user, PASSWORDS[user])
    users.add("127.0.0.1", "mallory", PASSWORDS["mallory"])
    users.save()
    k = shipped_kamailio(tmp_path / "kamailio", tmp_path / "users", mesh_domain="127.0.0.1",
                         defines=["MIN_EXPIRES 2", f"USRLOC_TIMER {USRLOC_TIMER}"])
    k.start()
    try:
        yield k
    finally:
        k.stop()
