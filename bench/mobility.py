#!/usr/bin/env python3
"""A host that moves, on the NAT lab: time from an address change to being reachable by
name again, and to its running WireGuard (or OpenVPN) tunnel answering again (issue 13, item 5; the
other half of bench/failover.py's figures, the broker-kill half being there).

The lab (src/sipmesh/lab/topology.py, natsite.py): our broker on the internet bridge,
home hosts a and b, a second home router. b runs `sipmesh daemon` with a wireguard service
"vpn" and an openvpn service "ovpn", a runs `sipmesh call b --service vpn` (`--service
ovpn`: OpenVPN, through each agent's local end); then b's veth moves between the two routers
--moves times (a new address each time, as a new DHCP lease gives). Per move:

* reachable: from the move to b's REGISTER from the new address being accepted (its
  daemon's log line "registered our new address"), after which calls by name reach it;
* tunnel: from the move to the first ping reply through the running tunnel (a pings b's
  tunnel address every 50 ms), after the ICE restart and `wg set` on both sides (OpenVPN:
  the local ends switched to the new path);
* the wireguard-go (openvpn) process on b is the same throughout (checked at every move).

Medians (and max) over the moves. The figures are indicative on a loaded machine.

    .venv/bin/python bench/mobility.py [--moves 10] [--service vpn|ovpn] [--logs DIR]

Needs root, wireguard-go, wg, coturn. Traffic stays inside the namespaces; everything is
removed at the end.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.lab: the NAT lab, the site
sys.path.insert(0, str(ROOT / "src"))

from tests.lab import NatLab, wait_for  # noqa: E402
from tests.lab.moves import move_host  # noqa: E402
from sipmesh.lab.natsite import NatSite, tunnel_services  # noqa: E402

POOLS = {"a": "10.96.0.0/24", "b": "10.97.0.0/24"}


PROGRAMS = {"vpn": "wireguard-go", "ovpn": "openvpn"}   # the service's program


def program_pids(host, program: str) -> set[int]:
    out = host.run(["ss", "-uanpH"], check=False).stdout
    return {int(pid) for pid in re.findall(rf'\("{re.escape(program)}",pid=(\d+)', out)}


def mobility_figures(lab: NatLab, site: NatSite, moves: int, service: str = "vpn") -> dict:
    """Run the moves (see the module doc) on a lab with hosts a and b behind home routers
    and a started site; the figures."""
    routers = [lab["b"].router, lab.add_router("home")]
    daemon = site.daemon("b", tunnel_services(POOLS["b"]))
    call = site.call("a", "ac", "b", "--service", service, services=tunnel_services(POOLS["a"]))
    reachable: list[float] = []
    tunnel: list[float] = []
    try:
        def session() -> dict | None:
            for s in site.status("b")["sessions"]:
                if (s.get("path") or {}).get("program"):
                    return s
            return None
        local = wait_for(session, 30, what="the tunnel session",
                         abort=call.exit_reason)["allocated"]["addresses"][0]
        wait_for(lambda: lab["a"].run(["ping", "-c", "1", "-W", "1", local],
                                      check=False).returncode == 0, 30, what="the first ping")
        program = PROGRAMS[service]
        pids = program_pids(lab["b"], program)
        assert pids, f"no {program} on b"
        for n in range(moves):
            done = daemon.log_text().count("registered our new address")
            moved = time.monotonic()
            move_host(lab["b"], routers[(n + 1) % 2])
            pinging = lab["a"].popen(["ping", "-n", "-q", "-i", "0.05", "-c", "1", "-w", "20", local],
                                     stdout=subprocess.DEVNULL)
            wait_for(lambda: daemon.log_text().count("registered our new address") > done,
                     15, interval=0.01, what=f"move {n + 1}: registered",
                     abort=daemon.exit_reason)
            reachable.append(time.monotonic() - moved)
            if pinging.wait(30) != 0:
                raise RuntimeError(f"move {n + 1}: no ping through the tunnel\n"
                                   + daemon.log_tail(30))
            tunnel.append(time.monotonic() - moved)
            if program_pids(lab["b"], program) != pids:
                raise RuntimeError(f"move {n + 1}: {program} was restarted")
            print(f"move {n + 1}: {lab['b'].ip}: reachable {reachable[-1]:.2f} s, "
                  f"tunnel {tunnel[-1]:.2f} s", flush=True)
    finally:
        call.stop(grace=10)
    return {"moves": moves, "service": service,
            "reachable_median": statistics.median(reachable), "reachable_max": max(reachable),
            "tunnel_median": statistics.median(tunnel), "tunnel_max": max(tunnel)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--moves", type=int, default=10)
    parser.add_argument("--service", choices=sorted(PROGRAMS), default="vpn",
                        help="vpn: WireGuard (default); ovpn: OpenVPN")
    parser.add_argument("--logs", type=Path, help="keep the processes' logs here")
    args = parser.parse_args()
    if not 1 <= args.moves <= 100:
        parser.error("--moves: 1 to 100")
    work = args.logs or Path(tempfile.mkdtemp(prefix="bench-mobility-"))
    with NatLab() as lab:
        lab.add_hosts({"broker": "public", "a": "home", "b": "home"})
        site = NatSite(lab, work, ["a", "b", "ac"]).start()
        try:
            figures = mobility_figures(lab, site, args.moves, args.service)
        finally:
            site.stop()
    print(f"address change -> reachable by name: median {figures['reachable_median']:.2f} s "
          f"(max {figures['reachable_max']:.2f}) over {figures['moves']} moves")
    print(f"address change -> running {PROGRAMS[args.service]} tunnel pings: median {figures['tunnel_median']:.2f} s "
          f"(max {figures['tunnel_max']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
