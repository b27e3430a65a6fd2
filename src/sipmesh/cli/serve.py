"""`sipmesh serve`: register a name and answer sessions with an application, one at a time.

Also the options and the runner shared with `sipmesh call` (cli/call.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import stat
import sys
import textwrap
from pathlib import Path
from typing import Callable

from sipmesh.agent.errors import EXIT_HELP, AgentError, Exit
from sipmesh.agent.params import Host, IPAddress, IPv4, Port, Token
from sipmesh.agent.profile import AppProfile
from sipmesh.agent.session import Agent, AgentConfig
from sipmesh.sip.ua import UAConfig

log = logging.getLogger("sipmesh.cli")

APPS = ("exec", "openvpn")


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


def _typed(kind, what: str) -> Callable[[str], str]:
    def convert(text: str) -> str:
        try:
            return kind.check(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{what}: {exc}") from None
    convert.__name__ = what
    return convert


def server_address(text: str) -> str:
    """HOST[:PORT] (IPv6 in brackets) -> 'host:port' for UAConfig.domain."""
    host, port = text, None
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise argparse.ArgumentTypeError(f"bad server address {text!r}")
            port = rest[1:]
        host = f"[{IPAddress().check(host)}]" if host else ""
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        if not host.startswith("["):
            host = Host().check(host)
        if port is not None:
            port = Port().check(port)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"server: {exc}") from None
    return f"{host}:{port}" if port else host


def positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of seconds")
    return value


def sip_port(text: str) -> int:
    if text == "0":
        return 0
    try:
        return int(Port().check(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"SIP port: {exc}") from None


def user_name(text: str) -> str:
    try:
        return Token(64).check(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"user: {exc}") from None


def add_agent_options(parser: argparse.ArgumentParser, mode: str) -> None:
    sip = parser.add_argument_group("SIP")
    sip.add_argument("--server", metavar="HOST[:PORT]", type=server_address,
                     default=os.environ.get("SIPMESH_SERVER"),
                     help="SIP server (registrar and proxy); port 5060 if omitted "
                          "[$SIPMESH_SERVER]")
    sip.add_argument("--user", metavar="NAME", type=user_name, default=os.environ.get("SIPMESH_USER"),
                     help="our name at the server (registered at start) [$SIPMESH_USER]")
    secret = sip.add_mutually_exclusive_group()
    secret.add_argument("--password", metavar="PW",
                        help="digest password (visible in the process list: prefer --credentials "
                             "or $SIPMESH_PASSWORD)")
    secret.add_argument("--credentials", metavar="FILE", type=Path,
                        help="file with 'password = ...' (and optionally 'user = ...', "
                             "'auth_user = ...'), or just the password on one line")
    sip.add_argument("--auth-user", metavar="NAME", help="digest user name if not --user")
    sip.add_argument("--sip-port", metavar="PORT", type=sip_port, default=0,
                     help="local SIP port for UDP and TCP (default: any free port)")
    sip.add_argument("--bind", metavar="ADDR", type=_typed(IPAddress(unicast=False), "bind"),
                     default="0.0.0.0", help="local address to listen on (default: all)")
    sip.add_argument("--transport", choices=("udp", "tcp"), default="udp",
                     help="transport towards the server (default: udp)")
    sip.add_argument("--expires", metavar="SECONDS", type=int, default=3600,
                     help="registration lifetime; refreshed at half of it (default: 3600)")
    sip.add_argument("--register-timeout", metavar="SECONDS", type=positive, default=10.0,
                     help="give up when the server does not answer a REGISTER (default: 10)")
    app = parser.add_argument_group("application")
    app.add_argument("--app", choices=APPS, default="exec",
                     help="exec: run the program given after --; openvpn: run OpenVPN with a "
                          "per-session configuration (default: exec)")
    app.add_argument("--advertise", metavar="ADDR", type=_typed(IPAddress(), "advertise"),
                     help="the address the peer can reach us at (sent as a=IP4/a=IP6; "
                          "default: our address towards the SIP server)")
    app.add_argument("--grace", metavar="SECONDS", type=positive, default=5.0,
                     help="time between SIGTERM and SIGKILL when stopping the program "
                          "(default: 5)")
    if mode == "serve":
        app.add_argument("--app-port", metavar="PORT", type=_typed(Port(), "app-port"),
                         default="8000",
                         help="application port offered to callers; the next free one if it "
                              "is taken (default: 8000)")
        app.add_argument("--vpn-local", metavar="ADDR", type=_typed(IPv4(), "vpn-local"),
                         help="our tunnel address, sent as a=VPN_LOCAL_ADDR (openvpn: default "
                              "192.168.234.1; exec: sent only when given)")
        app.add_argument("--vpn-remote", metavar="ADDR", type=_typed(IPv4(), "vpn-remote"),
                         help="the caller's tunnel address, a=VPN_REMOTE_ADDR (default: "
                              "--vpn-local + 1)")
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
    out = parser.add_argument_group("output")
    out.add_argument("-v", "--verbose", action="count", default=0,
                     help="log protocol events (-vv: more)")
    out.add_argument("--debug", action="store_true", help="log full SIP messages (passwords redacted)")
    out.add_argument("--log-file", metavar="FILE", help="write the log there instead of stderr")
    out.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")


def read_credentials(path: Path) -> dict[str, str]:
    """'key = value' lines (password, user, auth_user) or a lone password line."""
    try:
        text = path.read_text()
        mode = path.stat().st_mode
    except OSError as exc:
        raise AgentError(f"cannot read the credentials file {path}: {exc.strerror}", Exit.USAGE) \
            from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("the credentials file %s is readable by others: chmod 600 it", path)
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    if len(lines) == 1 and "=" not in lines[0]:
        return {"password": lines[0]}
    found: dict[str, str] = {}
    for line in lines:
        key, eq, value = line.partition("=")
        key = key.strip().lower().replace("-", "_")
        if not eq or key not in ("password", "user", "auth_user"):
            raise AgentError(f"{path}: cannot read the line {line[:40]!r} (expected "
                             "password = ..., user = ..., auth_user = ...)", Exit.USAGE)
        found[key] = value.strip()
    if "password" not in found:
        raise AgentError(f"{path}: no password in it", Exit.USAGE)
    return found


def ua_config(args: argparse.Namespace, *, listen_port: int | None = None) -> UAConfig:
    creds: dict[str, str] = {}
    if args.credentials is not None:
        creds = read_credentials(args.credentials)
    user = args.user or creds.get("user")
    if not args.server:
        raise AgentError("--server is required (or $SIPMESH_SERVER)", Exit.USAGE)
    if not user:
        raise AgentError("--user is required (or $SIPMESH_USER)", Exit.USAGE)
    password = args.password or creds.get("password") or os.environ.get("SIPMESH_PASSWORD")
    transport = args.transport.upper()
    return UAConfig(user=user, domain=args.server, password=password,
                    auth_user=args.auth_user or creds.get("auth_user"), transport=transport,
                    listen_host=args.bind, listen_port=args.sip_port if listen_port is None
                    else listen_port)


def build_profile(args: argparse.Namespace, mode: str) -> AppProfile:
    from sipmesh.apps.exec import DEFAULT_VPN_LOCAL, ExecProfile, next_address
    from sipmesh.apps.openvpn import OpenVPNProfile

    app_port = int(getattr(args, "app_port", 8000))
    vpn_local = getattr(args, "vpn_local", None)
    vpn_remote = getattr(args, "vpn_remote", None)
    if args.app == "openvpn":
        return OpenVPNProfile(openvpn=args.openvpn, state_dir=args.state_dir, app_port=app_port,
                              vpn_local=vpn_local or DEFAULT_VPN_LOCAL, vpn_remote=vpn_remote,
                              extra_args=args.program)
    if not args.program:
        raise AgentError("no program to run: give it after --, e.g. "
                         f"'sipmesh {mode} ... -- ./myprog --port {{PORT}}'", Exit.USAGE)
    vpn = None
    if args.vpn or vpn_local or vpn_remote:
        local = vpn_local or DEFAULT_VPN_LOCAL
        try:
            vpn = (local, vpn_remote or next_address(local))
        except ValueError as exc:
            raise AgentError(str(exc), Exit.USAGE) from None
    return ExecProfile(args.program, app_port=app_port, vpn=vpn, append_args=args.append_args)


def progress_printer(prog: str, quiet: bool) -> Callable[[str, dict], None]:
    """Short lines on stderr for the events a person wants to see."""

    def show(event: str, data: dict) -> None:
        if quiet:
            return
        text = {
            "ready": lambda: f"ready: contact {data.get('contact')}",
            "invite_sent": lambda: f"calling {data.get('target')}",
            "invite_received": lambda: f"INVITE from {data.get('peer')}",
            "busy": lambda: f"busy: refused a second session from {data.get('peer')} (486)",
            "refused": lambda: f"refused a session: {data.get('status')} {data.get('text')}",
            "child_started": lambda: f"started (pid {data.get('pid')}): "
                                     f"{' '.join(data.get('argv') or [])}",
            "established": lambda: f"session established with {data.get('peer')}",
            "ended": lambda: f"session ended: {data.get('reason')}",
        }.get(event)
        if text is not None:
            print(f"{prog}: {text()}", file=sys.stderr, flush=True)

    return show


async def run_agent_async(agent: Agent, prog: str) -> int:
    loop = asyncio.get_running_loop()
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals == 2:
            print(f"{prog}: already stopping: ending the session and unregistering "
                  "(the program gets SIGKILL after the grace period)", file=sys.stderr, flush=True)
        agent.request_stop()

    for sig in handled:
        loop.add_signal_handler(sig, on_signal)
    try:
        return int(await agent.run())
    except AgentError as exc:
        print(f"{prog}: {exc}", file=sys.stderr, flush=True)
        return int(exc.code)
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)


def run_agent(args: argparse.Namespace, mode: str, config_fn: Callable[[AgentConfig], None]
              | None = None) -> int:
    from sipmesh.cli.main import setup_logging

    prog = f"sipmesh {mode}"
    setup_logging(args.verbose, args.debug, args.log_file)
    try:
        profile = build_profile(args, mode)
        config = AgentConfig(ua=ua_config(args), mode=mode, advertise=args.advertise,
                             expires=args.expires, register_timeout=args.register_timeout,
                             grace=args.grace)
        if config_fn is not None:
            config_fn(config)
    except AgentError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return int(exc.code)
    agent = Agent(config, profile, on_event=progress_printer(prog, args.quiet))
    return asyncio.run(run_agent_async(agent, prog))


def _run(args: argparse.Namespace) -> int:
    def configure(config: AgentConfig) -> None:
        config.once = args.once

    return run_agent(args, "serve", configure)


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
              "[--app exec -- PROGRAM [ARGS...] | --app openvpn [-- OPENVPN-OPTIONS...]]")
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
