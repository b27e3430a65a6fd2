"""`sipmesh up NETWORK` / `sipmesh down NETWORK`: join a mesh network, leave it (docs/mesh.md).

`up` runs in the foreground until SIGINT/SIGTERM or `down`: one WireGuard interface for
the network, a peer per member (apps/mesh.py). It answers on a control socket
(daemon/control.py), ``RUNTIME/mesh-NETWORK-USER.sock``: ``status`` (what `sipmesh status`
shows) and ``down`` (leave cleanly: BYE to every peer, unregister, interface gone).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import Any

from sipmesh.agent.errors import AgentError, Exit
from sipmesh.agent.hostsfile import DEFAULT_PATH as DEFAULT_HOSTS
from sipmesh.agent.memberrelay import RELAY_PORT
from sipmesh.agent.params import IPAddress, IPv4, Port
from sipmesh.cli.common import (add_identity_options, add_keepalive_option, add_output_options,
                                add_tls_options, positive, run_until_signalled, setup_logging,
                                sip_port, typed)

log = logging.getLogger("sipmesh.cli.up")
DOWN_WAIT = 30.0


def control_path(network: str, user: str) -> Path:
    from sipmesh.daemon.control import runtime_dir
    return runtime_dir() / f"mesh-{network}-{user}.sock"


def running_members(network: str | None = None) -> list[Path]:
    """The control sockets of running `sipmesh up`s (of `network`, if given)."""
    from sipmesh.daemon.control import runtime_dir
    directory = runtime_dir()
    pattern = f"mesh-{network}-*.sock" if network else "mesh-*.sock"
    return sorted(directory.glob(pattern)) if directory.is_dir() else []


async def pools_in_use(exclude: Path | None = None) -> dict[str, str]:
    """{network: pool} of the other running members on this host (their control sockets):
    a network whose pool overlaps one of these is refused at join (docs/mesh.md)."""
    from sipmesh.daemon.control import query
    pools: dict[str, str] = {}
    for path in running_members():
        if exclude is not None and path == exclude:
            continue
        try:
            reply = await asyncio.to_thread(query, path, {"command": "status"}, 3.0)
        except (OSError, ValueError):
            continue  # gone meanwhile, or a stale socket
        for network in reply.get("networks") or ():
            if isinstance(network, dict) and network.get("pool") and network.get("network"):
                pools[str(network["network"])] = str(network["pool"])
    return pools


class UpRunner:
    """A MeshMember with its control socket, for run_until_signalled."""

    def __init__(self, member: Any, socket_path: Path) -> None:
        self.member = member
        self.ready = member.ready
        self.socket_path = socket_path

    async def run(self) -> int:
        from sipmesh.daemon.control import ControlServer

        control = ControlServer(self.socket_path, self._handle)
        try:
            await control.start()
        except OSError as exc:
            raise AgentError(f"{exc}: is `sipmesh up {self.member.network}` running already?",
                             Exit.USAGE) from None
        try:
            return await self.member.run()
        finally:
            await control.stop()

    def request_stop(self) -> None:
        self.member.request_stop()

    async def _handle(self, request: dict[str, Any]) -> dict[str, Any]:
        command = request.get("command")
        if command == "status":
            return {"ok": True, "networks": [await self.member.status()]}
        if command == "down":
            log.info("network %s: leaving (sipmesh down)", self.member.network)
            self.member.request_stop()
            return {"ok": True}
        return {"ok": False, "error": f"unknown command {str(command)[:40]!r}"}


def build_member(args: argparse.Namespace, ice_base: Any = None) -> UpRunner:
    """A MeshMember and its control socket from `sipmesh up`'s options (the command line, or
    a daemon's [[network]] table through network_args); raises AgentError."""
    from sipmesh.agent.certs import default_state_dir
    from sipmesh.apps.mesh import MeshConfig, MeshMember, MeshTrust
    from sipmesh.cli.serve import ice_options, ua_config

    check_network(args.network)
    ua = ua_config(args)
    trust_files = (args.network_ca, args.member_cert, args.identity_key)
    if any(trust_files) and not all(trust_files):
        raise AgentError("--network-ca, --member-cert and --identity-key go together (a "
                         "network with a CA)", Exit.USAGE)
    trust = MeshTrust(*trust_files) if args.network_ca else None
    socket = args.socket or control_path(args.network, ua.user)
    config = MeshConfig(network=args.network, ua=ua,
                        state_dir=args.state_dir or default_state_dir(),
                        ifname=args.ifname, wg_port=args.wg_port and int(args.wg_port),
                        advertise=args.advertise, mesh_ip=args.mesh_ip, trust=trust,
                        register_expires=args.expires, ice=ice_options(args, ice_base),
                        tools={"wireguard_go": args.wireguard_go, "wg": args.wg},
                        pool=args.pool and str(args.pool),
                        pools_in_use=lambda: pools_in_use(exclude=socket),
                        hosts_file=None if args.no_hosts else args.hosts_file,
                        relay=args.relay, relay_port=int(args.relay_port),
                        relay_max_bps=args.relay_max_bps, turnserver=args.turnserver)
    return UpRunner(MeshMember(config), socket)


