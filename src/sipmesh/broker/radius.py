"""Digest credentials checked by a RADIUS server (central accounts), as Kamailio's auth_radius.

The broker keeps challenging and checking nonces itself (sip.auth); only the last step,
"was this response computed from the user's password?", goes to the RADIUS server, which
holds the passwords (or HA1s). The Access-Request speaks what FreeRADIUS 3.2's `digest`
module reads, draft-sterman-aaa-sip-00 (Kamailio's and Cisco's dialect):

    User-Name           the digest username (without the realm: Kamailio's
                        append_realm_to_username=0; the realm is Digest-Realm)
    Service-Type        15, SIP-Session (as Kamailio sends)
    Digest-Response     (206) the response, 32 hex digits
    Digest-Attributes   (207), one per parameter, each holding one sub-attribute
                        [type, length, value]: 1 Realm, 2 Nonce, 3 Method, 4 URI, 5 QOP,
                        6 Algorithm, 7 Body-Digest (qop=auth-int: H(body)), 8 CNonce,
                        9 Nonce-Count, 10 User-Name
    NAS-Identifier      "sipmesh-broker" (RFC 2865 §4.1 wants it or NAS-IP-Address)
    Message-Authenticator  (RFC 3579, BlastRADIUS) added by pyrad to every request

FreeRADIUS's module computes MD5 only (not SHA-256, not MD5-sess with our nonces), so a
realm checked here is challenged with MD5. RFC 5090's attributes (103-121) are in
FreeRADIUS's dictionary but its module does not read them.

Access-Accept may name groups: each value of the `groups_attribute` (Filter-Id or Class)
that is a plain name ([A-Za-z0-9._-], at most 64) is one group, the first MAX_GROUPS of
them, e.g. the mesh networks the user may join (`RadiusAnswer.groups`,
`Authenticator.groups`, broker/roster.py).

The client is pyrad's asyncio client (one UDP socket per worker, same bytes and id on each
retransmission, replies checked with the shared secret). Each check is bounded: at most
`max_outstanding` at a time (more: BUSY at once, never queued), `retries` retransmissions
`timeout` seconds apart, then UNAVAILABLE. The secret is read from a file, kept in
memory, and never logged or shown in a repr.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import io
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from pyrad.client_async import ClientAsync
from pyrad.dictionary import Dictionary
from pyrad.packet import AccessAccept, AccessReject, Packet

from sipmesh.sip.auth import DigestCredentials
from sipmesh.sip.errors import ParseError
from sipmesh.sip.transport.resolve import default_resolver
from sipmesh.sip.uri import split_hostport

log = logging.getLogger("sipmesh.broker.radius")

DEFAULT_PORT = 1812
NAS_IDENTIFIER = "sipmesh-broker"
SIP_SESSION = 15  # the Service-Type of draft-sterman (FreeRADIUS's dictionary calls 15 IAPP-Register)
GROUP_ATTRIBUTES = ("Filter-Id", "Class")
# The attributes we send and read. Replies are read as octets and decoded here: a value
# from the network that is not UTF-8 is dropped, not half-decoded.
DICTIONARY = """
ATTRIBUTE User-Name 1 string
ATTRIBUTE Service-Type 6 integer
ATTRIBUTE Filter-Id 11 octets
ATTRIBUTE Reply-Message 18 octets
ATTRIBUTE Class 25 octets
ATTRIBUTE NAS-Identifier 32 string
ATTRIBUTE Message-Authenticator 80 octets
ATTRIBUTE Digest-Response 206 string
ATTRIBUTE Digest-Attributes 207 octets
"""
# draft-sterman-aaa-sip-00 §3.1 (FreeRADIUS: Digest-Realm = 1063 = 1062 + 1, ...)
SUB_REALM, SUB_NONCE, SUB_METHOD, SUB_URI, SUB_QOP, SUB_ALGORITHM, SUB_BODY_DIGEST, \
    SUB_CNONCE, SUB_NONCE_COUNT, SUB_USER_NAME = range(1, 11)
_MAX_VALUE = 253 - 2  # an attribute holds 253 octets, the sub-attribute's header takes 2
_GROUP = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_GROUPS = 32  # groups kept from one Access-Accept; the rest are ignored (and logged)
_SILENCE = 10.0  # seconds between two warnings that the server does not answer


class RadiusError(ValueError):
    """The RADIUS configuration is unusable, or credentials cannot be put in a request."""


class Verdict(enum.Enum):
    ACCEPT = "accept"
    REJECT = "reject"
    UNAVAILABLE = "unavailable"  # no valid answer in time: the server is down or unreachable
    BUSY = "busy"                # too many checks outstanding: refused without asking


@dataclass(frozen=True, slots=True)
class RadiusAnswer:
    verdict: Verdict
    groups: frozenset[str] = frozenset()


@dataclass(frozen=True)
class RadiusConfig:
    """`--radius HOST[:PORT] --radius-secret-file FILE` and friends. `realms` empty: every
    realm the broker serves. The secret stays in its file until a worker starts."""

    host: str
    port: int = DEFAULT_PORT
    secret_file: Path = Path()
    timeout: float = 2.0       # seconds to wait for an answer to each attempt
    retries: int = 2           # retransmissions after the first attempt
    realms: tuple[str, ...] = ()
    max_outstanding: int = 64  # per worker; one UDP socket has 256 RADIUS identifiers
    groups_attribute: str = "Filter-Id"

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise RadiusError(f"RADIUS port {self.port} is not a port number")
        if not 0.1 <= self.timeout <= 30:
            raise RadiusError("--radius-timeout must be between 0.1 and 30 seconds")
        if not 0 <= self.retries <= 10:
            raise RadiusError("--radius-retries must be between 0 and 10")
        if not 1 <= self.max_outstanding <= 255:
            raise RadiusError("--radius-max-outstanding must be between 1 and 255")
        if self.groups_attribute not in GROUP_ATTRIBUTES:
            raise RadiusError(f"the groups attribute must be one of {', '.join(GROUP_ATTRIBUTES)}")

    @property
    def server(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def deadline(self) -> float:
        """The longest a check can take: every attempt times out."""
        return self.timeout * (self.retries + 1)

    def covers(self, realm: str) -> bool:
        return not self.realms or realm.lower() in (r.lower() for r in self.realms)


def parse_server(text: str) -> tuple[str, int]:
    """'HOST', 'HOST:PORT' or '[v6]:PORT' (port 1812 by default)."""
    try:
        host, port = split_hostport(text.strip())
    except ParseError as exc:
        raise RadiusError(f"--radius {text!r}: {exc.reason}; expected HOST[:PORT]") from None
    return host, DEFAULT_PORT if port is None else port


def read_secret(path: Path) -> bytes:
    """The shared secret: the file's first line (without its line end), at least 8 octets."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise RadiusError(f"{path}: cannot read the RADIUS secret: {exc.strerror or exc}") from None
    secret = data.split(b"\n", 1)[0].rstrip(b"\r")
    if len(secret) < 8:
        raise RadiusError(f"{path}: the RADIUS secret (its first line) must be at least 8 characters")
    return secret


