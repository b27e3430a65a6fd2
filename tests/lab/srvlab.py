"""Two brokers found by DNS SRV (RFC 3263), the way a user deploys a redundant pair.

A namespace with only ``lo``: dnsmasq on 127.0.0.1:53 answers for example.test
(``_sip._udp`` and ``_sip._tcp``: b1.example.test at 127.0.0.2 priority 10, b2.example.test
at 127.0.0.3 priority 20, port 5060 each), and the namespace's /etc/netns/NAME/resolv.conf
names it, so a program started in the namespace (``ip netns exec`` mounts that file over
/etc/resolv.conf) resolves through it as it would through a real DNS server. Each broker
is `sipmesh broker --domain example.test` with a database of its own. ``kill(name)``
SIGKILLs one, ``restart(name)`` starts it again on the same database; ``list_in_dns``
changes which of them the SRV records name.
tests/test_srv.py and bench/failover.py use it; :meth:`close` removes everything.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

from .broker import BrokerServer
from .dnsmasq import Dnsmasq

DOMAIN = "example.test"
BROKERS = {"b1": ("127.0.0.2", 10), "b2": ("127.0.0.3", 20)}  # name -> (address, priority)


class SrvLab:
    """On a NetnsFactory (`factory`), which deletes the namespace."""

    def __init__(self, factory, run_dir: Path, *,  # type: ignore[no-untyped-def]
                 listed: tuple[str, ...] = tuple(BROKERS), ttl: int | None = None) -> None:
        self.run_dir = run_dir
        self.ns = factory.add("srv")
        self.brokers: dict[str, BrokerServer] = {}
        self.etc = Path("/etc/netns") / self.ns.name
        self.dns: Dnsmasq | None = None
        self.ttl = ttl   # of every record (None: dnsmasq's 30 s for SRV, 60 s for A)
        try:
            self.etc.mkdir(parents=True, exist_ok=True)
            (self.etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")
            self.list_in_dns(*listed)
            for name in BROKERS:
                self.restart(name)
        except BaseException:
            self.close()
            raise

    def list_in_dns(self, *names: str) -> None:
        """The SRV records name these brokers (all are running): dnsmasq is started again
        with them (it reads its records once)."""
        if self.dns is not None:
            self.dns.stop()
            self.dns = None
        records: list[tuple] = []
        for name, (address, priority) in BROKERS.items():
            records.append(("A", f"{name}.{DOMAIN}", address, self.ttl or 60))
            if name in names:
                for service in ("_sip._udp", "_sip._tcp"):
                    records.append(("SRV", f"{service}.{DOMAIN}", f"{name}.{DOMAIN}", 5060,
                                    priority, 10))
        self.dns = Dnsmasq(self.run_dir, records, domains=(DOMAIN,), netns=self.ns, port=53,
                           ttl=self.ttl or 30)

    def server(self, name: str) -> str:
        """host:port of a broker, as an agent's status shows the servers it found."""
        return f"{BROKERS[name][0]}:5060"

    def restart(self, name: str) -> BrokerServer:
        broker = BrokerServer(self.run_dir / name, host=BROKERS[name][0], netns=self.ns,
                              domain=DOMAIN)
        self.brokers[name] = broker
        return broker

    def kill(self, name: str) -> float:
        """SIGKILL broker `name`; returns time.monotonic() of the kill."""
        broker = self.brokers[name]
        os.kill(broker.proc.popen.pid, signal.SIGKILL)
        killed = time.monotonic()
        broker.proc.stop()  # reaped
        return killed

    def close(self) -> None:
        for broker in self.brokers.values():
            broker.stop()
        if self.dns is not None:
            self.dns.stop()
        shutil.rmtree(self.etc, ignore_errors=True)
