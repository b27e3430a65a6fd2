"""The test lab proves itself against real third-party software (no sipmesh code here):
Kamailio as registrar/proxy, SIPp as clients and UAS, network namespaces."""

from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest

from tests.lab import (
    CFG_TEMPLATE,
    LabTimeout,
    Kamailio,
    NetnsFactory,
    free_port,
    kamailio_unavailable_reason,
    list_netns,
    netns_unavailable_reason,
    parse_stat_csv,
    sipp_args,
    spawn,
    wait_for,
)

from tests.lab.sipp import CALL_BEHAVIOURS


# ----------------------------------------------------------------- harness basics (fast)


def test_free_port_both_is_bindable_for_udp_and_tcp():
    port = free_port("both")
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        u.bind(("127.0.0.1", port))
        t.bind(("127.0.0.1", port))
    finally:
        u.close()
        t.close()
    assert free_port("both") != port  # never handed out twice


def test_spawn_stop_kills_the_whole_process_group(tmp_path):
    p = spawn(["sh", "-c", "sleep 60 & echo child=$!; wait"], cwd=tmp_path, log_path=tmp_path / "sh.log")
    child = int(wait_for(lambda: ([l for l in p.log_text().splitlines() if l.startswith("child=")] or [None])[0],
                         5, what="child pid")[6:])
    os.kill(child, 0)  # alive
    p.stop(grace=2)
    assert p.returncode is not None
    wait_for(lambda: not os.path.exists(f"/proc/{child}") or _is_zombie(child), 5, what="child gone")


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_wait_for_times_out_and_aborts():
    with pytest.raises(LabTimeout):
        wait_for(lambda: False, timeout=0.2, interval=0.05, what="never")
    with pytest.raises(LabTimeout, match="it died"):
        wait_for(lambda: False, timeout=5, abort=lambda: "it died")


def test_parse_stat_csv_by_column_name(tmp_path):
    f = tmp_path / "s.csv"
    f.write_text("StartTime;SuccessfulCall(C);FailedCall(C);\n"
                 "x;1;0;\n"
                 "y;20;2;\n")
    last, rows = parse_stat_csv(f)
    assert last["SuccessfulCall(C)"] == "20" and last["FailedCall(C)"] == "2" and len(rows) == 2


