"""End to end with real OpenVPN 2.6 in network namespaces made by the test.

Topology (no NAT): a broker host and two PCs on three subnets joined by a router.

    pc1 10.91.1.2 --- 10.91.1.1 [router] 10.91.2.1 --- 10.91.2.2 pc2
                                10.91.3.1
                                    |
                            10.91.3.2 broker (Kamailio, optionally rewriting SDP)

PC1 serves as 2500, PC2 calls 2500 by name; ping crosses the tunnel both ways; when
PC2's OpenVPN is killed, PC2's agent sends BYE and PC1's OpenVPN is stopped by it.
Done with the OpenVPN profile (certificates + fingerprints in a= lines) and with the
paper's own scripts through sip_app (static key), each also through a Kamailio that
rewrites c=/o=/m= like siproxd.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from sipmesh.agent.errors import Exit
from tests.lab import Kamailio, Netns, NetnsFactory, wait_for
from tests.lab.fixtures import stopped_gracefully
from tests.lab.agents import SIP_APP, SIPMESH, no_orphans  # noqa: F401 (fixture)
from tests.lab.broker import BrokerServer

pytestmark = [pytest.mark.slow, pytest.mark.netns,
              pytest.mark.skipif(shutil.which("openvpn") is None, reason="openvpn not installed")]

PAPER = Path(__file__).resolve().parent.parent / "examples" / "paper"
TUN_SERVER, TUN_CLIENT = "192.168.234.1", "192.168.234.2"


@dataclass
class Net:
    broker: Netns
    router: Netns
    pc1: Netns
    pc2: Netns
    broker_ip: str = "10.91.3.2"
    pc1_ip: str = "10.91.1.2"
    pc2_ip: str = "10.91.2.2"


@pytest.fixture
def net(netns_factory: NetnsFactory) -> Net:
    router = netns_factory.add("rt")
    pc1, pc2, broker = netns_factory.add("pc1"), netns_factory.add("pc2"), netns_factory.add("brk")
    for host, subnet in ((pc1, 1), (pc2, 2), (broker, 3)):
        netns_factory.veth(host, f"10.91.{subnet}.2/24", router, f"10.91.{subnet}.1/24")
        netns_factory.route(host, "default", via=f"10.91.{subnet}.1")
    netns_factory.enable_forwarding(router)
    return Net(broker=broker, router=router, pc1=pc1, pc2=pc2)


@pytest.fixture(params=["broker", "kamailio", "kamailio-rewriting-sdp"])
def server(request, net: Net, kamailio, tmp_path):
    """The broker host's SIP server: ours, Kamailio, Kamailio rewriting c=/o=/m= (siproxd-like)."""
    if request.param == "broker":
        broker = BrokerServer(tmp_path / "broker", host=net.broker_ip, port=5060, netns=net.broker)
        yield broker
        broker.stop()
        return
    yield kamailio(netns=net.broker, host=net.broker_ip, port=5060,
                   sdp_rewrite=request.param.endswith("sdp"), sdp_fake_ip="10.91.3.254",
                   sdp_fake_port=9)


@pytest.fixture
def agents(server, spawn_proc):
    """Processes stopped (gracefully) before the SIP server and the namespaces go away."""
    with stopped_gracefully(spawn_proc) as start:
        yield start


def pids_in(ns: Netns, word: str, *, comm: bool = False) -> list[int]:
    """Processes in `ns` whose command line contains `word`, or (comm) whose name is `word`;
    zombies excluded."""
    out = subprocess.run(["ip", "netns", "pids", ns.name], capture_output=True, text=True,
                         timeout=10).stdout.split()
    found = []
    for pid in out:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            if comm:
                if Path(f"/proc/{pid}/comm").read_text().strip() == word:
                    found.append(int(pid))
            elif word in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                found.append(int(pid))
        except OSError:
            pass
    return found


def openvpn_pids(ns: Netns) -> list[int]:
    return pids_in(ns, "openvpn", comm=True)


def ping(ns: Netns, address: str, count: int = 1) -> bool:
    return ns.run(["ping", "-c", str(count), "-W", "1", "-i", "0.2", address],
                  check=False, timeout=20).returncode == 0


