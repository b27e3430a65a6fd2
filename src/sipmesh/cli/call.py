"""`sipmesh call TARGET`: INVITE a registered name and run the paired application;
with ``--service NAME``, the calling half of a daemon's service (docs/daemon.md)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from sipmesh.agent.errors import AgentError, Exit
from sipmesh.agent.link import client_tls
from sipmesh.agent.session import Agent, AgentConfig
from sipmesh.cli.common import (default_config_path, fail, more_servers, positive,
                                progress_printer, read_credentials, register_builtin_kinds,
                                run_until_signalled,
                                section_password, setup_logging, tls_client)
from sipmesh.cli.serve import (add_agent_options, add_program_parser, chosen_transport,
                               ice_options, run_from_args)
from sipmesh.daemon.config import load_config
from sipmesh.sip.ua import UAConfig


def target_name(text: str) -> str:
    """A registered name (2500), user@domain or a sip:/sips: URI."""
    from sipmesh.sip.errors import ParseError
    from sipmesh.sip.uri import parse_sip_uri

    uri = text if text.startswith(("sip:", "sips:")) else \
        f"sip:{text}" if "@" in text else f"sip:{text}@example.invalid"
    try:
        parsed = parse_sip_uri(uri)
    except (ParseError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a name or SIP URI ({exc})") from None
    if not getattr(parsed, "user", None):
        raise argparse.ArgumentTypeError(f"{text!r} names no user")
    return text


def _run(args: argparse.Namespace) -> int:
    if getattr(args, "service", None):  # a daemon's service
        return run_service_call(args)
    return run_from_args(args, "call", target=args.target, invite_timeout=args.timeout,
                         register=not args.no_register)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = add_program_parser(
        subparsers, "call", help="call a registered name and run the paired application",
        description="Register NAME, INVITE TARGET by name through the SIP server, read the "
                    "answer's a= parameters (never m=, c= or o=, which proxies rewrite), ACK "
                    "and start the application with them. When the application exits a BYE "
                    "ends the session; when the peer sends BYE the application is stopped. "
                    "Exits when the session has ended: 0 if the application exited 0 or was "
                    "stopped by us (BYE from the peer, a signal), 10 if it exited non-zero "
                    "or was killed by a signal we did not send.",
        usage="sipmesh call TARGET --server HOST[:PORT] --user NAME [options] "
              "[--app exec -- PROGRAM [ARGS...] | --app openvpn [-- OPENVPN-OPTIONS...] | "
              "--app wireguard]")
    parser.add_argument("target", metavar="TARGET", type=target_name,
                        help="who to call: a registered name (2500), user@domain or a SIP URI")
    add_agent_options(parser, "call")
    parser.add_argument("--timeout", metavar="SECONDS", type=positive, default=30.0,
                        help="give up (CANCEL) when there is no answer in time (default: 30)")
    parser.add_argument("--no-register", action="store_true",
                        help="do not register our own name first")
    add_service_call_options(parser)
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
            password = section_password(agent)
        password = password or os.environ.get("SIPMESH_PASSWORD")
        if args.server:  # the command line's servers, and how to reach them
            transport = chosen_transport(args.server, args.transport)
            tls = tls_client(args)
            servers = more_servers(args, transport)
        else:  # the configuration's
            transport = (args.transport or agent.transport).lower()
            tls = agent.tls.merged(tls_client(args))
            servers = agent.servers
        ua = UAConfig(user=user, domain=server, password=password,
                      auth_user=args.auth_user or (agent.auth_user if args.user is None else None),
                      transport=transport.upper(), tls_client_context=client_tls(transport, tls),
                      listen_host=args.bind, listen_port=args.sip_port,
                      peer_keepalive=agent.keepalive if args.keepalive is None
                      else args.keepalive, servers=servers)
        agent_config = AgentConfig(ua=ua, mode="call", target=args.target,
                                   advertise=args.advertise or agent.advertise,
                                   tls_server_name=tls.server_name,
                                   register=False, invite_timeout=args.timeout,
                                   register_timeout=args.register_timeout, grace=args.grace,
                                   ice=ice_options(args, agent.ice))
    except AgentError as exc:  # ProfileError is one
        return fail(prog, exc)
    return run_until_signalled(prog, Agent(agent_config, profile,
                                           on_event=progress_printer(prog, args.quiet)))


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
