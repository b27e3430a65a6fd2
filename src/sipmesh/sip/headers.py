"""Header names and the structured header values of RFC 3261 §20, §25.

Values are stored as text in `Headers`; these functions turn the ones the
stack routes on (Via, From/To/Contact/Route, CSeq) into typed objects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable
from datetime import datetime, timezone

from sipmesh.sip import grammar
from sipmesh.sip.errors import ParseError
from sipmesh.sip.grammar import WSP
from sipmesh.sip.uri import URI, SipURI, format_host, is_ip, parse_host, parse_port, parse_uri

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
    "Accept-Contact", "Reject-Contact", "Request-Disposition", "Identity", "Identity-Info",
]
# lower-cased name or compact form -> the spelling we write
CANONICAL_NAMES = {name.lower(): name for name in _WELL_KNOWN}
for _short, _long in COMPACT_FORMS.items():
    CANONICAL_NAMES[_short] = _long

# Headers whose grammar is a comma-separated list: stored one value per entry so
# that a proxy can pop a Via or a Route without re-parsing the others.
LIST_HEADERS = frozenset({"via", "route", "record-route", "contact", "path"})

# Bound here, not imported by name: grammar.py says why.
_TOKEN, _DIGITS, _QUOTED_PAIR = grammar.TOKEN, grammar.DIGITS, grammar.QUOTED_PAIR
_WSP_RUN = re.compile(rf"[{grammar.WSP}]+")
_BAD_PARAM_VALUE = re.compile(r'[ \t"<>,]')


def canonical_name(name: str) -> str:
    """'v' -> 'Via', 'call-id' -> 'Call-ID'; unknown names keep their spelling."""
    return CANONICAL_NAMES.get(name.lower(), name)


def header_key(name: str) -> str:
    """The case-insensitive identity of a header name: compact forms mapped to the long one."""
    low = name.lower()
    canon = CANONICAL_NAMES.get(low)
    return canon.lower() if canon is not None else low


def split_list(value: str) -> list[str]:
    """Split a comma-separated header value, respecting quoted strings and <...>."""
    if "," not in value:
        value = value.strip()
        return [value] if value else []
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
    quoted values kept with their quotes so that they serialise unchanged.
    LWS is allowed around ';' and '=' (RFC 3261 §25.1 SEMI, EQUAL)."""
    params: dict[str, str | None] = {}
    value: str | None
    if '"' not in text:  # the common case: no quoted-string to step over
        first, *items = text.split(";")
        if first.strip(WSP):
            raise ParseError(f"bad header parameters {text[:60]!r}")
        for item in items:
            name, eq, value = item.partition("=")
            name = name.strip(WSP)
            if not _TOKEN.fullmatch(name):
                raise ParseError(f"bad header parameter name in {text[:60]!r}")
            if eq:
                value = value.strip(WSP)
                if not value or _BAD_PARAM_VALUE.search(value):
                    raise ParseError(f"bad header parameter value in {text[:60]!r}")
                params[name.lower()] = value
            else:
                params[name.lower()] = None
        return params
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in WSP:
            i += 1
        if i >= n:
            break
        if text[i] != ";":
            raise ParseError(f"bad header parameters {text[:60]!r}")
        i += 1
        j = i
        while j < n and text[j] not in "=;":
            j += 1
        name = text[i:j].strip(WSP)
        if not name or not _TOKEN.fullmatch(name):
            raise ParseError(f"bad header parameter name in {text[:60]!r}")
        value = None
        if j < n and text[j] == "=":
            j += 1
            while j < n and text[j] in WSP:
                j += 1
            if j < n and text[j] == '"':
                k = j + 1
                while k < n and text[k] != '"':
                    k += 2 if text[k] == "\\" else 1
                if k >= n:
                    raise ParseError(f"unbalanced quotes in {text[:60]!r}")
                value = text[j : k + 1]
                j = k + 1
            else:
                k = j
                while k < n and text[k] != ";":
                    k += 1
                value = text[j:k].rstrip(WSP)
                if not value or _BAD_PARAM_VALUE.search(value):
                    raise ParseError(f"bad header parameter value in {text[:60]!r}")
                j = k
        params[name.lower()] = value
        i = j
    return params


