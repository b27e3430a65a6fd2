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
from typing import Callable
from pathlib import Path

import pytest

from sipmesh.sip.message import Response
from tests.lab import LossyRelay, free_port, parse_stat_csv, sipp_args, spawn, wait_for, wait_udp_listening
from tests.lab.fixtures import stopped_gracefully
from tests.lab.agents import SIPMESH, agent_argv, app_argv, record, wait_exit, wait_ready
from tests.lab.broker import start_broker
from tests.lab.sipp import CALL_BEHAVIOURS
from tests.peers.raw import RawPeer

pytestmark = pytest.mark.slow

TIMER_B = TIMER_F = 32.0  # 64 * T1 (RFC 3261 §17): how long a transaction may take


def run_broker(tmp_path: Path, host: str, port: int, *args: str, prefix: list[str] = (), name="broker"):
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
    broker = run_broker(tmp_path, "127.0.0.2", port, "--domain", "127.0.0.1", "--workers", "1",
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


# -- the broker SIGKILLed under load ----------------------------------------------------------------

class Registrar:
    """Our own REGISTER client: one UDP socket, one REGISTER per user (no retransmission:
    a REGISTER counts only once its 200 has arrived), the 200s collected by Call-ID."""

    def __init__(self, broker: tuple[str, int], contact_port: int) -> None:
        self.broker, self.contact_port = broker, contact_port
        self.peer = RawPeer()
        self.peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        self.acked: set[str] = set()  # users whose REGISTER got its 200
        self.refused: dict[str, int] = {}

    def send(self, user: str) -> None:
        host, port = self.broker
        me = self.peer.port
        text = "\r\n".join([
            f"REGISTER sip:{host}:{port} SIP/2.0",
            f"Via: SIP/2.0/UDP 127.0.0.1:{me};branch=z9hG4bK{secrets.token_hex(8)};rport",
            "Max-Forwards: 70", f"From: <sip:{user}@{host}:{port}>;tag={secrets.token_hex(4)}",
            f"To: <sip:{user}@{host}:{port}>", f"Call-ID: reg-{user}", "CSeq: 1 REGISTER",
            f"Contact: <sip:{user}@127.0.0.1:{self.contact_port}>", "Expires: 600",
            "Content-Length: 0", "", ""])
        try:
            self.peer.send(text.encode(), self.broker)
        except OSError:
            pass  # the broker is gone (ICMP): this one is simply not acknowledged

    def drain(self, wait: float = 0.0, until: Callable[[], bool] | None = None) -> None:
        """Read the answers that came; with `wait`, go on reading that long (or until
        `until()` holds)."""
        deadline = time.monotonic() + wait
        while True:
            got = self.peer.recv_blocking(0.005)
            if got is None:
                if time.monotonic() >= deadline or (until is not None and until()):
                    return
                continue
            response = got[0]
            if isinstance(response, Response) and response.call_id.startswith("reg-"):
                user = response.call_id[4:]
                if response.status == 200:
                    self.acked.add(user)
                elif response.status >= 300:
                    self.refused[user] = response.status

    def close(self) -> None:
        self.peer.close()


def test_no_acknowledged_registration_is_lost_when_the_broker_is_sigkilled(tmp_path, sipp):
    """1,000 REGISTERs at about 2,000/s while SIPp places calls through the broker (2
    workers); the whole broker is SIGKILLed half way. Every REGISTER that got its 200
    before is in the location store after the restart, and routes."""
    port = free_port("both")
    extra = ["--workers", "2"]
    broker, _ = start_broker(tmp_path, port=port, extra=extra, name="broker1")
    users = sipp.make_users(1)
    uas_port = free_port("both")
    reg = sipp.run(sipp_args("reg_noauth", f"127.0.0.1:{port}", local_port=uas_port, calls=1,
                             extra=["-inf", str(users.uas_csv)]), timeout=20, name="reg_uas")
    assert reg.ok and reg.successful == 1, str(reg)
    uas = sipp.start(sipp_args("uas_rr", local_port=uas_port), name="uas", wait_bound=("127.0.0.1", uas_port))
    calls = sipp.start(sipp_args("uac_rr", f"127.0.0.1:{port}", local_port=free_port("both"), calls=5000,
                                 rate=300, extra=["-s", "uas", *CALL_BEHAVIOURS]), name="uac")
    wait_for(lambda: _successful_calls(calls) >= 10, 15, what="calls flowing", abort=calls.exit_reason)
    registrar = Registrar(("127.0.0.1", port), uas_port)
    total, killed_after = 1000, None
    try:
        for i in range(total):
            registrar.send(f"r{i:04d}")
            if i % 20 == 19:
                # at most ~100 REGISTERs in flight, so that on a loaded machine too the
                # kill lands while registrations are still being sent (once it has, the rest
                # are sent without waiting: no 200 can come)
                registrar.drain(wait=2.0, until=lambda: killed_after is not None
                                or len(registrar.acked) >= i + 1 - 100)
                time.sleep(0.01)
            if killed_after is None and len(registrar.acked) >= 400:
                broker.signal_group(signal.SIGKILL)  # supervisor and workers, no warning
                killed_after = i + 1
        registrar.drain(wait=1.0)  # 200s already on their way
        assert killed_after is not None, f"only {len(registrar.acked)} of {total} acknowledged"
        broker.wait(5)
        answered = _successful_calls(calls)
        calls.stop()
        acked = set(registrar.acked)
        assert len(acked) >= 400 and not registrar.refused, registrar.refused
        assert len(acked) < total  # the kill did interrupt the registrations

        broker2, _ = start_broker(tmp_path, port=port, extra=extra, name="broker2")
        db = tmp_path / "broker.db"
        with sqlite3.connect(db) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            stored = {row[0].split(":", 1)[1].split("@", 1)[0]
                      for row in conn.execute("SELECT aor FROM bindings WHERE aor LIKE 'sip:r%'")}
        missing = acked - stored
        assert not missing, f"{len(missing)} acknowledged registrations lost: {sorted(missing)[:10]}"
        print(f"SIGKILL after {killed_after} REGISTERs sent and {answered} calls: {len(acked)} "
              f"acknowledged, {len(stored)} stored")
        assert broker2.alive(), broker2.log_tail()
    finally:
        registrar.close()


def _successful_calls(sipp_process) -> int:
    last, _ = parse_stat_csv(sipp_process.stat_path)
    return int(last.get("SuccessfulCall(C)", "0") or 0)


# -- a state directory that fills up ------------------------------------------------------------------

# Runs the broker in a private mount namespace on a small tmpfs (gone with the namespace),
# then, once the broker has exited, checks the database it left there.
_IN_SMALL_TMPFS = r'''
mount -t tmpfs -o size="$SIZE" tmpfs "$STATE" || exit 97
head -c 64k /dev/zero > "$STATE/filler"
"$@" &
echo $! > "$PIDFILE"
wait $!
rc=$?
"$PYTHON" - "$STATE/broker.db" > "$RESULT" <<'PY'
import json, sqlite3, sys
with sqlite3.connect(sys.argv[1]) as db:
    check = db.execute("PRAGMA integrity_check").fetchone()[0]
    aors = [row[0] for row in db.execute("SELECT aor FROM bindings")]
print(json.dumps({"integrity": check, "aors": aors}))
PY
exit $rc
'''


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare (a private mount namespace)")
def test_a_full_state_directory_refuses_registers_and_corrupts_nothing(tmp_path):
    """The location store's file system fills up under a 2-worker broker: REGISTERs get
    500 (with Retry-After) and one log line each batch, the acknowledged ones are all
    kept, the database passes integrity_check, and once there is space again REGISTERs
    are accepted again. (A read-only state directory is refused at start: see
    test_broker_config; a busy tmpfs cannot be remounted read-only under the broker.)"""
    state, port = tmp_path / "state", free_port("both")
    state.mkdir()
    env = dict(os.environ, SIZE="192k", STATE=str(state), PIDFILE=str(tmp_path / "broker.pid"),
               RESULT=str(tmp_path / "result.json"), PYTHON=sys.executable)
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", _IN_SMALL_TMPFS, "sh",
            SIPMESH, "broker", "--listen", f"127.0.0.1:{port}", "--domain", "127.0.0.1", "--workers", "2",
            "--rate-limit", "0", "--db", str(state / "broker.db")]
    shell = spawn(argv, cwd=tmp_path, env=env, log_path=tmp_path / "broker.log", name="broker")
    wait_udp_listening("127.0.0.1", port, proc=shell, timeout=15)
    registrar = Registrar(("127.0.0.1", port), free_port("udp"))
    try:
        sent = 0
        while len(registrar.refused) < 20:
            assert sent < 5000, f"the disk never filled: {len(registrar.acked)} acknowledged"
            registrar.send(f"r{sent:04d}")
            sent += 1
            if sent % 20 == 0:
                registrar.drain(wait=0.05)
        registrar.drain(wait=0.5)
        # still answering, and the same way, once the disk is full
        before = len(registrar.refused)
        for i in range(sent, sent + 20):
            registrar.send(f"r{i:04d}")
        registrar.drain(wait=5.0, until=lambda: len(registrar.refused) >= before + 20)
        assert len(registrar.refused) >= before + 20
        # space again (the filler file goes): registrations are accepted again
        pid = int((tmp_path / "broker.pid").read_text())
        subprocess.run(["nsenter", f"--mount=/proc/{pid}/ns/mnt", "rm", str(state / "filler")],
                       check=True, timeout=10)
        recovered = [f"again{i:02d}" for i in range(20)]
        for user in recovered:
            registrar.send(user)
        registrar.drain(wait=1.0)
        assert set(recovered) <= registrar.acked, registrar.refused
    finally:
        registrar.close()
    os.kill(pid, signal.SIGTERM)
    assert shell.wait(20) == 0, shell.log_tail()
    statuses = set(registrar.refused.values())
    assert statuses <= {500, 503}, statuses
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["integrity"] == "ok"
    stored = {aor.split(":", 1)[1].split("@", 1)[0] for aor in result["aors"]}
    missing = registrar.acked - stored
    assert not missing, f"{len(missing)} acknowledged registrations lost"
    log = shell.log_text()
    assert "Traceback" not in log and "database or disk is full" in log, shell.log_tail()
    print(f"disk full: {len(registrar.acked)} registrations acknowledged and kept, "
          f"{len(registrar.refused)} refused with {sorted(statuses)}")
