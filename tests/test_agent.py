"""`sipmesh serve` / `sipmesh call` as real processes, against Kamailio on loopback and
against scripted raw SIP peers: sessions by name, supervision, every failure of the
issue with its exit code, signals, and hostile SDP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from sipmesh.sip.message import Request, Response
from tests.lab import free_port, wait_for
from tests.lab.agents import (SIPMESH, agent_argv, agents, app_argv, assert_no_orphans, no_orphans,  # noqa: F401
                              processes_of, record, wait_exit, wait_ready)
from tests.lab.broker import BrokerServer
from tests.peers.raw import RawPeer, is_final, is_response

pytestmark = pytest.mark.slow  # real agent processes, Kamailio, our broker

# ----------------------------------------------------------------------------- helpers


def start_session(k, agents, tmp_path: Path, *extra: str, name: str = "call"):  # type: ignore[no-untyped-def]
    """`serve` as 2500 and `call` 2500 from 2501 (both with the options `extra`), both
    running app_argv(run); (serve, call) once both programs are up."""
    serve = agents(agent_argv("serve", k.hostport, "2500", *extra,
                              program=app_argv(tmp_path, "run")), name="serve")
    wait_ready(serve)
    call = agents(agent_argv("call", k.hostport, "2501", *extra, target="2500",
                             program=app_argv(tmp_path, "run")), name=name)
    wait_for(lambda: record(tmp_path, "client") and record(tmp_path, "server"), 10,
             what="session up", abort=call.exit_reason)
    return serve, call


def sip_text(head: str, body: str = "") -> bytes:
    """A SIP message from `head` (lines split by newlines) and `body` (sent as it is),
    with its Content-Length."""
    head = head.strip("\r\n").replace("\r\n", "\n").replace("\n", "\r\n")
    return (head + f"\r\nContent-Length: {len(body.encode())}\r\n\r\n" + body).encode()


def first_word(message: Request | Response) -> str:
    """What a SIP trace shows first: the method, or SIP/2.0 for a response."""
    return message.method if isinstance(message, Request) else "SIP/2.0"


def sdp(attributes: list[str], ip: str = "127.0.0.1") -> str:
    lines = ["v=0", f"o=x 1 1 IN IP4 {ip}", "s=-", f"c=IN IP4 {ip}", "t=0 0",
             "m=application 9 sipmesh 0", *attributes]
    return "\r\n".join(lines) + "\r\n"


class FakeServer(threading.Thread):
    """Registrar + UAS in one: 200 to REGISTER, 100 + 200 (with `answer_sdp`) to INVITE,
    200 to BYE; records every request. Bounded: stops itself after `lifetime` seconds."""

    def __init__(self, answer_sdp: str, lifetime: float = 30.0) -> None:
        super().__init__(daemon=True)
        self.peer = RawPeer()
        self.answer_sdp = answer_sdp
        self.deadline = time.monotonic() + lifetime
        self.methods: list[str] = []
        self.messages: list[Request | Response] = []
        self.stopped = threading.Event()

    @property
    def hostport(self) -> str:
        return f"127.0.0.1:{self.peer.port}"

    def run(self) -> None:
        while not self.stopped.is_set() and time.monotonic() < self.deadline:
            got = self.peer.recv_blocking(0.2)
            if got is None:
                continue
            message, addr = got
            method = first_word(message)
            self.methods.append(method)
            self.messages.append(message)
            if method == "REGISTER":
                contact = message.headers.get("Contact") or "<sip:x@127.0.0.1>"
                self.peer.reply(message, 200, to_tag="reg", addr=addr,
                                headers=[("Contact", f"{contact};expires=3600")])
            elif method == "INVITE":
                self.peer.reply(message, 100, addr=addr)
                self.peer.reply(message, 200, to_tag="uas", addr=addr,
                                headers=[("Contact", f"<sip:uas@{self.hostport}>")],
                                body=self.answer_sdp.encode())
            elif method in ("BYE", "CANCEL", "OPTIONS"):
                self.peer.reply(message, 200, addr=addr)

    def stop(self) -> None:
        self.stopped.set()
        self.join(5)
        self.peer.close()


def raw_register(k, user: str, peer: RawPeer) -> None:
    """REGISTER `user` from `peer`'s socket with `peer` as its contact (a UA that never
    answers INVITEs unless the test does)."""
    branch = "z9hG4bK" + uuid.uuid4().hex
    peer.send(sip_text(f"REGISTER sip:{k.hostport} SIP/2.0\n"
                       f"Via: SIP/2.0/UDP 127.0.0.1:{peer.port};branch={branch};rport\n"
                       "Max-Forwards: 70\n"
                       f"From: <sip:{user}@{k.hostport}>;tag=r1\nTo: <sip:{user}@{k.hostport}>\n"
                       f"Call-ID: {uuid.uuid4().hex}\nCSeq: 1 REGISTER\n"
                       f"Contact: <sip:{user}@127.0.0.1:{peer.port}>\nExpires: 60"),
              k.address)
    got = peer.recv_blocking(5)
    assert got is not None and isinstance(got[0], Response) and got[0].status == 200, got


# ----------------------------------------------------------------------------- sessions


@pytest.fixture(params=["kamailio", "broker"])
def k(request, kamailio, tmp_path):
    """The SIP server: Kamailio (third party) and our own broker."""
    if request.param == "kamailio":
        yield kamailio()
        return
    server = BrokerServer(tmp_path / "broker")
    yield server
    server.stop()


def test_session_by_name_child_exit_sends_bye_and_peer_stops(k, agents, tmp_path):
    serve = agents(agent_argv("serve", k.hostport, "2500", "--app-port", str(free_port()),
                                  program=app_argv(tmp_path, "run")), name="serve")
    wait_ready(serve)
    assert k.registered("2500")
    call = agents(agent_argv("call", k.hostport, "2501", target="2500",
                                 program=app_argv(tmp_path, "exit", 0.5)), name="call")
    assert wait_exit(call) == 0, call.log_text()
    server, client = record(tmp_path, "server"), record(tmp_path, "client")
    assert server and client
    # the values the caller's program got are the ones the answering side chose
    assert client["env"]["SIPMESH_PORT"] == server["env"]["SIPMESH_PORT"]
    assert client["env"]["SIPMESH_REMOTE_IP"] == "127.0.0.1"
    assert server["env"]["SIPMESH_REMOTE_IP"] == "127.0.0.1"
    assert client["env"]["SIPMESH_PEER"].startswith("sip:2500@")
    assert "SIPMESH_PASSWORD" not in client["env"]
    # the caller's program exited -> BYE -> the server's program got SIGTERM
    wait_for(lambda: (tmp_path / "server.stopped").exists(), 10, what="server program stopped")
    assert "session ended: the application exited" in call.log_text()
    assert "the peer ended the session" in serve.log_text()
    assert serve.alive() and k.registered("2500") and not k.registered("2501")
    assert_no_orphans(tmp_path)


def test_session_over_tcp(k, agents, tmp_path):
    serve = agents(agent_argv("serve", k.hostport, "2500", "--transport", "tcp", "--debug",
                              program=app_argv(tmp_path, "run")), name="serve")
    wait_ready(serve)
    assert "transport=tcp" in serve.log_text()  # our Contact asks for TCP
    call = agents(agent_argv("call", k.hostport, "2501", "--transport", "tcp", target="2500",
                             program=app_argv(tmp_path, "exit", 0.2)), name="call")
    assert wait_exit(call) == 0, call.log_text()
    wait_for(lambda: (tmp_path / "server.stopped").exists(), 10, what="server program stopped")
    assert "INVITE sip:2500@" in serve.log_text() and "tcp:" in serve.log_text()


def test_bye_from_the_answering_side_stops_the_callers_program(k, agents, tmp_path):
    serve = agents(agent_argv("serve", k.hostport, "2500", "--once",
                                  program=app_argv(tmp_path, "exit", 0.5)), name="serve")
    wait_ready(serve)
    call = agents(agent_argv("call", k.hostport, "2501", target="2500",
                                 program=app_argv(tmp_path, "run")), name="call")
    assert wait_exit(call) == 0, call.log_text()
    assert (tmp_path / "client.stopped").exists()
    assert wait_exit(serve) == 0  # --once
    assert not k.registered("2500")
    assert_no_orphans(tmp_path)


# The caller's program decides `sipmesh call`'s exit status: its own failure is 10
# (Exit.APPLICATION), with its status on stderr. Run from argv lists, never through our
# shell.
@pytest.mark.parametrize("program,code,says", [
    (["true"], 0, None),
    (["sh", "-c", "sleep 0.5; exit 0"], 0, None),
    (["sh", "-c", "sleep 0.5; exit 3"], 10, "the application exited with status 3"),
    (["sh", "-c", "sleep 0.5; kill -KILL $$"], 10, "the application was killed by SIGKILL"),
], ids=["true", "exit-0", "exit-3", "killed"])
def test_the_callers_program_failing_is_the_exit_status(k, agents, tmp_path, program, code, says):
    serve = agents(agent_argv("serve", k.hostport, "2500", program=app_argv(tmp_path, "run")),
                   name="serve")
    wait_ready(serve)
    call = agents(agent_argv("call", k.hostport, "2501", "-q", target="2500", program=program),
                  name="call")
    assert wait_exit(call) == code, call.log_text()
    text = call.log_text()
    if says is None:
        assert "sipmesh call: the application" not in text
    else:
        assert f"sipmesh call: {says} (session " in text  # printed even with -q
    # the session still ended the usual way: BYE, the other side's program stopped
    # (`true` may end before that program has even set up its SIGTERM handler)
    wait_for(lambda: "the peer ended the session" in serve.log_text(), 10,
             what="the BYE at the answering side")
    assert serve.alive() and k.registered("2500") and not k.registered("2501")
    assert_no_orphans(tmp_path)


@pytest.mark.parametrize("crashes", ["client", "server"])
def test_a_crashing_program_ends_the_session_within_a_second(k, agents, tmp_path, crashes):
    """The program on one side dies by SIGKILL (a crash: no chance to clean up): its agent
    sends BYE and the other side's program is stopped, all within a second."""
    serve, call = start_session(k, agents, tmp_path)
    other = "server" if crashes == "client" else "client"
    victim = record(tmp_path, crashes)
    assert victim is not None
    crashed = time.monotonic()
    os.kill(victim["pid"], signal.SIGKILL)
    wait_for(lambda: (tmp_path / f"{other}.stopped").exists(), 10, interval=0.005,
             what=f"the {other}'s program stopped")
    took = time.monotonic() - crashed
    print(f"{crashes} program SIGKILLed: BYE, and the {other}'s program stopped, {took:.3f} s later")
    assert took < 1.0, f"{took:.3f} s from the crash to the other program's SIGTERM"
    ender = call if crashes == "client" else serve
    assert "the application was killed by SIGKILL" in ender.log_text()
    if crashes == "client":
        assert wait_exit(call) == 10, call.log_text()
    else:
        assert wait_exit(call) == 0, call.log_text()  # ended by the peer's BYE: no failure of ours
    assert serve.alive()
    assert_no_orphans(tmp_path)


