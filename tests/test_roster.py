"""A mesh network's roster over SIP (issue 12, item 3) on our broker: members register under
the network AOR, read the roster by reg-event SUBSCRIBE (RFC 3680/6665) or REGISTER-fetch
(RFC 3261 §10.2.3), and see each other join, leave and expire. Real UAs over loopback; the
member that vanishes is a process killed with SIGKILL. (The same against Kamailio:
tests/test_roster_kamailio.py.)"""

from __future__ import annotations

import asyncio

import pytest

from sipmesh.agent.errors import AgentError
from sipmesh.agent.roster import NeedFullState, RosterClient, RosterState, member_of
from sipmesh.broker.networks import NetworkStore
from sipmesh.broker.users import UsersFile
from sipmesh.sip import reginfo
from sipmesh.sip.ua import UAConfig, UserAgent
from tests.lab import wait_for_async
from tests.lab.broker import start_broker
from tests.peers.broker import make_broker  # noqa: F401 (fixture)
from tests.peers.roster import (FAST, KAMAILIO_DOC, PASSWORDS, gruu_scenario, lab_broker,  # noqa: F401 (fixture)
                                make_ua, member_ua, raw_with_auth, roster_scenario)
from tests.peers.raw import RawPeer

# ------------------------------------------------------------------ the document and the state

def test_reginfo_round_trip_and_hostile_documents():
    info = reginfo.RegInfo(3, "full", [reginfo.RegistrationInfo("sip:net-lab@example.org", "r", "active", [
        reginfo.ContactInfo("sip:alice@192.0.2.4:5072;mesh-ip=100.64.1.1", "c1", "active", "registered", 60,
                            params={"+sip.instance": '"<urn:uuid:1>"'})])])
    assert reginfo.parse(reginfo.serialise(info)) == info
    bomb = (b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;">]>'
            b'<reginfo xmlns="urn:ietf:params:xml:ns:reginfo" version="0" state="full">&b;</reginfo>')
    for bad, message in [(bomb, "DTD"), (b"<reginfo", "malformed"), (b"x" * (reginfo.MAX_SIZE + 1), "bytes"),
                         (b'<presence xmlns="urn:ietf:params:xml:ns:pidf"/>', "not a reginfo"),
                         (b'<reginfo xmlns="urn:ietf:params:xml:ns:reginfo" version="x" state="full"/>',
                          "not a number"),
                         (b"<reginfo xmlns='urn:ietf:params:xml:ns:reginfo' version='1' state='full'>"
                          + b"<a>" * 20 + b"</a>" * 20 + b"</reginfo>", "too deep")]:
        with pytest.raises(reginfo.RegInfoError, match=message):
            reginfo.parse(bad)


def test_event_and_subscription_state_header_fields():
    from sipmesh.sip.errors import ParseError
    from sipmesh.sip.event import EventType, SubscriptionState, parse_event, parse_subscription_state

    assert parse_event("Reg ; id=\"7\"") == EventType("reg", "7") and str(EventType("reg", "7")) == "reg;id=7"
    assert not parse_event("reg").matches(EventType("reg", "7"))
    state = parse_subscription_state("terminated;reason=deactivated;retry-after=5")
    assert (state.state, state.reason, state.retry_after, state.expires) == ("terminated", "deactivated", 5, None)
    assert parse_subscription_state("active;expires=600").expires == 600
    assert str(SubscriptionState("active", expires=60)) == "active;expires=60"
    for bad in (None, "", "a b", "reg@x"):
        with pytest.raises(ParseError):
            parse_event(bad)




