"""The NAT lab (sipmesh/lab/topology.py) behaves as documented, shown with plain UDP: no
sipmesh code here, only the kernel's NAT and the stdlib probes of tests/lab/natprobe.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lab import NatLab, list_netns

pytestmark = pytest.mark.netns

PROBE = str(Path(__file__).parent / "lab" / "natprobe.py")
STUN_PORTS = (3478, 3479)
COUNT_PORT = 3478  # the reflector's TCP "count" listener


def _line(proc: subprocess.Popen) -> dict:
    line = proc.stdout.readline()
    if not line:
        out, err = proc.communicate(timeout=10)
        raise AssertionError(f"probe ended without output: {err}")
    return json.loads(line)


@pytest.fixture
def lab(nat_lab: NatLab) -> NatLab:
    """broker (public, running the reflector), a public host p, home hosts a and b, a host s
    behind a symmetric NAT and u behind a router that drops outgoing UDP."""
    nat_lab.add_hosts({"broker": "public", "p": "public", "a": "home", "b": "home",
                       "s": "symmetric", "u": "udp_blocked"})
    reflector = nat_lab.popen("broker", [sys.executable, PROBE, "reflect", *map(str, STUN_PORTS),
                                         "--tcp", str(COUNT_PORT)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert _line(reflector) == {"ready": list(STUN_PORTS)}
        yield nat_lab
    finally:
        reflector.kill()
        reflector.wait()


def probe(lab: NatLab, host: str, *args: object) -> dict:
    return json.loads(lab.run(host, [sys.executable, PROBE, *map(str, args)], timeout=20).stdout)


def punch(lab: NatLab, x: str, y: str, seconds: float = 2.0) -> tuple[dict, dict]:
    """x and y learn their mappings from the reflector, swap them and punch at each other."""
    procs = [lab.popen(h, [sys.executable, PROBE, "punch", lab["broker"].ip, STUN_PORTS[0],
                           seconds], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for h in (x, y)]
    try:
        mapped = [_line(p)["mapped"] for p in procs]
        for p, peer in zip(procs, reversed(mapped)):
            p.stdin.write(peer + "\n")
            p.stdin.flush()
        return _line(procs[0]), _line(procs[1])
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_home_router_maps_once_symmetric_router_maps_per_destination(lab):
    for host in ("a", "s"):
        m = probe(lab, host, "mapping", lab["broker"].ip, *STUN_PORTS)
        first, second = (tuple(m[k].split(":")) for k in ("first", "second"))
        assert first[0] == second[0] == lab[host].public_ip
        if host == "a":
            assert first == second, m          # endpoint-independent
        else:
            assert first[1] != second[1], m    # a new port per destination


def test_home_hosts_punch_through_to_each_other(lab):
    ab, ba = punch(lab, "a", "b")
    assert ab["heard"] and ab["acked"] and ba["heard"] and ba["acked"], (ab, ba)


def test_public_host_and_home_host_connect(lab):
    pa, ap = punch(lab, "p", "a")
    assert pa["heard"] and pa["acked"] and ap["heard"] and ap["acked"], (pa, ap)


def test_symmetric_nat_defeats_punching_to_a_home_host(lab):
    sa, as_ = punch(lab, "s", "a")
    # a's packets never reach s (the port s showed the reflector is not the one it uses
    # towards a), so neither side hears both ways
    assert not as_["heard"] and not (sa["heard"] and sa["acked"]), (sa, as_)


def test_home_router_drops_what_nobody_asked_for(lab):
    assert lab.run("a", ["ping", "-c1", "-W2", lab["p"].ip], check=False).returncode == 0
    assert lab.run("p", ["ping", "-c1", "-W1", lab["a"].public_ip], check=False).returncode != 0


def test_udp_blocked_router_lets_no_udp_out_but_tcp(lab):
    # the count comes back over TCP: TCP gets out; a home host is the control
    assert probe(lab, "a", "send", lab["broker"].ip, COUNT_PORT, 5)["received"] == 5
    assert probe(lab, "u", "send", lab["broker"].ip, COUNT_PORT, 5)["received"] == 0


def test_lab_is_removed_even_when_the_test_fails():
    names: set[str] = set()
    with pytest.raises(RuntimeError, match="boom"):
        with NatLab() as lab:
            lab.add_hosts({"x": "public", "y": "home"})
            names = {ns.name for ns in lab.factory.namespaces}
            assert len(names) == 4 and names <= set(list_netns())
            raise RuntimeError("boom")
    assert not names & set(list_netns())


def test_unknown_router_kind_is_refused(nat_lab):
    with pytest.raises(ValueError, match="unknown router kind"):
        nat_lab.add_host("x", behind="carrier-grade")


def test_a_router_made_first_takes_hosts_behind_it(nat_lab):
    router = nat_lab.add_router("home")
    hosts = nat_lab.add_hosts({"x": router, "y": router, "p": "public"})
    assert [h.router for h in (hosts["x"], hosts["y"])] == [router, router]
    assert hosts["x"].public_ip == router.wan_ip and router.upnp is None
    assert nat_lab.run("x", ["ping", "-c1", "-W2", hosts["p"].ip], check=False).returncode == 0
    with pytest.raises(ValueError, match="unknown router kind"):
        nat_lab.add_router("public")
