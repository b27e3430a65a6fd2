"""TCP over QUIC streams on an ICE-checked path (sipmesh.agent.streams): two real ICE sessions
on loopback, a real TCP service behind the answering side, programs connecting to the
calling side's local port. Many streams at once, 50 MB byte-identical, half-close both
ways, back-pressure, certificates that do not match, a peer that goes away. Then in the NAT
lab (sipmesh/lab/topology.py, tests/lab/icepair.py): an HTTP fetch between two home hosts
(direct) and from a symmetric NAT to a home host (through coturn), over the transport
alone and in whole `sipmesh serve`/`call` sessions (tests/lab/icelab.py)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sipmesh.agent.certs import host_certificate
from sipmesh.agent.ice import IceConfig, IceSession, render
from sipmesh.agent.streams import STREAM_WINDOW, StreamError, StreamTransport
from tests.lab import free_port, spawn, wait_for, wait_for_async, wait_tcp_listening
from tests.peers.broker import make_broker  # noqa: F401 (fixture)
from tests.peers.tcp import Target, digest_then_reply, echo, read_digest
from tests.lab.icepair import lab, session  # noqa: F401 (fixture)
from tests.lab.icelab import SIPMESH, ice_lab  # noqa: F401 (fixture)
from tests.lab.natsite import password as ice_password

MB = 1 << 20


class Cut:
    """The ICE connection, with a switch that drops every datagram both ways (a router
    that stops forwarding; ICE itself is not told)."""

    def __init__(self, connection) -> None:
        self.connection = connection
        self.cut = False

    async def sendto(self, data: bytes, component: int) -> None:
        if not self.cut:
            await self.connection.sendto(data, component)

    async def recvfrom(self) -> tuple[bytes, int]:
        while True:
            data = await self.connection.recvfrom()
            if not self.cut:
                return data


@contextlib.asynccontextmanager
async def connected_ice():
    """Two ICE sessions on 127.0.0.1, connected: (caller, answerer)."""
    config = IceConfig(host_addresses=("127.0.0.1",))
    caller, callee = IceSession(config, controlling=True), IceSession(config, controlling=False)
    try:
        offer, answer = await asyncio.gather(caller.gather(), callee.gather())
        await asyncio.gather(caller.connect(caller.read_remote(render(answer))),
                             callee.connect(callee.read_remote(render(offer))))
        yield caller, callee
    finally:
        await caller.close()
        await callee.close()


@pytest.fixture
async def ice_pair():
    async with connected_ice() as pair:
        yield pair


@pytest.fixture
def certs(tmp_path: Path):
    return host_certificate(tmp_path / "caller"), host_certificate(tmp_path / "answerer")


@pytest.fixture
async def streams(ice_pair, certs):
    """make(target, **options) -> (caller's transport, answerer's, caller's local port):
    both started, the caller listening on 127.0.0.1."""
    made: list[StreamTransport] = []

    async def make(target: tuple[str, int] | None, *, paths=None, **options):
        caller, callee = ice_pair
        mine, theirs = certs
        a_path, b_path = paths or (caller.connection, callee.connection)
        a = StreamTransport(a_path, client=True, certificate=mine,
                            peer_fingerprint=theirs.fingerprint, **options)
        b = StreamTransport(b_path, client=False, certificate=theirs,
                            peer_fingerprint=mine.fingerprint, target=target, **options)
        made.extend((a, b))
        await asyncio.gather(a.start(), b.start())
        return a, b, await a.listen("127.0.0.1", 0)

    yield make
    for transport in made:
        await transport.close()


async def send_and_digest(port: int, payload_blocks: int, block: bytes) -> tuple[str, str, float]:
    """Send blocks, half-close, read the reply: (digest sent, reply, seconds)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sent = hashlib.sha256()
    start = time.monotonic()
    for _ in range(payload_blocks):
        writer.write(block)
        sent.update(block)
        await writer.drain()
    writer.write_eof()
    reply = await asyncio.wait_for(reader.read(), 60)
    seconds = time.monotonic() - start
    writer.close()
    return sent.hexdigest(), reply.decode(), seconds


# ----------------------------------------------------------------------- data


async def test_50mb_byte_identical_with_half_close(streams, capsys):
    with Target(digest_then_reply) as target:
        a, b, port = await streams(("127.0.0.1", target.port))
        sent, reply, seconds = await send_and_digest(port, 50, os.urandom(MB))
        assert reply == sent          # our EOF crossed; the reply came back after it
        with capsys.disabled():
            print(f"\n50 MB over QUIC streams on loopback ICE: {50 * 8 * MB / seconds / 1e6:.0f} "
                  f"Mbit/s ({seconds:.2f} s)")
        assert target.connections == 1 and not a.closed and not b.closed


async def test_many_concurrent_streams(streams):
    with Target(echo) as target:
        a, b, port = await streams(("127.0.0.1", target.port))

        async def one(n: int) -> bool:
            payload = os.urandom(64 * 1024 + n)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(payload)
            writer.write_eof()
            got = await asyncio.wait_for(reader.read(), 30)
            writer.close()
            return got == payload

        results = await asyncio.gather(*(one(n) for n in range(50)))
        assert all(results) and len(results) == 50
        assert target.connections == 50 and b.streams_carried == 50
        await asyncio.sleep(0)
        assert not a.pipes or all(p.done for p in a.pipes.values())


async def test_the_far_end_speaks_first_and_half_closes_first(streams):
    """The service sends a banner and shuts its sending side before reading anything (as
    an SSH or SMTP server speaks first); our program still sends afterwards, and all of
    it arrives."""
    heard: concurrent.futures.Future[str] = concurrent.futures.Future()

    def banner_then_read(conn: socket.socket) -> None:
        conn.sendall(b"220 hello\r\n")
        conn.shutdown(socket.SHUT_WR)
        heard.set_result(read_digest(conn))
        conn.close()

    with Target(banner_then_read) as target:
        _, _, port = await streams(("127.0.0.1", target.port))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), 10) == b"220 hello\r\n"  # then EOF
        payload = os.urandom(3 * MB)
        writer.write(payload)
        writer.write_eof()
        await writer.drain()
        assert await asyncio.wait_for(asyncio.wrap_future(heard), 20) == \
            hashlib.sha256(payload).hexdigest()
        writer.close()


