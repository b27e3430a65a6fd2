"""`sip_app`: the prototype's command line, defaults and program arguments (loopback,
Kamailio as the SIP server). The OpenVPN run of the paper's scripts is in test_openvpn.py."""

from __future__ import annotations

import socket
import subprocess

import pytest

from tests.lab import free_port, wait_for
from tests.lab.agents import (SIP_APP, SIPMESH, agents, app_argv, no_orphans,  # noqa: F401 (fixtures)
                              record, wait_exit)

USAGE_START = "Usage... sip_app -s proxy[:port] -u user [-p port] [-t call_user]"


@pytest.mark.parametrize("argv", [
    [], ["-s", "127.0.0.1"], ["-s", "127.0.0.1", "-u", "2500"], ["-u", "2500", "-m", "x"],
    ["-s", "127.0.0.1", "-u", "2500", "-z", "-m", "/bin/true"],
    ["-s", "127.0.0.1", "-u", "2500", "-v", "eighty", "-m", "/bin/true"],
    ["-s", "127.0.0.1", "-u", "2500", "-l", "192.168.234", "-m", "/bin/true"],
    ["-s", "127.0.0.1:99999", "-u", "2500", "-m", "/bin/true"],
    ["-s", "127.0.0.1", "-u", "2500", "-m"],
])
def test_usage_errors_print_the_usage_line_and_exit_1(argv):
    p = subprocess.run([SIP_APP, *argv], capture_output=True, text=True, timeout=20)
    assert p.returncode == 1
    assert USAGE_START in p.stderr and "-m program [args]" in p.stderr


def test_remote_tunnel_address_cannot_be_derived_from_255():
    p = subprocess.run([SIP_APP, "-s", "127.0.0.1", "-u", "2500", "-l", "10.0.0.255",
                        "-m", "/bin/true"], capture_output=True, text=True, timeout=20)
    assert p.returncode == 1 and "assign remoteip failed" in p.stderr


@pytest.mark.slow
def test_prototype_arguments_are_appended_after_the_users(kamailio, agents, tmp_path):
    k = kamailio()
    blocked = free_port("both")  # -v PORT is taken: the next free one is used
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind(("0.0.0.0", blocked))
    try:
        serve = agents([SIP_APP, "-s", k.hostport, "-u", "2500", "-p", str(free_port("both")),
                        "-v", str(blocked), "-l", "10.8.0.1", "-d", "-f",
                        str(tmp_path / "log" / "server.txt"), "-m", *app_argv(tmp_path, "run")],
                       name="sip_app-server")
        wait_for(lambda: k.registered("2500"), 10, abort=serve.exit_reason)
        text = serve.log_text()
        assert "PROXY sip:" in text and "VPN_LOCAL 10.8.0.1" in text and "VPN_REMOTE 10.8.0.2" in text
        call = agents([SIP_APP, "-s", k.hostport, "-u", "2501", "-t", "2500",
                       "-p", str(free_port("both")), "-m", *app_argv(tmp_path, "exit", 0.2)],
                      name="sip_app-client")
        assert wait_exit(call) == 0, call.log_text()
    finally:
        holder.close()
    server, client = record(tmp_path, "server"), record(tmp_path, "client")
    port = server["argv"][-3]
    assert int(port) > blocked
    # server: PORT VPN_LOCAL_ADDR VPN_REMOTE_ADDR; client: IP4 PORT VPN_LOCAL_ADDR VPN_REMOTE_ADDR
    assert server["argv"][-3:] == [port, "10.8.0.1", "10.8.0.2"]
    assert client["argv"][-4:] == ["127.0.0.1", port, "10.8.0.1", "10.8.0.2"]
    assert server["argv"][1:4] == [str(tmp_path), "run", "0.5"]  # the user's own args first
    wait_for(lambda: (tmp_path / "server.stopped").exists(), 10, what="server program stopped")
    assert serve.alive()  # one session, then waits for the next INVITE
    log = (tmp_path / "log" / "server.txt").read_text()
    assert "m=application/vpn" in log and "a=VPN_LOCAL_ADDR:10.8.0.1" in log
    assert "REGISTER sip:" in log and "Expires: 3600" in log


@pytest.mark.slow
def test_sip_app_and_sipmesh_call_interoperate(kamailio, agents, tmp_path):
    k = kamailio()
    serve = agents([SIP_APP, "-s", k.hostport, "-u", "2500", "-p", str(free_port("both")),
                    "-m", *app_argv(tmp_path, "run")], name="sip_app")
    wait_for(lambda: k.registered("2500"), 10, abort=serve.exit_reason)
    call = agents([SIPMESH, "call", "2500", "--server", k.hostport, "--user", "2501", "--vpn",
                   "--", *app_argv(tmp_path, "exit", 0.1), "{VPN_REMOTE_ADDR}"], name="call")
    assert wait_exit(call) == 0, call.log_text()
    client = record(tmp_path, "client")
    assert client["argv"][-1] == "192.168.234.2"
    assert client["env"]["SIPMESH_VPN_LOCAL_ADDR"] == "192.168.234.1"


@pytest.mark.slow
@pytest.mark.parametrize("status,code", [(0, 0), (5, 10)])
def test_client_exit_status_tells_whether_the_program_failed(kamailio, agents, tmp_path,
                                                              status, code):
    k = kamailio()
    serve = agents([SIP_APP, "-s", k.hostport, "-u", "2500", "-p", str(free_port("both")),
                    "-m", *app_argv(tmp_path, "run")], name="sip_app-server")
    wait_for(lambda: k.registered("2500"), 10, abort=serve.exit_reason)
    # -m sh -c SCRIPT: sip_app appends IP4 PORT VPN_LOCAL VPN_REMOTE, which become $0...$3
    call = agents([SIP_APP, "-s", k.hostport, "-u", "2501", "-t", "2500",
                   "-p", str(free_port("both")), "-m", "sh", "-c", f"sleep 0.5; exit {status}"],
                  name="sip_app-client")
    assert wait_exit(call) == code, call.log_text()
    assert ("sip_app: the application exited with status 5" in call.log_text()) == bool(status)
    wait_for(lambda: (tmp_path / "server.stopped").exists(), 10, what="server program stopped")
    assert serve.alive()


@pytest.mark.slow
def test_missing_program_is_reported_before_registering(kamailio):
    k = kamailio()
    p = subprocess.run([SIP_APP, "-s", k.hostport, "-u", "2500", "-p", str(free_port("both")),
                        "-m", "./no-such-wrapper.sh"], capture_output=True, text=True, timeout=20)
    assert p.returncode == 3 and "program not found" in p.stderr
    assert not k.registered("2500")
