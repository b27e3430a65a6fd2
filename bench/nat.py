#!/usr/bin/env python3
"""Sessions across NAT against Nebula, on the NAT lab (tests/lab/topology.py). Prints figures.

The lab: an internet bridge (203.0.113.0/24) with the broker (a STUN responder on its SIP
port 5060, as the broker will answer STUN there), coturn, a Nebula lighthouse, a Nebula
relay and a public host p; home hosts a and b (endpoint-independent NAT, port-restricted
filter), symmetric hosts s and s2 (MASQUERADE --random-fully). Pair kinds, caller first:
home<->home (a, b), public<->home (p, a), symmetric<->home (s, a), symmetric<->symmetric
(s, s2).

Nebula (Debian nebula 1.6; the anchor a user would pick instead): one CA, one lighthouse on
the internet bridge, punchy on. Run 1 without relays, run 2 with a relay (``am_relay`` on a
public host, every peer listing it in ``relay.relays``, ``use_relays``). Per trial both
peers' nebula start at once, random listen ports, the routers' conntrack flushed; the time
is from starting them to the first ping reply (ping -D timestamps, 10 ms apart). A pair that
fails its first --give-up trials in a row is not tried further ("never").

sipmesh: agent/ice.py's IceSession on both hosts (tests/lab/iceprobe.py), host + srflx
(from the broker's STUN) + relay (coturn, SIP credentials) candidates. The caller gathers,
then the callee (as it would on the INVITE), then both check; the time is from the caller's
gather start to the callee receiving the first datagram over the chosen path. See
``sipmesh_sessions``: the hook that switches to real ``sipmesh call`` sessions (time from
INVITE to first application byte) once the ice branch wires ICE into agent/session.py.

Throughput: wireguard-go configured by hand between a and b on the same direct path (each
side's endpoint the other's router, both sending: the holes punch), iperf3 TCP through it.
The sipmesh-managed tunnel figures are printed as pending until tunnels ride ICE.

    .venv/bin/python bench/nat.py [--trials 20] [--iperf-seconds 5]

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
sys.path.insert(0, str(ROOT))  # tests.lab: the NAT lab, coturn, the ICE probe
sys.path.insert(0, str(ROOT / "src"))

from sipmesh.apps.wireguard import interface_name, keypair  # noqa: E402
from sipmesh.sip.auth import compute_ha1  # noqa: E402
from tests.lab import Coturn, NatLab, wait_for  # noqa: E402

PROBE = str(ROOT / "tests" / "lab" / "iceprobe.py")
PAIRS = [("home<->home", "a", "b"), ("public<->home", "p", "a"),
         ("symmetric<->home", "s", "a"), ("symmetric<->symmetric", "s", "s2")]
PEERS = {h for _, x, y in PAIRS for h in (x, y)}
HOSTS = {"broker": "public", "turn": "public", "light": "public", "nrelay": "public",
         "p": "public", "a": "home", "b": "home", "s": "symmetric", "s2": "symmetric"}
NEBULA_IP = {"light": "10.200.0.1", "nrelay": "10.200.0.2", "p": "10.200.0.10",
             "a": "10.200.0.11", "b": "10.200.0.12", "s": "10.200.0.13", "s2": "10.200.0.14"}
REALM, USER, PASSWORD = "mesh.example", "alice", "alice-pw"
SIP_PORT, LIGHTHOUSE_PORT = 5060, 4242
TRIAL_TIMEOUT = 10.0   # s a Nebula trial waits for its first ping reply
ICE_TIMEOUT = 10.0     # s an ICE session may take to find a path


def median(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.0f} ms" if values else "-"


@dataclass
class Tally:
    """One pair kind's trials: times of those that connected, how many ran."""

    times: list[float] = field(default_factory=list)
    runs: int = 0
    stopped: bool = False     # gave up after the first failures
    relayed_times: list[float] = field(default_factory=list)   # sipmesh: relayed sessions
    errors: list[str] = field(default_factory=list)

    def connected(self) -> str:
        done = len(self.times) + len(self.relayed_times)
        return f"{done}/{self.runs}" + (" (gave up)" if self.stopped else "")


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


# ---------------------------------------------------------------------------- sipmesh (ICE)