@pytest.mark.skipif(kamailio_unavailable_reason() is not None, reason=str(kamailio_unavailable_reason()))
@pytest.mark.parametrize("auth", ["none", "db_text", "static"])
@pytest.mark.parametrize("sdp_rewrite", [False, True])
def test_kamailio_configs_pass_syntax_check(tmp_path, auth, sdp_rewrite):
    # the bundled file on its own, and every generated variant
    p = subprocess.run(["kamailio", "-c", "-f", str(CFG_TEMPLATE)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stdout + p.stderr
    k = Kamailio(tmp_path / "k", auth=auth, users={"alice": "secret"}, sdp_rewrite=sdp_rewrite)
    k.write_config()
    k.check()


# ----------------------------------------------------------------- Kamailio + SIPp


def test_register_20_users_without_auth(kamailio, sipp):
    k = kamailio()
    users = sipp.make_users(20)
    res = sipp.run(sipp_args("reg_noauth", k.hostport, local_port=free_port("udp"), calls=20, rate=100,
                             extra=["-inf", str(users.users_csv)]), timeout=30, name="reg")
    assert res.returncode == 0 and res.successful == 20 and res.failed == 0, str(res)
    assert k.alive()


@pytest.mark.parametrize("auth", ["db_text", "static"])
def test_register_5_users_with_digest_auth(kamailio, sipp, auth):
    users = sipp.make_users(5)
    k = kamailio(auth=auth, users=users.users)
    res = sipp.run(sipp_args("reg_auth", k.hostport, local_port=free_port("udp"), calls=5, rate=50,
                             extra=["-inf", str(users.users_csv)]), timeout=30, name="reg_auth")
    assert res.returncode == 0 and res.successful == 5 and res.failed == 0, str(res)


def test_register_with_wrong_password_is_rejected(kamailio, sipp, tmp_path):
    users = sipp.make_users(2)
    k = kamailio(auth="db_text", users={u: "not-" + pw for u, pw in users.users})
    res = sipp.run(sipp_args("reg_auth", k.hostport, local_port=free_port("udp"), calls=2, rate=50,
                             extra=["-inf", str(users.users_csv)]),
                   timeout=30, recv_timeout_ms=2000, name="reg_bad")
    assert res.successful == 0 and res.failed == 2, str(res)


def _register_and_start_uas(k: Kamailio, sipp, users, *, extra=()):
    uas_port = free_port("udp")
    reg = sipp.run(sipp_args("reg_noauth", k.hostport, local_port=uas_port, calls=1,
                             extra=["-inf", str(users.uas_csv)]), timeout=20, name="reg_uas")
    assert reg.ok and reg.successful == 1, str(reg)
    uas = sipp.start(sipp_args("uas_rr", local_port=uas_port, extra=list(extra)), name="uas",
                     wait_bound=("127.0.0.1", uas_port))
    return uas


def test_10_calls_through_kamailio_udp(kamailio, sipp):
    k = kamailio()
    users = sipp.make_users(1)
    uas = _register_and_start_uas(k, sipp, users)
    res = sipp.run(sipp_args("uac_rr", k.hostport, local_port=free_port("udp"), calls=10, rate=20,
                             extra=["-s", "uas", *CALL_BEHAVIOURS]), timeout=30, name="uac")
    assert res.returncode == 0 and res.successful == 10 and res.failed == 0, str(res)
    assert uas.alive(), uas.log_tail()
    uas.stop()


def test_sdp_rewrite_mangles_c_o_and_m_lines(kamailio, sipp):
    k = kamailio(sdp_rewrite=True, sdp_fake_ip="127.0.0.254", sdp_fake_port=9)
    users = sipp.make_users(1)
    uas = _register_and_start_uas(k, sipp, users,
                                  extra=["-trace_msg", "-message_file", str(sipp.dir / "uas_msgs.log")])
    res = sipp.run(sipp_args("uac_rr", k.hostport, local_port=free_port("udp"), calls=1,
                             extra=["-s", "uas", *CALL_BEHAVIOURS, "-trace_msg",
                                    "-message_file", str(sipp.dir / "uac_msgs.log")]),
                   timeout=30, name="uac_sdp")
    assert res.ok and res.successful == 1, str(res)
    uas.stop()
    uas_msgs = (sipp.dir / "uas_msgs.log").read_text()
    uac_msgs = (sipp.dir / "uac_msgs.log").read_text()
    # INVITE as received by the UAS, 200 OK as received by the UAC: both rewritten
    for text in (uas_msgs, uac_msgs):
        assert "c=IN IP4 127.0.0.254" in text, text[-3000:]
        assert "m=audio 9 RTP/AVP 0" in text, text[-3000:]
        assert "o=user1 53655765 2353687637 IN IP4 127.0.0.254" in text, text[-3000:]
        assert "a=rtpmap:0 PCMU/8000" in text  # attribute lines untouched


# ----------------------------------------------------------------- network namespaces


@pytest.mark.netns
def test_netns_veth_ping_and_cleanup():
    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(f"network namespaces unavailable: {reason}")
    with NetnsFactory() as lab:
        a, b = lab.add("a"), lab.add("b")
        names = {a.name, b.name}
        assert all(len(n) <= 15 and n.startswith("smt-") for n in names)
        assert names <= set(list_netns())
        v = lab.veth(a, "10.231.7.1/24", b, "10.231.7.2/24")
        assert len(v.a_name) <= 15 and len(v.b_name) <= 15
        p = a.run(["ping", "-c1", "-W2", v.b_ip], check=False)
        assert p.returncode == 0, p.stdout + p.stderr
        # a process left running inside must not keep the namespace alive
        lab.popen(b, ["sleep", "30"])
    assert not names & set(list_netns())
    for n in names:
        assert not os.path.exists(f"/run/netns/{n}")


@pytest.mark.netns
def test_netns_router_forwarding_and_lo_only(netns_factory, lo_only_netns):
    links = lo_only_netns.links()
    assert links == ["lo"], links
    h1, r, h2 = netns_factory.add("h1"), netns_factory.add("r"), netns_factory.add("h2")
    netns_factory.veth(h1, "10.231.8.2/24", r, "10.231.8.1/24")
    netns_factory.veth(r, "10.231.9.1/24", h2, "10.231.9.2/24")
    netns_factory.enable_forwarding(r)
    netns_factory.route(h1, "default", via="10.231.8.1")
    netns_factory.route(h2, "default", via="10.231.9.1")
    p = netns_factory.run(h1, ["ping", "-c1", "-W2", "10.231.9.2"], check=False)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.netns
def test_kamailio_and_sipp_inside_a_namespace(netns_factory, kamailio, sipp):
    ns = netns_factory.lo_only()
    k = kamailio(netns=ns, port=5060)
    users = sipp.make_users(3)
    res = sipp.run(sipp_args("reg_noauth", k.hostport, local_port=5062, calls=3,
                             extra=["-inf", str(users.users_csv)]), timeout=30, netns=ns, name="reg_ns")
    assert res.ok and res.successful == 3, str(res)


# ----------------------------------------------------------------- the lossy relay


def test_lossy_relay_drops_reorders_and_duplicates_as_configured():
    """2,000 numbered datagrams through LossyRelay(loss=0.3) and echoed back: about 30 %
    lost each way, some duplicated, some overtaken by later ones."""
    from tests.lab import LossyRelay

    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for sock in (server, client):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(0.5)

    def drain(sock: socket.socket) -> list[tuple[int, tuple]]:
        got = []
        while True:
            try:
                data, source = sock.recvfrom(100)
            except socket.timeout:
                return got
            got.append((int(data), source))

    def send_paced(sock: socket.socket, numbers: list[int], to: tuple) -> None:
        for i, number in enumerate(numbers):
            sock.sendto(str(number).encode(), to)
            if i % 100 == 99:
                time.sleep(0.01)  # at a pace the relay thread keeps up with

    n = 2000
    with LossyRelay(server.getsockname(), loss=0.3, reorder=0.2, duplicate=0.1, max_delay=0.02,
                    seed=7) as relay:
        try:
            send_paced(client, list(range(n)), relay.address)
            received = drain(server)
            arrived = [number for number, _ in received]
            send_paced(server, arrived, received[0][1])  # echoed, back to the client through the relay
            echoed = [number for number, _ in drain(client)]
        finally:
            server.close()
            client.close()
        stats = relay.stats
    unique = set(arrived)
    assert 0.62 * n < len(unique) < 0.78 * n, len(unique)  # 30 % lost, give or take
    assert len(arrived) > len(unique)  # duplicated
    assert any(b < a for a, b in zip(arrived, arrived[1:]))  # reordered
    assert 0.62 * len(unique) < len(set(echoed)) < 0.85 * len(unique), (len(set(echoed)), len(unique))
    assert stats.received == n + len(arrived) and len(stats.clients) == 1 and stats.overflow == 0
