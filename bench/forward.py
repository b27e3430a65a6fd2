#!/usr/bin/env python3
"""Throughput of the `forward` service against a direct TCP connection and against socat
relaying the same two hops, on loopback.

A real session: `sipmesh broker`, `sipmesh daemon` with a forward service whose target
is a sink server, and `sipmesh call HOME --service fwd` -- the caller's local port then
reaches the sink through the two forward halves (caller half -> answering half ->
sink), peer to peer, never through the broker (``ice = false``: the halves talk TCP
to each other, as on a LAN without ICE; with ICE, the default, the forward rides QUIC
streams on the checked path, which ``--nat`` measures). The same source then sends --size MB
to the sink, in turn directly, through the forward and through two chained socat relays
(``socat TCP-LISTEN:a,fork TCP:127.0.0.1:b`` and ``... b -> sink``: the same two hops,
what a user would run instead of sipmesh when both ends are reachable), --runs times
each, and the medians are compared. The sink reads to EOF and answers with the byte count; the
source (this process) times from connect to that answer.

Also reported: the CPU time each forward half (and socat) spends per GB (from /proc), because on
loopback everything here is CPU-bound: a forwarded byte crosses three TCP connections
instead of one, and each hop costs about as much CPU as the direct connection's
sender and receiver together. The ratio therefore depends on the number of cores,
and on whatever else is running: the CPU other processes used during the runs is
reported last, and figures taken on a busy machine say little.

    .venv/bin/python bench/forward.py [--size 1024] [--runs 5]

Across the NAT lab (``--nat``, tests/lab/topology.py and natsite.py; root): our broker and
coturn on the internet bridge, a public host p, home hosts a and b, a symmetric host s.
The sink runs on b; `sipmesh daemon` on b offers the forward service, `sipmesh call b
--service fwd` runs on a (a direct path: TCP carried over QUIC on the ICE-checked pair) and
then on s (relayed through coturn). Beside it, from the same caller, what a user would
run instead: a direct TCP connection to b through a port forward on b's router (DNAT), and
socat on the public host p relaying to that port forward (the same two hops as a relay).

    .venv/bin/python bench/forward.py --nat [--size 64] [--runs 3]

Everything listens on 127.0.0.1 (or inside the lab's namespaces) only; all processes are
stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
from sipmesh.lab.natsite import FORWARD_SERVICE  # noqa: E402 (after the path)

SIPMESH = str(Path(sys.executable).parent / "sipmesh")
CHUNK = 1 << 20

# the service "fwd", both halves: the answering side's target, the caller's local port
SERVICE = FORWARD_SERVICE
CONFIG = '''
[agent]
server = "127.0.0.1:{broker}"
user = "home"
bind = "127.0.0.1"
advertise = "127.0.0.1"
control_socket = "{sock}"
ice = false     # the paper's a=IP4/a=PORT: the two forward halves, TCP between them
''' + SERVICE


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sink(server: socket.socket) -> None:
    buffer = bytearray(CHUNK)
    while True:
        conn, _ = server.accept()
        total = 0
        while n := conn.recv_into(buffer):
            total += n
        conn.sendall(str(total).encode())
        conn.close()


def send(port: int, size: int, host: str = "127.0.0.1") -> float:
    """Seconds to push `size` bytes to the sink at `host`:`port` and hear that it got them all."""
    data = b"\0" * CHUNK
    started = time.perf_counter()
    with socket.create_connection((host, port), timeout=60) as c:
        sent = 0
        while sent < size:
            c.sendall(data)
            sent += len(data)
        c.shutdown(socket.SHUT_WR)
        reply = c.recv(64)
    elapsed = time.perf_counter() - started
    if int(reply or b"0") != size:
        raise RuntimeError(f"the sink got {reply!r} bytes, not {size}")
    return elapsed


def cpu_s(pid: int) -> float:
    """CPU time of `pid` and of its children that have ended (socat forks one per connection)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def children(procs: list[subprocess.Popen]) -> list[str]:
    return [c for p in procs for c in
            Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()]


