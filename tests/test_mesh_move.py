"""A mesh member that moves (issue 13, item 5 "works for mesh members too"; issue 12).

Three members in the NAT lab (tests/lab/topology.py): `p` public, `h1` and `h2` behind home
routers; our broker (SIP, STUN on its SIP port) on a public host. Once every pair pings,
h2's cable goes into a third home router (its veth moves, a new address as a new lease
gives: tests/lab/moves.py). h2 notices (netlink, agent/mobility.py), registers its roster
binding from there and sets its pairs up again at once: it calls p again (h2 < p calls) and
asks h1 to call it again (BYE with Reason cause 302). Pings between h2 and each peer resume
within MOVE_BOUND s (docs/mesh.md, "A member that moves"), far ahead of the consent
timeout (30 s, the default: without the move's handling a pair would wait for it); h2's
wireguard-go is the same process; p's and h1's interfaces show h2 at its new router.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from tests.lab import NatLab, wait_for
from tests.lab.moves import move_host
from tests.lab.mesh import CREATED, PORT, Member, full_mesh, mesh_broker
from tests.lab.moves import program_pids

pytestmark = [pytest.mark.slow, pytest.mark.netns,
              pytest.mark.skipif(not all(shutil.which(p) for p in ("wireguard-go", "wg", "ping")),
                                 reason="needs wireguard-go, wg and ping")]

HOSTS = {"p": "public", "h1": "home", "h2": "home"}
REACHABLE_BOUND = 5.0   # s from the new address to the roster binding registered from there
MOVE_BOUND = 10.0       # s from the new address to pings both ways with every peer


@pytest.fixture
def mesh3(nat_lab: NatLab, tmp_path: Path):
    hosts = nat_lab.add_hosts({"server": "public", **HOSTS})
    server = hosts["server"]
    broker = mesh_broker(server, list(HOSTS), tmp_path, "--rate-limit", "0")
    members: list[Member] = []
    try:
        members += [Member(nat_lab, n, f"{server.ip}:{PORT}", tmp_path, expires=300)
                    for n in HOSTS]
        yield nat_lab, {m.name: m for m in members}
    finally:
        for m in members:
            m.proc.stop(grace=10)
        broker.stop(grace=5)
        while CREATED:
            Path(f"/var/run/wireguard/{CREATED.pop()}.sock").unlink(missing_ok=True)


def test_a_moved_member_keeps_its_pairs(mesh3) -> None:
    lab, members = mesh3
    for m in members.values():
        wait_for(m.ready, 20, what=f"{m.name} up", abort=m.proc.exit_reason)
    full_mesh(list(members.values()), timeout=25)
    h2 = members["h2"]
    others = [members["p"], members["h1"]]
    address = {m.name: m.status()["mesh_ip"] for m in members.values()}
    key = h2.status()["wg_pubkey"]
    [before] = set(program_pids(h2.host).values())
    elsewhere = lab.add_router("home")

    moved = time.monotonic()
    new_ip = move_host(h2.host, elsewhere)
    wait_for(lambda: "registered our new address" in h2.proc.log_text(), 15,
             what="h2's roster binding from its new address", abort=h2.proc.exit_reason)
    reachable = time.monotonic() - moved
    resumed = {}
    for other in others:   # both ways, each pair (retried: ping -c1 -W1 each time)
        wait_for(lambda: h2.pings(address[other.name]) and other.pings(address["h2"]), 25,
                 what=f"h2 and {other.name} ping each other again\n{h2.proc.log_tail(30)}\n"
                      f"{other.proc.log_tail(30)}")
        resumed[other.name] = time.monotonic() - moved
    print(f"h2 moved to {new_ip}: its roster binding from there after {reachable:.2f} s, "
          + ", ".join(f"pings with {n} again after {t:.2f} s" for n, t in resumed.items()))

    assert set(program_pids(h2.host).values()) == {before}   # the same wireguard-go
    assert h2.proc.alive and "we moved" in h2.proc.log_text()
    for other in others:   # h2 at its new router (WireGuard's endpoint: that NAT's address)
        endpoint = other.wg_peers()[key]["endpoint"]
        assert endpoint and endpoint.startswith(elsewhere.wan_ip + ":"), (other.name, endpoint)
    assert {p["name"]: p["state"] for p in h2.status()["peers"]} == {"p": "up", "h1": "up"}
    assert reachable < REACHABLE_BOUND, h2.proc.log_tail(40)
    assert max(resumed.values()) < MOVE_BOUND, resumed
