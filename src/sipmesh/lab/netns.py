"""Network namespaces for the test lab.

Everything created here is named ``smt-<random>`` (≤ 15 characters, so the same names are
valid interface names) and is deleted again by :meth:`NetnsFactory.close` / the context
manager exit / the ``netns_factory`` fixture, even when the test fails.

Typical use::

    with NetnsFactory() as lab:
        a, b = lab.add("a"), lab.add("b")
        lab.veth(a, "10.99.0.1/24", b, "10.99.0.2/24")
        a.run(["ping", "-c1", "-W2", "10.99.0.2"])

Traffic rule: addresses used inside these namespaces never leave them (no interface is
connected to the host's network unless a test explicitly asks for a host-side veth end).
"""

from __future__ import annotations

import ctypes
import functools
import ipaddress
import os
import secrets
import shutil
import socket
import subprocess
import threading
from dataclasses import dataclass
from typing import Mapping, Sequence

from .procs import REGISTRY, ManagedProcess, netns_prefix, spawn

__all__ = [
    "PREFIX",
    "Netns",
    "NetnsFactory",
    "NetnsUnavailable",
    "Veth",
    "list_netns",
    "netns_unavailable_reason",
    "ip_batch",
    "popen",
    "run",
]

PREFIX = "smt-"
IFNAMSIZ_MAX = 15
_CLONE_NEWNET = 0x40000000


class NetnsUnavailable(RuntimeError):
    pass


def _ip(*args: str, check: bool = True, timeout: float = 15) -> subprocess.CompletedProcess:
    p = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise subprocess.CalledProcessError(p.returncode, ["ip", *args], p.stdout, p.stderr)
    return p


