"""Host names to addresses (RFC 3263), in one place.

Every message sipmesh sends to a host name goes through a `Resolver` before a
transport sees it: the transport layer takes IP addresses only. (uvloop's sendto
raises ValueError for a name; asyncio's would block the event loop on a lookup.)

- Requests (§4): a URI's transport is its `transport` parameter, TLS for sips:, or
  the caller's default. A numeric host is used as it is. A name with an explicit
  port is looked up with A/AAAA. A name without a port is looked up as SRV for that
  transport first (`_sip._udp`, `_sip._tcp`, `_sips._tcp`; RFC 2782 order), A/AAAA
  of the name at the default port if there is no SRV record. NAPTR (§4.1) is read only
  when an agent looks for its servers (`srv_flows(naptr=True)`), and only names the SRV
  records to use: the transport is the agent's, so a NAPTR record for another one is
  ignored, and the SRV name of our transport is the fallback.
- Responses (§5): the Via's sent-by name, A/AAAA, at the Via's port.

Names are looked up in /etc/hosts first (like the system's "files dns"), then in
DNS with dnspython's asynchronous resolver. Answers are cached for their TTL,
failures for `negative_ttl`, and concurrent lookups of one name share one query.
dnspython is imported on the first DNS query: its resolver pulls in aioquic and
cryptography (DNS over QUIC), a tenth of a second at every start of a program that is
given IP addresses only.
A name that does not resolve raises `ResolveError`, an OSError: callers treat it
like a network that cannot be reached (503 for a request, a dropped response).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Sequence

from sipmesh.sip.transport.base import Flow, uri_target
from sipmesh.sip.uri import SipURI, is_ip

log = logging.getLogger("sipmesh.sip.resolve")

_SRV_SERVICE = {"UDP": "_sip._udp", "TCP": "_sip._tcp", "TLS": "_sips._tcp"}
_NAPTR_SERVICE = {"UDP": "SIP+D2U", "TCP": "SIP+D2T", "TLS": "SIPS+D2T"}
HOSTS_TTL = 10.0  # /etc/hosts answers: re-read at most this often


class ResolveError(OSError):
    """A name that does not resolve: no such name, no record, or no DNS server answered."""


@dataclass(frozen=True, slots=True)
class Srv:
    priority: int
    weight: int
    port: int
    target: str


def srv_order(records: Sequence[Srv], rng: Callable[[], float] = random.random) -> list[Srv]:
    """RFC 2782: lowest priority first; within a priority, a random order weighted by weight."""
    ordered: list[Srv] = []
    for priority in sorted({r.priority for r in records}):
        group = sorted((r for r in records if r.priority == priority), key=lambda r: r.weight)
        while group:
            total = sum(r.weight for r in group)
            pick = rng() * total
            chosen = len(group) - 1
            for i, record in enumerate(group):
                pick -= record.weight
                if pick < 0:
                    chosen = i
                    break
            ordered.append(group.pop(chosen))
    return ordered


class _Hosts:
    """/etc/hosts, re-read when it changes (checked at most every HOSTS_TTL seconds)."""

    def __init__(self, path: str | None, clock: Callable[[], float]) -> None:
        self.path = path
        self.clock = clock
        self._names: dict[str, list[str]] = {}
        self._stamp: tuple[int, int] | None = None
        self._checked = float("-inf")

    def lookup(self, name: str) -> list[str]:
        if self.path is None:
            return []
        now = self.clock()
        if now - self._checked >= HOSTS_TTL:
            self._checked = now
            self._reload()
        return self._names.get(name.lower().rstrip("."), [])

    def _reload(self) -> None:
        try:
            st = os.stat(self.path)  # type: ignore[arg-type]
            if (st.st_mtime_ns, st.st_size) == self._stamp:
                return
            with open(self.path, encoding="utf-8", errors="replace") as f:  # type: ignore[arg-type]
                text = f.read()
            self._stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            self._names, self._stamp = {}, None
            return
        names: dict[str, list[str]] = {}
        for line in text.splitlines():
            fields = line.split("#", 1)[0].split()
            if len(fields) < 2 or not is_ip(fields[0].split("%", 1)[0]):
                continue
            for name in fields[1:]:
                addresses = names.setdefault(name.lower().rstrip("."), [])
                if fields[0] not in addresses:
                    addresses.append(fields[0])
        self._names = names


class Resolver:
    """RFC 3263 lookups with a TTL cache. `nameservers` ((host, port) pairs) replaces
    the system's DNS configuration (/etc/resolv.conf); `hosts_file` None skips it."""

    def __init__(self, nameservers: Sequence[tuple[str, int]] | None = None, *,
                 hosts_file: str | None = "/etc/hosts", lifetime: float = 4.0,
                 negative_ttl: float = 10.0, max_entries: int = 4096, max_pending: int = 256,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.nameservers = list(nameservers) if nameservers is not None else None
        self.lifetime = lifetime
        self.negative_ttl = negative_ttl
        self.max_entries = max_entries
        # Names come from the network (a Route, a Via): a flood of distinct ones must not
        # become a flood of DNS queries.
        self.max_pending = max_pending
        self.clock = clock
        self.queries = 0  # DNS queries sent (cache misses), for tests and statistics
        self._hosts = _Hosts(hosts_file, clock)
        self._dns = None  # dns.asyncresolver.Resolver, made on first use
        self._cache: dict[tuple[str, str], tuple[float, object]] = {}
        self._pending: dict[tuple[str, str], asyncio.Future] = {}

    # -- what callers use ---------------------------------------------------------------
    async def uri_flow(self, uri: SipURI, default_transport: str = "UDP") -> Flow:
        """Where to send a request whose next hop is `uri` (§4)."""
        transport, host, port = uri_target(uri, default_transport)
        if is_ip(host):
            return Flow(transport, host, port)
        if uri.port is None:
            servers = await self.srv_flows(host, transport)
            if servers:
                return servers[0][1]
        return Flow(transport, (await self.addresses(host))[0], port)

    async def srv_flows(self, domain: str, transport: str = "UDP", *,
                        naptr: bool = False) -> list[tuple[str, Flow]]:
        """The SIP servers of `domain` for `transport` by its SRV records (§4.2), in the
        order to try them: (target name, flow to its first address) for each target that
        resolves; [] when the domain has no SRV records (use its A/AAAA then). Raises
        ResolveError when it has records but no target resolves. With `naptr`, the SRV
        names its NAPTR records give for `transport` come first (§4.1; an agent finding
        its servers, not every next hop: one query fewer there)."""
        return (await self.srv_servers(domain, transport, naptr=naptr))[0]

    async def srv_servers(self, domain: str, transport: str = "UDP", *, naptr: bool = False
                          ) -> tuple[list[tuple[str, Flow]], float]:
        """`srv_flows`, and for how many seconds the answer holds: the shortest time to
        live left of the records it was made of (NAPTR, SRV, the targets' addresses; a
        failed lookup's `negative_ttl`). An agent looks again once it has run out
        (`UserAgent.find_servers`), so that a changed server set is followed."""
        service = _SRV_SERVICE.get(transport.upper())
        if service is None:
            return [], self.negative_ttl
        keys: list[tuple[str, str]] = []
        records: list[Srv] = []
        if naptr:
            keys.append(("naptr", domain.lower()))
        named = await self.naptr(domain, transport) if naptr else []
        for name in [*named, f"{service}.{domain}"]:
            keys.append(("srv", name.lower()))
            records = await self.srv(name)
            if records:
                break
        found: list[tuple[str, Flow]] = []
        failures = []
        for record in records:
            keys.append(("addr", record.target.lower()))
            try:
                address = (await self.addresses(record.target))[0]
            except ResolveError as exc:
                failures.append(str(exc))
                continue
            found.append((record.target, Flow(transport.upper(), address, record.port)))
        if records and not found:
            raise ResolveError(f"no target of the SRV records for {domain} resolves: "
                               + "; ".join(failures))
        now = self.clock()
        left = [self._cache[key][0] - now for key in keys if key in self._cache]
        return found, max(0.0, min(left, default=self.negative_ttl))

    async def flow(self, flow: Flow) -> Flow:
        """`flow` with its host name replaced by an address (§5: a response's Via)."""
        if is_ip(flow.host):
            return flow
        return Flow(flow.transport, (await self.addresses(flow.host))[0], flow.port)

    async def addresses(self, host: str) -> tuple[str, ...]:
        """The addresses of `host`, IPv4 first (A/AAAA)."""
        if is_ip(host):
            return (host,)
        value = await self._cached(("addr", host.lower()), lambda: self._fetch_addresses(host))
        assert isinstance(value, tuple)
        return value

    async def naptr(self, domain: str, transport: str = "UDP") -> list[str]:
        """The SRV names that `domain`'s NAPTR records give for `transport` (§4.1: service
        SIP+D2U, SIP+D2T or SIPS+D2T, flag "s"), in order then preference; [] if none."""
        value = await self._cached(("naptr", domain.lower()), lambda: self._fetch_naptr(domain))
        assert isinstance(value, tuple)
        wanted = _NAPTR_SERVICE.get(transport.upper())
        return [name for (_, _, service, name) in sorted(value) if service == wanted]

    async def srv(self, name: str) -> list[Srv]:
        """The SRV records of `name` in the order to try them; [] if it has none."""
        value = await self._cached(("srv", name.lower()), lambda: self._fetch_srv(name))
        assert isinstance(value, tuple)
        return srv_order(value)

    # -- the cache ----------------------------------------------------------------------
    async def _cached(self, key: tuple[str, str], fetch: Callable[[], Awaitable[tuple[object, float]]]) -> object:
        entry = self._cache.get(key)
        if entry is None or entry[0] <= self.clock():
            pending = self._pending.get(key)
            if pending is None or pending.get_loop() is not asyncio.get_running_loop():
                if len(self._pending) >= self.max_pending:
                    raise ResolveError(f"cannot resolve {key[1]}: too many lookups in progress")
                pending = asyncio.ensure_future(self._fill(key, fetch))
                self._pending[key] = pending
            entry = await asyncio.shield(pending)
        if isinstance(entry[1], str):
            raise ResolveError(entry[1])
        return entry[1]

    async def _fill(self, key: tuple[str, str],
                    fetch: Callable[[], Awaitable[tuple[object, float]]]) -> tuple[float, object]:
        """Never raises: a failure is cached too (as its message), so that no task
        ends with an exception nobody retrieves."""
        try:
            try:
                value, ttl = await fetch()
            except ResolveError as exc:
                value, ttl = str(exc), self.negative_ttl
            except Exception as exc:  # noqa: BLE001 - dnspython's errors for odd names, say
                value, ttl = f"cannot resolve {key[1]}: {exc}", self.negative_ttl
            if len(self._cache) >= self.max_entries:
                now = self.clock()
                self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
                if len(self._cache) >= self.max_entries:
                    self._cache.clear()
            entry = self._cache[key] = (self.clock() + ttl, value)
            return entry
        finally:
            if self._pending.get(key) is asyncio.current_task():
                del self._pending[key]

    # -- the lookups ----------------------------------------------------------------------
    async def _fetch_addresses(self, host: str) -> tuple[tuple[str, ...], float]:
        listed = self._hosts.lookup(host)
        if listed:
            return tuple(sorted(listed, key=lambda a: ":" in a)), HOSTS_TTL
        errors = []
        for rdtype in ("A", "AAAA"):  # AAAA only for a name without an IPv4 address
            try:
                answer = await self._query(host, rdtype)
            except ResolveError as exc:
                errors.append(str(exc))
                continue
            return tuple(r.address for r in answer), float(answer.rrset.ttl)
        raise ResolveError(f"cannot resolve {host}: {errors[0] if errors else 'no address'}")

    async def _fetch_srv(self, name: str) -> tuple[tuple[Srv, ...], float]:
        try:
            answer = await self._query(name, "SRV")
        except ResolveError as exc:
            if _no_records(exc):
                return (), self.negative_ttl  # no SRV records: use A/AAAA (§4.2)
            raise
        records = tuple(Srv(r.priority, r.weight, r.port, r.target.to_text(omit_final_dot=True))
                        for r in answer if r.target.to_text() != ".")  # "." means: no service
        if not records:
            raise ResolveError(f"{name}: the SRV record says the service is not available there")
        return records, float(answer.rrset.ttl)

    async def _fetch_naptr(self, domain: str) -> tuple[tuple[tuple[int, int, str, str], ...], float]:
        try:
            answer = await self._query(domain, "NAPTR")
        except ResolveError as exc:
            if _no_records(exc):
                return (), self.negative_ttl  # no NAPTR records: SRV of our transport (§4.1)
            raise
        records = tuple((r.order, r.preference, r.service.decode("ascii", "replace").upper(),
                         r.replacement.to_text(omit_final_dot=True))
                        for r in answer if r.flags.lower() == b"s" and r.replacement.to_text() != ".")
        return records, float(answer.rrset.ttl)

    async def _query(self, name: str, rdtype: str):
        import dns.exception
        import dns.resolver

        self.queries += 1
        try:
            return await self._dns_resolver().resolve(name, rdtype, search=True, lifetime=self.lifetime)
        except dns.resolver.NXDOMAIN as exc:
            raise ResolveError(f"no such name: {name}") from exc
        except dns.resolver.NoAnswer as exc:
            raise ResolveError(f"{name} has no {rdtype} record") from exc
        except dns.resolver.NoNameservers as exc:
            raise ResolveError(f"no DNS server answered for {name}") from exc
        except dns.exception.Timeout as exc:
            raise ResolveError(f"DNS timed out for {name}") from exc
        except (dns.exception.DNSException, ValueError) as exc:
            raise ResolveError(f"cannot resolve {name}: {exc}") from exc

    def _dns_resolver(self):
        if self._dns is None:
            import dns.asyncresolver
            import dns.nameserver
            import dns.resolver

            if self.nameservers is None:
                try:
                    self._dns = dns.asyncresolver.Resolver()
                except dns.resolver.NoResolverConfiguration as exc:
                    raise ResolveError("no DNS configuration (/etc/resolv.conf)") from exc
            else:
                self._dns = dns.asyncresolver.Resolver(configure=False)
                self._dns.nameservers = [dns.nameserver.Do53Nameserver(host, port)
                                         for host, port in self.nameservers]
            self._dns.cache = None  # ours keeps failures too, and is per name
        return self._dns


def _no_records(exc: ResolveError) -> bool:
    """Whether a lookup failed because the name has no such records (NXDOMAIN, no answer),
    not because DNS could not be asked."""
    import dns.resolver  # a ResolveError from a query: dnspython is loaded already
    return isinstance(exc.__cause__, (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer))


_default: Resolver | None = None


def default_resolver() -> Resolver:
    """The process's resolver (one cache for every transaction layer in it)."""
    global _default
    if _default is None:
        _default = Resolver()
    return _default


async def resolve_uri(uri: SipURI, default_transport: str = "UDP") -> Flow:
    """`Resolver.uri_flow` with the process's resolver."""
    return await default_resolver().uri_flow(uri, default_transport)


__all__ = ["ResolveError", "Resolver", "Srv", "default_resolver", "resolve_uri",
           "srv_order"]
