#!/usr/bin/env python3
"""WireGuard sessions through sipmesh on the NAT lab: time to the first ping, and iperf3
throughput against the same wireguard-go pair configured by hand on the same path.

The lab (src/sipmesh/lab/topology.py, src/sipmesh/lab/natsite.py): our broker (SIP + STUN on 5060) and
coturn on the internet bridge, home hosts a and b, symmetric host s. Each trial is a real
session: `sipmesh daemon` with a wireguard service on the callee, `sipmesh call CALLEE
--service vpn` on the caller. Reported:

* first ping: from starting `sipmesh call` to the first ping reply through the tunnel
  (median of --trials), and the part of it after the caller's tunnel was up: the handshake
  wait, where a first handshake lost to a peer not yet listening would cost WireGuard's
  5 s retry;
* throughput, iperf3 TCP for --iperf-seconds, caller -> callee: wireguard-go by hand
  between a and b (each side's endpoint the other's router, both keepalive: the holes
  punch), sipmesh's direct a -> b session, and sipmesh's relayed s -> a session (coturn).
  Targets (issue 11): direct >= 0.95 x by hand; relayed >= 0.5 x direct.

    .venv/bin/python bench/tunnels.py [--trials 10] [--iperf-seconds 5] [--logs DIR]

bench/nat.py calls `tunnel_figures(lab, site, work, ...)` on its own lab (hosts a, b, s
and a started NatSite). Needs root, wireguard-go, wg, iperf3, coturn. Traffic stays inside
the namespaces; everything is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.lab: the NAT lab, the site
sys.path.insert(0, str(ROOT / "src"))

from sipmesh.apps.wireguard import interface_name, keypair  # noqa: E402
from tests.lab import ManagedProcess, NatLab, wait_for, wait_tcp_listening  # noqa: E402
from sipmesh.lab.natsite import NatSite, tunnel_services  # noqa: E402

HOSTS = {"broker": "public", "a": "home", "b": "home", "s": "symmetric"}
USERS = ["a", "b", "ac", "sc"]
POOLS = {"a": "10.96.0.0/24", "b": "10.97.0.0/24"}
DIRECT, RELAYED = ("a", "b"), ("s", "a")


# ---------------------------------------------------------------------------- sessions


class Sessions:
    """Daemons started on demand on callees (user: the host's name, tunnel addresses from
    `pools`, a /24 per callee); one WireGuard session at a time."""

    def __init__(self, site: NatSite, pools: dict[str, str] = POOLS) -> None:
        self.site = site
        self.pools = pools
        self.daemons: dict[str, ManagedProcess] = {}

    @contextmanager
    def wireguard(self, caller: str, callee: str) -> Iterator[dict]:
        """A session caller -> callee, yielded once the caller's tunnel is up:
        {"address": the callee's tunnel address, "started": time.monotonic() of the call,
        "up": s from then to the caller's tunnel up, "call": the caller's process}."""
        site, lab = self.site, self.site.lab
        if callee not in self.daemons:
            self.daemons[callee] = site.daemon(callee, tunnel_services(self.pools[callee]))
        started = time.monotonic()
        call = site.call(caller, f"{caller}c", callee, "--service", "vpn",
                         services=tunnel_services("10.98.0.0/24"))
        try:
            found = wait_for(lambda: UP.search(call.log_text()), 30, 0.005,
                             what="the caller's tunnel", abort=call.exit_reason)
            yield {"address": found.group(2), "started": started,
                   "up": time.monotonic() - started, "call": call}
        finally:
            call.stop(grace=10)
            wait_for(lambda: not _links(lab[caller]) and not _links(lab[callee]), 15,
                     what="both tunnel interfaces gone")

    def path(self, callee: str) -> str:
        """The path of `callee`'s session (once its tunnel is up), from `sipmesh status`."""
        def up() -> str | None:
            for session in self.site.status(callee)["sessions"]:
                path = session.get("path") or {}
                address = session["allocated"]["addresses"][0]
                if path.get("program") and f" {address} " in self.site.lab[callee].run(
                        ["ip", "-o", "addr"]).stdout:
                    return path["kind"]
            return None
        return wait_for(up, 20, what=f"{callee}'s tunnel up")


