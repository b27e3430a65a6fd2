"""Two SIP servers serving one domain in the NAT lab (issue 13): what a pair test needs
whichever the servers are (two `sipmesh broker`s, two Kamailio instances).

* ``pair_lab``: the lab (two public server hosts, hosts ``a`` and ``b`` behind home routers)
  with a test's pair of servers in it, stopped at the end even on failure;
* ``agent``: `sipmesh serve|call` behind a home router, registered at every server given;
  ``ServerPair``: a pair's agents (``agent``, registered at both; ``daemon`` with a forward
  service, ``forward_call`` reaching it; ``stop_agents``);
* ``trickle``: a slow TCP transfer across a forward (trickle.py), ``assert_trickle_unbroken``;
* ``tunnel_ping``: a ping over a running tunnel; ``assert_ping_unbroken`` checks it ran
  without loss of the session (every interval answered but a couple);
* ``server_called``: which of the servers a caller's INVITE went to (its log says);
* ``new_call_within``: a caller started after a server's SIGKILL reaches its target (the
  recording test application on both sides) within a bound.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Protocol, TypeVar

import pytest

from sipmesh.lab.natsite import SIPMESH, password
from sipmesh.lab.netns import netns_unavailable_reason
from sipmesh.lab.procs import ManagedProcess, spawn
from sipmesh.lab.waiting import wait_for

from .agents import app_argv, record
from .topology import NatLab


class Stoppable(Protocol):
    def stop(self) -> None: ...


P = TypeVar("P", bound=Stoppable)

PING_INTERVAL = 0.2


@contextmanager
def pair_lab(server_hosts: tuple[str, str], make: Callable[[NatLab], P]) -> Iterator[P]:
    """A NatLab with `server_hosts` public and ``a``, ``b`` behind home routers, and the
    pair `make(lab)` builds there; the pair's stop() and the lab's teardown always run."""
    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with NatLab() as lab:
        lab.add_hosts({server_hosts[0]: "public", server_hosts[1]: "public",
                       "a": "home", "b": "home"})
        pair = None
        try:
            pair = make(lab)
            yield pair
        finally:
            if pair is not None:
                pair.stop()


def agent(lab, run: Path, servers: list[str], mode: str, host: str, user: str, *extra: str,
          target: str | None = None) -> ManagedProcess:
    """`sipmesh MODE [TARGET] --server S1 --server S2 ... --user USER` on ``lab[host]``."""
    argv = [SIPMESH, mode, *([target] if target else []),
            *(arg for server in servers for arg in ("--server", server)),
            "--user", user, "--password", password(user),
            "--state-dir", str(run / f"state-{user}"), "-v", *extra]
    return spawn(argv, netns=lab[host].ns, cwd=run, name=f"{mode}-{user}",
                 log_path=run / f"{mode}-{user}.log")


# A forward service (docs/daemon.md, kind forward): to TARGET on the answering side, at
# 127.0.0.1:LOCAL on the calling side.
FORWARD = '''
[allocators.tcp]
type = "ports"
range = "7100-7109"
protocols = ["tcp"]

[[service]]
name = "{name}"
kind = "forward"
target = "{target}"
port = "tcp"
allow = ["*"]
[service.call]
local_port = {local}
local_host = "127.0.0.1"
'''
TRICKLE = str(Path(__file__).with_name("trickle.py"))


def trickle_echo(lab, host: str, port: int, run: Path) -> ManagedProcess:
    """An echo server on 127.0.0.1:`port` of ``lab[host]`` (the forward's target)."""
    proc = spawn([sys.executable, TRICKLE, "echo", str(port)], netns=lab[host].ns,
                 name="trickle-echo", log_path=run / "trickle-echo.log")
    wait_for(lambda: "ready" in proc.log_text(), 10, what="the echo server",
             abort=proc.exit_reason)
    return proc


def trickle(lab, host: str, port: int, run: Path, seconds: int = 120) -> ManagedProcess:
    """A line every trickle.INTERVAL s to 127.0.0.1:`port` of ``lab[host]``, echoed back;
    returned once the first echo came."""
    proc = spawn([sys.executable, TRICKLE, "send", str(port), str(seconds)], netns=lab[host].ns,
                 name="trickle", log_path=run / "trickle.log")
    wait_for(lambda: "echoed 1\n" in proc.log_text(), 15, what="the first echo over the forward",
             abort=proc.exit_reason)
    return proc


def assert_trickle_unbroken(proc: ManagedProcess, since: float) -> None:
    """Stop the transfer: its connection held since `since` (monotonic), every line echoed,
    none after a pause of a second or more."""
    ran = time.monotonic() - since
    code = proc.stop(grace=15)
    result = json.loads(proc.log_text().strip().splitlines()[-1])
    assert code == 0 and result["error"] is None, proc.log_tail(5)
    assert result["echoed"] >= ran / 0.1 * 0.3, (ran, result)   # (INTERVAL + a round trip)
    assert result["max_gap"] < 1.0, result


class ServerPair:
    """What a pair of servers in a NatLab does with agents; a subclass starts the servers,
    says where they are (``servers``, host:port each) and stops them (``stop``)."""

    servers: list[str]

    def __init__(self, lab, run: Path) -> None:
        self.lab, self.run = lab, run
        self.procs: list[ManagedProcess] = []

    def agent(self, mode: str, host: str, user: str, *extra: str, target: str | None = None,
              servers: list[str] | None = None) -> ManagedProcess:
        """`agent` registered at both (or at `servers`), stopped by ``stop_agents``."""
        proc = agent(self.lab, self.run, servers or self.servers, mode, host, user, *extra,
                     target=target)
        self.procs.append(proc)
        return proc

    def config(self, user: str, services: str, **agent: object) -> Path:
        """`user`'s daemon configuration: both servers, `agent`'s keys, `services` (TOML)."""
        lines = [f"server = {json.dumps(self.servers[0])}",
                 f"servers = {json.dumps(self.servers[1:])}", f'user = "{user}"',
                 f"password = {json.dumps(password(user))}",
                 f"state_dir = {json.dumps(str(self.run / f'state-{user}'))}",
                 f"control_socket = {json.dumps(str(self.run / f'{user}.sock'))}",
                 *(f"{key} = {json.dumps(value)}" for key, value in agent.items())]
        path = self.run / f"{user}.toml"
        path.write_text("[agent]\n" + "\n".join(lines) + "\n" + services)
        return path

    def daemon(self, host: str, user: str, services: str, **agent: object) -> ManagedProcess:
        """`sipmesh daemon` on `host` as `user`, registered at both, once ready."""
        proc = spawn([SIPMESH, "daemon", "-c", str(self.config(user, services, **agent)), "-v"],
                     netns=self.lab[host].ns, cwd=self.run, name=f"daemon-{user}",
                     log_path=self.run / f"daemon-{user}.log")
        self.procs.append(proc)
        wait_for(lambda: all(f" at {s} for " in proc.log_text() for s in self.servers), 20,
                 what=f"daemon {user} registered at both", abort=proc.exit_reason)
        return proc

    def forward_call(self, host: str, user: str, target: str, service: str, port: int,
                     **agent: object) -> ManagedProcess:
        """`sipmesh call TARGET --service SERVICE` on `host` as `user` (a forward whose
        calling side listens on `port`), once the forward listens."""
        services = FORWARD.format(name=service, target="127.0.0.1:9", local=port)
        proc = spawn([SIPMESH, "call", target, "--service", service, "-v",
                      "-c", str(self.config(user, services, **agent))],
                     netns=self.lab[host].ns, cwd=self.run, name=f"call-{user}",
                     log_path=self.run / f"call-{user}-{service}.log")
        self.procs.append(proc)
        wait_for(lambda: f"is reachable at 127.0.0.1:{port}" in proc.log_text(), 30,
                 what=f"the forward {service} at {host}", abort=proc.exit_reason)
        return proc

    def stop_agents(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(grace=10)


def tunnel_ping(lab, host: str, address: str, run: Path, seconds: int = 120) -> ManagedProcess:
    """ping ADDRESS from ``lab[host]`` every PING_INTERVAL s, for at most `seconds`."""
    return spawn(["ping", "-n", "-i", str(PING_INTERVAL), "-w", str(seconds), address],
                 netns=lab[host].ns, name="ping", log_path=run / "ping.log")


def assert_ping_unbroken(ping: ManagedProcess, since: float) -> None:
    """Stop `ping`: it ran the whole time since `since` (monotonic) and lost at most two."""
    pinged = time.monotonic() - since
    assert ping.stop(grace=5, sig=signal.SIGINT) == 0, ping.log_tail(10)
    sent, received = map(int, re.search(r"(\d+) packets transmitted, (\d+) received",
                                        ping.log_text()).groups())
    assert sent >= pinged / PING_INTERVAL * 0.8 and received >= sent - 2, ping.log_tail(5)


def server_called(call: ManagedProcess, user: str, hosts: list[str]) -> int:
    """The index in `hosts` of the server the caller sent its INVITE for `user` to."""
    found = re.search(rf"calling sip:{re.escape(user)}@([0-9.]+):", call.log_text())
    assert found and found.group(1) in hosts, call.log_tail(20)
    return hosts.index(found.group(1))


def new_call_within(start: Callable[..., ManagedProcess], run: Path, killed: float,
                    bound: float, caller: str = "an", callee: str = "bn") -> ManagedProcess:
    """`start("call", "a", caller, ..., target=callee)` (a pair's agent spawner), begun after
    a server was SIGKILLed at `killed` (monotonic) and registering while it is down,
    reaches `callee`'s program within `bound` s. The running caller is returned."""
    new = start("call", "a", caller, "--register-timeout", "2", "--", *app_argv(run, "run"),
                target=callee)
    wait_for(lambda: record(run, "client") and record(run, "server"), 30,
             what="the new session through the survivor", abort=new.exit_reason)
    elapsed = time.monotonic() - killed
    print(f"new session through the survivor {elapsed:.2f} s after SIGKILL")
    assert elapsed < bound, (elapsed, new.log_tail(30))
    return new
