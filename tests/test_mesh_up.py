"""`sipmesh up NETWORK` / `sipmesh down NETWORK` (issue 12, item 2, first increment): members
on one bridge (public hosts of the NAT lab, no NAT), our broker with network `lab`. Every
member pings every other's mesh address over wireguard-go; a late member is reached by all;
one that leaves with `sipmesh down` and one killed with SIGKILL disappear from the others'
interfaces (the killed one within its roster registration lifetime, --expires)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from sipmesh.agent.hostsfile import entries_of
from sipmesh.apps.mesh import parse_dump
from sipmesh.broker.users import UsersFile
from sipmesh.daemon.control import query
from sipmesh.lab.procs import ManagedProcess
from sipmesh.lab.topology import Host
from tests.lab import NatLab, spawn, wait_for, wait_udp_listening
from tests.lab.freeradius import FreeRadius, freeradius_unavailable_reason

SIPMESH = str(Path(sys.executable).parent / "sipmesh")
PORT = 5060
EXPIRES = 10  # the killed member's bound: its binding runs out after this many seconds
MEMBERS = ["alice", "bob", "carol", "dave"]
HOSTS = "127.0.0.1 localhost\n192.0.2.1 gateway # the member's own lines\n"
CREATED: list[str] = []  # interface names: a wireguard-go killed with SIGKILL leaves its socket


class Member:
    def __init__(self, lab: NatLab, name: str, server: str, run_dir: Path, *extra: str,
                 expires: int = EXPIRES, network: str = "lab", password: str | None = None) -> None:
        self.name, self.lab, self.host = name, lab, lab[name]
        self.dir = run_dir / (name if network == "lab" else f"{name}-{network}")
        self.dir.mkdir(exist_ok=True)  # a second try of one member and network
        (self.dir / "creds").write_text(f"password = {password or name + '-pw'}\n")
        os.chmod(self.dir / "creds", 0o600)
        self.ifname = f"smt{secrets.token_hex(3)}"  # wireguard-go's socket is machine-wide
        CREATED.append(self.ifname)
        run = run_dir / f"run-{name}"  # one per host: its members see each other's sockets
        self.env = dict(os.environ, XDG_RUNTIME_DIR=str(run))
        self.hosts = self.dir / "hosts"  # never the machine's /etc/hosts
        self.hosts.write_text(HOSTS)
        self.proc = spawn([SIPMESH, "up", network, "--server", server, "--user", name,
                           "--credentials", str(self.dir / "creds"), "--state-dir",
                           str(self.dir / "state"), "--ifname", self.ifname,
                           "--hosts-file", str(self.hosts),
                           "--expires", str(expires), "-v", *extra],
                          netns=self.host.ns, log_path=run_dir / f"up-{name}-{network}.log",
                          name=f"up-{name}-{network}", env=self.env)
        self.socket = run / "sipmesh" / f"mesh-{network}-{name}.sock"

    def status(self) -> dict:
        return query(self.socket, {"command": "status"}, timeout=5)["networks"][0]

    def ready(self) -> bool:
        assert self.proc.alive, self.proc.log_tail(30)
        return self.socket.exists() and self.status().get("mesh_ip") is not None

    def wg_peers(self) -> dict[str, dict]:
        out = self.host.run(["wg", "show", self.ifname, "dump"], check=True).stdout
        return parse_dump(out)

    def pings(self, address: str) -> bool:
        return self.host.run(["ping", "-c1", "-W1", address], check=False).returncode == 0

    def names(self) -> dict[str, str]:
        """What our hosts file's block for network lab gives: name -> address."""
        return entries_of(self.hosts.read_text(), "lab")

    def pings_by_name(self, name: str) -> bool:
        """`ping NAME` as a program of this member's host resolves it: its hosts file
        bind-mounted over /etc/hosts in a mount namespace of its own (the machine's stays)."""
        script = 'mount --bind "$1" /etc/hosts && exec ping -c1 -W1 "$2"'
        return self.host.run(["unshare", "--mount", "--propagation", "private", "--", "sh",
                              "-c", script, "sh", str(self.hosts), name],
                             check=False).returncode == 0

    def sipmesh(self, *argv: str) -> subprocess.CompletedProcess:
        return self.host.run([SIPMESH, *argv], check=False, env=self.env, timeout=60)


