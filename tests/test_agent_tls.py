"""TLS between the agents and the SIP server, as real processes: our broker with a
certificate signed by a test CA; `sipmesh serve`, `call`, `sip_app`, the daemon and
`call --service` verifying it; refusals (another CA, another name) with their message
and exit status; a client certificate shown to a server that demands one (openssl)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from sipmesh.agent.errors import Exit
from tests.lab import free_port, spawn, wait_for, wait_tcp_listening
from tests.lab.agents import (SIP_APP, SIPMESH, agent_argv, app_argv, no_orphans,  # noqa: F401
                              record, wait_exit, wait_ready)
from tests.lab.broker import start_broker
from tests.lab.certs import LabCA, make_ca
from tests.lab.fixtures import stopped_gracefully
from tests.peers.daemon import web_forward_config

pytestmark = pytest.mark.slow  # real broker and agent processes


@dataclass
class TLSBroker:
    port: int  # UDP and TCP; TLS on port + 1
    db: Path
    ca: LabCA

    @property
    def tls_port(self) -> int:
        return self.port + 1

    def server(self, host: str = "localhost") -> str:
        return f"sips:{host}:{self.tls_port}"

    def transport_of(self, user: str) -> str | None:
        """The transport of `user`'s binding at the broker, None if not registered."""
        from sipmesh.broker.location import LocationService

        location = LocationService(self.db)
        try:
            for aor in (f"sip:{user}@localhost", f"sip:{user}@127.0.0.1"):
                bindings = location.lookup(aor)
                if bindings:
                    return bindings[0].transport
            return None
        finally:
            location.close()


def _tcp_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture
def pki(tmp_path: Path) -> LabCA:
    ca = make_ca(tmp_path / "pki")
    ca.issue(tmp_path / "pki", "broker", ["localhost"])  # a name only: 127.0.0.1 is not in it
    return ca


@pytest.fixture
def broker(tmp_path: Path, pki: LabCA):
    port = free_port("both")
    while not _tcp_free(port + 1):
        port = free_port("both")
    run = tmp_path / "broker"
    run.mkdir()
    proc, _ = start_broker(run, port=port, db=run / "b.db", extra=[
        "--transport", "udp,tcp,tls", "--domain", "localhost",
        "--tls-cert", str(tmp_path / "pki" / "broker.crt"),
        "--tls-key", str(tmp_path / "pki" / "broker.key")])
    wait_tcp_listening("127.0.0.1", port + 1, None, 15, proc=proc)
    yield TLSBroker(port, run / "b.db", pki)
    proc.stop(grace=5)


@pytest.fixture
def agents(broker, spawn_proc):
    """Agent processes, stopped (and unregistered) before the broker is."""
    with stopped_gracefully(spawn_proc) as start:
        yield start


