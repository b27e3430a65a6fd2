"""Hand-over (REFER, RFC 3515): a daemon that answered a client hands it to another agent
(`sipmesh handover`), the client's agent calls that agent through the same session path,
restarts its program against the new peer and ends the old dialog. Real processes: the
broker, two daemons, `sipmesh call`."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.lab import spawn, wait_for
from tests.lab.agents import SIPMESH
from tests.peers.daemon import web_forward_config


def sipmesh(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([SIPMESH, *args], capture_output=True, text=True, timeout=timeout)


def fetch(port: int) -> bytes | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/hello.txt", timeout=5) as r:
            return r.read()
    except OSError:
        return None


def daemon(tmp_path: Path, broker: str, user: str, content: str, local: int | None = None):  # type: ignore[no-untyped-def]
    base = tmp_path / user
    base.mkdir()
    sock = base / "ctl.sock"
    text, http, port = web_forward_config(base, broker, content,
                                          agent=f'control_socket = "{sock}"\n')
    text = text.replace('user = "home"\n', f'user = "{user}"\n', 1)
    if local is not None:
        text = text.replace(f"local_port = {port}\n", f"local_port = {local}\n")
    (base / "d.toml").write_text(text)
    proc = spawn([SIPMESH, "daemon", "-c", str(base / "d.toml"), "-v"],
                 log_path=base / "daemon.log", name=user)
    wait_for(lambda: f"ready as sip:{user}@" in proc.log_text(), 15, what=user,
             abort=proc.exit_reason)
    return proc, http, sock, base / "d.toml", port


@pytest.mark.slow
def test_a_daemon_hands_a_running_forward_over_to_another(tmp_path: Path, broker_address: str) -> None:
    home, http1, sock1, config, local = daemon(tmp_path, broker_address, "home", "first\n")
    home2, http2, sock2, _, _ = daemon(tmp_path, broker_address, "home2", "second\n", local)
    try:
        caller = spawn([SIPMESH, "call", "home", "--service", "web", "-c", str(config),
                        "--user", "alice", "--server", broker_address, "--bind", "127.0.0.1",
                        "--advertise", "127.0.0.1", "-v"],
                       log_path=tmp_path / "caller.log", name="caller")
        wait_for(lambda: fetch(local) == b"first\n", 20, what="the forward to home",
                 abort=caller.exit_reason)

        # refused: outside our domain, and a caller that is not in a session
        bad = sipmesh("handover", "alice", "--to", "sip:x@192.0.2.1", "--socket", str(sock1))
        assert bad.returncode == 1 and "403" in bad.stderr, bad.stderr
        assert "REFER to <sip:x@192.0.2.1> refused: Refer-To must be in our domain" \
            in caller.log_text()
        nobody = sipmesh("handover", "bob", "--to", "home2", "--socket", str(sock1))
        assert nobody.returncode == 1 and "0 sessions match 'bob'" in nobody.stderr

        done = sipmesh("handover", "alice", "--to", "home2", "--socket", str(sock1))
        assert done.returncode == 0, done.stderr
        assert "202" in done.stdout
        # the caller's program (its local port) keeps working, now served by home2
        wait_for(lambda: fetch(local) == b"second\n", 20, what="the forward to home2",
                 abort=caller.exit_reason)
        # the old session is gone from home, the new one is at home2
        wait_for(lambda: not json.loads(sipmesh("status", "--socket", str(sock1), "--json")
                                        .stdout)["sessions"], 15, what="home's session to end")
        (session,) = json.loads(sipmesh("status", "--socket", str(sock2), "--json").stdout)["sessions"]
        assert session["peer"].startswith("sip:alice@")
        assert "the transfer: SIP/2.0 200 OK" in home.log_text()
        assert caller.exit_reason() is None
        caller.stop(grace=10)
    finally:
        for proc in (home, home2, http1, http2):
            proc.stop(grace=10)
