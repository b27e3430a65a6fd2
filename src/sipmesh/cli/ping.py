"""`sipmesh ping NAME`: reach a registered name through the SIP server, check the path as
a session would (ICE), and show whether it is direct or relayed, its candidate pair and
the round-trip times of COUNT probes on it (agent/probe.py)."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap

from sipmesh.agent.errors import AgentError, Exit
from sipmesh.agent.ice import IceOptions, PathReport
from sipmesh.agent.link import TRANSPORTS
from sipmesh.agent.probe import Probe, ProbeProfile, pair_text, path_label
from sipmesh.agent.session import Agent, AgentConfig
from sipmesh.cli.call import target_name
from sipmesh.cli.common import (STATUS, add_identity_options, add_output_options,
                                add_tls_options, fail, positive, run_until_signalled,
                                setup_logging, stun_server, turn_server)
from sipmesh.cli.serve import ua_config

EXIT_HELP = """exit status:
  0  at least one probe was answered
  2  bad command line
  4  the SIP server is unreachable
  5  the SIP server rejected the credentials
  6  the name is not registered
  7  the peer is busy (it answers at most 4 pings at once)
  8  the peer did not answer the INVITE in time
  9  the ping was refused (e.g. an agent too old to answer pings: it serves another
     application)
 12  a path was found, but no probe came back
 13  no network path to the peer: every ICE check failed (the message lists the
     candidates, the checks and why)
  1  any other failure"""

MAX_COUNT = 10000


def count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= value <= MAX_COUNT:
        raise argparse.ArgumentTypeError(f"from 1 to {MAX_COUNT}")
    return value


def interval(text: str) -> float:
    value = positive(text)
    if value < 0.1:
        raise argparse.ArgumentTypeError("at least 0.1 s")
    return value


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


class Pinger:
    """The calling agent with the ping profile; keeps the error it ended with."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.ready = agent.ready
        self.error: AgentError | None = None

    async def run(self) -> int:
        try:
            return await self.agent.run()
        except AgentError as exc:
            self.error = exc
            raise

    def request_stop(self) -> None:
        self.agent.request_stop()


