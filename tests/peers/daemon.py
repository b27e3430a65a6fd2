"""The super-daemon in-process for a test: a broker, a daemon and callers in the test's event
loop (`DaemonLab`, fixture `lab`; import it into the test module), a daemon configuration
with three exec services (`config_text`) whose children record what they were given
(`RECORDER`, read back with `record_path`/`read_record`)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import sys
from pathlib import Path
from typing import AsyncIterator

import pytest

from sipmesh.agent.attributes import build_sdp
from sipmesh.agent.ports import port_is_free
from sipmesh.broker.server import Broker, BrokerConfig
from sipmesh.cli.common import register_builtin_kinds
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


def read_record(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def web_forward_config(tmp_path: Path, server: str, content: str, *, agent: str = ""):  # type: ignore[no-untyped-def]
    """A web server (a ManagedProcess) serving /hello.txt with `content`, and the text of a
    daemon configuration: config_text's services, `agent` lines added to [agent], and a
    forward service 'web' to that server for alice, reachable on the calling side at a
    local port. (text, web server, local port); the caller stops the web server."""
    from tests.lab import free_port, spawn, wait_tcp_listening

    out = tmp_path / "rec"
    out.mkdir()
    (out / "recorder.py").write_text(RECORDER)
    www = tmp_path / "www"
    www.mkdir()
    (www / "hello.txt").write_text(content)
    http_port, local = free_port("tcp"), free_port("tcp")
    http = spawn([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory",
                  str(www), str(http_port)], log_path=tmp_path / "http.log", name="http")
    wait_tcp_listening("127.0.0.1", http_port, None, 10, proc=http)
    text = config_text(server, out).replace("[agent]\n", f"[agent]\n{agent}") + f'''
[[service]]
name = "web"
kind = "forward"
target = "127.0.0.1:{http_port}"
port = "tcp"
allow = ["alice"]
[service.call]
local_port = {local}
'''
    return text, http, local
