"""SIP and SIPS URIs (RFC 3261 §19.1, §25.1) and other absolute URIs.

Parsing is strict about structure (scheme, userinfo, hostport, params, headers).
Every component is stored unescaped (user, password, uri-parameter names and
values, header names and values), so that lookups and the comparisons of §19.1.4
see the real characters: ``sip:cal%6Cer@h;%6C%72`` has user ``caller`` and an
``lr`` parameter. Serialising escapes again whatever the grammar does not allow
unescaped. Bytes that are not UTF-8 survive the round trip (surrogateescape).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass, field
from urllib.parse import quote, unquote

from sipmesh.sip import grammar
from sipmesh.sip.errors import ParseError

# What may appear unescaped in each part, beyond ALPHA / DIGIT (RFC 3261 §25.1).
_USER_SAFE = grammar.mark + grammar.user_unreserved  # unreserved / user-unreserved
_PASSWORD_SAFE = grammar.mark + grammar.password_unreserved
_PARAM_SAFE = grammar.mark + grammar.param_unreserved  # unreserved / param-unreserved
_HEADER_SAFE = grammar.mark + grammar.hnv_unreserved  # unreserved / hnv-unreserved


def _escaped_class(safe: str) -> re.Pattern[str]:
    """`*( safe-char / "%" )` as a regex; `_BAD_ESCAPE` then checks the escapes."""
    return re.compile(r"[A-Za-z0-9" + re.escape(safe) + r"%]*")


_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def _escaped_text(pattern: re.Pattern[str], text: str) -> bool:
    """True if `text` is *( safe-char / escaped ) for the class `pattern`."""
    return pattern.fullmatch(text) is not None and ("%" not in text or _BAD_ESCAPE.search(text) is None)


_USER_TEXT = _escaped_class(_USER_SAFE)
_PASSWORD_TEXT = _escaped_class(_PASSWORD_SAFE)
_PARAM_TEXT = _escaped_class(_PARAM_SAFE)
_HEADER_TEXT = _escaped_class(_HEADER_SAFE)
# Characters needing an escape when serialising (complements of the classes above).
_USER_UNSAFE = re.compile(r"[^A-Za-z0-9" + re.escape(_USER_SAFE) + "]")
_PASSWORD_UNSAFE = re.compile(r"[^A-Za-z0-9" + re.escape(_PASSWORD_SAFE) + "]")
_PARAM_UNSAFE = re.compile(r"[^A-Za-z0-9" + re.escape(_PARAM_SAFE) + "]")
_HEADER_UNSAFE = re.compile(r"[^A-Za-z0-9" + re.escape(_HEADER_SAFE) + "]")

_HOSTNAME = re.compile(grammar.hostname)
_IPV4 = re.compile(grammar.IPv4address)
_PORT = re.compile(grammar.port)
_SCHEME = re.compile(grammar.scheme)
_NOT_IN_URI = re.compile(r"[\x00-\x20\x7f<>\"]")

# uri-parameters whose values are case-insensitive tokens or hosts (§19.1.4 compares
# everything else case-sensitively).
_CASELESS_PARAMS = frozenset({"transport", "user", "method", "ttl", "maddr", "lr"})
# §19.1.4: present in one URI only, these still make the URIs differ. The rule text names
# user, ttl, method and maddr; its examples treat transport the same way
# (sip:bob@biloxi.com differs from sip:bob@biloxi.com;transport=udp), and so do we.
_ALWAYS_COMPARED = ("user", "ttl", "method", "maddr", "transport")


def _unescape(text: str) -> str:
    return unquote(text, errors="surrogateescape") if "%" in text else text


def _escape(text: str, unsafe: re.Pattern[str], safe: str) -> str:
    if unsafe.search(text) is None:
        return text
    return quote(text, safe=safe, errors="surrogateescape")


@functools.lru_cache(maxsize=1024)  # a pure function of a string; hosts repeat a lot
@functools.lru_cache(maxsize=4096)  # asked before every send: addresses repeat a lot
def is_ip(host: str) -> bool:
    """An IPv4 or IPv6 address (IPv6 without brackets)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def format_host(host: str) -> str:
    """Host as it appears in a URI or Via: IPv6 addresses get brackets."""
    return f"[{host}]" if ":" in host else host