@pytest.fixture
def mesh(nat_lab: NatLab, tmp_path: Path):
    yield from mesh_lab(nat_lab, tmp_path)


def mesh_broker(server: Host, names: list[str], tmp_path: Path, *broker_args: str) -> ManagedProcess:
    """Our broker on `server` (port PORT) with network `lab` (100.64.0.0/24) whose members
    are `names`, each with the password Member gives it."""
    users = UsersFile(tmp_path / "users")
    for name in names:
        users.add("lab", name, f"{name}-pw")
    users.save()
    db = str(tmp_path / "broker.db")
    for argv in (["network", "create", "lab", "--pool", "100.64.0.0/24", "--db", db],
                 ["network", "members", "add", "lab", *names, "--db", db]):
        subprocess.run([SIPMESH, "broker", *argv], check=True, capture_output=True, timeout=30)
    broker = spawn([SIPMESH, "broker", "--listen", f"{server.ip}:{PORT}", "--db", db,
                    "--workers", "1", "--users", str(tmp_path / "users"), "-v", *broker_args],
                   netns=server.ns, log_path=tmp_path / "broker.log", name="broker", cwd=tmp_path)
    wait_udp_listening(server.ip, PORT, server.ns, 15, proc=broker)
    return broker


def mesh_lab(nat_lab: NatLab, tmp_path: Path, broker_args: tuple[str, ...] = ()):
    """The lab of `mesh`: a broker (with `broker_args`) and the members' hosts, all public."""
    hosts = nat_lab.add_hosts({"server": "public", **{n: "public" for n in MEMBERS}})
    server = hosts["server"]
    mesh_broker(server, MEMBERS, tmp_path, "--min-expires", "5", *broker_args)
    try:
        yield nat_lab, f"{server.ip}:{PORT}", tmp_path
    finally:
        while CREATED:
            Path(f"/var/run/wireguard/{CREATED.pop()}.sock").unlink(missing_ok=True)


def full_mesh(members: list[Member], timeout: float = 20.0) -> None:
    """Every member pings every other's mesh address (each pair retried until it does)."""
    addresses = {m.name: m.status()["mesh_ip"] for m in members}
    for m in members:
        for other in members:
            if other is not m:
                wait_for(lambda: m.pings(addresses[other.name]), timeout,
                         what=f"{m.name} pings {other.name} ({addresses[other.name]})\n"
                              f"{m.proc.log_tail(20)}\n{other.proc.log_tail(20)}")


def handshakes_promptly(members: list[Member], within: float = 3.0) -> None:
    """Every pair's WireGuard handshake came within `within` s of its path: none waited
    for WireGuard's 5 s retry (two initiations that cross are both lost: only the caller
    initiates, docs/mesh.md)."""
    for m in members:
        for peer in m.status()["peers"]:
            assert peer["latest_handshake"] - peer["since"] < within, (m.name, peer)


