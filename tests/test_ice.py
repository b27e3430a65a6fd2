"""ICE for sessions (sipmesh.agent.ice): the SDP attributes, candidate checks and pacing as
pure functions; then real aioice sessions in the NAT lab of sipmesh/lab/topology.py, with
coturn as the relay and a STUN responder where the SIP server would be."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from aioice import stun

from sipmesh.agent.attributes import build_sdp, read_attribute_list, read_attributes
from sipmesh.agent.ice import (MAX_CANDIDATES, Candidate, IceConfig, IceDescription, IceError,
                               IceSession, Pacer, check_candidate, explain, parse, render)
from tests.lab.icepair import PROBE, lab, read, session  # noqa: F401 (fixture)

PWD = "Jk8s0dLq2vTz9PmWc4Rn7e"


def candidate(host: str = "203.0.113.3", port: int = 40000, kind: str = "srflx",
              **extra: object) -> Candidate:
    fields = dict(foundation="1", component=1, transport="udp", priority=1694498815,
                  host=host, port=port, type=kind)
    fields.update(extra)
    return Candidate(**fields)


def attributes(*candidates: str, ufrag: str = "Ab3x", pwd: str = PWD) -> list[tuple[str, str]]:
    return [("ice-ufrag", ufrag), ("ice-pwd", pwd)] + [("candidate", c) for c in candidates] \
        + [("end-of-candidates", "")]


# ----------------------------------------------------------------------- SDP attributes


def test_description_goes_through_an_sdp_body_and_back():
    mine = IceDescription("Ab3x", PWD, [candidate("10.1.0.2", kind="host"),
                                        candidate(related_address="10.1.0.2", related_port=40000),
                                        candidate("203.0.113.2", 50000, "relay")])
    body = build_sdp(username="a", address="10.1.0.2", media="application", proto="udp",
                     port=9, attributes=[("PORT", "5000"), *render(mine)])
    text = body.decode()
    assert text.count("a=candidate:") == 3 and "a=end-of-candidates\r\n" in text
    assert "a=ice-ufrag:Ab3x\r\n" in text and "a=ice-options:ice2\r\n" in text
    theirs = parse(read_attribute_list(body))
    assert (theirs.ufrag, theirs.pwd, theirs.complete, theirs.refused) == ("Ab3x", PWD, True, [])
    assert [c.to_sdp() for c in theirs.candidates] == [c.to_sdp() for c in mine.candidates]
    # the application's own parameters read as before; candidates are not among them
    assert read_attributes(body) == {"PORT": "5000", "ice-ufrag": "Ab3x", "ice-pwd": PWD,
                                     "ice-options": "ice2", "end-of-candidates": ""}


def test_the_nat_mapping_goes_along_as_a_hint():
    mine = IceDescription("Ab3x", PWD, [candidate("10.1.0.2", kind="host")],
                          mapping="per-destination")
    assert ("x-nat-mapping", "per-destination") in render(mine)
    assert parse(render(mine)).mapping == "per-destination"
    assert parse(render(IceDescription("Ab3x", PWD))).mapping is None
    # anything else the peer claims is no hint at all (and no error)
    odd = [*render(IceDescription("Ab3x", PWD)), ("x-nat-mapping", "full-cone; drop")]
    assert parse(odd).mapping is None


def test_password_is_not_in_the_repr():
    assert PWD not in repr(IceDescription("Ab3x", PWD))
    assert "secret" not in repr(IceConfig(turn_username="a", turn_password="secret"))


def test_a_peer_without_ice_has_no_description():
    assert parse([("IP4", "10.0.0.1"), ("PORT", "5000")]) is None


@pytest.mark.parametrize("attrs, problem", [
    ([("ice-pwd", PWD), ("candidate", "1 1 udp 1 203.0.113.3 4000 typ host")], "ice-ufrag"),
    ([("ice-ufrag", "Ab3x")], "ice-pwd"),
    ([("ice-ufrag", "Ab3x"), ("ice-pwd", "short")], "ice-pwd"),
    ([("ice-ufrag", "A b"), ("ice-pwd", PWD)], "ice-ufrag"),
    ([("ice-ufrag", "Ab3x"), ("ice-ufrag", "Zz9z"), ("ice-pwd", PWD)], "ice-ufrag"),
])
def test_bad_credentials_are_refused(attrs, problem):
    with pytest.raises(IceError, match=problem):
        parse(attrs)


def test_a_thousand_candidates_are_capped():
    values = [f"{i} 1 udp 2130706431 198.51.100.{i % 250 + 1} {1024 + i} typ host"
              for i in range(1000)]
    description = parse(attributes(*values))
    assert len(description.candidates) == MAX_CANDIDATES == 20
    assert len(description.refused) == 980
    assert all(r.endswith("more than 20 candidates") for r in description.refused)


@pytest.mark.parametrize("value, reason", [
    ("1 1 udp 1 203.0.113.3", "not '<foundation>"),
    ("1 1 udp 1 203.0.113.3 4000 type host", "not '<foundation>"),
    ("1 1 udp x 203.0.113.3 4000 typ host", "bad number"),
    ("1 1 udp 1 203.0.113.3 4000 typ host raddr", "extension attribute"),
    ("1 1 udp 1 203.0.113.3 4000 typ host " + "x " * 200, "longer than 256"),
    ("1 1 udp 1 printer.local 4000 typ host", "not an IP address"),
    ("1 1 udp 1 203.0.113.3 4000 typ host", None),
])
def test_malformed_candidates_are_refused_not_raised(value, reason):
    description = parse(attributes(value))
    if reason is None:
        assert len(description.candidates) == 1 and not description.refused
    else:
        assert not description.candidates and reason in description.refused[0]


def test_a_repeated_address_is_used_once():
    description = parse(attributes("1 1 udp 2 203.0.113.3 4000 typ host",
                                   "2 1 udp 1 203.0.113.3 4000 typ srflx"))
    assert len(description.candidates) == 1
    assert "same address" in description.refused[0]


@pytest.mark.parametrize("host", ["0.0.0.0", "224.0.0.1", "239.255.255.250", "255.255.255.255",
                                  "127.0.0.1", "169.254.1.1", "240.0.0.1", "::", "::1",
                                  "ff02::1", "fe80::1", "::ffff:127.0.0.1"])
def test_addresses_no_check_may_go_to(host):
    assert check_candidate(candidate(host)) is not None


@pytest.mark.parametrize("host", ["203.0.113.3", "10.1.0.2", "192.168.1.20", "2001:db8::7"])
def test_addresses_a_check_may_go_to(host):
    assert check_candidate(candidate(host)) is None


def test_loopback_only_when_we_are_on_loopback_ourselves():
    assert check_candidate(candidate("127.0.0.1"), allow_loopback=True) is None
    assert parse(attributes("1 1 udp 1 127.0.0.1 4000 typ host")).candidates == []
    assert len(parse(attributes("1 1 udp 1 127.0.0.1 4000 typ host"),
                     allow_loopback=True).candidates) == 1


@pytest.mark.parametrize("change, reason", [
    (dict(component=2), "component"), (dict(transport="tcp"), "transport"),
    (dict(type="prflx"), "type"), (dict(port=0), "port"), (dict(priority=0), "priority"),
    (dict(priority=2**31), "priority"), (dict(foundation="x" * 33), "foundation"),
    (dict(foundation="a-b"), "foundation"),
])
def test_candidate_fields_are_checked(change, reason):
    assert reason in check_candidate(candidate(**change))


# ----------------------------------------------------------------------- pacing


def test_pacer_spaces_checks_and_caps_them():
    pacer = Pacer(interval=0.05, limit=3)
    starts = []
    for tick in range(100):            # a clock ticking every 20 ms, like aioice's loop
        now = tick * 0.02
        if pacer.ready(now):
            pacer.take(now)
            starts.append(round(now, 2))
    assert starts == [0.0, 0.06, 0.12]  # Ta >= 50 ms, and no more than the cap, ever
    assert pacer.at_limit(10.0)


def test_agent_pacer_window_frees_up_again():
    pacer = Pacer(interval=0.005, limit=2, window=1.0)
    pacer.take(0.0)
    pacer.take(0.01)
    assert not pacer.ready(0.5) and pacer.at_limit(0.5)
    assert pacer.ready(1.001)


# ----------------------------------------------------------------------- explanation


def facts(**change):
    base = dict(local_types=["host", "srflx", "relay"], remote_types=["host", "srflx", "relay"],
                nat_here=True, nat_there=True, mapping="endpoint-independent",
                relay_transport="udp", has_relay=True)
    base.update(change)
    return base


@pytest.mark.parametrize("kind, change, words", [
    ("direct", dict(nat_here=False, nat_there=False), "both reachable at their own"),
    ("direct", dict(nat_there=False), "peer is reachable at its own address"),
    ("direct", dict(nat_here=False), "we are reachable"),
    ("direct", {}, "through both NATs"),
    ("relayed", dict(relay_transport="tcp", local_types=["host", "relay"]), "UDP is blocked"),
    ("relayed", dict(mapping="per-destination"), "our NAT maps per destination (symmetric)"),
    ("relayed", dict(remote_types=["relay"]), "offers only a relay"),
    ("relayed", {}, "no direct check succeeded"),
    ("none", dict(remote_types=[]), "no usable candidate"),
    ("none", dict(has_relay=False), "there is no relay"),
    ("none", {}, "not even through the relay"),
])
def test_the_path_is_explained_in_words(kind, change, words):
    assert words in explain(kind, **facts(**change))


# ----------------------------------------------------------------------- loopback


async def test_two_sessions_on_loopback_connect_directly():
    config = IceConfig(host_addresses=("127.0.0.1",))
    caller, callee = IceSession(config, controlling=True), IceSession(config, controlling=False)
    try:
        offer, answer = await asyncio.gather(caller.gather(), callee.gather())
        theirs, ours = callee.read_remote(render(offer)), caller.read_remote(render(answer))
        path, other = await asyncio.gather(caller.connect(ours), callee.connect(theirs))
        assert (path.kind, path.local_type, path.remote_type) == ("direct", "host", "host")
        assert path.remote_address == (answer.candidates[0].host, answer.candidates[0].port)
        assert path.rtt is not None and 0 < path.rtt < 1
        assert caller.local_port == offer.candidates[0].port
        await caller.connection.sendto(b"over the checked path", 1)
        assert await asyncio.wait_for(callee.connection.recvfrom(), 5) == \
            (b"over the checked path", 1)
    finally:
        await caller.close()
        await callee.close()


async def test_spoofed_checks_teach_at_most_twenty_peer_reflexive_candidates():
    """The peer (who knows the credentials) sends checks from 30 source addresses, as a
    spoofer could: each is answered, but only 20 become candidates that we check."""
    config = IceConfig(host_addresses=("127.0.0.1",))
    caller, callee = IceSession(config, controlling=True), IceSession(config, controlling=False)
    spoofers = []
    try:
        offer, answer = await asyncio.gather(caller.gather(), callee.gather())
        await asyncio.gather(caller.connect(caller.read_remote(render(answer))),
                             callee.connect(callee.read_remote(render(offer))))
        target = (answer.candidates[0].host, answer.candidates[0].port)
        answered = 0
        for _ in range(30):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            s.settimeout(2)
            spoofers.append(s)
            check = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
            check.attributes["USERNAME"] = f"{answer.ufrag}:{offer.ufrag}"
            check.attributes["PRIORITY"] = 1845501695
            check.attributes["ICE-CONTROLLING"] = 1
            check.add_message_integrity(answer.pwd.encode())
            s.sendto(bytes(check), target)
            reply = stun.parse_message(await asyncio.to_thread(s.recv, 2048))
            answered += reply.message_class == stun.Class.RESPONSE
        assert answered == 30
        learnt = [c for c in callee.connection.remote_candidates if c.type == "prflx"]
        assert len(learnt) == MAX_CANDIDATES
    finally:
        for s in spoofers:
            s.close()
        await caller.close()
        await callee.close()


async def test_the_agent_cap_holds_checks_back_across_sessions():
    """Two sessions share an agent pacer allowing 3 checks: 10 listening targets, and only
    3 of them ever hear a check."""
    targets = []
    for _ in range(10):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
        targets.append(s)
    agent = Pacer(interval=0.005, limit=3, window=60)
    config = IceConfig(host_addresses=("127.0.0.1",), connect_timeout=1.5)
    sessions = [IceSession(config, controlling=True, pacer=agent) for _ in range(2)]
    try:
        halves = [targets[:5], targets[5:]]
        remotes = [IceDescription("Ab3x", PWD, [candidate("127.0.0.1", t.getsockname()[1], "host")
                                                for t in half]) for half in halves]
        for ice in sessions:
            await ice.gather()
        results = await asyncio.gather(*(ice.connect(r) for ice, r in zip(sessions, remotes)),
                                       return_exceptions=True)
        assert all(isinstance(r, IceError) for r in results)
        heard = 0
        for t in targets:
            try:
                t.recv(2048)
                heard += 1
            except BlockingIOError:
                pass
        assert heard == 3
    finally:
        for ice in sessions:
            await ice.close()
        for t in targets:
            t.close()


async def test_wait_closed_returns_when_the_session_closes():
    session = IceSession(IceConfig(host_addresses=("127.0.0.1",)), controlling=True)
    await session.gather()
    waiter = asyncio.ensure_future(session.wait_closed())
    await asyncio.sleep(0)
    assert not waiter.done()
    await session.close()
    await asyncio.wait_for(waiter, 5)
    assert not session.consent_expired


async def test_no_candidates_at_all_fails_at_once_with_a_reason():
    config = IceConfig(host_addresses=("127.0.0.1",), connect_timeout=5)
    session = IceSession(config, controlling=True)
    try:
        with pytest.raises(IceError, match="no path to the peer") as failure:
            await session.connect(IceDescription("Ab3x", PWD, []))
        assert failure.value.report.kind == "none"
        assert "no usable candidate" in failure.value.report.reason
    finally:
        await session.close()


# ------------------------------------------------------- one pair for both sides (issue #11)

NOMINATION_PORT = 40000   # the callee's host port, on 127.0.0.2 and 127.0.0.1


async def nomination_main() -> None:
    """Run in a namespace where the first two check answers from 127.0.0.1:40000 are lost:
    the caller's checks towards the callee's second candidate go unanswered, its check
    towards the first one succeeds. Prints both sides' pairs as JSON."""
    caller = IceSession(IceConfig(host_addresses=("127.0.0.1",)), controlling=True)
    callee = IceSession(IceConfig(host_addresses=("127.0.0.2", "127.0.0.1")),
                        controlling=False, port=NOMINATION_PORT)
    try:
        offer, answer = await asyncio.gather(caller.gather(), callee.gather())
        theirs, ours = callee.read_remote(render(offer)), caller.read_remote(render(answer))
        answering = asyncio.ensure_future(callee.connect(theirs))   # the callee answers first
        await asyncio.sleep(0.05)
        paths = [await caller.connect(ours), await answering]
        await asyncio.gather(caller.settle(), callee.settle())
        # what Handover.take hands the program, once the peer's path is chosen as well
        pairs = [(s.connection.selected.local_addr, s.connection.selected.remote_addr)
                 for s in (caller, callee)]
        print(json.dumps({"paths": [[p.local_address, p.remote_address] for p in paths],
                          "pairs": pairs}))
    finally:
        await asyncio.gather(caller.close(), callee.close())


