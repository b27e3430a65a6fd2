"""The UDP path ICE chose, handed to the session's program; and watching it while it runs.

Once ICE (agent/ice.py) has chosen a pair and both sides know it (``IceSession.settle``),
the agent stops checking and gives the path to the program:

direct, or relayed where the relay is the *peer's*
    aioice's host socket is closed and the program binds the same port: the NAT mapping
    the checks opened (or the peer's TURN permission) is exactly the program's 5-tuple.
    No byte of the data passes through sipmesh.
relayed where the relay is *ours* (our local candidate is the TURN allocation)
    a lean proxy: the program's datagrams to 127.0.0.1:PROXY go out as TURN ChannelData
    (RFC 8656 §12) on the allocation's own socket, and ChannelData from the peer comes
    back to the program's port; each wake-up of the event loop drains up to 64 datagrams
    per direction, no task (aioice's own TURN transport starts a task per datagram).
    When both sides relay, both run one.
any path, for a program that must follow moves (``follow``: OpenVPN, whose peer cannot
be changed while it runs)
    the program binds a port of its own and sends to a `LocalEnd` on 127.0.0.1; the agent
    keeps the path's port (a `DirectProxy` on it, or the relay proxy above) and forwards.
    An ICE restart after a move (agent/mobility.py) gives the same local end the new
    path's proxy: the program's port and remote do not change, its datagrams flow on the
    new path. The price: every datagram passes through the agent (as on a relayed path).

The program's contract (what `exec` documents, what tunnel adapters implement):
    bind UDP ``local_port`` (any address, or LOCAL_IP); send to ``remote``; accept what
    comes from there. Datagrams sent before the peer's program is up may be lost: UDP
    programs retry, as they do anyway.

Consent and keepalives (RFC 7675, Linux conntrack: 30 s for a flow seen one way, 120 s
once it was answered):
- until the hand-over, aioice checks consent every 4-6 s;
- after it, nobody sends STUN on the program's port any more (the program would get it).
  The *program* keeps the path alive: it sends at least every ``KEEPALIVE`` (15 s) seconds
  (WireGuard's PersistentKeepalive, OpenVPN's --ping, a heartbeat of an exec program);
- the agent watches the peer's traffic: a raw socket with a classic BPF filter that
  passes only the peer's datagrams to the program's port (copies: the program still gets
  them; at most one read a second), or the proxy's own counters. Once the peer's program
  has sent its first datagram, none for ``consent_timeout`` seconds (30, RFC 7675's) means
  consent is lost: the session ends with BYE and ``Reason: SIP ;cause=408 ;text="consent
  lost: ..."`` (a program that never uses the path, e.g. a TCP one, is never ended by
  this). Without CAP_NET_RAW a direct path is not watched (logged once): liveness is
  then the program's alone;
- our proxy keeps its flow to the TURN server alive by itself (a Binding request when it
  sent nothing for ``KEEPALIVE`` s) and refreshes its channel binding every 5 minutes
  (aioice refreshes the allocation); losing the allocation ends the session too.

The API, for the session (agent/sessionpath.py) and for tunnel adapters (wireguard, openvpn):

    handover = await Handover.take(ice, consent_timeout=30)   # after ice.connect()
    handover.endpoint      # UdpEndpoint: local_port, remote_ip, remote_port, kind, proxied
    ...start the program with handover.endpoint...
    reason = await handover.lost()    # returns only when the path died (consent lost)
    handover.describe()    # for `sipmesh status`: path, pair, rtt, reason, counters
    await handover.close() # stop watching, stop the proxy, delete the TURN allocation

A tunnel that wants the port itself (wireguard-go ``listen-port``, OpenVPN ``--lport``)
binds ``endpoint.local_port`` and points its peer at ``endpoint.remote_ip``:
``endpoint.remote_port``; that is all.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any

from aioice import stun
from aioice.turn import TurnClientProtocol, TurnClientTcpProtocol

from sipmesh.agent.ice import IceSession, PathReport, show_address
from sipmesh.agent.stunport import attach_filter

__all__ = ["CONSENT_TIMEOUT", "KEEPALIVE", "Handover", "LocalEnd", "UdpEndpoint"]

log = logging.getLogger("sipmesh.agent.handover")

KEEPALIVE = 15.0          # s: the program (and our proxy towards TURN) sends at least this often
CONSENT_TIMEOUT = 30.0    # s without a datagram from the peer: consent lost (RFC 7675)
CHANNEL_REFRESH = 300.0   # s: a channel binding lasts 10 min (RFC 8656 §12)
WATCH_INTERVAL = 1.0      # s between two looks at the watch socket

_raw_refused = False      # CAP_NET_RAW missing: said once


@dataclass(frozen=True)
class UdpEndpoint:
    """What a program needs: bind ``local_port``, exchange datagrams with ``remote``."""

    kind: str            # "direct" or "relayed"
    local_port: int
    remote_ip: str
    remote_port: int
    proxied: bool = False   # remote is our relay proxy on 127.0.0.1

    @property
    def remote(self) -> tuple[str, int]:
        return (self.remote_ip, self.remote_port)


class Handover:
    """One session's path after the hand-over (see the module doc). Make it with `take`."""

    def __init__(self, ice: IceSession, endpoint: UdpEndpoint, peer: tuple[str, int],
                 consent_timeout: float) -> None:
        self.ice = ice
        self.endpoint = endpoint
        self.peer = peer                 # the peer's address on the selected pair
        self.report: PathReport = ice.path or PathReport("none", "not connected")
        self.consent_timeout = consent_timeout
        self.proxy: PathProxy | None = None
        self.watch: FlowWatch | None = None
        self._lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def take(cls, ice: IceSession, *, consent_timeout: float = CONSENT_TIMEOUT,
                   follow: bool = False, local: "LocalEnd | None" = None) -> "Handover":
        """Hand `ice`'s chosen path over (``ice.connect()`` has returned). `follow`: the
        program talks to a `LocalEnd` on 127.0.0.1 whatever the path, so that a later
        ICE restart moves the path without telling the program; `local`: that end,
        taken over from the session's previous path (its program keeps sending there)."""
        pair = ice.connection.selected
        assert pair is not None, "no path chosen"
        await ice.settle()
        peer = pair.remote_addr
        kind = ice.path.kind if ice.path else "direct"
        turn = await ice.hand_over()
        made = local is None and (follow or turn is not None)
        if made:
            # the program's port: our host port (the answer's a=PORT), free again now; a
            # direct path's own port stays ours (the proxy's), the program binds another
            local = LocalEnd((ice.host_port if turn is not None else None) or _free_udp_port())
        if local is None:
            endpoint = UdpEndpoint(kind, pair.local_candidate.port, peer[0], peer[1])
            self = cls(ice, endpoint, peer, consent_timeout)
            self.watch = FlowWatch.open(peer, endpoint.local_port) if consent_timeout else None
        else:
            proxy: PathProxy = RelayProxy(turn, peer, local) if turn is not None \
                else DirectProxy(peer, pair.local_candidate.port, local)
            try:
                await proxy.start()
            except BaseException:
                proxy.close()
                if made:
                    local.close()
                await ice.close()
                raise
            if turn is not None:
                # what the peer's program sent to our relay before the proxy took it (a
                # mesh peer's first WireGuard handshake initiation, often): passed on
                early = ice.early_datagrams()
                for data, source in early:
                    proxy.from_peer(data, source)
                if early:
                    log.info("passed on %d datagram(s) the peer sent through our relay "
                             "before the hand-over", len(early))
            endpoint = UdpEndpoint(kind, local.program[1], "127.0.0.1", local.port, proxied=True)
            self = cls(ice, endpoint, peer, consent_timeout)
            self.proxy = proxy
        self._task = asyncio.ensure_future(self._guard())
        log.info("path handed over: program binds %d, sends to %s:%d%s", endpoint.local_port,
                 endpoint.remote_ip, endpoint.remote_port,
                 f" (our {'relay' if turn is not None else 'path'} proxy towards "
                 f"{peer[0]}:{peer[1]})" if endpoint.proxied else "")
        return self

    @property
    def local(self) -> "LocalEnd | None":
        """Where the program sends (a proxied path), for the next path to take over."""
        return self.proxy.local if self.proxy is not None else None

    async def lost(self) -> str:
        """Return why the path died; never returns while it lives."""
        return await asyncio.shield(self._lost)

    @property
    def last_seen(self) -> float | None:
        source = self.proxy or self.watch
        return source.last_seen if source is not None else None

    async def _guard(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            now = time.monotonic()
            if self.proxy is not None and self.proxy.failed is not None:
                self._lose(self.proxy.failed)
                return
            source = self.proxy or self.watch
            if source is None or not self.consent_timeout:
                continue
            source.poll(now)
            seen = source.last_seen
            if seen is not None and now - seen > self.consent_timeout:
                self._lose(f"consent lost: no packet from the peer ({self.peer[0]}:"
                           f"{self.peer[1]}) for {self.consent_timeout:g} s")
                return

    def _lose(self, reason: str) -> None:
        if not self._lost.done():
            log.warning("%s", reason)
            self._lost.set_result(reason)

    def describe(self) -> dict[str, Any]:
        """The path for `sipmesh status` (JSON-able)."""
        seen = self.last_seen
        out: dict[str, Any] = self.report.describe()
        out.update({
            "program": {"local_port": self.endpoint.local_port,
                        "remote": show_address(self.endpoint.remote), "proxied": self.endpoint.proxied},
            "watched": self.proxy is not None or self.watch is not None,
            "last_seen": None if seen is None else round(time.monotonic() - seen, 1),
        })
        if self.proxy is not None:
            out["proxy"] = self.proxy.counters()
        return out

    async def close(self) -> None:
        """Stop watching and proxying; close what ICE still holds (our relay allocation)."""
        if self._task is not None:
            self._task.cancel()
        if self.watch is not None:
            self.watch.close()
        if self.proxy is not None:
            self.proxy.close()
        await self.ice.close()


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------ watching a direct path

# Classic BPF on a raw IPv4 UDP socket (the packet starts at the IP header): pass the first
# 64 bytes of datagrams from the peer's address and port to the program's port.
_BPF = [
    (0x20, 0, 0, 12),   # ld [12]              source address
    (0x15, 0, 6, 0),    # jeq #PEER_IP         else drop
    (0xB1, 0, 0, 0),    # ldxb 4*([0]&0xf)     IP header length
    (0x48, 0, 0, 0),    # ldh [x+0]            source port
    (0x15, 0, 3, 0),    # jeq #PEER_PORT       else drop
    (0x48, 0, 0, 2),    # ldh [x+2]            destination port
    (0x15, 0, 1, 0),    # jeq #LOCAL_PORT      else drop
    (0x06, 0, 0, 64),   # ret #64
    (0x06, 0, 0, 0),    # ret #0
]


def flow_filter(peer: tuple[str, int], local_port: int) -> list[tuple[int, int, int, int]]:
    """The BPF program (code, jt, jf, k) for one flow."""
    program = list(_BPF)
    program[1] = (0x15, 0, 6, int(ipaddress.IPv4Address(peer[0])))
    program[4] = (0x15, 0, 3, peer[1])
    program[6] = (0x15, 0, 1, local_port)
    return program


class FlowWatch:
    """Sees whether the peer's datagrams still arrive at the program's port, without
    taking them from the program (raw sockets get copies)."""

    def __init__(self, sock: socket.socket, filter_buffer: Any) -> None:
        self.sock = sock
        self._filter = filter_buffer     # the kernel copied it; kept for clarity
        self.last_seen: float | None = None
        self.packets = 0

    @classmethod
    def open(cls, peer: tuple[str, int], local_port: int) -> "FlowWatch | None":
        global _raw_refused
        try:
            if ipaddress.ip_address(peer[0]).version != 4:
                log.info("IPv6 path: not watched (liveness is the program's)")
                return None
            sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
        except PermissionError:
            if not _raw_refused:
                _raw_refused = True
                log.warning("no CAP_NET_RAW: direct paths are not watched (consent loss is "
                            "then seen only by the program)")
            return None
        try:
            buffer = attach_filter(sock, flow_filter(peer, local_port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            watch = cls(sock, buffer)
            watch.drain()          # what queued before the filter was attached
            watch.last_seen = None
            watch.packets = 0
            return watch
        except OSError as exc:
            sock.close()
            log.warning("cannot watch the path: %s", exc)
            return None

    def drain(self) -> int:
        n = 0
        for _ in range(256):
            try:
                self.sock.recv(128)
            except (BlockingIOError, InterruptedError):
                break
            n += 1
        return n

    def poll(self, now: float) -> None:
        seen = self.drain()
        if seen:
            self.packets += seen
            self.last_seen = now

    def close(self) -> None:
        self.sock.close()


# ------------------------------------------------------------------ the relay proxy


DRAIN = 64   # datagrams read per wake-up, per direction (one event-loop pass each)


def drain(sock: socket.socket, handle: Any) -> None:
    """Read what is queued on non-blocking `sock`, at most DRAIN datagrams, calling
    ``handle(data, addr)`` for each. One wake-up of the event loop then moves a burst of a
    tunnel's datagrams instead of one: about 40 % less CPU per datagram at full rate, and
    the relayed path's throughput grows with it. Bounded, so the other direction (and the
    rest of the agent) get their turn."""
    for _ in range(DRAIN):
        try:
            data, addr = sock.recvfrom(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:     # an ICMP error queued by an earlier send: it is consumed
            log.debug("relay proxy: %s", exc)
            continue
        handle(data, addr)


class LocalEnd:
    """127.0.0.1:PORT, where a proxied program sends its datagrams for the peer: the agent
    forwards them on the session's current path (`far`, a proxy) and hands the peer's to
    the program. An ICE restart (agent/mobility.py) gives the end a new `far` while the
    program keeps its port and its remote: it follows a move without being told. The end
    closes with the last proxy that used it."""

    def __init__(self, program_port: int) -> None:
        self.program: tuple[str, int] = ("127.0.0.1", program_port)   # until it first sends
        self.far: PathProxy | None = None
        self._loop = asyncio.get_running_loop()
        sock = self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        self.port = int(sock.getsockname()[1])
        self._loop.add_reader(sock, drain, sock, self._from_program)
        self.closed = False

    def _from_program(self, data: bytes, addr: tuple[str, int]) -> None:
        if addr[0] != "127.0.0.1" or self.far is None:
            return
        self.program = addr          # the program's socket, wherever it bound
        self.far.to_peer(data)

    def to_program(self, data: bytes) -> bool:
        try:
            self.sock.sendto(data, self.program)
        except OSError:              # the program is not (yet) listening, or its buffer is full
            return False
        return True

    def release(self, proxy: "PathProxy") -> None:
        """`proxy` stops: the end closes unless a newer path's proxy took it over."""
        if self.far is proxy:
            self.close()

    def close(self) -> None:
        self.far = None
        if not self.closed:
            self.closed = True
            self._loop.remove_reader(self.sock)
            self.sock.close()


class PathProxy:
    """One path's far side of a `LocalEnd`: counts what passes (the consent watch reads
    `last_seen`), says why it `failed`."""

    kind = "path"    # what `sipmesh status` calls it

    def __init__(self, peer: tuple[str, int], local: LocalEnd) -> None:
        self.peer = peer
        self.local = local
        self.last_seen: float | None = None   # a datagram from the peer
        self.last_sent = time.monotonic()      # anything towards the path
        self.failed: str | None = None
        self.rx = self.tx = self.rx_bytes = self.tx_bytes = 0

    async def start(self) -> None:
        """Take the path; from now on the local end's datagrams go this way."""
        self.local.far = self

    def to_peer(self, data: bytes) -> None:
        raise NotImplementedError

    def sent(self, data: bytes) -> None:
        self.tx += 1
        self.tx_bytes += len(data)
        self.last_sent = time.monotonic()

    def from_peer(self, data: bytes, addr: tuple[str, int]) -> None:
        """peer -> program"""
        if addr[:2] != self.peer or self.local.far is not self \
                or not self.local.to_program(data):
            return
        self.rx += 1
        self.rx_bytes += len(data)
        self.last_seen = time.monotonic()

    def poll(self, now: float) -> None:
        """(The proxy counts as datagrams arrive: nothing to do.)"""

    def counters(self) -> dict[str, Any]:
        return {"port": self.local.port, "kind": self.kind,
                "to_peer": {"packets": self.tx, "bytes": self.tx_bytes},
                "from_peer": {"packets": self.rx, "bytes": self.rx_bytes}}

    def close(self) -> None:
        self.local.release(self)


class DirectProxy(PathProxy):
    """program <-> `LocalEnd` <-> a UDP socket on the checked path's own port <-> the peer
    (its host or reflexive address, or its relay): what a program that must follow moves
    (OpenVPN) gets on a path that does not start at our relay. The socket binds the port
    aioice's host socket had, so the NAT mappings the checks opened are the proxy's."""

    def __init__(self, peer: tuple[str, int], port: int, local: LocalEnd) -> None:
        super().__init__(peer, local)
        self.port = port
        self.sock: socket.socket | None = None

    async def start(self) -> None:
        v6 = ":" in self.peer[0]
        sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            sock.bind(("::" if v6 else "0.0.0.0", self.port))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock, drain, sock, self.from_peer)
        await super().start()

    def to_peer(self, data: bytes) -> None:
        if self.sock is None:
            return
        try:
            self.sock.sendto(data, self.peer)
        except OSError:              # a full buffer or an ICMP error: UDP, the datagram is lost
            return
        self.sent(data)

    def close(self) -> None:
        if self.sock is not None:
            self._loop.remove_reader(self.sock)
            self.sock.close()
            self.sock = None
        super().close()


class RelayProxy(PathProxy):
    """program <-> 127.0.0.1:PORT <-> ChannelData on our TURN allocation <-> the peer.

    Both directions are read with `drain` from the event loop's reader callbacks. Over
    UDP the proxy reads the allocation's socket itself (aioice's transport pauses reading
    meanwhile): our channel's ChannelData goes straight to the program, everything else
    (STUN responses to aioice's refreshes, data indications) to aioice as before. Over TCP
    aioice parses the stream and hands us the payloads (`from_peer`)."""

    kind = "relay"

    def __init__(self, turn: TurnClientProtocol, peer: tuple[str, int], local: LocalEnd):
        super().__init__(peer, local)
        self.turn = turn
        self.tcp = isinstance(turn, TurnClientTcpProtocol)
        self.channel = 0
        self.relay_sock: socket.socket | None = None  # the allocation's socket (UDP), a dup
        self._tasks: list[asyncio.Task[None]] = []
        self._header = struct.Struct("!HH")

    async def start(self) -> None:
        """Take the allocation's traffic."""
        turn = self.turn
        channel = turn.peer_to_channel.get(self.peer)
        if channel is None:     # the checks bind one; a path learnt otherwise may lack it
            channel = turn.channel_number
            turn.channel_number += 1
            await turn.channel_bind(channel, self.peer)
            turn.channel_to_peer[channel] = self.peer
            turn.peer_to_channel[self.peer] = channel
        self.channel = channel
        self._frame = self._header.pack(channel, 0)[:2]
        loop = self._loop = asyncio.get_running_loop()
        turn.receiver = _FromRelay(self)   # aioice hands ChannelData payloads to its receiver
        if not self.tcp:
            transport = turn.transport
            assert transport is not None
            transport.pause_reading()   # type: ignore[attr-defined]
            # a second descriptor of the same socket: the loop refuses a transport's own fd
            self.relay_sock = transport.get_extra_info("socket").dup()
            self.relay_sock.setblocking(False)
            loop.add_reader(self.relay_sock, drain, self.relay_sock, self.from_relay)
        self._tasks = [asyncio.ensure_future(self._keepalive()),
                       asyncio.ensure_future(self._refresh_channel())]
        await super().start()

    # program -> peer
    def to_peer(self, data: bytes) -> None:
        if self.failed is not None:
            return
        frame = self._header.pack(self.channel, len(data)) + data
        if self.relay_sock is not None:
            try:
                self.relay_sock.send(frame)
            except OSError:          # a full buffer or an ICMP error: UDP, the datagram is lost
                return
        else:
            pad = -len(frame) % 4
            self.turn.transport.write(frame + bytes(pad) if pad else frame)  # type: ignore[union-attr]
        self.sent(data)

    # the allocation's socket (UDP): our channel's data to the program, the rest to aioice
    def from_relay(self, data: bytes, addr: tuple[str, int]) -> None:
        if data[:2] == self._frame and len(data) >= 4:
            length = self._header.unpack_from(data)[1]
            if len(data) >= 4 + length:
                self.from_peer(data[4:4 + length], self.peer)
            return
        self.turn.datagram_received(data, addr)

    def relay_lost(self, exc: Exception | None) -> None:
        self.failed = f"the relay allocation was lost ({exc or 'the TURN server closed it'})"

    async def _keepalive(self) -> None:
        """Keep our flow to the TURN server alive when the program is quiet."""
        while True:
            await asyncio.sleep(KEEPALIVE / 3)
            if time.monotonic() - self.last_sent >= KEEPALIVE:
                self.turn.send_stun(stun.Message(stun.Method.BINDING, stun.Class.REQUEST),
                                    self.turn.server)
                self.last_sent = time.monotonic()

    async def _refresh_channel(self) -> None:
        while True:
            await asyncio.sleep(CHANNEL_REFRESH)
            try:
                await self.turn.channel_bind(self.channel, self.peer)
            except (stun.TransactionError, ConnectionError, OSError) as exc:
                self.failed = f"the relay refused to renew our channel to the peer ({exc})"
                return

    def close(self) -> None:
        """Stop proxying; aioice reads the allocation's socket again (to delete it)."""
        for task in self._tasks:
            task.cancel()
        if self.relay_sock is not None:
            self._loop.remove_reader(self.relay_sock)
            self.relay_sock.close()
            transport = self.turn.transport
            if transport is not None and not transport.is_closing():
                transport.resume_reading()   # type: ignore[attr-defined]
        self.relay_sock = None
        super().close()


class _FromRelay:
    """What aioice's TURN client calls with the relayed datagrams (its `receiver`)."""

    def __init__(self, proxy: RelayProxy) -> None:
        self.datagram_received = proxy.from_peer

        def lost(exc: Exception | None) -> None:
            proxy.relay_lost(exc)
        self.connection_lost = lost

    def error_received(self, exc: Exception) -> None:
        log.debug("relay send failed: %s", exc)
