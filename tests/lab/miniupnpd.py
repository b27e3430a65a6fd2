"""miniupnpd (Debian ``miniupnpd``, nftables backend) on a NAT lab router: UPnP-IGD, NAT-PMP
and PCP for the hosts on its LAN.

``MiniUPnPd(router, run_dir, stun=(ip, port)).start()`` creates the nftables table the
daemon fills (what Debian's ``/etc/miniupnpd/nft_init.sh`` does, in a table of its own,
``inet miniupnpd``), writes its configuration and runs ``miniupnpd -d`` in the router's
namespace. Secure mode: a host may map ports only to itself, 1024-65535, and only hosts of
this LAN may ask.

miniupnpd refuses to forward ports when its WAN address is private or reserved (the lab's
internet, 203.0.113.0/24, is TEST-NET-3) unless a STUN server tells it that nothing in
front of it changes ports (``ext_perform_stun``): hence `stun`, a Binding responder on the
lab's internet. The router's own packets must keep their ports for that (the router's
firewall leaves them alone, see topology.py).

:meth:`redirects` lists the port forwards in force, read from the ruleset.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from sipmesh.lab.netns import run as _run
from sipmesh.lab.procs import ManagedProcess, spawn, wait_udp_listening

if TYPE_CHECKING:
    from .topology import Router

__all__ = ["MINIUPNPD", "MiniUPnPd", "miniupnpd_unavailable_reason"]

MINIUPNPD = "/usr/sbin/miniupnpd"
TABLE = "miniupnpd"
# priorities just before the lab's iptables-nft chains (filter 0, dstnat -100, srcnat 100)
RULESET = f"""table inet {TABLE} {{
    chain forward {{ type filter hook forward priority -1; policy accept; jump miniupnpd; }}
    chain miniupnpd {{ }}
    chain prerouting {{ type nat hook prerouting priority -101; policy accept;
                       jump prerouting_miniupnpd; }}
    chain postrouting {{ type nat hook postrouting priority 99; policy accept;
                        jump postrouting_miniupnpd; }}
    chain prerouting_miniupnpd {{ }}
    chain postrouting_miniupnpd {{ }}
}}
"""
_DNAT = re.compile(r"dport (\d+) dnat ip to ([\d.]+):(\d+)")


def miniupnpd_unavailable_reason() -> str | None:
    """None when miniupnpd (nftables build) and nft can run here, else why not."""
    if not Path(MINIUPNPD).exists():
        return "miniupnpd is not installed (apt-get install miniupnpd; see scripts/install --test)"
    if shutil.which("nft") is None:
        return "nft is not installed (apt-get install nftables)"
    return None


class MiniUPnPd:
    """miniupnpd on `router`, its files in `run_dir`; `stun` is the (ip, port) it asks."""

    def __init__(self, router: "Router", run_dir: str | Path, *, stun: tuple[str, int]) -> None:
        self.router = router
        self.run_dir = Path(run_dir)
        self.stun = stun
        self.proc: ManagedProcess | None = None

    def config(self) -> str:
        lan = self.router.lan
        return "\n".join([
            "ext_ifname=wan", "listening_ip=lan", "http_port=0",
            "enable_natpmp=yes", "enable_upnp=yes", "secure_mode=yes", "system_uptime=no",
            f"uuid={uuid.uuid4()}", "ext_perform_stun=yes",
            f"ext_stun_host={self.stun[0]}", f"ext_stun_port={self.stun[1]}",
            f"upnp_table_name={TABLE}", f"upnp_nat_table_name={TABLE}",
            f"allow 1024-65535 {lan} 1024-65535", "deny 0-65535 0.0.0.0/0 0-65535", ""])

    def start(self, timeout: float = 10.0) -> "MiniUPnPd":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ns = self.router.ns
        subprocess.run(["ip", "netns", "exec", ns.name, "nft", "-f", "-"], input=RULESET,
                       text=True, check=True, capture_output=True, timeout=15)
        conf = self.run_dir / "miniupnpd.conf"
        conf.write_text(self.config())
        self.proc = spawn([MINIUPNPD, "-f", str(conf), "-d", "-P",
                           str(self.run_dir / "miniupnpd.pid")], netns=ns, name="miniupnpd",
                          log_path=self.run_dir / "miniupnpd.log")
        try:
            # NAT-PMP/PCP listens last, once the STUN check enabled port forwarding
            wait_udp_listening("0.0.0.0", 5351, ns, timeout, proc=self.proc)
        except BaseException:
            self.stop()
            raise
        if "Port forwarding is now enabled" not in self.proc.log_text():
            self.stop()
            raise RuntimeError(f"miniupnpd will not forward ports:\n{self.log_tail()}")
        return self

    def redirects(self) -> list[tuple[int, str, int]]:
        """The UDP/TCP port forwards in force: (external port, internal ip, internal port)."""
        text = _run(self.router.ns, ["nft", "list", "chain", "inet", TABLE,
                                     "prerouting_miniupnpd"]).stdout
        return [(int(m[1]), m[2], int(m[3])) for m in _DNAT.finditer(text)]

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(grace=3.0)

    def log_tail(self, lines: int = 40) -> str:
        return self.proc.log_tail(lines) if self.proc else ""