async def test_back_pressure_reaches_the_writer(streams):
    """A service that does not read: the program writing to our port is blocked once a
    bounded amount is in flight, instead of sipmesh buffering all it sends; once the
    service reads, every byte arrives."""
    release = threading.Event()
    received: concurrent.futures.Future[str] = concurrent.futures.Future()

    def slow_reader(conn: socket.socket) -> None:
        release.wait(60)
        received.set_result(read_digest(conn))
        conn.close()

    with Target(slow_reader) as target:
        _, b, port = await streams(("127.0.0.1", target.port))
        target.close = lambda old=target.close: (release.set(), old())  # never left waiting
        client = socket.create_connection(("127.0.0.1", port))
        client.setblocking(False)
        sent, total, block = hashlib.sha256(), 0, os.urandom(64 * 1024)
        pending = memoryview(block)
        last_progress = time.monotonic()
        deadline = last_progress + 30
        while time.monotonic() < deadline and time.monotonic() - last_progress < 1.0:
            try:
                n = client.send(pending)
            except BlockingIOError:
                await asyncio.sleep(0.01)
                continue
            sent.update(pending[:n])
            total += n
            last_progress = time.monotonic()
            pending = pending[n:] or memoryview(block)
        assert time.monotonic() - last_progress >= 1.0, \
            f"the writer was never blocked: {total / MB:.0f} MB went in"
        # kernel socket buffers on four sockets, plus the bounded windows of the transport
        assert total < 40 * MB, f"{total / MB:.0f} MB went in while nobody read"
        (pipe,) = b.pipes.values()   # what sipmesh holds for the service: one stream window
        assert pipe.tcp.get_write_buffer_size() <= STREAM_WINDOW
        release.set()
        client.setblocking(True)
        if len(pending) < len(block):
            await asyncio.to_thread(client.sendall, pending)
            sent.update(pending)
        client.shutdown(socket.SHUT_WR)
        assert await asyncio.wait_for(asyncio.wrap_future(received), 30) == sent.hexdigest()
        client.close()


# ----------------------------------------------------------------------- refusals