def network_args(name: str, options: dict[str, Any], agent: Any) -> argparse.Namespace:
    """A daemon's [[network]] table (daemon/config.py) as `sipmesh up NAME --KEY VALUE ...`,
    parsed by `sipmesh up`'s own parser; server, user, credentials default to [agent]'s."""
    given = dict(options)
    if "server" not in given and agent.server:
        given["server"] = agent.server
        given.setdefault("transport", agent.transport)
    given.setdefault("user", agent.user)
    if "password" not in given and "credentials" not in given:
        if agent.password is not None:
            given["password"] = agent.password
        elif agent.credentials is not None:
            given["credentials"] = str(agent.credentials)
    if agent.state_dir is not None:
        given.setdefault("state_dir", str(agent.state_dir))
    argv = [name]
    for key, value in given.items():
        if value is True:  # a flag (no_ice = true, no_hosts = true)
            argv.append(f"--{key.replace('_', '-')}")
        elif value is not None and value is not False:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    parser = argparse.ArgumentParser(prog=f"[[network]] {name}", exit_on_error=False)
    add_up_arguments(parser)
    try:
        return parser.parse_args(argv)
    except (argparse.ArgumentError, SystemExit) as exc:
        raise AgentError(f"network {name}: {exc}", Exit.USAGE) from None


def run_up(args: argparse.Namespace) -> int:
    setup_logging(args.verbose, args.debug, args.log_file)
    try:
        runner = build_member(args)
    except AgentError as exc:
        print(f"sipmesh up: {exc}", file=sys.stderr)
        return int(exc.code)
    member = runner.member
    return run_until_signalled("sipmesh up", runner, again=None,
                               on_ready=lambda: print(
                                   f"sipmesh up: in network {args.network} as {member.mesh_ip} "
                                   f"({member.ifname})", file=sys.stderr, flush=True))


def check_network(name: str) -> str:
    from sipmesh.agent.trust import TrustError, check_network as check
    try:
        return check(name)
    except TrustError as exc:
        raise AgentError(f"network {name!r}: {exc.message}", Exit.USAGE) from None


def find_member(network: str, user: str | None, socket: Path | None) -> Path:
    if socket is not None:
        return socket
    if user is not None:
        return control_path(network, user)
    found = running_members(network)
    if not found:
        raise AgentError(f"no `sipmesh up {network}` is running here", Exit.NOT_FOUND)
    if len(found) > 1:
        raise AgentError("several members of that network run here; choose one with --user: "
                         + ", ".join(p.name for p in found), Exit.USAGE)
    return found[0]


def run_down(args: argparse.Namespace) -> int:
    from sipmesh.daemon.control import query

    try:
        check_network(args.network)
        path = find_member(args.network, args.user, args.socket)
        try:
            reply = query(path, {"command": "down"})
        except (OSError, ValueError) as exc:
            raise AgentError(f"cannot reach `sipmesh up {args.network}` at {path}: {exc}",
                             Exit.UNREACHABLE) from None
        if not reply.get("ok"):
            raise AgentError(str(reply.get("error")), Exit.PROGRAM)
        deadline = time.monotonic() + args.timeout
        while path.exists():  # gone once it has said BYE, unregistered, removed the interface
            if time.monotonic() > deadline:
                raise AgentError(f"still leaving after {args.timeout:g} s", Exit.PROGRAM)
            time.sleep(0.05)
    except AgentError as exc:
        print(f"sipmesh down: {exc}", file=sys.stderr)
        return int(exc.code)
    print(f"sipmesh down: left network {args.network}", file=sys.stderr)
    return 0


def pool_type(text: str) -> str:
    import ipaddress
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--pool: {exc}") from None


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "up", help="join a mesh network (runs until SIGINT/SIGTERM or `sipmesh down`)",
        description="Join mesh network NETWORK: one WireGuard interface (wireguard-go) with "
                    "our mesh address, a tunnel to every other member on the path ICE "
                    "checked (direct, through a member relay, or through the TURN relay), set "
                    "up over SIP and kept "
                    "current from the network's roster. Several networks: one `sipmesh up` "
                    "each, or [[network]] tables in the daemon's file. See docs/mesh.md.")
    add_up_arguments(p)
    p.set_defaults(func=run_up)
    add_down_parser(subparsers)


