"""SIP requests and responses: parse, build, serialise (RFC 3261 §7, §18.3, §25).

Header values are kept as text; typed views (Via, Address, CSeq) are parsed on
demand through the accessors. The body is always bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterator

from sipmesh.sip.errors import ParseError
from sipmesh.sip.headers import (LIST_HEADERS, TOKEN, Address, Via, canonical_name,
                                 parse_address, parse_cseq, parse_via, split_list)
from sipmesh.sip.uri import URI, parse_uri

SIP_VERSION = "SIP/2.0"
REASONS = {
    100: "Trying", 180: "Ringing", 181: "Call Is Being Forwarded", 182: "Queued",
    183: "Session Progress", 200: "OK", 202: "Accepted", 300: "Multiple Choices",
    301: "Moved Permanently", 302: "Moved Temporarily", 305: "Use Proxy", 380: "Alternative Service",
    400: "Bad Request", 401: "Unauthorized", 402: "Payment Required", 403: "Forbidden",
    404: "Not Found", 405: "Method Not Allowed", 406: "Not Acceptable",
    407: "Proxy Authentication Required", 408: "Request Timeout", 410: "Gone",
    413: "Request Entity Too Large", 414: "Request-URI Too Long", 415: "Unsupported Media Type",
    416: "Unsupported URI Scheme", 420: "Bad Extension", 421: "Extension Required",
    423: "Interval Too Brief", 480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist", 482: "Loop Detected", 483: "Too Many Hops",
    484: "Address Incomplete", 485: "Ambiguous", 486: "Busy Here", 487: "Request Terminated",
    488: "Not Acceptable Here", 491: "Request Pending", 493: "Undecipherable",
    500: "Server Internal Error", 501: "Not Implemented", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Server Time-out", 505: "Version Not Supported",
    513: "Message Too Large", 600: "Busy Everywhere", 603: "Decline",
    604: "Does Not Exist Anywhere", 606: "Not Acceptable",
}
_MANDATORY = ("Via", "From", "To", "Call-ID", "CSeq")


@dataclass(frozen=True, slots=True)
class Limits:
    """What the parser accepts. Exceeding a limit is a ParseError (413/400), never a crash."""

    max_message_size: int = 65_535
    max_headers: int = 100
    max_header_length: int = 8_192
    max_start_line: int = 4_096


DEFAULT_LIMITS = Limits()


class Headers:
    """Ordered multimap of header fields; names compared case-insensitively.

    List-valued headers (Via, Route, Record-Route, Contact, Path) hold one value per
    entry, so 'Via: a, b' is stored as two entries and serialised as two lines.
    """

    __slots__ = ("_items",)

    def __init__(self, items: list[tuple[str, str]] | None = None) -> None:
        self._items: list[tuple[str, str]] = []
        for name, value in items or ():
            self.add(name, value)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name: str) -> bool:
        key = canonical_name(name).lower()
        return any(n.lower() == key for n, _ in self._items)

    def get(self, name: str, default: str | None = None) -> str | None:
        key = canonical_name(name).lower()
        for n, v in self._items:
            if n.lower() == key:
                return v
        return default

    def get_all(self, name: str) -> list[str]:
        key = canonical_name(name).lower()
        return [v for n, v in self._items if n.lower() == key]

    def add(self, name: str, value: str, *, first: bool = False) -> None:
        name = canonical_name(name)
        if "\r" in value or "\n" in value or "\x00" in value:
            raise ValueError(f"header {name} value contains CR, LF or NUL")
        values = split_list(value) if name.lower() in LIST_HEADERS and value.strip() != "*" else [value]
        entries = [(name, v) for v in values]
        if first:
            self._items[0:0] = entries
        else:
            self._items.extend(entries)

    def set(self, name: str, value: str) -> None:
        """Replace every field of that name (keeping the first one's position)."""
        key = canonical_name(name).lower()
        index = next((i for i, (n, _) in enumerate(self._items) if n.lower() == key), None)
        self.remove(name)
        if index is None:
            self.add(name, value)
        else:
            tail, self._items = self._items[index:], self._items[:index]
            self.add(name, value)
            self._items.extend(tail)

    def remove(self, name: str) -> None:
        key = canonical_name(name).lower()
        self._items = [(n, v) for n, v in self._items if n.lower() != key]

    def pop_first(self, name: str) -> str | None:
        key = canonical_name(name).lower()
        for i, (n, v) in enumerate(self._items):
            if n.lower() == key:
                del self._items[i]
                return v
        return None

    def copy(self) -> "Headers":
        new = Headers()
        new._items = list(self._items)
        return new


@dataclass(slots=True, eq=False)
class Message:
    headers: Headers = field(default_factory=Headers)
    body: bytes = b""

    # -- typed views of the headers the stack routes on --------------------------------
    @property
    def vias(self) -> list[Via]:
        return [parse_via(v) for v in self.headers.get_all("Via")]

    @property
    def via(self) -> Via:
        value = self.headers.get("Via")
        if value is None:
            raise ParseError("missing Via")
        return parse_via(value)

    @property
    def from_(self) -> Address:
        return parse_address(self._required("From"))

    @property
    def to(self) -> Address:
        return parse_address(self._required("To"))

    @property
    def call_id(self) -> str:
        return self._required("Call-ID").strip()

    @property
    def cseq(self) -> tuple[int, str]:
        return parse_cseq(self._required("CSeq"))

    @property
    def contacts(self) -> list[Address]:
        return [parse_address(v) for v in self.headers.get_all("Contact") if v.strip() != "*"]

    def addresses(self, name: str) -> list[Address]:
        return [parse_address(v) for v in self.headers.get_all(name)]

    @property
    def content_type(self) -> str | None:
        value = self.headers.get("Content-Type")
        return value.split(";")[0].strip().lower() if value else None

    def _required(self, name: str) -> str:
        value = self.headers.get(name)
        if value is None:
            raise ParseError(f"missing {name}")
        return value

    # -- serialisation ----------------------------------------------------------------
    def start_line(self) -> str:
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        lines = [self.start_line()]
        lines.extend(f"{n}: {v}" for n, v in self.headers if n != "Content-Length")
        lines.append(f"Content-Length: {len(self.body)}")
        head = "\r\n".join(lines) + "\r\n\r\n"
        return head.encode("utf-8", "surrogateescape") + self.body

    def __bytes__(self) -> bytes:
        return self.to_bytes()


@dataclass(slots=True, eq=False)
class Request(Message):
    method: str = "OPTIONS"
    uri: URI = field(default_factory=lambda: parse_uri("sip:invalid"))

    def start_line(self) -> str:
        return f"{self.method} {self.uri} {SIP_VERSION}"

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.uri}>"


