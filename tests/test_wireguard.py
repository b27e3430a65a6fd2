"""The `wireguard` service: keys stay on their host (never in argv, env, SDP or logs), and a
real tunnel between two network namespaces through a SIP server in a third: ping across,
BYE removes the interfaces on both sides."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from sipmesh.agent.params import Base64Key
from sipmesh.apps import wireguard
from sipmesh.cli.common import register_builtin_kinds
from sipmesh.daemon.allocators import Lease, Ledger
from sipmesh.daemon.config import parse_config
from sipmesh.daemon.service import DaemonSessionInfo
from tests.lab import wait_for, wait_udp_listening
from tests.lab.agents import SIPMESH

register_builtin_kinds()
HAVE_WG = all(shutil.which(p) for p in ("wireguard-go", "wg", "ip"))

CONFIG = '''
[agent]
server = "{server}"
user = "home"
state_dir = "{state}"
{extra}
[allocators.udp]
type = "ports"
range = "51820-51829"
protocols = ["udp"]

[allocators.tunnels]
type = "addresses"
pool = "10.99.0.0/24"

[[service]]
name = "vpn"
kind = "wireguard"
port = "udp"
addresses = "tunnels"
allow = ["alice"]
max_sessions = 4
'''


def test_keys_are_x25519_and_match_wg() -> None:
    private, public = wireguard.keypair()
    Base64Key(32).check(private.decode())
    Base64Key(32).check(public)
    if shutil.which("wg"):
        derived = subprocess.run(["wg", "pubkey"], input=private, capture_output=True, timeout=10)
        assert derived.stdout.decode().strip() == public


@pytest.mark.skipif(not HAVE_WG, reason="needs wireguard-go, wg and ip")
async def test_the_answer_carries_public_keys_only_and_the_key_file_is_private(tmp_path: Path) -> None:
    config = parse_config(CONFIG.format(server="127.0.0.1", state=tmp_path, extra=""))
    profile = config.services["vpn"].profile
    _, caller_public = wireguard.keypair()
    lease = Lease(Ledger(), profile.allocators)
    info = DaemonSessionInfo(role="server", call_id="c1", local_user="home", peer="sip:alice@x",
                             local_ip="127.0.0.1", lease=lease, service="vpn")
    plan = await profile.answer(info, {"IP4": "127.0.0.1", "wg-pubkey": caller_public})
    attributes = plan.attributes
    assert attributes["VPN_LOCAL_ADDR"] == "10.99.0.1" and attributes["VPN_REMOTE_ADDR"] == "10.99.0.2"
    assert 51820 <= int(attributes["PORT"]) <= 51829
    key_file = Path(plan.child.argv[plan.child.argv.index("--key-file") + 1])
    key = key_file.read_bytes().strip()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    derived = subprocess.run(["wg", "pubkey"], input=key, capture_output=True, timeout=10)
    assert derived.stdout.decode().strip() == attributes["wg-pubkey"]
    assert key.decode() not in " ".join(plan.child.argv)
    assert key.decode() not in " ".join(plan.child.env.values())
    assert key.decode() not in " ".join(attributes.values())
    assert plan.child.argv[plan.child.argv.index("--peer-key") + 1] == caller_public
    plan.child.cleanup()
    assert not key_file.parent.exists()
    lease.release()


def test_on_a_path_only_the_caller_initiates_the_first_handshake(tmp_path: Path) -> None:
    """Both ends pointing at each other at once send two initiations that cross, and
    wireguard-go loses both until its 5 s retry: the answering end (--answer-first) sets
    its endpoint only after the caller's handshake came."""
    from sipmesh.agent.handover import UdpEndpoint
    tunnel = wireguard.Tunnel(tmp_path / "k", "smwgtest", address="10.99.0.1",
                              peer_address="10.99.0.2", peer_key="x" * 43 + "=", keepalive=25)
    path = UdpEndpoint("direct", 51820, "192.0.2.7", 40000)
    caller, answerer = tunnel.on(path).argv(), tunnel.on(path, initiate=False).argv()
    for argv in (caller, answerer):
        assert argv[argv.index("--endpoint") + 1] == "192.0.2.7:40000"
    assert "--answer-first" in answerer and "--answer-first" not in caller
    assert "--answer-first" not in tunnel.argv()   # no path: no endpoint to hold back