def test_roster_state_turns_documents_into_joined_left_changed():
    state = RosterState("lab", me="carol")
    events = state.from_reginfo(KAMAILIO_DOC)
    assert [(e.kind, e.member.name, e.member.mesh_ip) for e in events] == [("joined", "alice", "100.64.1.1")]

    def doc(version: int, kind: str, *contacts: tuple[str, str, str | None]) -> bytes:
        return reginfo.serialise(reginfo.RegInfo(version, kind, [reginfo.RegistrationInfo(
            "sip:net-lab@example.org", "r", "active",
            [reginfo.ContactInfo(uri, f"c{i}", st, ev, 60) for i, (uri, st, ev) in enumerate(contacts)])]))

    events = state.from_reginfo(doc(1, "full", ("sip:alice@127.0.0.1:40009;mesh-ip=100.64.1.1", "active", None),
                                    ("sip:bob@127.0.0.1:40002;mesh-ip=100.64.1.2", "active", None),
                                    ("sip:carol@127.0.0.1:40003;mesh-ip=100.64.1.3", "active", None)))
    assert sorted((e.kind, e.member.name) for e in events) == [("changed", "alice"), ("joined", "bob")]
    assert state.self_member.mesh_ip == "100.64.1.3" and set(state.members) == {"alice", "bob"}
    events = state.from_reginfo(doc(2, "partial", ("sip:bob@127.0.0.1:40002", "terminated", "expired")))
    assert [(e.kind, e.member.name, e.reason) for e in events] == [("left", "bob", "expired")]
    with pytest.raises(NeedFullState):
        state.from_reginfo(doc(9, "partial"))
    # hostile contacts: a garbled mesh address is no address; a user name that is no name is no member
    events = state.from_reginfo(doc(10, "full", ("sip:alice@127.0.0.1:40009;mesh-ip=100.64.1.300", "active", None),
                                    ("sip:127.0.0.1:40010", "active", None)))
    assert [(e.kind, e.member.name, e.member.mesh_ip) for e in events] == [("changed", "alice", None)]
    assert member_of("sip:%00bad@h") is None


def test_the_union_of_two_servers_rosters():
    """Each server's roster on its own, the member acts on their union: a member listed by
    either is in; one that both list with different addresses has the first server's; one
    is gone only when neither lists it."""
    def doc(version: int, *uris: str) -> bytes:
        return reginfo.serialise(reginfo.RegInfo(version, "full", [reginfo.RegistrationInfo(
            "sip:net-lab@example.org", "r", "active",
            [reginfo.ContactInfo(uri, f"c{i}", "active", None, 60) for i, uri in enumerate(uris)])]))

    first, second, union = (RosterState("lab", me="alice") for _ in range(3))
    first.from_reginfo(doc(1, "sip:alice@192.0.2.1:5060;mesh-ip=100.64.1.1",
                           "sip:carol@192.0.2.3:5060;mesh-ip=100.64.1.3"))
    second.from_reginfo(doc(1, "sip:alice@192.0.2.1:5060;mesh-ip=100.64.1.1",
                            "sip:bob@192.0.2.2:5060;mesh-ip=100.64.1.2",
                            "sip:carol@192.0.2.3:5060;mesh-ip=100.64.1.9"))
    events = union.union([first, second], {})
    assert sorted((e.kind, e.member.name, e.member.mesh_ip) for e in events) == [
        ("joined", "bob", "100.64.1.2"), ("joined", "carol", "100.64.1.3")]
    assert union.self_member.mesh_ip == "100.64.1.1"
    gone = second.from_reginfo(doc(2, "sip:alice@192.0.2.1:5060;mesh-ip=100.64.1.1",
                                   "sip:bob@192.0.2.2:5060;mesh-ip=100.64.1.2"))
    assert [e.member.name for e in gone] == ["carol"]
    assert union.union([first, second], {}) == []  # carol: the first still lists her
    gone = first.from_reginfo(doc(2, "sip:alice@192.0.2.1:5060;mesh-ip=100.64.1.1"))
    events = union.union([first, second], {e.member.name: "deactivated" for e in gone})
    assert [(e.kind, e.member.name, e.reason) for e in events] == [("left", "carol", "deactivated")]
    assert set(union.members) == {"bob"}


# ------------------------------------------------------------------ over SIP, our broker

