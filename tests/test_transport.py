"""The transport layer over real sockets on 127.0.0.1 and ::1 (RFC 3261 §18, RFC 3581).

Every address used here is a loopback address; a Via naming another host names
127.0.0.2, so that even a routing bug could not send anything off the machine.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Callable

import pytest

from sipmesh.sip.errors import ParseError
from sipmesh.sip.message import Limits, Request, Response, make_response, parse_message
from sipmesh.sip.transport.framing import StreamFramer
from sipmesh.sip.transaction.layer import ServerTransaction, TransactionLayer
from sipmesh.sip.transport import UDP_SIZE_THRESHOLD, Flow, Inbound, TransportLayer, response_target
from tests.lab import ipv6_loopback, wait_for_async
from tests.peers.raw import RawPeer

pytestmark = pytest.mark.timeout(60)


HOSTS = ["127.0.0.1", pytest.param("::1", marks=pytest.mark.skipif(
    not ipv6_loopback(), reason="no IPv6 loopback"))]


def bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def options(via: str, *, call_id: str = "call-1", cseq: str = "1 OPTIONS", method: str = "OPTIONS",
            branch: str = "z9hG4bK-t1", extra: str = "", body: bytes = b"") -> bytes:
    head = (f"{method} sip:server@127.0.0.1 SIP/2.0\r\n"
            f"Via: {via};branch={branch}\r\n"
            "Max-Forwards: 70\r\n"
            "From: <sip:client@127.0.0.1>;tag=c1\r\n"
            "To: <sip:server@127.0.0.1>\r\n"
            f"Call-ID: {call_id}\r\n"
            f"CSeq: {cseq}\r\n"
            f"{extra}"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def lenient(data: bytes) -> Request | Response:
    """Parse an answer; one to a broken request may copy its broken headers."""
    try:
        return parse_message(data)
    except ParseError as exc:
        assert exc.partial is not None, exc.reason
        return exc.partial


class Inbox:
    """Messages a TransportLayer delivered, with their flows."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[Request | Response, Flow]] = asyncio.Queue()

    def __call__(self, inbound: Inbound) -> None:
        self.queue.put_nowait((inbound.message, inbound.flow))

    async def get(self, timeout: float = 5.0) -> tuple[Request | Response, Flow]:
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def next_is(self, call_id: str) -> None:
        """The next message delivered is the one with `call_id`: nothing came before it."""
        got, _ = await self.get()
        assert got.headers.get("Call-ID") == call_id, got


class Echo(Inbox):
    """Answers every request but ACK with 200 (stateless, through `response_target`)."""

    layer: TransportLayer

    def __call__(self, inbound: Inbound) -> None:
        super().__call__(inbound)
        message, flow = inbound.message, inbound.flow
        if isinstance(message, Request) and message.method != "ACK":
            response = make_response(message, 200, to_tag="srv")
            asyncio.ensure_future(self.layer.send(response, response_target(response, flow)))


@pytest.fixture
async def layers():
    """Factory of TransportLayers, all closed after the test."""
    made: list[TransportLayer] = []

    def make(handler: Callable | None = None, **kwargs) -> TransportLayer:
        handler = handler if handler is not None else Inbox()
        layer = TransportLayer(handler, **kwargs)
        if isinstance(handler, Echo):
            handler.layer = layer
        made.append(layer)
        return layer

    yield make
    for layer in made:
        await layer.close()


async def next_message(peer: RawPeer, timeout: float = 5.0) -> Request | Response:
    """The next message a raw peer received (opened `lenient`: an answer to a broken
    request may copy its broken headers)."""
    message, _ = await peer.recv(timeout)
    return message