def test_a_program_we_stopped_is_no_failure_and_serve_once_reports_its_own(k, agents,
                                                                           tmp_path):
    # serve --once: its program fails (exit 4) -> BYE, and serve exits 10 after the session.
    # call: BYE from the peer while its program runs -> we stop it; that it then exits 7
    # (its SIGTERM trap) is our doing, not a failure -> 0.
    serve = agents(agent_argv("serve", k.hostport, "2500", "--once",
                              program=["sh", "-c", "sleep 0.5; exit 4"]), name="serve")
    wait_ready(serve)
    call = agents(agent_argv("call", k.hostport, "2501", target="2500",
                             program=["sh", "-c", "trap 'exit 7' TERM; sleep 60 & wait"]),
                  name="call")
    assert wait_exit(call) == 0, call.log_text()
    assert "the peer ended the session" in call.log_text()
    assert wait_exit(serve) == 10, serve.log_text()
    assert "sipmesh serve: the application exited with status 4 (session " in serve.log_text()
    assert not k.registered("2500") and not k.registered("2501")


def test_through_a_proxy_that_rewrites_sdp_only_a_lines_count(kamailio, agents, tmp_path):
    k = kamailio(sdp_rewrite=True, sdp_fake_ip="127.0.0.254", sdp_fake_port=9)
    serve = agents(agent_argv("serve", k.hostport, "2500", "--debug",
                                  program=app_argv(tmp_path, "run")), name="serve")
    wait_ready(serve)
    call = agents(agent_argv("call", k.hostport, "2501", "--debug", target="2500",
                                 program=app_argv(tmp_path, "exit", 0.2)), name="call")
    assert wait_exit(call) == 0, call.log_text()
    assert "c=IN IP4 127.0.0.254" in call.log_text()  # the proxy did rewrite the 200
    client = record(tmp_path, "client")
    assert client["env"]["SIPMESH_REMOTE_IP"] == "127.0.0.1"
    assert client["env"]["SIPMESH_PORT"] == record(tmp_path, "server")["env"]["SIPMESH_PORT"]


