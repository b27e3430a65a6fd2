"""The broker's opt-in HTTP listeners, run by worker 0 in its event loop: Prometheus
metrics (`--metrics`, broker/metrics.py) and the status page (`--status-page`).

The status page is read-only: registrations, and the mesh VPN's networks: their members
(mesh address, online or not: registered under the network's AOR, contact) and the path
each pair took as its members report it (broker/paths.py), in the columns and words of
`sipmesh status` (ops/paths.py). `status_page/` holds the page; its script polls
`api/status` every few seconds.

Who may look: on a loopback address, whoever can reach it from this host, unless a
token is given; anywhere else a token is required (`--status-token-file`, checked
before the broker starts). A browser brings the token once as `?token=...` and gets it
back as an HttpOnly cookie (the address bar then loses it); scripts send
`Authorization: Bearer TOKEN`. Without a token, requests must name a loopback host,
so that a web site cannot rebind its DNS name to 127.0.0.1 and read the page through
the operator's browser.
"""

from __future__ import annotations

import hmac
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from aiohttp import web

from sipmesh import __version__
from sipmesh.broker.board import POST_INTERVAL, Board
from sipmesh.broker.metrics import broker_registry
from sipmesh.broker.roster import contact_user
from sipmesh.ops.paths import PAIR_COLUMNS
from sipmesh.ops.http import Listener, metrics_app
from sipmesh.ops.listen import hostport, is_loopback

if TYPE_CHECKING:
    from sipmesh.broker.server import Broker

PAGE_DIR = Path(__file__).with_name("status_page")
FILES = {"/": ("index.html", "text/html"), "/status.js": ("status.js", "text/javascript"),
         "/status.css": ("status.css", "text/css")}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
COOKIE = "sipmesh_status"
MIN_TOKEN = 16
SHOWN = 500  # registrations in one answer unless ?limit=N (at most MAX_SHOWN)
MAX_SHOWN = 10_000


def read_token(path: Path) -> str:
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--status-token-file {path}: {exc}") from None
    if len(token) < MIN_TOKEN or any(c.isspace() for c in token):
        raise ValueError(f"--status-token-file {path}: the token must be one word of at least "
                         f"{MIN_TOKEN} characters, e.g. from 'openssl rand -hex 24'")
    return token


def check_status_page(listen: tuple[str, int] | None, token_file: Path | None) -> None:
    """Refuse a status page that anyone on the network could read."""
    if token_file is not None:
        read_token(token_file)
        if listen is None:
            raise ValueError("--status-token-file needs --status-page")
    elif listen is not None and not is_loopback(listen[0]):
        raise ValueError(f"--status-page {hostport(*listen)} is reachable from other hosts: give "
                         "--status-token-file FILE (a secret to open it with), or listen on 127.0.0.1")


