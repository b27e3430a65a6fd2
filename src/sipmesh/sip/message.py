"""SIP requests and responses: parse, build, serialise (RFC 3261 §7, §18.3, §25).

Header values are kept as text; typed views (Via, Address, CSeq) are parsed on
demand through the accessors. The body is always bytes.

`parse_message` checks what any element must check before acting on a message
(start line, framing, the mandatory header fields of §8.1.1 and their syntax) and
raises `ParseError` for anything else it meets; nothing else escapes it. When the
start line is recognisable the error carries `partial`, the message as far as it
could be parsed, so that a transport can answer a broken request (400, 505, 513).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, TypeVar

from sipmesh.sip import grammar
from sipmesh.sip.errors import ParseError
from sipmesh.sip.grammar import MAGIC_COOKIE
from sipmesh.sip.headers import (CANONICAL_NAMES, LIST_HEADERS, Address, Via, canonical_name,
                                 header_key, parse_address, parse_cseq, parse_via, split_list)
from sipmesh.sip.uri import URI, SipURI, parse_uri

VERSION = "SIP/2.0"  # the one SIP-Version we speak
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
# Methods of RFC 3261 and its extensions: a CSeq mismatch on any other method is
# answered 501 rather than 400 (RFC 4475 §3.1.2.18).
KNOWN_METHODS = frozenset({"INVITE", "ACK", "OPTIONS", "BYE", "CANCEL", "REGISTER", "PRACK",
                           "SUBSCRIBE", "NOTIFY", "PUBLISH", "INFO", "REFER", "MESSAGE",
                           "UPDATE"})
_MANDATORY = [(name, name.lower()) for name in ("Via", "From", "To", "Call-ID", "CSeq")]  # §8.1.1
# RFC 4475 §3.3.8
_SINGLE = [(name, name.lower()) for name in ("Call-ID", "CSeq", "From", "To", "Max-Forwards", "Content-Type")]


@dataclass(frozen=True, slots=True)
class Limits:
    """What the parser accepts. Exceeding a limit is a ParseError (513/414/400), never a crash."""

    max_message_size: int = 65_535
    max_headers: int = 100
    max_header_length: int = 8_192
    max_start_line: int = 4_096


DEFAULT_LIMITS = Limits()
# Bound here, not imported by name: grammar.py says why.
_TOKEN, _SIP_VERSION, _DIGITS, _FOLD = grammar.TOKEN, grammar.SIP_VERSION, grammar.DIGITS, grammar.FOLD
T = TypeVar("T")


# Header name -> (canonical spelling, lookup key), for the names seen on every message.
_NAMES: dict[str, tuple[str, str]] = {}
for _low, _canon in CANONICAL_NAMES.items():
    for _spelling in (_low, _canon, _low.upper()):
        _NAMES[_spelling] = (_canon, _canon.lower())
del _low, _canon, _spelling


def _name_info(name: str) -> tuple[str, str]:
    info = _NAMES.get(name)
    if info is None:
        info = (canonical_name(name), header_key(name))
    return info


class Headers:
    """Ordered multimap of header fields; names compared case-insensitively, compact
    forms stored under their long names.

    List-valued headers (Via, Route, Record-Route, Contact, Path) hold one value per
    entry, so 'Via: a, b' is stored as two entries and serialised as two lines.

    The typed views of a message (its Via, From, To, CSeq, Contacts) are parsed once and
    kept here until a field changes: every method that changes a field drops them.
    """

    __slots__ = ("_items", "_keys", "_views")

    def __init__(self, items: list[tuple[str, str]] | None = None) -> None:
        self._items: list[tuple[str, str]] = []
        self._keys: list[str] = []  # lower-case long names, parallel to _items
        self._views: dict[str, object] | None = None  # parsed views, see Message
        for name, value in items or ():
            self.add(name, value)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name: str) -> bool:
        return (_NAMES.get(name) or _name_info(name))[1] in self._keys

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"

    def get(self, name: str, default: str | None = None) -> str | None:
        try:
            return self._items[self._keys.index((_NAMES.get(name) or _name_info(name))[1])][1]
        except ValueError:
            return default

    def get_all(self, name: str) -> list[str]:
        key = (_NAMES.get(name) or _name_info(name))[1]
        if key not in self._keys:
            return []
        return [item[1] for k, item in zip(self._keys, self._items) if k == key]

    def count(self, name: str) -> int:
        return self._keys.count(_name_info(name)[1])

    def add(self, name: str, value: str, *, first: bool = False) -> None:
        """Append a field (or insert it on top with `first`); list values are split."""
        name, key = _name_info(name)
        if "\r" in value or "\n" in value:
            raise ValueError(f"header {name} value contains CR or LF")
        self._views = None
        values = split_list(value) if key in LIST_HEADERS and value.strip() != "*" else [value]
        if first:
            self._items[0:0] = [(name, v) for v in values]
            self._keys[0:0] = [key] * len(values)
        else:
            for v in values:
                self._items.append((name, v))
                self._keys.append(key)

    def _append(self, name: str, key: str, value: str) -> None:
        self._views = None
        self._items.append((name, value))
        self._keys.append(key)

    def set(self, name: str, value: str) -> None:
        """Replace every field of that name (keeping the first one's position)."""
        key = _name_info(name)[1]
        try:
            index = self._keys.index(key)
        except ValueError:
            self.add(name, value)
            return
        self.remove(name)
        tail_items, tail_keys = self._items[index:], self._keys[index:]
        del self._items[index:], self._keys[index:]
        self.add(name, value)
        self._items.extend(tail_items)
        self._keys.extend(tail_keys)

    def remove(self, name: str) -> None:
        key = _name_info(name)[1]
        if key in self._keys:
            self._views = None
            kept = [(k, item) for k, item in zip(self._keys, self._items) if k != key]
            self._keys = [k for k, _ in kept]
            self._items = [item for _, item in kept]

    def pop_first(self, name: str) -> str | None:
        try:
            index = self._keys.index(_name_info(name)[1])
        except ValueError:
            return None
        self._views = None
        del self._keys[index]
        return self._items.pop(index)[1]

    def copy(self) -> "Headers":
        new = Headers()
        new._items = list(self._items)
        new._keys = list(self._keys)
        new._views = dict(self._views) if self._views else None  # same fields, same views
        return new

    def view(self, name: str, parse: Callable[[], T]) -> T:
        """The typed view `name`, parsed by `parse()` the first time it is asked for
        since the last change. Shared: whoever wants to change it must copy it."""
        views = self._views
        if views is None:
            views = self._views = {}
        try:
            return views[name]  # type: ignore[return-value]
        except KeyError:
            value = views[name] = parse()
            return value


@dataclass(slots=True, eq=False)
class Message:
    headers: Headers = field(default_factory=Headers)
    body: bytes = b""

    # -- typed views of the headers the stack routes on --------------------------------
    # Parsed once (parse_message has already parsed them to check the message) and shared
    # until a header field changes: treat them as read-only, copy() one to change it.
    @property
    def vias(self) -> list[Via]:
        return self.headers.view("vias", lambda: [parse_via(v) for v in self.headers.get_all("Via")])

    @property
    def via(self) -> Via:
        return self.headers.view("via", self._top_via)

    def _top_via(self) -> Via:
        value = self.headers.get("Via")
        if value is None:
            raise ParseError("missing Via")
        return parse_via(value)

    @property
    def from_(self) -> Address:
        return self.headers.view("from", lambda: parse_address(self._required("From")))

    @property
    def to(self) -> Address:
        return self.headers.view("to", lambda: parse_address(self._required("To")))

    @property
    def call_id(self) -> str:
        return self._required("Call-ID").strip()

    @property
    def cseq(self) -> tuple[int, str]:
        return self.headers.view("cseq", lambda: parse_cseq(self._required("CSeq")))

    @property
    def contacts(self) -> list[Address]:
        return self.headers.view("contacts", lambda: [
            parse_address(v) for v in self.headers.get_all("Contact") if v.strip() != "*"])

    def addresses(self, name: str) -> list[Address]:
        return [parse_address(v) for v in self.headers.get_all(name)]

    @property
    def content_type(self) -> str | None:
        value = self.headers.get("Content-Type")
        return value.split(";")[0].strip().lower() if value else None

    def push_via(self, via: Via) -> None:
        """Put `via` on top (ours, as a client or a proxy), keeping it as the parsed view."""
        views = self.headers._views
        self.headers.add("Via", str(via), first=True)
        views = {k: v for k, v in views.items() if k != "vias"} if views else {}
        views["via"] = via
        self.headers._views = views

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
        lines.extend([f"{n}: {v}" for n, v in self.headers._items if n != "Content-Length"])
        lines.append(f"Content-Length: {len(self.body)}\r\n\r\n")
        return "\r\n".join(lines).encode("utf-8", "surrogateescape") + self.body

    def __bytes__(self) -> bytes:
        return self.to_bytes()


@dataclass(slots=True, eq=False)
class Request(Message):
    method: str = "OPTIONS"
    uri: URI = field(default_factory=lambda: SipURI(host="invalid"))

    def start_line(self) -> str:
        return f"{self.method} {self.uri} {VERSION}"

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.uri}>"


