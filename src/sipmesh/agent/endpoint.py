"""Our SIP identity for as long as an agent runs: listen, our address, registration, stop.

`sipmesh serve`, `sipmesh call`, `sip_app` (agent/session.py:Agent) and the
super-daemon (daemon/server.py:Daemon) each run one Endpoint; what they add is
their answer to an INVITE (`on_invite`), never a second copy of this:

    endpoint = Endpoint(ua_config, on_invite=..., advertise=..., tls_server_name=...)
    await endpoint.listen()     # the UA's sockets, the address we send in a=IP4/IP6, and
                                # where ICE gathers (`ice_config`: host address, STUN, TURN);
                                # from now on our address is followed (`moved`, mobility.py)
    await endpoint.register()   # REGISTER, refreshed at half the granted time (over
                                # TCP/TLS: each opens the connection first, see connect())
    ...                         # sessions run (agent/session.py:Session), each in
                                # `endpoint.sessions` while it lasts; pings (a=APP:ping,
                                # agent/probe.py) are answered here, whatever the agent
                                # serves, and run in `endpoint.probes`
    endpoint.request_stop()     # (a signal) running sessions end, then:
    await endpoint.close(t)     # wait up to t s for them, unregister, stop the UA
"""

from __future__ import annotations

import asyncio
import errno
import logging
from contextlib import contextmanager
from typing import TYPE_CHECKING, Awaitable, Callable, Iterator

from sipmesh.agent.errors import AgentError, Exit
from sipmesh.agent.ice import IceConfig, IceOptions
from sipmesh.agent.portmap import PROTOCOLS as PORTMAP_PROTOCOLS
from sipmesh.agent.probe import MAX_PROBES, ProbeProfile, asks_for_probe
from sipmesh.agent.profile import SessionInfo
from sipmesh.agent.link import connection_error, server_flow, tls_name
from sipmesh.agent.mobility import Mobility, Move, Snapshot
from sipmesh.agent.params import IPAddress
from sipmesh.agent.registration import Registration, register_everywhere, register_in_background
from sipmesh.sip.transport.base import RELIABLE, Flow, forget_routes, local_address_towards
from sipmesh.sip.transport.resolve import resolve_uri
from sipmesh.sip.headers import Address
from sipmesh.sip.uri import parse_sip_uri
from sipmesh.sip.ua import IncomingCall, UAConfig, UserAgent

if TYPE_CHECKING:
    from sipmesh.agent.session import Session

log = logging.getLogger("sipmesh.agent")

SRV_RECHECK_MIN = 1.0   # s: servers found by SRV are looked up again at most this often
SRV_RETRY = 10.0        # s: and this long after a failed look-up (the old set is kept)


async def advertised_address(advertise: str | None, domain: str) -> str:
    """Our a=IP4/IP6: `advertise` if given, else our local address towards the SIP server."""
    if advertise:
        try:
            return IPAddress().check(advertise)
        except ValueError as exc:
            raise AgentError(f"--advertise: {exc}", Exit.USAGE) from None
    try:
        server = await resolve_uri(parse_sip_uri(f"sip:{domain}"))
    except OSError as exc:
        raise AgentError(f"cannot resolve the SIP server ({exc}): check the host name in "
                         "--server", Exit.UNREACHABLE) from None
    return local_address_towards(server.host)


def listen_error(exc: OSError, host: str, port: int) -> AgentError:
    """We cannot listen for SIP: why, and which option to change."""
    where = f"{host}:{port}" if port else f"{host} (any port)"
    hint = {errno.EADDRINUSE: "another program uses that port: choose another --sip-port "
                              "(daemon: [agent] sip_port; 0 picks a free one), or stop it",
            errno.EACCES: "ports below 1024 need root: choose a --sip-port above 1023",
            errno.EADDRNOTAVAIL: "that address is not one of this host's: check --bind "
                                 "(daemon: [agent] bind)"}.get(exc.errno or 0)
    return AgentError(f"cannot listen for SIP on {where}: {exc.strerror or exc}"
                      + (f" ({hint})" if hint else ""), Exit.UNREACHABLE)


