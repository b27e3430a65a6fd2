"""Transaction keys (RFC 3261 §17.1.3, §17.2.3, §9.2) and branch generation.

Client key: (top Via branch, CSeq method) -- we always send a magic-cookie branch.

Server key with the magic cookie: (branch, sent-by host lower-cased, sent-by port,
method), ACK mapped to INVITE so that the ACK for a non-2xx response finds its INVITE
transaction. CANCEL keeps its own method; `invite_key_for_cancel` finds the INVITE.

Server key without the magic cookie (RFC 2543 peers): (Request-URI, To tag, From tag,
Call-ID, CSeq number, top Via as normalised text, method with ACK -> INVITE). An ACK
carries the To tag of the response it acknowledges while the INVITE carried none, so
`server_key(ack)` cannot equal the INVITE's key: `ack_server_key(invite, response)`
recomputes the INVITE's key with the response's To tag (RFC 3261 §17.2.3), and a layer
indexes an INVITE server transaction under that key too once a final response went out
(`ServerInviteTransaction.ack_key`). For magic-cookie requests it equals the key.
"""

from __future__ import annotations

import secrets

from sipmesh.sip.grammar import MAGIC_COOKIE
from sipmesh.sip.message import Request, Response

_KEEP = object()


def new_branch() -> str:
    """A fresh RFC 3261 branch: the magic cookie and 128 random bits (32 hex digits)."""
    return MAGIC_COOKIE + secrets.token_hex(16)


def client_key(message: Request | Response) -> tuple[str, str]:
    """(top Via branch, CSeq method) of a response, or of a request we send (§17.1.3)."""
    return message.via.branch or "", message.cseq[1]


def server_key(request: Request) -> tuple[object, ...]:
    """The key of the server transaction `request` belongs to (§17.2.3)."""
    method = "INVITE" if request.method == "ACK" else request.method
    return _server_key(request, method, _KEEP)


def invite_key_for_cancel(cancel: Request) -> tuple[object, ...]:
    """The key of the INVITE server transaction a CANCEL targets (§9.2)."""
    return _server_key(cancel, "INVITE", _KEEP)


def ack_server_key(invite: Request, response: Response) -> tuple[object, ...]:
    """The `server_key` of the ACK that will acknowledge `response` to `invite`."""
    return _server_key(invite, "INVITE", response.to.tag)


def _server_key(request: Request, method: str, to_tag: object) -> tuple[object, ...]:
    via = request.via
    branch = via.branch
    if branch is not None and branch.startswith(MAGIC_COOKIE):
        return branch, via.host.lower(), via.port, method
    tag = request.to.tag if to_tag is _KEEP else to_tag
    return (str(request.uri), tag, request.from_.tag, request.call_id, request.cseq[0],
            str(via), method)
