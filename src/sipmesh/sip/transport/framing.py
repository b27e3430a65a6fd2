"""Stream framing (RFC 3261 §18.3): cutting a TCP/TLS byte stream into messages.

On a stream the mandatory Content-Length says where a message ends. The framer only
finds the boundaries, from the raw octets of the head; `message.parse_message(...,
stream=True)` then parses each message it returns.
"""

from __future__ import annotations

import re

from sipmesh.sip.errors import ParseError
from sipmesh.sip import grammar
from sipmesh.sip.grammar import TOKEN_OCTETS
from sipmesh.sip.message import DEFAULT_LIMITS, Limits


class StreamFramer:
    """Cuts a TCP/TLS byte stream into messages using the mandatory Content-Length."""

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self._buffer = bytearray()
        self._scanned = 0  # the buffer's first bytes known to hold no CRLFCRLF
        self._total: int | None = None  # length of the message whose head is complete

    def feed(self, data: bytes) -> list[bytes]:
        """Add bytes; return the complete raw messages now available (keep-alive CRLFs dropped).

        Raises ParseError when the stream cannot be framed any more (the connection
        must then be closed: there is no way to find the next message).
        """
        buffer = self._buffer
        buffer += data
        out: list[bytes] = []
        while True:
            if self._total is None:
                skip = 0  # CRLF keep-alives (RFC 5626 §3.5.1) and stray line ends
                while skip < len(buffer) and buffer[skip] in b"\r\n":
                    skip += 1
                if skip:
                    del buffer[:skip]
                    self._scanned = max(0, self._scanned - skip)
                if buffer and buffer[0] not in TOKEN_OCTETS:
                    # Neither a method nor "SIP/": e.g. a TLS hello on the TCP port.
                    raise ParseError("not a SIP message on the stream")
                if len(buffer) > self.limits.max_start_line and \
                        buffer.find(b"\n", 0, self.limits.max_start_line) < 0:
                    raise ParseError("start line too long", 414)
                end = buffer.find(b"\r\n\r\n", max(0, self._scanned - 3))
                if end < 0:
                    self._scanned = len(buffer)
                    if len(buffer) > self.limits.max_message_size:
                        raise ParseError("message headers too large", 513)
                    return out
                total = end + 4 + _content_length(bytes(buffer[:end]))
                if total > self.limits.max_message_size:
                    raise ParseError("message too large", 513)
                self._total = total
            if len(buffer) < self._total:
                return out
            out.append(bytes(buffer[: self._total]))
            del buffer[: self._total]
            self._total = None
            self._scanned = 0


_CL = re.compile(rb"^(?:content-length|l)[ \t]*:[ \t]*(.*?)[ \t]*$", re.IGNORECASE | re.MULTILINE)
_FOLD = re.compile(grammar.fold.encode())
_DIGITS = re.compile(grammar.digits.encode())


def _content_length(head: bytes) -> int:
    head = head.replace(b"\r\n", b"\n")
    if b"\n " in head or b"\n\t" in head:
        head = _FOLD.sub(b" ", head)
    values = _CL.findall(head)
    if not values:
        raise ParseError("missing Content-Length on a stream transport")
    if len(values) > 1:
        raise ParseError("more than one Content-Length header field")
    if not _DIGITS.fullmatch(values[0]):
        raise ParseError(f"bad Content-Length {values[0][:20]!r}")
    return int(values[0])
