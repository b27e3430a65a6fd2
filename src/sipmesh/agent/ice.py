"""ICE (RFC 8445) for a session: which path the peers' packets take across NATs.

The offer and the answer carry each side's ICE description as SDP attributes (RFC 8839)::

    a=ice-ufrag:Ab3x
    a=ice-pwd:Jk8s0dLq2vTz9PmWc4Rn7e
    a=ice-options:ice2
    a=candidate:1 1 udp 2130706431 10.1.0.2 40000 typ host
    a=candidate:2 1 udp 1694498815 203.0.113.3 40000 typ srflx raddr 10.1.0.2 rport 40000
    a=candidate:3 1 udp 16777215 203.0.113.2 50000 typ relay raddr 203.0.113.3 rport 41000
    a=end-of-candidates
    a=x-nat-mapping:per-destination

Candidates are gathered on this host's addresses (host), from a STUN server (srflx: by
default the SIP server, which answers STUN on its SIP port) and from a TURN server
(relay: coturn, with the SIP credentials, over UDP or, where UDP is blocked, TCP). The
caller controls. aioice does the checks, nomination and consent freshness (RFC 7675).

What this module adds to aioice, and why:
- Candidates from the network are hostile: at most ``MAX_CANDIDATES`` are used, each
  bounded in size and with an address a check may go to (never unspecified, multicast,
  broadcast, link-local, reserved, nor loopback unless this side is on loopback itself),
  and no names (aioice would resolve ``.local`` names by multicast DNS).
- Checks are paced (RFC 8445 §14): one new check per ``TA`` per session, one per
  ``AGENT_TA`` for all sessions of the process, at most ``MAX_CHECKS`` per session and
  ``AGENT_MAX_CHECKS`` per ``AGENT_WINDOW`` per process, so that an INVITE cannot turn the
  agent into a packet cannon aimed at third parties. aioice paces at 20 ms without a cap.
- Both sides use the same pair: the controlling side nominates once, by a second check
  with USE-CANDIDATE on the first pair that succeeded (regular nomination, RFC 8445
  §8.1.1), not on every check as aioice does by default (see ``check_start``).
- A direct path is preferred: we nominate the first pair that succeeds, so pairs
  through a relay wait ``RELAY_HOLD`` for a direct pair, and a check that arrives for a pair
  whose own check is in progress triggers a new one at once (RFC 8445 §7.3.1.4; aioice
  waits for the retransmission, 500 ms later). The wait ends early when no direct pair can
  work any more: every direct pair has failed; or both sides' NATs map per destination
  (symmetric: each side's ``a=x-nat-mapping``, from its two servers' views of one socket);
  or the peer is checking (its checks reach us through a relay: the controlled side, which
  nominates nothing, does not hold its relayed checks back) while none reaches us
  directly and none of ours is answered ``DIRECT_GRACE`` after every direct check went out
  and after the peer's first relayed check (a direct pair that works answers within a
  round trip of both sides' first checks: whichever came second passes the NAT the other
  opened).
- The result says which path was chosen and why (:class:`PathReport`).

Rendering and parsing the attributes, candidate checks, the pacer and the explanation are
pure functions; :class:`IceSession` is the thin asyncio part.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import aioice
from aioice import stun
from aioice.candidate import Candidate
from aioice.candidate import candidate_foundation, candidate_priority
from aioice.ice import (CandidatePair, StunProtocol, get_host_addresses, relayed_candidate,
                        server_reflexive_candidate)
from aioice.turn import UDP_SOCKET_BUFFER_SIZE, TurnClientProtocol

from sipmesh.sip.errors import ParseError
from sipmesh.sip.uri import split_hostport

from sipmesh.agent.portmap import PortMapper
from sipmesh.agent.stunport import SharedPort

__all__ = [
    "AGENT_MAX_CHECKS", "AGENT_TA", "AGENT_WINDOW", "MAX_CANDIDATES", "MAX_CANDIDATE_LENGTH",
    "MAX_CHECKS", "DIRECT_GRACE", "RELAY_HOLD", "SETTLE_TIMEOUT", "TA",
    "Candidate", "IceConfig", "IceDescription", "IceError", "IceOptions", "IceSession", "Pacer",
    "PathReport", "check_candidate", "explain", "parse", "parse_turn_uri",
    "render", "show_address",
]

log = logging.getLogger("sipmesh.agent.ice")

MAX_CANDIDATES = 20          # remote candidates used; a real agent offers 2 to 6
MAX_CANDIDATE_LENGTH = 256   # characters of one a=candidate value
TA = 0.05                    # s between two new checks of one session (RFC 8445 §14.2)
AGENT_TA = 0.005             # s between two new checks of the whole process (ibid.)
MAX_CHECKS = 100             # checks one session starts (the pair limit of RFC 8445 §6.1.2.5)
AGENT_MAX_CHECKS = 1000      # checks all sessions start ...
AGENT_WINDOW = 10.0          # ... within this many seconds
RELAY_HOLD = 0.5             # s the relayed pairs wait for a direct pair to succeed, at most
DIRECT_GRACE = 0.2           # s a direct check may take once both sides check (see above)
MAPPINGS = ("endpoint-independent", "per-destination")   # a=x-nat-mapping values
SETTLE_TIMEOUT = 2.0         # s we keep answering checks after our path is chosen (see settle)
# Marks the Binding request a side sends once its path is chosen (SOFTWARE, RFC 8489 §14.14):
# the peer keeps answering checks until it has seen it (IceSession.settle).
DONE_MARK = "sipmesh path chosen"
EARLY_DATAGRAMS = 16        # datagrams kept that came through our relay before the hand-over

_ICE_CHARS = re.compile(r"[A-Za-z0-9+/]+")
_UFRAG = re.compile(r"[A-Za-z0-9+/]{4,256}")
_PWD = re.compile(r"[A-Za-z0-9+/]{22,256}")
_SIGNALLED_TYPES = ("host", "srflx", "relay")  # prflx is learnt, never signalled


class IceError(Exception):
    """ICE could not give a path; ``report`` says what was tried (None: bad description)."""

    def __init__(self, message: str, report: "PathReport | None" = None) -> None:
        super().__init__(message)
        self.report = report


# --------------------------------------------------------------------------- SDP (pure)


@dataclass
class IceDescription:
    """One side's ICE attributes: credentials and candidates (RFC 8839)."""

    ufrag: str
    pwd: str = field(repr=False)
    candidates: list[Candidate] = field(default_factory=list)
    complete: bool = True                               # a=end-of-candidates seen
    refused: list[str] = field(default_factory=list)    # why a candidate was not used
    mapping: str | None = None      # a=x-nat-mapping: the side's NAT, one of MAPPINGS


