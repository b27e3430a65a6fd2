"""Running as systemd services: the units, readiness (Type=notify) and reload (SIGHUP).

No systemd runs here (PID 1 is not systemd, so no unit can be started): the units are
checked with `systemd-analyze verify` and `systemd-analyze security --offline`, as
`scripts/install --systemd` installs them, and readiness is checked the way systemd
sees it: on a $NOTIFY_SOCKET the test binds, with the sender's pid from SCM_CREDENTIALS
(NotifyAccess=main listens to the main process only).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from sipmesh.broker.users import UsersFile
from tests.lab import free_port, listening_sockets, spawn, wait_for, wait_udp_listening
from tests.peers.daemon import config_text

ROOT = Path(__file__).resolve().parents[1]
SIPMESH = str(Path(sys.executable).parent / "sipmesh")
UNITS = ("sipmesh-broker.service", "sipmesh@.service")


class NotifySocket:
    """What systemd would receive on $NOTIFY_SOCKET: (pid, {assignment: value})."""

    def __init__(self, address: str) -> None:
        self.env = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)

    def next(self, timeout: float = 15.0) -> tuple[int, dict[str, str]]:
        self.sock.settimeout(timeout)
        try:
            data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except TimeoutError:
            raise AssertionError(f"no notification within {timeout} s") from None
        pid = next(struct.unpack("iII", cdata)[0] for level, kind, cdata in ancillary
                   if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS)
        fields = dict(line.split("=", 1) for line in data.decode().splitlines())
        return pid, fields

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path):
    sock = NotifySocket(str(tmp_path / "notify"))
    yield sock
    sock.close()


def options_answered(port: int) -> bool:
    """An OPTIONS to the broker itself gets its 200 at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(2.0)
        local = s.getsockname()[1]
        s.sendto((f"OPTIONS sip:127.0.0.1:{port} SIP/2.0\r\n"
                  f"Via: SIP/2.0/UDP 127.0.0.1:{local};branch=z9hG4bK{uuid.uuid4().hex}\r\n"
                  f"From: <sip:probe@127.0.0.1>;tag=1\r\nTo: <sip:127.0.0.1:{port}>\r\n"
                  f"Call-ID: {uuid.uuid4().hex}\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\n"
                  "Content-Length: 0\r\n\r\n").encode(), ("127.0.0.1", port))
        return s.recv(65535).startswith(b"SIP/2.0 200 ")


# -- the units ---------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing "
                    "(scripts/install --test installs the systemd package)")
def test_installed_units_verify_cleanly_and_stay_hardened(tmp_path: Path) -> None:
    stage = tmp_path / "root"
    env = dict(os.environ, DESTDIR=str(stage))
    installed = subprocess.run(["bash", str(ROOT / "scripts" / "install"), "--systemd"], cwd=ROOT,
                               env=env, capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    units = stage / "etc" / "systemd" / "system"
    for unit in UNITS:  # the services run this checkout's sipmesh
        assert f"ExecStart={ROOT}/.venv/bin/sipmesh " in (units / unit).read_text()
    # a template is verified as an instance, as systemctl would load it
    shutil.copy(units / "sipmesh@.service", units / "sipmesh@home.service")
    checked = [units / "sipmesh-broker.service", units / "sipmesh@home.service"]
    verify = subprocess.run(["systemd-analyze", "verify", *map(str, checked)], capture_output=True,
                            text=True, timeout=60)
    # verify exits 0 on unknown keys and bad values, but says so: nothing may be said about
    # ours (it also loads the machine's other units, whose warnings are not ours to judge)
    ours = [line for line in (verify.stdout + verify.stderr).splitlines()
            if not line.startswith(("/lib/systemd/", "/usr/lib/systemd/", "/etc/systemd/"))]
    assert verify.returncode == 0 and not ours, "\n".join(ours)
    for path in checked:
        security = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(path)],
                                  capture_output=True, text=True, timeout=60)
        level = re.search(r"Overall exposure level for \S+: ([\d.]+)", security.stdout + security.stderr)
        assert level and float(level.group(1)) <= 2.5, security.stdout[-2000:]
    broker_unit = (units / "sipmesh-broker.service").read_text()
    daemon_unit = (units / "sipmesh@.service").read_text()
    assert "CAP_NET_ADMIN" not in broker_unit and "User=sipmesh" in broker_unit
    assert "AmbientCapabilities=CAP_NET_ADMIN" in daemon_unit and "User=sipmesh" in daemon_unit
    # the service user and the directory for wireguard-go, as the installer makes them
    users = subprocess.run(["systemd-sysusers", f"--root={stage}"], capture_output=True, text=True,
                           timeout=60)
    assert users.returncode == 0 and "sipmesh:" in (stage / "etc" / "passwd").read_text(), users.stderr
    tmpfiles = subprocess.run(["systemd-tmpfiles", f"--root={stage}", "--create"],
                              capture_output=True, text=True, timeout=60)
    assert tmpfiles.returncode == 0 and (stage / "run" / "wireguard").is_dir(), tmpfiles.stderr
    assert (stage / "etc" / "sipmesh" / "broker-users").stat().st_mode & 0o077 == 0


