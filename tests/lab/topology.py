"""The NAT lab of the tests: sipmesh.lab.topology (the one lab builder, also behind
`sipmesh demo --lab`) plus what only tests need, routers that map ports on request::

    r = lab.add_router("symmetric", upnp=True)
    m = lab.add_host("m", behind=r)
    r.upnp.redirects()                                 # [(external port, ip, port), ...]

Its firewall lets in what miniupnpd forwards (``--ctstate DNAT``) and leaves the router's
own packets' ports alone (miniupnpd checks with STUN that nothing in front of it changes
ports). The lab then runs a STUN responder of its own on the internet, at 203.0.113.1.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sipmesh.lab import topology
from sipmesh.lab.netns import ip_batch
from sipmesh.lab.procs import spawn, wait_udp_listening
from sipmesh.lab.topology import INTERNET, KINDS, Host, Router

from .miniupnpd import MiniUPnPd

__all__ = ["INTERNET", "KINDS", "Host", "NatLab", "Router"]

STUN_IP, STUN_PORT = "203.0.113.1", 3478   # the lab's STUN responder (add_router(upnp=True))


class NatLab(topology.NatLab):
    """sipmesh.lab.topology.NatLab, whose routers can run miniupnpd."""

    stun_server: tuple[str, int] | None = None

    def add_router(self, kind: str, *, upnp: bool = False, lan: str | None = None) -> Router:
        """A router of `kind` without hosts; with `upnp`, miniupnpd on it maps ports for its
        LAN (UPnP-IGD, NAT-PMP, PCP)."""
        router = super().add_router(kind, lan=lan, upnp=upnp)
        if upnp:
            router.upnp = MiniUPnPd(router, self.run_dir / router.ns.name,
                                    stun=self.stun()).start()
        return router

    def stun(self) -> tuple[str, int]:
        """A STUN responder of the lab's own on the internet (for miniupnpd), started once."""
        if self.stun_server is None:
            ip_batch([f"addr add {STUN_IP}/{INTERNET.prefixlen} dev br0"], self.internet)
            probe = str(Path(__file__).with_name("iceprobe.py"))
            proc = spawn([sys.executable, probe, "stun", str(STUN_PORT)], netns=self.internet,
                         name="lab-stun", log_path=self.run_dir / "stun.log")
            wait_udp_listening("0.0.0.0", STUN_PORT, self.internet, 10, proc=proc)
            self.stun_server = (STUN_IP, STUN_PORT)
        return self.stun_server
