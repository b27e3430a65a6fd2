"""Router port mapping: the home router opens a UDP port for us, one more ICE candidate.

Many home routers forward a port when asked. Behind a NAT that maps per destination
(symmetric), a reflexive address learnt from a STUN server is useless to anyone else; a
mapped port is not: the router sends whatever reaches ``external`` to our host socket. So
the mapping of the ICE host socket's port is offered as one more server-reflexive
candidate (``typ srflx raddr <host> rport <port>``), and a peer's check can come in.

Three protocols, asked in this order (as Tailscale's portmapper does):
- PCP (RFC 6887) and NAT-PMP (RFC 6886): small binary datagrams to the default gateway's
  UDP port 5351. No maintained Python client exists (the PyPI packages for them are
  unmaintained or NAT-PMP only), so the messages are written here, sans-I/O:
  ``*_request`` functions build bytes, ``parse_*`` functions check and read an answer.
- UPnP-IGD: discovery by an SSDP M-SEARCH sent to the gateway itself, then the SOAP
  calls through ``miniupnpc`` (the reference client), whose calls block: each runs in a
  thread with a deadline.

Discovery asks all three at once and waits at most ``DISCOVERY_TIMEOUT`` (250 ms); a
router without a listener answers with ICMP port unreachable at once, so a plain router
costs nothing. The first protocol in order that answered makes the mapping (the next one
if the router refuses). The mapping is renewed at half its lifetime and deleted by
:meth:`PortMapper.close` (the session ends), or at process exit, best effort. Nothing
here is ever fatal: a router that says no or does not answer gives no candidate and one
log line.

Everything from the router is hostile: answers are accepted only from the gateway's
address, must match the request (opcode, nonce, internal port), and their addresses and
lifetimes are checked; the UPnP description URL must point at the gateway.
"""

from __future__ import annotations

import asyncio
import atexit
import ipaddress
import logging
import os
import re
import secrets
import socket
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, TypeVar
from urllib.parse import urlsplit

from aioice.candidate import Candidate, candidate_foundation, candidate_priority

__all__ = [
    "DISCOVERY_TIMEOUT", "LIFETIME", "NATPMP_RESULTS", "PCP_RESULTS", "PROTOCOLS",
    "Mapping", "PortMapper", "PortmapError",
    "default_gateway", "natpmp_address_request", "natpmp_map_request", "parse_natpmp_address",
    "parse_natpmp_map", "parse_pcp", "parse_ssdp", "pcp_announce_request", "pcp_map_request",
    "ssdp_search",
]

log = logging.getLogger("sipmesh.agent.portmap")

PROTOCOLS = ("pcp", "nat-pmp", "upnp")   # the order they are asked in
NAMES = {"pcp": "PCP", "nat-pmp": "NAT-PMP", "upnp": "UPnP-IGD"}
SERVER_PORT = 5351           # PCP and NAT-PMP (RFC 6887 §19.1, RFC 6886 §3.1)
SSDP_PORT = 1900
DISCOVERY_TIMEOUT = 0.25     # s for all three protocols to say whether the router speaks them
MAP_TIMEOUT = 1.0            # s for the router to make, renew or delete a PCP/NAT-PMP mapping
UPNP_TIMEOUT = 2.0           # s for one miniupnpc call (description, SOAP over HTTP)
TRIES = (0.0, 0.1, 0.3, 0.6)  # s after the start that each try of a datagram request goes out
LIFETIME = 7200              # s we ask for (RFC 6887 §15: suggests 2 h for a MAP)
MAX_LIFETIME = 86400         # s: a longer lifetime from the router is taken as this
MIN_RENEW = 5.0              # s between renewals, whatever the router grants
RETRY_EXPIRED = 60.0         # s between tries once a mapping expired unrenewed
UDP = 17

T = TypeVar("T")


class PortmapError(Exception):
    """The router refused, or answered something we cannot use (the text says which)."""


