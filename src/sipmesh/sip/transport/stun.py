"""STUN on the SIP port (RFC 8489 Binding, RFC 5626 §4.4.2 and §8), sans-I/O.

A SIP UDP port also carries STUN: a SIP server answers Binding requests there (so an
agent's STUN server is simply its SIP server, and the answer comes back through the
same NAT mapping as the SIP traffic), and an agent sends them as the keep-alive of its
flow, learning its public address from the answer. The first byte tells the two apart
(RFC 7983 §7, RFC 5626 §8): 0-3 is STUN, a SIP message starts with a letter.
`aioice.stun` is the codec.
"""

from __future__ import annotations

import struct

from aioice import stun

HEADER_LENGTH = stun.HEADER_LENGTH
MAX_LENGTH = 548  # RFC 8489 §6.1: what a Binding needs over UDP, with room to spare


def is_stun(data: bytes) -> bool:
    """Could this datagram be STUN (and so never SIP)?"""
    return len(data) >= HEADER_LENGTH and data[0] < 4


def _parse(data: bytes) -> stun.Message | None:
    if not is_stun(data) or len(data) > MAX_LENGTH:
        return None
    try:
        return stun.parse_message(data)
    except (ValueError, struct.error, KeyError, IndexError):
        return None


UNKNOWN_ATTRIBUTES = 0x000A  # (aioice has no codec for it)
MAX_UNKNOWN = 8  # listed in a 420; more are dropped from the list, not from the answer


def unknown_required(data: bytes) -> list[int]:
    """The comprehension-required attribute types (0x0000-0x7FFF) of a well-formed
    message that we do not understand (RFC 8489 §5, §7.3.1)."""
    unknown: list[int] = []
    pos = HEADER_LENGTH
    while pos + 4 <= len(data):
        kind, length = struct.unpack_from("!HH", data, pos)
        if kind < 0x8000 and kind not in stun.ATTRIBUTES_BY_TYPE and kind not in unknown:
            unknown.append(kind)
        pos += 4 + length + stun.padding_length(length)
    return unknown


def _unknown_attribute_error(request: stun.Message, unknown: list[int], fingerprint: bool) -> bytes:
    """420 (Unknown Attribute) listing `unknown` (RFC 8489 §6.3.1.1, §14.13)."""
    response = stun.Message(stun.Method.BINDING, stun.Class.ERROR,
                            transaction_id=request.transaction_id)
    response.attributes["ERROR-CODE"] = (420, "Unknown Attribute")
    data = bytearray(bytes(response))
    value = struct.pack(f"!{len(unknown[:MAX_UNKNOWN])}H", *unknown[:MAX_UNKNOWN])
    data += struct.pack("!HH", UNKNOWN_ATTRIBUTES, len(value)) + value
    data += bytes(stun.padding_length(len(value)))
    if fingerprint:
        struct.pack_into("!H", data, 2, len(data) - HEADER_LENGTH + 8)
        data += struct.pack("!HHI", 0x8028, 4, stun.message_fingerprint(bytes(data)))
    struct.pack_into("!H", data, 2, len(data) - HEADER_LENGTH)
    return bytes(data)


def binding_response(data: bytes, source: tuple[str, int]) -> bytes | None:
    """The answer to a Binding request from `source`, None for anything else (which is
    dropped: only requests are answered, RFC 8489 §6.3). A request with a
    comprehension-required attribute we do not know gets a 420."""
    request = _parse(data)
    if request is None or request.message_method != stun.Method.BINDING \
            or request.message_class != stun.Class.REQUEST:
        return None
    unknown = unknown_required(data)
    if unknown:
        return _unknown_attribute_error(request, unknown, "FINGERPRINT" in request.attributes)
    host, port = source
    host = host.split("%", 1)[0]  # an IPv6 link-local address's zone is ours, not theirs
    response = stun.Message(stun.Method.BINDING, stun.Class.RESPONSE,
                            transaction_id=request.transaction_id)
    if data[4:8] == struct.pack("!I", stun.COOKIE):
        response.attributes["XOR-MAPPED-ADDRESS"] = (host, port)
    else:  # an RFC 3489 client knows only MAPPED-ADDRESS
        response.attributes["MAPPED-ADDRESS"] = (host, port)
    if "FINGERPRINT" in request.attributes:
        response.add_fingerprint()
    return bytes(response)


def binding_request() -> tuple[bytes, bytes]:
    """A Binding request: (transaction id, datagram)."""
    request = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    request.add_fingerprint()
    return request.transaction_id, bytes(request)


def mapped_address(data: bytes) -> tuple[bytes, tuple[str, int]] | None:
    """(transaction id, our address as the server saw it) from a Binding success
    response; None for anything else."""
    response = _parse(data)
    if response is None or response.message_method != stun.Method.BINDING \
            or response.message_class != stun.Class.RESPONSE:
        return None
    address = response.attributes.get("XOR-MAPPED-ADDRESS") or response.attributes.get("MAPPED-ADDRESS")
    if not address:
        return None
    return response.transaction_id, (str(address[0]), int(address[1]))
