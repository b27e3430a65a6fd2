"""WireGuard and OpenVPN sessions across NAT (issue 11, item 4), in the NAT lab of
sipmesh/lab/topology.py with our broker (SIP and STUN) and coturn (sipmesh/lab/natsite.py).

The answering hosts run `sipmesh daemon` with a `wireguard` and an `openvpn` service; a
caller runs `sipmesh call HOST --service ...` (and once `sipmesh serve/call --app ...`).
For each pair kind the session's path is direct or relayed as the daemon's `sipmesh status
--json` and the caller's progress say, ping crosses the tunnel both ways, and the tunnel
program uses the path ICE checked: it is bound to the path's local port and sends to the
path's remote end (the peer's NAT, or our relay proxy on 127.0.0.1). Ending the call
(SIGTERM: BYE) removes both ends. A host whose router drops all UDP gets its tunnel
through the relay over TURN/TCP.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tests.lab import (ManagedProcess, NatLab, coturn_unavailable_reason,
                       kamailio_unavailable_reason, netns_unavailable_reason, wait_for)
from tests.lab.natsite import NatSite, tunnel_services

pytestmark = [pytest.mark.slow, pytest.mark.netns,
              pytest.mark.skipif(not all(shutil.which(p) for p in
                                         ("openvpn", "wireguard-go", "wg", "ping")),
                                 reason="needs openvpn, wireguard-go, wg and ping")]

ANSWERING = ("a", "b", "s2")
CALLING = ("p", "a", "s", "u")
HOSTS = {"broker": "public", "p": "public", "a": "home", "b": "home",
         "s": "symmetric", "s2": "symmetric", "u": "udp_blocked"}
POOLS = {"a": "10.91.0.0/24", "b": "10.92.0.0/24", "s2": "10.93.0.0/24",
         "p": "10.94.0.0/24", "s": "10.95.0.0/24",
         "u": "10.89.0.0/24"}

@dataclass
class TunnelLab:
    lab: NatLab
    site: NatSite
    daemons: dict[str, ManagedProcess]

    def services(self, host: str) -> str:
        return tunnel_services(POOLS[host])


def build_tunnel_lab(run: Path, server: str, hosts: dict[str, str],
                     answering: tuple[str, ...]) -> Iterator[TunnelLab]:
    """The lab of `hosts`, the SIP `server` (broker or kamailio) and coturn on "broker",
    a daemon with the tunnel services on each `answering` host."""
    for reason in (netns_unavailable_reason(), coturn_unavailable_reason()):
        if reason:
            pytest.skip(reason)
    with NatLab() as lab:
        lab.add_hosts(hosts)
        users = list(answering) + [f"{h}c" for h in CALLING if h in hosts] + ["aw", "bw"]
        site = NatSite(lab, run, users, server=server).start()
        try:
            daemons = {host: site.daemon(host, tunnel_services(POOLS[host]))
                       for host in answering}
            yield TunnelLab(lab, site, daemons)
        finally:
            site.stop()


@pytest.fixture(scope="module")
def tunnel_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TunnelLab]:
    yield from build_tunnel_lab(tmp_path_factory.mktemp("tunnels"), "broker", HOSTS, ANSWERING)


@pytest.fixture(scope="module")
def kamailio_tunnel_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TunnelLab]:
    """The same with Kamailio (docs/kamailio/kamailio.cfg) as the SIP and STUN server."""
    if kamailio_unavailable_reason():
        pytest.skip(str(kamailio_unavailable_reason()))
    yield from build_tunnel_lab(tmp_path_factory.mktemp("tunnels-kamailio"), "kamailio", HOSTS, ANSWERING)


def tunnel_links(host) -> list[str]:
    out = host.run(["ip", "-o", "link", "show"]).stdout
    return re.findall(r"^\d+: ((?:smwg|tun)\w*)", out, re.M)


def udp_owner(host, port: int) -> str:
    """The program bound to UDP `port` in `host` (from ss), '' if none."""
    out = host.run(["ss", "-uanpH", f"sport = :{port}"], check=False).stdout
    found = re.search(r'users:\(\("([^"]+)"', out)
    return found.group(1) if found else ""


PAIRS = [("a", "b", "direct"),     # home <-> home: both NATs punched
         ("p", "a", "direct"),     # public <-> home
         ("s", "a", "relayed"),    # symmetric <-> home: coturn
         ("s", "s2", "relayed")]   # symmetric <-> symmetric


KAMAILIO_PAIRS = PAIRS   # the WireGuard row again, with Kamailio as the SIP server


@pytest.mark.parametrize("service", ["vpn", "ovpn"])
@pytest.mark.parametrize("caller, callee, kind", PAIRS, ids=[f"{c}-{d}" for c, d, _ in PAIRS])
def test_tunnel_across_nat(tunnel_lab: TunnelLab, caller: str, callee: str, kind: str,
                           service: str) -> None:
    tunnel_across_nat(tunnel_lab, caller, callee, kind, service)


@pytest.mark.parametrize("caller, callee, kind", KAMAILIO_PAIRS,
                         ids=[f"{c}-{d}" for c, d, _ in KAMAILIO_PAIRS])
def test_wireguard_across_nat_with_kamailio(kamailio_tunnel_lab: TunnelLab, caller: str,
                                            callee: str, kind: str) -> None:
    """The WireGuard row of the matrix with unmodified Kamailio as the SIP server."""
    tunnel_across_nat(kamailio_tunnel_lab, caller, callee, kind, "vpn")


def tunnel_across_nat(tunnel_lab: TunnelLab, caller: str, callee: str, kind: str,
                      service: str) -> None:
    lab, site = tunnel_lab.lab, tunnel_lab.site
    user = f"{caller}c"
    start = time.monotonic()
    call = site.call(caller, user, callee, "--service", service,
                     services=tunnel_lab.services(caller))
    try:
        session = wait_for(lambda: _session(site, callee, service), 30,
                           what=f"{callee}'s {service} session on a path",
                           abort=call.exit_reason)
        path = session["path"]
        assert path["kind"] == kind, (path, call.log_tail(30))
        wait_for(lambda: f"path {kind}: " in call.log_text(), 10, what="the caller's path",
                 abort=call.exit_reason)
        local, remote = session["allocated"]["addresses"]
        wait_for(lambda: _tunnel_route(lab[caller], local), 20, what="the caller's tunnel up",
                 abort=call.exit_reason)
        ping = lab[caller].run(["ping", "-c", "1", "-w", "20", local], check=False, timeout=30)
        first_ping = time.monotonic() - start
        assert ping.returncode == 0, ping.stdout + call.log_tail(40) + \
            tunnel_lab.daemons[callee].log_tail(40)
        back = lab[callee].run(["ping", "-c", "1", "-w", "5", remote], check=False, timeout=15)
        assert back.returncode == 0, back.stdout
        print(f"{caller}->{callee} {service} {kind}: first ping {first_ping:.2f} s after the call")

        # the program took the path: bound to its local port, sending to its remote end
        program = path["program"]
        owner = "wireguard-go" if service == "vpn" else "openvpn"
        assert udp_owner(lab[callee], program["local_port"]) == owner, program
        if service == "vpn":
            [ifname] = [n for n in tunnel_links(lab[callee]) if n.startswith("smwg")]
            endpoints = lab[callee].run(["wg", "show", ifname, "endpoints"]).stdout.split()
            assert endpoints[1] == program["remote"], (endpoints, program)
            port = lab[callee].run(["wg", "show", ifname, "listen-port"]).stdout.strip()
            assert port == str(program["local_port"])
        if kind == "direct":
            if service == "ovpn":   # OpenVPN talks through the agent's end: it follows moves
                assert program["proxied"] and program["remote"].startswith("127.0.0.1:")
                peer = path["remote"].split()[1]     # the pair: "srflx ADDRESS:PORT"
            else:
                assert not program["proxied"]
                peer = program["remote"]
            if callee != "p":   # the caller's NAT, as the callee's checks saw it
                assert peer.startswith(lab[caller].public_ip + ":"), (path, program)
    finally:
        call.stop(grace=10)
    assert call.returncode == 0, call.log_tail(30)
    wait_for(lambda: not _sessions(site, callee), 15, what=f"{callee}'s session gone")
    wait_for(lambda: not tunnel_links(lab[caller]) and not tunnel_links(lab[callee]), 15,
             what="both tunnel interfaces gone")


def _tunnel_route(host, address: str) -> bool:
    route = host.run(["ip", "route", "get", address], check=False).stdout
    return re.search(r"dev (smwg|tun)", route) is not None


def _sessions(site: NatSite, host: str) -> list[dict]:
    return site.status(host)["sessions"]


def _session(site: NatSite, host: str, service: str) -> dict | None:
    for session in _sessions(site, host):
        if session["service"] == service and (session.get("path") or {}).get("program"):
            return session
    return None


@pytest.mark.parametrize("app", ["wireguard", "openvpn"])
def test_serve_and_call_app_across_nat(tunnel_lab: TunnelLab, app: str) -> None:
    """`sipmesh serve --app APP` behind one home router, `sipmesh call --app APP` behind
    another: the same tunnel on the direct path, with the paper's tunnel addresses."""
    lab, site = tunnel_lab.lab, tunnel_lab.site
    serve = site.serve("b", "bw", "--app", app, "--vpn-local", "10.90.0.1", "--once")
    call = site.call("a", "aw", "bw", "--app", app)
    try:
        wait_for(lambda: "path direct: " in call.log_text(), 30, what="the caller's path",
                 abort=call.exit_reason)
        wait_for(lambda: _tunnel_route(lab["a"], "10.90.0.1"), 20, what="the caller's tunnel",
                 abort=call.exit_reason)
        ping = lab["a"].run(["ping", "-c", "1", "-w", "20", "10.90.0.1"], check=False,
                            timeout=30)
        assert ping.returncode == 0, ping.stdout + call.log_tail(30) + serve.log_tail(30)
        assert "path direct: " in serve.log_text()
    finally:
        call.stop(grace=10)
    assert call.returncode == 0, call.log_tail(30)
    assert serve.wait(20) == 0, serve.log_tail(30)   # --once: done after the session
    wait_for(lambda: not tunnel_links(lab["a"]) and not tunnel_links(lab["b"]), 15,
             what="both tunnel interfaces gone")


