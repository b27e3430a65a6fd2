"""A host taken to another network, in the NAT lab (tests/lab/topology.py).

    new_ip = move_host(lab["b"], lab.add_router("home"))

The router end of the host's veth moves to the other router's LAN bridge, and the host
gets an address and default route there, as a new DHCP lease would give: the kernel
announces the address and route changes on netlink like any other.
"""

from __future__ import annotations

import re
import subprocess

from .topology import Host, Router

__all__ = ["move_host"]


def _ip(ns: str, *args: str) -> str:
    return subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True,
                          text=True, timeout=20).stdout


def move_host(host: Host, router: Router) -> str:
    """Plug `host` into `router`'s LAN; its new address."""
    old = host.router
    if old is None:
        raise ValueError(f"{host.name} is not behind a router")
    link = host.run(["ip", "-o", "link", "show", "eth0"]).stdout
    found = re.search(r"eth0@if(\d+)", link)
    if found is None:
        raise RuntimeError(f"{host.name}'s eth0 is not a veth: {link}")
    port = re.search(rf"^{found.group(1)}: ([^:@]+)@", _ip(old.ns.name, "-o", "link"), re.M)
    if port is None:
        raise RuntimeError(f"the other end of {host.name}'s eth0 is not in {old.ns.name}")
    taken = {int(h.ip.rsplit(".", 1)[1]) for h in router.hosts}
    index = max(taken | {1}) + 1
    address = str(router.lan.network_address + index)
    name = f"mv{index}"
    _ip(old.ns.name, "link", "set", port.group(1), "down")
    _ip(old.ns.name, "link", "set", port.group(1), "name", name)
    _ip(old.ns.name, "link", "set", name, "netns", router.ns.name)
    _ip(router.ns.name, "link", "set", name, "master", "lan")   # the LAN bridge (topology.LAN)
    _ip(router.ns.name, "link", "set", name, "up")
    host.run(["ip", "addr", "flush", "dev", "eth0"])
    host.run(["ip", "addr", "add", f"{address}/{router.lan.prefixlen}", "dev", "eth0"])
    host.run(["ip", "route", "replace", "default", "via", router.lan_ip])
    old.hosts.remove(host)
    router.hosts.append(host)
    host.router, host.ip = router, address
    return address


def program_pids(host, program: str = "wireguard-go") -> dict[int, int]:
    """{UDP port: pid} of the `program` processes bound in `host` (from ss)."""
    out = host.run(["ss", "-uanpH"], check=False).stdout
    return {int(port): int(pid) for port, pid in
            re.findall(rf':(\d+)\s+\S+\s+users:\(\("{re.escape(program)}",pid=(\d+)', out)}
