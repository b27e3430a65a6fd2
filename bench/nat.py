#!/usr/bin/env python3
"""Sessions across NAT against Nebula, on the NAT lab (tests/lab/topology.py). Prints figures.

The lab: an internet bridge (203.0.113.0/24) with our site (src/sipmesh/lab/natsite.py: `sipmesh
broker`, answering STUN on its SIP port 5060, and coturn with the SIP credentials), a Nebula
lighthouse, a Nebula relay and a public host p; home hosts a and b (endpoint-independent
NAT, port-restricted filter), symmetric hosts s and s2 (MASQUERADE --random-fully). Pair
kinds, caller first: home<->home (a, b), public<->home (p, a), symmetric<->home (s, a),
symmetric<->symmetric (s, s2).

Nebula (Debian nebula 1.6; the anchor a user would pick instead): one CA, one lighthouse on
the internet bridge, punchy on. Run 1 without relays, run 2 with a relay (``am_relay`` on a
public host, every peer listing it in ``relay.relays``, ``use_relays``). Per trial both
peers' nebula start at once, random listen ports, the routers' conntrack flushed; the time
is from starting them to the first ping reply (ping -D timestamps, 10 ms apart). A pair that
fails its first --give-up trials in a row is not tried further ("never").

sipmesh: real sessions between separate processes. On each callee `sipmesh serve` (already
registered, as an answering host is) runs the exec ``udp`` echo program; per trial the
caller starts `sipmesh call CALLEE -- PROGRAM`, whose program pings the peer's program
every 10 ms until the first echo comes back. Reported: the path the session chose (from
SIPMESH_PATH), the time from starting `sipmesh call` (Python start, registration, ICE
gathering included) to that first echo, and from the INVITE (the caller's "calling" log
line) to it. Then, per pair, one WireGuard session (`sipmesh daemon` on the callee, `sipmesh
call --service vpn`) with iperf3 TCP through the tunnel for --iperf-seconds, and as the
reference wireguard-go configured by hand on the a<->b direct path (bench/tunnels.py).
Targets (issue 11): direct >= 0.95 x by hand; relayed >= 0.5 x direct.

    .venv/bin/python bench/nat.py [--trials 20] [--iperf-seconds 5] [--logs DIR]

Needs root (network namespaces), nebula, nebula-cert, coturn, wireguard-go, wg, iperf3.
Traffic stays inside the namespaces it creates; everything is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.lab: the NAT lab and the site; bench.tunnels
sys.path.insert(0, str(ROOT / "src"))

from bench.tunnels import Sessions, iperf, wireguard_by_hand  # noqa: E402
from tests.lab import NatLab, wait_for  # noqa: E402
from sipmesh.lab.natsite import NatSite  # noqa: E402

PAIR = str(ROOT / "tests" / "peers" / "udp_pair.py")
PAIRS = [("home<->home", "a", "b"), ("public<->home", "p", "a"),
         ("symmetric<->home", "s", "a"), ("symmetric<->symmetric", "s", "s2")]
PEERS = {h for _, x, y in PAIRS for h in (x, y)}
HOSTS = {"broker": "public", "light": "public", "nrelay": "public",
         "p": "public", "a": "home", "b": "home", "s": "symmetric", "s2": "symmetric"}
# the site's users: daemons (callee), serve (CALLEEe), callers (CALLERc)
USERS = [u for _, x, y in PAIRS for u in (y, f"{y}e", f"{x}c")]
NEBULA_IP = {"light": "10.200.0.1", "nrelay": "10.200.0.2", "p": "10.200.0.10",
             "a": "10.200.0.11", "b": "10.200.0.12", "s": "10.200.0.13", "s2": "10.200.0.14"}
LIGHTHOUSE_PORT = 4242
TRIAL_TIMEOUT = 10.0   # s a Nebula trial waits for its first ping reply


def median(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.0f} ms" if values else "-"


@dataclass
class Tally:
    """One pair kind's trials: what connected (path, seconds), how many ran."""

    paths: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)     # Nebula: to the first ping reply;
    invite: list[float] = field(default_factory=list)    # sipmesh: from the command, INVITE
    runs: int = 0
    stopped: bool = False     # gave up after the first failures
    errors: list[str] = field(default_factory=list)

    def connected(self) -> str:
        return f"{len(self.times)}/{self.runs}" + (" (gave up)" if self.stopped else "")

    def direct(self) -> str:
        return f"{self.paths.count('direct')}/{len(self.paths)}" if self.paths else "-"


