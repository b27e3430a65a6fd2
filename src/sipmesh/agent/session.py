"""One application session, answering or calling; and the agent of `sipmesh serve`/`call`.

This is the successor of the prototype ``sip_app``. A `Session` is one session
from its first SIP message to its end, its steps in the order they happen.

Answering (`Session.answer`; the daemon runs the same steps, choosing a service):

    read the offer      415 unless SDP; its a= lines (488 + Warning if malformed)
    choose              which profile serves it -- the caller of `answer` decides (the
                        agent has one; the daemon checks the caller, picks the service,
                        counts sessions, holds ports and addresses): 403 / 486 / 488
    validate the offer  against the profile's declared types, and `profile.refusal` (488)
    180 Ringing
    plan                `profile.answer`: our values and the program (486 when no port or
                        address is free, 500 otherwise)
    describe            our a= lines, validated by the same rules as the peer's, as SDP
    start               the program, then `profile.wait_ready` (500)
    accept              200 OK until the ACK
    supervise           until the program, the peer or a stop request ends it

Calling (`Session.place`): offer -> INVITE -> read the answer (a bad one is ACKed and
ended with BYE, nothing started) -> start the program -> supervise.

ICE (agent/ice.py), for profiles whose program talks UDP or TCP (``profile.transport``),
when the endpoint has it on (the default; ``--no-ice``): the caller gathers candidates and
puts them in its offer beside a=IP4; an answering side that finds ICE in the offer gathers on
the port its plan chose, answers with its candidates beside a=IP4/a=PORT, and starts its
checks as the 200 OK goes out (before the ACK); the caller (controlling) starts its
checks once the answer is read. Each side starts its program only once a path is chosen,
handed over (agent/handover.py) and put in ``SessionInfo.path``; the answering side
therefore starts its program after the 200 OK, not before. No path: BYE with a Reason,
nothing started, the caller exits with Exit.NO_PATH. A peer without ICE attributes gets
the paper's a=IP4/a=PORT exactly as before. While the program runs, a path whose peer
falls silent (consent lost, see agent/handover.py) ends the session with BYE. A TCP
program's path is not handed over: its connections are carried as QUIC streams over it
(agent/streams.py:StreamPath), each side sending its certificate's a=fingerprint; the
end of that transport (the peer silent, consent lost) ends the session the same way.
A profile without a program (``program = False``: `sipmesh ping`, agent/probe.py) takes the
same steps; its path is never handed over: ICE keeps it (and watches consent) while
``profile.on_path`` runs in the agent, and its end is the BYE.

Supervision: the program exits -> BYE at once; BYE received -> the program is stopped
(SIGTERM to its group, SIGKILL after the grace period); a stop request (SIGINT,
SIGTERM, SIGHUP in the CLI) -> BYE, stop the program. A program that ended its
session by failing (non-zero status, or a signal we did not send) makes call mode
(and serve mode with ``once``) fail with Exit.APPLICATION; a program we stopped never does.

Connection parameters (addresses, ports, keys, ICE candidates) are produced by the
profile (`profile.offer` when calling, `profile.answer` when answering) and by ICE, and
cross the network in two places only: `_describe` writes ours into SDP, and
`_read_offer` + `_validate_offer` (answering) or `_read_answer` (calling) read and
validate the peer's (`_peer_ice` its ICE attributes). Only ``a=`` lines are ever read;
``m=``, ``c=`` and ``o=`` are for proxies.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from sipmesh.agent.attributes import build_sdp, read_attribute_list, read_attributes
from sipmesh.agent.certs import HostCertificate, default_state_dir, host_certificate
from sipmesh.agent.endpoint import Endpoint
from sipmesh.agent.errors import (CHECK_SERVER, AgentError, Exhausted, Exit, describe_exit,
                                  describe_status, exit_for_status)
from sipmesh.agent.handover import Handover
from sipmesh.agent.ice import IceDescription, IceError, IceOptions, IceSession, PathReport, render
from sipmesh.agent.ice import parse as parse_ice
from sipmesh.agent.params import Fingerprint, ParamError, validate
from sipmesh.agent.profile import AppProfile, Plan, SessionInfo
from sipmesh.agent.streams import StreamError, StreamPath
from sipmesh.agent.supervisor import Child, ChildSpec
from sipmesh.sip.errors import ParseError
from sipmesh.sip.headers import parse_address, quote_string
from sipmesh.sip.message import Response
from sipmesh.sip.sdp import SDPError
from sipmesh.sip.uri import URI, SipURI
from sipmesh.sip.ua import Call, CallFailed, IncomingCall, UAConfig, UserAgent

log = logging.getLogger("sipmesh.agent")

EventHook = Callable[[str, dict], None]
# Program transports that take the path ICE checked: UDP programs get it handed over
# (agent/handover.py), TCP programs' connections are carried over it (agent/streams.py)
ICE_TRANSPORTS = frozenset({"udp", "tcp"})
STREAM_FINGERPRINT = Fingerprint(("sha-256",))   # a=fingerprint of a "tcp" session's peer
NO_PATH_CAUSE = 480   # Reason of the BYE when ICE found no path (RFC 3326)
CONSENT_CAUSE = 408   # ... when a running path lost consent
MAX_TRANSFERS = 3     # hand-overs (REFER) a calling session follows
BYE_WAIT = 4.0        # s we wait for the answer to that BYE before we go on
# Who serves an INVITE, from its a= lines (not yet validated): (profile, SessionInfo), or
# raise Refusal.
Chooser = Callable[[IncomingCall, dict[str, str]], tuple[AppProfile, SessionInfo]]


def warning_value(text: str, agent: str) -> str:
    """A Warning header value (RFC 3261 §20.43): code 399, our host, the text quoted."""
    clean = "".join(c if c.isprintable() and c.isascii() else "?" for c in text)[:200]
    return f"399 {agent} {quote_string(clean)}"


def emit(hook: EventHook | None, event: str, **data: object) -> None:
    """Tell an observer (progress lines, the daemon's counters) what happened."""
    if hook is not None:
        data.setdefault("time", time.monotonic())
        try:
            hook(event, data)
        except Exception:  # an observer must not break a session
            log.exception("event hook failed for %s", event)


class Refusal(Exception):
    """The INVITE is answered `status` and the session ends before anything runs."""

    def __init__(self, status: int, text: str, *, warning: bool = True,
                 headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        self.warning = warning  # send `text` in a Warning header
        self.headers = headers


class Session:
    """One session and its program, from the INVITE until one side ends it."""

    def __init__(self, endpoint: Endpoint, *, grace: float = 5.0,
                 on_event: EventHook | None = None) -> None:
        self.endpoint = endpoint
        self.grace = grace  # SIGTERM -> SIGKILL
        self.on_event = on_event
        self.role = ""  # "server" (answering) or "client" (calling)
        self.call_id = ""
        self.peer = ""
        self.state = "starting"  # -> established -> ending
        self.since = time.time()  # when `state` last changed
        self.profile: AppProfile | None = None
        self.info: SessionInfo | None = None
        self.child: Child | None = None
        self.call: Call | None = None
        self.reason: str | None = None  # why it ended
        self.ice: IceSession | None = None
        self.handover: Handover | None = None   # a StreamPath for "tcp" programs
        self.peer_fingerprint: str | None = None  # its a=fingerprint, for TCP streams
        self.path: PathReport | None = None  # the path ICE chose (or "none" and why)
        self._no_path_message = ""
        self.path_lost = False  # the session ended because its path lost consent
        self.restarts = 0   # ICE restarts that gave the running program a new path
        self._repathed = asyncio.Event()   # the handover changed: watch the new one
        self._restarting = asyncio.Lock()
        self.transfers = 0   # hand-overs (REFER) this session followed
        self._refer_to: str | None = None   # where the peer's accepted REFER sends us
        self._referred = asyncio.Event()
        self._kept_path: tuple[Handover | None, IceSession | None] = (None, None)
        # The program's exit status when the program itself ended the session (negative:
        # killed by that signal); None when the peer or a stop request ended it and we
        # stopped the program (whatever status that gave is ours, not the program's).
        self.app_status: int | None = None

    @property
    def failure(self) -> str | None:
        """How the session ended by failing, for people: our program failed (non-zero
        status or a signal we did not send) or the peer stopped answering; None if neither."""
        if self.call is not None and self.call.lost:
            return f"{self.call.lost} (session {self.call_id} with {self.peer})"
        if self.path_lost:
            return f"{self.reason} (session {self.call_id} with {self.peer})"
        if self.app_status in (None, 0):
            return None
        return (f"the application {describe_exit(self.app_status)} "
                f"(session {self.call_id} with {self.peer})")

    def _emit(self, event: str, **data: object) -> None:
        emit(self.on_event, event, **data)

    # -- the answering side --------------------------------------------------------------
    async def answer(self, incoming: IncomingCall, choose: Chooser) -> bool:
        """Answer `incoming` and run the session to its end; False if it was refused or
        never established."""
        self.role, self.call_id, self.peer = "server", incoming.call_id, str(incoming.caller.uri)
        log.info("[%s] INVITE from %s", self.call_id, self.peer)
        self._emit("invite_received", peer=self.peer, call_id=self.call_id)
        try:
            attributes = self._read_offer(incoming)
            self.profile, self.info = choose(incoming, attributes)
        except Refusal as refusal:
            self._refuse(incoming, refusal)
            return False
        with self.endpoint.running(self):
            try:
                return await self._answer(incoming, self.profile, self.info, attributes)
            finally:
                self.state = "ending"
                if self.child is not None and not self.child.finished.done():
                    await self.child.stop(self.grace)  # refused, failed or cancelled half-way
                await self._close_path()

    async def _answer(self, incoming: IncomingCall, profile: AppProfile, info: SessionInfo,
                      attributes: dict[str, str]) -> bool:
        try:
            offer = self._validate_offer(profile, attributes)
            remote = self._offered_ice(profile, incoming)
            if remote is None and not profile.program:
                raise Refusal(488, f"{profile.label} needs ICE: "
                                   + ("it is off here (--no-ice)" if self.endpoint.ice_config
                                      is None else "the offer has none"))
            incoming.ringing()
            plan = await self._plan(profile, info, offer)
            if remote is None:
                sdp = self._describe_answer(profile, plan)
                await self._start_answering(profile, plan)
            else:
                sdp = await self._describe_ice_answer(profile, plan)
        except Refusal as refusal:
            self._refuse(incoming, refusal)
            return False
        connecting = None
        if remote is not None:
            # the checks start as the 200 goes out: the caller's first checks may come
            # before its ACK, and the path is often chosen before the ACK arrives
            connecting = asyncio.ensure_future(self.ice.connect(self._reread(remote)))
        try:
            self.call = await incoming.accept(sdp)
        except CallFailed as exc:
            log.warning("[%s] the session was not established (%s): stopping %s",
                        self.call_id, exc, profile.label)
            if connecting is not None:
                connecting.cancel()
                _cleanup(plan)
            return False
        if connecting is not None:
            started = False
            try:
                if not await self._take_path(connecting, plan):
                    return True
                if profile.program:
                    plan.child = profile.answer_child(info, plan)
                    await self._start_answering(profile, plan)
                started = True
            except Refusal as refusal:
                await bye_with_reason(self.call, refusal.status, refusal.text)
                return True
            finally:
                if not started:
                    _cleanup(plan)
        await self._run()
        return True

    def _offered_ice(self, profile: AppProfile, incoming: IncomingCall) -> list[tuple[str, str]] | None:
        """The offer's ICE attributes when this session takes an ICE path (None: the
        paper's a=IP4/a=PORT); 488 if they are malformed."""
        if not self._uses_ice(profile):
            return None
        attributes = read_attribute_list(incoming.sdp)  # _read_offer parsed it already
        try:
            found = parse_ice(attributes, allow_loopback=True)   # its credentials, for now
            if found is not None and profile.transport == "tcp":
                self.peer_fingerprint = _stream_fingerprint(attributes)
                if self.peer_fingerprint is None:
                    log.info("[%s] the offer has ICE but no a=fingerprint for TCP streams: "
                             "answering with the paper's a=IP4/a=PORT", self.call_id)
                    return None
        except (IceError, ParamError) as exc:
            raise Refusal(488, str(exc)) from None
        return attributes if found is not None else None

    def _reread(self, attributes: list[tuple[str, str]]) -> IceDescription:
        """The peer's description, checked against our own candidates (loopback is used
        only when we are on loopback ourselves)."""
        assert self.ice is not None
        remote = self.ice.read_remote(attributes)
        assert remote is not None
        return remote

    async def _describe_ice_answer(self, profile: AppProfile, plan: Plan) -> bytes:
        """The 200 OK's SDP with our candidates, gathered on the plan's port."""
        try:
            validate(profile.answer_params, plan.attributes)
        except ValueError as exc:
            _cleanup(plan)
            raise Refusal(500, f"cannot serve {profile.label}: {exc}") from None
        try:
            local = await self._gather(controlling=False, port=plan.path_port)
        except (AgentError, OSError) as exc:
            _cleanup(plan)
            raise Refusal(500, f"cannot serve {profile.label}: {exc}") from None
        return self._describe(profile, plan.attributes, plan.port, local)

    def _read_offer(self, incoming: IncomingCall) -> dict[str, str]:
        """The offer's a= lines, not yet validated (that needs the profile)."""
        content_type = (incoming.request.content_type or "").split(";")[0].strip().lower()
        if incoming.sdp.strip() and content_type not in ("application/sdp", ""):
            raise Refusal(415, f"not SDP: {content_type}", warning=False,
                          headers=(("Accept", "application/sdp"),))
        try:
            return read_attributes(incoming.sdp)
        except SDPError as exc:
            raise Refusal(488, f"malformed SDP: {exc}") from None
        except ParamError as exc:
            raise Refusal(488, f"bad parameter {exc}") from None

    def _validate_offer(self, profile: AppProfile, attributes: dict[str, str]) -> dict[str, str]:
        try:
            offer = validate(profile.offer_params, attributes)
        except ParamError as exc:
            raise Refusal(488, f"bad parameter {exc}") from None
        problem = profile.refusal(offer)
        if problem is not None:
            raise Refusal(488, problem)
        return offer

    async def _plan(self, profile: AppProfile, info: SessionInfo, offer: dict[str, str]) -> Plan:
        try:
            return await profile.answer(info, offer)
        except Exhausted as exc:
            raise Refusal(486, str(exc)) from None
        except (AgentError, ValueError, OSError) as exc:  # ParamError is a ValueError
            raise Refusal(500, f"cannot serve {profile.label}: {exc}") from None

    def _describe_answer(self, profile: AppProfile, plan: Plan) -> bytes:
        """The 200 OK's SDP; our own values pass the same validation as the peer's."""
        try:
            validate(profile.answer_params, plan.attributes)
            return self._describe(profile, plan.attributes, plan.port)
        except ValueError as exc:
            _cleanup(plan)
            raise Refusal(500, f"cannot serve {profile.label}: {exc}") from None

    async def _start_answering(self, profile: AppProfile, plan: Plan) -> None:
        """Our program, once it can take the caller's first packet."""
        try:
            self.child = await self._start(plan.child, plan.attributes.get("PORT"))
            await profile.wait_ready(plan, self.child)
        except AgentError as exc:
            raise Refusal(500, f"cannot serve {profile.label}: {exc}") from None

    def _refuse(self, incoming: IncomingCall, refusal: Refusal) -> None:
        log.warning("[%s] refusing the INVITE from %s: %d %s", self.call_id, self.peer,
                    refusal.status, refusal.text)
        headers = list(refusal.headers)
        if refusal.warning:
            headers.append(("Warning", warning_value(refusal.text,
                                                     self.endpoint.local_ip or "sipmesh")))
        incoming.reject(refusal.status, headers=headers)
        self._emit("refused", status=refusal.status, text=refusal.text)

    async def hand_over(self, target: str) -> tuple[int, str]:
        """Ask our peer to call `target` (a user name in our domain, or its SIP URI) instead
        of us: REFER in this dialog (RFC 3515). The peer's answer (status, reason); after a
        202 it calls `target` and then ends this session with BYE."""
        ua = self.endpoint.ua
        assert ua is not None
        if self.call is None or self.state != "established":
            return 481, "no established session"
        uri = ua.target_uri(target)
        log.info("[%s] handing %s over to %s", self.call_id, self.call.peer, uri)
        try:
            response = await self.call.refer(str(uri))
        except CallFailed as exc:
            return exc.status, exc.reason
        self._emit("handover_sent", target=str(uri), status=response.status)
        return response.status, response.reason

    # -- the calling side ----------------------------------------------------------------
    async def place(self, target: str, profile: AppProfile, *, timeout: float) -> bool:
        """INVITE `target`, start our program with its answer and run the session to its
        end. False if a stop request came while calling; failures raise AgentError.

        A hand-over (the peer's REFER, see `_on_refer`) ends our program and calls the
        new target through this same path; the old dialog ends (NOTIFY of the outcome,
        then BYE) once the new one is up or failed."""
        previous: Call | None = None
        while True:
            try:
                placed = await self._place_one(target, profile, timeout, previous)
            except Exception as exc:
                if previous is not None:
                    status = exc.status if isinstance(exc, CallFailed) else 500
                    await self._end_referred(previous, status, str(exc)[:100] or "failed")
                raise
            if previous is not None and not placed:
                await self._end_referred(previous, 487, "Request Terminated")
            if self._refer_to is None or not placed:
                return placed
            target, previous, self._refer_to = self._refer_to, self.call, None
            self._referred.clear()
            self.child = self.handover = self.ice = self.path = None
            self.reason, self.app_status, self.restarts, self.state = None, None, 0, "starting"
            log.info("[%s] handed over to %s: calling it", previous.call_id if previous else "",
                     target)
            self._emit("handover", target=target)

    async def _end_referred(self, call: Call, status: int, reason: str) -> None:
        """The REFER that moved us is done: say how (final NOTIFY), end its dialog."""
        if not call.ended.done():
            await call.notify_refer(status, reason, final=True)
            await asyncio.wait({asyncio.ensure_future(call.bye())}, timeout=BYE_WAIT)
        handover, ice = self._kept_path
        self._kept_path = (None, None)
        if handover is not None:
            await handover.close()
        elif ice is not None:
            await ice.close()

    def _on_refer(self, value: str) -> int:
        """The peer (only it can send in its dialog) asks us to call another agent instead.
        Accepted (202) only for a running program, a SIP URI of a user at our own domain or
        one of our servers, not ourselves, at most MAX_TRANSFERS times per session; 403
        otherwise."""
        ua = self.endpoint.ua
        assert ua is not None and self.call is not None
        why = None
        try:
            uri = parse_address(value).uri
        except ParseError:
            uri = None
        hosts = {ua.aor.host.lower()} | {s.rsplit(":", 1)[0].strip("[]").lower()
                                         for s in ua.servers}
        if not isinstance(uri, SipURI) or not uri.user:
            why = "Refer-To must be a SIP URI naming a user"
        elif uri.host.lower() not in hosts:
            why = f"Refer-To must be in our domain ({ua.aor.host})"
        elif uri.user == ua.aor.user and uri.host.lower() == ua.aor.host.lower():
            why = "Refer-To names ourselves"
        elif self.role != "client" or self.child is None or self.state != "established" \
                or self._referred.is_set():
            why = "no running program to hand over"
        elif self.transfers >= MAX_TRANSFERS:
            why = f"at most {MAX_TRANSFERS} hand-overs per session"
        if why is not None:
            log.warning("[%s] REFER to %s refused: %s", self.call_id, value[:100], why)
            return 403
        self.transfers += 1
        self._refer_to = str(SipURI(scheme=uri.scheme, user=uri.user, host=uri.host, port=uri.port))
        log.info("[%s] %s hands us over to %s", self.call_id, self.call.peer, self._refer_to)
        self._referred.set()
        self.endpoint.ua.spawn(self.call.notify_refer(100, "Trying", final=False))
        return 202

    async def _place_one(self, target: str, profile: AppProfile, timeout: float,
                         previous: Call | None) -> bool:
        ua = self.endpoint.ua
        assert ua is not None, "the endpoint is not listening"
        # the URI chosen now is the one called: which server is live first may change
        # while we gather (a late REGISTER answer), and the log must name the one used
        uri = ua.target_uri(target)
        self.role, self.profile, self.peer = "client", profile, str(uri)
        self.info = info = SessionInfo(role="client", call_id="", local_user=ua.config.user,
                                       peer=self.peer, local_ip=self.endpoint.local_ip)
        offer = profile.offer(info)
        local = await self._gather(controlling=True, port=0) if self._uses_ice(profile) else None
        sdp = self._describe(profile, offer, 9, local)
        log.info("calling %s", self.peer)
        self._emit("invite_sent", target=self.peer)
        try:
            call = await self._invite(target, sdp, timeout, uri)
        except BaseException:
            await self._close_path()
            raise
        if call is None:
            await self._close_path()
            return False
        self.call, self.call_id = call, call.call_id
        info.call_id = call.call_id
        if previous is not None:
            await self._end_referred(previous, 200, "OK")
        with self.endpoint.running(self):
            try:
                answer, remote = await self._read_answer(call, profile, target)
                if remote is not None:
                    if not await self._take_path(asyncio.ensure_future(self.ice.connect(remote))):
                        if self.path is not None and self.path.kind == "none":
                            raise AgentError(self._no_path_message, Exit.NO_PATH)
                        return True   # the peer or a stop request ended it meanwhile
                elif not profile.program:
                    await _bye(call, 488, "no ICE in the answer")
                    raise AgentError(f"{target} answered without ICE: no path to run "
                                     f"{profile.label} on", Exit.REFUSED)
                elif self.ice is not None:
                    log.info("[%s] the peer does not do ICE: its a=IP4/a=PORT are used",
                             call.call_id)
                    await self._close_path()
                if profile.program:
                    try:
                        spec = profile.caller_child(info, offer, answer)
                        self.child = await self._start(spec, answer.get("PORT"))
                    except AgentError:
                        await bye_with_reason(call, 500, "cannot start the application")
                        raise
                await self._run()
            finally:
                self.state = "ending"
                if self.child is not None and not self.child.finished.done():
                    await self.child.stop(self.grace)  # cancelled half-way
                if self._refer_to is not None:   # the old path lives until the new call is up
                    self._kept_path = (self.handover, self.ice)
                else:
                    await self._close_path()
        return True

    async def _invite(self, target: str, sdp: bytes, timeout: float, uri: URI) -> Call | None:
        """INVITE `uri` (`target` as the user named it, for messages)."""
        ua = self.endpoint.ua
        assert ua is not None
        invite = asyncio.ensure_future(ua.invite(uri, sdp, on_progress=self._provisional))
        stopping = asyncio.ensure_future(self.endpoint.stopping.wait())
        try:
            done, _ = await asyncio.wait({invite, stopping}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if invite not in done:
            invite.cancel()
            try:
                await invite
            except (asyncio.CancelledError, Exception):
                pass
            if self.endpoint.stopping.is_set():
                log.info("stopped while calling %s", target)
                return None
            raise AgentError(f"{target} did not answer within {timeout:g} s: is its agent "
                             "running? (--timeout waits longer)", Exit.NO_ANSWER)
        try:
            return invite.result()
        except CallFailed as exc:
            message = describe_status(exc.status, exc.reason, target)
            warning = exc.response.headers.get("Warning") if exc.response is not None else None
            if warning:
                message += f"; the peer says: {warning}"
            raise AgentError(message, exit_for_status(exc.status)) from None
        except OSError as exc:
            raise AgentError(f"the SIP server is unreachable ({exc}): {CHECK_SERVER}",
                             Exit.UNREACHABLE) from None

    def _provisional(self, response: Response) -> None:
        log.info("%d %s", response.status, response.reason)
        self._emit("provisional", status=response.status, reason=response.reason)

    async def _read_answer(self, call: Call, profile: AppProfile, target: str
                           ) -> tuple[dict[str, str], IceDescription | None]:
        """The answer's a= lines, validated, and its ICE description if we offered ICE and
        the peer answered with it; a bad answer ends the session (BYE)."""
        try:
            answer = validate(profile.answer_params, read_attributes(call.remote_sdp))
            if not (answer.get("IP4") or answer.get("IP6")):
                raise ParamError("IP4", "missing (the answer must say where to connect)")
            remote = None
            if self.ice is not None:
                lines = read_attribute_list(call.remote_sdp)
                try:
                    remote = self.ice.read_remote(lines)
                except IceError as exc:
                    raise ParamError("ice", str(exc)) from None
                if remote is not None and profile.transport == "tcp":
                    self.peer_fingerprint = _stream_fingerprint(lines)
                    if self.peer_fingerprint is None:
                        log.info("[%s] the answer has ICE but no a=fingerprint for TCP "
                                 "streams", call.call_id)
                        remote = None
            return answer, remote
        except (SDPError, ParamError) as exc:
            log.warning("[%s] refusing the answer of %s: %s", call.call_id, call.peer, exc)
            self._emit("refused", status=488, text=str(exc))
            await bye_with_reason(call, 488, f"bad parameter {exc}")
            raise AgentError(f"refused the answer of {target}: {exc} (does it run the same "
                             "application, --app or --service, as we do?)", Exit.REFUSED) from None

    # -- both sides ----------------------------------------------------------------------
    def _describe(self, profile: AppProfile, attributes: dict[str, str], port: int,
                  ice: IceDescription | None = None) -> bytes:
        """Our offer or answer: `attributes` (and our ICE description) as a= lines."""
        ua = self.endpoint.ua
        assert ua is not None
        lines = list(attributes.items()) + (render(ice) if ice is not None else [])
        if ice is not None and profile.transport == "tcp":
            lines.append(("fingerprint", self._certificate().fingerprint))
        return build_sdp(username=ua.config.user, address=self.endpoint.local_ip,
                         media=profile.media, proto=profile.proto, port=port,
                         attributes=lines)

    # -- the path (ICE) ------------------------------------------------------------------
    def _uses_ice(self, profile: AppProfile) -> bool:
        return self.endpoint.ice_config is not None and profile.transport in ICE_TRANSPORTS

    async def _gather(self, *, controlling: bool, port: int) -> IceDescription:
        """Our candidates; host sockets on `port` (the answer's a=PORT) when it is free."""
        config = self.endpoint.ice_config
        assert config is not None
        self.ice = IceSession(config, controlling=controlling, port=port)
        try:
            return await self.ice.gather()
        except OSError as exc:
            if not port:
                raise AgentError(f"cannot gather ICE candidates: {exc}") from None
            log.warning("[%s] UDP port %d is taken (%s): ICE gathers on another port",
                        self.call_id, port, exc.strerror or exc)
            await self.ice.close()
            self.ice = IceSession(config, controlling=controlling, port=0)
            return await self.ice.gather()

    def _certificate(self) -> HostCertificate:
        """This host's certificate for TCP streams (made on first use)."""
        return host_certificate(default_state_dir() / "streams")

    async def _take_path(self, connecting: asyncio.Future[PathReport],
                         plan: Plan | None = None) -> bool:
        """Wait for the checks (ending early if the peer or a stop request ends the
        session), then hand the path over (``info.path``), or, for a "tcp" program, start
        carrying its connections over it (answering: to the `plan`'s target). False when
        there is no path to run the program on: the session is over (BYE sent for a
        failed path)."""
        assert self.call is not None and self.ice is not None and self.info is not None
        call, ice = self.call, self.ice
        stopping = asyncio.ensure_future(self.endpoint.stopping.wait())
        try:
            await asyncio.wait({connecting, call.ended, stopping},
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if not connecting.done():
            connecting.cancel()
            if call.ended.done() and f"cause={NO_PATH_CAUSE}" in (call.bye_reason or ""):
                # the peer's checks gave up before ours: there is no path for us either
                self._no_path(ice.snapshot(), f"the peer found none ({call.bye_reason}); "
                                              f"{ice.summary()}")
                return False
            self.reason = f"the peer ended the session ({call.ended.result()})" \
                if call.ended.done() else "shutting down"
            log.info("[%s] %s while checking paths", self.call_id, self.reason)
            if not call.ended.done():
                await call.bye()
            return False
        try:
            self.path = connecting.result()
        except IceError as exc:
            self._no_path(exc.report or PathReport("none", str(exc)), str(exc))
            await bye_with_reason(call, NO_PATH_CAUSE, f"no network path: {self.path.reason}")
            return False
        self._emit("path", call_id=self.call_id, path=str(self.path), kind=self.path.kind)
        profile = self.profile
        assert profile is not None
        if not profile.program:   # nothing to hand over: ICE keeps the path (agent/probe.py)
            return True
        if profile.transport == "tcp":
            assert self.peer_fingerprint is not None
            try:
                self.handover = await StreamPath.take(
                    ice, client=self.role == "client", certificate=self._certificate(),
                    peer_fingerprint=self.peer_fingerprint,
                    target=profile.stream_target(self.info, plan) if plan else None,
                    listen=None if plan else profile.stream_listen(self.info),
                    max_streams=profile.max_streams)
            except StreamError as exc:
                why = f"no TCP streams over the path: {exc}"
                self._no_path(PathReport("none", why), why)
                await bye_with_reason(call, NO_PATH_CAUSE, f"no TCP streams: {exc}")
                return False
        else:
            timeout = self.endpoint.ice.consent_timeout
            self.handover = await Handover.take(ice, consent_timeout=timeout,
                                                follow=profile.through_agent)
        self.info.path = self.handover.endpoint
        return True

    # -- moving: an ICE restart (RFC 8445 §9) while the program runs (agent/mobility.py) ---
    def _can_restart(self) -> bool:
        return (self.state == "established" and isinstance(self.handover, Handover)
                and self.call is not None and not self.call.ended.done()
                and self.endpoint.ice_config is not None)

    def _restart_sdp(self, local: IceDescription) -> bytes:
        """Our SDP as it stands, with new ICE credentials and candidates; a=IP4/IP6 our
        address now."""
        assert self.call is not None and self.profile is not None
        ice_lines = {"ice-ufrag", "ice-pwd", "ice-options", "candidate", "end-of-candidates"}
        address = "IP6" if ":" in self.endpoint.local_ip else "IP4"
        lines: list[tuple[str, str | None]] = []
        for name, value in read_attribute_list(self.call.local_sdp):
            if name in ("IP4", "IP6"):
                name, value = address, self.endpoint.local_ip
            if name not in ice_lines:
                lines.append((name, value))
        ua = self.endpoint.ua
        assert ua is not None
        return build_sdp(username=ua.config.user, address=self.endpoint.local_ip,
                         media=self.profile.media, proto=self.profile.proto, port=9,
                         attributes=lines + render(local))

    async def restart_path(self) -> bool:
        """We moved: offer new ICE credentials and candidates in a re-INVITE, check, hand
        the new path to the running program. False if this session could not follow."""
        if not self._can_restart():
            return False
        async with self._restarting:
            assert self.call is not None and self.endpoint.ice_config is not None
            ice = IceSession(self.endpoint.ice_config, controlling=self.role == "client")
            try:
                sdp = self._restart_sdp(await ice.gather())
                log.info("[%s] we moved: re-INVITE with an ICE restart", self.call_id)
                assert self.endpoint.ua is not None
                self.call.moved(str(self.endpoint.ua.contact()))
                response = await self.call.reinvite(sdp)
                if not 200 <= response.status < 300:
                    raise IceError(f"the peer refused the restart ({response.status} "
                                   f"{response.reason})")
                remote = ice.read_remote(read_attribute_list(self.call.remote_sdp))
                if remote is None:
                    raise IceError("the peer's answer has no ICE")
                await ice.connect(remote)
            except (IceError, CallFailed, OSError, AgentError) as exc:
                log.warning("[%s] the path did not follow the move: %s", self.call_id, exc)
                await ice.close()
                return False
            return await self._switch(ice)

    async def _reoffered(self, offer: bytes) -> bytes:
        """The peer's re-INVITE: new ICE credentials are a restart (the peer moved), we
        answer with ours and check as the 200 goes out; anything else is a refresh."""
        assert self.call is not None
        lines = read_attribute_list(offer)
        try:
            remote = parse_ice(lines)
        except IceError as exc:
            raise CallFailed(488, "Not Acceptable Here") from exc
        current = self.ice.remote if self.ice is not None else None
        if remote is None or current is None or (remote.ufrag, remote.pwd) == (current.ufrag,
                                                                                current.pwd):
            return self.call.local_sdp
        if not self._can_restart():
            raise CallFailed(488, "Not Acceptable Here")
        assert self.endpoint.ice_config is not None
        log.info("[%s] the peer moved: ICE restart", self.call_id)
        ice = IceSession(self.endpoint.ice_config, controlling=self.role == "client")
        try:
            sdp = self._restart_sdp(await ice.gather())
            remote = ice.read_remote(lines)
        except (IceError, OSError) as exc:
            await ice.close()
            raise CallFailed(488, "Not Acceptable Here") from exc
        assert remote is not None

        async def check() -> None:
            async with self._restarting:
                try:
                    await ice.connect(remote)
                except IceError as exc:
                    log.warning("[%s] no path after the peer moved: %s", self.call_id, exc)
                    return
                await self._switch(ice)
        assert self.endpoint.ua is not None
        self.endpoint.ua.spawn(check())
        return sdp

    async def _switch(self, ice: IceSession) -> bool:
        """Hand `ice`'s new path to the running program; the old path is closed."""
        assert self.profile is not None and self.child is not None and self.info is not None
        old = self.handover
        # a program talking through the agent keeps sending to the same local end
        local = old.local if self.profile.through_agent and isinstance(old, Handover) else None
        if isinstance(old, StreamPath):   # TCP connections: their QUIC connection moves
            handover: Handover = old.follow(ice)
        else:
            try:
                handover = await Handover.take(
                    ice, consent_timeout=self.endpoint.ice.consent_timeout, local=local)
            except OSError as exc:
                log.warning("[%s] cannot take the new path: %s", self.call_id, exc)
                return False
        if local is None and not isinstance(old, StreamPath) and \
                not await self.profile.repath(self.child, handover.endpoint):
            log.warning("[%s] %s cannot follow a new path: it keeps the old one",
                        self.call_id, self.profile.label)
            await handover.close()
            return False
        self.ice, self.handover, self.path = ice, handover, ice.path
        self.info.path = handover.endpoint
        self.restarts += 1
        if old is not None:
            await old.close()
        self._repathed.set()
        self._emit("path", call_id=self.call_id, path=str(self.path),
                   kind=self.path.kind if self.path else "none")
        log.info("[%s] the program follows the new path %s", self.call_id, self.path)
        return True

    def _no_path(self, report: PathReport, why: str) -> None:
        self.path = report
        checks = "; ".join(report.checks[:8]) or "none"
        self._no_path_message = f"no network path to {self.peer}: {why}; checks: {checks}"
        self.reason = "no network path"
        log.warning("[%s] %s", self.call_id, self._no_path_message)
        self._emit("no_path", call_id=self.call_id, text=self._no_path_message)

    async def _close_path(self) -> None:
        if self.handover is not None:
            await self.handover.close()
        elif self.ice is not None:
            await self.ice.close()

    async def _start(self, spec: ChildSpec, port: str | None) -> Child:
        assert self.profile is not None
        child = await Child.start(spec, name=f"{self.profile.label} [{self.call_id}]",
                                  grace=self.grace)
        self._emit("child_started", role=self.role, pid=child.pid, argv=spec.argv, port=port)
        return child

    async def _run(self) -> None:
        """Established: supervise until one side ends the session."""
        assert self.call is not None and self.profile is not None
        self.state, self.since = "established", time.time()
        if isinstance(self.handover, Handover):
            self.call.on_reoffer = self._reoffered   # the peer moved: its ICE restart
        if self.role == "client" and self.child is not None:
            self.call.on_refer = self._on_refer   # the peer hands us over (REFER)
        log.info("[%s] session established with %s (%s, %s)", self.call_id, self.call.peer,
                 self.profile.label,
                 f"pid {self.child.pid}" if self.child is not None else "no program")
        self._emit("established", role=self.role, call_id=self.call_id, peer=self.call.peer)
        reason = await self.supervise()
        log.info("[%s] session ended: %s", self.call_id, reason)
        if self.failure is not None:
            log.warning("[%s] %s", self.call_id, self.failure)
        self._emit("ended", call_id=self.call_id, reason=reason, app_status=self.app_status)

    async def supervise(self) -> str:
        """Wait for the program, the peer or a stop request; end the rest; say why.

        A profile without a program (``program = False``) runs its `on_path` instead, and
        its path is watched by ICE's own consent checks."""
        assert self.call is not None and self.profile is not None and self.info is not None
        call, child = self.call, self.child
        if child is None:
            assert self.ice is not None
            return await self._supervise_on_path(call, self.ice)
        while True:   # again whenever an ICE restart gave the program a new path
            self._repathed.clear()
            stopping = asyncio.ensure_future(self.endpoint.stopping.wait())
            repathed = asyncio.ensure_future(self._repathed.wait())
            referred = asyncio.ensure_future(self._referred.wait())
            lost = asyncio.ensure_future(self.handover.lost()) if self.handover else None
            try:
                await asyncio.wait({child.exited, call.ended, stopping, repathed, referred}
                                   | ({lost} if lost else set()),
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopping.cancel()
                repathed.cancel()
                referred.cancel()
                if lost is not None and not lost.done():
                    lost.cancel()
            if not (self._repathed.is_set() and not child.exited.done()
                    and not call.ended.done() and not self.endpoint.stopping.is_set()):
                break
        if lost is not None and lost.done() and not lost.cancelled() \
                and not child.exited.done() and not call.ended.done():
            self.reason = lost.result()
            self.path_lost = True
            log.warning("[%s] %s: sending BYE, stopping the application", call.call_id,
                        self.reason)
            # the BYE may well take the dead path's fate (a cut link): do not wait for it
            bye = asyncio.ensure_future(bye_with_reason(call, CONSENT_CAUSE, self.reason))
            await asyncio.gather(asyncio.wait({bye}, timeout=BYE_WAIT), child.stop(self.grace))
        elif self._referred.is_set() and not child.exited.done() and not call.ended.done() \
                and not self.endpoint.stopping.is_set():
            self.reason = f"handed over to {self._refer_to}"
            log.info("[%s] %s: stopping the application", call.call_id, self.reason)
            await child.stop(self.grace)
        elif child.exited.done():
            self.app_status = status = child.exited.result()
            self.reason = f"the application {describe_exit(status)}"
            log.info("[%s] %s: sending BYE", call.call_id, self.reason)
            await call.bye()
            await child.stop(self.grace)
        elif call.ended.done():
            self.reason = call.lost or f"the peer ended the session ({call.ended.result()})"
            log.info("[%s] %s: stopping the application", call.call_id, self.reason)
            await child.stop(self.grace)
        else:
            self.reason = "shutting down"
            log.info("[%s] shutting down: BYE and stopping the application", call.call_id)
            await asyncio.gather(call.bye(), child.stop(self.grace))
        return self.reason

    async def _supervise_on_path(self, call: Call, ice: IceSession) -> str:
        assert self.profile is not None and self.info is not None
        work = asyncio.ensure_future(self.profile.on_path(self.info, ice))
        stopping = asyncio.ensure_future(self.endpoint.stopping.wait())
        lost = asyncio.ensure_future(ice.lost())
        try:
            await asyncio.wait({work, call.ended, stopping, lost},
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (work, stopping, lost):
                task.cancel()
        if work.done() and not work.cancelled():
            error = work.exception()
            self.reason = work.result() if error is None else f"{self.profile.label} failed: {error}"
        elif call.ended.done():
            self.reason = call.lost or f"the peer ended the session ({call.ended.result()})"
            return self.reason
        elif lost.done() and not lost.cancelled():
            self.reason = lost.result()
            self.path_lost = True
        else:
            self.reason = "shutting down"
        log.info("[%s] %s: sending BYE", call.call_id, self.reason)
        await asyncio.wait({asyncio.ensure_future(call.bye())}, timeout=BYE_WAIT)
        return self.reason


def _stream_fingerprint(attributes: list[tuple[str, str | None]]) -> str | None:
    """The peer's a=fingerprint for TCP streams (None: it sent none); ParamError if it
    sent a malformed one or several."""
    values = [value or "" for name, value in attributes if name == "fingerprint"]
    if not values:
        return None
    if len(values) > 1:
        raise ParamError("fingerprint", "repeated")
    try:
        return STREAM_FINGERPRINT.check(values[0])
    except ValueError as exc:
        raise ParamError("fingerprint", str(exc)) from None


def _cleanup(plan: Plan) -> None:
    """What a plan holds, when its program never started."""
    if plan.child is not None and plan.child.cleanup is not None:
        plan.child.cleanup()


async def bye_with_reason(call: Call, cause: int, text: str) -> None:
    """End a session we just accepted (as RFC 3261 §13.2.2.4 asks: ACK, then BYE)."""
    log.info("[%s] ending the session at once: %d %s", call.call_id, cause, text)
    # `text` may quote a hostile SDP value: keep it printable, unquoted and short.
    reason = "".join(c if c.isprintable() and c not in '"\\' else "?" for c in text)[:120]
    await call.bye(headers=[("Reason", f'SIP ;cause={cause} ;text="{reason}"')])


# ---------------------------------------------------------------------------- the agent


@dataclass
class AgentConfig:
    ua: UAConfig
    mode: str = "serve"  # or "call"
    target: str | None = None  # call mode: user name, user@domain or SIP URI
    advertise: str | None = None  # our a=IP4/IP6; default: local address towards the server
    tls_server_name: str | None = None  # TLS: the name the server's certificate shows
    register: bool = True
    expires: int = 3600
    register_timeout: float = 10.0
    invite_timeout: float = 30.0
    grace: float = 5.0  # SIGTERM -> SIGKILL
    once: bool = False  # serve mode: stop after the first session
    ice: IceOptions = field(default_factory=IceOptions)  # ICE on, STUN at the SIP server


class Agent:
    """One SIP identity with one application profile: answers sessions one at a time
    (serve mode; a second INVITE meanwhile gets 486 Busy Here) or places one (call
    mode). Runs until it is done (call) or asked to stop (serve)."""

    def __init__(self, config: AgentConfig, profile: AppProfile, *,
                 on_event: EventHook | None = None) -> None:
        if config.mode not in ("serve", "call"):
            raise ValueError(f"mode must be 'serve' or 'call', not {config.mode!r}")
        if config.mode == "call" and not config.target:
            raise ValueError("call mode needs a target")
        self.config = config
        self.profile = profile
        self.on_event = on_event
        self.endpoint = Endpoint(config.ua, on_invite=self._on_invite, advertise=config.advertise,
                                 tls_server_name=config.tls_server_name, ice=config.ice)
        self.sessions = 0  # established so far
        self.app_failure: AgentError | None = None  # how the last session failed
        self.ready = asyncio.Event()  # set once registered (or, without registering, started)

    @property
    def ua(self) -> UserAgent | None:
        return self.endpoint.ua

    def request_stop(self) -> None:
        """End the current session, unregister and return from run() (signal handlers)."""
        self.endpoint.request_stop()

    async def run(self) -> int:
        """Returns the exit status (0); failures raise AgentError.

        In call mode (and serve mode with ``once``) a session whose program failed
        raises AgentError with Exit.APPLICATION once everything is shut down."""
        self.profile.check()
        endpoint = self.endpoint
        try:
            await endpoint.listen()
            if endpoint.stopping.is_set():  # a signal while starting
                return Exit.OK
            if self.config.register:
                assert endpoint.ua is not None
                emit(self.on_event, "registering", aor=str(endpoint.ua.aor),
                     server=self.config.ua.domain)
                await endpoint.register(expires=self.config.expires,
                                        timeout=self.config.register_timeout)
            else:
                await endpoint.connect()
            assert endpoint.ua is not None
            emit(self.on_event, "ready", contact=str(endpoint.ua.contact().uri))
            self.ready.set()
            if self.config.mode == "serve":
                await endpoint.stopping.wait()
            else:
                assert self.config.target
                session = self._session()
                if await session.place(self.config.target, self.profile,
                                       timeout=self.config.invite_timeout):
                    self._ended(session)
        finally:
            await endpoint.close(self.config.grace + 10)
        if self.app_failure is not None and (self.config.mode == "call" or self.config.once):
            raise self.app_failure
        return Exit.OK

    def _session(self) -> Session:
        return Session(self.endpoint, grace=self.config.grace, on_event=self.on_event)

    async def _on_invite(self, incoming: IncomingCall) -> None:
        if self.config.mode != "serve":
            incoming.reject(486, "Busy Here")
            return
        if self.endpoint.sessions:
            log.info("[%s] busy: 486 to %s", incoming.call_id, incoming.caller.uri)
            incoming.reject(486, "Busy Here")
            emit(self.on_event, "busy", peer=str(incoming.caller.uri))
            return
        session = self._session()
        if await session.answer(incoming, self._choose):
            self._ended(session)
            if self.config.once:
                self.request_stop()

    def _choose(self, incoming: IncomingCall, attributes: dict[str, str]
                ) -> tuple[AppProfile, SessionInfo]:
        return self.profile, SessionInfo(role="server", call_id=incoming.call_id,
                                         local_user=self.config.ua.user,
                                         peer=str(incoming.caller.uri),
                                         local_ip=self.endpoint.local_ip)

    def _ended(self, session: Session) -> None:
        """After an established session."""
        self.sessions += 1
        if session.failure is not None:
            lost = session.path_lost or (session.call is not None and session.call.lost)
            self.app_failure = AgentError(session.failure,
                                          Exit.PEER_LOST if lost else Exit.APPLICATION)
