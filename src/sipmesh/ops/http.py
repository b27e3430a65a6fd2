"""Prometheus metrics and other small web applications over aiohttp, on an opt-in listener
(where it listens: ops/listen.py)."""

from __future__ import annotations

import logging

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from sipmesh.ops.listen import hostport

log = logging.getLogger("sipmesh.ops.http")


def metrics_app(registry: CollectorRegistry) -> web.Application:
    """GET /metrics: the registry in Prometheus' text format (or OpenMetrics if asked)."""

    async def metrics(request: web.Request) -> web.Response:
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encode(registry), headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    return app


class Listener:
    """An aiohttp application on HOST:PORT, in the running event loop."""

    def __init__(self, app: web.Application, host: str, port: int, what: str, path: str = "/") -> None:
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        self.host, self.port, self.what, self.path = host, port, what, path

    async def start(self) -> None:
        await self.runner.setup()
        try:
            await web.TCPSite(self.runner, self.host, self.port).start()
        except OSError as exc:
            await self.runner.cleanup()
            raise OSError(f"{self.what} on {hostport(self.host, self.port)}: "
                          f"{exc.strerror or exc}; choose another address") from None
        log.info("%s on http://%s%s", self.what, hostport(self.host, self.port), self.path)

    async def stop(self) -> None:
        await self.runner.cleanup()
