"""A session handed over to another agent: REFER in its dialog (RFC 3515).

`SessionTransfer` is the part of `Session` (agent/session.py) that hands over: `hand_over`
asks our peer to call another agent instead of us (the daemon's ``sipmesh handover``);
`on_refer` takes the peer's REFER (a calling session with a running program), after which
`Session.place` calls the new target and `end_referred` ends the old dialog (final NOTIFY,
then BYE) once the new one is up or failed.
"""

from __future__ import annotations

import asyncio
import logging

from sipmesh.agent.handover import Handover
from sipmesh.agent.ice import IceSession
from sipmesh.agent.sessionpath import BYE_WAIT
from sipmesh.sip.errors import ParseError
from sipmesh.sip.headers import parse_address
from sipmesh.sip.uri import SipURI
from sipmesh.sip.ua import Call, CallFailed

log = logging.getLogger("sipmesh.agent")

MAX_TRANSFERS = 3     # hand-overs (REFER) a calling session follows


class SessionTransfer:
    """The hand-overs of one `Session` (its base class)."""

    def __init__(self) -> None:
        self.transfers = 0   # hand-overs (REFER) this session followed
        self.refer_to: str | None = None   # where the peer's accepted REFER sends us
        self.referred = asyncio.Event()
        self.kept_path: tuple[Handover | None, IceSession | None] = (None, None)
        super().__init__()

    async def hand_over(self, target: str) -> tuple[int, str]:
        """Ask our peer to call `target` (a user name in our domain, or its SIP URI) instead
        of us: REFER in this dialog (RFC 3515). The peer's answer (status, reason); after a
        202 it calls `target` and then ends this session with BYE."""
        ua = self.endpoint.ua
        assert ua is not None
        if self.call is None or self.state != "established":
            return 481, "no established session"
        uri = ua.target_uri(target)
        log.info("[%s] handing %s over to %s", self.call_id, self.call.peer, uri)
        try:
            response = await self.call.refer(str(uri))
        except CallFailed as exc:
            return exc.status, exc.reason
        self.emit("handover_sent", target=str(uri), status=response.status)
        return response.status, response.reason

    # -- the calling side ----------------------------------------------------------------
    async def end_referred(self, call: Call, status: int, reason: str) -> None:
        """The REFER that moved us is done: say how (final NOTIFY), end its dialog."""
        if not call.ended.done():
            await call.notify_refer(status, reason, final=True)
            await asyncio.wait({asyncio.ensure_future(call.bye())}, timeout=BYE_WAIT)
        handover, ice = self.kept_path
        self.kept_path = (None, None)
        if handover is not None:
            await handover.close()
        elif ice is not None:
            await ice.close()

    def on_refer(self, value: str) -> int:
        """The peer (only it can send in its dialog) asks us to call another agent instead.
        Accepted (202) only for a running program, a SIP URI of a user at our own domain or
        one of our servers, not ourselves, at most MAX_TRANSFERS times per session; 403
        otherwise."""
        ua = self.endpoint.ua
        assert ua is not None and self.call is not None
        why = None
        try:
            uri = parse_address(value).uri
        except ParseError:
            uri = None
        hosts = {ua.aor.host.lower()} | {s.rsplit(":", 1)[0].strip("[]").lower()
                                         for s in ua.servers}
        if not isinstance(uri, SipURI) or not uri.user:
            why = "Refer-To must be a SIP URI naming a user"
        elif uri.host.lower() not in hosts:
            why = f"Refer-To must be in our domain ({ua.aor.host})"
        elif uri.user == ua.aor.user and uri.host.lower() == ua.aor.host.lower():
            why = "Refer-To names ourselves"
        elif self.role != "client" or self.child is None or self.state != "established" \
                or self.referred.is_set():
            why = "no running program to hand over"
        elif self.transfers >= MAX_TRANSFERS:
            why = f"at most {MAX_TRANSFERS} hand-overs per session"
        if why is not None:
            log.warning("[%s] REFER to %s refused: %s", self.call_id, value[:100], why)
            return 403
        self.transfers += 1
        self.refer_to = str(SipURI(scheme=uri.scheme, user=uri.user, host=uri.host, port=uri.port))
        log.info("[%s] %s hands us over to %s", self.call_id, self.call.peer, self.refer_to)
        self.referred.set()
        self.endpoint.ua.spawn(self.call.notify_refer(100, "Trying", final=False))
        return 202
