#!/usr/bin/env python3
"""Broker failover: the time from SIGKILL of the broker an agent uses to its next
successful new session through the other one (issue 13), for --runs runs.

The lab is tests/lab/srvlab.py: two `sipmesh broker`s serving example.test, found by DNS
SRV (dnsmasq; b1 priority 10, b2 priority 20), in a namespace with only `lo`. A `sipmesh
serve 2500 --server example.test` registers at both. Each run:

* baseline: both brokers up, `sipmesh call 2500 --server example.test` is started; the
  time from its start to the session (both programs running) is the cost of a new session
  when nothing failed (process start, REGISTER, INVITE, ICE, the programs);
* failover, caller unaware: b1 (the first by priority, where every new request goes
  first) is SIGKILLed and `sipmesh call --no-register` started at once: it knows nothing
  of the loss, as a long-running agent that registered before it does not; its INVITE
  meets b1's silence for UAConfig.failover_wait (2 s), then goes to b2. The time from
  the SIGKILL to the session;
* failover, caller registering: the same with a caller that registers first (at both, at
  once): b1's REGISTER goes unanswered while b2 accepts, so b1 comes last and the INVITE
  goes to b2 at once.
  After each, b1 is started again on its database.

The difference of the medians is what losing a broker costs a new session. No other
system is timed here: the issue names no anchor figure (its bound is ours, documented in
docs/broker.md); the floor is UAConfig.failover_wait (2 s), the silence after which the
agent gives up on a server that does not answer at all (a SIGKILLed broker sends no ICMP
when its host lives on: on a real network it does not even do that).

    .venv/bin/python bench/failover.py [--runs 10] [--logs DIR]

Needs root (a namespace) and dnsmasq. Figures measured on a shared machine are indicative.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.lab: the SRV lab
sys.path.insert(0, str(ROOT / "src"))

from tests.lab import NetnsFactory, dnsmasq_unavailable_reason, free_port, spawn, wait_for  # noqa: E402
from tests.lab.agents import agent_argv, app_argv, record, wait_ready  # noqa: E402
from tests.lab.srvlab import DOMAIN, SrvLab  # noqa: E402


REGISTERING = ("--register-timeout", "2")


class Bench:
    def __init__(self, lab: SrvLab, work: Path) -> None:
        self.lab = lab
        self.work = work
        self.calls = 0
        self.serve = spawn(agent_argv("serve", DOMAIN, "2500", "--state-dir", str(work / "state"),
                                      "--app-port", str(free_port()),
                                      program=app_argv(work, "run")),
                           log_path=work / "logs" / "serve.log", netns=lab.ns, name="serve")
        wait_ready(self.serve)
        wait_for(lambda: all(b.registered("2500") for b in lab.brokers.values()), 10,
                 what="2500 registered at both brokers", abort=self.serve.exit_reason)

    def call(self, since: float, *options: str) -> float:
        """A new session from a new `sipmesh call`: seconds from `since` to both programs
        running; then the session ends and the serve agent is free again."""
        for name in ("client.json", "server.json"):
            (self.work / name).unlink(missing_ok=True)
        self.calls += 1
        ended = self.serve.log_text().count("serve: session ended")
        proc = spawn(agent_argv("call", DOMAIN, f"26{self.calls:02d}", *options, target="2500",
                                program=app_argv(self.work, "exit", 0.2)),
                     log_path=self.work / "logs" / f"call{self.calls}.log", netns=self.lab.ns,
                     name=f"call{self.calls}")
        try:
            wait_for(lambda: record(self.work, "client") and record(self.work, "server"), 30,
                     0.005, what="the session", abort=proc.exit_reason)
            elapsed = time.monotonic() - since
            proc.wait(15)
            wait_for(lambda: self.serve.log_text().count("serve: session ended") > ended, 10,
                     what="the serve agent's session to end")
        finally:
            proc.stop()
        return elapsed

    def run(self) -> tuple[float, float, float]:
        baseline = self.call(time.monotonic(), *REGISTERING)
        unaware = self.call(self.lab.kill("b1"), "--no-register")
        self.lab.restart("b1")
        registering = self.call(self.lab.kill("b1"), *REGISTERING)
        self.lab.restart("b1")
        return baseline, unaware, registering

    def close(self) -> None:
        self.serve.stop(grace=10)


def summary(name: str, values: list[float]) -> str:
    if not values:
        return name
    return (f"{name:<46} {min(values):6.2f} {statistics.median(values):7.2f} "
            f"{max(values):6.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="runs (default 10, at most 50)")
    parser.add_argument("--logs", type=Path, help="keep the logs in this directory")
    args = parser.parse_args()
    reason = dnsmasq_unavailable_reason()
    if reason:
        print(f"failover: {reason}", file=sys.stderr)
        return 2
    runs = max(1, min(args.runs, 50))
    work = args.logs or Path(tempfile.mkdtemp(prefix="sipmesh-failover-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[float, float, float]] = []
    with NetnsFactory() as factory:
        lab = SrvLab(factory, work / "lab")
        try:
            bench = Bench(lab, work)
            try:
                for n in range(1, runs + 1):
                    rows.append(bench.run())
                    print(f"run {n:2d}: " + ", ".join(f"{v:5.2f} s" for v in rows[-1]), flush=True)
            finally:
                bench.close()
        finally:
            lab.close()
    baselines, unaware, registering = (list(column) for column in zip(*rows))
    print(f"\n{runs} runs, seconds                                 min  median    max")
    print(summary("new session, both brokers up", baselines))
    print(summary("b1 SIGKILLed -> session via b2:", []))
    print(summary("  caller unaware (--no-register)", unaware))
    print(summary("  caller registering first", registering))
    for name, values in (("unaware", unaware), ("registering", registering)):
        print(f"failover cost, {name} (difference of medians): "
              f"{statistics.median(values) - statistics.median(baselines):.2f} s")
    print(f"logs: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