# the tunnel program's line once its interface is up (apps/wireguard.py)
UP = re.compile(r"wireguard: smwg\w+ up, (\S+) <-> (\S+)")


def _links(host) -> list[str]:
    return re.findall(r"^\d+: (smwg\w*|bnwg\w*)", host.run(["ip", "-o", "link"]).stdout, re.M)


def first_ping(lab: NatLab, host: str, address: str, deadline: float = 20) -> float | None:
    """Seconds until the first ping reply from `address` (None: none within `deadline`)."""
    begin = time.monotonic()
    out = lab.run(host, ["ping", "-c", "1", "-i", "0.05", "-w", str(int(deadline)), address],
                  check=False, timeout=deadline + 10)
    return time.monotonic() - begin if out.returncode == 0 else None


def iperf(lab: NatLab, client: str, server: str, address: str, seconds: int, work: Path) -> float:
    """iperf3 TCP Mbit/s from `client` to `address` (an address of `server`)."""
    proc = lab.spawn(server, ["iperf3", "-s", "-1", "-B", address],
                     log_path=work / f"iperf3-{server}.log", name="iperf3-server")
    try:
        wait_tcp_listening(address, 5201, lab[server].ns, 10, proc=proc)
        out = lab.run(client, ["iperf3", "-c", address, "-t", str(seconds), "-J"],
                      timeout=seconds + 30)
        return json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"] / 1e6
    finally:
        proc.stop(grace=3)


@contextmanager
def wireguard_by_hand(lab: NatLab, x: str, y: str, work: Path) -> Iterator[str]:
    """wireguard-go between x and y configured by hand on their routers' public addresses
    (the same direct path a sipmesh session takes); yields y's tunnel address."""
    sides = {x: ("10.201.0.1", 51830), y: ("10.201.0.2", 51831)}
    keys = {h: keypair() for h in sides}
    names = {h: interface_name("bnwg") for h in sides}
    procs = {}
    try:
        for host in sides:
            procs[host] = lab.spawn(host, ["wireguard-go", "-f", names[host]],
                                    log_path=work / f"wg-{host}.log", name=f"wg-{host}",
                                    env=dict(os.environ, WG_PROCESS_FOREGROUND="1"))
        for host, (address, port) in sides.items():
            peer = y if host == x else x
            wait_for(lambda: lab.run(host, ["wg", "show", names[host]], check=False)
                     .returncode == 0, 30, 0.02, what=f"wireguard-go on {host}",
                     abort=procs[host].exit_reason)
            lab.run(host, ["wg", "set", names[host], "private-key", "/dev/stdin", "listen-port",
                           str(port), "peer", keys[peer][1], "allowed-ips",
                           f"{sides[peer][0]}/32", "endpoint",
                           f"{lab[peer].public_ip}:{sides[peer][1]}", "persistent-keepalive",
                           "15"], input=keys[host][0].decode())
            lab.run(host, ["ip", "address", "add", f"{address}/24", "dev", names[host]])
            lab.run(host, ["ip", "link", "set", names[host], "mtu", "1420", "up"])
        if first_ping(lab, x, sides[y][0]) is None:
            raise RuntimeError("no ping through the hand-made WireGuard tunnel")
        yield sides[y][0]
    finally:
        for proc in procs.values():
            proc.stop(grace=3)


# ---------------------------------------------------------------------------- figures


