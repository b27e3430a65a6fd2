"""The daemon's Prometheus metrics (`sipmesh daemon --metrics [HOST:]PORT`), made when
scraped from the same facts as `sipmesh status` (Daemon.status())."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from sipmesh.agent.errors import AgentError, Exit
from sipmesh.ops.http import Listener, metrics_app

if TYPE_CHECKING:
    from sipmesh.daemon.server import Daemon

SESSION_STATES = ("starting", "established", "ending")


class DaemonCollector:
    def __init__(self, daemon: "Daemon") -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        status = self.daemon.status()
        registered = GaugeMetricFamily("sipmesh_daemon_registered",
                                       "1 while the registration is accepted by the SIP server",
                                       labels=["aor"])
        for registration in status["registrations"]:
            registered.add_metric([registration["aor"]], registration["state"] == "registered")
        yield registered
        sessions = GaugeMetricFamily("sipmesh_daemon_sessions", "sessions now, by service and state",
                                     labels=["service", "state"])
        limit = GaugeMetricFamily("sipmesh_daemon_service_max_sessions",
                                  "the most sessions a service takes at once", labels=["service"])
        for service in status["services"]:
            name = service["name"]
            limit.add_metric([name], service["max_sessions"])
            for state in SESSION_STATES:
                sessions.add_metric([name, state], sum(1 for s in status["sessions"]
                                                       if s["service"] == name and s["state"] == state))
        yield sessions
        yield limit
        counters = status["daemon"]["counters"]
        yield CounterMetricFamily("sipmesh_daemon_sessions_established",
                                  "sessions that were established", value=counters.get("established", 0))
        refused = CounterMetricFamily("sipmesh_daemon_invites_refused",
                                      "INVITEs refused, by the status answered", labels=["status"])
        for name, count in sorted(counters.items()):
            if name.startswith("refused_"):
                refused.add_metric([name.removeprefix("refused_")], count)
        yield refused
        yield GaugeMetricFamily("sipmesh_daemon_allocated_ports", "ports held by sessions",
                                value=len(status["allocated"]["ports"]))
        yield GaugeMetricFamily("sipmesh_daemon_allocated_addresses",
                                "tunnel addresses held by sessions",
                                value=len(status["allocated"]["addresses"]))
        yield GaugeMetricFamily("sipmesh_daemon_config_generation",
                                "1 at start, one more at every successful reload",
                                value=status["daemon"]["generation"])


def metrics_listener(daemon: "Daemon", host: str, port: int) -> Listener:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(daemon))
    return Listener(metrics_app(registry), host, port, "metrics", "/metrics")


class ServingMetrics:
    """The daemon, with its metrics served while it runs (what cli/common.py's
    run_until_signalled runs in its place)."""

    def __init__(self, daemon: "Daemon", listen: tuple[str, int]) -> None:
        self.daemon = daemon
        self.listen = listen
        self.ready = daemon.ready

    def request_stop(self) -> None:
        self.daemon.request_stop()

    async def run(self) -> int:
        listener = metrics_listener(self.daemon, *self.listen)
        try:
            await listener.start()
        except OSError as exc:
            raise AgentError(str(exc), Exit.UNREACHABLE) from None
        try:
            return await self.daemon.run()
        finally:
            await listener.stop()
