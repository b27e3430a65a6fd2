"""TCP streams carried over the path that ICE checked: QUIC (RFC 9000) on the session's pair.

A session whose application speaks TCP (``forward``, an ``exec`` program that connects to
``{REMOTE_IP}:{PORT}``) cannot simply connect to the peer's address when the peer is behind
a NAT: only the pair that ICE checked is open, and it is UDP, perhaps through a TURN relay.
So sipmesh runs one QUIC connection on that pair, and carries each TCP connection over a
QUIC stream of its own::

    program --TCP--> 127.0.0.1:PORT (sipmesh) ==QUIC stream==> sipmesh --TCP--> program

Why QUIC: reliable, multiplexed, congestion-controlled streams over the one UDP path that
ICE opened; it works through a TURN relay like any datagram; its PINGs keep the NAT
bindings alive; TLS 1.3 is built in, so the peers authenticate each other by the
certificate fingerprints they sent in SDP (``a=fingerprint``, RFC 8122 as DTLS-SRTP uses
it), with no CA. The caller is the QUIC client, the answerer the server; each side asks for
the other's certificate and checks its SHA-256 fingerprint before any stream is carried.

aioquic's ``QuicConnection`` does no I/O: datagrams come from the ICE connection's
``recvfrom`` and go out with its ``sendto`` (anything with those two coroutines will do, as
aioice's ``Connection`` has them), and :class:`StreamTransport` drives its timer. What
sipmesh adds to aioquic, and why:

- Each stream opens with one byte saying what it carries (``OPEN_TCP``): the peer learns of
  a new connection at once, even when the program that connected waits for the other end
  to speak first (SSH, SMTP).
- Bounded buffers both ways. Sending: a TCP connection is no longer read while its
  stream holds more than ``SEND_HIGH`` bytes not yet acknowledged. Receiving: aioquic grants
  flow-control credit as data arrives (doubling its windows), so a program that does not
  read would make us buffer everything its peer sends; here a stream's credit is what its
  TCP connection has taken plus ``STREAM_WINDOW`` (and ``CONNECTION_WINDOW`` for all), so
  a slow reader slows the far writer down. This overrides two aioquic internals
  (``_write_stream_limits``, ``_write_connection_limits``); the dependency is capped below
  aioquic 2 for that reason, and for the client-certificate request below.
- Client certificates: aioquic's server asks for one only in its tests
  (``tls.Context._request_client_certificate``); we set it, so the caller is authenticated too.
- Keep-alive: a PING every ``KEEPALIVE`` s (below conntrack's 30 s for UDP), and the
  connection ends after ``IDLE_TIMEOUT`` s without a packet from the peer; the session
  learns why from :meth:`StreamTransport.wait_closed` and ends with BYE.
- CPU: every datagram costs Python time on both sides, so TCP writes are coalesced while
  data streams in, and aioquic is asked for datagrams after a received one only when it
  may have some (handshake, our data in flight; its ACKs go by its timer).

:class:`StreamPath` is the session's side (agent/sessionpath.py): what agent/handover.py's
`Handover` is for a UDP program, for a TCP one.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import ssl
import struct
from dataclasses import replace
from typing import Protocol

from aioquic.buffer import Buffer
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import MAX_STREAM_DATA_FRAME_CAPACITY, QuicConnection
from aioquic.quic.packet import QuicErrorCode, QuicFrameType, QuicPacketType, pull_quic_header
from aioquic.tls import load_pem_private_key, load_pem_x509_certificates

from sipmesh.agent.certs import HostCertificate, fingerprint
from sipmesh.agent.handover import Handover, UdpEndpoint
from sipmesh.agent.ice import IceSession, PathReport

__all__ = ["ALPN", "CONNECTION_WINDOW", "DATAGRAM_SIZE", "IDLE_TIMEOUT", "KEEPALIVE",
           "MAX_STREAMS", "OPEN_TCP", "SEND_HIGH", "STREAM_WINDOW", "DatagramPath",
           "StreamError", "StreamPath", "StreamTransport"]

log = logging.getLogger("sipmesh.agent.streams")

ALPN = "sipmesh-streams/1"
OPEN_TCP = b"\x01"            # the first byte of a stream that carries a TCP connection
DATAGRAM_SIZE = 1350          # bytes of UDP payload: fits a 1500-byte path through a TURN relay
STREAM_WINDOW = 1 << 20       # bytes a peer may send on a stream beyond what TCP has taken
CONNECTION_WINDOW = 16 << 20  # ... and on all streams together
SEND_HIGH = 1 << 20           # stop reading a TCP connection above this many unacknowledged bytes
SEND_LOW = 256 << 10          # ... and read again below this
TCP_HIGH = 256 << 10          # a TCP connection's write buffer: resume_writing below TCP_LOW
TCP_LOW = 64 << 10
SOCKET_BUFFER = 4 << 20       # bytes of the ICE socket's buffers (capped by net.core.*mem_max)
COALESCE_DELAY = 0.001        # s: while data streams in, TCP writes are this far apart ...
COALESCE_BYTES = 64 << 10     # ... or this big
KEEPALIVE = 5.0               # s between PINGs
IDLE_TIMEOUT = 20.0           # s without a packet from the peer before the connection ends
HANDSHAKE_TIMEOUT = 10.0
MAX_STREAMS = 64              # TCP connections carried at once
CONNECT_TIMEOUT = 10.0        # s to connect to the local program for a stream ...
CONNECT_RETRY = 0.05          # ... retrying a refused connection this often

# application error codes (RFC 9000 §20.2), in RESET_STREAM / STOP_SENDING / CONNECTION_CLOSE
REFUSED = 0x101               # no target here, too many streams, bad first byte
CONNECT_FAILED = 0x102        # the local program did not accept the connection
TCP_ABORTED = 0x103           # the TCP connection was reset
CLOSING = 0x0                 # the session ends

_PEER = ("peer", 0)           # QUIC's idea of the peer's address: the ICE pair is the path


class StreamError(Exception):
    """The stream transport could not be set up (handshake, wrong certificate, timeout)."""


class DatagramPath(Protocol):
    """Where QUIC's datagrams go: aioice's Connection, on its selected pair."""

    async def sendto(self, data: bytes, component: int) -> None: ...

    async def recvfrom(self) -> tuple[bytes, int]: ...


# --------------------------------------------------------------------------- QUIC


class _Connection(QuicConnection):
    """aioquic's connection with client certificates asked for and credit given as the
    local TCP connections take data (see the module doc)."""

    def __init__(self, owner: "StreamTransport", **kwargs) -> None:
        super().__init__(**kwargs)
        self.owner = owner

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        if not self._is_client:
            self.tls._request_client_certificate = True

    @property
    def peer_certificate(self):
        return getattr(self.tls, "_peer_certificate", None) if hasattr(self, "tls") else None

    def _write_connection_limits(self, builder, space) -> None:
        max_data = self._local_max_data
        # what arrived, less what the live TCP connections have not taken yet
        held = 0
        for stream_id, pipe in self.owner.pipes.items():
            stream = self._streams.get(stream_id)
            if stream is not None:
                held += max(0, stream.receiver.highest_offset - pipe.consumed)
        allowed = max_data.used - held + CONNECTION_WINDOW
        if allowed - max_data.value >= CONNECTION_WINDOW // 2:
            max_data.value = allowed
        # aioquic doubles max_data once half of it has arrived; ours follows consumption
        used, max_data.used = max_data.used, 0
        try:
            super()._write_connection_limits(builder, space)
        finally:
            max_data.used = used

    def _write_stream_limits(self, builder, space, stream) -> None:
        if not stream.max_stream_data_local:  # our own unidirectional streams (none here)
            return
        pipe = self.owner.pipes.get(stream.stream_id)
        # no TCP connection behind the stream (any more): its data is dropped
        consumed = pipe.consumed if pipe is not None else stream.receiver.highest_offset
        allowed = consumed + STREAM_WINDOW
        if allowed - stream.max_stream_data_local >= STREAM_WINDOW // 2:
            stream.max_stream_data_local = allowed
        if stream.max_stream_data_local_sent != stream.max_stream_data_local:
            buf = builder.start_frame(QuicFrameType.MAX_STREAM_DATA,
                                      capacity=MAX_STREAM_DATA_FRAME_CAPACITY,
                                      handler=self._on_max_stream_data_delivery,
                                      handler_args=(stream,))
            buf.push_uint_var(stream.stream_id)
            buf.push_uint_var(stream.max_stream_data_local)
            stream.max_stream_data_local_sent = stream.max_stream_data_local

    def unacknowledged(self, stream_id: int | None = None) -> int:
        """Bytes written to a stream (None: to any) and not yet acknowledged by the peer."""
        streams = self._streams.values() if stream_id is None else \
            [self._streams.get(stream_id)]
        return sum(len(stream.sender._buffer) for stream in streams if stream is not None)


# --------------------------------------------------------------------------- one TCP connection


class _Pipe(asyncio.Protocol):
    """One TCP connection and its QUIC stream. Accepted by our listener (``stream_id`` is
    given in connection_made) or made towards our target for a stream the peer opened."""

    def __init__(self, owner: "StreamTransport", stream_id: int | None = None) -> None:
        self.owner = owner
        self.stream_id = stream_id
        self.tcp: asyncio.Transport | None = None
        self.outgoing = bytearray()      # from the peer, not yet written to TCP
        self.outgoing_eof = False
        self.flush_handle: asyncio.TimerHandle | None = None
        self.flushed_at = float("-inf")
        self.base = 0 if stream_id is None else len(OPEN_TCP)  # stream bytes not for TCP
        self.written = 0                 # bytes handed to the TCP connection
        self.fin_sent = False            # TCP -> stream ended
        self.fin_received = False        # stream -> TCP ended
        self.reading = True
        self.done = False

    # -- TCP side (asyncio)
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        if self.done:      # the stream ended while we were connecting
            transport.abort()
            return
        self.tcp = transport
        transport.set_write_buffer_limits(high=TCP_HIGH, low=TCP_LOW)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        if self.stream_id is None:
            if not self.owner._accepted(self):
                transport.abort()
                self.done = True
                return
        self.flush()
        self.owner._wake()

    def data_received(self, data: bytes) -> None:
        if self.done or self.fin_sent:
            return
        quic = self.owner.quic
        assert quic is not None and self.stream_id is not None
        quic.send_stream_data(self.stream_id, data)
        if self.reading and quic.unacknowledged(self.stream_id) > SEND_HIGH:
            self.reading = False
            self.tcp.pause_reading()
            self.owner.paused.add(self)
        self.owner._wake()

    def eof_received(self) -> bool:
        if not self.done and not self.fin_sent:
            self.fin_sent = True
            self.owner.quic.send_stream_data(self.stream_id, b"", end_stream=True)
            self.owner._wake()
            self._maybe_finished()
        return True  # keep our sending half open: the half-close travels

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done:
            self.abort(None if self.fin_sent and self.fin_received else TCP_ABORTED)

    def resume_writing(self) -> None:
        self.owner._wake()  # more credit for the peer

    # -- stream side (from StreamTransport)
    def from_stream(self, data: bytes, end: bool) -> None:
        """Data from the peer. A datagram holds 1.3 kB, and one write per datagram costs
        more than all of QUIC: while data keeps coming, it is written every COALESCE_DELAY
        or COALESCE_BYTES; the first bytes after a pause go at once."""
        self.outgoing += data
        self.outgoing_eof = self.outgoing_eof or end
        if self.tcp is None or self.flush_handle is not None:
            if len(self.outgoing) >= COALESCE_BYTES and self.tcp is not None:
                self.flush()
            return
        loop = self.owner.loop
        if end or len(self.outgoing) >= COALESCE_BYTES or \
                loop.time() - self.flushed_at >= COALESCE_DELAY:
            self.flush()
        else:
            self.flush_handle = loop.call_later(COALESCE_DELAY, self.flush)

    def flush(self) -> None:
        if self.flush_handle is not None:
            self.flush_handle.cancel()
            self.flush_handle = None
        if self.done or self.tcp is None:
            return
        self.flushed_at = self.owner.loop.time()
        if self.outgoing and not self.tcp.is_closing():
            self.tcp.write(bytes(self.outgoing))
            self.written += len(self.outgoing)
            self.outgoing.clear()
        if self.outgoing_eof and not self.fin_received:
            self.fin_received = True
            if not self.tcp.is_closing() and self.tcp.can_write_eof():
                self.tcp.write_eof()
            self._maybe_finished()

    def _maybe_finished(self) -> None:
        if self.fin_sent and self.fin_received and not self.done:
            self.done = True
            self.tcp.close()  # after the write buffer is flushed
            self.owner._forget(self)

    @property
    def consumed(self) -> int:
        """Stream offset up to which the data is out of our hands (into the TCP socket)."""
        if self.tcp is None:
            return self.base
        return self.base + self.written - self.tcp.get_write_buffer_size()

    def acked(self) -> None:
        """Acknowledgements came: read TCP again once the stream's buffer has drained."""
        if self.done:
            self.owner.paused.discard(self)
        elif self.owner.quic.unacknowledged(self.stream_id) < SEND_LOW:
            self.reading = True
            self.tcp.resume_reading()
            self.owner.paused.discard(self)

    def abort(self, code: int | None, *, tell_peer: bool = True) -> None:
        """End both halves now: RST to the program and RESET_STREAM/STOP_SENDING to the
        peer with `code` (None: both halves had ended cleanly, a plain close)."""
        if self.done:
            return
        self.done = True
        if self.flush_handle is not None:
            self.flush_handle.cancel()
        if self.tcp is not None:
            sock = self.tcp.get_extra_info("socket")
            if code is not None and sock is not None:
                try:   # the program sees a reset, not a clean end of its data
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            self.tcp.abort()
        quic = self.owner.quic
        if code is not None and tell_peer and self.stream_id is not None and quic is not None:
            if not self.fin_sent:
                quic.reset_stream(self.stream_id, code)
            if not self.fin_received:
                try:
                    quic.stop_stream(self.stream_id, code)
                except ValueError:
                    pass  # a stream the peer never saw
            self.owner._wake()
        self.owner._forget(self)


