"""The raw UDP SIP peer of the tests: a socket the test scripts byte by byte, independent of
the transport of the stack under test, to send exactly what a test needs (no ACK, a
retransmitted 2xx, a wrong Via, a hostile SDP) and see exactly what came back.

One class for every test: a coroutine opens it with ``await RawPeer.open()`` and the event
loop reads each datagram as it arrives (``log`` keeps arrival times), then ``await recv()``,
``expect()``, ``final()``, ``request()``; plain code or a thread makes ``RawPeer()`` and reads
with ``recv_blocking()`` / ``expect_blocking()``. What arrives is parsed with the stack's
parser; a datagram that does not parse is logged as an error (which fails a test that
uses ``no_errors_logged``) and dropped, unless the peer is ``lenient``: answers to broken
requests may copy the broken headers, and are then kept as the parser's partial message.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import select
import socket
import time
from typing import Callable, Sequence

from sipmesh.sip.errors import ParseError
from sipmesh.sip.message import Request, Response, make_response, parse_message
from sipmesh.sip.transport import response_target

log = logging.getLogger("tests.peers.raw")

Message = Request | Response
Predicate = Callable[[Message], bool]


class RawPeer:
    """A UDP socket bound to ``host`` (any free port) that sends bytes and parses arrivals."""

    _ids = itertools.count(1)

    def __init__(self, host: str = "127.0.0.1", *, lenient: bool = False, port: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                                  socket.SOCK_DGRAM)
        self.sock.bind((host, port))
        self.sock.setblocking(False)
        self.host, self.port = self.sock.getsockname()[:2]
        self.lenient = lenient
        self.log: list[tuple[float, Message]] = []
        self.inbox: asyncio.Queue[tuple[Message, bytes, tuple]] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    async def open(cls, host: str = "127.0.0.1", *, lenient: bool = False,
                   port: int = 0) -> "RawPeer":
        """A peer whose datagrams the running event loop reads into ``inbox`` as they come."""
        peer = cls(host, lenient=lenient, port=port)
        peer._loop = asyncio.get_running_loop()
        peer._loop.add_reader(peer.sock.fileno(), peer._drain)
        return peer

    # -- addresses
    @property
    def hostport(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    # -- sending
    def send(self, data: bytes | str | Message, addr: tuple) -> None:
        """Send ``data`` as it is; a str has its line ends made CRLF, a message is serialised."""
        if isinstance(data, (Request, Response)):
            data = data.to_bytes()
        elif isinstance(data, str):
            data = data.replace("\r\n", "\n").replace("\n", "\r\n").encode()
        self.sock.sendto(data, addr)

    def reply(self, request: Request, status: int, *, to_tag: str | None = None, body: bytes = b"",
              headers: Sequence[tuple[str, str]] = (), addr: tuple | None = None) -> Response:
        """Answer ``request`` to ``addr``, or else where its Via says (received/rport
        honoured); the response sent."""
        response = make_response(request, status, to_tag=to_tag)
        for name, value in headers:
            response.headers.add(name, value)
        if body:
            response.headers.add("Content-Type", "application/sdp")
            response.body = body
        if addr is None:
            flow = response_target(response)
            addr = (flow.host, flow.port)
        self.send(response, addr)
        return response

    # -- receiving
    def _datagram(self) -> tuple[bytes, tuple] | None:
        """The next datagram waiting in the socket, None if there is none."""
        while True:
            try:
                return self.sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return None
            except ConnectionRefusedError:  # an ICMP error about something sent earlier
                continue

    def _parse(self, data: bytes, addr: tuple) -> tuple[Message, bytes, tuple] | None:
        """The message, logged with its arrival time; None (and an error logged) if it does
        not parse."""
        try:
            message = parse_message(data)
        except ParseError as exc:
            if not (self.lenient and exc.partial is not None):
                log.error("raw peer %s: unparseable datagram from %s (%s): %r",
                          self.hostport, addr, exc, data[:200])
                return None
            message = exc.partial
        self.log.append((time.monotonic(), message))
        return message, data, addr

    def _drain(self) -> None:
        while (datagram := self._datagram()) is not None:
            if (got := self._parse(*datagram)) is not None:
                self.inbox.put_nowait(got)

    async def recv(self, timeout: float = 2.0) -> tuple[Message, tuple]:
        """The next message and where it came from; asyncio.TimeoutError after ``timeout``."""
        assert self._loop is not None, "recv() needs a peer made by RawPeer.open()"
        message, _, addr = await asyncio.wait_for(self.inbox.get(), timeout)
        return message, addr

    async def expect(self, predicate: Predicate, timeout: float = 2.0,
                     what: str = "a message") -> tuple[Message, tuple]:
        """The next message matching ``predicate`` (others are skipped) within ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {what} within {timeout}s; got {[m for _, m in self.log]}")
            try:
                message, addr = await self.recv(remaining)
            except asyncio.TimeoutError:
                continue
            if predicate(message):
                return message, addr

    async def quiet(self, predicate: Predicate, window: float, what: str) -> None:
        """No message matching ``predicate`` arrives within ``window`` seconds; fails the
        moment one does. For what must not happen before a protocol deadline (a
        retransmission interval, Timer M), where no event can prove the absence."""
        try:
            message, _ = await self.expect(predicate, window, what)
        except AssertionError:
            return
        raise AssertionError(f"{what} within {window}s: {message}")

    async def final(self, call_id: str, timeout: float = 3.0, method: str | None = None) -> Response:
        """The first final response for ``call_id`` (and ``method``)."""
        message, _ = await self.expect(is_final(call_id, method), timeout,
                                       what=f"final response for {call_id}")
        assert isinstance(message, Response)
        return message

    async def request(self, method: str | None = None, timeout: float = 3.0) -> Request:
        message, _ = await self.expect(is_request(method), timeout, what=f"{method or 'a'} request")
        assert isinstance(message, Request)
        return message

    def recv_blocking(self, timeout: float = 5.0) -> tuple[Message, tuple] | None:
        """For a peer not read by an event loop: the next message within ``timeout``, or None."""
        assert self._loop is None, "this peer is read by its event loop: await recv()"
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            if not select.select([self.sock], [], [], remaining)[0]:
                break
            datagram = self._datagram()
            if datagram is not None and (got := self._parse(*datagram)) is not None:
                return got[0], got[2]
        return None

    def expect_blocking(self, predicate: Predicate, timeout: float = 5.0,
                        what: str = "a message") -> tuple[Message, tuple]:
        """:meth:`expect` for a peer not read by an event loop."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            got = self.recv_blocking(remaining)
            if got is not None and predicate(got[0]):
                return got
        raise AssertionError(f"no {what} within {timeout}s; got {[m for _, m in self.log]}")

    def close(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()


# -- what a test waits for


def is_request(method: str | None = None) -> Predicate:
    return lambda m: isinstance(m, Request) and (method is None or m.method == method)


def is_response(status: int, method: str | None = None) -> Predicate:
    return lambda m: (isinstance(m, Response) and m.status == status
                      and (method is None or m.cseq[1] == method))


def is_final(call_id: str | None = None, method: str | None = None) -> Predicate:
    return lambda m: (isinstance(m, Response) and m.status >= 200
                      and (call_id is None or m.call_id == call_id)
                      and (method is None or m.cseq[1] == method))


# -- what a test sends


def raw_request(method: str, uri: str, peer: RawPeer, *, call_id: str, cseq: int = 1,
                from_tag: str = "rawtag", to: str | None = None, to_tag: str | None = None,
                branch: str | None = None, via_port: int | None = None, rport: bool = True,
                contact: bool = True, extra: str = "", body: bytes = b"") -> bytes:
    """A request as bytes, from `peer` (its address in Via and Contact)."""
    branch = branch or f"z9hG4bKraw{next(RawPeer._ids)}x{time.monotonic_ns()}"
    host = f"[{peer.host}]" if ":" in peer.host else peer.host
    via = f"SIP/2.0/UDP {host}:{via_port or peer.port};branch={branch}{';rport' if rport else ''}"
    to_value = f"<{to or uri}>" + (f";tag={to_tag}" if to_tag else "")
    lines = [f"{method} {uri} SIP/2.0", f"Via: {via}", "Max-Forwards: 70",
             f"From: <sip:raw@{host}:{peer.port}>;tag={from_tag}", f"To: {to_value}",
             f"Call-ID: {call_id}", f"CSeq: {cseq} {method}"]
    if contact:
        lines.append(f"Contact: <sip:raw@{host}:{peer.port}>")
    if extra:
        lines.extend(extra.strip().splitlines())
    if body:
        lines.append("Content-Type: application/sdp")
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body
