"""The `sipmesh` command: one console script, one subcommand per job."""

from __future__ import annotations

import argparse
import sys

from sipmesh import __version__
from sipmesh.cli import broker, call, daemon, demo, handover, netcheck, network, ping, serve, status, up

# The subcommands, in the order `sipmesh --help` lists them.
_COMMANDS = [broker, serve, call, daemon, status, handover, up, netcheck, ping, demo, network]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sipmesh",
        description="Let network applications find each other by name and connect directly, "
                    "with SIP as the session manager.")
    parser.add_argument("--version", action="version", version=f"sipmesh {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
