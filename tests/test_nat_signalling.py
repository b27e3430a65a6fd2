"""SIP signalling through home routers (issue 11 items 0 and 2), in network namespaces.

The lab (sipmesh/lab/topology.py): the SIP server and a public host on an "internet"
bridge, hosts `a` and `b` each behind a home router (MASQUERADE + a WAN filter that
drops everything unsolicited, `--ctstate NEW -j DROP` included). A session between them completes with our broker and
with Kamailio (docs/kamailio/kamailio.cfg and the test copy tests/lab/kamailio.cfg),
over UDP and TCP: the answerer's ACK arrives (no "no ACK" timeout), BYE gets 200 in
either direction, INFO and re-INVITE reach the far side. A STUN client learns its
public address from the server's SIP port.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from sipmesh.broker.users import UsersFile
from tests.lab import Host, Kamailio, NatLab, kamailio_unavailable_reason, spawn, wait_for, wait_udp_listening

pytestmark = [pytest.mark.slow, pytest.mark.netns]

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
SIPMESH = str(Path(sys.executable).parent / "sipmesh")
DOCS_CFG = ROOT / "docs" / "kamailio" / "kamailio.cfg"
PORT = 5060
PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw", "carol": "carol-pw", "dave": "dave-pw"}
needs_kamailio = pytest.mark.skipif(kamailio_unavailable_reason() is not None,
                                    reason=str(kamailio_unavailable_reason()))


@dataclass
class Server:
    kind: str
    host: Host
    log: Callable[[], str]
    passwords: dict[str, str] = field(default_factory=dict)

    @property
    def hostport(self) -> str:
        return f"{self.host.ip}:{PORT}"


@dataclass
class Lab:
    server: Server
    a: Host  # behind a home router
    b: Host  # behind another
    public: Host
    run_dir: Path

    def diagnosis(self) -> str:
        assert self.a.router is not None and self.b.router is not None
        return (f"--- server log:\n{self.server.log()[-4000:]}\n--- router of a:\n"
                f"{self.a.router.conntrack()}\n--- router of b:\n{self.b.router.conntrack()}")


def start_server(kind: str, host: Host, run_dir: Path) -> Server:
    if kind == "broker":
        users = UsersFile(run_dir / "users")
        for user, password in PASSWORDS.items():
            users.add(host.ip, user, password)
        users.save()
        proc = spawn([SIPMESH, "broker", "--listen", f"{host.ip}:{PORT}", "--db", str(run_dir / "broker.db"),
                      "--workers", "1", "--users", str(run_dir / "users"), "-v"],
                     netns=host.ns, log_path=run_dir / "broker.log", name="broker", cwd=run_dir)
        wait_udp_listening(host.ip, PORT, host.ns, 15, proc=proc)
        return Server(kind, host, proc.log_text, dict(PASSWORDS))
    if kind == "kamailio":  # the shipped configuration, digest on
        k = Kamailio(run_dir / "kamailio", host=host.ip, port=PORT, netns=host.ns, auth="db_text",
                     users=PASSWORDS, template=DOCS_CFG,
                     defines=["WITHOUT_MESH"])  # the roster's presence tables are not needed here
        k.start()
        return Server(kind, host, k.log_text, dict(PASSWORDS))
    assert kind == "kamailio-lab"  # the test copy, no auth
    k = Kamailio(run_dir / "kamailio", host=host.ip, port=PORT, netns=host.ns)
    k.start()
    return Server(kind, host, k.log_text)


@pytest.fixture
def make_lab(nat_lab: NatLab, tmp_path: Path) -> Callable[[str], Lab]:
    def make(kind: str) -> Lab:
        hosts = nat_lab.add_hosts({"server": "public", "pub": "public", "a": "home", "b": "home"})
        return Lab(start_server(kind, hosts["server"], tmp_path), hosts["a"], hosts["b"],
                   hosts["pub"], tmp_path)
    return make


def credentials(lab: Lab, user: str) -> list[str]:
    password = lab.server.passwords.get(user)
    return ["--password", password] if password else []


def agent(lab: Lab, host: Host, mode: str, user: str, transport: str, program: list[str],
          target: str | None = None):  # type: ignore[no-untyped-def]
    argv = [SIPMESH, mode, *([target] if target else []), "--server", lab.server.hostport,
            "--user", user, *credentials(lab, user), "--transport", transport, "-v"]
    if mode == "call":
        argv += ["--timeout", "10"]
    return spawn(argv + ["--", *program], netns=host.ns, cwd=lab.run_dir,
                 log_path=lab.run_dir / f"{mode}-{user}-{host.name}.log", name=f"{mode}-{user}")


def finished(proc, lab: Lab, timeout: float = 30.0) -> str:  # type: ignore[no-untyped-def]
    """The log of `proc` once it exited 0 (an AssertionError with every log otherwise)."""
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        rc = None
    assert rc == 0, f"{proc.name}: {rc}\n{proc.log_tail(40)}\n{lab.diagnosis()}"
    return proc.log_text()


SERVERS_CLI = [pytest.param("broker", id="broker"),
               pytest.param("kamailio", id="kamailio", marks=needs_kamailio)]


@pytest.mark.parametrize("transport", ["udp", "tcp"])
@pytest.mark.parametrize("kind", SERVERS_CLI)
def test_sessions_with_a_home_host_complete_and_end_in_both_directions(make_lab, kind, transport):
    """`sipmesh serve` behind home router A; `sipmesh call` from behind home router B and
    from the public host. The ACK reaches the answerer (it logs the session established
    at once, not "no ACK" after 32 s) and the BYE gets 200: from the caller to the NATed
    answerer, and from a NATed answerer (carol's program ends first) to the NATed caller."""
    lab = make_lab(kind)
    alice = agent(lab, lab.a, "serve", "alice", transport, ["sleep", "60"])
    carol = agent(lab, lab.a, "serve", "carol", transport, ["sleep", "1"])
    for served in (alice, carol):
        wait_for(lambda: "ready: contact" in served.log_text(), 15, what=f"{served.name} registered",
                 abort=served.exit_reason)

    log = finished(agent(lab, lab.b, "call", "bob", transport, ["sleep", "1"], target="alice"), lab)
    assert "BYE answered 200" in log, log
    wait_for(lambda: "BYE received from" in alice.log_text(), 10,
             what="alice got the BYE", abort=alice.exit_reason)
    from_public = agent(lab, lab.public, "call", "dave", transport, ["sleep", "1"], target="alice")
    to_caller = agent(lab, lab.b, "call", "bob", transport, ["sleep", "60"], target="carol")
    log = finished(from_public, lab)
    assert "BYE answered 200" in log, log
    log = finished(to_caller, lab)
    assert "the peer ended the session (remote BYE)" in log, log
    wait_for(lambda: "BYE answered 200" in carol.log_text(), 10, what="carol's BYE answered",
             abort=carol.exit_reason)
    for served in (alice, carol):
        text = served.log_text()
        assert "no ACK" not in text and text.count("session established with") == \
            text.count("INVITE from"), text


def nat_ua(lab: Lab, host: Host, mode: str, user: str, transport: str, *extra: str):  # type: ignore[no-untyped-def]
    argv = [PYTHON, "-m", "tests.peers.nat_ua", mode, "--server", lab.server.hostport, "--user", user,
            "--transport", transport, *credentials(lab, user), *extra]
    log = lab.run_dir / f"ua-{user}-{mode}-{len(list(lab.run_dir.glob('ua-*')))}.log"
    return spawn(argv, netns=host.ns, cwd=ROOT, log_path=log, name=f"ua-{user}")


def events(proc) -> list[dict]:  # type: ignore[no-untyped-def]
    return [json.loads(line) for line in proc.log_text().splitlines() if line.startswith("{")]


def event(proc, name: str) -> dict | None:  # type: ignore[no-untyped-def]
    return next((e for e in events(proc) if e["event"] == name), None)


def in_dialog_session(lab: Lab, transport: str, active: str, pad: int = 0) -> None:
    """alice answers behind A, bob calls from behind B (an offer `pad` octets larger); the
    `active` side sends INFO, a re-INVITE and BYE, each answered 200 by the other side
    through its router."""
    callee = nat_ua(lab, lab.a, "answer", "alice", transport, *(["--active"] if active == "callee" else []))
    wait_for(lambda: event(callee, "registered"), 15, what="alice registered", abort=callee.exit_reason)
    caller = nat_ua(lab, lab.b, "call", "bob", transport, "--target", "alice", "--pad", str(pad),
                    *(["--active"] if active == "caller" else []))
    doer, other = (caller, callee) if active == "caller" else (callee, caller)
    for proc in (doer, other):
        finished(proc, lab)
    results = {e["event"]: e.get("status") for e in events(doer)}
    assert results | {"registered": 200} == {"registered": 200, "established": None, "info": 200,
                                             "reinvite": 200, "bye": 200}, events(doer)
    assert event(other, "bye_received") == {"event": "bye_received", "reason": "remote BYE"}


SERVERS_UA = [pytest.param("broker", id="broker"),
              pytest.param("kamailio-lab", id="kamailio-lab", marks=needs_kamailio)]


@pytest.mark.parametrize("transport", ["udp", "tcp"])
@pytest.mark.parametrize("kind", SERVERS_UA)
def test_info_reinvite_and_bye_reach_a_ua_behind_nat_both_ways(make_lab, kind, transport):
    lab = make_lab(kind)
    in_dialog_session(lab, transport, active="caller")
    in_dialog_session(lab, transport, active="callee")


def test_a_large_invite_reaches_a_ua_registered_over_udp_behind_nat(make_lab):
    """Past 1300 octets a request goes over TCP (RFC 3261 §18.1.1), but no connection can
    be opened towards a NAT: the broker keeps the UDP flow the UA registered from."""
    in_dialog_session(make_lab("broker"), "udp", active="caller", pad=1500)


# STUN: what the agent's keep-alive uses, and any STUN client can.
STUN_PROBE = r'''
import asyncio, json, os, socket, struct, sys
import aioice
server, port = sys.argv[1], int(sys.argv[2])
# a hand-made Binding request from a plain socket (no library)
tid = os.urandom(12)
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.settimeout(3)
    s.sendto(struct.pack("!HHI12s", 0x0001, 0, 0x2112A442, tid), (server, port))
    data = s.recv(2048)
    assert data[8:20] == tid and struct.unpack("!H", data[:2])[0] == 0x0101, data
    xport, = struct.unpack("!H", data[26:28])
    xaddr = bytes(a ^ b for a, b in zip(data[28:32], struct.pack("!I", 0x2112A442)))
    raw = [socket.inet_ntoa(xaddr), xport ^ 0x2112, s.getsockname()[1]]
async def ice():
    conn = aioice.Connection(ice_controlling=True, stun_server=(server, port))
    await conn.gather_candidates()
    found = [[c.host, c.port] for c in conn.local_candidates if c.type == "srflx"]
    await conn.close()
    return found
print(json.dumps({"raw": raw, "aioice": asyncio.run(ice())}))
'''


@pytest.mark.parametrize("kind", [pytest.param("broker", id="broker"),
                                  pytest.param("kamailio", id="kamailio", marks=needs_kamailio)])
def test_a_stun_client_behind_nat_learns_its_public_address_from_the_sip_port(make_lab, kind):
    lab = make_lab(kind)
    out = lab.a.run([PYTHON, "-c", STUN_PROBE, lab.server.host.ip, str(PORT)], timeout=30,
                       check=False)
    assert out.returncode == 0, out.stderr + lab.diagnosis()
    found = json.loads(out.stdout)
    public, mapped, local = found["raw"]
    assert public == lab.a.public_ip and public != lab.a.ip
    assert mapped == local  # the home router keeps the port (endpoint-independent mapping)
    assert [c[0] for c in found["aioice"]] == [lab.a.public_ip], found


def test_keep_alives_hold_the_nat_binding_open_for_incoming_invites(make_lab):
    """With the router's UDP conntrack timeouts cut to 2 s, alice (keep-alive every 0.5 s)
    can still be called after carol's binding, registered the same way without
    keep-alives, has expired; carol cannot."""
    lab = make_lab("broker")
    for name in ("nf_conntrack_udp_timeout", "nf_conntrack_udp_timeout_stream"):
        lab.a.router.ns.run(["sysctl", "-qw", f"net.netfilter.{name}=2"])
    alice = nat_ua(lab, lab.a, "answer", "alice", "udp", "--keepalive", "0.5")
    carol = nat_ua(lab, lab.a, "answer", "carol", "udp", "--keepalive", "0")
    ports = {}
    for proc in (alice, carol):
        registered = wait_for(lambda: event(proc, "registered"), 15, what="registered",
                              abort=proc.exit_reason)
        ports[proc.name] = registered["port"]

    def carol_expired() -> bool:
        table = lab.a.router.conntrack()
        return f"sport={ports['ua-carol']} " not in table

    wait_for(carol_expired, 15, what="carol's NAT binding to expire")
    assert f"sport={ports['ua-alice']} " in lab.a.router.conntrack()
    to_carol = nat_ua(lab, lab.b, "call", "bob", "udp", "--target", "carol", "--invite-timeout", "2",
                      "--t1", "0.05")  # gives up 64*T1 after its CANCEL
    assert to_carol.wait(20) == 2
    assert event(to_carol, "failed")["status"] in (408, 487), to_carol.log_text()
    to_alice = nat_ua(lab, lab.b, "call", "bob", "udp", "--target", "alice", "--active")
    finished(to_alice, lab)
    assert {e["event"]: e.get("status") for e in events(to_alice)}["bye"] == 200