# ---------------------------------------------------------------------------- Nebula


class Nebula:
    """A CA, host certificates and configurations; lighthouse and relay stay up."""

    def __init__(self, lab: NatLab, work: Path, relays: bool) -> None:
        self.lab, self.work, self.relays = lab, work, relays
        self.lighthouse = lab.spawn("light", ["nebula", "-config", self.config("light")],
                                    log_path=work / f"light-{relays}.log", name="nebula-light")
        wait_for(lambda: "Nebula interface is active" in self.lighthouse.log_text(), 10,
                 what="the Nebula lighthouse")
        self.relay = None
        if relays:
            self.relay = lab.spawn("nrelay", ["nebula", "-config", self.config("nrelay")],
                                   log_path=work / "nrelay.log", name="nebula-relay")
            if first_ping(lab, "nrelay", NEBULA_IP["light"], time.time() + 10) is None:
                raise RuntimeError("the Nebula relay never reached the lighthouse:\n"
                                   + self.relay.log_tail())

    @staticmethod
    def certificates(work: Path) -> None:
        run(["nebula-cert", "ca", "-name", "sipmesh-bench", "-out-crt", work / "ca.crt",
             "-out-key", work / "ca.key"])
        for name, ip in NEBULA_IP.items():
            run(["nebula-cert", "sign", "-name", name, "-ip", f"{ip}/24", "-ca-crt",
                 work / "ca.crt", "-ca-key", work / "ca.key", "-out-crt", work / f"{name}.crt",
                 "-out-key", work / f"{name}.key"])

    def config(self, name: str) -> str:
        lighthouse = name == "light"
        config = {
            "pki": {"ca": str(self.work / "ca.crt"), "cert": str(self.work / f"{name}.crt"),
                    "key": str(self.work / f"{name}.key")},
            "static_host_map": {} if lighthouse else
            {NEBULA_IP["light"]: [f"{self.lab['light'].ip}:{LIGHTHOUSE_PORT}"]},
            "lighthouse": {"am_lighthouse": lighthouse, "interval": 60,
                           "hosts": [] if lighthouse else [NEBULA_IP["light"]]},
            "listen": {"host": "0.0.0.0", "port": LIGHTHOUSE_PORT if lighthouse else 0},
            "punchy": {"punch": True, "respond": True},
            "relay": {"am_relay": self.relays and name == "nrelay",
                      "use_relays": self.relays,
                      "relays": [NEBULA_IP["nrelay"]] if self.relays and name in PEERS else []},
            "tun": {"dev": "nebula1", "mtu": 1300},
            "logging": {"level": "info"},
            "firewall": {"outbound": [{"port": "any", "proto": "any", "host": "any"}],
                         "inbound": [{"port": "any", "proto": "any", "host": "any"}]},
        }
        path = self.work / f"{name}-{'relay' if self.relays else 'direct'}.yml"
        path.write_text(json.dumps(config, indent=1))   # JSON is YAML
        return str(path)

    def trial(self, x: str, y: str) -> float | None:
        """Start both peers; seconds to the first ping reply from x to y (None: none)."""
        flush_conntrack(self.lab, x, y)
        started = time.time()
        procs = [self.lab.spawn(h, ["nebula", "-config", self.config(h)],
                                log_path=self.work / f"{h}.log", name=f"nebula-{h}")
                 for h in (x, y)]
        try:
            reply = first_ping(self.lab, x, NEBULA_IP[y], started + TRIAL_TIMEOUT)
            return None if reply is None else reply - started
        finally:
            for proc in procs:
                proc.stop(grace=3)

    def stop(self) -> None:
        for proc in (self.relay, self.lighthouse):
            if proc is not None:
                proc.stop(grace=3)


def first_ping(lab: NatLab, host: str, ip: str, deadline: float) -> float | None:
    """The wall-clock time of the first ping reply from `ip`, trying until `deadline`."""
    stamp = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from")
    while time.time() < deadline:
        window = max(1, min(2, int(deadline - time.time() + 0.999)))
        result = lab.run(host, ["ping", "-D", "-n", "-c", "1", "-i", "0.01", "-w", str(window),
                                ip], check=False, timeout=window + 5)
        for line in result.stdout.splitlines():
            m = stamp.match(line)
            if m:
                return float(m.group(1))
        if result.returncode == 2:   # no interface or route yet: nebula is starting
            time.sleep(0.01)
    return None


