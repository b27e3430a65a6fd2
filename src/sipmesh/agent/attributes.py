"""Application parameters in SDP ``a=`` lines, as the papers carry them.

Proxies rewrite ``o=``, ``c=`` and the ``m=`` port (siproxd in the paper's
experiment, Kamailio with SDP mangling in ours), so the agent reads ``a=``
lines only; the other lines are written for the benefit of SIP servers and
tools and never read back.

A body looks like the paper's 200 OK::

    v=0
    o=2500 1169538046 1169538046 IN IP4 202.26.159.136
    s=-
    c=IN IP4 202.26.159.136
    t=0 0
    m=application/vpn 8000 OpenVPN 0
    a=IP4:202.26.159.136
    a=PORT:8000
    a=VPN_LOCAL_ADDR:192.168.234.1
    a=VPN_REMOTE_ADDR:192.168.234.2
"""

from __future__ import annotations

from typing import Mapping

from sipmesh.agent.params import MAX_VALUE_LENGTH, ParamError, show
from sipmesh.sip.sdp import (Attribute, MediaDescription, SDPError, SessionDescription,
                             parse_sdp)

__all__ = ["MAX_BODY", "build_sdp", "read_attributes"]

MAX_BODY = 8192  # an application description is a few hundred bytes


def build_sdp(*, username: str, address: str, media: str, proto: str, port: int,
              attributes: Mapping[str, str], fmt: str = "0") -> bytes:
    """A session description with one media section carrying `attributes` as ``a=`` lines."""
    sdp = SessionDescription.new(username, address)
    sdp.media.append(MediaDescription(
        media, port, proto, [fmt],
        attributes=[Attribute(name, value) for name, value in attributes.items()]))
    return sdp.to_bytes()


def read_attributes(body: bytes) -> dict[str, str]:
    """Every ``a=name:value`` of a body, session level and media sections alike.

    An empty body gives {} (the paper's caller sent its INVITE without SDP).
    Raises SDPError if the body is not SDP, ParamError if an attribute appears
    twice with different values or a value is longer than any type allows.
    """
    if not body.strip():
        return {}
    if len(body) > MAX_BODY:
        raise SDPError(f"body of {len(body)} bytes is larger than {MAX_BODY}")
    sdp = parse_sdp(body)
    found: dict[str, str] = {}
    for attribute in sdp.attributes + [a for m in sdp.media for a in m.attributes]:
        value = attribute.value if attribute.value is not None else ""
        if len(value) > MAX_VALUE_LENGTH:
            raise ParamError(attribute.name, f"{show(value)} is too long")
        previous = found.setdefault(attribute.name, value)
        if previous != value:
            raise ParamError(attribute.name, f"appears twice with different values "
                                             f"({show(previous)} and {show(value)})")
    return found
