"""Per-session resources: application ports and tunnel address pairs.

An allocator is a policy from the configuration (a port range, an address pool);
what is in use is recorded in one `Ledger` per daemon, which outlives
configuration reloads: a port held by a session of the old configuration stays
taken when the new configuration's range overlaps it. A session's resources are
held by its `Lease` and all released together when the session ends.

Ports keep the prototype's next-free behaviour: the first port of the range that
no session holds and that nothing on the host has bound (UDP and/or TCP), else
the next one. Addresses come in pairs for point-to-point tunnels: the answering
side's address first, the caller's second -- from 10.77.0.0/24 the pairs are
(.1, .2), (.3, .4), ... (.253, .254), so the first pair is the paper's
192.168.234.1/.2 pattern and neither the network nor the broadcast address is used.
A pair whose address is already configured on this host is skipped.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Iterator, Mapping

from sipmesh.agent.errors import Exhausted, Exit
from sipmesh.agent.ports import port_is_free

__all__ = ["AddressPool", "Allocator", "AllocationError", "Ephemeral", "Lease", "Ledger",
           "PortRange"]

MAX_PAIRS = 1 << 16  # a pool larger than this is walked only this far


class AllocationError(Exhausted):
    """No free port or address: the session cannot be served now (486)."""


@dataclass
class Ledger:
    """What every running session holds, across configuration generations."""

    ports: set[tuple[str, int]] = field(default_factory=set)  # (protocol, port)
    addresses: set[str] = field(default_factory=set)
    # Per range, a port below which every port was taken when last looked at, so that a
    # thousand sessions do not make each allocation walk a thousand held ports; lowered
    # again whenever a port below it is released.
    hints: dict[tuple, int] = field(default_factory=dict)

    def release_port(self, protocols: tuple[str, ...], port: int) -> None:
        for p in protocols:
            self.ports.discard((p, port))
        for key, hint in self.hints.items():
            if key[0] <= port < hint:
                self.hints[key] = port

    def empty(self) -> bool:
        return not self.ports and not self.addresses


class Allocator:
    kind = "allocator"

    def __init__(self, name: str) -> None:
        self.name = name

    def describe(self) -> str:
        return self.name

    def same_as(self, other: "Allocator") -> bool:
        return type(self) is type(other) and self.describe() == other.describe()


class PortRange(Allocator):
    kind = "ports"

    def __init__(self, name: str, first: int, last: int, protocols: tuple[str, ...] = ("tcp",),
                 host: str = "") -> None:
        super().__init__(name)
        if not 1 <= first <= last <= 65535:
            raise ValueError(f"bad port range {first}-{last}")
        self.first, self.last = first, last
        self.protocols = protocols
        self.host = host

    def describe(self) -> str:
        return f"ports {self.first}-{self.last} ({'/'.join(self.protocols)})"

    def allocate(self, ledger: Ledger, protocols: tuple[str, ...] | None = None,
                 host: str | None = None) -> int:
        protocols = protocols or self.protocols
        host = self.host if host is None else host
        key = (self.first, self.last, protocols)
        held = ledger.ports
        start = max(self.first, ledger.hints.get(key, self.first))
        all_held = True  # every port from `start` on was ours: the hint may move past them
        for port in range(start, self.last + 1):
            if any((p, port) in held for p in protocols):
                continue
            if port_is_free(port, protocols, host):
                held.update((p, port) for p in protocols)
                if all_held:
                    ledger.hints[key] = port + 1
                return port
            all_held = False  # busy outside the daemon: look at it again next time
        raise AllocationError(f"no free {'/'.join(protocols)} port in {self.name} "
                              f"({self.first}-{self.last})", Exit.BUSY)


class Ephemeral(Allocator):
    """Any free port, chosen by the kernel (when a service names no port range)."""

    kind = "ports"

    def __init__(self) -> None:
        super().__init__("ephemeral")

    def describe(self) -> str:
        return "ephemeral ports"

    def allocate(self, ledger: Ledger, protocols: tuple[str, ...] = ("tcp",),
                 host: str | None = None) -> int:
        host = host or ""
        for _attempt in range(50):
            kind = socket.SOCK_DGRAM if protocols[0] == "udp" else socket.SOCK_STREAM
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, kind) as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
            if any((p, port) in ledger.ports for p in protocols):
                continue
            if port_is_free(port, protocols, host):
                ledger.ports.update((p, port) for p in protocols)
                return port
        raise AllocationError("no free ephemeral port", Exit.BUSY)


class AddressPool(Allocator):
    kind = "addresses"

    def __init__(self, name: str, pool: str) -> None:
        super().__init__(name)
        self.network = ipaddress.ip_network(pool, strict=False)
        if self.network.num_addresses < 4 and self.network.prefixlen < self.network.max_prefixlen - 1:
            raise ValueError(f"{pool} is too small for a pair of addresses")

    def describe(self) -> str:
        return f"addresses {self.network}"

    def pairs(self) -> Iterator[tuple[str, str]]:
        net = self.network
        if net.num_addresses <= 2:  # /31 (or /127): the two addresses themselves
            first = net.network_address
            yield str(first), str(first + 1)
            return
        make = type(net.network_address)
        base = int(net.network_address)
        last = int(net.broadcast_address)
        for i in range(MAX_PAIRS):
            a = base + 1 + 2 * i
            if a + 1 >= last:
                return
            yield str(make(a)), str(make(a + 1))

    def allocate(self, ledger: Ledger) -> tuple[str, str]:
        for local, remote in self.pairs():
            if local in ledger.addresses or remote in ledger.addresses:
                continue
            if _configured_here(local) or _configured_here(remote):
                continue
            ledger.addresses.update((local, remote))
            return local, remote
        raise AllocationError(f"no free address pair in {self.name} ({self.network})", Exit.BUSY)


def _configured_here(address: str) -> bool:
    """Is `address` assigned to an interface of this host (a tunnel we do not know of)?"""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.bind((address, 0))
        except OSError:
            return False
    return True


class Lease:
    """The resources of one session, released together."""

    def __init__(self, ledger: Ledger, allocators: Mapping[str, Allocator]) -> None:
        self.ledger = ledger
        self.allocators = allocators
        self.ports: list[tuple[tuple[str, ...], int]] = []
        self.addresses: list[str] = []
        self.released = False

    def _allocator(self, name: str | None, kind: str) -> Allocator:
        if name is None:
            return Ephemeral()
        allocator = self.allocators.get(name)
        if allocator is None or allocator.kind != kind:
            raise AllocationError(f"no {kind} allocator named {name!r}")
        return allocator

    def port(self, allocator: str | None, protocols: tuple[str, ...] | None = None,
             host: str | None = None) -> int:
        source = self._allocator(allocator, "ports")
        assert isinstance(source, (PortRange, Ephemeral))
        protocols = protocols or (source.protocols if isinstance(source, PortRange) else ("tcp",))
        port = source.allocate(self.ledger, protocols, host)
        self.ports.append((protocols, port))
        return port

    def pair(self, allocator: str) -> tuple[str, str]:
        source = self._allocator(allocator, "addresses")
        assert isinstance(source, AddressPool)
        local, remote = source.allocate(self.ledger)
        self.addresses += [local, remote]
        return local, remote

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        for protocols, port in self.ports:
            self.ledger.release_port(protocols, port)
        for address in self.addresses:
            self.ledger.addresses.discard(address)

    def describe(self) -> dict[str, list]:
        return {"ports": [f"{port}/{'+'.join(protocols)}" for protocols, port in self.ports],
                "addresses": list(self.addresses)}