@pytest.mark.slow
@pytest.mark.netns
def test_members_join_reach_each_other_and_leave(mesh):
    lab, server, run_dir = mesh
    members = [Member(lab, name, server, run_dir) for name in MEMBERS[:3]]
    for m in members:
        wait_for(m.ready, 20, what=f"{m.name} up", abort=m.proc.exit_reason)
    full_mesh(members)
    handshakes_promptly(members)
    alice, bob, carol = members
    peers = {p["name"]: p for p in alice.status()["peers"]}
    assert set(peers) == {"bob", "carol"} and all(p["state"] == "up" for p in peers.values())
    assert peers["bob"]["endpoint"].startswith(lab["bob"].ip + ":")
    assert peers["bob"]["latest_handshake"] > 0 and peers["bob"]["rx"] > 0
    # what a user sees
    shown = alice.sipmesh("status")
    assert shown.returncode == 0 and "network lab: alice" in shown.stdout and "bob" in shown.stdout
    as_json = json.loads(alice.sipmesh("status", "--json").stdout)
    assert {p["name"] for p in as_json["networks"][0]["peers"]} == {"bob", "carol"}

    # a late member: reached by all, without anyone restarting
    dave = Member(lab, "dave", server, run_dir)
    wait_for(dave.ready, 20, what="dave up")
    members.append(dave)
    full_mesh(members)

    # carol leaves with `sipmesh down`: gone from the others' interfaces
    carol_key = carol.status()["wg_pubkey"]
    down = carol.sipmesh("down", "lab")
    assert down.returncode == 0, down.stderr + carol.proc.log_tail(30)
    assert carol.proc.wait(10) == 0
    for m in (alice, bob, dave):
        wait_for(lambda: carol_key not in m.wg_peers(), 5, what=f"carol gone from {m.name}")
    assert carol.host.run(["ip", "link", "show", carol.ifname], check=False).returncode != 0

    # dave is killed: gone from the others when its binding expires
    dave_key = dave.status()["wg_pubkey"]
    dave.proc.signal_group(signal.SIGKILL)
    dave.proc.wait(5)
    for m in (alice, bob):
        wait_for(lambda: dave_key not in m.wg_peers(), EXPIRES + 5,
                 what=f"dave gone from {m.name}\n{m.proc.log_tail(20)}")
    assert alice.pings(bob.status()["mesh_ip"])  # the rest of the mesh stands


@pytest.mark.slow
@pytest.mark.netns
def test_members_reach_each_other_by_name(mesh):
    """Names (issue 12, item 8): each member's hosts file lists every member as
    NAME.lab and NAME; `ping bob.lab` works; a member that leaves goes from the files."""
    lab, server, run_dir = mesh
    members = [Member(lab, name, server, run_dir) for name in MEMBERS[:3]]
    for m in members:
        wait_for(m.ready, 20, what=f"{m.name} up", abort=m.proc.exit_reason)
    alice, bob, carol = members
    addresses = {m.name: m.status()["mesh_ip"] for m in members}
    everyone = {**{f"{n}.lab": a for n, a in addresses.items()}, **addresses}
    for m in members:
        wait_for(lambda: m.names() == everyone, 10,
                 what=f"{m.name}'s hosts file lists everyone: {m.hosts.read_text()}")
        assert m.hosts.read_text().startswith(HOSTS)  # its own lines untouched
    wait_for(lambda: alice.pings_by_name("bob.lab"), 20,
             what=f"alice pings bob.lab\n{alice.proc.log_tail(20)}\n{bob.proc.log_tail(20)}")
    wait_for(lambda: carol.pings_by_name("alice"), 20, what="carol pings alice")

    down = carol.sipmesh("down", "lab")
    assert down.returncode == 0, down.stderr + carol.proc.log_tail(30)
    assert carol.proc.wait(10) == 0
    assert carol.hosts.read_text() == HOSTS  # its block gone with it
    for m in (alice, bob):
        wait_for(lambda: "carol.lab" not in m.names(), 10, what=f"carol.lab gone from {m.name}")
        assert set(m.names()) == {"alice.lab", "alice", "bob.lab", "bob"}
    assert not alice.pings_by_name("carol.lab")  # no such name any more
    assert alice.pings_by_name("bob")


