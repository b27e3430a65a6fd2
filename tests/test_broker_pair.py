"""Two embedded brokers serving one domain (issue 13 items 2 and 4; docs/broker.md, "Two
brokers"), in the NAT lab: agents behind home routers register at both (`--server A
--server B`, one +sip.instance). SIGKILL the broker a running WireGuard session was set
up through: the ping across the tunnel goes on without loss of the session, a new call
reaches its target through the survivor within the bound, the killed broker comes back
with the same store and re-learns every registration (those made while it was down too),
and the old session's BYE goes through it again."""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest

from sipmesh.broker.location import LocationService
from sipmesh.broker.users import UsersFile
from tests.lab import NatLab, netns_unavailable_reason, spawn, wait_for
from tests.lab.agents import SIPMESH, app_argv, record
from tests.lab.broker import BrokerServer

pytestmark = [pytest.mark.slow, pytest.mark.netns,
              pytest.mark.skipif(not all(shutil.which(p) for p in ("wireguard-go", "wg", "ping")),
                                 reason="needs wireguard-go, wg and ping")]

NEW_CALL_BOUND = 10.0  # s from SIGKILL to a new session through the survivor (docs/broker.md)
RELEARN_BOUND = 15.0   # s from the restart to every agent registered there again (MIN_RETRY 10 s)
USERS = ("bw", "aw", "bn", "an")
TUNNEL = "10.90.0.1"


def password(user: str) -> str:
    return f"{user}-secret"


class Pair:
    def __init__(self, lab: NatLab, run: Path) -> None:
        self.lab, self.run = lab, run
        self.hosts = (lab["broker1"], lab["broker2"])
        self.domain = self.hosts[0].ip  # the domain both serve: the agents' first --server
        users = UsersFile(run / "users")
        for user in USERS:
            users.add(self.domain, user, password(user))
        users.save()
        # the second broker's copy of the users file (scp/rsync on a real site)
        for i in (1, 2):
            (run / f"broker{i}").mkdir()
            shutil.copy(run / "users", run / f"broker{i}" / "users")
        self.brokers: list[BrokerServer | None] = [self.start(0), self.start(1)]
        self.procs = []

    def start(self, i: int) -> BrokerServer:
        run = self.run / f"broker{i + 1}"
        return BrokerServer(run, host=self.hosts[i].ip, netns=self.hosts[i].ns,
                            extra=["--domain", self.domain, "--users", str(run / "users"),
                                   "--rate-limit", "0", "-v"])

    @property
    def servers(self) -> list[str]:
        return ["--server", f"{self.hosts[0].ip}:5060", "--server", f"{self.hosts[1].ip}:5060"]

    def registered(self, i: int, user: str) -> bool:
        location = LocationService(self.run / f"broker{i + 1}" / "broker.db")
        try:
            return bool(location.lookup(f"sip:{user}@{self.domain}"))
        finally:
            location.close()

    def agent(self, mode: str, host: str, user: str, *extra: str, target: str | None = None):
        argv = [SIPMESH, mode, *([target] if target else []), *self.servers, "--user", user,
                "--password", password(user), "--state-dir", str(self.run / f"state-{user}"),
                "-v", *extra]
        proc = spawn(argv, netns=self.lab[host].ns, cwd=self.run, name=f"{mode}-{user}",
                     log_path=self.run / f"{mode}-{user}.log")
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(grace=10)
        for broker in self.brokers:
            if broker is not None:
                broker.stop()


@pytest.fixture
def pair(tmp_path):
    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with NatLab() as lab:
        lab.add_hosts({"broker1": "public", "broker2": "public", "a": "home", "b": "home"})
        pair = None
        try:
            pair = Pair(lab, tmp_path)
            yield pair
        finally:
            if pair is not None:
                pair.stop()


def test_a_broker_killed_under_running_sessions_then_back(pair: Pair, tmp_path) -> None:
    lab = pair.lab
    serve = pair.agent("serve", "b", "bw", "--app", "wireguard", "--vpn-local", TUNNEL, "--once")
    answer = pair.agent("serve", "b", "bn", "--once", "--", *app_argv(tmp_path, "run"))
    for proc in (serve, answer):
        wait_for(lambda: "ready: contact" in proc.log_text(), 20, what=f"{proc.name} registered",
                 abort=proc.exit_reason)
    wait_for(lambda: all(pair.registered(i, u) for i in (0, 1) for u in ("bw", "bn")), 15,
             what="bw and bn registered at both brokers")
    call = pair.agent("call", "a", "aw", "--app", "wireguard", target="bw")
    wait_for(lambda: "path direct: " in call.log_text(), 30, what="the WireGuard session's path",
             abort=call.exit_reason)
    wait_for(lambda: "dev smwg" in lab["a"].run(["ip", "route", "get", TUNNEL]).stdout, 20,
             what="the caller's tunnel", abort=call.exit_reason)
    assert f"calling sip:bw@{pair.hosts[0].ip}:5060" in call.log_text(), "through broker 1"
    ping = spawn(["ping", "-n", "-i", "0.2", "-w", "120", TUNNEL],
                 netns=lab["a"].ns, name="ping", log_path=tmp_path / "ping.log")
    pair.procs.append(ping)
    wait_for(lambda: "bytes from" in ping.log_text(), 10, what="the first ping over the tunnel")

    broker1 = pair.brokers[0]
    os.kill(broker1.proc.popen.pid, signal.SIGKILL)
    broker1.proc.stop()
    pair.brokers[0] = None
    killed = time.monotonic()

    # a new call through the survivor (the caller registers while broker 1 is down)
    new = pair.agent("call", "a", "an", "--register-timeout", "2", "--",
                     *app_argv(tmp_path, "run"), target="bn")
    wait_for(lambda: record(tmp_path, "client") and record(tmp_path, "server"), 30,
             what="the new session through broker 2", abort=new.exit_reason)
    elapsed = time.monotonic() - killed
    print(f"new session through the survivor {elapsed:.2f} s after SIGKILL")
    assert elapsed < NEW_CALL_BOUND, (elapsed, new.log_tail(30))

    # broker 1 back with its store: it re-learns everyone, the newcomer too
    pair.brokers[0] = pair.start(0)
    back = time.monotonic()
    wait_for(lambda: all(pair.registered(0, u) for u in USERS), RELEARN_BOUND + 10,
             what="every agent registered at broker 1 again")
    print(f"broker 1 re-learnt all {len(USERS)} in {time.monotonic() - back:.2f} s")

    # the tunnel never stopped: the ping ran across the kill and the restart
    pinged = time.monotonic() - killed
    assert ping.stop(grace=5, sig=signal.SIGINT) == 0, ping.log_tail(10)
    sent, received = map(int, re.search(r"(\d+) packets transmitted, (\d+) received",
                                        ping.log_text()).groups())
    assert sent >= pinged / 0.2 * 0.8 and received >= sent - 2, ping.log_tail(5)
    assert call.alive() and serve.alive(), call.log_tail(20) + serve.log_tail(20)
    # and the session ends as a user ends it: BYE through broker 1 (record-routed)
    call.stop(grace=10)
    assert call.returncode == 0, call.log_tail(30)
    assert serve.wait(20) == 0, serve.log_tail(30)   # --once: done after the BYE
    new.stop(grace=10)
