"""Two embedded brokers serving one domain (issue 13 items 2 and 4; docs/broker.md, "Two
brokers"), in the NAT lab: agents behind home routers register at both (`--server A
--server B`, one +sip.instance). SIGKILL the broker a running WireGuard session was set
up through: the ping across the tunnel and a forward's transfer (checksummed) go on
without loss of their sessions, a new call reaches its target through the survivor within
the bound, and so does a mesh member that joins while the broker is down (it pings the
members that were up before); the killed broker comes back with the same store and
re-learns every registration (those made while it was down too: the new member's roster
binding), and the old session's BYE goes through it again."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sipmesh.broker.location import LocationService
from sipmesh.broker.users import UsersFile
from sipmesh.daemon.control import query
from sipmesh.lab.natsite import FORWARD_SERVICE
from tests.lab import NatLab, netns_unavailable_reason, spawn, wait_for, wait_tcp_listening
from tests.lab.agents import SIPMESH, app_argv, record
from tests.lab.broker import BrokerServer

pytestmark = [pytest.mark.slow, pytest.mark.netns,
              pytest.mark.skipif(not all(shutil.which(p) for p in ("wireguard-go", "wg", "ping")),
                                 reason="needs wireguard-go, wg and ping")]

NEW_CALL_BOUND = 10.0  # s from SIGKILL to a new session through the survivor (docs/broker.md)
RELEARN_BOUND = 15.0   # s from the restart to every agent registered there again (MIN_RETRY 10 s)
MESH_JOIN_BOUND = 20.0  # s from `sipmesh up` while a broker is down to pinging the others (docs/mesh.md)
USERS = ("bw", "aw", "bn", "an", "bf")  # each registers (at both brokers)
CALLER = "af"  # the forward's caller (`call --service` does not register)
MEMBERS = ("ma", "mb", "mc")  # network lab: ma on a, mb on b before the kill, mc on c after
TUNNEL = "10.90.0.1"
SINK, LOCAL = 9000, 9002  # the forward's target on b, its local port on a

# The forward service "fwd" of bf (its target: the sink on b), and the caller's side
FORWARD = '''[agent]
servers = ["{b1}:5060", "{b2}:5060"]
user = "{user}"
password = "{password}"
state_dir = "{run}/state-{user}"
control_socket = "{run}/{user}.sock"
''' + FORWARD_SERVICE

# The transfer: `sink PORT` takes one connection, says how much it has every 0.2 s and
# answers EOF with "BYTES SHA256"; `source PORT STOPFILE` sends seeded random data, paced,
# until STOPFILE exists (at most 120 s), then checks the sink's answer against its own.
STREAM = r'''
import hashlib, os, random, socket, sys, time
mode, port = sys.argv[1], int(sys.argv[2])
if mode == "sink":
    server = socket.create_server(("127.0.0.1", port))
    conn, _ = server.accept()
    digest, total, said = hashlib.sha256(), 0, 0.0
    while data := conn.recv(1 << 16):
        digest.update(data)
        total += len(data)
        if time.monotonic() - said > 0.2:
            print(f"got {total}", flush=True)
            said = time.monotonic()
    print(f"got {total} done", flush=True)
    conn.sendall(f"{total} {digest.hexdigest()}".encode())
    conn.close()
else:
    stop, rng, digest, total = sys.argv[3], random.Random(13), hashlib.sha256(), 0
    conn = socket.create_connection(("127.0.0.1", port), timeout=60)
    deadline = time.monotonic() + 120
    while not os.path.exists(stop) and time.monotonic() < deadline:
        chunk = rng.randbytes(16384)
        conn.sendall(chunk)
        digest.update(chunk)
        total += len(chunk)
        time.sleep(0.02)
    conn.shutdown(socket.SHUT_WR)
    answer = b""
    while data := conn.recv(4096):
        answer += data
    mine = f"{total} {digest.hexdigest()}"
    print(f"sent {mine}, the sink got {answer.decode()}", flush=True)
    sys.exit(0 if answer.decode() == mine else 1)
'''


def password(user: str) -> str:
    return f"{user}-secret"


class Pair:
    def __init__(self, lab: NatLab, run: Path) -> None:
        self.lab, self.run = lab, run
        self.hosts = (lab["broker1"], lab["broker2"])
        self.domain = self.hosts[0].ip  # the domain both serve: the agents' first --server
        users = UsersFile(run / "users")
        for user in (*USERS, CALLER):
            users.add(self.domain, user, password(user))
        for user in MEMBERS:
            users.add("lab", user, password(user))
        users.save()
        # the second broker's copy of the users file (scp/rsync on a real site)
        for i in (1, 2):
            (run / f"broker{i}").mkdir()
            shutil.copy(run / "users", run / f"broker{i}" / "users")
        # network lab defined at broker 1, exported to broker 2 (docs/broker.md, "Two brokers")
        dbs = [str(run / f"broker{i}" / "broker.db") for i in (1, 2)]
        for argv in (["network", "create", "lab", "--pool", "100.64.9.0/24", "--db", dbs[0]],
                     ["network", "members", "add", "lab", *MEMBERS, "--db", dbs[0]]):
            subprocess.run([SIPMESH, "broker", *argv], check=True, capture_output=True, timeout=30)
        export = subprocess.run([SIPMESH, "broker", "network", "export", "--db", dbs[0]],
                                check=True, capture_output=True, timeout=30).stdout
        subprocess.run([SIPMESH, "broker", "network", "import", "-", "--db", dbs[1]], input=export,
                       check=True, capture_output=True, timeout=30)
        self.interfaces: list[str] = []  # the members' (wireguard-go's socket is machine-wide)
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

    def bindings(self, i: int, user: str) -> list[str]:
        """The contacts broker i+1 holds for `user` (a user name, or net-NETWORK)."""
        location = LocationService(self.run / f"broker{i + 1}" / "broker.db")
        try:
            return [b.contact for b in location.lookup(f"sip:{user}@{self.domain}")]
        finally:
            location.close()

    def registered(self, i: int, user: str) -> bool:
        return bool(self.bindings(i, user))

    def member_at(self, i: int, name: str) -> bool:
        """Does broker i+1 hold `name`'s binding under the network AOR (its roster)?"""
        return any(c.startswith(f"<sip:{name}@") or c.startswith(f"sip:{name}@")
                   for c in self.bindings(i, "net-lab"))

    def member(self, host: str, user: str) -> "Member":
        return Member(self, host, user)

    def forward(self, host: str, user: str, *argv: str):
        """`sipmesh daemon` (argv empty) or `sipmesh call ARGV` with the forward's file."""
        config = self.run / f"{user}.toml"
        config.write_text(FORWARD.format(b1=self.hosts[0].ip, b2=self.hosts[1].ip, user=user,
                                         password=password(user), run=self.run, sink=SINK,
                                         local=LOCAL))
        mode = "call" if argv else "daemon"
        proc = spawn([SIPMESH, mode, *argv, "-c", str(config), "-v"], netns=self.lab[host].ns,
                     cwd=self.run, name=f"{mode}-{user}", log_path=self.run / f"{mode}-{user}.log")
        self.procs.append(proc)
        return proc

    def stream(self, host: str, *argv: str):
        script = self.run / "stream.py"
        script.write_text(STREAM)
        proc = spawn([sys.executable, str(script), *argv], netns=self.lab[host].ns, cwd=self.run,
                     name=f"stream-{argv[0]}", log_path=self.run / f"stream-{argv[0]}.log")
        self.procs.append(proc)
        return proc

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
        for ifname in self.interfaces:
            Path(f"/var/run/wireguard/{ifname}.sock").unlink(missing_ok=True)


