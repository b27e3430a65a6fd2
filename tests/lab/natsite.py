"""A site on the NAT lab (tests/lab/topology.py): our broker (or Kamailio with the shipped
docs/kamailio/kamailio.cfg: ``NatSite(..., server="kamailio")``) and coturn on one public
host, daemons and callers on the others, as a user runs them.

    site = NatSite(lab, run_dir, users=["a", "b", "ac"]).start()   # on lab["broker"]
    daemon = site.daemon("b", tunnel_services("10.99.0.0/24"))     # `sipmesh daemon`, ready
    serve = site.serve("b", "bw", "--app", "wireguard")           # `sipmesh serve`, registered
    call = site.call("a", "ac", "b", "--service", "vpn")           # `sipmesh call b ...`
    site.status(daemon)                                             # `sipmesh status --json`

The SIP server answers SIP and STUN on ``SIP_PORT`` of the host (Kamailio: its `stun`
module), with digest in the realm of the host's address; coturn relays on 3478 with
the SIP realm and every user's HA1, so that TURN credentials are the SIP ones. Each
user's password is ``password(user)``. Every daemon gets a configuration of its own
(``[agent]`` with the site, a control socket, a state directory) plus the services given;
a caller uses the same file (``sipmesh call --service`` reads its half from it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from sipmesh.broker.users import UsersFile
from sipmesh.sip.auth import compute_ha1

from .agents import SIPMESH
from .coturn import Coturn
from .kamailio import Kamailio
from .procs import ManagedProcess, spawn, wait_udp_listening
from .topology import NatLab
from .waiting import wait_for

__all__ = ["KAMAILIO_CFG", "NatSite", "SIP_PORT", "password", "tunnel_services"]

SIP_PORT = 5060
KAMAILIO_CFG = Path(__file__).resolve().parents[2] / "docs" / "kamailio" / "kamailio.cfg"

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


def tunnel_services(pool: str) -> str:
    """The services of TUNNEL_SERVICES with tunnel addresses from `pool` (an IPv4 network)."""
    return TUNNEL_SERVICES.format(pool=pool)


def password(user: str) -> str:
    return f"{user}-secret"


class NatSite:
    """Broker + coturn on ``lab[host]``; daemons and calls on the other hosts."""

    def __init__(self, lab: NatLab, run: Path, users: Iterable[str], host: str = "broker",
                 server: str = "broker"):
        assert server in ("broker", "kamailio"), server
        self.lab, self.run = lab, Path(run)
        self.host = lab[host]
        self.users = sorted(set(users))
        self.kind = server
        self.coturn: Coturn | None = None
        self.broker: ManagedProcess | None = None
        self.kamailio: Kamailio | None = None
        self.procs: list[ManagedProcess] = []

    @property
    def server(self) -> str:
        return f"{self.host.ip}:{SIP_PORT}"

    @property
    def turn(self) -> str:
        assert self.coturn is not None
        return f"turn:{self.host.ip}:{self.coturn.port}"

    def start(self) -> "NatSite":
        realm = self.host.ip
        self.run.mkdir(parents=True, exist_ok=True)
        users = UsersFile(self.run / "users")
        for user in self.users:
            users.add(realm, user, password(user))
        users.save()
        try:
            self.coturn = Coturn(self.run / "coturn", self.host.ip, netns=self.host.ns,
                                 realm=realm, users={u: compute_ha1(u, realm, password(u))
                                                     for u in self.users}).start()
            if self.kind == "kamailio":   # the shipped configuration, digest on
                self.kamailio = Kamailio(self.run / "kamailio", host=self.host.ip, port=SIP_PORT,
                                         netns=self.host.ns, auth="db_text",
                                         users={u: password(u) for u in self.users},
                                         template=KAMAILIO_CFG, defines=["WITHOUT_MESH"]).start()
                return self
            self.broker = spawn([SIPMESH, "broker", "--listen", self.server, "--db",
                                 str(self.run / "broker.db"), "--workers", "1", "--users",
                                 str(self.run / "users"), "--rate-limit", "0", "-v"],
                                netns=self.host.ns, cwd=self.run, name="broker",
                                log_path=self.run / "broker.log")
            self.procs.append(self.broker)
            wait_udp_listening(self.host.ip, SIP_PORT, self.host.ns, 15, proc=self.broker)
        except BaseException:
            self.stop()
            raise
        return self

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

    def status(self, host: str, user: str | None = None) -> dict:
        """`sipmesh status --json` of the daemon of `user` (default: the host's name)."""
        out = self.lab[host].run([SIPMESH, "status", "--socket", str(self.socket(user or host)),
                                  "--json"], timeout=20)
        return json.loads(out.stdout)

    def log_text(self) -> str:
        """The SIP server's log."""
        if self.kamailio is not None:
            return self.kamailio.log_text()
        return self.broker.log_text() if self.broker is not None else ""

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(grace=10)
        if self.kamailio is not None:
            self.kamailio.stop()
        if self.coturn is not None:
            self.coturn.stop()
