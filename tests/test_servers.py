"""Several SIP servers per agent (issue 13 item 1): `sipmesh serve --server A --server B`
registers at both with one +sip.instance, each registration on its own; with A SIGKILLed,
a `sipmesh call` given both still reaches the serve agent through B. Real processes, two
`sipmesh broker`s on loopback."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from tests.lab import free_port, wait_for
from tests.lab.agents import agent_argv, agents, app_argv, record, wait_ready  # noqa: F401
from tests.lab.broker import BrokerServer

pytestmark = pytest.mark.slow

FAILOVER_BOUND = 6.0  # s from SIGKILL of A to the session through B (bench/failover.py)


@pytest.fixture
def two_brokers(tmp_path):
    brokers = [BrokerServer(tmp_path / "broker-a"), BrokerServer(tmp_path / "broker-b")]
    yield brokers
    for broker in brokers:
        broker.stop()


def test_serve_registers_at_both_and_a_call_fails_over_when_one_is_killed(
        two_brokers, agents, tmp_path):
    a, b = two_brokers
    serve = agents(agent_argv("serve", a.hostport, "2500", "--server", b.hostport,
                              "--state-dir", str(tmp_path / "state-serve"),
                              "--app-port", str(free_port()), program=app_argv(tmp_path, "run")),
                   name="serve")
    wait_ready(serve)
    wait_for(lambda: a.registered("2500") and b.registered("2500"), 10,
             what="2500 registered at both brokers", abort=serve.exit_reason)
    instance = (tmp_path / "state-serve" / "instance-id").read_text().strip()
    assert re.fullmatch(r"[0-9a-f-]{36}", instance)

    os.kill(a.proc.popen.pid, signal.SIGKILL)
    a.proc.stop()
    killed = time.monotonic()
    call = agents(agent_argv("call", a.hostport, "2501", "--server", b.hostport,
                               "--register-timeout", "2", target="2500",
                               program=app_argv(tmp_path, "run")), name="call")
    wait_for(lambda: record(tmp_path, "client") and record(tmp_path, "server"), 20,
             what="session up through B", abort=call.exit_reason)
    elapsed = time.monotonic() - killed
    print(f"failover: session through B {elapsed:.2f} s after SIGKILL of A")
    assert elapsed < FAILOVER_BOUND, elapsed
    # its REGISTER at A went unanswered while B's was accepted: the INVITE went to B at
    # once (a caller that knows nothing yet pays UAConfig.failover_wait: tests/test_srv.py)
    assert f"calling sip:2500@{b.hostport}" in call.log_text()
    # the call agent's registration at A fails on its own; B's is fine
    wait_for(lambda: f"the SIP server {a.hostport} did not answer our REGISTER" in
             call.log_text(), 10, what="A's registration failing in the log")
    assert b.registered("2501")
