"""A subscription we hold (RFC 6665 §4.1, the subscriber): SUBSCRIBE, its dialog, the
NOTIFYs that arrive in it, refresh and unsubscribe.

    sub = await ua.subscribe("sip:net-lab@example.org", "reg", accept="application/reginfo+xml")
    async for notify in sub.notifications():   # each NOTIFY, in order, already answered 200
        ...notify.body, notify.state (Subscription-State)...
    await sub.refresh()                         # before sub.expires_at; 481: sub.ended
    await sub.unsubscribe()

The dialog is created by whichever comes first, the 2xx to the SUBSCRIBE or a NOTIFY
(§4.1.2.4: the NOTIFY may overtake the 2xx). When to refresh is the caller's choice
(`expires_at`); a subscription that ends (terminated NOTIFY, a refresh answered 481 or
timing out) sets `ended` with the reason, and the caller subscribes again if it wants.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator

from sipmesh.sip.dialog import Dialog, DialogState, new_tag
from sipmesh.sip.errors import ParseError
from sipmesh.sip.event import EventType, SubscriptionState, parse_event, parse_subscription_state
from sipmesh.sip.message import Request, Response
from sipmesh.sip.transaction.layer import ServerTransaction
from sipmesh.sip.uri import URI

if TYPE_CHECKING:
    from sipmesh.sip.ua.useragent import UserAgent

log = logging.getLogger("sipmesh.sip.ua")

# Final responses to a refresh that end the subscription (§4.1.2.2); others leave it
# running until it expires, and the caller may try again.
_ENDING = frozenset({404, 405, 410, 416, 480, 481, 482, 483, 484, 485, 489, 501, 604})
MAX_QUEUED = 64  # NOTIFYs not yet read: older ones are dropped (each carries full state)


@dataclass(frozen=True, slots=True)
class Notification:
    """One NOTIFY received in the subscription."""

    state: SubscriptionState
    content_type: str | None
    body: bytes
    request: Request


class Subscription:
    def __init__(self, ua: "UserAgent", target: URI, event: str | EventType, *, accept: str,
                 expires: int) -> None:
        self.ua = ua
        self.target = target
        self.event = event if isinstance(event, EventType) else EventType(event)
        self.accept = accept
        self.expires = expires
        self.call_id = secrets.token_hex(12)
        self.local_tag = new_tag()
        self.dialog: Dialog | None = None
        self.state = "init"  # -> pending | active | terminated
        self.expires_at: float | None = None  # loop time the subscription runs out
        self.ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._queue: asyncio.Queue[Notification | None] = asyncio.Queue()
        self._initial: Request | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.call_id, self.local_tag)

    def _end(self, reason: str) -> None:
        if self.ended.done():
            return
        self.state = "terminated"
        if self.dialog is not None:
            self.dialog.state = DialogState.TERMINATED
        self.ua.forget_subscription(self)
        self.ended.set_result(reason)
        self._queue.put_nowait(None)

    # -- what we send ---------------------------------------------------------------------
    def _fill(self, request: Request, expires: int) -> Request:
        request.headers.add("Event", str(self.event))
        request.headers.add("Accept", self.accept)
        request.headers.add("Expires", str(expires))
        return request

    async def start(self) -> Response:
        """The initial SUBSCRIBE; its final response. On failure the subscription ends."""
        self.ua.add_subscription(self)
        request = self.ua.new_request("SUBSCRIBE", self.target, call_id=self.call_id, from_tag=self.local_tag)
        request.headers.add("Contact", str(self.ua.contact()))
        self._initial = self._fill(request, self.expires)
        try:
            response, txn = await self.ua.transact(request, on_retry=self._retried)
        except BaseException:
            self._end("not sent")
            raise
        if 200 <= response.status < 300:
            if self.dialog is None:
                self.dialog = Dialog.from_uac(txn.request, response)
            self._granted(response)
            if self.state == "init":
                self.state = "pending"  # until the first NOTIFY says active
        else:
            self._end(f"{response.status} {response.reason}")
        return response

    def _retried(self, retry: Request) -> None:
        self._initial = retry
        if self.dialog is not None:
            self.dialog.local_seq = max(self.dialog.local_seq, retry.cseq[0])

    def _granted(self, response: Response) -> None:
        value = (response.headers.get("Expires") or "").strip()
        granted = int(value) if value.isdigit() else self.expires
        self.expires_at = asyncio.get_running_loop().time() + granted

    async def refresh(self, expires: int | None = None) -> Response:
        """SUBSCRIBE again in the dialog (Expires 0 unsubscribes); its final response."""
        if self.dialog is None or self.ended.done():
            raise RuntimeError("no subscription to refresh")
        expires = self.expires if expires is None else expires
        request = self._fill(self.dialog.create_request("SUBSCRIBE", contact=str(self.ua.contact())), expires)
        response = (await self.ua.transact(request, on_retry=self._retried))[0]
        if 200 <= response.status < 300:
            self._granted(response)
        elif response.status in _ENDING or response.status == 408:
            self._end(f"refresh answered {response.status} {response.reason}")
        return response

    async def unsubscribe(self, timeout: float = 3.0) -> None:
        """Expires 0, then wait (at most `timeout` s) for the final NOTIFY."""
        if self.ended.done() or self.dialog is None:
            self._end("unsubscribed")
            return
        try:
            async with asyncio.timeout(timeout):
                await self.refresh(0)
            async with asyncio.timeout(timeout):
                await asyncio.shield(self.ended)
        except (asyncio.TimeoutError, OSError) as exc:
            log.debug("unsubscribe from %s: %r", self.target, exc)
        self._end("unsubscribed")

    # -- what arrives -------------------------------------------------------------------------
    def on_notify(self, txn: ServerTransaction) -> None:
        """A NOTIFY for this subscription (the UA matched Call-ID and our tag)."""
        request = txn.request
        try:
            event = parse_event(request.headers.get("Event"))
            state = parse_subscription_state(request.headers.get("Subscription-State"))
        except ParseError as exc:
            txn.reply(400, f"Bad Request ({exc.reason})")
            return
        if not event.matches(self.event):
            txn.reply(489, "Bad Event")
            return
        if self.dialog is None:
            try:
                self.dialog = Dialog.from_uas(request, self.local_tag)  # the NOTIFY came first
            except ValueError:
                txn.reply(400, "Bad Request (NOTIFY without a Contact)")
                return
            if self._initial is not None:
                self.dialog.local_seq = self._initial.cseq[0]
        elif request.from_.tag != self.dialog.remote_tag:
            txn.reply(481, "Subscription Does Not Exist")  # a second fork: one dialog is enough
            return
        if not self.dialog.accept_remote_cseq(request):
            txn.reply(500, "Out Of Order CSeq")
            return
        self.dialog.update_target(request)
        txn.reply(200)
        if state.state == "active":
            self.state = "active"
            if state.expires is not None:
                self.expires_at = asyncio.get_running_loop().time() + state.expires
        elif state.state == "pending":
            self.state = "pending"
        if self._queue.qsize() >= MAX_QUEUED:
            self._queue.get_nowait()
        self._queue.put_nowait(Notification(state, request.content_type, request.body, request))
        if state.state == "terminated":
            self._end(f"terminated ({state.reason or 'no reason'})")

    async def next_notification(self) -> Notification | None:
        """The next NOTIFY (None once the subscription has ended). Safe to cancel, e.g.
        by a timeout: nothing is lost."""
        if self._queue.empty() and self.ended.done():
            return None
        item = await self._queue.get()
        if item is None:
            self._queue.put_nowait(None)  # for the next caller too
        return item

    async def notifications(self) -> AsyncIterator[Notification]:
        """Each NOTIFY as it arrives, until the subscription ends."""
        while (item := await self.next_notification()) is not None:
            yield item

