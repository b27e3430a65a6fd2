"""SDP (RFC 8866) session descriptions: a sans-I/O parser and serialiser.

sipmesh carries application parameters in ``a=`` lines (``a=PORT:8000``).
Parsing is liberal about the order of lines within a section (real proxies do
not keep to it) but strict about structure: the first line must be ``v=0``,
each line ``<letter>=<value>``, ``o=`` has 6 fields, ``c=`` 3, and the ``m=``
port is an integer 0..65535 with an optional ``/<count>``.  CRLF or bare LF
endings are accepted and one trailing empty line is ignored.  Lines with no
field of their own (``i= u= e= p= b= r= z= k=``, unknown letters, extra
``c=``) are kept in ``other`` of the section (session or media) they were in.

Serialisation uses CRLF and the RFC 8866 section 5 line order (``other`` is
kept in that order too, same-type lines as they came).  Every value is checked
for CR, LF and NUL on construction and on serialisation: no line injection.

Attribute names are case-sensitive (RFC 8866 section 5.13: ``a=PORT:1`` and
``a=port:1`` differ); values are opaque strings.  An ``a=`` line is split at
its first colon only; ``a=recvonly`` has the value None.
"""

from __future__ import annotations

import ipaddress
import string
import time
from dataclasses import KW_ONLY, dataclass, field

__all__ = ["MAX_LINES", "MAX_SIZE", "Attribute", "Connection", "MediaDescription",
           "Origin", "SDPError", "SessionDescription", "parse_sdp"]

MAX_SIZE = 64 * 1024
MAX_LINES = 1024

_SESSION_ORDER = "vosiuepcbtrzka"  # RFC 8866 section 5
_MEDIA_ORDER = "micbka"
_NOT_OTHER = "vostma"  # types with fields of their own, or that start a section

Line = tuple[str, str]  # (type letter, value)


class SDPError(ValueError):
    """The body is not a session description this parser accepts."""


def _text(value: str, what: str) -> str:
    if not isinstance(value, str) or any(c in value for c in "\r\n\0"):
        raise ValueError(f"{what} must be a str without CR, LF or NUL: {value!r}")
    return value


def _token(value: str, what: str) -> str:
    """A non-empty field without whitespace, as in ``o=``, ``c=`` and ``m=``."""
    if not isinstance(value, str) or value.split() != [value] or "\0" in value:
        raise ValueError(f"{what} must be a non-empty str without whitespace: {value!r}")
    return value


