"""The `sipmesh` command: one console script, one subcommand per job."""

from __future__ import annotations

import argparse
import importlib
import sys

from sipmesh import __version__

# The subcommands' modules (sipmesh.cli.NAME), in the order `sipmesh --help` lists them, and
# the commands each adds. A command line that names one imports only its module: `sipmesh up`
# does not load the broker, the resolver's DNS over QUIC or the status page (docs/mesh.md).
_COMMANDS = {"broker": ("broker",), "serve": ("serve",), "call": ("call",),
             "daemon": ("daemon",), "status": ("status",), "handover": ("handover",),
             "up": ("up", "down"), "netcheck": ("netcheck",), "ping": ("ping",),
             "demo": ("demo",), "network": ("network",)}
_MODULE_OF = {command: module for module, commands in _COMMANDS.items() for command in commands}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with `command` (a subcommand's name), that subcommand only."""
    parser = argparse.ArgumentParser(
        prog="sipmesh",
        description="Let network applications find each other by name and connect directly, "
                    "with SIP as the session manager.")
    parser.add_argument("--version", action="version", version=f"sipmesh {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = [_MODULE_OF[command]] if command in _MODULE_OF else list(_COMMANDS)
    for name in modules:
        importlib.import_module(f"sipmesh.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv[0] if argv else None)
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