def flush_conntrack(lab: NatLab, *hosts: str) -> None:
    """Forget the NAT mappings and holes of earlier trials (each trial starts cold)."""
    for host in hosts:
        router = lab[host].router
        if router is not None:
            router.ns.run(["conntrack", "-F"], check=False)


# ---------------------------------------------------------------------------- sipmesh


# The caller's program (exec ``udp`` contract, apps/exec.py): ping the peer's program every
# 10 ms from LOCAL_PORT until its first echo comes back; write when, and the path, to argv[1].
FIRST_BYTE = r'''
import json, os, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(os.environ["SIPMESH_LOCAL_PORT"])))
s.settimeout(0.01)
remote = (os.environ["SIPMESH_REMOTE_IP"], int(os.environ["SIPMESH_REMOTE_PORT"]))
started = time.time()
while time.time() - started < 15:
    s.sendto(b"ping", remote)
    try:
        s.recv(2048)
    except socket.timeout:
        continue
    with open(sys.argv[1], "w") as out:
        json.dump({"first": time.time(), "started": started,
                   "path": os.environ.get("SIPMESH_PATH")}, out)
    sys.exit(0)
sys.exit(1)
'''
# "2026-12-06 04:17:25,123 INFO    sipmesh.agent.session: calling sip:be@..."
CALLING = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \S+ +\S+: calling ", re.M)


class Sipmesh:
    """Real sessions on a NatSite: `sipmesh serve` (the echo program of tests/peers/udp_pair.py)
    as user CALLEEe on each callee, `sipmesh call` as CALLERc per trial; WireGuard sessions
    through daemons (bench/tunnels.py's Sessions) for the throughput."""

    def __init__(self, site: NatSite, work: Path) -> None:
        self.site, self.work = site, work
        self.serves = {y: site.serve(y, f"{y}e", "--app-port", "40000", "--", sys.executable,
                                     PAIR, "echo", str(work))
                       for y in sorted({y for _, _, y in PAIRS})}
        self.tunnels = Sessions(site, {y: f"10.{90 + n}.0.0/24"
                                       for n, y in enumerate(sorted(self.serves))})
        self.trials = 0

    def trial(self, x: str, y: str) -> tuple[str, float, float] | str:
        """One session x -> y: (path kind, seconds from starting `sipmesh call` to the first
        echo, seconds from its INVITE to the first echo), or why it failed."""
        self.trials += 1
        out = self.work / f"first-{self.trials}.json"
        started = time.time()
        call = self.site.call(x, f"{x}c", f"{y}e", "--timeout", "15", "--", sys.executable,
                              "-c", FIRST_BYTE, str(out))
        try:
            rc = call.wait(40)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            call.stop(grace=5)
        if rc != 0 or not out.exists():
            tail = call.log_tail(3).replace("\n", " | ")
            return f"exit {rc}: {tail}"[:200]
        first = json.loads(out.read_text())
        invite = CALLING.search(call.log_text())
        if invite is None:
            return "no 'calling' line in the caller's log"
        sent = time.mktime(time.strptime(invite.group(1), "%Y-%m-%d %H:%M:%S")) \
            + int(invite.group(2)) / 1000
        return first["path"], first["first"] - started, first["first"] - sent

    def throughput(self, x: str, y: str, seconds: int) -> tuple[str, float]:
        """(path, iperf3 TCP Mbit/s) of a WireGuard session x -> y."""
        with self.tunnels.wireguard(x, y) as session:
            path = self.tunnels.path(y)
            return path, iperf(self.site.lab, x, y, session["address"], seconds, self.work)


# ---------------------------------------------------------------------------- main


def run(argv: list[object], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True,
                          timeout=30, **kwargs)


