"""Parameter types, a= line handling, and the agent's small pure functions (no sockets)."""

from __future__ import annotations

import argparse

import pytest

from sipmesh.agent.attributes import build_sdp, read_attributes
from sipmesh.agent.errors import Exit, exit_for_status
from sipmesh.agent.params import (CIDR, Base64Key, Choice, Fingerprint, Host, Integer, IPAddress,
                                  IPv4, IPv6, Param, ParamError, Port, Token, param_type, validate)
from sipmesh.agent.registration import next_interval
from sipmesh.agent.session import warning_value
from sipmesh.apps.exec import ExecProfile, next_address, substitute
from sipmesh.sip.sdp import SDPError, parse_sdp

FP = "sha-256 " + ":".join(["AB"] * 32)

HOSTILE = [
    "1.2.3.4; rm -rf /", "$(reboot)", "`id`", "1.2.3.4|nc", "1.2.3.4&&x", "a'b", 'a"b',
    "1.2.3.4\n5.6.7.8", "1.2.3.4\r", "\x00", "1.2.3.4 ", " 1.2.3.4", "ｌ.2.3.4", "1.2.3.4" * 200,
]


@pytest.mark.parametrize("kind,good,canonical", [
    (IPv4(), "192.168.234.1", "192.168.234.1"),
    (IPv6(), "2001:DB8::1", "2001:db8::1"),
    (IPAddress(), "10.0.0.1", "10.0.0.1"),
    (IPAddress(), "::1", "::1"),
    (Port(), "8000", "8000"),
    (Integer(1, 10), "7", "7"),
    (CIDR(), "10.1.2.3/24", "10.1.2.3/24"),
    (Host(), "Example.COM", "example.com"),
    (Host(), "10.0.0.1", "10.0.0.1"),
    (Token(), "openvpn-2.6_x", "openvpn-2.6_x"),
    (Base64Key(32), "A" * 43 + "=", "A" * 43 + "="),
    (Fingerprint(), "SHA-256 " + ":".join(["ab"] * 32), FP),
    (Choice("udp", "tcp"), "tcp", "tcp"),
])
def test_types_accept_and_canonicalise(kind, good, canonical):
    assert kind.check(good) == canonical


@pytest.mark.parametrize("kind,bad", [
    (IPv4(), "256.1.1.1"), (IPv4(), "01.2.3.4"), (IPv4(), "0.0.0.0"), (IPv4(), "224.0.0.1"),
    (IPv4(), "255.255.255.255"), (IPv4(), "1.2.3"), (IPv4(), "::1"),
    (IPv6(), "fe80::1%eth0"), (IPv6(), "1.2.3.4"), (IPv6(), "::"),
    (Port(), "0"), (Port(), "65536"), (Port(), "-1"), (Port(), "+80"), (Port(), "80.0"),
    (Port(), "0x50"), (Port(), "000080"), (Integer(1, 10), "11"),
    (CIDR(), "10.0.0.0"), (CIDR(), "10.0.0.0/33"),
    (Host(), "-bad.example"), (Host(), "a..b"), (Host(), "a_b.example"), (Host(), "x" * 64),
    (Token(), "a/b"), (Token(), "a b"), (Token(), "x" * 65),
    (Base64Key(32), "A" * 44), (Base64Key(32), "AAA="), (Base64Key(), "A*==" ),
    (Fingerprint(), "sha-1 " + ":".join(["AB"] * 20)), (Fingerprint(), "sha-256 AB:CD"),
    (Fingerprint(), "sha-256  " + ":".join(["AB"] * 32)), (Fingerprint(), ":".join(["AB"] * 32)),
    (Fingerprint(), "sha-256 " + ":".join(["AB"] * 31) + ":G0"),
    (Choice("udp", "tcp"), "sctp"),
])
def test_types_refuse_bad_values(kind, bad):
    with pytest.raises(ValueError):
        kind.check(bad)


