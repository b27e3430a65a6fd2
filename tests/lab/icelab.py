"""The lab of whole sessions across NAT (issue 11): the NAT lab of sipmesh/lab/topology.py,
a SIP server (our broker or Kamailio) that answers STUN on its SIP port, coturn beside it,
and `sipmesh serve` with the echo program of tests/peers/udp_pair.py on the answering hosts.
Used by test_ice_sessions and test_streams (``from tests.lab.icelab import ice_lab``)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from sipmesh.lab.natsite import SIPMESH
from tests.lab import (Host, ManagedProcess, NatLab, coturn_unavailable_reason,
                       netns_unavailable_reason, spawn, wait_for)
from tests.lab.natsite import NatSite, password

PYTHON = sys.executable
PAIR = str(Path(__file__).parent.parent / "peers" / "udp_pair.py")
ANSWERING = ("p", "a", "b", "s", "s2")     # hosts running `sipmesh serve` as themselves
HOSTS = {"broker": "public", "p": "public", "x": "public", "v": "public", "a": "home",
         "b": "home", "s": "symmetric", "s2": "symmetric", "u": "udp_blocked"}


@dataclass
class IceLab:
    lab: NatLab
    run: Path
    site: NatSite
    serve: dict[str, ManagedProcess]

    def __getitem__(self, name: str) -> Host:
        return self.lab[name]

    @property
    def broker(self) -> Host:
        return self.site.host

    @property
    def server(self) -> str:
        return self.site.server

    @property
    def turn(self) -> str:
        return self.site.turn

    def agent_argv(self, mode: str, user: str, *extra: str) -> list[str]:
        return [SIPMESH, mode, "--server", self.server, "--user", user,
                "--password", password(user), "--turn", self.turn, "-v", *extra]

    def call(self, caller: str, callee: str, *extra: str, program: str = "5",
             turn: str | None = None) -> ManagedProcess:
        """`sipmesh call CALLEE` from host `caller` as user CALLERc, running the ping program."""
        argv = self.agent_argv("call", f"{caller}c", *extra) + [callee, "--timeout", "15",
                                                                "--register-timeout", "3"]
        if turn is not None:
            argv[argv.index("--turn") + 1] = turn
        argv += ["--", PYTHON, PAIR, "ping", str(self.run), program]
        n = len(list(self.run.glob("call-*.log")))
        return spawn(argv, netns=self[caller].ns, cwd=self.run,
                     log_path=self.run / f"call-{n}-{caller}-{callee}.log", name=f"call-{caller}")

    def record(self, role: str, call_id: str) -> dict | None:
        path = self.run / f"{role}-{call_id}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def records(self, role: str) -> set[str]:
        return {p.stem.split("-", 1)[1] for p in self.run.glob(f"{role}-*.json")}

    def diagnosis(self, *procs: ManagedProcess) -> str:
        parts = [f"--- {p.name}:\n{p.log_tail(40)}" for p in procs]
        parts += [f"--- serve {name}:\n{proc.log_tail(15)}" for name, proc in self.serve.items()]
        return "\n".join(parts)


def build_ice_lab(run: Path, server: str, hosts: dict[str, str],
                  answering: tuple[str, ...]) -> Iterator[IceLab]:
    """The lab of `hosts`, the site's SIP `server` (broker or kamailio) and coturn on
    "broker", `sipmesh serve` with the echo program as itself on each `answering` host."""
    for reason in (netns_unavailable_reason(), coturn_unavailable_reason()):
        if reason:
            pytest.skip(reason)
    with NatLab() as lab:
        lab.add_hosts(hosts)
        names = [n for n in hosts if n != "broker"]
        site = NatSite(lab, run, names + [f"{n}c" for n in names] + ["sd"],
                       server=server).start()
        try:
            serve: dict[str, ManagedProcess] = {}
            for name in answering:
                argv = [SIPMESH, "serve", "--server", site.server, "--user", name,
                        "--password", password(name), "--turn", site.turn, "-v",
                        "--app-port", "40000", "--", PYTHON, PAIR, "echo", str(run)]
                serve[name] = spawn(argv, netns=lab[name].ns, cwd=run,
                                    log_path=run / f"serve-{name}.log", name=f"serve-{name}")
                site.procs.append(serve[name])
            for name, agent in serve.items():
                wait_for(lambda: "ready: contact" in agent.log_text(), 20,
                         what=f"serve {name} registered", abort=agent.exit_reason)
            yield IceLab(lab, run, site, serve)
        finally:
            site.stop()


@pytest.fixture(scope="module")
def ice_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IceLab]:
    yield from build_ice_lab(tmp_path_factory.mktemp("icelab"), "broker", HOSTS, ANSWERING)


@pytest.fixture(scope="module")
def kamailio_ice_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IceLab]:
    """The same with Kamailio (docs/kamailio/kamailio.cfg) as the SIP and STUN server."""
    yield from build_ice_lab(tmp_path_factory.mktemp("icelab-kamailio"), "kamailio", HOSTS, ANSWERING)
