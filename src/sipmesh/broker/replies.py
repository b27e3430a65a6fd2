"""Answers without a server transaction: cached answers for retransmissions, and
responses built straight from the raw request.

REGISTER is answered statelessly (like Kamailio's registrar): a transaction per
REGISTER would keep every request in memory for Timer J (32 s), hundreds of
thousands of them at full load. A retransmission should still get the same answer
rather than be processed again (its nonce is already used), so the last answers are
kept here (but for 401 challenges, which use up nothing and are simply made anew), serialised, keyed by the request's source and exact bytes (a UDP
retransmission repeats both), bounded in count and in age, and looked up before
the datagram is even parsed. (A retransmission that misses the cache is
recognised by the registrar itself.)
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from typing import Callable, Hashable, Sequence

from sipmesh.sip.message import Request, Response, reason_for
from sipmesh.sip.transport.base import RELIABLE, Flow


class Wire:
    """A message already turned into bytes: all the transport layer needs of one.
    Keeping bytes instead of a Response keeps the cache to a few objects per entry."""

    __slots__ = ("data", "label")

    def __init__(self, data: bytes, label: str) -> None:
        self.data = data
        self.label = label

    @classmethod
    def of(cls, message: Response) -> "Wire":
        return cls(message.to_bytes(), repr(message))

    def to_bytes(self) -> bytes:
        return self.data

    def __repr__(self) -> str:
        return self.label


# A UDP client retransmits for 64*T1 = 32 s; entries older than that are useless.
DEFAULT_TTL = 32.0


class ReplyCache:
    def __init__(self, max_entries: int = 30_000, ttl: float = DEFAULT_TTL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.ttl = ttl
        self.clock = clock
        self._entries: OrderedDict[Hashable, tuple[float, Wire, Flow]] = OrderedDict()

    def get(self, key: Hashable) -> tuple[Wire, Flow] | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self.clock() - entry[0] > self.ttl:
            del self._entries[key]
            return None
        return entry[1], entry[2]

    def put(self, key: Hashable, response: Response | Wire, target: Flow) -> Wire:
        """Remember (and return) the serialised `response` sent to `target`."""
        now = self.clock()
        wire = response if isinstance(response, Wire) else Wire.of(response)
        self._entries[key] = (now, wire, target)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        # drop a few expired ones from the old end on every insert: cost stays O(1)
        for _ in range(2):
            oldest = next(iter(self._entries.values()), None)
            if oldest is None or now - oldest[0] <= self.ttl:
                break
            self._entries.popitem(last=False)
        return wire

    def __len__(self) -> int:
        return len(self._entries)


def stateless_response(request: Request, status: int, reason: str | None,
                       headers: list[tuple[str, str]], to: str) -> Wire:
    """The response to `request` (§8.2.6: its Via, From, Call-ID, CSeq; `to` is the To
    value with our tag) straight to bytes, for answers that need no Response object."""
    h = request.headers
    lines = [f"SIP/2.0 {status} {reason or reason_for(status)}"]
    lines += [f"Via: {v}" for v in h.get_all("Via")]
    lines.append(f"From: {h.get('From')}")
    lines.append(f"To: {to}")
    lines.append(f"Call-ID: {h.get('Call-ID')}")
    lines.append(f"CSeq: {h.get('CSeq')}")
    lines += [f"{name}: {value}" for name, value in headers]
    lines.append("Content-Length: 0\r\n\r\n")
    return Wire("\r\n".join(lines).encode("utf-8", "surrogateescape"), f"<Response {status}>")


# -- answering from the raw request ---------------------------------------------------------

_COPIED = {b"via": b"Via", b"v": b"Via", b"from": b"From", b"f": b"From", b"to": b"To", b"t": b"To",
           b"call-id": b"Call-ID", b"i": b"Call-ID", b"cseq": b"CSeq"}


def quick_reply(data: bytes, source: Flow, status: int,
                headers: Sequence[tuple[str, str]] = ()) -> tuple[Wire, Flow] | None:
    """A stateless response to the request in `data` (UDP), and where to send it; None
    if `data` is no request that can be answered this way."""
    end = data.find(b"\r\n\r\n")
    if end < 0 or data.startswith(b"SIP/"):
        return None
    lines = data[:end].split(b"\r\n")
    if len(lines[0].split(b" ")) != 3 or lines[0].startswith(b"ACK "):
        return None
    kept: list[bytes] = []
    found: set[bytes] = set()
    top_via: bytes | None = None
    keeping = False
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):  # folded continuation of the previous header
            if keeping:
                kept[-1] += b" " + line.strip()
            continue
        name, colon, value = line.partition(b":")
        canonical = _COPIED.get(name.strip().lower()) if colon else None
        keeping = canonical is not None
        if canonical is not None:
            kept.append(canonical + b": " + value.strip())
            found.add(canonical)
            if canonical == b"Via" and top_via is None:
                top_via = value.strip()
    if top_via is None or len(found) < 5:
        return None
    for i, line in enumerate(kept):
        if line.startswith(b"To: ") and b";tag=" not in line.lower():
            call_id = next((k for k in kept if k.startswith(b"Call-ID: ")), b"")
            kept[i] = line + b";tag=sm" + hashlib.blake2b(call_id, digest_size=4).hexdigest().encode()
    target = via_target(top_via, source)
    if target is None:
        return None
    out = [f"SIP/2.0 {status} {reason_for(status)}".encode(), *kept]
    out += [f"{name}: {value}".encode() for name, value in headers]
    out.append(b"Content-Length: 0\r\n\r\n")
    return Wire(b"\r\n".join(out), f"<Response {status} (stateless)>"), target


def via_target(via: bytes, source: Flow) -> Flow | None:
    """Where a response goes (§18.2.2, RFC 3581), from the request's top Via as received
    from `source`: the same connection for TCP/TLS; for UDP the source address and
    the rport, else the sent-by port."""
    first = via.split(b",", 1)[0]
    sent, _, params = first.partition(b";")
    parts = sent.split()
    if len(parts) != 2 or not parts[0].upper().startswith(b"SIP/2.0/"):
        return None
    if source.transport in RELIABLE:
        return source
    if b"rport" in params.lower():
        return source
    hostport = parts[1].decode("ascii", "replace")
    port = 5060
    if hostport.startswith("["):
        rest = hostport[hostport.find("]") + 1:]
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
    elif hostport.count(":") == 1:
        text = hostport.split(":")[1]
        if not text.isdigit():
            return None
        port = int(text)
    return Flow(source.transport, source.host, port)