def render(description: IceDescription) -> list[tuple[str, str | None]]:
    """The ``a=`` lines of `description` as (name, value) pairs; value None is a flag."""
    lines: list[tuple[str, str | None]] = [("ice-ufrag", description.ufrag),
                                           ("ice-pwd", description.pwd),
                                           ("ice-options", "ice2")]
    lines += [("candidate", c.to_sdp()) for c in description.candidates]
    if description.complete:
        lines.append(("end-of-candidates", None))
    if description.mapping is not None:
        lines.append(("x-nat-mapping", description.mapping))
    return lines


def parse(attributes: Iterable[tuple[str, str | None]], *, allow_loopback: bool = False,
          limit: int = MAX_CANDIDATES) -> IceDescription | None:
    """The ICE description in a body's attributes, None if there is none (a peer without
    ICE: the prototype, SIPp, an old agent). Candidates that fail :func:`check_candidate`,
    repeat an address or come after the first `limit` good ones are left out, each with a
    reason in ``refused``. Raises IceError if the credentials are missing or malformed."""
    ufrags, pwds, values, complete, mapping = [], [], [], False, None
    for name, value in attributes:
        if name == "ice-ufrag":
            ufrags.append(value or "")
        elif name == "ice-pwd":
            pwds.append(value or "")
        elif name == "candidate":
            values.append(value or "")
        elif name == "end-of-candidates":
            complete = True
        elif name == "x-nat-mapping":   # a hint: unknown values are ignored
            mapping = value if value in MAPPINGS else None
    if not (ufrags or pwds or values):
        return None
    if len(set(ufrags)) != 1 or not _UFRAG.fullmatch(ufrags[0]):
        raise IceError("the peer's a=ice-ufrag is missing, repeated or not 4-256 ice-chars")
    if len(set(pwds)) != 1 or not _PWD.fullmatch(pwds[0]):
        raise IceError("the peer's a=ice-pwd is missing, repeated or not 22-256 ice-chars")
    description = IceDescription(ufrags[0], pwds[0], complete=complete, mapping=mapping)
    seen: set[tuple[str, int]] = set()
    for value in values:
        shown = value if len(value) <= 60 else value[:60] + "..."
        if len(value) > MAX_CANDIDATE_LENGTH:
            description.refused.append(f"{shown!r}: longer than {MAX_CANDIDATE_LENGTH} characters")
            continue
        try:
            candidate = _candidate(value)
        except ValueError as e:
            description.refused.append(f"{shown!r}: {e}")
            continue
        reason = check_candidate(candidate, allow_loopback=allow_loopback)
        key = (candidate.host, candidate.port)
        if reason is None and key in seen:
            reason = "same address as an earlier candidate"
        if reason is None and len(description.candidates) >= limit:
            reason = f"more than {limit} candidates"
        if reason is not None:
            description.refused.append(f"{shown!r}: {reason}")
            continue
        seen.add(key)
        description.candidates.append(candidate)
    return description


def _candidate(value: str) -> Candidate:
    bits = value.split()
    if len(bits) < 8 or bits[6] != "typ":
        raise ValueError("not '<foundation> <component> <transport> <priority> <address> "
                         "<port> typ <type> ...'")
    if len(bits) % 2:
        raise ValueError("an extension attribute without a value")
    try:
        return Candidate.from_sdp(value)
    except ValueError as e:
        raise ValueError(f"bad number ({e})") from None


def check_candidate(candidate: Candidate, *, allow_loopback: bool = False) -> str | None:
    """Why a remote candidate must not be used (None: it may be checked)."""
    if not (0 < len(candidate.foundation) <= 32 and _ICE_CHARS.fullmatch(candidate.foundation)):
        return "foundation is not 1-32 ice-chars"
    if candidate.component != 1:
        return f"component {candidate.component} (a session has one)"
    if candidate.transport.lower() != "udp":
        return f"transport {candidate.transport} (only UDP candidates are checked)"
    if candidate.type not in _SIGNALLED_TYPES:
        return f"type {candidate.type}"
    if not 1 <= candidate.priority <= 2**31 - 1:
        return f"priority {candidate.priority} out of range"
    if not 1 <= candidate.port <= 65535:
        return f"port {candidate.port} out of range"
    try:
        address = ipaddress.ip_address(candidate.host)
    except ValueError:
        return "not an IP address (names are not resolved)"
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    if address.is_unspecified:
        return "unspecified address"
    if address.is_multicast:
        return "multicast address"
    if address == ipaddress.IPv4Address("255.255.255.255"):
        return "broadcast address"
    if address.is_link_local:
        return "link-local address"
    if address.is_loopback:
        return None if allow_loopback else "loopback address"
    if address.is_reserved:
        return "reserved address"
    return None


# --------------------------------------------------------------------------- pacing (pure)


class Pacer:
    """When the next new check may start: at least `interval` apart, and at most `limit`
    within any `window` seconds (None: ever). Feed it the clock."""

    def __init__(self, interval: float, limit: int, window: float | None = None) -> None:
        self.interval, self.limit, self.window = interval, limit, window
        self._next = float("-inf")
        self._starts: deque[float] = deque()

    def ready(self, now: float) -> bool:
        if self.window is not None:
            while self._starts and self._starts[0] <= now - self.window:
                self._starts.popleft()
        return now >= self._next and len(self._starts) < self.limit

    def take(self, now: float) -> None:
        self._next = now + self.interval
        self._starts.append(now)

    def at_limit(self, now: float) -> bool:
        """Whether `limit` starts are used up (not merely too soon after the last)."""
        self.ready(now)
        return len(self._starts) >= self.limit


