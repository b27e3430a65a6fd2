"""`sipmesh daemon -c FILE`: the super-daemon; and `sipmesh call TARGET --service NAME`.

This module wires the built-in service kinds into the daemon's registry (forward and
wireguard register themselves; openvpn is adapted here from apps/openvpn.py), so
that the daemon package never imports the applications above it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import signal
import sys
import textwrap
from pathlib import Path
from typing import Any

from sipmesh.agent.errors import EXIT_HELP, AgentError, Exit, ProfileError
from sipmesh.agent.profile import Plan, SessionInfo
from sipmesh.agent.supervisor import ChildSpec
from sipmesh.daemon.config import DaemonConfig, load_config
from sipmesh.daemon.registry import get_kind, register_kind
from sipmesh.daemon.service import ConfigValueError, ServiceProfile

log = logging.getLogger("sipmesh.cli.daemon")


def default_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "sipmesh" / "daemon.toml"


# ---------------------------------------------------------------------- openvpn as a kind


class OpenVPNService(ServiceProfile):
    """kind = "openvpn": apps/openvpn.py per session, with an allocated UDP port
    (``port = ALLOCATOR``) and tunnel address pair (``addresses = POOL``)."""

    name = "openvpn"
    media = "application/vpn"
    proto = "OpenVPN"
    options = ("port", "addresses", "openvpn", "extra_args")

    def configure(self, options: dict[str, Any], call: dict[str, Any]) -> None:
        from sipmesh.apps.openvpn import OpenVPNProfile

        self.offer_params = OpenVPNProfile.offer_params
        self.answer_params = OpenVPNProfile.answer_params
        self.port_allocator = self.allocator_option(options, "port", "ports")
        self.pool = self.allocator_option(options, "addresses", "addresses", required=True)
        if ":" in str(getattr(self.allocators[self.pool], "network", "")):
            raise ConfigValueError("addresses", "OpenVPN's tunnel addresses are IPv4: "
                                                "use an IPv4 pool")
        self.openvpn = self.option_str(options, "openvpn", "openvpn")
        extra = options.get("extra_args", [])
        if not isinstance(extra, list) or not all(isinstance(a, str) for a in extra):
            raise ConfigValueError("extra_args", "must be a list of strings")
        self.extra_args = extra
        self._caller = None

    def _profile(self, port: int = 8000, local: str = "192.168.234.1",
                 remote: str | None = None):
        from sipmesh.apps.openvpn import OpenVPNProfile

        return OpenVPNProfile(openvpn=self.openvpn, state_dir=self.state_dir, app_port=port,
                              vpn_local=local, vpn_remote=remote, extra_args=self.extra_args)

    def check(self) -> None:
        probe = self._profile()
        probe.check()  # the binary, /dev/net/tun, the host certificate
        self.openvpn = probe.openvpn

    def offer(self, info: SessionInfo) -> dict[str, str]:
        self._caller = self._caller or self._profile()
        return dict(self._caller.offer(info), service=self.service_name)

    async def answer(self, info: SessionInfo, offer: dict[str, str]) -> Plan:
        lease = self.lease_of(info)
        port = lease.port(self.port_allocator, ("udp",))
        local, remote = lease.pair(self.pool)
        return await self._profile(port, local, remote).answer(info, offer)

    def caller_child(self, info: SessionInfo, offer: dict[str, str],
                     answer: dict[str, str]) -> ChildSpec:
        self._caller = self._caller or self._profile()
        return self._caller.caller_child(info, offer, answer)


def register_builtin_kinds() -> None:
    from sipmesh.apps import forward, wireguard

    forward.register()
    wireguard.register()
    register_kind("openvpn", OpenVPNService)
    get_kind("exec")


# ---------------------------------------------------------------------- sipmesh daemon


def _raise_fd_limit() -> None:
    """Every session holds a few descriptors (pidfd, sockets): allow as many as we may."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def _password(config: DaemonConfig) -> str | None:
    from sipmesh.cli.serve import read_credentials

    agent = config.agent
    if agent.credentials is not None:
        return read_credentials(agent.credentials)["password"]
    return agent.password or os.environ.get("SIPMESH_PASSWORD")


def _summary(config: DaemonConfig) -> str:
    lines = [f"{config.path}: OK, {len(config.services)} services"]
    for service in config.services.values():
        lines.append(f"  {service.name:<16} {service.kind:<10} max_sessions={service.max_sessions}"
                     f" allow={','.join(service.allow)}")
    for name, allocator in config.allocators.items():
        lines.append(f"  allocator {name}: {allocator.describe()}")
    return "\n".join(lines)


async def _serve(daemon, prog: str, quiet: bool) -> int:
    loop = asyncio.get_running_loop()

    def on_reload() -> None:
        ok, message = daemon.reload()
        if not quiet:
            print(f"{prog}: {message}", file=sys.stderr, flush=True)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, daemon.request_stop)
    loop.add_signal_handler(signal.SIGHUP, on_reload)

    async def announce() -> None:
        await daemon.ready.wait()
        if not quiet:
            print(f"{prog}: ready as {daemon.ua.aor}, {len(daemon.config.services)} services "
                  f"({', '.join(daemon.config.services)}); status: sipmesh status --socket "
                  f"{daemon.control_path}", file=sys.stderr, flush=True)

    announcer = asyncio.ensure_future(announce())
    try:
        return int(await daemon.run())
    except AgentError as exc:
        print(f"{prog}: {exc}", file=sys.stderr, flush=True)
        return int(exc.code)
    finally:
        announcer.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)


