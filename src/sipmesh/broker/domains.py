"""Which URIs name this broker, and which domains it serves (Kamailio's `myself`).

A URI is *ours* when its host is one of the served domains or one of our own
addresses, and its port (if any, 5060/5061 by default for an address) is one we
listen on. Addresses of ours are aliases of the default domain, so
`sip:alice@127.0.0.1` and `sip:alice@example.org` are the same AOR on a broker
serving example.org on 127.0.0.1.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from sipmesh.sip.transport.base import DEFAULT_PORTS
from sipmesh.sip.uri import SipURI, is_ip


@dataclass(frozen=True, slots=True)
class Listener:
    transport: str  # UDP, TCP, TLS
    host: str       # bound address (may be 0.0.0.0 / ::)
    port: int


class LocalIdentity:
    def __init__(self, domains: list[str] | tuple[str, ...] = (), listeners: list[Listener] = (),
                 *, hostnames: tuple[str, ...] = ("localhost",)) -> None:
        self.domains = [d.lower().rstrip(".") for d in domains]
        self.listeners = list(listeners)
        self.hostnames = {h.lower() for h in hostnames}
        self._local_cache: dict[str, bool] = {}

    # -- addresses ------------------------------------------------------------------------
    @property
    def ports(self) -> set[int]:
        return {listener.port for listener in self.listeners}

    @property
    def default_domain(self) -> str:
        """The first served domain, or the first listen address when none is configured."""
        if self.domains:
            return self.domains[0]
        for listener in self.listeners:
            if listener.host not in ("0.0.0.0", "::"):
                return listener.host.lower()
        return "127.0.0.1"

    def is_local_host(self, host: str) -> bool:
        """An address (or name) of this machine that we listen on."""
        host = host.lower().strip("[]")
        if host in self.hostnames:
            return True
        cached = self._local_cache.get(host)
        if cached is not None:
            return cached
        result = False
        if is_ip(host):
            for listener in self.listeners:
                bound = listener.host
                if bound == host:
                    result = True
                elif bound in ("0.0.0.0", "::") and (":" in bound) == (":" in host):
                    result = _bindable(host)
                if result:
                    break
        if len(self._local_cache) > 4096:
            self._local_cache.clear()
        self._local_cache[host] = result
        return result

    def serves_host(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return host in self.domains or self.is_local_host(host)

    def port_is_ours(self, port: int | None, scheme: str = "sip", transport: str | None = None) -> bool:
        if port is None:
            default = DEFAULT_PORTS["TLS"] if scheme == "sips" or transport == "tls" else 5060
            return default in self.ports
        return port in self.ports

    def is_ours(self, uri: SipURI) -> bool:
        """Does `uri` name this broker (a served domain or our address, and our port)?"""
        host = uri.host.lower().rstrip(".")
        if host in self.domains:
            return uri.port is None or uri.port in self.ports
        return self.is_local_host(host) and self.port_is_ours(uri.port, uri.scheme, uri.transport)

    def is_our_sent_by(self, host: str, port: int | None) -> bool:
        return self.is_local_host(host) and self.port_is_ours(port)

    # -- domains --------------------------------------------------------------------------
    def domain_of(self, host: str) -> str | None:
        """The served domain `host` stands for, or None if it is not served here."""
        host = host.lower().rstrip(".")
        if host in self.domains:
            return host
        if self.is_local_host(host):
            return self.default_domain
        return None

    def aor(self, uri: SipURI) -> str | None:
        """The address-of-record key of `uri` (sip:user@domain), None if not ours or no user."""
        if uri.user is None:
            return None
        domain = self.domain_of(uri.host)
        if domain is None:
            return None
        return f"sip:{uri.user}@{domain}"


def _bindable(ip: str) -> bool:
    """True if `ip` is an address of this host (binding to it succeeds)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((ip, 0))
        return True
    except OSError:
        return False
