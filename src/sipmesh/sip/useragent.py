"""The user agent core (RFC 3261 §8, §10.2, §13-15): REGISTER, INVITE sessions, BYE.

It sits on the transaction layer and owns what RFC 3261 gives the TU: digest
retries, the ACK for 2xx, 2xx retransmission until ACK (§13.3.1.4), CANCEL (§9.1),
dialogs, and answers to in-dialog and out-of-dialog requests. Applications see
`Call` objects; they decide nothing about SIP beyond accept or reject.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from sipmesh.sip.auth import AuthError, DigestClient, choose_challenge, is_stale
from sipmesh.sip.dialog import Dialog, DialogState, dialog_id_of_request, new_tag
from sipmesh.sip.errors import ParseError
from sipmesh.sip.headers import Address
from sipmesh.sip.message import Headers, Request, Response, make_response
from sipmesh.sip.transaction.client import make_cancel
from sipmesh.sip.transaction.layer import ClientTransaction, ServerTransaction, TransactionLayer
from sipmesh.sip.transaction.timers import TimerValues
from sipmesh.sip.transport.base import (Flow, Inbound, local_address_towards, resolve,
                                        response_target, uri_target)
from sipmesh.sip.transport.layer import KEEPALIVE_INTERVAL, TransportLayer
from sipmesh.sip.uri import URI, SipURI, parse_sip_uri

log = logging.getLogger("sipmesh.sip.ua")

ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS"
USER_AGENT = "sipmesh/0.1"
# §22: credentials the INVITE carried go into the ACK for its 2xx as well.
_CREDENTIALS = ("Authorization", "Proxy-Authorization")


class CallFailed(Exception):
    """An INVITE or REGISTER ended without success; `status` as the peer or a timer said."""

    def __init__(self, status: int, reason: str, response: Response | None = None) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.response = response


@dataclass(slots=True)
class UAConfig:
    user: str
    domain: str  # host[:port] of the registrar/proxy, also the AOR's domain
    password: str | None = None
    auth_user: str | None = None
    display_name: str | None = None
    transport: str = "UDP"
    listen_host: str = "127.0.0.1"
    listen_port: int = 5060
    outbound_proxy: str | None = None  # sip: URI of the first hop for out-of-dialog requests
    advertised_host: str | None = None  # the host in our Contact/Via when not the bound one
    transports: tuple[str, ...] = ("UDP", "TCP")
    timers: TimerValues = field(default_factory=TimerValues)
    # TLS (only when "TLS" is in `transports`): it needs a port of its own (0: any free one).
    tls_context: ssl.SSLContext | None = None  # server side: our certificate
    tls_client_context: ssl.SSLContext | None = None  # verifies the peers we connect to
    tls_port: int = 0
    # While registered, keep the flow to the registrar open through NATs (RFC 5626 §4.4):
    # seconds between keep-alives, 0 for none. See TransportLayer.keep_alive.
    keepalive: float = KEEPALIVE_INTERVAL


class Call:
    """One INVITE dialog, on either side."""

    def __init__(self, ua: "UserAgent", dialog: Dialog, invite: Request, local_sdp: bytes,
                 remote_sdp: bytes, outgoing: bool) -> None:
        self.ua = ua
        self.dialog = dialog
        self.invite = invite
        self.local_sdp = local_sdp
        self.remote_sdp = remote_sdp
        self.outgoing = outgoing
        self.ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.acked = asyncio.Event()
        self._contact: str | None = None  # the Contact we gave the peer for this dialog
        self._acks: dict[int, tuple[Request, Flow]] = {}  # our ACK per INVITE CSeq, for resends
        self._ack_events: dict[int, asyncio.Event] = {}  # our 2xx awaiting their ACK, by CSeq
        self._reinviting = False

    @property
    def call_id(self) -> str:
        return self.dialog.call_id

    @property
    def peer(self) -> str:
        return str(self.dialog.remote_uri.uri)

    def _end(self, reason: str) -> None:
        self.dialog.state = DialogState.TERMINATED
        self.ua._calls.pop(self.dialog.id, None)
        if not self.ended.done():
            self.ended.set_result(reason)

    async def bye(self, headers: list[tuple[str, str]] | None = None) -> Response | None:
        """End the session (§15.1.1). Returns once the BYE transaction has ended, with its
        final response (None if the call had already ended or the BYE could not be sent).
        `headers` go into the BYE (e.g. a Reason, RFC 3326)."""
        if self.ended.done():
            return None
        self._end("local BYE")
        request = self.dialog.create_request("BYE")
        for name, value in headers or ():
            request.headers.add(name, value)
        try:
            response = await self.ua._send_in_dialog(self.dialog, request)
        except (OSError, CallFailed) as exc:
            log.info("[%s] BYE not delivered: %s", self.call_id, exc)
            return None
        log.info("[%s] BYE answered %d %s", self.call_id, response.status, response.reason)
        return response

    async def request(self, method: str, *, headers: list[tuple[str, str]] | None = None,
                      body: bytes = b"", content_type: str | None = None) -> Response:
        """Send a non-INVITE request inside the dialog (OPTIONS, INFO, ...); its final response."""
        method = method.upper()
        if method in ("INVITE", "ACK", "CANCEL", "BYE"):
            raise ValueError(f"use the Call's own methods for {method}")
        if self.ended.done():
            raise CallFailed(481, "Call/Transaction Does Not Exist")
        request = self.dialog.create_request(method)
        for name, value in headers or ():
            request.headers.add(name, value)
        if body:
            request.headers.add("Content-Type", content_type or "application/octet-stream")
            request.body = body
        return await self.ua._send_in_dialog(self.dialog, request)

    async def reinvite(self, sdp: bytes | None = None) -> Response:
        """Re-INVITE (§14.1) offering `sdp` (default: the current local SDP); its final response.
        On 2xx the ACK is sent, the answer becomes `remote_sdp` and the Contact the new target."""
        if self.ended.done():
            raise CallFailed(481, "Call/Transaction Does Not Exist")
        if self._reinviting:
            raise CallFailed(491, "Request Pending")
        offer = self.local_sdp if sdp is None else sdp
        contact = self._contact or str(self.ua.contact())
        request = self.dialog.create_request("INVITE", contact=contact)
        request.headers.add("Allow", ALLOW)
        request.headers.add("Content-Type", "application/sdp")
        request.body = offer
        self._reinviting = True
        try:
            response, txn = await self.ua._request_in_dialog(self.dialog, request)
        finally:
            self._reinviting = False
        if 200 <= response.status < 300:
            self.dialog.update_target(response)
            self.local_sdp = offer
            if response.body:
                self.remote_sdp = response.body
            number = response.cseq[0]
            await self.ua._send_ack(self, number, txn.request)
            self.ua._spawn(self.ua._ack_retransmitted_2xx(txn, self, number))
        return response


class IncomingCall:
    """An INVITE awaiting the application's decision."""

    def __init__(self, ua: "UserAgent", txn: ServerTransaction) -> None:
        self.ua = ua
        self.txn = txn
        self.request = txn.request
        self.local_tag = new_tag()
        self.cancelled = asyncio.Event()

    @property
    def caller(self) -> Address:
        return self.request.from_

    @property
    def call_id(self) -> str:
        return self.request.call_id

    @property
    def sdp(self) -> bytes:
        return self.request.body

    def ringing(self) -> None:
        if not self.txn.final_sent:
            response = self._response(180)  # it carries our tag: an early dialog needs a Contact
            response.headers.add("Contact", str(self.ua.contact(self.txn.flow.transport)))
            self.txn.respond(response)

    def reject(self, status: int, reason: str | None = None,
               headers: list[tuple[str, str]] | None = None) -> None:
        if self.txn.final_sent:
            return
        response = self._response(status, reason)
        for name, value in headers or ():
            response.headers.add(name, value)
        self.txn.respond(response)

    async def accept(self, sdp: bytes, *, ack_timeout: float | None = None) -> Call:
        """Send 200 with `sdp`, retransmit it until the ACK (§13.3.1.4); returns the Call.
        Raises CallFailed if the caller cancelled first or never ACKs (then a BYE is sent)."""
        if self.txn.final_sent or self.cancelled.is_set():
            raise CallFailed(487, "Request Terminated")
        try:
            dialog = Dialog.from_uas(self.request, self.local_tag)
        except (ValueError, ParseError) as exc:
            self.reject(400, "Bad Request (no usable Contact)")
            raise CallFailed(400, str(exc)) from None
        contact = str(self.ua.contact(self.txn.flow.transport))
        response = self._response(200)
        response.headers.add("Contact", contact)
        response.headers.add("Allow", ALLOW)
        response.headers.add("Content-Type", "application/sdp")
        response.body = sdp
        call = Call(self.ua, dialog, self.request, sdp, self.request.body, outgoing=False)
        call._contact = contact
        self.ua._calls[dialog.id] = call
        number = self.request.cseq[0]
        call._ack_events[number] = asyncio.Event()
        self.txn.respond(response)
        acked = await self.ua._retransmit_2xx(call, response, self.txn.flow, number, ack_timeout)
        if acked or call.ended.done():  # a BYE before the ACK: our 2xx did get through
            return call
        log.warning("[%s] no ACK for our 200: ending the session", self.call_id)
        await call.bye()
        raise CallFailed(408, "No ACK received")

    def _response(self, status: int, reason: str | None = None) -> Response:
        response = make_response(self.request, status, reason, to_tag=self.local_tag)
        response.headers.add("Server", USER_AGENT)
        return response


