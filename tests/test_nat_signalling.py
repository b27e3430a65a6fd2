"""SIP signalling through home routers (issue 11 item 2), in network namespaces.

The lab (tests/lab/natlab_sig.py): the SIP server and a public host on an "internet"
bridge, hosts `a` and `b` each behind a home router (MASQUERADE + a WAN filter that
drops everything unsolicited). A STUN client learns its public address from the
server's SIP port, with our broker and with Kamailio (docs/kamailio/kamailio.cfg).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from sipmesh.broker.users import UsersFile
from tests.lab import Kamailio, kamailio_unavailable_reason, spawn, wait_udp_listening
from tests.lab.natlab_sig import Host, SignallingLab

pytestmark = [pytest.mark.slow, pytest.mark.netns]

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
SIPMESH = str(Path(sys.executable).parent / "sipmesh")
DOCS_CFG = ROOT / "docs" / "kamailio" / "kamailio.cfg"
PORT = 5060
PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw", "carol": "carol-pw", "dave": "dave-pw"}
needs_kamailio = pytest.mark.skipif(kamailio_unavailable_reason() is not None,
                                    reason=str(kamailio_unavailable_reason()))


@dataclass
class Server:
    kind: str
    host: Host
    log: Callable[[], str]
    passwords: dict[str, str] = field(default_factory=dict)

    @property
    def hostport(self) -> str:
        return f"{self.host.ip}:{PORT}"


@dataclass
class Lab:
    server: Server
    a: Host  # behind a home router
    b: Host  # behind another
    public: Host
    run_dir: Path

    def diagnosis(self) -> str:
        return (f"--- server log:\n{self.server.log()[-4000:]}\n--- router of a:\n{self.a.conntrack()}"
                f"\n--- router of b:\n{self.b.conntrack()}")


def start_server(kind: str, host: Host, run_dir: Path) -> Server:
    if kind == "broker":
        users = UsersFile(run_dir / "users")
        for user, password in PASSWORDS.items():
            users.add(host.ip, user, password)
        users.save()
        proc = spawn([SIPMESH, "broker", "--listen", f"{host.ip}:{PORT}", "--db", str(run_dir / "broker.db"),
                      "--workers", "1", "--users", str(run_dir / "users"), "-v"],
                     netns=host.ns, log_path=run_dir / "broker.log", name="broker", cwd=run_dir)
        wait_udp_listening(host.ip, PORT, host.ns, 15, proc=proc)
        return Server(kind, host, proc.log_text, dict(PASSWORDS))
    if kind == "kamailio":  # the shipped configuration, digest on
        k = Kamailio(run_dir / "kamailio", host=host.ip, port=PORT, netns=host.ns, auth="db_text",
                     users=PASSWORDS, template=DOCS_CFG)
        k.start()
        return Server(kind, host, k.log_text, dict(PASSWORDS))
    assert kind == "kamailio-lab"  # the test copy, no auth
    k = Kamailio(run_dir / "kamailio", host=host.ip, port=PORT, netns=host.ns)
    k.start()
    return Server(kind, host, k.log_text)


@pytest.fixture
def make_lab(netns_factory, tmp_path: Path) -> Callable[[str], Lab]:
    def make(kind: str) -> Lab:
        lab = SignallingLab(netns_factory)
        server, public = lab.public("server", 10), lab.public("pub", 20)
        a, b = lab.home("a"), lab.home("b")
        return Lab(start_server(kind, server, tmp_path), a, b, public, tmp_path)
    return make


# STUN: any STUN client can ask the SIP server's port.
STUN_PROBE = r'''
import asyncio, json, os, socket, struct, sys
import aioice
server, port = sys.argv[1], int(sys.argv[2])
# a hand-made Binding request from a plain socket (no library)
tid = os.urandom(12)
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.settimeout(3)
    s.sendto(struct.pack("!HHI12s", 0x0001, 0, 0x2112A442, tid), (server, port))
    data = s.recv(2048)
    assert data[8:20] == tid and struct.unpack("!H", data[:2])[0] == 0x0101, data
    xport, = struct.unpack("!H", data[26:28])
    xaddr = bytes(a ^ b for a, b in zip(data[28:32], struct.pack("!I", 0x2112A442)))
    raw = [socket.inet_ntoa(xaddr), xport ^ 0x2112, s.getsockname()[1]]
async def ice():
    conn = aioice.Connection(ice_controlling=True, stun_server=(server, port))
    await conn.gather_candidates()
    found = [[c.host, c.port] for c in conn.local_candidates if c.type == "srflx"]
    await conn.close()
    return found
print(json.dumps({"raw": raw, "aioice": asyncio.run(ice())}))
'''


@pytest.mark.parametrize("kind", [pytest.param("broker", id="broker"),
                                  pytest.param("kamailio", id="kamailio", marks=needs_kamailio)])
def test_a_stun_client_behind_nat_learns_its_public_address_from_the_sip_port(make_lab, kind):
    lab = make_lab(kind)
    out = lab.a.ns.run([PYTHON, "-c", STUN_PROBE, lab.server.host.ip, str(PORT)], timeout=30,
                       check=False)
    assert out.returncode == 0, out.stderr + lab.diagnosis()
    found = json.loads(out.stdout)
    public, mapped, local = found["raw"]
    assert public == lab.a.public_ip and public != lab.a.ip
    assert mapped == local  # the home router keeps the port (endpoint-independent mapping)
    assert [c[0] for c in found["aioice"]] == [lab.a.public_ip], found
