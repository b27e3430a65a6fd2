"""`sipmesh handover SESSION --to NAME`: a running daemon hands one of the clients it
answered over to another agent (REFER, RFC 3515; see docs/DESIGN.md "Hand-over")."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sipmesh.agent.errors import AgentError, Exit
from sipmesh.cli.status import find_socket


def _run(args: argparse.Namespace) -> int:
    from sipmesh.daemon.control import query

    try:
        path = find_socket(args)
        try:
            answer = query(path, {"command": "handover", "session": args.session, "to": args.to},
                           timeout=args.timeout)
        except (OSError, ValueError) as exc:
            raise AgentError(f"cannot reach the daemon at {path}: {exc}", Exit.UNREACHABLE) \
                from None
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
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--socket", metavar="PATH", type=Path, help="the daemon's control socket")
    source.add_argument("-c", "--config", metavar="FILE", type=Path,
                        help="the daemon's configuration (to find its socket)")
    parser.add_argument("--timeout", type=float, default=20.0, help=argparse.SUPPRESS)
    parser.set_defaults(func=_run)
    return parser
