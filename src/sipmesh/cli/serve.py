"""`sipmesh serve`: register a name and answer sessions with an application, one at a time.

Also the options and the runner shared with `sipmesh call` (cli/call.py).
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from typing import Any

from sipmesh.agent.errors import EXIT_HELP, AgentError, Exit
from sipmesh.agent.ice import IceOptions
from sipmesh.agent.link import TRANSPORTS, ServerAddress, client_tls, server_instance
from sipmesh.agent.certs import default_state_dir
from sipmesh.agent.params import IPAddress, IPv4, Port
from sipmesh.agent.profile import AppProfile
from sipmesh.agent.session import Agent, AgentConfig
from sipmesh.cli.common import (add_identity_options, add_output_options, add_tls_options,
                                add_keepalive_option, fail, more_servers, positive, progress_printer,
                                run_until_signalled, setup_logging, sip_identity, sip_port,
                                stun_server, tls_client, turn_server, typed)
from sipmesh.sip.ua import UAConfig
from sipmesh.sip.ua.useragent import DEFAULT_PEER_KEEPALIVE

APPS = ("exec", "openvpn", "wireguard")


class ProgramArgumentParser(argparse.ArgumentParser):
    """Everything after the first ``--`` is the program and its arguments (``args.program``).

    argparse cannot mix a positional (TARGET) with a trailing ``*`` list after options, so
    the split happens before argparse sees the words."""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        args = list(sys.argv[1:] if args is None else args)
        program: list[str] = []
        if "--" in args:
            cut = args.index("--")
            args, program = args[:cut], args[cut + 1:]
        namespace, extras = super().parse_known_args(args, namespace)
        namespace.program = program
        return namespace, extras


def add_agent_options(parser: argparse.ArgumentParser, mode: str) -> None:
    sip = parser.add_argument_group("SIP")
    add_identity_options(sip, server_help="SIP server (registrar and proxy); port 5060 if omitted; "
                         "sips:HOST[:PORT] for TLS (port 5061 if omitted) [$SIPMESH_SERVER]")
    sip.add_argument("--sip-port", metavar="PORT", type=sip_port, default=0,
                     help="local SIP port for UDP and TCP (default: any free port)")
    sip.add_argument("--bind", metavar="ADDR", type=typed(IPAddress(unicast=False), "bind"),
                     default="0.0.0.0", help="local address to listen on (default: all)")
    sip.add_argument("--transport", choices=TRANSPORTS,
                     help="transport towards the server (default: udp; tls for a sips: "
                          "server)")
    sip.add_argument("--expires", metavar="SECONDS", type=int, default=3600,
                     help="registration lifetime; refreshed at half of it (default: 3600)")
    sip.add_argument("--register-timeout", metavar="SECONDS", type=positive, default=10.0,
                     help="give up when the server does not answer a REGISTER (default: 10)")
    add_keepalive_option(sip)
    app = parser.add_argument_group("application")
    app.add_argument("--app", choices=APPS, default="exec",
                     help="exec: run the program given after --; openvpn: run OpenVPN with a "
                          "per-session configuration; wireguard: a WireGuard tunnel "
                          "(wireguard-go) with a fresh key pair per session (default: exec)")
    app.add_argument("--advertise", metavar="ADDR", type=typed(IPAddress(), "advertise"),
                     help="the address the peer can reach us at (sent as a=IP4/a=IP6; "
                          "default: our address towards the SIP server)")
    app.add_argument("--grace", metavar="SECONDS", type=positive, default=5.0,
                     help="time between SIGTERM and SIGKILL when stopping the program "
                          "(default: 5)")
    if mode == "serve":
        app.add_argument("--app-port", metavar="PORT", type=typed(Port(), "app-port"),
                         default="8000",
                         help="application port offered to callers; the next free one if it "
                              "is taken (default: 8000)")
        app.add_argument("--vpn-local", metavar="ADDR", type=typed(IPv4(), "vpn-local"),
                         help="our tunnel address, sent as a=VPN_LOCAL_ADDR (openvpn, wireguard: "
                              "default 192.168.234.1; exec: sent only when given)")
        app.add_argument("--vpn-remote", metavar="ADDR", type=typed(IPv4(), "vpn-remote"),
                         help="the caller's tunnel address, a=VPN_REMOTE_ADDR (default: "
                              "--vpn-local + 1)")
    app.add_argument("--app-transport", choices=("udp", "tcp"), default="udp",
                     help="exec: how the program talks to its peer. udp (default): it binds "
                          "{LOCAL_PORT} and exchanges datagrams with {REMOTE_IP}:{REMOTE_PORT}, "
                          "the path ICE checked across NATs; tcp: the prototype's listen on "
                          "{PORT} / connect to {IP4}:{PORT}")
    add_ice_options(parser)
    app.add_argument("--vpn", action="store_true",
                     help="exec: the paper's VPN parameters (VPN_LOCAL_ADDR, VPN_REMOTE_ADDR)")
    app.add_argument("--append-args", action="store_true",
                     help="exec: append the values to the program's arguments as sip_app did "
                          "(answering: PORT [VPN_LOCAL VPN_REMOTE]; calling: IP4 PORT "
                          "[VPN_LOCAL VPN_REMOTE])")
    app.add_argument("--openvpn", metavar="PATH", default="openvpn",
                     help="openvpn: the OpenVPN binary (default: openvpn in PATH)")
    app.add_argument("--state-dir", metavar="DIR", type=Path,
                     help="where the host certificate lives (default: "
                          "$XDG_STATE_HOME/sipmesh or ~/.local/state/sipmesh)")
    add_tls_options(parser)
    add_output_options(parser, "log protocol events (-vv: more)")

def add_ice_options(parser: argparse.ArgumentParser) -> None:
    nat = parser.add_argument_group("NAT traversal (ICE)")
    nat.add_argument("--no-ice", action="store_true",
                     help="no ICE: send only the paper's a=IP4/a=PORT (the program then "
                          "reaches the peer only where it could without NATs)")
    nat.add_argument("--stun", metavar="HOST[:PORT]", type=stun_server,
                     help="STUN server for our reflexive address (default: the SIP server, "
                          "which answers STUN on its SIP port)")
    nat.add_argument("--turn", metavar="turn:HOST[:PORT][?transport=tcp]", type=turn_server,
                     help="TURN relay (port 3478 if omitted), used with our SIP name and "
                          "password, for paths no NAT lets through (UDP, falling back to TCP "
                          "unless ?transport= says)")
    nat.add_argument("--consent-timeout", metavar="SECONDS", type=float, default=30.0,
                     help="end the session when nothing came from the peer for this long "
                          "(default: 30, RFC 7675; 0: never)")
    nat.add_argument("--no-portmap", action="store_true",
                     help="do not ask the router to map our port (PCP, NAT-PMP, UPnP-IGD)")


def ice_options(args: argparse.Namespace, base: IceOptions | None = None) -> IceOptions:
    """The command line's ICE choices over `base` (a daemon configuration's [agent])."""
    base = base or IceOptions()
    turn = args.turn
    return IceOptions(enabled=base.enabled and not args.no_ice, stun=args.stun or base.stun,
                      turn=turn[:2] if turn else base.turn,
                      turn_transport=turn[2] if turn else base.turn_transport,
                      consent_timeout=max(0.0, args.consent_timeout),
                      portmap=base.portmap and not args.no_portmap)


def ua_config(args: argparse.Namespace, *, listen_port: int | None = None) -> UAConfig:
    user, password, auth_user = sip_identity(args)
    if not args.server:
        raise AgentError("--server is required (or $SIPMESH_SERVER)", Exit.USAGE)
    if not user:
        raise AgentError("--user is required (or $SIPMESH_USER)", Exit.USAGE)
    transport = chosen_transport(args.server, args.transport)
    servers = more_servers(args, transport)
    return UAConfig(user=user, domain=args.server, password=password,
                    auth_user=auth_user, transport=transport.upper(),
                    tls_client_context=client_tls(transport, tls_client(args)),
                    listen_host=args.bind, listen_port=args.sip_port if listen_port is None
                    else listen_port, peer_keepalive=DEFAULT_PEER_KEEPALIVE
                    if args.keepalive is None else args.keepalive,
                    servers=servers, instance=server_instance(
                        (args.server, *servers), args.state_dir or default_state_dir()))


def chosen_transport(server: ServerAddress, option: str | None) -> str:
    """udp, tcp or tls: --transport, else what --server implies (sips: is TLS)."""
    try:
        return server.with_transport(option)
    except ValueError as exc:
        raise AgentError(str(exc), Exit.USAGE) from None


def build_profile(args: argparse.Namespace, mode: str) -> AppProfile:
    from sipmesh.apps.exec import DEFAULT_VPN_LOCAL, ExecProfile, vpn_pair
    from sipmesh.apps.openvpn import OpenVPNProfile
    from sipmesh.apps.wireguard import WireGuardProfile

    app_port = int(getattr(args, "app_port", 8000))
    vpn_local = getattr(args, "vpn_local", None)
    vpn_remote = getattr(args, "vpn_remote", None)
    if args.app == "openvpn":
        return OpenVPNProfile(openvpn=args.openvpn, state_dir=args.state_dir, app_port=app_port,
                              vpn_local=vpn_local or DEFAULT_VPN_LOCAL, vpn_remote=vpn_remote,
                              extra_args=args.program)
    if args.app == "wireguard":
        if args.program:
            raise AgentError("--app wireguard takes no program after --", Exit.USAGE)
        return WireGuardProfile(app_port=app_port, vpn_local=vpn_local or DEFAULT_VPN_LOCAL,
                                vpn_remote=vpn_remote, state_dir=args.state_dir)
    if not args.program:
        raise AgentError("no program to run: give it after --, e.g. "
                         f"'sipmesh {mode} ... -- ./myprog --port {{PORT}}'", Exit.USAGE)
    vpn = None
    if args.vpn or vpn_local or vpn_remote:
        vpn = vpn_pair(vpn_local or DEFAULT_VPN_LOCAL, vpn_remote)
    return ExecProfile(args.program, app_port=app_port, vpn=vpn, append_args=args.append_args,
                       transport=args.app_transport)


def run_from_args(args: argparse.Namespace, mode: str, **settings: Any) -> int:
    """`sipmesh serve` and `sipmesh call`: the agent of the command line (AgentConfig plus
    the mode's `settings`), until it is done."""
    prog = f"sipmesh {mode}"
    setup_logging(args.verbose, args.debug, args.log_file)
    try:
        profile = build_profile(args, mode)
        config = AgentConfig(ua=ua_config(args), mode=mode, advertise=args.advertise,
                             tls_server_name=args.tls_server_name,
                             expires=args.expires, register_timeout=args.register_timeout,
                             grace=args.grace, ice=ice_options(args), **settings)
    except AgentError as exc:
        return fail(prog, exc)
    return run_until_signalled(prog, Agent(config, profile,
                                           on_event=progress_printer(prog, args.quiet)))


def _run(args: argparse.Namespace) -> int:
    return run_from_args(args, "serve", once=args.once)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = add_program_parser(
        subparsers, "serve", help="register a name and answer sessions with an application",
        description="Register NAME at the SIP server, then answer INVITEs one at a time: "
                    "validate the caller's a= parameters, start the application, send our "
                    "parameters in the a= lines of the 200 OK. The session ends when the "
                    "application exits (BYE) or the peer sends BYE (the application is "
                    "stopped). SIGINT, SIGTERM or SIGHUP end the session, unregister and "
                    "exit 0. Arguments of an exec program may contain {PORT}, {IP4}, "
                    "{LOCAL_IP}, {REMOTE_IP}, {VPN_LOCAL_ADDR}, {VPN_REMOTE_ADDR}; the "
                    "program also gets SIPMESH_* environment variables.",
        usage="sipmesh serve --server HOST[:PORT] --user NAME [options] "
              "[--app exec -- PROGRAM [ARGS...] | --app openvpn [-- OPENVPN-OPTIONS...] | "
              "--app wireguard]")
    add_agent_options(parser, "serve")
    parser.add_argument("--once", action="store_true",
                        help="exit after the first session, with status 10 if its application "
                             "failed (exited non-zero or was killed by a signal we did not send)")
    parser.set_defaults(func=_run)
    return parser


def add_program_parser(subparsers: argparse._SubParsersAction, name: str, **kwargs
                        ) -> argparse.ArgumentParser:
    if "description" in kwargs:
        kwargs["description"] = textwrap.fill(kwargs["description"], 90)
    previous = subparsers._parser_class
    subparsers._parser_class = ProgramArgumentParser
    try:
        return subparsers.add_parser(name, epilog=EXIT_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     **kwargs)
    finally:
        subparsers._parser_class = previous
