"""Two SIP servers serving one domain in the NAT lab (issue 13): what a pair test needs
whichever the servers are (two `sipmesh broker`s, two Kamailio instances).

* ``pair_lab``: the lab (two public server hosts, hosts ``a`` and ``b`` behind home routers)
  with a test's pair of servers in it, stopped at the end even on failure;
* ``agent``: `sipmesh serve|call` behind a home router, registered at every server given;
  ``ServerPair``: a pair's agents (``agent``, registered at both; ``stop_agents``);
* ``tunnel_ping``: a ping over a running tunnel; ``assert_ping_unbroken`` checks it ran
  without loss of the session (every interval answered but a couple);
* ``server_called``: which of the servers a caller's INVITE went to (its log says);
* ``new_call_within``: a caller started after a server's SIGKILL reaches its target (the
  recording test application on both sides) within a bound.
"""

from __future__ import annotations

import re
import signal
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
