"""An agent given only a domain finds its servers by DNS SRV (issue 13: RFC 3263 §4.2):
`sipmesh serve --server example.test` registers at both SRV targets with one
+sip.instance; with the first (priority 10) SIGKILLed a `sipmesh call --server
example.test` reaches it through the second; the killed broker, started again, serves a
call when the other one is killed in turn; records changed under a running agent are
followed once their TTL has run out. Real DNS (dnsmasq, the namespace's
resolv.conf), real `sipmesh broker` processes: tests/lab/srvlab.py."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from sipmesh.agent.endpoint import SRV_RETRY
from tests.lab import dnsmasq_unavailable_reason, free_port, spawn, wait_for
from tests.lab.agents import SIPMESH, agent_argv, agents, app_argv, record, wait_ready  # noqa: F401
from tests.peers.daemon import RECORDER, config_text
from tests.lab.srvlab import DOMAIN, SrvLab

pytestmark = [pytest.mark.slow, pytest.mark.netns]

FAILOVER_BOUND = 8.0  # s from SIGKILL to the session through the survivor for a caller that
# knows nothing of the loss (bench/failover.py measures it; ~2 s of it is
# UAConfig.failover_wait, the silence that declares a server down)


@pytest.fixture
def srv_lab(netns_factory, tmp_path):
    reason = dnsmasq_unavailable_reason()
    if reason:
        pytest.skip(reason)
    lab = SrvLab(netns_factory, tmp_path / "srv")
    yield lab
    lab.close()


@pytest.fixture
def changing_srv_lab(netns_factory, tmp_path):
    """The SRV records name b1 only, every record lives 2 s."""
    reason = dnsmasq_unavailable_reason()
    if reason:
        pytest.skip(reason)
    lab = SrvLab(netns_factory, tmp_path / "srv", listed=("b1",), ttl=SHORT_TTL)
    yield lab
    lab.close()


SHORT_TTL = 2   # s


def call(agents, lab, tmp_path, caller: str, n: int, *options: str, target: str = "2500"):
    """`sipmesh call TARGET` from `caller` given only the domain; its programs write
    tmp_path/{client,server}.json."""
    for name in ("client.json", "server.json"):
        (tmp_path / name).unlink(missing_ok=True)
    return agents(agent_argv("call", DOMAIN, caller, *options, target=target,
                             program=app_argv(tmp_path, "exit", 0.2)),
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

    # a caller that knows nothing of the loss (no REGISTER of its own, as a long-running
    # agent registered before it): b1, the first by priority, is silent for
    # failover_wait, then b2 (the callee named in the domain, as well as by its bare name)
    killed = lab.kill("b1")
    first = call(agents, lab, tmp_path, "2501", 1, "--no-register", target=f"2500@{DOMAIN}")
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
    # this caller registers: b2 does not answer where b1 did, so the INVITE goes to b1 at once
    second = call(agents, lab, tmp_path, "2502", 2, "--register-timeout", "2")
    wait_for(lambda: session_up(tmp_path), 20, what="session through the restarted b1",
             abort=second.exit_reason)
    assert lab.brokers["b1"].registered("2502")
    assert f"calling sip:2500@{lab.server('b1')}" in second.log_text()
    assert "failed (408" not in second.log_text()


def test_daemon_finds_its_servers_by_srv_and_status_shows_each(srv_lab, tmp_path):
    """`server = "example.test"` in the daemon's file: both SRV targets; with b1 down the
    daemon still starts, and `sipmesh status` shows b1 failing (and why), b2 registered
    with its last success and next refresh."""
    lab = srv_lab
    lab.kill("b1")
    out = tmp_path / "out"
    out.mkdir()
    (out / "recorder.py").write_text(RECORDER)
    socket_path = tmp_path / "home.sock"
    config = tmp_path / "daemon.toml"
    config.write_text(config_text(DOMAIN, out).replace(
        "grace = 2\n", f'grace = 2\nregister_timeout = 1\ncontrol_socket = "{socket_path}"\n', 1))
    daemon = spawn([SIPMESH, "daemon", "-c", str(config), "-v"], log_path=tmp_path / "daemon.log",
                   name="daemon", netns=lab.ns)
    try:
        wait_for(lambda: "ready as sip:home@" in daemon.log_text(), 15, what="the daemon",
                 abort=daemon.exit_reason)

        def status() -> dict:
            result = subprocess.run([SIPMESH, "status", "--socket", str(socket_path), "--json"],
                                    capture_output=True, text=True, timeout=20)
            return json.loads(result.stdout)

        def by_server() -> dict:
            return {r["server"]: r for r in status()["registrations"]}

        registrations = wait_for(lambda: (lambda r: r if r.get(lab.server("b1"), {}).get(
            "state") == "failing" else None)(by_server()), 10, what="b1 failing in status")
        b1, b2 = registrations[lab.server("b1")], registrations[lab.server("b2")]
        assert b1["name"] == f"b1.{DOMAIN}" and b2["name"] == f"b2.{DOMAIN}"
        assert "did not answer our REGISTER" in b1["error"] and b1["last_success"] is None
        assert b2["state"] == "registered" and b2["error"] is None and b2["expires"] == 3600
        assert b2["last_success"] <= time.time() < b2["next_try"] and b1["next_try"] is not None
        assert b1["aor"] == b2["aor"] == f"sip:home@{DOMAIN}"
        table = subprocess.run([SIPMESH, "status", "--socket", str(socket_path)],
                               capture_output=True, text=True, timeout=20).stdout
        rows = {line.split()[1]: line for line in table.splitlines()
                if line.startswith(f"sip:home@{DOMAIN}")}
        assert set(rows) == {f"b1.{DOMAIN}", f"b2.{DOMAIN}"}, table
        assert " failing " in rows[f"b1.{DOMAIN}"] and " registered " in rows[f"b2.{DOMAIN}"]
    finally:
        daemon.stop(grace=15)
    assert daemon.returncode == 0, daemon.log_tail(30)


def test_a_running_session_survives_the_broker_it_was_routed_through(srv_lab, agents, tmp_path):
    """Issue 13 item 4: a session record-routed through b1 outlives b1's SIGKILL. Both
    agents probe the silent peer (--keepalive 2: noticed within 6 s); the caller then moves
    the session to a new dialog through b2 with Replaces (RFC 3891), the callee accepts it,
    the programs keep running, and the caller's BYE reaches the callee through b2."""
    lab = srv_lab
    serve = agents(agent_argv("serve", DOMAIN, "2500", "--keepalive", "2",
                              "--state-dir", str(tmp_path / "state"),
                              "--app-port", str(free_port()), program=app_argv(tmp_path, "run")),
                   name="serve", netns=lab.ns)
    wait_ready(serve)
    wait_for(lambda: all(b.registered("2500") for b in lab.brokers.values()), 10,
             what="2500 registered at both SRV targets", abort=serve.exit_reason)
    caller = agents(agent_argv("call", DOMAIN, "2501", "--keepalive", "2", target="2500",
                               program=app_argv(tmp_path, "run")), name="call", netns=lab.ns)
    wait_for(lambda: session_up(tmp_path), 20, what="the session (through b1)",
             abort=caller.exit_reason)
    # through the first SRV target, unless its REGISTER answer came late (then it goes last)
    through = [name for name in lab.brokers
               if f"session established with sip:2500@{lab.server(name)}" in caller.log_text()]
    assert len(through) == 1, caller.log_tail(30)

    lab.kill(through[0])
    wait_for(lambda: "the session goes on in dialog" in caller.log_text(), 20,
             what="the caller's Replaces accepted", abort=caller.exit_reason)
    assert "the peer moved the session to dialog" in serve.log_text()
    # both programs still run, nobody ended the session: and it stays so past the bound
    # nothing may happen now: wait one more K + W (6 s), in which the new dialog's probes
    # (through b2) must be answered, or the session would end
    time.sleep(6.5)
    for proc in (serve, caller):
        assert "session ended" not in proc.log_text(), proc.log_tail(20)
    assert not (tmp_path / "client.stopped").exists() and not (tmp_path / "server.stopped").exists()

    caller.stop(grace=10)  # SIGTERM: BYE in the new dialog, through b2
    wait_for(lambda: "serve: session ended: the peer ended the session (remote BYE)" in
             serve.log_text(), 10, what="the BYE at the callee")


