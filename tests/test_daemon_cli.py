"""`sipmesh daemon`, `sipmesh status` and `sipmesh call --service` as real processes, with
the broker as a third: a bad configuration refused at start, status as a table and as JSON,
SIGHUP reload (good and bad), a forward used through `sipmesh call`, clean shutdown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.lab import spawn, wait_for
from tests.lab.agents import SIPMESH
from tests.peers.daemon import config_text, web_forward_config


def sipmesh(*args: str, timeout: float = 20, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([SIPMESH, *args], capture_output=True, text=True, timeout=timeout,
                          **kwargs)


def test_a_bad_configuration_is_refused_at_start_with_its_line(tmp_path: Path) -> None:
    config = tmp_path / "d.toml"
    out = tmp_path / "rec"
    out.mkdir()
    config.write_text(config_text("127.0.0.1:5060", out).replace('from = "peer"\n', 'from = "pear"\n', 1))
    result = sipmesh("daemon", "-c", str(config))
    assert result.returncode == 2
    line = next(n for n, text in enumerate(config.read_text().splitlines(), 1) if "pear" in text)
    assert f"d.toml:{line}: service 'alpha': params.NICK.from: must be one of" in result.stderr
    config.write_text("[agent\n")
    result = sipmesh("daemon", "-c", str(config))
    assert result.returncode == 2 and "invalid TOML" in result.stderr and "line 1" in result.stderr


def test_daemon_status_reload_and_a_forward_through_sipmesh_call(tmp_path: Path, broker_address: str) -> None:
    config = tmp_path / "daemon.toml"
    socket_path = tmp_path / "run" / "home.sock"
    text, http, local = web_forward_config(tmp_path, broker_address, "hello through sipmesh\n",
                                           agent=f'control_socket = "{socket_path}"\n')
    config.write_text(text)
    daemon = spawn([SIPMESH, "daemon", "-c", str(config), "-v"], log_path=tmp_path / "daemon.log",
                   name="daemon")
    wait_for(lambda: "ready as sip:home@" in daemon.log_text(), 15, what="the daemon",
             abort=daemon.exit_reason)
    assert (socket_path.stat().st_mode & 0o777) == 0o600

    # the calling half: the same file, another identity on the command line
    caller = spawn([SIPMESH, "call", "home", "--service", "web", "-c", str(config),
                    "--user", "alice", "--server", broker_address, "--bind", "127.0.0.1",
                    "--advertise", "127.0.0.1", "-v"],
                   log_path=tmp_path / "caller.log", name="caller")
    wait_for(lambda: f"reachable at 127.0.0.1:{local}" in caller.log_text(), 20,
             what="the forward's local port", abort=caller.exit_reason)
    with urllib.request.urlopen(f"http://127.0.0.1:{local}/hello.txt", timeout=20) as r:
        assert r.read() == b"hello through sipmesh\n"

    status = json.loads(sipmesh("status", "--socket", str(socket_path), "--json").stdout)
    (session,) = status["sessions"]
    assert session["service"] == "web" and session["peer"].startswith("sip:alice@")
    assert session["allocated"]["ports"] and session["pid"] > 0
    assert status["registrations"][0]["state"] == "registered"
    table = sipmesh("status", "-c", str(config))
    assert table.returncode == 0
    assert "web" in table.stdout and str(session["pid"]) in table.stdout
    assert "REGISTRATION" in table.stdout and "registered" in table.stdout
    # the whole Call-ID, as in --json (it is what the daemon's log lines are tagged with)
    (row,) = [line for line in table.stdout.splitlines() if str(session["pid"]) in line]
    assert row.split()[0] == session["call_id"]
    # the Call-ID is in the daemon's log lines
    assert f"[{session['call_id']}]" in daemon.log_text()

    # SIGHUP with a broken file: refused, logged, the old configuration kept
    config.write_text(text.replace('kind = "forward"', 'kind = "forwrd"'))
    os.kill(daemon.pid, signal.SIGHUP)
    wait_for(lambda: "reload refused" in daemon.log_text(), 10, what="the refusal")
    assert "unknown kind 'forwrd'" in daemon.log_text()
    assert json.loads(sipmesh("status", "--socket", str(socket_path), "--json").stdout)[
        "daemon"]["generation"] == 1
    # SIGHUP with a good one: applied to new sessions, the running forward untouched
    config.write_text(text.replace("max_sessions = 2\n", "max_sessions = 3\n", 1))
    os.kill(daemon.pid, signal.SIGHUP)
    wait_for(lambda: "generation 2" in daemon.log_text(), 10, what="the reload")
    with urllib.request.urlopen(f"http://127.0.0.1:{local}/hello.txt", timeout=20) as r:
        assert r.read() == b"hello through sipmesh\n"

    caller.stop(grace=10)  # SIGTERM: BYE, the forward stops on both sides
    wait_for(lambda: not json.loads(sipmesh("status", "--socket", str(socket_path),
                                            "--json").stdout)["sessions"], 15,
             what="the session to end")
    daemon.stop(grace=15)
    assert daemon.returncode == 0, daemon.log_tail(30)
    assert not socket_path.exists()
    assert "unregistered" in daemon.log_text()


def test_status_without_a_daemon(tmp_path: Path) -> None:
    result = sipmesh("status", "--socket", str(tmp_path / "none.sock"))
    assert result.returncode == 4 and "cannot reach the daemon" in result.stderr


def test_status_table_shows_the_whole_call_id() -> None:
    from sipmesh.cli.status import render

    long_id = "4f1c2e9a0b7d4c3e8a6f5b1d2c3e4f5a@2001:db8::17"
    status = {"ok": True, "daemon": {"pid": 1, "generation": 1},
              "registrations": [], "services": [],
              "sessions": [{"call_id": long_id, "peer": "sip:alice@x", "service": "web",
                            "state": "established", "since": 0, "pid": 42,
                            "allocated": {"ports": ["40000/tcp"]}},
                           {"call_id": "short", "peer": "sip:bob@x", "service": "web",
                            "state": "established", "since": 0, "pid": 43, "allocated": {}}]}
    lines = render(status, now=0).splitlines()
    header = next(line for line in lines if line.startswith("CALL-ID"))
    rows = [line for line in lines if line.startswith((long_id, "short "))]
    assert [row.split()[0] for row in rows] == [long_id, "short"]
    # the column is as wide as the longest Call-ID: the next column stays aligned
    assert {row.index("sip:") for row in rows} == {header.index("PEER")} == {len(long_id) + 2}
