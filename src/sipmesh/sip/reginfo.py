"""The registration event package's document, RFC 3680 `application/reginfo+xml`, sans-I/O.

The broker writes it (broker/roster.py, the notifier of a network's roster) and a
member reads it (agent/roster.py) from our broker or from Kamailio's presence_reginfo,
so both sides share this one codec. What is modelled is what a roster needs::

    <reginfo xmlns="urn:ietf:params:xml:ns:reginfo" version="0" state="full">
      <registration aor="sip:net-lab@example.org" id="r1" state="active">
        <contact id="c1" state="active" event="registered" expires="3600">
          <uri>sip:alice@192.0.2.4:5072;mesh-ip=100.64.1.1</uri>
          <unknown-param name="+sip.instance">"&lt;urn:uuid:...&gt;"</unknown-param>
        </contact>
      </registration>
    </reginfo>

Parsing is hostile-input parsing: a size cap, a depth and element cap, and no DTD at all
(so no entity can be declared: no "billion laughs", no external entity), which is what
defusedxml would give, with the standard library's expat and no dependency.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from xml.parsers import expat
from xml.sax.saxutils import escape, quoteattr

NAMESPACE = "urn:ietf:params:xml:ns:reginfo"
CONTENT_TYPE = "application/reginfo+xml"
MAX_SIZE = 256 * 1024
MAX_ELEMENTS = 20_000
MAX_DEPTH = 8
MAX_TEXT = 2048  # characters in one element's text (a URI, a display name)


class RegInfoError(ValueError):
    """The document is malformed, too large, or uses what we refuse (a DTD)."""


@dataclass(slots=True)
class ContactInfo:
    uri: str
    id: str = ""
    state: str = "active"  # active | terminated
    event: str | None = None  # registered, created, refreshed, shortened, expired, deactivated, probation, unregistered, rejected
    expires: int | None = None
    display_name: str | None = None
    params: dict[str, str] = field(default_factory=dict)  # <unknown-param name=...>value</...>


@dataclass(slots=True)
class RegistrationInfo:
    aor: str
    id: str = ""
    state: str = "active"  # init | active | terminated
    contacts: list[ContactInfo] = field(default_factory=list)


@dataclass(slots=True)
class RegInfo:
    version: int = 0
    state: str = "full"  # full | partial
    registrations: list[RegistrationInfo] = field(default_factory=list)


# -- writing -----------------------------------------------------------------------------

def serialise(info: RegInfo) -> bytes:
    lines = ['<?xml version="1.0" encoding="UTF-8"?>',
             f'<reginfo xmlns="{NAMESPACE}" version="{info.version}" state={quoteattr(info.state)}>']
    for reg in info.registrations:
        lines.append(f"  <registration aor={quoteattr(reg.aor)} id={quoteattr(reg.id)} "
                     f"state={quoteattr(reg.state)}>")
        for c in reg.contacts:
            attrs = f"id={quoteattr(c.id)} state={quoteattr(c.state)}"
            if c.event is not None:
                attrs += f" event={quoteattr(c.event)}"
            if c.expires is not None:
                attrs += f' expires="{int(c.expires)}"'
            lines.append(f"    <contact {attrs}>")
            lines.append(f"      <uri>{escape(c.uri)}</uri>")
            if c.display_name is not None:
                lines.append(f"      <display-name>{escape(c.display_name)}</display-name>")
            for name, value in c.params.items():
                lines.append(f"      <unknown-param name={quoteattr(name)}>{escape(value)}</unknown-param>")
            lines.append("    </contact>")
        lines.append("  </registration>")
    lines.append("</reginfo>")
    return ("\n".join(lines) + "\n").encode("utf-8")


# -- reading -----------------------------------------------------------------------------

class _Element:
    __slots__ = ("name", "attrs", "children", "text")

    def __init__(self, name: str, attrs: dict[str, str]) -> None:
        self.name = name
        self.attrs = attrs
        self.children: list[_Element] = []
        self.text = ""


def _tree(data: bytes) -> _Element:
    """The document as elements named 'NAMESPACE local' (expat's namespace form)."""
    if len(data) > MAX_SIZE:
        raise RegInfoError(f"reginfo document of {len(data)} bytes (at most {MAX_SIZE})")
    # UTF-8 whatever the document declares: an encoding declaration would otherwise make
    # expat look up a Python codec by the sender's name (LookupError, found by fuzzing)
    parser = expat.ParserCreate(encoding="UTF-8", namespace_separator=" ")
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    stack: list[_Element] = []
    root: list[_Element] = []
    count = 0

    def refuse(*_args: object) -> None:
        raise RegInfoError("reginfo document with a DTD or entity declaration (refused)")

    def start(name: str, attrs: dict[str, str]) -> None:
        nonlocal count
        count += 1
        if count > MAX_ELEMENTS or len(stack) >= MAX_DEPTH:
            raise RegInfoError("reginfo document nested too deep or with too many elements")
        element = _Element(name, attrs)
        (stack[-1].children if stack else root).append(element)
        stack.append(element)

    def end(_name: str) -> None:
        stack.pop()

    def text(data: str) -> None:
        if stack and len(stack[-1].text) + len(data) <= MAX_TEXT:
            stack[-1].text += data
        elif stack:
            raise RegInfoError("reginfo document with an overlong text")

    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.UnparsedEntityDeclHandler = refuse
    parser.ExternalEntityRefHandler = refuse
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = text
    try:
        parser.Parse(data, True)
    except expat.ExpatError as exc:
        raise RegInfoError(f"malformed reginfo document: {exc}") from None
    if not root:
        raise RegInfoError("empty reginfo document")
    return root[0]


def _q(local: str) -> str:
    return f"{NAMESPACE} {local}"


def _int(text: str | None, what: str) -> int | None:
    if text is None:
        return None
    text = text.strip()
    digits = text[1:] if text.startswith("-") else text
    if not digits.isdigit() or len(digits) > 10:
        raise RegInfoError(f"{what} {text!r} is not a number")
    return max(0, int(text))  # a server may write a just-expired contact's -1


def parse(data: bytes) -> RegInfo:
    """A reginfo document; RegInfoError if it is not one we accept. Elements of other
    namespaces (extensions such as RFC 5628's GRUUs) are skipped, as RFC 3680 asks."""
    root = _tree(data)
    if root.name != _q("reginfo"):
        raise RegInfoError(f"not a reginfo document (root element {root.name.split(' ')[-1]!r})")
    version = _int(root.attrs.get("version"), "version")
    state = root.attrs.get("state", "")
    if version is None or state not in ("full", "partial"):
        raise RegInfoError("reginfo needs a version and a state of full or partial")
    info = RegInfo(version, state)
    for r in root.children:
        if r.name != _q("registration"):
            continue
        aor = r.attrs.get("aor")
        if not aor:
            raise RegInfoError("registration without aor")
        reg = RegistrationInfo(aor.strip(), r.attrs.get("id", ""), r.attrs.get("state", "active"))
        for c in r.children:
            if c.name != _q("contact"):
                continue
            uri = next((e.text.strip() for e in c.children if e.name == _q("uri")), "")
            if not uri:
                raise RegInfoError("contact without uri")
            display = next((e.text.strip() for e in c.children if e.name == _q("display-name")), None)
            params = {e.attrs["name"]: e.text.strip() for e in c.children
                      if e.name == _q("unknown-param") and e.attrs.get("name")}
            reg.contacts.append(ContactInfo(uri, c.attrs.get("id", ""), c.attrs.get("state", "active"),
                                            c.attrs.get("event"),
                                            _int(c.attrs.get("expires"), "expires"), display, params))
        info.registrations.append(reg)
    return info
