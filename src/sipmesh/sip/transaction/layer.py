"""The asyncio side of the transaction layer: matching, timers and I/O for the
sans-I/O machines in client.py and server.py.

A transaction user (UA core, proxy core) sees server transactions as
`ServerTransaction` handles and client transactions as `ClientTransaction`
handles; everything else (retransmissions, absorption, ACK for non-2xx) stays here.
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Callable, Protocol

from sipmesh.sip.message import Request, Response, make_response
from sipmesh.sip.transaction.client import ClientInviteTransaction, ClientNonInviteTransaction
from sipmesh.sip.transaction.effects import Deliver, Effect, Send, Terminated, Timeout, TransportFailed
from sipmesh.sip.transaction.matching import (client_key, invite_key_for_cancel, new_branch,
                                              server_key)
from sipmesh.sip.transaction.server import ServerInviteTransaction, ServerNonInviteTransaction
from sipmesh.sip.transaction.timers import TimerValues
from sipmesh.sip.transport.base import (UDP_SIZE_THRESHOLD, Flow, Inbound, local_address_towards,
                                        make_via, response_target)
from sipmesh.sip.transport.layer import TransportLayer
from sipmesh.sip.transport.resolve import Resolver, default_resolver
from sipmesh.sip.uri import is_ip

log = logging.getLogger("sipmesh.sip.transaction")

Machine = (ClientInviteTransaction | ClientNonInviteTransaction
           | ServerInviteTransaction | ServerNonInviteTransaction)


class TransactionUser(Protocol):
    def on_request(self, txn: "ServerTransaction") -> None:
        """A new request (never a retransmission, never an ACK for a 2xx)."""

    def on_ack(self, request: Request, flow: Flow) -> None:
        """An ACK that matched no transaction: the ACK for a 2xx (RFC 6026)."""

    def on_cancel(self, txn: "ServerTransaction") -> None:
        """The INVITE of `txn` was CANCELled; 200 to the CANCEL is already sent."""

    def on_stray_response(self, response: Response, flow: Flow) -> None:
        """A response matching no client transaction (e.g. a retransmitted 2xx)."""


class ServerTransaction:
    """What a TU holds for a request it must answer."""

    def __init__(self, layer: "TransactionLayer", machine: ServerInviteTransaction | ServerNonInviteTransaction,
                 flow: Flow) -> None:
        self._layer = layer
        self._machine = machine
        self.request: Request = machine.request
        self.flow = flow
        self.cancelled = False
        self.final_sent = False

    def respond(self, response: Response) -> None:
        if self.final_sent:
            log.debug("ignoring %d after a final response", response.status)
            return
        if response.status >= 200:
            self.final_sent = True
            if self._layer.on_final is not None:  # e.g. a broker's metrics
                self._layer.on_final(self.request, response)
        self._layer._run(self._machine, self._machine.respond(response, self._layer.now()))
        if response.status >= 300 and isinstance(self._machine, ServerInviteTransaction):
            self._layer._alias_ack_key(self._machine)

    def reply(self, status: int, reason: str | None = None, *, to_tag: str | None = None,
              headers: list[tuple[str, str]] | None = None) -> Response:
        response = make_response(self.request, status, reason, to_tag=to_tag)
        for name, value in headers or ():
            response.headers.add(name, value)
        self.respond(response)
        return response


class ClientTransaction:
    """What a TU holds for a request it sent: the responses as they arrive."""

    def __init__(self, request: Request, flow: Flow) -> None:
        self.request = request
        self.flow = flow
        self._queue: asyncio.Queue[Response | None] = asyncio.Queue()
        self.final: asyncio.Future[Response] = asyncio.get_running_loop().create_future()

    def _deliver(self, response: Response) -> None:
        self._queue.put_nowait(response)
        if response.status >= 200 and not self.final.done():
            self.final.set_result(response)

    def _fail(self, status: int, reason: str) -> None:
        if not self.final.done():
            self._deliver(make_response(self.request, status, reason))

    def _terminated(self) -> None:
        self._fail(408, "Request Timeout")
        self._queue.put_nowait(None)

    async def responses(self) -> AsyncIterator[Response]:
        """Every response, provisional and final (several 2xx for a forked INVITE),
        until the transaction ends. A timeout arrives as a synthetic 408."""
        while True:
            item = await self._queue.get()
            if item is None:
                return
            yield item

    async def wait_final(self) -> Response:
        return await asyncio.shield(self.final)


class TransactionLayer:
    def __init__(self, transport: TransportLayer, tu: TransactionUser, *,
                 timers: TimerValues = TimerValues(), max_server_transactions: int = 10_000,
                 resolver: Resolver | None = None) -> None:
        self.transport = transport
        # Host names (a Via's sent-by, a Route, a Contact) become addresses here, never
        # in the transport layer, which takes addresses only.
        self.resolver = resolver or default_resolver()
        self.tu = tu
        self.timers = timers
        self.max_server_transactions = max_server_transactions
        self._client: dict[tuple, tuple[Machine, ClientTransaction]] = {}
        self._server: dict[tuple, tuple[Machine, ServerTransaction]] = {}
        self._flows: dict[int, Flow] = {}
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._sending: set[asyncio.Task[None]] = set()  # sends waiting for a connection or a name
        self._loop = asyncio.get_running_loop()
        # called with (request, final response) for every final response of a server transaction
        self.on_final: Callable[[Request, Response], None] | None = None

    def now(self) -> float:
        return self._loop.time()

    @property
    def server_transactions(self) -> int:
        return len(self._server)

    @property
    def client_transactions(self) -> int:
        return len(self._client)

    # -- client side ------------------------------------------------------------------
    def add_via(self, request: Request, flow: Flow, *, branch: str | None = None,
                pinned: bool = False) -> Flow:
        """Put our Via on top (choosing TCP for large UDP requests, §18.1.1); returns the flow.
        A `pinned` flow is one the peer opened (its registration's NAT mapping): it is kept
        as it is, since a TCP connection towards a NAT could not be opened."""
        if not pinned and flow.transport == "UDP" and len(request.to_bytes()) + 100 > UDP_SIZE_THRESHOLD \
                and self.transport.address("TCP", flow.host) is not None:
            flow = Flow("TCP", flow.host, flow.port)
        local = self.transport.address(flow.transport, flow.host)
        if local is None:
            raise OSError(f"no {flow.transport} listener to send from")
        host = self.advertised_host(local[0], flow.host)
        via = make_via(flow.transport, host, local[1], branch or new_branch())
        request.push_via(via)
        return flow

    def advertised_host(self, bound: str, towards: str) -> str:
        if bound in ("0.0.0.0", "::"):
            return local_address_towards(towards)
        return bound

    def send_request(self, request: Request, flow: Flow) -> ClientTransaction:
        """Start a client transaction; the request must already carry our top Via."""
        handle = ClientTransaction(request, flow)
        cls = ClientInviteTransaction if request.method == "INVITE" else ClientNonInviteTransaction
        machine = cls(request, reliable=flow.reliable, now=self.now(), timers=self.timers)
        self._client[machine.key] = (machine, handle)
        self._flows[id(machine)] = flow
        self._run(machine, machine.start())
        return handle

    def send_stateless(self, message: Request | Response, flow: Flow) -> None:
        """ACK for a 2xx, a proxy's stateless forward, a stateless error response."""
        self._transmit(message, flow, None)

    def reply_stateless(self, request: Request, flow: Flow, status: int, reason: str | None = None,
                        headers: list[tuple[str, str]] | None = None) -> None:
        if request.method == "ACK":
            return
        response = make_response(request, status, reason)
        for name, value in headers or ():
            response.headers.add(name, value)
        self.send_stateless(response, response_target(response, flow))

    # -- receiving --------------------------------------------------------------------
    def receive(self, inbound: Inbound) -> None:
        """A message from the transport layer (its owner passes each one on)."""
        message, flow = inbound.message, inbound.flow
        if isinstance(message, Response):
            entry = self._client.get(client_key(message))
            if entry is None:
                self.tu.on_stray_response(message, flow)
            else:
                self._run(entry[0], entry[0].receive(message, self.now()))
            return
        key = server_key(message)
        entry = self._server.get(key)
        if entry is not None:
            machine = entry[0]
            if message.method == "ACK" and isinstance(machine, ServerInviteTransaction) \
                    and machine.state.name not in ("COMPLETED", "CONFIRMED"):
                self.tu.on_ack(message, flow)  # ACK for our 2xx (Accepted state)
                return
            self._run(machine, machine.receive(message, self.now()))
            return
        if message.method == "ACK":
            self.tu.on_ack(message, flow)
            return
        if len(self._server) >= self.max_server_transactions:
            log.warning("transaction table full (%d): 503 to %s", len(self._server), flow)
            self.reply_stateless(message, flow, 503, "Service Unavailable",
                                 [("Retry-After", "5")])
            return
        if message.method == "CANCEL":
            self._receive_cancel(message, flow, key)
            return
        self._new_server(message, flow, key, notify=True)

    def _new_server(self, request: Request, flow: Flow, key: tuple, *, notify: bool) -> ServerTransaction:
        cls = ServerInviteTransaction if request.method == "INVITE" else ServerNonInviteTransaction
        machine = cls(request, reliable=flow.reliable, now=self.now(), timers=self.timers)
        handle = ServerTransaction(self, machine, flow)
        self._server[key] = (machine, handle)
        self._flows[id(machine)] = flow
        effects = machine.start()
        if not notify:
            effects = [e for e in effects if not isinstance(e, Deliver)]
        self._run(machine, effects)
        return handle

    def _receive_cancel(self, cancel: Request, flow: Flow, key: tuple) -> None:
        handle = self._new_server(cancel, flow, key, notify=False)
        invite = self._server.get(invite_key_for_cancel(cancel))
        if invite is None:
            handle.reply(481)
            return
        handle.reply(200)  # §9.2: a matched CANCEL gets 200 even when it is too late to act
        if invite[1].final_sent:
            return
        invite[1].cancelled = True
        self.tu.on_cancel(invite[1])

    # -- effects ----------------------------------------------------------------------
    def _run(self, machine: Machine, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, Send):
                flow = self._flows.get(id(machine))
                if flow is None:
                    continue
                if isinstance(effect.message, Response):
                    flow = response_target(effect.message, flow)
                self._transmit(effect.message, flow, machine)
            elif isinstance(effect, Deliver):
                self._deliver(machine, effect.message)
            elif isinstance(effect, (Timeout, TransportFailed)):
                handle = self._client_handle(machine)
                if handle is not None:
                    handle._fail(503 if isinstance(effect, TransportFailed) else 408,
                                 "Service Unavailable" if isinstance(effect, TransportFailed)
                                 else "Request Timeout")
            elif isinstance(effect, Terminated):
                self._forget(machine)
        self._schedule(machine)

    def _deliver(self, machine: Machine, message: Request | Response) -> None:
        if isinstance(message, Response):
            handle = self._client_handle(machine)
            if handle is not None:
                handle._deliver(message)
        else:
            entry = self._server.get(machine.key)
            if entry is not None:
                try:
                    self.tu.on_request(entry[1])
                except Exception:
                    log.exception("error handling %s", message.method)
                    if not entry[1].final_sent:
                        entry[1].reply(500)

    def _client_handle(self, machine: Machine) -> ClientTransaction | None:
        entry = self._client.get(machine.key)
        return entry[1] if entry is not None and entry[0] is machine else None

    def _alias_ack_key(self, machine: ServerInviteTransaction) -> None:
        """RFC 2543 peers' ACK carries our To tag, so its key differs from the INVITE's."""
        entry = self._server.get(machine.key)
        if entry is not None and machine.ack_key != machine.key:
            self._server[machine.ack_key] = entry

    def _forget(self, machine: Machine) -> None:
        table = self._client if isinstance(machine, (ClientInviteTransaction, ClientNonInviteTransaction)) \
            else self._server
        key = machine.key
        entry = table.get(key)
        if isinstance(machine, ServerInviteTransaction) and machine.ack_key != key:
            alias = self._server.get(machine.ack_key)
            if alias is not None and alias[0] is machine:
                del self._server[machine.ack_key]
        if entry is not None and entry[0] is machine:
            del table[key]
            if isinstance(entry[1], ClientTransaction):
                entry[1]._terminated()
        self._flows.pop(id(machine), None)
        timer = self._timers.pop(id(machine), None)
        if timer is not None:
            timer.cancel()

    def _schedule(self, machine: Machine) -> None:
        timer = self._timers.pop(id(machine), None)
        if timer is not None:
            timer.cancel()
        if id(machine) not in self._flows:
            return
        deadline = machine.next_deadline()
        if deadline is not None:
            self._timers[id(machine)] = self._loop.call_at(deadline, self._fire, machine, deadline)

    def _fire(self, machine: Machine, deadline: float) -> None:
        self._timers.pop(id(machine), None)
        # call_at may run a little early (clock resolution): never tick before the deadline.
        self._run(machine, machine.on_timer(max(self.now(), deadline)))

    def _transmit(self, message: Request | Response, flow: Flow, machine: Machine | None) -> None:
        if is_ip(flow.host):
            try:
                if self.transport.try_send(message, flow):
                    return
            except OSError as exc:
                self._send_failed(message, flow, machine, exc)
                return
        task = asyncio.ensure_future(self._send(message, flow, machine))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, message: Request | Response, flow: Flow, machine: Machine | None) -> None:
        try:
            flow = await self.resolver.flow(flow)  # RFC 3263 §5 for a response's Via
            await self.transport.send(message, flow)
        except OSError as exc:  # including ResolveError: a name that does not resolve
            self._send_failed(message, flow, machine, exc)

    def _send_failed(self, message: Request | Response, flow: Flow, machine: Machine | None,
                     exc: OSError) -> None:
        log.info("cannot send %r to %s: %s", message, flow, exc)
        if machine is not None and id(machine) in self._flows:
            self._run(machine, machine.transport_error(self.now()))

    def give_up(self, handle: ClientTransaction, after: float) -> None:
        """End `handle`'s transaction with a 408 unless a final response arrives within
        `after` seconds (§9.1: a CANCELled INVITE whose peer never answers)."""
        def expire() -> None:
            entry = self._client.get(client_key(handle.request))
            if entry is not None and entry[1] is handle and not handle.final.done():
                self._forget(entry[0])
        self._loop.call_later(after, expire)

    async def close(self) -> None:
        """Stop every timer and end every client transaction (waiters see a 408)."""
        for machine, _ in list(self._client.values()):
            self._forget(machine)
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