class _NotForUs(PortmapError):
    """A datagram that does not answer our request (skipped, not a refusal)."""


# --------------------------------------------------------------------------- the gateway (pure)


_HEX32 = re.compile(r"[0-9A-Fa-f]{8}")


def default_gateway(route_table: str) -> str | None:
    """The next hop of the IPv4 default route in ``/proc/net/route`` text (the lowest
    metric wins), None if there is none."""
    best: tuple[int, str] | None = None
    for line in route_table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8 or not all(_HEX32.fullmatch(f) for f in (fields[1], fields[2],
                                                                     fields[7])) \
                or not re.fullmatch(r"[0-9A-Fa-f]{1,4}", fields[3]) \
                or not re.fullmatch(r"[0-9]{1,10}", fields[6]):
            continue
        destination, gateway, mask = (int(fields[i], 16) for i in (1, 2, 7))
        flags, metric = int(fields[3], 16), int(fields[6])
        if destination == 0 and mask == 0 and flags & 0x3 == 0x3 and gateway:   # UP, GATEWAY
            address = socket.inet_ntoa(struct.pack("<I", gateway))
            if best is None or metric < best[0]:
                best = (metric, address)
    return best[1] if best else None


def _usable_external(address: str) -> str:
    """`address` if it can be offered as an external address; PortmapError otherwise."""
    try:
        ip = ipaddress.IPv4Address(address)
    except ValueError:
        raise PortmapError(f"external address {address!r} is not IPv4") from None
    if ip.is_unspecified or ip.is_loopback or ip.is_multicast or ip.is_link_local \
            or ip.is_reserved:
        raise PortmapError(f"external address {ip} cannot be reached")
    return str(ip)


def _lifetime(seconds: int) -> int:
    if seconds <= 0:
        raise PortmapError("granted lifetime 0")
    return min(seconds, MAX_LIFETIME)


# --------------------------------------------------------------------------- NAT-PMP (pure)

NATPMP_RESULTS = {0: "success", 1: "unsupported version", 2: "not authorized or refused",
                  3: "network failure", 4: "out of resources", 5: "unsupported opcode"}


def natpmp_address_request() -> bytes:
    """NAT-PMP: what is the external address? (RFC 6886 §3.2)"""
    return b"\x00\x00"


def natpmp_map_request(internal_port: int, external_port: int, lifetime: int) -> bytes:
    """NAT-PMP: map UDP `internal_port` (RFC 6886 §3.3); lifetime 0 and external port 0
    delete it (§3.4)."""
    return struct.pack("!BBHHHI", 0, 1, 0, internal_port, external_port, lifetime)


def _natpmp_header(data: bytes, opcode: int, size: int) -> int:
    """The epoch of a NAT-PMP answer to `opcode`; PortmapError if it is not one or failed."""
    if len(data) < 4 or data[0] != 0 or data[1] != 128 + opcode:
        raise _NotForUs("not a NAT-PMP answer")
    result = struct.unpack_from("!H", data, 2)[0]
    if result:
        raise PortmapError(f"NAT-PMP result {result} "
                           f"({NATPMP_RESULTS.get(result, 'unknown')})")
    if len(data) < size:
        raise PortmapError("NAT-PMP answer too short")
    return struct.unpack_from("!I", data, 4)[0]


def parse_natpmp_address(data: bytes) -> str:
    """The external address in a NAT-PMP answer to :func:`natpmp_address_request`."""
    _natpmp_header(data, 0, 12)
    return _usable_external(socket.inet_ntoa(data[8:12]))


def parse_natpmp_map(data: bytes, internal_port: int) -> tuple[int, int]:
    """(external port, lifetime) from a NAT-PMP answer to :func:`natpmp_map_request`."""
    _natpmp_header(data, 1, 16)
    internal, external, lifetime = struct.unpack_from("!HHI", data, 8)
    if internal != internal_port:
        raise _NotForUs(f"NAT-PMP answer for port {internal}, not {internal_port}")
    if lifetime and not external:
        raise PortmapError("NAT-PMP mapped external port 0")
    return external, lifetime


