"""A NAT lab: an "internet" and hosts behind home, symmetric and UDP-blocking routers.

One namespace holds the internet, a bridge ``br0`` on 203.0.113.0/24 (TEST-NET-3, used only
inside these namespaces). Public hosts (the broker, coturn, a public peer) sit on that bridge
with an address of their own. Every other host sits behind a router of its own kind, on a
private LAN of its own (10.N.0.0/24, or 192.168.N.0/24 behind symmetric routers), so that no
two LANs share addresses unless a test asks for it::

    with NatLab() as lab:
        broker = lab.add_host("broker")                # public
        a = lab.add_host("a", behind="home")
        s = lab.add_host("s", behind="symmetric")
        lab.run(a, ["ping", "-c1", "-W2", broker.ip])
        a.ip, a.public_ip, a.router.wan_ip             # addresses as attributes

Router kinds (``KINDS``), as TESTING.md and the research note measured them:

``home``
    ``MASQUERADE`` plus the WAN filter of a home router: only ESTABLISHED,RELATED packets
    come in, everything unsolicited is dropped, ``--ctstate NEW -j DROP`` on INPUT included
    (without it an early packet from a peer leaves a conntrack entry that forces the next
    mapping onto another port). Endpoint-independent mapping, port-restricted filtering:
    hole punching works.
``symmetric``
    ``MASQUERADE --random-fully`` plus the same filter: a new port per destination, so a
    reflexive address learnt from a STUN server is useless to any other peer.
``udp_blocked``
    ``home`` whose router drops every UDP packet from the LAN: only TCP gets out.
``plain``
    ``MASQUERADE`` without the WAN filter: the deliberately nasty NAT of TESTING.md.

A router that maps ports when asked (UPnP-IGD, NAT-PMP, PCP: miniupnpd, see
``tests/lab/miniupnpd.py``) is made first, then hosts are put behind it::

    r = lab.add_router("symmetric", upnp=True)
    m = lab.add_host("m", behind=r)
    r.upnp.redirects()                                 # [(external port, ip, port), ...]

Its firewall lets in what miniupnpd forwards (``--ctstate DNAT``) and leaves the router's
own packets' ports alone (miniupnpd checks with STUN that nothing in front of it changes
ports). The lab then runs a STUN responder of its own on the internet, at 203.0.113.1.

Building costs a few ``ip -batch`` processes plus one ``iptables-restore`` per router, run
in parallel: ``add_hosts`` builds several hosts at once, cheaper than one ``add_host`` each.
Everything is deleted by :meth:`NatLab.close` (context exit, or the ``nat_lab`` fixture),
even when building fails half way.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from .miniupnpd import MiniUPnPd
from .netns import Netns, NetnsFactory, ip_batch
from .netns import popen as _popen
from .netns import run as _run
from .procs import ManagedProcess, spawn, wait_udp_listening

__all__ = ["INTERNET", "KINDS", "Host", "NatLab", "Router"]

INTERNET = ipaddress.ip_network("203.0.113.0/24")
KINDS = ("public", "home", "symmetric", "udp_blocked", "plain")
WAN, LAN = "wan", "lan"  # router interface names (a bridge on the LAN side)
STUN_IP, STUN_PORT = "203.0.113.1", 3478   # the lab's STUN responder (add_router(upnp=True))


def _firewall(kind: str, upnp: bool = False) -> str:
    """The ``iptables-restore`` input of a router of `kind` (`upnp`: miniupnpd runs on it)."""
    masquerade = f"-A POSTROUTING -o {WAN} -j MASQUERADE"
    if kind == "symmetric":
        masquerade += " --random-fully"
    own = [f"-A POSTROUTING -o {WAN} -m addrtype --src-type LOCAL -j RETURN"] if upnp else []
    rules = ["*nat", *own, masquerade, "COMMIT", "*filter"]
    if kind != "plain":
        for chain in ("INPUT", "FORWARD"):
            rules += [f"-A {chain} -i {WAN} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
                      *([f"-A {chain} -i {WAN} -m conntrack --ctstate DNAT -j ACCEPT"]
                        if upnp and chain == "FORWARD" else []),
                      f"-A {chain} -i {WAN} -m conntrack --ctstate NEW -j DROP",
                      f"-A {chain} -i {WAN} -j DROP"]
    if kind == "udp_blocked":
        rules.append(f"-A FORWARD -i {LAN} -p udp -j DROP")
    return "\n".join(rules + ["COMMIT", ""])


@dataclass(eq=False)
class Router:
    """A home router: WAN on the internet bridge, a LAN bridge with its hosts behind."""

    kind: str
    ns: Netns
    wan_ip: str
    lan: ipaddress.IPv4Network
    hosts: list["Host"] = field(default_factory=list)
    upnp: MiniUPnPd | None = None    # miniupnpd, when the router maps ports (add_router)

    @property
    def lan_ip(self) -> str:
        """The router's own LAN address, the default gateway of its hosts."""
        return str(self.lan.network_address + 1)

    def cut(self) -> None:
        """Drop everything the router forwards (a link that died mid-session)."""
        _run(self.ns, ["iptables", "-I", "FORWARD", "1", "-j", "DROP"])

    def restore(self) -> None:
        """Undo :meth:`cut`."""
        _run(self.ns, ["iptables", "-D", "FORWARD", "-j", "DROP"])

    def conntrack(self) -> str:
        """The router's connection tracking table (``conntrack -L``), for a failure message."""
        return _run(self.ns, ["conntrack", "-L"], check=False).stdout

    def __repr__(self) -> str:
        return f"<Router {self.kind} {self.ns.name} wan={self.wan_ip} lan={self.lan}>"