IncomingHandler = Callable[[IncomingCall], Awaitable[None]]


class _Invitation:
    """One INVITE client transaction of ours as the UA core sees it (§13.2.2, §9.1).

    A task reads every response of the transaction for as long as it lives: it ACKs
    each 2xx (again when the 2xx is retransmitted, §13.2.2.4), hangs up extra 2xx from
    forks, and sends the CANCEL once one is wanted and a provisional response came."""

    def __init__(self, request: Request, txn: ClientTransaction) -> None:
        self.request = request
        self.txn = txn
        self.queue: asyncio.Queue[Response | Call | None] = asyncio.Queue()
        self.calls: dict[str, Call] = {}  # To tag -> Call, one per 2xx dialog
        self.provisional = False
        self.final = False
        self.cancel_wanted = False
        self.cancel_sent = False
        self.abandoned = False  # nobody waits for the outcome any more


class UserAgent:
    """A SIP user agent bound to one identity. Also a TransactionUser."""

    def __init__(self, config: UAConfig, on_invite: IncomingHandler | None = None) -> None:
        self.config = config
        self.on_invite = on_invite
        self.transport: TransportLayer | None = None
        self.transactions: TransactionLayer | None = None  # type: ignore[assignment]
        self._calls: dict[tuple[str, str, str], Call] = {}
        self._pending: dict[str, tuple[Request, Dialog | None]] = {}  # Call-ID of our INVITEs
        self._tasks: set[asyncio.Task[object]] = set()
        self._incoming: dict[ServerTransaction, IncomingCall] = {}
        self._ports: dict[str, int] = {}  # bound port per transport
        self._digest = (DigestClient(config.auth_user or config.user, config.password)
                        if config.password is not None else None)
        self._keepalive: tuple[Flow, asyncio.Task[object]] | None = None
        self._register_call_id = secrets.token_hex(12)
        self._register_cseq = 0
        self.aor = parse_sip_uri(f"sip:{config.user}@{config.domain}")
        self.aor.port = None if self.aor.port == 5060 else self.aor.port

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        self.transport = TransportLayer(self._received)
        self.transactions = TransactionLayer(self.transport, self, timers=self.config.timers)
        if self.config.tls_client_context is not None:
            self.transport.set_client_tls(self.config.tls_client_context)
        port = self.config.listen_port
        for name in (t.upper() for t in self.config.transports):
            if name == "TLS":
                if self.config.tls_context is None:
                    raise ValueError("a TLS listener needs UAConfig.tls_context")
                _, bound = await self.transport.listen("TLS", self.config.listen_host,
                                                       self.config.tls_port,
                                                       ssl_context=self.config.tls_context)
                self._ports["TLS"] = bound
                continue
            _, bound = await self.transport.listen(name, self.config.listen_host, port)
            self._ports[name] = bound
            port = bound  # UDP and TCP share one port number
        self.config.listen_port = port

    def _received(self, inbound: Inbound) -> None:
        """Everything the transport layer receives goes through the transaction layer."""
        assert self.transactions is not None
        self.transactions.receive(inbound)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self.transactions is not None:
            await self.transactions.close()
        if self.transport is not None:
            await self.transport.close()

    @property
    def calls(self) -> list[Call]:
        return list(self._calls.values())

    def contact(self, transport: str | None = None) -> Address:
        transport = (transport or self.config.transport).upper()
        host = self.config.advertised_host or self._local_host()
        port = self._ports.get(transport, self.config.listen_port)
        uri = SipURI(host=host, user=self.config.user, port=port)
        if transport != "UDP":
            uri.params["transport"] = transport.lower()
        return Address(uri)

    def _local_host(self) -> str:
        host = self.config.listen_host
        if host in ("0.0.0.0", "::"):
            server = self.config.domain.rsplit(":", 1)[0].strip("[]")
            return local_address_towards(server)
        return host

    # -- requests we send ------------------------------------------------------------------
    def _new_request(self, method: str, uri: URI, *, to: Address | None = None,
                     call_id: str | None = None, from_tag: str | None = None, cseq: int = 1) -> Request:
        headers = Headers()
        if self.config.outbound_proxy:
            route = parse_sip_uri(self.config.outbound_proxy)
            route.params["lr"] = None
            headers.add("Route", f"<{route}>")
        headers.add("Max-Forwards", "70")
        me = Address(self.aor.copy(), self.config.display_name, {"tag": from_tag or new_tag()})
        headers.add("From", str(me))
        headers.add("To", str(to or Address(uri)))
        headers.add("Call-ID", call_id or secrets.token_hex(12))
        headers.add("CSeq", f"{cseq} {method}")
        headers.add("User-Agent", USER_AGENT)
        return Request(headers=headers, method=method, uri=uri)

    async def _flow_for(self, request: Request) -> Flow:
        routes = request.addresses("Route")
        hop = routes[0].uri if routes and isinstance(routes[0].uri, SipURI) and routes[0].uri.lr \
            else request.uri
        if not isinstance(hop, SipURI):
            raise CallFailed(416, "Unsupported URI Scheme")
        transport, host, port = uri_target(hop, self.config.transport)
        try:
            return Flow(transport, await resolve(host, port), port)
        except OSError as exc:
            raise CallFailed(503, f"cannot resolve {host}: {exc}") from None

    async def _send(self, request: Request) -> ClientTransaction:
        assert self.transactions is not None
        flow = await self._flow_for(request)
        flow = self.transactions.add_via(request, flow)
        return self.transactions.send_request(request, flow)

    async def _with_auth(self, request: Request, response: Response) -> Request | None:
        """A copy of `request` answering the 401/407 challenge, or None if we cannot."""
        if self._digest is None:
            return None
        name = "WWW-Authenticate" if response.status == 401 else "Proxy-Authenticate"
        try:
            challenge = choose_challenge(response.headers.get_all(name))
            value = self._digest.authorize(challenge, request.method, str(request.uri), request.body)
        except AuthError as exc:
            log.warning("cannot answer the %d challenge: %s", response.status, exc)
            return None
        retry = Request(headers=request.headers.copy(), method=request.method, uri=request.uri,
                        body=request.body)
        retry.headers.pop_first("Via")
        retry.headers.remove("Authorization" if response.status == 401 else "Proxy-Authorization")
        retry.headers.add("Authorization" if response.status == 401 else "Proxy-Authorization", value)
        number, method = request.cseq
        retry.headers.set("CSeq", f"{number + 1} {method}")
        return retry

    async def _answer_challenge(self, request: Request, response: Response,
                                answered: set[int]) -> Request | None:
        """The retry for a 401/407, at most once per kind of challenge unless it says stale
        (so a proxy's 407 followed by the callee's 401 both get answered)."""
        if response.status not in (401, 407):
            return None
        if response.status in answered and not _stale(response):
            return None
        retry = await self._with_auth(request, response)
        if retry is not None:
            answered.add(response.status)
        return retry

    async def request(self, request: Request) -> Response:
        """Send a non-INVITE request; answer digest challenges (again if stale)."""
        answered: set[int] = set()
        response: Response | None = None
        for _attempt in range(3):
            txn = await self._send(request)
            response = await txn.wait_final()
            retry = await self._answer_challenge(request, response, answered)
            if retry is None:
                return response
            request = retry
        assert response is not None
        return response

    async def register(self, expires: int = 3600) -> Response:
        """REGISTER our Contact for `expires` seconds (0 removes it)."""
        registrar = parse_sip_uri(f"sip:{self.config.domain}")
        if self.config.transport != "UDP":
            registrar.params["transport"] = self.config.transport.lower()
        self._register_cseq += 1
        request = self._new_request("REGISTER", registrar, to=Address(self.aor.copy()),
                                    call_id=self._register_call_id, cseq=self._register_cseq)
        request.headers.remove("Route")
        contact = self.contact()
        request.headers.add("Contact", str(contact))
        request.headers.add("Expires", str(expires))
        flow = await self._flow_for(request)
        response = await self.request(request)
        self._register_cseq = response.cseq[0] if response.cseq[1] == "REGISTER" else self._register_cseq
        if 200 <= response.status < 300:
            self._keep_alive(flow if expires > 0 else None)
        return response

    def _keep_alive(self, flow: Flow | None) -> None:
        """Keep-alives on the registration's flow (one at a time), or none (None)."""
        if self._keepalive is not None and self._keepalive[0] != flow:
            self._keepalive[1].cancel()
            self._keepalive = None
        if flow is not None and self._keepalive is None and self.config.keepalive > 0:
            assert self.transport is not None
            self._keepalive = (flow, self._spawn(self.transport.keep_alive(flow, self.config.keepalive)))

    async def invite(self, target: str | URI, sdp: bytes, *,
                     on_progress: Callable[[Response], None] | None = None,
                     timeout: float | None = None) -> Call:
        """Call `target` (a user name, 'user@host' or a SIP URI) and return the Call once
        the 2xx is ACKed. Raises CallFailed with the final status otherwise.

        With `timeout`, give up after that many seconds without an answer: the INVITE is
        CANCELled (§9.1) and CallFailed(487) raised. Cancelling the awaiting task CANCELs too."""
        uri = self._target_uri(target)
        request = self._new_request("INVITE", uri)
        request.headers.add("Contact", str(self.contact()))
        request.headers.add("Allow", ALLOW)
        request.headers.add("Content-Type", "application/sdp")
        request.body = sdp
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        answered: set[int] = set()
        for _attempt in range(3):
            outcome = await self._invite_once(request, on_progress, deadline)
            if isinstance(outcome, Call):
                return outcome
            retry = await self._answer_challenge(request, outcome, answered)
            if retry is None:
                raise CallFailed(outcome.status, outcome.reason, outcome)
            request = retry
        raise CallFailed(outcome.status, outcome.reason, outcome)

    def _target_uri(self, target: str | URI) -> URI:
        if not isinstance(target, str):
            return target
        if target.startswith(("sip:", "sips:")):
            return parse_sip_uri(target)
        if "@" in target:
            return parse_sip_uri(f"sip:{target}")
        return parse_sip_uri(f"sip:{target}@{self.config.domain}")

    async def _invite_once(self, request: Request, on_progress: Callable[[Response], None] | None,
                           deadline: float | None) -> Call | Response:
        txn = await self._send(request)
        inv = _Invitation(request, txn)
        self._pending[request.call_id] = (request, None)
        self._spawn(self._run_invitation(inv))
        loop = asyncio.get_running_loop()
        try:
            while True:
                if inv.cancel_sent:  # §9.1: a final response is due within 64*T1 of the CANCEL
                    wait: float | None = 64 * self.config.timers.t1
                elif inv.cancel_wanted or deadline is None:
                    wait = None  # (no provisional yet: Timer B ends the wait)
                else:
                    wait = max(0.0, deadline - loop.time())
                try:
                    item = await asyncio.wait_for(inv.queue.get(), wait)
                except asyncio.TimeoutError:
                    if inv.cancel_sent:
                        return make_response(request, 408, "Request Timeout")
                    log.info("[%s] no answer in time: cancelling", request.call_id)
                    inv.cancel_wanted = True
                    self._send_cancel(inv)
                    continue
                if item is None:
                    return make_response(request, 408, "Request Timeout")
                if isinstance(item, Call):
                    if inv.cancel_wanted:  # answered while our CANCEL was under way
                        self._spawn(item.bye())
                        return make_response(request, 487, "Request Terminated")
                    return item
                if item.status < 200:
                    if on_progress is not None and item.status > 100 and not inv.cancel_wanted:
                        on_progress(item)
                    continue
                return item
        except asyncio.CancelledError:
            inv.abandoned = inv.cancel_wanted = True
            self._send_cancel(inv)
            while not inv.queue.empty():
                item = inv.queue.get_nowait()
                if isinstance(item, Call):
                    self._spawn(item.bye())
            raise
        finally:
            inv.abandoned = True  # from now on, any new 2xx dialog is ACKed and hung up
            self._pending.pop(request.call_id, None)

    async def _run_invitation(self, inv: _Invitation) -> None:
        try:
            await self._read_invitation(inv)
        finally:
            inv.queue.put_nowait(None)

    async def _read_invitation(self, inv: _Invitation) -> None:
        async for response in inv.txn.responses():
            if response.status < 200:
                inv.provisional = True
                if inv.cancel_wanted:
                    self._send_cancel(inv)
                inv.queue.put_nowait(response)
                continue
            inv.final = True
            if response.status >= 300:
                inv.queue.put_nowait(response)
                continue
            tag = response.to.tag or ""
            known = inv.calls.get(tag)
            if known is not None:  # the 2xx again: our ACK was lost
                self._spawn(self._send_ack(known, response.cseq[0]))
                continue
            try:
                call = await self._establish(inv.request, response)
            except (ValueError, ParseError, CallFailed, OSError) as exc:
                log.warning("[%s] cannot use the %d: %s", inv.request.call_id, response.status, exc)
                continue
            inv.calls[tag] = call
            if len(inv.calls) > 1 or inv.abandoned:  # a second fork answered, or nobody wants it
                log.info("[%s] hanging up an unwanted 2xx (To tag %s)", call.call_id, tag)
                self._spawn(call.bye())
                continue
            inv.queue.put_nowait(call)

    def _send_cancel(self, inv: _Invitation) -> None:
        """§9.1: CANCEL only after a provisional response and before a final one."""
        if inv.cancel_sent or inv.final or not inv.provisional:
            return
        assert self.transactions is not None
        inv.cancel_sent = True
        self.transactions.send_request(make_cancel(inv.request), inv.txn.flow)
        self.transactions.give_up(inv.txn, 64 * self.config.timers.t1)

    async def _establish(self, request: Request, response: Response) -> Call:
        dialog = Dialog.from_uac(request, response)
        call = Call(self, dialog, request, request.body, response.body, outgoing=True)
        call._contact = request.headers.get("Contact")
        self._calls[dialog.id] = call
        await self._send_ack(call, request.cseq[0])
        call.acked.set()
        return call

    async def _send_ack(self, call: Call, cseq: int, invite: Request | None = None) -> None:
        """ACK the 2xx to our INVITE number `cseq`; the same ACK again for a retransmitted 2xx."""
        assert self.transactions is not None
        cached = call._acks.get(cseq)
        if cached is None:
            ack = call.dialog.create_request("ACK", cseq=cseq)
            source = invite if invite is not None else call.invite
            for name in _CREDENTIALS:
                for value in source.headers.get_all(name):
                    ack.headers.add(name, value)
            flow = self.transactions.add_via(ack, await self._flow_for(ack))
            cached = call._acks[cseq] = (ack, flow)
        self.transactions.send_stateless(*cached)

    async def _ack_retransmitted_2xx(self, txn: ClientTransaction, call: Call, cseq: int) -> None:
        """ACK again every retransmission of the 2xx to a re-INVITE while its transaction lives."""
        first = True
        async for response in txn.responses():
            if 200 <= response.status < 300:
                if not first:
                    await self._send_ack(call, cseq)
                first = False

    async def _retransmit_2xx(self, call: Call, response: Response, flow: Flow, cseq: int,
                              limit: float | None = None) -> bool:
        """§13.3.1.4: resend our 2xx at T1, 2*T1, ... (at most T2 apart) until the ACK
        arrives, for 64*T1 (`limit`). True once ACKed; False on timeout or when the call ended."""
        assert self.transactions is not None
        timers = self.config.timers
        event = call._ack_events.setdefault(cseq, asyncio.Event())
        target = response_target(response, flow)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (64 * timers.t1 if limit is None else limit)
        interval = timers.t1
        acked = asyncio.ensure_future(event.wait())
        try:
            while True:
                remaining = deadline - loop.time()
                if event.is_set():
                    return True
                if call.ended.done() or remaining <= 0:
                    return False
                await asyncio.wait({acked, call.ended}, timeout=min(interval, remaining),
                                   return_when=asyncio.FIRST_COMPLETED)
                if not event.is_set() and not call.ended.done() and not flow.reliable \
                        and loop.time() < deadline:
                    self.transactions.send_stateless(response, target)
                interval = min(2 * interval, timers.t2)
        finally:
            acked.cancel()
            call._ack_events.pop(cseq, None)

    async def _request_in_dialog(self, dialog: Dialog,
                                 request: Request) -> tuple[Response, ClientTransaction]:
        """Send an in-dialog request, answering a digest challenge from a proxy on the path."""
        answered: set[int] = set()
        for _attempt in range(3):
            txn = await self._send(request)
            response = await txn.wait_final()
            retry = await self._answer_challenge(request, response, answered)
            if retry is None:
                break
            dialog.local_seq = max(dialog.local_seq, retry.cseq[0])
            request = retry
        return response, txn

    async def _send_in_dialog(self, dialog: Dialog, request: Request) -> Response:
        return (await self._request_in_dialog(dialog, request))[0]

    # -- TransactionUser --------------------------------------------------------------------
    def on_request(self, txn: ServerTransaction) -> None:
        request = txn.request
        try:
            self._dispatch(txn, request)
        except ParseError as exc:
            _reply(txn, 400, f"Bad Request ({exc.reason})")

    def _dispatch(self, txn: ServerTransaction, request: Request) -> None:
        if not isinstance(request.uri, SipURI):  # §8.2.2.1 (RFC 4475 §3.3.2, §3.3.3)
            _reply(txn, 416)
            return
        if request.headers.get("Require"):  # §8.2.2.3
            _reply(txn, 420, headers=[("Unsupported", request.headers.get("Require") or "")])
            return
        dialog_id = dialog_id_of_request(request)
        if dialog_id is not None:
            self._in_dialog(txn, request, dialog_id)
            return
        if request.method == "INVITE":
            if self.on_invite is None:
                _reply(txn, 480, "No Handler")
                return
            incoming = IncomingCall(self, txn)
            self._incoming[txn] = incoming
            self._spawn(self._run_incoming(incoming))
        elif request.method == "OPTIONS":
            _reply(txn, 200, headers=[("Allow", ALLOW), ("Accept", "application/sdp"),
                                      ("Supported", "")])
        elif request.method == "BYE":
            _reply(txn, 481)
        elif request.method in ("REGISTER", "SUBSCRIBE", "NOTIFY", "MESSAGE", "INFO", "UPDATE",
                                "PRACK", "REFER", "PUBLISH"):
            _reply(txn, 405, headers=[("Allow", ALLOW)])
        else:
            _reply(txn, 501)

    async def _run_incoming(self, incoming: IncomingCall) -> None:
        assert self.on_invite is not None
        try:
            await self.on_invite(incoming)
        except CallFailed:
            pass
        except Exception:
            log.exception("[%s] the INVITE handler failed", incoming.call_id)
        finally:
            self._incoming.pop(incoming.txn, None)
            if not incoming.txn.final_sent:
                incoming.reject(500, "Server Internal Error")

    def _in_dialog(self, txn: ServerTransaction, request: Request,
                   dialog_id: tuple[str, str, str]) -> None:
        call = self._calls.get(dialog_id)
        if call is None:
            txn.reply(481)
            return
        if not call.dialog.accept_remote_cseq(request):
            txn.reply(500, "Out Of Order CSeq")
            return
        if request.method == "BYE":
            txn.reply(200)
            log.info("[%s] BYE received from %s", call.call_id, call.peer)
            call._end("remote BYE")
        elif request.method == "INVITE":  # session refresh: same session, same answer
            if call._reinviting:  # §14.2: glare with our own re-INVITE
                txn.reply(491)
                return
            call.dialog.update_target(request)
            if request.body:
                call.remote_sdp = request.body
            response = make_response(request, 200)
            response.headers.add("Contact", call._contact or str(self.contact(txn.flow.transport)))
            response.headers.add("Allow", ALLOW)
            response.headers.add("Content-Type", "application/sdp")
            response.body = call.local_sdp
            number = request.cseq[0]
            call._ack_events[number] = asyncio.Event()
            txn.respond(response)
            self._spawn(self._await_reinvite_ack(call, response, txn.flow, number))
        elif request.method in ("OPTIONS", "INFO"):
            txn.reply(200, headers=[("Allow", ALLOW)])
        else:  # UPDATE included: we cannot answer an offer in it
            txn.reply(405, headers=[("Allow", ALLOW)])

    async def _await_reinvite_ack(self, call: Call, response: Response, flow: Flow,
                                  number: int) -> None:
        if not await self._retransmit_2xx(call, response, flow, number) and not call.ended.done():
            log.warning("[%s] no ACK for our 200 to the re-INVITE: ending the session",
                        call.call_id)
            await call.bye()

    def on_ack(self, request: Request, flow: Flow) -> None:
        dialog_id = dialog_id_of_request(request)
        call = self._calls.get(dialog_id) if dialog_id else None
        if call is None:
            return
        call.acked.set()
        try:
            number = request.cseq[0]
        except ParseError:
            return
        event = call._ack_events.get(number)
        if event is not None:
            event.set()

    def on_cancel(self, txn: ServerTransaction) -> None:
        incoming = self._incoming.get(txn)
        if incoming is None:
            txn.respond(make_response(txn.request, 487, to_tag=new_tag()))
            return
        log.info("[%s] the caller cancelled", incoming.call_id)
        incoming.cancelled.set()
        incoming.reject(487)

    def on_stray_response(self, response: Response, flow: Flow) -> None:
        try:
            number, method = response.cseq
            if method != "INVITE" or not 200 <= response.status < 300:
                return
            dialog_id = (response.call_id, response.from_.tag or "", response.to.tag or "")
        except ParseError:
            return
        call = self._calls.get(dialog_id)
        if call is not None:
            self._spawn(self._send_ack(call, number))  # our ACK got lost: send it again
        elif response.call_id in self._pending:
            pass  # the transaction still delivers it
        else:
            log.debug("stray 2xx for an unknown dialog %s", response.call_id)

    def _spawn(self, coro: Awaitable[object]) -> asyncio.Task[object]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[object]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())


def _reply(txn: ServerTransaction, status: int, reason: str | None = None,
           headers: list[tuple[str, str]] | None = None) -> None:
    """Answer an out-of-dialog request: a To tag is added when the request had none (§8.2.6.2)."""
    txn.reply(status, reason, to_tag=new_tag(), headers=headers)


def _stale(response: Response) -> bool:
    for name in ("WWW-Authenticate", "Proxy-Authenticate"):
        for value in response.headers.get_all(name):
            try:
                if is_stale(value):
                    return True
            except AuthError:  # not a Digest challenge
                continue
    return False
