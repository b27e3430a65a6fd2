"""The user agent core (RFC 3261 §8, §10.2, §13-15): REGISTER, INVITE sessions, BYE.

It sits on the transaction layer and owns what RFC 3261 gives the TU: digest
retries, the ACK for 2xx, 2xx retransmission until ACK (§13.3.1.4), dialogs,
and answers to in-dialog and out-of-dialog requests. Applications see `Call`
objects; they decide nothing about SIP beyond accept or reject.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from sipmesh.sip.auth import AuthError, DigestClient, choose_challenge, is_stale
from sipmesh.sip.dialog import Dialog, DialogState, dialog_id_of_request, new_tag
from sipmesh.sip.errors import ParseError
from sipmesh.sip.headers import Address
from sipmesh.sip.message import Headers, Request, Response, make_response
from sipmesh.sip.transaction.layer import ClientTransaction, ServerTransaction, TransactionLayer
from sipmesh.sip.transaction.timers import TimerValues
from sipmesh.sip.transport.base import Flow, local_address_towards, resolve, uri_target
from sipmesh.sip.transport.layer import TransportLayer
from sipmesh.sip.uri import URI, SipURI, parse_sip_uri

log = logging.getLogger("sipmesh.sip.ua")

ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS"
USER_AGENT = "sipmesh/0.1"


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
        self._ack: Request | None = None
        self._ack_flow: Flow | None = None

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

    async def bye(self) -> None:
        """End the session (§15.1.1). Returns once the BYE transaction has ended."""
        if self.ended.done():
            return
        self._end("local BYE")
        request = self.dialog.create_request("BYE")
        try:
            response = await self.ua._send_in_dialog(self.dialog, request)
            log.info("[%s] BYE answered %d %s", self.call_id, response.status, response.reason)
        except OSError as exc:
            log.info("[%s] BYE not delivered: %s", self.call_id, exc)


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
            self.txn.respond(self._response(180))

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
        dialog = Dialog.from_uas(self.request, self.local_tag)
        response = self._response(200)
        response.headers.add("Contact", str(self.ua.contact(self.txn.flow.transport)))
        response.headers.add("Content-Type", "application/sdp")
        response.body = sdp
        call = Call(self.ua, dialog, self.request, sdp, self.request.body, outgoing=False)
        self.ua._calls[dialog.id] = call
        self.txn.respond(response)
        timers = self.ua.config.timers
        interval, waited = timers.t1, 0.0
        limit = ack_timeout if ack_timeout is not None else 64 * timers.t1
        while waited < limit:
            try:
                await asyncio.wait_for(call.acked.wait(), min(interval, limit - waited))
                return call
            except asyncio.TimeoutError:
                waited += min(interval, limit - waited)
                interval = min(interval * 2, timers.t2)
                if not self.txn.flow.reliable and waited < limit and not call.ended.done():
                    self.ua.transactions.send_stateless(response, self.txn.flow)
            if call.ended.done():
                break
        if not call.ended.done():
            log.warning("[%s] no ACK for our 200: ending the session", self.call_id)
            await call.bye()
        raise CallFailed(408, "No ACK received")

    def _response(self, status: int, reason: str | None = None) -> Response:
        response = make_response(self.request, status, reason, to_tag=self.local_tag)
        response.headers.add("Server", USER_AGENT)
        return response


IncomingHandler = Callable[[IncomingCall], Awaitable[None]]


class UserAgent:
    """A SIP user agent bound to one identity. Also a TransactionUser."""

    def __init__(self, config: UAConfig, on_invite: IncomingHandler | None = None) -> None:
        self.config = config
        self.on_invite = on_invite
        self.transport: TransportLayer | None = None
        self.transactions: TransactionLayer | None = None  # type: ignore[assignment]
        self._calls: dict[tuple[str, str, str], Call] = {}
        self._pending: dict[str, tuple[Request, Dialog | None]] = {}  # Call-ID of our INVITEs
        self._tasks: set[asyncio.Task[None]] = set()
        self._incoming: dict[ServerTransaction, IncomingCall] = {}
        self._digest = (DigestClient(config.auth_user or config.user, config.password)
                        if config.password is not None else None)
        self._register_call_id = secrets.token_hex(12)
        self._register_cseq = 0
        self.aor = parse_sip_uri(f"sip:{config.user}@{config.domain}")
        self.aor.port = None if self.aor.port == 5060 else self.aor.port

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        self.transport = TransportLayer(lambda m, f: None)
        port = self.config.listen_port
        for name in self.config.transports:
            _, bound = await self.transport.listen(name, self.config.listen_host, port)
            port = bound  # UDP and TCP share one port number
        self.config.listen_port = port
        self.transactions = TransactionLayer(self.transport, self, timers=self.config.timers)

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
        uri = SipURI(host=host, user=self.config.user, port=self.config.listen_port)
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

    async def request(self, request: Request) -> Response:
        """Send a non-INVITE request; answer one digest challenge (again if stale)."""
        for _attempt in range(3):
            txn = await self._send(request)
            response = await txn.wait_final()
            if response.status in (401, 407):
                retry = await self._with_auth(request, response)
                if retry is None or (_attempt > 0 and not _stale(response)):
                    return response
                request = retry
                continue
            return response
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
        response = await self.request(request)
        self._register_cseq = response.cseq[0] if response.cseq[1] == "REGISTER" else self._register_cseq
        return response

    async def invite(self, target: str | URI, sdp: bytes, *,
                     on_progress: Callable[[Response], None] | None = None,
                     timeout: float | None = None) -> Call:
        """Call `target` (a user name, 'user@host' or a SIP URI) and return the Call once
        the 2xx is ACKed. Raises CallFailed with the final status otherwise."""
        uri = self._target_uri(target)
        request = self._new_request("INVITE", uri)
        request.headers.add("Contact", str(self.contact()))
        request.headers.add("Allow", ALLOW)
        request.headers.add("Content-Type", "application/sdp")
        request.body = sdp
        for attempt in range(3):
            call = await asyncio.wait_for(self._invite_once(request, on_progress), timeout) \
                if timeout else await self._invite_once(request, on_progress)
            if isinstance(call, Call):
                return call
            response = call
            if response.status in (401, 407) and attempt < 2:
                retry = await self._with_auth(request, response)
                if retry is not None and (attempt == 0 or _stale(response)):
                    request = retry
                    continue
            raise CallFailed(response.status, response.reason, response)
        raise CallFailed(response.status, response.reason, response)

    def _target_uri(self, target: str | URI) -> URI:
        if not isinstance(target, str):
            return target
        if target.startswith(("sip:", "sips:")):
            return parse_sip_uri(target)
        if "@" in target:
            return parse_sip_uri(f"sip:{target}")
        return parse_sip_uri(f"sip:{target}@{self.config.domain}")

    async def _invite_once(self, request: Request,
                           on_progress: Callable[[Response], None] | None) -> Call | Response:
        txn = await self._send(request)
        self._pending[request.call_id] = (request, None)
        call: Call | None = None
        try:
            async for response in txn.responses():
                if response.status < 200:
                    if on_progress is not None and response.status > 100:
                        on_progress(response)
                    continue
                if response.status >= 300:
                    return response
                if call is not None:  # a second 2xx from a fork: ACK it and hang up
                    await self._ack_and_bye(request, response)
                    continue
                call = await self._establish(request, response)
                return call
            return make_response(request, 408, "Request Timeout")
        finally:
            self._pending.pop(request.call_id, None)

    async def _establish(self, request: Request, response: Response) -> Call:
        dialog = Dialog.from_uac(request, response)
        call = Call(self, dialog, request, request.body, response.body, outgoing=True)
        self._calls[dialog.id] = call
        await self._send_ack(call, request.cseq[0])
        call.acked.set()
        return call

    async def _send_ack(self, call: Call, cseq: int) -> None:
        if call._ack is None:
            ack = call.dialog.create_request("ACK", cseq=cseq)
            flow = await self._flow_for(ack)
            assert self.transactions is not None
            self.transactions.add_via(ack, flow)
            call._ack, call._ack_flow = ack, flow
        assert self.transactions is not None and call._ack_flow is not None
        self.transactions.send_stateless(call._ack, call._ack_flow)

    async def _ack_and_bye(self, request: Request, response: Response) -> None:
        dialog = Dialog.from_uac(request, response)
        extra = Call(self, dialog, request, request.body, response.body, outgoing=True)
        await self._send_ack(extra, request.cseq[0])
        await extra.bye()

    async def _send_in_dialog(self, dialog: Dialog, request: Request) -> Response:
        txn = await self._send(request)
        return await txn.wait_final()

    # -- TransactionUser --------------------------------------------------------------------
    def on_request(self, txn: ServerTransaction) -> None:
        request = txn.request
        try:
            self._dispatch(txn, request)
        except ParseError as exc:
            txn.reply(400, f"Bad Request ({exc.reason})")

    def _dispatch(self, txn: ServerTransaction, request: Request) -> None:
        if request.headers.get("Require"):
            txn.reply(420, headers=[("Unsupported", request.headers.get("Require") or "")])
            return
        dialog_id = dialog_id_of_request(request)
        if dialog_id is not None:
            self._in_dialog(txn, request, dialog_id)
            return
        if request.method == "INVITE":
            if self.on_invite is None:
                txn.reply(480, "No Handler")
                return
            incoming = IncomingCall(self, txn)
            self._incoming[txn] = incoming
            self._spawn(self._run_incoming(incoming))
        elif request.method == "OPTIONS":
            txn.reply(200, headers=[("Allow", ALLOW), ("Accept", "application/sdp"),
                                    ("Supported", "")])
        elif request.method == "BYE":
            txn.reply(481)
        elif request.method in ("REGISTER", "SUBSCRIBE", "NOTIFY", "MESSAGE", "INFO", "UPDATE",
                                "PRACK", "REFER", "PUBLISH"):
            txn.reply(405, headers=[("Allow", ALLOW)])
        else:
            txn.reply(501)

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
            call.dialog.update_target(request)
            response = make_response(request, 200)
            response.headers.add("Contact", str(self.contact(txn.flow.transport)))
            response.headers.add("Content-Type", "application/sdp")
            response.body = call.local_sdp
            txn.respond(response)
        elif request.method in ("OPTIONS", "INFO", "UPDATE"):
            txn.reply(200, headers=[("Allow", ALLOW)])
        else:
            txn.reply(405, headers=[("Allow", ALLOW)])

    def on_ack(self, request: Request, flow: Flow) -> None:
        dialog_id = dialog_id_of_request(request)
        call = self._calls.get(dialog_id) if dialog_id else None
        if call is not None:
            call.acked.set()

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
        except ParseError:
            return
        if method != "INVITE" or not 200 <= response.status < 300:
            return
        dialog_id = (response.call_id, response.from_.tag or "", response.to.tag or "")
        call = self._calls.get(dialog_id)
        if call is not None and call.outgoing:
            self._spawn(self._send_ack(call, number))  # our ACK got lost: send it again
        elif response.call_id in self._pending:
            pass  # the transaction still delivers it
        else:
            log.debug("stray 2xx for an unknown dialog %s", response.call_id)

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _stale(response: Response) -> bool:
    for name in ("WWW-Authenticate", "Proxy-Authenticate"):
        if any(is_stale(v) for v in response.headers.get_all(name)):
            return True
    return False