@pytest.mark.parametrize("kind", [IPv4(), IPv6(), IPAddress(), Port(), CIDR(), Host(), Token(),
                                  Base64Key(), Fingerprint(), Integer()])
@pytest.mark.parametrize("bad", HOSTILE)
def test_no_type_lets_shell_or_line_breaking_characters_through(kind, bad):
    with pytest.raises(ValueError):
        kind.check(bad)


def test_param_error_names_the_parameter_and_shortens_the_value():
    with pytest.raises(ParamError) as info:
        Param("PORT", Port()).parse("9" * 5000)
    text = str(info.value)
    assert text.startswith("PORT: ") and "too long" in text and len(text) < 200


def test_validate_required_optional_and_extra():
    params = (Param("IP4", IPv4()), Param("PORT", Port()), Param("X", Token(), required=False))
    assert validate(params, {"IP4": "10.0.0.1", "PORT": "80", "other": "ignored"}) == \
        {"IP4": "10.0.0.1", "PORT": "80"}
    with pytest.raises(ParamError, match="PORT: missing"):
        validate(params, {"IP4": "10.0.0.1"})
    with pytest.raises(ParamError, match="IP4: '10.0.0.256' is not an IPv4 address"):
        validate(params, {"IP4": "10.0.0.256", "PORT": "80"})


def test_param_type_lookup_for_config_files():
    assert param_type("PORT").check("22") == "22"
    with pytest.raises(ValueError, match="unknown parameter type"):
        param_type("float")


def test_build_sdp_is_the_papers_body_and_reads_back():
    body = build_sdp(username="2500", address="202.26.159.136", media="application/vpn",
                     proto="OpenVPN", port=8000,
                     attributes={"IP4": "202.26.159.136", "PORT": "8000",
                                 "VPN_LOCAL_ADDR": "192.168.234.1",
                                 "VPN_REMOTE_ADDR": "192.168.234.2"})
    text = body.decode()
    assert "m=application/vpn 8000 OpenVPN 0\r\n" in text
    assert text.index("a=IP4:202.26.159.136") < text.index("a=PORT:8000") \
        < text.index("a=VPN_LOCAL_ADDR:192.168.234.1") < text.index("a=VPN_REMOTE_ADDR:192.168.234.2")
    assert read_attributes(body)["VPN_REMOTE_ADDR"] == "192.168.234.2"


def test_only_a_lines_are_read_even_after_a_proxy_rewrote_the_rest():
    # the paper's 200 OK as PC2 received it through siproxd: o=, c= and m= rewritten
    body = ("v=0\r\no=2500 1169538046 1169538046 IN IP4 202.26.159.131\r\ns=-\r\nt=0 0\r\n"
            "m=application/vpn 7084 OpenVPN 0\r\nc=IN IP4 202.26.159.131\r\nk=DH:crypt code\r\n"
            "a=IP4:202.26.159.136\r\na=PORT:8000\r\na=VPN_LOCAL_ADDR:192.168.234.1\r\n"
            "a=VPN_REMOTE_ADDR:192.168.234.2\r\n").encode()
    values = read_attributes(body)
    assert values["IP4"] == "202.26.159.136" and values["PORT"] == "8000"


def test_read_attributes_refuses_conflicts_and_garbage():
    assert read_attributes(b"") == {}
    base = "v=0\r\no=a 1 1 IN IP4 10.0.0.1\r\ns=-\r\nt=0 0\r\nm=application 9 x 0\r\n"
    with pytest.raises(ParamError, match="twice"):
        read_attributes((base + "a=IP4:10.0.0.1\r\na=IP4:10.6.6.6\r\n").encode())
    assert read_attributes((base + "a=IP4:10.0.0.1\r\na=IP4:10.0.0.1\r\n").encode()) == \
        {"IP4": "10.0.0.1"}
    with pytest.raises(SDPError):
        read_attributes(b"rm -rf /\r\n")
    with pytest.raises(SDPError):
        read_attributes((base + "a=PORT:80\rx\r\n").encode())
    with pytest.raises((SDPError, ParamError)):
        read_attributes((base + "a=PORT:" + "8" * 20000 + "\r\n").encode())


