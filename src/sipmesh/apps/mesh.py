"""A mesh member (issue 12, item 2): one WireGuard interface per network, a peer per member.

`sipmesh up NETWORK` runs one `MeshMember`:

1. the network's WireGuard identity, kept in ``STATE/mesh/NETWORK/``: ``wg.key`` (the
   long-term X25519 private key, 0600, never sent or logged) and ``port`` (its UDP port,
   chosen once); the interface (``sm-NETWORK`` by default: wireguard-go's control socket
   ``/var/run/wireguard/IFNAME.sock`` is shared by every namespace, so two members on one
   machine need two names) runs wireguard-go in the foreground as our child;
2. the roster (agent/roster.py): registered under ``sip:net-NETWORK@DOMAIN``, it gives our
   mesh address (the broker's allocation) and joined / left / changed events;
3. one INVITE dialog per pair: the member whose name sorts lower calls the other through
   the SIP server at the other's public GRUU (``sip:net-NETWORK@DOMAIN;gr=INSTANCE``,
   RFC 5627, sip/gruu.py: the server reaches that member alone, behind NAT over its
   roster binding's flow) with ``a=service:mesh``, ``a=IP4``/``a=PORT``
   (the paper's endpoint), ``a=wg-pubkey``, ``a=mesh-ip`` and its ICE description
   (agent/ice.py, the attributes sessions use); the other checks the offer and answers
   with its own;
4. the pair's path from ICE, as a session's (agent/sessionpath.py), on the WireGuard port
   itself: host candidates are that port, checked through raw sockets while wireguard-go
   keeps it (agent/stunport.py); srflx from the STUN server, relay from TURN. The chosen
   path is handed over (agent/handover.py): direct, WireGuard's endpoint is the checked
   remote address (same 5-tuple, the NAT mappings the checks opened); relayed through
   our TURN allocation, the endpoint is our ``RelayProxy`` on 127.0.0.1. The caller then
   ``wg set IF peer KEY allowed-ips IP/32 endpoint ENDPOINT persistent-keepalive K`` (K
   under the consent timeout) and routes ``IP/32`` to the interface; the answerer did
   so before its checks, without endpoint and keepalive, which it adds once the caller's
   handshake came (only the caller initiates: see _expect_handshake). ``Peer.path``/``why``/
   ``rtt_ms`` say what the check chose and why. A peer without ICE gets the paper's
   a=IP4/a=PORT as before;
5. a BYE, the peer leaving the roster (unregistered, or its binding expired) or its path
   falling silent for the consent timeout (``--consent-timeout``, 30 s: the hand-over's
   watch) removes the peer (``wg set IF peer KEY remove``); after a silent path the caller
   of the pair calls again while the roster still lists the peer.

Trust: with the network's CA (``--ca``: ``ca.pub`` and ``revoked``; our ``--cert`` and
``--identity`` key, made by ``sipmesh network ...``), every offer and answer is signed
(`sign_session`) and the peer's verified (`verify_session`): the key and address put on
the interface are the ones its certificate vouches for; a tampered session is refused
(488 to an offer, BYE to an answer) and the reason is logged and kept for status.
Without a CA the roster is trusted: an offer is accepted only from a member the roster
lists, with the mesh address the roster gives it.

Why in apps/: the member is an application of the agent (like apps/wireguard.py, whose
key and tool helpers it uses); agent/ may not import apps/.

Names: with ``--hosts-file`` (the CLI's default /etc/hosts) every roster member, we too,
is ``NAME.NETWORK`` (and ``NAME``) there while we are up (agent/hostsfile.py).

Relay through a member (``--relay``, agent/memberrelay.py): a public member runs coturn and
advertises it in the roster (``mesh-relay``); it gives each peer a credential in the pair's
offer or answer (``a=mesh-relay``); a caller whose pair needs a relay takes the nearest
member relay (``a=mesh-via``), the callee the same one, the network's TURN server only as
a fallback; such a pair's path is ``via NAME``.

A member that moves (agent/mobility.py, the Endpoint's: netlink and STUN; `_moved`):
its roster binding names its new address, and every pair is set up again at once on it
(BYE and a new INVITE, not an ICE restart in the dialog: see docs/mesh.md), the caller of
each pair calling; wireguard-go and the interface stay.

Not yet (later increments): several networks in one process, ICE restarts (a pair whose
path died, or whose member moved, is called again from scratch).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import ipaddress
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

from sipmesh.agent.attributes import build_sdp, read_attribute_list
from sipmesh.agent.endpoint import Endpoint
from sipmesh.agent.errors import AgentError, Exit
from sipmesh.agent.handover import KEEPALIVE as PATH_KEEPALIVE, Handover
from sipmesh.agent.hostsfile import HostsFile
from sipmesh.agent.mobility import Move
from sipmesh.agent.memberrelay import (ATTRIBUTE as RELAY_ATTRIBUTE, RELAY_PORT, RELAY_WAIT,
                                       VIA_ATTRIBUTE, KnownRelay, MemberRelay, RelayPolicy,
                                       choose as choose_relay, measure as measure_relay,
                                       parse_credential, offered_relay)
from sipmesh.agent.ice import (IceConfig, IceError, IceOptions, IceSession, PathReport, render,
                               show_address)
from sipmesh.agent.ice import parse as parse_ice
from sipmesh.agent.params import Choice, IPv4, ParamError, Param, validate
from sipmesh.agent.pathreport import PathReporter
from sipmesh.agent.profile import PORT
from sipmesh.agent.roster import Member, RosterClient, RosterEvent
from sipmesh.agent.session import warning_value
from sipmesh.agent.sessionpath import CONSENT_CAUSE, NO_PATH_CAUSE, bye_with_reason
from sipmesh.agent.stunport import SharedPort
from sipmesh.agent.supervisor import dies_with_us
from sipmesh.agent.trust import (MemberCertificate, TrustError, load_anchor, load_certificate,
                                 load_identity, load_revocations, sign_session, verify_session)
from sipmesh.apps.wireguard import PUBKEY, UAPI_DIR, keypair, uapi_answers
from sipmesh.ops.paths import Pair
from sipmesh.sip.gruu import instance_of, member_instance
from sipmesh.sip.sdp import SDPError
from sipmesh.sip.ua import Call, CallFailed, IncomingCall, UAConfig

log = logging.getLogger("sipmesh.apps.mesh")

SERVICE = Param("service", Choice("mesh"))
MESH_IP = Param("mesh-ip", IPv4())
IP4 = Param("IP4", IPv4())
MESH_PARAMS = (SERVICE, IP4, PORT, PUBKEY, MESH_IP)
KEEPALIVE = 25
MTU = 1420
SOCKET_WAIT = 10.0
CALL_TIMEOUT = 10.0
RETRY_MAX = 30.0
ROSTER_WAIT = 5.0  # for our own address in the roster's first document
# The first handshake (see _expect_handshake): the caller initiates, the answerer only
# answers; the caller initiates afresh each RETRIGGER s without one (wireguard-go's own retry
# waits REKEY_TIMEOUT, 5 s); a pair without one HANDSHAKE_BOUND s after its path is set up
# again. wg show is read every HANDSHAKE_POLL s meanwhile.
RETRIGGER = 1.0
HANDSHAKE_BOUND = 12.0
HANDSHAKE_POLL = 0.05
# The Reason cause of the BYE a member that moved sends the caller of a pair (RFC 3326; 302
# Moved Temporarily): call me again, now (see MeshMember._moved)
MOVED_CAUSE = 302


def keepalive_for(consent_timeout: float) -> int:
    """WireGuard's persistent keepalive: the peer hears from us well within its consent
    timeout (and within conntrack's 30 s): at most PATH_KEEPALIVE, a third of the timeout."""
    if consent_timeout <= 0:
        return int(PATH_KEEPALIVE)
    return max(1, int(min(PATH_KEEPALIVE, consent_timeout / 3)))


def path_why(report: PathReport) -> str:
    """`Peer.why` for a checked path: the pair's candidate types and addresses, and why."""
    if report.kind == "none":
        return report.reason
    return (f"{report.local_type}↔{report.remote_type} {show_address(report.local_address)}↔"
            f"{show_address(report.remote_address)}: {report.reason}")


def interface_for(network: str) -> str:
    return f"sm-{network}"[:15]


# ---------------------------------------------------------------------------- keys, port


def network_dir(state_dir: Path, network: str) -> Path:
    directory = Path(state_dir) / "mesh" / network
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    return directory


def load_or_make_key(directory: Path) -> tuple[Path, str]:
    """(the private key file, our public key): the network's long-term key, made once."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    path = directory / "wg.key"
    if not path.exists():
        private, _ = keypair()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, private + b"\n")
        finally:
            os.close(fd)
    if path.stat().st_mode & 0o077:
        raise AgentError(f"{path} is readable by others: chmod 600 it", Exit.USAGE)
    try:
        raw = base64.b64decode(path.read_bytes().strip(), validate=True)
        key = X25519PrivateKey.from_private_bytes(raw)
    except ValueError:
        raise AgentError(f"{path} does not hold a WireGuard private key", Exit.USAGE) from None
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return path, base64.b64encode(public).decode()


def load_or_pick_port(directory: Path, wanted: int | None) -> int:
    """`wanted`, else the port this network used before, else a free one (kept)."""
    path = directory / "port"
    if wanted:
        port = wanted
    elif path.exists() and path.read_text().strip().isdigit():
        return int(path.read_text().strip())
    else:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("0.0.0.0", 0))
            port = s.getsockname()[1]
    path.write_text(f"{port}\n")
    return port


# ---------------------------------------------------------------------------- trust


@dataclass
class MeshTrust:
    """The network's CA and our certificate and identity key (lock mode files)."""

    ca_dir: Path
    cert_path: Path
    identity_path: Path

    def load(self, network: str, wg_pubkey: str) -> None:
        self.anchor = load_anchor(self.ca_dir / "ca.pub")
        if self.anchor.network != network:
            raise TrustError("other-ca", f"{self.ca_dir} is the CA of {self.anchor.network}, "
                                         f"not {network}")
        revoked = self.ca_dir / "revoked"
        self.revoked = load_revocations(revoked, self.anchor.public_key) if revoked.exists() else ()
        self.certificate: MemberCertificate = load_certificate(self.cert_path)
        self.identity = load_identity(self.identity_path)
        self.certificate.verify(self.anchor.public_key, time.time(), self.revoked)
        if self.certificate.wg_pubkey != wg_pubkey:
            raise TrustError("wrong-wg-key", f"our certificate names WireGuard key "
                             f"{self.certificate.wg_pubkey}, ours is {wg_pubkey} (issue it for "
                             "this key: sipmesh network cert issue ... --wg-pubkey)")

    @property
    def mesh_ip(self) -> str:
        return str(self.certificate.address.ip)


def session_attributes(*, ip4: str, port: int, wg_pubkey: str, mesh_ip: str
                       ) -> list[tuple[str, str]]:
    return [("service", "mesh"), ("IP4", ip4), ("PORT", str(port)),
            ("wg-pubkey", wg_pubkey), ("mesh-ip", mesh_ip)]


def describe(attributes: list[tuple[str, str | None]], *, user: str, ip4: str, port: int,
             trust: MeshTrust | None, call_id: str, from_uri: str, to_uri: str,
             role: str) -> bytes:
    """Our offer or answer, signed when the network has a CA."""
    attributes = list(attributes)
    if trust is not None:
        # a flag (a=end-of-candidates, value None) reads back as ''
        signed = [(name, value or "") for name, value in attributes]
        attributes += sign_session(signed, call_id=call_id, from_uri=from_uri,
                                   to_uri=to_uri, role=role, certificate=trust.certificate,
                                   identity_key=trust.identity)
    return build_sdp(username=user, address=ip4, media="application", proto="WireGuard",
                     port=port, attributes=attributes)


@dataclass(frozen=True)
class PeerParams:
    name: str
    wg_pubkey: str
    mesh_ip: str
    endpoint: str  # IP:PORT


def read_peer(body: bytes, *, name: str, roster_ip: str | None, trust: MeshTrust | None,
              call_id: str, from_uri: str, to_uri: str, role: str) -> PeerParams:
    """The peer's offer (role "offer") or answer, checked: typed values, then its CA
    signature (with a CA) or the roster's address for it (without). Raises ParamError,
    SDPError or TrustError."""
    attributes = read_attribute_list(body)
    values = validate(MESH_PARAMS, {n: v for n, v in attributes if n != "candidate"})
    if trust is not None:
        peer = verify_session(attributes, call_id, from_uri, to_uri, role,
                              trust.anchor.public_key, trust.revoked, expected_name=name)
        mesh_ip, key = str(peer.address.ip), peer.wg_pubkey
    else:
        if roster_ip is None or values["mesh-ip"] != roster_ip:
            raise ParamError("mesh-ip", f"{values['mesh-ip']} is not {name}'s address in the "
                             f"roster ({roster_ip or 'none'})")
        mesh_ip, key = values["mesh-ip"], values["wg-pubkey"]
    return PeerParams(name, key, mesh_ip, f"{values['IP4']}:{values['PORT']}")


# ---------------------------------------------------------------------------- the interface


class Interface:
    """One wireguard-go interface, ours for as long as the member runs."""

    def __init__(self, name: str, *, wireguard_go: str = "wireguard-go", wg: str = "wg",
                 ip: str = "ip") -> None:
        self.name = name
        self.tools = {"wireguard-go": wireguard_go, "wg": wg, "ip": ip}
        self.process: asyncio.subprocess.Process | None = None
        self._dumping: asyncio.Future[dict[str, dict[str, Any]]] | None = None

    def check_free(self) -> None:
        """AgentError if an interface of our name exists (not ours: stop() leaves it)."""
        if Path(f"/sys/class/net/{self.name}").exists():
            raise AgentError(f"interface {self.name} exists already (another `sipmesh up`? "
                             "choose another --ifname)", Exit.USAGE)

    async def start(self, key_file: Path, port: int) -> None:
        """wireguard-go with our key and port; the interface stays down, without an address,
        until up(): it starts while we join the roster that gives us the address."""
        sock = UAPI_DIR / f"{self.name}.sock"
        self.check_free()
        env = dict(os.environ, WG_PROCESS_FOREGROUND="1")
        # if we are killed outright, wireguard-go goes too (SIGTERM: it removes the
        # interface): the peers then see the path fall silent (consent) and drop us
        argv = dies_with_us([self.tools["wireguard-go"], "-f", self.name])
        self.process = await asyncio.create_subprocess_exec(
            *argv, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL)
        deadline = time.monotonic() + SOCKET_WAIT
        while not uapi_answers(sock):
            if self.process.returncode is not None:
                raise AgentError(f"wireguard-go exited with status {self.process.returncode}",
                                 Exit.PROGRAM)
            if time.monotonic() > deadline:
                raise AgentError(f"wireguard-go made no {sock} within {SOCKET_WAIT:g} s",
                                 Exit.PROGRAM)
            await asyncio.sleep(0.02)
        await self.run(["wg", "set", self.name, "private-key", str(key_file),
                        "listen-port", str(port)])

    async def up(self, address: str) -> None:
        """Our mesh address on the started interface, and the interface up."""
        await self.run(["ip", "address", "add", f"{address}/32", "dev", self.name])
        await self.run(["ip", "link", "set", "dev", self.name, "mtu", str(MTU), "up"])

    async def run(self, argv: list[str]) -> None:
        """wg or ip; the key goes to wg as a file name, never in argv or on a pipe we log."""
        command = [self.tools[argv[0]], *argv[1:]]
        try:
            process = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE)
            async with asyncio.timeout(20):
                _, err = await process.communicate()
        except (OSError, asyncio.TimeoutError) as exc:
            raise AgentError(f"{' '.join(command)}: {exc or 'timed out'}", Exit.PROGRAM) from None
        if process.returncode != 0:
            raise AgentError(f"{' '.join(command)}: {err.decode(errors='replace').strip()}",
                             Exit.PROGRAM)

    async def set_peer(self, peer: PeerParams, keepalive: int = KEEPALIVE, *,
                       initiate: bool = True) -> None:
        """The peer's key, address and route; `initiate`: its endpoint and keepalive too,
        and wireguard-go sends a handshake initiation at once. Without, it answers the
        peer's initiation (and learns the endpoint from it) but cannot send one."""
        where = ["endpoint", peer.endpoint, "persistent-keepalive", str(keepalive)]
        await self.run(["wg", "set", self.name, "peer", peer.wg_pubkey, "allowed-ips",
                        f"{peer.mesh_ip}/32", *(where if initiate else [])])
        await self.run(["ip", "route", "replace", f"{peer.mesh_ip}/32", "dev", self.name])

    async def initiate_again(self, peer: PeerParams, keepalive: int = KEEPALIVE) -> None:
        """A fresh handshake initiation now: the peer removed and set again (its route stays;
        wireguard-go sends none within REKEY_TIMEOUT, 5 s, of its last one otherwise)."""
        await self.run(["wg", "set", self.name, "peer", peer.wg_pubkey, "remove"])
        await self.set_peer(peer, keepalive)

    async def remove_peer(self, peer: PeerParams) -> None:
        await self.run(["wg", "set", self.name, "peer", peer.wg_pubkey, "remove"])
        try:
            await self.run(["ip", "route", "del", f"{peer.mesh_ip}/32", "dev", self.name])
        except AgentError:
            pass  # another peer took the address since; its route stays

    async def dump(self) -> dict[str, dict[str, Any]]:
        """Per peer key: endpoint, latest handshake (Unix s, 0: none), rx, tx bytes."""
        process = await asyncio.create_subprocess_exec(
            self.tools["wg"], "show", self.name, "dump", stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL)
        out, _ = await process.communicate()
        return parse_dump(out.decode(errors="replace"))

    async def shaken(self, key: str, timeout: float) -> bool:
        """Whether peer `key` has shaken hands (its latest handshake set) within `timeout`
        s; one `wg show` each HANDSHAKE_POLL s serves every peer waited for."""
        deadline = time.monotonic() + timeout
        while True:
            if self._dumping is None or self._dumping.done():
                self._dumping = asyncio.ensure_future(self.dump())
            if (await asyncio.shield(self._dumping)).get(key, {}).get("latest_handshake"):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(min(HANDSHAKE_POLL, max(0.0, deadline - time.monotonic())))

    async def stop(self) -> None:
        if self.process is None:
            return  # never started: an interface of our name is another's
        if self.process.returncode is None:
            self.process.terminate()
            try:
                async with asyncio.timeout(5):
                    await self.process.wait()
            except asyncio.TimeoutError:
                self.process.kill()
                await self.process.wait()
        if Path(f"/sys/class/net/{self.name}").exists():
            try:
                await self.run(["ip", "link", "delete", "dev", self.name])
            except AgentError as exc:
                log.warning("cannot delete %s: %s", self.name, exc)


