"""What the `sipmesh` subcommands (and `sip_app`) share: logging, option types,
credentials, progress lines, the service kinds, and running an agent or daemon until
a signal with the exit codes of agent/errors.py.

The subcommands import this module, never cli/main.py (which imports them).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import stat
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

from sipmesh.agent.errors import AgentError, Exit
from sipmesh.agent.link import ServerAddress, TLSClient, parse_server
from sipmesh.agent.link import extra_servers
from sipmesh.agent.params import Host, Port, Token

if TYPE_CHECKING:
    from sipmesh.daemon.config import AgentSection

log = logging.getLogger("sipmesh.cli")


# ---------------------------------------------------------------------------- logging


def setup_logging(verbose: int = 0, debug: bool = False, log_file: str | None = None, *,
                  level: int | None = None, pid: bool = False) -> int:
    """-v: protocol events; --debug: full SIP traces (credentials redacted). `level`
    overrides what -v would give; `pid` puts the process id in each line (workers).
    Returns the level."""
    if level is None:
        level = logging.DEBUG if debug or verbose > 1 else \
            logging.INFO if verbose else logging.WARNING
    handler: logging.Handler = logging.FileHandler(log_file) if log_file else _AboveStatus()
    process = "[%(process)d]" if pid else ""
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s %(levelname)-7s %(name)s{process}: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("sipmesh.trace").setLevel(logging.DEBUG if debug else logging.WARNING)
    # aioice's own check-by-check lines only with -vv or --debug (ours say what matters)
    logging.getLogger("aioice").setLevel(logging.INFO if debug or verbose > 1 else logging.WARNING)
    return level


def add_output_options(parser: argparse.ArgumentParser, verbose_help: str) -> None:
    out = parser.add_argument_group("output")
    out.add_argument("-v", "--verbose", action="count", default=0, help=verbose_help)
    out.add_argument("--debug", action="store_true",
                     help="log full SIP messages (passwords redacted)")
    out.add_argument("--log-file", metavar="FILE", help="write the log there instead of stderr")
    out.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")


# ---------------------------------------------------------------------------- option types


def typed(kind: Any, what: str) -> Callable[[str], str]:
    """An argparse type from a parameter type of agent/params.py."""
    def convert(text: str) -> str:
        try:
            return kind.check(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{what}: {exc}") from None
    convert.__name__ = what
    return convert


def server_address(text: str) -> ServerAddress:
    """HOST[:PORT] ([V6]:PORT) or sip:/sips: URI -> 'host:port' for UAConfig.domain, with
    the transport the text implies (agent/link.py)."""
    try:
        return parse_server(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"server: {exc}") from None


def stun_server(text: str) -> tuple[str, int]:
    """--stun HOST[:PORT] (3478 if omitted)."""
    from sipmesh.agent.ice import parse_turn_uri

    try:
        host, port, _ = parse_turn_uri(f"turn:{text}")
        return host, port
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"STUN server: {exc}") from None


def turn_server(text: str) -> tuple[str, int, str]:
    """--turn turn:HOST[:PORT][?transport=udp|tcp] -> (host, port, transport)."""
    from sipmesh.agent.ice import parse_turn_uri

    try:
        return parse_turn_uri(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of seconds")
    return value


def keepalive_seconds(text: str) -> float:
    """--keepalive: 0 (off) or 1..3600 seconds."""
    from sipmesh.sip.ua.liveness import check_interval
    try:
        return check_interval(float(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"keepalive: {exc}") from None


def add_keepalive_option(group: Any) -> None:
    """--keepalive: how long a session's peer may stay silent before it is probed."""
    from sipmesh.sip.ua.useragent import DEFAULT_PEER_KEEPALIVE
    group.add_argument("--keepalive", metavar="SECONDS", type=keepalive_seconds, default=None,
                       help="send the peer an OPTIONS in the session after this much silence, "
                            "and end the session when it stops answering: within SECONDS + "
                            "min(2*SECONDS, 32) of its last sign of life; 0: never "
                            f"(default: {DEFAULT_PEER_KEEPALIVE:g})")


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


def add_tls_options(parser: argparse.ArgumentParser) -> None:
    tls = parser.add_argument_group("TLS to the SIP server (--transport tls or --server sips:HOST)")
    tls.add_argument("--ca-file", metavar="FILE", type=Path,
                     help="CA certificates (PEM) that the server's certificate must be signed "
                          "by (default: the system's trust store)")
    tls.add_argument("--tls-server-name", metavar="NAME", type=typed(Host(), "tls-server-name"),
                     help="the name the server's certificate must show (default: the host "
                          "of --server; needed when --server is an IP address the "
                          "certificate does not list)")
    tls.add_argument("--cert", metavar="FILE", type=Path,
                     help="our client certificate (PEM), for servers that ask for one")
    tls.add_argument("--key", metavar="FILE", type=Path,
                     help="the private key of --cert (PEM, unencrypted; default: in the "
                          "--cert file)")


def tls_client(args: argparse.Namespace) -> TLSClient:
    """The TLS settings of add_tls_options."""
    return TLSClient(ca_file=args.ca_file, cert=args.cert, key=args.key,
                     server_name=args.tls_server_name)


