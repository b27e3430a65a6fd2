"""SIP and SIPS URIs (RFC 3261 §19.1, §25.1) and other absolute URIs.

Parsing is strict about structure (scheme, userinfo, hostport, params, headers)
and keeps parameter values in their escaped form; user and password are stored
unescaped so that comparisons (§19.1.4) see the real characters.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from urllib.parse import quote, unquote

from sipmesh.sip.errors import ParseError

# RFC 3261 §25.1: unreserved / escaped / user-unreserved for the user part.
_USER_SAFE = "-_.!~*'()&=+$,;?/"
_PASSWORD_SAFE = "-_.!~*'()&=+$,"
_ESCAPED_OK = re.compile(r"^(?:[A-Za-z0-9\-_.!~*'()&=+$,;?/:]|%[0-9A-Fa-f]{2})*$")
_HOSTNAME = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?\.)*"
                       r"[A-Za-z](?:[A-Za-z0-9\-]*[A-Za-z0-9])?\.?$")
_IPV4 = re.compile(r"^\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}$")
_PARAM_CHARS = re.compile(r"^(?:[A-Za-z0-9\-_.!~*'()\[\]/:&+$]|%[0-9A-Fa-f]{2})+$")
_HEADER_CHARS = re.compile(r"^(?:[A-Za-z0-9\-_.!~*'()\[\]/?:+$]|%[0-9A-Fa-f]{2})*$")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+\-.]*$")


def format_host(host: str) -> str:
    """Host as it appears in a URI or Via: IPv6 addresses get brackets."""
    return f"[{host}]" if ":" in host else host


def parse_host(text: str) -> str:
    """Validate an RFC 3261 host (hostname, IPv4address, IPv6reference); IPv6 is returned bare."""
    if text.startswith("["):
        if not text.endswith("]"):
            raise ParseError(f"bad IPv6 reference {text!r}")
        try:
            return str(ipaddress.IPv6Address(text[1:-1]))
        except ValueError:
            raise ParseError(f"bad IPv6 reference {text!r}") from None
    if _IPV4.match(text):
        try:
            ipaddress.IPv4Address(text)
        except ValueError:
            raise ParseError(f"bad IPv4 address {text!r}") from None
        return text
    if not _HOSTNAME.match(text):
        raise ParseError(f"bad host {text!r}")
    return text


def split_hostport(text: str) -> tuple[str, int | None]:
    """'host', 'host:port', '[v6]:port' -> (host, port)."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ParseError(f"bad host {text!r}")
        host, rest = text[: end + 1], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ParseError(f"bad host {text!r}")
        port_text = rest[1:] if rest else None
    else:
        host, sep, port_text = text.partition(":")
        if not sep:
            port_text = None
    port: int | None = None
    if port_text is not None:
        if not port_text.isdigit() or len(port_text) > 5 or int(port_text) > 65535:
            raise ParseError(f"bad port in {text!r}")
        port = int(port_text)
    return parse_host(host), port


def parse_params(text: str, *, what: str = "parameter") -> dict[str, str | None]:
    """';a=b;c' (leading ';' already stripped) -> {'a': 'b', 'c': None}; names lower-cased."""
    params: dict[str, str | None] = {}
    if not text:
        return params
    for item in text.split(";"):
        name, eq, value = item.partition("=")
        name = name.strip()
        if not name or not _PARAM_CHARS.match(name):
            raise ParseError(f"bad URI {what} {item!r}")
        if eq:
            value = value.strip()
            if not value or not _PARAM_CHARS.match(value):
                raise ParseError(f"bad URI {what} {item!r}")
            params[name.lower()] = value
        else:
            params[name.lower()] = None
    return params


def format_params(params: dict[str, str | None]) -> str:
    return "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params.items())