def busy_s() -> float:
    """CPU-seconds all CPUs have spent busy since boot (every field but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def forward_halves(ours: set[int]) -> dict[str, int]:
    """The forward halves descended from `ours` (not another run's on the same machine)."""
    found = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"sipmesh.apps.forward" not in argv:
                continue
            ancestor = int(pid)
            while ancestor > 1 and ancestor not in ours:
                ancestor = parent(ancestor)
        except (OSError, ValueError, IndexError):
            continue
        if ancestor in ours:
            found[argv[argv.index(b"sipmesh.apps.forward") + 1].decode()] = int(pid)
    return found


def wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def connectable(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, help="MB per run (default 1024; --nat: 64)")
    parser.add_argument("--runs", type=int, help="default 5; --nat: 3")
    parser.add_argument("--nat", action="store_true", help="across the NAT lab (root)")
    # the NAT lab's sink and source, run inside a host's namespace by --nat
    parser.add_argument("--sink", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--source", nargs=3, metavar=("HOST", "PORT", "BYTES"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sink:
        server = socket.create_server(("0.0.0.0", args.sink), backlog=8)
        print("ready", flush=True)
        sink(server)
    if args.source:
        print(send(int(args.source[1]), int(args.source[2]), args.source[0]))
        return 0
    if args.nat:
        return across_nat(args.size or 64, args.runs or 3)
    args.size, args.runs = args.size or 1024, args.runs or 5
    size = args.size * CHUNK
    procs: list[subprocess.Popen] = []
    sink_pid = 0
    with tempfile.TemporaryDirectory(prefix="sipmesh-fwd-") as tmp:
        work = Path(tmp)
        try:
            server = socket.socket()
            server.bind(("127.0.0.1", 0))
            server.listen(8)
            sink_port = server.getsockname()[1]
            sink_pid = os.fork()
            if sink_pid == 0:
                try:
                    sink(server)
                finally:
                    os._exit(0)
            server.close()
            broker, local = free_port(socket.SOCK_DGRAM), free_port()
            sock = work / "daemon.sock"
            config = work / "daemon.toml"
            config.write_text(CONFIG.format(broker=broker, sock=sock, sink=sink_port, local=local))
            common = dict(stdout=subprocess.DEVNULL, start_new_session=True)
            procs.append(subprocess.Popen(
                [SIPMESH, "broker", "--listen", f"127.0.0.1:{broker}", "--db",
                 str(work / "broker.db"), "--workers", "1", "--domain", "127.0.0.1",
                 "--log-level", "warning"], stderr=subprocess.DEVNULL, **common))
            time.sleep(0.5)
            procs.append(subprocess.Popen([SIPMESH, "daemon", "-c", str(config), "-q"],
                                          stderr=open(work / "daemon.log", "wb"), **common))
            wait(sock.exists, 30, "the daemon")
            time.sleep(0.3)
            procs.append(subprocess.Popen(
                [SIPMESH, "call", "home", "--service", "fwd", "-c", str(config), "--user",
                 "bench", "--bind", "127.0.0.1", "-q"],
                stderr=open(work / "caller.log", "wb"), **common))
            ours = {proc.pid for proc in procs}
            socat_in, socat_mid = free_port(), free_port()
            socats = [subprocess.Popen(
                ["socat", f"TCP-LISTEN:{listen},bind=127.0.0.1,fork,reuseaddr",
                 f"TCP:127.0.0.1:{to}"], stderr=subprocess.DEVNULL, **common)
                for listen, to in ((socat_mid, sink_port), (socat_in, socat_mid))]
            procs += socats
            wait(lambda: connectable(local) and len(forward_halves(ours)) == 2, 30,
                 "the forward to come up")
            wait(lambda: connectable(socat_in), 10, "socat to listen")
            halves = forward_halves(ours)
            warm = min(size, 64 * CHUNK)  # warm up both paths (and the buffers' autotuning)
            send(local, warm)
            send(sink_port, warm)
            send(socat_in, warm)
            wait(lambda: not children(socats), 10, "socat's children to end")
            direct, forwarded, relayed = [], [], []
            halves["sink"], halves["source"] = sink_pid, os.getpid()
            halves["socat 1"], halves["socat 2"] = socats[1].pid, socats[0].pid
            paths = ("direct", "forward", "socat")
            cpu = {path: {name: 0.0 for name in halves} for path in paths}
            started, busy_before = time.monotonic(), busy_s()
            for _ in range(args.runs):
                for path, port, results in (("direct", sink_port, direct),
                                            ("forward", local, forwarded),
                                            ("socat", socat_in, relayed)):
                    before = {name: cpu_s(pid) for name, pid in halves.items()}
                    results.append(size / send(port, size))
                    if path == "socat":   # its forked children end (and are reaped) after
                        wait(lambda: not children(socats), 10, "socat's children to end")
                    for name, pid in halves.items():
                        cpu[path][name] += cpu_s(pid) - before[name]
            wall, busy = time.monotonic() - started, busy_s() - busy_before
        except RuntimeError:
            for log in ("daemon.log", "caller.log"):
                if (work / log).exists():
                    print(f"--- {log}:", (work / log).read_text()[-2000:], file=sys.stderr)
            raise
        finally:
            for proc in reversed(procs):
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
                    try:
                        proc.wait(20)
                    except subprocess.TimeoutExpired:
                        os.killpg(proc.pid, signal.SIGKILL)
            if sink_pid:
                os.kill(sink_pid, signal.SIGKILL)
                os.waitpid(sink_pid, 0)
    d, f, r = (statistics.median(x) for x in (direct, forwarded, relayed))
    gb = args.runs * size / (1 << 30)

    def spread(values: list[float]) -> str:
        return f"({min(values) / 1e6:.0f}-{max(values) / 1e6:.0f})"

    print(f"{args.runs} runs of {args.size} MB each way on loopback, {os.cpu_count()} CPUs "
          f"(median; min-max)")
    print(f"  direct TCP:        {d / 1e6:8.0f} MB/s  {spread(direct)}")
    print(f"  through forward:   {f / 1e6:8.0f} MB/s  {spread(forwarded)}")
    print(f"  through socat x2:  {r / 1e6:8.0f} MB/s  {spread(relayed)}  (the same two hops)")
    pairs = statistics.median(fw / di for di, fw in zip(direct, forwarded))
    print(f"  forward / direct:  {f / d:8.2f}  (target >= 0.8; median of the {args.runs} "
          f"back-to-back pairs' ratios {pairs:.2f})")
    pairs = statistics.median(fw / so for so, fw in zip(relayed, forwarded))
    print(f"  forward / socat:   {f / r:8.2f}  (median of the pairs' ratios {pairs:.2f}); "
          f"socat / direct {r / d:.2f}")
    for path in paths:
        total = sum(cpu[path].values()) / gb
        print(f"  CPU, {path + ':':<8}    {total:.2f} s/GB in all (" + ", ".join(
            f"{name} {seconds / gb:.2f}" for name, seconds in cpu[path].items() if seconds)
            + f"); {os.cpu_count()} CPUs can give {os.cpu_count() / total:.1f} GB/s")
    ceiling = os.cpu_count() / (sum(cpu["forward"].values()) / gb) * (1 << 30)
    print(f"  ceiling:           {ceiling / d:8.2f}  (the ratio if the forward used every CPU "
          f"at the CPU per GB above: {ceiling / 1e6:.0f} MB/s)")
    ours = sum(sum(by_name.values()) for by_name in cpu.values())
    other = max(0.0, busy - ours) / wall
    print(f"  other processes:   {other:8.2f} CPUs busy on average during the runs"
          + ("  -- a loaded machine: the figures above are not reliable" if other > 0.2 else ""))
    return 0


# ---------------------------------------------------------------------------- the NAT lab

NAT_HOSTS = {"broker": "public", "p": "public", "a": "home", "b": "home", "s": "symmetric"}
SINK_PORT, RELAY_PORT, LOCAL_PORT = 9000, 9001, 9002


def across_nat(mb: int, runs: int) -> int:
    """The forward across the NAT lab against a port forward and socat (the module doc)."""
    sys.path.insert(0, str(ROOT))
    from tests.lab import NatLab, netns_run, wait_for, wait_tcp_listening
    from sipmesh.lab.natsite import NatSite

    size = mb * CHUNK
    this = [sys.executable, str(Path(__file__).resolve())]
    service = SERVICE.format(sink=SINK_PORT, local=LOCAL_PORT)
    table: list[tuple[str, str, dict[str, list[float]]]] = []
    with tempfile.TemporaryDirectory(prefix="sipmesh-fwd-nat-") as tmp, NatLab() as lab:
        work = Path(tmp)
        lab.add_hosts(NAT_HOSTS)
        b = lab["b"]
        site = NatSite(lab, work, ["b", "ac", "sc"]).start()
        try:
            sink_proc = lab.spawn("b", [*this, "--sink", str(SINK_PORT)],
                                  log_path=work / "sink.log", name="sink")
            wait_tcp_listening(b.ip, SINK_PORT, b.ns, 10, proc=sink_proc)
            # what a user does to be reachable without sipmesh: a port forward on the router
            assert b.router is not None
            for rule in (["-t", "nat", "-A", "PREROUTING", "-i", "wan", "-p", "tcp", "--dport",
                          str(SINK_PORT), "-j", "DNAT", "--to-destination",
                          f"{b.ip}:{SINK_PORT}"],
                         ["-I", "FORWARD", "1", "-i", "wan", "-p", "tcp", "-d", b.ip,
                          "--dport", str(SINK_PORT), "-j", "ACCEPT"]):
                netns_run(b.router.ns, ["iptables", *rule])
            socat = lab.spawn("p", ["socat", f"TCP-LISTEN:{RELAY_PORT},fork,reuseaddr",
                                    f"TCP:{b.public_ip}:{SINK_PORT}"],
                              log_path=work / "socat.log", name="socat")
            wait_tcp_listening(lab["p"].ip, RELAY_PORT, lab["p"].ns, 10, proc=socat)
            site.daemon("b", service)
            for caller in ("a", "s"):
                call = site.call(caller, f"{caller}c", "b", "--service", "fwd",
                                 services=service)
                try:
                    wait_tcp_listening("127.0.0.1", LOCAL_PORT, lab[caller].ns, 30, proc=call)
                    path = wait_for(lambda: re.search(r"path (direct|relayed): ",
                                                      call.log_text()), 10,
                                    what="the forward's path", abort=call.exit_reason).group(1)
                    targets = {"direct": (b.public_ip, SINK_PORT),
                               "forward": ("127.0.0.1", LOCAL_PORT),
                               "socat": (lab["p"].ip, RELAY_PORT)}

                    def source(target: tuple[str, int], nbytes: int) -> float:
                        out = lab.run(caller, [*this, "--source", target[0], str(target[1]),
                                               str(nbytes)], timeout=300)
                        return float(out.stdout)
                    for target in targets.values():   # warm up each path
                        source(target, min(size, 8 * CHUNK))
                    rates: dict[str, list[float]] = {name: [] for name in targets}
                    for _ in range(runs):               # interleaved: load hits all alike
                        for name, target in targets.items():
                            rates[name].append(size / source(target, size))
                    table.append((f"{lab[caller].kind} {caller} -> home b", path, rates))
                finally:
                    call.stop(grace=10)
        finally:
            site.stop()
    print(f"NAT lab, {runs} runs of {mb} MB each, caller -> the sink on home host b, "
          f"{os.cpu_count()} CPUs (median MB/s; min-max)")
    for label, path, rates in table:
        d, f, r = (statistics.median(rates[k]) for k in ("direct", "forward", "socat"))
        print(f"  {label} (the forward's path: {path}):")
        print(f"    direct TCP (port forward on b's router): {d / 1e6:6.1f}  "
              f"({min(rates['direct']) / 1e6:.1f}-{max(rates['direct']) / 1e6:.1f})")
        print(f"    through forward (QUIC on the ICE path):  {f / 1e6:6.1f}  "
              f"({min(rates['forward']) / 1e6:.1f}-{max(rates['forward']) / 1e6:.1f})")
        print(f"    through socat on public host p:          {r / 1e6:6.1f}  "
              f"({min(rates['socat']) / 1e6:.1f}-{max(rates['socat']) / 1e6:.1f})  "
              "(the same two hops)")
        print(f"    forward / direct {f / d:.2f}, forward / socat {f / r:.2f}, "
              f"socat / direct {r / d:.2f}")
    print(f"  load average at the end: {os.getloadavg()[0]:.1f} (a shared machine: "
          "the figures are indicative)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