@functools.lru_cache(maxsize=1024)  # a pure function of a string; hosts repeat a lot
def parse_host(text: str) -> str:
    """Validate an RFC 3261 host (hostname, IPv4address, IPv6reference); IPv6 is returned
    bare and in its canonical (compressed, lower-case) form."""
    if text.startswith("["):
        if not text.endswith("]"):
            raise ParseError(f"bad IPv6 reference {text[:60]!r}")
        try:
            return str(ipaddress.IPv6Address(text[1:-1]))
        except ValueError:
            raise ParseError(f"bad IPv6 reference {text[:60]!r}") from None
    if text[-1:].isdigit() and _IPV4.fullmatch(text):
        try:
            ipaddress.IPv4Address(text)
        except ValueError:
            raise ParseError(f"bad IPv4 address {text!r}") from None
        return text
    if not _HOSTNAME.fullmatch(text):
        raise ParseError(f"bad host {text[:60]!r}")
    return text


def parse_port(text: str, whole: str) -> int:
    if not _PORT.fullmatch(text) or int(text) > 65535:
        raise ParseError(f"bad port in {whole[:60]!r}")
    return int(text)


def split_hostport(text: str) -> tuple[str, int | None]:
    """'host', 'host:port', '[v6]:port' -> (host, port)."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ParseError(f"bad host {text[:60]!r}")
        host, rest = text[: end + 1], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ParseError(f"bad host {text[:60]!r}")
        port_text = rest[1:] if rest else None
    else:
        host, sep, port_text = text.partition(":")
        if not sep:
            port_text = None
    port = None if port_text is None else parse_port(port_text, text)
    return parse_host(host), port


def parse_params(text: str, *, what: str = "parameter") -> dict[str, str | None]:
    """'a=b;c' (leading ';' already stripped) -> {'a': 'b', 'c': None}.

    Names are unescaped and lower-cased, values unescaped."""
    params: dict[str, str | None] = {}
    if not text:
        return params
    for item in text.split(";"):
        name, eq, value = item.partition("=")
        if not name or not _escaped_text(_PARAM_TEXT, name):
            raise ParseError(f"bad URI {what} {item[:60]!r}")
        if eq:
            if not value or not _escaped_text(_PARAM_TEXT, value):
                raise ParseError(f"bad URI {what} {item[:60]!r}")
            params[_unescape(name).lower()] = _unescape(value)
        else:
            params[_unescape(name).lower()] = None
    return params


def format_params(params: dict[str, str | None]) -> str:
    out = []
    for name, value in params.items():
        out.append(";" + _escape(name, _PARAM_UNSAFE, _PARAM_SAFE))
        if value is not None:
            out.append("=" + _escape(value, _PARAM_UNSAFE, _PARAM_SAFE))
    return "".join(out)


@dataclass(slots=True)
class SipURI:
    """sip: or sips: URI; every component unescaped (see the module docstring)."""

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
            out.append(_escape(self.user, _USER_UNSAFE, _USER_SAFE))
            if self.password is not None:
                out.append(":" + _escape(self.password, _PASSWORD_UNSAFE, _PASSWORD_SAFE))
            out.append("@")
        out.append(self.host_port())
        if self.params:
            out.append(format_params(self.params))
        if self.headers:
            out.append("?" + "&".join(
                f"{_escape(k, _HEADER_UNSAFE, _HEADER_SAFE)}={_escape(v, _HEADER_UNSAFE, _HEADER_SAFE)}"
                for k, v in self.headers.items()))
        return "".join(out)

    def equivalent(self, other: object) -> bool:
        """URI comparison of RFC 3261 §19.1.4.

        Scheme, host, parameter and header names compare case-insensitively; user,
        password and other values case-sensitively (transport, user, method, ttl and
        maddr values are tokens or hosts: case-insensitive). A user, ttl, method, maddr
        or transport parameter present in only one URI makes them differ (transport as
        the section's examples have it); other parameters present in only one are
        ignored; headers must all match.
        (Simplification: an escaped reserved character in the user part is treated
        as equal to the character itself.)"""
        if not isinstance(other, SipURI):
            return False
        if (self.scheme.lower(), self.user, self.password) != \
                (other.scheme.lower(), other.user, other.password):
            return False
        if self.host.lower() != other.host.lower() or self.port != other.port:
            return False
        for name in _ALWAYS_COMPARED:
            if (name in self.params) != (name in other.params):
                return False
        for name in self.params.keys() & other.params.keys():
            a, b = self.params[name], other.params[name]
            if name in _CASELESS_PARAMS:
                a, b = a and a.lower(), b and b.lower()
            if a != b:
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
    """Parse any URI; SIP/SIPS in full, others only checked for a scheme and for
    characters no URI may contain unescaped (whitespace, controls, <, >, ")."""
    scheme, colon, rest = text.partition(":")
    low = scheme.lower()
    sip = low == "sip" or low == "sips"
    if sip:
        plain = _PLAIN_SIP.fullmatch(rest)
        if plain is not None:
            return _plain_sip(low, plain, text)
    if not colon or not _SCHEME.fullmatch(scheme):
        raise ParseError(f"bad URI {text[:60]!r}")
    if _NOT_IN_URI.search(text):
        raise ParseError(f"bad characters in URI {text[:60]!r}")
    if not sip:
        return AbsoluteURI(text)
    return _parse_sip(low, rest, text)


def parse_sip_uri(text: str) -> SipURI:
    uri = parse_uri(text)
    if not isinstance(uri, SipURI):
        raise ParseError(f"not a SIP URI: {text[:60]!r}")
    return uri


# The shape nearly every URI on the wire has, sip:user@host:port;name=value, written
# without escapes, password, headers or IPv6: one regex finds its parts and the general
# path below (which accepts a superset, with the same result for these) is skipped.
_PLAIN_SIP = re.compile(
    r"(?:([A-Za-z0-9" + re.escape(_USER_SAFE) + r"]+)@)?"   # user
    r"([A-Za-z0-9\-.]+)(?::([0-9]{1,5}))?"                  # hostname or IPv4 address, port
    r"((?:;[A-Za-z0-9" + re.escape(_PARAM_SAFE) + r"]+(?:=[A-Za-z0-9" + re.escape(_PARAM_SAFE) + r"]+)?)*)")


def _plain_sip(scheme: str, plain: re.Match[str], whole: str) -> SipURI:
    user, host, port_text, param_text = plain.groups()
    params: dict[str, str | None] = {}
    if param_text:
        for item in param_text[1:].split(";"):  # each one checked by the regex
            name, eq, value = item.partition("=")
            params[name.lower()] = value if eq else None
    port = None if port_text is None else int(port_text)  # 1-5 digits: the regex says so
    if port is not None and port > 65535:
        raise ParseError(f"bad port in {whole[:60]!r}")
    return SipURI(host=parse_host(host), user=user, port=port, scheme=scheme, params=params)


def _parse_sip(scheme: str, rest: str, whole: str) -> SipURI:
    user = password = None
    if "@" in rest:
        # '@' is allowed unescaped nowhere but here (§25.1), so the first one ends userinfo.
        userinfo, _, rest = rest.partition("@")
        if "@" in rest:
            raise ParseError(f"bad URI userinfo in {whole[:60]!r}")
        u, colon, p = userinfo.partition(":")
        if not u or not _escaped_text(_USER_TEXT, u) or (colon and not _escaped_text(_PASSWORD_TEXT, p)):
            raise ParseError(f"bad URI userinfo in {whole[:60]!r}")
        user = _unescape(u)
        password = _unescape(p) if colon else None
    rest, qmark, header_text = rest.partition("?")
    hostport, semi, param_text = rest.partition(";")
    host, port = split_hostport(hostport)
    if semi and not param_text:
        raise ParseError(f"empty URI parameter in {whole[:60]!r}")
    params = parse_params(param_text) if semi else {}
    headers: dict[str, str] = {}
    if qmark:
        for item in header_text.split("&"):
            name, eq, value = item.partition("=")
            if not eq or not name or not _escaped_text(_HEADER_TEXT, name) \
                    or not _escaped_text(_HEADER_TEXT, value):
                raise ParseError(f"bad URI header {item[:60]!r}")
            headers[_unescape(name)] = _unescape(value)
    return SipURI(host=host, user=user, password=password, port=port, scheme=scheme,
                  params=params, headers=headers)
