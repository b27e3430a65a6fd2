"""REGISTER processing (RFC 3261 §10.3 steps 6-8), sans-I/O.

`process_register` takes the request, the AOR's live bindings and the clock, and
returns the response to send together with the changes to commit. Steps 1-5
(domain, Require, authentication, authorisation, AOR validity) belong to the
broker's pipeline, which runs them before this.
"""

from __future__ import annotations

import email.utils
import functools
import hashlib
from dataclasses import dataclass, field

from sipmesh.broker.location import Binding, Changes
from sipmesh.broker.nat import behind_nat
from sipmesh.sip.errors import ParseError
from sipmesh.sip.message import Request
from sipmesh.sip.transport.base import Flow
from sipmesh.sip.uri import SipURI

# §19.1.4: these URI parameters must match when present in either URI; others only
# when present in both, which a key cannot express, so they are left out of it.
_KEY_PARAMS = ("user", "ttl", "method", "maddr", "transport")
MAX_EXPIRES_VALUE = 2**32 - 1  # §20.19: delta-seconds fit in 32 bits


@dataclass(frozen=True, slots=True)
class RegistrarPolicy:
    min_expires: int = 60
    max_expires: int = 3600
    default_expires: int = 3600
    max_contacts: int = 16  # per AOR: a stolen account cannot fill the store


@dataclass(slots=True)
class Outcome:
    """The response to a REGISTER: status, reason, extra header fields."""

    status: int
    reason: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)


def contact_key(uri: SipURI) -> str:
    """A string equal for contact URIs that RFC 3261 §19.1.4 calls equivalent."""
    params = "".join(f";{name}={(uri.params.get(name) or '').lower()}"
                     for name in _KEY_PARAMS if name in uri.params)
    user = "" if uri.user is None else uri.user + (f":{uri.password}" if uri.password is not None else "") + "@"
    port = "" if uri.port is None else f":{uri.port}"
    return f"{uri.scheme}:{user}{uri.host.lower()}{port}{params}"


def _expires_header(request: Request) -> int | None:
    value = request.headers.get("Expires")
    if value is None:
        return None
    value = value.strip()
    if not value.isdigit():
        return None  # §10.3 step 6 has no error for this; the default applies
    return min(int(value), MAX_EXPIRES_VALUE)


def _fail(status: int, reason: str | None = None,
          headers: list[tuple[str, str]] | None = None) -> tuple[Outcome, Changes]:
    return Outcome(status, reason, headers or []), Changes()


def process_register(request: Request, aor: str, current: list[Binding], *, now: float,
                     source: Flow | None = None, worker: int = 0,
                     policy: RegistrarPolicy = RegistrarPolicy()) -> tuple[Outcome, Changes]:
    """§10.3 steps 6-8 for `aor`, whose live bindings are `current`."""
    call_id = request.call_id
    cseq = request.cseq[0]
    raw_contacts = request.headers.get_all("Contact")
    header_expires = _expires_header(request)

    # Step 6, "Contact: *": remove everything, but only with Expires: 0 and alone.
    if any(value.strip() == "*" for value in raw_contacts):
        if len(raw_contacts) != 1 or header_expires != 0:
            return _fail(400, "Bad Request (Contact * needs Expires: 0 and no other Contact)")
        for binding in current:
            if binding.call_id == call_id and cseq <= binding.cseq:
                return _fail(500, "Out Of Order CSeq")
        return _ok(policy, [], now), Changes(delete_all=True)

    try:
        contacts = request.contacts  # parsed (and checked) with the message
    except ParseError as exc:
        return _fail(400, f"Bad Request (Contact: {exc.reason})")
    by_key = {b.contact_key: b for b in current}
    upserts: dict[str, Binding] = {}
    deletes: set[str] = set()
    user_agent = request.headers.get("User-Agent")
    via = via_digest(request)
    top_via = request.via
    transport, host, port = (source.transport, source.host, source.port) if source else (None, None, None)
    for value, address in zip(raw_contacts, contacts):
        uri = address.uri
        if not isinstance(uri, SipURI):
            return _fail(400, "Bad Request (Contact must be a sip: or sips: URI)")
        params = address.params
        raw_expires = params.get("expires")
        if raw_expires is not None and raw_expires.isdigit():
            expires = min(int(raw_expires), MAX_EXPIRES_VALUE)
        elif header_expires is not None:
            expires = header_expires
        else:
            expires = policy.default_expires
        if 0 < expires < policy.min_expires:
            return _fail(423, None, [("Min-Expires", str(policy.min_expires))])
        expires = min(expires, policy.max_expires)
        q = _q_value(params.get("q")) if "q" in params else 1.0
        if q is None:
            return _fail(400, "Bad Request (q must be between 0 and 1)")
        key = contact_key(uri)
        existing = by_key.get(key)
        # Step 7: the same Call-ID must come with a higher CSeq, else the request fails.
        if existing is not None and existing.call_id == call_id and cseq <= existing.cseq:
            if cseq == existing.cseq and existing.via == via:
                # The same REGISTER again (its 200 was lost): what a server transaction
                # would do, answer as before; another worker may have handled the first.
                return _ok(policy, current, now), Changes()
            return _fail(500, "Out Of Order CSeq")
        if expires == 0:
            upserts.pop(key, None)
            if existing is not None:
                deletes.add(key)
            continue
        deletes.discard(key)
        upserts[key] = Binding(aor, key, _uri_text(value, uri), now + expires, q, call_id, cseq,
                               transport, host, port, worker, user_agent, now, via,
                               source is not None and behind_nat(top_via, uri, source))

    if not deletes and len(upserts) == 1 and not by_key.keys() - upserts.keys():
        ordered = list(upserts.values())  # the common case: one UA refreshing its one contact
    else:
        after = {k: b for k, b in by_key.items() if k not in deletes}
        after.update(upserts)
        if len(after) > policy.max_contacts:
            return _fail(403, f"Too Many Contacts (at most {policy.max_contacts} per address-of-record)")
        ordered = sorted(after.values(), key=lambda b: (-b.q, -b.updated))
    return _ok(policy, ordered, now), Changes(upsert=tuple(upserts.values()), delete=tuple(deletes))


def via_digest(request: Request) -> str:
    """Short digest of the top Via (its branch and sent-by): equal for retransmissions."""
    top = request.headers.get("Via") or ""
    return hashlib.blake2b(top.encode("utf-8", "surrogateescape"), digest_size=8).hexdigest()


def _uri_text(value: str, uri: SipURI) -> str:
    """The contact URI as the UA wrote it (what it will recognise in our answers)."""
    start = value.find("<")
    if start >= 0:
        end = value.find(">", start)
        if end > start:
            return value[start + 1:end].strip()
    return str(uri)


def _q_value(text: str | None) -> float | None:
    if text is None:
        return 1.0
    try:
        q = float(text)
    except ValueError:
        return None
    return q if 0.0 <= q <= 1.0 else None


def _ok(policy: RegistrarPolicy, bindings: list[Binding], now: float) -> Outcome:
    """Step 8: 200 listing every current binding with its remaining expiry."""
    headers = [("Contact", format_binding(b, now)) for b in bindings]
    headers.append(("Date", _http_date(int(now))))
    return Outcome(200, None, headers)


@functools.lru_cache(maxsize=4)
def _http_date(second: int) -> str:
    return email.utils.formatdate(second, usegmt=True)


def format_binding(binding: Binding, now: float) -> str:
    q = "" if binding.q == 1.0 else f";q={binding.q:g}"
    return f"<{binding.contact}>;expires={binding.remaining(now)}{q}"