async def test_three_members_see_each_other_join_leave_and_expire(lab_broker, member_ua, tmp_path):
    # addresses come from the broker's allocation (the members claim none)
    await roster_scenario(lab_broker.hostport, member_ua, tmp_path, register_expires=3, expiry_bound=3 + 1,
                          addresses={"alice": "100.64.1.1", "bob": "100.64.1.2", "carol": "100.64.1.3"},
                          own_addresses=False)


async def test_the_broker_overrides_a_claimed_mesh_address_and_keeps_one_binding_per_member(
        lab_broker, member_ua):
    alice = RosterClient(await member_ua("alice", lab_broker.hostport), "lab", mesh_ip="100.64.1.99")
    await alice.start()
    restarted = RosterClient(await member_ua("alice", lab_broker.hostport), "lab")  # a new port: a restart
    await restarted.start()
    bob = RosterClient(await member_ua("bob", lab_broker.hostport), "lab")
    await bob.start()
    await wait_for_async(lambda: "alice" in bob.members, 5, what="bob sees alice")
    assert bob.members["alice"].mesh_ip == "100.64.1.1"
    assert bob.members["alice"].contact.startswith(f"sip:alice@127.0.0.1:{restarted.ua.config.listen_port}")
    fetched = await bob.ua.fetch_bindings(bob.aor)  # the poll way: one binding per member
    assert sorted(str(c.uri).split(";")[0] for c in fetched.contacts) == sorted(
        [f"sip:alice@127.0.0.1:{restarted.ua.config.listen_port}", f"sip:bob@127.0.0.1:{bob.ua.config.listen_port}"])
    for client in (alice, restarted, bob):
        await client.stop()


async def test_a_pair_invite_at_a_members_gruu_reaches_that_member_alone(lab_broker, member_ua):
    status = await gruu_scenario(lab_broker.hostport, member_ua)
    assert status == 403   # zed is no member: no one to be paired with


async def test_polling_without_push_sees_the_same_roster(lab_broker, member_ua):
    alice = RosterClient(await member_ua("alice", lab_broker.hostport), "lab", push=False, poll_interval=0.3)
    await alice.start()
    assert alice.mode == "poll" and alice.members == {}
    bob = RosterClient(await member_ua("bob", lab_broker.hostport), "lab")
    await bob.start()
    await wait_for_async(lambda: "bob" in alice.members, 5, what="alice polls bob in")
    assert alice.members["bob"].mesh_ip == "100.64.1.2" and alice.mesh_ip == "100.64.1.1"
    await bob.stop()
    await wait_for_async(lambda: alice.members == {}, 5, what="alice polls bob out")
    await alice.stop()


async def test_only_members_join_and_watch_and_only_with_their_own_contact(lab_broker, member_ua):
    domain = lab_broker.hostport
    with pytest.raises(AgentError, match="403.*not a member of network lab"):
        await RosterClient(await member_ua("mallory", domain), "lab").start()  # right password, no member
    with pytest.raises(AgentError, match="401"):
        await RosterClient(await member_ua("bob", domain, password="wrong"), "lab").start()
    with pytest.raises(AgentError, match="401"):  # dave's password is for realm lab, but dave is in other
        await RosterClient(await member_ua("alice", domain, password="domain-pw"), "lab").start()
    with pytest.raises(AgentError, match="403"):
        await RosterClient(await member_ua("dave", domain), "lab").start()

    bob = await member_ua("bob", domain)
    aor = RosterClient(bob, "lab").aor
    alice_contact = RosterClient(await member_ua("alice", domain), "lab").contact()
    refused = await bob.register(60, aor=aor, contact=alice_contact)  # binding someone else's contact
    assert refused.status == 403 and "own name" in refused.reason
    peer = await RawPeer.open()
    try:
        star = await raw_with_auth(peer, lab_broker, "bob", "REGISTER", ["Contact: *", "Expires: 0"])
        assert star.status == 403 and "Contact: *" in star.reason
        watcher = await raw_with_auth(peer, lab_broker, "mallory", "SUBSCRIBE", ["Event: reg"])
        assert watcher.status == 403 and "only members" in watcher.reason
        other = await raw_with_auth(peer, lab_broker, "bob", "SUBSCRIBE", ["Event: presence"])
        assert other.status == 489 and other.headers.get("Allow-Events") == "reg"
    finally:
        peer.close()


