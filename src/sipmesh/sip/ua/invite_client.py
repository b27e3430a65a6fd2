"""The INVITE client side of a UA (RFC 3261 §13.2, §9.1): calling someone.

`send_invite` sends the INVITE, answers a digest challenge, and returns the `Call` of
the first 2xx. Each INVITE transaction is an `Invitation`: a task reads every response
of the transaction for as long as it lives, ACKs each 2xx (again when the 2xx is
retransmitted, §13.2.2.4), hangs up extra 2xx from forks, and sends the CANCEL once
one is wanted and a provisional response came.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Callable

from sipmesh.sip.dialog import Dialog
from sipmesh.sip.errors import ParseError
from sipmesh.sip.message import Request, Response, make_response
from sipmesh.sip.transaction.client import make_cancel
from sipmesh.sip.transaction.layer import ClientTransaction
from sipmesh.sip.ua.call import ALLOW, Call, CallFailed
from sipmesh.sip.ua.redirect import Redirects, redirected
from sipmesh.sip.uri import URI

if TYPE_CHECKING:
    from sipmesh.sip.ua.useragent import UserAgent

log = logging.getLogger("sipmesh.sip.ua")

ProgressHandler = Callable[[Response], None]


async def send_invite(ua: "UserAgent", uri: URI, sdp: bytes, *,
                      on_progress: ProgressHandler | None = None,
                      timeout: float | None = None, call_id: str | None = None,
                      headers: list[tuple[str, str]] | None = None) -> Call:
    """Call `uri` offering `sdp`; see `UserAgent.invite`. `headers`: more of them (Replaces)."""
    request = ua.new_request("INVITE", uri, call_id=call_id)
    for name, value in headers or ():
        request.headers.add(name, value)
    request.headers.add("Contact", str(ua.contact()))
    request.headers.add("Allow", ALLOW)
    request.headers.add("Content-Type", "application/sdp")
    request.body = sdp
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    redirects = Redirects(uri)
    alternatives = ua.alternatives(uri)  # our other servers, should this one fail
    while True:
        server = ua.server_of(request.uri) if alternatives else None
        try:
            request, outcome = await _invite_once(
                ua, request, on_progress, deadline,
                ua.config.failover_wait if server is not None else None)
        except (CallFailed, OSError) as exc:
            if not redirects.sent and server is None:  # the first hop: as before
                raise
            log.info("[%s] cannot reach %s: %s", request.call_id, request.uri, exc)
            outcome = make_response(request, 503, "Service Unavailable")
        if server is not None:
            # unavailable (503), or nothing came back (our own 408, without a To tag)
            failed = isinstance(outcome, Response) and (outcome.status == 503 or (
                outcome.status == 408 and outcome.to.tag is None))
            ua.server_failed(server, failed)
            if failed and alternatives:
                target = alternatives.pop(0)
                log.warning("[%s] the SIP server %s failed (%d %s): trying %s", request.call_id,
                            server, outcome.status, outcome.reason, target)
                request = redirected(request, target)
                continue
        if isinstance(outcome, Call):
            return outcome
        redirects.on_response(request.uri, outcome)
        target = redirects.next()
        if target is None:
            raise CallFailed(*redirects.failure(outcome))
        log.info("[%s] %d %s: trying %s", request.call_id, outcome.status, outcome.reason, target)
        request = redirected(request, target)


async def _invite_once(ua: "UserAgent", request: Request, on_progress: ProgressHandler | None,
                       deadline: float | None, silence: float | None = None
                       ) -> tuple[Request, Call | Response]:
    """INVITE `request`'s target, answering digest challenges: the last request sent and
    the Call, or the final failure response (408 when nothing at all came within
    `silence` s, if given: a server that is down)."""
    answered: set[int] = set()
    for _attempt in range(3):
        txn = await ua.send(request)
        invitation = Invitation(ua, request, txn)
        if silence is not None:
            transactions = ua.transactions
            assert transactions is not None

            def silent(invitation: Invitation = invitation, txn: ClientTransaction = txn) -> None:
                if not (invitation.provisional or invitation.final):
                    transactions.give_up(txn, 0)
            watch = asyncio.get_running_loop().call_later(silence, silent)
        try:
            outcome = await invitation.outcome(on_progress, deadline)
        finally:
            if silence is not None:
                watch.cancel()
        if isinstance(outcome, Call):
            return request, outcome
        retry = await ua.answer_challenge(request, outcome, answered)
        if retry is None:
            return request, outcome
        request = retry
    return request, outcome


class Invitation:
    """One INVITE client transaction of ours as the UA core sees it (§13.2.2, §9.1)."""

    def __init__(self, ua: "UserAgent", request: Request, txn: ClientTransaction) -> None:
        self.ua = ua
        self.request = request
        self.txn = txn
        self.queue: asyncio.Queue[Response | Call | None] = asyncio.Queue()
        self.calls: dict[str, Call] = {}  # To tag -> Call, one per 2xx dialog
        self.provisional = False
        self.final = False
        self.cancel_wanted = False
        self.cancel_sent = False
        self.abandoned = False  # nobody waits for the outcome any more

    async def outcome(self, on_progress: ProgressHandler | None,
                      deadline: float | None) -> Call | Response:
        """The Call of the first 2xx, or the final non-2xx response (408 when none came).
        Past `deadline` without an answer the INVITE is cancelled (487 then)."""
        request = self.request
        ua = self.ua
        ua.pending_invites.add(request.call_id)
        ua.spawn(self._run())
        loop = asyncio.get_running_loop()
        try:
            while True:
                if self.cancel_sent:  # §9.1: a final response is due within 64*T1 of the CANCEL
                    wait: float | None = 64 * ua.config.timers.t1
                elif self.cancel_wanted or deadline is None:
                    wait = None  # (no provisional yet: Timer B ends the wait)
                else:
                    wait = max(0.0, deadline - loop.time())
                try:
                    async with asyncio.timeout(wait):  # (wait_for in 3.11 can lose a cancellation)
                        item = await self.queue.get()
                except asyncio.TimeoutError:
                    if self.cancel_sent:
                        return make_response(request, 408, "Request Timeout")
                    log.info("[%s] no answer in time: cancelling", request.call_id)
                    self.cancel_wanted = True
                    self._send_cancel()
                    continue
                if item is None:
                    return make_response(request, 408, "Request Timeout")
                if isinstance(item, Call):
                    if self.cancel_wanted:  # answered while our CANCEL was under way
                        ua.spawn(item.bye())
                        return make_response(request, 487, "Request Terminated")
                    return item
                if item.status < 200:
                    if on_progress is not None and item.status > 100 and not self.cancel_wanted:
                        on_progress(item)
                    continue
                return item
        except asyncio.CancelledError:
            self.abandoned = self.cancel_wanted = True
            self._send_cancel()
            while not self.queue.empty():
                item = self.queue.get_nowait()
                if isinstance(item, Call):
                    ua.spawn(item.bye())
            raise
        finally:
            self.abandoned = True  # from now on, any new 2xx dialog is ACKed and hung up
            ua.pending_invites.discard(request.call_id)

    async def _run(self) -> None:
        try:
            await self._read()
        finally:
            self.queue.put_nowait(None)

    async def _read(self) -> None:
        async for response in self.txn.responses():
            if response.status < 200:
                self.provisional = True
                if self.cancel_wanted:
                    self._send_cancel()
                self.queue.put_nowait(response)
                continue
            self.final = True
            if response.status >= 300:
                self.queue.put_nowait(response)
                continue
            tag = response.to.tag or ""
            known = self.calls.get(tag)
            if known is not None:  # the 2xx again: our ACK was lost
                self.ua.spawn(known.send_ack(response.cseq[0]))
                continue
            try:
                call = await self._establish(response)
            except (ValueError, ParseError, CallFailed, OSError) as exc:
                log.warning("[%s] cannot use the %d: %s", self.request.call_id, response.status, exc)
                continue
            self.calls[tag] = call
            if len(self.calls) > 1 or self.abandoned:  # a second fork answered, or nobody wants it
                log.info("[%s] hanging up an unwanted 2xx (To tag %s)", call.call_id, tag)
                self.ua.spawn(call.bye())
                continue
            self.queue.put_nowait(call)

    def _send_cancel(self) -> None:
        """§9.1: CANCEL only after a provisional response and before a final one."""
        if self.cancel_sent or self.final or not self.provisional:
            return
        transactions = self.ua.transactions
        assert transactions is not None
        self.cancel_sent = True
        transactions.send_request(make_cancel(self.request), self.txn.flow)
        transactions.give_up(self.txn, 64 * self.ua.config.timers.t1)

    async def _establish(self, response: Response) -> Call:
        request = self.request
        dialog = Dialog.from_uac(request, response)
        call = Call(self.ua, dialog, request, request.body, response.body, outgoing=True,
                    contact=request.headers.get("Contact"))
        self.ua.add_call(call)
        await call.send_ack(request.cseq[0])
        call.acked.set()
        return call