def run_agent(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------- registration and calls


def test_a_tls_registration_and_a_call_through_the_broker(broker, agents, tmp_path):
    ca = str(broker.ca.cert)
    # the answering program ends the session: BYE goes to the caller, over its own connection
    serve = agents(agent_argv("serve", broker.server(), "bob", "--ca-file", ca, "--once",
                              program=app_argv(tmp_path, "exit", 1.0)), name="serve")
    wait_ready(serve)
    assert broker.transport_of("bob") == "TLS"
    assert ";transport=tls" in serve.log_text()
    call = agents(agent_argv("call", broker.server(), "alice", "--ca-file", ca, target="bob",
                             program=app_argv(tmp_path, "run")), name="call")
    assert wait_exit(call) == 0, call.log_tail(30)
    assert "the peer ended the session" in call.log_text()
    assert record(tmp_path, "server") and record(tmp_path, "client")
    assert (tmp_path / "client.stopped").exists()  # our program was stopped on the BYE
    # serve saw the ACK (established) over its connection, then ended and unregistered
    assert wait_exit(serve) == 0, serve.log_tail(30)
    assert "session established with sip:alice@" in serve.log_text()
    assert broker.transport_of("bob") is None


def test_sip_app_talks_tls_to_a_sips_proxy(broker, agents, tmp_path):
    env = {**os.environ, "SIPMESH_CA_FILE": str(broker.ca.cert)}
    serve = agents(agent_argv("serve", broker.server(), "2500", "--ca-file", str(broker.ca.cert),
                              "--once", "--vpn", "--append-args",
                              program=app_argv(tmp_path, "run")), name="serve")
    wait_ready(serve)
    client = agents([SIP_APP, "-s", broker.server(), "-u", "2501", "-p", str(free_port("both")),
                     "-t", "2500",
                     "-m", *app_argv(tmp_path, "exit", 0.5)], env=env, name="sip_app")
    assert wait_exit(client) == 0, client.log_tail(30)
    assert "PROXY sips:localhost:" in client.log_text()
    assert record(tmp_path, "client")["argv"][-4] == "127.0.0.1"  # IP4 PORT VPN_LOCAL VPN_REMOTE
    assert wait_exit(serve) == 0, serve.log_tail(30)


# ----------------------------------------------------------------- refused certificates


def test_a_certificate_from_another_ca_is_refused(broker, tmp_path):
    other = make_ca(tmp_path / "other", "another CA")
    for extra in (["--ca-file", str(other.cert)], []):  # a CA file; the system's trust store
        result = run_agent(*agent_argv("serve", broker.server(), "bob", *extra,
                                       program=["/bin/true"]))
        assert result.returncode == Exit.UNTRUSTED == 11, result.stderr
        message = result.stderr.strip().splitlines()[-1]
        assert message.startswith("sipmesh serve: refused the TLS certificate of the SIP server "
                                  f"localhost:{broker.tls_port}")
        assert "unable to get local issuer certificate" in message and "--ca-file" in message
    assert broker.transport_of("bob") is None


def test_a_certificate_for_another_name_is_refused(broker, agents, tmp_path):
    ca = str(broker.ca.cert)
    for server, extra in ((broker.server("127.0.0.1"), []),  # the certificate names localhost
                          (broker.server(), ["--tls-server-name", "sip.example.org"])):
        result = run_agent(*agent_argv("call", server, "alice", "--ca-file", ca, *extra,
                                       target="bob", program=["/bin/true"]))
        assert result.returncode == 11, result.stderr
        message = result.stderr.strip().splitlines()[-1]
        assert "refused the TLS certificate" in message and "--tls-server-name" in message
        assert "mismatch" in message
    # the name the certificate shows, for a server given by its address: accepted
    serve = agents(agent_argv("serve", broker.server("127.0.0.1"), "bob", "--ca-file", ca,
                              "--tls-server-name", "localhost", program=["/bin/true"]),
                   name="serve")
    wait_ready(serve)
    assert broker.transport_of("bob") == "TLS"


def test_tls_to_a_port_that_does_not_speak_it(broker, tmp_path):
    result = run_agent(*agent_argv("serve", f"sips:localhost:{broker.port}", "bob",
                                   "--ca-file", str(broker.ca.cert), program=["/bin/true"]))
    assert result.returncode == Exit.UNREACHABLE, result.stderr
    assert f"is {broker.port} its TLS port?" in result.stderr


# ----------------------------------------------------------------- the daemon


def test_the_daemon_and_call_service_over_tls(broker, tmp_path):
    config = tmp_path / "daemon.toml"
    text, http, local = web_forward_config(
        tmp_path, broker.server(), "hello over TLS signalling\n",
        agent=f'ca_file = "{broker.ca.cert}"\ncontrol_socket = "{tmp_path / "home.sock"}"\n')
    config.write_text(text)
    daemon = spawn([SIPMESH, "daemon", "-c", str(config), "-v"], log_path=tmp_path / "daemon.log",
                   name="daemon")
    try:
        wait_for(lambda: "ready as sip:home@" in daemon.log_text(), 15, what="the daemon",
                 abort=daemon.exit_reason)
        assert broker.transport_of("home") == "TLS"
        # the calling half: server and TLS settings from the same file, another identity
        caller = spawn([SIPMESH, "call", "home", "--service", "web", "-c", str(config),
                        "--user", "alice", "--bind", "127.0.0.1", "--advertise", "127.0.0.1",
                        "-v"], log_path=tmp_path / "caller.log", name="caller")
        try:
            wait_for(lambda: f"reachable at 127.0.0.1:{local}" in caller.log_text(), 20,
                     what="the forward's local port", abort=caller.exit_reason)
            with urllib.request.urlopen(f"http://127.0.0.1:{local}/hello.txt", timeout=20) as r:
                assert r.read() == b"hello over TLS signalling\n"
        finally:
            caller.stop(grace=10)
    finally:
        daemon.stop(grace=15)
        http.stop(grace=2)
    assert daemon.returncode == 0, daemon.log_tail(30)

    # another CA in the file: the daemon refuses to start (a certificate is not a glitch
    # to wait out, as an unreachable server is)
    other = make_ca(tmp_path / "other", "another CA")
    config.write_text(text.replace(str(broker.ca.cert), str(other.cert)))
    result = run_agent(SIPMESH, "daemon", "-c", str(config))
    assert result.returncode == 11, result.stderr
    assert "refused the TLS certificate" in result.stderr


# ----------------------------------------------------------------- client certificates


@pytest.mark.skipif(shutil.which("openssl") is None or shutil.which("stdbuf") is None,
                    reason="needs the openssl tool and stdbuf")
def test_a_client_certificate_for_a_server_that_demands_one(tmp_path, pki):
    """openssl s_server demands a certificate signed by the CA (-Verify) and prints what
    it receives: our REGISTER, after a handshake with our --cert. (It serves one
    connection, so each attempt gets its own.)"""
    pki_dir = tmp_path / "pki"
    client = pki.issue(pki_dir, "alice", ["alice.test"], client=True)

    def attempt(name: str, *extra: str):  # type: ignore[no-untyped-def]
        port = free_port("tcp")
        log = tmp_path / f"{name}.log"
        # (s_server quits when its stdin ends: it gets a pipe that stays open; stdbuf: its
        # output reaches the log line by line)
        server = subprocess.Popen(
            ["stdbuf", "-oL", "openssl", "s_server", "-accept", f"127.0.0.1:{port}",
             "-cert", str(pki_dir / "broker.crt"), "-key", str(pki_dir / "broker.key"),
             "-CAfile", str(pki.cert), "-Verify", "1", "-verify_return_error", "-ign_eof"],
            stdin=subprocess.PIPE, stdout=log.open("w"), stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: "ACCEPT" in log.read_text(), 10, what="s_server listening",
                     abort=lambda: None if server.poll() is None else "s_server exited")
            result = run_agent(*agent_argv("serve", f"sips:localhost:{port}", "alice",
                                           "--ca-file", str(pki.cert), "--register-timeout",
                                           "3", *extra, program=["/bin/true"]))
            wait_for(lambda: any(end in log.read_text() for end in ("REGISTER", "ERROR")),
                     10, what="s_server done with the connection")
            return result, log.read_text()
        finally:
            server.kill()
            server.wait(5)

    # without a certificate: refused (TLS 1.3: after the handshake, so the REGISTER goes
    # unanswered), and the log says why
    result, seen = attempt("no-cert")
    assert result.returncode == Exit.UNREACHABLE, result.stderr
    assert "the server closed our connection tls:127.0.0.1:" in result.stderr
    assert "certificate required" in result.stderr
    assert "REGISTER" not in seen
    # with one: the server takes it and reads our REGISTER (it never answers)
    result, seen = attempt("cert", "--cert", str(client.cert), "--key", str(client.key))
    assert result.returncode == Exit.UNREACHABLE, result.stderr
    assert "did not answer our REGISTER" in result.stderr
    assert "subject=CN = alice.test" in seen and "REGISTER sip:localhost:" in seen
