"""A member's view of its mesh network's roster, over SIP (issue 12, item 3).

The roster is the set of bindings of the network's address-of-record `sip:net-NAME@DOMAIN`
(broker/roster.py has the broker's side). A member

1. registers there a second binding: its Contact with its own name as the user part,
   `+sip.instance`, and (on servers that do not allocate addresses, i.e. Kamailio) its
   mesh address as the `mesh-ip` URI parameter;
2. reads the roster by push, SUBSCRIBE `Event: reg` (RFC 6665, RFC 3680), refreshed before
   it runs out and made again when the server ends it; or by poll, REGISTER without a
   Contact (RFC 3261 §10.2.3) every `poll_interval`, when the server offers no reg event
   package (or while it refuses the subscription);
   With several servers (an agent's `--server` repeated, or DNS SRV): 1 and 2 at each,
   the roster being the union of theirs (`RosterClient`), so that a server's loss hides
   no member that joined through another;
3. turns each document into events: `joined`, `left` (with the reason the server gave:
   `unregistered`, `expired`, ...), `changed` (another contact or mesh address).

`RosterState` does 3 and no I/O; `RosterClient` does 1-3 over a `UserAgent`, for as long
as the member is in the network. Everything in a roster is a hint from the server: names
and addresses are checked against limits here, and a peer is trusted only once its
certificate (signed by the network's CA, not the server) says the same (issue 12, item 5).

    client = RosterClient(ua, "lab")
    await client.start()
    async for event in client.events():   # joined / left / changed, with name, contact, mesh address
        ...
    await client.stop()                   # unsubscribe, unregister
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from sipmesh.agent.memberrelay import parse_relay_address
from sipmesh.agent.registration import Registration, register_everywhere
from sipmesh.sip import reginfo
from sipmesh.sip.errors import ParseError
from sipmesh.sip.gruu import member_instance, public_gruu
from sipmesh.sip.headers import Address
from sipmesh.sip.message import Response
from sipmesh.sip.ua import CallFailed, Subscription, UserAgent
from sipmesh.sip.uri import SipURI, parse_sip_uri, parse_uri

log = logging.getLogger("sipmesh.agent.roster")

AOR_PREFIX = "net-"  # the network's AOR is sip:net-NAME@DOMAIN (as broker/networks.py has it)
MESH_PARAM = "mesh-ip"  # the contact URI parameter with the member's mesh address
POOL_PARAM = "mesh-pool"  # ... and the network's address pool (our broker sets both)
RELAY_PARAM = "mesh-relay"  # HOST:PORT of the member's relay for the network (`up --relay`)
EVENT = "reg"
MAX_MEMBERS = 4096
RESUBSCRIBE_EVERY = 10  # while polling, try to subscribe again every this many polls
SUBSCRIBE_TIMEOUT = 10.0  # s for a SUBSCRIBE's answer (as for a REGISTER's)
_NAME = re.compile(r"^[A-Za-z0-9\-_.!~*'()&=+$,;?/%]{1,64}$")  # a SIP user name we accept as a member's
# Responses to SUBSCRIBE that mean "this server has no roster to push": poll instead.
_NO_PUSH = frozenset({403, 404, 405, 406, 480, 489, 501})


class NeedFullState(Exception):
    """A partial reginfo document skipped a version: the roster must be fetched anew."""


@dataclass(frozen=True, slots=True)
class Member:
    name: str
    contact: str  # the contact URI the member registered (where SIP reaches it)
    mesh_ip: str | None = None  # its mesh address as the roster says (a hint, see above)
    pool: str | None = None  # the network's address pool as the server says (a CIDR)
    relay: tuple[str, int] | None = None  # the member relays for the network here (a hint)


@dataclass(frozen=True, slots=True)
class RosterEvent:
    kind: str  # joined | left | changed
    member: Member  # left: as it was last known
    reason: str | None = None  # left: unregistered, expired, deactivated, ...; or why nothing is known


def network_aor(network: str, domain_uri: SipURI) -> SipURI:
    """sip:net-NETWORK@DOMAIN for the UA's domain."""
    return SipURI(host=domain_uri.host, user=AOR_PREFIX + network, port=domain_uri.port)


