"""An agent given only a domain finds its servers by DNS SRV (issue 13: RFC 3263 §4.2):
`sipmesh serve --server example.test` registers at both SRV targets with one
+sip.instance; with the first (priority 10) SIGKILLed a `sipmesh call --server
example.test` reaches it through the second; the killed broker, started again, serves a
call when the other one is killed in turn. Real DNS (dnsmasq, the namespace's
resolv.conf), real `sipmesh broker` processes: tests/lab/srvlab.py."""

from __future__ import annotations

import time

import pytest

from tests.lab import dnsmasq_unavailable_reason, free_port, wait_for
from tests.lab.agents import agent_argv, agents, app_argv, record, wait_ready  # noqa: F401
from tests.lab.srvlab import DOMAIN, SrvLab

pytestmark = [pytest.mark.slow, pytest.mark.netns]

FAILOVER_BOUND = 8.0  # s from SIGKILL to the session through the survivor (bench/failover.py
# measures it; ~2 s of it is UAConfig.failover_wait, the silence that declares a server down)


@pytest.fixture
def srv_lab(netns_factory, tmp_path):
    reason = dnsmasq_unavailable_reason()
    if reason:
        pytest.skip(reason)
    lab = SrvLab(netns_factory, tmp_path / "srv")
    yield lab
    lab.close()


def call(agents, lab, tmp_path, caller: str, n: int):
    """`sipmesh call 2500` from `caller` given only the domain; its programs write
    tmp_path/run-N/{client,server}.json."""
    for name in ("client.json", "server.json"):
        (tmp_path / name).unlink(missing_ok=True)
    return agents(agent_argv("call", DOMAIN, caller, "--register-timeout", "2",
                             target="2500", program=app_argv(tmp_path, "exit", 0.2)),
                  name=f"call{n}", netns=lab.ns)


def session_up(tmp_path) -> bool:
    return bool(record(tmp_path, "client") and record(tmp_path, "server"))


def test_agent_finds_both_brokers_by_srv_and_fails_over_between_them(srv_lab, agents, tmp_path):
    lab = srv_lab
    serve = agents(agent_argv("serve", DOMAIN, "2500", "--state-dir", str(tmp_path / "state"),
                              "--app-port", str(free_port()), program=app_argv(tmp_path, "run")),
                   name="serve", netns=lab.ns)
    wait_ready(serve)
    wait_for(lambda: all(b.registered("2500") for b in lab.brokers.values()), 10,
             what="2500 registered at both SRV targets", abort=serve.exit_reason)
    log = serve.log_text()
    assert (f"SIP servers of {DOMAIN} by DNS SRV: b1.{DOMAIN} ({lab.server('b1')}), "
            f"b2.{DOMAIN} ({lab.server('b2')})") in log
    assert (tmp_path / "state" / "instance-id").exists()  # one +sip.instance for both

    killed = lab.kill("b1")  # the first by priority
    first = call(agents, lab, tmp_path, "2501", 1)
    wait_for(lambda: session_up(tmp_path), 20, what="session through b2",
             abort=first.exit_reason)
    elapsed = time.monotonic() - killed
    print(f"failover: session through b2 {elapsed:.2f} s after SIGKILL of b1")
    assert elapsed < FAILOVER_BOUND, elapsed
    assert f"the SIP server {lab.server('b1')} failed (408" in first.log_text()

    # the caller's program exits: BYE (through b2), the serve agent is free again
    assert first.wait(10) == 0
    wait_for(lambda: "serve: session ended" in serve.log_text(), 10, what="serve's session ended")
    # b1 back on its database; b2 killed: the next call goes through b1
    lab.restart("b1")
    lab.kill("b2")
    second = call(agents, lab, tmp_path, "2502", 2)
    wait_for(lambda: session_up(tmp_path), 20, what="session through the restarted b1",
             abort=second.exit_reason)
    assert lab.brokers["b1"].registered("2502")