def test_placeholders_and_appended_arguments(k, agents, tmp_path):
    serve = agents(agent_argv("serve", k.hostport, "2500", "--vpn", "--append-args",
                                  program=app_argv(tmp_path, "run") + ["--port={PORT}"]),
                       name="serve")
    wait_ready(serve)
    call = agents(agent_argv("call", k.hostport, "2501", "--vpn", "--append-args",
                                 target="2500",
                                 program=app_argv(tmp_path, "exit", 0.1) + ["{IP4}:{PORT}"]),
                      name="call")
    assert wait_exit(call) == 0, call.log_text()
    server, client = record(tmp_path, "server"), record(tmp_path, "client")
    port = server["env"]["SIPMESH_PORT"]
    assert server["argv"][-4:] == [f"--port={port}", port, "192.168.234.1", "192.168.234.2"]
    assert client["argv"][-5:] == [f"127.0.0.1:{port}", "127.0.0.1", port, "192.168.234.1",
                                   "192.168.234.2"]


def test_the_application_port_skips_ports_in_use(k, agents, tmp_path):
    taken = free_port("both")
    blockers = [socket.socket(socket.AF_INET, kind) for kind in (socket.SOCK_DGRAM,)]
    for s in blockers:
        s.bind(("0.0.0.0", taken))
    try:
        serve = agents(agent_argv("serve", k.hostport, "2500", "--app-port", str(taken),
                                      program=app_argv(tmp_path, "run")), name="serve")
        wait_ready(serve)
        call = agents(agent_argv("call", k.hostport, "2501", target="2500",
                                     program=app_argv(tmp_path, "exit", 0.1)), name="call")
        assert wait_exit(call) == 0, call.log_text()
        assert int(record(tmp_path, "client")["env"]["SIPMESH_PORT"]) > taken
    finally:
        for s in blockers:
            s.close()


