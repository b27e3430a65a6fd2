"""Prometheus metrics of a live broker and a live daemon, scraped over HTTP and parsed with
prometheus_client's own parser while real traffic (SIPp, sipmesh call) moves them."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import urllib.request
from collections import defaultdict
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from sipmesh.broker.users import UsersFile
from tests.lab import ManagedProcess, free_port, sipp_args, spawn, wait_for, wait_tcp_listening
from tests.lab.broker import start_broker
from tests.peers.daemon import RECORDER, config_text

SIPMESH = str(Path(sys.executable).parent / "sipmesh")


def scrape(port: int) -> dict[str, dict[tuple, float]]:
    """{sample name: {labels as sorted (name, value) pairs: value}}"""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = response.read().decode()
    samples: dict[str, dict[tuple, float]] = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def total(samples: dict[str, dict[tuple, float]], name: str, **labels: str) -> float:
    """The sum over workers (and any label not given) of `name`'s samples matching `labels`."""
    return sum(value for key, value in samples.get(name, {}).items()
               if all(dict(key).get(k) == v for k, v in labels.items()))


def test_broker_metrics_move_with_sipp_registrations_and_failed_logins(tmp_path: Path, sipp) -> None:
    good = sipp.make_users(20)
    users_file = UsersFile(tmp_path / "users")
    for user, password in good.users:
        users_file.add("127.0.0.1", user, password)
    bad_users = [(f"w{i:06d}", f"pww{i:06d}") for i in range(1, 11)]
    for user, password in bad_users:
        users_file.add("127.0.0.1", user, "not-" + password)
    users_file.save()
    metrics = free_port("tcp")
    proc, port = start_broker(tmp_path, users=tmp_path / "users",
                              extra=["--workers", "2", "--auth-algorithms", "MD5",
                                     "--metrics", str(metrics)])  # a bare port: loopback
    wait_tcp_listening("127.0.0.1", metrics, proc=proc)
    before = scrape(metrics)
    assert total(before, "sipmesh_broker_registrations") == 0
    assert total(before, "sipmesh_broker_requests_total") == 0
    assert total(before, "sipmesh_broker_workers") == 2
    assert {dict(k)["worker"] for k in before["sipmesh_broker_worker_cpu_seconds_total"]} == {"0", "1"}

    res = sipp.run(sipp_args("reg_auth", f"127.0.0.1:{port}", local_port=free_port("udp"), calls=20,
                             rate=100, extra=["-inf", str(good.users_csv)]), timeout=30, name="reg")
    assert res.successful == 20, str(res)
    # each REGISTER twice: first without credentials (401), then with them (200);
    # the workers post their counters once a second
    after = wait_for(lambda: (s := scrape(metrics)) and
                     total(s, "sipmesh_broker_responses_total", method="REGISTER", **{"class": "2xx"}) == 20
                     and s, 10, what="20 REGISTERs answered 200 in the metrics", abort=proc.exit_reason)
    assert total(after, "sipmesh_broker_registrations") == 20
    assert total(after, "sipmesh_broker_requests_total", method="REGISTER") >= 40
    assert total(after, "sipmesh_broker_responses_total", method="REGISTER", **{"class": "4xx"}) >= 20
    assert total(after, "sipmesh_broker_auth_failures_total") == 0
    assert total(after, "sipmesh_broker_worker_cpu_seconds_total") > \
        total(before, "sipmesh_broker_worker_cpu_seconds_total")

    wrong = sipp.dir / "wrong.csv"
    wrong.write_text("SEQUENTIAL\n" + "".join(
        f"{u};{pw};[authentication username={u} password={pw}]\n" for u, pw in bad_users))
    sipp.run(sipp_args("reg_auth", f"127.0.0.1:{port}", local_port=free_port("udp"), calls=10, rate=100,
                       extra=["-inf", str(wrong)]), timeout=30, recv_timeout_ms=2000, name="reg_bad")
    failed = wait_for(lambda: (s := scrape(metrics)) and
                      total(s, "sipmesh_broker_auth_failures_total") == 10 and s, 10,
                      what="10 authentication failures in the metrics", abort=proc.exit_reason)
    assert total(failed, "sipmesh_broker_registrations") == 20  # none of them registered
    assert total(failed, "sipmesh_broker_responses_total", method="REGISTER", **{"class": "4xx"}) >= 40
    assert total(failed, "sipmesh_broker_responses_total", method="REGISTER", **{"class": "2xx"}) == 20
    proc.signal_group(signal.SIGTERM)
    assert proc.wait(10) == 0, proc.log_tail()


