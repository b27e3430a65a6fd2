"""A real softphone through the broker: two headless baresip instances (driven over
their ctrl_tcp socket) register with digest and call each other. Skipped when baresip
is not installed (apt-get install baresip-core)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sipmesh.broker.users import UsersFile
from tests.lab import wait_for
from tests.lab.baresip import Ctrl, bindings, start_baresip
from tests.lab.broker import start_broker

pytestmark = pytest.mark.skipif(shutil.which("baresip") is None, reason="baresip is not installed "
                                "(apt-get install --no-install-recommends baresip-core)")


def test_baresip_registers_with_digest_and_calls_baresip_through_the_broker(tmp_path):
    users = UsersFile(tmp_path / "users")
    users.add("127.0.0.1", "alice", "alice-pw")
    users.add("127.0.0.1", "bob", "bob-pw")
    users.save()
    broker, port = start_broker(tmp_path, users=tmp_path / "users", extra=["--auth-algorithms", "MD5"])
    alice, alice_ctrl = start_baresip(tmp_path, "alice", port, "alice-pw")
    bob, _ = start_baresip(tmp_path, "bob", port, "bob-pw")
    wait_for(lambda: bindings(tmp_path / "broker.db") >= {"sip:alice@127.0.0.1", "sip:bob@127.0.0.1"},
             15, what="both baresips registered",
             abort=lambda: broker.exit_reason() or alice.exit_reason() or bob.exit_reason())
    ctrl = Ctrl(alice_ctrl)
    try:
        ctrl.send("dial", f"sip:bob@127.0.0.1:{port}")
        event = ctrl.event({"CALL_ESTABLISHED", "CALL_CLOSED"})
        assert event["type"] == "CALL_ESTABLISHED", (event, broker.log_tail(), bob.log_tail())
        ctrl.send("hangup")
        ctrl.event({"CALL_CLOSED"})
    finally:
        ctrl.close()
    assert broker.alive() and "Traceback" not in broker.log_text(), broker.log_tail(60)
