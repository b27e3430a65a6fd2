"""Sessions across NAT, end to end (issue 11): `sipmesh serve` / `sipmesh call` with the exec
``udp`` contract (tests/peers/udp_pair.py) in the NAT lab of sipmesh/lab/topology.py, our
broker as SIP server and STUN server (on its SIP port), coturn beside it as the relay.

One lab for the module (building it and starting the broker, coturn and one answering
agent per host costs a few seconds; each test is one or two sessions): public hosts p
and x, home hosts a and b, symmetric hosts s and s2, u behind a router that drops UDP.
Every answering agent runs the echo program; every caller the ping program, which exits
once five echoes came back: data moved both ways. A test that cuts a router restores it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.lab import Host, kamailio_unavailable_reason, spawn, wait_for
from tests.lab.icelab import (PAIR, PYTHON, SIPMESH, IceLab, ice_lab,  # noqa: F401 (fixtures)
                              kamailio_ice_lab)
from tests.lab.natsite import password

pytestmark = [pytest.mark.slow, pytest.mark.netns]

needs_kamailio = pytest.mark.skipif(kamailio_unavailable_reason() is not None,
                                    reason=str(kamailio_unavailable_reason()))


def session(ice: IceLab, caller: str, callee: str, *extra: str) -> tuple[dict, dict, str]:
    """One session from `caller` to `callee`: (ping record, echo record, the caller's log)
    once the caller's program got its echoes and the callee's program was stopped."""
    before = ice.records("client")
    call = ice.call(caller, callee, *extra)
    try:
        rc = call.wait(40)
    except subprocess.TimeoutExpired:
        rc = None
    assert rc == 0, f"call {caller} -> {callee}: {rc}\n{ice.diagnosis(call)}"
    [call_id] = ice.records("client") - before
    ping = ice.record("client", call_id)
    # the answering side stopped its program on our BYE: the agent is free for the next one
    echo = wait_for(lambda: (r := ice.record("server", call_id)) and r["stopped"] and r, 10,
                    what=f"{callee}'s program stopped", abort=ice.serve[callee].exit_reason)
    return ping, echo, call.log_text()


EXPECTED = {  # (caller, callee): path; public <-> any, home <-> home, symmetric <-> public direct
    ("p", "a"): "direct", ("a", "p"): "direct", ("p", "b"): "direct", ("b", "p"): "direct",
    ("p", "s"): "direct", ("s", "p"): "direct", ("a", "b"): "direct", ("b", "a"): "direct",
    ("a", "s"): "relayed", ("s", "a"): "relayed", ("b", "s"): "relayed", ("s", "b"): "relayed",
    ("s", "s2"): "relayed",
}


KAMAILIO = list(EXPECTED)   # the whole exec row again, with Kamailio as the SIP server


@pytest.mark.parametrize("caller, callee", list(EXPECTED), ids=[f"{c}-{d}" for c, d in EXPECTED])
def test_udp_session_across_nat(ice_lab, caller, callee):
    udp_session_across_nat(ice_lab, caller, callee)


@needs_kamailio
@pytest.mark.parametrize("caller, callee", KAMAILIO, ids=[f"{c}-{d}" for c, d in KAMAILIO])
def test_udp_session_across_nat_with_kamailio(kamailio_ice_lab, caller, callee):
    """The exec row of the matrix with unmodified Kamailio as the SIP and STUN server."""
    udp_session_across_nat(kamailio_ice_lab, caller, callee)


def udp_session_across_nat(ice_lab: IceLab, caller: str, callee: str) -> None:
    ping, echo, log = session(ice_lab, caller, callee)
    kind = EXPECTED[caller, callee]
    assert (ping["path"], echo["path"]) == (kind, kind), (ping, echo, log)
    # data both ways: the caller's pings arrived and their echoes came back
    assert len(set(ping["got"])) >= 5 and all(g.startswith("echo ping") for g in ping["got"])
    assert echo["got"] and all(g.startswith("ping") for g in echo["got"])
    assert f"path {kind}: " in log
    if kind == "direct":
        # the program sent from the port ICE checked, to the address ICE checked
        assert "127.0.0.1" not in ping["remote"][0]
        if callee != "p":
            assert ping["remote"][0] == ice_lab[callee].public_ip
    if kind == "relayed" and "s" in (caller, callee) and caller == "s":
        assert "our NAT maps per destination (symmetric)" in log, log


def test_udp_blocked_host_is_relayed_over_turn_tcp(ice_lab):
    """u's router drops all UDP: SIP over TCP, no reflexive address, the relay over TCP."""
    ping, echo, log = session(ice_lab, "u", "a", "--transport", "tcp")
    assert (ping["path"], echo["path"]) == ("relayed", "relayed")
    assert "UDP is blocked on our network: relayed over TURN/TCP" in log, log
    assert ping["remote"][0] == "127.0.0.1"   # our relay proxy: u's side owns the allocation
    assert len(set(ping["got"])) >= 5 and echo["got"]


def test_no_path_fails_clearly_and_leaves_nothing(ice_lab):
    """UDP blocked and the relay down (nothing listens where --turn points): the caller
    says which candidates and checks it tried, exits 13, and no program ever ran."""
    before = ice_lab.records("client") | ice_lab.records("server")
    start = time.monotonic()
    call = ice_lab.call("u", "a", "--transport", "tcp",
                        turn=f"turn:{ice_lab.broker.ip}:3479")
    try:
        rc = call.wait(40)
    except subprocess.TimeoutExpired:
        rc = None
    elapsed = time.monotonic() - start
    log = call.log_text()
    assert rc == 13, f"{rc}\n{ice_lab.diagnosis(call)}"
    assert elapsed < 30, elapsed
    assert "no network path to" in log and "no relay" in log, log
    assert "local host 10." in log and "remote host" in log and "checks: " in log, log
    assert (ice_lab.records("client") | ice_lab.records("server")) == before  # nothing ran
    wait_for(lambda: "no network path" in ice_lab.serve["a"].log_text(), 20,
             what="a gave up too")
    assert "started (pid" not in ice_lab.serve["a"].log_text().split("INVITE from")[-1]


def test_consent_loss_ends_the_session_with_bye(ice_lab):
    """A session between two home hosts moves a datagram a second; a's router then drops
    everything: both sides say "consent lost" within the documented 30 s (plus the 1 s
    watch interval) of the last datagram, send BYE, stop their programs; the caller
    exits 12 (the peer is lost)."""
    before = ice_lab.records("client")
    call = ice_lab.call("a", "b", program="heartbeat")
    router = ice_lab["a"].router
    try:
        call_id = wait_for(lambda: (ice_lab.records("client") - before or None), 20,
                           what="the session's programs", abort=call.exit_reason).pop()
        wait_for(lambda: len((ice_lab.record("client", call_id) or {"got": []})["got"]) >= 3,
                 15, what="echoes flowing", abort=call.exit_reason)
        router.cut()
        cut = time.monotonic()
        wait_for(lambda: "consent lost" in call.log_text(), 40, what="consent lost (caller)",
                 abort=call.exit_reason)
        lost_after = time.monotonic() - cut
        assert 28 <= lost_after <= 34, lost_after
        assert call.wait(20) == 12
        wait_for(lambda: "consent lost" in ice_lab.serve["b"].log_text(), 10,
                 what="consent lost (b)")
        echo = wait_for(lambda: (r := ice_lab.record("server", call_id)) and r["stopped"] and r,
                        10, what="b's program stopped")
        assert echo["got"]
    finally:
        router.restore()
    log = call.log_text()
    assert "sending BYE" in log and "no packet from the peer" in log, log


def test_a_hostile_offer_through_a_real_session_stays_under_the_cap(ice_lab):
    """x INVITEs p with candidates that all name ports of the public host v (a third
    party). 1,000 of them do not fit in a body the agent accepts: refused, nothing sent. As
    many as fit: p answers, checks at most 20 of them (from its two bases, each check sent
    at most 5 times within its 10 s), finds no path and ends the session; v counts what
    arrived.

    (The offer is a large message: the broker forwards it over TCP, RFC 3261 §18.1.1, which
    reaches a public agent only.)"""
    v = ice_lab["v"]
    v.run(["iptables", "-I", "INPUT", "-p", "udp", "--dport", "2000:2999", "-j", "DROP"])
    try:
        results = {}
        for count in (1000, 130):
            out = ice_lab["x"].run([PYTHON, "-c", HOSTILE, ice_lab.server, password("x"),
                                    v.ip, str(count)], timeout=60, check=False)
            assert out.returncode == 0, out.stderr
            results[count] = (json.loads(out.stdout), _counted(v))
    finally:
        v.run(["iptables", "-D", "INPUT", "-p", "udp", "--dport", "2000:2999", "-j", "DROP"])
    (refused, none_sent), (answered, packets) = results[1000], results[130]
    assert refused["status"] >= 400 and none_sent == 0, refused
    assert answered == {"status": 200, "ended": "remote BYE"}, answered
    # 20 remote candidates, each paired with p's two bases (host, relay), each check sent at
    # 0, 0.5, 1.5, 3.5 and 7.5 s within the 10 s the checks may take: 200 at most
    assert 20 <= packets <= 20 * 2 * 5, packets
    log = ice_lab.serve["p"].log_text()
    assert "ignored 110 of the peer's candidates" in log and "no network path to sip:x@" in log


def _counted(host: Host) -> int:
    table = host.run(["iptables", "-L", "INPUT", "-v", "-x", "-n"]).stdout
    return int(next(line.split()[0] for line in table.splitlines() if "dpts:2000:2999" in line))


# x's hostile caller: an INVITE whose offer carries COUNT candidates naming VICTIM's ports;
# prints the final status and, once answered, why the session ended (a's BYE).
HOSTILE = r'''
import asyncio, json, sys
from sipmesh.agent.attributes import build_sdp
from sipmesh.sip.ua import CallFailed, UAConfig, UserAgent
server, pw, victim, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
lines = [("IP4", "203.0.113.99"), ("APP", "exec"), ("ice-ufrag", "Ab3x"),
         ("ice-pwd", "Jk8s0dLq2vTz9PmWc4Rn7e")]
lines += [("candidate", f"{i} 1 udp 2130706431 {victim} {2000 + i} typ host")
          for i in range(count)] + [("end-of-candidates", None)]
body = build_sdp(username="x", address="203.0.113.99", media="application", proto="sipmesh",
                 port=9, attributes=lines)
async def main():
    ua = UserAgent(UAConfig(user="x", domain=server, password=pw, transport="TCP",
                            listen_host="0.0.0.0", listen_port=0))
    await ua.start()
    try:
        try:
            call = await ua.invite("p", body, timeout=15)
        except CallFailed as e:
            return {"status": e.status}
        try:
            ended = await asyncio.wait_for(asyncio.shield(call.ended), 30)
        except asyncio.TimeoutError:
            ended = "not ended"
            await call.bye()
        return {"status": 200, "ended": ended}
    finally:
        await ua.stop()
print(json.dumps(asyncio.run(main())))
'''


def test_status_shows_the_path_of_each_session_and_why(ice_lab):
    """A daemon on the symmetric host s serves an exec UDP echo; a calls it from behind its
    home router. While the session runs, `sipmesh status` on s shows it relayed, with the
    selected pair and its candidate types, the RTT and, in words, why."""
    s, run = ice_lab["s"], ice_lab.run
    config = run / "daemon-s.toml"
    config.write_text(f'''
[agent]
server = "{ice_lab.server}"
user = "sd"
password = "{password('sd')}"
turn = "{ice_lab.turn}"
control_socket = "{run / 'ctl' / 'sd.sock'}"

[allocators.udp]
type = "ports"
range = "41000-41009"
protocols = ["udp"]

[[service]]
name = "echo"
kind = "exec"
transport = "udp"
allow = ["*"]
answer.command = ["{PYTHON}", "{PAIR}", "echo", "{run}"]
call.command = ["{PYTHON}", "{PAIR}", "ping", "{run}", "heartbeat"]
[service.params.PORT]
type = "port"
from = "allocator"
allocator = "udp"
''')
    daemon = spawn([SIPMESH, "daemon", "-c", str(config), "-v"], netns=s.ns, cwd=run,
                   log_path=run / "daemon-s.log", name="daemon-s")
    caller = None
    try:
        wait_for(lambda: "ready as" in daemon.log_text(), 20, what="daemon registered",
                 abort=daemon.exit_reason)
        before = ice_lab.records("client")
        caller = spawn([SIPMESH, "call", "sd", "--service", "echo", "-c", str(config),
                        "--server", ice_lab.server, "--user", "ac", "--password", password("ac"),
                        "--turn", ice_lab.turn, "--no-register", "-v"],
                       netns=ice_lab["a"].ns, cwd=run, log_path=run / "call-status.log",
                       name="call-status")
        call_id = wait_for(lambda: ice_lab.records("client") - before or None, 30,
                           what="the session's programs", abort=caller.exit_reason).pop()
        wait_for(lambda: len((ice_lab.record("client", call_id) or {"got": []})["got"]) >= 2,
                 15, what="echoes flowing", abort=caller.exit_reason)
        out = subprocess.run([SIPMESH, "status", "--socket", str(run / "ctl" / "sd.sock")],
                             capture_output=True, text=True, timeout=20)
        assert out.returncode == 0, out.stderr
        text = out.stdout
        assert call_id in text and "relayed" in text, text
        line = next(l for l in text.splitlines() if l.startswith(f"{call_id}: relayed"))
        assert " -> " in line and "rtt " in line and " ms" in line, line
        assert any(t in line for t in ("relay ", "prflx ", "srflx ")), line
        assert "our NAT maps per destination (symmetric)" in text, text
        assert "program: binds UDP 4100" in text, text
        data = json.loads(subprocess.run([SIPMESH, "status", "--json", "--socket",
                                          str(run / "ctl" / "sd.sock")], capture_output=True,
                                         text=True, timeout=20).stdout)
        [session_status] = [x for x in data["sessions"] if x["call_id"] == call_id]
        assert session_status["path"]["kind"] == "relayed" and session_status["path"]["rtt"] > 0
        # the daemon answers a ping too, beside its session (agent/probe.py)
        out = ping(ice_lab, "a", "sd", "-c", "1")
        assert out.returncode == 0 and "probe 1: relayed via TURN" in out.stdout, \
            out.stdout + out.stderr
    finally:
        if caller is not None:
            caller.stop(grace=10)
        daemon.stop(grace=10)


# -------------------------------------------------------------------------- sipmesh ping

def ping(ice: IceLab, host: str, target: str, *extra: str) -> subprocess.CompletedProcess:
    """`sipmesh ping TARGET` from `host` as user HOSTc, three probes, its own process."""
    return ice[host].run([SIPMESH, "ping", target, "--server", ice.server, "--user", f"{host}c",
                          "--password", password(f"{host}c"), "--turn", ice.turn,
                          "-c", "3", "-i", "0.2", *extra], check=False, timeout=60)


PINGS = [("a", "b", "direct (", "direct"),             # home <-> home: through both NATs
         ("s", "s2", "relayed via TURN", "relayed")]   # symmetric <-> symmetric: coturn


@pytest.mark.parametrize("caller, callee, says, kind", PINGS, ids=[f"{c}-{d}" for c, d, *_ in PINGS])
def test_ping_says_which_path_with_rtts(ice_lab, caller, callee, says, kind):
    """`sipmesh ping` reaches the name through the broker, and prints, per probe, the path
    ICE chose, its candidate pair and the RTT, then a summary; the answering agent (which
    serves an exec program) answers the ping itself and runs no program for it."""
    before = ice_lab.records("server")
    out = ping(ice_lab, caller, callee)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"PING {callee}: {says}"), out.stdout
    probes = [line for line in lines if line.startswith("probe ")]
    assert len(probes) == 3, out.stdout
    for line in probes:
        assert says in line and " -> " in line and line.endswith(" ms") and " rtt " in line, line
        if kind == "direct":   # to b's NAT: b's public address
            assert f"-> srflx {ice_lab[callee].public_ip}:" in line or \
                f"-> prflx {ice_lab[callee].public_ip}:" in line, line
        else:
            assert "relay " in line, line
    assert lines[-1].startswith(f"--- {callee}: 3 probes, 3 answered, 0% lost, {says}"), out.stdout
    assert "rtt min/avg/max " in lines[-1]
    assert ice_lab.records("server") == before   # no program ran for the ping

    data = json.loads(ping(ice_lab, caller, callee, "--json", "-c", "1").stdout)
    assert data["exit"] == 0 and data["path"]["kind"] == kind and data["answered"] == 1, data


def test_ping_an_unknown_name_fails_clearly(ice_lab):
    out = ping(ice_lab, "a", "nobody")
    assert out.returncode == 6, out.stdout + out.stderr
    assert "sipmesh ping: nobody is not registered at the SIP server (404" in out.stderr
    assert "PING" not in out.stdout
