"""A site on the NAT lab (topology.py): our broker and coturn on one public host,
daemons and callers on the others, as a user runs them.

    site = NatSite(lab, run_dir, users=["a", "b", "ac"]).start()   # on lab["broker"]
    daemon = site.daemon("b", tunnel_services("10.99.0.0/24"))     # `sipmesh daemon`, ready
    serve = site.serve("b", "bw", "--app", "wireguard")           # `sipmesh serve`, registered
    call = site.call("a", "ac", "b", "--service", "vpn")           # `sipmesh call b ...`
    site.status(daemon)                                             # `sipmesh status --json`

A site may hold mesh networks (``networks={"lab": ("100.64.0.0/24", ["alice", "bob"])}``,
the members' realm is the network's name) whose members come up with ``site.member(host,
user, network)`` (`sipmesh up`, with ``--turn`` the network's coturn: a coturn holds one
realm, so each network has its own, on ``NETWORK_TURN_PORT`` and up, realm = the network's
name, its members' network HA1s, as docs/mesh.md "TURN options" says to run it). ``start(trace=True)`` has the broker log every SIP
message (``--debug``: what `sipmesh demo --lab` draws its ladder from).

The broker answers SIP and STUN on ``SIP_PORT`` of the host; coturn relays on 3478 with
the SIP realm and every user's HA1, so that TURN credentials are the SIP ones. Each
user's password is ``password(user)``. Every daemon gets a configuration of its own
(``[agent]`` with the site, a control socket, a state directory) plus the services given;
a caller uses the same file (``sipmesh call --service`` reads its half from it).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from sipmesh.broker.users import UsersFile
from sipmesh.daemon.control import query
from sipmesh.sip.auth import compute_ha1

from .coturn import Coturn
from .procs import ManagedProcess, spawn, wait_udp_listening
from .topology import NatLab
from .waiting import wait_for

__all__ = ["NatSite", "SIPMESH", "SIP_PORT", "password", "tunnel_services"]

SIPMESH = str(Path(sys.executable).parent / "sipmesh")   # the installed command, as users run it

SIP_PORT = 5060
SITE_TURN_PORT = 3478
NETWORK_TURN_PORT = 3480   # the first network's coturn (the site's: 3478, and 3479 free)
RELAY_PORTS = (49152, 56999)   # the site's coturn; each network's: 1000 ports above

AGENT = '''[agent]
server = "{server}"
user = "{user}"
password = "{password}"
state_dir = "{state}"
control_socket = "{socket}"
turn = "{turn}"

'''


# A WireGuard service "vpn" and an OpenVPN service "ovpn", tunnel addresses from `pool`.
TUNNEL_SERVICES = '''
[allocators.udp]
type = "ports"
range = "51820-51829"
protocols = ["udp"]

[allocators.tunnels]
type = "addresses"
pool = "{pool}"

[[service]]
name = "vpn"
kind = "wireguard"
port = "udp"
addresses = "tunnels"
allow = ["*"]

[[service]]
name = "ovpn"
kind = "openvpn"
port = "udp"
addresses = "tunnels"
allow = ["*"]
'''


# A forward service "fwd" to the TCP port {sink} on the answering host's loopback; the
# caller's local port {local}.
FORWARD_SERVICE = '''
[[service]]
name = "fwd"
kind = "forward"
target = "127.0.0.1:{sink}"
allow = ["*"]
[service.call]
local_port = {local}
'''


def tunnel_services(pool: str) -> str:
    """The services of TUNNEL_SERVICES with tunnel addresses from `pool` (an IPv4 network)."""
    return TUNNEL_SERVICES.format(pool=pool)


def password(user: str) -> str:
    return f"{user}-secret"


class NatSite:
    """Broker + coturn on ``lab[host]``; daemons and calls on the other hosts."""

    def __init__(self, lab: NatLab, run: Path, users: Iterable[str], host: str = "broker", *,
                 networks: Mapping[str, tuple[str, Sequence[str]]] | None = None):
        self.lab, self.run = lab, Path(run)
        self.host = lab[host]
        self.users = sorted(set(users))
        self.networks = dict(networks or {})   # name -> (address pool, member names)
        self.interfaces: list[str] = []        # members' wireguard-go interfaces (see stop)
        self.coturn: Coturn | None = None
        self.network_turns: dict[str, Coturn] = {}   # network -> its coturn
        self.broker: ManagedProcess | None = None
        self.procs: list[ManagedProcess] = []

    @property
    def server(self) -> str:
        return f"{self.host.ip}:{SIP_PORT}"

    @property
    def turn(self) -> str:
        assert self.coturn is not None
        return f"turn:{self.host.ip}:{self.coturn.port}"

    def network_turn(self, network: str) -> str:
        """The TURN server of `network`'s members (`sipmesh up --turn`)."""
        return f"turn:{self.host.ip}:{self.network_turns[network].port}"

    @property
    def db(self) -> Path:
        return self.run / "broker.db"

    def start(self, *, trace: bool = False) -> "NatSite":
        """Coturn and the broker, once it answers; `trace`: it logs every SIP message."""
        realm = self.host.ip
        self.run.mkdir(parents=True, exist_ok=True)
        users = UsersFile(self.run / "users")
        for user in self.users:
            users.add(realm, user, password(user))
        for network, (_, members) in self.networks.items():
            for user in members:
                users.add(network, user, password(user))
        users.save()
        for network, (pool, members) in self.networks.items():
            for argv in (["network", "create", network, "--pool", pool],
                         ["network", "members", "add", network, *members]):
                subprocess.run([SIPMESH, "broker", *argv, "--db", str(self.db)], check=True,
                               capture_output=True, timeout=30)
        try:
            self.coturn = self._coturn("coturn", SITE_TURN_PORT, realm, self.users,
                                       RELAY_PORTS)
            for i, (network, (_, members)) in enumerate(self.networks.items()):
                low = RELAY_PORTS[1] + 1 + 1000 * i
                self.network_turns[network] = self._coturn(
                    f"coturn-{network}", NETWORK_TURN_PORT + 2 * i, network, members,
                    (low, low + 999))
            self.start_server(trace)
        except BaseException:
            self.stop()
            raise
        return self

    def _coturn(self, name: str, port: int, realm: str, users: Iterable[str],
                relay_ports: tuple[int, int]) -> Coturn:
        """A coturn on the site's host for `realm`, its `users`' HA1s, started."""
        coturn = Coturn(self.run / name, self.host.ip, netns=self.host.ns, port=port,
                        realm=realm, users={u: compute_ha1(u, realm, password(u)) for u in users},
                        min_port=relay_ports[0], max_port=relay_ports[1])
        coturn.start()   # before it is kept: start() stops it when it fails
        return coturn

    def start_server(self, trace: bool) -> None:
        """The SIP server: our broker, on ``SIP_PORT`` (tests/lab/natsite.py: or Kamailio)."""
        self.broker = spawn([SIPMESH, "broker", "--listen", self.server, "--db",
                             str(self.db), "--workers", "1", "--users",
                             str(self.run / "users"), "--rate-limit", "0", "-v",
                             *(["--debug"] if trace else [])],
                            netns=self.host.ns, cwd=self.run, name="broker",
                            log_path=self.run / "broker.log")
        self.procs.append(self.broker)
        wait_udp_listening(self.host.ip, SIP_PORT, self.host.ns, 15, proc=self.broker)

    def log_text(self) -> str:
        """The SIP server's log."""
        return self.broker.log_text() if self.broker is not None else ""

    def config(self, user: str, services: str) -> Path:
        """`user`'s configuration file: the site's [agent] and `services` (TOML)."""
        path = self.run / f"{user}.toml"
        path.write_text(AGENT.format(server=self.server, user=user, password=password(user),
                                     state=self.run / f"state-{user}",
                                     socket=self.socket(user), turn=self.turn) + services)
        return path

    def socket(self, user: str) -> Path:
        return self.run / f"{user}.sock"

    def daemon(self, host: str, services: str, user: str | None = None) -> ManagedProcess:
        """`sipmesh daemon` on `host` as `user` (default: the host's name), once ready."""
        user = user or host
        proc = spawn([SIPMESH, "daemon", "-c", str(self.config(user, services)), "-v"],
                     netns=self.lab[host].ns, cwd=self.run, name=f"daemon-{user}",
                     log_path=self.run / f"daemon-{len(self.procs)}-{user}.log")
        self.procs.append(proc)
        wait_for(lambda: f"ready as sip:{user}@" in proc.log_text(), 20,
                 what=f"daemon {user} ready", abort=proc.exit_reason)
        return proc

    def call(self, host: str, user: str, target: str, *extra: str,
             services: str | None = None) -> ManagedProcess:
        """`sipmesh call TARGET` on `host` as `user`, with `user`'s configuration file when
        `services` are given (for --service), else the site on the command line."""
        if services is not None:
            argv = [SIPMESH, "call", target, "-c", str(self.config(user, services))]
        else:
            argv = [SIPMESH, "call", target, "--server", self.server, "--user", user,
                    "--password", password(user), "--state-dir", str(self.run / f"state-{user}")]
        argv += ["--turn", self.turn, "-v", *extra]
        n = len(list(self.run.glob("call-*.log")))
        proc = spawn(argv, netns=self.lab[host].ns, cwd=self.run, name=f"call-{user}",
                     log_path=self.run / f"call-{n}-{user}-{target}.log")
        self.procs.append(proc)
        return proc

    def serve(self, host: str, user: str, *extra: str) -> ManagedProcess:
        """`sipmesh serve` on `host` as `user`, once registered."""
        proc = spawn([SIPMESH, "serve", "--server", self.server, "--user", user, "--password",
                      password(user), "--turn", self.turn, "--state-dir",
                      str(self.run / f"state-{user}"), "-v", *extra],
                     netns=self.lab[host].ns, cwd=self.run, name=f"serve-{user}",
                     log_path=self.run / f"serve-{len(self.procs)}-{user}.log")
        self.procs.append(proc)
        wait_for(lambda: "ready: contact" in proc.log_text(), 20,
                 what=f"serve {user} registered", abort=proc.exit_reason)
        return proc

    def member(self, host: str, user: str, network: str, *extra: str) -> "Member":
        """`sipmesh up NETWORK` on `host` as `user` (started, not yet waited for)."""
        return Member(self, host, user, network, extra)

    def status(self, host: str, user: str | None = None) -> dict:
        """`sipmesh status --json` of the daemon of `user` (default: the host's name)."""
        out = self.lab[host].run([SIPMESH, "status", "--socket", str(self.socket(user or host)),
                                  "--json"], timeout=20)
        return json.loads(out.stdout)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(grace=10)
        for coturn in [self.coturn, *self.network_turns.values()]:
            if coturn is not None:
                coturn.stop()
        # wireguard-go's control sockets are machine-wide; one killed leaves its own behind
        for ifname in self.interfaces:
            Path(f"/var/run/wireguard/{ifname}.sock").unlink(missing_ok=True)


