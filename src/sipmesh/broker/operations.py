"""What every broker worker does for the operator, beside SIP.

- posts its counters to the board once a second (broker/board.py);
- reloads on SIGHUP: the users file is read again at once (it is also re-read within
  a second of any change), then the worker reports ready again;
- reports ready when it serves, so that systemd learns it (Type=notify);
- worker 0 also runs the opt-in HTTP listeners: Prometheus metrics and the status
  page (broker/web.py).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import TYPE_CHECKING

from sipmesh.broker.board import POST_INTERVAL, Board

if TYPE_CHECKING:
    from sipmesh.broker.server import Broker

log = logging.getLogger("sipmesh.broker")


class WorkerOperations:
    def __init__(self, broker: "Broker", board: Board) -> None:
        self.broker = broker
        self.board = board
        self.worker = broker.worker
        self._poster: asyncio.Task[None] | None = None
        self._web = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.board.clear(self.worker)
        if self.worker == 0 and (self.broker.config.metrics or self.broker.config.status_page):
            from sipmesh.broker.web import WebListeners

            web = WebListeners(self.broker, self.board)
            await web.start()
            self._web = web
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # the supervisor's, inherited
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        self.board.post(self.worker, self.broker)
        self._poster = asyncio.ensure_future(self._post_loop())
        self.board.ready(self.worker)

    async def stop(self) -> None:
        try:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        except (RuntimeError, ValueError):
            pass
        if self._poster is not None:
            self._poster.cancel()
            await asyncio.gather(self._poster, return_exceptions=True)
        if self._web is not None:
            await self._web.stop()

    def reload(self) -> None:
        if self.board.supervisor is None:  # alone: we are what systemd signalled
            self.board.begin_reload()
        auth = self.broker.auth
        if auth is not None:
            auth.reload_users()
        if self.worker == 0:
            log.info("SIGHUP: %s", f"{len(auth.users)} users in {auth.users.path}" if auth else
                     "nothing to reload (no users file)")
        self.board.post(self.worker, self.broker)
        self.board.ready(self.worker)

    async def _post_loop(self) -> None:
        while True:
            await asyncio.sleep(POST_INTERVAL)
            self.board.post(self.worker, self.broker)
