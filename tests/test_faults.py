"""Faults on the broker's side, with nothing lost: a lossy link, the broker SIGKILLed
under load, a state directory that fills up. Real processes, bounded in time."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sipmesh.sip.message import Response, parse_message
from tests.lab import LossyRelay, free_port, spawn, wait_for, wait_udp_listening
from tests.lab.fixtures import stopped_gracefully
from tests.test_agent import SIPMESH, agent_argv, app_argv, record, wait_exit, wait_ready

pytestmark = pytest.mark.slow

TIMER_B = TIMER_F = 32.0  # 64 * T1 (RFC 3261 §17): how long a transaction may take


def start_broker(tmp_path: Path, host: str, port: int, *args: str, prefix: list[str] = (), name="broker"):
    argv = [*prefix, SIPMESH, "broker", "--listen", f"{host}:{port}", "--rate-limit", "0", *args]
    proc = spawn(argv, cwd=tmp_path, log_path=tmp_path / f"{name}.log", name=name)
    wait_udp_listening(host, port, proc=proc, timeout=15)
    return proc


# -- a lossy link ---------------------------------------------------------------------------------

def test_registration_and_session_come_up_over_a_lossy_link(tmp_path, spawn_proc):
    """Both agents reach the broker through a relay that drops 30 % of the datagrams in
    each direction, and delays (reorders) and duplicates others. The broker listens on
    127.0.0.2 and serves the domain 127.0.0.1, where the relay listens on the same port."""
    port = free_port("both", "127.0.0.2")
    broker = start_broker(tmp_path, "127.0.0.2", port, "--domain", "127.0.0.1", "--workers", "1",
                          "--db", str(tmp_path / "broker.db"))
    with LossyRelay(("127.0.0.2", port), loss=0.3, reorder=0.2, duplicate=0.1, seed=4475,
                    port=port) as relay, stopped_gracefully(spawn_proc) as agents:
        server = f"127.0.0.1:{port}"
        started = time.monotonic()
        serve = agents(agent_argv("serve", server, "2500", "--register-timeout", str(TIMER_F),
                                  program=app_argv(tmp_path, "run")), name="serve")
        wait_ready(serve, TIMER_F)
        registered = time.monotonic() - started
        started = time.monotonic()
        call = agents(agent_argv("call", server, "2501", "--register-timeout", str(TIMER_F),
                                 "--timeout", str(TIMER_B), target="2500",
                                 program=app_argv(tmp_path, "exit", 1.0)), name="call")
        wait_for(lambda: record(tmp_path, "client") and record(tmp_path, "server"),
                 TIMER_F + TIMER_B, what="session up", abort=call.exit_reason)
        session = time.monotonic() - started
        # the caller's program exits after 1 s: BYE, and the other program is stopped
        wait_for(lambda: (tmp_path / "server.stopped").exists(), TIMER_F + 2,
                 what="the answering side's program stopped")
        assert wait_exit(call, TIMER_F) == 0, call.log_text()
        print(f"lossy link: registered in {registered:.2f} s, session up in {session:.2f} s; "
              f"relay {relay.stats}")
        assert relay.stats.dropped > 0  # (the relay's own test shows it reorders and duplicates)
        assert len(relay.stats.clients) == 2  # both agents went through it
    assert broker.alive() and "Traceback" not in broker.log_text()
