"""The broker: registrar + location service + proxy (or redirect server) + digest auth.

`Broker` wires the parts together like Kamailio's routing script wires its modules:

    UDP datagram (raw) -> _screen_datagram: reply cache (a retransmitted REGISTER
                          gets the same answer again), rate limit per source, load
                          shedding (503 without parsing), [multi-worker: hand over
                          to the worker that owns it]
    parse (transport) ---> _on_inbound(Inbound(message, flow, raw)):
                           REGISTER for us: auth (401) -> registrar -> location
                             service (SQLite, group commit) -> 200/4xx, stateless
                           anything else: transaction layer -> on_request:
          routed to us (in a dialog we record-routed) -> proxy to the next hop
          addressed to the broker itself              -> OPTIONS 200 / 405 / 501
          for a user of a served domain               -> auth (407) -> location -> proxy or 302
          for any other domain                        -> 403 Not relaying (or forward)
      ACK for a 2xx -------> stateless forward along its Route
      stray responses -----> stateless forward along the Via

One `Broker` is one worker: one process, one event loop. `sipmesh.broker.workers`
runs several of them on the same SO_REUSEPORT sockets, sharing the SQLite store.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import sqlite3
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

from sipmesh.broker.auth import DEFAULT_ALGORITHMS, AuthCheck, Authenticator, may_register, may_send_as
from sipmesh.broker.domains import Listener, LocalIdentity
from sipmesh.broker.location import Binding, Changes, LocationService, default_db_path
from sipmesh.broker.nat import take_alias
from sipmesh.broker.proxy import Proxy, Target, loop_hash
from sipmesh.broker.radius import RadiusClient, RadiusConfig, read_secret
from sipmesh.broker.ratelimit import LoadShedder, RateLimiter, retry_after, triage
from sipmesh.broker.redirect import REDIRECTABLE, redirect_contacts
from sipmesh.broker.registrar import Outcome, RegistrarPolicy, process_register
from sipmesh.broker.replies import ReplyCache, quick_reply, stateless_response
from sipmesh.broker.paths import PathReports, PathStore
from sipmesh.broker.roster import NetworkRegistration, Roster, decide_network_register
from sipmesh.broker.users import UsersFile
from sipmesh.sip.errors import ParseError
from sipmesh.sip.headers import Address
from sipmesh.sip.message import Headers, Request, Response, reason_for, with_tag
from sipmesh.sip.transaction.layer import ServerTransaction, TransactionLayer
from sipmesh.sip.transport.base import Flow, Inbound, target_of_via
from sipmesh.sip.transport.layer import TransportLayer
from sipmesh.sip.transport.stun import is_stun
from sipmesh.sip.uri import SipURI, parse_sip_uri

log = logging.getLogger("sipmesh.broker")

# What can be sent to or through the broker (OPTIONS answer).
ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, REGISTER, PRACK, UPDATE, INFO, MESSAGE, SUBSCRIBE, NOTIFY, REFER"
# What the broker accepts when it is itself the target (405 answer).
ALLOW_LOCAL = "OPTIONS, REGISTER"
KNOWN_METHODS = frozenset({"INVITE", "ACK", "CANCEL", "BYE", "OPTIONS", "REGISTER", "PRACK", "UPDATE",
                           "INFO", "MESSAGE", "SUBSCRIBE", "NOTIFY", "REFER", "PUBLISH"})
SERVER = "sipmesh-broker/0.1"
MODES = ("proxy", "redirect")


@dataclass
class BrokerConfig:
    listen: list[tuple[str, int]] = field(default_factory=lambda: [("0.0.0.0", 5060)])
    transports: tuple[str, ...] = ("UDP", "TCP")
    domains: list[str] = field(default_factory=list)
    users_file: Path | None = None
    radius: RadiusConfig | None = None  # digest checked by a RADIUS server (broker/radius.py)
    db_path: Path | None = None  # None: $XDG_STATE_HOME/sipmesh/broker.db
    mode: str = "proxy"
    workers: int = 1
    forward_foreign: bool = False  # relay requests for domains we do not serve
    tls_cert: Path | None = None
    tls_key: Path | None = None
    registrar: RegistrarPolicy = field(default_factory=RegistrarPolicy)
    rate_limit: float = 500.0  # requests per second per source IP; 0 disables
    rate_burst: float | None = None  # default: 2 s worth of rate
    shed_load: bool = True
    nonce_lifetime: float = 300.0
    nonce_secret: bytes | None = None  # shared by all workers; random if None
    auth_algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    timer_c: float = 180.0
    record_route: bool = True
    purge_interval: float = 60.0
    checkpoint_interval: float = 1.0  # seconds between checkpoints of the location store's WAL
    commit_window: float = 0.005  # seconds REGISTERs may wait to share a database commit
    stats_interval: float = 60.0
    max_server_transactions: int = 300_000
    # ops (broker/web.py): opt-in HTTP listeners for Prometheus and the status page
    metrics: tuple[str, int] | None = None
    status_page: tuple[str, int] | None = None
    status_token_file: Path | None = None

    def __post_init__(self) -> None:
        self.transports = tuple(t.upper() for t in self.transports)
        for t in self.transports:
            if t not in ("UDP", "TCP", "TLS"):
                raise ValueError(f"unknown transport {t!r}: use udp, tcp or tls")
        if "TLS" in self.transports and not (self.tls_cert and self.tls_key):
            raise ValueError("TLS needs a certificate and a key (--tls-cert, --tls-key)")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        if self.workers < 1:
            raise ValueError("workers must be at least 1")
        if self.radius is not None and self.domains:
            served = {d.lower() for d in self.domains}
            for realm in self.radius.realms:
                if realm.lower() not in served:
                    raise ValueError(f"--radius-realm {realm}: not a --domain of this broker")

    @property
    def database(self) -> Path:
        return Path(self.db_path) if self.db_path else default_db_path()


@dataclass
class Counters:
    registers: int = 0
    forwarded: int = 0
    rate_limited: int = 0
    shed: int = 0
    # ops: parsed requests by method, final responses by method and class (1-6); methods
    # we do not know count as "other", so that no sender can make these grow
    requests: Counter[str] = field(default_factory=Counter)
    responses: Counter[tuple[str, int]] = field(default_factory=Counter)

    def request(self, method: str) -> None:
        self.requests[method if method in KNOWN_METHODS else "other"] += 1

    def response(self, request: Request, response: Response) -> None:
        method = request.method
        self.responses[(method if method in KNOWN_METHODS else "other", response.status // 100)] += 1


class Broker:
    """One broker worker. `await start()`, then `await stop()`."""

    def __init__(self, config: BrokerConfig, *, worker: int = 0, reuse_port: bool = False) -> None:
        self.config = config
        self.worker = worker
        self.reuse_port = reuse_port or config.workers > 1
        self.counters = Counters()
        self.location: LocationService | None = None
        self.users: UsersFile | None = None
        self.auth: Authenticator | None = None
        self.transport: TransportLayer | None = None
        self.transactions: TransactionLayer | None = None
        self.proxy: Proxy | None = None
        self.roster: Roster | None = None  # mesh networks' rosters (broker/roster.py)
        self.paths: PathReports | None = None  # the paths members publish (broker/paths.py)
        self.me = LocalIdentity(config.domains)
        self.listeners: list[Listener] = []
        self.replies = ReplyCache()
        self.limiter = (RateLimiter(config.rate_limit, config.rate_burst or 2 * config.rate_limit)
                        if config.rate_limit > 0 else None)
        self.shedder: LoadShedder | None = None
        # set by a multi-worker broker: hands a datagram to the worker owning it
        self.steer: Callable[[bytes, Flow], bool] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._pending: list[_Registration] = []  # REGISTERs waiting for the next commit
        # checks with the RADIUS server, and the UDP REGISTERs (reply-cache keys) they are for
        self._auth_tasks: set[asyncio.Future[AuthCheck]] = set()
        self._authenticating: set[tuple] = set()
        # messages that arrived while we were still binding (we are not ourselves yet)
        self._early: list[Inbound] | None = None
        self._started = False

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        config = self.config
        self.location = LocationService(config.database, auto_checkpoint=False)
        if self.worker == 0:
            purged = self.location.purge()
            log.info("location service %s: %d live bindings (%d expired purged)",
                     config.database, self.location.count(), purged)
        if config.users_file is not None:
            self.users = UsersFile(config.users_file)
            log.info("digest authentication on: %d users in %s (realms: %s)", len(self.users),
                     config.users_file, ", ".join(sorted(self.users.realms)) or "none yet")
        if config.users_file is not None or config.radius is not None:
            radius = None
            if config.radius is not None:
                radius = RadiusClient(config.radius, read_secret(config.radius.secret_file))
                log.info("digest authentication through the RADIUS server %s%s (realms: %s)",
                         config.radius.server, ", after the users file" if self.users else "",
                         ", ".join(config.radius.realms) or "all")
            self.auth = Authenticator(self.users, nonce_secret=config.nonce_secret,
                                      nonce_lifetime=config.nonce_lifetime,
                                      algorithms=config.auth_algorithms, radius=radius)
        # Every datagram passes _screen_datagram before it is parsed; every parsed
        # message reaches _on_inbound, which sends REGISTERs for us to the registrar
        # and everything else through the transaction layer to on_request & co.
        self.transport = TransportLayer(self._on_inbound, datagram_filter=self._screen_datagram,
                                        stun_server=True)
        self.transactions = TransactionLayer(self.transport, self,
                                             max_server_transactions=config.max_server_transactions)
        self.transactions.on_final = self.counters.response  # ops: responses by class
        self.proxy = Proxy(self.transactions, self.me, worker=self.worker,
                           record_route=config.record_route, timer_c=config.timer_c)
        self._early = []
        try:
            await self._listen()
        except BaseException:
            await self.transport.close()
            self.location.close()
            raise
        self.me.listeners = list(self.listeners)
        if config.shed_load:
            self.shedder = LoadShedder(self.transport.udp_sockets())
        # mesh networks (broker/roster.py): network AORs, the reg event package
        self.roster = Roster(database=config.database, location=self.location, me=self.me, auth=self.auth,
                             transactions=self.transactions, worker=self.worker, policy=config.registrar)
        self.paths = PathReports(networks=self.roster.networks, store=PathStore(config.database),
                                 me=self.me, auth=self.auth, min_expires=config.registrar.min_expires)
        if self.worker == 0 and config.purge_interval > 0:
            self._tasks.append(asyncio.ensure_future(self._purge_loop()))
        if self.worker == 0:
            self._tasks.append(asyncio.ensure_future(self._checkpoint_loop()))
        if config.stats_interval > 0:
            self._tasks.append(asyncio.ensure_future(self._stats_loop()))
        self._started = True
        early, self._early = self._early, None
        for inbound in early:
            self._on_inbound(inbound)
        if self.worker == 0:
            log.info("broker ready (%s mode), domains: %s", config.mode,
                     ", ".join(self.me.domains) or f"{self.me.default_domain} (our address)")

    async def _listen(self) -> None:
        assert self.transport is not None
        ssl_context = None
        if "TLS" in self.config.transports:
            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_context.load_cert_chain(str(self.config.tls_cert), str(self.config.tls_key))
        for host, configured in self.config.listen:
            port = configured
            if port == 0 and len(set(self.config.transports) - {"TLS"}) > 1:
                port = free_port_pair(host)  # UDP and TCP must get the same number
            shared_port = port
            for transport in self.config.transports:
                want = shared_port
                if transport == "TLS":
                    want = configured + 1 if configured else 0  # sips 5061 beside sip 5060
                bound = await self.transport.listen(transport, host, want, ssl_context=ssl_context,
                                                    reuse_port=self.reuse_port)
                if transport != "TLS":
                    shared_port = bound[1]  # UDP and TCP share one port number
                self.listeners.append(Listener(transport, host, bound[1]))

    async def stop(self) -> None:
        self._commit_registrations()  # answer what was already accepted
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)  # a checkpoint ends first
        self._tasks.clear()
        if self.roster is not None:  # mesh networks
            await self.roster.close()
        if self.paths is not None:
            self.paths.close()
        for check in list(self._auth_tasks):
            check.cancel()
        await asyncio.gather(*self._auth_tasks, return_exceptions=True)
        if self.auth is not None and self.auth.radius is not None:
            await self.auth.radius.close()
        if self.proxy is not None:
            await self.proxy.close()
        if self.transactions is not None:
            await self.transactions.close()
        if self.transport is not None:
            await self.transport.close()
        if self.location is not None:
            self.location.close()
        self._started = False

    async def __aenter__(self) -> "Broker":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def address(self, transport: str = "UDP") -> tuple[str, int]:
        """Where clients reach us over `transport` (wildcard binds reported as 127.0.0.1)."""
        for listener in self.listeners:
            if listener.transport == transport.upper():
                host = "127.0.0.1" if listener.host == "0.0.0.0" else listener.host
                return host, listener.port
        raise LookupError(f"not listening on {transport}")

    @property
    def hostport(self) -> str:
        host, port = self.address("UDP" if "UDP" in self.config.transports else self.config.transports[0])
        return f"{host}:{port}"

    async def _purge_loop(self) -> None:
        assert self.location is not None
        while True:
            await asyncio.sleep(self.config.purge_interval)
            try:
                purged = self.location.purge()
                if purged:
                    log.info("purged %d expired bindings", purged)
            except Exception:
                log.exception("purging expired bindings failed")

    async def _checkpoint_loop(self) -> None:
        """Worker 0 checkpoints the location store's WAL in a thread, off every event loop."""
        assert self.location is not None
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(1, thread_name_prefix="checkpoint") as executor:
            while True:
                await asyncio.sleep(self.config.checkpoint_interval)
                try:
                    await loop.run_in_executor(executor, self.location.checkpoint)
                except sqlite3.Error as exc:
                    log.warning("checkpointing the location store failed: %s", exc)

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.stats_interval)
            c = self.counters
            assert self.transactions is not None
            log.info("worker %d: %d REGISTERs, %d requests forwarded, %d rate-limited, %d shed (503), "
                     "%d server transactions", self.worker, c.registers, c.forwarded, c.rate_limited,
                     c.shed, self.transactions.server_transactions)

    # -- entry points: every UDP datagram, then every parsed message ---------------------------
    def _screen_datagram(self, data: bytes, flow: Flow) -> bool:
        """Before parsing: refuse floods and overload cheaply, then let a multi-worker
        broker hand the datagram to its owner. True if the datagram was dealt with."""
        if is_stun(data):  # answered by the transport layer, within the rate limit
            return self.limiter is not None and self.limiter.check(flow.host) > 0
        if data.startswith(b"REGISTER "):
            cached = self.replies.get((flow, data))  # a retransmission: same bytes, same source
            if cached is not None:
                assert self.transactions is not None
                self.transactions.send_stateless(cached[0], cached[1])  # type: ignore[arg-type]
                return True
            if self._authenticating and (flow, data) in self._authenticating:
                return True  # a retransmission while the RADIUS server checks the first one
        if not data.startswith(b"SIP/") and data[:data.find(b" ")] not in (b"ACK", b"CANCEL", b"BYE"):
            if self.limiter is not None:
                wait = self.limiter.check(flow.host)
                if wait > 0:
                    self.counters.rate_limited += 1
                    self._refuse(data, flow, [("Retry-After", retry_after(wait))])
                    return True
            if self.shedder is not None and self.shedder.overloaded:
                kind = triage(data)
                if kind == "new":
                    self.counters.shed += 1
                    self._refuse(data, flow, [("Retry-After", "2")])
                    return True
                if kind == "stray":  # what _route would answer, without parsing
                    self._refuse(data, flow, [], 404)
                    return True
        return self.steer is not None and self.steer(data, flow)

    def receive_handed_over(self, data: bytes, flow: Flow) -> None:
        """A datagram another worker received and screened for us (see workers.Steering)."""
        assert self.transport is not None
        self.transport.receive_datagram(data, flow, filtered=True)

    def _refuse(self, data: bytes, flow: Flow, headers: list[tuple[str, str]], status: int = 503) -> None:
        assert self.transactions is not None
        reply = quick_reply(data, flow, status, headers)
        if reply is not None:
            self.transactions.send_stateless(reply[0], reply[1])  # type: ignore[arg-type]

    def _on_inbound(self, inbound: Inbound) -> None:
        """The two roads of a parsed message: a REGISTER for one of our domains goes
        straight to the registrar, answered without a transaction (a retransmission
        over UDP is answered from the reply cache, see _screen_datagram); anything
        else goes through the transaction layer."""
        if self._early is not None:
            self._early.append(inbound)
            return
        assert self.transactions is not None
        message, flow = inbound.message, inbound.flow
        if isinstance(message, Request):
            self.counters.request(message.method)  # ops
        if isinstance(message, Request) and message.method not in ("ACK", "CANCEL"):
            if self.limiter is not None and flow.transport != "UDP":  # UDP: see _screen_datagram
                wait = self.limiter.check(flow.host)
                if wait > 0:
                    self.counters.rate_limited += 1
                    self.transactions.reply_stateless(message, flow, 503, "Service Unavailable",
                                                      [("Retry-After", retry_after(wait))])
                    return
            if message.method == "REGISTER" and isinstance(message.uri, SipURI) \
                    and self.me.is_ours(message.uri):
                key = (flow, inbound.raw) if flow.transport == "UDP" else None  # TCP does not repeat
                self._begin_register(_Registration(message, flow, key))
                return
        self.transactions.receive(inbound)

    # -- registrar ----------------------------------------------------------------------
    def _begin_register(self, reg: "_Registration") -> None:
        """Steps 1-5 of §10.3 now (3-4 when the RADIUS server has answered); steps 6-8 at
        the next group commit."""
        self.counters.registers += 1
        try:
            reg.to = reg.request.to
            refusal = self._check_register(reg)
        except ParseError as exc:
            refusal = (400, f"Bad Request ({exc.reason})", [])
        if refusal is not None:
            self._finish_register(reg, *refusal)
        elif self.auth is None or reg.network is not None:
            self._queue_register(reg)
        else:  # steps 3-4
            assert reg.domain is not None
            self._authenticate(reg.request, reg.domain, partial(self._register_authenticated, reg),
                               reg.key)

    def _register_authenticated(self, reg: "_Registration", check: AuthCheck) -> None:
        if not check.ok:
            self._finish_register(reg, check.status, check.reason, check.headers)
            return
        assert check.username is not None and reg.to is not None and isinstance(reg.to.uri, SipURI)
        if not may_register(check.username, reg.to.uri.user):
            log.info("%s tried to register %s: 403", check.username, reg.aor)
            self._finish_register(reg, 403, "Forbidden (you may only register your own address-of-record)", [])
            return
        self._queue_register(reg)

    def _queue_register(self, reg: "_Registration") -> None:
        self._pending.append(reg)
        # Group commit: REGISTERs arriving within `commit_window` share one SQLite
        # transaction (a commit costs as much as the rest of a REGISTER).
        if len(self._pending) == 1:
            loop = asyncio.get_running_loop()
            if self.config.commit_window > 0:
                loop.call_later(self.config.commit_window, self._commit_registrations)
            else:
                loop.call_soon(self._commit_registrations)
        elif len(self._pending) == 256:
            asyncio.get_running_loop().call_soon(self._commit_registrations)

    def _check_register(self, reg: "_Registration") -> tuple[int, str | None, list[tuple[str, str]]] | None:
        request, to = reg.request, reg.to
        assert to is not None
        require = request.headers.get("Require")
        if require:  # step 2: we implement no extension
            return 420, None, [("Unsupported", require)]
        to_uri = to.uri
        if not isinstance(to_uri, SipURI) or to_uri.user is None:
            return 400, "Bad Request (To must be a sip: URI with a user part)", []
        assert isinstance(request.uri, SipURI)
        domain = self.me.domain_of(request.uri.host)
        aor = self.me.aor(to_uri)
        if aor is None or domain is None or self.me.domain_of(to_uri.host) != domain:
            return 404, "Not Found (address-of-record not in this domain)", []  # step 5
        network = self.roster.network_for(to_uri) if self.roster is not None else None
        if network is not None:  # mesh: a network's AOR (broker/roster.py checks its credentials)
            reg.aor = aor
            refusal, reg.network = self.roster.check_register(request, network)  # type: ignore[union-attr]
            return refusal
        reg.aor, reg.domain = aor, domain
        return None

    def _authenticate(self, request: Request, realm: str, then: Callable[[AuthCheck], None],
                      key: tuple | None = None) -> None:
        """`then(check)` now, or once the RADIUS server has answered: the event loop never
        waits for it. `key`: the REGISTER datagram whose retransmissions to absorb meanwhile."""
        assert self.auth is not None
        check = self.auth.check(request, realm)
        if check.pending is None:
            then(check)
            return
        task = asyncio.ensure_future(check.pending)
        self._auth_tasks.add(task)
        if key is not None:
            self._authenticating.add(key)

        def done(task: asyncio.Future[AuthCheck]) -> None:
            self._auth_tasks.discard(task)
            if key is not None:
                self._authenticating.discard(key)
            if not task.cancelled():
                try:
                    then(task.result())
                except Exception:
                    log.exception("%s after the RADIUS check failed", request.method)
        task.add_done_callback(done)

    def _commit_registrations(self) -> None:
        """Steps 6-8 for every REGISTER that arrived since the last commit: one SQLite
        transaction for the burst (each REGISTER's changes are still all or nothing)."""
        batch, self._pending = self._pending, []
        if not batch or self.location is None:
            return
        now = time.time()
        policy, worker = self.config.registrar, self.worker
        items = [(reg.aor, partial(_decide, reg, now, worker, policy)) for reg in batch]
        try:
            results: list = self.location.update_many(items)
        except sqlite3.Error as exc:  # disk full, read-only: 500 to each, and one line
            log.error("the location service failed to save %d registrations: %s", len(batch), exc)
            results = [exc] * len(batch)
        except Exception as exc:
            log.exception("the location service failed to save %d registrations", len(batch))
            results = [exc] * len(batch)
        if self.roster is not None:  # mesh: rosters that may have changed
            self.roster.committed([reg.aor for reg in batch if reg.network is not None])
        for reg, outcome in zip(batch, results):
            if isinstance(outcome, Exception):
                if not isinstance(outcome, sqlite3.Error):
                    log.error("REGISTER for %s failed: %r", reg.aor, outcome)
                self._finish_register(reg, 500, "Server Internal Error (location service)",
                                      [("Retry-After", "5")])
            else:
                self._finish_register(reg, outcome.status, outcome.reason, outcome.headers)

    def _finish_register(self, reg: "_Registration", status: int, reason: str | None,
                         headers: list[tuple[str, str]]) -> None:
        assert self.transactions is not None
        if log.isEnabledFor(logging.DEBUG):
            log.debug("REGISTER %s from %s: %d", reg.aor or reg.request.headers.get("To"), reg.flow, status)
        headers = [*headers, ("Server", SERVER)]
        if reg.txn is not None:
            reg.txn.respond(_response(reg.request, reg.to, status, reason, headers))
            return
        to = reg.request.headers.get("To") or ""
        if reg.to is not None and reg.to.tag is None:
            to = with_tag(to, _tag_for(reg.request))
        wire = stateless_response(reg.request, status, reason, headers, to)
        self.counters.responses[("REGISTER", status // 100)] += 1  # ops (the transaction layer counts the rest)
        target = target_of_via(reg.request.via, reg.flow)
        if reg.key is not None and status != 401:  # a challenge consumes nothing: make it anew
            self.replies.put(reg.key, wire, target)
        self.transactions.send_stateless(wire, target)  # type: ignore[arg-type]

    # -- TransactionUser --------------------------------------------------------------------
    def on_request(self, txn: ServerTransaction) -> None:
        try:
            self._route(txn)
        except ParseError as exc:
            if not txn.final_sent:
                txn.reply(400, f"Bad Request ({exc.reason})")

    def _route(self, txn: ServerTransaction) -> None:
        assert self.proxy is not None and self.location is not None
        if self.roster is not None and self.roster.on_request(txn):  # mesh: SUBSCRIBE to a roster
            return
        if self.paths is not None and self.paths.on_request(txn):  # mesh: PUBLISH of paths
            return
        request = txn.request
        method = request.method
        if not isinstance(request.uri, SipURI):
            txn.reply(416)
            return
        in_dialog = request.to.tag is not None
        # The loop hash of the request as received (§16.6 step 8); a request inside a
        # dialog follows a fixed route set and cannot spiral, Max-Forwards suffices.
        loop = "0" if in_dialog else loop_hash(request)
        routed = self.proxy.preprocess_routes(request)
        if in_dialog:
            if routed or request.headers.get("Route") is not None:
                flow = take_alias(request)  # a UA behind NAT, reached where it spoke from
                if flow is not None and not self._reachable(flow):
                    txn.reply(430, "Flow Failed")  # RFC 5626 §5.3: it must connect again
                    return
                self._forward(txn, [Target(request.uri, flow, alias=flow is not None)],  # type: ignore[arg-type]
                              loop)
            elif self._addressed_to_us(request):
                self._answer_locally(txn)
            else:
                txn.reply(404, "Not Here")
            return
        if request.headers.get("Route") is not None or not self.me.is_ours(request.uri):
            # A pre-loaded route or a foreign Request-URI: relaying for others.
            if self.config.forward_foreign:
                self._forward(txn, [Target(request.uri)], loop)  # type: ignore[arg-type]
            else:
                txn.reply(403, "Not relaying")
            return
        if request.uri.user is None:
            self._answer_locally(txn)
            return
        if method == "REGISTER":
            self._begin_register(_Registration(request, txn.flow, None, txn))
            return
        if self.config.mode == "redirect" and method not in REDIRECTABLE:
            txn.reply(501 if method not in KNOWN_METHODS else 481 if method == "BYE" else 405,
                      headers=[("Allow", ALLOW_LOCAL)] if method in KNOWN_METHODS else None)
            return
        if self.auth is not None:
            self._authorise(txn, partial(self._deliver, txn, loop))
        else:
            self._deliver(txn, loop)

    def _deliver(self, txn: ServerTransaction, loop: str) -> None:
        """A request for a user of ours, authorised: to its bindings (or 302, 404, 480)."""
        assert self.location is not None
        request = txn.request
        assert isinstance(request.uri, SipURI)
        aor = self.me.aor(request.uri)
        assert aor is not None
        bindings = self.location.lookup(aor)
        if not bindings:
            known = self.location.known(aor) or (
                self.users is not None and self.users.exists(request.uri.user, aor.split("@", 1)[1]))
            txn.reply(480 if known else 404, None if known else "Not Found (no such user)",
                      to_tag=_tag_for(request))
            return
        if self.config.mode == "redirect":
            txn.reply(302, to_tag=_tag_for(request),
                      headers=redirect_contacts(bindings, time.time()))
            return
        targets = []
        for binding in bindings:
            try:
                targets.append(Target(parse_sip_uri(binding.contact), self._flow_of(binding), binding.q))
            except ParseError:
                log.warning("unusable contact %r for %s", binding.contact, aor)
        if not targets:
            txn.reply(480, to_tag=_tag_for(request))
            return
        self._forward(txn, targets, loop)

    def _forward(self, txn: ServerTransaction, targets: list[Target], loop: str) -> None:
        assert self.proxy is not None
        error = self.proxy.check(txn.request)
        if error is not None:
            status, reason, headers = error
            txn.reply(status, reason, to_tag=_tag_for(txn.request), headers=headers)
            return
        self.counters.forwarded += 1
        self.proxy.forward(txn, targets, loop=loop)

    def _flow_of(self, binding: Binding) -> Flow | None:
        """Reach a UA over its own TCP/TLS connection when this worker holds it; over UDP
        where its REGISTER came from if that passed a NAT; else (None) at its Contact."""
        source = binding.source
        if source is None:
            return None
        if source.transport != "UDP":
            return source if binding.worker == self.worker else None
        return source if binding.nat else None

    def _reachable(self, flow: Flow) -> bool:
        """Can we send over `flow` (a NATed UA's) now? A TCP/TLS flow only over the UA's
        own connection: the NAT would drop a connection opened towards it."""
        assert self.transport is not None
        return not flow.reliable or self.transport.has_connection(flow)

    def _authorise(self, txn: ServerTransaction, then: Callable[[], None]) -> None:
        """Digest (407) for requests from our users; they must send as themselves. `then()`
        once they have (now, or when the RADIUS server has answered)."""
        request = txn.request
        from_uri = request.from_.uri
        realm = self.me.domain_of(from_uri.host) if isinstance(from_uri, SipURI) else None
        if realm is None:
            txn.reply(403, "Forbidden (caller's domain is not served here)", to_tag=_tag_for(request))
            return
        self._authenticate(request, realm, partial(self._authorised, txn, realm, then))

    def _authorised(self, txn: ServerTransaction, realm: str, then: Callable[[], None],
                    check: AuthCheck) -> None:
        if txn.final_sent:  # answered while the RADIUS server was asked (CANCEL: 487)
            return
        request = txn.request
        if not check.ok:
            txn.reply(check.status, check.reason, to_tag=_tag_for(request), headers=check.headers)
            return
        from_uri = request.from_.uri
        assert check.username is not None and isinstance(from_uri, SipURI)
        if not may_send_as(check.username, from_uri.user):
            log.info("%s tried to send as %s: 403", check.username, from_uri)
            txn.reply(403, "Forbidden (From is not the authenticated user)", to_tag=_tag_for(request))
            return
        _consume_credentials(request, realm)
        try:
            then()
        except ParseError as exc:
            if not txn.final_sent:
                txn.reply(400, f"Bad Request ({exc.reason})")

    def _addressed_to_us(self, request: Request) -> bool:
        uri = request.uri
        return isinstance(uri, SipURI) and uri.user is None and self.me.is_ours(uri)

    def _answer_locally(self, txn: ServerTransaction) -> None:
        """The broker itself is the target: OPTIONS 200, other methods 405 or 501 (§8.2.1)."""
        method = txn.request.method
        tag = _tag_for(txn.request)
        if method == "OPTIONS":
            txn.reply(200, to_tag=tag, headers=[("Allow", ALLOW), ("Accept", "application/sdp"),
                                                ("Accept-Encoding", "identity"),
                                                ("Accept-Language", "en"), ("Supported", ""),
                                                ("Server", SERVER)])
        elif method == "REGISTER":
            self._begin_register(_Registration(txn.request, txn.flow, None, txn))
        elif method in KNOWN_METHODS:
            txn.reply(405, to_tag=tag, headers=[("Allow", ALLOW_LOCAL)])
        else:
            txn.reply(501, to_tag=tag)

    def on_ack(self, request: Request, flow: Flow) -> None:
        """An ACK for a 2xx: forward it along its Route, statelessly (§16.11)."""
        assert self.proxy is not None
        try:
            if not isinstance(request.uri, SipURI):
                return
            routed = self.proxy.preprocess_routes(request)
            if not routed and request.headers.get("Route") is None:
                return  # not in a dialog we record-routed: nothing to do for us
            mf = request.headers.get("Max-Forwards")
            if (mf is not None and int(mf) == 0) or self.proxy.looped(request):
                return
            target = take_alias(request)
            if target is not None and not self._reachable(target):
                log.info("ACK for %s dropped: its TCP/TLS connection is gone", target)
                return
            self.proxy.forward_stateless(request, target)
        except ParseError as exc:
            log.debug("dropped a bad ACK from %s: %s", flow, exc.reason)

    def on_cancel(self, txn: ServerTransaction) -> None:
        assert self.proxy is not None
        if not self.proxy.on_cancel(txn) and not txn.final_sent:
            txn.reply(487, to_tag=_tag_for(txn.request))

    def on_stray_response(self, response: Response, flow: Flow) -> None:
        assert self.proxy is not None
        self.proxy.forward_response(response)


@dataclass(eq=False, slots=True)
class _Registration:
    """A REGISTER on its way through steps 1-8."""

    request: Request
    flow: Flow
    key: tuple | None  # reply-cache key: (source, datagram) of a REGISTER over UDP
    txn: ServerTransaction | None = None
    to: Address | None = None
    aor: str | None = None
    network: NetworkRegistration | None = None  # a network AOR's (broker/roster.py)
    domain: str | None = None  # the realm of its credentials


def _decide(reg: _Registration, now: float, worker: int, policy: RegistrarPolicy,
            current: list[Binding]) -> tuple[Outcome, Changes]:
    assert reg.aor is not None
    if reg.network is not None:  # mesh: a network AOR's rules
        return decide_network_register(reg.request, reg.aor, reg.network, current, now=now, source=reg.flow,
                                       worker=worker, policy=policy)
    return process_register(reg.request, reg.aor, current, now=now, source=reg.flow, worker=worker,
                            policy=policy)


def _response(request: Request, to: Address | None, status: int, reason: str | None,
              headers: list[tuple[str, str]]) -> Response:
    """make_response without parsing again what the registrar already parsed."""
    out = Headers()
    h = request.headers
    for value in h.get_all("Via"):
        out.add("Via", value)
    out.add("From", h.get("From") or "")
    if to is not None and to.tag is None and status > 100:
        out.add("To", with_tag(h.get("To") or "", _tag_for(request)))
    else:
        out.add("To", h.get("To") or "")
    out.add("Call-ID", h.get("Call-ID") or "")
    out.add("CSeq", h.get("CSeq") or "")
    for name, value in headers:
        out.add(name, value)
    return Response(headers=out, status=status, reason=reason or reason_for(status))


def free_port_pair(host: str) -> int:
    """A port number free for both UDP and TCP on `host` (probed, not held)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(100):
        with socket.socket(family, socket.SOCK_DGRAM) as udp, socket.socket(family, socket.SOCK_STREAM) as tcp:
            udp.bind((host, 0))
            port = udp.getsockname()[1]
            try:
                tcp.bind((host, port))
            except OSError:
                continue
            return port
    raise OSError(f"no port free for both UDP and TCP on {host}")


def _tag_for(request: Request) -> str:
    """A To tag for a response we generate; stable per request so retransmitted
    requests answered statelessly get the same tag."""
    seed = f"{request.headers.get('Via')}\n{request.headers.get('Call-ID')}"
    return "sm" + hashlib.blake2b(seed.encode("utf-8", "surrogateescape"), digest_size=6).hexdigest()


def _consume_credentials(request: Request, realm: str) -> None:
    """Our Proxy-Authorization is not for the next hop (Kamailio's consume_credentials)."""
    values = request.headers.get_all("Proxy-Authorization")
    if not values:
        return
    keep = [v for v in values if f'realm="{realm}"' not in v]
    request.headers.remove("Proxy-Authorization")
    for value in keep:
        request.headers.add("Proxy-Authorization", value)