@dataclass(slots=True, eq=False)
class Response(Message):
    status: int = 200
    reason: str = "OK"

    def start_line(self) -> str:
        return f"{VERSION} {self.status} {self.reason}"

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.reason}>"


# -- parsing --------------------------------------------------------------------------------


def _split_head(data: bytes) -> tuple[bytes, bytes, bool]:
    """(head, rest, complete): the head ends at the first empty line (CRLF or bare LF)."""
    crlf = data.find(b"\r\n\r\n")
    lf = data.find(b"\n\n", 0, crlf if crlf >= 0 else len(data))
    if lf >= 0:
        return data[:lf], data[lf + 2 :], True
    if crlf >= 0:
        return data[:crlf], data[crlf + 4 :], True
    return data.rstrip(b"\r\n"), b"", False


def parse_message(data: bytes, *, limits: Limits = DEFAULT_LIMITS, stream: bool = False) -> Request | Response:
    """Parse one whole message (a datagram, or one framed by transport.framing.StreamFramer).

    Raises ParseError and nothing else; `err.partial` holds what could be parsed
    (None when not even the start line was recognisable). On a datagram, octets
    after Content-Length are ignored (RFC 4475 §3.1.1.8); without Content-Length
    the body is the rest of the datagram (§18.3).
    """
    if len(data) > limits.max_message_size:
        exc = ParseError(f"message too large ({len(data)} bytes, limit {limits.max_message_size})", 513)
        exc.partial = _partial_head(data[: limits.max_message_size], limits)
        raise exc
    data = data.lstrip(b"\r\n")  # RFC 3261 §7.5: ignore CRLFs before the start line
    if not data:
        raise ParseError("empty message")
    head, rest, _ = _split_head(data)
    msg, error = _parse_head(head, limits)
    try:
        if error is not None:
            raise error
        _set_body(msg, rest, stream)
        _check(msg)
    except ParseError as exc:
        exc.partial = msg
        raise
    return msg