def test_a_metrics_port_in_use_stops_the_broker_with_the_reason(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        for workers in ("1", "2"):
            result = subprocess.run(
                [SIPMESH, "broker", "--listen", f"127.0.0.1:{free_port('both')}", "--workers", workers,
                 "--db", str(tmp_path / "b.db"), "--metrics", f"127.0.0.1:{taken}"],
                capture_output=True, text=True, timeout=30)
            assert result.returncode == 1, result.stderr
            assert f"metrics on 127.0.0.1:{taken}" in result.stderr and "Traceback" not in result.stderr
    bad = subprocess.run([SIPMESH, "broker", "--metrics", "::1"], capture_output=True, text=True,
                         timeout=30)
    assert bad.returncode == 2 and "HOST:PORT" in bad.stderr


def test_daemon_metrics_follow_its_sessions(tmp_path: Path, broker_address: str) -> None:
    out = tmp_path / "rec"
    out.mkdir()
    (out / "recorder.py").write_text(RECORDER)
    metrics = free_port("tcp")
    config = tmp_path / "daemon.toml"
    config.write_text(config_text(broker_address, out).replace(
        "[agent]\n", f'[agent]\ncontrol_socket = "{tmp_path / "run" / "home.sock"}"\n'))
    daemon = spawn([SIPMESH, "daemon", "-c", str(config), "--metrics", f"127.0.0.1:{metrics}"],
                   log_path=tmp_path / "daemon.log", name="daemon")
    wait_for(lambda: "ready as sip:home@" in daemon.log_text(), 15, what="the daemon",
             abort=daemon.exit_reason)
    idle = scrape(metrics)
    assert total(idle, "sipmesh_daemon_registered", aor=f"sip:home@{broker_address}") == 1
    assert total(idle, "sipmesh_daemon_sessions") == 0
    assert total(idle, "sipmesh_daemon_service_max_sessions", service="alpha") == 20

    def call(user: str) -> ManagedProcess:  # alpha's calling half, from the same file
        return spawn([SIPMESH, "call", "home", "--service", "alpha", "-c", str(config), "--user", user,
                      "--server", broker_address, "--bind", "127.0.0.1", "--advertise", "127.0.0.1",
                      "--param", "NICK=nick"], log_path=tmp_path / f"{user}.log", name=user)

    refused = call("mallory")  # not in alpha's allow: 403
    assert refused.wait(20) != 0
    caller = call("alice")
    busy = wait_for(lambda: (s := scrape(metrics)) and
                    total(s, "sipmesh_daemon_sessions", service="alpha", state="established") == 1 and s,
                    20, what="the session in the metrics", abort=caller.exit_reason)
    assert total(busy, "sipmesh_daemon_sessions_established_total") == 1
    assert total(busy, "sipmesh_daemon_invites_refused_total", status="403") == 1
    assert total(busy, "sipmesh_daemon_allocated_ports") == 1
    caller.stop(grace=10)
    wait_for(lambda: total(scrape(metrics), "sipmesh_daemon_sessions") == 0, 15,
             what="the session to end in the metrics")
    daemon.stop(grace=15)
    assert daemon.returncode == 0, daemon.log_tail()