def test_root_editing_the_services_users_file_leaves_it_the_services(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    path = tmp_path / "broker-users"
    path.write_text("")
    os.chown(path, 65534, 65534)  # as if it were the sipmesh user's
    users = UsersFile(path)
    users.add("example.org", "alice", "s3cret")
    users.save()
    info = path.stat()
    assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (65534, 65534, 0o600)


# -- readiness and reload ------------------------------------------------------------------

@pytest.mark.parametrize("workers", [1, 2])
def test_broker_is_ready_when_every_worker_serves_and_reloads_on_sighup(
        tmp_path: Path, notify: NotifySocket, workers: int) -> None:
    users = UsersFile(tmp_path / "users")
    users.add("127.0.0.1", "alice", "one")
    users.save()
    port = free_port("both")
    proc = spawn([SIPMESH, "broker", "--listen", f"127.0.0.1:{port}", "--domain", "127.0.0.1",
                  "--db", str(tmp_path / "broker.db"), "--users", str(tmp_path / "users"),
                  "--workers", str(workers), "--rate-limit", "0"],
                 cwd=tmp_path, env=dict(os.environ, NOTIFY_SOCKET=notify.env),
                 log_path=tmp_path / "broker.log", name="broker")
    pid, fields = notify.next()
    assert fields.get("READY") == "1" and pid == proc.pid, (pid, fields, proc.log_tail())
    # at that moment every worker has its socket in the SO_REUSEPORT group, and answers
    bound = [p for _, p in listening_sockets("udp") if p == port]
    assert len(bound) == workers
    assert options_answered(port)

    users.add("127.0.0.1", "bob", "two")
    users.save()
    os.kill(proc.pid, signal.SIGHUP)  # systemctl reload
    pid, fields = notify.next()
    assert fields.get("RELOADING") == "1" and "MONOTONIC_USEC" in fields and pid == proc.pid
    pid, fields = notify.next()
    assert fields.get("READY") == "1" and pid == proc.pid, fields
    # no request came in: only the SIGHUP can have made the workers read the file again
    wait_for(lambda: len(re.findall(r"users file \S+ reloaded: 2 users", proc.log_text())) == workers, 5,
             what="every worker re-read the users file", abort=proc.exit_reason)
    assert proc.alive() and options_answered(port)
    proc.signal_group(signal.SIGTERM)
    assert proc.wait(10) == 0, proc.log_tail()
    assert "Traceback" not in proc.log_text()


def test_daemon_is_ready_once_registered_and_reloads_on_sighup(
        tmp_path: Path, broker_address: str) -> None:
    address = f"@sipmesh-test-{uuid.uuid4().hex}"  # an abstract socket, as systemd may use
    notify = NotifySocket(address)
    out = tmp_path / "rec"
    out.mkdir()
    config = tmp_path / "daemon.toml"
    config.write_text(config_text(broker_address, out).replace(
        "[agent]\n", f'[agent]\ncontrol_socket = "{tmp_path / "run" / "home.sock"}"\n'))
    try:
        daemon = spawn([SIPMESH, "daemon", "-c", str(config), "-q"], cwd=tmp_path,
                       env=dict(os.environ, NOTIFY_SOCKET=address), log_path=tmp_path / "daemon.log",
                       name="daemon")
        pid, fields = notify.next()
        assert pid == daemon.pid and fields.get("READY") == "1", (fields, daemon.log_tail())
        assert fields["STATUS"] == f"registered as sip:home@{broker_address}", fields
        os.kill(daemon.pid, signal.SIGHUP)
        pid, fields = notify.next()
        assert fields.get("RELOADING") == "1" and pid == daemon.pid
        pid, fields = notify.next()
        assert fields.get("READY") == "1" and "configuration reloaded (generation 2)" in fields["STATUS"]
        daemon.signal_group(signal.SIGTERM)
        assert daemon.wait(20) == 0, daemon.log_tail()
    finally:
        notify.close()
