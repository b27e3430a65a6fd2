"""Digest authentication of REGISTER (401) and other requests (407), and identity rules.

Built on sip.auth: one DigestServer per realm, all sharing one NonceManager, whose
secret all worker processes share so that a nonce issued by one verifies in another.
Every failure other than a stale nonce is answered with a fresh challenge: wrong
password and unknown user look the same from outside. Authenticating as someone is
not enough: a user may only register its own AOR and send requests as itself (403).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from sipmesh.broker.users import UsersFile
from sipmesh.sip.auth import (AuthError, AuthOutcome, DigestServer, NonceManager,
                              parse_auth_params)
from sipmesh.sip.errors import ParseError
from sipmesh.sip.message import Request
from sipmesh.sip.uri import SipURI, parse_uri

log = logging.getLogger("sipmesh.broker.auth")

DEFAULT_ALGORITHMS = ("SHA-256", "MD5")


@dataclass(slots=True)
class AuthCheck:
    """Either `username` (authenticated) or the response to send instead."""

    username: str | None = None
    status: int = 0
    reason: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.username is not None


class Authenticator:
    def __init__(self, users: UsersFile, *, nonce_secret: bytes | None = None,
                 nonce_lifetime: float = 300.0, algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS,
                 reload_interval: float = 1.0) -> None:
        self.users = users
        self.nonces = NonceManager(secret=nonce_secret, lifetime=nonce_lifetime)
        self.algorithms = algorithms
        self.reload_interval = reload_interval
        self._servers: dict[str, DigestServer] = {}
        self._next_reload = 0.0
        self.failures = 0  # credentials given and refused (metrics)

    def _server(self, realm: str) -> DigestServer:
        server = self._servers.get(realm)
        if server is None:
            server = DigestServer(realm, self.nonces, self.algorithms)
            self._servers[realm] = server
        return server

    def _refresh_users(self) -> None:
        now = time.monotonic()
        if now >= self._next_reload:
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
                  reason: str | None = None) -> AuthCheck:
        name = "Proxy-Authenticate" if proxy else "WWW-Authenticate"
        headers = [(name, value) for value in self._server(realm).challenges(stale=stale)]
        return AuthCheck(status=407 if proxy else 401, reason=reason, headers=headers)

    def check(self, request: Request, realm: str) -> AuthCheck:
        """Authenticate `request` in `realm`: REGISTER with Authorization (401), anything
        else with Proxy-Authorization (407)."""
        self._refresh_users()
        proxy = request.method != "REGISTER"
        name = "Proxy-Authorization" if proxy else "Authorization"
        values = request.headers.get_all(name)
        # One set of credentials is the rule: verify() checks its realm itself.
        credentials = values[0] if len(values) == 1 else _credentials_for(values, realm)
        if credentials is None:
            return self.challenge(realm, proxy=proxy)
        result = self._server(realm).verify(credentials, request.method, self.users.ha1, request.body)
        if result.ok:
            if not _uri_matches(result.uri, request):
                return AuthCheck(status=400, reason="Bad Request (digest uri does not match the Request-URI)")
            return AuthCheck(username=result.username)
        if result.outcome is AuthOutcome.STALE:
            return self.challenge(realm, proxy=proxy, stale=True)
        self.failures += 1
        log.info("authentication of %r in realm %s failed: %s", result.username, realm,
                 result.outcome.value)
        return self.challenge(realm, proxy=proxy)


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