# -- the request and the answer, without I/O -------------------------------------------------

def digest_attributes(c: DigestCredentials, method: str, body: bytes = b"") -> list[bytes]:
    """The Digest-Attributes values (draft-sterman) for credentials `c` of a `method` request."""
    items = [(SUB_REALM, c.realm), (SUB_NONCE, c.nonce), (SUB_METHOD, method), (SUB_URI, c.uri)]
    if c.qop is not None:
        items.append((SUB_QOP, c.qop))
    items.append((SUB_ALGORITHM, c.algorithm))
    if c.qop == "auth-int":
        items.append((SUB_BODY_DIGEST, hashlib.md5(body).hexdigest()))
    if c.cnonce is not None:
        items.append((SUB_CNONCE, c.cnonce))
    if c.nc is not None:
        items.append((SUB_NONCE_COUNT, c.nc))
    items.append((SUB_USER_NAME, c.username))
    out = []
    for kind, text in items:
        value = text.encode("utf-8", "surrogateescape")
        if not value or len(value) > _MAX_VALUE:
            raise RadiusError(f"digest parameter {kind} is empty or longer than {_MAX_VALUE} octets")
        out.append(bytes((kind, len(value) + 2)) + value)
    return out


def groups_of(values: list[bytes]) -> frozenset[str]:
    """The groups named by the values of the groups attribute in an Access-Accept."""
    groups: set[str] = set()
    for value in values:
        try:
            name = value.decode("utf-8").strip()
        except UnicodeDecodeError:
            name = ""
        if not _GROUP.fullmatch(name):
            log.info("ignored a group value in an Access-Accept that is not a plain name: %r", value[:80])
        elif len(groups) >= MAX_GROUPS and name not in groups:
            log.info("ignored group %r of an Access-Accept: more than %d groups", name, MAX_GROUPS)
        else:
            groups.add(name)
    return frozenset(groups)