@dataclass(eq=False)
class Host:
    """One host: its own namespace, address ``ip``; ``public_ip`` is what the internet sees."""

    name: str
    ns: Netns
    ip: str
    router: Router | None = None

    @property
    def kind(self) -> str:
        return self.router.kind if self.router else "public"

    @property
    def public_ip(self) -> str:
        return self.router.wan_ip if self.router else self.ip

    def run(self, argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        return _run(self.ns, argv, **kwargs)

    def popen(self, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        return _popen(self.ns, argv, **kwargs)

    def __repr__(self) -> str:
        return f"<Host {self.name} {self.kind} {self.ns.name} ip={self.ip}>"


class NatLab:
    """The internet namespace and the hosts and routers added to it (see the module doc)."""

    def __init__(self, factory: NetnsFactory | None = None, *,
                 run_dir: str | Path | None = None) -> None:
        """`run_dir`: where the lab's own daemons keep their files (default: a temporary
        directory, deleted by :meth:`close`)."""
        self._own_factory = factory is None
        self.factory = factory or NetnsFactory()
        self.hosts: dict[str, Host] = {}
        self.routers: list[Router] = []
        self._addresses = iter(INTERNET.hosts())
        next(self._addresses)  # .1 is the lab's STUN responder, when a router needs one
        self._ports = 0  # veth ends on the bridge: p0, p1, ...
        self._lans = 0
        self._dir: Path | None = Path(run_dir) if run_dir is not None else None
        self._own_dir = run_dir is None
        self._stun_server: tuple[str, int] | None = None
        try:
            [self.internet] = self.factory.add_many(["inet"])
            ip_batch(["link set lo up", "link add br0 type bridge",
                      "link set br0 up"], self.internet)
        except BaseException:
            self.close()
            raise

    # -- building
    def add_host(self, name: str, behind: str | Router = "public", *,
                 lan: str | None = None) -> Host:
        """A host `behind` a new router of that kind ("public": on the internet itself), or
        behind an existing :class:`Router` (on its LAN). `lan` overrides the LAN prefix."""
        return self.add_hosts({name: behind}, lans={name: lan} if lan else None)[name]

    def add_hosts(self, spec: Mapping[str, str | Router],
                  lans: Mapping[str, str] | None = None) -> dict[str, Host]:
        """Several hosts at once ({name: behind}), in one batch: faster than one by one."""
        lans = lans or {}
        for name, behind in spec.items():
            if name in self.hosts:
                raise ValueError(f"host {name!r} exists already")
            if not isinstance(behind, Router) and behind not in KINDS:
                raise ValueError(f"unknown router kind {behind!r} (one of {', '.join(KINDS)})")
        new_routers = [n for n, b in spec.items() if isinstance(b, str) and b != "public"]
        hints = list(spec) + [f"r{n}" for n in new_routers]
        namespaces = self.factory.add_many(hints)
        host_ns = dict(zip(spec, namespaces))
        router_ns = dict(zip(new_routers, namespaces[len(spec):]))

        setup: list[str] = []      # host-level ip commands (veth pairs)
        inside: dict[Netns, list[str]] = {ns: ["link set lo up"] for ns in namespaces}
        firewalls: dict[Netns, str] = {}
        made: dict[str, Host] = {}

        for name, behind in spec.items():
            ns = host_ns[name]
            if behind == "public":
                made[name] = Host(name, ns, self._on_internet(ns, "eth0", setup, inside))
                continue
            if isinstance(behind, Router):
                router = behind
            else:
                router = self._plan_router(router_ns[name], behind, lans.get(name), setup,
                                           inside, firewalls)
            index = len(router.hosts) + 2
            address = str(router.lan.network_address + index)
            port = f"h{index}"
            setup.append(f"link add {port} netns {router.ns.name} type veth "
                         f"peer name eth0 netns {ns.name}")
            inside.setdefault(router.ns, []).extend(
                [f"link set {port} master {LAN}", f"link set {port} up"])
            inside[ns] += [f"addr add {address}/{router.lan.prefixlen} dev eth0",
                           "link set eth0 up", f"route add default via {router.lan_ip}"]
            host = Host(name, ns, address, router)
            router.hosts.append(host)
            made[name] = host

        self._apply(setup, inside, firewalls)
        self.hosts.update(made)
        return made

    def add_router(self, kind: str, *, upnp: bool = False, lan: str | None = None) -> Router:
        """A router of `kind` without hosts (add them with ``behind=router``); with `upnp`,
        miniupnpd on it maps ports for its LAN (UPnP-IGD, NAT-PMP, PCP)."""
        if kind not in KINDS or kind == "public":
            raise ValueError(f"unknown router kind {kind!r} (one of {', '.join(KINDS[1:])})")
        [rns] = self.factory.add_many([f"r{kind}"])
        setup: list[str] = []
        inside: dict[Netns, list[str]] = {rns: ["link set lo up"]}
        firewalls: dict[Netns, str] = {}
        router = self._plan_router(rns, kind, lan, setup, inside, firewalls, upnp=upnp)
        self._apply(setup, inside, firewalls)
        if upnp:
            router.upnp = MiniUPnPd(router, self._run_dir / rns.name, stun=self._stun()).start()
        return router

    # -- building blocks: commands collected, then run at once by _apply
    def _on_internet(self, ns: Netns, dev: str, setup: list[str],
                     inside: dict[Netns, list[str]]) -> str:
        """Plan a veth from `ns` (as `dev`) to the internet bridge; its new address."""
        port = f"p{self._ports}"
        self._ports += 1
        address = str(next(self._addresses))
        setup.append(f"link add {port} netns {self.internet.name} type veth "
                     f"peer name {dev} netns {ns.name}")
        inside.setdefault(self.internet, []).extend(
            [f"link set {port} master br0", f"link set {port} up"])
        inside[ns] += [f"addr add {address}/{INTERNET.prefixlen} dev {dev}",
                       f"link set {dev} up"]
        return address

    def _plan_router(self, rns: Netns, kind: str, lan: str | None, setup: list[str],
                     inside: dict[Netns, list[str]], firewalls: dict[Netns, str], *,
                     upnp: bool = False) -> Router:
        self._lans += 1
        prefix = lan or (f"192.168.{self._lans}.0/24" if kind == "symmetric"
                         else f"10.{self._lans}.0.0/24")
        router = Router(kind, rns, self._on_internet(rns, WAN, setup, inside),
                        ipaddress.ip_network(prefix))
        inside[rns] += ["link add lan type bridge",
                        f"addr add {router.lan_ip}/{router.lan.prefixlen} dev {LAN}",
                        f"link set {LAN} up"]
        firewalls[rns] = _firewall(kind, upnp)
        self.routers.append(router)
        return router

    def _apply(self, setup: list[str], inside: dict[Netns, list[str]],
               firewalls: dict[Netns, str]) -> None:
        ip_batch(setup)
        procs = [(["ip", "-n", ns.name, "-batch", "-"], "\n".join(lines) + "\n")
                 for ns, lines in inside.items()]
        for rns, rules in firewalls.items():
            procs.append((["ip", "netns", "exec", rns.name, "sysctl", "-qw",
                           "net.ipv4.ip_forward=1"], ""))
            procs.append((["ip", "netns", "exec", rns.name, "iptables-restore"], rules))
        _run_all(procs)

    @property
    def _run_dir(self) -> Path:
        """Files of the lab's own daemons."""
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="natlab-"))
        self._dir.mkdir(parents=True, exist_ok=True)
        return self._dir

    def _stun(self) -> tuple[str, int]:
        """A STUN responder of the lab's own on the internet (for miniupnpd), started once."""
        if self._stun_server is None:
            ip_batch([f"addr add {STUN_IP}/{INTERNET.prefixlen} dev br0"], self.internet)
            probe = str(Path(__file__).with_name("iceprobe.py"))
            proc = spawn([sys.executable, probe, "stun", str(STUN_PORT)], netns=self.internet,
                         name="lab-stun", log_path=self._run_dir / "stun.log")
            wait_udp_listening("0.0.0.0", STUN_PORT, self.internet, 10, proc=proc)
            self._stun_server = (STUN_IP, STUN_PORT)
        return self._stun_server

    # -- using
    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def run(self, host: Host | str, argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        """Run `argv` inside `host` and capture its text output (see ``netns.run``)."""
        return self._host(host).run(argv, **kwargs)

    def popen(self, host: Host | str, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """``subprocess.Popen`` inside `host`; the caller waits for or kills it."""
        return self._host(host).popen(argv, **kwargs)

    def spawn(self, host: Host | str, argv: Sequence[str], *, log_path: str | Path,
              name: str | None = None, env: Mapping[str, str] | None = None,
              cwd: str | Path | None = None) -> ManagedProcess:
        """A long-running process inside `host`, stopped by test teardown and :meth:`close`."""
        return spawn(argv, netns=self._host(host).ns, log_path=log_path, name=name, env=env,
                     cwd=cwd)

    def _host(self, host: Host | str) -> Host:
        return self.hosts[host] if isinstance(host, str) else host

    # -- cleanup
    def close(self) -> None:
        """Stop the lab's processes and delete its namespaces (only those of a factory it
        made itself: a factory passed in is closed by its owner)."""
        if self._own_factory:
            self.factory.close()
        if self._dir is not None and self._own_dir:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "NatLab":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _run_all(commands: list[tuple[list[str], str]], timeout: float = 30) -> None:
    """Run commands in parallel (argv, stdin text); raise for the first that failed."""
    running = [(argv, subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True), text)
               for argv, text in commands]
    failed = None
    for argv, proc, text in running:
        _, err = proc.communicate(text, timeout=timeout)
        if proc.returncode != 0 and failed is None:
            failed = subprocess.CalledProcessError(proc.returncode, argv, "", f"{err}\n{text}")
    if failed:
        raise failed