class Endpoint:
    """The UA, our advertised address, our registration and the sessions running on them."""

    def __init__(self, config: UAConfig, *,
                 on_invite: Callable[[IncomingCall], Awaitable[None]],
                 advertise: str | None = None, tls_server_name: str | None = None,
                 ice: IceOptions | None = None,
                 allow_probe: Callable[[object], bool] | None = None,
                 mobility: bool = True,
                 after_move: Callable[[Move], Awaitable[None]] | None = None) -> None:
        self.config = config
        self.follow_moves = mobility  # notice our address changing, follow it
        self.after_move = after_move  # what the agent adds to `moved` (a mesh: its pairs)
        self.on_invite = on_invite
        self.allow_probe = allow_probe  # who may ping us, by caller URI (None: anyone)
        self.advertise = advertise
        self.tls_server_name = tls_server_name  # default: the server's host name
        self.ice = ice if ice is not None else IceOptions()
        self.ua: UserAgent | None = None
        self.local_ip = ""
        self.ice_config: IceConfig | None = None  # None: ICE is off
        self.registration: Registration | None = None  # at the first server
        self.registrations: list[Registration] = []  # one per server (UAConfig.servers)
        self._registering: set[asyncio.Task[None]] = set()
        self.sessions: dict[str, Session] = {}  # running (answering or calling), by Call-ID
        self.probes: dict[str, Session] = {}    # pings, answering or calling (not sessions:
                                                # a ping never makes an agent busy)
        self.stopping = asyncio.Event()  # (asyncio events bind to a loop only when awaited)
        self._idle = asyncio.Event()
        self._idle.set()
        self.mobility: Mobility | None = None  # once listening, with follow_moves
        self._following_srv: asyncio.Task[None] | None = None  # servers found by SRV
        self._server_flow: Flow | None = None

    async def listen(self) -> None:
        """Start the UA; find the address we advertise."""
        any_port = self.config.listen_port == 0
        for attempt in range(1, 6):
            ua = UserAgent(self.config, on_invite=self._on_invite)
            try:
                await ua.start()
                break
            except OSError as exc:
                await ua.stop()
                # any free port: UDP's number may be taken for TCP; another number will do
                if not (any_port and exc.errno == errno.EADDRINUSE and attempt < 5):
                    raise listen_error(exc, self.config.listen_host,
                                       self.config.listen_port) from None
        self.ua = ua
        try:
            await ua.find_servers()  # a domain's servers by DNS SRV (RFC 3263), if it has any
        except OSError as exc:
            raise AgentError(f"cannot resolve the SIP server ({exc}): check the host name in "
                             "--server", Exit.UNREACHABLE) from None
        self.local_ip = await advertised_address(self.advertise, ua.servers[0])
        if self.ice.enabled:
            self.ice_config = await self._ice_config()
        if ua.servers_ttl is not None:
            self._following_srv = asyncio.ensure_future(self._follow_srv())
        if self.follow_moves:
            self.mobility = Mobility(self._where, self.moved, stun=self._seen_as)
            await self.mobility.start()

    async def _ice_config(self) -> IceConfig:
        """Candidates on our address towards the SIP server; STUN at the SIP server (its
        SIP UDP port answers STUN) unless another is given; TURN with our SIP credentials."""
        try:
            assert self.ua is not None
            flow = await resolve_uri(parse_sip_uri(f"sip:{self.ua.servers[0]}"))
        except OSError as exc:
            raise AgentError(f"cannot resolve the SIP server: {exc}", Exit.UNREACHABLE) from None
        server = flow.host
        options = self.ice
        more: list[tuple[str, int]] = []
        if options.stun is None and self.ua is not None:  # each of our SIP servers answers STUN
            for other in self.ua.servers[1:]:
                try:
                    address = await resolve_uri(parse_sip_uri(f"sip:{other}"))
                except (OSError, ValueError) as exc:
                    log.info("no STUN at %s: %s", other, exc)
                    continue
                more.append((address.host, address.port))
        return IceConfig(stun_server=options.stun or (server, flow.port),
                         more_stun_servers=tuple(more),
                         turn_server=options.turn,
                         turn_username=self.config.auth_user or self.config.user,
                         turn_password=self.config.password,
                         turn_transport=options.turn_transport,
                         portmap=PORTMAP_PROTOCOLS if options.portmap else (),
                         host_addresses=(local_address_towards(server),), use_ipv6=False)

    async def register(self, *, expires: int = 3600, timeout: float = 10.0,
                       keep_trying: bool = False) -> None:
        """Register and keep refreshing; `keep_trying`: see Registration.register.

        With several servers, at each of them at once, each refreshed on its own: this
        returns as soon as one accepted us (the others go on in the background, a failing
        one retried every MIN_RETRY s); it fails only when every one failed. A server that
        has not answered by then comes last for new requests until it does."""
        assert self.ua is not None, "listen() first"
        servers = self.ua.servers
        self.registrations = [self._registration(server, expires, timeout)
                              for server in servers]
        self.registration = self.registrations[0]
        await register_everywhere(self.ua, self.registrations, keep_trying=keep_trying,
                                  tasks=self._registering)

    def _registration(self, server: str, expires: int, timeout: float) -> Registration:
        assert self.ua is not None
        reliable = self.config.transport.upper() in RELIABLE
        return Registration(self.ua, expires=expires, timeout=timeout,
                            server=server if server != self.config.domain else None,
                            connect=(lambda s=server: self.connect(s)) if reliable else None)

    # -- servers found by DNS SRV (RFC 3263): looked up again when their TTL runs out ------
    async def _follow_srv(self) -> None:
        assert self.ua is not None
        wait = self.ua.servers_ttl or 0.0
        while True:
            await asyncio.sleep(max(wait, SRV_RECHECK_MIN))
            before = self.ua.servers
            try:
                after = await self.ua.find_servers()
            except OSError as exc:
                log.warning("looking up our SIP servers again: %s; keeping %s", exc,
                            ", ".join(before))
                wait = SRV_RETRY
                continue
            wait = self.ua.servers_ttl or 0.0
            # (the order alone may change at every look: targets of one priority are
            # shuffled by weight, RFC 2782; the UA takes it, the registrations stay)
            if set(after) != set(before):
                await self._servers_changed(before, after)

    async def _servers_changed(self, before: list[str], after: list[str]) -> None:
        """DNS lists other servers now: register at the new ones, leave the removed ones
        (Expires 0, not waited for long: they may be gone), STUN at the new set."""
        assert self.ua is not None
        added = [s for s in after if s not in before]
        removed = [s for s in before if s not in after]
        changes = [f"added {', '.join(added)}" if added else "",
                   f"removed {', '.join(removed)}" if removed else ""]
        log.info("our SIP servers changed in DNS: %s", "; ".join(c for c in changes if c))
        self._server_flow = None
        if self.ice_config is not None:
            try:
                self.ice_config = await self._ice_config()
            except AgentError as exc:
                log.warning("%s", exc)
        if not self.registrations:
            return                    # not registering (a `sipmesh call --no-register`)
        first = self.registrations[0]
        kept = {r.server: r for r in self.registrations if r.server in after}
        leaving = [r for r in self.registrations if r.server not in after]
        made = {s: self._registration(s, first.expires, first.timeout)
                for s in after if s not in kept}
        self.registrations = [kept.get(s) or made[s] for s in after]
        self.registration = self.registrations[0]
        for registration in made.values():
            register_in_background(registration, self._registering)
        for registration in leaving:
            task = asyncio.ensure_future(self._leave(registration))
            self._registering.add(task)
            task.add_done_callback(self._registering.discard)

    async def _leave(self, registration: Registration) -> None:
        """A server DNS no longer lists: our binding there removed (if it answers), no
        more keep-alives to it either way."""
        assert self.ua is not None
        try:
            await registration.unregister()
        finally:
            self.ua.forget_server(registration.server)

    # -- moving (agent/mobility.py) -------------------------------------------------------
    async def _where(self) -> Snapshot:
        """Our address towards the SIP server now (asking the kernel, not the cache)."""
        forget_routes()
        if self._server_flow is None:
            try:
                server = self.ua.servers[0] if self.ua is not None else self.config.domain
                self._server_flow = await resolve_uri(parse_sip_uri(f"sip:{server}"))
            except OSError:
                return Snapshot("")
        return Snapshot(local_address_towards(self._server_flow.host))

    async def _seen_as(self) -> tuple[str, int] | None:
        """The address the SIP server sees us as, from the keep-alive's STUN answers
        (sip/transport/layer.py: keep_alive), None when not known."""
        if self.ua is None or self.ua.transport is None or self._server_flow is None:
            return None
        flow = self._server_flow
        for seen_from, address in self.ua.transport.public_address.items():
            if (seen_from.host, seen_from.port) == (flow.host, flow.port):
                return address
        return None

    async def moved(self, move: Move) -> None:
        """Our address changed: advertise the new one, re-register at every server (the
        stale Contact removed), and restart each running session's path (ICE restart in a
        re-INVITE, agent/sessionpath.py: restart_path); then `after_move`."""
        assert self.ua is not None
        stale: Address | None = None
        if move.local_changed and not self.config.advertised_host:
            stale = self.ua.contact()
            stale.uri.host = move.old.local
            if self.config.listen_host not in ("0.0.0.0", "::"):
                log.warning("SIP listens on %s only: bind 0.0.0.0 (--bind) to be reachable "
                            "at a new address", self.config.listen_host)
        if move.local_changed and self.ua.transport is not None:
            dropped = self.ua.transport.drop_connections_from(move.old.local)
            if dropped:
                log.info("closed %d connections from our old address", dropped)
        if not self.advertise:
            self.local_ip = move.new.local
        if self.ice_config is not None:
            self.ice_config = await self._ice_config()
        await asyncio.gather(*(r.move(stale) for r in self.registrations))
        sessions = list(self.sessions.values())
        if sessions:
            log.info("restarting the paths of %d sessions", len(sessions))
        await asyncio.gather(*(s.restart_path() for s in sessions), return_exceptions=True)
        if self.after_move is not None:
            await self.after_move(move)

    async def connect(self, server: str | None = None) -> None:
        """Over TCP or TLS: open the connection to the SIP server now, unless it is open,
        so that a refused connection or certificate is reported as such (a request would
        only see 503) and our Contact can name the connection (agent/link.py)."""
        assert self.ua is not None and self.ua.transport is not None, "listen() first"
        transport = self.config.transport.upper()
        if transport not in RELIABLE:
            return
        assert self.ua.transactions is not None
        server = server or self.config.domain
        flow = await server_flow(self.ua.transactions.resolver, server, transport)
        name = tls_name(server, self.tls_server_name)
        if transport == "TLS" and name is not None:
            self.ua.transport.expect_tls_name(flow.host, flow.port, name)
        try:
            await self.ua.transport.connect(flow)
        except OSError as exc:
            raise connection_error(exc, server, flow, name) from None

    def request_stop(self) -> None:
        """End the running sessions; run()s waiting on `stopping` return (signal handlers)."""
        if self.stopping.is_set():
            log.debug("already stopping")
            return
        log.info("stopping: ending %d sessions", len(self.sessions))
        self.stopping.set()

    async def _on_invite(self, incoming: IncomingCall) -> None:
        if self.stopping.is_set():
            incoming.reject(480, "Shutting Down")
            return
        if asks_for_probe(incoming.sdp):
            await self._answer_probe(incoming)
            return
        await self.on_invite(incoming)

    async def _answer_probe(self, incoming: IncomingCall) -> None:
        """A ping: a session without a program, answered by us whatever the agent serves."""
        from sipmesh.agent.session import Session   # (session.py imports this module)

        if self.allow_probe is not None and not self.allow_probe(incoming.caller.uri):
            log.info("[%s] ping from %s refused: not allowed (403)", incoming.call_id,
                     incoming.caller.uri)
            incoming.reject(403, "Forbidden")
            return
        if len(self.probes) >= MAX_PROBES:
            log.info("[%s] %d pings running: 486 to %s", incoming.call_id, MAX_PROBES,
                     incoming.caller.uri)
            incoming.reject(486, "Busy Here")
            return

        def choose(incoming: IncomingCall, attributes: dict[str, str]
                   ) -> tuple[ProbeProfile, SessionInfo]:
            return ProbeProfile(), SessionInfo(role="server", call_id=incoming.call_id,
                                               local_user=self.config.user,
                                               peer=str(incoming.caller.uri),
                                               local_ip=self.local_ip)

        await Session(self).answer(incoming, choose)

    @contextmanager
    def running(self, session: Session) -> Iterator[None]:
        """`session` is in `sessions` (a ping in `probes`), and close() waits for it, inside
        this block."""
        table = self.probes if session.profile is not None and not session.profile.program \
            else self.sessions
        table[session.call_id] = session
        self._idle.clear()
        try:
            yield
        finally:
            table.pop(session.call_id, None)
            if not self.sessions and not self.probes:
                self._idle.set()

    async def close(self, timeout: float) -> None:
        """Stop; wait up to `timeout` s for the sessions to end; unregister; stop the UA."""
        self.stopping.set()
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except asyncio.TimeoutError:
            log.warning("%d sessions did not end in time", len(self.sessions))
        for task in list(self._registering):
            task.cancel()
        if self._following_srv is not None:
            self._following_srv.cancel()
        if self.mobility is not None:
            await self.mobility.close()
        await asyncio.gather(*(r.unregister() for r in self.registrations),
                             return_exceptions=True)
        if self.ua is not None:
            await self.ua.stop()
