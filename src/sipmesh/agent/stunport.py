"""STUN on a UDP port another program owns: ICE checks on a mesh's WireGuard port.

A mesh member (apps/mesh.py) runs one wireguard-go per network on one UDP port for all its
peers, for as long as it is in the network; each peer's path is checked with ICE while
the port serves the others. The checks must leave from that very port (a NAT maps the
5-tuple the checks open, and WireGuard must then use exactly that one), so they cannot
bind it: a raw socket sends and receives them instead (research/mesh-design.md §1, what
NetBird's kernel mode and stunmesh-go do):

- receiving: a raw IPv4 UDP socket per host address with a classic BPF filter that passes
  only datagrams to the port whose payload carries STUN's magic cookie. Raw sockets get
  copies: wireguard-go still gets them too, and drops them (not WireGuard messages);
- sending: the same socket writes the UDP header itself, source port = the port; the
  kernel adds the IP header, and conntrack/NAT treat the datagram like wireguard-go's own
  (same 5-tuple, same mapping: measured in the research note's lab).

`SharedPort.transport(address)` gives one ICE session a transport on the port, for aioice's
``StunProtocol`` (``sendto``, ``close``, ``get_extra_info``); agent/ice.py uses it instead of
binding when an ``IceSession`` is given a shared port. Requests are handed to the session
whose ICE username they name (``USERNAME`` is "OURS:THEIRS", RFC 8445 §7.2.2), responses
to every session of the address (each knows its own transaction ids, others ignore them).

Needs CAP_NET_RAW (as FlowWatch in agent/handover.py); IPv4 only.
"""

from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import logging
import socket
import struct
from typing import Any

from aioice import stun

__all__ = ["SharedPort", "attach_filter"]

log = logging.getLogger("sipmesh.agent.stunport")

SO_ATTACH_FILTER = 26
COOKIE = 0x2112A442
MAX_DATAGRAM = 2048

# Classic BPF on a raw IPv4 UDP socket (the packet starts at the IP header): pass datagrams
# to PORT whose payload starts like a STUN message (the magic cookie at offset 4).
_STUN_TO_PORT = [
    (0xB1, 0, 0, 0),         # ldxb 4*([0]&0xf)     IP header length
    (0x48, 0, 0, 2),         # ldh [x+2]            destination port
    (0x15, 0, 3, 0),         # jeq #PORT            else drop
    (0x40, 0, 0, 12),        # ld [x+12]            UDP header (8) + 4: the magic cookie
    (0x15, 0, 1, COOKIE),    # jeq #COOKIE          else drop
    (0x06, 0, 0, MAX_DATAGRAM),   # ret: the datagram
    (0x06, 0, 0, 0),         # ret #0
]


