"""What the tunnel programs are told, with and without an ICE path (agent/handover.py's
UdpEndpoint): without one exactly the paper's values as before; with one the path's local
port to bind, its remote end as the peer, and a keepalive under conntrack's 30 s. The
programs themselves run in tests/test_tunnels_nat.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from sipmesh.agent.errors import AgentError
from sipmesh.agent.handover import KEEPALIVE, UdpEndpoint
from sipmesh.agent.profile import SessionInfo
from sipmesh.apps import wireguard
from sipmesh.apps.openvpn import OpenVPNProfile
from sipmesh.apps.wireguard import WireGuardProfile

DIRECT = UdpEndpoint("direct", 40001, "203.0.113.7", 51999)
PROXIED = UdpEndpoint("relayed", 40002, "127.0.0.1", 35000, proxied=True)


def info(role: str, path: UdpEndpoint | None = None) -> SessionInfo:
    return SessionInfo(role=role, call_id="c1", local_user="me", peer="sip:peer@x",
                       local_ip="10.1.0.2", path=path)


def option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


@pytest.fixture
def wg(tmp_path: Path) -> WireGuardProfile:
    return WireGuardProfile(app_port=51820, vpn_local="10.90.0.1", state_dir=tmp_path)


async def test_wireguard_answer_without_a_path_listens_on_its_port(wg: WireGuardProfile) -> None:
    _, caller_key = wireguard.keypair()
    plan = await wg.answer(info("server"), {"IP4": "10.2.0.2", "wg-pubkey": caller_key})
    try:
        argv = plan.child.argv
        assert option(argv, "--listen-port") == plan.attributes["PORT"] == str(plan.path_port)
        assert option(argv, "--endpoint") is None and option(argv, "--keepalive") is None
        assert plan.attributes["VPN_LOCAL_ADDR"] == "10.90.0.1"
    finally:
        plan.child.cleanup()


@pytest.mark.parametrize("path", [DIRECT, PROXIED])
async def test_wireguard_answer_on_a_path_binds_its_port_and_points_at_its_far_end(
        wg: WireGuardProfile, path: UdpEndpoint) -> None:
    _, caller_key = wireguard.keypair()
    plan = await wg.answer(info("server"), {"IP4": "10.2.0.2", "wg-pubkey": caller_key})
    try:
        child = wg.answer_child(info("server", path), plan)
        argv = child.argv
        assert option(argv, "--listen-port") == str(path.local_port)
        assert option(argv, "--endpoint") == f"{path.remote_ip}:{path.remote_port}"
        assert int(option(argv, "--keepalive")) <= KEEPALIVE <= 15
        # the same key (already sent as a=wg-pubkey) and interface as the plan's program
        for name in ("--key-file", "--ifname", "--ready-file", "--peer-key"):
            assert option(argv, name) == option(plan.child.argv, name)
        assert child.env["SIPMESH_LOCAL_PORT"] == str(path.local_port)
        assert child.env["SIPMESH_PATH"] == path.kind
    finally:
        plan.child.cleanup()
    assert not Path(option(argv, "--key-file")).parent.exists()


async def test_wireguard_caller_with_and_without_a_path(wg: WireGuardProfile) -> None:
    offer = wg.offer(info("client"))
    _, answer_key = wireguard.keypair()
    answer = {"IP4": "203.0.113.9", "PORT": "51820", "VPN_LOCAL_ADDR": "10.90.0.1",
              "VPN_REMOTE_ADDR": "10.90.0.2", "wg-pubkey": answer_key}
    paper = wg.caller_child(info("client"), offer, answer)
    on_path = wg.caller_child(info("client", DIRECT), offer, answer)
    try:
        assert option(paper.argv, "--listen-port") is None           # any port, as before
        assert option(paper.argv, "--endpoint") == "203.0.113.9:51820"
        assert option(paper.argv, "--keepalive") == "25"
        assert option(on_path.argv, "--listen-port") == "40001"
        assert option(on_path.argv, "--endpoint") == "203.0.113.7:51999"
        assert option(on_path.argv, "--keepalive") == "15"
    finally:
        paper.cleanup()
        on_path.cleanup()


def config_lines(child) -> list[str]:
    return Path(child.argv[child.argv.index("--config") + 1]).read_text().splitlines()


@pytest.fixture
def ovpn(tmp_path: Path) -> OpenVPNProfile:
    return OpenVPNProfile(state_dir=tmp_path, app_port=41194)


async def test_openvpn_answer_on_a_path_replaces_its_configuration(ovpn: OpenVPNProfile) -> None:
    offer = {"IP4": "10.2.0.2", "fingerprint": ovpn.offer(info("client"))["fingerprint"]}
    plan = await ovpn.answer(info("server"), offer)
    paper = config_lines(plan.child)
    first = Path(plan.child.argv[plan.child.argv.index("--config") + 1]).parent
    assert f"lport {plan.attributes['PORT']}" in paper and not any(
        line.startswith("remote ") for line in paper)
    plan.child = ovpn.answer_child(info("server", DIRECT), plan)
    try:
        lines = config_lines(plan.child)
        assert "lport 40001" in lines and "remote 203.0.113.7 51999" in lines
        assert "float" in lines and "tls-server" in lines and "ping 10" in lines
        assert not first.exists()     # the plan's first configuration is gone
    finally:
        plan.child.cleanup()


def test_openvpn_caller_with_and_without_a_path(ovpn: OpenVPNProfile) -> None:
    answer = {"IP4": "203.0.113.9", "PORT": "41194", "VPN_LOCAL_ADDR": "192.168.234.1",
              "VPN_REMOTE_ADDR": "192.168.234.2",
              "fingerprint": ovpn.offer(info("client"))["fingerprint"]}
    paper = ovpn.caller_child(info("client"), {}, answer)
    on_path = ovpn.caller_child(info("client", PROXIED), {}, answer)
    try:
        assert {"remote 203.0.113.9 41194", "nobind"} <= set(config_lines(paper))
        lines = config_lines(on_path)
        assert {"lport 40002", "remote 127.0.0.1 35000", "float"} <= set(lines)
        assert "nobind" not in lines
    finally:
        paper.cleanup()
        on_path.cleanup()


def test_openvpn_ping_must_keep_a_nat_mapping(tmp_path: Path) -> None:
    with pytest.raises(AgentError, match="ping must be 1..15 s"):
        OpenVPNProfile(state_dir=tmp_path, ping=25)
