"""The broker's status page with a running mesh network, in a real headless Chromium: the
network, its members (online or not) and each pair's path as the members report it
(PUBLISH, broker/paths.py); it follows a member that joins and one that leaves without a
reload; and every member's `sipmesh status` shows the same pairs in the same words.

Three (then four) `sipmesh up` members in namespaces on the NAT lab's internet, the broker
in its own namespace as production runs it; the page listens on that namespace's
loopback and reaches the browser through a socat forward (Netns.forward_tcp)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import struct
from pathlib import Path

import pytest

from tests.lab import NatLab, wait_for, wait_tcp_listening
from tests.lab.chromium import Chromium, chromium_binary
from tests.lab.mesh import MEMBERS, Member, mesh_lab

PAGE = 8080
NETWORK = "document.querySelector('.network[data-network=lab]')"
PAIRS = (f"[...({NETWORK}?.querySelectorAll('table.pairs tbody tr') || [])]"
         ".map(r => [...r.cells].map(c => c.textContent))")
MEMBERS_JS = (f"Object.fromEntries([...({NETWORK}?.querySelectorAll('table.members tbody tr') || [])]"
              ".map(r => [r.dataset.member, r.dataset.online === 'true']))")

pytestmark = pytest.mark.skipif(chromium_binary() is None,
                                reason="chromium missing (scripts/install --test installs it)")


def status_pairs(member: Member) -> list[list[str]]:
    """The PEER/STATE/PATH/RTT/WHY rows that `sipmesh status` prints for `member`."""
    shown = member.sipmesh("status")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("PEER "))
    assert re.split(r"\s{2,}", lines[start]) == ["PEER", "STATE", "PATH", "RTT", "WHY"]
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("TUNNEL "):
            break
        rows.append(re.split(r"\s{2,}", line.strip()))
    return rows


def page_pairs(chromium: Chromium, member: str) -> list[list[str]]:
    """The page's pair rows reported by `member`, without the member and the age columns."""
    return [row[1:-1] for row in chromium.evaluate(PAIRS) if row[0] == member]


def direct_pairs(chromium: Chromium, names: list[str]) -> bool:
    """Every pair among `names` (both views) shown as up and direct, and nothing else."""
    rows = chromium.evaluate(PAIRS)
    seen = sorted((r[0], r[1]) for r in rows if r[2] == "up" and r[3] == "direct")
    return len(rows) == len(seen) and seen == sorted((a, b) for a in names for b in names if a != b)


@pytest.mark.slow
@pytest.mark.netns
def test_the_page_shows_the_network_its_members_and_their_paths_as_sipmesh_status_does(
        nat_lab: NatLab, tmp_path: Path):
    run_dir = tmp_path
    generator = mesh_lab(nat_lab, tmp_path, ("--status-page", str(PAGE)))
    lab, server, _ = next(generator)
    chromium = None
    try:
        server_ns = lab["server"].ns
        forward, port = server_ns.forward_tcp(PAGE, log_path=tmp_path / "forward.log")
        members = [Member(lab, name, server, run_dir) for name in MEMBERS[:3]]
        for m in members:
            wait_for(m.ready, 20, what=f"{m.name} up", abort=m.proc.exit_reason)
        wait_tcp_listening("127.0.0.1", port, proc=forward)
        chromium = Chromium(tmp_path / "chromium", width=1000, height=860)
        chromium.navigate(f"http://127.0.0.1:{port}/")

        # the network, its three members online (dave, a member not running, offline), and
        # the six views of its three pairs, all direct
        assert chromium.wait_until(f"{MEMBERS_JS}.alice && {MEMBERS_JS}.bob && {MEMBERS_JS}.carol", 20,
                                   what="alice, bob and carol online on the page")
        assert chromium.evaluate(MEMBERS_JS) == {"alice": True, "bob": True, "carol": True,
                                                 "dave": False}
        wait_for(lambda: direct_pairs(chromium, ["alice", "bob", "carol"]), 20,
                 what=f"the three pairs direct on the page: {chromium.evaluate(PAIRS)}")
        title = chromium.evaluate(f"{NETWORK}.querySelector('h3').textContent")
        assert "pool 100.64.0.0/24" in title and "3 of 4 members online" in title
        assert chromium.evaluate("document.getElementById('networks-empty').hidden") is True

        # the same facts as each member's `sipmesh status`, in the same words
        for m in members:
            wait_for(lambda: status_pairs(m) == page_pairs(chromium, m.name), 10,
                     what=f"{m.name}: sipmesh status {status_pairs(m)} == page "
                          f"{page_pairs(chromium, m.name)}")
            assert [row[0] for row in status_pairs(m)] == sorted(
                n for n in ("alice", "bob", "carol") if n != m.name)

        shot = tmp_path / "status-page-network.png"
        chromium.screenshot(shot)
        header = shot.read_bytes()[:24]
        assert header[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", header[16:24]) == (1000, 860)
        if os.environ.get("SIPMESH_NETWORK_SCREENSHOT"):  # how docs/status-page-network.png is made
            shutil.copy(shot, os.environ["SIPMESH_NETWORK_SCREENSHOT"])

        # dave joins: the page follows without a reload
        dave = Member(lab, "dave", server, run_dir)
        wait_for(dave.ready, 20, what="dave up", abort=dave.proc.exit_reason)
        members.append(dave)
        wait_for(lambda: direct_pairs(chromium, ["alice", "bob", "carol", "dave"]), 20,
                 what=f"dave's pairs direct on the page: {chromium.evaluate(PAIRS)}")
        assert chromium.evaluate(MEMBERS_JS)["dave"] is True

        # carol leaves: offline, and no pair with her any more
        carol = members[2]
        down = carol.sipmesh("down", "lab")
        assert down.returncode == 0, down.stderr + carol.proc.log_tail(30)
        wait_for(lambda: direct_pairs(chromium, ["alice", "bob", "dave"]), 20,
                 what=f"carol's pairs gone from the page: {chromium.evaluate(PAIRS)}")
        # her pairs' reports and her roster binding go by separate roads: wait for both
        wait_for(lambda: chromium.evaluate(MEMBERS_JS)["carol"] is False, 20,
                 what=f"carol offline on the page: {chromium.evaluate(MEMBERS_JS)}")
        assert chromium.evaluate("document.getElementById('error').hidden") is True
        for m in (members[0], members[1], dave):
            m.proc.signal_group(signal.SIGTERM)
    finally:
        if chromium is not None:
            chromium.close()
        generator.close()