async def raw_tcp(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(host, port)


async def read_messages(reader: asyncio.StreamReader, count: int = 1, timeout: float = 5.0) -> list[bytes]:
    framer, out = StreamFramer(), []
    while len(out) < count:
        data = await asyncio.wait_for(reader.read(65536), timeout)
        if not data:
            break
        out.extend(framer.feed(data))
    return out


# -- TLS material ------------------------------------------------------------------------------

# -- round trips -----------------------------------------------------------------------------------

@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("transport", ["UDP", "TCP", "TLS"])
async def test_round_trip(layers, tls_contexts, transport: str, host: str) -> None:
    server_ctx, client_ctx = tls_contexts
    echo = Echo()
    server = layers(echo)
    server_host, server_port = await server.listen(
        transport, host, 0, ssl_context=server_ctx if transport == "TLS" else None)
    client_inbox = Inbox()
    client = layers(client_inbox)
    client.set_client_tls(client_ctx)
    client_port = 0
    if transport == "UDP":
        _, client_port = await client.listen("UDP", host, 0)
    request = parse_message(options(f"SIP/2.0/{transport} {bracket(host)}:{client_port or 5060};rport",
                                    body=b"\x00\xffbinary body"))
    await client.send(request, Flow(transport, server_host, server_port))

    got, flow = await echo.get()
    assert isinstance(got, Request) and got.method == "OPTIONS" and got.body == b"\x00\xffbinary body"
    assert flow.transport == transport and flow.host == host
    assert got.via.received is None or got.via.received == host
    assert got.via.rport == flow.port  # RFC 3581: filled in with the source port

    answer, answer_flow = await client_inbox.get()
    assert isinstance(answer, Response) and answer.status == 200 and answer.to.tag == "srv"
    assert answer.headers.get("Call-ID") == "call-1"
    assert answer_flow.transport == transport


async def test_received_and_rport_are_stamped(layers, raw_peers) -> None:
    inbox = Inbox()
    server = layers(inbox)
    host, port = await server.listen("UDP", "127.0.0.1", 0)
    peer = await raw_peers(lenient=True)
    peer.send(options("SIP/2.0/UDP 127.0.0.2:5099;rport"), (host, port))
    request, flow = await inbox.get()
    via = request.via
    assert (via.host, via.port) == ("127.0.0.2", 5099)
    assert via.received == "127.0.0.1" and via.rport == peer.port == flow.port
    # Without rport only received is added; a sent-by equal to the source gets nothing.
    peer.send(options("SIP/2.0/UDP 127.0.0.2:5099", branch="z9hG4bK-t2"), (host, port))
    request, _ = await inbox.get()
    assert request.via.received == "127.0.0.1" and "rport" not in request.via.params
    peer.send(options(f"SIP/2.0/UDP 127.0.0.1:{peer.port}", branch="z9hG4bK-t3"),
              (host, port))
    request, _ = await inbox.get()
    assert "received" not in request.via.params


async def test_response_is_routed_by_received_and_rport(layers, raw_peers) -> None:
    server = layers(Echo())
    host, port = await server.listen("UDP", "127.0.0.1", 0)
    peer = await raw_peers(lenient=True)
    # The Via names 127.0.0.2:5099; only received/rport lead the answer back to us.
    peer.send(options("SIP/2.0/UDP 127.0.0.2:5099;rport"), (host, port))
    answer = await next_message(peer)
    assert isinstance(answer, Response) and answer.status == 200
    assert answer.via.received == "127.0.0.1" and answer.via.rport == peer.port


async def test_response_without_rport_goes_to_the_sent_by_port(layers, raw_peers) -> None:
    server = layers(Echo())
    host, port = await server.listen("UDP", "127.0.0.1", 0)
    peer = await raw_peers(lenient=True)
    listener = await raw_peers(lenient=True)
    # §18.2.2: received address, port from sent-by (no rport requested).
    peer.send(options(f"SIP/2.0/UDP 127.0.0.2:{listener.port}"), (host, port))
    answer = await next_message(listener)
    assert answer.status == 200 and answer.via.received == "127.0.0.1"
    assert peer.inbox.empty()


# -- connections ---------------------------------------------------------------------------------

async def test_tcp_connection_is_reused(layers) -> None:
    echo = Echo()
    server = layers(echo)
    host, port = await server.listen("TCP", "127.0.0.1", 0)
    client_inbox = Inbox()
    client = layers(client_inbox)
    target = Flow("TCP", host, port)
    flows = []
    for n in (1, 2):
        request = parse_message(options("SIP/2.0/TCP 127.0.0.1:5060;rport", call_id=f"reuse-{n}",
                                        branch=f"z9hG4bK-reuse{n}"))
        await client.send(request, target)
        _, flow = await echo.get()
        flows.append(flow)
        answer, _ = await client_inbox.get()
        assert answer.headers.get("Call-ID") == f"reuse-{n}"
    assert flows[0] == flows[1]  # same source port: the same connection
    assert client.has_connection(target) and server.has_connection(flows[0])


async def test_idle_tcp_connection_is_closed(layers) -> None:
    echo = Echo()
    server = layers(echo, idle_timeout=0.3)
    host, port = await server.listen("TCP", "127.0.0.1", 0)
    client = layers(Inbox(), idle_timeout=0.3)
    target = Flow("TCP", host, port)
    await client.send(parse_message(options("SIP/2.0/TCP 127.0.0.1:5060;rport")), target)
    _, flow = await echo.get()
    assert client.has_connection(target)
    await wait_for_async(lambda: not client.has_connection(target) and not server.has_connection(flow),
                         4, 0.1, what="both ends to close the idle connection")


async def test_connections_from_an_address_we_left_are_dropped(layers) -> None:
    """We moved (agent/mobility.py): a connection from our old address could only time
    out; it is closed at once, the next message opens a new one."""
    echo = Echo()
    server = layers(echo)
    host, port = await server.listen("TCP", "127.0.0.1", 0)
    client = layers(Inbox())
    target = Flow("TCP", host, port)
    await client.send(parse_message(options("SIP/2.0/TCP 127.0.0.1:5060;rport")), target)
    _, first = await echo.get()
    assert client.drop_connections_from("127.0.0.2") == 0 and client.has_connection(target)
    assert client.drop_connections_from("127.0.0.1") == 1
    assert not client.has_connection(target)
    await wait_for_async(lambda: not server.has_connection(first), 4, 0.05,
                         what="the server to see the connection closed")
    await client.send(parse_message(options("SIP/2.0/TCP 127.0.0.1:5060;rport")), target)
    _, second = await echo.get()
    assert second != first and client.has_connection(target)


async def test_large_udp_request_leaves_over_tcp(layers) -> None:
    """§18.1.1: a request within 200 octets of the MTU goes over TCP (via add_via)."""
    server_inbox = Inbox()
    server = layers(server_inbox)
    host, port = await _listen_same_port(server, "127.0.0.1", ("UDP", "TCP"))
    client = layers(Inbox())
    await _listen_same_port(client, "127.0.0.1", ("UDP", "TCP"))
    transactions = TransactionLayer(client, _SilentTU())
    try:
        small = parse_message(options("SIP/2.0/UDP 127.0.0.1:5060", branch="z9hG4bK-small"))
        small.headers.remove("Via")
        assert transactions.add_via(small, Flow("UDP", host, port)).transport == "UDP"

        big = parse_message(options("SIP/2.0/UDP 127.0.0.1:5060", body=b"x" * UDP_SIZE_THRESHOLD))
        big.headers.remove("Via")
        flow = transactions.add_via(big, Flow("UDP", host, port))
        assert flow == Flow("TCP", host, port)
        assert big.via.transport == "TCP"
        transactions.send_request(big, flow)
        got, arrived = await server_inbox.get()
        assert arrived.transport == "TCP" and got.body == b"x" * UDP_SIZE_THRESHOLD
        assert got.via.transport == "TCP"

        # a pinned flow (a NATed UA's registered UDP flow, the only way to it) stays UDP
        pinned = parse_message(options("SIP/2.0/UDP 127.0.0.1:5060", branch="z9hG4bK-pin",
                                       body=b"y" * UDP_SIZE_THRESHOLD))
        pinned.headers.remove("Via")
        flow = transactions.add_via(pinned, Flow("UDP", host, port), pinned=True)
        assert flow == Flow("UDP", host, port) and pinned.via.transport == "UDP"
        transactions.send_request(pinned, flow)
        got, arrived = await server_inbox.get()
        assert arrived.transport == "UDP" and got.body == b"y" * UDP_SIZE_THRESHOLD
    finally:
        await transactions.close()


async def _listen_same_port(layer: TransportLayer, host: str, transports: tuple[str, ...]) -> tuple[str, int]:
    """UDP and TCP on one port number (add_via keeps the port when it switches to TCP)."""
    for _ in range(20):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
        try:
            for transport in transports:
                await layer.listen(transport, host, port)
        except OSError:
            await layer.close()
            continue
        return host, port
    pytest.skip("no port free for both UDP and TCP")


# -- malformed input -------------------------------------------------------------------------------

@pytest.mark.parametrize("data, problem", [
    (options("SIP/2.0/UDP 127.0.0.2:5099;rport", cseq="1 INVITE"), "CSeq method"),
    (options("SIP/2.0/UDP 127.0.0.2:5099;rport", extra="Content-Length: 3\r\n"),
     "more than one Content-Length"),
    (options("SIP/2.0/UDP 127.0.0.2:5099;rport").replace(b"OPTIONS sip:", b"OPTIONS  sip:", 1),
     "more than one SP"),
    (options("SIP/2.0/UDP 127.0.0.2:5099;rport").replace(b"To: <sip:", b"To: < sip:"),
     "whitespace inside <>"),
])
async def test_malformed_request_gets_400_naming_the_problem(layers, raw_peers, data: bytes,
                                                             problem: str) -> None:
    inbox = Inbox()
    server = layers(inbox)
    host, port = await server.listen("UDP", "127.0.0.1", 0)
    peer = await raw_peers(lenient=True)
    peer.send(data, (host, port))
    answer = await next_message(peer)
    assert isinstance(answer, Response) and answer.status == 400
    assert answer.reason.startswith("Bad Request (") and problem in answer.reason
    assert answer.headers.get("Call-ID") == "call-1"
    # a fence: the transport delivers one socket's datagrams in order, so a request sent
    # after the malformed one arrives first only if the malformed one was never delivered
    peer.send(options("SIP/2.0/UDP 127.0.0.2:5099;rport", call_id="fence", branch="z9hG4bK-fence"),
              (host, port))
    await inbox.next_is("fence")


async def test_malformed_request_over_tcp_gets_400_on_the_connection(layers) -> None:
    server = layers(Inbox())
    host, port = await server.listen("TCP", "127.0.0.1", 0)
    reader, writer = await raw_tcp(host, port)
    writer.write(options("SIP/2.0/TCP 127.0.0.2:5099", cseq="1 BYE"))
    (raw,) = await read_messages(reader)
    answer = lenient(raw)
    assert answer.status == 400 and "CSeq method" in answer.reason
    writer.close()


async def test_wrong_version_gets_505(layers, raw_peers) -> None:
    server = layers(Inbox())
    host, port = await server.listen("UDP", "127.0.0.1", 0)
    peer = await raw_peers(lenient=True)
    peer.send(options("SIP/2.0/UDP 127.0.0.2:5099;rport").replace(b" SIP/2.0\r\n", b" SIP/3.0\r\n", 1),
              (host, port))
    answer = await next_message(peer)
    assert (answer.status, answer.reason) == (505, "Version Not Supported")


GARBAGE = [b"", b"\x00", b"\r\n", b"hello world", b"\xff" * 3000, b"SIP/2.0 200 OK\r\n\r\n",
           b"INVITE sip:x SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.2\r\n\r\n", b"GET / HTTP/1.1\r\n\r\n",
           bytes(range(256)) * 4, b"INVITE sip:x SIP/2.0\r\n" + b"X: y\r\n" * 500 + b"\r\n"]


async def test_garbage_never_stops_the_udp_listener(layers, raw_peers) -> None:
    inbox = Echo()
    server = layers(inbox)
    host, port = await server.listen("UDP", "127.0.0.1", 0)
    peer = await raw_peers(lenient=True)
    for junk in GARBAGE:
        peer.send(junk, (host, port))
    peer.send(options("SIP/2.0/UDP 127.0.0.2:5099;rport", call_id="after-garbage"),
              (host, port))
    answers = []
    while True:  # answers to broken requests (if any) may come first
        answer = await next_message(peer)
        answers.append(answer)
        if answer.headers.get("Call-ID") == "after-garbage":
            break
    assert answers[-1].status == 200
    assert all(a.status == 400 for a in answers[:-1])


@pytest.mark.parametrize("junk", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # no Content-Length: cannot be framed
    b"OPTIONS sip:x SIP/2.0\r\nContent-Length: -5\r\n\r\n",
    b"OPTIONS sip:x SIP/2.0\r\nl: 1\r\nContent-Length: 2\r\n\r\nab",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 100,  # a TLS hello
    b"X" * 70_000,  # a head that never ends
])
async def test_broken_tcp_stream_closes_only_that_connection(layers, junk: bytes) -> None:
    server = layers(Echo())
    host, port = await server.listen("TCP", "127.0.0.1", 0)
    reader, writer = await raw_tcp(host, port)
    writer.write(junk)
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
    writer.close()
    # A new connection is served as before.
    reader, writer = await raw_tcp(host, port)
    writer.write(options("SIP/2.0/TCP 127.0.0.2:5099", call_id="after-junk"))
    (raw,) = await read_messages(reader)
    assert lenient(raw).status == 200
    writer.close()