@pytest.mark.parametrize("service", ["vpn", "ovpn"])
def test_tunnel_from_a_network_without_udp(tunnel_lab: TunnelLab, service: str) -> None:
    """u's router drops every UDP packet: SIP over TCP, the tunnel's datagrams through our
    relay proxy as ChannelData over TURN/TCP."""
    lab, site = tunnel_lab.lab, tunnel_lab.site
    call = site.call("u", "uc", "a", "--service", service, "--transport", "tcp",
                     services=tunnel_lab.services("u"))
    try:
        session = wait_for(lambda: _session(site, "a", service), 30,
                           what=f"a's {service} session on a path", abort=call.exit_reason)
        assert session["path"]["kind"] == "relayed"
        wait_for(lambda: "UDP is blocked on our network: relayed over TURN/TCP" in
                 call.log_text(), 10, what="the caller's path", abort=call.exit_reason)
        local, remote = session["allocated"]["addresses"]
        wait_for(lambda: _tunnel_route(lab["u"], local), 20, what="u's tunnel up",
                 abort=call.exit_reason)
        ping = lab["u"].run(["ping", "-c", "1", "-w", "20", local], check=False, timeout=30)
        assert ping.returncode == 0, ping.stdout + call.log_tail(40)
        back = lab["a"].run(["ping", "-c", "1", "-w", "5", remote], check=False, timeout=15)
        assert back.returncode == 0, back.stdout
    finally:
        call.stop(grace=10)
    assert call.returncode == 0, call.log_tail(30)
    wait_for(lambda: not tunnel_links(lab["u"]) and not tunnel_links(lab["a"]), 15,
             what="both tunnel interfaces gone")
