#!/usr/bin/env python3
"""One `sipmesh daemon` with 1,000 concurrent sessions: setup rate, memory, teardown.

Three processes on loopback: `sipmesh broker` (one worker, no rate limit), `sipmesh
daemon` with one exec service whose program is /bin/sleep (a trivial child), and this
script as the caller: one UserAgent that INVITEs the daemon's user N times with
a=service:sleep, at most --window INVITEs in flight, as fast as they are answered.

Measured:
* setup: from the first INVITE to the moment the daemon reports all N sessions
  established (their children started and the ACKs received) -> sessions/s;
* memory: the daemon's own VmRSS (its children are other processes) after a warm-up
  of --warmup sessions that were set up and torn down, and again with N sessions
  running -> (after - before) / N = RSS per session;
* teardown: the caller BYEs every session at once; from the first BYE until the daemon
  reports no session, no allocated port and no child left.

    .venv/bin/python bench/daemon_scale.py [--sessions 1000] [--window 50]

Everything listens on 127.0.0.1 only; every wait is bounded; all three processes
are stopped at the end, also on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
BIN = Path(sys.executable).parent
SIPMESH = str(BIN / "sipmesh")

CONFIG = '''
[agent]
server = "127.0.0.1:{broker}"
user = "scale"
bind = "127.0.0.1"
advertise = "127.0.0.1"
max_sessions = {limit}
grace = 5
control_socket = "{sock}"

[allocators.tcp]
type = "ports"
range = "{first}-{last}"

[[service]]
name = "sleep"
allow = ["*"]
max_sessions = {limit}
answer.command = ["/bin/sleep", "3600"]
[service.params.PORT]
type = "port"
from = "allocator"
allocator = "tcp"
'''


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> int:
    try:
        return len(Path(f"/proc/{pid}/task/{pid}/children").read_text().split())
    except OSError:
        return -1


def status(sock: Path) -> dict:
    from sipmesh.daemon.control import query

    return query(sock, {"command": "status"}, timeout=30)


async def wait_status(sock: Path, predicate, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        state = await asyncio.to_thread(status, sock)
        if predicate(state):
            return state
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}: {len(state['sessions'])} sessions")
        await asyncio.sleep(0.05)


def wait_listening(path: Path, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the daemon did not start (exit {proc.poll()})")
        time.sleep(0.05)


async def run(args: argparse.Namespace, work: Path) -> dict:
    from sipmesh.agent.attributes import build_sdp
    from sipmesh.sip.ua import UAConfig, UserAgent

    broker_port = free_port()
    sock = work / "daemon.sock"
    first = 40000
    (work / "daemon.toml").write_text(CONFIG.format(
        broker=broker_port, limit=args.sessions + args.warmup + 10, sock=sock, first=first,
        last=first + args.sessions + args.warmup + 500))
    procs: list[subprocess.Popen] = []
    try:
        procs.append(subprocess.Popen(
            [SIPMESH, "broker", "--listen", f"127.0.0.1:{broker_port}", "--db",
             str(work / "broker.db"), "--workers", "1", "--rate-limit", "0",
             "--no-load-shedding", "--domain", "127.0.0.1", "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=open(work / "broker.log", "wb"),
            start_new_session=True))
        time.sleep(0.5)
        profile = ["-m", "cProfile", "-o", str(args.profile)] if args.profile else []
        daemon = subprocess.Popen([sys.executable, *profile, "-m", "sipmesh.cli.main", "daemon",
                                   "-c", str(work / "daemon.toml"), "-q"],
                                  stdout=subprocess.DEVNULL,
                                  stderr=open(work / "daemon.log", "wb"), start_new_session=True)
        procs.append(daemon)
        wait_listening(sock, daemon)
        await wait_status(sock, lambda s: s["registrations"][0]["state"] == "registered", 20,
                          "the registration")

        ua = UserAgent(UAConfig(user="bench", domain=f"127.0.0.1:{broker_port}",
                                listen_host="127.0.0.1", listen_port=0,
                                transports=("UDP",)))
        await ua.start()
        sdp = build_sdp(username="bench", address="127.0.0.1", media="application",
                        proto="sipmesh", port=9, attributes={"IP4": "127.0.0.1",
                                                             "service": "sleep"})
        window = asyncio.Semaphore(args.window)

        async def invite():
            async with window:
                return await ua.invite("scale", sdp, timeout=60)

        async def batch(n: int) -> tuple[list, float]:
            started = time.monotonic()
            calls = await asyncio.gather(*(invite() for _ in range(n)), return_exceptions=True)
            failed = [c for c in calls if isinstance(c, BaseException)]
            if failed:
                raise RuntimeError(f"{len(failed)} of {n} INVITEs failed, e.g. {failed[0]!r}")
            await wait_status(sock, lambda s: len(s["sessions"]) == n and
                              all(x["state"] == "established" for x in s["sessions"]),
                              120, f"{n} established sessions")
            return calls, time.monotonic() - started

        async def teardown(calls: list) -> float:
            started = time.monotonic()
            await asyncio.gather(*(c.bye() for c in calls))
            await wait_status(sock, lambda s: not s["sessions"] and not s["allocated"]["ports"],
                              120, "every session to end")
            deadline = time.monotonic() + 60
            while children(daemon.pid) > 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            return time.monotonic() - started

        if args.warmup:
            calls, _ = await batch(args.warmup)
            await teardown(calls)
        await asyncio.sleep(1)
        rss_before = rss_kib(daemon.pid)
        cpu_before = [cpu_s(p.pid) for p in procs] + [time.process_time()]
        calls, setup = await batch(args.sessions)
        cpu = [cpu_s(p.pid) for p in procs] + [time.process_time()]
        cpu = [after - before for after, before in zip(cpu, cpu_before)]
        rss_after = rss_kib(daemon.pid)
        running = children(daemon.pid)
        teardown_time = await teardown(calls)
        left = children(daemon.pid)
        await ua.stop()
        return {"sessions": args.sessions, "window": args.window, "setup_s": setup,
                "sessions_per_s": args.sessions / setup, "rss_before_kib": rss_before,
                "rss_after_kib": rss_after,
                "rss_per_session_kib": (rss_after - rss_before) / args.sessions,
                "children_running": running,
                "cpu_ms_per_session": {name: 1000 * c / args.sessions for name, c in
                                       zip(("broker", "daemon", "caller"), cpu)}, "teardown_s": teardown_time,
                "children_left": left}
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--window", type=int, default=50, help="INVITEs in flight at most")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--profile", metavar="FILE", type=Path,
                        help="run the daemon under cProfile, statistics to FILE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sipmesh-scale-") as tmp:
        result = asyncio.run(run(args, Path(tmp)))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['sessions']} concurrent sessions on one daemon (trivial child: /bin/sleep), "
          f"through the broker on loopback, <= {result['window']} INVITEs in flight")
    print(f"  setup:     {result['setup_s']:.2f} s  ->  {result['sessions_per_s']:.0f} sessions/s "
          f"(first INVITE to all established, children started)")
    print("  CPU per session set up: " + ", ".join(
        f"{name} {ms:.2f} ms" for name, ms in result["cpu_ms_per_session"].items()))
    print(f"  memory:    daemon VmRSS {result['rss_before_kib'] / 1024:.1f} MiB -> "
          f"{result['rss_after_kib'] / 1024:.1f} MiB  ->  "
          f"{result['rss_per_session_kib']:.1f} KiB per session (target < 64 KiB; "
          f"children excluded, {result['children_running']} running)")
    print(f"  teardown:  {result['teardown_s']:.2f} s (BYE to all gone; children left: "
          f"{result['children_left']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