class Member:
    """`sipmesh up lab` at both brokers, on `host`, as `user`."""

    def __init__(self, pair: Pair, host: str, user: str) -> None:
        self.host, self.user = pair.lab[host], user
        directory = pair.run / f"member-{user}"
        directory.mkdir()
        creds = directory / "creds"
        creds.write_text(f"password = {password(user)}\n")
        os.chmod(creds, 0o600)
        ifname = f"smp{secrets.token_hex(3)}"
        pair.interfaces.append(ifname)
        self.socket = directory / "run" / "sipmesh" / f"mesh-lab-{user}.sock"
        self.proc = spawn([SIPMESH, "up", "lab", *pair.servers, "--user", user, "--credentials",
                           str(creds), "--state-dir", str(directory / "state"), "--ifname", ifname,
                           "--hosts-file", str(directory / "hosts"), "--expires", "60", "-v"],
                          netns=self.host.ns, cwd=pair.run, name=f"up-{user}",
                          env={**os.environ, "XDG_RUNTIME_DIR": str(directory / "run")},
                          log_path=pair.run / f"up-{user}.log")
        pair.procs.append(self.proc)
        self.env = dict(os.environ, XDG_RUNTIME_DIR=str(directory / "run"))

    def status(self) -> str:
        """`sipmesh status` as its user sees it."""
        return self.host.run([SIPMESH, "status"], check=False, env=self.env, timeout=30).stdout

    def mesh_ip(self) -> str | None:
        if not self.socket.exists():
            return None
        return query(self.socket, {"command": "status"}, timeout=5)["networks"][0].get("mesh_ip")

    def pings(self, address: str) -> bool:
        return self.host.run(["ping", "-c1", "-W1", address], check=False).returncode == 0