def _run(args: argparse.Namespace) -> int:
    prog = "sipmesh ping"
    setup_logging(args.verbose, args.debug, args.log_file)
    out = sys.stdout
    text = not args.json

    def header(path: PathReport) -> None:
        if text:
            print(f"PING {args.target}: {path_label(path)}: {path.reason}",
                  file=out, flush=True)

    def on_probe(probe: Probe, path: PathReport) -> None:
        if probe.seq == 1:
            header(path)
        if not text:
            return
        if probe.rtt is None:
            line = f"probe {probe.seq}: no answer within {args.timeout:g} s"
        else:
            line = f"probe {probe.seq}: {path_label(path)} {pair_text(path)} rtt {ms(probe.rtt)} ms"
        print(line, file=out, flush=True)

    def on_event(event: str, data: dict) -> None:
        if args.quiet:
            return
        if event == "invite_sent":
            STATUS.wait(f"{prog}: calling {data.get('target')}")
        elif event == "provisional":
            STATUS.note(f"{data.get('status')} {data.get('reason')}")
        elif event == "path":
            STATUS.wait(f"{prog}: probing the {data.get('kind')} path")
        elif event == "ended":
            STATUS.done()

    try:
        profile = ProbeProfile(count=args.count, interval=args.interval, timeout=args.timeout,
                               on_probe=on_probe)
        turn = args.turn
        config = AgentConfig(ua=ua_config(args), mode="call", target=args.target,
                             tls_server_name=args.tls_server_name, register=False,
                             invite_timeout=args.invite_timeout, grace=1.0,
                             ice=IceOptions(stun=args.stun, turn=turn[:2] if turn else None,
                                            turn_transport=turn[2] if turn else "auto",
                                            consent_timeout=0))
    except AgentError as exc:
        return fail(prog, exc)
    pinger = Pinger(Agent(config, profile, on_event=on_event))
    code = run_until_signalled(prog, pinger, again=None)
    summary = profile.summary()
    if code == 0 and profile.path is not None and profile.probes and not profile.answered:
        code = int(Exit.PEER_LOST)
        error: str | None = f"no probe came back on the {profile.path.kind} path"
        if text:
            print(f"{prog}: {error}", file=sys.stderr, flush=True)
    else:
        error = str(pinger.error) if pinger.error is not None else None
    if args.json:
        print(json.dumps({"target": args.target, "exit": code, "error": error,
                          "path": profile.path.describe() if profile.path else None,
                          "via": path_label(profile.path) if profile.path else None,
                          "probes": [{"seq": p.seq, "rtt": p.rtt} for p in profile.probes],
                          **summary}, indent=2), file=out)
    elif profile.path is not None and profile.probes:
        rtt = summary["rtt"]
        stats = (f"rtt min/avg/max {ms(rtt['min'])}/{ms(rtt['avg'])}/{ms(rtt['max'])} ms"
                 if isinstance(rtt, dict) else "no rtt")
        loss = summary["loss"]
        print(f"--- {args.target}: {summary['sent']} probes, {summary['answered']} answered, "
              f"{loss * 100 if isinstance(loss, float) else 0:.0f}% lost, "
              f"{path_label(profile.path)}, {stats}", file=out, flush=True)
    return code


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "ping", help="is a registered name reached directly or via the relay, and how fast",
        description=textwrap.fill("INVITE NAME through the SIP server as a session of any UDP application "
                    "would, check the paths between us with ICE (STUN at the SIP server, "
                    "--turn for the relay), and send COUNT probes (STUN Binding requests) on "
                    "the chosen path: each line says whether it is direct (to the peer's own "
                    "host address or its NAT's server-reflexive one) or relayed via TURN, "
                    "the candidate pair and the round-trip time; a summary line follows. "
                    "The peer needs nothing but a running agent (sipmesh serve, daemon or "
                    "up): agents answer pings themselves. Our own name is not registered.", 90),
        epilog=EXIT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="sipmesh ping NAME --server HOST[:PORT] --user NAME [--credentials FILE] "
              "[-c COUNT] [-i SECONDS] [-W SECONDS] [--turn turn:HOST[:PORT]] [--json]")
    parser.add_argument("target", metavar="NAME", type=target_name,
                        help="who to ping: a registered name (2500), user@domain or a SIP URI")
    parser.add_argument("-c", "--count", metavar="COUNT", type=count, default=4,
                        help=f"probes to send, 1 to {MAX_COUNT} (default: 4)")
    parser.add_argument("-i", "--interval", metavar="SECONDS", type=interval, default=1.0,
                        help="time between two probes, at least 0.1 (default: 1)")
    parser.add_argument("-W", "--timeout", metavar="SECONDS", type=positive, default=2.0,
                        help="how long to wait for each probe's answer (default: 2)")
    parser.add_argument("--invite-timeout", metavar="SECONDS", type=positive, default=15.0,
                        help="give up (CANCEL) when the INVITE is not answered in time "
                             "(default: 15)")
    parser.add_argument("--json", action="store_true",
                        help="print the result as JSON on stdout (for scripts)")
    sip = parser.add_argument_group("SIP")
    add_identity_options(sip, user_help="our name at the server (used for digest and the "
                                        "relay; not registered) [$SIPMESH_USER]")
    sip.add_argument("--transport", choices=TRANSPORTS,
                     help="transport towards the server (default: udp; tls for a sips: "
                          "server)")
    nat = parser.add_argument_group("NAT traversal (ICE)")
    nat.add_argument("--stun", metavar="HOST[:PORT]", type=stun_server,
                     help="STUN server (default: the SIP server, on its SIP port)")
    nat.add_argument("--turn", metavar="turn:HOST[:PORT][?transport=tcp]", type=turn_server,
                     help="TURN relay, used with our SIP name and password")
    add_tls_options(parser)
    add_output_options(parser, "log protocol events (-vv: more)")
    # what ua_config() reads that a ping does not offer
    parser.set_defaults(func=_run, bind="0.0.0.0", sip_port=0, keepalive=None, state_dir=None)
    return parser
