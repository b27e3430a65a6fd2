"""Digest authentication of REGISTER (401) and other requests (407), and identity rules.

Built on sip.auth: one DigestServer per realm, all sharing one NonceManager, whose
secret all worker processes share so that a nonce issued by one verifies in another.
Every failure other than a stale nonce is answered with a fresh challenge: wrong
password and unknown user look the same from outside. Authenticating as someone is
not enough: a user may only register its own AOR and send requests as itself (403).

With a RADIUS server (broker/radius.py) for some or all realms, the users file is asked
first: a user it lists is checked here, any other user's credentials go to the RADIUS
server, and `check` returns a pending AuthCheck whose `pending` the caller awaits (the
event loop never waits). Access-Reject is answered like a wrong password here (a fresh
challenge); a server that does not answer, or too many checks at once, give 503 with
Retry-After: never an open door. Such realms are challenged with MD5 only (what
FreeRADIUS's digest module computes).
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from sipmesh.broker.radius import RadiusClient, RadiusError, Verdict
from sipmesh.broker.users import UsersFile
from sipmesh.sip.auth import (AuthError, AuthOutcome, AuthResult, DigestCredentials, DigestServer,
                              NonceManager, parse_auth_params)
from sipmesh.sip.errors import ParseError
from sipmesh.sip.message import Request
from sipmesh.sip.uri import SipURI, parse_uri

log = logging.getLogger("sipmesh.broker.auth")

DEFAULT_ALGORITHMS = ("SHA-256", "MD5")
RADIUS_ALGORITHMS = ("MD5",)
_MAX_GROUPS = 10_000  # users whose RADIUS groups are remembered


@dataclass(slots=True)
class AuthCheck:
    """Either `username` (authenticated) or the response to send instead, or `pending`:
    the check is with the RADIUS server; await it for the AuthCheck."""

    username: str | None = None
    status: int = 0
    reason: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    pending: Coroutine[Any, Any, AuthCheck] | None = None
    radius: bool = False  # authenticated by the RADIUS server (not the users file)
    groups: frozenset[str] = frozenset()  # from the RADIUS server's Access-Accept

    @property
    def ok(self) -> bool:
        return self.username is not None


class Authenticator:
    def __init__(self, users: UsersFile | None, *, nonce_secret: bytes | None = None,
                 nonce_lifetime: float = 300.0, algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS,
                 reload_interval: float = 1.0, radius: RadiusClient | None = None) -> None:
        self.users = users
        self.radius = radius
        self.nonces = NonceManager(secret=nonce_secret, lifetime=nonce_lifetime)
        self.algorithms = algorithms
        self.reload_interval = reload_interval
        self._servers: dict[tuple[str, bool], DigestServer] = {}
        self._next_reload = 0.0
        self._groups: OrderedDict[tuple[str, str], frozenset[str]] = OrderedDict()
        self.failures = 0  # credentials given and refused (metrics)

    def _server(self, realm: str, radius: bool = False) -> DigestServer:
        by_radius = self._by_radius(realm, radius)
        server = self._servers.get((realm, by_radius))
        if server is None:
            algorithms = RADIUS_ALGORITHMS if by_radius else self.algorithms
            server = DigestServer(realm, self.nonces, algorithms)
            self._servers[(realm, by_radius)] = server
        return server

    def _by_radius(self, realm: str, radius: bool = False) -> bool:
        return self.radius is not None and (radius or self.radius.config.covers(realm))

    def _ha1(self, user: str, realm: str, algorithm: str) -> str | None:
        return self.users.ha1(user, realm, algorithm) if self.users is not None else None

    def groups(self, user: str, realm: str) -> frozenset[str] | None:
        """The groups the RADIUS server named in `user`'s last Access-Accept in `realm`
        (e.g. the mesh networks it may join); None if it has not been accepted by RADIUS
        since this worker started."""
        return self._groups.get((realm.lower(), user))

    def _refresh_users(self) -> None:
        now = time.monotonic()
        if self.users is not None and now >= self._next_reload:
            self._next_reload = now + self.reload_interval
            try:
                if self.users.refresh():
                    log.info("users file %s reloaded: %d users", self.users.path, len(self.users))
            except (OSError, ValueError) as exc:
                log.error("users file %s not reloaded, keeping the previous one: %s", self.users.path, exc)

    def reload_users(self) -> None:
        """Re-read the users file now (SIGHUP) rather than at the next check."""
        self._next_reload = 0.0
        self._refresh_users()

    def challenge(self, realm: str, *, proxy: bool, stale: bool = False,
                  reason: str | None = None, radius: bool = False) -> AuthCheck:
        name = "Proxy-Authenticate" if proxy else "WWW-Authenticate"
        headers = [(name, value) for value in self._server(realm, radius).challenges(stale=stale)]
        return AuthCheck(status=407 if proxy else 401, reason=reason, headers=headers)

    def check(self, request: Request, realm: str, *, radius: bool = False) -> AuthCheck:
        """Authenticate `request` in `realm`: REGISTER with Authorization (401), anything
        else with Proxy-Authorization (407). `radius`: users not in the users file go to the
        RADIUS server even if `--radius-realm` does not list `realm` (a mesh network whose
        members come from a RADIUS group)."""
        self._refresh_users()
        proxy = request.method != "REGISTER"
        name = "Proxy-Authorization" if proxy else "Authorization"
        values = request.headers.get_all(name)
        # One set of credentials is the rule: verify() checks its realm itself.
        credentials = values[0] if len(values) == 1 else _credentials_for(values, realm)
        if credentials is None:
            return self.challenge(realm, proxy=proxy, radius=radius)
        server = self._server(realm, radius)
        if not self._by_radius(realm, radius):
            return self._judge(server.verify(credentials, request.method, self._ha1, request.body),
                               request, realm, proxy)
        parsed = server.parse_credentials(credentials)
        if isinstance(parsed, AuthResult):
            return self._judge(parsed, request, realm, proxy, radius)
        if self.users is not None and self.users.exists(parsed.username, realm):  # the file first
            return self._judge(server.check_response(parsed, request.method, self._ha1, request.body),
                               request, realm, proxy, radius)
        return AuthCheck(pending=self._ask_radius(server, parsed, request, realm, proxy, radius))

    async def _ask_radius(self, server: DigestServer, credentials: DigestCredentials,
                          request: Request, realm: str, proxy: bool, radius: bool) -> AuthCheck:
        assert self.radius is not None
        try:
            answer = await self.radius.verify(credentials, request.method, request.body)
        except RadiusError as exc:  # credentials that do not fit in an Access-Request
            log.info("credentials of %r in realm %s not sent to RADIUS: %s", credentials.username, realm, exc)
            return self._judge(server.conclude(credentials, False), request, realm, proxy, radius)
        except Exception:  # never an open door
            log.exception("asking the RADIUS server failed")
            answer = None
        if answer is None or answer.verdict in (Verdict.UNAVAILABLE, Verdict.BUSY):
            wait = str(math.ceil(self.radius.config.deadline))
            return AuthCheck(status=503, reason="Service Unavailable (authentication server)",
                             headers=[("Retry-After", wait)])
        check = self._judge(server.conclude(credentials, answer.verdict is Verdict.ACCEPT),
                            request, realm, proxy, radius)
        if check.ok:
            check.radius, check.groups = True, answer.groups
            key = (realm.lower(), credentials.username)
            self._groups[key] = answer.groups
            self._groups.move_to_end(key)
            if len(self._groups) > _MAX_GROUPS:
                self._groups.popitem(last=False)
        return check

    def _judge(self, result: AuthResult, request: Request, realm: str, proxy: bool,
               radius: bool = False) -> AuthCheck:
        """The answer to a checked set of credentials."""
        if result.ok:
            if not _uri_matches(result.uri, request):
                return AuthCheck(status=400, reason="Bad Request (digest uri does not match the Request-URI)")
            return AuthCheck(username=result.username)
        if result.outcome is AuthOutcome.STALE:
            return self.challenge(realm, proxy=proxy, stale=True, radius=radius)
        self.failures += 1
        log.info("authentication of %r in realm %s failed: %s", result.username, realm,
                 result.outcome.value)
        return self.challenge(realm, proxy=proxy, radius=radius)


def _credentials_for(values: list[str], realm: str) -> str | None:
    """The Digest credentials meant for `realm` (several proxies may each have theirs)."""
    for value in values:
        try:
            scheme, params = parse_auth_params(value)
        except AuthError:
            continue
        if scheme.lower() == "digest" and params.get("realm") == realm:
            return value
    return None


def _uri_matches(digest_uri: str | None, request: Request) -> bool:
    """RFC 7616 §3.4.6: the credentials must be for this Request-URI."""
    if digest_uri is None:
        return False
    if digest_uri == str(request.uri):
        return True
    try:
        parsed = parse_uri(digest_uri)
    except ParseError:
        return False
    if isinstance(parsed, SipURI) and isinstance(request.uri, SipURI):
        return parsed.equivalent(request.uri)
    return str(parsed) == str(request.uri)


def may_register(username: str, aor_user: str | None) -> bool:
    """Only the owner registers an AOR (no third-party registration)."""
    return aor_user is not None and username == aor_user


def may_send_as(username: str, from_user: str | None) -> bool:
    """An authenticated user sends requests as itself only."""
    return from_user is not None and username == from_user