@pytest.mark.slow
@pytest.mark.netns
def test_members_by_radius_group_join_with_sipmesh_up(nat_lab: NatLab, tmp_path: Path):
    """Network lab takes its members from RADIUS group staff (docs/radius.md): alice and bob,
    known only to FreeRADIUS (no users file, no `members add`), come up with `sipmesh up`,
    get addresses from the pool and ping each other; carol, without the group, is refused."""
    if (reason := freeradius_unavailable_reason()) is not None:
        pytest.skip(reason)
    hosts = nat_lab.add_hosts({"server": "public", "alice": "public", "bob": "public", "carol": "public"})
    server = hosts["server"]
    radius = FreeRadius(tmp_path / "radius", secret="lab-radius-secret", netns=server.ns,
                        users={n: f"{n}-pw" for n in ("alice", "bob", "carol")},
                        groups={"alice": ["staff"], "bob": ["staff"], "carol": ["ops"]}).start()
    secret = tmp_path / "radius.secret"
    secret.write_text("lab-radius-secret\n")
    secret.chmod(0o600)
    db = str(tmp_path / "broker.db")
    created = subprocess.run([SIPMESH, "broker", "network", "create", "lab", "--pool", "100.64.9.0/24",
                              "--radius-group", "staff", "--db", db], capture_output=True, text=True, timeout=30)
    assert created.returncode == 0, created.stderr
    broker = spawn([SIPMESH, "broker", "--listen", f"{server.ip}:{PORT}", "--db", db, "--workers", "1",
                    "--radius", radius.hostport, "--radius-secret-file", str(secret), "--radius-timeout", "1",
                    "--min-expires", "5", "-v"], netns=server.ns, log_path=tmp_path / "broker.log",
                   name="broker", cwd=tmp_path)
    try:
        wait_udp_listening(server.ip, PORT, server.ns, 15, proc=broker)
        members = [Member(nat_lab, name, f"{server.ip}:{PORT}", tmp_path) for name in ("alice", "bob")]
        for m in members:
            wait_for(m.ready, 20, what=f"{m.name} up", abort=m.proc.exit_reason)
        full_mesh(members)
        assert {m.status()["mesh_ip"] for m in members} == {"100.64.9.1", "100.64.9.2"}
        shown = subprocess.run([SIPMESH, "broker", "network", "show", "lab", "--db", db], capture_output=True,
                               text=True, timeout=30).stdout
        assert shown.count("(by RADIUS)") == 2, shown

        carol = Member(nat_lab, "carol", f"{server.ip}:{PORT}", tmp_path)
        assert carol.proc.wait(20) != 0
        assert "not in its group staff" in carol.proc.log_text(), carol.proc.log_tail(20)
        assert "carol may not join network lab: RADIUS did not name group staff" in broker.log_text()
    finally:
        broker.stop(grace=5)
        radius.stop()
        while CREATED:
            Path(f"/var/run/wireguard/{CREATED.pop()}.sock").unlink(missing_ok=True)


def test_signed_sessions_are_read_back_and_a_swapped_key_is_refused(tmp_path):
    """The offer/answer of apps/mesh.py with a network CA: what a peer signs is read back
    with the certificate's values; a proxy that swaps a=wg-pubkey gets TrustError (no
    network needed: the same functions the member runs)."""
    from sipmesh.agent.trust import (NetworkCA, TrustError, generate_identity,
                                     identity_public_text, issue_member_certificate,
                                     save_identity)
    from sipmesh.agent.trust import write_text
    from sipmesh.apps.mesh import MeshTrust, describe, load_or_make_key, read_peer, \
        session_attributes
    from sipmesh.apps.wireguard import keypair

    ca = NetworkCA.create("lab")
    ca.save(tmp_path / "ca")
    _, wg_pub = load_or_make_key(tmp_path)
    assert (tmp_path / "wg.key").stat().st_mode & 0o777 == 0o600
    identity = generate_identity()
    save_identity(tmp_path / "id.key", identity)
    cert = issue_member_certificate(ca, name="alice", address="100.64.0.1/24", wg_pubkey=wg_pub,
                                    identity_pubkey=identity_public_text(identity))
    write_text(tmp_path / "alice.cert", cert.to_text())
    trust = MeshTrust(tmp_path / "ca", tmp_path / "alice.cert", tmp_path / "id.key")
    trust.load("lab", wg_pub)
    dialog = dict(call_id="c1", from_uri="sip:alice@192.0.2.1", to_uri="sip:bob@192.0.2.2")
    body = describe(session_attributes(ip4="192.0.2.1", port=51000, wg_pubkey=wg_pub,
                                       mesh_ip="100.64.0.1"),
                    user="alice", ip4="192.0.2.1", port=51000, trust=trust, role="offer", **dialog)
    peer = read_peer(body, name="alice", roster_ip=None, trust=trust, role="offer", **dialog)
    assert (peer.wg_pubkey, peer.mesh_ip, peer.endpoint) == (wg_pub, "100.64.0.1", "192.0.2.1:51000")
    swapped = body.replace(wg_pub.encode(), keypair()[1].encode())
    with pytest.raises(TrustError) as refused:
        read_peer(swapped, name="alice", roster_ip=None, trust=trust, role="offer", **dialog)
    assert refused.value.reason == "wrong-wg-key"
    with pytest.raises(TrustError) as refused:
        read_peer(body.replace(b"51000", b"51001"), name="alice", roster_ip=None, trust=trust,
                  role="offer", **dialog)
    assert refused.value.reason == "bad-signature"
    with pytest.raises(TrustError):  # bob's call answered by alice's certificate
        read_peer(body, name="bob", roster_ip=None, trust=trust, role="offer", **dialog)


