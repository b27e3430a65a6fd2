"""`sipmesh demo`: the whole idea on loopback, without root, in a few seconds.

An embedded broker (registrar + proxy) and two agents in this process: 2500
serves, 2501 calls 2500 by name. The application is harmless: a pair of
processes (`sipmesh.apps.hello`) exchanging one greeting over the port that
2500 offered in its ``a=`` lines. Then everything is torn down, and the SIP
ladder -- who sent what to whom, read from the `sipmesh.trace` logger -- and
the result are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sipmesh.agent.errors import AgentError, Exit
from sipmesh.agent.session import Agent, AgentConfig
from sipmesh.apps.exec import ExecProfile
from sipmesh.cli.common import setup_logging
from sipmesh.sip.ua import UAConfig

SERVER_USER, CALLER_USER = "2500", "2501"


@dataclass
class Hop:
    sender: int | str  # what tells the sides apart: source port (loopback), address (lab)
    receiver: int | str
    summary: str


class LadderRecorder(logging.Handler):
    """Pairs each 'send to' trace record with the 'received from' record of the same bytes:
    the sender is the receiving side's source port, the receiver the sending side's target."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.sent: list[tuple[int, str]] = []  # (destination port, text), not yet received
        self.hops: list[Hop] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not isinstance(record.args, tuple) or len(record.args) != 2:
            return
        flow, text = record.args
        port = getattr(flow, "port", None)
        if port is None:
            return
        if record.msg.startswith("send to"):
            self.sent.append((port, text))
        elif record.msg.startswith("received from"):
            for i, (destination, sent_text) in enumerate(self.sent):
                if sent_text == text:
                    del self.sent[i]
                    self.hops.append(Hop(port, destination, summarise(text)))
                    return


def summarise(text: str) -> str:
    head, _, body = text.partition("\r\n\r\n")
    lines = head.split("\r\n")
    first = lines[0]
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), value.strip())
    if first.startswith("SIP/2.0 "):
        label = first[8:] + f" ({headers.get('cseq', '?').split()[-1]})"
    else:
        label = first.split(" ")[0]
        if label == "REGISTER":
            label += f" Expires {headers.get('expires', '?')}"
    if body.strip():
        params = [line[2:] for line in body.splitlines() if line.startswith("a=")]
        ice = [p for p in params if p.split(":")[0] in ICE_ATTRIBUTES]
        params = [p for p in params if p not in ice]
        label += "  [" + " ".join(params) + "]" if params else "  [SDP]"
        candidates = sum(p.startswith("candidate:") for p in ice)
        if ice:   # the application's a= lines are the story; ICE's are told in one word
            label += f" + ICE ({candidates} candidate{'s' if candidates != 1 else ''})"
    return label


ICE_ATTRIBUTES = {"ice-ufrag", "ice-pwd", "ice-options", "candidate", "end-of-candidates"}


