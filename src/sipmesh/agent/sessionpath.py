"""A session's network path: ICE gathering and checks, the hand-over, an ICE restart on a move.

`SessionPath` is the part of `Session` (agent/session.py) that owns the path; the session's
steps call `uses_ice`, `gather`, `take_path` and `close_path`, and its module docstring
tells when each runs. ICE itself is agent/ice.py; the path given to a UDP program is
agent/handover.py, the QUIC streams a TCP program's connections take are agent/streams.py.

Moving (RFC 8445 §9, agent/mobility.py): `restart_path` when we moved (a re-INVITE with
new ICE credentials and candidates), `reoffered` when the peer did (its re-INVITE); either
checks the new path and hands it to the running program (`_switch`), which then follows it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, cast

from sipmesh.agent.attributes import build_sdp, read_attribute_list
from sipmesh.agent.certs import HostCertificate, default_state_dir, host_certificate
from sipmesh.agent.errors import AgentError
from sipmesh.agent.handover import Handover
from sipmesh.agent.ice import IceDescription, IceError, IceSession, PathReport, render
from sipmesh.agent.ice import parse as parse_ice
from sipmesh.agent.params import Fingerprint, ParamError
from sipmesh.agent.profile import AppProfile, Plan
from sipmesh.sip.ua import Call, CallFailed

if TYPE_CHECKING:   # imported when a TCP program needs it (take_path)
    from sipmesh.agent.streams import StreamPath

log = logging.getLogger("sipmesh.agent")

# Program transports that take the path ICE checked: UDP programs get it handed over
# (agent/handover.py), TCP programs' connections are carried over it (agent/streams.py)
ICE_TRANSPORTS = frozenset({"udp", "tcp"})
STREAM_FINGERPRINT = Fingerprint(("sha-256",))   # a=fingerprint of a "tcp" session's peer
NO_PATH_CAUSE = 480   # Reason of the BYE when ICE found no path (RFC 3326)
CONSENT_CAUSE = 408   # ... when a running path lost consent
BYE_WAIT = 4.0        # s we wait for the answer to a BYE before we go on


class SessionPath:
    """The path of one `Session` (its base class)."""

    def __init__(self) -> None:
        self.ice: IceSession | None = None
        self.handover: Handover | None = None   # a StreamPath for "tcp" programs
        self.peer_fingerprint: str | None = None  # its a=fingerprint, for TCP streams
        self.path: PathReport | None = None  # the path ICE chose (or "none" and why)
        self.no_path_message = ""
        self.path_lost = False  # the session ended because its path lost consent
        self.restarts = 0   # ICE restarts that gave the running program a new path
        self.repathed = asyncio.Event()   # the handover changed: watch the new one
        self._restarting = asyncio.Lock()

    def uses_ice(self, profile: AppProfile) -> bool:
        return self.endpoint.ice_config is not None and profile.transport in ICE_TRANSPORTS

    async def gather(self, *, controlling: bool, port: int) -> IceDescription:
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

    def certificate(self) -> HostCertificate:
        """This host's certificate for TCP streams (made on first use)."""
        return host_certificate(default_state_dir() / "streams")

    async def take_path(self, connecting: asyncio.Future[PathReport],
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
        self.emit("path", call_id=self.call_id, path=str(self.path), kind=self.path.kind)
        profile = self.profile
        assert profile is not None
        if not profile.program:   # nothing to hand over: ICE keeps the path (agent/probe.py)
            return True
        if profile.transport == "tcp":
            # imported here: aioquic (and the cryptography it loads) costs every start of
            # an agent that carries no TCP program a tenth of a second (docs/mesh.md)
            from sipmesh.agent.streams import StreamError, StreamPath
            assert self.peer_fingerprint is not None
            try:
                self.handover = await StreamPath.take(
                    ice, client=self.role == "client", certificate=self.certificate(),
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

    async def reoffered(self, offer: bytes) -> bytes:
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
        streams = self.profile.transport == "tcp"   # old is a StreamPath (take_path)
        if streams:   # TCP connections: their QUIC connection moves
            assert old is not None
            handover: Handover = cast("StreamPath", old).follow(ice)
        else:
            try:
                handover = await Handover.take(
                    ice, consent_timeout=self.endpoint.ice.consent_timeout, local=local)
            except OSError as exc:
                log.warning("[%s] cannot take the new path: %s", self.call_id, exc)
                return False
        if local is None and not streams and \
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
        self.repathed.set()
        self.emit("path", call_id=self.call_id, path=str(self.path),
                   kind=self.path.kind if self.path else "none")
        log.info("[%s] the program follows the new path %s", self.call_id, self.path)
        return True

    def _no_path(self, report: PathReport, why: str) -> None:
        self.path = report
        checks = "; ".join(report.checks[:8]) or "none"
        self.no_path_message = f"no network path to {self.peer}: {why}; checks: {checks}"
        self.reason = "no network path"
        log.warning("[%s] %s", self.call_id, self.no_path_message)
        self.emit("no_path", call_id=self.call_id, text=self.no_path_message)

    async def close_path(self) -> None:
        if self.handover is not None:
            await self.handover.close()
        elif self.ice is not None:
            await self.ice.close()


def stream_fingerprint(attributes: list[tuple[str, str | None]]) -> str | None:
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


async def bye_with_reason(call: Call, cause: int, text: str) -> None:
    """End a session we just accepted (as RFC 3261 §13.2.2.4 asks: ACK, then BYE)."""
    log.info("[%s] ending the session at once: %d %s", call.call_id, cause, text)
    # `text` may quote a hostile SDP value: keep it printable, unquoted and short.
    reason = "".join(c if c.isprintable() and c not in '"\\' else "?" for c in text)[:120]
    await call.bye(headers=[("Reason", f'SIP ;cause={cause} ;text="{reason}"')])