async def test_the_acl_decides_who_sees_whom(lab_broker, member_ua, tmp_path):
    store = NetworkStore(tmp_path / "broker.db")
    store.add_members("lab", ["alice"], ["staff"])
    store.allow("lab", "@staff", "*")  # alice reaches everyone; bob and carol only alice
    clients = {}
    for name in ("alice", "bob", "carol"):
        clients[name] = RosterClient(await member_ua(name, lab_broker.hostport), "lab")
        await clients[name].start()
    await wait_for_async(lambda: set(clients["alice"].members) == {"bob", "carol"}, 5, what="alice sees both")
    await wait_for_async(lambda: set(clients["bob"].members) == {"alice"}, 5, what="bob sees alice")
    await wait_for_async(lambda: set(clients["carol"].members) == {"alice"}, 5, what="carol sees alice")
    assert set(clients["bob"].members) == {"alice"}  # and never carol
    store.allow("lab", "bob", "carol")  # a rule added while they run: the rosters follow
    await wait_for_async(lambda: set(clients["carol"].members) == {"alice", "bob"}, 5, what="carol sees bob")
    store.remove_members("lab", ["bob"])  # removed from the network: gone from every roster
    await wait_for_async(lambda: set(clients["alice"].members) == {"carol"}, 5, what="bob removed")
    store.close()
    for client in clients.values():
        await client.stop()


async def test_a_subscription_is_refreshed_and_expires_when_not(lab_broker, member_ua):
    alice = RosterClient(await member_ua("alice", lab_broker.hostport), "lab", subscribe_expires=3)
    await alice.start()
    first = alice.subscription
    await asyncio.sleep(4)  # longer than the subscription: it must have been refreshed
    assert alice.subscription is first and not first.ended.done()
    assert len(lab_broker.roster.subscriptions) == 1
    # a subscriber that vanishes: the broker ends the subscription when it runs out
    bob_ua = await member_ua("bob", lab_broker.hostport)
    sub = await bob_ua.subscribe(RosterClient(bob_ua, "lab").aor, "reg", accept=reginfo.CONTENT_TYPE, expires=2)
    assert len(lab_broker.roster.subscriptions) == 2
    await asyncio.wait_for(sub.ended, 5)
    assert "timeout" in sub.ended.result()
    await wait_for_async(lambda: len(lab_broker.roster.subscriptions) == 1, 2, what="bob's subscription gone")
    await alice.stop()


async def test_a_broker_with_two_workers_notifies_changes_made_in_the_other(tmp_path, member_ua):
    """Subscriptions live in one worker; registrations land in any: the roster still follows."""
    users = UsersFile(tmp_path / "users")
    for user in ("alice", "bob", "carol"):
        users.add("lab", user, PASSWORDS[user])
    users.save()
    store = NetworkStore(tmp_path / "broker.db")
    store.create("lab", "10.99.0.0/24")
    store.add_members("lab", ["alice", "bob", "carol"])
    store.close()
    proc, port = start_broker(tmp_path, users=tmp_path / "users", extra=["--workers", "2", "--min-expires", "2"])
    try:
        domain = f"127.0.0.1:{port}"
        alice = RosterClient(await member_ua("alice", domain), "lab")
        await alice.start()
        for name in ("bob", "carol"):  # from other sources: the kernel spreads them over the workers
            await RosterClient(await member_ua(name, domain, transport="TCP"), "lab", register_expires=2).start()
        await wait_for_async(lambda: {m.name: m.mesh_ip for m in alice.members.values()} ==
                             {"bob": "10.99.0.2", "carol": "10.99.0.3"}, 5, what=f"alice sees both ({alice.members})")
        await alice.stop()
    finally:
        proc.stop(grace=5)
    assert "Traceback" not in proc.log_text(), proc.log_tail()


