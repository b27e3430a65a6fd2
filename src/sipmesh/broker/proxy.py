"""The transaction-stateful proxy core (RFC 3261 §16).

What is here: request validation that only a proxy does (§16.3: Max-Forwards, loop
detection, Proxy-Require), Route pre-processing (§16.4), forwarding to one or more
targets (§16.6) with Record-Route and a loop-detecting branch, the response context
of each forwarded request (§16.7: best-response selection, 6xx and 2xx cancelling
the other branches, Timer C), CANCEL (§16.10) and stateless forwarding of ACKs for
2xx and of stray responses (§16.11).

What is not: deciding where a request goes. The broker's pipeline looks the
Request-URI up in the location service and hands `Target`s to `Proxy.forward`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from dataclasses import dataclass

from sipmesh.broker import nat
from sipmesh.broker.domains import LocalIdentity
from sipmesh.sip.dialog import new_tag
from sipmesh.sip.errors import ParseError
from sipmesh.sip.grammar import MAGIC_COOKIE
from sipmesh.sip.headers import parse_address, parse_via
from sipmesh.sip.message import Request, Response, make_response, with_tag
from sipmesh.sip.transaction.client import make_cancel
from sipmesh.sip.transaction.layer import ClientTransaction, ServerTransaction, TransactionLayer
from sipmesh.sip.transport.base import Flow, response_target, uri_target
from sipmesh.sip.transport.resolve import ResolveError
from sipmesh.sip.uri import SipURI, is_ip

log = logging.getLogger("sipmesh.broker.proxy")

# Our branches: magic cookie + "sm" + worker number + "." + loop hash + "." + unique part.
# The worker number lets a multi-process broker hand a response to the process that
# holds its client transaction; the loop hash implements §16.3 step 4.
BRANCH_PREFIX = MAGIC_COOKIE + "sm"
DIALOG_CREATING = frozenset({"INVITE", "SUBSCRIBE", "REFER"})
_PREFERRED_4XX = (401, 407, 415, 420, 484)  # §16.7 step 6: they tell how to resubmit


def loop_hash(request: Request) -> str:
    """§16.6 step 8 without the topmost Via: a looped request comes back with another
    top Via but the same Request-URI, tags, Call-ID and CSeq; a spiral changes the
    Request-URI. (Including the top Via, as §16.6 suggests, would hide every loop.)"""
    h = hashlib.blake2b(digest_size=6)
    for part in (str(request.uri), request.headers.get("From") or "", request.headers.get("To") or "",
                 request.headers.get("Call-ID") or "", request.headers.get("CSeq") or ""):
        h.update(part.encode("utf-8", "surrogateescape"))
        h.update(b"\n")
    for name in ("Proxy-Require", "Proxy-Authorization"):
        for value in request.headers.get_all(name):
            h.update(value.encode("utf-8", "surrogateescape"))
            h.update(b"\n")
    return h.hexdigest()


def make_branch(worker: int, loop: str, unique: str | None = None) -> str:
    return f"{BRANCH_PREFIX}{worker}.{loop}.{unique or secrets.token_hex(6)}"


def branch_worker(branch: str | None) -> int | None:
    """The worker number inside one of our branches, None for anyone else's."""
    if not branch or not branch.startswith(BRANCH_PREFIX):
        return None
    number = branch[len(BRANCH_PREFIX):].split(".", 1)[0]
    return int(number) if number.isdigit() else None


def _branch_loop(branch: str) -> str | None:
    parts = branch[len(BRANCH_PREFIX):].split(".")
    return parts[1] if len(parts) >= 3 else None


@dataclass(slots=True)
class Target:
    """Where one branch goes: a Request-URI, and the flow to use when known (the
    source of the REGISTER that created the binding: how a NATed UA is reached)."""

    uri: SipURI
    flow: Flow | None = None
    q: float = 1.0
    alias: bool = False   # the flow was the Request-URI's alias: it holds whatever transport
    #                       the URI names (a UA that sent a large request over TCP, §18.1.1)


@dataclass(eq=False, slots=True)
class Branch:
    request: Request
    flow: Flow
    client: ClientTransaction | None = None
    provisional: bool = False
    final: Response | None = None
    cancel_pending: bool = False
    cancelled: bool = False
    timer_c: asyncio.TimerHandle | None = None
    # The branch never went out (its next hop does not resolve, say): its final response
    # was made here from the request as received, and has no Via of ours to remove.
    local: bool = False


def _status_rank(response: Response) -> tuple[int, int]:
    """Lower is better, within §16.7 step 6's rules for 3xx-6xx."""
    status = response.status
    if status >= 600:
        return (0, 0)
    klass = status // 100
    return (klass, 0 if status in _PREFERRED_4XX else 1)


