"""Typed application parameters: the values an application sends in SDP ``a=`` lines.

Everything a peer puts in an ``a=`` line is untrusted. Each application declares
its parameters as `Param` (attribute name + `ParamType`), and nothing reaches a
program before `validate` has turned the raw strings into checked values. A bad
value raises `ParamError`, whose message names the parameter, shows the value
(shortened and escaped, never echoed raw) and says what was expected.

The types are also meant for configuration files (the super-daemon's parameter
declarations): `param_type("port")` looks a type up by name.

Every type refuses whitespace, control characters and anything a shell or a
configuration file would give meaning to, so a validated value can be put on a
command line or in an OpenVPN config line as it is.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from dataclasses import dataclass
from typing import Iterable, Mapping

__all__ = [
    "MAX_VALUE_LENGTH", "Base64Key", "CIDR", "Choice", "Fingerprint", "Host", "IPAddress",
    "IPv4", "IPv6", "Integer", "Param", "ParamError", "ParamType", "Port", "Token",
    "TYPES", "param_type", "show", "validate",
]

MAX_VALUE_LENGTH = 512  # no declared type needs more (a SHA-512 fingerprint is 191)


def show(value: str, limit: int = 40) -> str:
    """A value for an error message: escaped (repr) and cut to `limit` characters."""
    if len(value) > limit:
        return repr(value[:limit]) + f"... ({len(value)} characters)"
    return repr(value)


class ParamError(ValueError):
    """A parameter is missing or its value is not of its declared type."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message


class ParamType:
    """One kind of value. `parse` returns the canonical text or raises ValueError."""

    name = "text"
    expected = "a value"
    max_length = 255

    def parse(self, text: str) -> str:
        raise NotImplementedError

    def _bounded(self, text: str) -> None:
        """A str of at most max_length characters, or ValueError."""
        if not isinstance(text, str):
            raise ValueError(f"expected {self.expected}, got {type(text).__name__}")
        if len(text) > self.max_length:
            raise ValueError(f"{show(text)} is too long (at most {self.max_length} characters "
                             f"for {self.expected})")

    def check(self, text: str) -> str:
        self._bounded(text)
        if not text:
            raise ValueError(f"empty, expected {self.expected}")
        if not text.isascii() or not text.isprintable() or text != text.strip() or " " in text:
            raise ValueError(f"{show(text)} contains whitespace or control characters, "
                             f"expected {self.expected}")
        try:
            return self.parse(text)
        except ValueError as exc:
            detail = f" ({exc})" if str(exc) else ""
            raise ValueError(f"{show(text)} is not {self.expected}{detail}") from None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class IPv4(ParamType):
    """Dotted-quad IPv4 address (no leading zeros); by default a usable unicast address."""

    name, expected, max_length = "ipv4", "an IPv4 address", 15

    def __init__(self, unicast: bool = True) -> None:
        self.unicast = unicast

    def parse(self, text: str) -> str:
        if not re.fullmatch(r"[0-9.]+", text):
            raise ValueError("")
        address = ipaddress.IPv4Address(text)
        if self.unicast and (address.is_unspecified or address.is_multicast
                             or address == ipaddress.IPv4Address("255.255.255.255")):
            raise ValueError("not a unicast address")
        return str(address)


class IPv6(ParamType):
    """IPv6 address without zone index; by default a usable unicast address."""

    name, expected, max_length = "ipv6", "an IPv6 address", 45

    def __init__(self, unicast: bool = True) -> None:
        self.unicast = unicast

    def parse(self, text: str) -> str:
        if not re.fullmatch(r"[0-9A-Fa-f:.]+", text) or ":" not in text:
            raise ValueError("")
        address = ipaddress.IPv6Address(text)
        if self.unicast and (address.is_unspecified or address.is_multicast):
            raise ValueError("not a unicast address")
        return str(address)


class IPAddress(ParamType):
    name, expected, max_length = "ip", "an IP address", 45

    def __init__(self, unicast: bool = True) -> None:
        self._v4, self._v6 = IPv4(unicast), IPv6(unicast)

    def parse(self, text: str) -> str:
        return self._v6.parse(text) if ":" in text else self._v4.parse(text)


class Port(ParamType):
    """A TCP/UDP port, 1..65535, plain decimal."""

    name, expected, max_length = "port", "a port number (1-65535)", 5

    def parse(self, text: str) -> str:
        if not re.fullmatch(r"[0-9]{1,5}", text) or not 1 <= int(text) <= 65535:
            raise ValueError("")
        return str(int(text))


class Integer(ParamType):
    name, max_length = "int", 20

    def __init__(self, low: int | None = None, high: int | None = None) -> None:
        self.low, self.high = low, high
        bounds = f" in {'' if low is None else low}..{'' if high is None else high}" \
            if low is not None or high is not None else ""
        self.expected = f"an integer{bounds}"

    def parse(self, text: str) -> str:
        if not re.fullmatch(r"-?[0-9]{1,18}", text):
            raise ValueError("")
        value = int(text)
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise ValueError("out of range")
        return str(value)


class CIDR(ParamType):
    """An address with prefix length, '10.0.0.1/24' or '2001:db8::/64'."""

    name, expected, max_length = "cidr", "an address/prefix (CIDR)", 49

    def parse(self, text: str) -> str:
        if not re.fullmatch(r"[0-9A-Fa-f:.]+/[0-9]{1,3}", text):
            raise ValueError("")
        return str(ipaddress.ip_interface(text))


