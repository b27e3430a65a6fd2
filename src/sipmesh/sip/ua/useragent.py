"""The user agent core (RFC 3261 §8, §10.2, §13-15): one identity, its REGISTER, its calls.

It sits on the transaction layer and is its transaction user: it sends out-of-dialog
requests (answering digest challenges), REGISTERs, and dispatches what arrives to the
call it belongs to (`call.Call`), to the application as a new INVITE
(`invite_server.IncomingCall`), or answers it itself. Calling out is
`invite_client`. Applications see `Call` objects; they decide nothing about SIP
beyond accept or reject.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from sipmesh.sip.auth import AuthError, DigestClient, choose_challenge, is_stale
from sipmesh.sip.dialog import dialog_id_of_request, new_tag
from sipmesh.sip.errors import ParseError
from sipmesh.sip.headers import Address
from sipmesh.sip.message import Headers, Request, Response, make_response
from sipmesh.sip.transaction.layer import ClientTransaction, ServerTransaction, TransactionLayer
from sipmesh.sip.transaction.timers import TimerValues
from sipmesh.sip.transport.base import Flow, Inbound, local_address_towards
from sipmesh.sip.transport.layer import KEEPALIVE_INTERVAL, TransportLayer
from sipmesh.sip.transport.resolve import ResolveError
from sipmesh.sip.ua.call import ALLOW, USER_AGENT, Call, CallFailed
from sipmesh.sip.ua.invite_client import ProgressHandler, send_invite
from sipmesh.sip.ua.invite_server import IncomingCall
from sipmesh.sip.ua.redirect import Redirects, redirected
from sipmesh.sip.ua.liveness import DEFAULT_INTERVAL as DEFAULT_PEER_KEEPALIVE
from sipmesh.sip.ua.subscription import Subscription
from sipmesh.sip.uri import URI, SipURI, is_ip, parse_sip_uri

log = logging.getLogger("sipmesh.sip.ua")


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
    # Probe an established call's peer after this many seconds of silence, and end the
    # call when it is gone (call.py, liveness.py); 0: never.
    peer_keepalive: float = DEFAULT_PEER_KEEPALIVE
    # More SIP servers (host[:port]) after `domain`: we register at each, and a new request
    # to one of them goes to the next when it fails (no answer within `failover_wait` s,
    # 503, transport error); see `alternatives`. Without them, a `domain` that is a name
    # without a port may list its servers in DNS (SRV): see `UserAgent.find_servers`.
    servers: tuple[str, ...] = ()
    failover_wait: float = 2.0
    # Our +sip.instance in REGISTER (RFC 5626 §4.1), e.g. "<urn:uuid:...>"; None: none.
    instance: str | None = None


IncomingHandler = Callable[[IncomingCall], Awaitable[None]]


class UserAgent:
    """A SIP user agent bound to one identity. Also a TransactionUser."""

    def __init__(self, config: UAConfig, on_invite: IncomingHandler | None = None) -> None:
        self.config = config
        self.on_invite = on_invite
        self.transport: TransportLayer | None = None
        self.transactions: TransactionLayer | None = None  # type: ignore[assignment]
        # Call-IDs of our INVITEs still awaiting their outcome (see invite_client).
        self.pending_invites: set[str] = set()
        self._calls: dict[tuple[str, str, str], Call] = {}
        self._tasks: set[asyncio.Task[object]] = set()
        self._incoming: dict[ServerTransaction, IncomingCall] = {}
        self._ports: dict[str, int] = {}  # bound port per transport
        self._digest = (DigestClient(config.auth_user or config.user, config.password)
                        if config.password is not None else None)
        self._keepalive: dict[str, tuple[Flow, asyncio.Task[object]]] = {}  # by server
        self._server_failed: dict[str, float] = {}  # server -> when a request to it last failed
        self._found: list[str] = []  # our servers by DNS SRV (find_servers), if any
        # seconds the SRV answer behind `_found` holds (find_servers); None: not by SRV
        self.servers_ttl: float | None = None
        self.server_names: dict[str, str] = {}  # a found server -> its SRV target name
        self._subscriptions: dict[tuple[str, str], Subscription] = {}  # by (Call-ID, our tag)
        # REGISTER's Call-ID and last CSeq per AOR we register (§10.2: one Call-ID per
        # registrar and AOR, CSeq increasing)
        self._register_state: dict[tuple[str, str], tuple[str, int]] = {}
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
        port = self._ports.get(transport)
        if port is None:  # e.g. TLS without a listener: our end of the connection
            bound = self.transport.address(transport) if self.transport is not None else None
            port = bound[1] if bound is not None else self.config.listen_port
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

    def add_call(self, call: Call) -> None:
        """Dispatch the requests of `call`'s dialog to it from now on."""
        self._calls[call.dialog.id] = call

    def forget_call(self, call: Call) -> None:
        if self._calls.get(call.dialog.id) is call:
            del self._calls[call.dialog.id]

    # -- requests we send ------------------------------------------------------------------
    def new_request(self, method: str, uri: URI, *, to: Address | None = None,
                    call_id: str | None = None, from_tag: str | None = None, cseq: int = 1) -> Request:
        """An out-of-dialog request from our AOR (a new From tag and Call-ID unless given)."""
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

    async def flow_for(self, request: Request) -> Flow:
        """The first hop of `request`: its first Route if loose-routing, else its Request-URI."""
        routes = request.addresses("Route")
        hop = routes[0].uri if routes and isinstance(routes[0].uri, SipURI) and routes[0].uri.lr \
            else request.uri
        if not isinstance(hop, SipURI):
            raise CallFailed(416, "Unsupported URI Scheme")
        assert self.transactions is not None
        try:
            return await self.transactions.resolver.uri_flow(hop, self.config.transport)
        except ResolveError as exc:
            raise CallFailed(503, str(exc)) from None

    async def send(self, request: Request) -> ClientTransaction:
        """Start a client transaction for `request` towards its first hop (our Via added)."""
        assert self.transactions is not None
        flow = await self.flow_for(request)
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

    async def answer_challenge(self, request: Request, response: Response,
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
        return (await self.transact(request))[0]

    async def transact(self, request: Request, *, on_retry: Callable[[Request], None] | None = None
                       ) -> tuple[Response, ClientTransaction]:
        """Send `request` and await its final response, answering digest challenges (again
        if stale) and, out of a dialog (not REGISTER), following 3xx redirects (redirect.py);
        `on_retry` sees each retry made. The final response and its transaction."""
        follow = request.method != "REGISTER" and request.to.tag is None
        redirects = Redirects(request.uri)
        while True:
            answered: set[int] = set()
            for _attempt in range(3):
                txn = await self.send(request)
                response = await txn.wait_final()
                retry = await self.answer_challenge(request, response, answered)
                if retry is None:
                    break
                if on_retry is not None:
                    on_retry(retry)
                request = retry
            if not follow:
                return response, txn
            redirects.on_response(request.uri, response)
            target = redirects.next()
            if target is None:
                status, reason, final = redirects.failure(response)
                if final.status != status:  # a loop or too many redirects: say so
                    final = make_response(request, status, reason)
                return final, txn
            log.info("[%s] %d %s: trying %s", request.call_id, response.status, response.reason,
                     target)
            request = redirected(request, target)
            if on_retry is not None:
                on_retry(request)

    async def register(self, expires: int = 3600, *, aor: SipURI | None = None,
                       contact: Address | None = None, server: str | None = None) -> Response:
        """REGISTER our Contact for `expires` seconds (0 removes it), under our AOR or
        under `aor` (another address-of-record, e.g. a mesh network's) with `contact`,
        at `server` (default: `domain`). Our own Contact carries our +sip.instance."""
        if contact is None:
            contact = self.contact()
            if self.config.instance:
                contact.params["+sip.instance"] = f'"{self.config.instance}"'
        return await self._register(aor, contact, expires, server)

    async def fetch_bindings(self, aor: SipURI | None = None, *, server: str | None = None) -> Response:
        """REGISTER without a Contact (RFC 3261 §10.2.3) at `server` (default: `domain`):
        the 200 lists `aor`'s bindings there."""
        return await self._register(aor, None, None, server)

    async def _register(self, aor: SipURI | None, contact: Address | None, expires: int | None,
                        server: str | None = None) -> Response:
        server = server or self.config.domain
        registrar = parse_sip_uri(f"sip:{server}")
        if self.config.transport != "UDP":
            registrar.params["transport"] = self.config.transport.lower()
        aor = (aor or self.aor).copy()
        key = (server, str(aor))
        call_id, cseq = self._register_state.get(key) or (secrets.token_hex(12), 0)
        request = self.new_request("REGISTER", registrar, to=Address(aor), call_id=call_id, cseq=cseq + 1)
        request.headers.remove("Route")
        if contact is not None:
            request.headers.add("Contact", str(contact))
        if expires is not None:
            request.headers.add("Expires", str(expires))
        flow = await self.flow_for(request)
        self._register_state[key] = (call_id, cseq + 1)
        response = await self.request(request)
        if response.cseq[1] == "REGISTER":  # a digest retry took the next CSeq
            self._register_state[key] = (call_id, max(cseq + 1, response.cseq[0]))
        if 200 <= response.status < 300 and expires is not None:
            if expires > 0:
                self._keep_alive(server, flow)
            elif key[1] == str(self.aor):  # our own name leaves: no more keep-alives
                self._keep_alive(server, None)
        return response

    def _keep_alive(self, server: str, flow: Flow | None) -> None:
        """Keep-alives on the flow of the registration at `server` (one each), or none."""
        current = self._keepalive.get(server)
        if current is not None and current[0] != flow:
            current[1].cancel()
            del self._keepalive[server]
        if flow is not None and server not in self._keepalive and self.config.keepalive > 0:
            assert self.transport is not None
            self._keepalive[server] = (flow, self.spawn(self.transport.keep_alive(
                flow, self.config.keepalive)))

    async def subscribe(self, target: str | URI, event: str, *, accept: str,
                        expires: int = 3600) -> Subscription:
        """SUBSCRIBE to `event` of `target` (RFC 6665); the Subscription once the SUBSCRIBE
        has its final response (see `Subscription.ended` for a refusal)."""
        subscription = Subscription(self, self.target_uri(target), event, accept=accept, expires=expires)
        await subscription.start()
        return subscription

    def add_subscription(self, subscription: Subscription) -> None:
        """Hand the NOTIFYs of `subscription` (matched by Call-ID and our tag) to it."""
        self._subscriptions[subscription.key] = subscription

    def forget_subscription(self, subscription: Subscription) -> None:
        self._subscriptions.pop(subscription.key, None)

    async def invite(self, target: str | URI, sdp: bytes, *,
                     on_progress: ProgressHandler | None = None,
                     timeout: float | None = None, call_id: str | None = None,
                     headers: list[tuple[str, str]] | None = None) -> Call:
        """Call `target` (a user name, 'user@host' or a SIP URI) and return the Call once
        the 2xx is ACKed. Raises CallFailed with the final status otherwise. `call_id`:
        the dialog's Call-ID, when the offer must name it (a signed session).

        With `timeout`, give up after that many seconds without an answer: the INVITE is
        CANCELled (§9.1) and CallFailed(487) raised. Cancelling the awaiting task CANCELs too."""
        return await send_invite(self, self.target_uri(target), sdp, on_progress=on_progress,
                                 timeout=timeout, call_id=call_id, headers=headers)

    def target_uri(self, target: str | URI) -> URI:
        """The URI of `target`: a SIP URI, 'user@host', or a user name in our domain."""
        if not isinstance(target, str):
            return target
        if target.startswith(("sip:", "sips:")):
            return self._at_found_server(parse_sip_uri(target))
        if "@" in target:
            return self._at_found_server(parse_sip_uri(f"sip:{target}"))
        return parse_sip_uri(f"sip:{target}@{self.live_servers()[0]}")

    def _at_found_server(self, uri: SipURI) -> SipURI:
        """A name in the domain whose servers we found by SRV goes to one of them (so that
        it fails over between them as a name at one of our servers does)."""
        if self._found and uri.port is None and \
                uri.host.lower().rstrip(".") == self.config.domain.lower().rstrip("."):
            at = parse_sip_uri(f"sip:{self.live_servers()[0]}")
            return uri.copy(host=at.host, port=at.port)
        return uri

    # -- several servers ----------------------------------------------------------------
    @property
    def servers(self) -> list[str]:
        """Our SIP servers (host[:port]): `domain` first, then `servers`; or those that
        `find_servers` found."""
        if self._found:
            return list(self._found)
        return [self.config.domain, *(s for s in self.config.servers if s != self.config.domain)]

    async def find_servers(self) -> list[str]:
        """RFC 3263 for an agent given one server that is a name without a port (a
        domain): its SRV records for our transport (named by its NAPTR records, if any),
        each target at its first address, in the order to try them (priority, then
        weight), become our `servers`, so that we register at each and fail over between
        them as with servers given one by one.
        No SRV records: `domain` stays our one server (its A/AAAA). Returns `servers`.
        Called again once `servers_ttl` has run out, it follows the records as they
        change (agent/endpoint.py registers at new servers, leaves removed ones)."""
        domain = self.config.domain
        if self.config.servers or not names_a_domain(domain):
            return self.servers
        assert self.transactions is not None, "start() first"
        found, ttl = await self.transactions.resolver.srv_servers(
            domain, self.config.transport, naptr=True)
        before = self.servers
        self._found, self.server_names = [], {}
        for target, flow in found:
            server = f"[{flow.host}]:{flow.port}" if ":" in flow.host else f"{flow.host}:{flow.port}"
            if server not in self._found:
                self._found.append(server)
                self.server_names[server] = target
        self.servers_ttl = ttl if found or self.servers_ttl is not None else None
        if self._found and self.servers != before:
            log.info("SIP servers of %s by DNS SRV: %s", domain, ", ".join(
                f"{self.server_names[s]} ({s})" for s in self._found))
        return self.servers

    def forget_server(self, server: str) -> None:
        """`server` is no longer one of ours (DNS stopped listing it): no more keep-alives
        on its flow, its failures forgotten."""
        self._keep_alive(server, None)
        self._server_failed.pop(server, None)

    def live_servers(self) -> list[str]:
        """`servers`, those a request failed at last in the end (the longest ago first)."""
        return sorted(self.servers, key=lambda s: self._server_failed.get(s, 0.0))

    def server_failed(self, server: str, failed: bool = True) -> None:
        """A request to `server` failed (or, `failed` False, succeeded)."""
        if failed:
            self._server_failed[server] = asyncio.get_running_loop().time()
        else:
            self._server_failed.pop(server, None)

    def server_of(self, uri: URI) -> str | None:
        """Which of our servers `uri` names by its host and port, if any."""
        if not isinstance(uri, SipURI):
            return None
        for server in self.servers:
            if _host_port(server) == _host_port(uri):
                return server
        return None

    def alternatives(self, uri: URI) -> list[SipURI]:
        """`uri` sent to each of our other servers instead (live ones first), when it
        names one of ours and we have several; else nothing."""
        server = self.server_of(uri)
        if server is None or len(self.servers) < 2:
            return []
        assert isinstance(uri, SipURI)
        found = []
        for other in self.live_servers():
            if other != server:
                at = parse_sip_uri(f"sip:{other}")
                found.append(uri.copy(host=at.host, port=at.port))
        return found

    def live_target(self, uri: URI) -> URI:
        """`uri` at the live server we would send a new request to: one of ours (given,
        or a name in the domain whose servers SRV gave) moves to the first live one."""
        if not isinstance(uri, SipURI):
            return uri
        if self.server_of(uri) is not None and len(self.servers) > 1:
            at = parse_sip_uri(f"sip:{self.live_servers()[0]}")
            return uri.copy(host=at.host, port=at.port)
        return self._at_found_server(uri)

    def _replaced_call(self, txn: ServerTransaction, value: str) -> Call | None:
        """The call an INVITE with Replaces (RFC 3891) names, if its sender may replace
        it (the dialog's peer: its From is the dialog's remote URI); else answered here
        (481, 403) and None."""
        call_id, _, rest = value.partition(";")
        params = dict(p.strip().partition("=")[::2] for p in rest.split(";") if p.strip())
        call = self._calls.get((call_id.strip(), params.get("to-tag", ""),
                                params.get("from-tag", "")))
        if call is None or call.ended.done():
            _reply(txn, 481, "Call/Transaction Does Not Exist")
            return None
        caller = txn.request.from_.uri
        remote = call.dialog.remote_uri.uri
        if not (isinstance(caller, SipURI) and isinstance(remote, SipURI)
                and caller.user == remote.user and caller.host.lower() == remote.host.lower()):
            _reply(txn, 403, "Forbidden (not the peer of that dialog)")
            return None
        return call

    async def _replace(self, txn: ServerTransaction, call: Call) -> None:
        """The peer of `call` moves it to a new dialog (its route went through a server
        of ours that died: `Call._reroute`): we answer with the call's own SDP and the
        Call goes on in the new dialog; the session above sees no change."""
        try:
            new = await IncomingCall(self, txn).accept(call.local_sdp)
        except CallFailed as exc:
            log.warning("[%s] the Replaces INVITE failed: %s", call.call_id, exc)
            return
        log.info("[%s] the peer moved the session to dialog %s (Replaces)", call.call_id,
                 new.call_id)
        call.adopt(new)

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
        if request.method == "NOTIFY":
            subscription = self._subscriptions.get((request.call_id, request.to.tag or ""))
            if subscription is not None:
                subscription.on_notify(txn)
                return
        dialog_id = dialog_id_of_request(request)
        if dialog_id is not None:
            call = self._calls.get(dialog_id)
            if call is None:
                txn.reply(481)
            else:
                call.on_request(txn)
            return
        if request.method == "INVITE" and request.headers.get("Replaces") is not None:
            call = self._replaced_call(txn, request.headers.get("Replaces") or "")
            if call is not None:
                self.spawn(self._replace(txn, call))
            return
        if request.method == "INVITE":
            if self.on_invite is None:
                _reply(txn, 480, "No Handler")
                return
            incoming = IncomingCall(self, txn)
            self._incoming[txn] = incoming
            self.spawn(self._run_incoming(incoming))
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

    def on_ack(self, request: Request, flow: Flow) -> None:
        dialog_id = dialog_id_of_request(request)
        call = self._calls.get(dialog_id) if dialog_id else None
        if call is not None:
            call.on_ack(request)

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
            self.spawn(call.send_ack(number))  # our ACK got lost: send it again
        elif response.call_id in self.pending_invites:
            pass  # the transaction still delivers it
        else:
            log.debug("stray 2xx for an unknown dialog %s", response.call_id)

    def spawn(self, coro: Awaitable[object]) -> asyncio.Task[object]:
        """Run `coro` as a task of this UA: cancelled by `stop`, its failure logged."""
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


def names_a_domain(server: str) -> bool:
    """Is host[:port] a name without a port: one whose servers DNS SRV may list (§4.2)?"""
    return not is_ip(server.strip("[]")) and ":" not in server.rsplit("]", 1)[-1]


def _host_port(where: str | SipURI) -> str:
    """host:port of a server (host[:port]) or URI, for comparing them (5060 if none)."""
    uri = parse_sip_uri(f"sip:{where}") if isinstance(where, str) else where
    return f"{uri.host.lower().strip('[]')}:{uri.port or (5061 if uri.secure else 5060)}"