class ResponseContext:
    """§16.7: the branches of one forwarded request and what has been sent upstream."""

    def __init__(self, proxy: "Proxy", server: ServerTransaction) -> None:
        self.proxy = proxy
        self.server = server
        self.request = server.request
        self.invite = self.request.method == "INVITE"
        self.branches: list[Branch] = []
        self.no_new_branches = False  # after a 6xx, a 2xx or a CANCEL (§16.7 step 5)
        self.starting = True  # branches are still being created: no best response yet

    @property
    def done(self) -> bool:
        return not self.starting and all(b.final is not None for b in self.branches)

    def started(self) -> None:
        """Every branch exists now: if they all failed already, answer."""
        self.starting = False
        if self.done and not self.server.final_sent:
            self.server.respond(self._best())
            self.proxy.answered(self)

    # -- responses from downstream -----------------------------------------------------
    async def pump(self, branch: Branch) -> None:
        assert branch.client is not None
        try:
            async for response in branch.client.responses():
                self.on_response(branch, response)
        except Exception:
            log.exception("error relaying a response for %s", self.request.call_id)
        finally:
            if branch.final is None:  # the transaction ended without a final response
                self.on_response(branch, make_response(branch.request, 408))

    def on_response(self, branch: Branch, response: Response) -> None:
        status = response.status
        if status < 200:
            if branch.final is not None:
                return
            branch.provisional = True
            if self.invite and status > 100:
                self.proxy._arm_timer_c(self, branch)
            if branch.cancel_pending:
                self.proxy._send_cancel(branch)
            if status > 100 and not self.server.final_sent:
                self.server.respond(self._upstream(response, branch))
            return
        if 200 <= status < 300:
            first = branch.final is None
            branch.final = branch.final or response
            self._stop_timer_c(branch)
            if not self.server.final_sent:
                self.server.respond(self._upstream(response, branch))
                self.proxy.answered(self)
            elif self.invite:
                # §16.7 step 9: every 2xx to an INVITE goes upstream, retransmissions too
                up = self._upstream(response, branch)
                self.proxy.transactions.send_stateless(up, response_target(up, self.server.flow))
            if self.invite and first:
                self.no_new_branches = True
                self.cancel_others(branch, 'SIP;cause=200;text="Call completed elsewhere"')
            return
        if branch.final is not None:
            return  # the transaction layer absorbs retransmitted finals; be safe anyway
        branch.final = response
        self._stop_timer_c(branch)
        if status >= 600:
            self.no_new_branches = True
            self.cancel_others(branch, None)
        if self.done and not self.server.final_sent:
            self.server.respond(self._best())
            self.proxy.answered(self)

    def fail(self, branch: Branch, status: int, reason: str) -> None:
        """End a branch that could not be sent (RFC 3263 §4.3: as if it got a 503)."""
        branch.local = True
        self.on_response(branch, make_response(self.request, status, reason))

    def _stop_timer_c(self, branch: Branch) -> None:
        if branch.timer_c is not None:
            branch.timer_c.cancel()
            branch.timer_c = None

    def _upstream(self, response: Response, branch: Branch | None = None) -> Response:
        """§16.7 step 9: the response without our Via; the Contact marked with the flow
        it came on if it came from a UA behind NAT (the next hop was the Request-URI)."""
        headers = response.headers.copy()
        headers.pop_first("Via")
        up = Response(headers=headers, status=response.status, reason=response.reason,
                      body=response.body)
        if branch is not None and self.proxy.record_route and branch.request.headers.get("Route") is None \
                and nat.response_from_nat(up, branch.flow):
            nat.add_alias(up, branch.flow)
        return up

    def _best(self) -> Response:
        """§16.7 steps 6-7: the best final response, challenges merged, a downstream 503
        as 500 (ours, for a next hop that cannot be reached, stays 503)."""
        ended = [b for b in self.branches if b.final is not None]
        if not ended:  # no branch was ever started
            return make_response(self.request, 487 if self.server.cancelled else 480, to_tag=new_tag())
        chosen = min(ended, key=lambda b: _status_rank(b.final))  # type: ignore[arg-type]
        best = chosen.final
        assert best is not None
        up = best if chosen.local else self._upstream(best)
        if best.status in (401, 407):
            for other in (b.final for b in ended):
                if other is best or other is None or other.status not in (401, 407):
                    continue
                for name in ("WWW-Authenticate", "Proxy-Authenticate"):
                    for value in other.headers.get_all(name):
                        if value not in up.headers.get_all(name):
                            up.headers.add(name, value)
        if up.status == 503 and not chosen.local:
            # §16.7 step 6: a downstream 503 is not passed on, it would stop the caller
            up.status, up.reason = 500, "Server Internal Error"
        _ensure_to_tag(up)
        return up

    # -- cancelling --------------------------------------------------------------------
    def cancel_others(self, keep: Branch | None, reason: str | None) -> None:
        if not self.invite:
            return
        for branch in self.branches:
            if branch is not keep:
                self.proxy._cancel_branch(branch, reason)

    def cancel_all(self) -> None:
        self.no_new_branches = True
        self.cancel_others(None, None)