def attach_filter(sock: socket.socket, program: list[tuple[int, int, int, int]]) -> Any:
    """Attach a classic BPF `program` ((code, jt, jf, k) each) to `sock`; returns the buffer
    the kernel copied it from."""
    buffer = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *insn) for insn in program))
    fprog = struct.pack("HL", len(program), ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    return buffer


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_datagram(source: tuple[str, int], destination: tuple[str, int], payload: bytes) -> bytes:
    """A UDP header (checksum over the IPv4 pseudo-header) and `payload`."""
    length = 8 + len(payload)
    pseudo = (socket.inet_aton(source[0]) + socket.inet_aton(destination[0])
              + struct.pack("!BBH", 0, socket.IPPROTO_UDP, length))
    header = struct.pack("!HHHH", source[1], destination[1], length, 0)
    check = _checksum(pseudo + header + payload) or 0xFFFF
    return struct.pack("!HHHH", source[1], destination[1], length, check) + payload


class _Raw:
    """One host address: its raw socket and the sessions' transports on it."""

    def __init__(self, address: str, sock: socket.socket, buffer: Any) -> None:
        self.address = address
        self.sock = sock
        self._filter = buffer
        self.views: list[PortTransport] = []


class PortTransport(asyncio.DatagramTransport):
    """One ICE session's view of the shared port on one address (aioice's transport)."""

    def __init__(self, port: "SharedPort", raw: _Raw) -> None:
        super().__init__()
        self.port = port
        self.raw = raw
        self.protocol: asyncio.DatagramProtocol | None = None
        self._closed = False

    def attach(self, protocol: asyncio.DatagramProtocol) -> None:
        self.protocol = protocol
        self.raw.views.append(self)
        protocol.connection_made(self)

    def sendto(self, data: Any, addr: Any = None) -> None:
        if self._closed or addr is None:
            return
        try:
            if ipaddress.ip_address(addr[0]).version != 4:
                return
            datagram = udp_datagram((self.raw.address, self.port.port), (addr[0], addr[1]),
                                    bytes(data))
            self.raw.sock.sendto(datagram, (addr[0], 0))
        except (OSError, ValueError) as exc:
            if self.protocol is not None:
                self.protocol.error_received(OSError(str(exc)))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "sockname":
            return (self.raw.address, self.port.port)
        return default

    def is_closing(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self in self.raw.views:
            self.raw.views.remove(self)
        if self.protocol is not None:
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()


class SharedPort:
    """STUN on UDP `port` of `addresses` (IPv4) while another program owns the port."""

    def __init__(self, port: int, addresses: tuple[str, ...]) -> None:
        self.port = port
        self.addresses = tuple(a for a in addresses if ipaddress.ip_address(a).version == 4)
        self._raws: dict[str, _Raw] = {}

    def open(self) -> None:
        """Make the raw sockets (OSError: no CAP_NET_RAW, or no such address)."""
        loop = asyncio.get_running_loop()
        program = list(_STUN_TO_PORT)
        program[2] = (0x15, 0, 3, self.port)
        try:
            for address in self.addresses:
                sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
                try:
                    buffer = attach_filter(sock, program)
                    sock.bind((address, 0))
                    sock.setblocking(False)
                except OSError:
                    sock.close()
                    raise
                raw = self._raws[address] = _Raw(address, sock, buffer)
                loop.add_reader(sock.fileno(), self._readable, raw)
        except OSError:
            self.close()
            raise

    def transport(self, address: str) -> PortTransport:
        raw = self._raws.get(address)
        if raw is None:
            raise OSError(f"no STUN socket on {address}:{self.port}")
        return PortTransport(self, raw)

    def _readable(self, raw: _Raw) -> None:
        for _ in range(64):
            try:
                packet, _ = raw.sock.recvfrom(MAX_DATAGRAM + 60)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("STUN socket on %s: %s", raw.address, exc)
                return
            self._dispatch(raw, packet)

    def _dispatch(self, raw: _Raw, packet: bytes) -> None:
        if len(packet) < 20 + 8 + 20:
            return
        ihl = (packet[0] & 0x0F) * 4
        source = socket.inet_ntoa(packet[12:16])
        sport, dport = struct.unpack("!HH", packet[ihl:ihl + 4])
        if dport != self.port:
            return
        data = packet[ihl + 8:]
        try:
            message = stun.parse_message(data)
        except ValueError:
            return
        addr = (source, sport)
        if message.message_class == stun.Class.REQUEST:
            username = message.attributes.get("USERNAME")
            ours = username.split(":", 1)[0] if isinstance(username, str) else None
            views = [v for v in raw.views
                     if getattr(getattr(v.protocol, "receiver", None), "local_username", None)
                     == ours]
        else:
            views = list(raw.views)
        for view in views:
            if view.protocol is not None:
                view.protocol.datagram_received(data, addr)

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for raw in self._raws.values():
            for view in list(raw.views):
                view.close()
            try:
                loop.remove_reader(raw.sock.fileno())
            except (ValueError, OSError):
                pass
            raw.sock.close()
        self._raws.clear()