def ip_batch(lines: Sequence[str], ns: "Netns | str | None" = None, *,
             timeout: float = 15) -> None:
    """Run many ``ip`` commands in one process (``ip [-n NS] -batch -``): one exec instead of
    one per command, which is most of the cost of building a topology."""
    if not lines:
        return
    pre = ("-n", _ns_name(ns)) if ns is not None else ()
    p = subprocess.run(["ip", *pre, "-batch", "-"], input="\n".join(lines) + "\n",
                       capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise subprocess.CalledProcessError(p.returncode, ["ip", *pre, "-batch", "-"],
                                            p.stdout, f"{p.stderr}\nbatch was:\n" + "\n".join(lines))


def list_netns() -> list[str]:
    """Names from ``ip netns list``."""
    p = _ip("netns", "list", check=False)
    return [line.split()[0] for line in p.stdout.splitlines() if line.strip()]


@functools.lru_cache(maxsize=1)
def netns_unavailable_reason() -> str | None:
    """None if network namespaces can be used here, else a human-readable reason."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "needs the 'ip' command (iproute2)"
    probe = f"{PREFIX}probe{secrets.token_hex(2)}"
    try:
        p = _ip("netns", "add", probe, check=False)
        if p.returncode != 0:
            return f"'ip netns add' failed: {p.stderr.strip()}"
        p = _ip("-n", probe, "link", "set", "lo", "up", check=False)
        if p.returncode != 0:
            return f"cannot configure a network namespace: {p.stderr.strip()}"
    except (OSError, subprocess.SubprocessError) as exc:
        return f"'ip netns' unavailable: {exc}"
    finally:
        _ip("netns", "delete", probe, check=False)
    return None


def _unique(prefix: str = PREFIX, hint: str = "") -> str:
    """``smt-`` + hint (shortened) + random hex, at most 15 characters."""
    hint = "".join(c for c in hint if c.isalnum())[:4]
    rand = secrets.token_hex(3)  # 6 chars
    name = f"{prefix}{hint}{rand}"
    return name[:IFNAMSIZ_MAX]


def _ns_name(ns: "Netns | str | None") -> str | None:
    if ns is None:
        return None
    return getattr(ns, "name", ns)


def run(ns: "Netns | str | None", argv: Sequence[str], check: bool = True,
        timeout: float = 30, input: str | None = None,
        env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``argv`` inside ``ns`` (``ip netns exec``; host namespace if None), capture text output."""
    full = netns_prefix(_ns_name(ns)) + [str(a) for a in argv]
    p = subprocess.run(full, capture_output=True, text=True, timeout=timeout, input=input,
                       env=dict(env) if env is not None else None)
    if check and p.returncode != 0:
        raise subprocess.CalledProcessError(p.returncode, full, p.stdout, p.stderr)
    return p


def popen(ns: "Netns | str | None", argv: Sequence[str], **kwargs) -> subprocess.Popen:
    """``subprocess.Popen`` of ``argv`` inside ``ns``. The caller owns the process;
    prefer :func:`sipmesh.lab.procs.spawn` (``netns=``) for long-running programs."""
    full = netns_prefix(_ns_name(ns)) + [str(a) for a in argv]
    return subprocess.Popen(full, **kwargs)


@dataclass
class Veth:
    """One veth pair. ``a_ns``/``b_ns`` None means the host namespace."""

    a_name: str
    b_name: str
    a_ns: "Netns | None"
    b_ns: "Netns | None"
    a_cidr: str | None
    b_cidr: str | None

    @property
    def a_ip(self) -> str | None:
        return str(ipaddress.ip_interface(self.a_cidr).ip) if self.a_cidr else None

    @property
    def b_ip(self) -> str | None:
        return str(ipaddress.ip_interface(self.b_cidr).ip) if self.b_cidr else None


class Netns:
    """One network namespace (``lo`` up). Context manager: deleted on exit."""

    def __init__(self, name: str | None = None, *, hint: str = "", create: bool = True):
        self.name = name or _unique(hint=hint)
        if len(self.name) > IFNAMSIZ_MAX:
            raise ValueError(f"namespace name too long (> {IFNAMSIZ_MAX}): {self.name}")
        self.deleted = False
        if create:
            _ip("netns", "add", self.name)
            try:
                self.ip("link", "set", "lo", "up")
            except BaseException:
                _ip("netns", "delete", self.name, check=False)
                raise

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<Netns {self.name}{' deleted' if self.deleted else ''}>"

    # -- commands inside
    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """``ip -n NAME ARGS...``"""
        return _ip("-n", self.name, *args, check=check)

    def run(self, argv: Sequence[str], check: bool = True, timeout: float = 30,
            input: str | None = None, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
        return run(self, argv, check=check, timeout=timeout, input=input, env=env)

    def popen(self, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        return popen(self, argv, **kwargs)

    def spawn(self, argv: Sequence[str], *, log_path, cwd=None, env=None, name=None) -> ManagedProcess:
        """Managed long-running process inside this namespace (see procs.spawn)."""
        return spawn(argv, cwd=cwd, env=env, log_path=log_path, netns=self, name=name)

    def exec_prefix(self) -> list[str]:
        return netns_prefix(self.name)

    def forward_tcp(self, port: int, *, log_path) -> tuple[ManagedProcess, int]:
        """A port on the test host's 127.0.0.1 that reaches 127.0.0.1:`port` inside this
        namespace (e.g. a web page a browser on the host opens): socat listens here, and
        for each connection a socat inside the namespace connects (argv, no shell)."""
        from .procs import free_port

        local = free_port("tcp")
        inner = " ".join([*self.exec_prefix(), "socat", "STDIO", f"TCP\\:127.0.0.1\\:{port}"])  # (socat: \\: is a colon)
        proc = spawn(["socat", f"TCP-LISTEN:{local},bind=127.0.0.1,reuseaddr,fork", f"EXEC:{inner}"],
                     log_path=log_path, name=f"forward:{self.name}:{port}")
        return proc, local

    def socket(self, family: int = socket.AF_INET, kind: int = socket.SOCK_DGRAM) -> socket.socket:
        """A socket inside this namespace, for use by the test process itself: a thread
        enters the namespace just long enough to create it (setns affects that thread only)."""
        made: list[socket.socket | BaseException] = []

        def create() -> None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                with open(f"/var/run/netns/{self.name}") as handle:
                    if libc.setns(handle.fileno(), _CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), f"setns into {self.name}")
                made.append(socket.socket(family, kind))
            except BaseException as exc:  # handed to the caller's thread
                made.append(exc)

        thread = threading.Thread(target=create, name=f"setns-{self.name}")
        thread.start()
        thread.join()
        if isinstance(made[0], BaseException):
            raise made[0]
        return made[0]

    # -- configuration
    def add_addr(self, dev: str, cidr: str) -> None:
        self.ip("addr", "add", cidr, "dev", dev)

    def add_route(self, dest: str, via: str | None = None, dev: str | None = None) -> None:
        """``ip route replace DEST [via VIA] [dev DEV]`` (DEST may be 'default')."""
        args = ["route", "replace", dest]
        if via:
            args += ["via", via]
        if dev:
            args += ["dev", dev]
        self.ip(*args)

    def enable_forwarding(self, ipv6: bool = False) -> None:
        self.run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        if ipv6:
            self.run(["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"])

    def links(self) -> list[str]:
        out = self.ip("-o", "link", "show").stdout
        return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]

    def delete(self) -> None:
        if self.deleted:
            return
        # kill whatever still runs inside, so the namespace really goes away
        pids = _ip("netns", "pids", self.name, check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), 9)
            except (ProcessLookupError, ValueError, PermissionError):
                pass
        _ip("netns", "delete", self.name, check=False)
        self.deleted = True

    def __enter__(self) -> "Netns":
        return self

    def __exit__(self, *exc) -> None:
        self.delete()


