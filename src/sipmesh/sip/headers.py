"""Header names and the structured header values of RFC 3261 §20, §25.

Values are stored as text in `Headers`; these functions turn the ones the
stack routes on (Via, From/To/Contact/Route, CSeq) into typed objects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sipmesh.sip.errors import ParseError
from sipmesh.sip.uri import (URI, SipURI, format_host, parse_uri, split_hostport)

COMPACT_FORMS = {
    "i": "Call-ID", "m": "Contact", "e": "Content-Encoding", "l": "Content-Length",
    "c": "Content-Type", "f": "From", "s": "Subject", "k": "Supported", "t": "To",
    "v": "Via", "o": "Event", "u": "Allow-Events", "r": "Refer-To", "b": "Referred-By",
    "x": "Session-Expires", "a": "Accept-Contact", "j": "Reject-Contact",
    "d": "Request-Disposition", "y": "Identity", "n": "Identity-Info",
}
_WELL_KNOWN = [
    "Accept", "Accept-Encoding", "Accept-Language", "Alert-Info", "Allow", "Authentication-Info",
    "Authorization", "Call-ID", "Call-Info", "Contact", "Content-Disposition",
    "Content-Encoding", "Content-Language", "Content-Length", "Content-Type", "CSeq", "Date",
    "Error-Info", "Expires", "From", "In-Reply-To", "Max-Forwards", "Min-Expires",
    "MIME-Version", "Organization", "Priority", "Proxy-Authenticate", "Proxy-Authorization",
    "Proxy-Require", "Record-Route", "Reply-To", "Require", "Retry-After", "Route", "Server",
    "Subject", "Supported", "Timestamp", "To", "Unsupported", "User-Agent", "Via", "Warning",
    "WWW-Authenticate", "Event", "Allow-Events", "Path", "Service-Route", "Session-Expires",
    "Min-SE", "RSeq", "RAck", "Refer-To", "Referred-By", "Reason",
]
_CANONICAL = {name.lower(): name for name in _WELL_KNOWN}
for _short, _long in COMPACT_FORMS.items():
    _CANONICAL[_short] = _long

# Headers whose grammar is a comma-separated list: stored one value per entry so
# that a proxy can pop a Via or a Route without re-parsing the others.
LIST_HEADERS = frozenset({"via", "route", "record-route", "contact", "path"})

TOKEN = re.compile(r"^[A-Za-z0-9\-.!%*_+`'~]+$")


def canonical_name(name: str) -> str:
    """'v' -> 'Via', 'call-id' -> 'Call-ID'; unknown names keep their spelling."""
    return _CANONICAL.get(name.lower(), name)


def split_list(value: str) -> list[str]:
    """Split a comma-separated header value, respecting quoted strings and <...>."""
    if "," not in value:
        return [value.strip()] if value.strip() else []
    items: list[str] = []
    start = 0
    in_quote = in_angle = escaped = False
    for i, ch in enumerate(value):
        if escaped:
            escaped = False
        elif in_quote:
            if ch == "\\":
                escaped = True
            elif ch == '"':
                in_quote = False
        elif ch == '"':
            in_quote = True
        elif ch == "<":
            in_angle = True
        elif ch == ">":
            in_angle = False
        elif ch == "," and not in_angle:
            items.append(value[start:i].strip())
            start = i + 1
    if in_quote:
        raise ParseError("unbalanced quotes in header value")
    items.append(value[start:].strip())
    if any(not item for item in items):
        raise ParseError("empty element in header list")
    return items


def parse_header_params(text: str) -> dict[str, str | None]:
    """';a=b;c;d="x;y"' -> {'a': 'b', 'c': None, 'd': '"x;y"'}; names lower-cased,
    quoted values kept with their quotes so that they serialise unchanged."""
    params: dict[str, str | None] = {}
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " \t":
            i += 1
        if i >= n:
            break
        if text[i] != ";":
            raise ParseError(f"bad header parameters {text!r}")
        i += 1
        j = i
        while j < n and text[j] not in "=;":
            j += 1
        name = text[i:j].strip()
        if not name or not TOKEN.match(name):
            raise ParseError(f"bad header parameter name in {text!r}")
        value: str | None = None
        if j < n and text[j] == "=":
            j += 1
            while j < n and text[j] in " \t":
                j += 1
            if j < n and text[j] == '"':
                k = j + 1
                while k < n and text[k] != '"':
                    k += 2 if text[k] == "\\" else 1
                if k >= n:
                    raise ParseError(f"unbalanced quotes in {text!r}")
                value = text[j : k + 1]
                j = k + 1
            else:
                k = j
                while k < n and text[k] != ";":
                    k += 1
                value = text[j:k].strip()
                if not value or any(c in value for c in ' \t"<>,'):
                    raise ParseError(f"bad header parameter value in {text!r}")
                j = k
        params[name.lower()] = value
        i = j
    return params


def format_header_params(params: dict[str, str | None]) -> str:
    return "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params.items())


def unquote_string(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def quote_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(slots=True)
class Address:
    """name-addr or addr-spec with header parameters (From, To, Contact, Route, ...)."""

    uri: URI
    display_name: str | None = None
    params: dict[str, str | None] = field(default_factory=dict)

    @property
    def tag(self) -> str | None:
        return self.params.get("tag")

    @property
    def expires(self) -> int | None:
        value = self.params.get("expires")
        return int(value) if value is not None and value.isdigit() else None

    @property
    def q(self) -> float:
        try:
            return float(self.params.get("q") or 1.0)
        except ValueError:
            return 1.0

    def __str__(self) -> str:
        name = f"{quote_string(self.display_name)} " if self.display_name else ""
        return f"{name}<{self.uri}>{format_header_params(self.params)}"

    def copy(self) -> "Address":
        uri = self.uri.copy() if isinstance(self.uri, SipURI) else self.uri
        return Address(uri, self.display_name, dict(self.params))


def parse_address(value: str) -> Address:
    """name-addr / addr-spec, RFC 3261 §20.10 and §25.1."""
    text = value.strip()
    display: str | None = None
    if text.startswith('"'):
        k = 1
        while k < len(text) and text[k] != '"':
            k += 2 if text[k] == "\\" else 1
        if k >= len(text):
            raise ParseError("unbalanced quotes in display name")
        display = unquote_string(text[: k + 1])
        text = text[k + 1 :].lstrip()
        if not text.startswith("<"):
            raise ParseError("display name without <URI>")
    if "<" in text and (text.startswith("<") or display is None):
        lt = text.find("<")
        if display is None:
            token_name = text[:lt].strip()
            if token_name and not all(TOKEN.match(w) for w in token_name.split()):
                raise ParseError(f"bad display name {token_name!r}")
            display = token_name or None
        gt = text.find(">", lt)
        if gt < 0:
            raise ParseError("missing '>' in address")
        uri = parse_uri(text[lt + 1 : gt].strip())
        params = parse_header_params(text[gt + 1 :])
    else:
        # addr-spec: parameters after the URI belong to the header, not to the URI.
        uri_text, semi, rest = text.partition(";")
        if "?" in uri_text or "," in uri_text or " " in uri_text.strip():
            raise ParseError("addr-spec with reserved characters must use <>")
        uri = parse_uri(uri_text.strip())
        params = parse_header_params(semi + rest)
    return Address(uri=uri, display_name=display, params=params)


@dataclass(slots=True)
class Via:
    transport: str
    host: str
    port: int | None = None
    params: dict[str, str | None] = field(default_factory=dict)

    @property
    def branch(self) -> str | None:
        return self.params.get("branch")

    @property
    def received(self) -> str | None:
        return self.params.get("received")

    @property
    def rport(self) -> int | None:
        value = self.params.get("rport")
        return int(value) if value and value.isdigit() else None

    def __str__(self) -> str:
        host = format_host(self.host)
        sent_by = host if self.port is None else f"{host}:{self.port}"
        return f"SIP/2.0/{self.transport} {sent_by}{format_header_params(self.params)}"


_VIA = re.compile(r"^\s*SIP\s*/\s*2\.0\s*/\s*([A-Za-z0-9\-.!%*_+`'~]+)\s+([^;\s]+(?:\s*:\s*\d+)?)\s*(.*)$",
                  re.IGNORECASE | re.DOTALL)


def parse_via(value: str) -> Via:
    m = _VIA.match(value)
    if not m:
        raise ParseError(f"bad Via {value!r}")
    host, port = split_hostport(re.sub(r"\s+", "", m.group(2)))
    params = parse_header_params(m.group(3))
    for name in ("ttl", "rport"):
        v = params.get(name)
        if v is not None and not v.isdigit():
            raise ParseError(f"bad Via {name} {v!r}")
    return Via(transport=m.group(1).upper(), host=host, port=port, params=params)


def parse_cseq(value: str) -> tuple[int, str]:
    parts = value.split()
    if len(parts) != 2 or not parts[0].isdigit() or not TOKEN.match(parts[1]):
        raise ParseError(f"bad CSeq {value!r}")
    number = int(parts[0])
    if number >= 2**31:
        raise ParseError(f"CSeq number out of range {value!r}")
    return number, parts[1]
