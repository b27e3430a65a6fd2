"""A mesh network's roster over SIP, at the broker (issue 12, item 3).

Members of network NAME register a second binding under the network's address-of-record
`sip:net-NAME@DOMAIN`, with their own name as the Contact's user part::

    REGISTER sip:DOMAIN            To: <sip:net-NAME@DOMAIN>     From: <sip:alice@DOMAIN>
    Contact: <sip:alice@192.0.2.4:5072>;+sip.instance="<urn:uuid:...>"

so the bindings of that AOR are the roster, on any registrar. It is read two ways:

* push: SUBSCRIBE to the network AOR with `Event: reg` (RFC 6665 + RFC 3680): a NOTIFY
  with the whole roster (`application/reginfo+xml`, sip/reginfo.py) at once and again on
  every change (a member joins, leaves, expires, is removed from the network);
* poll: REGISTER to the network AOR without a Contact (RFC 3261 §10.2.3): the 200 lists
  the bindings.

What this broker adds, and Kamailio (docs/kamailio) cannot:
* the network is its own digest realm (realm = NAME): a member authenticates with its
  network password, must be a member (broker/networks.py), may bind only contacts
  whose user part is its own name, never `Contact: *`; one binding per member (a member
  that restarts replaces its binding rather than adding one);
* a network with a RADIUS group takes members from the RADIUS server: every REGISTER
  and SUBSCRIBE of a user it accepts (`admit`) makes that user a member when the
  Access-Accept names the group (its address allocated the first time) and takes it
  out when it does not; the others' rosters follow within `poll`;
* each binding's contact URI gets the member's mesh address as a parameter,
  `;mesh-ip=100.64.1.1`, from the broker's allocation (whatever the member claimed): it
  survives in the reginfo `<uri>` and in the 200 of a REGISTER, so the roster carries
  it both ways. On Kamailio the member puts its address there itself. Either way it is
  a hint: a peer trusts only what the network's CA signed (issue 12, item 5);
* a member sees only the members it is paired with (the network's ACL).

Subscriptions live in the worker that received the SUBSCRIBE (a refresh has the same
Call-ID and lands there too). Each worker with subscriptions looks at the subscribed
rosters every `poll` seconds (and at once after a REGISTER it committed itself), since a
REGISTER in another worker or an expiry changes them without telling it. A restarted
broker has no subscriptions: the member's next refresh gets 481 and it subscribes again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from sipmesh.broker.auth import AuthCheck, Authenticator, may_send_as
from sipmesh.broker.domains import LocalIdentity
from sipmesh.broker.location import Binding, Changes, LocationService
from sipmesh.broker.networks import Network, NetworkError, NetworkStore, network_aor_user, network_of_aor_user
from sipmesh.broker.proxy import make_branch
from sipmesh.broker.registrar import Outcome, RegistrarPolicy, format_binding, process_register
from sipmesh.sip import reginfo
from sipmesh.sip.dialog import Dialog, new_tag
from sipmesh.sip.errors import ParseError
from sipmesh.sip.gruu import instance_of, member_instance
from sipmesh.sip.event import EventType, SubscriptionState, parse_event
from sipmesh.sip.message import Request, Response
from sipmesh.sip.transaction.layer import ServerTransaction, TransactionLayer
from sipmesh.sip.transport.base import Flow
from sipmesh.sip.uri import SipURI, parse_sip_uri

log = logging.getLogger("sipmesh.broker.roster")

MESH_PARAM = "mesh-ip"  # the contact URI parameter carrying the member's mesh address
POOL_PARAM = "mesh-pool"  # ... and the network's pool (a member on several networks checks overlap)
EVENT = "reg"
DEFAULT_SUBSCRIBE_EXPIRES = 3600
MAX_SUBSCRIBE_EXPIRES = 3600
MAX_SUBSCRIPTIONS = 10_000  # per worker: a member's flood of SUBSCRIBEs cannot exhaust it

Refusal = tuple[int, str | None, list[tuple[str, str]]]


class Authenticate(Protocol):
    """The broker's `_authenticate`: `then(check)` now or once the RADIUS server answered."""

    def __call__(self, request: Request, realm: str, then: Callable[[AuthCheck], None],
                 key: tuple | None = None, *, radius: bool = False) -> None: ...


