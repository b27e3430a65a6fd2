"""Reaching user agents behind NAT (sans-I/O).

A UA behind a NAT writes its private address into Contact and Via. Only the flow its
messages arrive on reaches it back: the NAT's public address and port (over UDP, as
long as the UA keeps the binding alive) or the TCP/TLS connection it opened. So the
broker, like Kamailio's nathelper:

* remembers where a REGISTER came from (the binding's source flow and `nat` flag),
  and sends requests for that AOR there (`Broker._flow_of`);
* marks the Contact of a request or a 1xx/2xx response that it relays from a UA
  behind NAT with the flow it came on: `;alias=ip~port~proto` on the Contact URI, as
  Kamailio's `set_contact_alias()` writes it. The peer uses that URI as the dialog's
  remote target, and since we record-route, every in-dialog request (ACK, re-INVITE,
  BYE, INFO) comes back through us with it as Request-URI;
* sends a request whose Request-URI carries an alias (and no Route left: we are the
  last proxy) to that flow, without the alias (`handle_ruri_alias()`). A TCP/TLS flow
  is only ever the UA's own connection: it is reused, never opened towards the NAT.
"""

from __future__ import annotations

import functools
import ipaddress

from sipmesh.sip.errors import ParseError
from sipmesh.sip.headers import Via, parse_address
from sipmesh.sip.message import Request, Response
from sipmesh.sip.transport.base import DEFAULT_PORTS, Flow
from sipmesh.sip.uri import SipURI

ALIAS = "alias"
# Kamailio's protocol numbers in an alias (PROTO_UDP, PROTO_TCP, PROTO_TLS).
_PROTO = {"UDP": "1", "TCP": "2", "TLS": "3"}
_TRANSPORT = {number: name for name, number in _PROTO.items()}


def behind_nat(via: Via, contact: SipURI, source: Flow) -> bool:
    """Did a request pass a NAT (like Kamailio's nat_uac_test 19)? Yes when it did not
    come from where its top Via says it was sent (the transport stamped received/rport
    with other values), or when the Contact names a private address other than the source.
    A third-party registration (from somewhere else, for a contact that is reachable as
    it is) is not NAT: its requests go to the Contact."""
    via_port = via.port or DEFAULT_PORTS.get(source.transport, 5060)
    if via.host != source.host or via_port != source.port:
        return True
    return contact.host != source.host and _is_private(contact.host)


@functools.lru_cache(maxsize=1024)
def _is_private(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_private
    except ValueError:
        return False  # a name


def format_alias(flow: Flow) -> str:
    host = f"[{flow.host}]" if ":" in flow.host else flow.host
    return f"{host}~{flow.port}~{_PROTO[flow.transport]}"


def parse_alias(value: str | None) -> Flow | None:
    """The flow in an alias parameter's value; None if it is not a valid one."""
    if not value:
        return None
    parts = value.rsplit("~", 2)
    if len(parts) != 3:
        return None
    host, port, proto = parts
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    transport = _TRANSPORT.get(proto)
    try:
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        return None
    if transport is None or not 0 < number < 65536:
        return None
    return Flow(transport, host, number)


def _first_contact(message: Request | Response) -> SipURI | None:
    value = message.headers.get("Contact")
    if value is None or value.strip() == "*":
        return None
    try:
        uri = parse_address(value).uri
    except ParseError:
        return None
    return uri if isinstance(uri, SipURI) and ALIAS not in uri.params else None


def request_from_nat(request: Request, source: Flow) -> bool:
    """Does `request` come straight from a UA (one Via) behind NAT, with a Contact to mark?"""
    if request.headers.count("Via") != 1:
        return False
    contact = _first_contact(request)
    return contact is not None and behind_nat(request.via, contact, source)


def response_from_nat(response: Response, source: Flow) -> bool:
    """Does this 1xx/2xx, from the UA we sent the request to over `source`, name a
    Contact other than where it came from (a NATed UA's private address)?"""
    if not 100 < response.status < 300:
        return False
    contact = _first_contact(response)
    return contact is not None and contact.host.strip("[]") != source.host


def add_alias(message: Request | Response, flow: Flow) -> None:
    """Put `;alias=` for `flow` on the first Contact's URI."""
    values = message.headers.get_all("Contact")
    address = parse_address(values[0])
    assert isinstance(address.uri, SipURI)
    address.uri = address.uri.copy()
    address.uri.params[ALIAS] = format_alias(flow)
    message.headers.remove("Contact")
    message.headers.add("Contact", str(address))
    for value in values[1:]:
        message.headers.add("Contact", value)


def take_alias(request: Request) -> Flow | None:
    """The flow named by an alias on the Request-URI, which loses the alias (the UA gets
    its own Contact back); None when there is none or a Route still lies ahead."""
    uri = request.uri
    if not isinstance(uri, SipURI) or ALIAS not in uri.params or request.headers.get("Route") is not None:
        return None
    flow = parse_alias(uri.params[ALIAS])
    if flow is None:
        return None
    uri = uri.copy()
    del uri.params[ALIAS]
    request.uri = uri
    return flow
