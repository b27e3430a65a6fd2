"""The built-in TCP forward: its two halves alone (token, half-close, back-pressure), and
a whole session through the broker and the daemon: an HTTP server on the answering host
fetched through the caller's local port, 100 MB byte-identical."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import select
import socket
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from sipmesh.agent.session import Agent, AgentConfig
from sipmesh.daemon.config import load_config
from sipmesh.sip.ua import UAConfig
from tests.lab import free_port, wait_for, wait_for_async, wait_tcp_listening
from tests.peers.daemon import DaemonLab, config_text, lab  # noqa: F401 (fixture)
from tests.peers.tcp import Target, digest_then_reply

TOKEN = base64.b64encode(b"0123456789abcdef").decode()


def half(mode: str, listen: int, other: int, spawn_proc, token: str = TOKEN):
    env = dict(os.environ, SIPMESH_TOKEN=token)
    flag = "--target" if mode == "serve" else "--remote"
    proc = spawn_proc([sys.executable, "-m", "sipmesh.apps.forward", mode, "--listen",
                       f"127.0.0.1:{listen}", flag, f"127.0.0.1:{other}"], env=env,
                      name=f"forward-{mode}")
    wait_tcp_listening("127.0.0.1", listen, None, 10, proc=proc)
    return proc


@pytest.fixture
def forward_pair(spawn_proc):
    """target <- serve half <- connect half; returns (local port, target, procs)."""
    made = []

    def make(behaviour, token_serve: str = TOKEN, token_connect: str = TOKEN):
        target = Target(behaviour)
        made.append(target)
        serve_port, local_port = free_port("tcp"), free_port("tcp")
        serve = half("serve", serve_port, target.port, spawn_proc, token_serve)
        connect = half("connect", local_port, serve_port, spawn_proc, token_connect)
        return local_port, target, (serve, connect)

    yield make
    for target in made:
        target.close()


def test_half_close_reaches_the_far_end_and_the_reply_comes_back(forward_pair) -> None:
    local, target, _ = forward_pair(digest_then_reply)
    payload = os.urandom(3 << 20)
    with socket.create_connection(("127.0.0.1", local), timeout=10) as c:
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)  # our EOF must travel; the reply must still come back
        reply = b""
        while chunk := c.recv(4096):
            reply += chunk
    assert reply.decode() == hashlib.sha256(payload).hexdigest()


def test_a_connection_without_the_token_never_reaches_the_target(forward_pair) -> None:
    local, target, (serve, _) = forward_pair(digest_then_reply,
                                             token_connect=base64.b64encode(b"x" * 16).decode())
    with socket.create_connection(("127.0.0.1", local), timeout=10) as c:
        c.sendall(b"hello")
        c.shutdown(socket.SHUT_WR)
        assert c.recv(100) == b""
    # the serve half says it closed the connection, on the only path that never connects on
    wait_for(lambda: "a connection without the session's token: closed" in serve.log_text(), 10,
             what="the serve half to refuse the connection", abort=serve.exit_reason)
    assert target.connections == 0


def test_back_pressure_bounds_what_the_forward_holds(forward_pair) -> None:
    """A reader that does not read: the writer blocks instead of the forward buffering."""
    release = threading.Event()
    received = hashlib.sha256()

    def slow_reader(conn: socket.socket) -> None:
        release.wait(30)
        while chunk := conn.recv(1 << 16):
            received.update(chunk)
        conn.close()

    local, _, (serve, connect) = forward_pair(slow_reader)
    sent = hashlib.sha256()
    total = 0
    block = os.urandom(1 << 16)
    with socket.create_connection(("127.0.0.1", local), timeout=10) as c:
        c.setblocking(False)
        deadline = time.monotonic() + 1.5
        pending = memoryview(block)
        while time.monotonic() < deadline:
            try:
                n = c.send(pending)
            except BlockingIOError:
                select.select([], [c], [], max(0.0, deadline - time.monotonic()))  # until writable
                continue
            sent.update(pending[:n])
            total += n
            pending = pending[n:] or memoryview(block)
        # three socket pairs and two pipes can hold some MB, never 1.5 s of loopback rate
        assert total < 64 << 20, f"{total >> 20} MB went in while nobody read"
        for proc in (serve, connect):
            rss = int(open(f"/proc/{proc.pid}/status").read().split("VmRSS:")[1].split()[0])
            assert rss < 80_000, f"a forward half grew to {rss} kB"
        release.set()
        c.setblocking(True)
        if len(pending) < len(block):
            c.sendall(pending)
            sent.update(pending)
        c.shutdown(socket.SHUT_WR)
        c.settimeout(20)
        assert c.recv(1) == b""  # the target closes after reading everything
    assert received.hexdigest() == sent.hexdigest()


# ------------------------------------------------------------------------ through the daemon


WEB = '''
[[service]]
name = "web"
kind = "forward"
target = "127.0.0.1:{http}"
port = "tcp"
allow = ["alice"]
max_sessions = 2
[service.call]
local_port = {local}
'''


@pytest.fixture
def http_server(tmp_path: Path, spawn_proc):
    root = tmp_path / "www"
    root.mkdir()
    port = free_port("tcp")
    proc = spawn_proc([sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                       "--directory", str(root), str(port)], name="http.server")
    wait_tcp_listening("127.0.0.1", port, None, 10, proc=proc)
    return root, port


async def test_http_through_the_forward_100mb_byte_identical(lab: DaemonLab, http_server) -> None:
    root, http_port = http_server
    (root / "index.html").write_text("<h1>home</h1>\n")
    big = root / "big.bin"
    with open(big, "wb") as f:
        for _ in range(100):
            f.write(os.urandom(1 << 20))
    expected = hashlib.sha256(big.read_bytes()).hexdigest()

    server = await lab.start_broker()
    local = free_port("tcp")
    await lab.start_daemon(config_text(server, lab.out) + WEB.format(http=http_port, local=local))
    caller_config = load_config(lab.config_path, side="call")
    agent = Agent(AgentConfig(ua=UAConfig(user="alice", domain=server, listen_port=0,
                                          listen_host="127.0.0.1"),
                              mode="call", target="home", register=False, grace=2,
                              advertise="127.0.0.1"),
                  caller_config.services["web"].profile)
    task = asyncio.ensure_future(agent.run())
    try:
        await asyncio.to_thread(wait_tcp_listening, "127.0.0.1", local, None, 15)

        def fetch(name: str) -> tuple[bytes, str]:
            with urllib.request.urlopen(f"http://127.0.0.1:{local}/{name}", timeout=60) as r:
                if name == "big.bin":
                    h = hashlib.sha256()
                    while chunk := r.read(1 << 20):
                        h.update(chunk)
                    return b"", h.hexdigest()
                return r.read(), ""

        page, _ = await asyncio.to_thread(fetch, "index.html")
        assert page == b"<h1>home</h1>\n"
        _, got = await asyncio.to_thread(fetch, "big.bin")
        assert got == expected
        (session,) = (await lab.status())["sessions"]
        assert session["service"] == "web" and session["state"] == "established"
        # the data went peer to peer: the broker saw only SIP
        assert lab.broker.counters.forwarded < 20
    finally:
        agent.request_stop()
        await asyncio.wait_for(task, 20)
    await wait_for_async(lambda: not lab.daemon.sessions, what="the daemon's session to end")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", local), timeout=2).close()