def format_header_params(params: dict[str, str | None]) -> str:
    return "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params.items())


# qdtext and quoted-pair (§25.1) never hold CR or LF: unfolding has removed those of LWS
_QUOTED_STRING = re.compile(r'"([^"\\\r\n]*(?:\\[^\r\n][^"\\\r\n]*)*)"')
# quoted-pair can carry %x00-09 / %x0B-0C / %x0E-7F; CR and LF cannot be carried at all.
_NEEDS_QUOTED_PAIR = re.compile(r'[\\"\x00-\x08\x0b\x0c\x0e-\x1f\x7f]')


def unquote_string(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return _QUOTED_PAIR.sub(r"\1", value[1:-1])
    return value


def quote_string(value: str) -> str:
    """A quoted-string (§25.1) for `value`: '"', '\\' and control characters escaped."""
    if "\r" in value or "\n" in value:
        raise ValueError("a quoted-string cannot contain CR or LF")
    return '"' + _NEEDS_QUOTED_PAIR.sub(lambda m: "\\" + m.group(0), value) + '"'


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
        return int(value) if value is not None and _DIGITS.fullmatch(value) else None

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
    """name-addr / addr-spec, RFC 3261 §20.10 and §25.1.

    name-addr = [display-name] LAQUOT addr-spec RAQUOT: LWS may precede '<' and follow
    '>', never sit inside them (RFC 4475 §3.1.2.14). An addr-spec's ';' parameters
    belong to the header field, not to the URI (§20.10, RFC 4475 §3.3.12)."""
    text = value.strip(WSP)
    display: str | None = None
    if text.startswith('"'):
        q = _QUOTED_STRING.match(text)
        if q is None:
            raise ParseError("unbalanced quotes in display name")
        display = q.group(1)
        if "\\" in display:
            display = _QUOTED_PAIR.sub(r"\1", display)
        text = text[q.end() :].lstrip(WSP)
        if not text.startswith("<"):
            raise ParseError("display name without <URI>")
    lt = text.find("<")
    if lt >= 0 and (lt == 0 or display is None):
        if display is None and lt > 0:
            token_name = text[:lt].strip(WSP)
            # *(token LWS): split on SP and HTAB only (str.split() would also take CR, VT,
            # NEL, ... as separators and keep them in a name that cannot be serialised)
            if token_name and not all(_TOKEN.fullmatch(w) for w in _WSP_RUN.split(token_name)):
                raise ParseError(f"bad display name {token_name[:40]!r} (must be tokens or quoted)")
            display = token_name or None
        gt = text.find(">", lt)
        if gt < 0:
            raise ParseError("missing '>' in address")
        uri_text = text[lt + 1 : gt]
        if uri_text != uri_text.strip(WSP):
            raise ParseError("whitespace inside <> around the URI")
        uri = parse_uri(uri_text)
        params = parse_header_params(text[gt + 1 :]) if gt + 1 < len(text) else {}
    else:
        uri_text, semi, rest = text.partition(";")
        uri_text = uri_text.rstrip(WSP)
        if "?" in uri_text or "," in uri_text:
            raise ParseError("addr-spec with '?' or ',' must be enclosed in <>")
        if " " in uri_text or "\t" in uri_text:
            raise ParseError("whitespace inside an addr-spec")
        uri = parse_uri(uri_text)
        params = parse_header_params(semi + rest) if semi else {}
    return Address(uri=uri, display_name=display, params=params)


@dataclass(slots=True)
class Via:
    """One via-parm (§20.42): sent-protocol, sent-by and parameters."""

    transport: str
    host: str
    port: int | None = None
    params: dict[str, str | None] = field(default_factory=dict)
    protocol: str = "SIP/2.0"  # protocol-name "/" protocol-version

    @property
    def branch(self) -> str | None:
        return self.params.get("branch")

    @property
    def received(self) -> str | None:
        """The received address, without the brackets some peers put around IPv6."""
        value = self.params.get("received")
        return value.strip("[]") if value else value

    @property
    def rport(self) -> int | None:
        value = self.params.get("rport")
        return int(value) if value and _DIGITS.fullmatch(value) else None

    def __str__(self) -> str:
        host = format_host(self.host)
        sent_by = host if self.port is None else f"{host}:{self.port}"
        return f"{self.protocol}/{self.transport} {sent_by}{format_header_params(self.params)}"


# sent-protocol = protocol-name SLASH protocol-version SLASH transport, each a token
_SENT_PROTOCOL = re.compile(
    rf"[ \t]*({grammar.token})[ \t]*/[ \t]*({grammar.token})[ \t]*/[ \t]*({grammar.token})[ \t]+")
_SENT_BY = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^\s;:\[\]]+)(?:[ \t]*:[ \t]*([0-9]+))?[ \t]*")


