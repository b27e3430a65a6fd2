"""`sipmesh ping` on loopback against our broker (the NAT lab's pings are in
tests/test_ice_sessions.py): an agent answers a ping while it is busy in a session, without
starting a program; an agent with ICE off refuses it with a reason and exit status 9."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.lab import wait_for
from tests.lab.agents import (SIPMESH, agent_argv, agents, app_argv, no_orphans,  # noqa: F401
                              record, wait_exit, wait_ready)
from tests.lab.broker import BrokerServer

pytestmark = pytest.mark.slow  # real agent processes and our broker


def ping(server: str, target: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([SIPMESH, "ping", target, "--server", server, "--user", "2599",
                           "-c", "2", "-i", "0.1", *extra],
                          capture_output=True, text=True, timeout=60)


def test_a_busy_agent_answers_a_ping_and_an_agent_without_ice_refuses_it(agents, tmp_path):
    broker = BrokerServer(tmp_path / "broker")
    try:
        serve = agents(agent_argv("serve", broker.hostport, "2500",
                                  program=app_argv(tmp_path, "run")), name="serve")
        wait_ready(serve)
        call = agents(agent_argv("call", broker.hostport, "2501", target="2500",
                                 program=app_argv(tmp_path, "run")), name="call")
        wait_for(lambda: record(tmp_path, "client") and record(tmp_path, "server"), 10,
                 what="session up", abort=call.exit_reason)

        program = record(tmp_path, "server")["pid"]
        out = ping(broker.hostport, "2500", "--json")
        assert out.returncode == 0, out.stdout + out.stderr
        data = json.loads(out.stdout)
        assert data["via"] == "direct (host)" and data["answered"] == 2, data
        assert data["path"]["local"].startswith("host 127.0.0.1:"), data
        assert 0 < data["rtt"]["min"] <= data["rtt"]["max"] < 2, data
        # the session went on, and the ping started no program of its own
        assert call.alive() and serve.alive() and record(tmp_path, "server")["pid"] == program
        assert serve.log_text().count("started (pid") == 1, serve.log_text()

        plain = agents(agent_argv("serve", broker.hostport, "2600", "--no-ice",
                                  program=["sleep", "60"]), name="plain")
        wait_ready(plain)
        out = ping(broker.hostport, "2600")
        assert out.returncode == 9, out.stdout + out.stderr
        assert "refused the session (488" in out.stderr and "ping needs ICE" in out.stderr, \
            out.stderr
        assert "started (pid" not in plain.log_text()
        for proc in (call, serve, plain):
            proc.popen.terminate()
            assert wait_exit(proc) == 0, proc.log_text()
    finally:
        broker.stop()
