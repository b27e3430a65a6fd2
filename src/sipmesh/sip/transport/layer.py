"""The asyncio transport layer: UDP, TCP and TLS listeners and connections.

Thin I/O around the parser: datagrams and framed stream messages are parsed,
stamped with received/rport, and handed as an `Inbound` (message, flow, octets)
to the one callback given to the constructor. An optional datagram filter sees
each UDP datagram before it is parsed. Malformed requests are answered with 400
where a response can be formed; nothing malformed ever stops a listener.

STUN shares the UDP port (stun.py): a server layer answers Binding requests, and
`keep_alive` keeps a flow's NAT binding open (RFC 5626 §4.4), learning from the
answers the address our peer sees (`public_address`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import ssl
from typing import Callable

from sipmesh.sip.errors import ParseError
from sipmesh.sip.message import (DEFAULT_LIMITS, Limits, Request, Response, make_response,
                                 parse_message)
from sipmesh.sip.transport import stun
from sipmesh.sip.transport.base import RELIABLE, Flow, Inbound, response_target, stamp_received
from sipmesh.sip.transport.framing import StreamFramer
from sipmesh.sip.uri import is_ip

log = logging.getLogger("sipmesh.sip.transport")
trace = logging.getLogger("sipmesh.trace")

# RFC 5626 §4.4.1 asks for keep-alives every 95-120 s; a NAT's UDP binding may be
# gone after 30 s without an answer (Linux conntrack), so we send one every 25 s.
KEEPALIVE_INTERVAL = 25.0
STUN_TIMEOUT = 3.0

MessageHandler = Callable[[Inbound], None]
# Sees a raw datagram before it is parsed; True means it took the datagram (answered
# it from a cache, refused it, handed it to another process).
DatagramFilter = Callable[[bytes, Flow], bool]
_SECRET_HEADERS = re.compile(rb"^((?:proxy-)?authorization[ \t]*:).*$", re.IGNORECASE | re.MULTILINE)


def redact(data: bytes) -> str:
    """A message for a protocol trace, with credentials cut out."""
    return _SECRET_HEADERS.sub(rb"\1 <redacted>", data).decode("utf-8", "replace")


class _Connection(asyncio.Protocol):
    """One TCP or TLS connection, inbound or outbound."""

    def __init__(self, layer: "TransportLayer", transport_name: str, outbound: bool = False) -> None:
        self.layer = layer
        self.name = transport_name
        self.outbound = outbound
        self.framer = StreamFramer(layer.limits)
        self.transport: asyncio.Transport | None = None
        self.flow: Flow | None = None
        self.local: tuple[str, int] | None = None  # our end of it
        self.last_activity = 0.0
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance check
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.flow = Flow(self.name, peer[0], peer[1])
        local = transport.get_extra_info("sockname")
        self.local = (local[0], local[1]) if local else None
        self.last_activity = asyncio.get_running_loop().time()
        self.layer._register(self)

    def data_received(self, data: bytes) -> None:
        assert self.flow is not None and self.transport is not None
        self.last_activity = asyncio.get_running_loop().time()
        try:
            messages = self.framer.feed(data)
        except ParseError as exc:
            log.warning("closing %s: cannot frame the stream: %s", self.flow, exc.reason)
            self.transport.close()
            return
        for raw in messages:
            self.layer._received(raw, self.flow, stream=True)

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and self.outbound:  # e.g. a TLS server refusing us after the handshake
            log.warning("the server closed our connection %s: %s", self.flow, exc)
        self.layer._unregister(self)
        if not self.closed.done():
            self.closed.set_result(None)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.last_activity = asyncio.get_running_loop().time()
        self.transport.write(data)


class _Datagram(asyncio.DatagramProtocol):
    def __init__(self, layer: "TransportLayer") -> None:
        self.layer = layer
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:  # type: ignore[override]
        self.layer.receive_datagram(data, Flow("UDP", addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        log.debug("UDP error: %s", exc)


class TransportLayer:
    def __init__(self, on_message: MessageHandler, *, datagram_filter: DatagramFilter | None = None,
                 stun_server: bool = False, limits: Limits = DEFAULT_LIMITS,
                 idle_timeout: float = 300.0, connect_timeout: float = 5.0) -> None:
        self._on_message = on_message
        self._datagram_filter = datagram_filter
        self.stun_server = stun_server  # answer STUN Binding requests on our UDP ports
        # our address as seen by the far end of a flow (from STUN answers)
        self.public_address: dict[Flow, tuple[str, int]] = {}
        self._stun_pending: dict[bytes, tuple[Flow, asyncio.Future[tuple[str, int]]]] = {}
        self.limits = limits
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self._udp: list[tuple[_Datagram, tuple[str, int]]] = []
        self._servers: list[tuple[str, asyncio.base_events.Server, tuple[str, int]]] = []
        self._connections: dict[Flow, _Connection] = {}
        self._connecting: dict[Flow, asyncio.Future[_Connection]] = {}
        self._client_tls: ssl.SSLContext | None = None
        # The name a TLS server's certificate must show, by (IP, port) we connect to: the
        # name the user gave for that server (else the certificate must name the IP).
        self._tls_names: dict[tuple[str, int], str] = {}
        self._reaper: asyncio.Task[None] | None = None

    # -- set-up -----------------------------------------------------------------------
    async def listen(self, transport: str, host: str, port: int, *,
                     ssl_context: ssl.SSLContext | None = None, reuse_port: bool = False) -> tuple[str, int]:
        """Start listening; returns the bound (host, port) (port 0 picks a free one)."""
        transport = transport.upper()
        loop = asyncio.get_running_loop()
        if transport == "UDP":
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_DGRAM)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
            sock.bind((host, port))
            _, proto = await loop.create_datagram_endpoint(lambda: _Datagram(self), sock=sock)
            bound = sock.getsockname()[:2]
            self._udp.append((proto, (bound[0], bound[1])))
        elif transport in RELIABLE:
            if transport == "TLS" and ssl_context is None:
                raise ValueError("TLS listener needs an ssl_context")
            server = await loop.create_server(
                lambda: _Connection(self, transport), host, port,
                ssl=ssl_context if transport == "TLS" else None, reuse_port=reuse_port or None)
            bound = server.sockets[0].getsockname()[:2]
            self._servers.append((transport, server, (bound[0], bound[1])))
        else:
            raise ValueError(f"unknown transport {transport!r}")
        if self._reaper is None and self.idle_timeout > 0:
            self._reaper = asyncio.ensure_future(self._reap_idle())
        log.info("listening on %s %s:%d", transport, bound[0], bound[1])
        return bound[0], bound[1]

    def set_client_tls(self, context: ssl.SSLContext) -> None:
        self._client_tls = context

    def expect_tls_name(self, host: str, port: int, name: str) -> None:
        """Verify the certificate of the TLS server at host:port (an IP) against `name`."""
        self._tls_names[(host, port)] = name

    async def connect(self, flow: Flow) -> None:
        """Open the TCP/TLS connection for `flow` now, unless it is open: a refused
        connection or certificate raises OSError here (its __cause__ the original error)
        rather than failing a transaction later."""
        if flow not in self._connections:
            await self._connect(flow)

    def address(self, transport: str, family_of: str | None = None) -> tuple[str, int] | None:
        """A listening (host, port) for `transport`, of the same IP family as `family_of`."""
        transport = transport.upper()
        want_v6 = family_of is not None and ":" in family_of
        candidates = ([addr for _, addr in self._udp] if transport == "UDP" else
                      [addr for name, _, addr in self._servers if name == transport])
        if not candidates and transport in RELIABLE:
            # No listener (a UA with no certificate of its own connects out over TLS): the
            # local end of our first open connection, so that a Via or Contact naming it
            # is reached over that connection (RFC 3261 §18.2.2).
            candidates = [conn.local for flow, conn in self._connections.items()
                          if flow.transport == transport and conn.local is not None]
        for addr in candidates:
            if (":" in addr[0]) == want_v6 or family_of is None:
                return addr
        return candidates[0] if candidates else None

    def udp_sockets(self) -> list[socket.socket]:
        """The bound UDP sockets (e.g. to watch their receive queues)."""
        out = []
        for proto, _ in self._udp:
            sock = proto.transport.get_extra_info("socket") if proto.transport is not None else None
            if sock is not None:
                out.append(sock)
        return out

    def has_connection(self, flow: Flow) -> bool:
        """Is a TCP/TLS connection for `flow` open (so sending needs no connect)?"""
        return flow in self._connections

    def receive_datagram(self, data: bytes, flow: Flow, *, filtered: bool = False) -> None:
        """Process a datagram from `flow` as the UDP listener does; `filtered`: it has
        passed the datagram filter already (in this process or another)."""
        if not filtered and self._datagram_filter is not None and self._datagram_filter(data, flow):
            return
        self._received(data, flow, stream=False)

    @property
    def transports(self) -> set[str]:
        names = {name for name, _, _ in self._servers}
        return names | {"UDP"} if self._udp else names

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for proto, _ in self._udp:
            if proto.transport is not None:
                proto.transport.close()
        for _, server, _ in self._servers:
            server.close()
        for conn in list(self._connections.values()):
            if conn.transport is not None:
                conn.transport.close()
        for _, server, _ in self._servers:
            await server.wait_closed()
        self._udp.clear()
        self._servers.clear()

    def drop_connections_from(self, address: str) -> int:
        """Close our connections whose local end is `address` (an address we no longer
        have: they can only time out); the next message opens a new one. How many."""
        dropped = [c for c in list(self._connections.values())
                   if c.local is not None and c.local[0] == address]
        for conn in dropped:
            self._unregister(conn)
            if conn.transport is not None:
                conn.transport.close()
        return len(dropped)

    # -- sending ----------------------------------------------------------------------
    def try_send(self, message: Request | Response, flow: Flow) -> bool:
        """Send at once if no connection must be opened first; False means use send()."""
        if not is_ip(flow.host):  # names are resolved above us (transport/resolve.py)
            raise OSError(f"cannot send to {flow.host}: a host name, not an address")
        if flow.transport == "UDP":
            proto = self._udp_for(flow.host)
            if proto.transport is None or proto.transport.is_closing():
                raise OSError("UDP listener closed")
            data = self._serialise(message, flow)
            proto.transport.sendto(data, (flow.host, flow.port))
            return True
        conn = self._connections.get(flow)
        if conn is None:
            return False
        conn.write(self._serialise(message, flow))
        return True

    async def send(self, message: Request | Response, flow: Flow) -> None:
        if not self.try_send(message, flow):
            conn = await self._connect(flow)
            conn.write(self._serialise(message, flow))

    # -- keep-alives and STUN -------------------------------------------------------------
    async def keep_alive(self, flow: Flow, interval: float = KEEPALIVE_INTERVAL) -> None:
        """Keep `flow` (to our SIP server) open through NATs until cancelled (RFC 5626
        §4.4): over UDP a STUN Binding request every `interval` seconds, whose answer
        also updates `public_address`; over TCP/TLS a double CRLF on the connection,
        while it is open (a keep-alive never opens one)."""
        while True:
            await asyncio.sleep(interval)  # the request that made the flow just refreshed it
            try:
                if flow.transport == "UDP":
                    await self.stun_binding(flow, timeout=min(STUN_TIMEOUT, interval))
                else:
                    conn = self._connections.get(flow)
                    if conn is None:
                        log.debug("keep-alive to %s: no connection, none opened for it", flow)
                    else:
                        conn.write(b"\r\n\r\n")
            except (OSError, asyncio.TimeoutError) as exc:
                log.debug("keep-alive to %s: %s", flow, exc or "no answer")

    async def stun_binding(self, flow: Flow, timeout: float = STUN_TIMEOUT) -> tuple[str, int]:
        """Our address as the STUN server at `flow` (UDP, usually our SIP server) sees it,
        asked from our SIP port. Raises asyncio.TimeoutError without an answer."""
        transaction_id, request = stun.binding_request()
        future: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
        self._stun_pending[transaction_id] = (flow, future)
        try:
            proto = self._udp_for(flow.host)
            if proto.transport is None or proto.transport.is_closing():
                raise OSError("UDP listener closed")
            proto.transport.sendto(request, (flow.host, flow.port))
            async with asyncio.timeout(timeout):
                return await future
        finally:
            del self._stun_pending[transaction_id]

    def _stun_received(self, data: bytes, flow: Flow) -> None:
        answer = stun.mapped_address(data)
        if answer is not None:
            pending = self._stun_pending.get(answer[0])
            if pending is not None and pending[0] == flow and not pending[1].done():
                if self.public_address.get(flow) != answer[1]:
                    log.info("%s sees us as %s:%d", flow, *answer[1])
                    self.public_address[flow] = answer[1]
                pending[1].set_result(answer[1])
            return
        if self.stun_server:
            response = stun.binding_response(data, (flow.host, flow.port))
            if response is not None:
                proto = self._udp_for(flow.host)
                if proto.transport is not None and not proto.transport.is_closing():
                    proto.transport.sendto(response, (flow.host, flow.port))

    @staticmethod
    def _serialise(message: Request | Response, flow: Flow) -> bytes:
        data = message.to_bytes()
        if trace.isEnabledFor(logging.DEBUG):
            trace.debug("send to %s:\n%s", flow, redact(data))
        return data

    def _udp_for(self, host: str) -> _Datagram:
        want_v6 = ":" in host
        for proto, addr in self._udp:
            if (":" in addr[0]) == want_v6:
                return proto
        raise OSError(f"no UDP listener for the address family of {host}")

    async def _connect(self, flow: Flow) -> _Connection:
        pending = self._connecting.get(flow)
        if pending is not None:
            return await pending
        fut: asyncio.Future[_Connection] = asyncio.get_running_loop().create_future()
        self._connecting[flow] = fut
        try:
            context, name = None, None
            if flow.transport == "TLS":
                context = self._client_tls or ssl.create_default_context()
                name = self._tls_names.get((flow.host, flow.port))
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self, flow.transport, True), flow.host, flow.port,
                    ssl=context, server_hostname=name)
            # Outbound connections are indexed by the target we asked for.
            self._connections[flow] = conn
            fut.set_result(conn)
            return conn
        except BaseException as exc:
            fut.set_exception(OSError(f"cannot connect to {flow}: {exc}"))
            fut.exception()  # retrieved: waiters re-raise it
            raise OSError(f"cannot connect to {flow}: {exc}") from exc
        finally:
            del self._connecting[flow]

    # -- receiving --------------------------------------------------------------------
    def _register(self, conn: _Connection) -> None:
        assert conn.flow is not None
        self._connections.setdefault(conn.flow, conn)

    def _unregister(self, conn: _Connection) -> None:
        for flow, c in list(self._connections.items()):
            if c is conn:
                del self._connections[flow]

    def _received(self, data: bytes, flow: Flow, *, stream: bool) -> None:
        if not stream:
            if stun.is_stun(data):
                self._stun_received(data, flow)
                return
            if data.strip(b"\r\n") == b"":
                return  # RFC 5626 keep-alive
        if trace.isEnabledFor(logging.DEBUG):
            trace.debug("received from %s:\n%s", flow, redact(data))
        try:
            message = parse_message(data, limits=self.limits, stream=stream)
        except ParseError as exc:
            self._reject(exc, flow)
            return
        if isinstance(message, Request):
            try:
                stamp_received(message, flow)
            except ParseError as exc:
                self._reject(exc, flow)
                return
        try:
            self._on_message(Inbound(message, flow, data))
        except Exception:  # a bug above must not kill the listener
            log.exception("error handling a message from %s", flow)

    def _reject(self, exc: ParseError, flow: Flow) -> None:
        partial = exc.partial
        if isinstance(partial, Request) and partial.method != "ACK":
            try:
                stamp_received(partial, flow)
                response = make_response(partial, exc.status, f"Bad Request ({exc.reason})"
                                         if exc.status == 400 else None)
                target = response_target(response, flow)
                asyncio.ensure_future(self._send_quietly(response, target))
                log.info("answered %d to a malformed %s from %s: %s",
                         exc.status, partial.method, flow, exc.reason)
                return
            except (ParseError, ValueError):
                pass
        log.info("dropped a malformed message from %s: %s", flow, exc.reason)

    async def _send_quietly(self, message: Request | Response, flow: Flow) -> None:
        try:
            await self.send(message, flow)
        except OSError as exc:
            log.debug("could not send to %s: %s", flow, exc)

    async def _reap_idle(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(30.0, self.idle_timeout / 2))
            cutoff = loop.time() - self.idle_timeout
            for conn in list(set(self._connections.values())):
                if conn.last_activity < cutoff and conn.transport is not None:
                    log.debug("closing idle connection %s", conn.flow)
                    conn.transport.close()