@pytest.mark.netns
def test_both_sides_use_the_pair_the_caller_nominated(lo_only_netns):
    """Issue #11: aioice put USE-CANDIDATE on every check of the caller, and each side
    used the pair nominated last when it looked: the caller the first one whose answer
    came back, the callee the last one whose check it had seen, which need not be the
    same (in the NAT lab: the caller on relay -> the callee's relay, the callee on
    host -> the caller's relay, and no echo). Here the caller's check towards the callee's
    127.0.0.1 reaches it but its answer is lost, the one towards 127.0.0.2 succeeds:
    both sides must end on caller <-> 127.0.0.2, the one pair the caller nominated."""
    stun_answer = "0>>22&0x3C@8>>16=0x0101"   # the UDP payload starts: Binding success
    for _ in range(2):   # each rule drops the first answer that reaches it
        lo_only_netns.run(["iptables", "-A", "OUTPUT", "-p", "udp", "-s", "127.0.0.1",
                           "--sport", str(NOMINATION_PORT), "-m", "u32", "--u32", stun_answer,
                           "-m", "statistic", "--mode", "nth", "--every", "1000000",
                           "--packet", "0", "-j", "DROP"])
    root = Path(__file__).resolve().parents[1]
    code = (f"import asyncio, sys; sys.path[:0] = [{str(root)!r}, {str(root / 'src')!r}]; "
            "from tests.test_ice import nomination_main; asyncio.run(nomination_main())")
    result = lo_only_netns.run([sys.executable, "-c", code], timeout=30, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    (caller_local, caller_remote), (callee_local, callee_remote) = report["pairs"]
    assert caller_remote == ["127.0.0.2", NOMINATION_PORT], report
    assert (callee_local, callee_remote) == (caller_remote, caller_local), report
    assert report["paths"] == report["pairs"], report
    counters = lo_only_netns.run(["iptables", "-L", "OUTPUT", "-n", "-v", "-x"]).stdout
    assert [line.split()[0] for line in counters.splitlines()[2:]] == ["1", "1"], counters


# ----------------------------------------------------------------------- the NAT lab

@pytest.mark.netns
@pytest.mark.parametrize("caller, callee, kind", [
    ("a", "b", "direct"),        # home <-> home: srflx, hole punched
    ("p", "a", "direct"),        # public <-> home
    ("s", "p", "direct"),        # symmetric <-> public: the public side learns a prflx
    ("s", "a", "relayed"),       # symmetric <-> home: only coturn
    ("a", "s", "relayed"),
    ("s", "s2", "relayed"),      # symmetric <-> symmetric: one allocation is enough
])
def test_path_across_nat(lab, caller, callee, kind):
    results = session(lab, caller, callee)
    for side, result in zip((caller, callee), results):
        assert "error" not in result, result
        assert result["path"]["kind"] == kind, (side, result["path"])
        assert result["path"]["rtt"] is not None
    assert results[0]["data"] == ["pong 0", "pong 1", "pong 2"]   # data both ways
    assert results[1]["data"] == ["ping 0", "ping 1", "ping 2"]
    if kind == "direct":
        assert not any(r["path"]["relay_transport"] for r in results)
    if "s" in (caller, callee) and kind == "relayed":
        mine = results[(caller, callee).index("s")]["path"]
        assert "our NAT maps per destination (symmetric)" in mine["reason"]


@pytest.mark.netns
def test_home_hosts_use_their_reflexive_addresses(lab):
    path = session(lab, "a", "b")[0]["path"]
    assert (path["local_type"], path["remote_type"]) == ("host", "srflx")
    assert path["remote_address"][0] == lab["b"].public_ip
    assert path["reason"] == "through both NATs: they let each side's checks in"


@pytest.mark.netns
def test_udp_blocked_host_is_relayed_over_turn_tcp(lab):
    results = session(lab, "u", "a")
    mine = results[0]
    assert "error" not in mine, mine
    assert [a for a in mine["local"] if a[0] == "candidate" and "typ srflx" in a[1]] == []
    assert mine["path"]["kind"] == "relayed" and mine["path"]["local_type"] == "relay"
    assert mine["path"]["relay_transport"] == "tcp"
    assert "UDP is blocked on our network" in mine["path"]["reason"]
    assert results[1]["data"] == ["ping 0", "ping 1", "ping 2"]


@pytest.mark.netns
def test_wrong_turn_password_leaves_symmetric_to_home_without_a_path(lab):
    results = session(lab, "s", "a", password="wrong", timeout=4)
    for result in results:
        assert result["path"]["kind"] == "none"
        assert "no path to the peer" in result["error"]
        assert "there is no relay" in result["path"]["reason"]
        assert result["path"]["checks"], "the failure lists the checks it tried"


@pytest.mark.netns
def test_a_hostile_offer_cannot_aim_a_flood_at_a_third_party(lab):
    """1,000 candidates naming ports of the public host p: a (who would answer such an
    INVITE) checks at most 20 of them, paced, retransmitting only until its deadline."""
    victim = lab["p"]
    victim.run(["iptables", "-A", "INPUT", "-p", "udp", "--dport", "2000:2999", "-j", "DROP"])
    flood = [("ice-ufrag", "Ab3x"), ("ice-pwd", PWD)] + [
        ("candidate", f"{i} 1 udp 2130706431 {victim.ip} {2000 + i} typ host")
        for i in range(1000)] + [("end-of-candidates", "")]
    proc = lab.popen("a", [sys.executable, PROBE], stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        proc.stdin.write(json.dumps({"controlling": True, "stun": None, "turn": None,
                                     "timeout": 3}) + "\n")
        proc.stdin.flush()
        read(proc)                                   # our own description
        proc.stdin.write(json.dumps(flood) + "\n")
        proc.stdin.flush()
        result = read(proc)
        assert result["path"]["kind"] == "none"
        assert proc.wait(10) == 0
        assert "ignored 980 of the peer's candidates" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
    counters = victim.run(["iptables", "-L", "INPUT", "-v", "-x", "-n"]).stdout
    packets = int(next(line.split()[0] for line in counters.splitlines() if "dpts:2000:2999" in line))
    # 20 checks, each sent at 0, 0.5 and 1.5 s within the 3 s deadline
    assert 20 <= packets <= 20 * 3, counters


@pytest.mark.slow
@pytest.mark.netns
def test_consent_expires_when_the_path_dies(lab):
    """The path between two home hosts is cut at a's router: both sides notice within the
    RFC 7675 30 s (aioice: 6 unanswered consent checks, every 4-6 s)."""
    for result in session(lab, "a", "b", hold=True):
        assert result["path"]["kind"] == "direct"
        assert 20 <= result["closed_after"] <= 40 and result["consent_expired"], result
