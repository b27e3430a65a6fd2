"""The board: where each worker of a broker posts its state for the operator.

A broker of several workers is several processes. What the operator sees must cover
all of them, yet the SIP path must not pay for it. So a worker counts in plain
Python integers (`server.Counters`), and once a second copies them into its slot of
the board: an anonymous shared memory block (mmap) that the supervisor makes before
forking, an array of float64 (exact for integers below 2**53). The metrics and status
listeners (worker 0) read every slot when they are asked, so their figures are up to
`POST_INTERVAL` old, and a worker that is restarted starts its counters from zero (a
counter reset, which Prometheus handles per series). Nothing is locked: each value is
one aligned 8-byte word written by one process.

The board also carries readiness, so that a multi-worker broker tells systemd it is
ready only when every worker serves (`Type=notify`):
- the header holds a generation, 1 at start, one more at every reload (SIGHUP);
- a worker that is serving writes the current generation into its slot and, under
  a supervisor, sends it SIGUSR1; the supervisor sends READY=1 once every live worker
  has reached the generation. A single worker (no supervisor) notifies by itself.
"""

from __future__ import annotations

import logging
import mmap
import os
import resource
import signal
import time
from array import array
from typing import TYPE_CHECKING, Mapping

from sipmesh.broker.server import KNOWN_METHODS
from sipmesh.ops.notify import Notifier

if TYPE_CHECKING:
    from sipmesh.broker.server import Broker

log = logging.getLogger("sipmesh.broker.board")

POST_INTERVAL = 1.0  # seconds between two posts of a worker's counters
METHODS = (*sorted(KNOWN_METHODS), "other")  # what Counters counts by (others as "other")
CLASSES = (1, 2, 3, 4, 5, 6)  # response classes: 1xx .. 6xx
SCALARS = ("pid", "ready", "started", "posted", "cpu_seconds", "registers", "forwarded",
           "rate_limited", "shed", "auth_failures", "server_transactions", "client_transactions")
_HEADER = ("generation", "announced")
_METHOD_AT = {m: i for i, m in enumerate(METHODS)}
_REQUESTS = len(SCALARS)
_RESPONSES = _REQUESTS + len(METHODS)
_SLOT = _RESPONSES + len(METHODS) * len(CLASSES)