def _ensure_to_tag(response: Response) -> None:
    """A response we generate (408, or a 503 turned 500) must carry a To tag (§8.2.6.2)."""
    if response.status <= 100:
        return
    try:
        to = response.to
    except ParseError:
        return
    if to.tag is None:
        response.headers.set("To", with_tag(response.headers.get("To") or "", new_tag()))


class Proxy:
    def __init__(self, transactions: TransactionLayer, me: LocalIdentity, *, worker: int = 0,
                 record_route: bool = True, timer_c: float = 180.0) -> None:
        self.transactions = transactions
        self.me = me
        self.worker = worker
        self.record_route = record_route
        self.timer_c = timer_c
        self._contexts: dict[ServerTransaction, ResponseContext] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # -- §16.3: validation --------------------------------------------------------------
    def check(self, request: Request) -> tuple[int, str | None, list[tuple[str, str]]] | None:
        """Steps 3-5 of §16.3; the error response (status, reason, headers) or None."""
        mf = request.headers.get("Max-Forwards")
        if mf is not None and int(mf) == 0:
            return 483, None, []
        if self.looped(request):
            return 482, None, []
        required = [v.strip() for v in request.headers.get_all("Proxy-Require") for v in v.split(",")]
        required = [v for v in required if v]
        if required:
            return 420, None, [("Unsupported", ", ".join(required))]
        return None

    def looped(self, request: Request) -> bool:
        """§16.3 step 4: one of our Vias carries the loop hash this request has now."""
        ours = [v for v in request.headers.get_all("Via") if BRANCH_PREFIX in v]
        if not ours:
            return False
        mine = loop_hash(request)
        for value in ours:
            try:
                via = parse_via(value)
            except ParseError:
                continue
            branch = via.branch or ""
            if branch.startswith(BRANCH_PREFIX) and self.me.is_our_sent_by(via.host, via.port) \
                    and _branch_loop(branch) == mine:
                return True
        return False

    # -- §16.4: Route information preprocessing -----------------------------------------
    def preprocess_routes(self, request: Request) -> bool:
        """Undo a strict router's rewrite and pop the Route values naming us; True if
        the request was routed to us (it belongs to a dialog we record-routed)."""
        routed = False
        routes = request.headers.get_all("Route")
        uri = request.uri
        if routes and isinstance(uri, SipURI) and uri.user is None and self.me.is_ours(uri):
            # The previous hop was a strict router: the real Request-URI is the last Route.
            try:
                last = parse_address(routes[-1]).uri
            except ParseError:
                last = None
            if isinstance(last, SipURI):
                request.uri = last
                request.headers.remove("Route")
                for value in routes[:-1]:
                    request.headers.add("Route", value)
                routed = True
        while True:
            first = request.headers.get("Route")
            if first is None:
                break
            try:
                route = parse_address(first).uri
            except ParseError:
                break
            if not (isinstance(route, SipURI) and self.me.is_ours(route)):
                break
            request.headers.pop_first("Route")
            routed = True
        return routed

    # -- §16.6: forwarding -----------------------------------------------------------------
    def forward(self, server: ServerTransaction, targets: list[Target], *,
                loop: str | None = None) -> ResponseContext:
        """Fork `server.request` to every target in parallel (§16.5-16.7)."""
        ctx = ResponseContext(self, server)
        self._contexts[server] = ctx
        loop = loop or loop_hash(server.request)
        if self.record_route and nat.request_from_nat(server.request, server.flow):
            nat.add_alias(server.request, server.flow)  # before the branches copy it
        pending: list[tuple[Request, Target]] = []
        for target in targets:
            copy = self._copy_for(server.request, target.uri)
            flow = self._next_hop_now(copy, target, self._route_hop(copy))
            if flow is None:
                pending.append((copy, target))
            else:
                self._start_branch(ctx, copy, flow, loop, pinned=flow is target.flow)
        if pending:
            self._spawn(self._resolve_and_start(ctx, pending, loop))
        else:
            ctx.started()
        return ctx

    def _copy_for(self, request: Request, uri: SipURI) -> Request:
        copy = Request(headers=request.headers.copy(), method=request.method, uri=uri.copy(),
                       body=request.body)
        mf = request.headers.get("Max-Forwards")
        copy.headers.set("Max-Forwards", str(int(mf) - 1) if mf is not None else "70")
        return copy

    def _next_hop_now(self, request: Request, target: Target | None, hop: SipURI | None) -> Flow | None:
        """§16.6 step 7 when no DNS is needed; None when the host must be resolved.
        `hop` is the first Route's URI (see `_route_hop`), None without Route."""
        if hop is None and target is not None and target.flow is not None:
            flow = target.flow
            if flow.transport == "UDP" or (self.transactions.transport.has_connection(flow)):
                if target.alias or uri_target(target.uri)[0] == flow.transport:
                    return flow
        uri = hop or request.uri
        if not isinstance(uri, SipURI):
            return None
        transport, host, port = uri_target(uri)
        return Flow(transport, host, port) if is_ip(host) else None

    def _route_hop(self, request: Request) -> SipURI | None:
        """The first Route's URI, after the strict-router rewrite of §16.6 step 6
        (which changes `request`: call once per request copy)."""
        route = _first_route(request)
        if route is None:
            return None
        if not route.lr:  # strict router next: it wants the Request-URI to be itself
            routes = request.headers.get_all("Route")
            request.headers.remove("Route")
            for value in routes[1:]:
                request.headers.add("Route", value)
            request.headers.add("Route", f"<{request.uri}>")
            request.uri = route.copy()
        return route

    async def _resolve_and_start(self, ctx: ResponseContext, pending: list[tuple[Request, Target]],
                                 loop: str) -> None:
        for copy, target in pending:
            if ctx.no_new_branches:
                break
            hop = _first_route(copy) or copy.uri
            assert isinstance(hop, SipURI)
            try:
                flow = await self.transactions.resolver.uri_flow(hop)
            except ResolveError as exc:
                log.info("%s %s not forwarded: %s", copy.method, copy.call_id, exc)
                branch = Branch(copy, Flow(*uri_target(hop)))
                ctx.branches.append(branch)
                ctx.fail(branch, 503, "Service Unavailable (next hop does not resolve)")
                continue
            self._start_branch(ctx, copy, flow, loop)
        ctx.started()

    def _start_branch(self, ctx: ResponseContext, request: Request, flow: Flow, loop: str, *,
                      pinned: bool = False) -> None:
        if self.record_route and request.method in DIALOG_CREATING and _no_to_tag(request):
            self._add_record_route(request, ctx.server.flow, flow)
        branch = Branch(request, flow)
        ctx.branches.append(branch)
        try:
            flow = self.transactions.add_via(request, flow, branch=make_branch(self.worker, loop),
                                             pinned=pinned)
            branch.flow = flow
            branch.client = self.transactions.send_request(request, flow)
        except OSError as exc:
            log.info("cannot forward %s to %s: %s", request.method, flow, exc)
            ctx.fail(branch, 503, "Service Unavailable")
            return
        self._spawn(ctx.pump(branch))

    # -- Record-Route ------------------------------------------------------------------
    def _our_uri(self, flow: Flow) -> str | None:
        local = self.transactions.transport.address(flow.transport, flow.host)
        if local is None:
            return None
        host = self.transactions.advertised_host(local[0], flow.host)
        host = f"[{host}]" if ":" in host else host
        suffix = "" if flow.transport == "UDP" else f";transport={flow.transport.lower()}"
        return f"sip:{host}:{local[1]}{suffix}"

    def _add_record_route(self, request: Request, inbound: Flow, outbound: Flow) -> None:
        """One Record-Route, or two when the request changes transport or address
        (the callee reaches us by the first, the caller by the second)."""
        out_uri = self._our_uri(outbound)
        in_uri = self._our_uri(inbound)
        if in_uri is not None and in_uri != out_uri:
            request.headers.add("Record-Route", f"<{in_uri};lr>", first=True)
        if out_uri is not None:
            request.headers.add("Record-Route", f"<{out_uri};lr>", first=True)

    # -- CANCEL and Timer C -----------------------------------------------------------------
    def on_cancel(self, server: ServerTransaction) -> bool:
        """The caller cancelled (§16.10); False if we hold no context for that INVITE."""
        ctx = self._contexts.get(server)
        if ctx is None:
            return False
        ctx.cancel_all()
        return True

    def _cancel_branch(self, branch: Branch, reason: str | None) -> None:
        if branch.final is not None or branch.cancelled or branch.client is None:
            return
        if not branch.provisional:
            branch.cancel_pending = True  # §9.1: wait for a provisional response first
            return
        self._send_cancel(branch, reason)

    def _send_cancel(self, branch: Branch, reason: str | None = None) -> None:
        if branch.cancelled or branch.final is not None:
            return
        branch.cancelled = True
        branch.cancel_pending = False
        cancel = make_cancel(branch.request)
        if reason:
            cancel.headers.add("Reason", reason)
        try:
            self.transactions.send_request(cancel, branch.flow)
        except OSError as exc:
            log.info("cannot send CANCEL to %s: %s", branch.flow, exc)

    def _arm_timer_c(self, ctx: ResponseContext, branch: Branch) -> None:
        """§16.6 step 11: Timer C (> 3 min) restarts with every provisional response;
        when it fires the branch is cancelled."""
        if branch.timer_c is not None:
            branch.timer_c.cancel()
        branch.timer_c = asyncio.get_running_loop().call_later(
            self.timer_c, self._timer_c_fired, branch)

    def _timer_c_fired(self, branch: Branch) -> None:
        branch.timer_c = None
        if branch.final is None:
            log.info("Timer C fired for %s: cancelling the branch", branch.flow)
            self._send_cancel(branch, None)

    def answered(self, ctx: ResponseContext) -> None:
        """`ctx`'s request has its final response upstream: a CANCEL for it now finds
        no context (§16.10), and late 2xx still go upstream through `ctx` itself."""
        self._contexts.pop(ctx.server, None)

    # -- §16.11: stateless forwarding ------------------------------------------------------
    def forward_stateless(self, request: Request, flow: Flow | None = None) -> None:
        """Forward an ACK for a 2xx (or another request not worth a transaction) to its
        next hop (`flow` if known), with a branch derived from the incoming one so that
        retransmissions get the same branch."""
        copy = self._copy_for(request, request.uri) if isinstance(request.uri, SipURI) else request
        pinned = flow is not None  # the flow a UA behind NAT spoke from
        if flow is None:
            flow = self._next_hop_now(copy, None, self._route_hop(copy))
        if flow is None:
            self._spawn(self._resolve_and_send(copy))
            return
        self._send_stateless(copy, flow, pinned=pinned)

    def _send_stateless(self, request: Request, flow: Flow, *, pinned: bool = False) -> None:
        incoming = request.headers.get("Via") or ""
        unique = "s" + hashlib.blake2b(incoming.encode("utf-8", "surrogateescape"), digest_size=6).hexdigest()
        try:
            # (an ACK for a 2xx is inside a dialog: no loop hash, see Broker._route)
            flow = self.transactions.add_via(request, flow, branch=make_branch(self.worker, "0", unique),
                                             pinned=pinned)
            self.transactions.send_stateless(request, flow)
        except OSError as exc:
            log.info("cannot forward %s to %s: %s", request.method, flow, exc)

    async def _resolve_and_send(self, request: Request) -> None:
        hop = _first_route(request) or request.uri
        if not isinstance(hop, SipURI):
            return
        try:
            flow = await self.transactions.resolver.uri_flow(hop)
        except ResolveError as exc:
            log.info("%s %s dropped: %s", request.method, request.call_id, exc)
            return
        self._send_stateless(request, flow)

    def forward_response(self, response: Response) -> bool:
        """A response without client transaction: if the top Via is ours, pass it on to
        the next Via statelessly (§16.11); False (dropped) otherwise."""
        try:
            via = response.via
        except ParseError:
            return False
        if not (via.branch or "").startswith(BRANCH_PREFIX) or not self.me.is_our_sent_by(via.host, via.port):
            return False
        headers = response.headers.copy()
        headers.pop_first("Via")
        if headers.get("Via") is None:
            return False
        up = Response(headers=headers, status=response.status, reason=response.reason, body=response.body)
        try:
            self.transactions.send_stateless(up, response_target(up))
        except (OSError, ParseError):
            return False
        return True

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for ctx in list(self._contexts.values()):
            for branch in ctx.branches:
                if branch.timer_c is not None:
                    branch.timer_c.cancel()
        self._contexts.clear()


def _no_to_tag(request: Request) -> bool:
    try:
        return request.to.tag is None
    except ParseError:
        return False


def _first_route(request: Request) -> SipURI | None:
    first = request.headers.get("Route")
    if first is None:
        return None
    try:
        uri = parse_address(first).uri
    except ParseError:
        return None
    return uri if isinstance(uri, SipURI) else None