def parse_dump(text: str) -> dict[str, dict[str, Any]]:
    """`wg show IF dump`: the first line is the interface, then one line per peer."""
    peers: dict[str, dict[str, Any]] = {}
    for line in text.splitlines()[1:]:
        fields = line.split("\t")
        if len(fields) < 8:
            continue
        peers[fields[0]] = {"endpoint": None if fields[2] == "(none)" else fields[2],
                            "latest_handshake": int(fields[4]) if fields[4].isdigit() else 0,
                            "rx": int(fields[5]) if fields[5].isdigit() else 0,
                            "tx": int(fields[6]) if fields[6].isdigit() else 0}
    return peers


# ---------------------------------------------------------------------------- the member


@dataclass
class Peer:
    name: str
    state: str = "connecting"  # connecting | up | refused | failed
    params: PeerParams | None = None
    call: Call | None = None
    error: str | None = None
    since: float = field(default_factory=time.time)
    # how the tunnel to this peer runs: "direct" | "relayed" | "via MEMBER" | "none", and why
    # (e.g. which ICE pair was chosen); rtt_ms from the path check, None until measured
    path: str = "none"
    why: str = ""
    rtt_ms: float | None = None
    handover: Handover | None = None  # the checked path, watched (None: no ICE)
    relay_note: str | None = None  # why the pair does not go through a member relay
    relay_tried: bool = False  # a member relay was asked for this pair's path