def _run(args: argparse.Namespace) -> int:
    from sipmesh.cli.main import setup_logging
    from sipmesh.daemon.server import Daemon, ua_config

    prog = "sipmesh daemon"
    setup_logging(args.verbose, args.debug, args.log_file)
    register_builtin_kinds()
    path = args.config or default_config_path()
    try:
        config = load_config(path)
        if args.check:
            print(_summary(config))
            return 0
        daemon = Daemon(config, ua=ua_config(config.agent, _password(config)),
                        control_socket=args.socket)
    except AgentError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return int(exc.code)
    _raise_fd_limit()
    return asyncio.run(_serve(daemon, prog, args.quiet))


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    description = textwrap.fill(
        "Register the identity of the configuration file's [agent] table and answer any "
        "number of concurrent sessions of the services it defines ([[service]]). A call "
        "selects its service with a=service:NAME in its SDP (sipmesh call TARGET --service "
        "NAME). Each session gets its own child process and its own ports and addresses, "
        "released when it ends. SIGHUP reloads the file (new sessions get the new "
        "configuration, running ones keep theirs; a bad file is refused and the old one "
        "kept); SIGINT/SIGTERM end every session, unregister and exit. See docs/daemon.md.",
        90)
    parser = subparsers.add_parser("daemon", help="serve many services and sessions at once",
                                   description=description, epilog=EXIT_HELP,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", metavar="FILE", type=Path,
                        help=f"the configuration (TOML) [default: {default_config_path()}]")
    parser.add_argument("--check", action="store_true",
                        help="check the configuration, print a summary and exit")
    parser.add_argument("--socket", metavar="PATH", type=Path,
                        help="control socket for sipmesh status (default: [agent] "
                             "control_socket, else $XDG_RUNTIME_DIR/sipmesh/daemon-USER.sock)")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log sessions (-vv: more)")
    parser.add_argument("--debug", action="store_true",
                        help="log full SIP messages (passwords redacted)")
    parser.add_argument("--log-file", metavar="FILE", help="log there instead of stderr")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    parser.set_defaults(func=_run)
    return parser


# ---------------------------------------------------------------------- sipmesh call --service


def parse_params(items: list[str] | None) -> dict[str, str]:
    values: dict[str, str] = {}
    for item in items or []:
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise AgentError(f"--param {item!r}: expected NAME=VALUE", Exit.USAGE)
        values[name] = value
    return values


def run_service_call(args: argparse.Namespace) -> int:
    """`sipmesh call TARGET --service NAME [-c FILE] [--param NAME=VALUE]...`: the calling
    half of a daemon's service, from the same configuration file."""
    from sipmesh.agent.session import Agent, AgentConfig
    from sipmesh.cli.main import setup_logging
    from sipmesh.cli.serve import progress_printer, read_credentials, run_agent_async
    from sipmesh.sip.ua import UAConfig

    prog = "sipmesh call"
    setup_logging(args.verbose, args.debug, args.log_file)
    register_builtin_kinds()
    try:
        path = args.config or default_config_path()
        config = load_config(path, side="call")
        service = config.services.get(args.service)
        if service is None:
            raise AgentError(f"{path}: no service {args.service!r} (services: "
                             f"{', '.join(config.services) or 'none'})", Exit.USAGE)
        profile = service.profile
        profile.set_call_values(parse_params(getattr(args, "param", None)))
        agent = config.agent
        server = args.server or agent.server
        user = args.user or agent.user
        if not server or not user:
            raise AgentError("no SIP identity: give [agent] server and user in the "
                             "configuration, or --server and --user", Exit.USAGE)
        password = args.password
        if password is None and args.credentials is not None:
            password = read_credentials(args.credentials)["password"]
        if password is None and args.user is None:  # the configuration's identity
            password = agent.password or (read_credentials(agent.credentials)["password"]
                                          if agent.credentials else None)
        password = password or os.environ.get("SIPMESH_PASSWORD")
        transport = args.transport.upper() if args.server else agent.transport.upper()
        ua = UAConfig(user=user, domain=server, password=password,
                      auth_user=args.auth_user or (agent.auth_user if args.user is None else None),
                      transport=transport, listen_host=args.bind, listen_port=args.sip_port)
        agent_config = AgentConfig(ua=ua, mode="call", target=args.target,
                                   advertise=args.advertise or agent.advertise,
                                   register=False, invite_timeout=args.timeout,
                                   register_timeout=args.register_timeout, grace=args.grace)
    except (AgentError, ProfileError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return int(exc.code)
    runner = Agent(agent_config, profile, on_event=progress_printer(prog, args.quiet))
    return asyncio.run(run_agent_async(runner, prog))


def add_service_call_options(parser: argparse.ArgumentParser) -> None:
    """The options `sipmesh call` gains for daemon services."""
    group = parser.add_argument_group("daemon services (docs/daemon.md)")
    group.add_argument("--service", metavar="NAME",
                       help="call this service of a sipmesh daemon (a=service:NAME) and run "
                            "its calling half as defined in the configuration file")
    group.add_argument("-c", "--config", metavar="FILE", type=Path,
                       help=f"with --service: the configuration defining it "
                            f"[default: {default_config_path()}]")
    group.add_argument("--param", metavar="NAME=VALUE", action="append",
                       help="with --service: a value the caller provides (repeatable)")