async def test_the_caller_refuses_an_answerer_with_another_certificate(ice_pair, certs, tmp_path):
    caller, callee = ice_pair
    mine, theirs = certs
    stranger = host_certificate(tmp_path / "stranger")
    a = StreamTransport(caller.connection, client=True, certificate=mine,
                        peer_fingerprint=theirs.fingerprint)
    b = StreamTransport(callee.connection, client=False, certificate=stranger,
                        peer_fingerprint=mine.fingerprint, target=("127.0.0.1", 9))
    results = await asyncio.gather(a.start(5), b.start(5), return_exceptions=True)
    assert isinstance(results[0], StreamError)
    assert "not the one its SDP named" in str(results[0]) and stranger.fingerprint in str(results[0])
    assert isinstance(results[1], StreamError) and "fingerprint mismatch" in str(results[1])
    await asyncio.gather(a.close(), b.close())


async def test_the_answerer_refuses_a_caller_with_another_certificate(ice_pair, certs, tmp_path):
    caller, callee = ice_pair
    mine, theirs = certs
    stranger = host_certificate(tmp_path / "stranger")
    with Target(echo) as target:
        a = StreamTransport(caller.connection, client=True, certificate=stranger,
                            peer_fingerprint=theirs.fingerprint)
        b = StreamTransport(callee.connection, client=False, certificate=theirs,
                            peer_fingerprint=mine.fingerprint, target=("127.0.0.1", target.port))
        results = await asyncio.gather(a.start(5), b.start(5), return_exceptions=True)
        assert isinstance(results[1], StreamError) and "not the one its SDP named" in str(results[1])
        # the caller's side of the handshake may have completed first: it learns at once
        reason = await asyncio.wait_for(a.wait_closed(), 5)
        assert "certificate fingerprint mismatch" in reason
        assert target.connections == 0
        await asyncio.gather(a.close(), b.close())


async def test_a_stream_without_a_target_is_refused_and_others_go_on(streams):
    a, b, port = await streams(None)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"anyone?")
    try:
        assert await asyncio.wait_for(reader.read(), 10) == b""
    except ConnectionResetError:
        pass  # refused: the connection is reset
    writer.close()
    assert not a.closed and not b.closed


async def test_a_target_that_is_down_resets_the_programs_connection(streams):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        down = s.getsockname()[1]   # bound, never listening: connections are refused
        _, b, port = await streams(("127.0.0.1", down), connect_timeout=1.0)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"x")
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert not b.closed


# ----------------------------------------------------------------------- the end


async def test_closing_one_side_tells_the_other(streams):
    a, b, _ = await streams(("127.0.0.1", 9))
    await a.close("the session ends")
    reason = await asyncio.wait_for(b.wait_closed(), 5)
    assert "the peer closed the QUIC connection ('the session ends'" in reason


async def test_keepalive_holds_an_idle_connection_and_a_silent_peer_ends_it(streams, ice_pair):
    caller, callee = ice_pair
    cut = Cut(callee.connection)
    a, b, _ = await streams(("127.0.0.1", 9), paths=(caller.connection, cut),
                            idle_timeout=2.0, keepalive=0.5)
    await asyncio.sleep(3)         # longer than the idle timeout, no data: PINGs hold it
    assert not a.closed and not b.closed
    cut.cut = True                 # the answerer's network goes silent
    start = time.monotonic()
    reason = await asyncio.wait_for(a.wait_closed(), 10)
    assert "the peer stopped answering" in reason
    assert 1.5 <= time.monotonic() - start <= 4


async def test_the_connection_goes_on_over_a_new_pair_with_its_streams(streams, ice_pair):
    """An ICE restart after a move (agent/session.py, StreamPath.follow): 20 MB crossing
    while the old pair goes silent, each side moves to the new pair at its own time, the
    old pair closes; the same TCP connection carries every byte (digest)."""
    caller, callee = ice_pair
    old = Cut(caller.connection), Cut(callee.connection)
    with Target(digest_then_reply) as target:
        a, b, port = await streams(("127.0.0.1", target.port), paths=old)
        transfer = asyncio.ensure_future(send_and_digest(port, 20, os.urandom(MB)))
        async with connected_ice() as (new_caller, new_callee):
            await wait_for_async(lambda: any(p.written > 2 * MB for p in b.pipes.values()),
                                 20, what="2 MB across before the move")
            for path in old:
                path.cut = True                 # the move: the old pair is dead
            b.repath(new_callee.connection)     # the side that answers the re-INVITE first
            await asyncio.sleep(0.3)
            a.repath(new_caller.connection)
            await asyncio.gather(caller.close(), callee.close())
            sent, reply, _ = await asyncio.wait_for(transfer, 60)
            assert reply == sent
            assert target.connections == 1 and not a.closed and not b.closed


