"""The broker's Prometheus metrics, made when scraped.

How the workers' figures meet: each worker posts its counters to the board once a
second (broker/board.py); worker 0 serves /metrics and reads every worker's slot, so a
scrape sees figures up to a second old. Counters are per worker (label `worker`): sum
them in queries (`sum by (method) (rate(sipmesh_broker_requests_total[1m]))`). A worker
that is restarted starts again from zero, which Prometheus takes as a counter reset of
that worker's series. The registrations are counted in the shared location store.

prometheus_client's own multiprocess mode was the alternative: it writes every
increment to a memory-mapped file under a lock, on the SIP path of every request; here
the SIP path only adds to a Python integer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from sipmesh import __version__
from sipmesh.broker.board import Board

if TYPE_CHECKING:
    from sipmesh.broker.server import Broker

_COUNTERS = (  # board field, metric name, help
    ("registers", "sipmesh_broker_registers", "REGISTER requests handled by the registrar"),
    ("forwarded", "sipmesh_broker_forwarded", "requests proxied to a next hop"),
    ("shed", "sipmesh_broker_shed", "requests refused with 503 because the receive queue was full"),
    ("rate_limited", "sipmesh_broker_rate_limited",
     "requests refused with 503 because their source sent too fast (--rate-limit)"),
    ("auth_failures", "sipmesh_broker_auth_failures",
     "requests whose digest credentials were wrong (not counting the first challenge)"),
    ("cpu_seconds", "sipmesh_broker_worker_cpu_seconds", "CPU time (user + system) of the worker process"),
)
_GAUGES = (
    ("server_transactions", "sipmesh_broker_server_transactions", "server transactions held now"),
    ("client_transactions", "sipmesh_broker_client_transactions", "client transactions held now"),
    ("started", "sipmesh_broker_worker_start_time_seconds", "when the worker process started (Unix time)"),
)


class BrokerCollector:
    """A prometheus_client collector over the board and the location store."""

    def __init__(self, broker: "Broker", board: Board) -> None:
        self.broker = broker
        self.board = board

    def collect(self) -> Iterator[Metric]:
        states = [s for s in (self.board.read(w) for w in range(self.board.workers)) if s is not None]
        info = GaugeMetricFamily("sipmesh_broker_info", "the broker's version and mode",
                                 labels=["version", "mode"])
        info.add_metric([__version__, self.broker.config.mode], 1)
        yield info
        yield GaugeMetricFamily("sipmesh_broker_workers", "worker processes configured",
                                value=self.board.workers)
        if self.broker.location is not None:
            yield GaugeMetricFamily("sipmesh_broker_registrations",
                                    "live registrations (bindings of a contact to an AOR)",
                                    value=self.broker.location.count())
        requests = CounterMetricFamily("sipmesh_broker_requests", "SIP requests received and parsed",
                                       labels=["worker", "method"])
        responses = CounterMetricFamily("sipmesh_broker_responses",
                                        "final responses sent, ours and relayed, by the request's "
                                        "method and the class (2xx, 4xx, ...)",
                                        labels=["worker", "method", "class"])
        for state in states:
            worker = str(state.worker)
            for method, count in state.requests.items():
                requests.add_metric([worker, method], count)
            for (method, klass), count in state.responses.items():
                responses.add_metric([worker, method, f"{klass}xx"], count)
        yield requests
        yield responses
        for field, name, text in _COUNTERS:
            family = CounterMetricFamily(name, text, labels=["worker"])
            for state in states:
                family.add_metric([str(state.worker)], state[field])
            yield family
        for field, name, text in _GAUGES:
            gauge = GaugeMetricFamily(name, text, labels=["worker"])
            for state in states:
                gauge.add_metric([str(state.worker)], state[field])
            yield gauge


def broker_registry(broker: "Broker", board: Board) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BrokerCollector(broker, board))
    return registry