def draw(hops: list[Hop], lanes: dict[int | str, str], order: list[str]) -> list[str]:
    width = 32
    column = {name: 6 + i * width for i, name in enumerate(order)}
    total = column[order[-1]] + 8
    header = [" "] * total
    for name in order:
        start = max(0, column[name] - len(name) // 2)
        header[start:start + len(name)] = name
    out = ["".join(header).rstrip()]
    for hop in hops:
        a, b = lanes.get(hop.sender, str(hop.sender)), lanes.get(hop.receiver, str(hop.receiver))
        if a not in column or b not in column:
            continue
        row = [" "] * total
        for name in order:
            row[column[name]] = "|"
        left, right = sorted((column[a], column[b]))
        for x in range(left + 1, right):
            row[x] = "-"
        if column[a] < column[b]:
            row[right - 1] = ">"
        else:
            row[left + 1] = "<"
        label = hop.summary.split("  [")[0]
        start = left + max(3, (right - left - len(label)) // 2)
        if len(label) <= right - left - 6:
            row[start:start + len(label)] = label
        line = "".join(row).rstrip()
        if len(label) > right - left - 6:
            line += "  " + label
        if "  [" in hop.summary:
            line += "   " + hop.summary.split("  ", 1)[1]
        out.append(line)
    return out


async def run_demo(out=sys.stdout) -> int:
    from sipmesh.broker.server import Broker, BrokerConfig

    trace = logging.getLogger("sipmesh.trace")
    recorder = LadderRecorder()
    old_level, old_propagate = trace.level, trace.propagate
    trace.addHandler(recorder)
    trace.setLevel(logging.DEBUG)
    trace.propagate = False
    results: dict[str, object] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="sipmesh-demo-") as tmp:
            broker = Broker(BrokerConfig(listen=[("127.0.0.1", 0)], transports=("UDP",),
                                         db_path=Path(tmp) / "broker.db", workers=1,
                                         stats_interval=0, purge_interval=0))
            await broker.start()
            domain = broker.hostport
            print(f"broker (registrar + proxy) on udp:{domain}", file=out)
            try:
                results = await _session(domain, out)
                registered_after = broker.location.count() if broker.location else -1
            finally:
                await broker.stop()
    finally:
        trace.removeHandler(recorder)
        trace.setLevel(old_level)
        trace.propagate = old_propagate
    lanes = {int(domain.rsplit(":", 1)[1]): "broker"}
    for name in (CALLER_USER, SERVER_USER):
        if f"port:{name}" in results:
            lanes[int(results[f"port:{name}"])] = name  # type: ignore[arg-type]
    print("\nSIP ladder (who sent what; a= lines of SDP bodies in brackets):", file=out)
    for line in draw(recorder.hops, lanes, [CALLER_USER, "broker", SERVER_USER]):
        print(line, file=out)
    ok = (results.get("call") == 0 and results.get("serve") == 0 and results.get("sessions") == 1
          and registered_after == 0)
    print("\nresult:", file=out)
    print(f"  {CALLER_USER} called {SERVER_USER} by name through the broker; the two programs "
          f"talked directly on port {results.get('app_port', '?')}", file=out)
    print(f"  session ended: {results.get('reason', '?')}", file=out)
    print(f"  exit status: caller {results.get('call')}, server {results.get('serve')}; "
          f"registrations left at the broker: {registered_after}", file=out)
    print(f"  setup: INVITE to both programs started in {results.get('setup_ms', '?')} ms", file=out)
    print("  OK" if ok else "  FAILED", file=out)
    return 0 if ok else 1


async def _session(domain: str, out) -> dict[str, object]:
    program = [sys.executable, "-m", "sipmesh.apps.hello"]
    times: dict[str, float] = {}
    results: dict[str, object] = {}

    def observe(who: str):
        def hook(event: str, data: dict) -> None:
            if event == "invite_sent":
                times["invite"] = data["time"]
            elif event == "child_started":
                times[f"child:{who}"] = data["time"]
                results["app_port"] = data.get("port")
            elif event == "ended":
                results.setdefault("reason", data.get("reason"))
            if event == "child_started":
                print(f"  [{who}] program started (pid {data.get('pid')}, port {data.get('port')})",
                      file=out, flush=True)
            elif event in ("invite_sent", "invite_received", "established", "ended", "refused"):
                detail = data.get("peer") or data.get("target") or data.get("reason") or ""
                print(f"  [{who}] {event.replace('_', ' ')} {detail}".rstrip(), file=out, flush=True)
        return hook

    def ua(user: str) -> UAConfig:
        return UAConfig(user=user, domain=domain, listen_host="127.0.0.1", listen_port=0,
                        transports=("UDP",))

    server = Agent(AgentConfig(ua=ua(SERVER_USER), mode="serve", once=True, grace=2),
                   ExecProfile(program, app_port=18000, port_protocols=("tcp",)),
                   on_event=observe(SERVER_USER))
    caller = Agent(AgentConfig(ua=ua(CALLER_USER), mode="call", target=SERVER_USER, grace=2,
                               invite_timeout=10),
                   ExecProfile(program), on_event=observe(CALLER_USER))
    serving = asyncio.ensure_future(server.run())
    calling: asyncio.Future[int] | None = None
    try:
        await _started(server, serving)
        results["port:" + SERVER_USER] = server.ua.config.listen_port  # type: ignore[union-attr]
        calling = asyncio.ensure_future(caller.run())
        await _started(caller, calling)
        results["port:" + CALLER_USER] = caller.ua.config.listen_port  # type: ignore[union-attr]
        try:
            async with asyncio.timeout(30):
                results["call"] = await calling
        except AgentError as exc:
            print(f"  [{CALLER_USER}] failed: {exc}", file=out)
            results["call"] = int(exc.code)
        try:
            async with asyncio.timeout(15):  # once: after the session
                results["serve"] = await serving
        except AgentError as exc:  # e.g. its program failed (Exit.APPLICATION)
            print(f"  [{SERVER_USER}] failed: {exc}", file=out)
            results["serve"] = int(exc.code)
    finally:
        for agent, task in ((caller, calling), (server, serving)):
            agent.request_stop()
            if task is not None and not task.done():
                try:
                    async with asyncio.timeout(15):
                        await task
                except (AgentError, asyncio.TimeoutError):
                    pass
    results["sessions"] = server.sessions
    if "invite" in times and f"child:{SERVER_USER}" in times and f"child:{CALLER_USER}" in times:
        last = max(times[f"child:{SERVER_USER}"], times[f"child:{CALLER_USER}"])
        results["setup_ms"] = f"{(last - times['invite']) * 1000:.1f}"
    return results


async def _started(agent: Agent, task: asyncio.Future[int], timeout: float = 10.0) -> None:
    """Wait until `agent` has registered; raise what made it fail instead."""
    ready = asyncio.ensure_future(agent.ready.wait())
    try:
        await asyncio.wait({ready, task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        ready.cancel()
    if task.done():
        task.result()  # raises the agent's AgentError
    if not agent.ready.is_set():
        raise AgentError(f"agent {agent.config.ua.user} did not start within {timeout:g} s")


def _run(args: argparse.Namespace) -> int:
    from sipmesh.cli import demo_lab

    if args.lab:
        reason = demo_lab.lab_unavailable_reason()
        if reason is None:
            return demo_lab.run_lab_demo(keep=args.keep_files)
        if args.lab != "auto":
            print(f"sipmesh demo --lab: {reason}; run it as root: sudo sipmesh demo --lab",
                  file=sys.stderr)
            return int(Exit.USAGE)
        print(f"(no lab: {reason}; the loopback demo instead)")
    setup_logging(args.verbose, False, None)
    t0 = time.monotonic()
    try:
        code = asyncio.run(run_demo())
    except AgentError as exc:
        print(f"sipmesh demo: {exc}", file=sys.stderr)
        return int(exc.code)
    print(f"  ({time.monotonic() - t0:.1f} s)")
    print("\nThe rest of the story -- home routers, a symmetric NAT and its relay, a mesh of "
          "four -- in network namespaces: sudo sipmesh demo --lab")
    return code


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo", help="a session between two agents through an embedded broker, on loopback",
        description="Start an embedded broker and two agents on 127.0.0.1, let 2501 call 2500 "
                    "by name, run a harmless pair of programs that exchange a greeting over the "
                    "negotiated port, tear everything down and print the SIP ladder. Needs no "
                    "root and no network. With --lab (root): the same across home routers and a "
                    "symmetric NAT, through a relay, and a mesh of four, in network namespaces.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log protocol events")
    parser.add_argument("--keep-files", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lab", nargs="?", const="yes", choices=("yes", "auto"),
                        help="build a namespace lab (root): NAT, relay and a mesh, then tear "
                             "it down; --lab=auto: the lab when it can be built here, else the "
                             "loopback demo")
    parser.set_defaults(func=_run)
    return parser