def test_warning_header_value_is_quoted_and_clean():
    value = warning_value('bad "PORT"\r\nX-Injected: yes', "10.0.0.1")
    assert value.startswith('399 10.0.0.1 "') and "\r" not in value and "\n" not in value
    assert '\\"PORT\\"' in value


def test_registration_interval_rule_of_the_prototype():
    assert next_interval(1800, success=True, expires=3600) == 1800
    assert next_interval(1800, success=False, expires=3600) == 900
    assert next_interval(15, success=False, expires=3600) == 10
    assert next_interval(10, success=False, expires=3600) == 10
    assert next_interval(10, success=True, expires=60) == 30


@pytest.mark.parametrize("status,code", [(404, Exit.NOT_FOUND), (480, Exit.NOT_FOUND),
                                         (486, Exit.BUSY), (600, Exit.BUSY), (408, Exit.NO_ANSWER),
                                         (401, Exit.AUTH), (407, Exit.AUTH), (488, Exit.REFUSED),
                                         (503, Exit.UNREACHABLE), (500, Exit.REFUSED)])
def test_exit_codes_for_final_responses(status, code):
    assert exit_for_status(status) == code


def test_next_address_and_placeholders():
    assert next_address("192.168.234.1") == "192.168.234.2"
    with pytest.raises(ValueError):
        next_address("10.0.0.255")
    assert substitute(["--port={PORT}", "{NOPE}", "{IP4}:{PORT}"], {"PORT": "80", "IP4": "1.2.3.4"}) \
        == ["--port=80", "{NOPE}", "1.2.3.4:80"]


async def test_exec_profile_builds_argv_and_environment_like_sip_app():
    from sipmesh.agent.profile import SessionInfo

    profile = ExecProfile(["/bin/echo", "x"], app_port=40123, vpn=("192.168.234.1", "192.168.234.2"),
                          append_args=True)
    info = SessionInfo(role="server", call_id="c1", local_user="2500", peer="sip:2501@x",
                       local_ip="10.0.0.1")
    plan = await profile.answer(info, {"IP4": "10.0.0.2"})
    port = plan.attributes["PORT"]
    assert plan.child.argv == ["/bin/echo", "x", port, "192.168.234.1", "192.168.234.2"]
    assert plan.child.env["SIPMESH_REMOTE_IP"] == "10.0.0.2"
    assert plan.child.env["SIPMESH_PORT"] == port and plan.child.env["SIPMESH_ROLE"] == "server"
    client = profile.caller_child(info, {}, dict(plan.attributes))
    assert client.argv == ["/bin/echo", "x", "10.0.0.1", port, "192.168.234.1", "192.168.234.2"]
    assert client.env["SIPMESH_VPN_LOCAL_ADDR"] == "192.168.234.1"


def test_server_address_option():
    from sipmesh.cli.common import server_address

    assert server_address("10.0.0.1") == "10.0.0.1"
    assert server_address("sip.example.org:5070") == "sip.example.org:5070"
    assert server_address("[::1]:5070") == "[::1]:5070"
    for bad in ("10.0.0.1:0", "10.0.0.1:99999", "bad host", "[::1]x"):
        with pytest.raises(argparse.ArgumentTypeError):
            server_address(bad)


def test_server_uris_and_the_transport_they_mean():
    from sipmesh.cli.common import server_address

    sips = server_address("sips:sip.example.org")
    assert sips == "sip.example.org" and sips.transport == "tls" and sips.text() == "sips:sip.example.org"
    assert sips.with_transport(None) == "tls" and sips.with_transport("tls") == "tls"
    with pytest.raises(ValueError, match="means TLS, not UDP"):
        sips.with_transport("udp")
    assert server_address("sips:[::1]:5071") == "[::1]:5071"
    tcp = server_address("sip:10.0.0.1:5070;transport=tcp")
    assert tcp == "10.0.0.1:5070" and tcp.transport == "tcp"
    plain = server_address("10.0.0.1")
    assert plain.transport is None and plain.with_transport(None) == "udp"
    assert plain.with_transport("tls") == "tls"
    for bad in ("sip:alice@10.0.0.1", "sips:", "sip:10.0.0.1;transport=sctp"):
        with pytest.raises(argparse.ArgumentTypeError):
            server_address(bad)


