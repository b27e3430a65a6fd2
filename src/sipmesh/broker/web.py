"""The broker's opt-in HTTP listeners, run by worker 0 in its event loop:
Prometheus metrics (`--metrics`, broker/metrics.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sipmesh.broker.board import Board
from sipmesh.broker.metrics import broker_registry
from sipmesh.ops.http import Listener, metrics_app

if TYPE_CHECKING:
    from sipmesh.broker.server import Broker


class WebListeners:
    def __init__(self, broker: "Broker", board: Board) -> None:
        self.listeners: list[Listener] = []
        config = broker.config
        if config.metrics is not None:
            self.listeners.append(Listener(metrics_app(broker_registry(broker, board)),
                                           *config.metrics, "metrics", "/metrics"))

    async def start(self) -> None:
        started = []
        try:
            for listener in self.listeners:
                await listener.start()
                started.append(listener)
        except BaseException:
            for listener in started:
                await listener.stop()
            raise

    async def stop(self) -> None:
        for listener in self.listeners:
            await listener.stop()
