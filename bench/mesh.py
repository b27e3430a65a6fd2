#!/usr/bin/env python3
"""A full mesh of N members, sipmesh against Nebula, on the NAT lab. Prints one table.

The lab (src/sipmesh/lab/topology.py): an internet bridge with our site (natsite.py: `sipmesh
broker` with network ``bench``, the network's coturn) and a Nebula lighthouse; N member hosts
spread over the router kinds in turn: public, home (endpoint-independent NAT, port-restricted
filter), symmetric (MASQUERADE --random-fully), each behind a router of its own.

Per N (2, 5, 10 by default), per system, cold (routers' conntrack flushed): every member is
started at once (`sipmesh up bench` with the network's TURN server; or `nebula` with the
configuration of bench/nat.py: one lighthouse, punchy, no relays), and every pair (x, y) is probed
from x to y's mesh address with ICMP echoes every 20 ms (one prober per member for all its
pairs; send errors while the interface or the peer is missing are ignored) until the first
reply. FULL MESH is the time from starting the LAST member to the
last pair's first reply; a pair that has no reply within --bound seconds is unconnected
(Nebula without relays cannot connect two symmetric NATs: reported, not hidden). Then, at
idle (--idle seconds after the mesh, nothing sent), each member's resident memory and CPU
time over --idle seconds, summed over its process group (`sipmesh up` with its wireguard-go;
nebula alone), median over the members.

    .venv/bin/python bench/mesh.py [--sizes 2,5,10] [--bound 20] [--idle 5] [--logs DIR]

sipmesh's modules are byte-compiled first (compile_sipmesh), as a package installed from a
wheel is: the members' start-up is then what a user's is.

Needs root, nebula, nebula-cert, coturn, wireguard-go, wg. Traffic stays in the namespaces it
creates; everything is removed at the end. Target (issue 12): a 10-member full mesh in under
2 s after the last join, no slower than Nebula, every pair connected.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.lab: the NAT lab; bench.nat: Nebula's setup
sys.path.insert(0, str(ROOT / "src"))

from bench import nat  # noqa: E402
from bench.nat import Nebula, flush_conntrack, say  # noqa: E402
from tests.lab import NatLab, wait_for  # noqa: E402
from sipmesh.lab.natsite import NatSite  # noqa: E402

KINDS = ("public", "home", "symmetric")
NETWORK, POOL = "bench", "100.64.0.0/24"


def members(n: int) -> dict[str, str]:
    """Host name -> router kind of n members, the kinds in turn."""
    return {f"m{i}": KINDS[i % len(KINDS)] for i in range(n)}


# Run in a member's namespace: ICMP echo to every target every 20 ms (send errors, e.g. no
# interface or no WireGuard peer yet, are ignored) until each answered or the deadline;
# prints {target: wall-clock time of its first reply}.
PROBE = r"""
import json, os, select, socket, struct, sys, time
deadline, targets = float(sys.argv[1]), sys.argv[2:]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
ident, seq, first = os.getpid() & 0xFFFF, 0, {}
def checksum(b):
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    t = (t >> 16) + (t & 0xFFFF)
    return ~(t + (t >> 16)) & 0xFFFF
while time.time() < deadline and len(first) < len(targets):
    seq = (seq + 1) & 0xFFFF
    for ip in targets:
        if ip not in first:
            head = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"sipmesh-bench..."
            packet = head[:2] + struct.pack("!H", checksum(head)) + head[4:]
            try:
                s.sendto(packet, (ip, 0))
            except OSError:
                pass
    until = time.time() + 0.02
    while (left := until - time.time()) > 0:
        if not select.select([s], [], [], left)[0]:
            break
        data, (src, _) = s.recvfrom(2048)
        icmp = data[(data[0] & 0x0F) * 4:]
        if icmp[0] == 0 and struct.unpack("!H", icmp[4:6])[0] == ident and src in targets:
            first.setdefault(src, time.time())
