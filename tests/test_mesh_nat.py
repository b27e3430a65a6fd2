"""Mesh members across NAT (issue 12, item 2 with the NAT issue's ICE): every pair's path
comes from ICE on the network's WireGuard port, direct where the NATs let the checks
through, through coturn where they do not.

Five members in the NAT lab of tests/lab/topology.py: `p` public, `h1`, `h2` behind home
routers, `s1`, `s2` behind symmetric NATs; our broker (SIP, STUN on its SIP port, the
network `lab`) and coturn (realm `lab`: the members' network credentials) on a public
host, the broker as a separate process. Every member pings every other's mesh address;
status says h1<->h2 direct and s1<->s2 relayed; `h3` (home) joins late and is reached by
all; h2 leaves with `sipmesh down` and s2's `sipmesh up` is killed with SIGKILL (its
wireguard-go follows it, by its parent-death signal): both disappear from the
others' `wg show`, the killed one within the consent timeout (the bound of docs/mesh.md).
The whole scenario runs again with unmodified Kamailio as the SIP server (the shipped
docs/kamailio/kamailio.cfg, STUN from its `stun` module): members claim their addresses
(`--mesh-ip`), pair INVITEs go to each member's public GRUU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from sipmesh.broker.users import UsersFile
from sipmesh.sip.auth import compute_ha1
from tests.lab import (Coturn, LabTimeout, NatLab, coturn_unavailable_reason,
                       kamailio_unavailable_reason, shipped_kamailio, spawn, wait_for,
                       wait_udp_listening)
from tests.test_mesh_up import CREATED, SIPMESH, Member, full_mesh, handshakes_promptly

pytestmark = [pytest.mark.slow, pytest.mark.netns]

PORT = 5060
CONSENT = 6.0   # s: --consent-timeout; a vanished member is gone from the others within it
HOSTS = {"p": "public", "h1": "home", "h2": "home", "s1": "symmetric", "s2": "symmetric",
         "h3": "home"}
FIRST = ["h1", "h2", "p", "s1", "s2"]


def pw(name: str) -> str:
    return f"{name}-pw"   # what test_mesh_up.Member writes into its credentials file


@pytest.fixture
def nat_mesh(nat_lab: NatLab, tmp_path: Path, request: pytest.FixtureRequest):
    # the SIP server: our broker, or Kamailio (indirect parameter "kamailio"; see `claims`)
    kind = getattr(request, "param", "broker")
    reason = coturn_unavailable_reason() or (kamailio_unavailable_reason() if kind == "kamailio" else None)
    if reason:
        pytest.skip(reason)
    hosts = nat_lab.add_hosts({"server": "public", **HOSTS})
    server = hosts["server"]
    users = UsersFile(tmp_path / "users")
    for name in HOSTS:
        users.add("lab", name, pw(name))
    users.save()
    db = str(tmp_path / "broker.db")
    for argv in (["network", "create", "lab", "--pool", "100.64.0.0/24", "--db", db],
                 ["network", "members", "add", "lab", *HOSTS, "--db", db]):
        subprocess.run([SIPMESH, "broker", *argv], check=True, capture_output=True, timeout=30)
    coturn = Coturn(tmp_path / "coturn", server.ip, netns=server.ns, realm="lab",
                    users={n: compute_ha1(n, "lab", pw(n)) for n in HOSTS}).start()
    if kind == "kamailio":   # the network's members are the users of realm lab there
        broker = shipped_kamailio(tmp_path / "kamailio", tmp_path / "users", mesh_domain=server.ip,
                                  host=server.ip, port=PORT, netns=server.ns).start()
    else:
        broker = spawn([SIPMESH, "broker", "--listen", f"{server.ip}:{PORT}", "--db", db,
                        "--workers", "1", "--users", str(tmp_path / "users"), "--rate-limit", "0",
                        "-v"], netns=server.ns, log_path=tmp_path / "broker.log", name="broker",
                       cwd=tmp_path)
    try:
        if kind == "broker":
            wait_udp_listening(server.ip, PORT, server.ns, 15, proc=broker)
        yield nat_lab, f"{server.ip}:{PORT}", f"turn:{server.ip}:{coturn.port}", tmp_path
    finally:
        broker.stop(grace=5)
        coturn.stop()
        while CREATED:
            Path(f"/var/run/wireguard/{CREATED.pop()}.sock").unlink(missing_ok=True)


@pytest.fixture
def claims(request: pytest.FixtureRequest):
    """What a member adds to `sipmesh up` on this test's server: on Kamailio, which
    allocates none, the mesh address it claims (100.64.0.N, N its place in HOSTS)."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    if params.get("nat_mesh") != "kamailio":
        return lambda name: ()
    return lambda name: ("--mesh-ip", f"100.64.0.{list(HOSTS).index(name) + 1}")


