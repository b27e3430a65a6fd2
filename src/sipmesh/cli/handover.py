"""`sipmesh handover SESSION --to NAME`: a running daemon hands one of the clients it
answered over to another agent (REFER, RFC 3515; docs/sessions.md, "Handing a client over
to another agent")."""

from __future__ import annotations

import argparse
import sys

from sipmesh.agent.errors import AgentError
from sipmesh.cli.status import add_socket_options, ask, find_socket


def _run(args: argparse.Namespace) -> int:
    try:
        answer = ask(find_socket(args), {"command": "handover", "session": args.session,
                                         "to": args.to}, args.timeout)
    except AgentError as exc:
        print(f"sipmesh handover: {exc}", file=sys.stderr)
        return int(exc.code)
    if answer.get("ok"):
        print(f"handed over: {answer.get('message')}")
        return 0
    print(f"sipmesh handover: {answer.get('error') or answer.get('message')}", file=sys.stderr)
    return 1


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "handover", help="hand a client a running daemon answered over to another agent",
        description="Ask a running `sipmesh daemon` to send one of its sessions' callers to "
                    "another agent (REFER): the caller calls that agent with the same service, "
                    "restarts its program against the new peer, then ends the old session.")
    parser.add_argument("session", help="the session: its Call-ID, or the caller's name or URI")
    parser.add_argument("--to", required=True, metavar="NAME",
                        help="the agent to hand it to: a name in the domain, or a SIP URI")
    add_socket_options(parser)
    parser.add_argument("--timeout", type=float, default=20.0, help=argparse.SUPPRESS)
    parser.set_defaults(func=_run)
    return parser
