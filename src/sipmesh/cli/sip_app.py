"""`sip_app`: the prototype's command line (thesis ch. 4), on the sipmesh agent.

    sip_app -s proxy[:port] -u user [-p port] [-t call_user] [-v vpn_wait_port]
            [-l vpn_localip] [-r vpn_remoteip] [-f log_file] [-d] -m program [args]

Same options, defaults and program arguments as the prototype: SIP port 5060,
application port 8000 (the next free one if taken), tunnel addresses
192.168.234.1 and local+1; `-t` absent is server mode (wait for INVITEs, one
session at a time), present is client mode (INVITE that user by name through
the server). The program gets the negotiated values appended after its own
arguments: server ``PORT VPN_LOCAL_ADDR VPN_REMOTE_ADDR``, client
``IP4 PORT VPN_LOCAL_ADDR VPN_REMOTE_ADDR`` (values as received), plus the
SIPMESH_* environment variables. `-d` logs the protocol (to `-f log_file` if
given). The prototype had its digest credentials compiled in; here they come
from $SIPMESH_PASSWORD, or from the file named by $SIPMESH_CREDENTIALS.
``-s sips:proxy[:port]`` talks TLS to the server (port 5061 by default), verified
against the system's trust store or $SIPMESH_CA_FILE, the name checked against
the proxy's host or $SIPMESH_TLS_SERVER_NAME; $SIPMESH_CERT and $SIPMESH_KEY give
a client certificate.
Usage errors print the usage line and exit 1, as the prototype did. Other exit
statuses are those of `sipmesh call` (agent/errors.py): in client mode, 10 when the
program ended the session by failing (non-zero status, or a signal we did not send).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sipmesh.agent.errors import AgentError, Exit
from sipmesh.agent.link import ServerAddress, TLSClient, client_tls
from sipmesh.agent.params import IPv4, Port, Token
from sipmesh.agent.session import Agent, AgentConfig
from sipmesh.apps.exec import ExecProfile, next_address
from sipmesh.cli.common import (fail, progress_printer, read_credentials, run_until_signalled,
                                server_address, setup_logging)
from sipmesh.sip.ua import UAConfig

USAGE = ("Usage... {prog} -s proxy[:port] -u user [-p port] [-t call_user] [-v vpn_wait_port] "
         "[-l vpn_localip] [-r vpn_remoteip] [-f log_file] [-d] -m program [args]")
SIP_PORT = 5060
APP_PORT = 8000
VPN_LOCAL = "192.168.234.1"

_VALUED = {"-s": "server", "-u": "user", "-p": "sip_port", "-t": "target", "-v": "app_port",
           "-l": "vpn_local", "-r": "vpn_remote", "-f": "log_file"}


class UsageError(Exception):
    pass


@dataclass
class Options:
    server: ServerAddress = ServerAddress("")
    user: str = ""
    sip_port: int = SIP_PORT
    target: str | None = None
    app_port: int = APP_PORT
    vpn_local: str = VPN_LOCAL
    vpn_remote: str | None = None
    log_file: str | None = None
    debug: bool = False
    program: list[str] = field(default_factory=list)


def parse(argv: list[str]) -> Options:
    """The prototype's options; raises UsageError with what is wrong."""
    raw: dict[str, str] = {}
    opts = Options()
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "-m":
            opts.program = argv[i + 1:]
            if not opts.program:
                raise UsageError("-m needs a program")
            break
        if word == "-d":
            opts.debug = True
        elif word in _VALUED:
            if i + 1 >= len(argv):
                raise UsageError(f"{word} needs a value")
            raw[_VALUED[word]] = argv[i + 1]
            i += 1
        else:
            raise UsageError(f"unknown option {word!r}" if word.startswith("-")
                             else f"unexpected argument {word!r} (the program comes after -m)")
        i += 1
    if "server" not in raw or "user" not in raw or not opts.program:
        missing = [o for o, k in (("-s", "server"), ("-u", "user")) if k not in raw]
        missing += [] if opts.program else ["-m"]
        raise UsageError(f"missing {', '.join(missing)}")
    try:
        opts.server = server_address(raw["server"])
        opts.user = _check(Token(64), "-u", raw["user"])
        if "target" in raw:
            opts.target = _check(Token(64), "-t", raw["target"])
        if "sip_port" in raw:
            opts.sip_port = int(_check(Port(), "-p", raw["sip_port"]))
        if "app_port" in raw:
            opts.app_port = int(_check(Port(), "-v", raw["app_port"]))
        if "vpn_local" in raw:
            opts.vpn_local = _check(IPv4(), "-l", raw["vpn_local"])
        if "vpn_remote" in raw:
            opts.vpn_remote = _check(IPv4(), "-r", raw["vpn_remote"])
    except Exception as exc:  # ArgumentTypeError or ValueError: both are usage errors here
        raise UsageError(str(exc)) from None
    opts.log_file = raw.get("log_file")
    return opts