async def test_message_over_the_size_limit(layers, raw_peers) -> None:
    inbox = Inbox()
    server = layers(inbox, limits=Limits(max_message_size=1000))
    host, port = await server.listen("UDP", "127.0.0.1", 0)
    await server.listen("TCP", "127.0.0.1", 0)
    tcp_port = server.address("TCP")[1]
    peer = await raw_peers(lenient=True)
    big = options("SIP/2.0/UDP 127.0.0.2:5099;rport", body=b"y" * 1500)
    peer.send(big, (host, port))
    answer = await next_message(peer)
    assert (answer.status, answer.reason) == (513, "Message Too Large")
    # Over TCP the stream cannot continue past it: the connection is closed.
    reader, writer = await raw_tcp(host, tcp_port)
    writer.write(big.replace(b"SIP/2.0/UDP", b"SIP/2.0/TCP"))
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    # Still serving, and neither big message was delivered (it would have come first).
    peer.send(options("SIP/2.0/UDP 127.0.0.2:5099;rport", call_id="small"), (host, port))
    await inbox.next_is("small")


# -- the transaction layer's limit ---------------------------------------------------------------------

class _SilentTU:
    """A TransactionUser that never answers anything."""

    def __init__(self) -> None:
        self.requests: list[ServerTransaction] = []

    def on_request(self, txn: ServerTransaction) -> None:
        self.requests.append(txn)

    def on_ack(self, request: Request, flow: Flow) -> None:
        pass

    def on_cancel(self, txn: ServerTransaction) -> None:
        pass

    def on_stray_response(self, response: Response, flow: Flow) -> None:
        pass