# ----------------------------------------------------------------------------- failures


def test_busy_486_while_in_a_session(k, agents, tmp_path):
    serve, first = start_session(k, agents, tmp_path, name="first")
    second = agents(agent_argv("call", k.hostport, "2502", target="2500",
                                   program=["/bin/true"]), name="second")
    assert wait_exit(second) == 7, second.log_text()
    assert "busy" in second.log_text() and "486" in second.log_text()
    first.popen.send_signal(signal.SIGTERM)
    assert wait_exit(first) == 0
    wait_for(lambda: (tmp_path / "server.stopped").exists(), 10, what="server program stopped")
    # free again: the next INVITE is answered
    (tmp_path / "client.json").unlink()
    third = agents(agent_argv("call", k.hostport, "2503", target="2500",
                                  program=app_argv(tmp_path, "exit", 0.1)), name="third")
    assert wait_exit(third) == 0, third.log_text()
    assert_no_orphans(tmp_path)


def test_target_not_registered(k, agents):
    call = agents(agent_argv("call", k.hostport, "2501", target="nobody",
                                 program=["/bin/true"]), name="call")
    assert wait_exit(call) == 6
    assert "nobody is not registered" in call.log_text()


def test_no_answer(k, agents):
    mute = RawPeer()  # takes the INVITE, never answers
    try:
        raw_register(k, "ghost", mute)
        t0 = time.monotonic()
        call = agents(agent_argv("call", k.hostport, "2501", "--timeout", "2", target="ghost",
                                     program=["/bin/true"]), name="call")
        assert wait_exit(call) == 8, call.log_text()
        assert time.monotonic() - t0 < 10
        assert "did not answer" in call.log_text()
    finally:
        mute.close()


