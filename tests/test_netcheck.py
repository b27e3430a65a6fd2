"""`sipmesh netcheck` (agent/netcheck.py, cli/netcheck.py): the STUN and TURN exchanges on a
fake clock, the verdict, and the real command against real servers on loopback and in the
NAT lab (a home router, a symmetric one, one that drops UDP)."""

from __future__ import annotations

import json
import os
import pty
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aioice import stun
from aioice.turn import make_integrity_key

from sipmesh.agent.netcheck import (TIMEOUT, TRIES, AllocateCheck, BindingCheck,
                                    NetcheckConfig, Probe, Server, netcheck, summarise)
from sipmesh.sip.auth import compute_ha1

SIPMESH = str(Path(sys.executable).parent / "sipmesh")
PROBE = str(Path(__file__).parent / "lab" / "iceprobe.py")
REALM = "mesh.example"
SERVER = Server("stun", "203.0.113.9:3478", ("203.0.113.9", 3478))
TURN = Server("turn", "203.0.113.9:3478", ("203.0.113.9", 3478))


def answer(request_bytes: bytes, cls=stun.Class.RESPONSE, key: bytes | None = None,
           **attributes) -> bytes:
    request = stun.parse_message(request_bytes)
    reply = stun.Message(request.message_method, cls, transaction_id=request.transaction_id)
    for name, value in attributes.items():
        reply.attributes[name.replace("_", "-")] = value
    if key is not None:
        reply.add_message_integrity(key)
    return bytes(reply)


# ----------------------------------------------------------------------- exchanges (fake clock)


def test_a_binding_is_tried_on_schedule_then_given_up():
    check = BindingCheck(Probe(SERVER, "udp"), now=100.0).start(100.0)
    sent_at = []
    now = 100.0
    while not check.done:
        if check.outgoing(now):
            sent_at.append(round(now - 100, 3))
        now = check.next_time() or now
    assert sent_at == list(TRIES)
    assert now == pytest.approx(100 + TIMEOUT)
    assert check.probe.error == f"no answer within {TIMEOUT:g} s" and not check.probe.answered


def test_each_try_has_its_own_id_so_the_rtt_is_that_of_the_try_answered():
    check = BindingCheck(Probe(SERVER, "udp"), now=0.0).start(0.0)
    [first] = check.outgoing(0.0)
    [second] = check.outgoing(0.25)
    assert stun.parse_message(first).transaction_id != stun.parse_message(second).transaction_id
    assert check.receive(answer(second, XOR_MAPPED_ADDRESS=("198.51.100.7", 40000)),
                         SERVER.address, 0.27)
    assert check.done and check.probe.error is None
    assert check.probe.rtt == pytest.approx(0.02)
    assert check.probe.mapped == ("198.51.100.7", 40000)
    assert check.next_time() is None and check.outgoing(1.0) == []


def test_answers_from_elsewhere_or_to_nothing_we_sent_are_ignored():
    check = BindingCheck(Probe(SERVER, "udp"), now=0.0).start(0.0)
    [request] = check.outgoing(0.0)
    good = answer(request, XOR_MAPPED_ADDRESS=("198.51.100.7", 40000))
    other = bytes(stun.Message(stun.Method.BINDING, stun.Class.RESPONSE))
    assert not check.receive(good, ("192.0.2.66", 3478), 0.01)     # spoofed source
    assert not check.receive(other, SERVER.address, 0.01)            # unknown transaction
    assert not check.receive(b"\x00\x01garbage", SERVER.address, 0.01)
    assert not check.receive(b"", SERVER.address, 0.01)
    assert not check.done
    assert check.receive(good, SERVER.address, 0.02) and check.done


def test_an_error_answer_is_reported():
    check = BindingCheck(Probe(SERVER, "udp"), now=0.0).start(0.0)
    [request] = check.outgoing(0.0)
    check.receive(answer(request, stun.Class.ERROR, ERROR_CODE=(400, "Bad Request")),
                  SERVER.address, 0.01)
    assert check.done and check.probe.error == "answered with an error: 400 Bad Request"
    assert check.probe.answered


def test_tcp_sends_each_request_once():
    check = BindingCheck(Probe(SERVER, "tcp"), now=0.0, reliable=True).start(0.0)
    assert len(check.outgoing(0.0)) == 1
    assert check.outgoing(1.0) == [] and check.next_time() == TIMEOUT