@pytest.fixture
def pair(tmp_path):
    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with NatLab() as lab:
        lab.add_hosts({"broker1": "public", "broker2": "public", "a": "home", "b": "home",
                       "c": "home"})
        pair = None
        try:
            pair = Pair(lab, tmp_path)
            yield pair
        finally:
            if pair is not None:
                pair.stop()


@pytest.mark.timeout(240)
def test_a_broker_killed_under_running_sessions_then_back(pair: Pair, tmp_path) -> None:
    lab = pair.lab
    serve = pair.agent("serve", "b", "bw", "--app", "wireguard", "--vpn-local", TUNNEL, "--once")
    answer = pair.agent("serve", "b", "bn", "--once", "--", *app_argv(tmp_path, "run"))
    sink = pair.stream("b", "sink", str(SINK))
    daemon = pair.forward("b", "bf")
    members = [pair.member("a", "ma"), pair.member("b", "mb")]
    for proc in (serve, answer):
        wait_for(lambda: "ready: contact" in proc.log_text(), 20, what=f"{proc.name} registered",
                 abort=proc.exit_reason)
    wait_for(lambda: "ready as sip:bf@" in daemon.log_text(), 20, what="the forward's daemon",
             abort=daemon.exit_reason)
    wait_for(lambda: all(pair.registered(i, u) for i in (0, 1) for u in ("bw", "bn", "bf")), 15,
             what="bw, bn and bf registered at both brokers")
    for m in members:
        wait_for(m.mesh_ip, 30, what=f"{m.user} up", abort=m.proc.exit_reason)
    ma, mb = members
    wait_for(lambda: ma.pings(mb.mesh_ip()) and mb.pings(ma.mesh_ip()), 30,
             what="ma and mb ping each other", abort=ma.proc.exit_reason)
    # a forward session, a transfer running through it across everything that follows
    fwd = pair.forward("a", CALLER, "bf", "--service", "fwd")
    wait_tcp_listening("127.0.0.1", LOCAL, lab["a"].ns, 30, proc=fwd)
    stop_file = tmp_path / "stop-source"
    source = pair.stream("a", "source", str(LOCAL), str(stop_file))

    def sunk() -> int:
        counts = re.findall(r"got (\d+)", sink.log_text())
        return int(counts[-1]) if counts else 0
    wait_for(lambda: sunk() > 0, 20, what="the transfer under way", abort=source.exit_reason)
    call = pair.agent("call", "a", "aw", "--app", "wireguard", target="bw")
    wait_for(lambda: "path direct: " in call.log_text(), 30, what="the WireGuard session's path",
             abort=call.exit_reason)
    wait_for(lambda: "dev smwg" in lab["a"].run(["ip", "route", "get", TUNNEL]).stdout, 20,
             what="the caller's tunnel", abort=call.exit_reason)
    # through the first server, unless its REGISTER answer came after the other's (then it
    # goes last, agent/registration.py: register_everywhere): kill the one it went through
    through = [i for i in (0, 1) if f"calling sip:bw@{pair.hosts[i].ip}:5060" in call.log_text()]
    assert len(through) == 1, call.log_tail(30)
    k, s = through[0], 1 - through[0]  # the broker killed, the survivor
    ping = spawn(["ping", "-n", "-i", "0.2", "-w", "120", TUNNEL],
                 netns=lab["a"].ns, name="ping", log_path=tmp_path / "ping.log")
    pair.procs.append(ping)
    wait_for(lambda: "bytes from" in ping.log_text(), 10, what="the first ping over the tunnel")

    victim = pair.brokers[k]
    assert victim is not None
    os.kill(victim.proc.popen.pid, signal.SIGKILL)
    victim.proc.stop()
    pair.brokers[k] = None
    killed, at_kill = time.monotonic(), sunk()

    # a new call through the survivor (the caller registers while the other is down)
    new = pair.agent("call", "a", "an", "--register-timeout", "2", "--",
                     *app_argv(tmp_path, "run"), target="bn")
    wait_for(lambda: record(tmp_path, "client") and record(tmp_path, "server"), 30,
             what="the new session through the survivor", abort=new.exit_reason)
    elapsed = time.monotonic() - killed
    print(f"new session through the survivor {elapsed:.2f} s after SIGKILL")
    assert elapsed < NEW_CALL_BOUND, (elapsed, new.log_tail(30))

    # a member that joins now, through the survivor: it and those up before see each other
    mc, joining = pair.member("c", "mc"), time.monotonic()
    wait_for(mc.mesh_ip, MESH_JOIN_BOUND, what="mc up through the survivor", abort=mc.proc.exit_reason)
    assert mc.mesh_ip() not in (ma.mesh_ip(), mb.mesh_ip())
    wait_for(lambda: all(mc.pings(m.mesh_ip()) and m.pings(mc.mesh_ip()) for m in (ma, mb)),
             max(1.0, MESH_JOIN_BOUND - (time.monotonic() - joining)),
             what=f"mc and the members up before ping each other\n{mc.proc.log_tail(20)}\n"
                  f"{ma.proc.log_tail(20)}", abort=mc.proc.exit_reason)
    print(f"a new member pings the others {time.monotonic() - joining:.2f} s after it started, "
          f"{time.monotonic() - killed:.2f} s after SIGKILL")
    assert pair.member_at(s, "mc") and not pair.member_at(k, "mc")  # (the killed one's store)
    shown = mc.status()  # where it is a member: the survivor, not (yet) the killed one
    assert f"{pair.hosts[s].ip}:5060 registered (roster push)" in shown, shown
    assert f"{pair.hosts[k].ip}:5060 registered" not in shown, shown
    wait_for(lambda: sunk() > at_kill + 100_000, 10, what="the transfer going on after the kill",
             abort=source.exit_reason)

    # the killed broker back with its store: it re-learns everyone, the newcomers too
    pair.brokers[k] = pair.start(k)
    back = time.monotonic()
    wait_for(lambda: all(pair.registered(k, u) for u in USERS) and pair.member_at(k, "mc"),
             RELEARN_BOUND + 10, what=f"every agent and member registered at broker {k + 1} again")
    print(f"broker {k + 1} re-learnt all {len(USERS)} and the new member in "
          f"{time.monotonic() - back:.2f} s")

    # the transfer never stopped: every byte arrived, as sent
    stop_file.touch()
    assert source.wait(30) == 0, source.log_tail(5) + sink.log_tail(5)
    print(source.log_tail(1).strip())
    assert fwd.alive() and daemon.alive(), fwd.log_tail(20) + daemon.log_tail(20)

    # the tunnel never stopped: the ping ran across the kill and the restart
    pinged = time.monotonic() - killed
    assert ping.stop(grace=5, sig=signal.SIGINT) == 0, ping.log_tail(10)
    sent, received = map(int, re.search(r"(\d+) packets transmitted, (\d+) received",
                                        ping.log_text()).groups())
    assert sent >= pinged / 0.2 * 0.8 and received >= sent - 2, ping.log_tail(5)
    assert call.alive() and serve.alive(), call.log_tail(20) + serve.log_tail(20)
    # and the session ends as a user ends it: BYE through the restarted broker (record-routed)
    call.stop(grace=10)
    assert call.returncode == 0, call.log_tail(30)
    assert serve.wait(20) == 0, serve.log_tail(30)   # --once: done after the BYE
    new.stop(grace=10)