def default_config_path() -> Path:
    """The daemon's configuration file when -c is not given."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "sipmesh" / "daemon.toml"


# ---------------------------------------------------------------------------- credentials


def add_identity_options(group: Any, *,
                         server_help: str = "SIP server (registrar and proxy); port 5060 if "
                                            "omitted [$SIPMESH_SERVER]",
                         user_help: str = "our name at the server (registered at start) "
                                          "[$SIPMESH_USER]") -> None:
    """--server, --user, --password | --credentials, --auth-user: who we are at the SIP
    server (read them with :func:`sip_identity`)."""
    group.add_argument("--server", metavar="HOST[:PORT]", type=server_address,
                       action=ServersAction, default=os.environ.get("SIPMESH_SERVER"),
                       help=server_help + "; repeat it for several servers: we register at "
                       "each, and calls go through the next when one fails")
    group.add_argument("--user", metavar="NAME", type=user_name,
                       default=os.environ.get("SIPMESH_USER"), help=user_help)
    secret = group.add_mutually_exclusive_group()
    secret.add_argument("--password", metavar="PW",
                        help="digest password (visible in the process list: prefer --credentials "
                             "or $SIPMESH_PASSWORD)")
    secret.add_argument("--credentials", metavar="FILE", type=Path,
                        help="file with 'password = ...' (and optionally 'user = ...', "
                             "'auth_user = ...'), or just the password on one line")
    group.add_argument("--auth-user", metavar="NAME", help="digest user name if not --user")


class ServersAction(argparse.Action):
    """--server, repeatable: `server` is the first given, `servers` all of them."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        servers = getattr(namespace, "servers", None) or []
        if not servers:
            namespace.server = values
        if values not in servers:
            servers.append(values)
        namespace.servers = servers


def more_servers(args: argparse.Namespace, transport: str) -> tuple[str, ...]:
    """The servers given after the first --server (UAConfig.servers); each must mean the
    same transport as the first."""
    try:
        return extra_servers(tuple(getattr(args, "servers", None) or ()), transport)
    except ValueError as exc:
        raise AgentError(f"--server: {exc} (every server takes the same transport)",
                         Exit.USAGE) from None


def sip_identity(args: argparse.Namespace) -> tuple[str | None, str | None, str | None]:
    """(user, password, auth_user) from the options of :func:`add_identity_options`, the
    credentials file and $SIPMESH_PASSWORD."""
    creds = read_credentials(args.credentials) if args.credentials is not None else {}
    password = args.password or creds.get("password") or os.environ.get("SIPMESH_PASSWORD")
    return (args.user or creds.get("user"), password,
            args.auth_user or creds.get("auth_user"))



def read_credentials(path: Path) -> dict[str, str]:
    """'key = value' lines (password, user, auth_user) or a lone password line."""
    try:
        text = path.read_text()
        mode = path.stat().st_mode
    except OSError as exc:
        raise AgentError(f"cannot read the credentials file {path}: {exc.strerror} (it holds "
                         "'password = ...'; check the path and that we may read it)",
                         Exit.USAGE) from None
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
        raise AgentError(f"{path}: no password in it (add a line 'password = ...')", Exit.USAGE)
    return found


def section_password(agent: AgentSection) -> str | None:
    """The password of a daemon configuration's [agent] (password or credentials file)."""
    if agent.credentials is not None:
        return read_credentials(agent.credentials)["password"]
    return agent.password


# ---------------------------------------------------------------------------- service kinds


def register_builtin_kinds() -> None:
    """Hand the daemon the service kinds of sipmesh.apps (before loading a configuration)."""
    from sipmesh.apps.kinds import KINDS
    from sipmesh.daemon.registry import register_kinds

    register_kinds(KINDS)


# ---------------------------------------------------------------------------- progress


