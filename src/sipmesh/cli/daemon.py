"""`sipmesh daemon -c FILE`: the super-daemon (docs/daemon.md). Its service kinds come
from sipmesh/apps/kinds.py (cli/common.py:register_builtin_kinds); `sipmesh call
--service` (cli/call.py) runs the calling half of a service."""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import textwrap
from pathlib import Path
from typing import Any

from sipmesh.agent.errors import EXIT_HELP, AgentError
from sipmesh.cli.common import (add_output_options, default_config_path, fail,
                                register_builtin_kinds, run_until_signalled, section_password,
                                setup_logging)
from sipmesh.daemon.config import DaemonConfig, load_config
from sipmesh.daemon.server import Daemon, ua_config
from sipmesh.ops.listen import listen_argument
from sipmesh.ops.notify import Notifier


def _raise_fd_limit() -> None:
    """Every session holds a few descriptors (pidfd, sockets): allow as many as we may."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def _password(config: DaemonConfig) -> str | None:
    return section_password(config.agent) or os.environ.get("SIPMESH_PASSWORD")


def _summary(config: DaemonConfig) -> str:
    lines = [f"{config.path}: OK, {len(config.services)} services"]
    for service in config.services.values():
        lines.append(f"  {service.name:<16} {service.kind:<10} max_sessions={service.max_sessions}"
                     f" allow={','.join(service.allow)}")
    for name, allocator in config.allocators.items():
        lines.append(f"  allocator {name}: {allocator.describe()}")
    for network in config.networks.values():
        lines.append(f"  network {network.name}")
    return "\n".join(lines)


class WithNetworks:
    """The daemon (or its metrics wrapper) and a `sipmesh up` per [[network]] in one event
    loop: each member answers on its own control socket (`sipmesh status`, `sipmesh down`);
    stopping stops all. A member that ends (refused, `sipmesh down`) leaves the rest running."""

    def __init__(self, runner: Any, members: list[Any]) -> None:
        self.runner, self.members = runner, members
        self.ready = runner.ready

    async def run(self) -> int:
        members = [asyncio.ensure_future(self._member(m)) for m in self.members]
        try:
            return int(await self.runner.run())
        finally:
            for member in self.members:
                member.request_stop()
            await asyncio.gather(*members, return_exceptions=True)

    @staticmethod
    async def _member(runner: Any) -> None:
        from sipmesh.cli.up import log as up_log
        try:
            await runner.run()
        except AgentError as exc:
            up_log.error("network %s: %s", runner.member.network, exc)

    def request_stop(self) -> None:
        self.runner.request_stop()
        for member in self.members:  # they leave (BYE, unregister) while the daemon does
            member.request_stop()


def _members(config: DaemonConfig) -> list[Any]:
    from sipmesh.cli.up import build_member, network_args
    return [build_member(network_args(n.name, n.options, config.agent), config.agent.ice)
            for n in config.networks.values()]


def _run(args: argparse.Namespace) -> int:
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
        members = _members(config)
    except AgentError as exc:
        return fail(prog, exc)
    _raise_fd_limit()
    notifier = Notifier()  # ops: systemd's Type=notify (READY=1, RELOADING=1)

    def on_reload() -> None:
        notifier.reloading()
        ok, message = daemon.reload()
        notifier.ready(message)
        if not args.quiet:
            print(f"{prog}: {message}", file=sys.stderr, flush=True)

    def on_ready() -> None:
        registrations = daemon.status()["registrations"]
        notifier.ready(f"{registrations[0]['state']} as {registrations[0]['aor']}" if registrations
                       else "serving")
        if not args.quiet:
            print(f"{prog}: ready as {daemon.ua.aor if daemon.ua else '?'}, "
                  f"{len(daemon.config.services)} services ({', '.join(daemon.config.services)}); "
                  f"status: sipmesh status --socket {daemon.control_path}",
                  file=sys.stderr, flush=True)

    runner = daemon
    if args.metrics is not None:  # ops
        from sipmesh.daemon.metrics import ServingMetrics  # aiohttp: only when asked for

        runner = ServingMetrics(daemon, args.metrics)
    if members:
        runner = WithNetworks(runner, members)
    waiting = None if args.quiet else \
        f"registering sip:{config.agent.user}@{config.agent.server}"
    return run_until_signalled(prog, runner, on_hup=on_reload, on_ready=on_ready, again=None,
                               waiting=waiting)


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
    add_output_options(parser, "log sessions (-vv: more)")
    parser.add_argument("--metrics", type=listen_argument, metavar="[HOST:]PORT",  # ops
                        help="serve Prometheus metrics at http://HOST:PORT/metrics (a bare PORT: "
                             "on 127.0.0.1; docs/operations.md)")
    parser.set_defaults(func=_run)
    return parser
