"""What this host's network lets a session do (``sipmesh netcheck``, like ``tailscale netcheck``).

From one UDP socket, Binding requests (STUN, RFC 8489) go to the SIP server (which answers
STUN on its SIP port) and to any other STUN servers: each answer says which address and
port our NAT gave us towards that server, and how long the round trip took. The same
mapping towards every server means an endpoint-independent NAT (hole punching works);
another port per server a NAT that maps per destination ("symmetric": a peer behind NAT is
reached only through a relay). A TURN Allocate (RFC 8656) over UDP and over TCP says
whether the relay is reachable and accepts the SIP credentials (coturn's long-term
credential key is the SIP digest HA1); the allocation is deleted at once. No answer over
UDP from anyone while the relay answers over TCP means UDP is blocked.

The exchanges (:class:`BindingCheck`, :class:`AllocateCheck`) and the verdict
(:func:`summarise`) are sans-I/O: bytes, source addresses and clock values in, datagrams
and a :class:`Report` out. :func:`netcheck` is the asyncio glue: name lookups (through the
one resolver, ``sip/transport/resolve.py``), one UDP socket per address family shared by
every UDP exchange, a TCP connection per TURN-over-TCP check. Every exchange has a deadline.

Every try of a UDP request is sent with a fresh transaction ID, so that the answer says
which try it answers and the round-trip time is exact (RFC 8489 retransmits with one ID,
where a late answer to the first try would pass for a fast answer to the last).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from aioice import stun
from aioice.ice import get_host_addresses
from aioice.turn import UDP_TRANSPORT, make_integrity_key

from sipmesh.ops.listen import hostport
from sipmesh.sip.transport.resolve import Resolver, ResolveError
from sipmesh.sip.uri import parse_sip_uri, split_hostport

__all__ = ["AllocateCheck", "BindingCheck", "Exchange", "NetcheckConfig", "Probe", "Report",
           "Server", "TIMEOUT", "TRIES", "netcheck", "split_host_port", "summarise"]

TIMEOUT = 2.5                       # s for each probe (the whole check: about this, plus DNS)
TRIES = (0.0, 0.25, 0.75, 1.5)      # s after its start that each try of a UDP request goes out
STUN_PORT = 3478
SIP_PORT = 5060
Address = tuple[str, int]


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Server:
    """A server to ask: its role ("sip", "stun", "turn"), the name the user gave, and the
    address it resolved to (None: ``error`` says why not)."""

    role: str
    name: str
    address: Address | None = None
    error: str | None = None


@dataclass
class Probe:
    """What one exchange with one server over one transport found."""

    server: Server
    transport: str                      # "udp" or "tcp"
    rtt: float | None = None            # s, of the first request answered
    mapped: Address | None = None       # our address as the server saw it
    relayed: Address | None = None      # TURN: the relay address we were given
    credentials: str | None = None      # TURN: "accepted", "refused", "missing", "not needed"
    error: str | None = None            # why the probe failed (None: it succeeded)

    @property
    def answered(self) -> bool:
        """The server answered at all (even if only to refuse)."""
        return self.rtt is not None


# --------------------------------------------------------------------------- exchanges (pure)


def _parse(data: bytes) -> stun.Message | None:
    """A STUN message, or None for anything else (the network's bytes are hostile)."""
    try:
        return stun.parse_message(data)
    except (ValueError, IndexError, KeyError, struct.error, UnicodeDecodeError):
        return None


class Exchange:
    """One probe's STUN transactions with one server, one after another (sans-I/O).

    The driver calls :meth:`outgoing` with the clock to get the datagrams (or stream
    bytes) due now, feeds every answer to :meth:`receive`, and calls again by
    :meth:`next_time`. On a reliable transport (TCP) a request is sent once. The probe is
    finished (``done``) when the exchange says so or its deadline passed."""

    def __init__(self, probe: Probe, *, now: float, timeout: float = TIMEOUT,
                 reliable: bool = False) -> None:
        self.probe = probe
        self.timeout = timeout
        self.deadline = now + timeout
        self.tries = (0.0,) if reliable else TRIES
        self.done = False
        self._make: Callable[[], stun.Message] | None = None
        self._method: stun.Method | None = None
        self._step_start = now
        self._next_try = 0
        self._sent: dict[bytes, float] = {}    # transaction ID -> when that try went out
        self.send_error: str | None = None     # why the last try could not be sent

    # -- what subclasses use
    def _request(self, make: Callable[[], stun.Message], now: float) -> None:
        """Start a new transaction; `make` builds its request (a fresh ID each call)."""
        self._make = make
        self._method = make().message_method
        self._step_start, self._next_try = now, 0
        self._sent.clear()

    def finish(self, error: str | None = None) -> None:
        """The probe is over (`error`: why it failed, unless an earlier reason stands)."""
        if error is not None and self.probe.error is None:
            self.probe.error = error
        self.done = True
        self._sent.clear()

    def _answer(self, message: stun.Message, rtt: float, now: float) -> None:
        raise NotImplementedError

    def _expired(self) -> None:
        why = f" (cannot send: {self.send_error})" if self.send_error else ""
        self.finish(f"no answer within {self.timeout:g} s{why}")

    # -- what the driver uses
    def outgoing(self, now: float) -> list[bytes]:
        if self.done:
            return []
        if now >= self.deadline:
            self._expired()
            return []
        out = []
        while (self._make is not None and self._next_try < len(self.tries)
               and self._step_start + self.tries[self._next_try] <= now):
            request = self._make()
            self._sent[request.transaction_id] = now
            self._next_try += 1
            out.append(bytes(request))
        return out

    def next_time(self) -> float | None:
        """When :meth:`outgoing` has something to do next (None: finished)."""
        if self.done:
            return None
        if self._next_try < len(self.tries):
            return min(self.deadline, self._step_start + self.tries[self._next_try])
        return self.deadline

    def receive(self, data: bytes, source: Address | None, now: float) -> bool:
        """Take `data` if it answers one of our tries (from the server's address, when
        `source` is given); whether it did."""
        message = _parse(data)
        if (self.done or message is None or message.transaction_id not in self._sent
                or message.message_class not in (stun.Class.RESPONSE, stun.Class.ERROR)
                or message.message_method != self._method):
            return False
        if source is not None and tuple(source[:2]) != self.probe.server.address:
            return False
        rtt = now - self._sent[message.transaction_id]
        if self.probe.rtt is None:
            self.probe.rtt = rtt
        self._answer(message, rtt, now)
        return True


def _mapped(message: stun.Message) -> Address | None:
    address = message.attributes.get("XOR-MAPPED-ADDRESS") or \
        message.attributes.get("MAPPED-ADDRESS")
    return (address[0], address[1]) if address else None


def _error_text(message: stun.Message) -> str:
    code, reason = message.attributes.get("ERROR-CODE", (0, "no ERROR-CODE"))
    return f"{code} {reason}".strip()


class BindingCheck(Exchange):
    """A Binding request: our address as the server sees it, and the round-trip time."""

    def start(self, now: float) -> "BindingCheck":
        self._request(lambda: stun.Message(stun.Method.BINDING, stun.Class.REQUEST), now)
        return self

    def _answer(self, message: stun.Message, rtt: float, now: float) -> None:
        if message.message_class == stun.Class.ERROR:
            self.finish(f"answered with an error: {_error_text(message)}")
            return
        self.probe.mapped = _mapped(message)
        self.finish(None if self.probe.mapped else "answered without our address")


class AllocateCheck(Exchange):
    """A TURN allocation with the SIP name and password, deleted again at once.

    Allocate without credentials -> 401 with the realm and a nonce -> Allocate with
    MESSAGE-INTEGRITY (key MD5(user:realm:password), the SIP HA1) -> our relayed address;
    then Refresh with lifetime 0 (deletion; its answer is not waited for beyond the
    deadline, the allocation expires by itself anyway)."""

    def __init__(self, probe: Probe, *, now: float, username: str | None,
                 password: str | None, timeout: float = TIMEOUT, reliable: bool = False) -> None:
        super().__init__(probe, now=now, timeout=timeout, reliable=reliable)
        self.username, self._password = username, password
        self._key: bytes | None = None
        self._realm: str | None = None
        self._nonce: bytes | None = None
        self._stale = False
        self._deleting = False

    def start(self, now: float) -> "AllocateCheck":
        self._request(self._allocate, now)
        return self

    def _allocate(self) -> stun.Message:
        request = stun.Message(stun.Method.ALLOCATE, stun.Class.REQUEST)
        request.attributes["LIFETIME"] = 60
        request.attributes["REQUESTED-TRANSPORT"] = UDP_TRANSPORT
        return self._sign(request)

    def _delete(self) -> stun.Message:
        request = stun.Message(stun.Method.REFRESH, stun.Class.REQUEST)
        request.attributes["LIFETIME"] = 0
        return self._sign(request)

    def _sign(self, request: stun.Message) -> stun.Message:
        if self._key is not None:
            request.attributes["USERNAME"] = self.username
            request.attributes["REALM"] = self._realm
            request.attributes["NONCE"] = self._nonce
            request.add_message_integrity(self._key)
        return request

    def _answer(self, message: stun.Message, rtt: float, now: float) -> None:
        probe = self.probe
        if self._deleting:
            self.finish()
            return
        signed = self._key is not None
        if message.message_class == stun.Class.RESPONSE:
            if signed and not message.check_message_integrity(self._key):
                return    # not from the server that knows our key: keep waiting
            relayed = message.attributes.get("XOR-RELAYED-ADDRESS")
            if not relayed:
                self.finish("answered the Allocate without a relayed address")
                return
            probe.relayed = (relayed[0], relayed[1])
            probe.mapped = _mapped(message)
            probe.credentials = "accepted" if signed else "not needed"
            self._deleting = True
            self._request(self._delete, now)
            return
        code = message.error_code
        if code == 401 and not signed and "REALM" in message.attributes \
                and "NONCE" in message.attributes:
            if not self.username or self._password is None:
                probe.credentials = "missing"
                self.finish("reachable; it wants a name and password")
                return
            self._realm, self._nonce = message.attributes["REALM"], message.attributes["NONCE"]
            self._key = make_integrity_key(self.username, self._realm, self._password)
            self._request(self._allocate, now)
        elif code == 438 and signed and not self._stale and "NONCE" in message.attributes:
            self._stale = True    # stale nonce: once more with the new one
            self._nonce = message.attributes["NONCE"]
            self._request(self._allocate, now)
        elif code in (401, 403, 441) and signed:
            probe.credentials = "refused"
            self.finish(f"credentials refused ({_error_text(message)})")
        else:
            self.finish(f"refused the allocation: {_error_text(message)}")

    def _expired(self) -> None:
        if self._deleting:   # the allocation was made: what counted is done
            self.finish()
        else:
            super()._expired()


# --------------------------------------------------------------------------- the verdict (pure)


@dataclass
class Report:
    """What the network allows, in data and in words."""

    servers: list[Server]
    probes: list[Probe]
    local: Address | None                 # our UDP socket's address (towards the first server)
    udp: str                              # "works", "blocked" or "unknown"
    public: list[Address]                 # our address(es) as the servers saw them over UDP
    mapping: str                          # "none", "endpoint-independent", "per-destination", "unknown"
    relay: dict[str, str]                 # transport -> "accepted", "refused", ... "unreachable"
    verdict: list[str] = field(default_factory=list)   # what it means, in sentences
    advice: list[str] = field(default_factory=list)    # what to do next
    elapsed: float = 0.0

    @property
    def anything_answered(self) -> bool:
        return any(p.answered for p in self.probes)

    def to_json(self) -> dict:
        return {
            "udp": self.udp, "mapping": self.mapping,
            "public": [show(a) for a in self.public], "local": show(self.local),
            "relay": self.relay, "verdict": self.verdict, "advice": self.advice,
            "elapsed": round(self.elapsed, 3),
            "probes": [{"role": p.server.role, "server": p.server.name,
                        "address": show(p.server.address), "transport": p.transport,
                        "rtt_ms": None if p.rtt is None else round(p.rtt * 1000, 2),
                        "mapped": show(p.mapped), "relayed": show(p.relayed),
                        "credentials": p.credentials, "error": p.error}
                       for p in self.probes],
        }


def show(address: Address | None) -> str | None:
    return None if address is None else hostport(*address)


def _relay_state(probe: Probe) -> str:
    if probe.relayed:
        return "works" if probe.credentials == "accepted" else "works (no credentials needed)"
    if probe.credentials == "refused":
        return "credentials refused"
    if probe.credentials == "missing":
        return "reachable (no credentials given)"
    return "refused" if probe.answered else "unreachable"


def summarise(servers: Sequence[Server], probes: Sequence[Probe],
              local: Address | None, local_hosts: Sequence[str] = ()) -> Report:
    """The verdict from the probes. `local` is our UDP socket's address (port and the
    address towards the servers); `local_hosts` any other addresses of ours."""
    udp = [p for p in probes if p.transport == "udp" and p.mapped is not None]
    tcp = [p for p in probes if p.transport == "tcp" and p.answered]
    public: list[Address] = []
    for p in udp:
        if p.mapped not in public:
            public.append(p.mapped)
    towards = {p.server.address for p in udp}
    ours = local is not None and bool(public) and all(
        a[1] == local[1] and (a[0] == local[0] or a[0] in local_hosts) for a in public)
    verdict, advice = [], []

    if udp:
        state = "works"
    elif tcp:
        state = "blocked"
    else:
        state = "unknown"
    if ours:
        mapping = "none"
    elif len(public) > 1:
        mapping = "per-destination"
    elif len(towards) > 1:
        mapping = "endpoint-independent"
    else:
        mapping = "unknown"

    if state == "blocked":
        verdict.append("UDP is blocked: no server answered over UDP, but the relay did over "
                       "TCP; every session goes through the relay over TCP")
    elif state == "unknown":
        verdict.append("no server answered at all")
        advice.append("check that this host is online and the server addresses are right; "
                      "a firewall may drop both UDP and TCP to them")
    if mapping == "none":
        verdict.append("no NAT: the servers see our own address; peers reach us directly "
                       "unless a firewall drops unsolicited packets")
    elif mapping == "endpoint-independent":
        verdict.append("our NAT maps endpoint-independently (the same public address towards "
                       "every server): direct sessions with peers behind NAT work")
    elif mapping == "per-destination":
        verdict.append("our NAT maps per destination (symmetric: another public port for each "
                       "server): sessions with peers behind NAT go through the relay; direct "
                       "only to peers with a public address")
    elif state == "works":
        verdict.append("how our NAT maps is unknown: only one server answered over UDP")
        advice.append("give a second STUN server (--stun HOST[:PORT]) to learn how the NAT "
                      "maps")

    relay = {p.transport: _relay_state(p) for p in probes if p.server.role == "turn"}
    turn = [p for p in probes if p.server.role == "turn"]
    if not turn:
        if mapping == "per-destination":
            advice.append("sessions with peers behind NAT need the relay: check it with "
                          "--turn HOST[:PORT] and your SIP name and password")
        elif state == "unknown":
            advice.append("where UDP is blocked only the relay over TCP helps: check it with "
                          "--turn HOST[:PORT] and your SIP name and password")
    else:
        usable = [p.transport.upper() for p in turn if p.relayed]
        if usable:
            verdict.append(f"the relay works over {' and '.join(usable)}"
                           + (" with our credentials" if any(p.credentials == "accepted"
                                                             for p in turn) else ""))
        credentials = {p.credentials for p in turn}
        if "refused" in credentials:
            advice.append("the relay refused our credentials: check the name and password "
                          "(it takes the SIP ones: --user, --credentials; the realm is the "
                          "SIP realm)")
        elif "missing" in credentials:
            advice.append("the relay wants a name and password: give the SIP ones (--user "
                          "and --credentials or $SIPMESH_PASSWORD)")
        if not any(p.answered for p in turn):
            advice.append("the relay answered neither over UDP nor over TCP: check --turn "
                          "HOST[:PORT] (coturn listens on 3478 for both)")
    return Report(list(servers), list(probes), local, state, public, mapping, relay,
                  verdict, advice)


# --------------------------------------------------------------------------- I/O


def split_host_port(text: str, default_port: int) -> tuple[str, int]:
    """HOST[:PORT] or [IPv6][:PORT] -> (host, port); ValueError if it is neither."""
    host, port = split_hostport(text)
    return host.strip("[]"), port or default_port


@dataclass(frozen=True)
class NetcheckConfig:
    """What to check. `sip_server` is ``HOST[:PORT]`` as ``sipmesh call --server`` takes it
    (SRV for _sip._udp when there is no port); STUN and TURN servers ``HOST[:PORT]`` (3478)."""

    sip_server: str | None = None
    stun_servers: tuple[str, ...] = ()
    turn_server: str | None = None
    turn_username: str | None = None
    turn_password: str | None = field(default=None, repr=False)
    timeout: float = TIMEOUT
    nameservers: tuple[Address, ...] | None = None    # None: the system's DNS


async def _resolve(config: NetcheckConfig, resolver: Resolver) -> list[Server]:
    async def one(role: str, name: str) -> Server:
        try:
            if role == "sip":
                uri = parse_sip_uri(f"sip:{name}")
                flow = await resolver.uri_flow(uri, "UDP")
                return Server(role, name, (flow.host, flow.port))
            host, port = split_host_port(name, STUN_PORT)
            return Server(role, name, ((await resolver.addresses(host))[0], port))
        except (ResolveError, ValueError) as e:
            return Server(role, name, error=f"{e}: check the name, or give an address")
        except Exception as e:   # noqa: BLE001 - a SIP URI that does not parse, say
            return Server(role, name, error=f"cannot use {name!r}: {e}")

    wanted = ([("sip", config.sip_server)] if config.sip_server else []) + \
        [("stun", s) for s in config.stun_servers] + \
        ([("turn", config.turn_server)] if config.turn_server else [])
    return list(await asyncio.gather(*(one(role, name) for role, name in wanted)))


class _Receiver(asyncio.DatagramProtocol):
    def __init__(self, exchanges: list[Exchange], clock: Callable[[], float],
                 wake: asyncio.Event) -> None:
        self.exchanges, self.clock, self.wake = exchanges, clock, wake

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        now = self.clock()
        for exchange in self.exchanges:
            if exchange.receive(data, addr, now):
                self.wake.set()
                return

    def error_received(self, exc: Exception) -> None:   # ICMP unreachable, say: keep trying
        pass


async def _drive(exchanges: list[Exchange], send: Callable[[Exchange, bytes], None],
                 clock: Callable[[], float], wake: asyncio.Event) -> None:
    """Send what is due, sleep until the next try or an answer, until all are done."""
    while True:
        now = clock()
        for exchange in exchanges:
            for data in exchange.outgoing(now):
                send(exchange, data)
        times = [t for t in (e.next_time() for e in exchanges) if t is not None]
        if not times:
            return
        wake.clear()
        try:
            async with asyncio.timeout(max(0.0, min(times) - clock())):  # (not wait_for: 3.11)
                await wake.wait()
        except asyncio.TimeoutError:
            pass


async def _udp(exchanges: list[Exchange], family: int, clock: Callable[[], float],
               local: list[Address]) -> None:
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    bind = ("0.0.0.0", 0) if family == socket.AF_INET else ("::", 0)
    try:
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Receiver(exchanges, clock, wake), local_addr=bind, family=family)
    except OSError as e:
        for exchange in exchanges:
            exchange.finish(f"cannot open a UDP socket: {e.strerror or e}")
        return
    try:
        port = transport.get_extra_info("sockname")[1]
        local.append((_source_address(family, exchanges[0].probe.server.address), port))

        def send(exchange: Exchange, data: bytes) -> None:
            try:
                transport.sendto(data, exchange.probe.server.address)
            except OSError as e:   # no route, say: the deadline reports it
                exchange.send_error = e.strerror or str(e)

        await _drive(exchanges, send, clock, wake)
    finally:
        transport.close()