@dataclass(slots=True, eq=False)
class Response(Message):
    status: int = 200
    reason: str = "OK"

    def start_line(self) -> str:
        return f"{SIP_VERSION} {self.status} {self.reason}"

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.reason}>"


class IncompleteMessage(ParseError):
    """Raised by the stream framer internals; never escapes `StreamFramer`."""


_REQUEST_LINE = re.compile(r"^([A-Za-z0-9\-.!%*_+`'~]+) (\S+) (SIP/\d+\.\d+)$")
_STATUS_LINE = re.compile(r"^(SIP/\d+\.\d+) (\d{3}) (.*)$")


def _split_head(data: bytes) -> tuple[bytes, bytes]:
    end = data.find(b"\r\n\r\n")
    if end >= 0:
        return data[:end], data[end + 4 :]
    end = data.find(b"\n\n")
    if end >= 0:
        return data[:end], data[end + 2 :]
    return data.rstrip(b"\r\n"), b""


def _parse_head(head: bytes, limits: Limits) -> tuple[str, Headers]:
    text = head.decode("utf-8", "surrogateescape")
    lines = text.replace("\r\n", "\n").split("\n")
    start = lines[0]
    if len(start) > limits.max_start_line:
        raise ParseError("start line too long", 414)
    headers = Headers()
    current_name: str | None = None
    current_value = ""
    count = 0

    def flush() -> None:
        if current_name is not None:
            try:
                headers.add(current_name, current_value.strip())
            except ValueError as exc:
                raise ParseError(str(exc)) from None

    for line in lines[1:]:
        if line[:1] in (" ", "\t"):
            if current_name is None:
                raise ParseError("continuation line before the first header")
            current_value += " " + line.strip()
            if len(current_value) > limits.max_header_length:
                raise ParseError(f"header {current_name} too long")
            continue
        flush()
        if len(line) > limits.max_header_length:
            raise ParseError("header line too long")
        name, colon, value = line.partition(":")
        name = name.rstrip(" \t")
        if not colon or not TOKEN.match(name):
            raise ParseError(f"malformed header line {line[:40]!r}")
        count += 1
        if count > limits.max_headers:
            raise ParseError("too many header fields")
        current_name, current_value = name, value
    flush()
    return start, headers