def tunnel_figures(lab: NatLab, site: NatSite, work: Path, *, trials: int = 10,
                   rounds: int = 3, seconds: int = 5, log=None) -> dict:
    """The measurements of this module on a lab with hosts a, b (home) and s (symmetric)
    and a started site whose users include a, b, ac and sc."""
    sessions = Sessions(site)
    figures: dict = {"first_ping": [], "handshake": [], "paths": []}
    for n in range(trials):
        with sessions.wireguard(*DIRECT) as session:
            ping = first_ping(lab, DIRECT[0], session["address"])
            if ping is not None:
                figures["handshake"].append(ping)
                figures["first_ping"].append(time.monotonic() - session["started"])
            figures["paths"].append(sessions.path(DIRECT[1]))
        if log:
            log(f"trial {n + 1}/{trials}: call -> tunnel up {session['up']:.2f} s, "
                f"-> first ping {figures['first_ping'][-1] if ping is not None else 'none'}")
    for key in ("by_hand", "direct", "relayed", "proxy_cpu"):
        figures[key] = []
    for n in range(rounds):   # interleaved: a busy machine slows all three alike
        with wireguard_by_hand(lab, *DIRECT, work) as address:
            figures["by_hand"].append(iperf(lab, DIRECT[0], DIRECT[1], address, seconds, work))
        for name, (caller, callee) in (("direct", DIRECT), ("relayed", RELAYED)):
            with sessions.wireguard(caller, callee) as session:
                figures[f"{name}_path"] = sessions.path(callee)
                before = cpu_seconds(session["call"].pid)
                began = time.monotonic()
                figures[name].append(iperf(lab, caller, callee, session["address"], seconds,
                                           work))
                if name == "relayed":   # the caller's agent: our relay proxy
                    figures["proxy_cpu"].append((cpu_seconds(session["call"].pid) - before)
                                                / (time.monotonic() - began))
        if log:
            log(f"round {n + 1}/{rounds}: by hand {figures['by_hand'][-1]:.0f}, direct "
                f"{figures['direct'][-1]:.0f}, relayed {figures['relayed'][-1]:.0f} Mbit/s")
    return figures


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def report(figures: dict, trials: int, seconds: int) -> list[str]:
    def ms(values: list[float]) -> str:
        return f"median {statistics.median(values) * 1000:.0f} ms, max " \
               f"{max(values) * 1000:.0f} ms" if values else "-"

    def mbit(values: list[float]) -> str:
        return f"{statistics.median(values):6.0f} Mbit/s  (" + \
            ", ".join(f"{v:.0f}" for v in values) + ")"

    times = figures["first_ping"]
    by_hand, direct, relayed = (statistics.median(figures[k])
                                for k in ("by_hand", "direct", "relayed"))
    rounds = len(figures["by_hand"])
    return [
        f"WireGuard through sipmesh, home a -> home b, {trials} sessions "
        f"({len(times)} pinged; paths: {', '.join(sorted(set(figures['paths'])))}):",
        f"  call -> first ping reply:           {ms(times)}",
        f"  caller's tunnel up -> first reply:  {ms(figures['handshake'])}",
        f"throughput, iperf3 TCP {seconds} s caller -> callee, median of {rounds} "
        f"interleaved rounds:",
        f"  wireguard-go by hand, a <-> b direct:  {mbit(figures['by_hand'])}  reference",
        f"  sipmesh WireGuard, a -> b, {figures['direct_path']}:  {mbit(figures['direct'])}  "
        f"{direct / by_hand:.2f} x by hand (target >= 0.95)",
        f"  sipmesh WireGuard, s -> a, {figures['relayed_path']}: {mbit(figures['relayed'])}  "
        f"{relayed / direct:.2f} x direct (target >= 0.5); our relay proxy (s's agent) "
        f"used {statistics.median(figures['proxy_cpu']) * 100:.0f}% of a core",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10, help="sessions timed (default 10)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="throughput rounds, each by hand, direct, relayed (default 3)")
    parser.add_argument("--iperf-seconds", type=int, default=5)
    parser.add_argument("--logs", metavar="DIR", type=Path,
                        help="keep the logs and configurations there (default: deleted)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sipmesh-tunnels-") as tmp, NatLab() as lab:
        work = args.logs or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        lab.add_hosts(HOSTS)
        site = NatSite(lab, work, USERS).start()
        try:
            figures = tunnel_figures(lab, site, work, trials=args.trials,
                                     rounds=args.rounds, seconds=args.iperf_seconds,
                                     log=lambda text: print(text, file=sys.stderr, flush=True))
        finally:
            site.stop()
    print("\n".join(report(figures, args.trials, args.iperf_seconds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
