#!/usr/bin/env python3
"""Throughput of `sipmesh broker` against Kamailio under the same SIPp load.

For each workload, and each server in turn (never both at once):

* reg      SIPp reg_noauth.xml: one REGISTER per call, users from an injection CSV
* digest   SIPp reg_auth.xml: REGISTER -> 401 -> REGISTER with MD5 digest -> 200
           (Kamailio: static digest, no DB; ours: the users file, MD5 offered)
* calls    SIPp uac_rr.xml -> server -> SIPp uas_rr.xml: INVITE/180/200/ACK/BYE/200,
           record-routed; the uas AOR registered first from the uas port

the script finds the *knee*: the highest offered rate at which a bounded SIPp run
is clean, meaning 0 failed calls and retransmissions under 0.1 % of the calls (rates
grow by --step until a run fails, then are bisected). It reads the server's CPU time (utime+stime of the server process
and its children, /proc/PID/stat) around every run and reports CPU-ms per operation
at the knee, then the ratios ours/Kamailio. Kamailio runs with 2 workers and
in-memory usrloc (tests/lab/kamailio.cfg); ours with --workers 2 (SO_REUSEPORT).

First it measures whether uvloop helps: CPU per REGISTER of one worker at a fixed
rate on each event loop.

    .venv/bin/python bench/broker_vs_kamailio.py [--duration 5] [--workers 2]
        [--only reg,digest,calls] [--servers sipmesh,kamailio] [--json out.json]

Every SIPp run is bounded in calls (rate x duration) and in time (duration + 20 s,
then killed). Everything listens on 127.0.0.1 only. Needs kamailio and sipp.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.lab: the Kamailio and SIPp harness
sys.path.insert(0, str(ROOT / "src"))

from tests.lab import (Kamailio, ManagedProcess, free_port, make_users, run_sipp,  # noqa: E402
                       sipp_args, spawn, start_sipp, wait_tcp_listening, wait_udp_listening)

TICK = os.sysconf("SC_CLK_TCK")
CALL_BEHAVIOURS = ["-default_behaviors", "all,-abortunexp"]
CLEAN_RETRANSMISSIONS = 0.001  # of the successful calls
# One SIPp socket stands for thousands of clients. With its default 64 KB buffer it drops
# answers that arrive together (ours come a group commit at a time; each real client would
# get its own on its own socket), and counts the retransmissions as the server's fault.
SIPP_BUFFER = ["-buff_size", str(4 << 20)]
WORKLOADS = ("reg", "digest", "calls")


# ----------------------------------------------------------------------------- CPU

def _stat(pid: int) -> tuple[int, int] | None:
    """(utime+stime ticks, ppid) of a process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(rest[11]) + int(rest[12]), int(rest[1])