print(json.dumps(first))
"""


def full_mesh(lab: NatLab, hosts: list[str], ips: dict[str, str], bound: float) -> dict:
    """(x, y) -> the wall-clock time of the first reply from y to x, for the pairs that got
    one (x before y in `hosts`; an echo reply proves the path both ways)."""
    deadline = time.time() + bound
    probes = {x: lab[x].popen([sys.executable, "-c", PROBE, str(deadline),
                               *(ips[y] for y in hosts[i + 1:])],
                              stdout=subprocess.PIPE, text=True)
              for i, x in enumerate(hosts[:-1])}
    by_ip = {ips[h]: h for h in hosts}
    replies = {}
    for x, probe in probes.items():
        out, _ = probe.communicate(timeout=bound + 30)
        for ip, when in json.loads(out or "{}").items():
            replies[(x, by_ip[ip])] = when
    return replies


def group_usage(pgid: int) -> tuple[int, float]:
    """(resident kB, CPU seconds so far) of the processes in process group `pgid`."""
    rss, cpu = 0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[2]) != pgid:
                continue
            cpu += (int(fields[11]) + int(fields[12])) / tick
            status = Path(f"/proc/{entry}/status").read_text()
            m = re.search(r"^VmRSS:\s+(\d+)", status, re.M)
            rss += int(m.group(1)) if m else 0
        except (OSError, ValueError):
            continue
    return rss, cpu


def idle_usage(procs: list, idle: float) -> tuple[float, float]:
    """Median per member: (MiB resident, CPU % of one core over `idle` seconds)."""
    time.sleep(idle)   # settle after the mesh
    before = [group_usage(p.pid) for p in procs]
    time.sleep(idle)
    after = [group_usage(p.pid) for p in procs]
    mib = statistics.median(a[0] for a in after) / 1024
    cpu = statistics.median((a[1] - b[1]) / idle * 100 for a, b in zip(after, before))
    return mib, cpu


def result(started_last: float, replies: dict, pairs: int, usage: tuple[float, float]) -> dict:
    connected = len(replies)
    last = max(replies.values()) - started_last if replies else None
    slow = sorted(replies, key=replies.get)[-3:]   # the slowest pairs, for the log
    say("  slowest pairs: " + ", ".join(f"{x}-{y} {replies[(x, y)] - started_last:.2f} s"
                                        for x, y in slow))
    return {"connected": f"{connected}/{pairs}", "full": connected == pairs,
            "time": last, "mib": usage[0], "cpu": usage[1], "failed": []}


# "2026-12-06 05:31:17,363 INFO    sipmesh.apps.mesh: network bench: smm800bef up, 100.64.0.5"
IFACE_UP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) INFO +sipmesh\.apps\.mesh: "
                      r"network \S+: \S+ up, ", re.M)


def interface_up(log: str) -> float | None:
    """When a member's latest `sipmesh up` had its interface (its log's last such line)."""
    found = IFACE_UP.findall(log)
    if not found:
        return None
    day, ms = found[-1]
    return time.mktime(time.strptime(day, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000


def run_sipmesh(lab: NatLab, site: NatSite, hosts: list[str], args) -> dict:
    pool = ipaddress.ip_network(POOL)
    ips = {h: str(pool[i + 1]) for i, h in enumerate(hosts)}   # members add: lowest free first
    flush_conntrack(lab, *hosts)
    started = []
    up = []
    for h in hosts:
        started.append(time.time())
        up.append(site.member(h, h, NETWORK))
    replies = full_mesh(lab, hosts, ips, args.bound)
    failed = []   # members that did not come up (or not at the expected address): why
    for h, member in zip(hosts, up):
        try:
            ip = member.mesh_ip() if member.proc.alive else None
        except OSError as exc:
            ip = f"status: {exc}"
        if ip != ips[h]:
            failed.append(f"{h}: {member.proc.log_tail(1).strip() if ip is None else ip}")
    usage = idle_usage([m.proc for m in up], args.idle)
    for member in up:
        member.sipmesh("down", NETWORK, timeout=30)
        member.proc.stop(grace=10)
    n = len(hosts)
    ready = [interface_up(m.proc.log_text()) for m in up]
    out = {**result(started[-1], replies, n * (n - 1) // 2, usage), "failed": failed}
    if replies and None not in ready:   # from the last member's interface: startup left out
        out["ready"] = max(replies.values()) - max(ready)
    if None not in ready:               # start-up: the slowest member's exec to its interface
        out["start"] = max(r - s for r, s in zip(ready, started))
    return out


def run_nebula(lab: NatLab, nebula: Nebula, hosts: list[str], work: Path, args) -> dict:
    flush_conntrack(lab, *hosts)
    started, procs = [], []
    for h in hosts:
        started.append(time.time())
        procs.append(lab.spawn(h, ["nebula", "-config", nebula.config(h)],
                               log_path=work / f"nebula-{h}.log", name=f"nebula-{h}"))
    try:
        replies = full_mesh(lab, hosts, nat.NEBULA_IP, args.bound)
        usage = idle_usage(procs, args.idle)
    finally:
        for proc in procs:
            proc.stop(grace=3)
    n = len(hosts)
    return result(started[-1], replies, n * (n - 1) // 2, usage)


def compile_sipmesh() -> None:
    """Byte-compile the sipmesh the members run, as installing it does: an editable install
    (or PYTHONDONTWRITEBYTECODE, set on some machines) compiles every module at every start,
    two thirds of `sipmesh up`'s start-up CPU, which a user's installed copy never pays."""
    subprocess.run([sys.executable, "-c", "import compileall, os, sipmesh; "
                    "compileall.compile_dir(os.path.dirname(sipmesh.__file__), quiet=1)"],
                   check=True, env={k: v for k, v in os.environ.items()
                                    if k != "PYTHONDONTWRITEBYTECODE"})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="2,5,10", help="member counts (default 2,5,10)")
    parser.add_argument("--bound", type=float, default=20.0,
                        help="seconds a pair may take before it counts as unconnected")
    parser.add_argument("--idle", type=float, default=5.0,
                        help="seconds to settle, then seconds of CPU measured at idle")
    parser.add_argument("--logs", metavar="DIR", type=Path, help="keep the logs there")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    began = time.monotonic()
    compile_sipmesh()
    everyone = members(max(sizes))
    # Nebula's addresses and certificates (bench/nat.py), for the lighthouse and our members
    nat.NEBULA_IP.clear()
    nat.NEBULA_IP.update({"light": "10.200.0.1",
                          **{h: f"10.200.0.{10 + i}" for i, h in enumerate(everyone)}})
    rows = []
    with tempfile.TemporaryDirectory(prefix="sipmesh-mesh-") as tmp, NatLab() as lab:
        work = args.logs or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        lab.add_hosts({"broker": "public", "light": "public", **everyone})
        site = NatSite(lab, work, [], networks={NETWORK: (POOL, list(everyone))}).start()
        Nebula.certificates(work)
        nebula = Nebula(lab, work, relays=False)
        try:
            for n in sizes:
                hosts = list(everyone)[:n]
                ours = run_sipmesh(lab, site, hosts, args)
                say(f"sipmesh N={n}: {ours}")
                theirs = run_nebula(lab, nebula, hosts, work, args)
                say(f"nebula  N={n}: {theirs}")
                rows.append((n, ours, theirs))
        finally:
            nebula.stop()
            site.stop()
    report(rows, args, time.monotonic() - began)
    return 0


def report(rows: list, args, elapsed: float) -> None:
    def when(r: dict) -> str:
        return "-" if r["time"] is None else f"{r['time']:.2f} s"

    header = ["N", "SIPMESH: PAIRS", "FULL MESH", "FROM LAST IFACE", "START", "MIB", "CPU %",
              "NEBULA: PAIRS", "FULL MESH", "MIB", "CPU %"]
    table = [header]
    for n, s, b in rows:
        ready = "-" if s.get("ready") is None else f"{s['ready']:.2f} s"
        start = "-" if s.get("start") is None else f"{s['start']:.2f} s"
        table.append([str(n), s["connected"], when(s) if s["full"] else f"({when(s)})", ready,
                      start,
                      f"{s['mib']:.0f}", f"{s['cpu']:.1f}", b["connected"],
                      when(b) if b["full"] else f"({when(b)})", f"{b['mib']:.0f}",
                      f"{b['cpu']:.1f}"])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    failed = [f"N={n} {system}: {why}" for n, s, b in rows
              for system, r in (("sipmesh", s), ("nebula", b)) for why in r["failed"]]
    print(f"NAT lab, members public/home/symmetric in turn, cold start, {elapsed:.0f} s in all")
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    print(f"PAIRS: pairs with a ping reply within {args.bound:.0f} s; FULL MESH: from starting "
          "the last member to the last pair's first reply (in brackets: to the last pair that "
          "connected, the mesh was not full)")
    print("FROM LAST IFACE: sipmesh, from the moment the last member's interface was up (its "
          "log; Python start, registration and roster left out) to the last pair's reply")
    print("START: sipmesh, the slowest member's start-up, from its exec to its interface up "
          "(Python start, registration, roster, wireguard-go)")
    print(f"MIB, CPU %: per member at idle (median; process group: sipmesh up + wireguard-go, "
          f"or nebula), CPU over {args.idle:.0f} s")
    for line in failed:
        print(f"did not come up: {line}"[:240])
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
          "(shared machine: the figures are indicative)")


if __name__ == "__main__":
    sys.exit(main())