def test_credentials_file(tmp_path):
    from sipmesh.agent.errors import AgentError
    from sipmesh.cli.common import read_credentials

    f = tmp_path / "c"
    f.write_text("# mine\nuser = 2500\npassword = s3cret = x\n")
    f.chmod(0o600)
    assert read_credentials(f) == {"user": "2500", "password": "s3cret = x"}
    f.write_text("justthepassword\n")
    assert read_credentials(f) == {"password": "justthepassword"}
    f.write_text("user = 2500\n")
    with pytest.raises(AgentError, match="no password"):
        read_credentials(f)


def test_sip_app_command_line_is_the_prototypes():
    from sipmesh.cli.sip_app import SIP_PORT, UsageError, parse

    opts = parse(["-s", "202.26.159.131", "-u", "2500", "-d", "-f", "log/x.txt",
                  "-m", "./openvpn_server.sh", "-v", "--weird"])
    assert (opts.server, opts.user, opts.target, opts.sip_port, opts.app_port) == \
        ("202.26.159.131", "2500", None, SIP_PORT, 8000)
    assert opts.vpn_local == "192.168.234.1" and opts.vpn_remote is None and opts.debug
    assert opts.program == ["./openvpn_server.sh", "-v", "--weird"]  # -m takes the rest
    opts = parse(["-s", "proxy:5070", "-u", "2501", "-t", "2500", "-p", "5062", "-v", "9000",
                  "-l", "10.8.0.1", "-r", "10.8.0.9", "-m", "prog"])
    assert (opts.server, opts.target, opts.sip_port, opts.app_port, opts.vpn_local,
            opts.vpn_remote) == ("proxy:5070", "2500", 5062, 9000, "10.8.0.1", "10.8.0.9")
    for bad in ([], ["-s", "x", "-u", "y"], ["-s", "x", "-m", "p"], ["-u", "y", "-m", "p"],
                ["-s", "x", "-u", "y", "-q", "-m", "p"], ["-s", "x", "-u", "y", "stray", "-m", "p"],
                ["-s", "x", "-u", "y", "-v", "80000", "-m", "p"],
                ["-s", "x", "-u", "y", "-l", "1.2.3", "-m", "p"], ["-s", "x", "-u", "y", "-m"],
                ["-s", "x", "-u", "y", "-t"]):
        with pytest.raises(UsageError):
            parse(bad)


def test_openvpn_config_is_made_of_validated_values(tmp_path):
    from sipmesh.apps.certs import host_certificate
    from sipmesh.apps.openvpn import OpenVPNProfile

    profile = OpenVPNProfile(state_dir=tmp_path)
    cert = host_certificate(tmp_path / "openvpn")
    again = host_certificate(tmp_path / "openvpn")
    assert cert.fingerprint == again.fingerprint and Fingerprint().check(cert.fingerprint)
    assert (tmp_path / "openvpn" / "host.key").stat().st_mode & 0o077 == 0
    text = profile.config_text(["tls-server"], cert, FP)
    assert f"peer-fingerprint {FP.split()[1]}" in text and "disable-dco" in text
    with pytest.raises(ValueError):
        profile.config_text(["tls-server"], cert, FP + "\nscript-security 2")
    sdp = parse_sdp(build_sdp(username="u", address="10.0.0.1", media="application/vpn",
                              proto="OpenVPN", port=9, attributes={"fingerprint": cert.fingerprint}))
    assert sdp.media[0].attribute("fingerprint") == cert.fingerprint  # a=fingerprint:sha-256 AB:..
