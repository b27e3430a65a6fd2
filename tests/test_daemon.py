"""The super-daemon in-process against the embedded broker on loopback: three services,
bursts of concurrent calls from several callers, children that record exactly what they
were given, sessions ended in random order, every rejection, status and reload.

The lab (`DaemonLab`, `config_text`, the recording child) is in tests/peers/daemon.py."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import stat
import sys
from pathlib import Path

import pytest

from sipmesh.agent.attributes import read_attributes
from sipmesh.daemon.config import load_config
from sipmesh.daemon.server import Daemon
from sipmesh.sip.ua import Call, UAConfig
from tests.lab import pid_alive, wait_for_async
from tests.peers.daemon import DaemonLab, config_text, lab, read_record, record_path  # noqa: F401 (fixture)

# ------------------------------------------------------------------------ tests


async def test_burst_of_mixed_sessions_each_child_sees_its_own_values(lab: DaemonLab) -> None:
    daemon = await lab.start_daemon()
    callers = {name: await lab.caller(name) for name in ("alice", "bob", "carol")}
    plan = []  # (caller, service, values)
    for i in range(8):
        plan.append(("alice", "alpha", {"NICK": f"a{i}"}))
        plan.append(("bob", "alpha" if i % 2 else "beta", {"NICK": f"b{i}"}))
    plan += [("carol", "gamma", {"SIZE": "7"}), ("carol", "gamma", {"SIZE": "42"}),
             ("alice", "beta", {}), ("carol", "alpha", {"NICK": "c0"})]
    random.Random(1).shuffle(plan)
    calls: list[Call] = await asyncio.gather(*(
        lab.call(callers[who], service, **values) for who, service, values in plan))
    assert len({c.call_id for c in calls}) == len(plan)

    sessions = {}
    for call, (who, service, values) in zip(calls, plan):
        answer = read_attributes(call.remote_sdp)
        path = record_path(lab.out, call.call_id)
        await wait_for_async(path.exists, what=f"the record of {service} for {who}")
        record = read_record(path)
        argv, env = record["argv"], record["env"]
        assert argv[2] == service
        assert env["SIPMESH_CALL_ID"] == call.call_id and env["SIPMESH_SERVICE"] == service
        assert env["SIPMESH_PEER"].startswith(f"sip:{who}@")
        if service == "alpha":
            assert argv[3:6] == [answer["PORT"], values["NICK"], call.call_id]
            assert env["SIPMESH_NICK"] == values["NICK"] and env["GREETING"] == f"hello {values['NICK']}"
            assert answer["GREETING"] == "hi" and "NICK" not in answer
        elif service == "beta":
            assert argv[3:6] == [answer["PORT"], answer["TUN_LOCAL"], answer["TUN_REMOTE"]]
        else:
            assert argv[3] == values["SIZE"] and "PORT" not in answer
        sessions[call.call_id] = (call, record["pid"], answer, service)

    ports = [a["PORT"] for _, _, a, s in sessions.values() if "PORT" in a]
    assert len(ports) == len(set(ports)), "two sessions were given the same port"
    tunnels = [a[k] for _, _, a, s in sessions.values() if s == "beta"
               for k in ("TUN_LOCAL", "TUN_REMOTE")]
    assert len(tunnels) == len(set(tunnels)), "two sessions were given the same address"

    await wait_for_async(lambda: all(r.state == "established" for r in daemon.sessions.values()),
                     what="every ACK to arrive")
    status = await lab.status()
    assert len(status["sessions"]) == len(plan)
    assert all(s["state"] == "established" for s in status["sessions"])
    assert {s["pid"] for s in status["sessions"]} == {pid for _, pid, _, _ in sessions.values()}

    # end them in random order, from either side; the others must not notice
    order = list(sessions)
    random.Random(2).shuffle(order)
    for n, call_id in enumerate(order):
        call, pid, _, _ = sessions.pop(call_id)
        if n % 2:
            await call.bye()  # the caller hangs up: the daemon stops the child
        else:
            os.kill(pid, signal.SIGTERM)  # the program ends: the daemon sends BYE
            await asyncio.wait_for(call.ended, 10)
        await wait_for_async(lambda: call_id not in daemon.sessions and not pid_alive(pid),
                         what="the session to be gone")
        for other, other_pid, _, _ in sessions.values():
            assert not other.ended.done(), "ending one session disturbed another"
            assert pid_alive(other_pid)
        assert {s["call_id"] for s in (await lab.status())["sessions"]} == set(sessions)
    status = await lab.status()
    assert status["sessions"] == [] and status["allocated"] == {"ports": [], "addresses": []}
    assert daemon.ledger.empty() and not daemon.active


async def test_rejections(lab: DaemonLab) -> None:
    await lab.start_daemon()
    alice, carol, dave = [await lab.caller(n) for n in ("alice", "carol", "dave")]

    failed = await lab.refused(dave, "alpha", NICK="x")
    assert failed.status == 403  # allowed by no service
    failed = await lab.refused(carol, "beta")
    assert failed.status == 403  # allowed elsewhere, not here
    failed = await lab.refused(alice, "nosuch")
    assert failed.status == 488 and "unknown service 'nosuch'" in failed.response.headers.get("Warning")
    failed = await lab.refused(alice, None)
    assert failed.status == 488 and "no service requested" in failed.response.headers.get("Warning")
    failed = await lab.refused(alice, "alpha", NICK="not a token")
    assert failed.status == 488 and "NICK" in failed.response.headers.get("Warning")
    failed = await lab.refused(alice, "alpha")
    assert failed.status == 488 and "NICK: missing" in failed.response.headers.get("Warning")
    failed = await lab.refused(carol, "gamma", SIZE="101")
    assert failed.status == 488 and "SIZE" in failed.response.headers.get("Warning")

    first = [await lab.call(carol, "gamma", SIZE=str(n)) for n in (1, 2)]
    failed = await lab.refused(carol, "gamma", SIZE="3")
    assert failed.status == 486 and "max_sessions" in failed.response.headers.get("Warning")
    await first[0].bye()
    await wait_for_async(lambda: lab.daemon.active.get("gamma") == 1, what="a free slot")
    third = await lab.call(carol, "gamma", SIZE="3")  # a slot is free again
    await third.bye()
    await first[1].bye()
    counters = (await lab.status())["daemon"]["counters"]
    assert counters["refused_403"] == 2 and counters["refused_488"] == 5
    assert counters["refused_486"] == 1


async def test_pool_exhaustion_is_busy_and_frees_on_end(lab: DaemonLab) -> None:
    assert lab.broker is None
    server = await lab.start_broker()
    await lab.start_daemon(config_text(server, lab.out, pool="10.213.0.0/30"))  # one pair
    alice = await lab.caller("alice")
    first = await lab.call(alice, "beta")
    failed = await lab.refused(alice, "beta")
    assert failed.status == 486 and "no free address pair" in failed.response.headers.get("Warning")
    await first.bye()
    await wait_for_async(lambda: lab.daemon.ledger.empty(), what="the pair to be released")
    again = await lab.call(alice, "beta")
    assert read_attributes(again.remote_sdp)["TUN_LOCAL"] == "10.213.0.1"
    await again.bye()


async def test_status_socket_is_private_and_reports(lab: DaemonLab) -> None:
    daemon = await lab.start_daemon()
    path = daemon.control_path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    alice = await lab.caller("alice")
    call = await lab.call(alice, "beta")
    status = await lab.status()
    (registration,) = status["registrations"]
    assert registration["state"] == "registered" and registration["aor"].startswith("sip:home@")
    (session,) = status["sessions"]
    assert session["service"] == "beta" and session["peer"].startswith("sip:alice@")
    assert session["state"] == "established" and session["pid"] > 0
    assert session["allocated"]["addresses"] == ["10.213.0.1", "10.213.0.2"]
    assert session["allocated"]["ports"][0].endswith("/udp")
    from sipmesh.cli.status import render

    table = render(status)
    assert "beta" in table and str(session["pid"]) in table and "10.213.0.1" in table
    (row,) = [line for line in table.splitlines() if line.startswith(session["call_id"])]
    assert row.split()[0] == session["call_id"]  # whole, not cut to 16 characters
    await call.bye()


async def test_reload_applies_to_new_sessions_only_and_refuses_bad_config(lab: DaemonLab) -> None:
    daemon = await lab.start_daemon()
    alice = await lab.caller("alice")
    old = await lab.call(alice, "alpha", NICK="old")
    text = lab.config_path.read_text()
    lab.config_path.write_text(text.replace('value = "hi"', 'value = "changed"')
                               .replace('"hello {NICK}"', '"bye {NICK}"'))
    ok, message = daemon.reload()
    assert ok, message
    new = await lab.call(alice, "alpha", NICK="new")
    assert read_attributes(new.remote_sdp)["GREETING"] == "changed"
    assert read_attributes(old.remote_sdp)["GREETING"] == "hi"
    await wait_for_async(record_path(lab.out, new.call_id).exists)
    assert read_record(record_path(lab.out, new.call_id))["env"]["GREETING"] == "bye new"
    assert not old.ended.done()
    status = await lab.status()
    assert {s["generation"] for s in status["sessions"]} == {1, 2}

    lab.config_path.write_text(text.replace('allocator = "tcp"', 'allocator = "nope"'))
    ok, message = daemon.reload()
    assert not ok and "no allocator named 'nope'" in message and ":" in message
    assert daemon.generation == 2
    third = await lab.call(alice, "alpha", NICK="third")  # still served, with generation 2
    assert read_attributes(third.remote_sdp)["GREETING"] == "changed"
    for call in (old, new, third):
        await call.bye()
    await wait_for_async(lambda: not daemon.sessions, what="all sessions to end")
    assert daemon.ledger.empty()


async def test_caller_side_runs_the_same_definition(lab: DaemonLab) -> None:
    """What `sipmesh call home --service alpha --param NICK=zed` runs, in-process."""
    from sipmesh.agent.session import Agent, AgentConfig

    await lab.start_daemon()
    config = load_config(lab.config_path, side="call")
    profile = config.services["alpha"].profile
    profile.set_call_values({"NICK": "zed"})
    assert lab.broker is not None
    agent = Agent(AgentConfig(ua=UAConfig(user="alice", domain=lab.broker.hostport,
                                          listen_port=0, listen_host="127.0.0.1"),
                              mode="call", target="home", register=False, grace=2,
                              advertise="127.0.0.1"), profile)
    task = asyncio.ensure_future(agent.run())
    try:
        await wait_for_async(lambda: any(lab.out.glob("client-*.json")), what="the caller's child")
        (client,) = [json.loads(p.read_text()) for p in lab.out.glob("client-*.json")]
        call_id = client["env"]["SIPMESH_CALL_ID"]
        await wait_for_async(record_path(lab.out, call_id).exists, what="the daemon's child")
        server = read_record(record_path(lab.out, call_id))
        assert server["argv"][3:5] == [client["argv"][4], "zed"]  # the answer's PORT, our NICK
        assert client["argv"][2:4] == ["alpha-caller", "127.0.0.1"]
        os.kill(client["pid"], signal.SIGTERM)  # the caller's program ends: BYE
        await asyncio.wait_for(task, 15)
        await wait_for_async(lambda: not lab.daemon.sessions, what="the daemon's session to end")
    finally:
        agent.request_stop()
        if not task.done():
            await asyncio.wait_for(task, 15)


async def test_a_program_that_cannot_start_is_500_and_releases(lab: DaemonLab, tmp_path: Path) -> None:
    """A child that fails to start is a 500, and nothing stays allocated."""
    server = await lab.start_broker()
    text = config_text(server, lab.out).replace(
        f'answer.command = [{json.dumps(sys.executable)}, "-I", {json.dumps(str(lab.out / "recorder.py"))}, {json.dumps(str(lab.out))}, "beta"',
        f'answer.command = [{json.dumps(str(tmp_path / "vanishing"))}, "beta"')
    script = tmp_path / "vanishing"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    daemon = await lab.start_daemon(text)
    script.chmod(0o644)  # no longer executable: the start fails
    alice = await lab.caller("alice")
    failed = await lab.refused(alice, "beta")
    assert failed.status == 500
    assert daemon.ledger.empty() and not daemon.sessions


async def test_an_unreachable_sip_server_does_not_stop_the_daemon(lab: DaemonLab) -> None:
    """A daemon started before its SIP server keeps trying instead of exiting."""
    import socket as _socket

    with _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM) as silent:  # bound, never answers
        silent.bind(("127.0.0.1", 0))
        server = f"127.0.0.1:{silent.getsockname()[1]}"
        text = config_text(server, lab.out).replace("grace = 2\n", "grace = 2\nregister_timeout = 0.3\n")
        lab.broker = None
        lab.config_path.write_text(text)
        daemon = Daemon(load_config(lab.config_path), control_socket=lab.tmp / "ctl" / "d.sock")
        lab.daemon, lab.task = daemon, asyncio.ensure_future(daemon.run())
        await asyncio.wait_for(daemon.ready.wait(), 10)
        (registration,) = (await lab.status())["registrations"]
        assert registration["state"] == "failing" and "did not answer" in registration["error"]
        assert not lab.task.done()


async def test_a_second_daemon_on_the_same_socket_is_refused(lab: DaemonLab) -> None:
    from sipmesh.agent.errors import AgentError

    first = await lab.start_daemon()
    config = load_config(lab.config_path)
    config.agent.user = "home2"
    second = Daemon(config, control_socket=first.control_path)
    with pytest.raises(AgentError, match="another daemon answers on"):
        await asyncio.wait_for(second.run(), 15)
    assert (await lab.status())["ok"]  # the first one's socket is untouched
