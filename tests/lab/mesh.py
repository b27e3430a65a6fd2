"""The mesh lab of `sipmesh up` tests: members as `sipmesh up` processes on hosts of the NAT
lab (tests/lab/topology.py), a broker with network `lab`, and the full-mesh ping check.
Shared by test_mesh_up, test_mesh_nat, test_mesh_networks and test_status_page_mesh."""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

from sipmesh.agent.hostsfile import entries_of
from sipmesh.apps.mesh import parse_dump
from sipmesh.broker.users import UsersFile
from sipmesh.daemon.control import query
from sipmesh.lab.natsite import SIPMESH
from sipmesh.lab.procs import ManagedProcess
from sipmesh.lab.topology import Host
from tests.lab import NatLab, spawn, wait_for, wait_udp_listening

PORT = 5060
EXPIRES = 10  # the killed member's bound: its binding runs out after this many seconds
MEMBERS = ["alice", "bob", "carol", "dave"]
HOSTS = "127.0.0.1 localhost\n192.0.2.1 gateway # the member's own lines\n"
CREATED: list[str] = []  # interface names: a wireguard-go killed with SIGKILL leaves its socket


class Member:
    def __init__(self, lab: NatLab, name: str, server: str, run_dir: Path, *extra: str,
                 expires: int = EXPIRES, network: str = "lab", password: str | None = None) -> None:
        self.name, self.lab, self.host = name, lab, lab[name]
        self.dir = run_dir / (name if network == "lab" else f"{name}-{network}")
        self.dir.mkdir(exist_ok=True)  # a second try of one member and network
        (self.dir / "creds").write_text(f"password = {password or name + '-pw'}\n")
        os.chmod(self.dir / "creds", 0o600)
        self.ifname = f"smt{secrets.token_hex(3)}"  # wireguard-go's socket is machine-wide
        CREATED.append(self.ifname)
        run = run_dir / f"run-{name}"  # one per host: its members see each other's sockets
        self.env = dict(os.environ, XDG_RUNTIME_DIR=str(run))
        self.hosts = self.dir / "hosts"  # never the machine's /etc/hosts
        self.hosts.write_text(HOSTS)
        self.proc = spawn([SIPMESH, "up", network, "--server", server, "--user", name,
                           "--credentials", str(self.dir / "creds"), "--state-dir",
                           str(self.dir / "state"), "--ifname", self.ifname,
                           "--hosts-file", str(self.hosts),
                           "--expires", str(expires), "-v", *extra],
                          netns=self.host.ns, log_path=run_dir / f"up-{name}-{network}.log",
                          name=f"up-{name}-{network}", env=self.env)
        self.socket = run / "sipmesh" / f"mesh-{network}-{name}.sock"

    def status(self) -> dict:
        return query(self.socket, {"command": "status"}, timeout=5)["networks"][0]

    def ready(self) -> bool:
        assert self.proc.alive, self.proc.log_tail(30)
        return self.socket.exists() and self.status().get("mesh_ip") is not None

    def wg_peers(self) -> dict[str, dict]:
        out = self.host.run(["wg", "show", self.ifname, "dump"], check=True).stdout
        return parse_dump(out)

    def pings(self, address: str) -> bool:
        return self.host.run(["ping", "-c1", "-W1", address], check=False).returncode == 0

    def names(self) -> dict[str, str]:
        """What our hosts file's block for network lab gives: name -> address."""
        return entries_of(self.hosts.read_text(), "lab")

    def pings_by_name(self, name: str) -> bool:
        """`ping NAME` as a program of this member's host resolves it: its hosts file
        bind-mounted over /etc/hosts in a mount namespace of its own (the machine's stays)."""
        script = 'mount --bind "$1" /etc/hosts && exec ping -c1 -W1 "$2"'
        return self.host.run(["unshare", "--mount", "--propagation", "private", "--", "sh",
                              "-c", script, "sh", str(self.hosts), name],
                             check=False).returncode == 0

    def sipmesh(self, *argv: str) -> subprocess.CompletedProcess:
        return self.host.run([SIPMESH, *argv], check=False, env=self.env, timeout=60)


def mesh_broker(server: Host, names: list[str], tmp_path: Path, *broker_args: str) -> ManagedProcess:
    """Our broker on `server` (port PORT) with network `lab` (100.64.0.0/24) whose members
    are `names`, each with the password Member gives it."""
    users = UsersFile(tmp_path / "users")
    for name in names:
        users.add("lab", name, f"{name}-pw")
    users.save()
    db = str(tmp_path / "broker.db")
    for argv in (["network", "create", "lab", "--pool", "100.64.0.0/24", "--db", db],
                 ["network", "members", "add", "lab", *names, "--db", db]):
        subprocess.run([SIPMESH, "broker", *argv], check=True, capture_output=True, timeout=30)
    broker = spawn([SIPMESH, "broker", "--listen", f"{server.ip}:{PORT}", "--db", db,
                    "--workers", "1", "--users", str(tmp_path / "users"), "-v", *broker_args],
                   netns=server.ns, log_path=tmp_path / "broker.log", name="broker", cwd=tmp_path)
    wait_udp_listening(server.ip, PORT, server.ns, 15, proc=broker)
    return broker


def mesh_lab(nat_lab: NatLab, tmp_path: Path, broker_args: tuple[str, ...] = ()):
    """The lab of `mesh`: a broker (with `broker_args`) and the members' hosts, all public."""
    hosts = nat_lab.add_hosts({"server": "public", **{n: "public" for n in MEMBERS}})
    server = hosts["server"]
    mesh_broker(server, MEMBERS, tmp_path, "--min-expires", "5", *broker_args)
    try:
        yield nat_lab, f"{server.ip}:{PORT}", tmp_path
    finally:
        while CREATED:
            Path(f"/var/run/wireguard/{CREATED.pop()}.sock").unlink(missing_ok=True)


def full_mesh(members: list[Member], timeout: float = 20.0) -> None:
    """Every member pings every other's mesh address (each pair retried until it does)."""
    addresses = {m.name: m.status()["mesh_ip"] for m in members}
    for m in members:
        for other in members:
            if other is not m:
                wait_for(lambda: m.pings(addresses[other.name]), timeout,
                         what=f"{m.name} pings {other.name} ({addresses[other.name]})\n"
                              f"{m.proc.log_tail(20)}\n{other.proc.log_tail(20)}")


def handshakes_promptly(members: list[Member], within: float = 3.0) -> None:
    """Every pair's WireGuard handshake came within `within` s of its path: none waited
    for WireGuard's 5 s retry (two initiations that cross are both lost: only the caller
    initiates, docs/mesh.md)."""
    for m in members:
        for peer in m.status()["peers"]:
            assert peer["latest_handshake"] - peer["since"] < within, (m.name, peer)
