"""`sipmesh status`: what a running `sipmesh daemon` is doing, from its control socket, and
the mesh networks of running `sipmesh up`s (their control sockets), with their peers."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from sipmesh.agent.errors import AgentError, Exit
from sipmesh.cli.common import table
from sipmesh.ops.paths import PAIR_COLUMNS, Pair


def find_socket(args: argparse.Namespace) -> Path:
    from sipmesh.daemon.control import default_socket, runtime_dir

    if args.socket is not None:
        return args.socket
    if args.config is not None:
        from sipmesh.cli.common import register_builtin_kinds
        from sipmesh.daemon.config import load_config

        register_builtin_kinds()
        config = load_config(args.config, side="call")
        if config.agent.control_socket is not None:
            return config.agent.control_socket
        if not config.agent.user:
            raise AgentError(f"{args.config}: no [agent] user to find the daemon by", Exit.USAGE)
        return default_socket(config.agent.user)
    directory = runtime_dir()
    found = sorted(directory.glob("daemon-*.sock")) if directory.is_dir() else []
    if not found:
        raise AgentError(f"no sipmesh daemon is running (no control socket in {directory}); "
                         "give --socket or -c", Exit.NOT_FOUND)
    if len(found) > 1:
        raise AgentError("several daemons are running; choose one with --socket: "
                         + ", ".join(str(p) for p in found), Exit.USAGE)
    return found[0]


def _clock(stamp: float | None, now: float, *, ahead: bool = False) -> str:
    """A time of day and how long ago it was (`ahead`: how long until it comes)."""
    if not stamp:
        return "-"
    age = max(0, int(stamp - now if ahead else now - stamp))
    span = f"{age}s" if age < 120 else f"{age // 60}m" if age < 7200 else f"{age // 3600}h"
    return f"{time.strftime('%H:%M:%S', time.localtime(stamp))} ({'in ' if ahead else ''}{span})"


def _server(registration: dict[str, Any]) -> str:
    """host:port of a registration's server, with its DNS SRV target name if it has one."""
    server, name = registration.get("server") or "", registration.get("name")
    return f"{name} ({server})" if name else server


