"""A lossy UDP relay on loopback: a bad link between SIP clients and their server.

The kernel here has no `tc netem`, so loss, reordering and duplication are done in
userspace. Clients send to the relay's address instead of the server's; each client
gets an upstream socket of its own, so the server sees one distinct source per client
(like a NAT) and its answers and requests to that source come back through the relay.
Every datagram, in both directions, is dropped with probability `loss`, else delayed
by up to `max_delay` with probability `reorder` (later datagrams overtake it), and sent
twice with probability `duplicate`. The random source is seeded; the number of
clients and of delayed datagrams is bounded.

Note what a relay cannot cover: a SIP element sends responses to the Via (which rport
points back at the relay) and in-dialog requests to the route set, whose Record-Route
names the server's real address; so a client's own in-dialog requests (ACK, BYE) go
to the server directly.

    with LossyRelay(("127.0.0.1", 5060), seed=1) as relay:
        ... client uses relay.address ...
        print(relay.stats)
"""

from __future__ import annotations

import heapq
import itertools
import random
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field

__all__ = ["LossyRelay", "RelayStats"]


@dataclass
class RelayStats:
    received: int = 0
    dropped: int = 0
    delayed: int = 0
    duplicated: int = 0
    sent: int = 0
    overflow: int = 0  # datagrams dropped because the delay queue or the client table was full
    clients: set[tuple[str, int]] = field(default_factory=set)


class LossyRelay:
    def __init__(self, server: tuple[str, int], *, loss: float = 0.3, reorder: float = 0.2,
                 duplicate: float = 0.1, max_delay: float = 0.1, seed: int = 1,
                 host: str = "127.0.0.1", port: int = 0, max_clients: int = 64,
                 max_queued: int = 10_000) -> None:
        self.server = server
        self.loss, self.reorder, self.duplicate, self.max_delay = loss, reorder, duplicate, max_delay
        self.max_clients, self.max_queued = max_clients, max_queued
        self.random = random.Random(seed)
        self.stats = RelayStats()
        self._selector = selectors.DefaultSelector()
        self._front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._front.bind((host, port))
        self._front.setblocking(False)
        self._selector.register(self._front, selectors.EVENT_READ, None)
        self._upstream: dict[tuple[str, int], socket.socket] = {}  # client -> its socket to the server
        self._queue: list[tuple[float, int, socket.socket, bytes, tuple[str, int]]] = []
        self._order = itertools.count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lossy-relay", daemon=True)
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        return self._front.getsockname()[:2]

    @property
    def hostport(self) -> str:
        host, port = self.address
        return f"{host}:{port}"

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in [self._front, *self._upstream.values()]:
            sock.close()
        self._selector.close()

    def __enter__(self) -> "LossyRelay":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the relay thread ---------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            while self._queue and self._queue[0][0] <= now:
                _, _, sock, data, to = heapq.heappop(self._queue)
                self._send(sock, data, to)
            timeout = 0.05 if not self._queue else max(0.0, min(0.05, self._queue[0][0] - now))
            for key, _ in self._selector.select(timeout):
                client = key.data  # None: the front socket
                for _ in range(64):
                    try:
                        data, source = key.fileobj.recvfrom(65535)  # type: ignore[union-attr]
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break
                    if client is None:
                        upstream = self._upstream_for(source)
                        if upstream is not None:
                            self._relay(upstream, data, self.server)
                    else:
                        self._relay(self._front, data, client)

    def _upstream_for(self, client: tuple[str, int]) -> socket.socket | None:
        sock = self._upstream.get(client)
        if sock is None:
            if len(self._upstream) >= self.max_clients:
                self.stats.overflow += 1
                return None
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((self._front.getsockname()[0], 0))
            sock.setblocking(False)
            self._selector.register(sock, selectors.EVENT_READ, client)
            self._upstream[client] = sock
            self.stats.clients.add(client)
        return sock

    def _relay(self, sock: socket.socket, data: bytes, to: tuple[str, int]) -> None:
        self.stats.received += 1
        r = self.random
        if r.random() < self.loss:
            self.stats.dropped += 1
            return
        copies = 2 if r.random() < self.duplicate else 1
        self.stats.duplicated += copies - 1
        for _ in range(copies):
            if r.random() < self.reorder:
                if len(self._queue) >= self.max_queued:
                    self.stats.overflow += 1
                    continue
                self.stats.delayed += 1
                due = time.monotonic() + r.uniform(0.0, self.max_delay)
                heapq.heappush(self._queue, (due, next(self._order), sock, data, to))
            else:
                self._send(sock, data, to)

    def _send(self, sock: socket.socket, data: bytes, to: tuple[str, int]) -> None:
        try:
            sock.sendto(data, to)
            self.stats.sent += 1
        except OSError:
            self.stats.dropped += 1