async def test_full_transaction_table_answers_503_with_retry_after(layers, raw_peers) -> None:
    server = layers(lambda inbound: transactions.receive(inbound))
    tu = _SilentTU()
    transactions = TransactionLayer(server, tu, max_server_transactions=2)
    host, port = await server.listen("UDP", "127.0.0.1", 0)
    try:
        peer = await raw_peers(lenient=True)
        for n in (1, 2, 3):
            peer.send(options("SIP/2.0/UDP 127.0.0.2:5099;rport", call_id=f"full-{n}",
                              branch=f"z9hG4bK-full{n}"), (host, port))
        answer = await next_message(peer)
        assert answer.status == 503 and answer.headers.get("Call-ID") == "full-3"
        assert answer.headers.get("Retry-After") is not None
        assert int(answer.headers.get("Retry-After").split()[0]) > 0
        assert [t.request.headers.get("Call-ID") for t in tu.requests] == ["full-1", "full-2"]
        assert transactions.server_transactions == 2
        # A retransmission of a request already held is absorbed, not refused.
        peer.send(options("SIP/2.0/UDP 127.0.0.2:5099;rport", call_id="full-1",
                          branch="z9hG4bK-full1"), (host, port))
        # a fence: a new request, still refused, is answered after anything the
        # retransmission would have caused
        peer.send(options("SIP/2.0/UDP 127.0.0.2:5099;rport", call_id="full-4",
                          branch="z9hG4bK-full4"), (host, port))
        answer = await next_message(peer)
        assert answer.status == 503 and answer.headers.get("Call-ID") == "full-4", answer
        assert peer.inbox.empty() and len(tu.requests) == 2
    finally:
        await transactions.close()