# --------------------------------------------------------------------------- PCP (pure)

PCP_VERSION = 2
PCP_ANNOUNCE, PCP_MAP = 0, 1
PCP_RESULTS = {0: "SUCCESS", 1: "UNSUPP_VERSION", 2: "NOT_AUTHORIZED", 3: "MALFORMED_REQUEST",
               4: "UNSUPP_OPCODE", 5: "UNSUPP_OPTION", 6: "MALFORMED_OPTION",
               7: "NETWORK_FAILURE", 8: "NO_RESOURCES", 9: "UNSUPP_PROTOCOL",
               10: "USER_EX_QUOTA", 11: "CANNOT_PROVIDE_EXTERNAL", 12: "ADDRESS_MISMATCH",
               13: "EXCESSIVE_REMOTE_PEERS"}


def _ip16(address: str) -> bytes:
    """An IPv4 address as PCP writes every address: IPv4-mapped IPv6 (RFC 6887 §5)."""
    return ipaddress.IPv6Address(f"::ffff:{address}").packed


def _pcp_header(opcode: int, lifetime: int, client: str) -> bytes:
    return struct.pack("!BBHI", PCP_VERSION, opcode, 0, lifetime) + _ip16(client)


def pcp_announce_request(client: str) -> bytes:
    """PCP ANNOUNCE (RFC 6887 §14.1): does the router speak PCP? `client` is our address
    towards it (the server compares it with the packet's source)."""
    return _pcp_header(PCP_ANNOUNCE, 0, client)


def pcp_map_request(client: str, nonce: bytes, internal_port: int, lifetime: int,
                    external: tuple[str, int] | None = None) -> bytes:
    """PCP MAP of UDP `internal_port` (RFC 6887 §11.1), suggesting `external` (a renewal
    asks for what it has); lifetime 0 with the same nonce deletes it (§15)."""
    host, port = external or ("0.0.0.0", 0)
    return _pcp_header(PCP_MAP, lifetime, client) + nonce + struct.pack(
        "!B3xHH", UDP, internal_port, port) + _ip16(host)


@dataclass(frozen=True)
class PcpAnswer:
    opcode: int
    lifetime: int
    epoch: int
    external: tuple[str, int] | None = None   # MAP: the assigned address and port


def parse_pcp(data: bytes, opcode: int, nonce: bytes | None = None,
              internal_port: int | None = None) -> PcpAnswer:
    """A PCP answer to a request of `opcode` (for MAP: with this nonce and internal port);
    PortmapError if it is not one or the router refused. A NAT-PMP-only router answers a
    PCP request with its own version 0 "unsupported version" (RFC 6887 §9)."""
    if len(data) >= 4 and data[0] == 0:
        raise PortmapError("the router speaks NAT-PMP only")
    if len(data) < 24 or len(data) > 1100 or data[0] != PCP_VERSION or data[1] != 128 + opcode:
        raise _NotForUs("not a PCP answer")
    result = data[3]
    lifetime, epoch = struct.unpack_from("!II", data, 4)
    if result:
        raise PortmapError(f"PCP {PCP_RESULTS.get(result, f'result {result}')}")
    if opcode != PCP_MAP:
        return PcpAnswer(opcode, lifetime, epoch)
    if len(data) < 60:
        raise PortmapError("PCP MAP answer too short")
    got_nonce, protocol, internal, external_port = struct.unpack_from("!12sB3xHH", data, 24)
    if got_nonce != nonce or protocol != UDP or internal != internal_port:
        raise _NotForUs("PCP MAP answer for another mapping")
    address = ipaddress.IPv6Address(data[44:60])
    if address.ipv4_mapped is None:
        raise PortmapError(f"PCP external address {address} is not IPv4")
    if lifetime and not external_port:
        raise PortmapError("PCP mapped external port 0")
    return PcpAnswer(opcode, lifetime, epoch,
                     (_usable_external(str(address.ipv4_mapped)), external_port))