def _partial_head(data: bytes, limits: Limits) -> Request | Response | None:
    """The start line and headers of an oversized message, if they are complete."""
    head, _, complete = _split_head(data.lstrip(b"\r\n"))
    if not complete:
        return None
    try:
        return _parse_head(head, limits)[0]
    except ParseError:
        return None


def _parse_head(head: bytes, limits: Limits) -> tuple[Request | Response, ParseError | None]:
    """Start line and header fields. Raises when the start line is unrecognisable;
    otherwise returns the message and the first problem met (None if none), after
    collecting every well-formed header field so that a 400 can still be routed."""
    text = head.decode("utf-8", "surrogateescape")
    bare_cr = False
    if "\r" in text:
        text = text.replace("\r\n", "\n")
        bare_cr = "\r" in text
    if "\n " in text or "\n\t" in text:
        text = _FOLD.sub(" ", text)
    lines = text.split("\n")
    msg, error = _start_message(lines[0], limits)
    if bare_cr:
        error = error or ParseError("CR without LF in the message head")
        lines = [line.replace("\r", " ") for line in lines]
    if len(lines) - 1 > limits.max_headers:
        error = error or ParseError(f"too many header fields (limit {limits.max_headers})")
        del lines[limits.max_headers + 1 :]
    items, keys = msg.headers._items, msg.headers._keys
    max_length = limits.max_header_length
    for line in lines[1:]:
        if len(line) > max_length:
            error = error or ParseError(f"header field too long (limit {max_length})")
            continue
        name, colon, value = line.partition(":")
        info = _NAMES.get(name)
        if info is None:
            name = name.rstrip(" \t")
            info = _NAMES.get(name)
            if info is None:
                if not colon or not _TOKEN.fullmatch(name):
                    error = error or ParseError(f"malformed header line {line[:40]!r}")
                    continue
                info = (canonical_name(name), header_key(name))
        if not colon:
            error = error or ParseError(f"malformed header line {line[:40]!r}")
            continue
        canon, key = info
        value = value.strip(" \t")
        if key in LIST_HEADERS:
            if "," in value and value != "*":
                try:
                    values = split_list(value)
                except ParseError as exc:
                    error = error or ParseError(f"bad {canon} header: {exc.reason}")
                    values = [value]
                for v in values:
                    items.append((canon, v))
                    keys.append(key)
            elif value:
                items.append((canon, value))
                keys.append(key)
        else:
            items.append((canon, value))
            keys.append(key)
    return msg, error


