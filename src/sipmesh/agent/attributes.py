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

from typing import Iterable, Mapping

from sipmesh.agent.params import MAX_VALUE_LENGTH, ParamError, show
from sipmesh.sip.sdp import (Attribute, MediaDescription, SDPError, SessionDescription,
                             parse_sdp)

__all__ = ["MAX_BODY", "REPEATED", "build_sdp", "read_attribute_list", "read_attributes"]

MAX_BODY = 8192  # an application description is a few hundred bytes
# Attributes that a body carries many times (RFC 8839 ICE candidates): read_attributes
# leaves them out, read_attribute_list has them all.
REPEATED = frozenset({"candidate"})


def build_sdp(*, username: str, address: str, media: str, proto: str, port: int,
              attributes: Mapping[str, str] | Iterable[tuple[str, str | None]],
              fmt: str = "0") -> bytes:
    """A session description with one media section carrying `attributes` as ``a=`` lines:
    a mapping, or (name, value) pairs in order, where a name may repeat and a value None
    writes a flag (``a=end-of-candidates``)."""
    pairs = attributes.items() if isinstance(attributes, Mapping) else attributes
    sdp = SessionDescription.new(username, address)
    sdp.media.append(MediaDescription(
        media, port, proto, [fmt],
        attributes=[Attribute(name, value) for name, value in pairs]))
    return sdp.to_bytes()


def read_attribute_list(body: bytes) -> list[tuple[str, str]]:
    """Every ``a=name:value`` of a body in order, session level first, repeats included
    ('' for a flag such as ``a=end-of-candidates``).

    An empty body gives [] (the paper's caller sent its INVITE without SDP).
    Raises SDPError if the body is not SDP, ParamError if a value is longer than any
    type allows.
    """
    if not body.strip():
        return []
    if len(body) > MAX_BODY:
        raise SDPError(f"body of {len(body)} bytes is larger than {MAX_BODY}")
    sdp = parse_sdp(body)
    found: list[tuple[str, str]] = []
    for attribute in sdp.attributes + [a for m in sdp.media for a in m.attributes]:
        value = attribute.value if attribute.value is not None else ""
        if len(value) > MAX_VALUE_LENGTH:
            raise ParamError(attribute.name, f"{show(value)} is too long")
        found.append((attribute.name, value))
    return found


def read_attributes(body: bytes) -> dict[str, str]:
    """Every ``a=name:value`` of a body, session level and media sections alike, but for
    the ``REPEATED`` ones (read those with :func:`read_attribute_list`).

    An empty body gives {} (the paper's caller sent its INVITE without SDP).
    Raises SDPError if the body is not SDP, ParamError if an attribute appears
    twice with different values or a value is longer than any type allows.
    """
    found: dict[str, str] = {}
    for name, value in read_attribute_list(body):
        if name in REPEATED:
            continue
        previous = found.setdefault(name, value)
        if previous != value:
            raise ParamError(name, f"appears twice with different values "
                                   f"({show(previous)} and {show(value)})")
    return found
