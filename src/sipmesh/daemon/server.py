"""The super-daemon: one registered identity answering many sessions of many services.

For each INVITE, in its own task (the UA core spawns one per INVITE):

    415 unless the body is SDP   -> parse a= lines (488 if malformed)
    403 if no service allows the caller
    488 + Warning if a=service names no service (or none is named and there is no
        default_service)
    403 if this service does not allow the caller
    486 if the service (or the daemon) is at max_sessions
    488 + Warning if the offer's values do not validate against the declared types
    180 -> allocate (486 if a pool is exhausted) -> start the child -> 200 OK with
        the answer's a= lines -> supervise -> BYE or stop -> release everything

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sipmesh.agent.attributes import build_sdp, read_attributes
from sipmesh.agent.errors import AgentError, Exit
from sipmesh.agent.params import IPAddress, ParamError, validate
from sipmesh.agent.registration import Registration
from sipmesh.agent.session import Session, warning_value
from sipmesh.agent.supervisor import Child
from sipmesh.daemon.allocators import AllocationError, Lease, Ledger
from sipmesh.daemon.config import AgentSection, ConfigError, DaemonConfig, load_config
from sipmesh.daemon.control import ControlServer, default_socket
from sipmesh.daemon.service import SERVICE, DaemonSessionInfo, Service
from sipmesh.sip.message import Response
from sipmesh.sip.sdp import SDPError
from sipmesh.sip.transport.base import local_address_towards, resolve, uri_target
from sipmesh.sip.uri import parse_sip_uri
from sipmesh.sip.ua import CallFailed, IncomingCall, UAConfig, UserAgent

log = logging.getLogger("sipmesh.daemon")

SHUTDOWN_EXTRA = 10.0  # seconds beyond the grace period to wait for sessions at exit


def ua_config(agent: AgentSection, password: str | None = None) -> UAConfig:
    """The SIP identity of `agent` ([agent] of the configuration)."""
    if not agent.server or not agent.user:
        raise ConfigError("[agent] needs server and user")
    return UAConfig(user=agent.user, domain=agent.server,
                    password=password if password is not None else agent.password,
                    auth_user=agent.auth_user, display_name=agent.display_name,
                    transport=agent.transport.upper(), listen_host=agent.bind,
                    listen_port=agent.sip_port)


async def advertised_address(agent: AgentSection, domain: str) -> str:
    """Our a=IP4/IP6: [agent] advertise, else our address towards the SIP server."""
    if agent.advertise:
        return IPAddress().check(agent.advertise)
    _, host, port = uri_target(parse_sip_uri(f"sip:{domain}"))
    try:
        server = await resolve(host, port)
    except OSError as exc:
        raise AgentError(f"cannot resolve the SIP server {host}: {exc}", Exit.UNREACHABLE) from None
    return local_address_towards(server)


class TrackedRegistration(Registration):
    """Registration that remembers its state for `sipmesh status`."""

    def __init__(self, ua: UserAgent, **kwargs: Any) -> None:
        super().__init__(ua, **kwargs)
        self.state = "unregistered"
        self.since = time.time()
        self.error: str | None = None

    def _set(self, state: str, error: str | None = None) -> None:
        if state != self.state:
            self.since = time.time()
        self.state, self.error = state, error

    async def _register(self, expires: int, timeout: float | None = None) -> Response:
        try:
            response = await super()._register(expires, timeout)
        except AgentError as exc:
            self._set("failing", str(exc))
            raise
        if expires == 0:
            self._set("unregistered")
        elif 200 <= response.status < 300:
            self._set("registered")
        else:
            self._set("failing", f"{response.status} {response.reason}")
        return response


@dataclass(slots=True)
class SessionRecord:
    call_id: str
    peer: str
    service: str
    kind: str
    generation: int
    state: str = "starting"  # starting -> established -> ending
    since: float = field(default_factory=time.time)
    pid: int | None = None
    lease: Lease | None = None
    attributes: dict[str, str] | None = None  # what we answered

    def to_json(self) -> dict[str, Any]:
        allocated = self.lease.describe() if self.lease is not None else {"ports": [],
                                                                          "addresses": []}
        return {"call_id": self.call_id, "peer": self.peer, "service": self.service,
                "kind": self.kind, "state": self.state, "since": self.since, "pid": self.pid,
                "generation": self.generation, "allocated": allocated}


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
        self.sessions: dict[str, SessionRecord] = {}
        self.active: Counter[str] = Counter()
        self.counters: Counter[str] = Counter()  # answered, refused_403, ...
        self.control_path = control_socket or config.agent.control_socket or \
            default_socket(self.ua_config.user)
        self.control = ControlServer(self.control_path, self._control) if control else None
        self.ua: UserAgent | None = None
        self.registration: TrackedRegistration | None = None
        self.local_ip = ""
        self.started = time.time()
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    # -- lifecycle ---------------------------------------------------------------------
    def request_stop(self) -> None:
        if not self._stop.is_set():
            log.info("stopping: ending %d sessions", len(self.sessions))
            self._stop.set()

    async def run(self, register: bool = True) -> int:
        self.ua = UserAgent(self.ua_config, on_invite=self._on_invite)
        try:
            await self.ua.start()
        except OSError as exc:
            raise AgentError(f"cannot listen for SIP on {self.ua_config.listen_host}:"
                             f"{self.ua_config.listen_port}: {exc.strerror or exc}",
                             Exit.UNREACHABLE) from None
        try:
            self.local_ip = await advertised_address(self.config.agent, self.ua_config.domain)
            if self.control is not None:
                try:
                    await self.control.start()
                except OSError as exc:
                    raise AgentError(f"control socket {self.control_path}: {exc}") from None
            if register:
                self.registration = TrackedRegistration(
                    self.ua, expires=self.config.agent.expires,
                    timeout=self.config.agent.register_timeout)
                try:
                    await self.registration.register()
                except AgentError as exc:
                    if exc.code != Exit.UNREACHABLE:
                        raise  # refused credentials: a configuration error, not a glitch
                    # a daemon outlives a SIP server that is down or not reachable yet
                    log.warning("%s: trying again every %g s", exc, self.registration.min_retry)
                    self.registration.interval = self.registration.min_retry
                self.registration.start_refresh()
            log.info("ready as %s (contact %s): %s", self.ua.aor, self.ua.contact().uri,
                     ", ".join(s.profile.describe() for s in self.config.services.values()))
            self.ready.set()
            await self._stop.wait()
            return Exit.OK
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        self._stop.set()
        try:
            await asyncio.wait_for(self._idle.wait(), self.config.agent.grace + SHUTDOWN_EXTRA)
        except asyncio.TimeoutError:
            log.warning("%d sessions did not end in time", len(self.sessions))
        if self.registration is not None:
            await self.registration.unregister()
        if self.control is not None:
            await self.control.stop()
        if self.ua is not None:
            await self.ua.stop()

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

    # -- answering -----------------------------------------------------------------------
    def _refuse(self, incoming: IncomingCall, status: int, text: str, *,
                warning: bool = True) -> None:
        log.warning("[%s] refusing the INVITE from %s: %d %s", incoming.call_id,
                    incoming.caller.uri, status, text)
        self.counters[f"refused_{status}"] += 1
        headers = [("Warning", warning_value(text, self.local_ip or "sipmesh"))] if warning else []
        incoming.reject(status, headers=headers)

    def _select(self, incoming: IncomingCall) -> tuple[Service, dict[str, str]] | None:
        """The service and validated offer of an INVITE, or None once it was refused."""
        content_type = (incoming.request.content_type or "").split(";")[0].strip().lower()
        if incoming.sdp.strip() and content_type not in ("application/sdp", ""):
            self.counters["refused_415"] += 1
            incoming.reject(415, headers=[("Accept", "application/sdp")])
            return None
        try:
            attributes = read_attributes(incoming.sdp)
        except SDPError as exc:
            self._refuse(incoming, 488, f"malformed SDP: {exc}")
            return None
        except ParamError as exc:
            self._refuse(incoming, 488, f"bad parameter {exc}")
            return None
        services = self.config.services
        caller = incoming.caller.uri
        if not any(s.allows(caller) for s in services.values()):
            self._refuse(incoming, 403, "caller not allowed", warning=False)
            return None
        raw = attributes.get("service") or attributes.get("APP") or \
            self.config.agent.default_service
        if raw is None:
            self._refuse(incoming, 488, "no service requested (a=service:NAME)")
            return None
        try:
            name = SERVICE.parse(raw)
        except ParamError as exc:
            self._refuse(incoming, 488, f"bad parameter {exc}")
            return None
        service = services.get(name)
        if service is None:
            self._refuse(incoming, 488, f"unknown service {name!r}")
            return None
        if not service.allows(caller):
            self._refuse(incoming, 403, f"caller not allowed to use {name!r}", warning=False)
            return None
        if self.active[name] >= service.max_sessions:
            self._refuse(incoming, 486, f"service {name!r} is at max_sessions "
                                        f"({service.max_sessions})")
            return None
        if len(self.sessions) >= self.config.agent.max_sessions:
            self._refuse(incoming, 486, f"the daemon is at max_sessions "
                                        f"({self.config.agent.max_sessions})")
            return None
        try:
            offer = validate(service.profile.offer_params, attributes)
        except ParamError as exc:
            self._refuse(incoming, 488, f"bad parameter {exc}")
            return None
        return service, offer

    async def _on_invite(self, incoming: IncomingCall) -> None:
        if self._stop.is_set():
            incoming.reject(480, "Shutting Down")
            return
        if incoming.call_id in self.sessions:
            incoming.reject(482, "Loop Detected")  # the same INVITE through two paths
            return
        selected = self._select(incoming)
        if selected is None:
            return
        service, offer = selected
        record = SessionRecord(call_id=incoming.call_id, peer=str(incoming.caller.uri),
                               service=service.name, kind=service.kind,
                               generation=self.generation,
                               lease=Lease(self.ledger, service.profile.allocators))
        self.sessions[record.call_id] = record
        self.active[service.name] += 1
        self._idle.clear()
        try:
            await self._answer(incoming, service, offer, record)
        finally:
            assert record.lease is not None
            record.lease.release()
            self.sessions.pop(record.call_id, None)
            self.active[service.name] -= 1
            if self.active[service.name] <= 0:
                del self.active[service.name]
            if not self.sessions:
                self._idle.set()

    async def _answer(self, incoming: IncomingCall, service: Service, offer: dict[str, str],
                      record: SessionRecord) -> None:
        call_id = incoming.call_id
        log.info("[%s] INVITE from %s for %s", call_id, record.peer, service.name)
        incoming.ringing()
        info = DaemonSessionInfo(role="server", call_id=call_id,
                                 local_user=self.ua_config.user, peer=record.peer,
                                 local_ip=self.local_ip, lease=record.lease, service=service.name)
        profile = service.profile
        try:
            plan = await profile.answer(info, offer)
        except AllocationError as exc:
            self._refuse(incoming, 486, str(exc))
            return
        except (AgentError, ParamError, ValueError, OSError) as exc:
            self._refuse(incoming, 500, f"cannot serve {service.name}: {exc}")
            return
        try:
            validate(profile.answer_params, plan.attributes)  # our own values, same rules
            sdp = build_sdp(username=self.ua_config.user, address=self.local_ip,
                            media=profile.media, proto=profile.proto, port=plan.port,
                            attributes=plan.attributes)
        except (ParamError, ValueError) as exc:
            if plan.child.cleanup is not None:
                plan.child.cleanup()
            self._refuse(incoming, 500, f"cannot serve {service.name}: {exc}")
            return
        try:
            child = await Child.start(plan.child, name=f"{service.name} [{call_id}]",
                                      grace=self.config.agent.grace)
        except AgentError as exc:
            self._refuse(incoming, 500, str(exc))
            return
        record.pid = child.pid
        record.attributes = plan.attributes
        try:
            await self._run_session(incoming, service, plan, child, sdp, record)
        finally:
            record.state = "ending"
            if not child.finished.done():  # refused, failed or cancelled half-way
                await child.stop(self.config.agent.grace)

    async def _run_session(self, incoming: IncomingCall, service: Service, plan: Any,
                           child: Child, sdp: bytes, record: SessionRecord) -> None:
        call_id = incoming.call_id
        try:
            await service.profile.wait_ready(plan, child)
        except AgentError as exc:
            self._refuse(incoming, 500, f"cannot serve {service.name}: {exc}")
            return
        try:
            call = await incoming.accept(sdp)
        except CallFailed as exc:
            log.warning("[%s] the session was not established (%s): stopping %s", call_id, exc,
                        service.name)
            return
        record.state = "established"
        record.since = time.time()
        self.counters["established"] += 1
        log.info("[%s] %s session established with %s (pid %d)", call_id, service.name,
                 record.peer, child.pid)
        reason = await Session(call, child, self.config.agent.grace).supervise(self._stop)
        log.info("[%s] %s session ended: %s", call_id, service.name, reason)

    # -- status ------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        registrations = []
        if self.ua is not None:
            entry: dict[str, Any] = {"aor": str(self.ua.aor), "server": self.ua_config.domain,
                                     "contact": str(self.ua.contact().uri)}
            reg = self.registration
            if reg is not None:
                entry.update(state=reg.state, since=reg.since, expires=reg.granted,
                             error=reg.error)
            else:
                entry.update(state="not registering", since=self.started, expires=None,
                             error=None)
            registrations.append(entry)
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
            "sessions": [r.to_json() for r in self.sessions.values()],
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
        return {"ok": False, "error": f"unknown command {command!r} (status, reload)"}