# --------------------------------------------------------------------------- SSDP (pure)

IGD = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"


def ssdp_search(gateway: str) -> bytes:
    """An SSDP M-SEARCH for an Internet Gateway Device, sent to the gateway itself."""
    return (f"M-SEARCH * HTTP/1.1\r\nHOST: {gateway}:{SSDP_PORT}\r\n"
            f"MAN: \"ssdp:discover\"\r\nMX: 1\r\nST: {IGD}\r\n\r\n").encode()


def parse_ssdp(data: bytes, gateway: str) -> str:
    """The description URL (LOCATION) in an SSDP answer; it must be plain http on the
    gateway's own address (an answer naming another host is refused)."""
    try:
        text = data[:2048].decode("ascii")
    except UnicodeDecodeError:
        raise PortmapError("SSDP answer is not ASCII") from None
    lines = text.split("\r\n")
    if not lines[0].startswith("HTTP/1.1 200"):
        raise _NotForUs("not an SSDP answer")
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    location = headers.get("location", "")
    try:
        url = urlsplit(location)
        port = url.port or 80
    except ValueError:
        raise PortmapError(f"bad LOCATION {location[:80]!r}") from None
    if url.scheme != "http" or url.hostname != gateway or not 0 < port < 65536 \
            or len(location) > 256 or not location.isprintable() or " " in location:
        raise PortmapError(f"LOCATION {location[:80]!r} is not http on the gateway")
    return location


# --------------------------------------------------------------------------- I/O


@dataclass
class Mapping:
    """A UDP port the router forwards to us: ``external`` -> ``internal``."""

    protocol: str                       # "pcp", "nat-pmp" or "upnp"
    gateway: str
    internal: tuple[str, int]
    external: tuple[str, int]
    lifetime: int                       # s, as granted
    nonce: bytes = field(default=b"", repr=False)   # PCP
    igd: Any = field(default=None, repr=False)      # UPnP: the miniupnpc.UPnP object

    def describe(self) -> str:
        return (f"{NAMES[self.protocol]} {self.external[0]}:{self.external[1]} -> "
                f"{self.internal[0]}:{self.internal[1]}")


