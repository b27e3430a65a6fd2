"""The ICE pair lab: tests/lab/iceprobe.py run on two hosts of the NAT lab
(sipmesh/lab/topology.py), their descriptions swapped as an offer and an answer would, with
a STUN responder where the SIP server would be and coturn as the relay. Used by test_ice,
test_portmap and test_streams (``from tests.lab.icepair import lab, session``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sipmesh.sip.auth import compute_ha1

PROBE = str(Path(__file__).parent / "iceprobe.py")
REALM = "mesh.example"
SIP_PORT = 5060   # the STUN server, where the SIP server answers STUN


@pytest.fixture
def lab(nat_lab, coturn):
    """broker (STUN on 5060 + coturn on 3478), public p, home a and b, symmetric s and s2,
    u behind a router that drops UDP."""
    nat_lab.add_hosts({"broker": "public", "p": "public", "a": "home", "b": "home",
                       "s": "symmetric", "s2": "symmetric", "u": "udp_blocked"})
    broker = nat_lab["broker"]
    stun = nat_lab.popen(broker, [sys.executable, PROBE, "stun", str(SIP_PORT)],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert json.loads(stun.stdout.readline()) == {"ready": SIP_PORT}
        nat_lab.relay = coturn(broker.ip, netns=broker.ns, realm=REALM,
                               users={"alice": compute_ha1("alice", REALM, "alice-pw")})
        yield nat_lab
    finally:
        stun.kill()
        stun.wait()


def session(lab, caller: str, callee: str, *, password: str = "alice-pw",
            turn: bool = True, timeout: float = 10.0, hold: bool = False,
            portmap: dict[str, list[str]] | None = None,
            streams: tuple[dict, dict] | None = None, during=None) -> list[dict]:
    """Run iceprobe on both hosts, swap their descriptions as an offer and an answer
    would, and return each side's results: [{"local", "path" | "error", "data"}, ...].
    `portmap`: {host: protocols} asks those hosts' routers for a port mapping; the
    session is then closed before this returns ("closed" in their results).

    With `streams` (each side's "streams" option), TCP over QUIC streams runs on the
    path: ``during(results)`` is called while it does (results[0]["streams"] is the
    caller's local port), then each result gets "stopped"."""
    portmap = portmap or {}
    broker = lab["broker"]
    procs = []
    try:
        for n, (host, controlling) in enumerate(((caller, True), (callee, False))):
            proc = lab.popen(host, [sys.executable, PROBE], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            procs.append(proc)
            proc.stdin.write(json.dumps({
                "controlling": controlling, "stun": [broker.ip, SIP_PORT],
                "turn": [broker.ip, lab.relay.port] if turn else None,
                "user": "alice", "password": password, "timeout": timeout,
                "hold": hold, "portmap": portmap.get(host),
                "streams": streams[n] if streams else None}) + "\n")
            proc.stdin.flush()
        results = [read(p) for p in procs]
        for proc, peer in zip(procs, reversed(results)):
            proc.stdin.write(json.dumps(peer["local"]) + "\n")
            proc.stdin.flush()
        for proc, result in zip(procs, results):
            result.update(read(proc))
            if "error" not in result:
                result.update(read(proc))
        if streams is not None:
            for proc, result in zip(procs, results):
                result.update(read(proc))
            if during is not None:
                during(results)
            for proc, result in zip(procs, results):
                proc.stdin.write("stop\n")
                proc.stdin.flush()
                result.update(read(proc))
        if hold:
            lab[caller].router.cut()
            for proc in procs:
                proc.stdin.write("cut\n")
                proc.stdin.flush()
            for proc, result in zip(procs, results):
                result.update(read(proc))
        for host, proc, result in zip((caller, callee), procs, results):
            if portmap.get(host):
                result.update(read(proc))
        return results
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def read(proc: subprocess.Popen) -> dict:
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise AssertionError(f"iceprobe ended early:\n{proc.stderr.read()[-3000:]}")
    return json.loads(line)