def tree(root: int) -> list[int]:
    """`root` and its descendants."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                parents.setdefault(st[1], []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(parents.get(pid, []))
    return out


def cpu_ticks(pids: list[int]) -> int:
    return sum(st[0] for st in map(_stat, pids) if st is not None)


# ----------------------------------------------------------------------------- servers

class Server:
    name = "server"
    port: int
    pids: list[int]

    def start(self, *, auth: bool) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def alive(self) -> bool:
        raise NotImplementedError


class Ours(Server):
    name = "sipmesh"

    def __init__(self, workdir: Path, users: list[tuple[str, str]], workers: int, loop: str = "auto") -> None:
        self.workdir, self.users, self.workers, self.loop = workdir, users, workers, loop
        self.proc: ManagedProcess | None = None

    def start(self, *, auth: bool) -> None:
        self.port = free_port("both")
        run = self.workdir / f"sipmesh-{self.port}"
        run.mkdir(parents=True)
        argv = [sys.executable, "-m", "sipmesh", "broker", "--listen", f"127.0.0.1:{self.port}",
                "--domain", "127.0.0.1", "--db", str(run / "broker.db"), "--workers", str(self.workers),
                "--loop", self.loop, "--rate-limit", "0", "--log-level", "warning"]
        if auth:
            from sipmesh.broker.users import UsersFile

            users = UsersFile(run / "users")
            for user, password in self.users:
                users.add("127.0.0.1", user, password)
            users.save()
            argv += ["--users", str(run / "users"), "--auth-algorithms", "MD5"]  # SIPp knows MD5 only
        self.proc = spawn(argv, cwd=run, log_path=run / "broker.log", name=f"sipmesh:{self.port}")
        wait_udp_listening("127.0.0.1", self.port, proc=self.proc, timeout=20)
        wait_tcp_listening("127.0.0.1", self.port, proc=self.proc, timeout=20)
        time.sleep(0.5)  # every worker bound
        self.pids = tree(self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()


class Kam(Server):
    name = "kamailio"

    def __init__(self, workdir: Path, workers: int) -> None:
        self.workdir, self.workers = workdir, workers
        self.kam: Kamailio | None = None
        self.count = 0

    def start(self, *, auth: bool) -> None:
        self.count += 1
        self.kam = Kamailio(self.workdir / f"kamailio-{self.count}", auth="static" if auth else "none",
                            children=self.workers, shm_mb=256, pkg_mb=16)
        self.kam.start()
        self.port = self.kam.port
        self.pids = tree(self.kam.pid or self.kam.proc.pid)

    def stop(self) -> None:
        if self.kam is not None:
            self.kam.stop()

    def alive(self) -> bool:
        return self.kam is not None and self.kam.alive()


# ----------------------------------------------------------------------------- runs

@dataclass
class Run:
    rate: int
    ok: bool
    successful: int
    failed: int
    seconds: float
    cpu_ms_per_op: float | None
    retransmissions: int = 0
    note: str = ""


@dataclass
class Knee:
    server: str
    workload: str
    knee: int = 0
    cpu_ms_per_op: float | None = None
    runs: list[Run] = field(default_factory=list)


def _sipp_run(server: Server, workload: str, rate: int, args: argparse.Namespace, ctx: dict) -> Run:
    calls = max(1, int(rate * args.duration))
    tag = f"{server.name}-{workload}-{rate}-{int(time.time() * 1000) % 100000}"
    common = [*SIPP_BUFFER, "-recv_timeout", "10000", "-timeout", f"{int(args.duration + 15)}s"]
    if workload in ("reg", "digest"):
        scen = "reg_auth" if workload == "digest" else "reg_noauth"
        sipp = sipp_args(scen, f"127.0.0.1:{server.port}", local_port=ctx["reg_port"], calls=calls, rate=rate,
                         extra=["-inf", str(ctx["users"].users_csv), *common])
    else:
        sipp = sipp_args("uac_rr", f"127.0.0.1:{server.port}", local_port=free_port("udp"), calls=calls,
                         rate=rate, extra=["-s", "uas", *CALL_BEHAVIOURS, *common])
    before = cpu_ticks(server.pids)
    res = run_sipp(sipp, cwd=ctx["dir"], timeout=args.duration + 20, recv_timeout_ms=10_000, name=tag)
    used = cpu_ticks(server.pids) - before
    # "Clean" as in ../shared/TESTING.md's recipe: every call succeeded, and retransmissions
    # stayed under 0.1 % (more means answers came late or were lost: the server is past it)
    ok = res.returncode == 0 and not res.timed_out and res.failed == 0 and res.successful >= calls \
        and res.retransmissions <= CLEAN_RETRANSMISSIONS * res.successful
    per_op = (1000.0 * used / TICK / res.successful) if res.successful else None
    note = "" if ok else res.summary()
    return Run(rate, ok, res.successful, res.failed, res.duration, per_op, res.retransmissions, note)


def find_knee(server: Server, workload: str, args: argparse.Namespace, ctx: dict) -> Knee:
    out = Knee(server.name, workload)
    rate = args.start[workload]
    good, bad = 0, None
    for _ in range(args.max_runs):
        if bad is not None and (bad - good) <= max(50, good * 0.06):
            break
        if not server.alive():
            out.runs.append(Run(rate, False, 0, 0, 0.0, None, note="server died"))
            break
        run = _sipp_run(server, workload, rate, args, ctx)
        out.runs.append(run)
        print(f"  {server.name:8s} {workload:6s} {rate:6d}/s  {'ok  ' if run.ok else 'FAIL'} "
              f"successful={run.successful} failed={run.failed} retrans={run.retransmissions} "
              f"cpu/op={run.cpu_ms_per_op if run.cpu_ms_per_op is None else round(run.cpu_ms_per_op, 4)} ms",
              flush=True)
        if run.ok:
            good = rate
            out.knee, out.cpu_ms_per_op = rate, run.cpu_ms_per_op
        else:
            bad = rate
        time.sleep(args.pause)  # let retransmissions and the queues drain
        if bad is None:
            rate = int(rate * args.step)
            if rate > args.max_rate[workload]:
                break
        else:
            rate = int((good + bad) / 2)
            if good == 0:
                rate = max(50, bad // 2)
    return out


def bench_server(server: Server, workloads: list[str], args: argparse.Namespace, ctx: dict) -> list[Knee]:
    knees = []
    for workload in workloads:
        auth = workload == "digest"
        server.start(auth=auth)
        uas = None
        try:
            if workload == "calls":
                uas_port = free_port("both")
                reg = run_sipp(sipp_args("reg_noauth", f"127.0.0.1:{server.port}", local_port=uas_port, calls=1,
                                         extra=["-inf", str(ctx["users"].uas_csv)]),
                               cwd=ctx["dir"], timeout=20, name=f"reg-uas-{server.name}")
                if not reg.ok:
                    raise RuntimeError(f"registering the uas failed: {reg.summary()}")
                uas = start_sipp(sipp_args("uas_rr", local_port=uas_port, extra=[*SIPP_BUFFER, "-timeout", "3600s"]),
                                 cwd=ctx["dir"], name=f"uas-{server.name}", wait_bound=("127.0.0.1", uas_port))
            knees.append(find_knee(server, workload, args, ctx))
        finally:
            if uas is not None:
                uas.stop()
            server.stop()
            time.sleep(1)
    return knees


def loop_comparison(args: argparse.Namespace, ctx: dict) -> dict[str, float | None]:
    """CPU-ms per REGISTER of one worker at a fixed, comfortable rate, per event loop."""
    result: dict[str, float | None] = {}
    for loop in ("asyncio", "uvloop"):
        try:
            server = Ours(ctx["dir"], ctx["users"].users, workers=1, loop=loop)
            server.start(auth=False)
        except Exception as exc:  # noqa: BLE001 - uvloop may be missing
            print(f"  {loop}: cannot start ({exc})")
            result[loop] = None
            continue
        try:
            _sipp_run(server, "reg", args.loop_rate, args, ctx)  # warm-up: bindings exist afterwards
            runs = [_sipp_run(server, "reg", args.loop_rate, args, ctx) for _ in range(2)]
            values = [r.cpu_ms_per_op for r in runs if r.ok and r.cpu_ms_per_op]
            result[loop] = min(values) if values else None
            print(f"  {loop:8s} REGISTER at {args.loop_rate}/s, one worker: "
                  f"{result[loop] if result[loop] is None else round(result[loop], 4)} CPU-ms each", flush=True)
        finally:
            server.stop()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=5.0, help="seconds of load per SIPp run [5]")
    p.add_argument("--workers", type=int, default=2, help="workers of each server [2]")
    p.add_argument("--only", default=",".join(WORKLOADS), help="workloads: reg,digest,calls")
    p.add_argument("--servers", default="sipmesh,kamailio")
    p.add_argument("--step", type=float, default=1.5, help="rate growth factor while runs succeed [1.5]")
    p.add_argument("--max-runs", type=int, default=9, help="SIPp runs per server and workload [9]")
    p.add_argument("--pause", type=float, default=3.0, help="seconds between runs [3]")
    p.add_argument("--users", type=int, default=20000, help="users in the injection CSV [20000]")
    p.add_argument("--loop-rate", type=int, default=1500, help="REGISTER/s for the event-loop comparison")
    p.add_argument("--no-loop-comparison", action="store_true")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    args.only = [w for w in args.only.split(",") if w]
    args.start = {"reg": 2000, "digest": 1000, "calls": 200}
    args.max_rate = {"reg": 40000, "digest": 20000, "calls": 5000}
    for tool in ("sipp", "kamailio"):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            print(f"{tool} is not installed (apt-get install sip-tester kamailio)", file=sys.stderr)
            return 2
    workdir = Path(tempfile.mkdtemp(prefix="sipmesh-bench-"))
    # Every REGISTER run sends from the same port, as the users' phones would: a new port
    # per run would add a contact per user and run, and grow every 200 OK with them.
    ctx = {"dir": workdir / "sipp", "users": make_users(args.users, workdir / "sipp"),
           "reg_port": free_port("udp")}
    print(f"work directory {workdir}; {os.cpu_count()} CPUs; runs of {args.duration:g} s")
    report: dict = {"duration": args.duration, "workers": args.workers}
    if not args.no_loop_comparison and "sipmesh" in args.servers:
        print("event loop (sipmesh, 1 worker):")
        report["loops"] = loop_comparison(args, ctx)
    knees: list[Knee] = []
    servers: list[Server] = [Ours(workdir, ctx["users"].users, args.workers) if name == "sipmesh"
                             else Kam(workdir, args.workers) for name in args.servers.split(",")]
    # Workload by workload, both servers in turn: this machine's speed drifts over minutes,
    # so the two figures of a ratio are measured as close together as possible.
    for workload in args.only:
        for server in servers:
            print(f"{server.name} ({args.workers} workers), {workload}:")
            knees += bench_server(server, [workload], args, ctx)
    report["knees"] = [asdict(k) for k in knees]
    by = {(k.server, k.workload): k for k in knees}
    print()
    print(f"{'workload':8s} {'sipmesh knee':>13s} {'kamailio knee':>14s} {'ratio':>6s}   "
          f"{'sipmesh CPU-ms/op':>18s} {'kamailio CPU-ms/op':>19s} {'ratio':>6s}")
    unit = {"reg": "REGISTER/s", "digest": "reg/s", "calls": "calls/s"}
    ratios = {}
    for workload in args.only:
        ours, kam = by.get(("sipmesh", workload)), by.get(("kamailio", workload))
        knee_ratio = (ours.knee / kam.knee) if ours and kam and kam.knee else None
        cpu_ratio = (ours.cpu_ms_per_op / kam.cpu_ms_per_op) if ours and kam and ours.cpu_ms_per_op \
            and kam.cpu_ms_per_op else None
        ratios[workload] = {"knee": knee_ratio, "cpu": cpu_ratio}

        def fmt(value, digits=4):
            return "-" if value is None else f"{value:.{digits}f}"

        print(f"{workload:8s} {ours.knee if ours else '-':>8} {unit[workload]:>4s} "
              f"{kam.knee if kam else '-':>9} {'':>4s} {fmt(knee_ratio, 2):>6s}   "
              f"{fmt(ours.cpu_ms_per_op if ours else None):>18s} {fmt(kam.cpu_ms_per_op if kam else None):>19s} "
              f"{fmt(cpu_ratio, 1):>6s}")
    report["ratios"] = ratios
    if "loops" in report:
        loops = report["loops"]
        if loops.get("asyncio") and loops.get("uvloop"):
            print(f"\nuvloop vs asyncio, CPU per REGISTER: {loops['uvloop'] / loops['asyncio']:.2f}x "
                  f"({'uvloop helps: used when installed' if loops['uvloop'] < loops['asyncio'] else 'no gain'})")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