def turn_exchange(password: str, server_password: str = "alice-pw"):
    """Drive an AllocateCheck against a scripted TURN server; returns the check and the
    requests it sent."""
    check = AllocateCheck(Probe(TURN, "udp"), now=0.0, username="alice",
                          password=password).start(0.0)
    key = make_integrity_key("alice", REALM, server_password)
    sent = []
    now = 0.0
    for _ in range(3):
        [request] = check.outgoing(now)
        sent.append(stun.parse_message(request))
        now += 0.01
        message = sent[-1]
        if "USERNAME" not in message.attributes:
            reply = answer(request, stun.Class.ERROR, ERROR_CODE=(401, "Unauthorized"),
                           REALM=REALM, NONCE=b"n1")
        elif not message.check_message_integrity(key):
            reply = answer(request, stun.Class.ERROR, ERROR_CODE=(401, "Unauthorized"),
                           REALM=REALM, NONCE=b"n2")
        elif message.message_method == stun.Method.ALLOCATE:
            reply = answer(request, key=key, XOR_RELAYED_ADDRESS=("203.0.113.9", 50000),
                           XOR_MAPPED_ADDRESS=("198.51.100.7", 40000), LIFETIME=60)
        else:
            reply = answer(request, key=key, LIFETIME=0)
        assert check.receive(reply, TURN.address, now)
        if check.done:
            break
    return check, sent


def test_turn_allocation_with_the_sip_credentials_is_made_and_deleted():
    check, sent = turn_exchange("alice-pw")
    assert [m.message_method for m in sent] == [stun.Method.ALLOCATE, stun.Method.ALLOCATE,
                                               stun.Method.REFRESH]
    assert sent[1].attributes["USERNAME"] == "alice" and sent[1].attributes["REALM"] == REALM
    assert sent[2].attributes["LIFETIME"] == 0
    probe = check.probe
    assert check.done and probe.error is None and probe.credentials == "accepted"
    assert probe.relayed == ("203.0.113.9", 50000) and probe.mapped == ("198.51.100.7", 40000)
    # the key is the SIP HA1, as coturn stores it
    assert make_integrity_key("alice", REALM, "alice-pw").hex() == \
        compute_ha1("alice", REALM, "alice-pw")


def test_turn_refusing_the_password_is_told_apart_from_no_answer():
    check, sent = turn_exchange("wrong")
    assert len(sent) == 2 and check.done
    assert check.probe.credentials == "refused" and check.probe.relayed is None
    assert check.probe.error == "credentials refused (401 Unauthorized)"


def test_turn_without_credentials_says_it_wants_them():
    check = AllocateCheck(Probe(TURN, "udp"), now=0.0, username=None, password=None).start(0.0)
    [request] = check.outgoing(0.0)
    check.receive(answer(request, stun.Class.ERROR, ERROR_CODE=(401, "Unauthorized"),
                         REALM=REALM, NONCE=b"n"), TURN.address, 0.01)
    assert check.done and check.probe.credentials == "missing"


def test_an_unsigned_success_after_we_signed_is_not_believed():
    check = AllocateCheck(Probe(TURN, "udp"), now=0.0, username="alice",
                          password="alice-pw").start(0.0)
    [request] = check.outgoing(0.0)
    check.receive(answer(request, stun.Class.ERROR, ERROR_CODE=(401, "Unauthorized"),
                         REALM=REALM, NONCE=b"n"), TURN.address, 0.01)
    [signed] = check.outgoing(0.01)
    forged = answer(signed, XOR_RELAYED_ADDRESS=("192.0.2.1", 1), LIFETIME=60)
    check.receive(forged, TURN.address, 0.02)
    assert not check.done and check.probe.relayed is None


# ----------------------------------------------------------------------- the verdict


def probe(role: str, address: tuple[str, int], transport: str = "udp", mapped=None,
          rtt: float | None = 0.01, **kw) -> Probe:
    return Probe(Server(role, f"{address[0]}:{address[1]}", address), transport, rtt=rtt,
                 mapped=mapped, **kw)


def test_the_same_mapping_towards_two_servers_is_endpoint_independent():
    probes = [probe("sip", ("203.0.113.2", 5060), mapped=("203.0.113.5", 40000)),
              probe("stun", ("203.0.113.3", 3478), mapped=("203.0.113.5", 40000))]
    report = summarise([p.server for p in probes], probes, ("10.1.0.2", 40000))
    assert (report.udp, report.mapping) == ("works", "endpoint-independent")
    assert report.public == [("203.0.113.5", 40000)]
    assert "direct sessions with peers behind NAT work" in report.verdict[0]


