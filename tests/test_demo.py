"""`sipmesh demo`: an embedded broker and two agents on loopback, without privileges."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.lab.agents import SIPMESH

LADDER = [  # (from, to, message) in the order they must appear
    ("2500", "broker", "REGISTER Expires 3600"),
    ("2501", "broker", "REGISTER Expires 3600"),
    ("2501", "broker", "INVITE"),
    ("broker", "2500", "INVITE"),
    ("2500", "broker", "180 Ringing (INVITE)"),
    ("2500", "broker", "200 OK (INVITE)"),
    ("broker", "2501", "200 OK (INVITE)"),
    ("2501", "broker", "ACK"),
    ("broker", "2500", "ACK"),
    ("2501", "broker", "BYE"),
    ("broker", "2500", "BYE"),
    ("2500", "broker", "200 OK (BYE)"),
    ("broker", "2501", "200 OK (BYE)"),
    ("2501", "broker", "REGISTER Expires 0"),
    ("2500", "broker", "REGISTER Expires 0"),
]


def _direction(line: str, columns: dict[str, int]) -> tuple[str, str] | None:
    bars = [i for i, c in enumerate(line) if c == "|"]
    if ">" in line:
        head = line.index(">")
        right = min(b for b in bars if b > head)
        left = max(b for b in bars if b < head)
        return _lane(left, columns), _lane(right, columns)
    if "<" in line:
        head = line.index("<")
        left = max(b for b in bars if b < head)
        right = min(b for b in bars if b > head)
        return _lane(right, columns), _lane(left, columns)
    return None


def _lane(position: int, columns: dict[str, int]) -> str:
    return min(columns, key=lambda name: abs(columns[name] - position))


def _check(output: str) -> None:
    assert "\n  OK\n" in output, output
    assert "[2500] received 'hello from 2501'" in output, output
    assert "received 'hello back from 2500'" in output, output
    assert "registrations left at the broker: 0" in output
    lines = output.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("SIP ladder"))
    header = lines[start + 1]
    columns = {name: header.index(name) + len(name) // 2 for name in ("2501", "broker", "2500")}
    hops = []
    for line in lines[start + 2:]:
        if not line.strip():
            break
        direction = _direction(line.split("   [")[0], columns)
        if direction:
            hops.append((direction[0], direction[1], line))
    position = 0
    for sender, receiver, message in LADDER:
        for i in range(position, len(hops)):
            if hops[i][:2] == (sender, receiver) and message in hops[i][2]:
                position = i + 1
                break
        else:
            raise AssertionError(f"{sender} -> {receiver} {message} missing or out of order:\n"
                                 + "\n".join(h[2] for h in hops))
    two_hundred = next(h[2] for h in hops if "200 OK (INVITE)" in h[2] and h[1] == "2501")
    assert re.search(r"\[IP4:127\.0\.0\.1 PORT:\d+\]", two_hundred), two_hundred


def test_demo_runs_without_privileges():
    argv = [SIPMESH, "demo"]
    if shutil.which("setpriv"):  # root without any capability is as unprivileged as it gets
        argv = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", *argv]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    _check(p.stdout)
    assert "sudo sipmesh demo --lab" in p.stdout   # where the rest of the story is


def test_the_lab_demo_without_privileges_says_why_and_how():
    if not shutil.which("setpriv"):
        pytest.skip("needs setpriv")
    p = subprocess.run(["setpriv", "--bounding-set=-all", "--inh-caps=-all", SIPMESH, "demo",
                        "--lab"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stderr.startswith("sipmesh demo --lab: ") and "sudo sipmesh demo --lab" in p.stderr
    assert not p.stdout


def test_ladder_drawing_of_a_reply_goes_back():
    from sipmesh.cli.demo import Hop, draw

    lines = draw([Hop(1, 2, "INVITE  [IP4:1.2.3.4]"), Hop(2, 1, "200 OK (INVITE)")],
                 {1: "a", 2: "b"}, ["a", "b"])
    assert ">" in lines[1] and "<" not in lines[1] and lines[1].endswith("[IP4:1.2.3.4]")
    assert "<" in lines[2] and ">" not in lines[2]