AGENT_PACER = Pacer(AGENT_TA, AGENT_MAX_CHECKS, AGENT_WINDOW)


# --------------------------------------------------------------------------- the path (pure)


@dataclass
class PathReport:
    """Which path a session's packets take, and why.

    ``kind`` is "direct", "relayed" or "none". ``local``/``remote`` are the selected
    candidates' types and addresses ("srflx 203.0.113.3:40000"); ``rtt`` in seconds."""

    kind: str
    reason: str
    local_type: str | None = None
    local_address: tuple[str, int] | None = None
    remote_type: str | None = None
    remote_address: tuple[str, int] | None = None
    rtt: float | None = None
    relay_transport: str | None = None   # "udp" or "tcp" when our side relays
    relay_server: tuple[str, int] | None = None   # the TURN server, when our side relays
    checks: list[str] = field(default_factory=list)   # "local -> remote: state", when none

    def describe(self) -> dict[str, object]:
        """For `sipmesh status` (JSON-able): kind, reason, rtt, the pair as "type address"."""
        out: dict[str, object] = {"kind": self.kind, "reason": self.reason, "rtt": self.rtt}
        if self.local_type is not None:
            out["local"] = f"{self.local_type} {show_address(self.local_address)}"
            out["remote"] = f"{self.remote_type} {show_address(self.remote_address)}"
            out["relay_transport"] = self.relay_transport
        if self.checks:
            out["checks"] = list(self.checks)
        return out

    def __str__(self) -> str:
        if self.kind == "none":
            return f"none: {self.reason}"
        rtt = f", rtt {self.rtt * 1000:.1f} ms" if self.rtt is not None else ""
        return (f"{self.kind}: {self.local_type} {show_address(self.local_address)} -> "
                f"{self.remote_type} {show_address(self.remote_address)}{rtt} ({self.reason})")


def show_address(address: tuple[str, int] | None) -> str:
    if address is None:
        return "?"
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def explain(kind: str, *, local_types: Sequence[str], remote_types: Sequence[str],
            nat_here: bool, nat_there: bool, mapping: str | None,
            relay_transport: str | None, has_relay: bool) -> str:
    """In words, why the path is what it is (for ``sipmesh status`` and error messages).

    `nat_here`: our STUN server saw another address than our own; `nat_there`: the
    selected remote candidate is the peer's NAT (srflx or prflx), not its own address.
    `mapping` is our NAT's mapping as two servers saw it ("endpoint-independent",
    "per-destination" or None if unknown); `relay_transport` how our relay candidate
    reaches the TURN server."""
    if kind == "direct":
        if not nat_here and not nat_there:
            return "both reachable at their own addresses"
        if not nat_there:
            return "the peer is reachable at its own address"
        if not nat_here:
            return "we are reachable at our own address"
        return "through both NATs: they let each side's checks in"
    if kind == "relayed":
        if relay_transport == "tcp" and "srflx" not in local_types:
            return "UDP is blocked on our network: relayed over TURN/TCP"
        if mapping == "per-destination":
            return "our NAT maps per destination (symmetric): only a relay reaches us"
        if remote_types and set(remote_types) <= {"relay"}:
            return "the peer offers only a relay address (UDP is blocked there?)"
        return ("no direct check succeeded: the peer's NAT maps per destination "
                "(symmetric) or a firewall drops unsolicited UDP")
    if not remote_types:
        return "the peer offered no usable candidate"
    if not has_relay:
        return "no direct check succeeded and there is no relay (no TURN server, or it refused us)"
    return "no check succeeded, not even through the relay"


# --------------------------------------------------------------------------- I/O


@dataclass(frozen=True)
class IceConfig:
    """Where candidates come from. The STUN server is by default the SIP server (its SIP
    UDP port answers STUN); the TURN server takes the SIP name and password."""

    stun_server: tuple[str, int] | None = None
    # more STUN servers asked at the same time (our other SIP servers): the first answer
    # counts, so a SIP server that is down costs no candidate (docs/broker.md, "Two brokers")
    more_stun_servers: tuple[tuple[str, int], ...] = ()
    turn_server: tuple[str, int] | None = None
    turn_username: str | None = None
    turn_password: str | None = field(default=None, repr=False)
    turn_transport: str = "auto"     # "udp", "tcp", or "auto": UDP, then TCP if that fails
    # more TURN servers, (address, username, password) each, tried in order when the ones
    # before gave no allocation (a mesh pair: a member's relay, then the network's coturn)
    more_turn_servers: tuple[tuple[tuple[str, int], str | None, str | None], ...] = \
        field(default=(), repr=False)
    host_addresses: tuple[str, ...] | None = None   # None: every address but loopback
    use_ipv6: bool = True
    gather_timeout: float = 1.6      # s for each STUN/TURN answer (3 tries at 0, 0.5, 1.5)
    portmap: tuple[str, ...] = ()    # router port mapping protocols, in order (agent/portmap.py)
    connect_timeout: float = 10.0    # s from the first check to a nominated pair

    def __post_init__(self) -> None:
        if self.turn_transport not in ("auto", "udp", "tcp"):
            raise ValueError(f"turn_transport must be auto, udp or tcp: {self.turn_transport!r}")


@dataclass(frozen=True)
class IceOptions:
    """What a user chooses (command line, the daemon's [agent]): ICE on or off, the STUN
    server (None: the SIP server's host and port), a TURN server (the SIP name and password
    are its credentials), and how long a path may stay silent (0: not watched)."""

    enabled: bool = True
    stun: tuple[str, int] | None = None
    turn: tuple[str, int] | None = None
    turn_transport: str = "auto"
    consent_timeout: float = 30.0
    portmap: bool = True  # ask the router to map our port (agent/portmap.py)


