"""Relay through a member (issue 12, item 4): the public member `p` runs `sipmesh up
--relay`; the two members behind symmetric NATs, which cannot reach each other directly,
talk through p's relay rather than the network's coturn (both are there), WireGuard end
to end; with p's relay out of one member's reach, the pair falls back to coturn and says
why. The NAT lab and broker of tests/test_mesh_nat.py."""

from __future__ import annotations

import json
import time

import pytest

from tests.lab import wait_for
from tests.lab.mesh import Member, full_mesh
from tests.lab.natmesh import CONSENT, claims, nat_mesh, peers_of  # noqa: F401 (the fixtures)

pytestmark = [pytest.mark.slow, pytest.mark.netns]


@pytest.mark.parametrize("nat_mesh", ["broker", "kamailio"], indirect=True)
def test_symmetric_pair_goes_through_the_member_relay(nat_mesh, claims) -> None:  # noqa: F811
    lab, server, turn, run_dir = nat_mesh
    start = time.monotonic()
    extra = ("--turn", turn, "--consent-timeout", str(CONSENT))
    members = {"p": Member(lab, "p", server, run_dir, *extra, *claims("p"), "--relay", expires=300)}
    members |= {n: Member(lab, n, server, run_dir, *extra, *claims(n), expires=300) for n in ("s1", "s2")}
    for m in members.values():
        wait_for(m.ready, 20, what=f"{m.name} up", abort=m.proc.exit_reason)
    try:
        full_mesh(list(members.values()), timeout=25)
    except Exception:
        for m in members.values():
            print(m.name, json.dumps(m.status(), indent=1), m.proc.log_tail(40))
        raise
    print(f"3 members, s1<->s2 through p: {time.monotonic() - start:.1f} s after the first up")

    p_ip = lab["p"].ip
    assert members["p"].status()["relay"]["offered"] == f"{p_ip}:3478"
    for me, other in (("s1", "s2"), ("s2", "s1")):
        status = members[me].status()
        assert status["relay"]["members"]["p"]["credential"] == "yes", status["relay"]
        peer = peers_of(members[me])[other]
        assert peer["state"] == "up" and peer["path"] == "via p", (me, peer)
        # both ends of the chosen pair are allocations on p's relay: not the network's coturn
        detail = peer["path_detail"]
        assert detail["local"].startswith(f"relay {p_ip}:"), (me, detail)
        assert detail["remote"].startswith(f"relay {p_ip}:"), (me, detail)
        assert detail["proxy"]["to_peer"]["packets"] > 0, (me, detail)
        assert detail["proxy"]["from_peer"]["packets"] > 0, (me, detail)
        assert peer["latest_handshake"] > 0, (me, peer)   # WireGuard's own handshake
        shown = members[me].sipmesh("status")
        line = next(line for line in shown.stdout.splitlines() if line.split()[:1] == [other])
        assert "via p" in line, shown.stdout
    # p itself is reached directly by both; it relays, it is not relayed
    for name in ("s1", "s2"):
        assert peers_of(members["p"])[name]["path"] == "direct"

    # p's relay out of s1's reach: s2 joins again, the pair falls back to the network's
    # coturn, and `why` says why not through p
    s1_host = members["s1"].host
    for proto in ("udp", "tcp"):
        s1_host.run(["iptables", "-A", "OUTPUT", "-d", p_ip, "-p", proto, "--dport", "3478",
                     "-j", "DROP"])
    down = members["s2"].sipmesh("down", "lab")
    assert down.returncode == 0, down.stderr
    members["s2"] = Member(lab, "s2", server, run_dir, *extra, *claims("s2"), expires=300)
    wait_for(members["s2"].ready, 20, what="s2 up again", abort=members["s2"].proc.exit_reason)
    s2_ip = members["s2"].status()["mesh_ip"]
    wait_for(lambda: members["s1"].pings(s2_ip), 25, what="s1 pings s2 through coturn")
    peer = peers_of(members["s1"])["s2"]
    assert peer["path"] == "relayed", peer
    assert "not through a member relay: member relay p: no relay from TURN" in peer["why"], peer
    assert not peer["path_detail"]["local"].startswith(f"relay {p_ip}:"), peer
