"""The super-daemon in-process against the embedded broker on loopback: three services,
bursts of concurrent calls from several callers, children that record exactly what they
were given, sessions ended in random order, every rejection, status and reload.

Helpers here (`DaemonLab`, `RECORDER`, `config_text`) are shared with test_forward.py and
test_wireguard.py."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import signal
import stat
import sys
from pathlib import Path
from typing import AsyncIterator

import pytest

from sipmesh.agent.attributes import build_sdp, read_attributes
from sipmesh.agent.ports import port_is_free
from sipmesh.broker.server import Broker, BrokerConfig
from sipmesh.cli.daemon import register_builtin_kinds
from sipmesh.daemon.config import load_config
from sipmesh.daemon.control import query
from sipmesh.daemon.server import Daemon
from sipmesh.sip.ua import Call, CallFailed, UAConfig, UserAgent

register_builtin_kinds()

# A child that records its argv, its SIPMESH_* environment and GREETING, then waits
# for SIGTERM (bounded), or exits at once with "exit" as its last argument.
RECORDER = r'''
import hashlib, json, os, pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1])
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
env = {k: v for k, v in os.environ.items() if k.startswith("SIPMESH_") or k == "GREETING"}
name = os.environ["SIPMESH_ROLE"] + "-" + hashlib.sha1(os.environ["SIPMESH_CALL_ID"].encode()).hexdigest()[:16]
(out / (name + ".tmp")).write_text(json.dumps({"argv": sys.argv, "env": env, "pid": os.getpid()}))
os.rename(out / (name + ".tmp"), out / (name + ".json"))
if sys.argv[-1] == "exit":
    sys.exit(0)
for _ in range(1200):
    time.sleep(0.1)
'''


def record_path(directory: Path, call_id: str, role: str = "server") -> Path:
    return directory / f"{role}-{hashlib.sha1(call_id.encode()).hexdigest()[:16]}.json"


def free_range(count: int, protocols: tuple[str, ...] = ("tcp",)) -> tuple[int, int]:
    """`count` consecutive ports that are free now, somewhere in 30000-59999."""
    rng = random.Random(os.getpid() ^ id(protocols))
    for _ in range(200):
        first = rng.randrange(30000, 60000 - count)
        if all(port_is_free(p, protocols, "127.0.0.1") for p in range(first, first + count)):
            return first, first + count - 1
    raise RuntimeError("no free port range")


def config_text(server: str, outdir: Path, *, user: str = "home", extra: str = "",
                tcp: tuple[int, int] | None = None, udp: tuple[int, int] | None = None,
                pool: str = "10.213.0.0/28", alpha_max: int = 20) -> str:
    """Three exec services: alpha (port + peer NICK + config GREETING), beta (port + tunnel
    address pair), gamma (peer SIZE only, max 2 sessions, only carol)."""
    tcp = tcp or free_range(40)
    udp = udp or free_range(20, ("udp",))
    py = json.dumps(sys.executable)
    rec = json.dumps(str(outdir / "recorder.py"))
    out = json.dumps(str(outdir))
    return f'''
[agent]
server = "{server}"
user = "{user}"
bind = "127.0.0.1"
advertise = "127.0.0.1"
grace = 2
state_dir = {json.dumps(str(outdir / "state"))}

[allocators.tcp]
type = "ports"
range = "{tcp[0]}-{tcp[1]}"

[allocators.udp]
type = "ports"
range = "{udp[0]}-{udp[1]}"
protocols = ["udp"]

[allocators.tunnels]
type = "addresses"
pool = "{pool}"

[[service]]
name = "alpha"
allow = ["alice", "bob", "carol"]
max_sessions = {alpha_max}
answer.command = [{py}, "-I", {rec}, {out}, "alpha", "{{PORT}}", "{{NICK}}", "{{CALL_ID}}", "{{PEER}}"]
answer.env = {{ GREETING = "hello {{NICK}}" }}
call.command = [{py}, "-I", {rec}, {out}, "alpha-caller", "{{REMOTE_IP}}", "{{PORT}}"]
[service.params.PORT]
type = "port"
from = "allocator"
allocator = "tcp"
[service.params.NICK]
type = "token"
from = "peer"
[service.params.GREETING]
type = "token"
from = "config"
value = "hi"

[[service]]
name = "beta"
allow = ["alice*", "bob@127.0.0.1"]
answer.command = [{py}, "-I", {rec}, {out}, "beta", "{{PORT}}", "{{TUN_LOCAL}}", "{{TUN_REMOTE}}"]
[service.params.PORT]
type = "port"
from = "allocator"
allocator = "udp"
[service.params.TUN_LOCAL]
type = "ipv4"
from = "allocator"
allocator = "tunnels"
part = "local"
[service.params.TUN_REMOTE]
type = "ipv4"
from = "allocator"
allocator = "tunnels"
part = "remote"

[[service]]
name = "gamma"
allow = ["carol"]
max_sessions = 2
answer.command = [{py}, "-I", {rec}, {out}, "gamma", "{{SIZE}}"]
[service.params.SIZE]
type = "int"
min = 1
max = 100
from = "peer"
{extra}
'''


def offer(service: str | None, **values: str) -> bytes:
    attributes = {"IP4": "127.0.0.1", **values}
    if service is not None:
        attributes["service"] = service
    return build_sdp(username="caller", address="127.0.0.1", media="application",
                     proto="sipmesh", port=9, attributes=attributes)


class DaemonLab:
    """A broker, a daemon and callers, all in this event loop."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.out = tmp_path / "records"
        self.out.mkdir()
        (self.out / "recorder.py").write_text(RECORDER)
        self.broker: Broker | None = None
        self.daemon: Daemon | None = None
        self.task: asyncio.Future | None = None
        self.uas: list[UserAgent] = []
        self.config_path = tmp_path / "daemon.toml"

    async def start_broker(self) -> str:
        self.broker = Broker(BrokerConfig(listen=[("127.0.0.1", 0)], domains=["127.0.0.1"],
                                          db_path=self.tmp / "broker.db", rate_limit=0,
                                          stats_interval=0, purge_interval=0))
        await self.broker.start()
        return self.broker.hostport

    async def start_daemon(self, text: str | None = None) -> Daemon:
        if self.broker is None:
            await self.start_broker()
        assert self.broker is not None
        self.config_path.write_text(text or config_text(self.broker.hostport, self.out))
        config = load_config(self.config_path)
        self.daemon = Daemon(config, control_socket=self.tmp / "ctl" / "daemon.sock")
        self.task = asyncio.ensure_future(self.daemon.run())
        ready = asyncio.ensure_future(self.daemon.ready.wait())
        done, _ = await asyncio.wait({ready, self.task}, timeout=15,
                                     return_when=asyncio.FIRST_COMPLETED)
        if self.task in done:
            self.task.result()  # raises why it stopped
        assert ready in done, "the daemon did not become ready"
        return self.daemon

    async def caller(self, user: str) -> UserAgent:
        assert self.broker is not None
        ua = UserAgent(UAConfig(user=user, domain=self.broker.hostport, listen_port=0,
                                listen_host="127.0.0.1"))
        await ua.start()
        self.uas.append(ua)
        return ua

    async def call(self, ua: UserAgent, service: str | None, **values: str) -> Call:
        return await ua.invite("home", offer(service, **values), timeout=15)

    async def refused(self, ua: UserAgent, service: str | None, **values: str) -> CallFailed:
        with pytest.raises(CallFailed) as info:
            await self.call(ua, service, **values)
        return info.value

    async def status(self) -> dict:
        """Through the control socket, as `sipmesh status` asks (in a thread: it blocks)."""
        assert self.daemon is not None
        return await asyncio.to_thread(query, self.daemon.control_path, {"command": "status"})

    async def stop(self) -> None:
        for ua in self.uas:
            for call in ua.calls:
                await call.bye()
        if self.daemon is not None and self.task is not None:
            self.daemon.request_stop()
            try:
                await asyncio.wait_for(self.task, 30)
            except Exception:  # noqa: BLE001 - teardown: report nothing more here
                pass
        for ua in self.uas:
            await ua.stop()
        if self.broker is not None:
            await self.broker.stop()


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[DaemonLab]:
    lab = DaemonLab(tmp_path)
    try:
        yield lab
    finally:
        await lab.stop()