def check_tunnel_and_teardown(net: Net, server: Kamailio, serve, call, *,
                              wrapped: bool = False) -> None:
    """Ping both ways, kill PC2's OpenVPN, see PC1's stopped by the BYE; then SIGTERM to
    PC1's agent unregisters it and leaves nothing running. `wrapped`: the agent runs under
    the paper's shell script, which itself dies of the SIGTERM."""
    wait_for(lambda: ping(net.pc2, TUN_SERVER), 45, 0.5, what="tunnel up (pc2 -> pc1)",
             abort=lambda: serve.exit_reason() or call.exit_reason())
    assert ping(net.pc1, TUN_CLIENT, 3), "pc1 -> pc2 through the tunnel"
    assert ping(net.pc2, TUN_SERVER, 3), "pc2 -> pc1 through the tunnel"
    assert openvpn_pids(net.pc1) and openvpn_pids(net.pc2)
    for pid in openvpn_pids(net.pc2):
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not openvpn_pids(net.pc1), 20, 0.1,
             what="pc1's OpenVPN stopped after the BYE")
    # The caller's own program was killed, and not by sipmesh: the session ran, the program failed.
    assert call.wait(20) == Exit.APPLICATION, call.log_tail(40)
    # (the paper's wrapper script exits 128 + 9 for its killed OpenVPN)
    assert any(how in call.log_text() for how in ("killed by SIGKILL", "exited with status 137")), \
        call.log_tail(40)
    assert serve.alive(), serve.log_tail(40)
    assert server.registered("2500") and not server.registered("2501")
    assert not ping(net.pc2, TUN_SERVER)
    if wrapped:  # as Ctrl-C in the paper's terminal: the script and sip_app get the signal
        os.killpg(serve.pid, signal.SIGTERM)
        wait_for(lambda: not pids_in(net.pc1, "sip_app"), 15, 0.1, what="sip_app exited")
    else:
        serve.stop(grace=10)
        assert serve.returncode == 0, serve.log_tail(20)
    assert not server.registered("2500")
    assert not openvpn_pids(net.pc1) and not openvpn_pids(net.pc2), "OpenVPN left running"


def test_openvpn_profile_between_two_subnets(net, server, agents, tmp_path):
    common = ["--server", net.broker_ip, "--app", "openvpn", "--sip-port", "5060", "-v"]
    serve = agents([SIPMESH, "serve", "--user", "2500", "--state-dir", str(tmp_path / "pc1"),
                    *common], netns=net.pc1, name="serve")
    wait_for(lambda: "ready: contact" in serve.log_text(), 15, abort=serve.exit_reason)
    assert server.registered("2500")
    call = agents([SIPMESH, "call", "2500", "--user", "2501", "--state-dir", str(tmp_path / "pc2"),
                   *common], netns=net.pc2, name="call")
    check_tunnel_and_teardown(net, server, serve, call)
    # the fingerprints travelled in a= lines and each side pinned the other's
    log = serve.log_text() + call.log_text()
    assert "session established" in log
    for side in ("pc1", "pc2"):
        assert (tmp_path / side / "openvpn" / "host.crt").exists()
        assert not list((tmp_path / side / "run").iterdir()), "per-session config left behind"


def _paper_dir(base: Path, broker_ip: str) -> Path:
    """examples/paper with only the binary paths and the addresses changed."""
    base.mkdir(parents=True)
    openvpn = shutil.which("openvpn")
    for f in PAPER.iterdir():
        if f.is_file():
            text = f.read_text()
            text = text.replace("/usr/local/sbin/openvpn", openvpn)
            text = text.replace("./sip_app", SIP_APP).replace("202.26.159.131", broker_ip)
            (base / f.name).write_text(text)
            (base / f.name).chmod(f.stat().st_mode)
    return base


def test_paper_scripts_through_sip_app_with_a_static_key(net, server, agents, tmp_path):
    pc1 = _paper_dir(tmp_path / "pc1", net.broker_ip)
    pc2 = _paper_dir(tmp_path / "pc2", net.broker_ip)
    subprocess.run(["openvpn", "--genkey", "secret", str(pc1 / "default.key")], check=True,
                   capture_output=True, timeout=30)
    shutil.copy(pc1 / "default.key", pc2 / "default.key")
    serve = agents([str(pc1 / "servertest.sh")], cwd=pc1, netns=net.pc1, name="servertest")
    wait_for(lambda: server.registered("2500"), 15, 0.1, what="2500 registered",
             abort=serve.exit_reason)
    assert "VPN_PORT 8000" in serve.log_text()  # the prototype's start-up lines
    call = agents([str(pc2 / "clienttest.sh")], cwd=pc2, netns=net.pc2, name="clienttest")
    check_tunnel_and_teardown(net, server, serve, call, wrapped=True)
    # -d -f ./log/...: the protocol log, with the paper's a= lines in the 200 OK
    logs = list((pc1 / "log").glob("server*.txt"))
    assert logs and "a=VPN_REMOTE_ADDR:192.168.234.2" in logs[0].read_text()
    client_log = next((pc2 / "log").glob("client*.txt")).read_text()
    assert f"a=IP4:{net.pc1_ip}" in client_log and "a=PORT:8000" in client_log
    if server.sdp_rewrite:
        assert "c=IN IP4 10.91.3.254" in client_log  # rewritten, and still it worked
