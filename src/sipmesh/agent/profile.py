"""The interface between the agent's session logic and one kind of application.

An application profile says which parameters each side sends in ``a=`` lines
(declared with types, so the agent can validate them before anything runs),
what the answering side puts into its 200 OK, and which program each side
starts with the negotiated values. The agent does all the SIP; a profile never
sees a raw SDP body or an unvalidated value.

Sequence, answering side (agent/session.py:Session.answer): `check` (before
registering) -> INVITE arrives -> the agent validates the offer against
`offer_params` and asks `refusal` -> `answer` -> the program of the returned plan
starts -> `wait_ready` -> 200 OK with the plan's attributes -> ... -> the program
is stopped, the ChildSpec's cleanup runs.

Calling side: `check` -> `offer` -> INVITE -> 200 OK validated against
`answer_params` -> ACK -> `caller_child` starts -> ...

A profile whose program talks UDP says so (``transport = "udp"``): the agent then runs
ICE (agent/ice.py) in the offer and the answer, and once a path is chosen the program
starts with it in ``SessionInfo.path`` (agent/handover.py:UdpEndpoint: bind
``local_port``, send to ``remote_ip``:``remote_port``). On the answering side the 200 OK
goes out first and the program starts after the path is known, built by `answer_child`
from the plan. A peer without ICE (the prototype, SIPp) gets the paper's a=IP4/a=PORT
and ``path`` stays None.

``transport = "tcp"``: the program's TCP connections are carried as QUIC streams over the
checked path (agent/streams.py; each side sends its certificate's ``a=fingerprint``).
The calling side listens on `stream_listen` and its program gets that address as
``path.remote_ip``:``path.remote_port``; each connection made there is connected, on the
answering side, to `stream_target` (by default its program on 127.0.0.1, its a=PORT).
"""

from __future__ import annotations

import abc
import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from sipmesh.agent.handover import UdpEndpoint

from sipmesh.agent.params import IPv4, IPv6, Param, Port, Token
from sipmesh.agent.supervisor import Child, ChildSpec

if TYPE_CHECKING:
    from sipmesh.agent.ice import IceSession

__all__ = ["AppProfile", "Plan", "SessionInfo", "COMMON_OFFER", "IP_PARAMS", "PORT", "endpoint_env",
           "offered_ip", "path_values"]

# What every offer may carry: the caller's address (IP4 or IP6) and the kind of
# application it wants (absent in the paper's INVITEs, which had no body).
IP_PARAMS = (Param("IP4", IPv4(), required=False), Param("IP6", IPv6(), required=False))
COMMON_OFFER = IP_PARAMS + (Param("APP", Token(32), required=False),)
PORT = Param("PORT", Port())


@dataclass
class SessionInfo:
    """What the agent knows about a session when it asks the profile for something."""

    role: str  # "server" (answering) or "client" (calling)
    call_id: str
    local_user: str
    peer: str  # the peer's SIP URI
    local_ip: str  # the address the peer can reach us at (our a=IP4 / a=IP6)
    path: UdpEndpoint | None = None  # the path ICE chose, once handed over (UDP programs)


@dataclass
class Plan:
    """The answering side's part: attributes for the 200 OK and the program to start."""

    attributes: dict[str, str]
    child: ChildSpec | None   # None: a profile without a program (``program = False``)
    port: int = 9  # for the m= line (informational, proxies rewrite it)
    path_port: int = 0  # the UDP port ICE gathers on: the program's, on a direct path (0: any)
    context: dict[str, Any] = field(default_factory=dict)  # the profile's, for answer_child


def endpoint_env(values: dict[str, str], *, role: str, info: SessionInfo,
                 remote_ip: str | None, port: str | None) -> dict[str, str]:
    """The SIPMESH_* variables every program gets, plus one per negotiated value."""
    env = {
        "SIPMESH_ROLE": role,
        "SIPMESH_CALL_ID": info.call_id,
        "SIPMESH_LOCAL_USER": info.local_user,
        "SIPMESH_PEER": info.peer,
        "SIPMESH_LOCAL_IP": info.local_ip,
    }
    if remote_ip:
        env["SIPMESH_REMOTE_IP"] = remote_ip
    if port:
        env["SIPMESH_PORT"] = port
    for name, value in values.items():
        env["SIPMESH_" + name.upper().replace("-", "_").replace(".", "_")] = value
    env.update({"SIPMESH_" + k: v for k, v in path_values(info.path).items()})
    return env