def parse_turn_uri(text: str) -> tuple[str, int, str]:
    """``turn:HOST[:PORT][?transport=udp|tcp]`` (RFC 7065), or plain ``HOST[:PORT]`` as
    `sipmesh netcheck --turn` takes it -> (host, port, transport); transport "auto" (UDP,
    else TCP) when not given. ValueError if malformed."""
    if not text.startswith("turn:"):
        text = "turn:" + text
    rest, _, query = text[5:].partition("?")
    transport = "auto"
    if query:
        key, _, value = query.partition("=")
        if key != "transport" or value not in ("udp", "tcp"):
            raise ValueError(f"{text!r}: only ?transport=udp or ?transport=tcp may follow")
        transport = value
    try:
        host, port = split_hostport(rest)
    except ParseError as e:
        raise ValueError(f"{text!r}: {e}") from None
    return host.strip("[]"), port or 3478, transport


class _Connection(aioice.Connection):
    """aioice's Connection with our gathering, pacing and preference for direct pairs.

    Overrides aioice 0.13 internals (``_check_periodic``, ``check_incoming``, gathering):
    the dependency is capped below 0.14 for that reason."""

    def __init__(self, config: IceConfig, controlling: bool, pacer: Pacer,
                 port: int = 0, shared: SharedPort | None = None) -> None:
        super().__init__(ice_controlling=controlling, stun_server=config.stun_server,
                         use_ipv6=config.use_ipv6)
        self.config = config
        self.port = port                 # of our host sockets (0: any)
        self.shared = shared             # host "sockets" on a port a program owns (mesh)
        self.peer_done = asyncio.Event()  # the peer's DONE_MARK arrived
        self.retriggered: set[int] = set()  # pairs whose check an incoming check restarted
        self.session_pacer = Pacer(TA, MAX_CHECKS)
        self.agent_pacer = pacer
        self.relay_transport: str | None = None
        self.relay_server: tuple[str, int] | None = None   # whose allocation we hold
        self.relay_refusals: list[str] = []   # the TURN servers that gave us none, and why
        self.mapping: str | None = None
        self.remote_mapping: str | None = None   # the peer's a=x-nat-mapping
        self.relay_at = float("inf")
        self.direct_started_at = 0.0     # when our last direct check started
        self.peer_relayed_at: float | None = None   # the peer's first check through a relay
        self.peer_direct = False         # a check of the peer's reached us directly
        self.hold_over = False           # relayed pairs may be checked (logged once)
        self.prflx_refused = False
        self.limited: set[str] = set()   # whose check limit held a check back (logged once)
        # Regular nomination (RFC 8445 §8.1.1; see check_start): aioice 0.13 takes this flag
        # as "nominate by a second check", which is what we want whoever the peer is.
        self.remote_is_lite = True
        self.nominating: CandidatePair | None = None   # the pair our USE-CANDIDATE check is on
        self.closing = asyncio.Event()   # set when close() starts (consent expiry calls it)
        # -- port mapping (agent/portmap.py): the router's mapping of our host port
        self.port_mapper = PortMapper(config.portmap) if config.portmap else None

    async def close(self) -> None:
        # aioice emits ConnectionClosed only once a TURN allocation is deleted, up to 40 s
        # later when the path to the server is dead too: tell waiters at once
        self.closing.set()
        closing = [super().close()]
        if self.port_mapper is not None:   # -- port mapping: it ends with the session
            closing.append(self.port_mapper.close())
        await asyncio.gather(*closing)

    # -- gathering
    async def gather_candidates(self) -> None:
        if self._local_candidates_start:
            return
        self._local_candidates_start = True
        config = self.config
        addresses = list(config.host_addresses) if config.host_addresses is not None else \
            get_host_addresses(use_ipv4=True, use_ipv6=config.use_ipv6)
        if self.shared is not None:
            addresses = [a for a in addresses if a in self.shared.addresses]
        relay = asyncio.ensure_future(self._relay())
        try:
            found = await self._host_candidates(addresses)
            await self._probe_mapping(found)
        finally:
            found_relay = await relay
        self._local_candidates += found + found_relay
        if self.port_mapper is not None:   # -- port mapping: one more srflx candidate
            mapped = await self.port_mapper.candidate(found)
            if mapped is not None and all((c.host, c.port) != (mapped.host, mapped.port)
                                          for c in self._local_candidates):
                self._local_candidates.append(mapped)
        self._local_candidates_end = True

    async def _host_candidates(self, addresses: list[str]) -> list[Candidate]:
        """Host candidates on ``self.port`` (the application's port: a direct path hands
        exactly that port to the program), and what the STUN server sees of each.

        Raises OSError when ``self.port`` is taken. A STUN server is not asked from a
        loopback address: it could only repeat that address."""
        loop = asyncio.get_running_loop()
        protocols: list[StunProtocol] = []
        try:
            for address in addresses:
                if self.shared is not None:   # the port is the program's: agent/stunport.py
                    protocol = StunProtocol(self)
                    view = self.shared.transport(address)
                    view.attach(protocol)
                    transport = view
                else:
                    transport, protocol = await loop.create_datagram_endpoint(
                        lambda: StunProtocol(self), local_addr=(address, self.port))
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_SOCKET_BUFFER_SIZE)
                host, port = transport.get_extra_info("sockname")[:2]
                protocol.local_candidate = Candidate(
                    foundation=candidate_foundation("host", "udp", host), component=1,
                    transport="udp", priority=candidate_priority(1, "host"), host=host,
                    port=port, type="host")
                protocols.append(protocol)
        except OSError:
            for protocol in protocols:
                await protocol.close()
            raise
        self._protocols += protocols
        found = [p.local_candidate for p in protocols]
        asking = [p for p in protocols if self.stun_server is not None
                  and ipaddress.ip_address(p.local_candidate.host).version == 4
                  and not ipaddress.ip_address(p.local_candidate.host).is_loopback]
        if asking:
            assert self.stun_server is not None
            servers = (self.stun_server, *self.config.more_stun_servers)
            shown = ", ".join(show_address(s) for s in servers)
            tasks = [asyncio.ensure_future(_reflexive_from_any(p, servers)) for p in asking]
            done, pending = await asyncio.wait(tasks, timeout=self.config.gather_timeout)
            for task in pending:
                task.cancel()
            for task in done:
                if task.exception() is None:
                    srflx = task.result()[0]
                    if (srflx.host, srflx.port) != (srflx.related_address, srflx.related_port):
                        found.append(srflx)   # (no NAT: the same address twice says nothing)
                else:
                    log.info("no answer from STUN %s: %s", shown, _error(task.exception()))
            if pending:
                log.info("no answer from STUN %s within %g s", shown, self.config.gather_timeout)
        return found

    async def _relay(self) -> list[Candidate]:
        """One relayed candidate: from the first TURN server (``turn_server``, then
        ``more_turn_servers``) that gives us an allocation, over UDP, else TCP."""
        config = self.config
        if config.turn_server is None:
            return []
        servers = [(config.turn_server, config.turn_username, config.turn_password),
                   *config.more_turn_servers]
        transports = ["udp", "tcp"] if config.turn_transport == "auto" else [config.turn_transport]
        self.relay_refusals = []
        for server, username, password in servers:
            for transport in transports:
                try:
                    async with asyncio.timeout(config.gather_timeout):
                        candidate, protocol = await relayed_candidate(
                            component=1, hide_related_address=False,
                            protocol_factory=lambda: _RelayProtocol(self),
                            turn_server=server, turn_username=username,
                            turn_password=password, turn_ssl=False,
                            turn_transport=transport)
                except (OSError, asyncio.TimeoutError, stun.TransactionError,
                        ConnectionError) as e:
                    why = f"no relay from TURN {show_address(server)} over {transport.upper()}: " \
                          f"{_error(e)}"
                    log.info("%s", why)
                    self.relay_refusals.append(why)
                    continue
                self._protocols.append(protocol)
                self.relay_transport = transport
                self.relay_server = server
                return [candidate]
        return []

    async def _probe_mapping(self, found: list[Candidate]) -> None:
        """Ask a second server (the TURN server answers STUN too) what our host socket's
        address is: another port than the STUN server saw means a symmetric NAT."""
        srflx = [c for c in found if c.type == "srflx"]
        if not srflx or self.config.turn_server is None:
            return
        protocol = next((p for p in self._protocols if p.local_candidate.type == "host"
                         and p.local_candidate.host == srflx[0].related_address), None)
        if protocol is None:
            return
        try:
            server = await _resolve(self.config.turn_server)
            if self.stun_server and server == await _resolve(self.stun_server):
                return   # the same server twice tells nothing
            async with asyncio.timeout(self.config.gather_timeout):
                response, _ = await protocol.request(
                    stun.Message(stun.Method.BINDING, stun.Class.REQUEST), server,
                    retransmissions=2)
        except (OSError, asyncio.TimeoutError, stun.TransactionError):
            return
        seen = response.attributes.get("XOR-MAPPED-ADDRESS")
        if seen:
            same = tuple(seen) == (srflx[0].host, srflx[0].port)
            self.mapping = "endpoint-independent" if same else "per-destination"

    # -- checks
    def _check_periodic(self) -> bool:
        """Start at most one new check, paced; hold relayed pairs back (see module doc).
        connect() calls this every 20 ms for as long as it returns True."""
        if self._check_list_done:
            return False
        now = time.monotonic()
        if self.relay_at == float("inf"):
            self.relay_at = now + RELAY_HOLD
        waiting = [p for p in self._check_list if p.task is None and p.state in
                   (CandidatePair.State.WAITING, CandidatePair.State.FROZEN)]
        if self._holding_relays(now):
            startable = [p for p in waiting if not _relayed(p)]
        else:
            startable = waiting
            if not self.hold_over:
                self.hold_over = True
                if self.ice_controlling and now < self.relay_at and not any(
                        not _relayed(p) and p.state == CandidatePair.State.SUCCEEDED
                        for p in self._check_list):
                    log.info("relayed pairs checked %.0f ms after the first check: %s",
                             (now - self.relay_at + RELAY_HOLD) * 1000, self._why_no_direct())
        if not startable:
            return bool(waiting) or self._remote_candidates_expected()
        if not (self.session_pacer.ready(now) and self.agent_pacer.ready(now)):
            for pacer, whose in ((self.session_pacer, "this session"),
                                 (self.agent_pacer, "the agent")):
                if pacer.at_limit(now) and whose not in self.limited:
                    self.limited.add(whose)
                    log.warning("check held back: %s started %d checks already", whose,
                                pacer.limit)
            return True
        pair = next((p for p in startable if p.state == CandidatePair.State.WAITING),
                    startable[0])
        self.session_pacer.take(now)
        self.agent_pacer.take(now)
        if not _relayed(pair):
            self.direct_started_at = now
        self.check_start_task(pair)
        return True

    def _holding_relays(self, now: float) -> bool:
        """Do relayed pairs wait? While RELAY_HOLD is not over and a direct pair may still
        succeed (see the module doc for when none can)."""
        if now >= self.relay_at or not self.ice_controlling:
            return False   # (the controlled side nominates nothing: its relayed checks
                           # going out early only tell the controlling side we check)
        open_ = [p for p in self._check_list if not _relayed(p) and p.state not in
                 (CandidatePair.State.SUCCEEDED, CandidatePair.State.FAILED)]
        if not open_:
            return False
        if self.mapping == self.remote_mapping == "per-destination":
            return False
        if self.peer_relayed_at is None or self.peer_direct:
            return True
        if any(p.task is None and p.state in (CandidatePair.State.WAITING,
                                              CandidatePair.State.FROZEN) for p in open_):
            return True   # a direct check still to send
        return now < max(self.direct_started_at, self.peer_relayed_at) + DIRECT_GRACE

    def _why_no_direct(self) -> str:
        """Why the relayed pairs stopped waiting before RELAY_HOLD was over (for the log)."""
        if all(_relayed(p) or p.state == CandidatePair.State.FAILED for p in self._check_list):
            return "every direct pair failed"
        if self.mapping == self.remote_mapping == "per-destination":
            return "both NATs map per destination"
        return (f"the peer checks through a relay only and no direct check was answered "
                f"within {DIRECT_GRACE * 1000:.0f} ms")

    def check_complete(self, pair: CandidatePair) -> None:
        """aioice lets the last nominated pair win: a relayed check that succeeds just after
        a direct one was nominated would replace it. A direct pair, once nominated, stays."""
        chosen = self._nominated.get(pair.component)
        if (chosen is not None and chosen is not pair and not _relayed(chosen)
                and _relayed(pair) and pair.nominated):
            pair.task = None
            pair.nominated = False
            log.info("relayed pair %s succeeded after the direct %s was nominated: kept the "
                     "direct one", pair, chosen)
            return
        super().check_complete(pair)

    def build_request(self, pair: CandidatePair, nominate: bool) -> stun.Message:
        if nominate:   # aioice asks for USE-CANDIDATE only in its nomination step
            self.nominating = pair
        return super().build_request(pair, nominate)

    async def check_start(self, pair: CandidatePair) -> None:
        """aioice's check, with regular nomination when we control (RFC 8445 §8.1.1).

        aioice 0.13 nominates aggressively: every check of the controlling side carries
        USE-CANDIDATE, every pair that then succeeds is nominated, and ``_nominated`` holds
        the one nominated *last* when a side looks: for the caller the last check answered,
        for the callee the last one whose USE-CANDIDATE check it saw succeed, and the two
        need not be the same (issue #11: the caller behind a symmetric NAT on relay -> the
        callee's relay, the callee on host -> the caller's relay, each sending where the
        other does not listen). Here the checks do not nominate; the
        first pair that succeeds is nominated by one more check, and the controlled side
        takes the only pair it saw USE-CANDIDATE on. A nomination that fails or is
        cancelled frees the way for the next pair that succeeds (aioice would never
        nominate another), and a pair that succeeded meanwhile is checked again."""
        try:
            await super().check_start(pair)
        finally:
            if self.nominating is pair and not pair.nominated:
                self.nominating = None
                self._nominating.discard(pair.component)
                if not self._check_list_done and not self._closing:
                    waiting = [p for p in self._check_list if p is not pair and p.task is None
                               and p.state == CandidatePair.State.SUCCEEDED]
                    if waiting:   # (bounded: a pair that fails its nomination is FAILED)
                        waiting[0].state = CandidatePair.State.WAITING
                        self.check_start_task(waiting[0])

    def check_incoming(self, message: stun.Message, addr: tuple[str, int],
                       protocol: StunProtocol) -> None:
        """A check from the peer proves the path is open now: redo our own check on that
        pair at once instead of waiting for its retransmission (RFC 8445 §7.3.1.4).

        A check from an unknown address teaches a peer-reflexive candidate and starts a
        check towards it; a peer spoofing source addresses could aim those at others, so
        at most MAX_CANDIDATES are learnt (the check was already answered, one for one)."""
        if message.attributes.get("SOFTWARE") == DONE_MARK:
            self.peer_done.set()
        if isinstance(protocol, _RelayProtocol) or any(
                c.type == "relay" and (c.host, c.port) == (addr[0], addr[1])
                for c in self._remote_candidates):
            if self.peer_relayed_at is None:
                self.peer_relayed_at = time.monotonic()
        else:
            self.peer_direct = True
        # (our candidates are addresses, never names: `host` is what aioice resolved too)
        known = any(c.host == addr[0] and c.port == addr[1]
                    for c in self._remote_candidates)
        if not known:
            learnt = sum(c.type == "prflx" for c in self._remote_candidates)
            if learnt >= MAX_CANDIDATES:
                if not self.prflx_refused:
                    log.warning("%d peer-reflexive candidates learnt: no more checks towards "
                                "new addresses", MAX_CANDIDATES)
                    self.prflx_refused = True
                return
        for pair in self._check_list:
            if (pair.protocol is protocol and pair.remote_addr == addr
                    and pair.state == CandidatePair.State.IN_PROGRESS
                    and pair.task is not None and not pair.task.done()
                    and id(pair) not in self.retriggered and pair is not self.nominating):
                # once per pair: when both sides check at the same moment, each side's
                # check would otherwise cancel the other's, forever and unpaced
                self.retriggered.add(id(pair))
                pair.task.cancel()
                pair.task = None
                pair.state = CandidatePair.State.WAITING
        super().check_incoming(message, addr, protocol)
        if self.ice_controlling and self._holding_relays(time.monotonic()):
            # aioice answered with a triggered check at once, nominating (aggressive
            # nomination): through a relay it would win the race against a direct pair
            # that is still being punched. It waits for the hold like any relayed pair.
            for pair in self._check_list:
                if (_relayed(pair) and pair.protocol is protocol and pair.remote_addr == addr
                        and pair.task is not None and not pair.task.done()
                        and pair.state != CandidatePair.State.IN_PROGRESS):
                    pair.task.cancel()
                    pair.task = None
                    pair.state = CandidatePair.State.WAITING

    @property
    def selected(self) -> CandidatePair | None:
        return self._nominated.get(1)

    @property
    def check_list(self) -> list[CandidatePair]:
        return self._check_list

    async def hand_over(self, timeout: float) -> TurnClientProtocol | None:
        """Stop checks and consent, close every socket but the selected pair's relay;
        return that relay's TURN client (None when our side of the pair is not a relay).

        Host sockets close at once (their port is free for the program); other TURN
        allocations are deleted within `timeout` or left to expire."""
        self._closing = True   # aioice: incoming checks are ignored from now on
        consent = self._query_consent_task
        self._query_consent_task = None
        tasks = [p.task for p in self._check_list if p.task is not None]
        for task in tasks + ([consent] if consent is not None else []):
            task.cancel()
        if tasks or consent is not None:
            await asyncio.wait(tasks + ([consent] if consent is not None else []))
        pair = self.selected
        keep = pair.protocol if pair is not None and pair.local_candidate.type == "relay" \
            else None
        closing = [p for p in self._protocols if p is not keep]
        self._protocols = [keep] if keep is not None else []
        if closing:
            await asyncio.wait([asyncio.ensure_future(p.close()) for p in closing],
                               timeout=timeout)
        if keep is None:
            return None
        # aioice keeps the TURN client of a relayed candidate private to its TurnTransport
        return keep.transport._TurnTransport__inner_protocol  # type: ignore[attr-defined]


