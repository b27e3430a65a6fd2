"""Dialogs (RFC 3261 §12), sans-I/O: state, route set, in-dialog request building.

A dialog is identified by Call-ID, local tag and remote tag. It is created by a
UAC from a 2xx (or a 1xx with a To tag), by a UAS from the request it answers
with 2xx. The route set comes from Record-Route (reversed on the UAC side),
the remote target from Contact.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from enum import Enum

from sipmesh.sip.headers import Address
from sipmesh.sip.message import Headers, Request, Response
from sipmesh.sip.uri import URI, SipURI


class DialogState(Enum):
    EARLY = "early"
    CONFIRMED = "confirmed"
    TERMINATED = "terminated"


def new_tag() -> str:
    return secrets.token_hex(8)


@dataclass(slots=True)
class Dialog:
    call_id: str
    local_tag: str
    remote_tag: str
    local_uri: Address  # our From in requests we send
    remote_uri: Address  # their To in requests we send
    remote_target: URI
    route_set: list[Address] = field(default_factory=list)
    local_seq: int = 0
    remote_seq: int | None = None
    secure: bool = False
    state: DialogState = DialogState.CONFIRMED

    @property
    def id(self) -> tuple[str, str, str]:
        return (self.call_id, self.local_tag, self.remote_tag)

    # -- creation -----------------------------------------------------------------------
    @classmethod
    def from_uac(cls, request: Request, response: Response) -> "Dialog":
        """§12.1.2: the caller's dialog, from the INVITE and a 2xx/1xx carrying a To tag."""
        to = response.to
        if to.tag is None:
            raise ValueError("response without To tag cannot create a dialog")
        contacts = response.contacts
        target = contacts[0].uri if contacts else request.uri
        routes = list(reversed(response.addresses("Record-Route")))
        local = request.from_
        return cls(call_id=request.call_id, local_tag=local.tag or "", remote_tag=to.tag,
                   local_uri=_without_tag(local), remote_uri=_without_tag(to), remote_target=target,
                   route_set=routes, local_seq=request.cseq[0],
                   secure=isinstance(request.uri, SipURI) and request.uri.secure,
                   state=DialogState.CONFIRMED if response.status < 300 and response.status >= 200
                   else DialogState.EARLY)

    @classmethod
    def from_uas(cls, request: Request, local_tag: str) -> "Dialog":
        """§12.1.1: the callee's dialog, from the INVITE it answers with our To tag."""
        contacts = request.contacts
        if not contacts:
            raise ValueError("request without Contact cannot create a dialog")
        remote = request.from_
        return cls(call_id=request.call_id, local_tag=local_tag, remote_tag=remote.tag or "",
                   local_uri=_without_tag(request.to), remote_uri=_without_tag(remote),
                   remote_target=contacts[0].uri, route_set=request.addresses("Record-Route"),
                   remote_seq=request.cseq[0],
                   secure=isinstance(request.uri, SipURI) and request.uri.secure)

    # -- in-dialog requests ---------------------------------------------------------------
    def create_request(self, method: str, *, contact: str | None = None,
                       cseq: int | None = None) -> Request:
        """§12.2.1.1. ACK takes the INVITE's CSeq number (pass `cseq`); others increment."""
        if cseq is None:
            self.local_seq += 1
            cseq = self.local_seq
        headers = Headers()
        local = self.local_uri.copy()
        local.params["tag"] = self.local_tag
        remote = self.remote_uri.copy()
        remote.params["tag"] = self.remote_tag
        uri, routes = self.request_target()
        for route in routes:
            headers.add("Route", str(route))
        headers.add("Max-Forwards", "70")
        headers.add("From", str(local))
        headers.add("To", str(remote))
        headers.add("Call-ID", self.call_id)
        headers.add("CSeq", f"{cseq} {method}")
        if contact is not None:
            headers.add("Contact", contact)
        return Request(headers=headers, method=method, uri=uri)

    def request_target(self) -> tuple[URI, list[Address]]:
        """Request-URI and Route headers: loose routing if the first route has `lr`,
        otherwise strict routing with the remote target appended (§12.2.1.1)."""
        if not self.route_set:
            return self.remote_target, []
        first = self.route_set[0].uri
        if isinstance(first, SipURI) and first.lr:
            return self.remote_target, list(self.route_set)
        # Strip what a Request-URI may not carry (§19.1.1 table 1): the method parameter
        # and URI headers; maddr, ttl and transport stay (the strict router needs them).
        strict_uri = first.copy(params={k: v for k, v in first.params.items() if k != "method"},
                                headers={}) if isinstance(first, SipURI) else first
        return strict_uri, self.route_set[1:] + [Address(self.remote_target)]

    def next_hop(self) -> URI:
        """Where the request goes (§8.1.2): the first route when it is a loose router,
        otherwise the Request-URI (which is the strict router, or the target)."""
        if self.route_set and isinstance(self.route_set[0].uri, SipURI) and self.route_set[0].uri.lr:
            return self.route_set[0].uri
        return self.request_target()[0]

    # -- in-dialog requests received --------------------------------------------------------
    def accept_remote_cseq(self, request: Request) -> bool:
        """§12.2.2: a lower CSeq than the last one is out of order (answer 500)."""
        number = request.cseq[0]
        if request.method in ("ACK", "CANCEL"):
            return True
        if self.remote_seq is not None and number < self.remote_seq:
            return False
        self.remote_seq = number
        return True

    def update_target(self, message: Request | Response) -> None:
        """A target refresh (re-INVITE or its 2xx) replaces the remote target (§12.2)."""
        contacts = message.contacts
        if contacts:
            self.remote_target = contacts[0].uri


def dialog_id_of_request(request: Request) -> tuple[str, str, str] | None:
    """The id of the dialog a received in-dialog request belongs to (our tag is the To tag)."""
    to_tag, from_tag = request.to.tag, request.from_.tag
    if to_tag is None:
        return None
    return (request.call_id, to_tag, from_tag or "")


def _without_tag(address: Address) -> Address:
    copy = address.copy()
    copy.params.pop("tag", None)
    return copy
