"""`sipmesh netcheck`: what this host's network lets sessions do (agent/netcheck.py)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from sipmesh.agent.errors import AgentError, Exit
from sipmesh.agent.netcheck import TIMEOUT, NetcheckConfig, Report, netcheck, show
from sipmesh.cli.common import (add_identity_options, add_output_options, fail, positive,
                                server_address, setup_logging, sip_identity, table)

EXIT_HELP = """exit status:
  0  the check ran and at least one server answered (the report says what works)
  2  bad command line, or nothing to check
  4  no server answered at all (or none of their names resolved)"""

_MAPPING = {
    "none": "none: the servers see our own address",
    "endpoint-independent": "endpoint-independent (the same public address towards every server)",
    "per-destination": "per destination (symmetric: another public port for each server)",
    "unknown": "unknown",
}


def render(report: Report) -> str:
    """The report as a person reads it: the verdict, one line per probe, what to do next."""
    public = ", ".join(show(a) for a in report.public) or "-"
    if report.local and report.public and report.mapping != "none":
        public += f"  (ours: {show(report.local)})"
    relay = ", ".join(f"{t.upper()} {state}" for t, state in report.relay.items()) or \
        "not checked (--turn HOST[:PORT])"
    out = [f"UDP:      {report.udp}",
           f"public:   {public}",
           f"mapping:  {_MAPPING.get(report.mapping, report.mapping)}",
           f"relay:    {relay}",
           ""]
    rows = []
    for p in report.probes:
        if p.relayed:
            seen = f"relay {show(p.relayed)}, credentials {p.credentials}"
        elif p.error:
            seen = p.error
        else:
            seen = show(p.mapped) or "-"
        rtt = f"{p.rtt * 1000:.1f} ms" if p.rtt is not None else "-"
        address = show(p.server.address)
        where = p.server.name if address == p.server.name else f"{p.server.name} ({address})"
        rows.append([p.server.role, where, p.transport, rtt, seen])
    for s in report.servers:
        if s.error:
            rows.append([s.role, s.name, "-", "-", s.error])
    out += table(rows, ["SERVER", "ADDRESS", "VIA", "RTT", "SEEN AS / RESULT"])
    out.append("")
    out += [f"- {sentence}" for sentence in report.verdict]
    out += [f"next: {sentence}" for sentence in report.advice]
    out.append(f"({report.elapsed:.1f} s)")
    return "\n".join(out)


def _run(args: argparse.Namespace) -> int:
    prog = "sipmesh netcheck"
    setup_logging(args.verbose, args.debug, args.log_file)
    try:
        if not args.server and not args.stun:
            raise AgentError("nothing to check: give --server HOST[:PORT] (your SIP server "
                             "answers STUN on its SIP port; or $SIPMESH_SERVER) or "
                             "--stun HOST[:PORT]", Exit.USAGE)
        user, password, auth_user = sip_identity(args)
    except AgentError as exc:
        return fail(prog, exc)
    config = NetcheckConfig(sip_server=args.server, stun_servers=tuple(args.stun or ()),
                            turn_server=args.turn, turn_username=auth_user or user,
                            turn_password=password, timeout=args.timeout)
    chatty = not args.quiet and sys.stderr.isatty()

    def progress(text: str) -> None:
        if chatty:
            print(f"{prog}: {text}...", file=sys.stderr, flush=True)

    report = asyncio.run(netcheck(config, on_progress=progress))
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(render(report))
    if not report.anything_answered:
        if not args.json:
            print(f"{prog}: no server answered: see 'next:' above", file=sys.stderr)
        return int(Exit.UNREACHABLE)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "netcheck", help="what this network lets sessions do (NAT, UDP, relay)",
        description="Ask the SIP server (which answers STUN on its SIP port) and other STUN "
                    "servers from one UDP socket which public address and port our NAT gives "
                    "us towards each: the same towards all is an endpoint-independent NAT "
                    "(direct sessions work), another port per server a symmetric one (peers "
                    "behind NAT are reached through the relay). With --turn, make and delete "
                    "a relay allocation over UDP and over TCP with the SIP name and password. "
                    "All at once, each probe bounded by --timeout.",
        epilog=EXIT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="sipmesh netcheck [--server HOST[:PORT]] [--stun HOST[:PORT]]... "
              "[--turn HOST[:PORT] --user NAME --credentials FILE] [--json]")
    servers = parser.add_argument_group("servers")
    add_identity_options(
        servers, server_help="SIP server, asked for STUN on its SIP UDP port (5060 if "
                             "omitted; SRV for _sip._udp if a name without a port) "
                             "[$SIPMESH_SERVER]",
        user_help="our SIP name: the relay takes the SIP name and password [$SIPMESH_USER]")
    servers.add_argument("--stun", metavar="HOST[:PORT]", type=server_address, action="append",
                         help="another STUN server (port 3478 if omitted); repeatable. Two "
                              "servers at different addresses show how the NAT maps")
    servers.add_argument("--turn", metavar="HOST[:PORT]", type=server_address,
                         help="the TURN relay (coturn; port 3478 if omitted), checked over "
                              "UDP and TCP with the SIP credentials")
    parser.add_argument("--timeout", metavar="SECONDS", type=positive, default=TIMEOUT,
                        help=f"how long each probe waits for answers (default: {TIMEOUT:g})")
    parser.add_argument("--json", action="store_true",
                        help="print the report as JSON (for scripts)")
    add_output_options(parser, "log what the probes do")
    parser.set_defaults(func=_run)
    return parser