def parse_message(data: bytes, *, limits: Limits = DEFAULT_LIMITS, stream: bool = False) -> Request | Response:
    """Parse one whole message (a datagram, or one framed by StreamFramer).

    Raises ParseError; `err.partial` holds whatever could be parsed so that the
    transport can still answer a bad request with 400.
    """
    if len(data) > limits.max_message_size:
        raise ParseError("message too large", 513)
    data = data.lstrip(b"\r\n")  # RFC 3261 §7.5: ignore CRLFs before the start line
    if not data:
        raise ParseError("empty message")
    head, rest = _split_head(data)
    start, headers = _parse_head(head, limits)
    msg = _start_message(start, headers)
    try:
        length_text = headers.get("Content-Length")
        if length_text is None:
            if stream:
                raise ParseError("missing Content-Length on a stream transport")
            msg.body = rest
        else:
            length_text = length_text.strip()
            if not length_text.isdigit():
                raise ParseError(f"bad Content-Length {length_text!r}")
            length = int(length_text)
            if length > len(rest):
                raise ParseError("Content-Length larger than the message body")
            msg.body = rest[:length]
        _check_mandatory(msg)
    except ParseError as exc:
        exc.partial = msg
        raise
    return msg


def _start_message(start: str, headers: Headers) -> Request | Response:
    if start.startswith("SIP/"):
        m = _STATUS_LINE.match(start)
        if not m:
            raise ParseError(f"bad status line {start[:60]!r}")
        if m.group(1) != SIP_VERSION:
            raise ParseError(f"unsupported version {m.group(1)}", 505)
        status = int(m.group(2))
        if not 100 <= status <= 699:
            raise ParseError(f"status code out of range {status}")
        return Response(headers=headers, status=status, reason=m.group(3))
    m = _REQUEST_LINE.match(start)
    if not m:
        raise ParseError(f"bad request line {start[:60]!r}")
    req = Request(headers=headers, method=m.group(1))
    if m.group(3) != SIP_VERSION:
        exc = ParseError(f"unsupported version {m.group(3)}", 505)
        exc.partial = req
        raise exc
    try:
        req.uri = parse_uri(m.group(2))
    except ParseError as exc:
        exc.partial = req
        raise
    return req


def _check_mandatory(msg: Request | Response) -> None:
    for name in _MANDATORY:
        if name not in msg.headers:
            raise ParseError(f"missing {name} header")
    number, method = msg.cseq
    if isinstance(msg, Request) and method != msg.method:
        raise ParseError("CSeq method does not match the request method")
    msg.via  # noqa: B018 - validates the top Via
    msg.from_  # noqa: B018
    msg.to  # noqa: B018
    mf = msg.headers.get("Max-Forwards")
    if mf is not None and (not mf.strip().isdigit() or int(mf) > 255):
        raise ParseError(f"bad Max-Forwards {mf!r}")


class StreamFramer:
    """Cuts a TCP/TLS byte stream into messages using the mandatory Content-Length."""

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Add bytes; return the complete raw messages now available (keep-alive CRLFs dropped).

        Raises ParseError when the stream cannot be framed any more (the connection
        must then be closed: there is no way to find the next message).
        """
        self._buffer += data
        out: list[bytes] = []
        while True:
            while self._buffer[:2] == b"\r\n":
                del self._buffer[:2]
            if self._buffer[:1] == b"\n":
                del self._buffer[:1]
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > self.limits.max_message_size:
                    raise ParseError("message headers too large", 513)
                return out
            head = bytes(self._buffer[:end])
            length = _content_length(head)
            total = end + 4 + length
            if total > self.limits.max_message_size:
                raise ParseError("message too large", 513)
            if len(self._buffer) < total:
                return out
            out.append(bytes(self._buffer[:total]))
            del self._buffer[:total]


_CL = re.compile(rb"^(?:content-length|l)[ \t]*:[ \t]*(\d+)[ \t]*$", re.IGNORECASE | re.MULTILINE)


def _content_length(head: bytes) -> int:
    m = _CL.search(head.replace(b"\r\n", b"\n"))
    if not m:
        raise ParseError("missing Content-Length on a stream transport")
    return int(m.group(1))


def reason_for(status: int) -> str:
    return REASONS.get(status, "Unknown")


_RESPONSE_COPIED = ("Via", "Record-Route", "From", "To", "Call-ID", "CSeq")


def make_response(request: Request, status: int, reason: str | None = None, *,
                  to_tag: str | None = None) -> Response:
    """A response to `request` (RFC 3261 §8.2.6): Via, From, To, Call-ID and CSeq copied;
    Record-Route copied for dialog-creating 1xx/2xx; a To tag added when given and absent."""
    headers = Headers()
    for name in _RESPONSE_COPIED:
        if name == "Record-Route" and not (100 < status < 300):
            continue
        for value in request.headers.get_all(name):
            headers.add(name, value)
    if to_tag is not None and status > 100:
        to = request.to
        if to.tag is None:
            to.params["tag"] = to_tag
            headers.set("To", str(to))
    return Response(headers=headers, status=status, reason=reason or reason_for(status))