class StatusPage:
    def __init__(self, broker: "Broker", board: Board, token: str | None) -> None:
        self.broker = broker
        self.board = board
        self.token = token
        self._cached: tuple[float, dict[str, Any]] | None = None

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard])
        for path, (name, content_type) in FILES.items():
            app.router.add_get(path, self._file(PAGE_DIR / name, content_type))
        app.router.add_get("/api/status", self._status)
        return app

    # -- who may look ---------------------------------------------------------------------
    @web.middleware
    async def _guard(self, request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if self.token is None:
            if not is_loopback(_host_of(request.host)):
                return _refuse(403, "This status page answers only to its loopback address "
                                    "(http://127.0.0.1:PORT/).")
        else:
            given = request.query.get("token")
            if given is not None:
                if not self._valid(given):
                    return _refuse(401, "Wrong token.")
                response: web.StreamResponse = web.HTTPSeeOther(request.path)
                response.set_cookie(COOKIE, given, httponly=True, samesite="Strict", path="/")
                response.headers.update(HEADERS)
                return response
            bearer = request.headers.get("Authorization", "")
            supplied = bearer[7:] if bearer.startswith("Bearer ") else request.cookies.get(COOKIE)
            if not self._valid(supplied):
                return _refuse(401, "This status page needs its token: open it once as "
                                    "http://HOST:PORT/?token=TOKEN (the token is in the broker's "
                                    "--status-token-file), or send 'Authorization: Bearer TOKEN'.")
        response = await handler(request)
        response.headers.update(HEADERS)
        return response

    def _valid(self, supplied: str | None) -> bool:
        assert self.token is not None
        return supplied is not None and hmac.compare_digest(supplied.encode(), self.token.encode())

    # -- what it shows ----------------------------------------------------------------------
    @staticmethod
    def _file(path: Path, content_type: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        body = path.read_bytes()

        async def serve(request: web.Request) -> web.Response:
            return web.Response(body=body, content_type=content_type, charset="utf-8")

        return serve

    async def _status(self, request: web.Request) -> web.Response:
        try:
            limit = min(max(int(request.query.get("limit", SHOWN)), 1), MAX_SHOWN)
        except ValueError:
            return _refuse(400, "limit must be a number")
        return web.json_response(self.snapshot(limit))

    def snapshot(self, limit: int = SHOWN) -> dict[str, Any]:
        """The page's facts; recomputed at most once a second for the default view, however
        many browsers look."""
        now = time.time()
        if limit == SHOWN and self._cached is not None and now - self._cached[0] < 1.0:
            return self._cached[1]
        broker, location = self.broker, self.broker.location
        assert location is not None
        states = [self.board.read(w) for w in range(self.board.workers)]
        serving = sum(1 for s in states if s is not None and now - s["posted"] < 3 * POST_INTERVAL + 1)
        shown = []
        for binding in location.all(limit):
            source = binding.source
            shown.append({"aor": binding.aor, "contact": binding.contact,
                          "source": f"{source.transport} {hostport(source.host, source.port)}"
                          if source is not None else None,
                          "nat": bool(binding.nat), "expires_in": binding.remaining(now),
                          "registered": binding.updated, "user_agent": binding.user_agent})
        snapshot = {
            "broker": {"version": __version__, "mode": broker.config.mode, "domains": broker.me.domains,
                       "listeners": [f"{l.transport} {hostport(l.host, l.port)}" for l in broker.listeners],
                       "workers": self.board.workers, "workers_serving": serving, "pid": os.getppid()
                       if self.board.supervisor else os.getpid(), "now": now},
            "registrations": {"total": location.count(), "shown": shown},
            "networks": self.networks(now),
            "pair_columns": ["MEMBER", *PAIR_COLUMNS],
        }
        if limit == SHOWN:
            self._cached = (now, snapshot)
        return snapshot


    def networks(self, now: float) -> list[dict[str, Any]]:
        """Each network: its pool, its members (online: registered under the network's AOR),
        and its pairs as their members last reported them, with the report's age."""
        broker = self.broker
        if broker.roster is None or broker.paths is None or broker.location is None:
            return []
        domains = broker.me.domains or [broker.me.default_domain]
        out = []
        for network in broker.roster.networks.networks():
            online: dict[str, Any] = {}
            for domain in domains:
                for binding in broker.location.lookup(f"sip:{network.aor_user}@{domain}"):
                    user = contact_user(binding.contact)
                    if user in network.members and (user not in online
                                                    or binding.updated > online[user].updated):
                        online[user] = binding
            members = [{"name": m.user, "address": m.address, "online": m.user in online,
                        "contact": online[m.user].contact if m.user in online else None}
                       for m in network.members.values()]
            pairs = [{"member": report.member, "peer": pair.peer, "path": pair.path,
                      "cells": [report.member, *pair.cells()], "reported": report.reported,
                      "age": max(0, int(now - report.reported))}
                     for report in broker.paths.store.reports(network.name, now)
                     if report.member in network.members
                     for pair in report.pairs if pair.peer in network.members]
            out.append({"name": network.name, "pool": network.pool, "members": members,
                        "pairs": pairs})
        return out


def _host_of(host_header: str | None) -> str:
    host = host_header or ""
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _refuse(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text + "\n", headers=HEADERS)


class WebListeners:
    def __init__(self, broker: "Broker", board: Board) -> None:
        self.listeners: list[Listener] = []
        config = broker.config
        if config.metrics is not None:
            self.listeners.append(Listener(metrics_app(broker_registry(broker, board)),
                                           *config.metrics, "metrics", "/metrics"))
        if config.status_page is not None:
            token = read_token(config.status_token_file) if config.status_token_file else None
            page = StatusPage(broker, board, token)
            self.listeners.append(Listener(page.app(), *config.status_page, "status page"))

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