def path_values(path: UdpEndpoint | None) -> dict[str, str]:
    """The chosen path as values for a program: LOCAL_PORT (bind it), REMOTE_IP and
    REMOTE_PORT (send there), PATH (direct or relayed); {} without ICE."""
    if path is None:
        return {}
    return {"LOCAL_PORT": str(path.local_port), "REMOTE_IP": path.remote_ip,
            "REMOTE_PORT": str(path.remote_port), "PATH": path.kind}


def offered_ip(values: dict[str, str]) -> str | None:
    return values.get("IP4") or values.get("IP6")


class AppProfile(abc.ABC):
    """One kind of application. Subclasses set the class attributes and the four methods."""

    name: ClassVar[str]
    media: ClassVar[str] = "application"
    proto: ClassVar[str] = "sipmesh"
    transport: ClassVar[str | None] = None  # "udp"/"tcp": the program takes the ICE path
    # False: no program runs. The session is the path ICE checked, kept open (ICE answers the
    # peer's checks) while `on_path` runs in the agent (agent/probe.py: `sipmesh ping`).
    program: ClassVar[bool] = True
    # "udp" programs that cannot be told of a new path (`repath`): True makes them talk to
    # the agent's local end on 127.0.0.1 (agent/handover.py, LocalEnd) on every path, so
    # that they follow an ICE restart after a move (agent/mobility.py) as they run.
    through_agent: ClassVar[bool] = False
    max_streams: int = 64   # "tcp": TCP connections carried at once
    offer_params: tuple[Param, ...] = COMMON_OFFER
    answer_params: tuple[Param, ...] = IP_PARAMS + (PORT,)

    @property
    def label(self) -> str:
        """What logs and refusals call a session of this profile."""
        return self.name

    def check(self) -> None:
        """Raise ProfileError if a session could not start (program missing, ...).
        Called before registering, so that nobody calls an agent that cannot answer."""

    def refusal(self, offer: dict[str, str]) -> str | None:
        """Why this profile will not serve a validated offer (488), or None if it will:
        by default an offer that asks for another application (a=APP)."""
        if offer.get("APP") not in (None, self.name):
            return f"this agent serves {self.name}, not {offer['APP']}"
        return None

    def offer(self, info: SessionInfo) -> dict[str, str]:
        """The caller's attributes for its INVITE."""
        return {("IP6" if ":" in info.local_ip else "IP4"): info.local_ip, "APP": self.name}

    @abc.abstractmethod
    async def answer(self, info: SessionInfo, offer: dict[str, str]) -> Plan:
        """The answering side: choose its values (port, ...) for a validated offer."""

    def answer_child(self, info: SessionInfo, plan: Plan) -> ChildSpec:
        """The answering side's program once ``info.path`` is known (UDP profiles, ICE).
        Default: the plan's."""
        return plan.child

    def stream_target(self, info: SessionInfo, plan: Plan) -> tuple[str, int]:
        """"tcp", answering side: where each connection the caller makes goes."""
        return ("127.0.0.1", plan.port)

    def stream_listen(self, info: SessionInfo) -> tuple[str, int]:
        """"tcp", calling side: where the connections to carry come in (port 0: any)."""
        return ("127.0.0.1", 0)

    async def on_path(self, info: SessionInfo, ice: IceSession) -> str:
        """``program = False``: the profile's work on the checked path, in the agent; the
        session ends (BYE) with the reason it returns. Default: until the peer ends it."""
        await asyncio.get_running_loop().create_future()
        return ""

    async def wait_ready(self, plan: Plan, child: Child) -> None:
        """Return once the answering side's program can take the caller's first packet
        (the 200 OK waits for it); raise ProfileError if it never will. Default: at once."""

    async def repath(self, child: Child, path: Any) -> bool:
        """Move the running `child` onto a new UDP path (agent/handover.py's UdpEndpoint,
        after an ICE restart: agent/mobility.py) without restarting it; False when this
        kind of program cannot follow (the default: it keeps its old path). Not asked
        of a profile whose program talks ``through_agent``, nor of a "tcp" one (its QUIC
        connection moves to the new path, agent/streams.py): their path moves under them."""
        return False

    @abc.abstractmethod
    def caller_child(self, info: SessionInfo, offer: dict[str, str],
                     answer: dict[str, str]) -> ChildSpec:
        """The calling side's program for a validated answer."""
