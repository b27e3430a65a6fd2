"""The NAT lab's mesh (tests/test_mesh_nat.py, tests/test_mesh_relay.py): members `p`
public, `h1`..`h3` behind home routers, `s1`, `s2` behind symmetric NATs; the SIP server
(our broker as a separate process, or Kamailio with the shipped config: indirect parameter
of `nat_mesh`) and coturn (realm `lab`: the members' network credentials) on a public host."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from sipmesh.broker.users import UsersFile
from sipmesh.sip.auth import compute_ha1
from tests.lab import (Coturn, LabTimeout, NatLab, coturn_unavailable_reason,
                       kamailio_unavailable_reason, shipped_kamailio, spawn,
                       wait_udp_listening)
from tests.lab.mesh import CREATED, SIPMESH, Member, full_mesh

PORT = 5060
CONSENT = 6.0   # s: --consent-timeout; a vanished member is gone from the others within it
HOSTS = {"p": "public", "h1": "home", "h2": "home", "s1": "symmetric", "s2": "symmetric",
         "h3": "home"}
FIRST = ["h1", "h2", "p", "s1", "s2"]


def pw(name: str) -> str:
    return f"{name}-pw"   # what tests/lab/mesh.py:Member writes into its credentials file


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

