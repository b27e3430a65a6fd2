"""The super-daemon: one registered identity answering many sessions of many services.

It runs the agent's own lifecycle (agent/endpoint.py) and answering path
(agent/session.py:Session.answer); what it adds is `_choose`, the choice of a
service for each INVITE, in its own task (the UA core spawns one per INVITE):

    415 unless the body is SDP   -> parse a= lines (488 if malformed)      [Session]
    403 if no service allows the caller                                    [_choose]
    488 + Warning if a=service names no service (or none is named and there is no
        default_service)
    403 if this service does not allow the caller
    486 if the service (or the daemon) is at max_sessions
    488 + Warning if the offer's values do not validate against the declared types
    180 -> allocate (486 if a pool is exhausted) -> start the child -> 200 OK with
        the answer's a= lines -> supervise -> BYE or stop              [Session]
    release everything                                             [_on_invite]

A session holds the configuration generation it started with: a reload (SIGHUP)
changes what new INVITEs get, never a running session. Nothing here is shared
between sessions except the ledger of allocated resources and the counters.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from sipmesh.agent.endpoint import Endpoint
from sipmesh.agent.errors import AgentError, Exit
from sipmesh.agent.certs import default_state_dir
from sipmesh.agent.link import client_tls, server_instance
from sipmesh.agent.params import ParamError
from sipmesh.agent.session import Refusal, Session
from sipmesh.daemon.allocators import Lease, Ledger
from sipmesh.daemon.config import AgentSection, ConfigError, DaemonConfig, load_config
from sipmesh.daemon.control import ControlServer, default_socket
from sipmesh.daemon.service import SERVICE, DaemonSessionInfo, ServiceProfile
from sipmesh.sip.ua import IncomingCall, UAConfig, UserAgent

log = logging.getLogger("sipmesh.daemon")

SHUTDOWN_EXTRA = 10.0  # seconds beyond the grace period to wait for sessions at exit


def ua_config(agent: AgentSection, password: str | None = None) -> UAConfig:
    """The SIP identity of `agent` ([agent] of the configuration)."""
    if not agent.server or not agent.user:
        raise ConfigError("[agent] needs server and user")
    return UAConfig(user=agent.user, domain=agent.server,
                    password=password if password is not None else agent.password,
                    auth_user=agent.auth_user, display_name=agent.display_name,
                    transport=agent.transport.upper(),
                    tls_client_context=client_tls(agent.transport, agent.tls),
                    listen_host=agent.bind, listen_port=agent.sip_port, peer_keepalive=agent.keepalive,
                    servers=agent.servers, instance=server_instance(
                        (agent.server, *agent.servers), agent.state_dir or default_state_dir()))


def session_json(session: Session) -> dict[str, Any]:
    """A running session as `sipmesh status` shows it."""
    info = session.info
    assert isinstance(info, DaemonSessionInfo) and info.lease is not None
    return {"call_id": session.call_id, "peer": session.peer, "service": info.service,
            "kind": info.kind, "state": session.state, "since": session.since,
            "pid": session.child.pid if session.child is not None else None,
            "generation": info.generation, "allocated": info.lease.describe(),
            "path": session_path(session)}


def session_path(session: Session) -> dict[str, Any] | None:
    """The session's network path for `sipmesh status`: direct, relayed or none, the
    selected pair with candidate types, the RTT and the reason in words (None: no ICE)."""
    if session.handover is not None:
        return session.handover.describe()
    if session.path is not None:   # none, or chosen but not yet handed over
        return session.path.describe()
    if session.ice is not None:
        return {"kind": "checking", "reason": "ICE checks in progress"}
    return None


class Daemon:
    """Run with `await run()`; `request_stop()` ends every session, unregisters, returns."""

    def __init__(self, config: DaemonConfig, *, ua: UAConfig | None = None,
                 loader: Callable[[], DaemonConfig] | None = None,
                 control_socket: Path | None = None, control: bool = True) -> None:
        self.config = config
        self.generation = 1
        self.ua_config = ua or ua_config(config.agent)
        self._loader = loader
        self.ledger = Ledger()
        self.active: Counter[str] = Counter()  # running sessions per service
        self.counters: Counter[str] = Counter()  # established, refused_403, ...
        self.control_path = control_socket or config.agent.control_socket or \
            default_socket(self.ua_config.user)
        self.control = ControlServer(self.control_path, self._control) if control else None
        self.endpoint = Endpoint(self.ua_config, on_invite=self._on_invite,
                                 advertise=config.agent.advertise,
                                 tls_server_name=config.agent.tls.server_name,
                                 ice=config.agent.ice, allow_probe=self._allows)
        self.started = time.time()
        self.ready = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------------------
    @property
    def ua(self) -> UserAgent | None:
        return self.endpoint.ua

    @property
    def local_ip(self) -> str:
        return self.endpoint.local_ip

    @property
    def sessions(self) -> dict[str, Session]:
        """The running sessions by Call-ID (each with a DaemonSessionInfo)."""
        return self.endpoint.sessions

    def request_stop(self) -> None:
        self.endpoint.request_stop()

    async def run(self, register: bool = True) -> int:
        endpoint = self.endpoint
        try:
            await endpoint.listen()
            if self.control is not None:
                try:
                    await self.control.start()
                except OSError as exc:
                    raise AgentError(f"control socket {self.control_path}: {exc}") from None
            if register:  # a daemon outlives a SIP server that is down or not reachable yet
                await endpoint.register(expires=self.config.agent.expires,
                                        timeout=self.config.agent.register_timeout,
                                        keep_trying=True)
            assert endpoint.ua is not None
            log.info("ready as %s (contact %s): %s", endpoint.ua.aor, endpoint.ua.contact().uri,
                     ", ".join(s.profile.describe() for s in self.config.services.values()))
            self.ready.set()
            await endpoint.stopping.wait()
            return Exit.OK
        finally:
            await endpoint.close(self.config.agent.grace + SHUTDOWN_EXTRA)
            if self.control is not None:
                await self.control.stop()

    # -- reload ------------------------------------------------------------------------
    def reload(self) -> tuple[bool, str]:
        """Load the configuration again; new sessions get it, running ones keep theirs.
        A configuration that does not load is refused and the current one kept."""
        try:
            if self._loader is not None:
                new = self._loader()
            elif self.config.path is not None:
                new = load_config(self.config.path)
            else:
                raise ConfigError("no configuration file to reload from")
        except AgentError as exc:
            message = (f"reload refused, keeping the configuration of generation "
                       f"{self.generation}: {exc}")
            log.error("%s", message)
            return False, message
        except Exception as exc:  # a kind's bug must not take the daemon down
            log.exception("reload failed")
            return False, f"reload failed, keeping the current configuration: {exc}"
        if new.agent != self.config.agent:
            log.warning("reload: [agent] changes take effect at the next restart only")
            new.agent = self.config.agent
        self.config = new
        self.generation += 1
        message = (f"configuration reloaded (generation {self.generation}): services "
                   f"{', '.join(new.services)}; {len(self.sessions)} running sessions keep theirs")
        log.info("%s", message)
        return True, message

    # -- answering: the service, the caller, capacity; Session does the rest ------------
    async def _on_invite(self, incoming: IncomingCall) -> None:
        if incoming.call_id in self.sessions:
            incoming.reject(482, "Loop Detected")  # the same INVITE through two paths
            return
        session = Session(self.endpoint, grace=self.config.agent.grace, on_event=self._count)
        try:
            await session.answer(incoming, self._choose)
        finally:
            if isinstance(session.info, DaemonSessionInfo):  # chosen: give back what it held
                self._release(session.info)

    def _choose(self, incoming: IncomingCall, attributes: dict[str, str]
                ) -> tuple[ServiceProfile, DaemonSessionInfo]:
        """The service an INVITE asks for, if this caller may use it and it has room."""
        services = self.config.services
        caller = incoming.caller.uri
        if not self._allows(caller):
            raise Refusal(403, "caller not allowed", warning=False)
        raw = attributes.get("service") or attributes.get("APP") or \
            self.config.agent.default_service
        if raw is None:
            raise Refusal(488, "no service requested (a=service:NAME)")
        try:
            name = SERVICE.parse(raw)
        except ParamError as exc:
            raise Refusal(488, f"bad parameter {exc}") from None
        service = services.get(name)
        if service is None:
            raise Refusal(488, f"unknown service {name!r}")
        if not service.allows(caller):
            raise Refusal(403, f"caller not allowed to use {name!r}", warning=False)
        if self.active[name] >= service.max_sessions:
            raise Refusal(486, f"service {name!r} is at max_sessions ({service.max_sessions})")
        if len(self.sessions) >= self.config.agent.max_sessions:
            raise Refusal(486, f"the daemon is at max_sessions "
                               f"({self.config.agent.max_sessions})")
        self.active[name] += 1
        info = DaemonSessionInfo(role="server", call_id=incoming.call_id,
                                 local_user=self.ua_config.user, peer=str(caller),
                                 local_ip=self.local_ip, service=name, kind=service.kind,
                                 generation=self.generation,
                                 lease=Lease(self.ledger, service.profile.allocators))
        return service.profile, info

    def _allows(self, caller: object) -> bool:
        """May `caller` ping us (agent/probe.py)? Only if some service allows it."""
        return any(s.allows(caller) for s in self.config.services.values())

    def _release(self, info: DaemonSessionInfo) -> None:
        assert info.lease is not None
        info.lease.release()
        self.active[info.service] -= 1
        if self.active[info.service] <= 0:
            del self.active[info.service]

    def _count(self, event: str, data: dict[str, Any]) -> None:
        if event == "refused":
            self.counters[f"refused_{data['status']}"] += 1
        elif event == "established":
            self.counters["established"] += 1

    # -- status ------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        registrations = []
        if self.ua is not None:
            common = {"aor": str(self.ua.aor), "contact": str(self.ua.contact().uri)}
            for reg in self.endpoint.registrations:  # one per server
                registrations.append({**common, **reg.describe(),
                                      "name": self.ua.server_names.get(reg.server)})
            if not registrations:
                registrations.append({**common, "server": self.ua_config.domain, "name": None,
                                      "state": "not registering", "since": self.started,
                                      "expires": None, "error": None, "last_success": None,
                                      "next_try": None})
        return {
            "ok": True,
            "daemon": {"pid": os.getpid(), "config": str(self.config.path or ""),
                       "generation": self.generation, "started": self.started,
                       "local_ip": self.local_ip, "max_sessions": self.config.agent.max_sessions,
                       "counters": dict(self.counters)},
            "services": [{"name": s.name, "kind": s.kind, "max_sessions": s.max_sessions,
                          "active": self.active.get(s.name, 0), "allow": list(s.allow)}
                         for s in self.config.services.values()],
            "registrations": registrations,
            "sessions": [session_json(s) for s in self.sessions.values()],
            "allocated": {"ports": sorted(f"{port}/{proto}" for proto, port in self.ledger.ports),
                          "addresses": sorted(self.ledger.addresses)},
        }

    async def _control(self, request: dict[str, Any]) -> dict[str, Any]:
        command = request.get("command")
        if command == "status":
            return self.status()
        if command == "reload":
            ok, message = self.reload()
            return {"ok": ok, "message": message}
        if command == "handover":
            return await self._handover(str(request.get("session") or ""), str(request.get("to") or ""))
        return {"ok": False, "error": f"unknown command {command!r} (status, reload, handover)"}

    async def _handover(self, which: str, to: str) -> dict[str, Any]:
        """Hand the session whose Call-ID (or peer) is `which` over to the agent `to`."""
        if not which or not to:
            return {"ok": False, "error": "handover needs a session (Call-ID or peer) and a target"}
        found = [s for s in self.sessions.values()
                 if which in (s.call_id, s.peer) or s.peer.startswith(f"sip:{which}@")]
        if len(found) != 1:
            return {"ok": False, "error": f"{len(found)} sessions match {which!r}"}
        status, reason = await found[0].hand_over(to)
        return {"ok": status == 202, "status": status, "reason": reason,
                "message": f"{found[0].peer}: {status} {reason}"}
