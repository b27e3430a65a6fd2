"""`sipmesh call TARGET`: INVITE a registered name and run the paired application."""

from __future__ import annotations

import argparse

from sipmesh.agent.session import AgentConfig
from sipmesh.cli.serve import add_agent_options, add_program_parser, positive, run_agent


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
    if getattr(args, "service", None):  # a daemon's service (cli/daemon.py)
        from sipmesh.cli.daemon import run_service_call
        return run_service_call(args)

    def configure(config: AgentConfig) -> None:
        config.target = args.target
        config.invite_timeout = args.timeout
        config.register = not args.no_register

    return run_agent(args, "call", configure)


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
              "[--app exec -- PROGRAM [ARGS...] | --app openvpn [-- OPENVPN-OPTIONS...]]")
    parser.add_argument("target", metavar="TARGET", type=target_name,
                        help="who to call: a registered name (2500), user@domain or a SIP URI")
    add_agent_options(parser, "call")
    parser.add_argument("--timeout", metavar="SECONDS", type=positive, default=30.0,
                        help="give up (CANCEL) when there is no answer in time (default: 30)")
    parser.add_argument("--no-register", action="store_true",
                        help="do not register our own name first")
    from sipmesh.cli.daemon import add_service_call_options
    add_service_call_options(parser)
    parser.set_defaults(func=_run)
    return parser
