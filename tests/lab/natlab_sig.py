"""A small NAT lab for the signalling tests: an "internet" and hosts behind home routers.

One namespace holds the internet, a bridge ``br0`` on 203.0.113.0/24 (TEST-NET-3, used
only inside these namespaces). A public host (the SIP server, a public peer) sits on that
bridge; a home host sits on a LAN of its own (10.N.0.0/24) behind a router namespace
whose WAN is on the bridge::

    lab = SignallingLab(netns_factory)
    server = lab.public("server")             # 203.0.113.10
    a = lab.home("a")                          # 10.1.0.2 behind 203.0.113.101
    a.ns.run([...]); a.ip, a.public_ip

The home router is the one TESTING.md describes: MASQUERADE plus a WAN filter that lets
in only ESTABLISHED,RELATED packets (``--ctstate NEW -j DROP`` on INPUT and FORWARD), an
endpoint-independent mapping with port-restricted filtering. Nothing from the internet
reaches a home host unless the host spoke to that address and port first.

(tests/lab/topology.py of the NAT-traversal work builds the same and more; this one is
kept small so that the signalling tests do not depend on it.)
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from .netns import Netns, NetnsFactory

INTERNET = ipaddress.ip_network("203.0.113.0/24")
WAN, LAN = "wan", "lan"

HOME_RULES = f"""*nat
-A POSTROUTING -o {WAN} -j MASQUERADE
COMMIT
*filter
-A INPUT -i {WAN} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
-A INPUT -i {WAN} -m conntrack --ctstate NEW -j DROP
-A INPUT -i {WAN} -j DROP
-A FORWARD -i {WAN} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
-A FORWARD -i {WAN} -m conntrack --ctstate NEW -j DROP
-A FORWARD -i {WAN} -j DROP
COMMIT
"""


@dataclass(eq=False)
class Host:
    name: str
    ns: Netns
    ip: str
    router: Netns | None = None
    router_wan_ip: str | None = None

    @property
    def public_ip(self) -> str:
        """The address the internet sees this host's packets come from."""
        return self.router_wan_ip or self.ip

    @property
    def behind_nat(self) -> bool:
        return self.router is not None

    def conntrack(self) -> str:
        """The home router's connection tracking table, for a failure message."""
        if self.router is None:
            return ""
        return self.router.run(["conntrack", "-L"], check=False).stdout


class SignallingLab:
    """The internet namespace and the hosts added to it; `factory` deletes them all."""

    def __init__(self, factory: NetnsFactory) -> None:
        self.factory = factory
        self.internet = factory.add("inet")
        self.internet.ip("link", "add", "br0", "type", "bridge")
        self.internet.ip("link", "set", "br0", "up")
        self._ports = 0
        self._lans = 0

    def _on_internet(self, ns: Netns, dev: str, address: str) -> None:
        port = f"p{self._ports}"
        self._ports += 1
        self.factory.veth(self.internet, None, ns, f"{address}/{INTERNET.prefixlen}",
                          a_name=port, b_name=dev)
        self.internet.ip("link", "set", port, "master", "br0")

    def public(self, name: str, host_number: int | None = None) -> Host:
        """A host on the internet itself (203.0.113.10, .11, ... unless given)."""
        address = str(INTERNET.network_address + (host_number or 10 + self._ports))
        ns = self.factory.add(name)
        self._on_internet(ns, "eth0", address)
        return Host(name, ns, address)

    def home(self, name: str) -> Host:
        """A host behind a home router of its own (LAN 10.N.0.0/24, WAN 203.0.113.(100+N))."""
        self._lans += 1
        lan = ipaddress.ip_network(f"10.{self._lans}.0.0/24")
        wan_ip = str(INTERNET.network_address + 100 + self._lans)
        router_ip, host_ip = str(lan.network_address + 1), str(lan.network_address + 2)
        router = self.factory.add(f"r{name}")
        host = self.factory.add(name)
        self._on_internet(router, WAN, wan_ip)
        self.factory.veth(router, f"{router_ip}/{lan.prefixlen}", host, f"{host_ip}/{lan.prefixlen}",
                          a_name=LAN, b_name="eth0")
        host.add_route("default", via=router_ip)
        router.enable_forwarding()
        router.run(["iptables-restore"], input=HOME_RULES)
        return Host(name, host, host_ip, router, wan_ip)