_COOKIE = stun.COOKIE.to_bytes(4, "big")   # STUN's magic cookie, at offset 4 (RFC 8489 §5)


class _RelayProtocol(StunProtocol):
    """Our relay candidate's protocol. It also keeps the last EARLY_DATAGRAMS datagrams
    that are not STUN, with their source: the peer's program may send through our relay
    before our side is handed over (a mesh peer's first WireGuard handshake initiation):
    agent/handover.py's relay proxy passes them on (`IceSession.early_datagrams`)."""

    def __init__(self, receiver: "_Connection") -> None:
        super().__init__(receiver)
        self.early: deque[tuple[bytes, tuple[str, int]]] = deque(maxlen=EARLY_DATAGRAMS)

    def datagram_received(self, data: bytes | str, addr: tuple) -> None:
        if isinstance(data, bytes) and not (len(data) >= 20 and data[4:8] == _COOKIE):
            self.early.append((data, (addr[0], addr[1])))
        super().datagram_received(data, addr)


def _relayed(pair: CandidatePair) -> bool:
    return pair.local_candidate.type == "relay" or pair.remote_candidate.type == "relay"


def _error(e: BaseException) -> str:
    return str(e) or type(e).__name__


async def _reflexive_from_any(protocol: StunProtocol,
                              servers: tuple[tuple[str, int], ...]) -> tuple[Candidate, object]:
    """`protocol`'s server-reflexive candidate from whichever of `servers` answers first
    (all asked at once); the last error when none does."""
    tasks = [asyncio.ensure_future(server_reflexive_candidate(protocol, s)) for s in servers]
    try:
        error: BaseException | None = None
        for next_done in asyncio.as_completed(tasks):
            try:
                return await next_done
            except Exception as exc:  # noqa: BLE001 - as gather() took any failure before
                error = exc
        assert error is not None
        raise error
    finally:
        for task in tasks:
            task.cancel()