_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


class Host(ParamType):
    """A DNS host name (RFC 1123) or an IP address literal."""

    name, expected, max_length = "host", "a host name or IP address", 253

    def parse(self, text: str) -> str:
        if re.fullmatch(r"[0-9.]+", text):
            return IPv4().parse(text)
        if ":" in text:
            return IPv6().parse(text.removeprefix("[").removesuffix("]"))
        labels = text.removesuffix(".").split(".")
        if not all(_LABEL.fullmatch(label) for label in labels):
            raise ValueError("")
        return text.lower()


class Token(ParamType):
    """A short identifier: letters, digits and . _ + ~ - only."""

    name, expected = "token", "a token (letters, digits, '.', '_', '+', '~', '-')"

    def __init__(self, max_length: int = 64) -> None:
        self.max_length = max_length

    def parse(self, text: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._+~-]+", text):
            raise ValueError("")
        return text


class Choice(ParamType):
    name = "choice"

    def __init__(self, *values: str) -> None:
        self.values = values
        self.expected = "one of " + ", ".join(values)
        self.max_length = max(len(v) for v in values)

    def parse(self, text: str) -> str:
        if text not in self.values:
            raise ValueError("")
        return text


class Base64Key(ParamType):
    """Standard base64 (with padding) of a key, optionally of an exact decoded size."""

    name = "base64key"

    def __init__(self, size: int | None = None) -> None:
        self.size = size
        self.expected = f"a base64 key of {size} bytes" if size else "a base64 key"
        self.max_length = 4 * (((size or 256) + 2) // 3)

    def parse(self, text: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9+/]+={0,2}", text) or len(text) % 4:
            raise ValueError("")
        try:
            raw = base64.b64decode(text, validate=True)
        except binascii.Error:
            raise ValueError("") from None
        if self.size is not None and len(raw) != self.size:
            raise ValueError(f"{len(raw)} bytes")
        return text


_HASH_SIZES = {"sha-1": 20, "sha-224": 28, "sha-256": 32, "sha-384": 48, "sha-512": 64}


class Fingerprint(ParamType):
    """RFC 8122 ``hash-func SP fingerprint``: 'sha-256 AB:CD:...' (hex upper-cased)."""

    name, max_length = "fingerprint", 200

    def __init__(self, algorithms: Iterable[str] = ("sha-256",)) -> None:
        self.algorithms = tuple(a.lower() for a in algorithms)
        self.expected = f"a certificate fingerprint ({'/'.join(self.algorithms)} AB:CD:...)"

    def check(self, text: str) -> str:
        # The one type with an inner space, so the generic whitespace rule is applied per field.
        self._bounded(text)
        fields = text.split(" ")
        if len(fields) != 2 or not all(f and f.isascii() and f.isprintable() and f.strip() == f
                                       for f in fields):
            raise ValueError(f"{show(text)} is not {self.expected} (the hash function, one space, "
                             "the hex bytes)")
        try:
            return self._parse(*fields)
        except ValueError as exc:
            detail = f" ({exc})" if str(exc) else ""
            raise ValueError(f"{show(text)} is not {self.expected}{detail}") from None

    def parse(self, text: str) -> str:
        return self.check(text)

    def _parse(self, algorithm: str, hexpairs: str) -> str:
        algorithm = algorithm.lower()
        if algorithm not in self.algorithms:
            raise ValueError(f"hash function must be {' or '.join(self.algorithms)}")
        if not re.fullmatch(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2})*", hexpairs):
            raise ValueError("")
        size = len(hexpairs.split(":"))
        if size != _HASH_SIZES[algorithm]:
            raise ValueError(f"{size} bytes, {algorithm} has {_HASH_SIZES[algorithm]}")
        return f"{algorithm} {hexpairs.upper()}"


TYPES: dict[str, ParamType] = {t.name: t for t in (
    IPv4(), IPv6(), IPAddress(), Port(), Integer(), CIDR(), Host(), Token(), Base64Key(),
    Fingerprint())}


def param_type(name: str) -> ParamType:
    """A type by its configuration name ('ipv4', 'port', 'fingerprint', ...)."""
    try:
        return TYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown parameter type {name!r} (known: {', '.join(sorted(TYPES))})") \
            from None


@dataclass(frozen=True)
class Param:
    """One declared parameter: the ``a=`` attribute name and its type."""

    name: str
    type: ParamType
    required: bool = True
    description: str = ""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.name):
            raise ValueError(f"bad parameter name {self.name!r}")

    def parse(self, value: str) -> str:
        try:
            return self.type.check(value)
        except ValueError as exc:
            raise ParamError(self.name, str(exc)) from None


def validate(params: Iterable[Param], values: Mapping[str, str]) -> dict[str, str]:
    """The declared parameters found in `values`, each checked against its type.

    Undeclared names are ignored (a proxy or a newer peer may add attributes);
    a missing required parameter or a bad value raises ParamError.
    """
    result: dict[str, str] = {}
    for param in params:
        raw = values.get(param.name)
        if raw is None:
            if param.required:
                raise ParamError(param.name, f"missing (expected {param.type.expected})")
            continue
        result[param.name] = param.parse(raw)
    return result