class _Datagrams(asyncio.DatagramProtocol):
    """A socket connected to one server: answers queue up; ICMP unreachable is kept."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=16)
        self.refused: OSError | None = None
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not self.queue.full():
            self.queue.put_nowait(data)

    def error_received(self, exc: Exception) -> None:
        if isinstance(exc, OSError) and self.refused is None:
            self.refused = exc
            if not self.queue.full():
                self.queue.put_nowait(b"")   # wake the reader


async def _ask(server: tuple[str, int], request: bytes, parse: Callable[[bytes], T],
               timeout: float) -> T:
    """Send `request` to `server` (again at each of TRIES) until `parse` accepts an answer;
    PortmapError when the server refuses (ICMP unreachable), says no, or is silent for
    `timeout`. Datagrams that answer something else are skipped."""
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(_Datagrams, remote_addr=server)
    start = loop.time()
    deadline = start + timeout
    tries = [start + t for t in TRIES if t < timeout]
    skipped: PortmapError | None = None
    try:
        while True:
            now = loop.time()
            while tries and tries[0] <= now:
                tries.pop(0)
                transport.sendto(request)
            if now >= deadline:
                raise skipped or PortmapError(f"no answer within {timeout * 1000:.0f} ms")
            try:
                async with asyncio.timeout(min(tries[:1] + [deadline]) - now):  # (not wait_for: 3.11)
                    data = await protocol.queue.get()
            except asyncio.TimeoutError:
                continue
            if protocol.refused is not None:
                raise PortmapError("nothing listens (ICMP port unreachable)")
            try:
                return parse(data)
            except _NotForUs as e:
                skipped = e
    finally:
        transport.close()


def _local_address(gateway: str) -> str:
    """Our address towards `gateway` (a connected UDP socket sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((gateway, SERVER_PORT))
        return s.getsockname()[0]


def _read_gateway() -> str | None:
    try:
        with open("/proc/net/route", encoding="ascii") as f:
            return default_gateway(f.read())
    except OSError:
        return None


async def _blocking(call: Callable[..., T], *args: Any, timeout: float = UPNP_TIMEOUT) -> T:
    """A blocking miniupnpc call in a thread; PortmapError after `timeout` (the thread
    ends by itself: miniupnpc's sockets have their own timeouts)."""
    try:
        async with asyncio.timeout(timeout):
            return await asyncio.to_thread(call, *args)
    except asyncio.TimeoutError:
        raise PortmapError(f"no answer within {timeout:g} s") from None
    except PortmapError:
        raise
    except Exception as e:   # miniupnpc raises plain Exception("ConflictInMappingEntry")
        raise PortmapError(str(e) or type(e).__name__) from None


class PortMapper:
    """One session's port mapping: :meth:`candidate` asks the router and returns the
    mapped candidate (None: no mapping), a task renews it, :meth:`close` deletes it.

    `protocols` are asked in that order (a subset forces one); `gateway` overrides the
    default route's next hop (tests)."""

    def __init__(self, protocols: Iterable[str] = PROTOCOLS, *, gateway: str | None = None,
                 lifetime: int = LIFETIME, discovery_timeout: float = DISCOVERY_TIMEOUT) -> None:
        self.protocols = tuple(protocols)
        unknown = set(self.protocols) - set(PROTOCOLS)
        if unknown:
            raise ValueError(f"unknown port mapping protocol {sorted(unknown)[0]!r} "
                             f"(one of {', '.join(PROTOCOLS)})")
        self.gateway = gateway
        self.lifetime = lifetime
        self.discovery_timeout = discovery_timeout
        self.mapping: Mapping | None = None
        self._renewal: asyncio.Task | None = None
        self._closed = False

    async def candidate(self, host_candidates: Iterable[Candidate]) -> Candidate | None:
        """Map the port of the host candidate that faces the gateway; the mapped address
        as a srflx candidate whose related address is that host candidate."""
        gateway = self.gateway or _read_gateway()
        if gateway is None or not self.protocols:
            return None
        try:
            local = _local_address(gateway)
        except OSError:
            return None
        host = next((c for c in host_candidates if c.type == "host" and c.host == local
                     and c.transport.lower() == "udp"), None)
        if host is None:
            return None   # no socket of ours faces the gateway (loopback only, say)
        mapping = await self._map(gateway, (local, host.port))
        if mapping is None:
            return None
        if self._closed:   # closed while we asked
            await _delete(mapping)
            return None
        self.mapping = mapping
        _LIVE.add(self)
        self._renewal = asyncio.ensure_future(self._renew())
        ip, port = mapping.external
        return Candidate(
            foundation=candidate_foundation("srflx", "udp", f"{mapping.protocol}:{ip}"),
            component=1, transport="udp", priority=candidate_priority(1, "srflx"),
            host=ip, port=port, type="srflx",
            related_address=host.host, related_port=host.port)

    async def close(self) -> None:
        """Stop renewing and delete the mapping (bounded; never raises)."""
        self._closed = True
        if self._renewal is not None:
            self._renewal.cancel()
            self._renewal = None
        mapping, self.mapping = self.mapping, None
        _LIVE.discard(self)
        if mapping is not None:
            await _delete(mapping)

    # -- discovery and mapping
    async def _map(self, gateway: str, internal: tuple[str, int]) -> Mapping | None:
        """Ask every protocol at once whether the router speaks it (within the discovery
        timeout); map with the first in order that answered, else the next."""
        local = internal[0]
        probes = {
            "pcp": lambda: _ask((gateway, SERVER_PORT), pcp_announce_request(local),
                                lambda d: parse_pcp(d, PCP_ANNOUNCE), self.discovery_timeout),
            "nat-pmp": lambda: _ask((gateway, SERVER_PORT), natpmp_address_request(),
                                    parse_natpmp_address, self.discovery_timeout),
            "upnp": lambda: _ask((gateway, SSDP_PORT), ssdp_search(gateway),
                                 lambda d: parse_ssdp(d, gateway), self.discovery_timeout),
        }
        tasks = {p: asyncio.ensure_future(probes[p]()) for p in self.protocols}
        why: list[str] = []
        try:
            for protocol, task in tasks.items():
                try:
                    mapping = await self._make(protocol, gateway, internal, await task)
                except (PortmapError, OSError) as e:
                    text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                    why.append(f"{NAMES[protocol]}: {text}")
                    continue
                log.info("router port mapping: %s for %d s", mapping.describe(),
                         mapping.lifetime)
                return mapping
        finally:
            for task in tasks.values():
                if task.done() and not task.cancelled():
                    task.exception()   # (asked and answered: nothing to log)
                task.cancel()
        log.info("no router port mapping from %s (%s)", gateway, "; ".join(why))
        return None

    async def _make(self, protocol: str, gateway: str, internal: tuple[str, int],
                    discovered: Any) -> Mapping:
        """A new mapping by `protocol`, with what its discovery found."""
        if protocol == "pcp":
            mapping = Mapping("pcp", gateway, internal, ("0.0.0.0", 0), 0,
                              nonce=secrets.token_bytes(12))
        elif protocol == "nat-pmp":
            mapping = Mapping("nat-pmp", gateway, internal, (discovered, 0), 0)
        else:
            mapping = Mapping("upnp", gateway, internal, ("0.0.0.0", 0), 0, igd=discovered)
        await _MAP[protocol](mapping, self.lifetime)
        return mapping

    async def renew(self) -> bool:
        """Ask the router again now for the mapping we hold (the renewal task does this at
        half its lifetime); whether it said yes. Logs when the external address moved."""
        mapping = self.mapping
        if mapping is None:
            return False
        before = mapping.external
        try:
            await _MAP[mapping.protocol](mapping, self.lifetime)
        except (PortmapError, OSError) as e:
            log.info("router port mapping %s not renewed: %s", mapping.describe(), e)
            return False
        if mapping.external != before:
            log.warning("router port mapping moved: %s (the peer has the old address)",
                        mapping.describe())
        return True

    async def _renew(self) -> None:
        """Renew at half the time left; past expiry (the router forgot us, or is gone) try
        again every RETRY_EXPIRED seconds."""
        loop = asyncio.get_running_loop()
        expires = loop.time() + (self.mapping.lifetime if self.mapping else 0)
        while self.mapping is not None:
            left = expires - loop.time()
            await asyncio.sleep(max(left / 2, MIN_RENEW) if left > 0 else RETRY_EXPIRED)
            if await self.renew() and self.mapping is not None:
                expires = loop.time() + self.mapping.lifetime


# Each of these asks the router to map `mapping.internal` for `lifetime` seconds (again:
# a renewal keeps the external port it has) and fills in what it granted; lifetime 0
# deletes the mapping.

async def _pcp_map(mapping: Mapping, lifetime: int) -> None:
    internal_ip, internal_port = mapping.internal
    suggested = mapping.external if mapping.external[1] else ("0.0.0.0", internal_port)
    answer = await _ask((mapping.gateway, SERVER_PORT),
                        pcp_map_request(internal_ip, mapping.nonce, internal_port, lifetime,
                                        suggested),
                        lambda d: parse_pcp(d, PCP_MAP, mapping.nonce, internal_port),
                        MAP_TIMEOUT)
    if lifetime:
        assert answer.external is not None
        mapping.external, mapping.lifetime = answer.external, _lifetime(answer.lifetime)


async def _natpmp_map(mapping: Mapping, lifetime: int) -> None:
    port = mapping.internal[1]
    suggested = (mapping.external[1] or port) if lifetime else 0   # RFC 6886 §3.4: 0 deletes
    external, granted = await _ask((mapping.gateway, SERVER_PORT),
                                   natpmp_map_request(port, suggested, lifetime),
                                   lambda d: parse_natpmp_map(d, port), MAP_TIMEOUT)
    if lifetime:
        mapping.external, mapping.lifetime = (mapping.external[0], external), _lifetime(granted)


async def _upnp_map(mapping: Mapping, lifetime: int) -> None:
    igd = mapping.igd
    if isinstance(igd, str):   # the description URL: fetch it, choose the WAN service
        igd = mapping.igd = await _blocking(_select_igd, igd)
    host, port = mapping.internal
    if not lifetime:
        await _blocking(igd.deleteportmapping, mapping.external[1], "UDP")
        return
    if not mapping.external[1]:
        external = _usable_external(await _blocking(igd.externalipaddress))
        try:
            await _blocking(igd.addportmapping, port, "UDP", host, port, f"sipmesh {port}", "",
                            lifetime)
            mapping.external = (external, port)
        except PortmapError as e:   # the same port is taken: one other, by chance
            if "Conflict" not in str(e):
                raise
            other = 1024 + secrets.randbelow(64512)
            await _blocking(igd.addportmapping, other, "UDP", host, port, f"sipmesh {port}",
                            "", lifetime)
            mapping.external = (external, other)
    else:
        await _blocking(igd.addportmapping, mapping.external[1], "UDP", host, port,
                        f"sipmesh {port}", "", lifetime)
    mapping.lifetime = lifetime


_MAP: dict[str, Callable[[Mapping, int], Any]] = {
    "pcp": _pcp_map, "nat-pmp": _natpmp_map, "upnp": _upnp_map}


async def _delete(mapping: Mapping) -> None:
    try:
        await _MAP[mapping.protocol](mapping, 0)
    except (PortmapError, OSError) as e:
        log.info("router port mapping %s not deleted (it expires in %d s): %s",
                 mapping.describe(), mapping.lifetime, e)
        return
    log.info("router port mapping %s deleted", mapping.describe())


def _select_igd(location: str) -> Any:
    import miniupnpc   # a C extension: loaded only when a router speaks UPnP

    igd = miniupnpc.UPnP()
    igd.selectigd(location)
    return igd


# --------------------------------------------------------------------------- process exit

_LIVE: set[PortMapper] = set()
_PID = os.getpid()


def _delete_at_exit() -> None:
    """Best effort at interpreter exit: delete what no session closed (blocking, bounded:
    one datagram and DISCOVERY_TIMEOUT each, or miniupnpc's own HTTP timeouts)."""
    mappings = [m.mapping for m in list(_LIVE) if m.mapping is not None]
    _LIVE.clear()
    if os.getpid() != _PID:   # a forked child: the mappings are its parent's
        return
    for mapping in mappings:
        try:
            if mapping.protocol == "upnp":
                mapping.igd.deleteportmapping(mapping.external[1], "UDP")
                continue
            if mapping.protocol == "pcp":
                request = pcp_map_request(mapping.internal[0], mapping.nonce,
                                          mapping.internal[1], 0, mapping.external)
            else:
                request = natpmp_map_request(mapping.internal[1], 0, 0)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(DISCOVERY_TIMEOUT)
                s.connect((mapping.gateway, SERVER_PORT))
                s.send(request)
                s.recv(1100)
        except Exception:   # noqa: BLE001 - best effort: the mapping expires anyway
            pass


atexit.register(_delete_at_exit)