# ----------------------------------------------------------------------- the NAT lab

FETCH = """
import hashlib, sys, urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/{sys.argv[2]}", timeout=60) as r:
    print(hashlib.sha256(r.read()).hexdigest())
"""


@pytest.mark.slow
@pytest.mark.netns
@pytest.mark.parametrize("caller, callee, kind", [
    ("a", "b", "direct"),        # home <-> home: the hole ICE punched
    ("s", "a", "relayed"),       # symmetric <-> home: through coturn
])
def test_http_through_streams_across_nat(lab, tmp_path, caller, callee, kind):
    """An HTTP server on the answering host, reachable only on its own loopback, fetched
    from the calling host's loopback port: over QUIC streams on the path ICE chose."""
    root = tmp_path / "www"
    root.mkdir()
    (root / "index.html").write_text("<h1>home</h1>\n")
    (root / "big.bin").write_bytes(os.urandom(5 * MB))
    expected = {name: hashlib.sha256((root / name).read_bytes()).hexdigest()
                for name in ("index.html", "big.bin")}
    http = lab.spawn(callee, [sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                              "--directory", str(root), "8080"], log_path=tmp_path / "http.log")
    wait_tcp_listening("127.0.0.1", 8080, lab[callee].ns, 10, proc=http)
    fetched = {}

    def fetch(results: list[dict]) -> None:
        for name in expected:
            done = lab.run(caller, [sys.executable, "-c", FETCH, str(results[0]["streams"]), name],
                           timeout=90)
            assert done.returncode == 0, done.stderr
            fetched[name] = done.stdout.strip()

    results = session(lab, caller, callee, streams=({}, {"target": ["127.0.0.1", 8080]}),
                      during=fetch)
    assert [r["path"]["kind"] for r in results] == [kind, kind]
    assert fetched == expected
    assert results[0]["stopped"] == results[1]["stopped"] == "running"  # up until we stopped it


# ----------------------------------------------------------------------- a whole session

ECHO_SERVER = """
import os, socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(os.environ["SIPMESH_PORT"])))
s.listen(4)
while True:
    c, _ = s.accept()
    while chunk := c.recv(65536):
        c.sendall(chunk)
    c.close()
"""

ECHO_CLIENT = """
import os, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
payload = os.urandom(4 << 20)
for attempt in range(100):    # without ICE the answering program may still be starting
    try:
        c = socket.create_connection((host, port), timeout=20)
        break
    except ConnectionRefusedError:
        time.sleep(0.05)
with c:
    c.sendall(payload)
    c.shutdown(socket.SHUT_WR)
    got = bytearray()
    while chunk := c.recv(65536):
        got += chunk
print("echo", "ok" if bytes(got) == payload else "BAD", host, port, os.environ.get("SIPMESH_PATH"),
      flush=True)
sys.exit(0 if bytes(got) == payload else 1)
"""


@pytest.mark.parametrize("caller_ice", [True, False])
async def test_an_exec_tcp_session_carries_its_connection_over_streams(make_broker, tmp_path,
                                                                        caller_ice):
    """`sipmesh serve`/`call` with a TCP program pair, ICE on: the caller's program
    connects to {REMOTE_IP}:{PORT}, which is sipmesh's on 127.0.0.1, and its echo comes
    back through the QUIC streams; the program's exit ends the session. A caller without
    ICE gets the paper's a=IP4/a=PORT and connects to the answering program itself."""
    from sipmesh.agent.ice import IceOptions
    from sipmesh.agent.session import Agent, AgentConfig
    from sipmesh.apps.exec import ExecProfile
    from sipmesh.sip.ua import UAConfig

    broker = await make_broker()
    host, port = broker.address("UDP")
    events: list[tuple[str, dict]] = []
    out = tmp_path / "client.out"

    def agent(user: str, mode: str, argv: list[str], **extra) -> Agent:
        return Agent(AgentConfig(ua=UAConfig(user=user, domain=f"{host}:{port}", listen_port=0),
                                 mode=mode, advertise="127.0.0.1", grace=2, **extra),
                     ExecProfile(argv, transport="tcp", app_port=free_port("tcp")),
                     on_event=lambda event, data: events.append((user + ":" + event, data)))

    server = agent("home", "serve", [sys.executable, "-c", ECHO_SERVER])
    client = agent("alice", "call", ["/bin/sh", "-c",
                                     f'exec "$0" -c "$1" "$2" "$3" > {out}', sys.executable,
                                     ECHO_CLIENT, "{REMOTE_IP}", "{PORT}"], target="home",
                   ice=IceOptions(enabled=caller_ice))
    serving = asyncio.ensure_future(server.run())
    try:
        await asyncio.wait_for(server.ready.wait(), 10)
        assert await asyncio.wait_for(client.run(), 60) == 0
    finally:
        server.request_stop()
        await asyncio.wait_for(serving, 20)
    words = out.read_text().split()
    assert words[:3] == ["echo", "ok", "127.0.0.1"], words
    (answered,) = [data["port"] for event, data in events if event == "home:child_started"]
    paths = [data for event, data in events if event.endswith(":path")]
    if caller_ice:
        # not the answering program's own port: sipmesh's, whose connections cross as streams
        assert int(words[3]) != int(answered) and words[4] == "direct"
        assert [p["kind"] for p in paths] == ["direct", "direct"]
    else:
        assert int(words[3]) == int(answered) and words[4] == "None" and paths == []