async def _resolve(server: tuple[str, int]) -> tuple[str, int]:
    infos = await asyncio.get_running_loop().getaddrinfo(server[0], server[1],
                                                         type=socket.SOCK_DGRAM)
    return infos[0][4][0], infos[0][4][1]


class IceSession:
    """The ICE side of one session: ``gather()``, put ``local`` in the SDP, ``connect()``
    with the peer's description, read ``path``, use ``connection`` (aioice) or take over
    ``local_port``, ``close()``."""

    def __init__(self, config: IceConfig, *, controlling: bool,
                 pacer: Pacer = AGENT_PACER, port: int = 0,
                 shared: SharedPort | None = None) -> None:
        """`port`: where host candidates bind (0: any); `shared`: a port another program
        owns, checked through raw sockets instead of binding (a mesh's WireGuard port)."""
        self.config = config
        self.connection = _Connection(config, controlling, pacer, shared.port if shared else port,
                                      shared)
        self.local: IceDescription | None = None
        self.remote: IceDescription | None = None
        self.path: PathReport | None = None
        self._closed_by_us = False

    async def gather(self) -> IceDescription:
        """Gather our candidates (host, srflx, relay) and return our description."""
        await self.connection.gather_candidates()
        for candidate in self.connection.local_candidates:
            # aioice's foundations are 32 hex digits; 8 tell them apart as well and keep
            # an offer with three candidates under the size that sends SIP over TCP
            candidate.foundation = candidate.foundation[:8]
        self.local = IceDescription(self.connection.local_username,
                                    self.connection.local_password,
                                    self.connection.local_candidates,
                                    mapping=self.connection.mapping)
        log.info("gathered %s", ", ".join(f"{c.type} {show_address((c.host, c.port))}"
                                          for c in self.local.candidates) or "no candidates")
        return self.local

    @property
    def allow_loopback(self) -> bool:
        """Remote loopback candidates are used only when we gather on loopback ourselves."""
        return any(ipaddress.ip_address(c.host).is_loopback
                   for c in (self.local.candidates if self.local else []))

    def read_remote(self, attributes: Iterable[tuple[str, str | None]]) -> IceDescription | None:
        """:func:`parse` the peer's attributes (None: the peer does not do ICE)."""
        return parse(attributes, allow_loopback=self.allow_loopback)

    async def connect(self, remote: IceDescription) -> PathReport:
        """Check the pairs and return the path; raise IceError (with ``report``) when there
        is none within ``connect_timeout``."""
        if self.local is None:
            await self.gather()
        self.remote = remote
        if remote.refused:
            log.warning("ignored %d of the peer's candidates: %s", len(remote.refused),
                        "; ".join(remote.refused[:5]) + ("; ..." if len(remote.refused) > 5 else ""))
        conn = self.connection
        conn.remote_username, conn.remote_password = remote.ufrag, remote.pwd
        conn.remote_mapping = remote.mapping
        for candidate in remote.candidates:
            await conn.add_remote_candidate(candidate)
        await conn.add_remote_candidate(None)
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                await conn.connect()
        except (ConnectionError, asyncio.TimeoutError) as e:
            reason = "timed out" if isinstance(e, asyncio.TimeoutError) else "every check failed"
            report = self.path = self.snapshot()
            await self.close()
            raise IceError(f"no path to the peer ({reason}): {self.summary()}", report) from None
        self.path = self._report(conn.selected)
        self.path.rtt = await self.measure_rtt()
        log.info("path %s", self.path)
        return self.path

    def snapshot(self) -> PathReport:
        """Where the checks stand, as a path of kind "none": the reason and each check."""
        return self._report(None)

    def summary(self) -> str:
        """Why there is no path, our candidates and the peer's, for an error message."""
        return (f"{self._report(None).reason}; local {self._candidates(self.local)}; "
                f"remote {self._candidates(self.remote)}")

    async def measure_rtt(self, timeout: float = 2.0) -> float | None:
        """One authenticated Binding round trip on the selected pair (None: no answer within
        `timeout` s). The request carries DONE_MARK: it tells the peer our path is chosen
        (see settle). `sipmesh ping`'s probes are these (agent/probe.py)."""
        conn = self.connection
        pair = conn.selected
        if pair is None or conn.remote_password is None:
            return None
        request = conn.build_request(pair, nominate=False)
        request.attributes["SOFTWARE"] = DONE_MARK
        start = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                await pair.protocol.request(
                    request, pair.remote_addr, integrity_key=conn.remote_password.encode(),
                    retransmissions=2)
        except (stun.TransactionError, asyncio.TimeoutError, OSError):
            return None
        return time.monotonic() - start

    async def settle(self, timeout: float = SETTLE_TIMEOUT) -> bool:
        """Wait until the peer's path is chosen too (its DONE_MARK arrived; False if it did
        not within `timeout`, e.g. a peer that is not sipmesh).

        The controlled side may still need our answer to its check of the nominated pair
        after our own connect() returned; handing our socket to a program before that
        would leave the peer without a path, and the program with the peer's checks."""
        try:
            async with asyncio.timeout(timeout):
                await self.connection.peer_done.wait()
            return True
        except asyncio.TimeoutError:
            log.info("the peer did not confirm its path within %g s", timeout)
            return False

    async def hand_over(self, timeout: float = 2.0) -> TurnClientProtocol | None:
        """Stop checking and close our sockets but the selected relay's (returned, None
        when the selected pair does not start at our relay): agent/handover.py's part."""
        self._closed_by_us = True
        return await self.connection.hand_over(timeout)

    def early_datagrams(self) -> list[tuple[bytes, tuple[str, int]]]:
        """What the peer sent through our relay before the hand-over, not STUN ((data,
        source), oldest first; see _RelayProtocol); empty unless our side is a relay."""
        pair = self.connection.selected
        protocol = pair.protocol if pair is not None else None
        if not isinstance(protocol, _RelayProtocol):
            return []
        early, protocol.early = list(protocol.early), deque(maxlen=EARLY_DATAGRAMS)
        return early

    async def wait_closed(self) -> None:
        """Return once the connection is closing: by :meth:`close`, or because consent to
        send expired (``consent_expired``; RFC 7675: aioice checks every 4-6 s and gives up
        after 6 checks in a row went unanswered, about 30 s). The consent checks also keep
        the NATs' mappings alive, well inside conntrack's 30 s for unanswered UDP."""
        await self.connection.closing.wait()

    async def lost(self) -> str:
        """Return why the path died once consent expired; never returns while it lives (a
        session whose path is not handed over watches this)."""
        await self.wait_closed()
        if not self.consent_expired:   # closed by us: the session is ending anyway
            await asyncio.get_running_loop().create_future()
        return "consent lost: the peer stopped answering ICE consent checks"

    @property
    def consent_expired(self) -> bool:
        """The connection closed by itself: the peer stopped answering consent checks."""
        return self.connection.closing.is_set() and not self._closed_by_us

    @property
    def host_port(self) -> int | None:
        """The port of our host sockets: what a program binds after the hand-over."""
        hosts = [c.port for c in (self.local.candidates if self.local else []) if c.type == "host"]
        return hosts[0] if hosts else None

    @property
    def local_port(self) -> int | None:
        """Our port of the selected pair: a host socket's port (an application may bind it
        once the session is closed), or the relay's allocated port."""
        pair = self.connection.selected
        return pair.local_candidate.port if pair else None

    async def close(self, timeout: float = 2.0) -> None:
        """Close the sockets; a TURN allocation is deleted in the background if the server
        does not answer within `timeout` (it expires by itself anyway)."""
        self._closed_by_us = True
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self.connection.close())
        except asyncio.TimeoutError:
            log.info("TURN server did not confirm the deletion of our relay within %g s", timeout)

    def _report(self, pair: CandidatePair | None) -> PathReport:
        conn = self.connection
        local = self.local.candidates if self.local else []
        remote = self.remote.candidates if self.remote else []
        facts = dict(local_types=[c.type for c in local], remote_types=[c.type for c in remote],
                     nat_here=any(c.type == "srflx" and (c.host, c.port) !=
                                  (c.related_address, c.related_port) for c in local),
                     mapping=conn.mapping, relay_transport=conn.relay_transport,
                     has_relay=any(c.type == "relay" for c in local + remote))
        if pair is None:
            checks = [f"{p.local_candidate.type} {show_address(p.local_addr)} -> "
                      f"{p.remote_candidate.type} {show_address(p.remote_addr)}: "
                      f"{p.state.name.lower()}" for p in conn.check_list]
            return PathReport("none", explain("none", nat_there=False, **facts), checks=checks)
        mine, theirs = pair.local_candidate, pair.remote_candidate
        kind = "relayed" if _relayed(pair) else "direct"
        reason = explain(kind, nat_there=theirs.type in ("srflx", "prflx"), **facts)
        return PathReport(kind, reason, mine.type, (mine.host, mine.port), theirs.type,
                          pair.remote_addr,
                          relay_transport=conn.relay_transport if mine.type == "relay" else None,
                          relay_server=conn.relay_server if mine.type == "relay" else None)

    @staticmethod
    def _candidates(description: IceDescription | None) -> str:
        if description is None or not description.candidates:
            return "none"
        return ", ".join(f"{c.type} {show_address((c.host, c.port))}" for c in description.candidates)
