"""`sipmesh broker` as a real process, driven by SIPp: registrations from an injection
CSV with and without digest, and uac -> broker -> uas calls over UDP and TCP."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from sipmesh.broker.users import UsersFile
from tests.lab import free_port, sipp_args, wait_tcp_listening
from tests.lab.broker import start_broker

from tests.lab.sipp import CALL_BEHAVIOURS


def bindings_in(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT COUNT(*) FROM bindings").fetchone()[0]


def test_sipp_registers_50_users_without_auth(tmp_path, sipp):
    broker, port = start_broker(tmp_path)
    users = sipp.make_users(50)
    res = sipp.run(sipp_args("reg_noauth", f"127.0.0.1:{port}", local_port=free_port("udp"), calls=50,
                             rate=200, extra=["-inf", str(users.users_csv)]), timeout=30, name="reg")
    assert res.returncode == 0 and res.successful == 50 and res.failed == 0, str(res)
    assert bindings_in(tmp_path / "broker.db") == 50
    assert broker.alive(), broker.log_tail()


def test_sipp_registers_50_users_with_digest(tmp_path, sipp):
    users = sipp.make_users(50)
    users_file = UsersFile(tmp_path / "users")
    for user, password in users.users:
        users_file.add("127.0.0.1", user, password)
    users_file.save()
    # SIPp answers the first challenge only, and knows MD5 only
    broker, port = start_broker(tmp_path, users=tmp_path / "users", extra=["--auth-algorithms", "MD5"])
    res = sipp.run(sipp_args("reg_auth", f"127.0.0.1:{port}", local_port=free_port("udp"), calls=50,
                             rate=200, extra=["-inf", str(users.users_csv)]), timeout=30, name="reg_auth")
    assert res.returncode == 0 and res.successful == 50 and res.failed == 0, str(res)
    assert bindings_in(tmp_path / "broker.db") == 50
    assert "pwu0" not in broker.log_text()  # no password in the log


def test_sipp_wrong_passwords_never_register(tmp_path, sipp):
    users = sipp.make_users(3)
    users_file = UsersFile(tmp_path / "users")
    for user, password in users.users:
        users_file.add("127.0.0.1", user, "not-" + password)
    users_file.save()
    _, port = start_broker(tmp_path, users=tmp_path / "users", extra=["--auth-algorithms", "MD5"])
    res = sipp.run(sipp_args("reg_auth", f"127.0.0.1:{port}", local_port=free_port("udp"), calls=3,
                             rate=50, extra=["-inf", str(users.users_csv)]),
                   timeout=30, recv_timeout_ms=2000, name="reg_bad")
    assert res.successful == 0 and res.failed == 3, str(res)
    assert bindings_in(tmp_path / "broker.db") == 0


@pytest.mark.parametrize("transport,workers", [("udp", 1), ("tcp", 1), ("udp", 2)])
def test_sipp_calls_through_the_broker(tmp_path, sipp, transport, workers):
    broker, port = start_broker(tmp_path, extra=["--workers", str(workers)])
    users = sipp.make_users(1)
    flag = ["-t", "t1"] if transport == "tcp" else []
    uas_port = free_port("both")
    reg = sipp.run(sipp_args("reg_noauth", f"127.0.0.1:{port}", local_port=uas_port, calls=1,
                             extra=["-inf", str(users.uas_csv), *flag]), timeout=20, name="reg_uas")
    assert reg.ok and reg.successful == 1, str(reg)
    uas = sipp.start(sipp_args("uas_rr", local_port=uas_port, extra=flag), name="uas",
                     wait_bound=("127.0.0.1", uas_port) if transport == "udp" else None)
    if transport == "tcp":
        wait_tcp_listening("127.0.0.1", uas_port, proc=uas)
    res = sipp.run(sipp_args("uac_rr", f"127.0.0.1:{port}", local_port=free_port("both"), calls=50, rate=50,
                             extra=["-s", "uas", *CALL_BEHAVIOURS, *flag]), timeout=40, name="uac")
    assert res.returncode == 0 and res.successful == 50 and res.failed == 0, str(res)
    assert res.unexpected == 0, str(res)
    assert uas.alive(), uas.log_tail()
    assert broker.alive(), broker.log_tail()
    assert "Traceback" not in broker.log_text(), broker.log_tail(60)