@dataclass
class MeshConfig:
    network: str
    ua: UAConfig
    state_dir: Path
    ifname: str | None = None
    wg_port: int | None = None
    advertise: str | None = None
    mesh_ip: str | None = None  # for servers that allocate none (Kamailio)
    trust: MeshTrust | None = None
    register_expires: int = 300
    ice: IceOptions = field(default_factory=IceOptions)  # --stun, --turn, --consent-timeout
    tools: dict[str, str] = field(default_factory=dict)
    hosts_file: Path | None = None  # members' names there (agent/hostsfile.py); None: none
    pool: str | None = None  # the network's pool, on servers that say none (Kamailio)
    # the pools of the other networks this host is in ({network: CIDR}; cli/up.py asks the
    # other running members): an overlapping pool is refused at join
    pools_in_use: Callable[[], Awaitable[dict[str, str]]] | None = None
    # relay for the network's members (agent/memberrelay.py): coturn on our address
    relay: bool = False
    relay_port: int = RELAY_PORT
    relay_max_bps: int = 0
    turnserver: str = "turnserver"


def overlapping(network: str, pool: str, others: dict[str, str]) -> str | None:
    """Why joining `network` with `pool` is refused beside `others` ({network: pool}), or None."""
    mine = ipaddress.ip_network(pool, strict=False)
    for name, other in sorted(others.items()):
        try:
            theirs = ipaddress.ip_network(other, strict=False)
        except ValueError:
            continue
        if name != network and mine.version == theirs.version and mine.overlaps(theirs):
            return (f"network {network}'s pool {mine} overlaps network {name}'s pool {theirs}, "
                    f"which this host is in already: leave {name} first")
    return None