@pytest.mark.parametrize("kind", ["kamailio", "broker"])
def test_digest_auth_accepted_and_rejected(kamailio, agents, tmp_path, kind):
    users = {u: "pw" + u for u in ("2500", "2501", "2502")}
    if kind == "kamailio":
        k = kamailio(auth="static")  # password = "pw" + user
    else:
        k = BrokerServer(tmp_path / "broker", users=users)
    try:
        creds = tmp_path / "creds"
        creds.write_text("password = pw2500\n")
        creds.chmod(0o600)
        serve = agents(agent_argv("serve", k.hostport, "2500", "--credentials", str(creds),
                                  program=app_argv(tmp_path, "run")), name="serve")
        wait_ready(serve)
        call = agents(agent_argv("call", k.hostport, "2501", target="2500",
                                 program=app_argv(tmp_path, "exit", 0.1)), name="call",
                      env=dict(os.environ, SIPMESH_PASSWORD="pw2501"))
        assert wait_exit(call) == 0, call.log_text()  # INVITE challenged (407) and answered
        bad = agents(agent_argv("call", k.hostport, "2502", "--password", "wrong", target="2500",
                                program=["/bin/true"]), name="bad")
        assert wait_exit(bad) == 5, bad.log_text()
        assert "rejected our credentials" in bad.log_text()
        serve.stop(grace=10)
    finally:
        if kind == "broker":
            k.stop()


def test_server_unreachable(spawn_proc):
    port = free_port("both")  # nothing listens there
    udp = spawn_proc([SIPMESH, "serve", "--server", f"127.0.0.1:{port}", "--user", "a",
                      "--register-timeout", "1", "--", "/bin/true"], name="udp")
    assert wait_exit(udp) == 4
    assert "did not answer our REGISTER" in udp.log_text()
    tcp = spawn_proc([SIPMESH, "call", "b", "--server", f"127.0.0.1:{port}", "--user", "a",
                      "--transport", "tcp", "--", "/bin/true"], name="tcp")
    assert wait_exit(tcp) == 4
    assert "unreachable" in tcp.log_text()


@pytest.mark.parametrize("mode", ["serve", "call"])
def test_program_checked_before_registering(k, agents, tmp_path, mode):
    plain = tmp_path / "plain.sh"
    plain.write_text("#!/bin/sh\n")
    for program, message in ((str(tmp_path / "missing"), "program not found"),
                             (str(plain), "not executable")):
        p = agents(agent_argv(mode, k.hostport, "2500", program=[program],
                                  target="x" if mode == "call" else None), name=mode)
        assert wait_exit(p) == 3 and message in p.log_text()
    assert not k.registered("2500")
    usage = subprocess.run([SIPMESH, mode, *(["x"] if mode == "call" else []), "--server",
                            k.hostport, "--user", "u"], capture_output=True, text=True, timeout=20)
    assert usage.returncode == 2 and "no program to run" in usage.stderr


# ----------------------------------------------------------------------------- signals


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_to_the_answering_side_ends_everything_cleanly(k, agents, tmp_path, sig):
    serve, call = start_session(k, agents, tmp_path)
    serve.popen.send_signal(sig)
    assert wait_exit(serve) == 0, serve.log_text()
    assert wait_exit(call) == 0, call.log_text()  # BYE received -> stopped its program
    assert (tmp_path / "server.stopped").exists() and (tmp_path / "client.stopped").exists()
    assert not k.registered("2500") and not k.registered("2501")
    assert_no_orphans(tmp_path)


def test_signal_to_the_caller_sends_bye(k, agents, tmp_path):
    serve, call = start_session(k, agents, tmp_path)
    call.popen.send_signal(signal.SIGTERM)
    assert wait_exit(call) == 0
    wait_for(lambda: (tmp_path / "server.stopped").exists(), 10, what="server program stopped")
    assert serve.alive() and k.registered("2500") and not k.registered("2501")
    assert_no_orphans(tmp_path)


def test_signal_while_calling_cancels_and_unregisters(k, agents):
    mute = RawPeer()  # registered as "ghost"; takes the INVITE and only says 180
    try:
        raw_register(k, "ghost", mute)
        call = agents(agent_argv("call", k.hostport, "2501", "--timeout", "60", target="ghost",
                                 program=["/bin/true"]), name="call")
        got = mute.recv_blocking(10)
        assert got is not None and first_word(got[0]) == "INVITE", got
        mute.reply(got[0], 180, to_tag="g1", addr=got[1])
        wait_for(lambda: k.registered("2501"), 5)
        call.popen.send_signal(signal.SIGINT)
        assert wait_exit(call, 10) == 0, call.log_text()
        methods = []
        while (more := mute.recv_blocking(1)) is not None:
            methods.append(first_word(more[0]))
            if methods[-1] == "CANCEL":
                mute.reply(more[0], 200, addr=more[1])
        assert "CANCEL" in methods, methods
        assert not k.registered("2501")
    finally:
        mute.close()


