"""The INVITE server side of a UA (RFC 3261 §13.3): an INVITE awaiting the application.

The UA hands each new INVITE to the application as an `IncomingCall`; the application
rings, rejects or accepts it. Accepting sends the 2xx, which the `Call` retransmits
until the caller's ACK.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from sipmesh.sip.dialog import Dialog, new_tag
from sipmesh.sip.errors import ParseError
from sipmesh.sip.headers import Address
from sipmesh.sip.message import Response, make_response
from sipmesh.sip.transaction.layer import ServerTransaction
from sipmesh.sip.ua.call import ALLOW, USER_AGENT, Call, CallFailed

if TYPE_CHECKING:
    from sipmesh.sip.ua.useragent import UserAgent

log = logging.getLogger("sipmesh.sip.ua")


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
        call = Call(self.ua, dialog, self.request, sdp, self.request.body, outgoing=False,
                    contact=contact)
        self.ua.add_call(call)
        acked = await call.send_2xx(self.txn, response, ack_timeout)
        if acked or call.ended.done():  # a BYE before the ACK: our 2xx did get through
            return call
        log.warning("[%s] no ACK for our 200: ending the session", self.call_id)
        await call.bye()
        raise CallFailed(408, "No ACK received")

    def _response(self, status: int, reason: str | None = None) -> Response:
        response = make_response(self.request, status, reason, to_tag=self.local_tag)
        response.headers.add("Server", USER_AGENT)
        return response
