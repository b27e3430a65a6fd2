"""`sipmesh demo --lab` (issue 16), run as a user runs it: the pairs it prints are all
connected, those of the symmetric host relayed, the mesh complete across the NATs (home to
home direct, the symmetric member relayed to the home members), and nothing is left
afterwards (namespaces, interfaces, processes, files), also when SIGINT cuts it short."""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from sipmesh.lab.coturn import coturn_unavailable_reason
from sipmesh.lab.netns import list_netns, netns_unavailable_reason
from tests.lab.agents import SIPMESH, processes_of

pytestmark = [pytest.mark.slow, pytest.mark.netns]

PAIRS = {("pub", "home1"): "direct", ("home2", "home1"): "direct",
         ("sym", "home1"): "relayed", ("sym", "home2"): "relayed"}
MEMBERS = ("alice", "bob", "carol", "dave")   # on pub, home1, home2, sym
# the mesh pairs behind NATs: home to home punched through, the symmetric member's with
# home members relayed (with the public member it is direct: pub is reachable)
MESH_PATHS = {("bob", "carol"): "direct", ("carol", "bob"): "direct",
              ("dave", "bob"): "relayed", ("bob", "dave"): "relayed",
              ("dave", "carol"): "relayed", ("carol", "dave"): "relayed"}
SESSION = re.compile(r"^  (\w+) -> (\w+) +(direct|relayed) +[\d.]+ s +([\d.]+ s|NONE) ", re.M)
ROW = re.compile(r"^  (\w+) -> (\w+) +(\S.*?) +([\d.]+ s|NO REPLY)(?: |$)", re.M)   # any path


@pytest.fixture(autouse=True)
def lab_possible():
    for reason in (netns_unavailable_reason(), coturn_unavailable_reason()):
        if reason:
            pytest.skip(reason)
    if not all(shutil.which(p) for p in ("wireguard-go", "wg", "ping")):
        pytest.skip("needs wireguard-go, wg and ping")


def links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                         check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def assert_nothing_left(output: str, links_before: set[str]) -> None:
    run_dir = Path(re.search(r"files \(configurations, logs\): (\S+), deleted", output)[1])
    assert not run_dir.exists(), run_dir
    assert not processes_of(run_dir), processes_of(run_dir)
    assert not [n for n in list_netns() if n.startswith("smd-")], list_netns()
    ours = {n for n in links() - links_before if n.startswith(("smd", "smm"))}
    assert not ours, ours
    assert not list(Path("/var/run/wireguard").glob("smm*.sock"))
    assert "left behind: nothing" in output, output


def test_the_lab_demo_connects_every_pair_and_leaves_nothing():
    before = links()
    run = subprocess.run([SIPMESH, "demo", "--lab"], capture_output=True, text=True, timeout=120)
    out = run.stdout
    assert run.returncode == 0, out + run.stderr
    build = float(re.search(r"lab built in ([\d.]+) s", out)[1])
    assert build < 2.0, out
    # step 2: every pair connected (a path, and the greeting came back), the symmetric relayed
    sessions = {(a, b): (path, answer) for a, b, path, answer in SESSION.findall(out)}
    assert {pair: sessions[pair][0] for pair in PAIRS} == PAIRS, out
    assert all(answer != "NONE" for _, answer in sessions.values()), out
    assert "[pub] sent a greeting to " in out and "received 'hello back from home1'" in out
    # the ladder: pub's INVITE reaches home1 through the broker, home1's 200 OK comes back
    ladder = out[out.index("SIP ladder"):out.index("\n2. ")]
    assert re.search(r"\|-+INVITE-+>\|\s+\|", ladder) and re.search(r"\|\s+\|-+INVITE-+>\|", ladder)
    assert "200 OK (INVITE)" in ladder and "BYE" in ladder
    # step 3: every member reached every other, behind the NATs, on the paths ICE can find
    assert re.search(r"bob 100\.64\.0\.\d+ \(home1\).*dave 100\.64\.0\.\d+ \(sym\)", out), out
    mesh = {(a, b): (path, took) for a, b, path, took in ROW.findall(out) if a in MEMBERS}
    assert len(mesh) == 12 and all(took != "NO REPLY" and path != "missing"
                                   for path, took in mesh.values()), out
    assert {pair: mesh[pair][0].split()[0] for pair in MESH_PATHS} == MESH_PATHS, out
    assert re.search(r"^  bob -> carol +direct .* ms +host↔srflx .*through both NATs", out, re.M)
    assert re.search(r"^  dave -> bob +relayed .* ms +relay↔srflx .*symmetric", out, re.M)
    assert re.search(r"total [\d.]+ s: OK", out)
    assert_nothing_left(out, before)


def test_an_interrupted_lab_demo_tears_everything_down():
    before = links()
    proc = subprocess.Popen([SIPMESH, "demo", "--lab"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        deadline = time.monotonic() + 60
        while not any(line.startswith("2. home to home") for line in seen):
            assert time.monotonic() < deadline, "".join(seen)
            ready, _, _ = select.select([proc.stdout], [], [], 1)
            if ready:
                line = proc.stdout.readline()
                assert line, "the demo ended before step 2:\n" + "".join(seen)
                seen.append(line)
        os.kill(proc.pid, signal.SIGINT)   # half way: sessions and agents running
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(seen) + rest
    assert proc.returncode == 130, out
    assert "interrupted (SIGINT): tearing everything down" in out
    assert re.search(r"total [\d.]+ s: interrupted", out)
    assert_nothing_left(out, before)