def add_up_arguments(p: argparse.ArgumentParser) -> None:
    """`sipmesh up`'s options (also a daemon [[network]] table's, network_args)."""
    from sipmesh.cli.serve import add_ice_options
    p.add_argument("network", metavar="NETWORK")
    sip = p.add_argument_group("SIP (the credentials are the member's for this network)")
    add_identity_options(sip)
    sip.add_argument("--sip-port", metavar="PORT", type=sip_port, default=0,
                     help="local SIP port (default: any free port)")
    sip.add_argument("--bind", metavar="ADDR", type=typed(IPAddress(unicast=False), "bind"),
                     default="0.0.0.0", help="local address to listen on (default: all)")
    sip.add_argument("--transport", choices=("udp", "tcp", "tls"),
                     help="transport towards the server (default: udp)")
    add_keepalive_option(sip)
    sip.add_argument("--expires", metavar="SECONDS", type=int, default=300,
                     help="roster registration lifetime: a member that vanishes is removed "
                          "from the others within it (default: 300)")
    mesh = p.add_argument_group("mesh")
    mesh.add_argument("--ifname", metavar="NAME", help="interface name (default: sm-NETWORK)")
    mesh.add_argument("--wg-port", metavar="PORT", type=typed(Port(), "wg-port"),
                      help="WireGuard UDP port (default: the one used before, else a free one)")
    mesh.add_argument("--advertise", metavar="ADDR", type=typed(IPAddress(), "advertise"),
                      help="our WireGuard endpoint address (default: our address towards the "
                           "SIP server)")
    mesh.add_argument("--mesh-ip", metavar="ADDR", type=typed(IPv4(), "mesh-ip"),
                      help="our mesh address, on servers that allocate none (Kamailio)")
    mesh.add_argument("--pool", metavar="CIDR", type=pool_type,
                      help="the network's address pool, on servers that say none (Kamailio); "
                           "a pool that overlaps another network this host is in is refused")
    mesh.add_argument("--state-dir", metavar="DIR", type=Path,
                      help="where the network's WireGuard key and port are kept (default: "
                           "$XDG_STATE_HOME/sipmesh or ~/.local/state/sipmesh)")
    mesh.add_argument("--socket", metavar="PATH", type=Path,
                      help="control socket (default: RUNTIME/mesh-NETWORK-USER.sock)")
    mesh.add_argument("--hosts-file", metavar="PATH", type=Path, default=DEFAULT_HOSTS,
                      help="the members' names go into a marked block here: NAME.NETWORK "
                           "and NAME (default: %(default)s)")
    mesh.add_argument("--no-hosts", action="store_true", help="write no names")
    mesh.add_argument("--relay", action="store_true",
                      help="relay for the network's members that cannot reach each other "
                           "(runs coturn's turnserver on our address; we must be reachable "
                           "there: a public address)")
    mesh.add_argument("--relay-port", metavar="PORT", type=typed(Port(), "relay-port"),
                      default=RELAY_PORT, help="the relay's UDP and TCP port (default: "
                                               "%(default)s)")
    mesh.add_argument("--relay-max-bps", metavar="BYTES", type=int, default=0,
                      help="the relay's limit per allocation, bytes per second (default: none)")
    mesh.add_argument("--turnserver", default="turnserver", help=argparse.SUPPRESS)
    mesh.add_argument("--wireguard-go", default="wireguard-go", help=argparse.SUPPRESS)
    mesh.add_argument("--wg", default="wg", help=argparse.SUPPRESS)
    add_ice_options(p)  # each pair's path: ICE on the WireGuard port, TURN as sessions use it
    trust = p.add_argument_group("trust (a network with a CA, docs/mesh-trust.md)")
    trust.add_argument("--network-ca", metavar="DIR", type=Path,
                       help="directory with the network's ca.pub (and revoked)")
    trust.add_argument("--member-cert", metavar="FILE", type=Path,
                       help="our member certificate")
    trust.add_argument("--identity-key", metavar="FILE", type=Path, help="our identity key")
    add_tls_options(p)
    add_output_options(p, "log mesh events (-vv: more)")


def add_down_parser(subparsers: argparse._SubParsersAction) -> None:
    d = subparsers.add_parser(
        "down", help="leave a mesh network (ask a running `sipmesh up` to leave)",
        description="Ask the running `sipmesh up NETWORK` to leave cleanly: BYE to every "
                    "peer, unregister, remove the interface; waits until it has.")
    d.add_argument("network", metavar="NETWORK")
    d.add_argument("--user", help="which member, when several run here")
    d.add_argument("--socket", metavar="PATH", type=Path, help="its control socket")
    d.add_argument("--timeout", type=positive, default=DOWN_WAIT, help=argparse.SUPPRESS)
    d.set_defaults(func=run_down)
