"""Bad configuration never becomes a restart storm.

`sipmesh broker` checks what its workers will read (users file, TLS files, location
database, listen addresses) once, in the parent, before any worker starts: one line
naming the file and the reason, exit 2. A worker that dies at run time is restarted
after a pause that doubles, and the broker gives up after too many deaths. A users
file broken while the broker runs is not taken: the last good one stays in use.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sipmesh.broker.users import UsersFile
from sipmesh.broker.workers import RESTART_FIRST_PAUSE, RESTART_LIMIT
from sipmesh.sip.ua import UAConfig, UserAgent
from tests.lab import free_port, wait_for
from tests.lab.broker import start_broker

SIPMESH = [sys.executable, "-m", "sipmesh", "broker"]


def broker_once(tmp_path: Path, *args: str, prefix: list[str] = ()) -> tuple[subprocess.CompletedProcess, float]:
    """Run `sipmesh broker ARGS` that must stop by itself; (result, seconds it took)."""
    argv = [*prefix, *SIPMESH, "--listen", f"127.0.0.1:{free_port('both')}", *args]
    started = time.monotonic()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=tmp_path)
    return result, time.monotonic() - started


def one_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_malformed_users_file_stops_the_broker_at_once(tmp_path, workers):
    (tmp_path / "users.txt").write_text("garbage\n")
    result, took = broker_once(tmp_path, "--users", "users.txt", "--db", "b.db", "--workers", workers)
    assert result.returncode == 2
    assert one_line(result).startswith("sipmesh broker: users.txt:1: expected 'realm user")
    assert took < 3.0  # measured here: 0.3-0.6 s, most of it Python starting


def test_unusable_start_files_are_named_in_one_line(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "junk.db").write_text("this is not SQLite\n")
    (tmp_path / "empty.pem").write_text("")
    cases = [
        (["--users", "dir", "--db", "b.db"], "dir: cannot read the users file"),
        (["--db", "junk.db"], "junk.db: cannot use the location database: file is not a database"),
        (["--db", "b.db", "--transport", "udp,tls", "--tls-cert", "empty.pem", "--tls-key", "empty.pem"],
         "empty.pem, empty.pem: cannot load the TLS certificate and key"),
    ]
    for args, message in cases:
        result, _ = broker_once(tmp_path, *args, "--workers", "2")
        assert result.returncode == 2 and message in one_line(result), (args, result.stderr)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare (a private mount namespace)")
@pytest.mark.parametrize("options,reason", [("size=1m,ro", "Read-only file system"),
                                            ("size=4k", "database or disk is full")],
                         ids=["read-only", "full"])
def test_an_unusable_state_directory_is_named_at_start(tmp_path, options, reason):
    """A read-only or full file system (root ignores file modes): a tmpfs mounted in a
    private mount namespace that the broker runs in, gone with it."""
    state = tmp_path / "state"
    state.mkdir()
    script = f"mount -t tmpfs -o {options} tmpfs {state} && exec \"$@\""
    result, took = broker_once(tmp_path, "--db", str(state / "sipmesh" / "broker.db"), "--workers", "2",
                               prefix=["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"])
    assert result.returncode == 2, result.stderr
    line = one_line(result)
    assert f"{state}/sipmesh/broker.db: cannot use the location database: " in line and reason in line, line
    assert took < 3.0


@pytest.mark.slow
def test_dying_workers_are_restarted_with_growing_pauses_then_the_broker_gives_up(tmp_path):
    broker, _ = start_broker(tmp_path, extra=["--workers", "2"])
    pauses = []
    for death in range(RESTART_LIMIT + 1):
        workers = wait_for(lambda: _children(broker.pid) if len(_children(broker.pid)) == 2 else None,
                           30, what="two workers", abort=broker.exit_reason)
        victim = min(workers)
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        if death == RESTART_LIMIT:
            break
        wait_for(lambda: len(_children(broker.pid) - {victim}) == 2, 30, interval=0.01,
                 what=f"worker {victim} replaced", abort=broker.exit_reason)
        pauses.append(time.monotonic() - killed)
    assert broker.wait(10) == 1  # gave up: non-zero, with the reason in its log
    print(f"worker killed {RESTART_LIMIT + 1} times: replaced after "
          f"{', '.join(f'{p:.2f}' for p in pauses)} s, then the broker gave up")
    log = broker.log_text()
    assert f"{RESTART_LIMIT + 1} worker deaths within 60 s: giving up" in log, broker.log_tail()
    assert "Traceback" not in log
    assert pauses[0] < RESTART_FIRST_PAUSE  # the first death: restarted at once
    for n, pause in enumerate(pauses[1:]):
        assert pause >= RESTART_FIRST_PAUSE * 2 ** n, pauses  # then 0.5, 1, 2, 4 s


def _children(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.add(int(entry))
    return found


async def test_a_users_file_broken_while_running_keeps_the_last_good_one(tmp_path):
    users = UsersFile(tmp_path / "users.txt")
    users.add("127.0.0.1", "alice", "wonderland")
    users.save()
    broker, port = start_broker(tmp_path, users=users.path, extra=["--workers", "2"])

    agents = {}
    for user, password in (("alice", "wonderland"), ("bob", "builder")):
        agents[user] = UserAgent(UAConfig(user=user, domain=f"127.0.0.1:{port}", password=password,
                                          listen_port=0, transports=("UDP",)))
        await agents[user].start()

    async def register(user: str) -> int:
        return (await agents[user].register(60)).status

    try:
        assert await register("alice") == 200
        users.path.write_text(users.path.read_text() + "127.0.0.1 bob not-a-hash\n")
        deadline = time.monotonic() + 20
        while "not reloaded, keeping the previous one" not in broker.log_text():
            assert time.monotonic() < deadline, broker.log_tail()
            assert await register("alice") == 200  # the last good file still serves
        assert f"{users.path}:4: expected 'realm user md5-ha1 sha256-ha1'" in broker.log_text()
        assert await register("alice") == 200
        users.add("127.0.0.1", "bob", "builder")  # repaired, with bob: taken again
        users.save()
        deadline = time.monotonic() + 20
        while await register("bob") != 200:
            assert time.monotonic() < deadline, broker.log_tail()
    finally:
        for ua in agents.values():
            await ua.stop()
    assert broker.alive() and "Traceback" not in broker.log_text()