def test_signal_while_idle_unregisters(k, agents, tmp_path):
    serve = agents(agent_argv("serve", k.hostport, "2500", program=["/bin/true"]),
                       name="serve")
    wait_ready(serve)
    assert k.registered("2500")
    serve.popen.send_signal(signal.SIGTERM)
    assert wait_exit(serve) == 0
    assert not k.registered("2500")


# ----------------------------------------------------------------------------- a peer that dies
# Its agent SIGKILLed mid-session, with or without its program: no BYE ever comes. Our side
# probes the silent peer with in-dialog OPTIONS and ends the session within
# K + min(2K, 64*T1) of the peer's last sign of life (sip/ua/liveness.py), K = --keepalive.

KEEPALIVE = 2.0
LOST_BOUND = KEEPALIVE + min(2 * KEEPALIVE, 32.0)  # 6 s
SLACK = 2.0  # stopping the program, polling, a loaded machine


def kill_one_side(tmp_path: Path, dead, survivor, program: str) -> float:
    """SIGKILL the agent `dead` (and its program if `program` is "killed too"; else the
    program runs on in its own process group until the end); wait until `survivor` has
    stopped its own program, within the bound. When the SIGKILL was (time.monotonic())."""
    dead_role, our_role = ("server", "client") if dead.argv[1] == "serve" else ("client", "server")
    orphan = record(tmp_path, dead_role)["pid"]
    try:
        killed = time.monotonic()
        os.kill(dead.pid, signal.SIGKILL)
        if program == "killed too":
            os.kill(orphan, signal.SIGKILL)
        wait_for(lambda: (tmp_path / f"{our_role}.stopped").exists(), LOST_BOUND + SLACK + 5,
                 what=f"the {our_role}'s program stopped", abort=survivor.exit_reason)
        stopped = time.monotonic() - killed
    finally:
        try:
            os.kill(orphan, signal.SIGKILL)
        except ProcessLookupError:
            pass
    print(f"\n{dead.argv[1]} SIGKILLed, its program {program}: the {our_role}'s program "
          f"stopped after {stopped:.2f} s (bound {LOST_BOUND:g} s from the last answer)")
    assert stopped <= LOST_BOUND + SLACK, stopped
    return killed


@pytest.mark.parametrize("program", ["runs on", "killed too"])
def test_a_sigkilled_answering_agent_ends_the_callers_session_within_the_bound(
        k, agents, tmp_path, program):
    serve, call = start_session(k, agents, tmp_path, "--keepalive", f"{KEEPALIVE:g}")
    killed = kill_one_side(tmp_path, serve, call, program)
    assert wait_exit(call, 10) == 12, call.log_text()  # Exit.PEER_LOST
    print(f"{type(k).__name__}: the caller exited {time.monotonic() - killed:.2f} s after it")
    says = "the peer stopped answering: no answer to 2 in-dialog OPTIONS in 4 s"
    assert f"session ended: {says}" in call.log_text()
    assert f"sipmesh call: {says} (session " in call.log_text()  # why it exits 12
    assert not k.registered("2501")  # the caller unregistered on its way out


@pytest.mark.parametrize("program", ["runs on", "killed too"])
def test_a_sigkilled_calling_agent_ends_the_answering_session_and_serve_goes_on(
        k, agents, tmp_path, program):
    serve, call = start_session(k, agents, tmp_path, "--keepalive", f"{KEEPALIVE:g}")
    kill_one_side(tmp_path, call, serve, program)
    wait_for(lambda: "session ended: the peer stopped answering" in serve.log_text(), 5,
             what="the reason in the log")
    # serve goes on: the next caller gets a session
    for name in ("server.json", "client.json", "server.stopped"):
        (tmp_path / name).unlink(missing_ok=True)
    again = agents(agent_argv("call", k.hostport, "2502", target="2500",
                              program=app_argv(tmp_path, "exit", 0.2)), name="again")
    assert wait_exit(again) == 0, again.log_text()
    wait_for(lambda: (tmp_path / "server.stopped").exists(), 10, what="server program stopped")
    assert serve.alive() and k.registered("2500")


