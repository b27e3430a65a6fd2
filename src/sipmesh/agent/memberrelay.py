"""A member that relays for its mesh network (issue 12, item 4: `sipmesh up NET --relay`).

Two members that cannot reach each other (both behind symmetric NATs, say) need a relay.
Besides the network's coturn, a publicly reachable member may offer to be that relay:

* it runs coturn (Debian's ``turnserver``, the relay the project already tests against)
  as its child, on its own address (``--relay-port``, 3478), realm = the network's name;
* it advertises the relay in the roster: ``;mesh-relay=HOST:PORT`` on its roster contact,
  beside ``mesh-ip`` (agent/roster.py);
* it gives each peer a credential of its own in the pair's offer or answer,
  ``a=mesh-relay:USERNAME PASSWORD``: coturn's "TURN REST" credentials (``use-auth-secret``),
  USERNAME = ``EXPIRY:PEER``, PASSWORD = base64(HMAC-SHA1(secret, USERNAME)), the secret
  random, made at start and known only to the relay and its coturn. The pair's dialog is
  the network's: the SIP server authenticated the caller in the network's realm, and the
  relay answers or calls only members its roster lists (with a CA, the body is signed):
  so only the network's members get credentials, each for itself;
* coturn relays only to its own address (``denied-peer-ip`` everything, ``allowed-peer-ip``
  its own address): a member's allocation can reach another member's allocation on the
  same relay and nothing else. Never a third party: the relay is no open relay, not even
  towards other members' public addresses. Quotas bound it (allocations per member and in
  all, optionally bandwidth per allocation).

A member that wants a relay for a pair (`choose`) takes the nearest: the lowest STUN
round trip from the member to the relay (measured when the relay's credential arrives;
relays that did not answer come last; ties by name). The caller chooses, its offer says
which (``a=mesh-via:NAME``), and the callee allocates on the same relay, so both relayed
candidates are on one coturn. Relayed traffic stays WireGuard's: the relay only moves UDP
datagrams between two allocations; the pair's keys never leave the pair.

`RelayPolicy` is the access rule, sans-I/O: whom a credential is issued to, which peer
addresses the relay may send to, and the turnserver configuration that enforces it.
`MemberRelay` is the I/O: the configuration file (0600: it holds the secret), coturn as a
supervised child that dies with us, and a STUN check that it answers.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Iterable

from sipmesh.agent.errors import AgentError, Exit
from sipmesh.agent.netcheck import binding_rtt
from sipmesh.agent.supervisor import Child, ChildSpec, dies_with_us, resolve_program

__all__ = ["ATTRIBUTE", "CREDENTIAL_LIFETIME", "KnownRelay", "MemberRelay", "RELAY_PORT",
           "RELAY_WAIT", "RelayPolicy", "VIA_ATTRIBUTE", "choose", "parse_credential",
           "parse_relay_address", "offered_relay"]

log = logging.getLogger("sipmesh.agent.memberrelay")

RELAY_PORT = 3478
ATTRIBUTE = "mesh-relay"        # a=mesh-relay:USERNAME PASSWORD: the relay's credential for us
VIA_ATTRIBUTE = "mesh-via"      # a=mesh-via:NAME: the caller relays this pair through NAME
CREDENTIAL_LIFETIME = 24 * 3600  # s: coturn refuses the credential (Allocate, Refresh) after
USER_QUOTA = 256                # allocations one member may hold at once (one per pair, and
TOTAL_QUOTA = 4096              # the short-lived ones of pairs being set up); all members
RELAY_WAIT = 3.0                # s a pair waits for an advertised relay's credential
START_WAIT = 10.0               # s for coturn to answer STUN after its start

_USERNAME = re.compile(r"([0-9]{1,12}):([A-Za-z0-9._~+-]{1,64})")
_PASSWORD_CHARS = re.compile(r"[A-Za-z0-9+/]{27}=")   # base64 of HMAC-SHA1's 20 bytes


def parse_relay_address(text: str) -> tuple[str, int] | None:
    """``HOST:PORT`` of a roster's ``mesh-relay`` parameter (an IPv4 address), or None
    when it is not one (the roster is hostile input: never loopback, where it would aim
    our STUN and TURN requests at our own host's services)."""
    host, _, port = text.rpartition(":")
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        return None
    if not port.isdigit() or not 0 < int(port) < 65536 or address.is_unspecified \
            or address.is_multicast or address.is_reserved or address.is_link_local \
            or address.is_loopback:
        return None
    return str(address), int(port)


@dataclass(frozen=True)
class RelayPolicy:
    """Who may use member `me`'s relay on `address`, and where it may send (the rule)."""

    network: str
    me: str
    address: str            # the relay's own IPv4 address: every allocation is on it
    port: int = RELAY_PORT
    max_bps: int = 0        # per allocation (0: no limit)

    def credential_for(self, peer: str, members: Collection[str], secret: bytes,
                       now: float) -> tuple[str, str] | None:
        """(username, password) for `peer`, or None: only a member the roster lists now
        (not ourselves) gets one, for itself alone (its name is in the username)."""
        if peer == self.me or peer not in members or not _USERNAME.fullmatch(f"0:{peer}"):
            return None
        username = f"{int(now + CREDENTIAL_LIFETIME)}:{peer}"
        return username, rest_password(secret, username)

    def peer_allowed(self, peer_ip: str) -> bool:
        """May an allocation send to `peer_ip`? Only to the relay's own address, i.e. to
        another member's allocation on it: never to a third party."""
        try:
            return ipaddress.ip_address(peer_ip) == ipaddress.IPv4Address(self.address)
        except ValueError:
            return False

    def config(self, secret: bytes, run_dir: Path) -> str:
        """turnserver.conf enforcing the rule (mode 0600: the secret is in it; coturn keys
        its HMAC with the secret's text, so `secret` is ASCII)."""
        lines = [f"listening-ip={self.address}", f"relay-ip={self.address}",
                 f"listening-port={self.port}", f"realm={self.network}",
                 "use-auth-secret", f"static-auth-secret={secret.decode()}",
                 # the access rule: no peer but our own address (the members' allocations)
                 "denied-peer-ip=0.0.0.0-255.255.255.255", "denied-peer-ip=::-ffff:ffff:ffff:"
                 "ffff:ffff:ffff:ffff:ffff", f"allowed-peer-ip={self.address}",
                 f"user-quota={USER_QUOTA}", f"total-quota={TOTAL_QUOTA}",
                 "fingerprint", "no-tls", "no-dtls", "no-cli", "no-multicast-peers",
                 "no-software-attribute", "no-tcp-relay",
                 f"pidfile={run_dir / 'turnserver.pid'}",
                 f"userdb={run_dir / 'turndb'}",   # (empty: not the machine's)
                 f"log-file={run_dir / 'turnserver.log'}", "simple-log", "no-stdout-log"]
        if ipaddress.IPv4Address(self.address).is_loopback:
            lines.append("allow-loopback-peers")   # a test on 127.0.0.1; still only ours
        if self.max_bps > 0:
            lines.append(f"max-bps={self.max_bps}")
        return "\n".join(lines) + "\n"


def rest_password(secret: bytes, username: str) -> str:
    """coturn's ``use-auth-secret`` password for `username` (the TURN REST API's)."""
    return base64.b64encode(hmac.new(secret, username.encode(), hashlib.sha1).digest()).decode()


@dataclass
class KnownRelay:
    """A member relay of the network as a member sees it: where, our credential, distance."""

    name: str
    address: tuple[str, int]
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    expires: float = 0.0
    rtt: float | None = None     # s, one STUN round trip from us (None: not measured/answered)

    def usable(self, now: float) -> bool:
        return self.password is not None and self.expires > now + 60

    def describe(self, now: float) -> dict[str, object]:
        """For `sipmesh status` (never the password)."""
        return {"address": f"{self.address[0]}:{self.address[1]}",
                "credential": "yes" if self.usable(now) else "no",
                "rtt_ms": None if self.rtt is None else round(self.rtt * 1000, 1)}


def parse_credential(value: str, me: str, now: float) -> tuple[str, str, float]:
    """``a=mesh-relay``'s value for member `me`: (username, password, expiry). Raises
    ValueError when it is malformed, for someone else, or expired."""
    parts = value.split()
    if len(parts) != 2:
        raise ValueError("not 'USERNAME PASSWORD'")
    username, password = parts
    match = _USERNAME.fullmatch(username)
    if match is None or match.group(2) != me:
        raise ValueError(f"the username is not EXPIRY:{me}")
    if not _PASSWORD_CHARS.fullmatch(password):
        raise ValueError("the password is not base64 of 20 bytes")
    try:
        base64.b64decode(password, validate=True)
    except binascii.Error:
        raise ValueError("the password is not base64") from None
    expires = float(match.group(1))
    if expires <= now:
        raise ValueError("expired")
    return username, password, expires


def offered_relay(attributes: Iterable[tuple[str, str]]) -> str | None:
    """The member relay an offer's ``a=mesh-via`` names (None: none, repeated or not a
    member's name)."""
    values = [value for name, value in attributes if name == VIA_ATTRIBUTE]
    if len(values) != 1 or not _USERNAME.fullmatch(f"0:{values[0]}"):
        return None
    return values[0]


def choose(relays: Iterable[KnownRelay], *, exclude: Collection[str], now: float
           ) -> KnownRelay | None:
    """The nearest usable relay not in `exclude` (the pair's own members): lowest RTT,
    unmeasured last, ties by name."""
    usable = [r for r in relays if r.name not in exclude and r.usable(now)]
    usable.sort(key=lambda r: (r.rtt is None, r.rtt or 0.0, r.name))
    return usable[0] if usable else None


async def measure(relay: KnownRelay, timeout: float = 2.0) -> None:
    """The relay's distance from us: one STUN Binding round trip (coturn answers STUN)."""
    relay.rtt = await binding_rtt(relay.address, timeout)


class MemberRelay:
    """Our relay for the network: coturn under `policy`, as our child."""

    def __init__(self, policy: RelayPolicy, run_dir: Path, *, turnserver: str = "turnserver"):
        self.policy = policy
        self.run_dir = Path(run_dir)
        self.turnserver = turnserver
        # new at every start (older credentials die); text, as coturn's key is the string
        self.secret = secrets.token_hex(32).encode()
        self.child: Child | None = None

    @property
    def address(self) -> tuple[str, int]:
        return (self.policy.address, self.policy.port)

    def credential_for(self, peer: str, members: Collection[str]) -> tuple[str, str] | None:
        return self.policy.credential_for(peer, members, self.secret, time.time())

    async def start(self) -> None:
        """Write the configuration, start coturn, return once it answers STUN; raises
        AgentError (turnserver missing, exited, or silent)."""
        program = resolve_program(self.turnserver)
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        conf = self.run_dir / "turnserver.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.policy.config(self.secret, self.run_dir))
        self.child = await Child.start(ChildSpec(dies_with_us([program, "-c", str(conf)])),
                                       name="member relay (turnserver)", grace=3.0)
        deadline = time.monotonic() + START_WAIT
        while time.monotonic() < deadline:
            if not self.child.running:
                raise AgentError(f"the relay's turnserver exited with status "
                                 f"{self.child.exited.result()} (see "
                                 f"{self.run_dir / 'turnserver.log'})", Exit.PROGRAM)
            if await binding_rtt(self.address, 0.5) is not None:
                log.info("member relay on %s:%d (realm %s)", *self.address, self.policy.network)
                return
        await self.stop()
        raise AgentError(f"the relay's turnserver did not answer on {self.address[0]}:"
                         f"{self.address[1]} within {START_WAIT:g} s (port taken?)",
                         Exit.PROGRAM)

    async def stop(self) -> None:
        if self.child is not None:
            await self.child.stop()