class Board:
    def __init__(self, workers: int, notifier: Notifier | None = None) -> None:
        self.workers = workers
        self.notifier = notifier if notifier is not None else Notifier()
        self._memory = mmap.mmap(-1, 8 * (len(_HEADER) + workers * _SLOT))  # MAP_SHARED
        self._words = memoryview(self._memory).cast("d")
        self._words[0] = 1.0  # generation
        self.supervisor: int | None = None  # pid of the supervisor, if there is one
        self._children: Mapping[int, int] = {}

    # -- the header ---------------------------------------------------------------------
    @property
    def generation(self) -> int:
        return int(self._words[0])

    def _base(self, worker: int) -> int:
        if not 0 <= worker < self.workers:
            raise IndexError(f"no worker {worker}")
        return len(_HEADER) + worker * _SLOT

    # -- a worker's side ----------------------------------------------------------------
    def post(self, worker: int, broker: "Broker") -> None:
        """Copy the worker's counters into its slot."""
        w, base = self._words, self._base(worker)
        c = broker.counters
        usage = resource.getrusage(resource.RUSAGE_SELF)
        transactions = broker.transactions
        values = (os.getpid(), w[base + 1], w[base + 2] or time.time(), time.time(),
                  usage.ru_utime + usage.ru_stime, c.registers, c.forwarded, c.rate_limited, c.shed,
                  broker.auth.failures if broker.auth is not None else 0,
                  transactions.server_transactions if transactions is not None else 0,
                  transactions.client_transactions if transactions is not None else 0)
        w[base:base + len(SCALARS)] = _doubles(values)
        for method, count in c.requests.items():
            w[base + _REQUESTS + _METHOD_AT[method]] = count
        for (method, klass), count in c.responses.items():
            w[base + _RESPONSES + _METHOD_AT[method] * len(CLASSES) + klass - 1] = count

    def clear(self, worker: int) -> None:
        """A new process takes the slot over: nothing of the previous one is left."""
        base = self._base(worker)
        self._words[base:base + _SLOT] = _doubles([0.0] * _SLOT)
        self._words[base] = os.getpid()
        self._words[base + 2] = time.time()

    def ready(self, worker: int) -> None:
        """The worker serves (again, after a reload)."""
        self._words[self._base(worker) + 1] = self._words[0]
        if self.supervisor is None:
            self._announce()
        else:
            try:
                os.kill(self.supervisor, signal.SIGUSR1)
            except ProcessLookupError:
                pass

    def begin_reload(self) -> None:
        """SIGHUP: a new generation that every worker must reach to be ready again."""
        self.notifier.reloading()
        self._words[0] += 1

    # -- the supervisor's side ------------------------------------------------------------
    def supervise(self, children: Mapping[int, int]) -> None:
        """In the supervisor, before forking: `children` maps live pids to workers.
        SIGUSR1 (a worker is ready) may complete readiness; SIGHUP reloads every worker."""
        self.supervisor = os.getpid()
        self._children = children
        signal.signal(signal.SIGUSR1, self._on_worker_ready)
        signal.signal(signal.SIGHUP, self._on_reload)

    def _on_worker_ready(self, signum: int, frame: object) -> None:
        if os.getpid() != self.supervisor:
            return  # a worker before it installed its own handlers
        generation = self._words[0]
        live = {worker: pid for pid, worker in list(self._children.items())}
        for worker in range(self.workers):
            base = self._base(worker)
            if live.get(worker) != self._words[base] or self._words[base + 1] != generation:
                return
        self._announce()

    def _on_reload(self, signum: int, frame: object) -> None:
        if os.getpid() != self.supervisor:
            return
        log.info("SIGHUP: reloading %d workers", len(self._children))
        self.begin_reload()
        for pid in list(self._children):
            try:
                os.kill(pid, signal.SIGHUP)
            except ProcessLookupError:
                pass

    def _announce(self) -> None:
        generation = self._words[0]
        if self._words[1] >= generation:
            return  # said already (a restarted worker)
        self._words[1] = generation
        workers = f"{self.workers} workers" if self.workers > 1 else "1 worker"
        self.notifier.ready(f"serving ({workers})" if generation == 1 else
                            f"serving ({workers}), reloaded {int(generation) - 1} times")

    # -- reading (the listeners) ----------------------------------------------------------
    def read(self, worker: int) -> "WorkerState | None":
        """The last post of `worker`, None if it never posted."""
        base = self._base(worker)
        words = self._words[base:base + _SLOT].tolist()
        if not words[0]:
            return None
        scalars = dict(zip(SCALARS, words))
        requests = {m: int(words[_REQUESTS + i]) for i, m in enumerate(METHODS) if words[_REQUESTS + i]}
        responses = {}
        for i, method in enumerate(METHODS):
            for j, klass in enumerate(CLASSES):
                count = words[_RESPONSES + i * len(CLASSES) + j]
                if count:
                    responses[(method, klass)] = int(count)
        return WorkerState(worker, scalars, requests, responses)


class WorkerState:
    """One worker's slot, as read."""

    __slots__ = ("worker", "values", "requests", "responses")

    def __init__(self, worker: int, values: dict[str, float], requests: dict[str, int],
                 responses: dict[tuple[str, int], int]) -> None:
        self.worker = worker
        self.values = values
        self.requests = requests
        self.responses = responses

    def __getitem__(self, name: str) -> float:
        return self.values[name]


def _doubles(values) -> memoryview:
    return memoryview(array("d", values))
