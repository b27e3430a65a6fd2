"""`sipmesh status`: what a running `sipmesh daemon` is doing, from its control socket."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from sipmesh.agent.errors import AgentError, Exit


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


def _clock(stamp: float | None, now: float) -> str:
    if not stamp:
        return "-"
    age = max(0, int(now - stamp))
    ago = f"{age}s" if age < 120 else f"{age // 60}m" if age < 7200 else f"{age // 3600}h"
    return f"{time.strftime('%H:%M:%S', time.localtime(stamp))} ({ago})"


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    """Columns as wide as their longest value: nothing is cut (a Call-ID is copied from here)."""
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]


def render(status: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    daemon = status.get("daemon", {})
    out = [f"daemon pid {daemon.get('pid')}, configuration generation {daemon.get('generation')}"
           f" ({daemon.get('config') or 'no file'}), up since {_clock(daemon.get('started'), now)}"]
    out.append("")
    rows = [[r.get("aor", ""), r.get("state", ""), str(r.get("expires") or "-"),
             _clock(r.get("since"), now), r.get("contact", ""), r.get("error") or ""]
            for r in status.get("registrations", [])]
    out += _table(rows, ["REGISTRATION", "STATE", "EXPIRES", "SINCE", "CONTACT", "ERROR"])
    out.append("")
    rows = [[s["name"], s["kind"], f"{s['active']}/{s['max_sessions']}", ",".join(s["allow"])]
            for s in status.get("services", [])]
    out += _table(rows, ["SERVICE", "KIND", "SESSIONS", "ALLOWED CALLERS"])
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
        out += _table(rows, ["CALL-ID", "PEER", "SERVICE", "STATE", "SINCE", "PID", "PATH",
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
        via = " (our relay proxy)" if program.get("proxied") else ""
        lines.append(f"  program: binds UDP {program['local_port']}, sends to "
                     f"{program['remote']}{via}")
    for check in (path.get("checks") or [])[:6]:
        lines.append(f"  check {check}")
    return lines


def _run(args: argparse.Namespace) -> int:
    from sipmesh.daemon.control import query

    try:
        path = find_socket(args)
        try:
            status = query(path, {"command": "status"}, timeout=args.timeout)
        except (OSError, ValueError) as exc:
            raise AgentError(f"cannot reach the daemon at {path}: {exc}", Exit.UNREACHABLE) \
                from None
    except AgentError as exc:
        print(f"sipmesh status: {exc}", file=sys.stderr)
        return int(exc.code)
    if args.json:
        json.dump(status, sys.stdout, indent=2)
        print()
    else:
        print(render(status))
    return 0 if status.get("ok") else 1


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "status", help="show a running daemon's registrations and sessions",
        description="Ask a running `sipmesh daemon` over its local control socket for its "
                    "registration, services and sessions (peer, service, state, since, child "
                    "PID, allocated ports and addresses) and each session's network path: "
                    "direct, relayed or none, the selected candidate pair, the RTT and why.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--socket", metavar="PATH", type=Path, help="the daemon's control socket")
    source.add_argument("-c", "--config", metavar="FILE", type=Path,
                        help="the daemon's configuration (to find its socket)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--timeout", type=float, default=10.0, help=argparse.SUPPRESS)
    parser.set_defaults(func=_run)
    return parser
