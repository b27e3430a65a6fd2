"""Progress a person can read: on a terminal (a real pty) the long waits -- registering,
a call waiting for its answer, a daemon starting -- show a status line with the time
waited; piped (a script, a log) or with -q they show nothing of it. Real processes."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from sipmesh.sip.message import Request
from tests.lab import free_port
from tests.lab.agents import SIPMESH, no_orphans  # noqa: F401  (fixture)
from tests.peers.daemon import config_text
from tests.peers.raw import RawPeer

pytestmark = pytest.mark.slow  # real agent processes

ESC = "\x1b["


def on_pty(argv: list[str], *, until: str | None = None, timeout: float = 30) -> tuple[int, str]:
    """Run `argv` with stdout and stderr on a new pty; (exit status, what it wrote). With
    `until`, SIGTERM it once that text has appeared."""
    master, slave = pty.openpty()
    env = dict(os.environ, TERM="xterm")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env,
                            start_new_session=True)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the other end closed
                    break
                if not chunk:
                    break
                out += chunk
                if until is not None and until in out.decode(errors="replace"):
                    proc.send_signal(signal.SIGTERM)
                    until = None
            elif proc.poll() is not None:
                break
        return proc.wait(timeout=max(1.0, deadline - time.monotonic())), out.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def piped(argv: list[str], *, timeout: float = 30) -> tuple[int, str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                            env=dict(os.environ, TERM="xterm"))
    return result.returncode, result.stderr


def test_registering_shows_progress_on_a_terminal_only(tmp_path):
    silent = free_port("both")  # nothing answers there
    argv = [SIPMESH, "serve", "--server", f"127.0.0.1:{silent}", "--user", "a",
            "--register-timeout", "2.5", "--", "/bin/true"]
    status, out = on_pty(argv)
    assert status == 4, out
    assert f"sipmesh serve: registering sip:a@127.0.0.1:{silent} ... 1 s" in out
    assert f"\r{ESC}K" in out  # the line is redrawn in place, then cleared
    # the error on its own line, after the status line was cleared
    last = out.replace(f"\r{ESC}K", "\n").strip().splitlines()[-1]
    assert last.startswith(f"sipmesh serve: the SIP server 127.0.0.1:{silent} did not answer our "
                           "REGISTER within 2.5 s: check --server")

    status, err = piped(argv)
    assert status == 4
    assert "registering" not in err and ESC not in err and "\r" not in err
    assert err.strip().splitlines()[-1] == last  # the same message, nothing else

    status, out = on_pty(argv[:2] + ["-q"] + argv[2:])
    assert status == 4 and "registering" not in out and ESC not in out


def ringing_peer() -> tuple[RawPeer, threading.Thread]:
    """A UA that answers INVITE with 180 Ringing, a CANCEL with 200, and nothing else."""
    peer = RawPeer()

    def run() -> None:
        while True:
            try:
                got = peer.recv_blocking(30)
            except (OSError, ValueError):  # closed
                return
            if got is None:
                return
            message, addr = got
            if isinstance(message, Request) and message.method in ("INVITE", "CANCEL"):
                peer.reply(message, 180 if message.method == "INVITE" else 200,
                           to_tag="ring", addr=addr)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return peer, thread


def test_calling_shows_the_wait_for_the_answer_on_a_terminal_only(tmp_path):
    peer, thread = ringing_peer()
    try:
        target = f"sip:ghost@127.0.0.1:{peer.port}"
        argv = [SIPMESH, "call", target, "--server", f"127.0.0.1:{peer.port}", "--user", "a",
                "--no-register", "--timeout", "2.5", "--", "/bin/true"]
        status, out = on_pty(argv)
        assert status == 8, out
        assert f"sipmesh call: calling {target}\r\n" in out  # an event: a whole line
        assert f"sipmesh call: waiting for {target} to answer ... 1 s (180 Ringing)" in out
        assert "did not answer within 2.5 s" in out.splitlines()[-1]

        status, err = piped(argv)
        assert status == 8
        assert f"sipmesh call: calling {target}" in err  # the events stay, as lines
        assert "waiting for" not in err and ESC not in err and "\r" not in err
    finally:
        peer.close()
        thread.join(5)


def test_the_daemon_shows_its_start_on_a_terminal(tmp_path):
    out_dir = tmp_path / "rec"
    out_dir.mkdir()
    silent = free_port("both")
    config = tmp_path / "d.toml"
    config.write_text(config_text(f"127.0.0.1:{silent}", out_dir).replace(
        "[agent]\n", f'[agent]\nregister_timeout = 2\ncontrol_socket = "{tmp_path / "d.sock"}"\n'))
    argv = [SIPMESH, "daemon", "-c", str(config)]
    status, out = on_pty(argv, until="sipmesh daemon: ready as")
    assert status == 0, out
    assert f"sipmesh daemon: registering sip:home@127.0.0.1:{silent} ... 1 s" in out
    # a server that does not answer yet: the daemon keeps trying, says so, and is ready
    assert "trying again every" in out and "sipmesh daemon: ready as" in out
    assert not Path(tmp_path / "d.sock").exists()