def _source_address(family: int, towards: Address) -> str:
    """Our address on the route to `towards` (a connected UDP socket sends nothing)."""
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect(towards)
            return s.getsockname()[0]
        except OSError:
            return "0.0.0.0" if family == socket.AF_INET else "::"


async def _tcp(exchange: Exchange, clock: Callable[[], float]) -> None:
    server = exchange.probe.server.address
    assert server is not None
    try:
        async with asyncio.timeout(max(0.0, exchange.deadline - clock())):
            reader, writer = await asyncio.open_connection(*server)
    except asyncio.TimeoutError:
        exchange.finish(f"no TCP connection within {exchange.timeout:g} s")
        return
    except OSError as e:
        exchange.finish(f"TCP connection failed: {e.strerror or e}")
        return
    wake = asyncio.Event()

    async def read() -> None:
        try:
            while not exchange.done:
                header = await reader.readexactly(20)
                body = await reader.readexactly(struct.unpack("!H", header[2:4])[0])
                exchange.receive(header + body, None, clock())
                wake.set()
        except (asyncio.IncompleteReadError, OSError):
            if not exchange.done:
                exchange.finish("the server closed the TCP connection")
            wake.set()

    reading = asyncio.ensure_future(read())
    try:
        await _drive([exchange], lambda _, data: writer.write(data), clock, wake)
    finally:
        reading.cancel()
        writer.close()
        try:
            async with asyncio.timeout(0.5):
                await writer.wait_closed()
        except (asyncio.TimeoutError, OSError):
            pass