@functools.lru_cache(maxsize=4096)
def contact_user(contact: str) -> str | None:
    """The user part of a contact URI (the member's name in a network AOR's binding)."""
    try:
        return parse_sip_uri(contact).user
    except ParseError:
        return None


def with_mesh_address(contact: str, address: str, pool: str) -> str:
    uri = parse_sip_uri(contact)
    uri.params[MESH_PARAM] = address
    uri.params[POOL_PARAM] = pool
    return str(uri)


@dataclass(eq=False, slots=True)
class NetworkRegistration:
    """What the broker's pipeline keeps for a REGISTER to a network AOR."""

    network: Network
    member: str  # the authenticated member


# -- the registrar's side ----------------------------------------------------------------

def decide_network_register(request: Request, aor: str, nreg: NetworkRegistration, current: list[Binding], *,
                            now: float, source: Flow | None, worker: int,
                            policy: RegistrarPolicy) -> tuple[Outcome, Changes]:
    """§10.3 steps 6-8 for a network AOR: the registrar's rules, then one binding per
    member, its mesh address on its contact, and in the 200 only the members it is
    paired with (sans-I/O, run under the store's write lock)."""
    network, member = nreg.network, nreg.member
    policy = dataclasses.replace(policy, max_contacts=max(policy.max_contacts, len(network.members) + 1))
    outcome, changes = process_register(request, aor, current, now=now, source=source, worker=worker,
                                        policy=policy)
    if outcome.status != 200:
        return outcome, changes
    address = network.members[member].address
    upserts = tuple(b._replace(contact=with_mesh_address(b.contact, address, network.pool)) for b in changes.upsert)
    fresh = {b.contact_key for b in upserts}
    stale = {b.contact_key for b in current if upserts and b.contact_key not in fresh
             and contact_user(b.contact) == member}  # the member's older binding: replaced
    deleted = set(changes.delete) | stale
    after = {b.contact_key: b for b in current if b.contact_key not in deleted}
    after.update((b.contact_key, b) for b in upserts)
    visible = sorted((b for b in after.values() if network.paired(member, contact_user(b.contact) or "")),
                     key=lambda b: (-b.q, -b.updated))
    headers = [("Contact", format_binding(b, now)) for b in visible]
    headers += [h for h in outcome.headers if h[0] != "Contact"]
    return Outcome(200, outcome.reason, headers), Changes(upsert=upserts, delete=tuple(deleted))


# -- the notifier's side -----------------------------------------------------------------

@dataclass(eq=False)
class _Seen:
    contact: str
    expires: float


@dataclass(eq=False)
class Subscription:
    """One member's subscription to its network's roster (RFC 6665 §4.2, notifier)."""

    dialog: Dialog
    network: str
    member: str
    aor: str
    event: EventType
    contact: str  # ours, in the 200 and in every NOTIFY
    flow: Flow
    expires_at: float  # time.time()
    version: int = 0
    seen: dict[str, _Seen] = field(default_factory=dict)  # what the last NOTIFY listed, by contact key
    sending: bool = False
    dirty: bool = False
    ended: bool = False


