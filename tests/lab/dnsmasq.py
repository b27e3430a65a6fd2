"""A DNS server for tests: dnsmasq on loopback, answering only from its own records.

It forwards nothing (``--no-resolv``, no upstream) and is authoritative for the
domains it is given (``--local``), so a name it does not know gets NXDOMAIN at once
and no query ever leaves the machine. Point a resolver at ``(dns.host, dns.port)``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

from sipmesh.lab.procs import ManagedProcess, free_port, spawn, wait_udp_listening

__all__ = ["Dnsmasq", "dnsmasq_unavailable_reason"]


def dnsmasq_unavailable_reason() -> str | None:
    return None if shutil.which("dnsmasq") else "needs dnsmasq (Debian package dnsmasq-base)"


class Dnsmasq:
    """``records``: ``("A", name, address, ttl)``, ``("SRV", name, target, port,
    priority, weight)`` and ``("NAPTR", name, order, preference, service, replacement)``
    (flag S) tuples. Stop it with :meth:`stop` (or use it as a context)."""

    def __init__(self, directory: Path, records: Sequence[tuple], *, domains: Sequence[str] = ("example.com",),
                 ttl: int = 30, netns: object | None = None, port: int | None = None) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port("udp")  # inside a namespace: 53, for its resolv.conf
        argv = ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--no-poll",
                f"--listen-address={self.host}", "--bind-interfaces", f"--port={self.port}",
                f"--local-ttl={ttl}", "--user=root", f"--pid-file={directory / 'dnsmasq.pid'}"]
        argv += [f"--local=/{domain}/" for domain in domains]
        for record in records:
            kind, name, *rest = record
            if kind == "A":
                address, record_ttl = rest
                argv.append(f"--host-record={name},{address},{record_ttl}")
            elif kind == "SRV":
                target, port, priority, weight = rest
                argv.append(f"--srv-host={name},{target},{port},{priority},{weight}")
            elif kind == "NAPTR":
                order, preference, service, replacement = rest
                argv.append(f"--naptr-record={name},{order},{preference},S,{service},,{replacement}")
            else:
                raise ValueError(f"unknown record kind {kind!r}")
        self.proc: ManagedProcess = spawn(argv, log_path=directory / "dnsmasq.log", netns=netns,
                                          name="dnsmasq")
        wait_udp_listening(self.host, self.port, netns=netns, proc=self.proc)

    @property
    def nameservers(self) -> list[tuple[str, int]]:
        return [(self.host, self.port)]

    def stop(self) -> None:
        self.proc.stop()

    def __enter__(self) -> "Dnsmasq":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