# ----------------------------------------------------------------------- whole sessions, NAT lab

WEB_FETCH = """
import hashlib, sys, time, urllib.request
url = f"http://{sys.argv[1]}:{sys.argv[2]}/big.bin"
with urllib.request.urlopen(url, timeout=60) as r:
    digest = hashlib.sha256(r.read()).hexdigest()
open(sys.argv[3], "w").write(digest)
"""


@pytest.mark.slow
@pytest.mark.netns
@pytest.mark.parametrize("caller, callee, kind, user", [
    ("a", "b", "direct", "v"),      # home -> home: the hole ICE punched
    ("s", "a", "relayed", "u"),     # symmetric -> home: through coturn
])
def test_a_tcp_session_across_nat_fetches_a_page(ice_lab, tmp_path, caller, callee, kind, user):
    """`sipmesh serve --app-transport tcp -- python -m http.server --bind 127.0.0.1 {PORT}`
    behind a home router; `sipmesh call` from behind another router runs a fetch of
    http://{REMOTE_IP}:{PORT}/: the page comes over QUIC streams on the path ICE chose."""
    www = tmp_path / "www"
    www.mkdir()
    (www / "big.bin").write_bytes(os.urandom(3 * MB))
    expected = hashlib.sha256((www / "big.bin").read_bytes()).hexdigest()
    serve = spawn([SIPMESH, "serve", *ice_agent(ice_lab, user), "--app-transport", "tcp",
                   "--", sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                   "--directory", str(www), "{PORT}"],
                  netns=ice_lab[callee].ns, cwd=tmp_path, log_path=tmp_path / "serve.log",
                  name=f"serve-tcp-{callee}")
    try:
        wait_for(lambda: "ready: contact" in serve.log_text(), 20, what="serve registered",
                 abort=serve.exit_reason)
        out = tmp_path / "fetched"
        call = spawn([SIPMESH, "call", *ice_agent(ice_lab, f"{caller}c"), user,
                      "--app-transport", "tcp", "--timeout", "15", "--",
                      sys.executable, "-c", WEB_FETCH, "{REMOTE_IP}", "{PORT}", str(out)],
                     netns=ice_lab[caller].ns, cwd=tmp_path, log_path=tmp_path / "call.log",
                     name=f"call-tcp-{caller}")
        try:
            rc = call.wait(60)
        except subprocess.TimeoutExpired:
            rc = None
        log = call.log_text()
        assert rc == 0, f"{rc}\n{call.log_tail(40)}\n--- serve:\n{serve.log_tail(40)}"
        assert out.read_text() == expected
        assert f"path {kind}: " in log and "TCP streams over the" in log, log
    finally:
        serve.stop(grace=5)


def ice_agent(ice_lab, user: str) -> list[str]:
    """The common options of an agent in the lab of tests/lab/icelab.py. SIP over
    TCP: an INVITE with three candidates and a fingerprint passes 1300 bytes, and the
    broker then forwards it over TCP (RFC 3261 §18.1.1), which a UA registered over UDP
    from behind a NAT cannot take (see the report of branch quic)."""
    return ["--server", ice_lab.server, "--user", user, "--password", ice_password(user),
            "--turn", ice_lab.turn, "--transport", "tcp", "-v"]