def test_another_port_per_server_is_per_destination():
    probes = [probe("sip", ("203.0.113.2", 5060), mapped=("203.0.113.5", 40000)),
              probe("stun", ("203.0.113.3", 3478), mapped=("203.0.113.5", 61234))]
    report = summarise([p.server for p in probes], probes, ("192.168.1.2", 40000))
    assert report.mapping == "per-destination"
    assert "symmetric" in report.verdict[0]
    assert any("--turn" in a for a in report.advice)


def test_our_own_address_means_no_nat_and_one_server_tells_no_mapping():
    own = [probe("stun", ("203.0.113.3", 3478), mapped=("203.0.113.7", 40000))]
    assert summarise([], own, ("203.0.113.7", 40000)).mapping == "none"
    behind = summarise([], own, ("10.0.0.2", 40000))
    assert behind.mapping == "unknown" and any("--stun" in a for a in behind.advice)


def test_only_the_relay_over_tcp_answering_means_udp_is_blocked():
    probes = [probe("sip", ("203.0.113.2", 5060), rtt=None, error="no answer within 2.5 s"),
              probe("turn", ("203.0.113.2", 3478), rtt=None, error="no answer within 2.5 s"),
              probe("turn", ("203.0.113.2", 3478), "tcp", relayed=("203.0.113.2", 50000),
                    credentials="accepted")]
    report = summarise([], probes, ("10.0.0.2", 40000))
    assert report.udp == "blocked" and report.relay == {"udp": "unreachable", "tcp": "works"}
    assert "UDP is blocked" in report.verdict[0]
    assert "the relay works over TCP with our credentials" in report.verdict


def test_nothing_answering_says_what_to_check():
    report = summarise([], [probe("stun", ("203.0.113.3", 3478), rtt=None)], None)
    assert report.udp == "unknown" and not report.anything_answered
    assert report.advice


# ----------------------------------------------------------------------- loopback, real servers


@pytest.fixture
def stun_responder():
    proc = subprocess.Popen([sys.executable, PROBE, "stun", "0"], stdout=subprocess.PIPE,
                            text=True)
    try:
        yield ("127.0.0.1", json.loads(proc.stdout.readline())["ready"])
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def relay(coturn):
    return coturn("127.0.0.1", realm=REALM,
                  users={"alice": compute_ha1("alice", REALM, "alice-pw")})


async def test_loopback_sees_our_own_address_and_a_working_relay(stun_responder, relay):
    config = NetcheckConfig(sip_server=f"127.0.0.1:{stun_responder[1]}",
                            stun_servers=(f"127.0.0.1:{relay.port}",),
                            turn_server=f"127.0.0.1:{relay.port}", turn_username="alice",
                            turn_password="alice-pw")
    report = await netcheck(config)
    assert (report.udp, report.mapping) == ("works", "none"), report.to_json()
    assert report.relay == {"udp": "works", "tcp": "works"}
    assert [p.mapped for p in report.probes if p.transport == "udp"] == [report.local] * 3
    assert all(p.rtt is not None and p.rtt < 1 for p in report.probes)


async def test_a_silent_server_is_given_up_on_in_time():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        started = time.monotonic()
        report = await netcheck(NetcheckConfig(stun_servers=(
            f"127.0.0.1:{silent.getsockname()[1]}",), timeout=0.8))
        assert time.monotonic() - started < 1.5
        assert len(silent.recv(2048)) >= 20            # it was asked
    assert report.probes[0].error == "no answer within 0.8 s"
    assert report.udp == "unknown" and not report.anything_answered


async def test_a_name_that_does_not_resolve_says_so():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as dns:   # a DNS server that is mute
        dns.bind(("127.0.0.1", 0))
        config = NetcheckConfig(stun_servers=("stun.sipmesh.invalid",), timeout=0.5,
                                nameservers=(dns.getsockname(),))
        report = await netcheck(config)
    assert report.servers[0].address is None
    assert report.advice[0].startswith("stun server stun.sipmesh.invalid: ")
    assert "check the name" in report.advice[0]


def netcheck_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([SIPMESH, "netcheck", *args], capture_output=True, text=True,
                          timeout=20, env=env)


