"""An established call: one INVITE dialog on either side (RFC 3261 §12-15).

What happens inside the dialog lives here: requests we send in it (BYE, re-INVITE,
OPTIONS, INFO), the requests the peer sends in it, our ACK for each 2xx to our
INVITEs (sent again for a retransmitted 2xx, §13.2.2.4) and the retransmission of
our 2xx until the peer's ACK (§13.3.1.4). How the call came to be is in
`invite_client` (we called) and `invite_server` (we answered).

A peer that dies without a BYE (SIGKILL, a host gone, a NAT path cut) is noticed here:
once the dialog is confirmed, a peer silent for `UAConfig.peer_keepalive` seconds is sent
in-dialog OPTIONS, and a 408 or 481 to any request of ours in the dialog, or a probe
unanswered for min(2K, 64*T1), ends the call (RFC 3261 §12.2.1.2; the rule and the
bound, K + min(2K, 64*T1), are in `liveness`). `ended` then completes with the reason,
`lost` keeps it, and a BYE goes out (best effort: the peer is probably not there).

Unless the dialog was record-routed through one of our servers and we have another: the
silence may be that server's death, not the peer's. The side that made the call then
sends a new INVITE with Replaces (RFC 3891) through a live server, the other waits as
long again for it (`UserAgent._replace` answers it), and both go on in the new dialog in
the same Call (`adopt`); only if that fails does the call end as above.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Awaitable, Callable

from sipmesh.sip.dialog import Dialog, DialogState
from sipmesh.sip.errors import ParseError
from sipmesh.sip.message import Request, Response, make_response
from sipmesh.sip.transaction.layer import ClientTransaction, ServerTransaction
from sipmesh.sip.transport.base import Flow, response_target
from sipmesh.sip.ua.liveness import Action, Liveness

if TYPE_CHECKING:
    from sipmesh.sip.ua.useragent import UserAgent

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


class Call:
    """One INVITE dialog, on either side. `contact` is the Contact we gave the peer."""

    def __init__(self, ua: "UserAgent", dialog: Dialog, invite: Request, local_sdp: bytes,
                 remote_sdp: bytes, outgoing: bool, *, contact: str | None = None) -> None:
        self.ua = ua
        self.dialog = dialog
        self.invite = invite
        self.local_sdp = local_sdp
        self.remote_sdp = remote_sdp
        self.outgoing = outgoing
        self.ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.bye_reason: str | None = None  # the Reason header of the peer's BYE (RFC 3326)
        self.acked = asyncio.Event()
        self._contact = contact
        self._acks: dict[int, tuple[Request, Flow]] = {}  # our ACK per INVITE CSeq, for resends
        self._ack_events: dict[int, asyncio.Event] = {}  # our 2xx awaiting their ACK, by CSeq
        self._reinviting = False
        # A new offer in a re-INVITE (e.g. an ICE restart after the peer moved): its
        # answer, or raise CallFailed to refuse it. None: every re-INVITE is a refresh
        # of the same session and gets our current SDP.
        self.on_reoffer: Callable[[bytes], Awaitable[bytes]] | None = None
        # The peer's REFER (RFC 3515) in this dialog: its Refer-To value -> our status
        # (202: we act on it and send NOTIFYs with `notify_refer`). None: 405.
        self.on_refer: Callable[[str], int] | None = None
        self.refer_reports: list[str] = []  # sipfrag status lines the peer NOTIFYed us
        self.refer_outcome: asyncio.Event = asyncio.Event()  # a final one (or terminated)
        self.liveness: Liveness | None = None  # once confirmed, with keepalive on
        self.lost: str | None = None  # why we decided the peer is gone, if we did
        self._rerouting = False  # a Replaces INVITE of ours, or the wait for the peer's
        self._replaced = asyncio.Event()  # the peer moved the call to a new dialog
        if ua.config.peer_keepalive > 0:
            ua.spawn(self._keep_alive(ua.config.peer_keepalive))

    @property
    def call_id(self) -> str:
        return self.dialog.call_id

    @property
    def peer(self) -> str:
        return str(self.dialog.remote_uri.uri)

    def _end(self, reason: str) -> None:
        self.dialog.state = DialogState.TERMINATED
        self.ua.forget_call(self)
        if not self.ended.done():
            self.ended.set_result(reason)

    # -- requests we send in the dialog -----------------------------------------------------
    async def bye(self, headers: list[tuple[str, str]] | None = None) -> Response | None:
        """End the session (§15.1.1). Returns once the BYE transaction has ended, with its
        final response (None if the call had already ended or the BYE could not be sent).
        `headers` go into the BYE (e.g. a Reason, RFC 3326)."""
        if self.ended.done():
            return None
        self._end("local BYE")
        return await self._send_bye(headers)

    async def _send_bye(self, headers: list[tuple[str, str]] | None) -> Response | None:
        request = self.dialog.create_request("BYE")
        for name, value in headers or ():
            request.headers.add(name, value)
        try:
            response = (await self._transact(request))[0]
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
        return (await self._transact(request))[0]

    async def refer(self, target: str) -> Response:
        """Ask the peer to call `target` instead of us (REFER, RFC 3515): its final response
        (202: accepted; its NOTIFYs land in `refer_reports`)."""
        return await self.request("REFER", headers=[("Refer-To", f"<{target}>"),
                                                    ("Referred-By", f"<{self.dialog.local_uri.uri}>")])

    async def notify_refer(self, status: int, reason: str, *, final: bool) -> None:
        """Tell the referrer how the INVITE its REFER asked for is going (RFC 3515 §2.4.4,
        a message/sipfrag status line); best effort."""
        state = "terminated;reason=noresource" if final else "active;expires=60"
        try:
            await self.request("NOTIFY", headers=[("Event", "refer"), ("Subscription-State", state)],
                               body=f"SIP/2.0 {status} {reason}\r\n".encode(),
                               content_type="message/sipfrag;version=2.0")
        except (CallFailed, OSError) as exc:
            log.info("[%s] NOTIFY of the transfer's progress failed: %s", self.call_id, exc)

    def moved(self, contact: str) -> None:
        """We moved: our requests and answers in this dialog name `contact` from now on
        (the peer's remote target follows with our next re-INVITE, §12.2.1.1)."""
        self._contact = contact

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
            response, txn = await self._transact(request)
        finally:
            self._reinviting = False
        if 200 <= response.status < 300:
            self.dialog.update_target(response)
            self.local_sdp = offer
            if response.body:
                self.remote_sdp = response.body
            number = response.cseq[0]
            await self.send_ack(number, txn.request)
            self.ua.spawn(self._ack_retransmitted_2xx(txn, number))
        return response

    async def _transact(self, request: Request) -> tuple[Response, ClientTransaction]:
        """Send an in-dialog request, answering a digest challenge from a proxy on the path;
        a retry takes a new CSeq, which the dialog's local sequence follows."""
        def follow(retry: Request) -> None:
            self.dialog.local_seq = max(self.dialog.local_seq, retry.cseq[0])
        response, txn = await self.ua.transact(request, on_retry=follow)
        if self.liveness is not None and request.method != "BYE" and self.liveness.answered(
                response.status, request.method, asyncio.get_running_loop().time()):
            self._lose()
        return response, txn

    # -- is the peer still there? (liveness.py) --------------------------------------------
    async def _keep_alive(self, interval: float) -> None:
        """Once the dialog is confirmed: OPTIONS to a silent peer; end the call when it is gone."""
        acked = asyncio.ensure_future(self.acked.wait())
        try:
            await asyncio.wait({acked, self.ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            acked.cancel()
        loop = asyncio.get_running_loop()
        liveness = self.liveness = Liveness(interval, self.ua.config.timers.t1, loop.time())
        while not self.ended.done():
            action, wake = liveness.poll(loop.time())
            if action is Action.GONE:
                self._lose()
                return
            if action is Action.PROBE:
                self.ua.spawn(self._probe())
            await asyncio.wait({self.ended}, timeout=max(0.0, wake - loop.time()))

    async def _probe(self) -> None:
        try:
            response = await self.request("OPTIONS")  # _transact tells the liveness
        except (OSError, CallFailed) as exc:  # not sent: the next probe or the timeout decides
            log.debug("[%s] in-dialog OPTIONS not sent: %s", self.call_id, exc)
            return
        log.debug("[%s] in-dialog OPTIONS answered %d", self.call_id, response.status)

    def _alive(self) -> None:
        if self.liveness is not None:
            self.liveness.alive(asyncio.get_running_loop().time())

    def _lose(self) -> None:
        """The peer is gone (`liveness.reason`): end the call now, then BYE, best effort.
        Unless the dialog went through a server of ours and we have another: then the
        route may be what died, not the peer (see `_reroute`)."""
        if self.ended.done() or self.liveness is None or self._rerouting:
            return
        if self._may_reroute():
            self._rerouting = True
            self.ua.spawn(self._reroute())
            return
        self._give_up()

    def _give_up(self) -> None:
        if self.ended.done() or self.liveness is None:
            return
        self.lost = reason = self.liveness.reason or "the peer is gone"
        log.warning("[%s] %s: ending the session", self.call_id, reason)
        self._end(reason)
        self.ua.spawn(self._send_bye([("Reason", f'SIP ;cause=408 ;text="{reason}"')]))

    # -- a route through a server that died (RFC 3891 Replaces) -------------------------------
    def _may_reroute(self) -> bool:
        """Our in-dialog requests go through one of our servers (its Record-Route), and we
        have another one."""
        routes = self.dialog.route_set
        return bool(routes) and len(self.ua.servers) > 1 and \
            self.ua.server_of(routes[0].uri) is not None

    async def _reroute(self) -> None:
        """The peer went silent through the server our dialog was record-routed through.
        The side that made the call sends a new INVITE with Replaces through a live server
        (the same offer: the session's parameters do not change); the other side waits
        for it as long again as it took to notice. Either way the Call goes on with the
        new dialog (`adopt`), or ends as it would have."""
        assert self.liveness is not None
        dead = self.ua.server_of(self.dialog.route_set[0].uri)
        if dead is not None:
            self.ua.server_failed(dead)
        log.warning("[%s] %s: the route through %s may be what is gone; %s", self.call_id,
                    self.liveness.reason, dead, "moving the session to a new dialog "
                    "(Replaces)" if self.outgoing else "waiting for the peer to move it")
        first = self.call_id
        try:
            if self.outgoing:
                replaces = (f"{self.call_id};to-tag={self.dialog.remote_tag}"
                            f";from-tag={self.dialog.local_tag}")
                new = await self.ua.invite(self.ua.live_target(self.dialog.remote_uri.uri),
                                           self.local_sdp, timeout=self.liveness.bound,
                                           headers=[("Replaces", replaces)])
                self.adopt(new)
                log.info("[%s] the session goes on in dialog %s", first, new.call_id)
            else:
                async with asyncio.timeout(self.liveness.bound):
                    await self._replaced.wait()
        except (CallFailed, OSError, asyncio.TimeoutError) as exc:
            log.warning("[%s] the session could not be moved: %s", first,
                        exc or "no Replaces came")
            self._rerouting = False
            self._give_up()

    def adopt(self, new: "Call") -> None:
        """`new` replaces this call's dialog (RFC 3891): this Call goes on in new's dialog
        (route set, tags, CSeqs, pending ACKs), with a fresh peer check; `new` is dropped."""
        self.ua.forget_call(self)
        self.ua.forget_call(new)
        self.dialog, self.invite, self.remote_sdp = new.dialog, new.invite, new.remote_sdp
        self._contact = new._contact
        self._acks, self._ack_events = new._acks, new._ack_events
        self.ua.add_call(self)
        if not new.ended.done():
            new.ended.set_result("replaced")  # its peer check ends
        self.liveness = None  # (the old one's verdict): a fresh one in the new peer check
        self._rerouting = False
        self._replaced.set()
        self._replaced = asyncio.Event()
        if self.ua.config.peer_keepalive > 0:
            self.ua.spawn(self._keep_alive(self.ua.config.peer_keepalive))

    # -- the ACK for a 2xx to our INVITE ------------------------------------------------------
    async def send_ack(self, cseq: int, invite: Request | None = None) -> None:
        """ACK the 2xx to our INVITE number `cseq`; the same ACK again for a retransmitted 2xx."""
        transactions = self.ua.transactions
        assert transactions is not None
        cached = self._acks.get(cseq)
        if cached is None:
            ack = self.dialog.create_request("ACK", cseq=cseq)
            source = invite if invite is not None else self.invite
            for name in _CREDENTIALS:
                for value in source.headers.get_all(name):
                    ack.headers.add(name, value)
            flow = transactions.add_via(ack, await self.ua.flow_for(ack))
            cached = self._acks[cseq] = (ack, flow)
        transactions.send_stateless(*cached)

    async def _ack_retransmitted_2xx(self, txn: ClientTransaction, cseq: int) -> None:
        """ACK again every retransmission of the 2xx to a re-INVITE while its transaction lives."""
        first = True
        async for response in txn.responses():
            if 200 <= response.status < 300:
                if not first:
                    await self.send_ack(cseq)
                first = False

    # -- our 2xx to an INVITE, until the peer's ACK ------------------------------------------
    async def send_2xx(self, txn: ServerTransaction, response: Response,
                       limit: float | None = None) -> bool:
        """Answer the INVITE of `txn` with our 2xx `response` and resend it until the ACK
        (§13.3.1.4) for `limit` seconds (default 64*T1). True once ACKed; False on
        timeout or when the call ended first."""
        number = self._respond_2xx(txn, response)
        return await self._retransmit_2xx(response, txn.flow, number, limit)

    def _respond_2xx(self, txn: ServerTransaction, response: Response) -> int:
        number = txn.request.cseq[0]
        self._ack_events[number] = asyncio.Event()  # before sending: the ACK may be quick
        txn.respond(response)
        return number

    async def _retransmit_2xx(self, response: Response, flow: Flow, cseq: int,
                              limit: float | None = None) -> bool:
        """§13.3.1.4: resend our 2xx at T1, 2*T1, ... (at most T2 apart) until the ACK
        arrives, for 64*T1 (`limit`). True once ACKed; False on timeout or when the call ended."""
        transactions = self.ua.transactions
        assert transactions is not None
        timers = self.ua.config.timers
        event = self._ack_events.setdefault(cseq, asyncio.Event())
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
                if self.ended.done() or remaining <= 0:
                    return False
                await asyncio.wait({acked, self.ended}, timeout=min(interval, remaining),
                                   return_when=asyncio.FIRST_COMPLETED)
                if not event.is_set() and not self.ended.done() and not flow.reliable \
                        and loop.time() < deadline:
                    transactions.send_stateless(response, target)
                interval = min(2 * interval, timers.t2)
        finally:
            acked.cancel()
            self._ack_events.pop(cseq, None)

    # -- what the peer sends in the dialog ----------------------------------------------------
    def on_request(self, txn: ServerTransaction) -> None:
        """A request of the peer's inside this dialog (the UA found the dialog by its id)."""
        request = txn.request
        self._alive()
        if not self.dialog.accept_remote_cseq(request):
            txn.reply(500, "Out Of Order CSeq")
            return
        if request.method == "BYE":
            txn.reply(200)
            log.info("[%s] BYE received from %s", self.call_id, self.peer)
            self.bye_reason = request.headers.get("Reason")
            self._end("remote BYE")
        elif request.method == "INVITE":  # session refresh: same session, same answer
            if self._reinviting:  # §14.2: glare with our own re-INVITE
                txn.reply(491)
                return
            self.dialog.update_target(request)
            if self.on_reoffer is not None and request.body and request.body != self.remote_sdp:
                self.ua.spawn(self._answer_reoffer(txn, request.body))
                return
            if request.body:
                self.remote_sdp = request.body
            self._accept_reinvite(txn, self.local_sdp)
        elif request.method in ("OPTIONS", "INFO"):
            txn.reply(200, headers=[("Allow", ALLOW)])
        elif request.method == "REFER" and self.on_refer is not None:
            targets = request.headers.get_all("Refer-To")
            if len(targets) != 1:
                txn.reply(400, "Exactly One Refer-To Expected")
                return
            status = self.on_refer(str(targets[0]))
            txn.reply(status)
        elif request.method == "NOTIFY" and (request.headers.get("Event") or "").split(";")[0] \
                .strip().lower() == "refer":
            txn.reply(200)
            line = request.body.decode("utf-8", "replace").split("\r\n", 1)[0][:200]
            self.refer_reports.append(line)
            log.info("[%s] the transfer: %s", self.call_id, line)
            parts = line.split()
            if "terminated" in (request.headers.get("Subscription-State") or "") or \
                    (len(parts) > 1 and parts[1].isdigit() and int(parts[1]) >= 200):
                self.refer_outcome.set()
        else:  # UPDATE included: we cannot answer an offer in it
            txn.reply(405, headers=[("Allow", ALLOW)])

    async def _answer_reoffer(self, txn: ServerTransaction, offer: bytes) -> None:
        assert self.on_reoffer is not None
        try:
            answer = await self.on_reoffer(offer)
        except CallFailed as exc:
            txn.reply(exc.status, exc.reason)
            return
        except Exception:
            log.exception("[%s] answering a re-INVITE failed", self.call_id)
            txn.reply(500)
            return
        if self.ended.done():
            txn.reply(481)
            return
        self.remote_sdp = offer
        self._accept_reinvite(txn, answer)

    def _accept_reinvite(self, txn: ServerTransaction, sdp: bytes) -> None:
        """200 to the peer's re-INVITE with `sdp`, sent again until its ACK."""
        response = make_response(txn.request, 200)
        response.headers.add("Contact", self._contact or str(self.ua.contact(txn.flow.transport)))
        response.headers.add("Allow", ALLOW)
        response.headers.add("Content-Type", "application/sdp")
        response.body = self.local_sdp = sdp
        number = self._respond_2xx(txn, response)
        self.ua.spawn(self._await_reinvite_ack(response, txn.flow, number))

    async def _await_reinvite_ack(self, response: Response, flow: Flow, number: int) -> None:
        if not await self._retransmit_2xx(response, flow, number) and not self.ended.done():
            log.warning("[%s] no ACK for our 200 to the re-INVITE: ending the session",
                        self.call_id)
            await self.bye()

    def on_ack(self, request: Request) -> None:
        """The peer's ACK for a 2xx of ours in this dialog."""
        self.acked.set()
        self._alive()
        try:
            number = request.cseq[0]
        except ParseError:
            return
        event = self._ack_events.get(number)
        if event is not None:
            event.set()