class Roster:
    """The hook object a broker worker holds (broker/server.py calls it in four places)."""

    def __init__(self, *, database, location: LocationService, me: LocalIdentity,
                 auth: Authenticator | None, authenticate: Authenticate, transactions: TransactionLayer,
                 worker: int, policy: RegistrarPolicy, poll: float = 0.25,
                 clock: Callable[[], float] = time.time) -> None:
        self.networks = NetworkStore(database)
        self.location = location
        self.me = me
        self.auth = auth
        self.authenticate = authenticate
        self.transactions = transactions
        self.worker = worker
        self.policy = policy
        self.poll = poll
        self.clock = clock
        self.subscriptions: dict[tuple[str, str, str], Subscription] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._sends: set[asyncio.Task[None]] = set()
        self.closing = False
        if worker == 0:
            for name in set(self.networks.names()) & set(me.domains):
                log.warning("network %s has the name of a served domain: both are realm %s, so the "
                            "domain's passwords would let their users into the network", name, name)
            if auth is None or auth.radius is None:
                for network in self.networks.networks():
                    if network.radius_group is not None:
                        log.warning("network %s takes members from RADIUS group %s, but this broker "
                                    "has no --radius: only its static members get in", network.name,
                                    network.radius_group)

    async def close(self, timeout: float = 1.0) -> None:
        """End every subscription (NOTIFY terminated;reason=deactivated: the members
        subscribe again at once, to the broker that takes over), then stop."""
        self.closing = True  # from now on a SUBSCRIBE gets 503: try the broker that takes over
        for sub in list(self.subscriptions.values()):
            self._drop(sub)
            self._send(sub, terminated="deactivated")
        if self._sends:
            await asyncio.wait(list(self._sends), timeout=timeout)
        for task in [self._task, *self._sends]:
            if task is not None:
                task.cancel()
        await asyncio.gather(*[t for t in [self._task, *self._sends] if t is not None], return_exceptions=True)
        self.networks.close()

    # -- REGISTER ---------------------------------------------------------------------------
    def network_for(self, to_uri: SipURI) -> Network | None:
        """The network whose AOR `to_uri` is (None: an ordinary AOR)."""
        name = network_of_aor_user(to_uri.user)
        return self.networks.network(name) if name is not None else None

    def check_register(self, request: Request, network: Network,
                       then: Callable[[Refusal | None, NetworkRegistration | None], None],
                       key: tuple | None = None) -> None:
        """Steps 3-4 for a network AOR: digest in the network's realm, a member, only its
        own contacts. `then(refusal, None)` or `then(None, what the commit needs)`, now or
        once the RADIUS server has answered (`key`: the datagram, see Broker._authenticate)."""
        if self.auth is None:
            then((403, "Forbidden (networks need digest authentication: start the broker with --users "
                       "or --radius)", []), None)
            return
        self.authenticate(request, network.realm, lambda check: then(*self._judge_register(request, network, check)),
                          key, radius=network.radius_group is not None)

    def _judge_register(self, request: Request, network: Network,
                        check: AuthCheck) -> tuple[Refusal | None, NetworkRegistration | None]:
        if not check.ok:
            return (check.status, check.reason, check.headers), None
        refusal, network = self.admit(network, check, f"Forbidden (not a member of network {network.name})")
        if refusal is not None:
            return refusal, None
        member = check.username
        assert member is not None
        if any(value.strip() == "*" for value in request.headers.get_all("Contact")):
            return (403, "Forbidden (Contact: * would remove every member)", []), None
        try:
            contacts = request.contacts
        except ParseError as exc:
            return (400, f"Bad Request (Contact: {exc.reason})", []), None
        for address in contacts:
            if not isinstance(address.uri, SipURI) or address.uri.user != member:
                return (403, f"Forbidden (a member binds only contacts with its own name, {member})", []), None
        return None, NetworkRegistration(network, member)

    def admit(self, network: Network, check: AuthCheck, refused: str) -> tuple[Refusal | None, Network]:
        """Is the user `check` authenticated a member of `network`? A static member is.
        With a RADIUS group, one whom RADIUS accepted with the group joins (an address
        from the pool the first time) and one accepted without it leaves. (refusal, the
        network as it is now); `refused`: the reason phrase for a user who is no member."""
        user, group = check.username, network.radius_group
        assert user is not None
        held = network.members.get(user)
        if check.radius and group is not None and (group in check.groups) != (held is not None and held.radius):
            try:
                if group in check.groups:
                    address = self.networks.join_by_radius(network.name, user, group)
                    log.info("%s joins network %s as %s: RADIUS group %s", user, network.name, address, group)
                else:
                    self.networks.leave_by_radius(network.name, user)
                    log.info("%s leaves network %s: RADIUS no longer names group %s", user, network.name, group)
            except NetworkError as exc:  # the pool is full, the group changed meanwhile
                log.warning("%s not let into network %s: %s", user, network.name, exc)
                return (403, f"Forbidden (network {network.name} has no address for you)", []), network
            network = self.networks.network(network.name) or network
        if user in network.members:
            return None, network
        if check.radius and group is not None:
            log.info("%s may not join network %s: RADIUS did not name group %s", user, network.name, group)
            return (403, f"Forbidden (not a member of network {network.name}: your account is not in "
                         f"its group {group})", []), network
        log.info("%s is not a member of network %s: refused", user, network.name)
        return (403, refused, []), network

    def committed(self, aors: list[str]) -> None:
        """REGISTERs to these AORs were just committed by this worker: notify soon."""
        if self.subscriptions and any(sub.aor in aors for sub in self.subscriptions.values()):
            self._wake.set()

    # -- a request to one member (a pair's INVITE) ---------------------------------------------
    def to_member(self, txn: ServerTransaction, forward: Callable[[list[Binding]], None]) -> bool:
        """A request to one member of a network: Request-URI its public GRUU (RFC 5627),
        ``sip:net-NAME@DOMAIN;gr=urn:uuid:...`` (apps/mesh.py's pair INVITEs: members behind
        NAT reach each other only through us, over the flow of the member's roster binding).
        False: not such a request. True: taken; the caller authenticates in the network's
        realm as a member (static or by RADIUS group, `authorise_member`) paired with the
        member, then `forward(its bindings of the network AOR)` is called (now or once
        RADIUS has answered), or the request is answered.

        The instance is a member's by its name (sip/gruu.py `member_instance`, what
        `sipmesh up` registers with): Kamailio matches it against the binding's stored
        +sip.instance instead, and the same GRUU reaches the same member on both."""
        uri = txn.request.uri
        if not isinstance(uri, SipURI) or instance_of(uri) is None or not self.me.is_ours(uri):
            return False
        name = network_of_aor_user(uri.user)
        network = self.networks.network(name) if name is not None else None
        if network is None:
            return False
        self.authorise_member(txn, network, "reach its members",
                              functools.partial(self._to_member_authorised, txn, network.name, forward))
        return True

    def _to_member_authorised(self, txn: ServerTransaction, name: str,
                              forward: Callable[[list[Binding]], None], caller: str) -> None:
        uri = txn.request.uri
        assert isinstance(uri, SipURI)
        network = self.networks.network(name)
        if network is None:
            txn.reply(404, f"Not Found (no network {name})", to_tag=new_tag())
            return
        instance = instance_of(uri)
        target = next((m for m in network.members if member_instance(name, m) == instance), None)
        if target is None or not network.paired(caller, target):
            log.info("%s may not reach %s in network %s: %s refused", caller, target or instance,
                     name, txn.request.method)
            txn.reply(403, f"Forbidden (not paired with {target or instance} in {name})",
                      to_tag=new_tag())
            return
        bindings = [b for b in self.location.lookup(self.location_aor(network, uri))
                    if contact_user(b.contact) == target]
        if not bindings:
            txn.reply(480, f"Temporarily Unavailable ({target} is not in {name} now)", to_tag=new_tag())
            return
        forward(bindings)

    # -- SUBSCRIBE ----------------------------------------------------------------------------
    def on_request(self, txn: ServerTransaction) -> bool:
        """Take a SUBSCRIBE for a network's roster (True), or leave the request (False)."""
        request = txn.request
        if request.method != "SUBSCRIBE" or not isinstance(request.uri, SipURI):
            return False
        if self.closing and network_of_aor_user(request.to.uri.user if isinstance(request.to.uri, SipURI)
                                                else None) is not None:
            txn.reply(503, "Service Unavailable (stopping)", to_tag=request.to.tag or new_tag(),
                      headers=[("Retry-After", "1")])
            return True
        to_tag = request.to.tag
        if to_tag is not None:
            sub = self.subscriptions.get((request.call_id, to_tag, request.from_.tag or ""))
            if sub is None:
                if network_of_aor_user(request.uri.user) is None:
                    return False
                txn.reply(481, "Subscription Does Not Exist")
                return True
            self._refresh(txn, sub)
            return True
        if not self.me.is_ours(request.uri):
            return False
        network_name = network_of_aor_user(request.uri.user)
        if network_name is None:
            return False
        network = self.networks.network(network_name)
        if network is None:
            return False  # an ordinary user called net-something
        self._subscribe(txn, network)
        return True

    def authorise_member(self, txn: ServerTransaction, network: Network, what: str,
                         then: Callable[[str], None]) -> None:
        """A request to a network AOR from one of its members, as itself (digest in the
        network's realm; a member static or by RADIUS group, see `admit`): `then(member)`,
        now or once the RADIUS server has answered, or the request is answered (403 says
        "only members of NAME `what`")."""
        if self.auth is None:
            txn.reply(403, "Forbidden (networks need digest authentication)", to_tag=new_tag())
            return
        self.authenticate(txn.request, network.realm, functools.partial(self._member_checked, txn, network, what, then),
                          radius=network.radius_group is not None)

    def _member_checked(self, txn: ServerTransaction, network: Network, what: str, then: Callable[[str], None],
                        check: AuthCheck) -> None:
        if txn.final_sent:
            return
        request, tag = txn.request, new_tag()
        if not check.ok:
            txn.reply(check.status, check.reason, to_tag=tag, headers=check.headers)
            return
        refused = f"Forbidden (only members of {network.name} {what}, as themselves)"
        refusal, network = self.admit(network, check, refused)
        member = check.username
        assert member is not None
        if refusal is not None:
            txn.reply(refusal[0], refusal[1], to_tag=tag)
            return
        from_uri = request.from_.uri
        if not isinstance(from_uri, SipURI) or not may_send_as(member, from_uri.user):
            log.info("%s to network %s from %s refused: not as itself (%s)", request.method, network.name, member,
                     from_uri)
            txn.reply(403, refused, to_tag=tag)
            return
        then(member)

    def _expires(self, txn: ServerTransaction) -> int | None:
        """The granted expiry of a SUBSCRIBE (423 answered: None)."""
        value = (txn.request.headers.get("Expires") or "").strip()
        asked = int(value) if value.isdigit() and len(value) <= 10 else DEFAULT_SUBSCRIBE_EXPIRES
        if 0 < asked < self.policy.min_expires:
            txn.reply(423, headers=[("Min-Expires", str(self.policy.min_expires))],
                      to_tag=txn.request.to.tag or new_tag())
            return None
        return min(asked, MAX_SUBSCRIBE_EXPIRES)

    def _subscribe(self, txn: ServerTransaction, network: Network) -> None:
        request = txn.request
        try:
            event = parse_event(request.headers.get("Event"))
        except ParseError:
            event = None
        if event is None or event.package != EVENT:
            txn.reply(489, "Bad Event", to_tag=new_tag(), headers=[("Allow-Events", EVENT)])
            return
        accept = request.headers.get_all("Accept")
        if accept and not any(reginfo.CONTENT_TYPE in a or "*/*" in a for a in accept):
            txn.reply(406, to_tag=new_tag(), headers=[("Accept", reginfo.CONTENT_TYPE)])
            return
        self.authorise_member(txn, network, "watch its roster",
                              functools.partial(self._subscribe_authorised, txn, network, event))

    def _subscribe_authorised(self, txn: ServerTransaction, network: Network, event: EventType,
                              member: str) -> None:
        request = txn.request
        expires = self._expires(txn)
        if expires is None:
            return
        if len(self.subscriptions) >= MAX_SUBSCRIPTIONS and expires:
            txn.reply(503, to_tag=new_tag(), headers=[("Retry-After", "30")])
            return
        tag = new_tag()
        try:
            dialog = Dialog.from_uas(request, tag)
        except (ValueError, ParseError):
            txn.reply(400, "Bad Request (SUBSCRIBE without a Contact)", to_tag=tag)
            return
        uri: SipURI = request.uri  # type: ignore[assignment]
        ours = SipURI(host=uri.host, user=network_aor_user(network.name), port=uri.port)
        if txn.flow.transport != "UDP":
            ours.params["transport"] = txn.flow.transport.lower()
        sub = Subscription(dialog, network.name, member, self.location_aor(network, uri), event,
                           f"<{ours}>", txn.flow, self.clock() + expires)
        txn.reply(200, to_tag=tag, headers=[("Contact", sub.contact), ("Expires", str(expires))])
        log.info("%s watches the roster of network %s (%d s)", member, network.name, expires)
        if expires == 0:  # a fetch (§4.4.3): one NOTIFY, then the end
            sub.ended = True
            self._send(sub, terminated="timeout")
            return
        self.subscriptions[dialog.id] = sub
        self._ensure_task()
        self._send(sub)

    def location_aor(self, network: Network, uri: SipURI) -> str:
        """The location service's key of the network AOR in `uri`'s domain."""
        domain = self.me.domain_of(uri.host) or self.me.default_domain
        return f"sip:{network.aor_user}@{domain}"

    def _refresh(self, txn: ServerTransaction, sub: Subscription) -> None:
        request = txn.request
        network = self.networks.network(sub.network)
        if network is None:
            self._drop(sub)
            txn.reply(481, "Subscription Does Not Exist (the network is gone)")
            return
        self.authorise_member(txn, network, "watch its roster", lambda _member: self._refreshed(txn, sub))

    def _refreshed(self, txn: ServerTransaction, sub: Subscription) -> None:
        request = txn.request
        if sub.ended:  # ended while the RADIUS server was asked
            txn.reply(481, "Subscription Does Not Exist")
            return
        if not sub.dialog.accept_remote_cseq(request):
            txn.reply(500, "Out Of Order CSeq")
            return
        expires = self._expires(txn)
        if expires is None:
            return
        sub.dialog.update_target(request)
        sub.flow = txn.flow
        txn.reply(200, headers=[("Contact", sub.contact), ("Expires", str(expires))])
        if expires == 0:
            log.info("%s stops watching network %s", sub.member, sub.network)
            self._drop(sub)
            self._send(sub, terminated="timeout")
            return
        sub.expires_at = self.clock() + expires
        self._send(sub)  # §4.2.1.2: a NOTIFY for every refresh too

    def _drop(self, sub: Subscription) -> None:
        sub.ended = True
        self.subscriptions.pop(sub.dialog.id, None)

    # -- NOTIFY ---------------------------------------------------------------------------------
    def _ensure_task(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        """Look at the subscribed rosters every `poll` s (at once when woken); NOTIFY
        where one changed; end subscriptions that expired."""
        while self.subscriptions:
            try:
                async with asyncio.timeout(self.poll):  # (wait_for in 3.11 can lose a cancellation)
                    await self._wake.wait()
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                self.check()
            except Exception:  # a store error must not end the notifier
                log.exception("checking the rosters failed")

    def check(self) -> None:
        now = self.clock()
        networks: dict[str, Network | None] = {}
        bindings: dict[str, list[Binding]] = {}
        for sub in list(self.subscriptions.values()):
            if now >= sub.expires_at:
                log.info("%s's subscription to network %s expired", sub.member, sub.network)
                self._drop(sub)
                self._send(sub, terminated="timeout")
                continue
            if sub.network not in networks:
                networks[sub.network] = self.networks.network(sub.network)
            network = networks[sub.network]
            if network is None or sub.member not in network.members:
                self._drop(sub)
                self._send(sub, terminated="deactivated" if network is None else "rejected")
                continue
            if sub.aor not in bindings:
                bindings[sub.aor] = self.location.lookup(sub.aor)
            current = self._visible(network, sub.member, bindings[sub.aor])
            if set(current) != set(sub.seen) or any(sub.seen[k].contact != b.contact for k, b in current.items()):
                self._send(sub)

    @staticmethod
    def _visible(network: Network, member: str, bindings: list[Binding]) -> dict[str, Binding]:
        return {b.contact_key: b for b in bindings if network.paired(member, contact_user(b.contact) or "")}

    def document(self, sub: Subscription) -> bytes:
        """The next reginfo for `sub`: every visible contact, and once more (terminated)
        the ones gone since its last NOTIFY. Updates what `sub` has seen."""
        now = self.clock()
        network = self.networks.network(sub.network)
        current = self._visible(network, sub.member, self.location.lookup(sub.aor)) if network else {}
        contacts = []
        for key, b in current.items():
            event = "registered" if key in sub.seen else "created"
            contacts.append(reginfo.ContactInfo(b.contact, _id(key), "active", event, b.remaining(now)))
        for key, gone in sub.seen.items():
            if key not in current:
                event = "expired" if gone.expires <= now + 0.5 else "unregistered"
                contacts.append(reginfo.ContactInfo(gone.contact, _id(key), "terminated", event, 0))
        sub.seen = {k: _Seen(b.contact, b.expires) for k, b in current.items()}
        state = "active" if current else "terminated" if contacts else "init"
        info = reginfo.RegInfo(sub.version, "full", [reginfo.RegistrationInfo(sub.aor, _id(sub.aor), state, contacts)])
        sub.version += 1
        return reginfo.serialise(info)

    def _send(self, sub: Subscription, terminated: str | None = None) -> None:
        """NOTIFY the current roster (one at a time per subscription, RFC 6665 §4.2.2)."""
        if sub.sending:
            sub.dirty = True
            if terminated is None:
                return
        task = asyncio.ensure_future(self._notify(sub, terminated))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _notify(self, sub: Subscription, terminated: str | None) -> None:
        sub.sending = True
        try:
            while True:
                sub.dirty = False
                response = await self._notify_once(sub, terminated)
                if response is not None and response.status in (404, 405, 408, 410, 416, 480, 481, 482,
                                                                 483, 484, 485, 489, 501, 604):
                    log.info("%s's subscription to network %s ended: NOTIFY answered %d", sub.member,
                             sub.network, response.status)
                    self._drop(sub)
                    return
                if terminated is not None or not sub.dirty or sub.ended:
                    return
        finally:
            sub.sending = False

    async def _notify_once(self, sub: Subscription, terminated: str | None) -> Response | None:
        body = self.document(sub)
        request = sub.dialog.create_request("NOTIFY", contact=sub.contact)
        request.headers.add("Event", str(sub.event))
        remaining = max(0, int(sub.expires_at - self.clock()))
        state = SubscriptionState("terminated", reason=terminated) if terminated else \
            SubscriptionState("active", expires=remaining)
        request.headers.add("Subscription-State", str(state))
        request.headers.add("Content-Type", reginfo.CONTENT_TYPE)
        request.body = body
        try:
            flow = await self._flow(sub)
            # the subscriber's own flow (its NAT mapping) stays as it is, however large the
            # roster: a TCP connection towards a NAT could not be opened (§18.1.1 aside)
            flow = self.transactions.add_via(request, flow, branch=make_branch(self.worker, "0"),
                                             pinned=flow is sub.flow)
            return await self.transactions.send_request(request, flow).wait_final()
        except OSError as exc:
            log.info("NOTIFY to %s (network %s) not sent: %s", sub.member, sub.network, exc)
            return None

    async def _flow(self, sub: Subscription) -> Flow:
        """Where the subscriber is: over the flow its SUBSCRIBE came on (NATs let the
        answer in there), unless that was a connection now closed; then its Contact."""
        transport = self.transactions.transport
        if not sub.flow.reliable or transport.has_connection(sub.flow):
            return sub.flow
        target = sub.dialog.remote_target
        if not isinstance(target, SipURI):
            raise OSError(f"cannot reach {target}")
        return await self.transactions.resolver.uri_flow(target, sub.flow.transport)


def _id(key: str) -> str:
    return "c" + hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=5).hexdigest()