def test_local_address_towards_is_remembered_briefly(monkeypatch) -> None:
    from sipmesh.sip.transport import base

    base._route_cache.clear()
    opened = []
    real_socket = base.socket.socket

    def counting_socket(*args, **kwargs):
        opened.append(args)
        return real_socket(*args, **kwargs)

    monkeypatch.setattr(base.socket, "socket", counting_socket)
    assert base.local_address_towards("127.0.0.1") == "127.0.0.1"
    assert base.local_address_towards("127.0.0.1") == "127.0.0.1"
    assert len(opened) == 1  # the second answer came from the cache
    clock = base.time.monotonic() + base._ROUTE_TTL + 0.1
    monkeypatch.setattr(base.time, "monotonic", lambda: clock)
    assert base.local_address_towards("127.0.0.1") == "127.0.0.1"
    assert len(opened) == 2  # expired: asked the kernel again
    assert base.local_address_towards("::1") == "::1"


# ----------------------------------------------------------------------------- keep-alives

async def test_udp_keep_alives_are_stun_and_tell_our_public_address(layers, raw_peers) -> None:
    """RFC 5626 §4.4.2: a STUN Binding on the flow, answered by a server layer; a layer
    that is no STUN server leaves Binding requests unanswered."""
    server = layers(Echo(), stun_server=True)
    host, port = await server.listen("UDP", "127.0.0.1", 0)
    client = layers(Inbox())
    _, client_port = await client.listen("UDP", "127.0.0.1", 0)
    flow = Flow("UDP", host, port)
    keeping = asyncio.ensure_future(client.keep_alive(flow, interval=0.05))
    try:
        await wait_for_async(lambda: client.public_address.get(flow) == ("127.0.0.1", client_port),
                             5, what="our address from a STUN answer")
    finally:
        keeping.cancel()
    assert await client.stun_binding(flow) == ("127.0.0.1", client_port)

    mute = layers(Echo())
    _, mute_port = await mute.listen("UDP", "127.0.0.1", 0)
    with pytest.raises(asyncio.TimeoutError):
        await client.stun_binding(Flow("UDP", "127.0.0.1", mute_port), timeout=0.3)
    # ...and SIP still works on both ports after STUN
    peer = await raw_peers(lenient=True)
    peer.send(options("SIP/2.0/UDP 127.0.0.1:9;rport"), ("127.0.0.1", mute_port))
    assert (await next_message(peer)).status == 200


