"""`sipmesh demo --lab`: the whole story in network namespaces, as root, in seconds.

The lab (sipmesh.lab.topology, the tests' own): an "internet" bridge on 203.0.113.0/24
(TEST-NET-3) with the site (our broker, SIP + STUN, and coturn) and a public host; two
hosts behind home routers and one behind a symmetric NAT, on private LANs. Every agent
is the real `sipmesh` command in its host's namespace. Then:

1. the public host calls a home host by name (`sipmesh serve` / `sipmesh call`, a greeting
   each way): the SIP ladder as the broker saw it;
2. home to home (hole punching) and the symmetric host to both home hosts (coturn):
   a table of the paths ICE chose, why, and how long each took;
3. a mesh of four members (`sipmesh up`) on those same hosts, behind the same NATs: every
   member pings every other, and each member's `sipmesh status` shows its peers' paths
   (ICE on the WireGuard port; the relay is the network's own coturn, whose realm is the
   network's name, as `sipmesh up` authenticates TURN with the network credentials);
4. everything is torn down (processes, interfaces, namespaces), also on Ctrl-C.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

from sipmesh.cli.common import table
from sipmesh.cli.demo import Hop, draw, summarise
from sipmesh.lab.natsite import NatSite, Member
from sipmesh.lab.netns import NetnsFactory, list_netns, netns_unavailable_reason
from sipmesh.lab.procs import ManagedProcess
from sipmesh.lab.topology import NatLab
from sipmesh.lab.waiting import LabTimeout, wait_for

HOSTS = {"site": "public", "pub": "public", "home1": "home", "home2": "home",
         "sym": "symmetric"}
ANSWERING = ("home1", "home2")        # `sipmesh serve` as themselves
PAIRS = [("home2", "home1"), ("sym", "home1"), ("sym", "home2")]   # step 2: caller, callee
NETWORK, POOL = "lab", "100.64.0.0/24"
MESH = {"alice": "pub", "bob": "home1", "carol": "home2", "dave": "sym"}   # member -> host
HELLO = [sys.executable, "-m", "sipmesh.apps.hello"]
PATH_LINE = re.compile(r"path (direct|relayed): (.*?)(?:, rtt ([\d.]+) ms)? \((.*)\)\s*$", re.M)
RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")
GREETING = re.compile(r"\[\w+\] sent a greeting .*")
PREFIX = "smd-"   # the demo's namespaces (the tests' are smt-)
TRACE = re.compile(r"sipmesh\.trace: (send to|received from) \w+:([\d.]+):\d+:$")


class Interrupted(BaseException):
    """SIGINT or SIGTERM: stop the story, tear down, say so. A BaseException, as
    KeyboardInterrupt: the bounded waits treat an Exception from their predicate as "not yet"."""


def lab_unavailable_reason() -> str | None:
    """None when the lab can be built here (root, network namespaces), else why not."""
    return netns_unavailable_reason()


def run_lab_demo(out: TextIO = sys.stdout, *, keep: bool = False) -> int:
    """The story; 0 when every step worked, 130 when interrupted. `keep`: leave the files
    (configurations, logs) for a look afterwards."""
    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    def interrupt(signum: int, _frame: object) -> None:
        raise Interrupted(signal.Signals(signum).name)

    t0 = time.monotonic()
    old = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    run = Path(tempfile.mkdtemp(prefix="sipmesh-demo-"))
    factory: NetnsFactory | None = None
    lab: NatLab | None = None
    site: NatSite | None = None
    code = 1
    try:
        factory = NetnsFactory(prefix=PREFIX)
        lab = NatLab(factory, run_dir=run)
        lab.add_hosts(HOSTS)
        built = time.monotonic() - t0
        say(f"lab built in {built:.2f} s: {len(lab.factory.namespaces)} network namespaces, "
            f"{len(lab.routers)} NAT routers, the internet a bridge on 203.0.113.0/24")
        for name, host in lab.hosts.items():
            seen = "" if host.router is None else f" (behind a {host.kind} NAT, seen as " \
                                                  f"{host.public_ip} on the internet)"
            say(f"  {name:6} {host.ip}{seen}")
        users = ["pub", *ANSWERING, "sym"]
        site = NatSite(lab, run, users, host="site",
                       networks={NETWORK: (POOL, list(MESH))})
        site.start(trace=True)
        say(f"  site: broker (SIP registrar + proxy + STUN) on {site.server}, "
            f"coturn (TURN relay) on {site.coturn.ip}:{site.coturn.port}, and for the "
            f"network {NETWORK}'s members on {site.network_turns[NETWORK].port}"
            f"  [{time.monotonic() - t0:.2f} s]")
        say(f"  files (configurations, logs): {run}, " + ("kept" if keep else "deleted at the end"))
        ok = _story(lab, site, say)
        code = 0 if ok else 1
    except Interrupted as exc:
        say(f"\ninterrupted ({exc}): tearing everything down")
        code = 130
    except (LabTimeout, subprocess.SubprocessError, OSError) as exc:
        say(f"\nthe demo failed: {exc}")
        code = 1
    finally:
        for sig in old:   # a second Ctrl-C must not leave half a lab behind
            signal.signal(sig, signal.SIG_IGN)
        say("\n4. teardown")
        started = time.monotonic()
        processes = len(site.procs) + 1 + len(site.network_turns) if site is not None else 0
        namespaces = len(factory.namespaces) if factory is not None else 0
        if site is not None:
            site.stop()
        if lab is not None:
            lab.close()
        if factory is not None:
            factory.close()
        if not keep:
            shutil.rmtree(run, ignore_errors=True)
        left = [name for name in list_netns() if name.startswith(PREFIX)]
        alive = [p for p in (site.procs if site else []) if p.alive()]
        say(f"  stopped {processes} processes, deleted {namespaces} namespaces with their "
            f"interfaces in {time.monotonic() - started:.2f} s")
        say("  left behind: " + ("nothing" if not left and not alive else
                                 f"namespaces {left}, processes {alive}"))
        for sig, handler in old.items():
            signal.signal(sig, handler)
    say(f"\ntotal {time.monotonic() - t0:.1f} s: " +
        {0: "OK", 130: "interrupted"}.get(code, "FAILED"))
    return code


def _story(lab: NatLab, site: NatSite, say) -> bool:
    ok = True
    serve = {host: site.serve(host, host, "--app-port", "40000", "--", *HELLO)
             for host in ANSWERING}

    say("\n1. pub calls home1 by name; home1 sits behind a home router, the broker knows "
        "where")
    mark = len(site.broker.log_text())
    row = _session(site, "pub", "pub", "home1")
    hops = _ladder(site.broker.log_text()[mark:])
    home1 = lab["home1"]
    lanes = {lab["pub"].ip: "pub", site.host.ip: "broker", home1.public_ip: "home1"}
    say(f"  SIP ladder, as the broker saw it (home1 appears as its router, {home1.public_ip}; "
        "a= lines in brackets):")
    for line in draw(hops, lanes, ["pub", "broker", "home1"]):
        say("  " + line)
    say(f"  {row['said']}")
    rows = [row]

    say("\n2. home to home, and the symmetric NAT: ICE checks every pair of addresses and "
        "takes the best that works")
    for caller, callee in PAIRS:
        rows.append(_session(site, caller, caller, callee))
        say(f"  {caller} -> {callee}: {rows[-1]['path']}; {rows[-1]['said']}")
    say("")
    for line in table([[f"{r['caller']} -> {r['callee']}", r["path"], r["after"], r["data"],
                         r["rtt"], r["why"]] for r in rows],
                       ["pair", "path", "path after", "answer after", "rtt", "why"]):
        say("  " + line)
    say("  (times from `sipmesh call` starting: to the path ICE chose -- registration, STUN and "
        "TURN, the checks -- and to the answer to the greeting sent on it; a relayed program "
        "sends to sipmesh's relay proxy on 127.0.0.1)")
    ok = all(r["ok"] for r in rows)
    for proc in serve.values():
        proc.stop(grace=5)

    say(f"\n3. a mesh: {', '.join(MESH)} run `sipmesh up {NETWORK}`, every member pings "
        "every other")
    ok = _mesh(lab, site, say) and ok
    return ok


def _session(site: NatSite, caller_host: str, caller: str, callee: str) -> dict:
    """One `sipmesh call CALLEE -- hello` from `caller_host`; what the table shows."""
    start = time.monotonic()
    call = site.call(caller_host, caller, callee, "--timeout", "20", "--", *HELLO)
    found = wait_for(lambda: PATH_LINE.search(call.log_text()), 30, 0.01,
                     what=f"{caller} -> {callee}: a path", abort=call.exit_reason)
    after = time.monotonic() - start
    greeting = wait_for(lambda: GREETING.search(call.log_text()) or not call.alive(), 40, 0.01,
                        what=f"{caller} -> {callee}: the greeting's answer")
    data = time.monotonic() - start
    code = _exit(call, 30)
    kind, pair, rtt, why = found.groups()
    ok = code == 0 and greeting is not True
    return {"caller": caller, "callee": callee, "path": kind, "why": why, "pair": pair,
            "after": f"{after:.2f} s", "data": f"{data:.2f} s" if ok else "NONE",
            "rtt": f"{float(rtt):.1f} ms" if rtt else "-", "ok": ok,
            "said": greeting.group(0) if ok else f"no greeting came back (exit {code})"}


def _exit(proc: ManagedProcess, timeout: float) -> int | None:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def _ladder(log: str) -> list[Hop]:
    """The SIP messages of a broker log (``--debug``), as hops between IP addresses."""
    hops: list[Hop] = []
    lines = log.split("\n")
    i = 0
    while i < len(lines):
        head = TRACE.search(lines[i].rstrip("\r"))
        i += 1
        if not head:
            continue
        body = []
        while i < len(lines) and not RECORD.match(lines[i]):
            body.append(lines[i].rstrip("\r"))
            i += 1
        text = "\r\n".join(body)
        direction, peer = head.groups()
        sender, receiver = ("broker", peer) if direction == "send to" else (peer, "broker")
        hops.append(Hop(sender, receiver, summarise(text)))
    return hops


def _mesh(lab: NatLab, site: NatSite, say) -> bool:
    start = time.monotonic()
    members = {user: site.member(host, user, NETWORK) for user, host in MESH.items()}
    addresses = {}
    for user, member in members.items():
        addresses[user] = wait_for(member.mesh_ip, 30, what=f"{user} up in {NETWORK}",
                                   abort=member.proc.exit_reason)
    say(f"  all {len(members)} up in {time.monotonic() - start:.2f} s: " +
        ", ".join(f"{u} {a} ({MESH[u]})" for u, a in addresses.items()))
    pings = _ping_all(members, addresses)
    say("  every pair, as each member's `sipmesh status` shows it, and its first ping reply:")
    rows = []
    for user, member in members.items():
        peers = {p["name"]: p for p in member.status().get("peers", [])}
        for other in members:
            if other != user:
                peer = peers.get(other, {})
                took = pings[user, other]
                rtt = peer.get("rtt_ms")
                rows.append([f"{user} -> {other}", peer.get("path", "missing"),
                             f"{took:.2f} s" if took is not None else "NO REPLY",
                             f"{rtt:.1f} ms" if rtt is not None else "-", peer.get("why", "")])
    for line in table(rows, ["pair", "path", "first reply", "rtt", "why"]):
        say("  " + line)
    return all(t is not None for t in pings.values())


def _ping_all(members: dict[str, Member], addresses: dict[str, str],
              timeout: float = 15.0) -> dict[tuple[str, str], float | None]:
    """Every member pings every other, all at once, each until a first reply (or
    `timeout`): the seconds it took per pair."""
    start = time.monotonic()
    pending: dict[tuple[str, str], subprocess.Popen | None] = {
        (a, b): None for a in members for b in members if a != b}
    took: dict[tuple[str, str], float | None] = {}
    while pending and time.monotonic() - start < timeout:
        for (a, b), proc in list(pending.items()):
            if proc is None:
                pending[a, b] = members[a].host.popen(
                    ["ping", "-c1", "-W1", addresses[b]], stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)
            elif proc.poll() is not None:
                if proc.returncode == 0:
                    took[a, b] = time.monotonic() - start
                    del pending[a, b]
                else:
                    pending[a, b] = None
        time.sleep(0.02)
    for pair, proc in pending.items():
        if proc is not None:
            proc.kill()
            proc.wait()
        took[pair] = None
    return {pair: took[pair] for pair in sorted(took)}


