"""Two tunnel services of one daemon side by side, in network namespaces: an OpenVPN and a
WireGuard session from the same calling host at once; each tunnel carries ping; ending
the OpenVPN session leaves the WireGuard one working; then that ends too and nothing of
either is left (interfaces, processes, allocated ports and addresses)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.lab import wait_for, wait_udp_listening
from tests.lab.agents import SIPMESH

pytestmark = [pytest.mark.slow, pytest.mark.netns,
              pytest.mark.skipif(not all(shutil.which(p) for p in ("openvpn", "wireguard-go", "wg")),
                                 reason="needs openvpn, wireguard-go and wg")]


CONFIG = '''
[agent]
server = "10.10.0.1:5060"
user = "{user}"
state_dir = "{state}"
control_socket = "{sock}"

[allocators.udp]
type = "ports"
range = "41194-41199"
protocols = ["udp"]

[allocators.tunnels]
type = "addresses"
pool = "10.98.0.0/24"

[[service]]
name = "ovpn"
kind = "openvpn"
port = "udp"
addresses = "tunnels"
allow = ["alice"]

[[service]]
name = "vpn"
kind = "wireguard"
port = "udp"
addresses = "tunnels"
allow = ["alice"]
'''


def ping(ns, address: str) -> bool:
    return ns.run(["ping", "-c", "1", "-W", "2", address], check=False, timeout=10).returncode == 0


def test_openvpn_and_wireguard_sessions_side_by_side(netns_factory, tmp_path: Path) -> None:
    sip, home, away = (netns_factory.add(h) for h in ("sip", "home", "away"))
    netns_factory.veth(home, "10.10.1.1/24", sip, "10.10.1.254/24")
    netns_factory.veth(away, "10.10.2.1/24", sip, "10.10.2.254/24")
    sip.enable_forwarding()
    sip.add_addr("lo", "10.10.0.1/32")
    home.add_route("default", via="10.10.1.254")
    away.add_route("default", via="10.10.2.254")
    broker = sip.spawn([SIPMESH, "broker", "--listen", "10.10.0.1:5060", "--db",
                        str(tmp_path / "broker.db"), "--workers", "1", "--domain", "10.10.0.1"],
                       log_path=tmp_path / "broker.log", name="broker")
    wait_udp_listening("10.10.0.1", 5060, sip, 15, proc=broker)
    configs = {}
    for user in ("home", "alice"):  # each host its own state (certificate) and socket
        configs[user] = tmp_path / f"{user}.toml"
        configs[user].write_text(CONFIG.format(user=user, state=tmp_path / f"{user}-state",
                                               sock=tmp_path / f"{user}.sock"))
    daemon = home.spawn([SIPMESH, "daemon", "-c", str(configs["home"]), "-v"],
                        log_path=tmp_path / "daemon.log", name="daemon")
    wait_for(lambda: "ready as sip:home@" in daemon.log_text(), 20, what="the daemon",
             abort=daemon.exit_reason)
    calls = {service: away.spawn([SIPMESH, "call", "home", "--service", service, "-c",
                                  str(configs["alice"]), "-v"],
                                 log_path=tmp_path / f"call-{service}.log", name=service)
             for service in ("ovpn", "vpn")}

    def status() -> dict:
        out = home.run([SIPMESH, "status", "--socket", str(tmp_path / "home.sock"), "--json"])
        return json.loads(out.stdout)

    wait_for(lambda: len([s for s in status()["sessions"] if s["state"] == "established"]) == 2,
             20, what="two established sessions", abort=daemon.exit_reason)
    by_service = {s["service"]: s for s in status()["sessions"]}
    pairs = {name: s["allocated"]["addresses"] for name, s in by_service.items()}
    assert len(set(pairs["ovpn"] + pairs["vpn"])) == 4, pairs  # one pair each, no overlap
    for name in ("ovpn", "vpn"):
        local, remote = pairs[name]
        wait_for(lambda: ping(away, local), 30, what=f"ping across {name}",
                 abort=calls[name].exit_reason)
        assert ping(home, remote)

    calls["ovpn"].stop(grace=10)  # BYE for the OpenVPN session only
    wait_for(lambda: [s["service"] for s in status()["sessions"]] == ["vpn"], 20,
             what="only the WireGuard session to remain")
    assert not ping(away, pairs["ovpn"][0])
    assert ping(away, pairs["vpn"][0]), "ending one session disturbed the other"

    calls["vpn"].stop(grace=10)
    wait_for(lambda: not status()["sessions"], 20, what="no session")
    final = status()
    assert final["allocated"] == {"ports": [], "addresses": []}
    wait_for(lambda: not [l for l in home.links() + away.links() if l.startswith(("tun", "smwg"))],
             15, what="every tunnel interface to go")
    daemon.stop(grace=15)
    assert daemon.returncode == 0, daemon.log_tail(30)