def member_of(uri_text: str) -> Member | None:
    """A Member from a contact URI, or None if it is not one we accept."""
    try:
        uri = parse_sip_uri(uri_text)
    except ParseError:
        return None
    if uri.user is None or not _NAME.match(uri.user):
        return None
    address = uri.params.get(MESH_PARAM)
    try:
        mesh_ip = str(ipaddress.ip_address(address)) if address else None
    except ValueError:
        mesh_ip = None  # hostile or garbled: no address rather than a wrong one
    try:
        pool = str(ipaddress.ip_network(uri.params[POOL_PARAM])) if uri.params.get(POOL_PARAM) else None
    except ValueError:
        pool = None
    relay = uri.params.get(RELAY_PARAM)
    return Member(uri.user, str(uri), mesh_ip, pool,
                  parse_relay_address(relay) if isinstance(relay, str) else None)


def _contact_key(member: Member) -> str:
    """Contacts compare by where they reach (not by the parameters a server may add)."""
    uri = parse_sip_uri(member.contact)
    return f"{uri.user}@{uri.host.lower()}:{uri.port}/{(uri.transport or 'udp').lower()}"


class RosterState:
    """The roster as last told, sans-I/O: feed it documents, get the events they cause."""

    def __init__(self, network: str, *, me: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.network = network
        self.me = me  # our own name: kept apart (`self_member`), never an event
        self.clock = clock
        self.members: dict[str, Member] = {}  # the others, by name
        self.self_member: Member | None = None
        self.version: int | None = None
        self._contacts: dict[str, tuple[Member, float]] = {}  # key -> (member, expires at)
        self._expiry: dict[str, float] = {}  # when each member's binding runs out, as last told

    # -- what the server says ---------------------------------------------------------------
    def from_reginfo(self, body: bytes) -> list[RosterEvent]:
        """A NOTIFY's body. An empty body (a server with nothing published yet) is an
        empty roster. Raises RegInfoError (bad document) or NeedFullState."""
        if not body.strip():
            return self._replace({}, {})
        info = reginfo.parse(body)
        if info.state == "partial":
            if self.version is not None and info.version <= self.version:
                return []  # older than what we have
            if self.version is None or info.version != self.version + 1:
                raise NeedFullState(f"reginfo version {info.version} after {self.version}")
        self.version = info.version
        now = self.clock()
        contacts = {} if info.state == "full" else dict(self._contacts)
        reasons: dict[str, str] = {}
        for registration in info.registrations:
            if not self._ours(registration.aor):
                continue
            for c in registration.contacts:
                member = member_of(c.uri)
                if member is None:
                    log.debug("roster of %s: contact %r ignored", self.network, c.uri[:100])
                    continue
                key = _contact_key(member)
                if c.state == "active":
                    if len(contacts) < MAX_MEMBERS or key in contacts:
                        contacts[key] = (member, now + (c.expires if c.expires is not None else 3600))
                else:
                    contacts.pop(key, None)
                    reasons[member.name] = c.event or "terminated"
        return self._replace(contacts, reasons)

    def from_bindings(self, contacts: list[Address]) -> list[RosterEvent]:
        """The Contacts of a 200 to REGISTER-fetch (all of the AOR's bindings)."""
        now = self.clock()
        found: dict[str, tuple[Member, float]] = {}
        for address in contacts[:MAX_MEMBERS]:
            member = member_of(str(address.uri))
            if member is not None:
                expires = address.expires
                found[_contact_key(member)] = (member, now + (expires if expires is not None else 3600))
        return self._replace(found, {})

    def union(self, views: list["RosterState"], reasons: dict[str, str]) -> list[RosterEvent]:
        """This roster made the union of `views` (each one server's, ours in order): every
        contact any of them lists; one listed by several as the first says (should two
        servers give a member different mesh addresses, every member that lists the servers
        in the same order takes the same one, and it does not flip with each refresh).
        `reasons`: why members left, as the views said."""
        contacts: dict[str, tuple[Member, float]] = {}
        for view in views:
            for key, held in view._contacts.items():
                contacts.setdefault(key, held)
        return self._replace(contacts, reasons)

    def clear(self, reason: str) -> list[RosterEvent]:
        """Nothing is known any more (we left the network)."""
        return self._replace({}, {name: reason for name in self.members})

    def _ours(self, aor: str) -> bool:
        try:
            uri = parse_uri(aor)
        except ParseError:
            return False
        return isinstance(uri, SipURI) and uri.user == AOR_PREFIX + self.network

    # -- the members, and what changed ------------------------------------------------------------
    def _replace(self, contacts: dict[str, tuple[Member, float]], reasons: dict[str, str]) -> list[RosterEvent]:
        self._contacts = contacts
        best: dict[str, tuple[Member, float]] = {}
        for member, expires_at in contacts.values():  # one contact per name: the freshest
            held = best.get(member.name)
            if held is None or expires_at > held[1]:
                best[member.name] = (member, expires_at)
        self.self_member = best.pop(self.me, (None, 0.0))[0] if self.me is not None else None
        fresh = {name: member for name, (member, _) in best.items()}
        now = self.clock()
        events = []
        for name, old in self.members.items():
            if name not in fresh:
                # A server that leaves a gone contact out (Kamailio) gives no reason: one
                # whose time had run out expired.
                reason = reasons.get(name) or ("expired" if self._expiry.get(name, now + 2) <= now + 1
                                               else "unregistered")
                events.append(RosterEvent("left", old, reason))
        for name, member in fresh.items():
            old = self.members.get(name)
            if old is None:
                events.append(RosterEvent("joined", member))
            elif old != member:
                events.append(RosterEvent("changed", member))
        self.members = fresh
        self._expiry = {name: expires_at for name, (_, expires_at) in best.items()}
        return events


@dataclass(eq=False)
class ServerView:
    """What one of our servers holds of the roster, and our membership there."""
    server: str  # host[:port], one of `UserAgent.servers`
    state: RosterState  # the roster as this server last told it
    registration: Registration  # our binding under the network AOR there
    subscription: Subscription | None = None
    mode: str = "starting"  # -> push | poll
    no_push: bool = False  # it has no reg event package: poll, rarely try again
    first_read: asyncio.Future[bool] | None = None  # our first try to read it (True: done)


class RosterClient:
    """Our membership of a network's roster, for as long as we are in the network.

    `ua` is the network's own user agent (its credentials are the member's ID and password
    for this network: the network is their realm). `mesh_ip` is put on our contact for
    servers that do not allocate addresses (our broker sets its own allocation anyway).

    With several servers (`UserAgent.servers`: --server repeated, or DNS SRV) we are a
    member at each: our binding is registered at every one, and every one's roster is read
    (subscribed to, or polled) on its own, so that a member that registered at only one
    of them (it joined while the other was down) is seen all the same. The roster we act
    on is the union of theirs (`ServerView`): a member is in it while any server lists it;
    one that a dead server still lists stays until that server tells otherwise (after it
    is back: see docs/mesh.md, "Two servers")."""

    def __init__(self, ua: UserAgent, network: str, *, mesh_ip: str | None = None,
                 instance: str | None = None, register_expires: int = 300,
                 subscribe_expires: int = 120, poll_interval: float = 30.0, push: bool = True,
                 relay: tuple[str, int] | None = None,
                 on_event: Callable[[RosterEvent], None] | None = None) -> None:
        self.ua = ua
        self.network = network
        self.aor = network_aor(network, parse_sip_uri(f"sip:{ua.config.domain}"))
        # derived from the network's and our name, so that a peer can reach this binding
        # alone by its public GRUU (sip/gruu.py, `gruu`)
        self.instance = instance or member_instance(network, ua.config.user)
        self.register_expires = register_expires
        self.subscribe_expires = subscribe_expires
        self.poll_interval = poll_interval
        self.push = push
        self.on_event = on_event
        self.state = RosterState(network, me=ua.config.user)  # the union of the views
        self.views: list[ServerView] = []  # one per server, ours first
        self._mesh_ip = mesh_ip
        self._relay = relay
        self._events: asyncio.Queue[RosterEvent | None] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._registering: set[asyncio.Task[None]] = set()
        self._stopped = False

    @property
    def members(self) -> dict[str, Member]:
        return dict(self.state.members)

    @property
    def mode(self) -> str:
        """push (some server pushes the roster), poll (we poll each), starting, stopped."""
        if self._stopped:
            return "stopped"
        modes = {view.mode for view in self.views}
        return next((m for m in ("push", "poll") if m in modes), "starting")

    @property
    def subscription(self) -> Subscription | None:
        """The subscription at the first server that has one."""
        return next((v.subscription for v in self.views if v.subscription is not None), None)

    @property
    def registrations(self) -> list[Registration]:
        return [view.registration for view in self.views]

    @property
    def mesh_ip(self) -> str | None:
        """Our own mesh address as the roster has it (the broker's allocation)."""
        me = self.state.self_member
        return me.mesh_ip if me is not None else self._mesh_ip

    @property
    def pool(self) -> str | None:
        """The network's address pool as the server says (None: it says none, e.g. Kamailio)."""
        me = self.state.self_member
        return me.pool if me is not None else None

    def gruu(self, name: str) -> SipURI:
        """Where a request to member `name` alone goes: its public GRUU (RFC 5627), the
        network AOR narrowed to its binding's instance. A registrar routes it to that one
        binding (Kamailio's lookup(), our broker's broker/roster.py `to_member`)."""
        return public_gruu(self.aor, member_instance(self.network, name))

    def contact(self) -> Address:
        """Our binding under the network AOR."""
        uri = self.ua.contact().uri
        assert isinstance(uri, SipURI)
        uri = uri.copy()
        if self._mesh_ip is not None:
            uri.params[MESH_PARAM] = self._mesh_ip
        if self._relay is not None:
            uri.params[RELAY_PARAM] = f"{self._relay[0]}:{self._relay[1]}"
        return Address(uri, params={"+sip.instance": f'"<{self.instance}>"'})

    def describe(self) -> list[dict[str, object]]:
        """Per server: our roster binding there (Registration.describe) and how we read it."""
        return [{**view.registration.describe(), "roster": view.mode} for view in self.views]

    def aor_at(self, server: str) -> SipURI:
        """The network AOR as a request to `server` names it."""
        at = parse_sip_uri(f"sip:{server}")
        return self.aor.copy(host=at.host, port=at.port)

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Register under the network AOR at every server (raises AgentError if every one
        refused), then read the roster, by SUBSCRIBE or REGISTER-fetch, at each and keep
        it current; returns once one was read (or every first try failed)."""
        domain = self.ua.config.domain
        min_retry = min(10.0, self.register_expires / 4)
        self.views = [
            ServerView(server, RosterState(self.network, me=self.ua.config.user),
                       Registration(self.ua, expires=self.register_expires, aor=self.aor,
                                    contact=self.contact(), min_retry=min_retry,
                                    server=server if server != domain else None))
            for server in self.ua.servers]
        await register_everywhere(self.ua, self.registrations, tasks=self._registering)
        loop = asyncio.get_running_loop()
        for view in self.views:
            view.first_read = loop.create_future()
            self._tasks.append(self.ua.spawn(self._run(view)))  # type: ignore[arg-type]
        pending = {v.first_read for v in self.views if v.first_read is not None}
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if any(f.result() for f in done):
                return

    async def move(self) -> None:
        """We moved (agent/mobility.py): our binding names our new address now. It keeps
        its `+sip.instance`, so the registrar replaces the old one (RFC 5626 §6; our broker
        keeps one binding per member), at every server: the members' GRUU reaches us here
        at once. Each roster subscription is refreshed from here too, in the background (a target
        refresh: NOTIFYs come to our new Contact)."""
        if self.mode == "stopped":
            return
        contact = self.contact()
        for view in self.views:   # at every server
            view.registration.contact = contact
        await asyncio.gather(*(view.registration.move(None) for view in self.views))
        for view in self.views:
            if view.subscription is not None and not view.subscription.ended.done():
                self.ua.spawn(self._refresh_moved(view.subscription))

    async def _refresh_moved(self, subscription: Subscription) -> None:
        try:
            await subscription.refresh()
        except (OSError, RuntimeError, CallFailed) as exc:
            log.info("network %s: roster refresh after the move: %s", self.network, exc)

    async def stop(self) -> None:
        """Leave: unsubscribe, remove our binding (Expires 0), at every server."""
        self._stopped = True
        for task in [*self._tasks, *self._registering]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._registering, return_exceptions=True)
        await asyncio.gather(*(v.subscription.unsubscribe() for v in self.views
                               if v.subscription is not None), return_exceptions=True)
        await asyncio.gather(*(r.unregister() for r in self.registrations), return_exceptions=True)
        self._emit(self.state.clear("we left"))
        self._events.put_nowait(None)

    async def events(self) -> AsyncIterator[RosterEvent]:
        while True:
            event = await self._events.get()
            if event is None:
                return
            yield event

    def _told(self, view: ServerView, events: list[RosterEvent]) -> None:
        """`view` changed (its `events`): the union again, and what changed in it."""
        reasons = {e.member.name: e.reason for e in events if e.kind == "left" and e.reason}
        self._emit(self.state.union([v.state for v in self.views], reasons))

    def _emit(self, events: list[RosterEvent]) -> None:
        for event in events:
            log.info("network %s: %s %s%s%s", self.network, event.member.name, event.kind,
                     f" ({event.member.mesh_ip})" if event.member.mesh_ip else "",
                     f": {event.reason}" if event.reason else "")
            self._events.put_nowait(event)
            if self.on_event is not None:
                self.on_event(event)

    # -- push ----------------------------------------------------------------------------------
    async def _subscribe(self, view: ServerView) -> bool:
        """SUBSCRIBE to the roster at `view`'s server; False if it will not push it now
        (`no_push` says whether it never will: no reg event package there)."""
        try:
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT):  # (a dead server: not 32 s)
                subscription = await self.ua.subscribe(self.aor_at(view.server), EVENT,
                                                       accept=reginfo.CONTENT_TYPE,
                                                       expires=self.subscribe_expires)
        except (OSError, CallFailed, TimeoutError) as exc:
            log.warning("network %s: cannot subscribe to the roster at %s (%s): polling",
                        self.network, view.server, str(exc) or "no answer")
            view.mode = "poll"
            return False
        if subscription.ended.done():
            reason = subscription.ended.result()
            view.no_push = reason[:3].isdigit() and int(reason[:3]) in _NO_PUSH
            log.info("network %s: %s does not push the roster (%s): polling", self.network,
                     view.server, reason)
            view.mode = "poll"
            return False
        view.subscription = subscription
        view.mode = "push"
        return True

    async def _run(self, view: ServerView) -> None:
        """Read `view`'s roster once, then follow the subscription while there is one;
        without, poll, and subscribe again: soon (1 s, doubling up to `poll_interval`)
        when the server was unreachable or ended it, every RESUBSCRIBE_EVERY polls when it
        has no reg event package."""
        read = False
        try:
            read = (self.push and await self._subscribe(view)) or await self._poll_once(view)
        finally:
            if view.first_read is not None and not view.first_read.done():
                view.first_read.set_result(read)
        polls, pause = 0, 1.0
        while not self._stopped:
            if view.subscription is not None:
                await self._follow(view, view.subscription)
                if self._stopped:
                    return
                pause = 1.0
                if await self._subscribe(view):
                    continue
                await self._poll_once(view)
            slow = view.no_push or not self.push
            await asyncio.sleep(self.poll_interval if slow else min(pause, self.poll_interval))
            pause *= 2
            polls += 1
            if self.push and (not view.no_push or polls % RESUBSCRIBE_EVERY == 0) and \
                    await self._subscribe(view):
                continue  # the server pushes (again)
            await self._poll_once(view)

    async def _follow(self, view: ServerView, subscription: Subscription) -> None:
        """Apply each NOTIFY, refresh before the subscription runs out; return when it
        ends (a refresh the server does not answer ends it: 408)."""
        loop = asyncio.get_running_loop()
        while not subscription.ended.done():
            expires_at = subscription.expires_at or loop.time() + self.subscribe_expires
            # refresh at 80 % of the time left, at least 5 s before the end (RFC 6665 §4.1.2.2)
            refresh_in = max(1.0, min((expires_at - loop.time()) * 0.8, expires_at - loop.time() - 5))
            try:
                async with asyncio.timeout(refresh_in):  # (not wait_for: see registration._send)
                    notification = await subscription.next_notification()
            except asyncio.TimeoutError:
                try:
                    response = await subscription.refresh()
                except (OSError, RuntimeError) as exc:
                    log.warning("network %s: roster refresh at %s failed: %s", self.network,
                                view.server, exc)
                    continue
                if response.status >= 300 and not subscription.ended.done():
                    log.warning("network %s: roster refresh at %s answered %d %s", self.network,
                                view.server, response.status, response.reason)
                continue
            if notification is None:
                break
            if notification.content_type not in (None, reginfo.CONTENT_TYPE):
                continue
            try:
                self._told(view, view.state.from_reginfo(notification.body))
            except NeedFullState as exc:
                log.info("network %s: %s: fetching the roster anew", self.network, exc)
                await subscription.refresh()
            except reginfo.RegInfoError as exc:
                log.warning("network %s: unusable roster document: %s", self.network, exc)
        if not self._stopped:
            log.info("network %s: roster subscription at %s ended (%s): subscribing again",
                     self.network, view.server,
                     subscription.ended.result() if subscription.ended.done() else "?")
        view.subscription = None

    # -- poll -----------------------------------------------------------------------------------
    async def _poll_once(self, view: ServerView) -> bool:
        """Fetch `view`'s roster once; False if it could not be read."""
        view.mode = "poll"
        domain = self.ua.config.domain
        try:
            async with asyncio.timeout(10.0):
                response: Response = await self.ua.fetch_bindings(
                    self.aor, server=view.server if view.server != domain else None)
        except (OSError, asyncio.TimeoutError, CallFailed) as exc:
            log.warning("network %s: cannot fetch the roster at %s: %s", self.network, view.server, exc)
            return False
        if response.status != 200:
            log.warning("network %s: fetching the roster at %s answered %d %s", self.network,
                        view.server, response.status, response.reason)
            return False
        try:
            self._told(view, view.state.from_bindings(response.contacts))
        except ParseError as exc:
            log.warning("network %s: unusable roster in the REGISTER answer: %s", self.network, exc.reason)
            return False
        return True
