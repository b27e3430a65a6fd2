"""Protection against floods: a token bucket per source address, and load shedding.

A source over its rate gets 503 with Retry-After (RFC 3261 §21.5.4) instead of
service. Independently, when the broker itself falls behind (its UDP receive queue
fills up), new work is refused with 503 early: past the knee a SIP server that keeps
accepting work drowns in retransmissions; one that sheds load keeps serving.

Both decisions are taken on the raw datagram, before it is parsed: refusing must
cost far less than serving, or refusing does not help (the 503 itself is built by
replies.quick_reply without the parser).
"""

from __future__ import annotations

import math
import socket
import struct
import time
from collections import OrderedDict
from typing import Callable


_SO_MEMINFO = getattr(socket, "SO_MEMINFO", 55)  # Linux: sk_meminfo[SK_MEMINFO_VARS]
_MEMINFO_RMEM_ALLOC, _MEMINFO_RCVBUF = 0, 1


class RateLimiter:
    """Token buckets keyed by source (usually the IP address), least recently seen forgotten."""

    def __init__(self, rate: float, burst: float | None = None, *, max_sources: int = 65_536,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate)
        self.max_sources = max_sources
        self.clock = clock
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()  # key -> [tokens, last]

    def check(self, key: str) -> float:
        """Take one token for `key`: 0.0 if allowed, else the seconds until one is available."""
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_sources:
                self._buckets.popitem(last=False)
            bucket = [self.burst, now]
            self._buckets[key] = bucket
        else:
            self._buckets.move_to_end(key)
            bucket[0] = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
            bucket[1] = now
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return 0.0
        return (1.0 - bucket[0]) / self.rate

    def __len__(self) -> int:
        return len(self._buckets)


def retry_after(wait: float) -> str:
    """Retry-After value (whole seconds, at least 1)."""
    return str(max(1, math.ceil(wait)))


def receive_queue_fill(sock: socket.socket) -> float | None:
    """How full the socket's receive buffer is (0..1), from SO_MEMINFO; None if unknown."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_MEMINFO, 9 * 4)
    except OSError:
        return None
    values = struct.unpack(f"{len(raw) // 4}I", raw)
    if len(values) <= _MEMINFO_RCVBUF or values[_MEMINFO_RCVBUF] == 0:
        return None
    return values[_MEMINFO_RMEM_ALLOC] / values[_MEMINFO_RCVBUF]


class LoadShedder:
    """Says "overloaded" while any watched receive queue is fuller than `high` and until
    it has drained below `low` (hysteresis, so the broker does not flap)."""

    def __init__(self, sockets: list[socket.socket], *, high: float = 0.5, low: float = 0.2,
                 interval: float = 0.02, clock: Callable[[], float] = time.monotonic,
                 measure: Callable[[], float] | None = None) -> None:
        self.sockets = sockets
        self.high, self.low = high, low
        self.interval = interval
        self.clock = clock
        self.measure = measure or self._fullest
        self._overloaded = False
        self._next_check = 0.0

    def _fullest(self) -> float:
        return max((f for f in map(receive_queue_fill, self.sockets) if f is not None), default=0.0)

    @property
    def overloaded(self) -> bool:
        now = self.clock()
        if now >= self._next_check:
            self._next_check = now + self.interval
            self._overloaded = self.measure() > (self.low if self._overloaded else self.high)
        return self._overloaded


def _to_tagged(head: bytes) -> bool:
    for marker in (b"\r\nto:", b"\r\nt:", b"\r\nto :"):
        start = head.find(marker)
        if start >= 0:
            end = head.find(b"\r\n", start + 2)
            return b";tag=" in head[start:end if end >= 0 else None]
    return False


def triage(data: bytes) -> str:
    """What a raw datagram is, as far as refusing it goes:
    'new' (a request starting new work: may be refused with 503), 'stray' (a request
    inside a dialog but without Route: not one we record-routed, answered 404),
    'keep' (responses, ACK, CANCEL, routed in-dialog requests: never refused)."""
    if data.startswith(b"SIP/"):
        return "keep"
    method = data[:data.find(b" ")]
    if method in (b"ACK", b"CANCEL"):
        return "keep"
    head = data[:data.find(b"\r\n\r\n")].lower()
    if not _to_tagged(head):
        return "keep" if method == b"BYE" else "new"
    if b"\r\nroute:" in head or b"\r\nroute :" in head:
        return "keep"
    return "stray"