class MeshMember:
    """`sipmesh up NETWORK`: in the network until request_stop()."""

    def __init__(self, config: MeshConfig) -> None:
        self.config = config
        self.network = config.network
        self.me = config.ua.user
        self.ifname = config.ifname or interface_for(config.network)
        self.interface = Interface(self.ifname, **config.tools)
        self.endpoint = Endpoint(config.ua, on_invite=self._on_invite, advertise=config.advertise,
                                 ice=config.ice, after_move=self._moved)
        self.ice_config: IceConfig | None = None  # None: no ICE (a=IP4/a=PORT only)
        self.shared: SharedPort | None = None     # STUN on our WireGuard port
        self.keepalive = keepalive_for(config.ice.consent_timeout)
        self.roster: RosterClient | None = None
        self.reporter: PathReporter | None = None  # our pairs' paths to the broker
        self.peers: dict[str, Peer] = {}
        self.ready = asyncio.Event()
        self.mesh_ip: str | None = None
        self.pool: str | None = None
        self.port = 0
        self.wg_pubkey = ""
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._lock: dict[str, asyncio.Lock] = {}
        self._stopped = asyncio.Event()
        self.names = HostsFile(config.hosts_file, config.network) if config.hosts_file else None
        self.relay: MemberRelay | None = None         # ours, with --relay
        self.relays: dict[str, KnownRelay] = {}       # the network's member relays (roster)
        self._relays_changed = asyncio.Event()        # a relay's credential arrived

    def request_stop(self) -> None:
        self.endpoint.request_stop()

    # -- lifecycle ------------------------------------------------------------------------
    async def run(self) -> int:
        directory = network_dir(self.config.state_dir, self.network)
        key_file, self.wg_pubkey = load_or_make_key(directory)
        self.port = load_or_pick_port(directory, self.config.wg_port)
        trust = self.config.trust
        if trust is not None:
            try:
                trust.load(self.network, self.wg_pubkey)
            except TrustError as exc:
                raise AgentError(f"network {self.network}: {exc.message}", Exit.USAGE) from None
        self.interface.check_free()
        # wireguard-go starts while we register and learn the roster (our address)
        starting = asyncio.ensure_future(self.interface.start(key_file, self.port))
        try:
            await self.endpoint.listen()
            assert self.endpoint.ua is not None
            if self.config.relay:
                await self._start_relay(directory)
            claimed = self.config.mesh_ip or (trust.mesh_ip if trust is not None else None)
            self.roster = RosterClient(self.endpoint.ua, self.network, mesh_ip=claimed,
                                       register_expires=self.config.register_expires,
                                       relay=self.relay.address if self.relay else None)
            try:
                await self.roster.start()
            except (CallFailed, OSError) as exc:
                raise AgentError(f"cannot join network {self.network}: {exc}",
                                 Exit.UNREACHABLE) from None
            address = await self._own_address()
            self.pool = self.roster.pool or self.config.pool
            await self._check_pool()
            await starting
            await self.interface.up(address)
            self.mesh_ip = address  # status shows it once the interface has it
            self._open_path_checks()
            log.info("network %s: %s up, %s, WireGuard port %d, key %s", self.network, self.ifname,
                     self.mesh_ip, self.port, self.wg_pubkey)
            self.ready.set()
            self._names_changed()
            self.reporter = PathReporter(self.endpoint.ua, self.network, self.roster.aor,
                                         self.pairs, expires=self.config.register_expires)
            self.reporter.start()
            events = asyncio.ensure_future(self._follow_roster())
            await self.endpoint.stopping.wait()
            events.cancel()
            await self._leave()
        finally:
            self._names_changed(leaving=True)
            if self.reporter is not None:
                await self.reporter.stop()
            if self.shared is not None:
                self.shared.close()
            if self.relay is not None:
                await self.relay.stop()
            # started or failed: bounded by SOCKET_WAIT; cancelled, it could leave its
            # wireguard-go behind unnoticed
            await asyncio.gather(starting, return_exceptions=True)
            await self.interface.stop()
            if self.endpoint.ua is not None:
                await self.endpoint.ua.stop()
        return 0

    async def _start_relay(self, directory: Path) -> None:
        """Our relay for the network (--relay): coturn on our address, before we join, so
        the roster advertises only a relay that answers."""
        try:
            address = str(ipaddress.IPv4Address(self.endpoint.local_ip))
        except ValueError:
            raise AgentError(f"network {self.network}: --relay needs an IPv4 address, not "
                             f"{self.endpoint.local_ip}", Exit.USAGE) from None
        policy = RelayPolicy(self.network, self.me, address, self.config.relay_port,
                             self.config.relay_max_bps)
        self.relay = MemberRelay(policy, directory / "relay", turnserver=self.config.turnserver)
        await self.relay.start()

    def _open_path_checks(self) -> None:
        """ICE on our WireGuard port (agent/stunport.py), unless ICE is off."""
        config = self.endpoint.ice_config
        if config is None:
            return
        config = dataclasses.replace(config, portmap=())  # one port for all pairs: not per pair
        shared = SharedPort(self.port, config.host_addresses or (self.endpoint.local_ip,))
        try:
            shared.open()
        except OSError as exc:
            log.warning("network %s: no ICE (cannot check paths on UDP port %d: %s): peers "
                        "get our advertised address only", self.network, self.port, exc)
            return
        self.shared, self.ice_config = shared, config

    async def _own_address(self) -> str:
        assert self.roster is not None
        deadline = time.monotonic() + ROSTER_WAIT
        while self.roster.mesh_ip is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        address = self.roster.mesh_ip
        if address is None:
            raise AgentError(f"network {self.network}: the server gave us no mesh address "
                             "(on a server that allocates none, give --mesh-ip)", Exit.USAGE)
        trust = self.config.trust
        if trust is not None and address != trust.mesh_ip:
            raise AgentError(f"network {self.network}: the roster gives us {address}, our "
                             f"certificate {trust.mesh_ip}", Exit.USAGE)
        return address

    async def _check_pool(self) -> None:
        """Refuse a pool that overlaps one of another network this host is in (its routes
        would shadow the other's); we leave the roster again before saying so."""
        if self.pool is None or self.config.pools_in_use is None:
            return
        why = overlapping(self.network, self.pool, await self.config.pools_in_use())
        if why is not None:
            assert self.roster is not None
            await self.roster.stop()
            raise AgentError(why, Exit.USAGE)

    async def _leave(self) -> None:
        """BYE to every peer, unregister (the roster), then the interface goes."""
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        calls = [p.call for p in self.peers.values() if p.call is not None]
        log.info("network %s: leaving: BYE to %d peers", self.network, len(calls))
        await asyncio.gather(*(_within(5, c.bye()) for c in calls), return_exceptions=True)
        if self.reporter is not None:
            await self.reporter.stop()
        if self.roster is not None:
            try:
                async with asyncio.timeout(10):
                    await self.roster.stop()
            except (asyncio.TimeoutError, OSError) as exc:
                log.warning("network %s: leaving the roster: %s", self.network, exc)

    # -- moving (agent/mobility.py) ----------------------------------------------------------
    async def _moved(self, move: Move) -> None:
        """We moved (the Endpoint advertises our new address already): the roster binding
        names it, ICE checks our WireGuard port from it, and every pair is set up again at
        once, ahead of the consent timeout: each pair we call is called again, each other
        pair's caller is asked to call us again (BYE, Reason cause MOVED_CAUSE). wireguard-go
        keeps running with its key and port: the pairs' peers come back on it with their
        new endpoints."""
        if not self.ready.is_set() or self.endpoint.stopping.is_set() or self.roster is None:
            return
        ua = self.endpoint.ua
        assert ua is not None
        log.info("network %s: we moved (%s): setting up our %d pairs again", self.network,
                 move, len(self.peers))
        old, self.shared, self.ice_config = self.shared, None, None
        self._open_path_checks()        # on our new address
        await self.roster.move()        # our GRUU reaches us here before anyone calls it
        for name, peer in list(self.peers.items()):
            call = peer.call
            if call is not None and not call.ended.done():
                call.moved(str(ua.contact()))
            if self.me < name:          # ours to call: BYE (in _drop), INVITE
                await self._drop(name, "we moved")
                member = self.roster.members.get(name)
                if member is not None:
                    self._joined(member, again=True)
            elif call is not None and not call.ended.done():
                peer.call = None   # our BYE says why (_drop's would not)
                await self._drop(name, "we moved")
                asyncio.ensure_future(_bye(call, MOVED_CAUSE, "moved: call again"))
        if old is not None:
            old.close()

    # -- the roster drives the pairs ---------------------------------------------------------
    async def _follow_roster(self) -> None:
        assert self.roster is not None
        self._sync_relays()
        for member in self.roster.members.values():  # known before we followed
            self._joined(member)
        self._names_changed()
        async for event in self.roster.events():
            self._sync_relays()
            self._on_roster(event)
            self._names_changed()

    def _names_changed(self, leaving: bool = False) -> None:
        """The hosts file's block for this network: every member of the roster by name, we
        too (leaving: the block goes)."""
        if self.names is None or self.roster is None or self.mesh_ip is None:
            return
        members = {} if leaving else {m.name: m.mesh_ip for m in self.roster.members.values()
                                      if m.mesh_ip}
        if not leaving:
            members[self.me] = self.mesh_ip
        try:
            self.names.update(members)
        except OSError as exc:
            log.warning("network %s: cannot write names to %s: %s", self.network,
                        self.names.path, exc)

    def _on_roster(self, event: RosterEvent) -> None:
        if event.kind == "left":
            self._spawn(event.member.name, self._drop(event.member.name,
                                                      f"left the network ({event.reason})"))
        elif event.kind == "changed":
            peer = self.peers.get(event.member.name)
            if peer is None or peer.state != "up" or (
                    peer.params is not None and peer.params.mesh_ip != event.member.mesh_ip):
                self._joined(event.member, again=True)
        else:
            self._joined(event.member)

    def _joined(self, member: Member, again: bool = False) -> None:
        if member.name == self.me or self.me > member.name:
            return  # the member whose name sorts lower calls
        if not again and member.name in self.peers and self.peers[member.name].state == "up":
            return
        self._spawn(member.name, self._dial(member))

    def _spawn(self, name: str, coro: Any) -> None:
        old = self._tasks.get(name)
        if old is not None and not old.done():
            old.cancel()
        task = asyncio.ensure_future(coro)
        self._tasks[name] = task

    # -- member relays (agent/memberrelay.py) ---------------------------------------------
    def _sync_relays(self) -> None:
        """The network's member relays as the roster lists them (not ours): a new one is
        known without a credential until its member's offer or answer brings one."""
        assert self.roster is not None
        listed = {m.name: m.relay for m in self.roster.members.values()
                  if m.relay is not None and m.name != self.me}
        for name in list(self.relays):
            if listed.get(name) != self.relays[name].address:
                del self.relays[name]
        for name, address in listed.items():
            if name not in self.relays:
                assert address is not None
                self.relays[name] = KnownRelay(name, address)

    def _relay_credential(self, name: str) -> list[tuple[str, str]]:
        """Our relay's credential for member `name` (a=mesh-relay), if we relay."""
        if self.relay is None or self.roster is None:
            return []
        issued = self.relay.credential_for(name, self.roster.members)
        return [(RELAY_ATTRIBUTE, f"{issued[0]} {issued[1]}")] if issued else []

    def _learn_relay(self, name: str, attributes: list[tuple[str, str]]) -> None:
        """Member `name`'s offer or answer may carry its relay's credential for us."""
        relay = self.relays.get(name)
        values = [v for n, v in attributes if n == RELAY_ATTRIBUTE]
        if relay is None or len(values) != 1:
            return
        try:
            username, password, expires = parse_credential(values[0], self.me, time.time())
        except ValueError as exc:
            log.warning("network %s: %s's relay credential ignored: %s", self.network, name, exc)
            return
        new = not relay.usable(time.time())
        relay.username, relay.password, relay.expires = username, password, expires
        if not new:
            return
        log.info("network %s: member %s relays for us at %s:%d", self.network, name,
                 *relay.address)
        self._relays_changed.set()
        self._relays_changed = asyncio.Event()
        asyncio.ensure_future(measure_relay(relay))
        for peer in list(self.peers.values()):
            self._move_to_relay(peer)

    def _move_to_relay(self, peer: Peer) -> None:
        """A pair we called that went through the network's TURN server, set up before a
        member relay was known to us, is set up again (once) to go through the relay."""
        member = self.roster.members.get(peer.name) if self.roster else None
        if (member is None or peer.state != "up" or peer.path != "relayed" or peer.relay_tried
                or self.me > peer.name or self.endpoint.stopping.is_set()
                or choose_relay(self.relays.values(), exclude=(self.me, peer.name),
                                now=time.time()) is None):
            return
        log.info("network %s: %s: setting the pair up again through a member relay",
                 self.network, peer.name)
        self._joined(member, again=True)

    async def _pick_relay(self, peer: str, wanted: str | None = None
                          ) -> tuple[KnownRelay | None, str | None]:
        """The member relay for our pair with `peer` (the caller: the nearest; the callee:
        the caller's choice, `wanted`), waiting up to RELAY_WAIT for a credential the
        relay has not given us yet; else (None, why not)."""
        names = [n for n in self.relays if n != peer and (wanted is None or n == wanted)]
        if self.ice_config is None or not names:
            if wanted is not None:
                return None, f"the caller's relay {wanted} is not in our roster"
            return None, None
        deadline = time.monotonic() + RELAY_WAIT
        while True:
            chosen = choose_relay([self.relays[n] for n in names if n in self.relays],
                                  exclude=(self.me, peer), now=time.time())
            left = deadline - time.monotonic()
            if chosen is not None or left <= 0:
                break
            try:
                async with asyncio.timeout(left):
                    await self._relays_changed.wait()
            except asyncio.TimeoutError:
                pass
        if chosen is None:
            return None, f"no credential from member relay {', '.join(sorted(names))} yet"
        return chosen, None

    def _relay_of(self, report: PathReport) -> str | None:
        """The member whose relay carries a relayed path (None: not a member's)."""
        if report.kind != "relayed":
            return None
        for relay in self.relays.values():   # our allocation is on it, or the peer's is
            if report.local_type == "relay" and report.relay_server == relay.address:
                return relay.name
            if (report.local_type != "relay" and report.remote_type == "relay"
                    and report.remote_address is not None
                    and report.remote_address[0] == relay.address[0]):
                return relay.name
        return None

    # -- calling ---------------------------------------------------------------------------
    async def _dial(self, member: Member) -> None:
        """INVITE `member` until it answers (or leaves: this task is cancelled)."""
        pause = 1.0
        while not self.endpoint.stopping.is_set():
            try:
                if await self._call(member):
                    return
            except AgentError as exc:
                log.warning("network %s: %s: %s", self.network, member.name, exc)
            await asyncio.sleep(pause)
            pause = min(pause * 2, RETRY_MAX)

    async def _call(self, member: Member) -> bool:
        ua = self.endpoint.ua
        assert ua is not None
        await self._drop(member.name, "calling again")
        peer = self.peers[member.name] = Peer(member.name)
        call_id = secrets.token_hex(12)
        target = self._member_uri(member.name)
        from_uri, to_uri = str(ua.aor), str(target)
        relay, peer.relay_note = await self._pick_relay(member.name)
        peer.relay_tried = relay is not None
        ice = await self._gather(controlling=True, relay=relay)
        peer.relay_note = peer.relay_note or _relay_refused(ice, relay)
        via = relay.name if relay is not None and peer.relay_note is None and ice else None
        try:
            try:
                sdp = describe(self._attributes(ice, member.name, via=via),
                               user=self.me, ip4=self.endpoint.local_ip,
                               port=self.port, trust=self.config.trust, call_id=call_id,
                               from_uri=from_uri, to_uri=to_uri, role="offer")
            except TrustError as exc:
                await _close(ice)
                raise AgentError(f"cannot sign our offer: {exc.message}", Exit.USAGE) from None
            log.info("network %s: calling %s (%s)", self.network, member.name, target)
            try:
                call = await ua.invite(target, sdp, timeout=CALL_TIMEOUT, call_id=call_id)
            except (CallFailed, OSError) as exc:
                await _close(ice)
                peer.state, peer.error = "failed", f"INVITE: {exc}"
                log.warning("network %s: %s did not accept (%s)", self.network, member.name, exc)
                return False
            peer.call = call
            try:
                params = read_peer(call.remote_sdp, name=member.name, roster_ip=member.mesh_ip,
                                   trust=self.config.trust, call_id=call_id, from_uri=from_uri,
                                   to_uri=to_uri, role="answer")
                self._learn_relay(member.name, read_attribute_list(call.remote_sdp))
                remote = _remote_ice(ice, call.remote_sdp)
            except (SDPError, ParamError, TrustError, IceError) as exc:
                await _close(ice)
                text = exc.message if isinstance(exc, TrustError) else str(exc)
                peer.state, peer.error = "refused", text
                log.warning("network %s: session with %s refused: %s", self.network, member.name, text)
                await call.bye(headers=[("Reason", 'SIP ;cause=488 ;text="refused"')])
                return False
            if remote is None:
                await _close(ice)
            else:
                assert ice is not None
                checked = await self._take_path(peer, params, call, ice,
                                                asyncio.ensure_future(ice.connect(remote)))
                if checked is None:
                    return False
                params = checked
            await self._established(peer, params, call, initiate=True)
            return True
        except asyncio.CancelledError:  # the member left, or changed, while we called
            if peer.handover is None:
                await _close(ice)
            raise

    def _member_uri(self, name: str) -> Any:
        """Where a pair's INVITE goes: `name`'s public GRUU, the network AOR narrowed to its
        binding (RFC 5627; sip/gruu.py): the server forwards over that member's roster
        binding, so NATs are no obstacle, and to no other member; at the server that last
        answered us (each holds our roster bindings)."""
        assert self.roster is not None and self.endpoint.ua is not None
        return self.endpoint.ua.live_target(self.roster.gruu(name))

    # -- answering -------------------------------------------------------------------------
    async def _on_invite(self, incoming: IncomingCall) -> None:
        caller = incoming.caller.uri
        name = getattr(caller, "user", None) or ""
        # the GRUU the caller meant (To keeps it when the server retargets the Request-URI
        # to our contact): a server that forked it to every member anyway gets 404 from
        # the others, and the pair's 200 from us alone
        meant = instance_of(incoming.request.to.uri)
        if meant is not None and meant != member_instance(self.network, self.me):
            incoming.reject(404)  # not us
            return
        if self.endpoint.stopping.is_set():
            incoming.reject(480)  # leaving
            return
        try:
            async with asyncio.timeout(ROSTER_WAIT):
                await self.ready.wait()
        except asyncio.TimeoutError:
            incoming.reject(480, "Not Ready", headers=[("Retry-After", "1")])
            return
        assert self.roster is not None
        member = await self._member(name)
        if member is None:
            log.warning("network %s: INVITE from %s refused: not in the roster", self.network,
                        caller)
            incoming.reject(403, "Not A Member")
            return
        from_uri, to_uri = str(incoming.request.from_.uri), str(incoming.request.to.uri)
        try:
            params = read_peer(incoming.sdp, name=name, roster_ip=member.mesh_ip,
                               trust=self.config.trust, call_id=incoming.call_id,
                               from_uri=from_uri, to_uri=to_uri, role="offer")
            attributes = read_attribute_list(incoming.sdp)
            offered = parse_ice(attributes, allow_loopback=True)
        except (SDPError, ParamError, TrustError, IceError) as exc:
            text = exc.message if isinstance(exc, TrustError) else str(exc)
            self.peers[name] = Peer(name, "refused", error=text)
            log.warning("network %s: session with %s refused: %s", self.network, name, text)
            incoming.reject(488, headers=[("Warning", warning_value(text, self.endpoint.local_ip))])
            return
        self._learn_relay(name, attributes)
        relay, relay_note = None, None
        if offered is not None:   # the caller's member relay, if it chose one
            via = offered_relay(attributes)
            if via is not None:
                relay, relay_note = await self._pick_relay(name, wanted=via)
        ice = await self._gather(controlling=False, relay=relay) if offered is not None else None
        relay_note = relay_note or _relay_refused(ice, relay)
        sdp = describe(self._attributes(ice, name), user=self.me, ip4=self.endpoint.local_ip,
                       port=self.port, trust=self.config.trust, call_id=incoming.call_id,
                       from_uri=from_uri, to_uri=to_uri, role="answer")
        await self._drop(name, "called again")
        peer = self.peers[name] = Peer(name, params=params, relay_note=relay_note,
                                       relay_tried=relay is not None)
        # The interface first, without endpoint: the caller's first handshake initiation
        # then finds its peer, however early it comes, and ours never crosses it
        # (_expect_handshake)
        await self.interface.set_peer(params, initiate=False)
        connecting = None
        if ice is not None:
            # the checks start as the 200 goes out (the caller's may come before its ACK)
            remote = _remote_ice(ice, incoming.sdp)
            assert remote is not None
            connecting = asyncio.ensure_future(ice.connect(remote))
        try:
            call = await incoming.accept(sdp)
        except CallFailed as exc:
            peer.state, peer.error = "failed", f"not established: {exc}"
            if connecting is not None:
                connecting.cancel()
                await _close(ice)
            await self._unset(peer)
            return
        if ice is not None and connecting is not None:
            checked = await self._take_path(peer, params, call, ice, connecting)
            if checked is None:
                await self._unset(peer)
                return
            params = checked
        await self._established(peer, params, call, initiate=False)

    async def _member(self, name: str) -> Member | None:
        """`name` in the roster (waiting a moment: its INVITE may overtake its NOTIFY)."""
        assert self.roster is not None
        deadline = time.monotonic() + ROSTER_WAIT
        while time.monotonic() < deadline:
            member = self.roster.members.get(name)
            if member is not None:
                return member
            await asyncio.sleep(0.05)
        return None

    # -- both sides ------------------------------------------------------------------------
    def _attributes(self, ice: IceSession | None, peer: str, *, via: str | None = None
                    ) -> list[tuple[str, str | None]]:
        """Our offer's or answer's a= lines for `peer`: the mesh's, our relay's credential
        for it (if we relay), the member relay we chose (`via`, in an offer), ICE's."""
        assert self.mesh_ip is not None
        attributes: list[tuple[str, str | None]] = list(session_attributes(
            ip4=self.endpoint.local_ip, port=self.port, wg_pubkey=self.wg_pubkey,
            mesh_ip=self.mesh_ip))
        attributes += self._relay_credential(peer)
        if ice is not None and ice.local is not None:
            if via is not None:
                attributes.append((VIA_ATTRIBUTE, via))
            attributes += render(ice.local)
        return attributes

    async def _gather(self, *, controlling: bool, relay: KnownRelay | None = None
                      ) -> IceSession | None:
        """A pair's ICE session on our WireGuard port (None: ICE is off here). `relay`: a
        member relay, asked for our relayed candidate before the network's TURN server."""
        if self.ice_config is None or self.shared is None:
            return None
        config = self.ice_config
        if relay is not None:
            fallback = config.turn_server
            config = dataclasses.replace(
                config, turn_server=relay.address, turn_username=relay.username,
                turn_password=relay.password,
                more_turn_servers=((fallback, config.turn_username, config.turn_password),)
                if fallback is not None else ())
        ice = IceSession(config, controlling=controlling, shared=self.shared)
        try:
            await ice.gather()
        except OSError as exc:
            log.warning("network %s: cannot gather candidates: %s", self.network, exc)
            await ice.close()
            return None
        return ice

    async def _take_path(self, peer: Peer, params: PeerParams, call: Call, ice: IceSession,
                         connecting: asyncio.Future[PathReport]) -> PeerParams | None:
        """The checks' outcome: `params` with WireGuard's endpoint on the chosen path
        (handed over and watched, agent/handover.py), or None (no path: BYE sent)."""
        await asyncio.wait({connecting, call.ended}, return_when=asyncio.FIRST_COMPLETED)
        if not connecting.done():
            connecting.cancel()
            await _close(ice)
            peer.state, peer.error = "failed", f"the peer ended the session ({call.ended.result()})"
            return None
        try:
            report = connecting.result()
        except IceError as exc:
            report = exc.report or PathReport("none", str(exc))
            peer.state, peer.error = "failed", f"no path: {report.reason}"
            peer.path, peer.why = "none", path_why(report)
            log.warning("network %s: no path to %s: %s", self.network, peer.name, exc)
            await _bye(call, NO_PATH_CAUSE, f"no network path: {report.reason}")
            return None
        try:
            peer.handover = await Handover.take(ice, consent_timeout=self.config.ice.consent_timeout)
        except Exception as exc:  # noqa: BLE001 - e.g. the TURN server refused the channel
            await _close(ice)
            peer.state, peer.error = "failed", f"the path could not be taken: {exc}"
            log.warning("network %s: path to %s: %s", self.network, peer.name, peer.error)
            await _bye(call, NO_PATH_CAUSE, peer.error)
            return None
        peer.path, peer.why = report.kind, path_why(report)
        via = self._relay_of(report)
        if via is not None:
            peer.path = f"via {via}"
        elif report.kind == "relayed" and peer.relay_note:
            peer.why += f" (not through a member relay: {peer.relay_note})"
        peer.rtt_ms = round(report.rtt * 1000, 1) if report.rtt is not None else None
        return dataclasses.replace(params,
                                   endpoint=show_address(peer.handover.endpoint.remote))

    async def _established(self, peer: Peer, params: PeerParams, call: Call, *,
                           initiate: bool) -> None:
        """The pair is up: the caller (`initiate`) points WireGuard at the path, which sends
        the first handshake initiation; the answerer's peer is on the interface already."""
        if self.peers.get(peer.name) is not peer:  # a newer session with the peer took over
            if peer.handover is not None:
                await peer.handover.close()
            await _bye(call, 487, "superseded by a newer session")
            return
        if initiate:
            await self.interface.set_peer(params, self.keepalive)
        peer.params, peer.call, peer.state, peer.since = params, call, "up", time.time()
        if peer.handover is None:
            peer.path, peer.why = "direct", "the address in the peer's offer (no ICE)"
        log.info("network %s: peer %s up: %s at %s, path %s (%s)%s", self.network, peer.name,
                 params.mesh_ip, params.endpoint, peer.path, peer.why,
                 f", rtt {peer.rtt_ms} ms" if peer.rtt_ms is not None else "")
        self._paths_changed()
        asyncio.ensure_future(self._watch(peer, call))
        asyncio.ensure_future(self._expect_handshake(peer, call, params, initiate))
        self._move_to_relay(peer)   # a relay's credential came while we set the pair up

    async def _watch(self, peer: Peer, call: Call) -> None:
        """Until the session ends (BYE) or its path falls silent (consent lost)."""
        lost = asyncio.ensure_future(peer.handover.lost()) if peer.handover else None
        try:
            await asyncio.wait({call.ended} | ({lost} if lost else set()),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            if lost is not None and not lost.done():
                lost.cancel()
        if self.peers.get(peer.name) is not peer or self.endpoint.stopping.is_set():
            return
        silent = lost is not None and lost.done() and not call.ended.done()
        if silent:
            reason = lost.result()  # type: ignore[union-attr]
            asyncio.ensure_future(_bye(call, CONSENT_CAUSE, reason))
            await self._drop(peer.name, reason)
        else:
            await self._drop(peer.name, f"session ended ({call.ended.result()})")
        if silent or any(f"cause={cause}" in (call.bye_reason or "")
                         for cause in (CONSENT_CAUSE, MOVED_CAUSE)):
            member = self.roster.members.get(peer.name) if self.roster else None
            if member is not None:  # still in the roster: perhaps only the path died
                self._joined(member, again=True)

    async def _expect_handshake(self, peer: Peer, call: Call, params: PeerParams,
                                initiate: bool) -> None:
        """The pair's first handshake. Only the caller initiates: two initiations that cross
        are both lost (a wireguard-go that has answered the peer's initiation drops the
        answer to its own) and its retry comes 5 s later (REKEY_TIMEOUT). So the answerer's
        peer has no endpoint until the handshake (it learns it from the caller's
        initiation); then it is pointed at the path and kept alive. The caller initiates
        afresh (its peer set anew: wireguard-go would wait 5 s) each RETRIGGER s without a
        handshake, e.g. when its initiation reached the answerer's relay before the
        answerer's proxy took the allocation. None within HANDSHAKE_BOUND of the path: the
        pair is set up again, as after lost consent."""
        deadline = time.monotonic() + HANDSHAKE_BOUND

        def ours() -> bool:
            return (self.peers.get(peer.name) is peer and not call.ended.done()
                    and not self.endpoint.stopping.is_set())
        try:
            while True:
                left = deadline - time.monotonic()
                if await self.interface.shaken(params.wg_pubkey, min(RETRIGGER, left)):
                    if not initiate and ours():
                        await self.interface.set_peer(params, self.keepalive)
                    return
                if not ours():
                    return
                if time.monotonic() >= deadline:
                    break
                if initiate:
                    log.info("network %s: %s: no WireGuard handshake yet: initiating again",
                             self.network, peer.name)
                    await self.interface.initiate_again(params, self.keepalive)
        except AgentError:
            return  # wireguard-go gone: we are stopping
        reason = f"no WireGuard handshake within {HANDSHAKE_BOUND:g} s of the path"
        log.warning("network %s: %s: %s: setting the pair up again", self.network, peer.name, reason)
        asyncio.ensure_future(_bye(call, CONSENT_CAUSE, reason))
        await self._drop(peer.name, reason)
        member = self.roster.members.get(peer.name) if self.roster else None
        if member is not None:
            self._joined(member, again=True)

    async def _unset(self, peer: Peer) -> None:
        """An answered session that failed before it was up: the peer's key leaves our
        interface (unless a newer session with the peer has it); status keeps its error."""
        params, peer.params = peer.params, None
        if params is not None and self.peers.get(peer.name) is peer:
            try:
                await self.interface.remove_peer(params)
            except AgentError as exc:
                log.warning("network %s: %s", self.network, exc)

    async def _drop(self, name: str, why: str) -> None:
        peer = self.peers.pop(name, None)
        if peer is None:
            return
        self._paths_changed()
        if peer.params is not None:
            log.info("network %s: removing peer %s (%s): %s", self.network, name,
                     peer.params.mesh_ip, why)
            try:
                await self.interface.remove_peer(peer.params)
            except AgentError as exc:  # wireguard-go gone (we are stopping, or it died)
                log.warning("network %s: %s", self.network, exc)
        if peer.handover is not None:
            await peer.handover.close()
        if peer.call is not None and not peer.call.ended.done():
            asyncio.ensure_future(peer.call.bye())

    # -- status ----------------------------------------------------------------------------
    def _paths_changed(self) -> None:
        """A peer came, went or changed its path: the broker hears of it (agent/pathreport.py)."""
        if self.reporter is not None:
            self.reporter.poke()

    @staticmethod
    def _peer_status(peer: Peer) -> dict[str, Any]:
        return {"name": peer.name, "state": peer.state, "error": peer.error, "since": peer.since,
                "path": peer.path, "why": peer.why, "rtt_ms": peer.rtt_ms}

    def pairs(self) -> list[Pair]:
        """Our pairs as `sipmesh status` and the broker's page show them (ops/paths.py)."""
        return [Pair.from_status(self._peer_status(p))
                for p in sorted(self.peers.values(), key=lambda p: p.name)]

    async def status(self) -> dict[str, Any]:
        dump = await self.interface.dump() if self.ready.is_set() else {}
        peers = []
        for peer in sorted(self.peers.values(), key=lambda p: p.name):
            info = self._peer_status(peer)
            if peer.params is not None:
                wg = dump.get(peer.params.wg_pubkey, {})
                info.update(mesh_ip=peer.params.mesh_ip, wg_pubkey=peer.params.wg_pubkey,
                            endpoint=wg.get("endpoint") or peer.params.endpoint,
                            latest_handshake=wg.get("latest_handshake", 0),
                            rx=wg.get("rx", 0), tx=wg.get("tx", 0))
            if peer.handover is not None:   # the checked pair, the watch, the relay proxy
                info["path_detail"] = peer.handover.describe()
            peers.append(info)
        return {"network": self.network, "member": self.me, "interface": self.ifname,
                "mesh_ip": self.mesh_ip, "pool": self.pool, "wg_port": self.port, "wg_pubkey": self.wg_pubkey,
                "roster": self.roster.mode if self.roster else "starting",
                "servers": self.roster.describe() if self.roster else [],
                "trust": "ca" if self.config.trust else "roster",
                "path_reports": self.reporter.state if self.reporter else "starting",
                "relay": {"offered": f"{self.relay.address[0]}:{self.relay.address[1]}"
                          if self.relay else None,
                          "members": {n: r.describe(time.time())
                                      for n, r in sorted(self.relays.items())}},
                "peers": peers}



def _remote_ice(ice: IceSession | None, body: bytes) -> Any:
    """The peer's ICE description when both sides do ICE (None: the paper's endpoint)."""
    if ice is None:
        return None
    return ice.read_remote(read_attribute_list(body))


def _relay_refused(ice: IceSession | None, relay: KnownRelay | None) -> str | None:
    """Why the member relay we asked gave us no allocation (None: it did, or none asked)."""
    if ice is None or relay is None or ice.connection.relay_server == relay.address:
        return None
    refusals = [r for r in ice.connection.relay_refusals if f"{relay.address[0]}:" in r]
    return f"member relay {relay.name}: " + ("; ".join(refusals) or "no allocation")


async def _close(ice: IceSession | None) -> None:
    if ice is not None:
        await ice.close()


async def _within(seconds: float, awaitable: Awaitable[object]) -> None:
    async with asyncio.timeout(seconds):
        await awaitable


async def _bye(call: Call, cause: int, text: str) -> None:
    """BYE with a Reason, not waiting long for its answer (the path may be dead)."""
    try:
        await _within(5, bye_with_reason(call, cause, text))
    except (asyncio.TimeoutError, OSError, CallFailed):
        pass