@dataclass(slots=True)
class SipURI:
    """sip: or sips: URI. `user`/`password` unescaped; params keep their escaped text."""

    host: str
    user: str | None = None
    password: str | None = None
    port: int | None = None
    scheme: str = "sip"
    params: dict[str, str | None] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def transport(self) -> str | None:
        t = self.params.get("transport")
        return t.lower() if t else None

    @property
    def secure(self) -> bool:
        return self.scheme == "sips"

    @property
    def lr(self) -> bool:
        return "lr" in self.params

    def host_port(self) -> str:
        host = format_host(self.host)
        return host if self.port is None else f"{host}:{self.port}"

    def aor(self) -> str:
        """Address-of-record key: scheme:user@host, lower-cased host, no port/params."""
        user = f"{self.user}@" if self.user is not None else ""
        return f"{self.scheme}:{user}{self.host.lower()}"

    def copy(self, **changes: object) -> "SipURI":
        new = SipURI(self.host, self.user, self.password, self.port, self.scheme,
                     dict(self.params), dict(self.headers))
        for k, v in changes.items():
            setattr(new, k, v)
        return new

    def __str__(self) -> str:
        out = [self.scheme, ":"]
        if self.user is not None:
            out.append(quote(self.user, safe=_USER_SAFE))
            if self.password is not None:
                out.append(":" + quote(self.password, safe=_PASSWORD_SAFE))
            out.append("@")
        out.append(self.host_port())
        out.append(format_params(self.params))
        if self.headers:
            out.append("?" + "&".join(f"{k}={v}" for k, v in self.headers.items()))
        return "".join(out)

    def equivalent(self, other: object) -> bool:
        """URI comparison of RFC 3261 §19.1.4 (simplified to what routing needs)."""
        if not isinstance(other, SipURI):
            return False
        if (self.scheme, self.user, self.password) != (other.scheme, other.user, other.password):
            return False
        if self.host.lower() != other.host.lower() or self.port != other.port:
            return False
        for name in ("user", "ttl", "method", "maddr", "transport"):
            a, b = self.params.get(name), other.params.get(name)
            if (a or "").lower() != (b or "").lower():
                return False
        for name in set(self.params) & set(other.params):
            a, b = self.params[name], other.params[name]
            if (a or "").lower() != (b or "").lower():
                return False
        return {k.lower(): v for k, v in self.headers.items()} == {
            k.lower(): v for k, v in other.headers.items()}


@dataclass(slots=True, frozen=True)
class AbsoluteURI:
    """Any non-SIP URI (tel:, mailto:, http:, ...), kept as text."""

    text: str

    @property
    def scheme(self) -> str:
        return self.text.split(":", 1)[0].lower()

    def __str__(self) -> str:
        return self.text


URI = SipURI | AbsoluteURI


def parse_uri(text: str) -> URI:
    """Parse any URI; SIP/SIPS in full, others only checked for scheme and absence of spaces."""
    scheme, colon, rest = text.partition(":")
    if not colon or not _SCHEME.match(scheme):
        raise ParseError(f"bad URI {text!r}")
    if any(c in text for c in " \t\r\n<>\"") or "\x00" in text:
        raise ParseError(f"bad URI {text!r}")
    low = scheme.lower()
    if low not in ("sip", "sips"):
        return AbsoluteURI(text)
    return _parse_sip(low, rest, text)


def parse_sip_uri(text: str) -> SipURI:
    uri = parse_uri(text)
    if not isinstance(uri, SipURI):
        raise ParseError(f"not a SIP URI: {text!r}")
    return uri


def _parse_sip(scheme: str, rest: str, whole: str) -> SipURI:
    user = password = None
    if "@" in rest:
        userinfo, _, rest = rest.partition("@")
        if "@" in rest or not userinfo:
            raise ParseError(f"bad URI userinfo in {whole!r}")
        u, colon, p = userinfo.partition(":")
        if not _ESCAPED_OK.match(u) or (colon and not _ESCAPED_OK.match(p)) or not u:
            raise ParseError(f"bad URI userinfo in {whole!r}")
        user = unquote(u)
        password = unquote(p) if colon else None
    rest, qmark, header_text = rest.partition("?")
    hostport, semi, param_text = rest.partition(";")
    host, port = split_hostport(hostport)
    if semi and not param_text:
        raise ParseError(f"empty URI parameter in {whole!r}")
    params = parse_params(param_text)
    headers: dict[str, str] = {}
    if qmark:
        for item in header_text.split("&"):
            name, eq, value = item.partition("=")
            if not eq or not name or not _HEADER_CHARS.match(name) or not _HEADER_CHARS.match(value):
                raise ParseError(f"bad URI header {item!r}")
            headers[name] = value
    return SipURI(host=host, user=user, password=password, port=port, scheme=scheme,
                  params=params, headers=headers)