def test_the_program_reads_and_deletes_the_key_file(tmp_path: Path) -> None:
    private, _ = wireguard.keypair()
    path = wireguard.write_private_key(tmp_path / "run", private)
    assert wireguard._read_and_delete(path) == private
    assert not path.exists()


# ------------------------------------------------------------------------ in namespaces


def links(ns) -> list[str]:
    return [name for name in ns.links() if name.startswith(wireguard.IFNAME_PREFIX)]


@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.skipif(not HAVE_WG, reason="needs wireguard-go, wg and ip")
def test_ping_across_a_wireguard_session_and_bye_removes_both_ends(netns_factory, tmp_path: Path) -> None:
    sip, home, away = (netns_factory.add(h) for h in ("sip", "home", "away"))
    netns_factory.veth(home, "10.10.1.1/24", sip, "10.10.1.254/24")
    netns_factory.veth(away, "10.10.2.1/24", sip, "10.10.2.254/24")
    sip.enable_forwarding()
    sip.add_addr("lo", "10.10.0.1/32")
    home.add_route("default", via="10.10.1.254")
    away.add_route("default", via="10.10.2.254")
    broker = sip.spawn([SIPMESH, "broker", "--listen", "10.10.0.1:5060", "--db",
                        str(tmp_path / "broker.db"), "--workers", "1", "--rate-limit", "0",
                        "--domain", "10.10.0.1"], log_path=tmp_path / "broker.log", name="broker")
    wait_udp_listening("10.10.0.1", 5060, sip, 15, proc=broker)

    config = tmp_path / "daemon.toml"
    config.write_text(CONFIG.format(server="10.10.0.1:5060", state=tmp_path / "state",
                                    extra=f'control_socket = "{tmp_path / "home.sock"}"'))
    daemon = home.spawn([SIPMESH, "daemon", "-c", str(config), "-v"],
                        log_path=tmp_path / "daemon.log", name="daemon")
    wait_for(lambda: "ready as sip:home@" in daemon.log_text(), 15, what="the daemon",
             abort=daemon.exit_reason)
    caller = away.spawn([SIPMESH, "call", "home", "--service", "vpn", "-c", str(config),
                         "--user", "alice", "-v"], log_path=tmp_path / "caller.log",
                        name="caller")
    wait_for(lambda: "wireguard: smwg" in caller.log_text() and "up," in caller.log_text(), 20,
             what="the caller's tunnel", abort=caller.exit_reason)
    wait_for(lambda: "wireguard: smwg" in daemon.log_text(), 10, what="the daemon's tunnel")
    (home_if,), (away_if,) = links(home), links(away)
    assert home_if != away_if  # one wireguard-go socket directory for every namespace

    ping = away.run(["ping", "-c", "3", "-i", "0.2", "-W", "3", "10.99.0.1"], check=False, timeout=30)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    back = home.run(["ping", "-c", "1", "-W", "3", "10.99.0.2"], check=False, timeout=30)
    assert back.returncode == 0, back.stdout + back.stderr

    # each side's public key is the other's peer; the private keys are nowhere to be seen
    show = {}
    for side, ns, iface in (("home", home, home_if), ("away", away, away_if)):
        for kind in ("public-key", "private-key", "peers"):
            show[f"{side}.{kind}"] = ns.run(["wg", "show", iface, kind]).stdout.strip()
    assert show["home.peers"] == show["away.public-key"]
    assert show["away.peers"] == show["home.public-key"]
    secrets = (show["home.private-key"], show["away.private-key"])
    logs = daemon.log_text() + caller.log_text() + broker.log_text()
    assert not any(secret in logs for secret in secrets)
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
            except OSError:
                continue
            assert not any(secret in cmdline or secret in environ for secret in secrets), pid
    assert not list((tmp_path / "state").rglob("private.key"))  # read and deleted at once

    caller.stop(grace=10)  # SIGTERM: the caller sends BYE and takes its tunnel down
    wait_for(lambda: not links(away) and not links(home), 15, what="both interfaces to go")
    assert not Path(f"/var/run/wireguard/{home_if}.sock").exists()
    assert not Path(f"/var/run/wireguard/{away_if}.sock").exists()
    status = home.run([SIPMESH, "status", "--socket", str(tmp_path / "home.sock"), "--json"])
    assert '"sessions": []' in status.stdout and '"addresses": []' in status.stdout
    daemon.stop(grace=15)
    assert daemon.returncode == 0, daemon.log_tail(30)
