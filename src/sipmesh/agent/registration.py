"""Keeping our name registered (RFC 3261 §10) for as long as the agent runs.

As in the prototype: REGISTER at start (Expires 3600 by default), refresh at
half the granted time; when a refresh fails the next try comes after half the
previous interval, never sooner than 10 s; at the end Expires 0 removes the
binding. `state`, `since`, `error`, `last_success` and `next_try` say how it stands
(`sipmesh status` shows them, one line per server).
Over TCP and TLS the server reaches us over the connection we opened, which either
end closes after 300 s without traffic: each REGISTER first (re)opens it, and a
refresh comes within CONNECTION_REFRESH seconds whatever the granted time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

from sipmesh.agent.errors import CHECK_CREDENTIALS, CHECK_SERVER, AgentError, Exit
from sipmesh.sip.errors import ParseError
from sipmesh.sip.headers import Address
from sipmesh.sip.message import Response
from sipmesh.sip.ua import CallFailed, UserAgent
from sipmesh.sip.uri import URI, SipURI, parse_uri

log = logging.getLogger("sipmesh.agent.registration")

MIN_RETRY = 10.0
UNREGISTER_TIMEOUT = 3.0
CONNECTION_REFRESH = 240.0  # s; below the 300 s after which an idle connection is closed


def granted_expires(response: Response, contact_uri: str | URI, requested: int) -> int:
    """The binding lifetime the registrar granted: our Contact's expires param (our
    Contact as §19.1.4 compares URIs: a registrar may add parameters), else the Expires
    header, else what we asked for (§10.2.4)."""
    try:
        ours = parse_uri(contact_uri) if isinstance(contact_uri, str) else contact_uri
        for contact in response.contacts:
            if contact.expires is not None and (str(contact.uri) == str(ours) or
                                                (isinstance(ours, SipURI) and ours.equivalent(contact.uri))):
                return contact.expires
        value = response.headers.get("Expires")
        if value is not None and value.strip().isdigit():
            return int(value.strip())
    except ParseError:
        pass
    return requested


def next_interval(current: float, *, success: bool, expires: int, floor: float = MIN_RETRY) -> float:
    """Seconds until the next REGISTER: Expires/2 after a success, half the previous
    interval after a failure, never below `floor`."""
    if success:
        return max(expires / 2, floor)
    return max(current / 2, floor)


def registration_error(status: int, reason: str, server: str) -> AgentError:
    if status in (401, 407):
        return AgentError(f"the SIP server {server} rejected our credentials ({status} {reason}): "
                          f"{CHECK_CREDENTIALS}", Exit.AUTH)
    if status == 403:
        return AgentError(f"the SIP server {server} forbids this registration ({status} {reason}): "
                          "is the user name one it serves, with a password? "
                          f"{CHECK_CREDENTIALS}", Exit.AUTH)
    if status in (408, 503):
        return AgentError(f"the SIP server {server} is unreachable ({status} {reason}): "
                          f"{CHECK_SERVER}", Exit.UNREACHABLE)
    return AgentError(f"registration at {server} failed ({status} {reason}): the SIP server's "
                      "log says why", Exit.FAILURE)


class Registration:
    """The binding of our AOR to our Contact at the registrar (or of another AOR, e.g. a
    mesh network's, to `contact`)."""

    def __init__(self, ua: UserAgent, *, expires: int = 3600, timeout: float = 10.0,
                 min_retry: float = MIN_RETRY,
                 connect: Callable[[], Awaitable[None]] | None = None, aor: SipURI | None = None,
                 contact: Address | None = None, server: str | None = None) -> None:
        self.ua = ua
        self._server = server  # None: the UA's domain
        self.aor = aor  # None: the UA's own
        self.contact = contact  # None: the UA's own Contact
        self.expires = expires
        self.timeout = timeout
        self.min_retry = min_retry
        self.connect = connect  # TCP/TLS: open the connection to the server (AgentError)
        self.granted: int | None = None
        self.interval = expires / 2
        self.state = "unregistered"  # -> registered | failing (the last REGISTER's outcome)
        self.since = time.time()  # when `state` last changed
        self.error: str | None = None  # why it is failing
        self.last_success: float | None = None  # when a REGISTER was last accepted
        self.next_try: float | None = None  # when the refresh loop sends the next one
        self._task: asyncio.Task[None] | None = None

    @property
    def server(self) -> str:
        return self._server or self.ua.config.domain

    def describe(self) -> dict[str, object]:
        """How this registration stands, for `sipmesh status` (times are time.time())."""
        return {"server": self.server, "state": self.state, "since": self.since,
                "error": self.error, "expires": self.granted,
                "last_success": self.last_success, "next_try": self.next_try}

    def _set_state(self, state: str, error: str | None = None) -> None:
        if state != self.state:
            self.since = time.time()
        self.state, self.error = state, error

    async def _register(self, expires: int, timeout: float | None = None) -> Response:
        """One REGISTER (and its 423 retry); records the outcome in `state`."""
        try:
            response = await self._send(expires, timeout)
        except AgentError as exc:
            self._set_state("failing", str(exc))
            if exc.code == Exit.UNREACHABLE and expires > 0:
                self.ua.server_failed(self.server)  # a new call tries the others first
            raise
        if expires > 0 and (200 <= response.status < 300 or response.status == 503):
            self.ua.server_failed(self.server, response.status == 503)
        if expires == 0:
            self._set_state("unregistered")
        elif 200 <= response.status < 300:
            self._set_state("registered")
            self.last_success = time.time()
        else:
            self._set_state("failing", f"{response.status} {response.reason}")
        return response

    async def _send(self, expires: int, timeout: float | None) -> Response:
        timeout = self.timeout if timeout is None else timeout
        if self.connect is not None and expires > 0:  # (leaving: no new connection for it)
            await self.connect()
        # asyncio.timeout, not wait_for: in 3.11 wait_for loses a cancellation that arrives
        # as the request fails, and a cancelled refresh loop would then run on for ever
        try:
            async with asyncio.timeout(timeout):
                response = await self._request(expires)
            if response.status == 423 and expires > 0:  # §10.2.8: Interval Too Brief
                minimum = (response.headers.get("Min-Expires") or "").strip()
                if minimum.isdigit() and expires < int(minimum) <= 86400:
                    log.info("the registrar wants at least %s s: registering again", minimum)
                    self.expires = int(minimum)
                    async with asyncio.timeout(timeout):
                        response = await self._request(self.expires)
            return response
        except asyncio.TimeoutError:
            raise AgentError(f"the SIP server {self.server} did not answer our REGISTER within "
                             f"{timeout:g} s: {CHECK_SERVER}; a firewall may drop SIP on the "
                             "way", Exit.UNREACHABLE) from None
        except CallFailed as exc:
            raise registration_error(exc.status, exc.reason, self.server) from None
        except OSError as exc:
            raise AgentError(f"the SIP server {self.server} is unreachable ({exc}): "
                             f"{CHECK_SERVER}", Exit.UNREACHABLE) from None

    def _request(self, expires: int) -> Awaitable[Response]:
        where = {"server": self._server} if self._server else {}
        if self.aor is None and self.contact is None:
            return self.ua.register(expires, **where)
        return self.ua.register(expires, aor=self.aor, contact=self.contact, **where)

    async def register(self, *, keep_trying: bool = False) -> None:
        """The first REGISTER; raises AgentError with the reason if it fails. With
        `keep_trying` an unreachable server is not an error: the refresh loop tries again
        every `min_retry` seconds (refused credentials still raise)."""
        try:
            response = await self._register(self.expires)
            if not 200 <= response.status < 300:
                raise registration_error(response.status, response.reason, self.server)
        except AgentError as exc:
            if not keep_trying or exc.code != Exit.UNREACHABLE:
                raise  # refused credentials: a configuration error, not a glitch
            log.warning("%s: trying again every %g s", exc, self.min_retry)
            self.interval = self.min_retry
            return
        self._granted(response)
        log.info("registered %s at %s for %d s", self.aor or self.ua.aor, self.server, self.granted)

    async def move(self, stale: Address | None) -> None:
        """We moved (agent/mobility.py): register our new Contact now, then remove the
        `stale` one (a registrar that matched our +sip.instance replaced it already;
        removing it again is harmless). Failures are logged: the refresh loop goes on."""
        try:
            response = await self._register(self.expires)
            if 200 <= response.status < 300:
                self._granted(response)
                log.info("registered our new address at %s", self.server)
        except AgentError as exc:
            log.warning("re-registering after a move: %s", exc)
            return
        if stale is None or self.aor is not None or self.contact is not None:
            return
        try:
            where = {"server": self._server} if self._server else {}
            async with asyncio.timeout(self.timeout):
                await self.ua.register(0, contact=stale, **where)
        except (CallFailed, OSError, TimeoutError) as exc:
            log.info("could not remove our old contact at %s: %s", self.server, exc)

    def _granted(self, response: Response) -> None:
        self.granted = granted_expires(response, (self.contact or self.ua.contact()).uri, self.expires)
        self.interval = next_interval(self.interval, success=True, expires=self.granted,
                                      floor=self.min_retry)
        if self.connect is not None:
            self.interval = min(self.interval, CONNECTION_REFRESH)

    def start_refresh(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        while True:
            self.next_try = time.time() + self.interval
            await asyncio.sleep(self.interval)
            try:
                response = await self._register(self.expires)
                ok = 200 <= response.status < 300
                detail = f"{response.status} {response.reason}"
            except AgentError as exc:
                ok, detail = False, str(exc)
            if ok:
                self._granted(response)
                log.info("registration at %s refreshed (%d s)", self.server, self.granted)
            else:
                self.interval = next_interval(self.interval, success=False, expires=self.expires,
                                              floor=self.min_retry)
                log.warning("registration refresh at %s failed (%s): next try in %g s",
                            self.server, detail, self.interval)

    async def unregister(self) -> None:
        """Expires 0 for our binding; failures are logged, not raised (we are leaving)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self.next_try = None
        if self.granted is None:
            return
        try:
            # leaving: do not keep a user who pressed Ctrl-C waiting for a dead server
            response = await self._register(0, min(self.timeout, UNREGISTER_TIMEOUT))
            log.info("unregistered from %s (%d %s)", self.server, response.status, response.reason)
        except AgentError as exc:
            log.warning("could not unregister: %s", exc)
        self.granted = None


def register_in_background(registration: Registration,
                           tasks: set[asyncio.Task[None]] | None = None,
                           errors: dict[Registration, AgentError] | None = None
                           ) -> asyncio.Task[None]:
    """The first REGISTER of `registration`, then its refresh loop, in a task (kept in
    `tasks` until done); a refusal is logged (and put in `errors`) and tried again every
    `min_retry` s by the refresh loop."""
    async def one() -> None:
        try:
            await registration.register()
        except AgentError as exc:
            log.warning("%s", exc)
            if errors is not None:
                errors[registration] = exc
            registration.interval = registration.min_retry
        registration.start_refresh()

    task = asyncio.ensure_future(one())
    if tasks is not None:
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    return task


async def register_everywhere(ua: UserAgent, registrations: list[Registration], *,
                              keep_trying: bool = False,
                              tasks: set[asyncio.Task[None]] | None = None) -> None:
    """The first REGISTER of each of `registrations` (one per server), then each one's
    refresh loop; `keep_trying`: see Registration.register.

    With several, all at once, each refreshed on its own: this returns as soon as one
    accepted us (the others go on in the background, a failing one retried every
    `min_retry` s, their tasks in `tasks` until done); it fails only when every one
    failed. A server that has not answered by then comes last for new requests until it
    does (`UserAgent.live_servers`)."""
    if len(registrations) == 1:
        await registrations[0].register(keep_trying=keep_trying)
        registrations[0].start_refresh()
        return
    errors: dict[Registration, AgentError] = {}
    pending = {register_in_background(r, tasks, errors) for r in registrations}
    while pending and not any(r.state == "registered" for r in registrations):
        _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    if any(r.state == "registered" for r in registrations):
        for registration in registrations:
            if registration.state == "unregistered":  # no answer yet where another did:
                ua.server_failed(registration.server)  # last until it answers
        return
    if keep_trying:
        return
    first = next(r for r in registrations if r in errors)
    raise errors[first]
