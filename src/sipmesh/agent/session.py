"""The agent: one SIP identity that answers (serve) or places (call) application sessions.

This is the successor of the prototype ``sip_app``:

* serve mode registers, then waits for INVITEs. One session at a time: an INVITE
  that arrives meanwhile gets 486 Busy Here. For each INVITE: validate the
  offer's ``a=`` lines against the profile's declared types (488 with a Warning
  header and nothing started if they do not validate), 180 Ringing, start the
  program, 200 OK with the answer's ``a=`` lines, supervise.
* call mode registers, INVITEs the target by name through the SIP server,
  validates the answer's ``a=`` lines (a bad answer is ACKed and ended with
  BYE, nothing started), then starts its program and supervises.
* Supervision: the program exits -> BYE at once; BYE received -> the program is
  stopped (SIGTERM to its group, SIGKILL after the grace period); a stop request
  (SIGINT, SIGTERM, SIGHUP in the CLI) -> BYE, stop the program, unregister.
* The exit status: a program that ended its session by failing (non-zero status,
  or a signal we did not send) makes call mode (and serve mode with ``once``)
  fail with Exit.APPLICATION; a program we stopped (BYE, stop request) never does.

Only ``a=`` lines are ever read from SDP; ``m=``, ``c=`` and ``o=`` are for proxies.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable

from sipmesh.agent.attributes import build_sdp, read_attributes
from sipmesh.agent.errors import (AgentError, Exit, describe_exit, describe_status,
                                  exit_for_status)
from sipmesh.agent.params import IPAddress, ParamError, validate
from sipmesh.agent.profile import AppProfile, SessionInfo
from sipmesh.agent.registration import Registration
from sipmesh.agent.supervisor import Child
from sipmesh.sip.headers import quote_string
from sipmesh.sip.sdp import SDPError
from sipmesh.sip.transport.base import local_address_towards, resolve, uri_target
from sipmesh.sip.uri import parse_sip_uri
from sipmesh.sip.ua import Call, CallFailed, IncomingCall, UAConfig, UserAgent

log = logging.getLogger("sipmesh.agent")

EventHook = Callable[[str, dict], None]


@dataclass
class AgentConfig:
    ua: UAConfig
    mode: str = "serve"  # or "call"
    target: str | None = None  # call mode: user name, user@domain or SIP URI
    advertise: str | None = None  # our a=IP4/IP6; default: local address towards the server
    register: bool = True
    expires: int = 3600
    register_timeout: float = 10.0
    invite_timeout: float = 30.0
    grace: float = 5.0  # SIGTERM -> SIGKILL
    once: bool = False  # serve mode: stop after the first session


def warning_value(text: str, agent: str) -> str:
    """A Warning header value (RFC 3261 §20.43): code 399, our host, the text quoted."""
    clean = "".join(c if c.isprintable() and c.isascii() else "?" for c in text)[:200]
    return f"399 {agent} {quote_string(clean)}"


class Session:
    """An established session and its program, until one of them ends it."""

    def __init__(self, call: Call, child: Child, grace: float) -> None:
        self.call = call
        self.child = child
        self.grace = grace
        self.reason: str | None = None
        # The program's exit status when the program itself ended the session (negative:
        # killed by that signal); None when the peer or a stop request ended it and we
        # stopped the program (whatever status that gave is ours, not the program's).
        self.app_status: int | None = None

    @property
    def failed(self) -> bool:
        """Did our program end the session by failing (non-zero status or a signal)?"""
        return self.app_status not in (None, 0)

    async def supervise(self, stop: asyncio.Event) -> str:
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({self.child.exited, self.call.ended, stopping},
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if self.child.exited.done():
            self.app_status = status = self.child.exited.result()
            self.reason = f"the application {describe_exit(status)}"
            log.info("[%s] %s: sending BYE", self.call.call_id, self.reason)
            await self.call.bye()
            await self.child.stop(self.grace)
        elif self.call.ended.done():
            self.reason = f"the peer ended the session ({self.call.ended.result()})"
            log.info("[%s] %s: stopping the application", self.call.call_id, self.reason)
            await self.child.stop(self.grace)
        else:
            self.reason = "shutting down"
            log.info("[%s] shutting down: BYE and stopping the application", self.call.call_id)
            await asyncio.gather(self.call.bye(), self.child.stop(self.grace))
        return self.reason


class Agent:
    """Runs one agent until it is done (call mode) or asked to stop (serve mode)."""

    def __init__(self, config: AgentConfig, profile: AppProfile, *,
                 on_event: EventHook | None = None) -> None:
        if config.mode not in ("serve", "call"):
            raise ValueError(f"mode must be 'serve' or 'call', not {config.mode!r}")
        if config.mode == "call" and not config.target:
            raise ValueError("call mode needs a target")
        self.config = config
        self.profile = profile
        self.on_event = on_event
        self.ua: UserAgent | None = None
        self.registration: Registration | None = None
        self.local_ip = ""
        self.sessions = 0
        self.session: Session | None = None
        self.app_failure: str | None = None  # how the last session's program failed
        self._stop = asyncio.Event()  # (asyncio events bind to a loop only when awaited)
        self._idle = asyncio.Event()
        self._idle.set()
        self._busy = False
        self.ready = asyncio.Event()  # set once registered (or, without registering, started)

    # -- control -------------------------------------------------------------------------
    def request_stop(self) -> None:
        """End the current session, unregister and return from run() (signal handlers)."""
        if self._stop.is_set():
            log.debug("already stopping")
            return
        log.info("stop requested")
        self._stop.set()

    def _emit(self, event: str, **data: object) -> None:
        if self.on_event is not None:
            data.setdefault("time", time.monotonic())
            try:
                self.on_event(event, data)
            except Exception:  # an observer must not break a session
                log.exception("event hook failed for %s", event)

    # -- main ----------------------------------------------------------------------------
    async def run(self) -> int:
        """Returns the exit status (0); failures raise AgentError.

        In call mode (and serve mode with ``once``) a session whose program failed
        raises AgentError with Exit.APPLICATION once everything is shut down."""
        self.profile.check()
        self.ua = UserAgent(self.config.ua, on_invite=self._on_invite)
        try:
            await self.ua.start()
        except OSError as exc:
            self.ua = None
            raise AgentError(f"cannot listen for SIP on {self.config.ua.listen_host}:"
                             f"{self.config.ua.listen_port}: {exc.strerror or exc}",
                             Exit.UNREACHABLE) from None
        try:
            self.local_ip = await self._advertised_address()
            if self._stop.is_set():  # a signal while starting
                return Exit.OK
            if self.config.register:
                self.registration = Registration(self.ua, expires=self.config.expires,
                                                 timeout=self.config.register_timeout)
                await self.registration.register()
                self.registration.start_refresh()
            self._emit("ready", contact=str(self.ua.contact().uri))
            self.ready.set()
            if self.config.mode == "serve":
                await self._stop.wait()
            else:
                await self._call()
        finally:
            await self._shutdown()
        if self.app_failure is not None and (self.config.mode == "call" or self.config.once):
            raise AgentError(self.app_failure, Exit.APPLICATION)
        return Exit.OK

    async def _advertised_address(self) -> str:
        if self.config.advertise:
            try:
                return IPAddress().check(self.config.advertise)
            except ValueError as exc:
                raise AgentError(f"--advertise: {exc}", Exit.USAGE) from None
        _, host, port = uri_target(parse_sip_uri(f"sip:{self.config.ua.domain}"))
        try:
            server = await resolve(host, port)
        except OSError as exc:
            raise AgentError(f"cannot resolve the SIP server {host}: {exc}", Exit.UNREACHABLE) \
                from None
        return local_address_towards(server)

    async def _shutdown(self) -> None:
        self._stop.set()
        try:
            await asyncio.wait_for(self._idle.wait(), self.config.grace + 10)
        except asyncio.TimeoutError:
            log.warning("a session did not end in time")
        if self.registration is not None:
            await self.registration.unregister()
        if self.ua is not None:
            await self.ua.stop()

    # -- answering side ----------------------------------------------------------------
    def _refuse(self, incoming: IncomingCall, status: int, text: str) -> None:
        log.warning("[%s] refusing the INVITE from %s: %d %s", incoming.call_id,
                    incoming.caller.uri, status, text)
        agent = self.local_ip or "sipmesh"
        incoming.reject(status, headers=[("Warning", warning_value(text, agent))])
        self._emit("refused", status=status, text=text)

    async def _on_invite(self, incoming: IncomingCall) -> None:
        if self._stop.is_set():
            incoming.reject(480, "Shutting Down")
            return
        if self.config.mode != "serve":
            incoming.reject(486, "Busy Here")
            return
        if self._busy:
            log.info("[%s] busy: 486 to %s", incoming.call_id, incoming.caller.uri)
            incoming.reject(486, "Busy Here")
            self._emit("busy", peer=str(incoming.caller.uri))
            return
        self._busy = True
        self._idle.clear()
        try:
            established = await self._answer(incoming)
        finally:
            self._busy = False
            self._idle.set()
        if established:
            self.sessions += 1
            if self.config.once:
                self.request_stop()

    async def _answer(self, incoming: IncomingCall) -> bool:
        log.info("[%s] INVITE from %s", incoming.call_id, incoming.caller.uri)
        self._emit("invite_received", peer=str(incoming.caller.uri), call_id=incoming.call_id)
        content_type = (incoming.request.content_type or "").split(";")[0].strip().lower()
        if incoming.sdp.strip() and content_type not in ("application/sdp", ""):
            incoming.reject(415, headers=[("Accept", "application/sdp")])
            return False
        try:
            offer = validate(self.profile.offer_params, read_attributes(incoming.sdp))
        except SDPError as exc:
            self._refuse(incoming, 488, f"malformed SDP: {exc}")
            return False
        except ParamError as exc:
            self._refuse(incoming, 488, f"bad parameter {exc}")
            return False
        if offer.get("APP") not in (None, self.profile.name):
            self._refuse(incoming, 488, f"this agent serves {self.profile.name}, not {offer['APP']}")
            return False
        incoming.ringing()
        info = SessionInfo(role="server", call_id=incoming.call_id,
                           local_user=self.config.ua.user, peer=str(incoming.caller.uri),
                           local_ip=self.local_ip)
        try:
            plan = await self.profile.answer(info, offer)
            validate(self.profile.answer_params, plan.attributes)  # our own values, same rules
        except (AgentError, ParamError) as exc:
            self._refuse(incoming, 500, f"cannot serve this session: {exc}")
            return False
        sdp = build_sdp(username=self.config.ua.user, address=self.local_ip,
                        media=self.profile.media, proto=self.profile.proto, port=plan.port,
                        attributes=plan.attributes)
        try:
            child = await Child.start(plan.child, name=self.profile.name, grace=self.config.grace)
        except AgentError as exc:
            self._refuse(incoming, 500, str(exc))
            return False
        self._emit("child_started", role="server", pid=child.pid, argv=plan.child.argv,
                   port=plan.attributes.get("PORT"))
        try:
            call = await incoming.accept(sdp)
        except CallFailed as exc:
            log.warning("[%s] the session was not established (%s): stopping %s",
                        incoming.call_id, exc, self.profile.name)
            await child.stop(self.config.grace)
            return False
        log.info("[%s] session established with %s", call.call_id, call.peer)
        self._emit("established", role="server", call_id=call.call_id, peer=call.peer)
        await self._supervise(Session(call, child, self.config.grace))
        return True

    async def _supervise(self, session: Session) -> None:
        self.session = session
        try:
            reason = await session.supervise(self._stop)
        finally:
            self.session = None
        log.info("[%s] session ended: %s", session.call.call_id, reason)
        if session.failed:
            assert session.app_status is not None
            self.app_failure = (f"the application {describe_exit(session.app_status)} "
                                f"(session {session.call.call_id} with {session.call.peer})")
            log.warning("[%s] %s", session.call.call_id, self.app_failure)
        self._emit("ended", call_id=session.call.call_id, reason=reason,
                   app_status=session.app_status)

    # -- calling side ------------------------------------------------------------------
    async def _call(self) -> None:
        assert self.ua is not None and self.config.target
        target = self.config.target
        info = SessionInfo(role="client", call_id="", local_user=self.config.ua.user,
                           peer=str(self.ua.target_uri(target)), local_ip=self.local_ip)
        offer = self.profile.offer(info)
        sdp = build_sdp(username=self.config.ua.user, address=self.local_ip,
                        media=self.profile.media, proto=self.profile.proto, port=9,
                        attributes=offer)
        log.info("calling %s", info.peer)
        self._emit("invite_sent", target=info.peer)
        call = await self._invite(target, sdp)
        if call is None:
            return
        info.call_id = call.call_id
        self._idle.clear()
        try:
            await self._start_caller_side(call, info, offer)
        finally:
            self._idle.set()

    async def _invite(self, target: str, sdp: bytes) -> Call | None:
        assert self.ua is not None
        invite = asyncio.ensure_future(self.ua.invite(
            target, sdp, on_progress=lambda r: log.info("%d %s", r.status, r.reason)))
        stopping = asyncio.ensure_future(self._stop.wait())
        try:
            done, _ = await asyncio.wait({invite, stopping}, timeout=self.config.invite_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if invite not in done:
            invite.cancel()
            try:
                await invite
            except (asyncio.CancelledError, Exception):
                pass
            if self._stop.is_set():
                log.info("stopped while calling %s", target)
                return None
            raise AgentError(f"{target} did not answer within {self.config.invite_timeout:g} s",
                             Exit.NO_ANSWER)
        try:
            return invite.result()
        except CallFailed as exc:
            message = describe_status(exc.status, exc.reason, target)
            warning = exc.response.headers.get("Warning") if exc.response is not None else None
            if warning:
                message += f"; the peer says: {warning}"
            raise AgentError(message, exit_for_status(exc.status)) from None
        except OSError as exc:
            raise AgentError(f"cannot reach the SIP server: {exc}", Exit.UNREACHABLE) from None

    async def _start_caller_side(self, call: Call, info: SessionInfo,
                                 offer: dict[str, str]) -> None:
        try:
            answer = validate(self.profile.answer_params, read_attributes(call.remote_sdp))
            if not (answer.get("IP4") or answer.get("IP6")):
                raise ParamError("IP4", "missing (the answer must say where to connect)")
        except (SDPError, ParamError) as exc:
            log.warning("[%s] refusing the answer of %s: %s", call.call_id, call.peer, exc)
            self._emit("refused", status=488, text=str(exc))
            await _bye(call, 488, f"bad parameter {exc}")
            raise AgentError(f"refused the answer of {self.config.target}: {exc}",
                             Exit.REFUSED) from None
        try:
            spec = self.profile.caller_child(info, offer, answer)
            child = await Child.start(spec, name=self.profile.name, grace=self.config.grace)
        except AgentError:
            await _bye(call, 500, "cannot start the application")
            raise
        self._emit("child_started", role="client", pid=child.pid, argv=spec.argv,
                   port=answer.get("PORT"))
        log.info("[%s] session established with %s", call.call_id, call.peer)
        self._emit("established", role="client", call_id=call.call_id, peer=call.peer)
        self.sessions += 1
        await self._supervise(Session(call, child, self.config.grace))


async def _bye(call: Call, cause: int, text: str) -> None:
    """End a session we just accepted (as RFC 3261 §13.2.2.4 asks: ACK, then BYE)."""
    log.info("[%s] ending the session at once: %d %s", call.call_id, cause, text)
    # `text` may quote a hostile SDP value: keep it printable, unquoted and short.
    reason = "".join(c if c.isprintable() and c not in '"\\' else "?" for c in text)[:120]
    await call.bye(headers=[("Reason", f'SIP ;cause={cause} ;text="{reason}"')])
