"""Several mesh networks on one broker and on one host (issue 12, item 6): networks `lab` and
`ops` with their own credentials (each its own realm); alice is in lab, bob in ops, carol in
both (two interfaces: `sipmesh up lab`, and her daemon with a [[network]] table for ops). carol reaches alice and bob; alice can
neither join ops nor reach bob. A third network, on another broker, whose pool overlaps lab's
is refused at carol's join with an error naming both networks and pools."""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

import pytest

from tests.lab import NatLab, spawn, wait_for, wait_udp_listening
from tests.lab.mesh import CREATED, SIPMESH, Member
from sipmesh.broker.users import UsersFile

class DaemonMember(Member):
    """carol's `sipmesh daemon` with a [[network]] table (no services): a member like `up`'s."""

    def __init__(self, lab: NatLab, name: str, server: str, run_dir: Path, network: str,
                 password: str) -> None:
        self.name, self.lab, self.host = name, lab, lab[name]
        self.dir = run_dir / f"{name}-daemon"
        self.dir.mkdir()
        for file, secret in (("home.secret", f"{name}-home-pw"), ("net.secret", password)):
            (self.dir / file).write_text(f"password = {secret}\n")
            os.chmod(self.dir / file, 0o600)
        self.ifname = f"smt{secrets.token_hex(3)}"
        CREATED.append(self.ifname)
        (self.dir / "daemon.toml").write_text(
            f'[agent]\nserver = "{server}"\nuser = "{name}"\ncredentials = "home.secret"\n'
            f'state_dir = "state"\n\n[[network]]\nname = "{network}"\n'
            f'credentials = "net.secret"\nifname = "{self.ifname}"\nexpires = 10\n'
            f'hosts_file = "hosts"\n')   # never the machine's /etc/hosts
        (self.dir / "hosts").write_text("127.0.0.1 localhost\n")
        run = run_dir / f"run-{name}"
        self.env = dict(os.environ, XDG_RUNTIME_DIR=str(run))
        self.proc = spawn([SIPMESH, "daemon", "-c", str(self.dir / "daemon.toml"), "-v"],
                          netns=self.host.ns, log_path=run_dir / f"daemon-{name}.log",
                          name=f"daemon-{name}", env=self.env)
        self.socket = run / "sipmesh" / f"mesh-{network}-{name}.sock"


PORT, OTHER_PORT = 5060, 5070
LAB_POOL, OPS_POOL, OVERLAPPING = "10.9.0.0/24", "10.10.0.0/24", "10.9.0.0/16"


def broker(server, tmp_path: Path, port: int, networks: dict[str, tuple[str, list[str]]],
           passwords: dict[tuple[str, str], str]):
    """A broker of its own (database, users) with `networks` {name: (pool, members)}."""
    here = tmp_path / f"broker-{port}"
    here.mkdir()
    users = UsersFile(here / "users")
    for (realm, user), password in passwords.items():
        users.add(realm, user, password)
    users.save()
    db = str(here / "broker.db")
    for name, (pool, members) in networks.items():
        for argv in (["network", "create", name, "--pool", pool, "--db", db],
                     ["network", "members", "add", name, *members, "--db", db]):
            subprocess.run([SIPMESH, "broker", *argv], check=True, capture_output=True, timeout=30)
    proc = spawn([SIPMESH, "broker", "--listen", f"{server.ip}:{port}", "--db", db, "--workers", "1",
                  "--users", str(here / "users"), "--min-expires", "5", "-v"], netns=server.ns,
                 log_path=here / "broker.log", name=f"broker-{port}", cwd=here)
    wait_udp_listening(server.ip, port, server.ns, 15, proc=proc)
    return f"{server.ip}:{port}"


@pytest.mark.slow
@pytest.mark.netns
def test_two_networks_on_one_broker_and_one_host(nat_lab: NatLab, tmp_path: Path):
    hosts = nat_lab.add_hosts({"server": "public", "alice": "public", "bob": "public",
                               "carol": "public"})
    try:
        server = broker(hosts["server"], tmp_path, PORT,
                        {"lab": (LAB_POOL, ["alice", "carol"]), "ops": (OPS_POOL, ["bob", "carol"])},
                        {("lab", "alice"): "alice-pw", ("lab", "carol"): "carol-pw",
                         ("ops", "bob"): "bob-pw", ("ops", "carol"): "carol-ops-pw",
                         ("ops", "alice"): "alice-ops-pw",  # an account in ops, no member
                         (hosts["server"].ip, "carol"): "carol-home-pw"})  # her daemon's [agent]
        alice = Member(nat_lab, "alice", server, tmp_path)
        bob = Member(nat_lab, "bob", server, tmp_path, network="ops")
        carol_lab = Member(nat_lab, "carol", server, tmp_path)
        carol_ops = DaemonMember(nat_lab, "carol", server, tmp_path, "ops", "carol-ops-pw")
        for m in (alice, bob, carol_lab, carol_ops):
            wait_for(m.ready, 20, what=f"{m.name} up in {m.socket.name}\n{m.proc.log_tail(20)}")
        assert carol_lab.status()["pool"] == LAB_POOL and carol_ops.status()["pool"] == OPS_POOL
        # carol: two interfaces, one per network, each with its address from its pool
        links = hosts["carol"].run(["ip", "-br", "address"], check=True).stdout
        for m in (carol_lab, carol_ops):
            assert m.ifname in links and m.status()["mesh_ip"] in links, links
        assert carol_lab.status()["wg_port"] != carol_ops.status()["wg_port"]
        assert carol_lab.status()["wg_pubkey"] != carol_ops.status()["wg_pubkey"]
        for me, other in ((carol_lab, alice), (carol_ops, bob), (alice, carol_lab), (bob, carol_ops)):
            address = other.status()["mesh_ip"]
            wait_for(lambda: me.pings(address), 20,
                     what=f"{me.name} pings {other.name} ({address})\n{me.proc.log_tail(20)}")
        shown = carol_lab.sipmesh("status")
        assert "network lab: carol" in shown.stdout and "network ops: carol" in shown.stdout, shown

        # alice's lab password is no ops one (401); with an ops account, no member (403)
        intruder = Member(nat_lab, "alice", server, tmp_path, network="ops")
        assert intruder.proc.wait(30) != 0
        assert "rejected our credentials (401" in intruder.proc.log_tail(5), intruder.proc.log_tail(5)
        intruder = Member(nat_lab, "alice", server, tmp_path, network="ops", password="alice-ops-pw")
        assert intruder.proc.wait(30) != 0
        said = intruder.proc.log_tail(5)
        assert "403 Forbidden (not a member of network ops)" in said, said
        assert not alice.pings(bob.status()["mesh_ip"])  # no route into ops from lab

        # a network on another broker whose pool overlaps lab's: refused at carol's join
        other = broker(hosts["server"], tmp_path, OTHER_PORT, {"lab2": (OVERLAPPING, ["carol"])},
                       {("lab2", "carol"): "carol-pw"})
        overlap = Member(nat_lab, "carol", other, tmp_path, network="lab2")
        assert overlap.proc.wait(30) == 2, overlap.proc.log_tail(20)
        said = overlap.proc.log_tail(20)
        assert (f"network lab2's pool {OVERLAPPING} overlaps network lab's pool {LAB_POOL}"
                in said), said
        assert carol_lab.pings(alice.status()["mesh_ip"])  # lab stands
    finally:
        while CREATED:
            Path(f"/var/run/wireguard/{CREATED.pop()}.sock").unlink(missing_ok=True)