def ice_trial(lab: NatLab, caller: str, callee: str, turn_port: int) -> tuple[str, float] | str:
    """One ICE session: (path kind, seconds from the caller's gather start to the callee's
    first datagram), or why it failed."""
    procs = []
    try:
        for host, controlling in ((caller, True), (callee, False)):
            procs.append(lab.popen(host, [sys.executable, PROBE], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
        config = {"stun": [lab["broker"].ip, SIP_PORT], "turn": [lab["turn"].ip, turn_port],
                  "user": USER, "password": PASSWORD, "timeout": ICE_TIMEOUT}
        offer = talk(procs[0], dict(config, controlling=True))     # the caller gathers ...
        answer = talk(procs[1], dict(config, controlling=False))   # ... then the callee
        talk(procs[0], answer["local"], reply=False)
        talk(procs[1], offer["local"], reply=False)
        paths = [read(p) for p in procs]
        if any("error" in p for p in paths):
            return next(p["error"] for p in paths if "error" in p)[:200]
        read(procs[0])
        data = read(procs[1])
        return paths[0]["path"]["kind"], data["first"] - offer["started"]
    except (OSError, ValueError, subprocess.TimeoutExpired) as e:
        return f"probe failed: {e}"
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def talk(proc: subprocess.Popen, message: object, reply: bool = True) -> dict:
    proc.stdin.write(json.dumps(message) + "\n")
    proc.stdin.flush()
    return read(proc) if reply else {}


def read(proc: subprocess.Popen) -> dict:
    line = proc.stdout.readline()
    if not line:
        raise ValueError("the ICE probe ended early")
    return json.loads(line)


def sipmesh_sessions(lab: NatLab, caller: str, callee: str, turn_port: int) -> tuple[str, float] | str:
    """HOOK (branch ice): today an ICE session alone (agent/ice.py via tests/lab/iceprobe.py,
    no SIP). Once ``sipmesh call`` does ICE, replace this body with a real session: run
    ``sipmesh serve`` on `callee` and ``sipmesh call`` on `caller` against a broker on
    lab["broker"] (STUN on its SIP port, coturn on lab["turn"]), both with an exec program
    that writes/reads one byte over the negotiated UDP address, and return (path kind
    from the agent's path report, seconds from INVITE sent to the first application byte
    received). The table's headings say which of the two was measured."""
    return ice_trial(lab, caller, callee, turn_port)


SESSIONS_MEASURED = "ICE only (gather start -> first datagram); real sessions: pending branch ice"


# ---------------------------------------------------------------------------- throughput


def wireguard_by_hand(lab: NatLab, x: str, y: str, seconds: int, work: Path) -> float:
    """iperf3 TCP Mbit/s through wireguard-go between x and y, configured by hand on the
    direct path between their routers."""
    flush_conntrack(lab, x, y)
    sides = {x: ("10.201.0.1", 51820), y: ("10.201.0.2", 51821)}
    keys = {h: keypair() for h in sides}
    names = {h: interface_name("bnwg") for h in sides}
    procs = []
    try:
        for host in sides:
            procs.append(lab.spawn(host, ["wireguard-go", "-f", names[host]],
                                   log_path=work / f"wg-{host}.log", name=f"wg-{host}",
                                   env=dict(os.environ, WG_PROCESS_FOREGROUND="1")))
        for host, (address, port) in sides.items():
            peer = y if host == x else x
            deadline = time.time() + 10
            while lab.run(host, ["wg", "show", names[host]], check=False).returncode != 0:
                if time.time() > deadline:
                    raise RuntimeError(f"wireguard-go on {host} made no interface")
                time.sleep(0.05)
            lab.run(host, ["wg", "set", names[host], "private-key", "/dev/stdin", "listen-port",
                           str(port), "peer", keys[peer][1], "allowed-ips",
                           f"{sides[peer][0]}/32", "endpoint",
                           f"{lab[peer].public_ip}:{sides[peer][1]}", "persistent-keepalive",
                           "1"], input=keys[host][0].decode())
            lab.run(host, ["ip", "address", "add", f"{address}/24", "dev", names[host]])
            lab.run(host, ["ip", "link", "set", names[host], "mtu", "1420", "up"])
        if first_ping(lab, x, sides[y][0], time.time() + 15) is None:
            raise RuntimeError("no ping through the hand-made WireGuard tunnel")
        server = lab.spawn(y, ["iperf3", "-s", "-1", "-B", sides[y][0]],
                           log_path=work / "iperf3-server.log", name="iperf3-server")
        procs.append(server)
        time.sleep(0.3)
        result = lab.run(x, ["iperf3", "-c", sides[y][0], "-t", str(seconds), "-J"],
                         timeout=seconds + 20)
        return json.loads(result.stdout)["end"]["sum_received"]["bits_per_second"] / 1e6
    finally:
        for proc in procs:
            proc.stop(grace=3)


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
        elif isinstance(result, tuple):
            (tally.times if result[0] == "direct" else tally.relayed_times).append(result[1])
        elif result is None:
            tally.errors.append("no reply")
        else:
            tally.times.append(result)
        if n + 1 == give_up and not (tally.times or tally.relayed_times):
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
    with tempfile.TemporaryDirectory(prefix="sipmesh-nat-") as tmp, NatLab() as lab:
        work = args.logs or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        lab.add_hosts(HOSTS)
        stun = lab.popen("broker", [sys.executable, PROBE, "stun", str(SIP_PORT)],
                         stdout=subprocess.PIPE, text=True)
        turn = None
        results: dict[str, dict[str, Tally]] = {"nebula": {}, "nebula+relay": {}, "sipmesh": {}}
        try:
            json.loads(stun.stdout.readline())
            turn = Coturn(work / "coturn", lab["turn"].ip, realm=REALM, netns=lab["turn"].ns,
                          users={USER: compute_ha1(USER, REALM, PASSWORD)}).start()
            Nebula.certificates(work)
            for mode, relays in (("nebula", False), ("nebula+relay", True)):
                nebula = Nebula(lab, work, relays)
                try:
                    for kind, x, y in PAIRS:
                        results[mode][kind] = measure(args.trials, args.give_up,
                                                      lambda: nebula.trial(x, y))
                        print(f"{mode:13} {kind:22} {results[mode][kind].connected():>16}  "
                              f"median {median(results[mode][kind].times)}",
                              file=sys.stderr, flush=True)
                finally:
                    nebula.stop()
            for kind, x, y in PAIRS:
                results["sipmesh"][kind] = measure(
                    args.trials, args.give_up, lambda: sipmesh_sessions(lab, x, y, turn.port))
                tally = results["sipmesh"][kind]
                print(f"{'sipmesh':13} {kind:22} {tally.connected():>16}  direct "
                      f"{len(tally.times)}  {'; '.join(sorted(set(tally.errors)))[:200]}",
                      file=sys.stderr, flush=True)
            throughput = wireguard_by_hand(lab, "a", "b", args.iperf_seconds, work)
        finally:
            stun.kill()
            stun.wait()
            if turn is not None:
                turn.stop()
    report(results, throughput, args, time.monotonic() - began)
    return 0


def report(results: dict[str, dict[str, Tally]], throughput: float,
           args: argparse.Namespace, elapsed: float) -> None:
    header = ["PAIR (caller first)", "NEBULA: CONNECTED", "FIRST PING",
              "NEBULA+RELAY: CONNECTED", "FIRST PING", "SIPMESH: CONNECTED", "DIRECT",
              "DIRECT: 1ST BYTE", "RELAYED: 1ST BYTE"]
    rows = []
    for kind, _, _ in PAIRS:
        n, r, s = (results[m][kind] for m in ("nebula", "nebula+relay", "sipmesh"))
        done = len(s.times) + len(s.relayed_times)
        share = f"{len(s.times)}/{done}" if done else "-"
        rows.append([kind, n.connected(), median(n.times), r.connected(), median(r.times),
                     s.connected(), share, median(s.times), median(s.relayed_times)])
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    print(f"NAT lab, {args.trials} trials per pair (medians; a pair failing its first "
          f"{args.give_up} trials is given up), {elapsed:.0f} s in all")
    for row in [header] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    print("Nebula: from starting both peers (a Go binary: ~10 ms to the lighthouse) to the "
          "first ping reply; punchy on with its default 1 s respond delay; +relay: one "
          "am_relay host")
    print(f"sipmesh: {SESSIONS_MEASURED}; processes already running")
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"tunnel throughput, home<->home direct path, iperf3 TCP {args.iperf_seconds} s:")
    print(f"  wireguard-go configured by hand:   {throughput:7.0f} Mbit/s  (the reference)")
    print("  WireGuard through sipmesh, direct: n/a (pending: tunnels do not ride ICE yet)")
    print("  WireGuard through sipmesh, relayed through coturn: n/a (pending)")


if __name__ == "__main__":
    sys.exit(main())