def _start_message(line: str, limits: Limits) -> tuple[Request | Response, ParseError | None]:
    if line[:4].upper() == "SIP/":
        return _status_line(line, limits)
    method, sp, _ = line.partition(" ")
    if not sp or not _TOKEN.fullmatch(method):
        raise ParseError(f"bad start line {line[:60]!r}")
    req = Request(headers=Headers(), method=method)
    if len(line) > limits.max_start_line:
        return req, ParseError(f"Request-Line too long (limit {limits.max_start_line})", 414)
    parts = line.split(" ")
    if len(parts) != 3 or not parts[1] or not parts[2] or "\t" in line:
        return req, ParseError(_diagnose_request_line(line, parts))
    uri_text, version = parts[1], parts[2]
    uri_error: str | None
    try:
        req.uri = parse_uri(uri_text)
    except ParseError as exc:
        uri_error = "Request-URI enclosed in <>" if uri_text[:1] == "<" \
            else f"bad Request-URI: {exc.reason}"
    else:
        # §19.1.1: headers are not allowed in a Request-URI (RFC 4475 §3.1.2.11).
        uri_error = "escaped headers in the Request-URI" \
            if isinstance(req.uri, SipURI) and req.uri.headers else None
    if not _SIP_VERSION.fullmatch(version):
        return req, ParseError(f"bad SIP-Version {version[:20]!r}")
    if version.upper() != VERSION:
        return req, ParseError(f"SIP version {version} not supported", 505)
    return req, (ParseError(uri_error) if uri_error else None)


def _diagnose_request_line(line: str, parts: list[str]) -> str:
    if line != line.rstrip(" \t"):
        return "whitespace at the end of the Request-Line"
    if "\t" in line:
        return "tab in the Request-Line"
    if "  " in line:
        return "more than one SP between Request-Line elements"
    if len(parts) > 3 and _SIP_VERSION.fullmatch(parts[-1]):
        return "whitespace in the Request-URI"
    return f"malformed Request-Line {line[:60]!r}"


def _status_line(line: str, limits: Limits) -> tuple[Response, ParseError | None]:
    if len(line) > limits.max_start_line:
        raise ParseError(f"Status-Line too long (limit {limits.max_start_line})")
    version, sp, rest = line.partition(" ")
    code, _, reason = rest.partition(" ")
    if not sp or not code.isascii() or not code.isdigit():
        raise ParseError(f"bad Status-Line {line[:60]!r}")
    if len(code) != 3 or not 100 <= int(code) <= 699:
        raise ParseError(f"status code out of range ({code[:20]})")
    response = Response(headers=Headers(), status=int(code), reason=reason)
    if not _SIP_VERSION.fullmatch(version):
        return response, ParseError(f"bad SIP-Version {version[:20]!r}")
    if version.upper() != VERSION:
        return response, ParseError(f"SIP version {version} not supported", 505)
    return response, None


