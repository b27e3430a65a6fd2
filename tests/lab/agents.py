"""sipmesh agents (`sipmesh serve`, `sipmesh call`, `sip_app`) as processes of a test:
their programs, a test application that records what it was given, and the check that a
test leaves no process behind.

* ``SIPMESH``, ``SIP_APP``: the installed commands;
* ``app_argv``: the recording test application (``APP``), ``record`` reads what it wrote;
* ``wait_exit``: a process's exit status, or its log when it does not exit;
* ``agents``: a spawner whose agents get SIGTERM (and time to unregister) before Kamailio goes;
* ``no_orphans``: an autouse fixture (import it into the test module) failing a test that
  left a process running; ``assert_no_orphans`` checks the recorded programs are gone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sipmesh.lab.natsite import SIPMESH
from sipmesh.lab.procs import pid_alive
from sipmesh.lab.waiting import LabTimeout, wait_for

from .fixtures import stopped_gracefully

BIN = Path(sys.executable).parent
SIP_APP = str(BIN / "sip_app")

# A test application: records argv + SIPMESH_* env + pid, then exits after a delay ("exit")
# or runs until SIGTERM ("run"), recording that it was stopped.
APP = r'''
import json, os, pathlib, signal, sys, time
d, mode = pathlib.Path(sys.argv[1]), sys.argv[2]
role = os.environ.get("SIPMESH_ROLE", "none")
def term(*_):
    (d / f"{role}.stopped").write_text("TERM")
    sys.exit(0)
signal.signal(signal.SIGTERM, term)  # before the record: a record means SIGTERM is handled
env = {k: v for k, v in os.environ.items() if k.startswith("SIPMESH_")}
(d / f"{role}.json.tmp").write_text(json.dumps({"argv": sys.argv, "env": env, "pid": os.getpid()}))
os.rename(d / f"{role}.json.tmp", d / f"{role}.json")
if mode == "exit":
    time.sleep(float(sys.argv[3]))
    sys.exit(0)
for _ in range(600):
    time.sleep(0.1)
'''


def app_argv(tmp_path: Path, mode: str = "run", delay: float = 0.5) -> list[str]:
    script = tmp_path / "app.py"
    if not script.exists():
        script.write_text(APP)
    return [sys.executable, str(script), str(tmp_path), mode, str(delay)]


def wait_exit(proc, timeout: float = 20.0) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{proc.name} still running; log:\n{proc.log_tail(40)}") from None


def record(tmp_path: Path, role: str) -> dict | None:
    f = tmp_path / f"{role}.json"
    return json.loads(f.read_text()) if f.exists() else None


def processes_of(directory: Path) -> list[str]:
    """Live processes whose command line or working directory is inside `directory`."""
    found = []
    mark = str(directory)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            try:
                cwd = os.readlink(entry / "cwd")
            except OSError:
                cwd = ""
        except OSError:
            continue
        if mark in cmdline or cwd == mark or cwd.startswith(mark + "/"):
            found.append(f"{entry.name}: {cmdline.strip()}")
    return found


@pytest.fixture(autouse=True)
def no_orphans(tmp_path):
    """After every test (and its fixtures' teardown): nothing it started is still running."""
    yield
    try:
        wait_for(lambda: not processes_of(tmp_path), 5, 0.1, what="every process of the test gone")
    except LabTimeout:
        raise AssertionError("processes left behind:\n" + "\n".join(processes_of(tmp_path))) from None


def assert_no_orphans(tmp_path: Path) -> None:
    for role in ("server", "client"):
        rec = record(tmp_path, role)
        if rec is not None:
            wait_for(lambda: not pid_alive(rec["pid"]), 10, what=f"{role} program gone")


@pytest.fixture
def agents(kamailio, spawn_proc):
    """spawn_proc whose processes are stopped before Kamailio is (so they can unregister)."""
    with stopped_gracefully(spawn_proc) as start:
        yield start


def agent_argv(mode: str, server: str, user: str, *extra: str, program: list[str] | None = None,
               target: str | None = None) -> list[str]:
    argv = [SIPMESH, mode] + ([target] if target else []) + ["--server", server, "--user", user,
                                                              "-v", *extra]
    return argv + (["--", *program] if program else [])


def wait_ready(proc, timeout: float = 10.0) -> None:
    wait_for(lambda: "ready: contact" in proc.log_text(), timeout, what="agent registered",
             abort=proc.exit_reason)