@contextlib.contextmanager
def tampered_pair(nat_lab: NatLab, tmp_path: Path, swaps: Callable[[str], list[str]]):
    """Two members with the network's CA, alice (100.64.0.1) and bob (100.64.0.2), reach the
    broker through a hostile hop (tests/peers/sdp_tamper.py) that rewrites their sessions by
    `swaps(the hop's address)`. Waits until one side refuses the pair and checks what every
    refusal shows (the log's `session with X refused: `, `refused` in `sipmesh status`, both
    members still running); yields (alice, bob, the hop's process, the hop's address, the
    refusing member, its status entry for the peer)."""
    from sipmesh.agent.trust import (NetworkCA, generate_identity, identity_public_text,
                                     issue_member_certificate, save_identity, write_text)
    from sipmesh.apps.mesh import load_or_make_key, network_dir

    # the hop: a public host whose address the members take for the SIP server's domain
    host = nat_lab.add_hosts({"hop": "public"})["hop"]
    site = mesh_lab(nat_lab, tmp_path, ("--domain", host.ip))
    lab, server, run_dir = next(site)
    ca = NetworkCA.create("lab")
    ca.save(run_dir / "ca")
    trust: dict[str, list[str]] = {}
    for n, name in enumerate(["alice", "bob"], start=1):   # the broker's addresses, in order
        keys = run_dir / f"keys-{name}"
        _, wg_pub = load_or_make_key(network_dir(keys / "state", "lab"))
        identity = generate_identity()
        save_identity(keys / "id.key", identity)
        cert = issue_member_certificate(ca, name=name, address=f"100.64.0.{n}/24",
                                        wg_pubkey=wg_pub,
                                        identity_pubkey=identity_public_text(identity))
        write_text(keys / "member.cert", cert.to_text())
        trust[name] = ["--state-dir", str(keys / "state"), "--network-ca", str(run_dir / "ca"),
                       "--member-cert", str(keys / "member.cert"),
                       "--identity-key", str(keys / "id.key")]
    hop = spawn([sys.executable, str(Path(__file__).parent / "peers" / "sdp_tamper.py"),
                 f"{host.ip}:{PORT}", server, *swaps(host.ip)], netns=host.ns,
                log_path=run_dir / "tamper.log", name="tamper")
    try:
        wait_udp_listening(host.ip, PORT, host.ns, 10, proc=hop)
        alice, bob = (Member(lab, name, f"{host.ip}:{PORT}", run_dir, *trust[name])
                      for name in ("alice", "bob"))
        for m in (alice, bob):
            wait_for(m.ready, 20, what=f"{m.name} up", abort=m.proc.exit_reason)

        def refused() -> dict | None:
            for m, other in ((alice, "bob"), (bob, "alice")):
                for p in m.status()["peers"]:
                    if p["name"] == other and p["state"] == "refused":
                        return {"member": m, "peer": p}
            return None

        seen = wait_for(refused, 20, what="the pair refused\n" + alice.proc.log_tail(20)
                        + bob.proc.log_tail(20) + hop.log_tail(10))
        assert "swapped" in hop.log_text()   # the hop did rewrite the session
        victim, peer = seen["member"], seen["peer"]
        other = "bob" if victim is alice else "alice"
        assert f"session with {other} refused: {peer['error']}" in victim.proc.log_text()
        shown = victim.sipmesh("status")   # what the user sees
        assert "refused" in shown.stdout, shown.stdout
        yield alice, bob, hop, host.ip, victim, peer
        for m in (alice, bob):
            assert m.proc.alive
    finally:
        hop.stop(grace=3)
        site.close()