def _set_body(msg: Request | Response, rest: bytes, stream: bool) -> None:
    values = msg.headers.get_all("Content-Length")
    if not values:
        if stream:
            raise ParseError("missing Content-Length on a stream transport")
        msg.body = rest
        return
    if len(values) > 1:
        raise ParseError("more than one Content-Length header field")  # RFC 4475 §3.3.9
    text = values[0]
    if not _DIGITS.fullmatch(text):
        raise ParseError(f"bad Content-Length {text[:20]!r}")
    length = int(text)
    if length > len(rest):
        raise ParseError(f"Content-Length {length} larger than the body ({len(rest)} octets)")
    msg.body = rest if length == len(rest) else rest[:length]


def _check(msg: Request | Response) -> None:
    """The checks of §8.2 any element makes before acting on a message."""
    headers = msg.headers
    keys = headers._keys
    missing = [name for name, key in _MANDATORY if key not in keys]
    if missing:
        raise ParseError(f"missing {', '.join(missing)} header field{'s' if len(missing) > 1 else ''}")
    repeated = [name for name, key in _SINGLE if keys.count(key) > 1]
    if repeated:
        raise ParseError(f"more than one {', '.join(repeated)} header field")
    cseq = _checked(parse_cseq, "CSeq", headers)
    is_request = isinstance(msg, Request)
    if isinstance(msg, Request) and cseq[1] != msg.method:
        raise ParseError(f"CSeq method {cseq[1][:30]} does not match the request method",
                         400 if msg.method in KNOWN_METHODS else 501)
    via = _checked(parse_via, "Via", headers)
    if is_request and via.branch == MAGIC_COOKIE:
        raise ParseError("Via branch is the bare magic cookie (no transaction identifier)")
    from_ = _checked(parse_address, "From", headers)
    to = _checked(parse_address, "To", headers)
    call_id = headers.get("Call-ID") or ""
    if not call_id or any(c in call_id for c in " \t"):
        raise ParseError(f"bad Call-ID {call_id[:40]!r}")
    contacts = []
    if "contact" in keys:
        for value in headers.get_all("Contact"):
            if value != "*":
                try:
                    contacts.append(parse_address(value))
                except ParseError as exc:
                    raise ParseError(f"bad Contact header: {exc.reason}") from None
    # What was parsed to check the message is what the accessors would parse again.
    headers._views = {"cseq": cseq, "via": via, "from": from_, "to": to, "contacts": contacts}
    mf = headers.get("Max-Forwards")
    if mf is not None and (not _DIGITS.fullmatch(mf) or int(mf) > 255):
        raise ParseError(f"bad Max-Forwards {mf[:20]!r}")


def _checked(parse, name: str, headers: Headers):  # type: ignore[no-untyped-def]
    try:
        return parse(headers.get(name))
    except ParseError as exc:
        raise ParseError(f"bad {name} header: {exc.reason}") from None


def reason_for(status: int) -> str:
    return REASONS.get(status, "Unknown")


_RESPONSE_COPIED = ("Via", "Record-Route", "From", "To", "Call-ID", "CSeq")


def with_tag(address: str, tag: str) -> str:
    """A From or To value without a tag, with `tag` added (the value is kept as written)."""
    return f"{address};tag={tag}"


def make_response(request: Request, status: int, reason: str | None = None, *,
                  to_tag: str | None = None) -> Response:
    """A response to `request` (RFC 3261 §8.2.6): Via, From, To, Call-ID and CSeq copied;
    Record-Route copied for dialog-creating 1xx/2xx; a To tag added when given and absent."""
    headers = Headers()
    source = request.headers
    for name in _RESPONSE_COPIED:
        if name == "Record-Route" and not (100 < status < 300):
            continue
        key = name.lower()
        if key in source._keys:
            for k, (n, v) in zip(source._keys, source._items):
                if k == key:
                    headers._append(name, key, v)
    if to_tag is not None and status > 100:
        if request.to.tag is None:
            headers.set("To", with_tag(request.headers.get("To") or "", to_tag))
    return Response(headers=headers, status=status, reason=reason or reason_for(status))