def _number(value: int, what: str, low: int = 0, high: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not (
            low <= value <= (value if high is None else high)):
        raise ValueError(f"{what} must be an integer in {low}..{high or ''}: {value!r}")
    return value


def _other(lines: list[Line], what: str) -> list[Line]:
    for kind, value in lines:
        if (not isinstance(kind, str) or len(kind) != 1
                or kind not in string.ascii_letters or kind in _NOT_OTHER):
            raise ValueError(f"{what}: {kind!r} cannot be the type of an extra line")
        _text(value, f"{what} {kind}= line")
    return list(lines)


def _sorted(lines: list[Line], order: str) -> list[Line]:
    before_a = order.index("a") - 0.5  # unknown types go just before a=
    return sorted(lines, key=lambda line: order.find(line[0]) if line[0] in order else before_a)


@dataclass(frozen=True)
class Attribute:
    """``a=<name>`` (value None) or ``a=<name>:<value>``; names are case-sensitive."""

    name: str
    value: str | None = None

    def __post_init__(self) -> None:
        if not _text(self.name, "attribute name") or ":" in self.name:
            raise ValueError(f"attribute name must be non-empty, without ':': {self.name!r}")
        if self.value is not None:
            _text(self.value, f"value of attribute {self.name!r}")

    def __str__(self) -> str:
        return self.name if self.value is None else f"{self.name}:{self.value}"


@dataclass(frozen=True)
class Origin:
    """``o=<username> <sess-id> <sess-version> <nettype> <addrtype> <unicast-address>``"""

    username: str
    sess_id: int
    sess_version: int
    nettype: str
    addrtype: str
    address: str

    def __post_init__(self) -> None:
        _number(self.sess_id, "o= sess-id")
        _number(self.sess_version, "o= sess-version")
        for name in ("username", "nettype", "addrtype", "address"):
            _token(getattr(self, name), f"o= {name}")

    def __str__(self) -> str:
        return (f"{self.username} {self.sess_id} {self.sess_version}"
                f" {self.nettype} {self.addrtype} {self.address}")


@dataclass(frozen=True)
class Connection:
    """``c=<nettype> <addrtype> <connection-address>``"""

    nettype: str
    addrtype: str
    address: str

    def __post_init__(self) -> None:
        for name in ("nettype", "addrtype", "address"):
            _token(getattr(self, name), f"c= {name}")

    @classmethod
    def for_address(cls, address: str) -> Connection:
        """``IN IP4`` or ``IN IP6`` after the address; a host name gets ``IP4``."""
        try:
            version = ipaddress.ip_address(address).version
        except ValueError:
            version = 4
        return cls("IN", f"IP{version}", address)

    def __str__(self) -> str:
        return f"{self.nettype} {self.addrtype} {self.address}"


@dataclass
class MediaDescription:
    """``m=<media> <port>[/<port_count>] <proto> <fmt> ...`` and its lines."""

    media: str
    port: int
    proto: str
    formats: list[str]
    _: KW_ONLY
    port_count: int | None = None
    connection: Connection | None = None
    attributes: list[Attribute] = field(default_factory=list)
    other: list[Line] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.other = _sorted(_other(self.other, "media"), _MEDIA_ORDER)
        self._lines()

    def attribute(self, name: str) -> str | None:
        """Value of the first attribute *name* ('' if it has none), or None."""
        values = self.attributes_named(name)
        return values[0] if values else None

    def attributes_named(self, name: str) -> list[str]:
        """Values of all attributes *name*, in order ('' for those without one)."""
        return [a.value or "" for a in self.attributes if a.name == name]

    def _lines(self) -> list[Line]:
        port = str(_number(self.port, "m= port", 0, 65535))
        if self.port_count is not None:
            port += f"/{_number(self.port_count, 'm= port count', 1, 65535)}"
        fields = [_token(self.media, "m= media"), port, _token(self.proto, "m= proto")]
        fields += [_token(fmt, "m= fmt") for fmt in self.formats]
        lines = [("m", " ".join(fields))]
        if self.connection is not None:
            lines.append(("c", str(self.connection)))
        lines += [("a", str(a)) for a in self.attributes]
        return _sorted(lines + _other(self.other, "media"), _MEDIA_ORDER)


@dataclass(kw_only=True)
class SessionDescription:
    """A whole SDP body: the session-level section and its media sections."""

    version: int = 0
    origin: Origin
    session_name: str = "-"
    connection: Connection | None = None
    times: list[tuple[int, int]] = field(default_factory=lambda: [(0, 0)])
    attributes: list[Attribute] = field(default_factory=list)
    media: list[MediaDescription] = field(default_factory=list)
    other: list[Line] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.other = _sorted(_other(self.other, "session"), _SESSION_ORDER)
        self._lines()

    @classmethod
    def new(cls, username: str, address: str, *, session_name: str = "-",
            sess_id: int | None = None) -> SessionDescription:
        """v=, o= and c= for *address* (IP4 or IP6), s=, ``t=0 0``, no media;
        *sess_id* (also the sess-version) defaults to the Unix time."""
        connection = Connection.for_address(address)
        sess_id = int(time.time()) if sess_id is None else sess_id
        origin = Origin(username, sess_id, sess_id, connection.nettype,
                        connection.addrtype, address)
        return cls(origin=origin, session_name=session_name, connection=connection)

    def attribute(self, name: str) -> str | None:
        """First value of *name* at session level, else in each media section."""
        values = self.attributes_named(name)
        return values[0] if values else None

    def attributes_named(self, name: str) -> list[str]:
        """All values of *name*: session level first, then each media section."""
        values = [a.value or "" for a in self.attributes if a.name == name]
        return values + [v for m in self.media for v in m.attributes_named(name)]

    def _lines(self) -> list[Line]:
        if self.version != 0:
            raise ValueError(f"SDP version must be 0: {self.version!r}")
        lines = [("v", "0"), ("o", str(self.origin)),
                 ("s", _text(self.session_name, "s= session name"))]
        if self.connection is not None:
            lines.append(("c", str(self.connection)))
        lines += [("t", f"{_number(start, 't= start')} {_number(stop, 't= stop')}")
                  for start, stop in self.times]
        lines += [("a", str(a)) for a in self.attributes]
        lines = _sorted(lines + _other(self.other, "session"), _SESSION_ORDER)
        return lines + [line for m in self.media for line in m._lines()]

    def __str__(self) -> str:
        return "".join(f"{kind}={value}\r\n" for kind, value in self._lines())

    def to_bytes(self) -> bytes:
        return str(self).encode("utf-8")


def parse_sdp(data: bytes | str, *, max_size: int = MAX_SIZE,
              max_lines: int = MAX_LINES) -> SessionDescription:
    """Parse an SDP body; raise SDPError (only) if it is not acceptable.

    *max_size* bounds the body in bytes (UTF-8), *max_lines* its line count.
    """
    try:
        return _parse(data, max_size, max_lines)
    except SDPError:
        raise
    except ValueError as e:  # bad UTF-8, or a field the dataclasses refuse
        raise SDPError(str(e)) from e


def _parse(data: bytes | str, max_size: int, max_lines: int) -> SessionDescription:
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    if len(raw) > max_size:
        raise SDPError(f"body of {len(raw)} bytes is larger than {max_size}")
    text = raw.decode("utf-8").removesuffix("\n")  # the last line's ending
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if lines[-1] == "":
        lines.pop()  # one trailing empty line
    if len(lines) > max_lines:
        raise SDPError(f"body of {len(lines)} lines has more than {max_lines}")
    if not lines or lines[0] != "v=0":
        raise SDPError("the first line must be v=0")
    sections: list[list[Line]] = [[]]
    for number, line in enumerate(lines[1:], start=2):
        if len(line) < 2 or line[1] != "=" or line[0] not in string.ascii_letters:
            raise SDPError(f"line {number} is not <type>=<value>: {line[:40]!r}")
        if "\r" in line or "\0" in line:
            raise SDPError(f"line {number} contains CR or NUL")
        if line[0] == "m":
            sections.append([])
        sections[-1].append((line[0], line[2:]))
    own, connection, attributes, other = _section(sections[0], own="ost", banned="v")
    if len(own["o"]) != 1 or len(own["s"]) != 1:
        raise SDPError("a session needs exactly one o= and one s= line")
    username, sess_id, sess_version, *rest = _fields(own["o"][0], 6, "o=")
    times = [_fields(value, 2, "t=") for value in own["t"]]
    return SessionDescription(
        origin=Origin(username, _int(sess_id), _int(sess_version), *rest),
        session_name=own["s"][0], connection=connection,
        times=[(_int(start), _int(stop)) for start, stop in times], attributes=attributes,
        media=[_media(lines) for lines in sections[1:]], other=other)


def _section(lines: list[Line], own: str, banned: str
             ) -> tuple[dict[str, list[str]], Connection | None, list[Attribute], list[Line]]:
    """Split a section into its own types' values, c=, a= and the other lines."""
    values: dict[str, list[str]] = {kind: [] for kind in own}
    connection: Connection | None = None
    attributes: list[Attribute] = []
    other: list[Line] = []
    for kind, value in lines:
        if kind in banned:
            raise SDPError(f"unexpected {kind}= line: {value[:40]!r}")
        if kind in own:
            values[kind].append(value)
        elif kind == "a":
            name, colon, rest = value.partition(":")
            attributes.append(Attribute(name, rest if colon else None))
        elif kind == "c" and connection is None:
            connection = Connection(*_fields(value, 3, "c="))
        else:
            if kind == "c":  # an extra c= line: kept as it is, but it must be valid
                Connection(*_fields(value, 3, "c="))
            other.append((kind, value))
    return values, connection, attributes, other


def _fields(value: str, count: int, what: str) -> list[str]:
    fields = value.split()
    if len(fields) != count:
        raise SDPError(f"{what} line needs {count} fields: {value[:40]!r}")
    return fields


def _int(value: str) -> int:
    if not (value.isascii() and value.isdigit()):
        raise SDPError(f"not a decimal integer: {value[:40]!r}")
    return int(value)


def _media(lines: list[Line]) -> MediaDescription:
    fields = lines[0][1].split()
    if len(fields) < 3:
        raise SDPError(f"m= line needs media, port and proto: {lines[0][1][:40]!r}")
    media, port, proto, *formats = fields
    port, slash, count = port.partition("/")
    _, connection, attributes, other = _section(lines[1:], own="", banned="vostm")
    return MediaDescription(media, _int(port), proto, formats,
                            port_count=_int(count) if slash else None,
                            connection=connection, attributes=attributes, other=other)