def _check(kind, option: str, value: str) -> str:
    try:
        return kind.check(value)
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from None


def _setup_logging(opts: Options) -> None:
    log_file = None
    if opts.debug and opts.log_file:  # as in the prototype, -f only counts together with -d
        log_file = opts.log_file
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    setup_logging(verbose=2 if opts.debug else 0, debug=opts.debug, log_file=log_file)


def _credentials() -> tuple[str | None, str | None]:
    """(auth user, password) from $SIPMESH_PASSWORD or the file in $SIPMESH_CREDENTIALS."""
    password = os.environ.get("SIPMESH_PASSWORD")
    path = os.environ.get("SIPMESH_CREDENTIALS")
    if path:
        found = read_credentials(Path(path))
        return found.get("auth_user"), found["password"]
    return None, password


def _tls() -> TLSClient:
    """TLS settings from $SIPMESH_CA_FILE, $SIPMESH_CERT, $SIPMESH_KEY, $SIPMESH_TLS_SERVER_NAME."""
    def path(name: str) -> Path | None:
        return Path(os.environ[name]) if os.environ.get(name) else None

    return TLSClient(ca_file=path("SIPMESH_CA_FILE"), cert=path("SIPMESH_CERT"),
                     key=path("SIPMESH_KEY"),
                     server_name=os.environ.get("SIPMESH_TLS_SERVER_NAME") or None)


def build(opts: Options) -> tuple[Agent, str]:
    try:
        vpn_remote = opts.vpn_remote or next_address(opts.vpn_local)
    except ValueError as exc:
        raise AgentError(f"main: assign remoteip failed: {exc}", Exit.FAILURE) from None
    profile = ExecProfile(opts.program, app_port=opts.app_port, vpn=(opts.vpn_local, vpn_remote),
                          append_args=True, media="application/vpn", proto="OpenVPN")
    auth_user, password = _credentials()
    transport = opts.server.with_transport(None)
    tls = _tls() if transport == "tls" else TLSClient()
    ua = UAConfig(user=opts.user, domain=opts.server, password=password, auth_user=auth_user,
                  transport=transport.upper(), tls_client_context=client_tls(transport, tls),
                  listen_host="0.0.0.0", listen_port=opts.sip_port)
    config = AgentConfig(ua=ua, mode="call" if opts.target else "serve", target=opts.target,
                         tls_server_name=tls.server_name)
    return Agent(config, profile), vpn_remote


def _banner(opts: Options, vpn_remote: str) -> None:
    """The prototype's start-up lines."""
    server = opts.server.text() if opts.server.transport else f"sip:{opts.server}"
    lines = [f"PROXY {server}", f"FROM sip:{opts.user}@{opts.server}",
             f"TO sip:{opts.target + '@' + opts.server if opts.target else ''}",
             f"PROGRAM {opts.program[0]}"]
    if not opts.target:
        lines += [f"VPN_LOCAL {opts.vpn_local}", f"VPN_REMOTE {vpn_remote}",
                  f"VPN_PORT {opts.app_port}"]
    print("\n".join(lines), file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    prog = "sip_app"
    if argv in (["-h"], ["--help"]):
        print(USAGE.format(prog=prog))
        return 0
    try:
        opts = parse(argv)
    except UsageError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        print(USAGE.format(prog=prog), file=sys.stderr)
        return 1
    _setup_logging(opts)
    try:
        agent, vpn_remote = build(opts)
    except AgentError as exc:
        return fail(prog, exc)
    _banner(opts, vpn_remote)
    agent.on_event = progress_printer(prog, quiet=False)
    return run_until_signalled(prog, agent)


if __name__ == "__main__":
    sys.exit(main())
