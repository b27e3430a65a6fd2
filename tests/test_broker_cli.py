"""`sipmesh broker` and `sipmesh broker users` as a user runs them."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

import pytest

from sipmesh.broker.users import UsersFile
from sipmesh.sip.auth import compute_ha1
from tests.lab import free_port
from tests.lab.broker import start_broker

SIPMESH = [sys.executable, "-m", "sipmesh"]


def sipmesh(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*SIPMESH, *args], input=stdin, capture_output=True, text=True, timeout=60)


def test_users_add_list_remove_never_store_or_echo_the_password(tmp_path):
    path = tmp_path / "users"
    first = sipmesh("broker", "users", "add", "--users", str(path), "alice", "--password-stdin",
                    stdin="s3cret\n")
    assert first.returncode == 2 and "--realm" in first.stderr  # empty file: which realm?
    added = sipmesh("broker", "users", "add", "--users", str(path), "--realm", "example.org",
                    "--password-stdin", "alice", stdin="s3cret\n")
    assert added.returncode == 0, added.stderr
    assert "s3cret" not in added.stdout + added.stderr
    again = sipmesh("broker", "users", "add", "--users", str(path), "--password-stdin", "bob",
                    stdin="hunter2\n")  # the file's only realm is the default now
    assert again.returncode == 0 and "bob@example.org" in again.stdout
    text = path.read_text()
    assert "s3cret" not in text and "hunter2" not in text
    assert UsersFile(path).ha1("alice", "example.org", "MD5") == compute_ha1("alice", "example.org", "s3cret")
    listed = sipmesh("broker", "users", "list", "--users", str(path))
    assert listed.stdout.split() == ["alice@example.org", "bob@example.org"]
    assert sipmesh("broker", "users", "remove", "--users", str(path), "bob").returncode == 0
    missing = sipmesh("broker", "users", "remove", "--users", str(path), "bob")
    assert missing.returncode == 1 and "users list" in missing.stderr  # says what to do next


def test_users_add_without_a_terminal_asks_for_password_stdin(tmp_path):
    result = sipmesh("broker", "users", "add", "--users", str(tmp_path / "u"), "--realm", "r.example", "x",
                     stdin="")
    assert result.returncode == 2 and "--password-stdin" in result.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("workers", [1, 2])
def test_broker_runs_in_the_foreground_and_stops_cleanly(tmp_path, sig, workers):
    proc, port = start_broker(tmp_path, extra=["--workers", str(workers), "--log-level", "info"])
    proc.signal_group(sig)  # as a terminal's Ctrl-C or a service manager would
    assert proc.wait(10) == 0, proc.log_tail()
    log = proc.log_text()
    assert "broker ready" in log and "broker stopped" in log and "Traceback" not in log
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", port))  # the port is free again


def test_broker_errors_say_what_to_do(tmp_path):
    missing = sipmesh("broker", "--users", str(tmp_path / "nope"), "--listen", f"127.0.0.1:{free_port('both')}",
                      "--db", str(tmp_path / "b.db"), "--workers", "1")
    assert missing.returncode == 2 and "sipmesh broker users add" in missing.stderr
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        taken = sipmesh("broker", "--listen", f"127.0.0.1:{port}", "--db", str(tmp_path / "b.db"),
                        "--workers", "1")
    assert taken.returncode == 1 and "--listen" in taken.stderr and "Traceback" not in taken.stderr
    bad = sipmesh("broker", "--listen", "127.0.0.1:notaport", "--db", str(tmp_path / "b.db"))
    assert bad.returncode == 2 and "HOST:PORT" in bad.stderr