def test_a_peer_that_answers_the_probes_keeps_the_session(k, agents, tmp_path):
    """Both sides probe every second of silence (bound 3 s); after five answered probes,
    well past the bound, the session is still up."""
    serve, call = start_session(k, agents, tmp_path, "--keepalive", "1", "-vv")

    def answered() -> int:
        return sum(p.log_text().count("in-dialog OPTIONS answered 200") for p in (serve, call))

    wait_for(lambda: answered() >= 5, 20, what="five probes answered", abort=call.exit_reason)
    assert serve.alive() and call.alive()
    assert not (tmp_path / "server.stopped").exists() and not (tmp_path / "client.stopped").exists()
    assert "stopped answering" not in serve.log_text() + call.log_text()
    call.popen.send_signal(signal.SIGTERM)  # and it ends as usual
    assert wait_exit(call) == 0, call.log_text()
    wait_for(lambda: (tmp_path / "server.stopped").exists(), 10, what="server program stopped")
    assert_no_orphans(tmp_path)


# ----------------------------------------------------------------------------- hostile SDP

HOSTILE_OFFERS = {
    "shell metacharacters": ["a=IP4:127.0.0.1;reboot"],
    "command substitution": ["a=IP4:$(touch /tmp/sipmesh-pwned)"],
    "backticks in APP": ["a=APP:`id`"],
    "two values by line injection": ["a=IP4:127.0.0.1", "a=IP4:10.6.6.6"],
    "bare CR inside a line": ["a=IP4:127.0.0.1\rX"],
    "over-long value": ["a=IP4:" + "1" * 3000],
    "out of range address": ["a=IP4:300.1.1.1"],
    "other application": ["a=APP:openvpn"],
}


def invite_directly(spawn_proc, tmp_path: Path, attributes: list[str],
                    serve_args: list[str]) -> tuple[Response, bool, str]:
    """Start `sipmesh serve SERVE_ARGS` (registered at a fake registrar), send it a raw INVITE
    whose SDP has `attributes`; returns its final response, whether the agent still answered
    an OPTIONS sent after it, and the agent's log once the agent and every program it may
    have started have ended."""
    fake = FakeServer(answer_sdp="")  # only its registrar part is used
    fake.start()
    sip_port = free_port("both")
    serve = spawn_proc([SIPMESH, "serve", "--server", fake.hostport, "--user", "2500",
                        "--sip-port", str(sip_port), "--bind", "127.0.0.1", *serve_args],
                       name="serve")
    peer = RawPeer()
    try:
        wait_ready(serve)
        branch = "z9hG4bK" + uuid.uuid4().hex
        peer.send(sip_text(f"INVITE sip:2500@127.0.0.1:{sip_port} SIP/2.0\n"
                           f"Via: SIP/2.0/UDP 127.0.0.1:{peer.port};branch={branch};rport\n"
                           "Max-Forwards: 70\nFrom: <sip:evil@127.0.0.1>;tag=e1\n"
                           "To: <sip:2500@127.0.0.1>\nCall-ID: hostile-" + uuid.uuid4().hex + "\n"
                           f"CSeq: 1 INVITE\nContact: <sip:evil@127.0.0.1:{peer.port}>\n"
                           "Content-Type: application/sdp", sdp(attributes)),
                  ("127.0.0.1", sip_port))
        final, _ = peer.expect_blocking(is_final(), 10, what="a final response to the INVITE")
        assert isinstance(final, Response)
        # the agent is done with the INVITE (a program is started before any answer) and
        # still serves: it answers an OPTIONS sent after it
        peer.send(sip_text(f"OPTIONS sip:2500@127.0.0.1:{sip_port} SIP/2.0\n"
                           f"Via: SIP/2.0/UDP 127.0.0.1:{peer.port};branch={branch}o;rport\n"
                           "Max-Forwards: 70\nFrom: <sip:evil@127.0.0.1>;tag=e2\n"
                           "To: <sip:2500@127.0.0.1>\nCall-ID: after-" + uuid.uuid4().hex + "\n"
                           "CSeq: 1 OPTIONS"), ("127.0.0.1", sip_port))
        peer.expect_blocking(is_response(200, "OPTIONS"), 10, what="the answer to an OPTIONS")
        alive = serve.alive()
        serve.stop(grace=10)  # while the registrar still answers its unregistration
        wait_for(lambda: not processes_of(tmp_path), 10, what="every program of the test gone")
        return final, alive, serve.log_text()
    finally:
        peer.close()
        serve.stop()
        fake.stop()