def test_an_agent_follows_its_srv_records_when_they_change(changing_srv_lab, agents, tmp_path):
    """The domain's SRV records move from b1 to b2 (both brokers run): once the records'
    TTL has run out the running agent registers at b2 and leaves b1, without a restart;
    a new call by the domain's name then reaches it through b2."""
    lab = changing_srv_lab
    serve = agents(agent_argv("serve", DOMAIN, "2500", "--state-dir", str(tmp_path / "state"),
                              "--app-port", str(free_port()), program=app_argv(tmp_path, "run")),
                   name="serve", netns=lab.ns)
    wait_ready(serve)
    assert lab.brokers["b1"].registered("2500") and not lab.brokers["b2"].registered("2500")
    assert f"by DNS SRV: b1.{DOMAIN} ({lab.server('b1')})\n" in serve.log_text()

    lab.list_in_dns("b2")
    changed = time.monotonic()
    # (a look-up that fell into dnsmasq's restart keeps the old set for SRV_RETRY s)
    wait_for(lambda: lab.brokers["b2"].registered("2500"), SHORT_TTL + SRV_RETRY + 8,
             what="2500 registered at b2, the new SRV target", abort=serve.exit_reason)
    followed = time.monotonic() - changed
    wait_for(lambda: not lab.brokers["b1"].registered("2500"), 8,
             what="2500 gone from b1, no longer in DNS", abort=serve.exit_reason)
    assert (f"our SIP servers changed in DNS: added {lab.server('b2')}; "
            f"removed {lab.server('b1')}") in serve.log_text()
    print(f"registered at the new SRV target {followed:.2f} s after the records changed "
          f"(TTL {SHORT_TTL} s)")

    first = call(agents, lab, tmp_path, "2501", 1, "--no-register", target=f"2500@{DOMAIN}")
    wait_for(lambda: session_up(tmp_path), 20, what="a session through b2",
             abort=first.exit_reason)
    assert first.wait(10) == 0, first.log_tail(30)
    assert serve.alive(), serve.log_tail(30)