async def netcheck(config: NetcheckConfig, *,
                   on_progress: Callable[[str], None] | None = None) -> Report:
    """Ask every server at once; the :class:`Report` (bounded by about twice
    ``config.timeout``: names first, then the probes)."""
    clock = time.monotonic
    started = clock()
    progress = on_progress or (lambda text: None)
    resolver = Resolver(list(config.nameservers) if config.nameservers is not None else None,
                        lifetime=config.timeout)
    progress("looking up the servers")
    try:
        async with asyncio.timeout(config.timeout + 0.5):
            servers = await _resolve(config, resolver)
    except asyncio.TimeoutError:
        servers = [Server(role, name, error=f"no DNS answer within {config.timeout:g} s: "
                                             "check the name and DNS, or give an address")
                   for role, name in ([("sip", config.sip_server)] if config.sip_server else [])
                   + [("stun", s) for s in config.stun_servers]
                   + ([("turn", config.turn_server)] if config.turn_server else [])]
    usable = [s for s in servers if s.address is not None]
    now = clock()
    by_family: dict[int, list[Exchange]] = {}
    over_tcp: list[Exchange] = []
    for server in usable:
        family = socket.AF_INET6 if ":" in server.address[0] else socket.AF_INET
        if server.role == "turn":
            for transport in ("udp", "tcp"):
                check = AllocateCheck(Probe(server, transport), now=now,
                                      username=config.turn_username,
                                      password=config.turn_password, timeout=config.timeout,
                                      reliable=transport == "tcp").start(now)
                (over_tcp if transport == "tcp" else by_family.setdefault(family, [])).append(check)
        else:
            by_family.setdefault(family, []).append(
                BindingCheck(Probe(server, "udp"), now=now, timeout=config.timeout).start(now))
    exchanges = [e for group in by_family.values() for e in group] + over_tcp
    progress(f"asking {len(usable)} server{'s' * (len(usable) != 1)} "
             f"(at most {config.timeout:g} s)")
    local: list[Address] = []
    await asyncio.gather(*(_udp(group, family, clock, local) for family, group in by_family.items()),
                         *(_tcp(e, clock) for e in over_tcp))
    hosts = get_host_addresses(use_ipv4=True, use_ipv6=True)   # to recognise "no NAT"
    report = summarise(servers, [e.probe for e in exchanges], local[0] if local else None, hosts)
    for server in servers:
        if server.error:
            report.advice.insert(0, f"{server.role} server {server.name}: {server.error}")
    report.elapsed = clock() - started
    return report


async def binding_rtt(address: Address, timeout: float = TIMEOUT) -> float | None:
    """One Binding exchange with the STUN (or TURN) server at `address` (an IPv4 or IPv6
    address and port): its round-trip time in seconds, None when it did not answer (a mesh
    member measures its distance to the network's member relays so)."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    clock = time.monotonic
    check = BindingCheck(Probe(Server("stun", show(address) or "", address), "udp"),
                         now=clock(), timeout=timeout).start(clock())
    await _udp([check], family, clock, [])
    return check.probe.rtt if check.probe.error is None else None