async def test_tcp_keep_alives_are_double_crlf_on_our_own_connection(layers, caplog) -> None:
    """RFC 5626 §4.4.1; without a connection nothing is sent (none is opened for it)."""
    received = bytearray()
    got_ping = asyncio.Event()
    accepted = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        while data := await reader.read(4096):
            received.extend(data)
            if received.endswith(b"\r\n\r\n\r\n\r\n"):  # the message's blank line, then a ping
                got_ping.set()
        writer.close()

    listener = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    client = layers(Inbox())
    await client.listen("TCP", "127.0.0.1", 0)
    flow = Flow("TCP", "127.0.0.1", port)
    caplog.set_level(logging.DEBUG, logger="sipmesh.sip.transport")
    keeping = asyncio.ensure_future(client.keep_alive(flow, interval=0.05))
    try:
        await wait_for_async(lambda: sum("no connection, none opened" in r.getMessage()
                                         for r in caplog.records) >= 3, 5,
                             what="three keep-alives that found no connection")
        assert not client.has_connection(flow) and accepted == 0
        await client.send(parse_message(options("SIP/2.0/TCP 127.0.0.1:9")), flow)
        await asyncio.wait_for(got_ping.wait(), 5)
    finally:
        keeping.cancel()
        listener.close()
        await listener.wait_closed()
    assert received.startswith(b"OPTIONS ")