@pytest.mark.slow
@pytest.mark.netns
def test_a_proxy_that_swaps_the_wireguard_key_gets_the_pair_refused(nat_lab: NatLab,
                                                                    tmp_path: Path):
    """Issue 12 item 5 end to end: two members with the network's CA talk to the broker
    through a hostile hop (tests/peers/sdp_tamper.py) that swaps every a=wg-pubkey for an
    attacker's key. The pair is refused with the documented reason (docs/mesh-trust.md,
    `wrong-wg-key`) in the log and in status, and no interface gets the attacker's key."""
    from sipmesh.apps.wireguard import keypair

    _, attacker = keypair()
    with tampered_pair(nat_lab, tmp_path, lambda _hop: [f"wg-pubkey={attacker}"]) as (
            alice, bob, _, _, _, peer):
        assert "is not the one in the member's certificate" in peer["error"], peer
        assert "a=wg-pubkey" in peer["error"], peer
        for m in (alice, bob):
            assert attacker not in m.wg_peers(), m.wg_peers()


ATTACKER_IP = "100.64.0.66"   # a mesh address of the hop's choosing (no member's)


@pytest.mark.slow
@pytest.mark.netns
@pytest.mark.parametrize("swap", ["mesh-ip", "endpoint"])
def test_a_proxy_that_swaps_the_mesh_address_or_endpoint_gets_the_pair_refused(
        nat_lab: NatLab, tmp_path: Path, swap: str):
    """The same hostile hop swapping the address instead of the key: every a=mesh-ip for
    an address of its own (`wrong-address`: the certificate binds the member's address),
    or the endpoint, a=IP4 and every ICE candidate's address, for the hop's own host
    (`bad-signature`: the signature covers them). The pair is refused with that message in
    the log and in status; no member routes the attacker's address into its tunnel, nor
    sends WireGuard to the attacker's host."""
    def swaps(hop: str) -> list[str]:
        return [f"mesh-ip={ATTACKER_IP}"] if swap == "mesh-ip" else [f"IP4={hop}", f"candidate={hop}"]

    says = {"mesh-ip": f"the address in a=mesh-ip ('{ATTACKER_IP}') is not the member's address "
                       "in its certificate (100.64.0.",
            "endpoint": "signature does not match the session (SDP rewritten in transit?)"}[swap]
    with tampered_pair(nat_lab, tmp_path, swaps) as (alice, bob, _, hop, _, peer):
        assert says in peer["error"], peer
        for m in (alice, bob):
            allowed = m.host.run(["wg", "show", m.ifname, "allowed-ips"], check=True).stdout
            endpoints = m.host.run(["wg", "show", m.ifname, "endpoints"], check=True).stdout
            routes = m.host.run(["ip", "route", "show", "dev", m.ifname], check=False).stdout
            assert ATTACKER_IP not in allowed + routes and hop not in endpoints, \
                (m.name, allowed, endpoints, routes)
            towards = m.host.run(["ip", "route", "get", ATTACKER_IP], check=False).stdout
            assert f"dev {m.ifname}" not in towards, towards