# -- the client -----------------------------------------------------------------------------

@dataclass
class RadiusStats:
    accepted: int = 0
    rejected: int = 0
    unavailable: int = 0
    busy: int = 0


@dataclass(eq=False)
class RadiusClient:
    """Asks one RADIUS server, from the event loop of one worker. `await close()` at the end."""

    config: RadiusConfig
    secret: bytes = field(repr=False)
    stats: RadiusStats = field(default_factory=RadiusStats)

    def __post_init__(self) -> None:
        self.outstanding = 0
        self._client: ClientAsync | None = None  # made on first use, in the worker's loop
        self._opening: asyncio.Lock | None = None
        self._warned = float("-inf")

    def __repr__(self) -> str:  # never the secret
        return f"RadiusClient({self.config.server}, outstanding={self.outstanding})"

    async def verify(self, c: DigestCredentials, method: str, body: bytes = b"") -> RadiusAnswer:
        """Ask whether `c` is right: ACCEPT (with groups), REJECT, UNAVAILABLE or BUSY.
        Raises RadiusError for credentials that cannot be put in a request."""
        attributes = digest_attributes(c, method, body)
        if self.outstanding >= self.config.max_outstanding:
            self.stats.busy += 1
            return RadiusAnswer(Verdict.BUSY)
        self.outstanding += 1
        try:
            async with asyncio.timeout(self.config.deadline + 1.0):
                reply = await self._ask(c, attributes)
        except (OSError, asyncio.TimeoutError) as exc:  # no answer, refused, unresolvable
            self.stats.unavailable += 1
            self._warn_unavailable(exc)
            return RadiusAnswer(Verdict.UNAVAILABLE)
        finally:
            self.outstanding -= 1
        if reply.code == AccessAccept:
            self.stats.accepted += 1
            answer = RadiusAnswer(Verdict.ACCEPT, groups_of(reply.get(self.config.groups_attribute, [])))
        elif reply.code == AccessReject:
            self.stats.rejected += 1
            answer = RadiusAnswer(Verdict.REJECT)
        else:  # Access-Challenge: digest has no second round
            log.warning("RADIUS server %s answered code %d for %s@%s: taken as a reject",
                        self.config.server, reply.code, c.username, c.realm)
            self.stats.rejected += 1
            answer = RadiusAnswer(Verdict.REJECT)
        log.debug("RADIUS %s for %s@%s: %s%s", self.config.server, c.username, c.realm,
                  answer.verdict.value, f" (groups {', '.join(sorted(answer.groups))})" if answer.groups else "")
        return answer

    async def _ask(self, c: DigestCredentials, attributes: list[bytes]) -> Packet:
        client = await self._open()
        request = client.CreateAuthPacket()  # with a Message-Authenticator
        request["User-Name"] = c.username
        request["Service-Type"] = SIP_SESSION
        request["NAS-Identifier"] = NAS_IDENTIFIER
        request["Digest-Response"] = c.response
        for value in attributes:
            request.AddAttribute("Digest-Attributes", value)
        return await client.SendPacket(request)

    async def _open(self) -> ClientAsync:
        if self._client is not None:
            return self._client
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._client is None:
                address = (await default_resolver().addresses(self.config.host))[0]
                client = ClientAsync(address, auth_port=self.config.port, secret=self.secret,
                                     dict=Dictionary(io.StringIO(DICTIONARY)),
                                     retries=self.config.retries, timeout=self.config.timeout,
                                     logger_name="sipmesh.broker.radius.pyrad")
                await client.initialize_transports(enable_auth=True)
                self._client = client
        return self._client

    def _warn_unavailable(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._warned >= _SILENCE:
            self._warned = now
            log.warning("RADIUS server %s did not answer (%d attempts, %.1f s; %s): answering 503; "
                        "is it running, does its clients.conf list this host, is the secret the same?",
                        self.config.server, self.config.retries + 1, self.config.deadline,
                        type(exc).__name__ if not str(exc) else exc)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.deinitialize_transports()


# pyrad logs every ICMP error of its socket at ERROR level; _warn_unavailable says it once.
logging.getLogger("sipmesh.broker.radius.pyrad").setLevel(logging.CRITICAL)