def _is_ip(value: str | None) -> bool:
    return value is not None and is_ip(value.strip("[]"))


def _is_number(limit: int) -> Callable[[str | None], bool]:
    return lambda value: value is not None and _DIGITS.fullmatch(value) is not None \
        and int(value) <= limit


_is_port = _is_number(65535)

# via-params with a defined syntax (§25.1, RFC 3581): value checks.
_VIA_PARAM_CHECKS: dict[str, Callable[[str | None], bool]] = {
    "branch": lambda value: value is not None,  # token, already checked as a parameter
    "received": _is_ip,
    "ttl": _is_number(255),
    "rport": lambda value: value is None or _is_port(value),
}


def parse_via(value: str) -> Via:
    """via-parm = sent-protocol LWS sent-by *( SEMI via-params ) (§25.1).

    Any protocol name and version parse (so that a 505 can be routed back,
    RFC 4475 §3.1.2.16); the transport is upper-cased."""
    m = _SENT_PROTOCOL.match(value)
    if not m:
        raise ParseError(f"bad Via sent-protocol in {value[:60]!r}")
    s = _SENT_BY.match(value, m.end())
    if not s:
        raise ParseError(f"bad Via sent-by in {value[:60]!r}")
    host = parse_host(s.group(1))
    port = parse_port(s.group(2), value) if s.group(2) is not None else None
    params = parse_header_params(value[s.end():]) if s.end() < len(value) else {}
    for name, v in params.items():
        check = _VIA_PARAM_CHECKS.get(name)
        if check is not None and not check(v):
            raise ParseError(f"bad Via {name} {str(v)[:60]!r}")
    protocol = m.group(1).upper() + "/" + m.group(2)
    return Via(transport=m.group(3).upper(), host=host, port=port, params=params,
               protocol=protocol)


_CSEQ = re.compile(rf"[ \t]*([0-9]+)[ \t]+({grammar.Method})[ \t]*")


def parse_cseq(value: str) -> tuple[int, str]:
    """CSeq = 1*DIGIT LWS Method; the number must be below 2**31 (§8.1.1.5)."""
    m = _CSEQ.fullmatch(value)
    if not m:
        raise ParseError(f"bad CSeq {value[:60]!r}")
    digits = m.group(1).lstrip("0") or "0"
    if len(digits) > 10 or int(digits) >= 2**31:
        raise ParseError(f"CSeq number out of range ({m.group(1)[:40]})")
    return int(digits), m.group(2)


_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_DATE = re.compile(r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun), ([0-9]{2}) (" + "|".join(_MONTHS) +
                   r") ([0-9]{4}) ([0-9]{2}):([0-9]{2}):([0-9]{2}) GMT")


def parse_date(value: str) -> datetime:
    """SIP-date (§20.17, rfc1123-date): the only time zone allowed is "GMT"
    (RFC 4475 §3.1.2.12: not UT, UTC, EST, ...)."""
    m = _DATE.fullmatch(value.strip(WSP))
    if not m:
        raise ParseError(f"bad Date {value[:60]!r} (must be rfc1123-date in GMT)")
    day, month, year, hh, mm, ss = (int(m.group(2)), _MONTHS.index(m.group(3)) + 1,
                                    int(m.group(4)), int(m.group(5)), int(m.group(6)),
                                    int(m.group(7)))
    try:
        return datetime(year, month, day, hh, mm, ss, tzinfo=timezone.utc)
    except ValueError:
        raise ParseError(f"bad Date {value[:60]!r}") from None