def test_cli_json_and_table(stun_responder, relay, tmp_path):
    creds = tmp_path / "creds"
    creds.write_text("password = alice-pw\n")
    creds.chmod(0o600)
    common = ["--server", f"127.0.0.1:{stun_responder[1]}", "--turn", f"127.0.0.1:{relay.port}",
              "--user", "alice", "--credentials", str(creds)]
    result = netcheck_cli(*common, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["udp"] == "works" and report["relay"] == {"udp": "works", "tcp": "works"}
    assert result.stderr == ""          # no progress lines when stderr is not a terminal
    table = netcheck_cli(*common).stdout
    assert "UDP:      works" in table and "credentials accepted" in table
    assert "alice-pw" not in table + result.stdout


def test_cli_shows_progress_on_a_terminal(stun_responder):
    master, slave = pty.openpty()
    try:
        result = subprocess.run([SIPMESH, "netcheck", "--stun", f"127.0.0.1:{stun_responder[1]}"],
                                stdout=subprocess.PIPE, stderr=slave, text=True, timeout=20)
        os.close(slave)
        slave = -1
        shown = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:   # EIO: the terminal's other end is closed and read out
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert result.returncode == 0
    assert b"sipmesh netcheck: asking 1 server (at most 2.5 s)..." in shown
    assert "UDP:      works" in result.stdout


def test_cli_without_any_server_says_what_to_give():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIPMESH_")}
    result = netcheck_cli(env=env)
    assert result.returncode == 2
    assert "give --server HOST[:PORT]" in result.stderr and "--stun" in result.stderr


def test_cli_exits_4_when_nobody_answers():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        result = netcheck_cli("--stun", f"127.0.0.1:{silent.getsockname()[1]}",
                              "--timeout", "0.5")
    assert result.returncode == 4
    assert "no server answered" in result.stdout and "next:" in result.stdout


# ----------------------------------------------------------------------- the NAT lab


@pytest.fixture
def lab(nat_lab, coturn, tmp_path):
    """broker (a STUN responder on its SIP port 5060), relay (coturn: STUN and TURN on
    3478), a home host a, s behind a symmetric NAT, u behind a router that drops UDP."""
    nat_lab.add_hosts({"broker": "public", "relay": "public", "a": "home", "s": "symmetric",
                       "u": "udp_blocked"})
    responder = nat_lab.popen("broker", [sys.executable, PROBE, "stun", "5060"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert json.loads(responder.stdout.readline()) == {"ready": 5060}
        relay_host = nat_lab["relay"]
        coturn(relay_host.ip, netns=relay_host.ns, realm=REALM,
               users={"alice": compute_ha1("alice", REALM, "alice-pw")})
        creds = tmp_path / "alice.creds"
        creds.write_text("user = alice\npassword = alice-pw\n")
        creds.chmod(0o600)
        nat_lab.creds = creds
        yield nat_lab
    finally:
        responder.kill()
        responder.wait()


def check_from(lab, host: str, *extra: str) -> tuple[dict, float]:
    relay = lab["relay"].ip
    started = time.monotonic()
    result = lab.run(host, [SIPMESH, "netcheck", "--server", f"{lab['broker'].ip}",
                            "--stun", relay, "--turn", relay, "--credentials", str(lab.creds),
                            "--json", *extra], check=False, timeout=20)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr + result.stdout
    return json.loads(result.stdout), elapsed


@pytest.mark.netns
def test_home_host_sees_endpoint_independent_mapping(lab):
    report, _ = check_from(lab, "a")
    assert report["udp"] == "works" and report["mapping"] == "endpoint-independent", report
    [public] = report["public"]
    assert public.split(":")[0] == lab["a"].public_ip
    assert report["relay"] == {"udp": "works", "tcp": "works"}
    relayed = [p["relayed"] for p in report["probes"] if p["role"] == "turn"]
    assert all(r.startswith(lab["relay"].ip + ":") for r in relayed)


@pytest.mark.netns
def test_symmetric_host_sees_per_destination_mapping(lab):
    report, _ = check_from(lab, "s")
    assert report["mapping"] == "per-destination", report
    hosts = {a.split(":")[0] for a in report["public"]}
    assert hosts == {lab["s"].public_ip} and len(report["public"]) >= 2
    assert any("symmetric" in v for v in report["verdict"])


@pytest.mark.netns
def test_udp_blocked_host_sees_udp_blocked_and_the_relay_over_tcp(lab):
    report, elapsed = check_from(lab, "u")
    assert report["udp"] == "blocked", report
    assert report["relay"] == {"udp": "unreachable", "tcp": "works"}
    assert any("UDP is blocked" in v for v in report["verdict"])
    assert elapsed < 5 + 1.5          # ~5 s budget, plus the interpreter's start


@pytest.mark.netns
def test_home_host_table_for_a_person(lab):
    result = lab.run("a", [SIPMESH, "netcheck", "--server", f"{lab['broker'].ip}:5060",
                           "--stun", f"{lab['relay'].ip}:3478"], timeout=20)
    assert "mapping:  endpoint-independent" in result.stdout
    assert f"public:   {lab['a'].public_ip}:" in result.stdout
    assert "relay:    not checked" in result.stdout