async def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def read_record(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# ------------------------------------------------------------------------ tests


async def test_burst_of_mixed_sessions_each_child_sees_its_own_values(lab: DaemonLab) -> None:
    daemon = await lab.start_daemon()
    callers = {name: await lab.caller(name) for name in ("alice", "bob", "carol")}
    plan = []  # (caller, service, values)
    for i in range(8):
        plan.append(("alice", "alpha", {"NICK": f"a{i}"}))
        plan.append(("bob", "alpha" if i % 2 else "beta", {"NICK": f"b{i}"}))
    plan += [("carol", "gamma", {"SIZE": "7"}), ("carol", "gamma", {"SIZE": "42"}),
             ("alice", "beta", {}), ("carol", "alpha", {"NICK": "c0"})]
    random.Random(1).shuffle(plan)
    calls: list[Call] = await asyncio.gather(*(
        lab.call(callers[who], service, **values) for who, service, values in plan))
    assert len({c.call_id for c in calls}) == len(plan)

    sessions = {}
    for call, (who, service, values) in zip(calls, plan):
        answer = read_attributes(call.remote_sdp)
        path = record_path(lab.out, call.call_id)
        await wait_until(path.exists, what=f"the record of {service} for {who}")
        record = read_record(path)
        argv, env = record["argv"], record["env"]
        assert argv[2] == service
        assert env["SIPMESH_CALL_ID"] == call.call_id and env["SIPMESH_SERVICE"] == service
        assert env["SIPMESH_PEER"].startswith(f"sip:{who}@")
        if service == "alpha":
            assert argv[3:6] == [answer["PORT"], values["NICK"], call.call_id]
            assert env["SIPMESH_NICK"] == values["NICK"] and env["GREETING"] == f"hello {values['NICK']}"
            assert answer["GREETING"] == "hi" and "NICK" not in answer
        elif service == "beta":
            assert argv[3:6] == [answer["PORT"], answer["TUN_LOCAL"], answer["TUN_REMOTE"]]
        else:
            assert argv[3] == values["SIZE"] and "PORT" not in answer
        sessions[call.call_id] = (call, record["pid"], answer, service)

    ports = [a["PORT"] for _, _, a, s in sessions.values() if "PORT" in a]
    assert len(ports) == len(set(ports)), "two sessions were given the same port"
    tunnels = [a[k] for _, _, a, s in sessions.values() if s == "beta"
               for k in ("TUN_LOCAL", "TUN_REMOTE")]
    assert len(tunnels) == len(set(tunnels)), "two sessions were given the same address"

    await wait_until(lambda: all(r.state == "established" for r in daemon.sessions.values()),
                     what="every ACK to arrive")
    status = await lab.status()
    assert len(status["sessions"]) == len(plan)
    assert all(s["state"] == "established" for s in status["sessions"])
    assert {s["pid"] for s in status["sessions"]} == {pid for _, pid, _, _ in sessions.values()}

    # end them in random order, from either side; the others must not notice
    order = list(sessions)
    random.Random(2).shuffle(order)
    for n, call_id in enumerate(order):
        call, pid, _, _ = sessions.pop(call_id)
        if n % 2:
            await call.bye()  # the caller hangs up: the daemon stops the child
        else:
            os.kill(pid, signal.SIGTERM)  # the program ends: the daemon sends BYE
            await asyncio.wait_for(call.ended, 10)
        await wait_until(lambda: call_id not in daemon.sessions and not alive(pid),
                         what="the session to be gone")
        for other, other_pid, _, _ in sessions.values():
            assert not other.ended.done(), "ending one session disturbed another"
            assert alive(other_pid)
        assert {s["call_id"] for s in (await lab.status())["sessions"]} == set(sessions)
    status = await lab.status()
    assert status["sessions"] == [] and status["allocated"] == {"ports": [], "addresses": []}
    assert daemon.ledger.empty() and not daemon.active


async def test_rejections(lab: DaemonLab) -> None:
    await lab.start_daemon()
    alice, carol, dave = [await lab.caller(n) for n in ("alice", "carol", "dave")]

    failed = await lab.refused(dave, "alpha", NICK="x")
    assert failed.status == 403  # allowed by no service
    failed = await lab.refused(carol, "beta")
    assert failed.status == 403  # allowed elsewhere, not here
    failed = await lab.refused(alice, "nosuch")
    assert failed.status == 488 and "unknown service 'nosuch'" in failed.response.headers.get("Warning")
    failed = await lab.refused(alice, None)
    assert failed.status == 488 and "no service requested" in failed.response.headers.get("Warning")
    failed = await lab.refused(alice, "alpha", NICK="not a token")
    assert failed.status == 488 and "NICK" in failed.response.headers.get("Warning")
    failed = await lab.refused(alice, "alpha")
    assert failed.status == 488 and "NICK: missing" in failed.response.headers.get("Warning")
    failed = await lab.refused(carol, "gamma", SIZE="101")
    assert failed.status == 488 and "SIZE" in failed.response.headers.get("Warning")

    first = [await lab.call(carol, "gamma", SIZE=str(n)) for n in (1, 2)]
    failed = await lab.refused(carol, "gamma", SIZE="3")
    assert failed.status == 486 and "max_sessions" in failed.response.headers.get("Warning")
    await first[0].bye()
    await wait_until(lambda: lab.daemon.active.get("gamma") == 1, what="a free slot")
    third = await lab.call(carol, "gamma", SIZE="3")  # a slot is free again
    await third.bye()
    await first[1].bye()
    counters = (await lab.status())["daemon"]["counters"]
    assert counters["refused_403"] == 2 and counters["refused_488"] == 5
    assert counters["refused_486"] == 1


async def test_pool_exhaustion_is_busy_and_frees_on_end(lab: DaemonLab) -> None:
    assert lab.broker is None
    server = await lab.start_broker()
    await lab.start_daemon(config_text(server, lab.out, pool="10.213.0.0/30"))  # one pair
    alice = await lab.caller("alice")
    first = await lab.call(alice, "beta")
    failed = await lab.refused(alice, "beta")
    assert failed.status == 486 and "no free address pair" in failed.response.headers.get("Warning")
    await first.bye()
    await wait_until(lambda: lab.daemon.ledger.empty(), what="the pair to be released")
    again = await lab.call(alice, "beta")
    assert read_attributes(again.remote_sdp)["TUN_LOCAL"] == "10.213.0.1"
    await again.bye()


async def test_status_socket_is_private_and_reports(lab: DaemonLab) -> None:
    daemon = await lab.start_daemon()
    path = daemon.control_path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    alice = await lab.caller("alice")
    call = await lab.call(alice, "beta")
    status = await lab.status()
    (registration,) = status["registrations"]
    assert registration["state"] == "registered" and registration["aor"].startswith("sip:home@")
    (session,) = status["sessions"]
    assert session["service"] == "beta" and session["peer"].startswith("sip:alice@")
    assert session["state"] == "established" and session["pid"] > 0
    assert session["allocated"]["addresses"] == ["10.213.0.1", "10.213.0.2"]
    assert session["allocated"]["ports"][0].endswith("/udp")
    from sipmesh.cli.status import render

    table = render(status)
    assert "beta" in table and str(session["pid"]) in table and "10.213.0.1" in table
    (row,) = [line for line in table.splitlines() if line.startswith(session["call_id"])]
    assert row.split()[0] == session["call_id"]  # whole, not cut to 16 characters
    await call.bye()


async def test_reload_applies_to_new_sessions_only_and_refuses_bad_config(lab: DaemonLab) -> None:
    daemon = await lab.start_daemon()
    alice = await lab.caller("alice")
    old = await lab.call(alice, "alpha", NICK="old")
    text = lab.config_path.read_text()
    lab.config_path.write_text(text.replace('value = "hi"', 'value = "changed"')
                               .replace('"hello {NICK}"', '"bye {NICK}"'))
    ok, message = daemon.reload()
    assert ok, message
    new = await lab.call(alice, "alpha", NICK="new")
    assert read_attributes(new.remote_sdp)["GREETING"] == "changed"
    assert read_attributes(old.remote_sdp)["GREETING"] == "hi"
    await wait_until(record_path(lab.out, new.call_id).exists)
    assert read_record(record_path(lab.out, new.call_id))["env"]["GREETING"] == "bye new"
    assert not old.ended.done()
    status = await lab.status()
    assert {s["generation"] for s in status["sessions"]} == {1, 2}

    lab.config_path.write_text(text.replace('allocator = "tcp"', 'allocator = "nope"'))
    ok, message = daemon.reload()
    assert not ok and "no allocator named 'nope'" in message and ":" in message
    assert daemon.generation == 2
    third = await lab.call(alice, "alpha", NICK="third")  # still served, with generation 2
    assert read_attributes(third.remote_sdp)["GREETING"] == "changed"
    for call in (old, new, third):
        await call.bye()
    await wait_until(lambda: not daemon.sessions, what="all sessions to end")
    assert daemon.ledger.empty()


async def test_caller_side_runs_the_same_definition(lab: DaemonLab) -> None:
    """What `sipmesh call home --service alpha --param NICK=zed` runs, in-process."""
    from sipmesh.agent.session import Agent, AgentConfig

    await lab.start_daemon()
    config = load_config(lab.config_path, side="call")
    profile = config.services["alpha"].profile
    profile.set_call_values({"NICK": "zed"})
    assert lab.broker is not None
    agent = Agent(AgentConfig(ua=UAConfig(user="alice", domain=lab.broker.hostport,
                                          listen_port=0, listen_host="127.0.0.1"),
                              mode="call", target="home", register=False, grace=2,
                              advertise="127.0.0.1"), profile)
    task = asyncio.ensure_future(agent.run())
    try:
        await wait_until(lambda: any(lab.out.glob("client-*.json")), what="the caller's child")
        (client,) = [json.loads(p.read_text()) for p in lab.out.glob("client-*.json")]
        call_id = client["env"]["SIPMESH_CALL_ID"]
        await wait_until(record_path(lab.out, call_id).exists, what="the daemon's child")
        server = read_record(record_path(lab.out, call_id))
        assert server["argv"][3:5] == [client["argv"][4], "zed"]  # the answer's PORT, our NICK
        assert client["argv"][2:4] == ["alpha-caller", "127.0.0.1"]
        os.kill(client["pid"], signal.SIGTERM)  # the caller's program ends: BYE
        await asyncio.wait_for(task, 15)
        await wait_until(lambda: not lab.daemon.sessions, what="the daemon's session to end")
    finally:
        agent.request_stop()
        if not task.done():
            await asyncio.wait_for(task, 15)


async def test_a_program_that_cannot_start_is_500_and_releases(lab: DaemonLab, tmp_path: Path) -> None:
    """A child that fails to start is a 500, and nothing stays allocated."""
    server = await lab.start_broker()
    text = config_text(server, lab.out).replace(
        f'answer.command = [{json.dumps(sys.executable)}, "-I", {json.dumps(str(lab.out / "recorder.py"))}, {json.dumps(str(lab.out))}, "beta"',
        f'answer.command = [{json.dumps(str(tmp_path / "vanishing"))}, "beta"')
    script = tmp_path / "vanishing"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    daemon = await lab.start_daemon(text)
    script.chmod(0o644)  # no longer executable: the start fails
    alice = await lab.caller("alice")
    failed = await lab.refused(alice, "beta")
    assert failed.status == 500
    assert daemon.ledger.empty() and not daemon.sessions


async def test_an_unreachable_sip_server_does_not_stop_the_daemon(lab: DaemonLab) -> None:
    """A daemon started before its SIP server keeps trying instead of exiting."""
    import socket as _socket

    with _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM) as silent:  # bound, never answers
        silent.bind(("127.0.0.1", 0))
        server = f"127.0.0.1:{silent.getsockname()[1]}"
        text = config_text(server, lab.out).replace("grace = 2\n", "grace = 2\nregister_timeout = 0.3\n")
        lab.broker = None
        lab.config_path.write_text(text)
        daemon = Daemon(load_config(lab.config_path), control_socket=lab.tmp / "ctl" / "d.sock")
        lab.daemon, lab.task = daemon, asyncio.ensure_future(daemon.run())
        await asyncio.wait_for(daemon.ready.wait(), 10)
        (registration,) = (await lab.status())["registrations"]
        assert registration["state"] == "failing" and "did not answer" in registration["error"]
        assert not lab.task.done()


async def test_a_second_daemon_on_the_same_socket_is_refused(lab: DaemonLab) -> None:
    from sipmesh.agent.errors import AgentError

    first = await lab.start_daemon()
    config = load_config(lab.config_path)
    config.agent.user = "home2"
    second = Daemon(config, control_socket=first.control_path)
    with pytest.raises(AgentError, match="another daemon answers on"):
        await asyncio.wait_for(second.run(), 15)
    assert (await lab.status())["ok"]  # the first one's socket is untouched