class Member:
    """One mesh member, `sipmesh up NETWORK` as a user runs it: credentials in a file, its
    own runtime directory (control socket) and state, an interface name of its own."""

    def __init__(self, site: NatSite, host: str, user: str, network: str,
                 extra: Sequence[str] = ()) -> None:
        self.site, self.user, self.network = site, user, network
        self.host = site.lab[host]
        self.dir = site.run / f"member-{user}"
        self.dir.mkdir(parents=True, exist_ok=True)
        creds = self.dir / "credentials"
        with os.fdopen(os.open(creds, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(f"password = {password(user)}\n")
        self.ifname = f"smm{secrets.token_hex(3)}"  # wireguard-go's socket is machine-wide
        site.interfaces.append(self.ifname)
        self.env = dict(os.environ, XDG_RUNTIME_DIR=str(self.dir / "run"))
        self.socket = self.dir / "run" / "sipmesh" / f"mesh-{network}-{user}.sock"
        self.proc = spawn([SIPMESH, "up", network, "--server", site.server, "--user", user,
                           "--credentials", str(creds), "--state-dir", str(self.dir / "state"),
                           "--ifname", self.ifname, "--turn", site.network_turn(network), "-v",
                           "--hosts-file", str(self.dir / "hosts"),  # the members' names:
                           *extra],                                  # not the machine's file
                          netns=self.host.ns, cwd=site.run, env=self.env, name=f"up-{user}",
                          log_path=site.run / f"up-{user}.log")
        site.procs.append(self.proc)

    def status(self) -> dict:
        """This member's network in `sipmesh status --json`."""
        return query(self.socket, {"command": "status"}, timeout=5)["networks"][0]

    def mesh_ip(self) -> str | None:
        """Its address in the mesh, once it is up (None before)."""
        if not self.socket.exists():
            return None
        return self.status().get("mesh_ip")

    def sipmesh(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """`sipmesh ARGV` in this member's host and runtime directory (status, down)."""
        return self.host.run([SIPMESH, *argv], check=False, env=self.env, timeout=timeout)