class NetnsFactory:
    """Creates namespaces and veth pairs, and deletes all of them on :meth:`close`."""

    def __init__(self, prefix: str = PREFIX):
        reason = netns_unavailable_reason()
        if reason:
            raise NetnsUnavailable(reason)
        self.prefix = prefix
        self.namespaces: list[Netns] = []
        self.veths: list[Veth] = []
        self._lock = threading.Lock()
        self.closed = False

    # -- creation
    def add(self, hint: str = "") -> Netns:
        """New namespace named ``smt-<hint[:4]><6 hex>`` with ``lo`` up."""
        ns = Netns(_unique(self.prefix, hint))
        with self._lock:
            self.namespaces.append(ns)
        return ns

    new = add

    def add_many(self, hints: Sequence[str], *, setup: Sequence[str] = ()) -> list[Netns]:
        """Several namespaces in one ``ip -batch`` (``lo`` still down: bring it up in the
        namespace's own batch), followed by the host-level ``ip`` commands `setup` (e.g.
        ``link add X netns A type veth peer name Y netns B``) in the same process. The
        namespaces are registered before they exist, so :meth:`close` deletes them even when
        the batch fails half way."""
        made = [Netns(_unique(self.prefix, hint), create=False) for hint in hints]
        with self._lock:
            self.namespaces.extend(made)
        ip_batch([f"netns add {ns.name}" for ns in made] + list(setup))
        return made

    def lo_only(self, hint: str = "lo") -> Netns:
        """A namespace with nothing but ``lo`` (for servers fed hostile messages)."""
        return self.add(hint)

    def veth(self, a: Netns | None, a_cidr: str | None, b: Netns | None, b_cidr: str | None,
             *, a_name: str | None = None, b_name: str | None = None, mtu: int | None = None) -> Veth:
        """Create a veth pair with one end in ``a`` and the other in ``b`` (None = host
        namespace), assign the CIDRs (either may be None) and bring both ends up."""
        a_name = a_name or _unique("smv", "")
        b_name = b_name or _unique("smv", "")
        for n in (a_name, b_name):
            if len(n) > IFNAMSIZ_MAX:
                raise ValueError(f"interface name too long: {n}")
        args = ["link", "add", a_name]
        if a is not None:
            args += ["netns", a.name]
        args += ["type", "veth", "peer", "name", b_name]
        if b is not None:
            args += ["netns", b.name]
        _ip(*args)
        v = Veth(a_name, b_name, a, b, a_cidr, b_cidr)
        with self._lock:
            self.veths.append(v)
        for ns, dev, cidr in ((a, a_name, a_cidr), (b, b_name, b_cidr)):
            pre = ("-n", ns.name) if ns is not None else ()
            if mtu:
                _ip(*pre, "link", "set", dev, "mtu", str(mtu))
            if cidr:
                _ip(*pre, "addr", "add", cidr, "dev", dev)
            _ip(*pre, "link", "set", dev, "up")
        return v

    # -- convenience wrappers (namespace first, like the module functions)
    def route(self, ns: Netns, dest: str, via: str | None = None, dev: str | None = None) -> None:
        ns.add_route(dest, via=via, dev=dev)

    def enable_forwarding(self, ns: Netns, ipv6: bool = False) -> None:
        ns.enable_forwarding(ipv6)

    def run(self, ns: Netns | str | None, argv: Sequence[str], check: bool = True,
            timeout: float = 30) -> subprocess.CompletedProcess:
        return run(ns, argv, check=check, timeout=timeout)

    def popen(self, ns: Netns | str | None, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        return popen(ns, argv, **kwargs)

    # -- cleanup
    def close(self) -> None:
        """Delete every veth and namespace this factory created (idempotent)."""
        with self._lock:
            veths, self.veths = self.veths, []
            nss, self.namespaces = self.namespaces, []
        # stop our managed processes running inside these namespaces, gracefully first
        ours = {id(ns) for ns in nss} | {ns.name for ns in nss}
        for proc in list(REGISTRY):
            owner = proc.netns
            if owner is not None and (id(owner) in ours or getattr(owner, "name", owner) in ours):
                try:
                    proc.stop(grace=3.0)
                except Exception:  # noqa: BLE001
                    pass
        for v in veths:
            # host-side ends are not removed by deleting a namespace
            for ns, dev in ((v.a_ns, v.a_name), (v.b_ns, v.b_name)):
                if ns is None:
                    _ip("link", "delete", dev, check=False)
        for ns in reversed(nss):
            ns.delete()
        self.closed = True

    def __enter__(self) -> "NetnsFactory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