@pytest.mark.parametrize("case", sorted(HOSTILE_OFFERS))
def test_hostile_invite_gets_488_and_starts_nothing(spawn_proc, tmp_path, case):
    final, alive, log = invite_directly(spawn_proc, tmp_path, HOSTILE_OFFERS[case],
                                        ["--", *app_argv(tmp_path, "run")])
    assert final.status == 488, final
    warning = final.headers.get("Warning")
    assert warning and warning.startswith("399 ") and '"' in warning, final
    assert alive and "started (pid" not in log
    assert not list(tmp_path.glob("*.json*")), "a program was started"


GOOD_FP = "sha-256 " + ":".join(["5A"] * 32)


@pytest.mark.parametrize("attributes", [
    [],  # the paper's INVITE had no SDP parameters: OpenVPN without a fingerprint is refused
    [f"a=fingerprint:{GOOD_FP}\nscript-security 2"],
    [f"a=fingerprint:{GOOD_FP};up /bin/sh"],
    ["a=fingerprint:sha-256 " + ":".join(["5A"] * 31)],
    ["a=fingerprint:md5 " + ":".join(["5A"] * 16)],
    [f"a=fingerprint:{GOOD_FP}", "a=fingerprint:sha-256 " + ":".join(["6B"] * 32)],
], ids=["missing", "newline", "semicolon", "short", "md5", "two"])
def test_openvpn_profile_refuses_bad_fingerprints(spawn_proc, tmp_path, attributes):
    final, alive, log = invite_directly(spawn_proc, tmp_path, ["a=IP4:127.0.0.1", *attributes],
                                        ["--app", "openvpn", "--state-dir", str(tmp_path / "state")])
    warning = final.headers.get("Warning") or ""
    assert final.status == 488 and ("fingerprint" in warning or "SDP" in warning), final
    assert alive and "started (pid" not in log
    assert not (tmp_path / "state" / "run").exists() or \
        not list((tmp_path / "state" / "run").iterdir())


HOSTILE_ANSWERS = {
    "port out of range": ["a=IP4:127.0.0.1", "a=PORT:99999"],
    "port zero": ["a=IP4:127.0.0.1", "a=PORT:0"],
    "negative port": ["a=IP4:127.0.0.1", "a=PORT:-1"],
    "shell in port": ["a=IP4:127.0.0.1", "a=PORT:8000;id"],
    "shell in address": ["a=IP4:$(id)", "a=PORT:8000"],
    "newline-split value": ["a=IP4:127.0.0.1", "a=PORT:8000", "a=PORT:8001"],
    "over-long port": ["a=IP4:127.0.0.1", "a=PORT:" + "8" * 600],
    "missing port": ["a=IP4:127.0.0.1"],
    "missing address": ["a=PORT:8000"],
    "hostname instead of address": ["a=IP4:evil.example", "a=PORT:8000"],
}


@pytest.mark.parametrize("case", sorted(HOSTILE_ANSWERS))
def test_hostile_answer_is_acked_ended_and_starts_nothing(spawn_proc, tmp_path, case):
    fake = FakeServer(answer_sdp=sdp(HOSTILE_ANSWERS[case]))
    fake.start()
    try:
        call = spawn_proc([SIPMESH, "call", "2500", "--server", fake.hostport, "--user", "2501",
                           "--", *app_argv(tmp_path, "run")], name="call")
        assert wait_exit(call) == 9, call.log_text()
        assert "refused the answer of 2500" in call.log_text()
        wait_for(lambda: not processes_of(tmp_path), 10, what="every program of the test gone")
        assert not list(tmp_path.glob("*.json*")), "a program was started"
        assert "started (pid" not in call.log_text()
        wait_for(lambda: "BYE" in fake.methods, 5, what="BYE after the bad answer")
        assert fake.methods.index("ACK") < fake.methods.index("BYE")
        bye = fake.messages[fake.methods.index("BYE")]
        assert "cause=488" in (bye.headers.get("Reason") or ""), bye
    finally:
        fake.stop()