def peers_of(member: Member) -> dict[str, dict]:
    return {p["name"]: p for p in member.status()["peers"]}


def every_pair_pings(members: dict[str, Member]) -> None:
    """full_mesh, and on failure what each member sees (status, wg show, routes)."""
    try:
        full_mesh(list(members.values()), timeout=25)
    except LabTimeout:
        for m in members.values():
            print(m.name, json.dumps(m.status(), indent=1),
                  m.host.run(["wg", "show", m.ifname], check=False).stdout,
                  m.host.run(["ip", "route"], check=False).stdout)
        raise


@pytest.mark.parametrize("nat_mesh", ["broker", "kamailio"], indirect=True)
def test_mesh_paths_across_nat(nat_mesh, claims) -> None:
    lab, server, turn, run_dir = nat_mesh
    start = time.monotonic()
    extra = ("--turn", turn, "--consent-timeout", str(CONSENT))
    members = {n: Member(lab, n, server, run_dir, *extra, *claims(n), expires=300) for n in FIRST}
    for m in members.values():
        wait_for(m.ready, 20, what=f"{m.name} up", abort=m.proc.exit_reason)
    every_pair_pings(members)
    print(f"full mesh of 5 across NAT {time.monotonic() - start:.1f} s after the first up")
    handshakes_promptly(list(members.values()))   # relayed pairs too

    # every pair on a checked path, and the path status says why
    for m in members.values():
        peers = peers_of(m)
        assert set(peers) == set(members) - {m.name}, peers
        for name, peer in peers.items():
            assert peer["state"] == "up" and peer["path"] in ("direct", "relayed"), (m.name, peer)
            assert peer["why"] and peer["rtt_ms"] is not None, (m.name, peer)
    home = peers_of(members["h1"])["h2"]
    assert home["path"] == "direct" and "srflx" in home["why"], home
    assert home["endpoint"].startswith(lab["h2"].public_ip + ":"), home
    symmetric = peers_of(members["s1"])["s2"]
    assert symmetric["path"] == "relayed" and "relay" in symmetric["why"], symmetric
    assert peers_of(members["s2"])["s1"]["path"] == "relayed"
    assert peers_of(members["p"])["h1"]["path"] == "direct"
    shown = members["h1"].sipmesh("status")
    assert shown.returncode == 0 and "h2" in shown.stdout, shown.stdout + shown.stderr

    # a late member is connected to everyone
    members["h3"] = Member(lab, "h3", server, run_dir, *extra, *claims("h3"), expires=300)
    wait_for(members["h3"].ready, 20, what="h3 up", abort=members["h3"].proc.exit_reason)
    every_pair_pings(members)

    # h2 leaves with `sipmesh down`; s2 vanishes (SIGKILL, its wireguard-go with it)
    keys = {n: members[n].status()["wg_pubkey"] for n in ("h2", "s2")}
    down = members["h2"].sipmesh("down", "lab")
    assert down.returncode == 0, down.stderr + members["h2"].proc.log_tail(30)
    rest = [members[n] for n in ("h1", "h3", "p", "s1")]
    for m in rest + [members["s2"]]:
        wait_for(lambda: keys["h2"] not in m.wg_peers(), 5, what=f"h2 gone from {m.name}")
    killed = time.monotonic()
    os.kill(members["s2"].proc.pid, signal.SIGKILL)   # `up` alone: its wireguard-go follows
    members["s2"].proc.wait(5)
    wait_for(lambda: members["s2"].host.run(["ip", "link", "show", members["s2"].ifname],
                                            check=False).returncode != 0, 5,
             what="s2's interface gone with its wireguard-go")
    for m in rest:
        wait_for(lambda: keys["s2"] not in m.wg_peers(), CONSENT + 4,
                 what=f"s2 gone from {m.name}\n{m.proc.log_tail(20)}")
    print(f"s2 gone from all {time.monotonic() - killed:.1f} s after SIGKILL")
    assert members["h1"].pings(members["s1"].status()["mesh_ip"])  # the rest stands
    print(f"whole test {time.monotonic() - start:.1f} s")