def render(status: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    daemon = status.get("daemon", {})
    out = [f"daemon pid {daemon.get('pid')}, configuration generation {daemon.get('generation')}"
           f" ({daemon.get('config') or 'no file'}), up since {_clock(daemon.get('started'), now)}"]
    out.append("")
    registrations = status.get("registrations", [])
    rows = [[r.get("aor", ""), _server(r), r.get("state", ""), str(r.get("expires") or "-"),
             _clock(r.get("since"), now), _clock(r.get("last_success"), now),
             _clock(r.get("next_try"), now, ahead=True), r.get("error") or ""]
            for r in registrations]
    out += table(rows, ["REGISTRATION", "SERVER", "STATE", "EXPIRES", "SINCE", "LAST OK",
                        "NEXT", "ERROR"])
    contacts = sorted({r["contact"] for r in registrations if r.get("contact")})
    if contacts:
        out.append("contact: " + ", ".join(contacts))
    out.append("")
    rows = [[s["name"], s["kind"], f"{s['active']}/{s['max_sessions']}", ",".join(s["allow"])]
            for s in status.get("services", [])]
    out += table(rows, ["SERVICE", "KIND", "SESSIONS", "ALLOWED CALLERS"])
    out.append("")
    sessions = sorted(status.get("sessions", []), key=lambda s: s.get("since") or 0)
    rows = []
    for s in sessions:
        allocated = s.get("allocated", {})
        parts = [f"port {p}" for p in allocated.get("ports", [])]
        if allocated.get("addresses"):
            parts.append("addr " + " ".join(allocated["addresses"]))
        path = s.get("path") or {}
        rows.append([s["call_id"], s["peer"], s["service"], s["state"],
                     _clock(s.get("since"), now), str(s.get("pid") or "-"),
                     path.get("kind", "-"), ", ".join(parts) or "-"])
    if rows:
        out += table(rows, ["CALL-ID", "PEER", "SERVICE", "STATE", "SINCE", "PID", "PATH",
                            "ALLOCATED"])
        out += [line for s in sessions if s.get("path") for line in path_lines(s)]
    else:
        out.append("no sessions")
    return "\n".join(out)


def path_lines(session: dict[str, Any]) -> list[str]:
    """Why a session's packets go the way they go: the pair, the RTT, the reason."""
    path = session["path"]
    head = f"{session['call_id']}: {path.get('kind')}"
    if path.get("local"):
        head += f" {path['local']} -> {path['remote']}"
        if path.get("relay_transport"):
            head += f" (our relay over {str(path['relay_transport']).upper()})"
    if path.get("rtt") is not None:
        head += f", rtt {path['rtt'] * 1000:.1f} ms"
    lines = [head, f"  {path.get('reason')}"]
    program = path.get("program")
    if program:
        via = ""
        if program.get("proxied"):   # the agent's end on 127.0.0.1: towards our relay, or
            # the path's own port (a program that follows moves: agent/handover.py)
            via = " (our relay proxy)" if (path.get("proxy") or {}).get("kind", "relay") \
                == "relay" else " (the agent's end of the path: it follows moves)"
        lines.append(f"  program: binds UDP {program['local_port']}, sends to "
                     f"{program['remote']}{via}")
    for check in (path.get("checks") or [])[:6]:
        lines.append(f"  check {check}")
    return lines


def render_networks(networks: list[dict[str, Any]], now: float | None = None) -> str:
    """The mesh networks of running `sipmesh up`s: each pair's path in the words and columns
    of the broker's status page (ops/paths.py), then each peer's tunnel."""
    now = time.time() if now is None else now
    out: list[str] = []
    for net in networks:
        out.append(f"network {net.get('network')}: {net.get('member')} {net.get('mesh_ip')} on "
                   f"{net.get('interface')} (WireGuard port {net.get('wg_port')}, roster "
                   f"{net.get('roster')}, trust {net.get('trust')}, paths reported to the server: "
                   f"{net.get('path_reports', '-')})")
        relay = net.get("relay") or {}
        if relay.get("offered") or relay.get("members"):
            relays = [f"{n} at {r.get('address')} (credential {r.get('credential')}, rtt "
                      f"{r.get('rtt_ms') if r.get('rtt_ms') is not None else '-'} ms)"
                      for n, r in (relay.get("members") or {}).items()]
            out.append(f"relay: we relay at {relay.get('offered') or '-'}; member relays: "
                       f"{', '.join(relays) or '-'}")
        servers = net.get("servers", [])
        if len(servers) > 1:  # a broker pair: how we stand at each
            out.append("servers: " + ", ".join(
                f"{_server(r)} {r.get('state')}{': ' + str(r['error']) if r.get('error') else ''}"
                f" (roster {r.get('roster')})" for r in servers))
        peers = net.get("peers", [])
        if not peers:
            out += ["no peers", ""]
            continue
        out += table([Pair.from_status(p).cells() for p in peers], list(PAIR_COLUMNS))
        rows = [[p["name"], p.get("mesh_ip") or "-", p.get("endpoint") or "-",
                 _clock(p.get("latest_handshake"), now), str(p.get("rx", 0)), str(p.get("tx", 0))]
                for p in peers]
        out += table(rows, ["TUNNEL", "MESH IP", "ENDPOINT", "HANDSHAKE", "RX", "TX"])
        out.append("")
    return "\n".join(out).rstrip()


def _networks(timeout: float) -> list[dict[str, Any]]:
    from sipmesh.cli.up import running_members
    from sipmesh.daemon.control import query

    networks = []
    for path in running_members():
        try:
            networks += query(path, {"command": "status"}, timeout=timeout).get("networks", [])
        except (OSError, ValueError) as exc:
            networks.append({"network": path.name, "error": f"cannot reach {path}: {exc}"})
    return networks


def ask(path: Path, request: dict[str, Any], timeout: float) -> dict[str, Any]:
    """The daemon's answer to `request` on its control socket; AgentError if unreachable."""
    from sipmesh.daemon.control import query

    try:
        return query(path, request, timeout=timeout)
    except (OSError, ValueError) as exc:
        raise AgentError(f"cannot reach the daemon at {path}: {exc}", Exit.UNREACHABLE) from None


def add_socket_options(parser: argparse.ArgumentParser) -> None:
    """--socket PATH | -c FILE: which daemon (`find_socket`)."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--socket", metavar="PATH", type=Path, help="the daemon's control socket")
    source.add_argument("-c", "--config", metavar="FILE", type=Path,
                        help="the daemon's configuration (to find its socket)")


def _run(args: argparse.Namespace) -> int:
    networks = _networks(args.timeout) if args.socket is None and args.config is None else []
    status: dict[str, Any] | None = None
    try:
        try:
            path = find_socket(args)
        except AgentError as exc:
            if not networks or exc.code != Exit.NOT_FOUND:
                raise
            path = None
        if path is not None:
            status = ask(path, {"command": "status"}, args.timeout)
    except AgentError as exc:
        print(f"sipmesh status: {exc}", file=sys.stderr)
        return int(exc.code)
    if args.json:
        merged = dict(status) if status is not None else {"ok": True}
        if networks:
            merged["networks"] = networks
        json.dump(merged, sys.stdout, indent=2)
        print()
    else:
        parts = ([render(status)] if status is not None else []) + \
            ([render_networks(networks)] if networks else [])
        print("\n\n".join(parts))
    return 0 if status is None or status.get("ok") else 1


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "status", help="show a running daemon's registrations and sessions",
        description="Ask a running `sipmesh daemon` over its local control socket for its "
                    "registration, services and sessions (peer, service, state, since, child "
                    "PID, allocated ports and addresses) and each session's network path: "
                    "direct, relayed or none, the selected candidate pair, the RTT and why.")
    add_socket_options(parser)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--timeout", type=float, default=10.0, help=argparse.SUPPRESS)
    parser.set_defaults(func=_run)
    return parser
