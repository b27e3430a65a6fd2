"""The location service survives SIGKILL: `python -m sipmesh broker` is killed without
warning, started again on the same database, and every binding still routes."""

from __future__ import annotations

import os
import secrets
import signal

import pytest

from sipmesh.sip.message import Request, Response, make_response
from tests.lab import free_port, wait_for
from tests.lab.broker import start_broker
from tests.peers.raw import RawPeer, is_final, raw_request

USERS = 30


def _request(peer: RawPeer, method: str, uri: str, *, to: str, call_id: str,
             extra: list[str] = ()) -> bytes:
    return raw_request(method, uri, peer, call_id=call_id, from_tag=secrets.token_hex(4), to=to,
                       branch="z9hG4bK" + secrets.token_hex(8), contact=False, extra="\n".join(extra))


def _final(peer: RawPeer, call_id: str) -> Response:
    message, _ = peer.expect_blocking(is_final(call_id), 5, what=f"a final response for {call_id}")
    assert isinstance(message, Response)
    return message


@pytest.mark.parametrize("workers", [1, 2])
def test_bindings_survive_sigkill_and_still_route(tmp_path, workers):
    port = free_port("both")
    broker_addr = ("127.0.0.1", port)
    extra = ["--workers", str(workers)]
    broker, _ = start_broker(tmp_path, port=port, extra=extra, name="broker1")
    sink, caller = RawPeer(), RawPeer()
    try:
        for i in range(USERS):
            user = f"r{i:03d}"
            cid = f"reg-{user}"
            sink.send(_request(sink, "REGISTER", f"sip:127.0.0.1:{port}", to=f"sip:{user}@127.0.0.1:{port}",
                               call_id=cid, extra=[f"Contact: <sip:{user}@127.0.0.1:{sink.port}>",
                                                   "Expires: 600"]), broker_addr)
            assert _final(sink, cid).status == 200

        os.kill(broker.pid, signal.SIGKILL)  # no chance to flush or close anything
        broker.wait(5)
        wait_for(lambda: not any(p for p in os.listdir("/proc") if p.isdigit() and _holds_port(p, port)),
                 5, what="every worker gone")
        broker2, _ = start_broker(tmp_path, port=port, extra=extra, name="broker2")

        reached = set()
        for i in range(USERS):
            user = f"r{i:03d}"
            cid = f"opt-{user}"
            caller.send(_request(caller, "OPTIONS", f"sip:{user}@127.0.0.1:{port}",
                                 to=f"sip:{user}@127.0.0.1:{port}", call_id=cid), broker_addr)
            forwarded, addr = sink.expect_blocking(lambda m: True, 3, what=f"the forwarded {cid}")
            assert isinstance(forwarded, Request) and forwarded.method == "OPTIONS"
            assert str(forwarded.uri) == f"sip:{user}@127.0.0.1:{sink.port}"
            sink.send(make_response(forwarded, 200, to_tag="s").to_bytes(), addr)
            assert _final(caller, cid).status == 200
            reached.add(user)
        assert len(reached) == USERS
        assert broker2.alive(), broker2.log_tail()
    finally:
        sink.close()
        caller.close()


def _holds_port(pid: str, port: int) -> bool:
    """Does process `pid` hold a socket bound to `port`? (a killed worker must not linger)"""
    try:
        inodes = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    except OSError:
        return False
    sockets = {i[8:-1] for i in inodes if i.startswith("socket:[")}
    if not sockets:
        return False
    hexport = f":{port:04X}"
    for table in ("udp", "tcp"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                for line in f.readlines()[1:]:
                    cols = line.split()
                    if cols[1].endswith(hexport) and cols[9] in sockets:
                        return True
        except OSError:
            pass
    return False
