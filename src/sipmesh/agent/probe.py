"""`sipmesh ping NAME`: is a peer reached directly or through the relay, and how fast.

A ping is an ordinary session (agent/session.py:Session, the one calling and answering road)
of the profile ``ping``, which runs no program (``program = False``):

    caller                                    answering agent (any: serve, daemon, up)
    INVITE a=APP:ping + ICE candidates   ->   Endpoint sees a=APP:ping and answers it itself,
                                              whatever it serves (at most MAX_PROBES at once)
                                     <-   200 OK with its candidates; ICE checks both ways
    the path is chosen (direct / relayed) and kept with ICE, never handed to a program
    COUNT probes: authenticated STUN Binding requests on the selected pair, one every
    INTERVAL s, each waiting up to TIMEOUT s (IceSession.measure_rtt)
    BYE                                  ->   the answering side's ICE closes

So a ping takes exactly the steps a session of any UDP application takes (REGISTER lookup,
INVITE through the proxy, gathering, checks, nomination), and the path it reports is the
one such a session would get. The answering side needs no configuration; an agent that
predates this answers 488 (it serves another application), which `sipmesh ping` reports.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable

from sipmesh.agent.attributes import read_attributes
from sipmesh.agent.errors import ProfileError
from sipmesh.agent.ice import IceSession, PathReport, show_address
from sipmesh.agent.params import ParamError
from sipmesh.agent.profile import IP_PARAMS, AppProfile, Plan, SessionInfo
from sipmesh.agent.supervisor import ChildSpec
from sipmesh.sip.sdp import SDPError

__all__ = ["MAX_PROBES", "PING", "Probe", "ProbeProfile", "asks_for_probe", "path_label"]

PING = "ping"      # a=APP of a ping's offer
MAX_PROBES = 4     # pings one agent answers at once (each gathers candidates, maybe a relay)


@dataclass(frozen=True)
class Probe:
    """One probe's result: its RTT in seconds, None when no answer came in time."""

    seq: int
    rtt: float | None


def asks_for_probe(sdp: str) -> bool:
    """Is this offer a ping's (a=APP:ping)? A malformed one is not: the agent's own
    answering path refuses it with the reason."""
    try:
        return read_attributes(sdp).get("APP") == PING
    except (SDPError, ParamError):
        return False


def path_label(path: PathReport) -> str:
    """The kind of path in a few words: direct to the peer's own (host) address, direct to
    its NAT's (reflexive) address, or relayed through a TURN server."""
    if path.kind != "direct":
        return "relayed via TURN" if path.kind == "relayed" else path.kind
    return {"host": "direct (host)", "srflx": "direct (server-reflexive)",
            "prflx": "direct (peer-reflexive)"}.get(path.remote_type or "", "direct")


def pair_text(path: PathReport) -> str:
    """The selected candidate pair, ours first: "srflx 198.51.100.2:40000 -> host ..."."""
    return (f"{path.local_type} {show_address(path.local_address)} -> "
            f"{path.remote_type} {show_address(path.remote_address)}")


class ProbeProfile(AppProfile):
    """The ping session: ICE, then `count` probes on the chosen pair (calling side); the
    answering side keeps its ICE connection until the BYE."""

    name = PING
    transport = "udp"      # ICE runs
    program = False
    answer_params = IP_PARAMS

    def __init__(self, *, count: int = 4, interval: float = 1.0, timeout: float = 2.0,
                 on_probe: Callable[[Probe, PathReport], None] | None = None) -> None:
        self.count, self.interval, self.timeout = count, interval, timeout
        self.on_probe = on_probe
        self.path: PathReport | None = None   # the path the probes took
        self.probes: list[Probe] = []

    async def answer(self, info: SessionInfo, offer: dict[str, str]) -> Plan:
        return Plan(attributes={("IP6" if ":" in info.local_ip else "IP4"): info.local_ip},
                    child=None)

    def caller_child(self, info: SessionInfo, offer: dict[str, str],
                     answer: dict[str, str]) -> ChildSpec:
        raise ProfileError("a ping runs no program")

    async def on_path(self, info: SessionInfo, ice: IceSession) -> str:
        if info.role != "client":
            return await super().on_path(info, ice)
        assert ice.path is not None
        self.path = ice.path
        start = time.monotonic()
        for seq in range(1, self.count + 1):
            await asyncio.sleep(max(0.0, start + (seq - 1) * self.interval - time.monotonic()))
            probe = Probe(seq, await ice.measure_rtt(timeout=self.timeout))
            self.probes.append(probe)
            if self.on_probe is not None:
                self.on_probe(probe, self.path)
        return f"{self.count} probes sent"

    # -- the summary
    @property
    def answered(self) -> list[float]:
        return [p.rtt for p in self.probes if p.rtt is not None]

    def summary(self) -> dict[str, object]:
        """Counts, loss and RTT statistics (seconds), JSON-able."""
        rtts = self.answered
        sent = len(self.probes)
        return {"sent": sent, "answered": len(rtts),
                "loss": round(1 - len(rtts) / sent, 3) if sent else None,
                "rtt": {"min": min(rtts), "avg": sum(rtts) / len(rtts), "max": max(rtts)}
                if rtts else None}