def measure(trials: int, give_up: int, trial) -> Tally:
    tally = Tally()
    for n in range(trials):
        result = trial()
        tally.runs += 1
        if isinstance(result, str):
            tally.errors.append(result)
        elif result is None:
            tally.errors.append("no reply")
        elif isinstance(result, tuple):     # sipmesh: (path, from the command, from INVITE)
            tally.paths.append(result[0])
            tally.times.append(result[1])
            tally.invite.append(result[2])
        else:
            tally.times.append(result)
        if n + 1 == give_up and not tally.times:
            tally.stopped = True
            break
    return tally


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="trials per pair (default 20)")
    parser.add_argument("--give-up", type=int, default=3,
                        help="stop a pair after this many failures in a row from the start")
    parser.add_argument("--iperf-seconds", type=int, default=5)
    parser.add_argument("--logs", metavar="DIR", type=Path,
                        help="keep the logs and configurations there (default: deleted)")
    args = parser.parse_args()
    began = time.monotonic()
    results: dict[str, dict[str, Tally]] = {"nebula": {}, "nebula+relay": {}, "sipmesh": {}}
    throughput: dict[str, tuple[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="sipmesh-nat-") as tmp, NatLab() as lab:
        work = args.logs or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        lab.add_hosts(HOSTS)
        site = NatSite(lab, work, USERS).start()
        try:
            Nebula.certificates(work)
            for mode, relays in (("nebula", False), ("nebula+relay", True)):
                nebula = Nebula(lab, work, relays)
                try:
                    for kind, x, y in PAIRS:
                        results[mode][kind] = measure(args.trials, args.give_up,
                                                      lambda: nebula.trial(x, y))
                        say(f"{mode:13} {kind:22} {results[mode][kind].connected():>16}  "
                            f"median {median(results[mode][kind].times)}")
                finally:
                    nebula.stop()
            ours = Sipmesh(site, work)
            for kind, x, y in PAIRS:
                results["sipmesh"][kind] = tally = measure(args.trials, args.give_up,
                                                           lambda: ours.trial(x, y))
                say(f"{'sipmesh':13} {kind:22} {tally.connected():>16}  direct "
                    f"{tally.direct()}  median {median(tally.times)}  "
                    f"{'; '.join(sorted(set(tally.errors)))[:200]}")
            with wireguard_by_hand(lab, "a", "b", work) as address:
                by_hand = iperf(lab, "a", "b", address, args.iperf_seconds, work)
            for kind, x, y in PAIRS:
                throughput[kind] = ours.throughput(x, y, args.iperf_seconds)
                say(f"WireGuard {kind}: {throughput[kind][0]}, {throughput[kind][1]:.0f} Mbit/s")
        finally:
            site.stop()
    report(results, throughput, by_hand, args, time.monotonic() - began)
    return 0


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def report(results: dict[str, dict[str, Tally]], throughput: dict[str, tuple[str, float]],
           by_hand: float, args: argparse.Namespace, elapsed: float) -> None:
    header = ["PAIR (caller first)", "NEBULA: CONNECTED", "FIRST PING",
              "NEBULA+RELAY: CONNECTED", "FIRST PING", "SIPMESH: CONNECTED", "DIRECT",
              "1ST BYTE: COMMAND", "INVITE", "WIREGUARD", "MBIT/S"]
    rows = []
    for kind, _, _ in PAIRS:
        n, r, s = (results[m][kind] for m in ("nebula", "nebula+relay", "sipmesh"))
        path, mbit = throughput[kind]
        rows.append([kind, n.connected(), median(n.times), r.connected(), median(r.times),
                     s.connected(), s.direct(), median(s.times), median(s.invite), path,
                     f"{mbit:.0f}"])
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    print(f"NAT lab, {args.trials} trials per pair (medians; a pair failing its first "
          f"{args.give_up} trials is given up), {elapsed:.0f} s in all")
    for row in [header] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    print("Nebula: from starting both peers (a Go binary: ~10 ms to the lighthouse) to the "
          "first ping reply; punchy on with its default 1 s respond delay; +relay: one "
          "am_relay host")
    print("sipmesh: real sessions, `sipmesh serve` on the callee already registered; 1ST BYTE "
          "from starting `sipmesh call` (COMMAND) and from its INVITE to the first echo its "
          "program got; DIRECT: sessions whose path was direct")
    direct, relayed = throughput["home<->home"][1], throughput["symmetric<->home"][1]
    print(f"throughput, iperf3 TCP {args.iperf_seconds} s caller -> callee through WireGuard "
          f"(MBIT/S above: one session per pair through sipmesh):")
    print(f"  wireguard-go by hand, a <-> b direct: {by_hand:6.0f} Mbit/s  (the reference)")
    print(f"  sipmesh home<->home / by hand:        {direct / by_hand:6.2f}  (target >= 0.95)")
    print(f"  sipmesh symmetric<->home / home<->home: {relayed / direct:4.2f}  "
          f"(relayed / direct, target >= 0.5)")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
          "(shared machine: the figures are indicative)")


if __name__ == "__main__":
    sys.exit(main())
