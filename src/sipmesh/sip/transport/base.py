"""Transport-layer addressing and the Via rules of RFC 3261 §18 and RFC 3581."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

from sipmesh.sip.headers import Via
from sipmesh.sip.message import Request, Response
from sipmesh.sip.uri import SipURI

RELIABLE = frozenset({"TCP", "TLS"})
DEFAULT_PORTS = {"UDP": 5060, "TCP": 5060, "TLS": 5061}
# RFC 3261 §18.1.1: a request within 200 bytes of a 1500-byte MTU goes over TCP.
UDP_SIZE_THRESHOLD = 1300


@dataclass(frozen=True, slots=True)
class Flow:
    """Where a message came from or goes to: transport plus remote IP and port."""

    transport: str
    host: str
    port: int

    @property
    def reliable(self) -> bool:
        return self.transport in RELIABLE

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.transport.lower()}:{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Inbound:
    """A received message, the flow it came from and its octets as received (the
    broker answers a retransmitted REGISTER from a cache keyed by them)."""

    message: Request | Response
    flow: Flow
    raw: bytes


def stamp_received(request: Request, source: Flow) -> None:
    """Server side of §18.2.1 and RFC 3581: record the real source in the top Via."""
    value = request.headers.get("Via")
    if value is None:
        return
    via = request.via
    changed = False
    if via.host != source.host:
        via.params["received"] = source.host
        changed = True
    if "rport" in via.params and via.params["rport"] is None:
        via.params["rport"] = str(source.port)
        via.params.setdefault("received", source.host)
        changed = True
    if changed:
        vias = request.headers.get_all("Via")
        request.headers.remove("Via")
        request.headers.add("Via", str(via))
        for rest in vias[1:]:
            request.headers.add("Via", rest)


def response_target(response: Response, arrived_on: Flow | None = None) -> Flow:
    """Where to send a response (§18.2.2, RFC 3581 §4), from its top Via."""
    return target_of_via(response.via, arrived_on)


def target_of_via(via: Via, arrived_on: Flow | None = None) -> Flow:
    """Where the responses to a request with this top Via go (as received: stamped)."""
    transport = via.transport.upper()
    if arrived_on is not None:
        if arrived_on.reliable:
            return arrived_on  # the existing connection (or its successor, by flow)
        # A request that came over UDP is answered over UDP, whatever its Via claims.
        transport = arrived_on.transport
    host = via.received or via.host
    if via.rport is not None:
        port = via.rport
    else:
        port = via.port or DEFAULT_PORTS.get(transport, 5060)
    return Flow(transport, host, port)


def uri_target(uri: SipURI, default_transport: str = "UDP") -> tuple[str, str, int]:
    """Transport, host (maybe a name) and port to reach a SIP URI, before any DNS
    (resolve.py does RFC 3263's SRV and A/AAAA lookups)."""
    maddr = uri.params.get("maddr")
    host = maddr or uri.host
    if uri.secure:
        transport = "TLS"
    else:
        transport = (uri.transport or default_transport).upper()
    port = uri.port or DEFAULT_PORTS.get(transport, 5060)
    return transport, host, port


# Answers of local_address_towards, briefly: a proxy bound to 0.0.0.0 asks for every
# request it forwards, while routes (and a mobile host's address) change far less often.
_ROUTE_TTL = 2.0
_ROUTE_CACHE_SIZE = 1024
_route_cache: dict[str, tuple[float, str]] = {}


def forget_routes() -> None:
    """Forget the remembered local addresses (our address changed: ask the kernel again)."""
    _route_cache.clear()


def local_address_towards(remote_host: str) -> str:
    """The local IP the kernel would use to reach `remote_host` (no packet is sent);
    remembered for _ROUTE_TTL seconds."""
    now = time.monotonic()
    cached = _route_cache.get(remote_host)
    if cached is not None and now - cached[0] < _ROUTE_TTL:
        return cached[1]
    family = socket.AF_INET6 if ":" in remote_host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect((remote_host, 9))
            address = str(s.getsockname()[0])
        except OSError:
            address = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    if len(_route_cache) >= _ROUTE_CACHE_SIZE:
        _route_cache.clear()
    _route_cache[remote_host] = (now, address)
    return address


def make_via(transport: str, host: str, port: int, branch: str) -> Via:
    return Via(transport=transport, host=host, port=port, params={"branch": branch, "rport": None})