# --------------------------------------------------------------------------- the transport


def _grow_socket_buffers(path: DatagramPath) -> None:
    """Give the ICE pair's socket room for a window of datagrams: the kernel's default
    (about 200 kB) overflows while Python catches up, and each drop halves QUIC's rate."""
    pair = getattr(path, "selected", None)   # agent/ice.py's connection names its pair
    transport = getattr(getattr(pair, "protocol", None), "transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        except OSError:
            pass


class StreamTransport:
    """One QUIC connection over a session's path, carrying TCP connections.

    ``await start()`` (handshake, the peer's fingerprint checked), then ``await listen(host,
    port)`` for each local port whose connections go to the peer; streams the peer opens go
    to ``target``. ``await wait_closed()`` says why it ended; ``await close()``."""

    def __init__(self, path: DatagramPath, *, client: bool, certificate: HostCertificate,
                 peer_fingerprint: str, target: tuple[str, int] | None = None,
                 max_streams: int = MAX_STREAMS, idle_timeout: float = IDLE_TIMEOUT,
                 keepalive: float = KEEPALIVE, connect_timeout: float = CONNECT_TIMEOUT) -> None:
        self.path = path
        self.client = client
        self.peer_fingerprint = peer_fingerprint.strip()
        self.target = target
        self.max_streams = max_streams
        self.keepalive = keepalive
        self.connect_timeout = connect_timeout
        self.configuration = QuicConfiguration(
            is_client=client, alpn_protocols=[ALPN], idle_timeout=idle_timeout,
            max_datagram_size=DATAGRAM_SIZE, max_data=CONNECTION_WINDOW,
            max_stream_data=STREAM_WINDOW, verify_mode=ssl.CERT_NONE)
        self.configuration.certificate = load_pem_x509_certificates(
            certificate.cert.read_bytes())[0]
        self.configuration.private_key = load_pem_private_key(certificate.key.read_bytes())
        self.quic: _Connection | None = None
        self.pipes: dict[int, _Pipe] = {}
        self.paused: set[_Pipe] = set()   # TCP connections not read until acks come
        self.streams_carried = 0
        self._highest_peer_stream = -1
        self._servers: list[asyncio.AbstractServer] = []
        self.loop = asyncio.get_running_loop()
        self._established: asyncio.Future[None] = self.loop.create_future()
        self._closed: asyncio.Future[str] = self.loop.create_future()
        self._close_reason: str | None = None   # set when we close
        self._wake_event = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._pings = itertools.count()
        self._tasks: set[asyncio.Future] = set()
        self._keepalive: asyncio.TimerHandle | None = None
        self._receiver: asyncio.Future | None = None

    # -- public
    async def start(self, timeout: float = HANDSHAKE_TIMEOUT) -> None:
        """Run the handshake; raise StreamError if it fails or the peer's certificate is
        not the one its SDP named."""
        _grow_socket_buffers(self.path)
        self._receiver = self._spawn(self._receive_loop())
        self._spawn(self._send_loop())
        if self.client:
            self.quic = _Connection(self, configuration=self.configuration)
            self.quic.connect(_PEER, now=self.loop.time())
            self._wake()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._established)
        except asyncio.TimeoutError:
            self._end(f"no QUIC handshake with the peer within {timeout:g} s")
            await self._stop_tasks()
            raise StreamError(self._closed.result()) from None
        except StreamError:
            await self._stop_tasks()
            raise
        self._keepalive = self.loop.call_later(self.keepalive, self._ping)

    async def listen(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Carry each TCP connection made to host:port over a new stream; the bound port."""
        server = await self.loop.create_server(lambda: _Pipe(self), host, port,
                                                reuse_address=True)
        self._servers.append(server)
        return server.sockets[0].getsockname()[1]

    def repath(self, path: DatagramPath) -> None:
        """Go on over `path` (a session's new ICE pair after a restart, agent/session.py):
        QUIC sees no address change (its peer is always ``_PEER``), its datagrams just
        take the new pair; a PING at once gets what the move lost declared lost and sent
        again without waiting for QUIC's backed-off probe timer."""
        if self._closed.done():
            return
        self.path = path
        _grow_socket_buffers(path)
        if self._receiver is not None:
            self._receiver.cancel()
        self._receiver = self._spawn(self._receive_loop())
        if self.quic is not None:
            self.quic.send_ping(next(self._pings))
            self._wake()

    @property
    def closed(self) -> bool:
        return self._closed.done()

    async def wait_closed(self) -> str:
        """Return, once the connection has ended, why (idle timeout, the peer closed it,
        the path closed)."""
        return await asyncio.shield(self._closed)

    async def close(self, reason: str = "the session ends", timeout: float = 1.0) -> None:
        """Close the connection (the peer is told), every TCP connection and listener."""
        for server in self._servers:
            server.close()
        if not self._closed.done():
            self._close_reason = reason
            if self.quic is not None:   # (aioquic ignores this once the peer closed)
                self.quic.close(error_code=CLOSING, reason_phrase=reason[:100])
                self._wake()
                try:   # the CONNECTION_CLOSE goes out, then aioquic waits 3 PTO to drain
                    async with asyncio.timeout(timeout):
                        await asyncio.shield(self._closed)
                except asyncio.TimeoutError:
                    pass
            self._end(reason)
        await self._stop_tasks()

    # -- the QUIC connection
    async def _receive_loop(self) -> None:
        path = self.path
        while True:
            try:
                data, _ = await path.recvfrom()
            except ConnectionError:
                if path is self.path:   # (not an old path, after a restart)
                    self._end("the ICE path closed")
                return
            if self.quic is None:
                if self.client or not self._first_initial(data):
                    continue
                self.quic = _Connection(self, configuration=self.configuration,
                                        original_destination_connection_id=self._odcid)
            self.quic.receive_datagram(data, _PEER, now=self.loop.time())
            self._events()
            for pipe in list(self.paused):
                pipe.acked()
            # What a datagram may call for at once: handshake messages, or (being
            # acknowledgements) more of our data. ACKs for the peer's data wait for
            # aioquic's ack timer anyway; asking aioquic for datagrams after each of the
            # peer's 1.3-kB datagrams would cost a quarter of the receiver's time.
            if not self._established.done() or self.quic.unacknowledged():
                self._wake()
            else:
                self._arm_timer()

    def _first_initial(self, data: bytes) -> bool:
        try:
            header = pull_quic_header(Buffer(data=data),
                                      host_cid_length=self.configuration.connection_id_length)
        except ValueError:
            return False
        if header.packet_type != QuicPacketType.INITIAL or len(data) < 1200 or \
                header.version not in self.configuration.supported_versions:
            return False
        self._odcid = header.destination_cid
        return True

    async def _send_loop(self) -> None:
        while True:
            await self._wake_event.wait()
            self._wake_event.clear()
            quic = self.quic
            if quic is None:
                continue
            for data, _ in quic.datagrams_to_send(now=self.loop.time()):
                try:
                    await self.path.sendto(data, 1)
                except ConnectionError:
                    self._end("the ICE path closed")
                    return
            self._arm_timer()

    def _wake(self) -> None:
        self._wake_event.set()

    def _arm_timer(self) -> None:
        at = self.quic.get_timer() if self.quic is not None else None
        if at == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self.loop.call_at(at, self._on_timer) if at is not None else None

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        if self.quic is None:
            return
        self.quic.handle_timer(now=self.loop.time())
        self._events()
        self._wake()

    def _ping(self) -> None:
        if self.quic is not None and not self._closed.done():
            self.quic.send_ping(next(self._pings))
            self._wake()
            self._keepalive = self.loop.call_later(self.keepalive, self._ping)

    def _events(self) -> None:
        quic = self.quic
        while (event := quic.next_event()) is not None:
            if isinstance(event, events.HandshakeCompleted):
                self._verify()
            elif isinstance(event, events.ConnectionTerminated):
                self._end(self._termination(event))
            elif not self._established.done() or self._established.exception() is not None:
                continue  # nothing is carried before the peer is known
            elif isinstance(event, events.StreamDataReceived):
                self._stream_data(event.stream_id, event.data, event.end_stream)
            elif isinstance(event, (events.StreamReset, events.StopSendingReceived)):
                pipe = self.pipes.get(event.stream_id)
                if pipe is not None:
                    pipe.abort(event.error_code)

    def _verify(self) -> None:
        cert = self.quic.peer_certificate
        got = fingerprint(cert) if cert is not None else None
        if got is None or got.upper() != self.peer_fingerprint.upper():
            problem = ("the peer's certificate is not the one its SDP named "
                       f"(a=fingerprint:{self.peer_fingerprint}, got {got or 'no certificate'})")
            log.warning("%s: closing the QUIC connection", problem)
            # a transport-level close: its reason survives in a Handshake packet
            self.quic.close(error_code=QuicErrorCode.CONNECTION_REFUSED,
                            frame_type=QuicFrameType.CRYPTO,
                            reason_phrase="certificate fingerprint mismatch")
            self._wake()
            if not self._established.done():
                self._established.set_exception(StreamError(problem))
            return
        log.info("QUIC connection up: the peer's certificate matches its a=fingerprint")
        if not self._established.done():
            self._established.set_result(None)

    def _termination(self, event: events.ConnectionTerminated) -> str:
        if event.reason_phrase == "Idle timeout":
            return (f"the peer stopped answering (no QUIC packet for "
                    f"{self.configuration.idle_timeout:g} s)")
        if self._close_reason is not None:
            return self._close_reason
        text = f"{event.reason_phrase!r}, " if event.reason_phrase else ""
        return f"the peer closed the QUIC connection ({text}code {event.error_code:#x})"

    def _end(self, reason: str) -> None:
        """The connection is over: say why, drop every TCP connection."""
        if self._closed.done():
            return
        log.info("stream transport ended: %s", reason)
        self._closed.set_result(reason)
        if not self._established.done():
            self._established.set_exception(StreamError(reason))
        for server in self._servers:
            server.close()
        for pipe in list(self.pipes.values()):
            pipe.abort(CLOSING, tell_peer=False)   # the programs see their data cut short
        for handle in (self._timer, self._keepalive):
            if handle is not None:
                handle.cancel()
        self._wake()  # the sender flushes a CONNECTION_CLOSE if one is pending

    async def _stop_tasks(self) -> None:
        await asyncio.sleep(0)  # let the sender flush what _end woke it for
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, coroutine) -> asyncio.Future:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- streams
    def _accepted(self, pipe: _Pipe) -> bool:
        """A local program connected to our listener: open a stream for it."""
        quic = self.quic
        if self._closed.done() or quic is None:
            return False
        if len(self.pipes) >= self.max_streams:
            log.warning("more than %d TCP connections over the session: refusing one",
                        self.max_streams)
            return False
        pipe.stream_id = quic.get_next_available_stream_id()
        quic.send_stream_data(pipe.stream_id, OPEN_TCP)
        pipe.base = 0
        self.pipes[pipe.stream_id] = pipe
        self.streams_carried += 1
        return True

    def _stream_data(self, stream_id: int, data: bytes, end: bool) -> None:
        pipe = self.pipes.get(stream_id)
        if pipe is not None:
            pipe.from_stream(data, end)
            return
        ours = (stream_id & 1) == (0 if self.client else 1)
        if ours or stream_id <= self._highest_peer_stream or (stream_id & 2):
            return  # a stream we already ended (its late data), or a unidirectional one
        self._highest_peer_stream = stream_id
        problem = None
        if not data.startswith(OPEN_TCP):
            problem = "a stream that does not start with OPEN_TCP"
        elif self.target is None:
            problem = "a TCP connection from the peer, but we have no target for it"
        elif len(self.pipes) >= self.max_streams:
            problem = f"more than {self.max_streams} TCP connections"
        if problem is not None:
            log.warning("refusing %s", problem)
            self.quic.reset_stream(stream_id, REFUSED)
            self.quic.stop_stream(stream_id, REFUSED)
            return
        pipe = _Pipe(self, stream_id)
        self.pipes[stream_id] = pipe
        self.streams_carried += 1
        pipe.from_stream(data[len(OPEN_TCP):], end)
        self._spawn(self._connect(pipe))

    async def _connect(self, pipe: _Pipe) -> None:
        """Connect the stream to our target; a refused connection is retried until
        `connect_timeout`, because the program may still be starting (both sides start
        theirs once the path is up)."""
        host, port = self.target
        deadline = self.loop.time() + self.connect_timeout
        while not pipe.done:
            try:
                async with asyncio.timeout(max(0.1, deadline - self.loop.time())):
                    await self.loop.create_connection(lambda: pipe, host, port)
                return
            except ConnectionRefusedError as exc:
                if self.loop.time() < deadline:
                    await asyncio.sleep(CONNECT_RETRY)
                    continue
                problem = str(exc)
            except (OSError, asyncio.TimeoutError) as exc:
                problem = str(exc) or "timed out"
            log.warning("cannot connect to %s:%d for the peer: %s", host, port, problem)
            pipe.abort(CONNECT_FAILED)
            return

    def _forget(self, pipe: _Pipe) -> None:
        if self.pipes.get(pipe.stream_id) is pipe:
            del self.pipes[pipe.stream_id]
        self.paused.discard(pipe)


# --------------------------------------------------------------------------- the session's side


class StreamPath(Handover):
    """A session's ICE path carrying its TCP program's connections: what `Handover` is for
    a UDP program, for the session the same (``endpoint``, ``lost()``, ``describe()``,
    ``close()``), except that the path is not handed over: aioice keeps it (its consent
    checks go on) and the stream transport runs on it; after an ICE restart the transport
    goes on over the new pair (``follow``), its TCP connections with it.

    The program's side (``endpoint``, a `UdpEndpoint` whose remote end is on this host):
    the calling program connects to ``remote_ip:remote_port``, where we listen; the
    answering program listens on ``local_port`` (its a=PORT) where each stream is connected."""

    def __init__(self, ice: IceSession, transport: StreamTransport, endpoint: UdpEndpoint) -> None:
        pair = ice.connection.selected
        super().__init__(ice, endpoint, pair.remote_addr if pair else ("?", 0), 0)
        self.transport = transport

    @classmethod
    async def take(cls, ice: IceSession, *, client: bool, certificate: HostCertificate,
                   peer_fingerprint: str, target: tuple[str, int] | None = None,
                   listen: tuple[str, int] | None = None,
                   max_streams: int = MAX_STREAMS) -> "StreamPath":
        """Start the stream transport on `ice`'s chosen pair (``ice.connect()`` returned):
        the caller listens on `listen`, the answerer connects streams to `target`. Raises
        StreamError (the transport is closed again, `ice` is not)."""
        transport = StreamTransport(ice.connection, client=client, certificate=certificate,
                                    peer_fingerprint=peer_fingerprint, target=target,
                                    max_streams=max_streams)
        await transport.start()
        kind = ice.path.kind if ice.path else "direct"
        try:
            if listen is not None:
                host, port = listen
                port = await transport.listen(host, port)
                shown = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
                endpoint = UdpEndpoint(kind, 0, shown, port, proxied=True)
            else:
                endpoint = UdpEndpoint(kind, target[1] if target else 0, "127.0.0.1", 0,
                                       proxied=True)
        except OSError as exc:
            await transport.close(f"cannot listen on {listen}")
            raise StreamError(f"cannot listen on {listen[0]}:{listen[1]}: "
                              f"{exc.strerror or exc}") from None
        log.info("TCP streams over the %s path: %s", kind,
                 f"connections to {endpoint.remote_ip}:{endpoint.remote_port} go to the peer"
                 if listen is not None else f"the peer's connections go to {target}")
        return cls(ice, transport, endpoint)

    async def lost(self) -> str:
        """Return why the path died (the peer went silent or closed, ICE consent
        expired); never returns while it lives."""
        reason = await self.transport.wait_closed()
        if self.ice.consent_expired:
            return "consent lost: the peer stopped answering ICE consent checks"
        return f"the stream transport ended: {reason}"

    def describe(self) -> dict:
        out = super().describe()
        out["streams"] = {"open": len(self.transport.pipes),
                          "carried": self.transport.streams_carried}
        return out

    def follow(self, ice: IceSession) -> "StreamPath":
        """The session's new path after an ICE restart (a move, agent/mobility.py): the
        same QUIC connection, so every TCP connection it carries, goes on over `ice`'s
        pair. This one then holds only its old ICE session, which ``close()`` ends."""
        self.transport.repath(ice.connection)
        kind = ice.path.kind if ice.path else "direct"
        moved = StreamPath(ice, self.transport, replace(self.endpoint, kind=kind))
        self.transport = None
        return moved

    async def close(self) -> None:
        if self.transport is not None:
            await self.transport.close()
        await super().close()
