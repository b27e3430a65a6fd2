#!/usr/bin/env python3
"""Session setup latency: sipmesh against a plain SIP call, measured in the same run.

* sipmesh: our broker and two agents on loopback (one process, one event loop, UDP);
  2501 calls 2500 by name, N times. Measured per call: from the moment the INVITE is
  sent until BOTH programs have been started (fork+exec done on each side) -- the
  complete "application is connected" latency of the paper's protocol. The programs
  are /bin/sleep; the caller's exits after 50 ms, its BYE ends the session.
* reference: SIPp uac -> Kamailio (record-routing proxy) -> SIPp uas, N calls one at a
  time: from the INVITE sent until the 200 OK received, per Call-ID, from the microsecond
  timestamps of SIPp's -trace_msg log (its -trace_rtt has only millisecond ticks).

Prints both medians and their ratio. Needs kamailio and sipp (apt: kamailio sip-tester).

    .venv/bin/python bench/setup_latency.py [--calls 50]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.lab: the Kamailio and SIPp harness
sys.path.insert(0, str(ROOT / "src"))


async def sipmesh_setup_times(calls: int, workdir: Path) -> list[float]:
    from sipmesh.agent.session import Agent, AgentConfig
    from sipmesh.apps.exec import ExecProfile
    from sipmesh.broker.server import Broker, BrokerConfig
    from sipmesh.sip.ua import UAConfig

    broker = Broker(BrokerConfig(listen=[("127.0.0.1", 0)], transports=("UDP",),
                                 db_path=workdir / "broker.db", workers=1, stats_interval=0,
                                 purge_interval=0, rate_limit=0))
    await broker.start()
    domain = broker.hostport

    def ua(user: str) -> UAConfig:
        return UAConfig(user=user, domain=domain, listen_host="127.0.0.1", listen_port=0,
                        transports=("UDP",))

    marks: dict[str, float] = {}

    def hook(event: str, data: dict) -> None:
        if event == "invite_sent":
            marks.clear()
            marks["invite"] = data["time"]
        elif event == "child_started":
            marks[data["role"]] = data["time"]

    server = Agent(AgentConfig(ua=ua("2500"), mode="serve", grace=1),
                   ExecProfile(["/bin/sleep", "30"], app_port=20000, port_protocols=("udp",)),
                   on_event=hook)
    serving = asyncio.ensure_future(server.run())
    await asyncio.wait_for(server.ready.wait(), 10)
    times: list[float] = []
    try:
        for _ in range(calls):
            caller = Agent(AgentConfig(ua=ua("2501"), mode="call", target="2500", register=False,
                                       grace=1, invite_timeout=10),
                           ExecProfile(["/bin/sleep", "0.05"]), on_event=hook)
            await caller.run()
            if {"invite", "server", "client"} <= marks.keys():
                times.append(max(marks["server"], marks["client"]) - marks["invite"])
            while server.session is not None or server._busy:  # the BYE has been handled
                await asyncio.sleep(0.005)
    finally:
        server.request_stop()
        await serving
        await broker.stop()
    return times


def sipp_setup_times(calls: int, workdir: Path) -> list[float]:
    from tests.lab import (Kamailio, free_port, make_users, run_sipp, sipp_args, start_sipp)

    messages = workdir / "uac_messages.log"
    kamailio = Kamailio(workdir / "kamailio").start()
    try:
        users = make_users(1, workdir)
        uas_port = free_port("udp")
        reg = run_sipp(sipp_args("reg_noauth", kamailio.hostport, local_port=uas_port, calls=1,
                                 extra=["-inf", str(users.uas_csv)]), cwd=workdir, timeout=20)
        if not reg.ok:
            raise RuntimeError(f"SIPp could not register the UAS: {reg}")
        uas = start_sipp(sipp_args("uas_rr", local_port=uas_port), cwd=workdir, name="uas",
                         wait_bound=("127.0.0.1", uas_port))
        try:
            res = run_sipp(sipp_args("uac_rr", kamailio.hostport, local_port=free_port("udp"),
                                     calls=calls, extra=["-s", "uas", "-l", "1", "-default_behaviors",
                                                         "all,-abortunexp", "-trace_msg",
                                                         "-message_file", str(messages)]),
                           cwd=workdir, timeout=60 + calls, name="uac")
        finally:
            uas.stop()
        if res.successful < calls:
            raise RuntimeError(f"SIPp calls failed: {res}")
    finally:
        kamailio.stop()
    times = invite_to_200(messages.read_text(errors="replace"))
    if not times:
        raise RuntimeError(f"no INVITE/200 pairs in {messages}")
    return times


def invite_to_200(log: str) -> list[float]:
    """Seconds from 'INVITE sent' to '200 (INVITE) received' per Call-ID in a -trace_msg log."""
    sent: dict[str, float] = {}
    times = []
    for block in log.split("-----------------------------------------------")[1:]:
        lines = block.strip().splitlines()
        if len(lines) < 3:
            continue
        stamp = datetime.datetime.strptime(lines[0].strip(), "%Y-%m-%d %H:%M:%S.%f").timestamp()
        body = [line for line in lines[1:] if line.strip()]
        first = body[1] if len(body) > 1 else ""
        headers = {l.split(":", 1)[0].strip().lower(): l.split(":", 1)[1].strip()
                   for l in body[2:] if ":" in l}
        call_id, cseq = headers.get("call-id"), headers.get("cseq", "")
        if call_id is None:
            continue
        if "sent" in lines[1] and first.startswith("INVITE "):
            sent.setdefault(call_id, stamp)
        elif "received" in lines[1] and first.startswith("SIP/2.0 200") and cseq.endswith("INVITE") \
                and call_id in sent:
            times.append(stamp - sent.pop(call_id))
    return times


def describe(times: list[float]) -> str:
    ms = sorted(t * 1000 for t in times)
    p90 = ms[min(len(ms) - 1, int(round(0.9 * (len(ms) - 1))))]
    return f"median {statistics.median(ms):.2f} ms (min {ms[0]:.2f}, p90 {p90:.2f}, n={len(ms)})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=50, help="calls per side (default 50)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="sipmesh-bench-") as tmp:
        work = Path(tmp)
        (work / "sipp").mkdir()
        t0 = time.monotonic()
        ours = asyncio.run(sipmesh_setup_times(args.calls, work))
        reference = sipp_setup_times(args.calls, work / "sipp")
    ours_median = statistics.median(ours)
    ref_median = statistics.median(reference)
    print(f"session setup on loopback, {args.calls} calls each ({time.monotonic() - t0:.1f} s):")
    print(f"  sipmesh broker + 2 agents, INVITE sent -> both programs started: {describe(ours)}")
    print(f"  SIPp uac -> Kamailio -> SIPp uas, INVITE sent -> 200 OK:        {describe(reference)}")
    print(f"  ratio sipmesh / SIPp+Kamailio (medians): {ours_median / ref_median:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