async def test_members_follow_the_roster_across_a_broker_restart(make_broker, member_ua, tmp_path):  # noqa: F811
    """A broker that stops ends its subscriptions (deactivated); the members subscribe again,
    to the broker that comes back on the same address and store, and miss no change."""
    users = UsersFile(tmp_path / "users")
    for user in ("alice", "bob"):
        users.add("lab", user, PASSWORDS[user])
    users.save()
    store = NetworkStore(tmp_path / "broker.db")
    store.create("lab", "100.64.1.0/24")
    store.add_members("lab", ["alice", "bob"])
    store.close()
    settings = dict(users_file=tmp_path / "users", db_path=tmp_path / "broker.db", registrar=FAST)
    first = await make_broker(**settings)
    host, port = first.address()
    alice = RosterClient(await member_ua("alice", f"{host}:{port}"), "lab", poll_interval=5)
    await alice.start()
    subscription = alice.subscription
    await first.stop()
    await asyncio.wait_for(subscription.ended, 5)
    assert "deactivated" in subscription.ended.result()
    await make_broker(listen=[(host, port)], **settings)  # the same address, the same store
    bob = RosterClient(await member_ua("bob", f"{host}:{port}"), "lab")
    await bob.start()
    await wait_for_async(lambda: "bob" in alice.members, 5, what="alice sees bob through the new broker")
    assert alice.mode == "push" and alice.subscription is not subscription
    await bob.stop()
    await alice.stop()


async def test_with_two_servers_the_roster_is_the_union_of_theirs(make_broker, tmp_path):  # noqa: F811
    """Two brokers with one network (imported from the first by the second, as docs/broker.md
    has it): alice is a member at both; bob registered at the second only (he joined while
    the first was down), carol at the first only. Alice sees both, each with the address
    both brokers agree on; bob, at the second only, does not see carol; bob leaving is seen."""
    users = UsersFile(tmp_path / "users")
    for user in ("alice", "bob", "carol"):
        users.add("lab", user, PASSWORDS[user])
    users.save()
    dbs = [tmp_path / "b1.db", tmp_path / "b2.db"]
    first = NetworkStore(dbs[0])
    first.create("lab", "100.64.3.0/24")
    first.add_members("lab", ["alice", "bob", "carol"])
    NetworkStore(dbs[1]).replace_all(first.export())
    first.close()
    brokers = [await make_broker(users_file=tmp_path / "users", db_path=db, registrar=FAST) for db in dbs]
    servers = ["127.0.0.1:%d" % b.address("UDP")[1] for b in brokers]
    uas = []

    async def member(name: str, *at: str) -> RosterClient:
        ua = UserAgent(UAConfig(user=name, domain=at[0], servers=at[1:], password=PASSWORDS[name],
                                listen_port=0, transports=("UDP",)))
        await ua.start()
        uas.append(ua)
        client = RosterClient(ua, "lab")
        await client.start()
        return client

    try:
        alice = await member("alice", *servers)
        # start() returns once one server has us; the other answers in the background
        await wait_for_async(lambda: [r.state for r in alice.registrations] == ["registered"] * 2, 5,
                             what=f"alice registered at both ({[r.state for r in alice.registrations]})")
        bob = await member("bob", servers[1])
        carol = await member("carol", servers[0])
        await wait_for_async(lambda: {m.name: m.mesh_ip for m in alice.members.values()} ==
                             {"bob": "100.64.3.2", "carol": "100.64.3.3"}, 5, what=f"alice sees both ({alice.members})")
        assert alice.mode == "push" and alice.mesh_ip == "100.64.3.1"
        await wait_for_async(lambda: set(bob.members) == {"alice"}, 5, what=f"bob sees alice ({bob.members})")
        assert "carol" not in bob.members
        await bob.stop()

        async def bob_left():
            async for event in alice.events():
                if event.kind == "left":
                    return event
        left = await asyncio.wait_for(bob_left(), 5)
        assert (left.member.name, left.reason) == ("bob", "unregistered")
        assert set(alice.members) == {"carol"}
        await carol.stop()
        await alice.stop()
    finally:
        for ua in uas:
            await ua.stop()