class StatusLine:
    """What we are waiting for (registering, a call being answered, a daemon starting),
    as one line at the bottom of a terminal, redrawn every second with the time waited
    so far. Where stderr is not a terminal (a script, a log file, a pipe) it shows
    nothing, so logs hold only whole lines. Lines printed through `say` go above it."""

    def __init__(self) -> None:
        self.what: str | None = None
        self.detail = ""
        self.started = 0.0
        self._shown = False
        self._timer: asyncio.TimerHandle | None = None

    @staticmethod
    def live() -> bool:
        """Is stderr a terminal that can redraw a line?"""
        try:
            return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"
        except (AttributeError, ValueError):  # replaced or closed
            return False

    def wait(self, what: str) -> None:
        """Show `what` (with the seconds since now) until done() or the next wait()."""
        self.done()
        if not self.live():
            return
        self.what, self.detail = what, ""
        self.started = time.monotonic()
        self._draw()

    def note(self, detail: str) -> None:
        """Something that happened while waiting, e.g. '180 Ringing'."""
        if self.what is not None:
            self.detail = detail
            self._draw()

    def done(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._erase()
        self.what = None

    def say(self, line: str) -> None:
        """Print a whole line on stderr, above the status line."""
        with self.above():
            print(line, file=sys.stderr, flush=True)

    @contextmanager
    def above(self) -> Iterator[None]:
        """Write whole lines to stderr inside this block (log records, messages)."""
        self._erase()
        try:
            yield
        finally:
            if self.what is not None:
                self._draw()

    def _draw(self) -> None:
        seconds = int(time.monotonic() - self.started)
        text = f"{self.what} ... {seconds} s" + (f" ({self.detail})" if self.detail else "")
        sys.stderr.write(f"\r\x1b[K{text}")
        sys.stderr.flush()
        self._shown = True
        if self._timer is not None:
            self._timer.cancel()
        try:
            self._timer = asyncio.get_running_loop().call_later(1.0, self._draw)
        except RuntimeError:  # no loop: a still line
            self._timer = None

    def _erase(self) -> None:
        if self._shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self._shown = False


STATUS = StatusLine()  # stderr's


class _AboveStatus(logging.StreamHandler):
    """Log records on stderr go above the status line, never through it."""

    def emit(self, record: logging.LogRecord) -> None:
        with STATUS.above():
            super().emit(record)


def progress_printer(prog: str, quiet: bool) -> Callable[[str, dict], None]:
    """Short lines on stderr for the session events a person wants to see, and on a
    terminal the status line of what we wait for (registration, the answer)."""

    def show(event: str, data: dict) -> None:
        if quiet:
            return
        if event == "registering":
            STATUS.wait(f"{prog}: registering {data.get('aor')}")
            return
        if event == "provisional":
            STATUS.note(f"{data.get('status')} {data.get('reason')}")
            return
        text = {
            "ready": lambda: f"ready: contact {data.get('contact')}",
            "invite_sent": lambda: f"calling {data.get('target')}",
            "invite_received": lambda: f"INVITE from {data.get('peer')}",
            "busy": lambda: f"busy: refused a second session from {data.get('peer')} (486)",
            "refused": lambda: f"refused a session: {data.get('status')} {data.get('text')}",
            "child_started": lambda: f"started (pid {data.get('pid')}): "
                                     f"{' '.join(data.get('argv') or [])}",
            "path": lambda: f"path {data.get('path')}",
            "no_path": lambda: str(data.get("text")),
            "established": lambda: f"session established with {data.get('peer')}",
            "ended": lambda: f"session ended: {data.get('reason')}",
        }.get(event)
        if text is not None:
            STATUS.done()
            STATUS.say(f"{prog}: {text()}")
        if event == "invite_sent":
            STATUS.wait(f"{prog}: waiting for {data.get('target')} to answer")

    return show


def table(rows: list[list[str]], header: list[str]) -> list[str]:
    """Columns as wide as their longest value: nothing is cut (a Call-ID is copied from here)."""
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]


# ---------------------------------------------------------------------------- running


class Runner(Protocol):
    ready: asyncio.Event

    async def run(self) -> int: ...

    def request_stop(self) -> None: ...


def fail(prog: str, exc: AgentError) -> int:
    """Say why we stop; the exit code that goes with it."""
    STATUS.done()
    print(f"{prog}: {exc}", file=sys.stderr, flush=True)
    return int(exc.code)


AGENT_STOPPING = ("already stopping: ending the session and unregistering "
                  "(the program gets SIGKILL after the grace period)")


def run_until_signalled(prog: str, runner: Runner, *, on_hup: Callable[[], None] | None = None,
                        on_ready: Callable[[], None] | None = None,
                        again: str | None = AGENT_STOPPING, waiting: str | None = None) -> int:
    """Run `runner` (an Agent or the Daemon) in a new event loop. SIGINT, SIGTERM and
    SIGHUP (unless `on_hup` takes it) ask it to stop; a second one prints `again`.
    `on_ready` runs once it is ready; until then a terminal shows `waiting` (if given).
    An AgentError is printed and gives the exit code."""
    return asyncio.run(_run(prog, runner, on_hup, on_ready, again, waiting))


async def _run(prog: str, runner: Runner, on_hup: Callable[[], None] | None,
               on_ready: Callable[[], None] | None, again: str | None,
               waiting: str | None) -> int:
    loop = asyncio.get_running_loop()
    stops = (signal.SIGINT, signal.SIGTERM) + (() if on_hup else (signal.SIGHUP,))
    signals = 0

    def on_stop() -> None:
        nonlocal signals
        signals += 1
        if signals == 2 and again:
            STATUS.say(f"{prog}: {again}")
        runner.request_stop()

    async def announce() -> None:
        await runner.ready.wait()
        if waiting is not None:
            STATUS.done()
        if on_ready is not None:
            on_ready()

    for sig in stops:
        loop.add_signal_handler(sig, on_stop)
    if on_hup is not None:
        loop.add_signal_handler(signal.SIGHUP, on_hup)
    announcer = asyncio.ensure_future(announce())
    if waiting is not None:
        STATUS.wait(f"{prog}: {waiting}")
    try:
        return int(await runner.run())
    except AgentError as exc:
        return fail(prog, exc)
    finally:
        STATUS.done()
        announcer.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
