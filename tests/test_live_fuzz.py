"""Live fuzzing of the running broker (uvloop, two workers, serving example.com and relaying
every other domain, so that garbage reaches the registrar and the proxy) and an agent
(`sipmesh serve`), both real processes in a network namespace that has only `lo`: thousands
of mutated messages over UDP, then over TCP partial and slow frames, a huge Content-Length,
thousands of header fields, mutated streams and idle connections (tests/fuzz/live.py).

What a user would see: neither process dies (no worker is restarted), memory stays
bounded, every valid REGISTER and OPTIONS sent between the garbage is answered (by the
broker, by the agent, and through the broker to the agent), and nothing in either log is a
traceback or an exception escaping a task.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.lab import wait_for, wait_tcp_listening, wait_udp_listening

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]))
BROKER, AGENT, USER = ("127.0.0.1", 5060), ("127.0.0.1", 5070), "2500"
DATAGRAMS, RATE = 3000, 500  # six seconds of garbage, half to each process
RSS_GROWTH_MB = 40
ERRORS = ("Traceback", "Task exception was never retrieved", "died with status", "Exception in callback")


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
        except OSError:
            pass
    return out


def _rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
    return total / 1024


@pytest.mark.slow
@pytest.mark.netns
def test_broker_and_agent_survive_live_fuzzing(lo_only_netns, tmp_path) -> None:
    ns = lo_only_netns
    broker = ns.spawn([sys.executable, "-m", "sipmesh", "broker", "--listen", f"{BROKER[0]}:{BROKER[1]}",
                       "--domain", "example.com", "--forward-foreign", "--db", str(tmp_path / "broker.db"),
                       "--rate-limit", "0", "--workers", "2", "--loop", "uvloop"],
                      log_path=tmp_path / "logs" / "broker.log", env=ENV, cwd=tmp_path, name="broker")
    wait_udp_listening(*BROKER, netns=ns, proc=broker)
    wait_tcp_listening(*BROKER, netns=ns, proc=broker)
    wait_for(lambda: len(_tree(broker.pid)) >= 3, 10, what="both broker workers", abort=broker.exit_reason)
    agent = ns.spawn([sys.executable, "-m", "sipmesh", "serve", "--server", f"{BROKER[0]}:{BROKER[1]}",
                      "--user", USER, "--sip-port", str(AGENT[1]), "--bind", AGENT[0], "-v", "--",
                      sys.executable, "-c", "import time; time.sleep(30)"],
                     log_path=tmp_path / "logs" / "agent.log", env=ENV, cwd=tmp_path, name="agent")
    wait_for(lambda: "ready: contact" in agent.log_text(), 15, what="agent registered",
             abort=lambda: agent.exit_reason() or broker.exit_reason())
    workers = _tree(broker.pid)
    rss_before = {"broker": _rss_mb(workers), "agent": _rss_mb([agent.pid])}

    result = ns.run([sys.executable, "-m", "tests.fuzz.live", "--broker", f"{BROKER[0]}:{BROKER[1]}",
                     "--agent", f"{AGENT[0]}:{AGENT[1]}", "--user", USER, "--datagrams", str(DATAGRAMS),
                     "--rate", str(RATE), "--seed", "4475"], timeout=120, env=ENV, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    rss_after = {"broker": _rss_mb(workers), "agent": _rss_mb([agent.pid])}

    logs = {"broker": broker.log_text(), "agent": agent.log_text()}
    assert broker.alive() and agent.alive(), (broker.log_tail(), agent.log_tail())
    assert _tree(broker.pid) == workers, f"a broker worker was replaced:\n{broker.log_tail(40)}"
    for name, text in logs.items():
        found = [e for e in ERRORS if e in text]
        assert not found, f"{name} log has {found}:\n" + text[text.find(found[0]) - 2000:][:6000]
    assert report["datagrams"] == DATAGRAMS
    unanswered = [p for p in report["probes"] if p["status"] is None or p["status"] >= 300]
    assert len(report["probes"]) == 4 * (DATAGRAMS // 100 + 2) and not unanswered, unanswered
    for name in ("broker", "agent"):
        assert report["slow_answered"][name] == 200, report
        assert report["huge_content_length_closed"][name], report
        assert report["many_headers_closed"][name], report
        assert report["tcp_probe"][name] == 200, report
        grown = rss_after[name] - rss_before[name]
        assert grown < RSS_GROWTH_MB, f"{name} RSS grew {grown:.1f} MB ({rss_before} -> {rss_after})"
    print(f"RSS MB before {rss_before}, after {rss_after}; UDP phase {report['udp_seconds']} s")
