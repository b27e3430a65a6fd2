"""Make the committed seed corpus of the fuzz targets (tests/fuzz/corpus/<target>/).

    python -m tests.fuzz.seeds capture   # SIP from SIPp, Kamailio and baresip (root, tcpdump)
    python -m tests.fuzz.seeds derive    # URI, header, digest, SDP, a=, stream, STUN, trust, portmap,
                                         # ICE, reginfo and paths seeds

``capture`` runs real third-party SIP software on loopback, as the tests do (SIPp
registering with digest and calling through the sipmesh broker, SIPp through Kamailio,
two baresips registering and calling through the broker), records the UDP traffic with
tcpdump and keeps one message per tool, method or status: corpus/message/<tool>-<kind>.sip.
``derive`` cuts every seed message (captures, the RFC 4475/5118 vectors) into the inputs
of the smaller targets, and adds the hand-written seeds below. Both overwrite only what
they write; regression inputs (corpus/<target>/crash-*) are never touched.
"""

from __future__ import annotations

import base64
import hashlib
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

from tests.fuzz.runner import CORPUS, TARGET_NAMES, seed_files

HEADER_SELECTORS = {"via": 0, "address": 1, "cseq": 2, "date": 3, "list": 4, "params": 5}
_ADDRESS_HEADERS = ("from", "f", "to", "t", "contact", "m", "route", "record-route", "reply-to",
                    "refer-to", "p-asserted-identity", "path")
_LIST_HEADERS = ("allow", "supported", "require", "proxy-require", "unsupported", "accept",
                 "accept-encoding", "accept-language", "k")
_AUTH_HEADERS = ("authorization", "proxy-authorization", "www-authenticate", "proxy-authenticate")


# -- capture ------------------------------------------------------------------------------

def _udp_payloads(pcap: bytes) -> list[bytes]:
    """UDP payloads of a tcpdump file captured on lo (Ethernet link type), IPv4 only."""
    magic = struct.unpack_from("<I", pcap)[0]
    endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    linktype = struct.unpack_from(endian + "I", pcap, 20)[0]
    link_header = {1: 14, 113: 16, 276: 20}[linktype]  # Ethernet, Linux cooked v1, v2
    out, pos = [], 24
    while pos + 16 <= len(pcap):
        caplen = struct.unpack_from(endian + "I", pcap, pos + 8)[0]
        frame = pcap[pos + 16 : pos + 16 + caplen]
        pos += 16 + caplen
        ip = frame[link_header:]
        if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 17:
            continue
        udp = ip[(ip[0] & 0x0F) * 4 :]
        out.append(bytes(udp[8:]))
    return out


def _kind(message: bytes) -> str:
    line = message.split(b"\r\n", 1)[0].decode("utf-8", "replace")
    kind = line.split(" ")[1] if line.startswith("SIP/") else line.split(" ")[0].lower()
    if re.search(rb"^(proxy-)?authorization:", message, re.IGNORECASE | re.MULTILINE):
        kind += "-auth"
    if b"\r\n\r\nv=0" in message:
        kind += "-sdp"
    return kind


class _Tcpdump:
    def __init__(self, path: Path, port: int) -> None:
        self.path = path
        self.proc = subprocess.Popen(["tcpdump", "-i", "lo", "-n", "-U", "--immediate-mode", "-s", "0", "-w", str(path),
                                      "udp", "port", str(port)], stderr=subprocess.PIPE)
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()  # "listening on lo, ..." once it captures
        if b"listening" not in line:
            raise RuntimeError(f"tcpdump did not start: {line!r}")

    def stop(self) -> list[bytes]:
        time.sleep(0.5)  # the last datagrams reach the file
        self.proc.terminate()
        self.proc.wait(10)
        return _udp_payloads(self.path.read_bytes())


def _keep(tool: str, messages: list[bytes]) -> list[Path]:
    out = CORPUS / "message"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for message in messages:
        if not message.strip():
            continue
        path = out / f"{tool}-{_kind(message)}.sip"
        if path not in written:
            path.write_bytes(message)
            written.append(path)
    return written


def capture(work: Path) -> None:
    from sipmesh.broker.users import UsersFile
    from tests.lab import REGISTRY, Kamailio, free_port, make_users, run_sipp, sipp_args, start_sipp
    from tests.lab.baresip import Ctrl, bindings, start_baresip
    from tests.lab.broker import start_broker
    from tests.lab.sipp import CALL_BEHAVIOURS

    work.mkdir(parents=True, exist_ok=True)
    try:
        # SIPp -> the broker: digest registrations, then calls uac -> broker -> uas.
        users = make_users(3, work / "sipp")
        users_file = UsersFile(work / "users")
        for user, password in users.users:
            users_file.add("127.0.0.1", user, password)
        users_file.add("127.0.0.1", "alice", "alice-pw")
        users_file.add("127.0.0.1", "bob", "bob-pw")
        users_file.save()
        broker, port = start_broker(work, users=work / "users", extra=["--auth-algorithms", "MD5"])
        dump = _Tcpdump(work / "sipp-broker.pcap", port)
        run_sipp(sipp_args("reg_auth", f"127.0.0.1:{port}", local_port=free_port("udp"), calls=3,
                           extra=["-inf", str(users.users_csv)]), cwd=work / "sipp", timeout=30)
        print("sipp:", [p.name for p in _keep("sipp", dump.stop())])

        # two baresips through the same broker: digest, INVITE with SDP, BYE
        dump = _Tcpdump(work / "baresip.pcap", port)
        alice, alice_ctrl = start_baresip(work, "alice", port, "alice-pw")
        bob, _ = start_baresip(work, "bob", port, "bob-pw")
        from tests.lab import wait_for
        wait_for(lambda: bindings(work / "broker.db") >= {"sip:alice@127.0.0.1", "sip:bob@127.0.0.1"}, 15)
        ctrl = Ctrl(alice_ctrl)
        ctrl.send("dial", f"sip:bob@127.0.0.1:{port}")
        ctrl.event({"CALL_ESTABLISHED", "CALL_CLOSED"})
        ctrl.send("hangup")
        ctrl.event({"CALL_CLOSED"})
        ctrl.close()
        alice.stop()
        bob.stop()
        print("baresip:", [p.name for p in _keep("baresip", dump.stop())])
        broker.stop()

        # SIPp through Kamailio: a digest challenge in Kamailio's words, record-routed calls
        k = Kamailio(work / "kamailio-auth", auth="static")
        k.start()
        dump = _Tcpdump(work / "kamailio-auth.pcap", k.port)
        run_sipp(sipp_args("reg_auth", k.hostport, local_port=free_port("udp"), calls=2,
                           extra=["-inf", str(users.users_csv)]), cwd=work / "sipp", timeout=30)
        messages = dump.stop()
        k.stop()
        k = Kamailio(work / "kamailio", auth="none")
        k.start()
        dump = _Tcpdump(work / "kamailio.pcap", k.port)
        uas_port = free_port("udp")
        run_sipp(sipp_args("reg_noauth", k.hostport, local_port=uas_port, calls=1,
                           extra=["-inf", str(users.uas_csv)]), cwd=work / "sipp", timeout=30)
        uas = start_sipp(sipp_args("uas_rr", local_port=uas_port), cwd=work / "sipp",
                         wait_bound=("127.0.0.1", uas_port))
        run_sipp(sipp_args("uac_rr", k.hostport, local_port=free_port("udp"), calls=2,
                           extra=["-s", "uas", *CALL_BEHAVIOURS]), cwd=work / "sipp", timeout=30)
        uas.quit()
        messages += dump.stop()
        k.stop()
        print("kamailio:", [p.name for p in _keep("kamailio", messages)])
    finally:
        REGISTRY.stop_all()


# -- derive -------------------------------------------------------------------------------

def _headers(message: bytes) -> list[tuple[str, str]]:
    """(lower-case name, value) of a message's header fields, folding undone, leniently."""
    head = message.split(b"\r\n\r\n", 1)[0].replace(b"\r\n", b"\n")
    text = re.sub(r"\n[ \t]+", " ", head.decode("utf-8", "surrogateescape"))
    out = []
    for line in text.split("\n")[1:]:
        name, colon, value = line.partition(":")
        if colon:
            out.append((name.strip().lower(), value.strip()))
    return out


def _body(message: bytes) -> bytes:
    head, _, body = message.partition(b"\r\n\r\n")
    return body if re.search(rb"^(content-type|c)\s*:\s*application/sdp", head, re.I | re.M) else b""


def _write(target: str, data: bytes, seen: set[tuple[str, bytes]]) -> None:
    if (target, data) in seen or not data:
        return
    seen.add((target, data))
    out = CORPUS / target
    out.mkdir(parents=True, exist_ok=True)
    (out / hashlib.sha1(data).hexdigest()[:16]).write_bytes(data)


def _digest_seeds() -> list[bytes]:
    """A challenge and valid credentials against tests.fuzz.targets' fixed-secret server."""
    from sipmesh.sip.auth import DigestClient
    from tests.fuzz.targets import NONCES, SERVER
    # the nonce NONCES.issue() would give at its fixed clock, with 12 zero bytes for the random
    # ones: the same seeds on every run
    head = struct.pack(">d", 1000.0) + bytes(12)
    nonce = base64.urlsafe_b64encode(head + NONCES._mac(head)).decode()
    out = []
    for challenge in SERVER.challenges():
        challenge = re.sub(r'nonce="[^"]*"', f'nonce="{nonce}"', challenge)
        out.append(challenge.encode())
        client = DigestClient("alice", "secret")
        out.append(client.authorize(challenge, "REGISTER", "sip:example.com", cnonce="0a4f113b").encode())
    out.append(b'Digest username="bob", realm="biloxi.com", nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", '
               b'uri="sip:bob@biloxi.com", qop=auth, nc=00000001, cnonce="0a4f113b", '
               b'response="6629fae49393a05397450978507c4ef1", opaque="5ccc069c403ebaf9f0171e9517f40e41"')
    out.append(b'Digest realm="atlanta.com", domain="sip:ss1.carrier.com", qop="auth,auth-int", '
               b'nonce="f84f1cec41e6cbe5aea9c8e88d359", opaque="", stale=FALSE, algorithm=SHA-256-sess')
    return out


def _attribute_seeds() -> list[bytes]:
    """Bodies as the agent and its applications write them (build_sdp), typed a= values."""
    from sipmesh.agent.attributes import build_sdp
    paper = {"IP4": "202.26.159.136", "PORT": "8000", "VPN_LOCAL_ADDR": "192.168.234.1",
             "VPN_REMOTE_ADDR": "192.168.234.2"}
    typed = {"ipv4": "192.0.2.1", "ipv6": "2001:db8::1", "ip": "192.0.2.2", "port": "51820",
             "int": "-42", "cidr": "10.0.0.1/24", "host": "peer.example.com", "token": "wg0.x_1+~",
             "base64key": "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=",
             "fingerprint": "sha-256 " + ":".join(["AB"] * 32)}
    out = [build_sdp(username="2500", address="202.26.159.136", media="application/vpn",
                     proto="OpenVPN", port=8000, attributes=paper),
           build_sdp(username="agent", address="127.0.0.1", media="application", proto="TCP",
                     port=9, attributes=typed)]
    # the o= line's session id is the time: a fixed one keeps the seeds the same on every run
    return [re.sub(rb"(?m)^o=(\S+) \d+ \d+ ", rb"o=\1 1169538046 1169538046 ", body) for body in out]


def _ice_seeds() -> list[bytes]:
    """Offers and answers as the agent writes them (agent/ice.py:render in build_sdp): host,
    server-reflexive, relayed and IPv6 candidates, with and without end-of-candidates."""
    from sipmesh.agent.attributes import build_sdp
    from sipmesh.agent.ice import Candidate, IceDescription, render

    def cand(foundation: str, host: str, port: int, kind: str, priority: int, **extra: object) -> Candidate:
        return Candidate(foundation=foundation, component=1, transport="udp", priority=priority,
                         host=host, port=port, type=kind, **extra)

    pwd = "Jk8s0dLq2vTz9PmWc4Rn7e"
    descriptions = [
        IceDescription("Ab3x", pwd, [cand("1", "10.1.0.2", 40000, "host", 2130706431),
                                     cand("2", "203.0.113.3", 50000, "srflx", 1694498815,
                                          related_address="10.1.0.2", related_port=40000),
                                     cand("3", "198.51.100.9", 49152, "relay", 16777215,
                                          related_address="203.0.113.3", related_port=50000)]),
        IceDescription("w9Zq", pwd + "x", [cand("4", "2001:db8::5", 40002, "host", 2130706175)],
                       complete=False),
        IceDescription("trickle+/", pwd, []),
    ]
    out = [build_sdp(username="agent", address="10.1.0.2", media="application", proto="udp",
                     port=9, attributes=[("PORT", "40000"), *render(d)]) for d in descriptions]
    return [re.sub(rb"(?m)^o=(\S+) \d+ \d+ ", rb"o=\1 1169538046 1169538046 ", body) for body in out]


def _reginfo_seeds() -> list[bytes]:
    """Reg-event bodies: ours (sip/reginfo.py:serialise, full and partial) and Kamailio 5.6's
    pua_reginfo (usrloc_cb.c: build_reginfo_full, as test_roster reads it)."""
    from sipmesh.sip import reginfo as ri
    from tests.peers.roster import KAMAILIO_DOC

    def doc(version: int, kind: str, *contacts: tuple[str, str, str | None]) -> bytes:
        return ri.serialise(ri.RegInfo(version, kind, [ri.RegistrationInfo(
            "sip:net-lab@example.org", "r", "active",
            [ri.ContactInfo(uri, f"c{i}", state, event, 60) for i, (uri, state, event)
             in enumerate(contacts)])]))

    return [KAMAILIO_DOC,
            doc(0, "full", ("sip:alice@192.0.2.4:5072;mesh-ip=100.64.1.1", "active", None),
                ("sip:carol@192.0.2.5:5072;mesh-ip=100.64.1.3", "active", None)),
            doc(1, "partial", ("sip:bob@192.0.2.6:5072;mesh-ip=100.64.1.2", "active", "registered")),
            doc(2, "partial", ("sip:bob@192.0.2.6:5072", "terminated", "expired"))]


def _paths_seeds() -> list[bytes]:
    """Documents as agent/pathreport.py publishes them (ops/paths.py:serialise)."""
    from sipmesh.ops.paths import Pair, serialise
    return [serialise("alice", [Pair("bob", "up", "direct", rtt_ms=0.412),
                                Pair("carol", "up", "relayed", rtt_ms=12.5)]),
            serialise("alice", [Pair("bob", "connecting", "none"),
                                Pair("carol", "failed", "none", "every check failed")]),
            serialise("alice", [Pair("carol", "up", "via bob", rtt_ms=3.0)]),
            serialise("alice", [])]


def _stun_seeds() -> list[bytes]:
    """STUN as ICE and TURN send it (RFC 8489, 8445, 8656), built with aioice."""
    from aioice.stun import Class, Message, Method
    tid = bytes(range(12))
    request = Message(Method.BINDING, Class.REQUEST, tid, {
        "USERNAME": "abcd:efgh", "PRIORITY": 1853824767, "ICE-CONTROLLING": 0x1122334455667788,
        "USE-CANDIDATE": None, "SOFTWARE": "sipmesh"})
    request.add_message_integrity(b"password")
    request.add_fingerprint()
    v4 = Message(Method.BINDING, Class.RESPONSE, tid, {"XOR-MAPPED-ADDRESS": ("192.0.2.1", 3478),
                                                       "MAPPED-ADDRESS": ("192.0.2.1", 3478)})
    v6 = Message(Method.BINDING, Class.RESPONSE, tid, {"XOR-MAPPED-ADDRESS": ("2001:db8::1", 3478),
                                                       "ICE-CONTROLLED": 7})
    error = Message(Method.ALLOCATE, Class.ERROR, tid, {
        "ERROR-CODE": (401, "Unauthorized"), "REALM": "example.com", "NONCE": b"abcdef"})
    allocate = Message(Method.ALLOCATE, Class.REQUEST, tid, {
        "REQUESTED-TRANSPORT": 0x11000000, "LIFETIME": 600, "USERNAME": "alice", "REALM": "example.com",
        "NONCE": b"abcdef", "XOR-PEER-ADDRESS": ("192.0.2.2", 9), "CHANNEL-NUMBER": 0x4000,
        "DATA": b"payload"})
    return [bytes(m) for m in (request, v4, v6, error, allocate)]


def _trust_seeds() -> list[bytes]:
    """A signed offer under tests.fuzz.targets' fixed CA and clock (Ed25519 signs
    deterministically: the same seeds on every run), its certificate, a revocation list."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from sipmesh.agent.attributes import build_sdp
    from sipmesh.agent.trust import (RevocationList, identity_public_text,
                                     issue_member_certificate, sign_session)
    from tests.fuzz.targets import TRUST_CA, TRUST_DIALOG, TRUST_NOW
    identity = Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64)))
    wg = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="
    cert = issue_member_certificate(TRUST_CA, name="alice", address="100.64.0.5/24",
                                    wg_pubkey=wg, identity_pubkey=identity_public_text(identity),
                                    groups=["lab", "admins"], now=TRUST_NOW, serial=4242)
    attrs = [("ice-ufrag", "8hhY"), ("ice-pwd", "asd88fgpdd777uzjYhagZg"),
             ("candidate", "1 1 udp 2130706431 10.0.1.1 51820 typ host"),
             ("end-of-candidates", ""), ("wg-pubkey", wg), ("mesh-ip", "100.64.0.5")]
    call_id, from_uri, to_uri = TRUST_DIALOG
    attrs += sign_session(attrs, call_id=call_id, from_uri=from_uri, to_uri=to_uri, role="offer",
                          certificate=cert, identity_key=identity, now=TRUST_NOW)
    body = build_sdp(username="alice", address="192.0.2.1", media="application", proto="udp",
                     port=9, attributes=attrs)
    body = re.sub(rb"(?m)^o=(\S+) \d+ \d+ ", rb"o=\1 1169538046 1169538046 ", body)
    crl = RevocationList.sign(TRUST_CA, [(4242, TRUST_NOW + 86400), (7, TRUST_NOW)], TRUST_NOW)
    return [b"\0" + body, b"\0" + body.replace(b"typ host", b"typ relay"),
            b"\1" + cert.to_bytes(), b"\2" + crl.to_text().encode()]


def _portmap_seeds() -> list[bytes]:
    """Answers as miniupnpd 2.3.1 sends them (captured in the NAT lab, the nonce and port
    of tests.fuzz.targets), each after its selector byte; a routing table."""
    pcp_map = bytes.fromhex("0281000000001c2000000000000000000000000000000000"
                            "000102030405060708090a0b110000009c409c40"
                            "00000000000000000000ffffcb007102")
    ssdp = (b"HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\n"
            b"ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
            b"USN: uuid:e8911a21-7349-495a-9b32-13f4c34e5d8f::"
            b"urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\nEXT:\r\n"
            b"SERVER: Debian/12 UPnP/1.1 MiniUPnPd/2.3.1\r\n"
            b"LOCATION: http://192.168.1.1:37371/rootDesc.xml\r\n"
            b"OPT: \"http://schemas.upnp.org/upnp/1/0/\"; ns=01\r\n01-NLS: 1796524901\r\n"
            b"BOOTID.UPNP.ORG: 1796524901\r\nCONFIGID.UPNP.ORG: 1337\r\n\r\n")
    routes = (b"Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
              b"eth0\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
              b"eth0\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n")
    return [b"\0" + pcp_map,
            b"\0" + pcp_map[:4] + b"\0\0\0\0" + pcp_map[8:],             # deleted
            b"\0" + pcp_map[:3] + b"\x02" + pcp_map[4:],                   # NOT_AUTHORIZED
            b"\1" + bytes.fromhex("028000000000000000000000000000000000000000000000"),
            b"\2" + bytes.fromhex("0080000000000000cb007102"),
            b"\3" + bytes.fromhex("00810000000000009c409c4000001c20"),
            b"\3" + bytes.fromhex("00810000000000009c40000000000000"),
            b"\4" + ssdp, b"\5" + routes]


def derive() -> None:
    for target in TARGET_NAMES:  # what an earlier derive wrote (regression inputs stay)
        if target != "message":
            for path in (CORPUS / target).glob("*"):
                if not path.name.startswith("crash-"):
                    path.unlink()
    messages = [p.read_bytes() for p in seed_files("message")]
    seen: set[tuple[str, bytes]] = set()
    for message in messages:
        first = message.split(b"\r\n", 1)[0].split(b" ")
        if len(first) == 3 and not message.startswith(b"SIP/"):
            _write("uri", first[1], seen)
        for name, value in _headers(message):
            data = value.encode("utf-8", "surrogateescape")
            if name in ("via", "v"):
                _write("headers", bytes([HEADER_SELECTORS["via"]]) + data, seen)
            elif name in _ADDRESS_HEADERS:
                _write("headers", bytes([HEADER_SELECTORS["address"]]) + data, seen)
                uri = re.search(rb"<([^>]*)>", data)
                _write("uri", uri.group(1) if uri else data.split(b";")[0], seen)
                if b";" in data:
                    _write("headers", bytes([HEADER_SELECTORS["params"]]) + data[data.index(b";"):], seen)
            elif name == "cseq":
                _write("headers", bytes([HEADER_SELECTORS["cseq"]]) + data, seen)
            elif name == "date":
                _write("headers", bytes([HEADER_SELECTORS["date"]]) + data, seen)
            elif name in _LIST_HEADERS:
                _write("headers", bytes([HEADER_SELECTORS["list"]]) + data, seen)
            elif name in _AUTH_HEADERS:
                _write("digest", data, seen)
        body = _body(message)
        _write("sdp", body, seen)
        _write("attributes", body, seen)
    for data in _stun_seeds():
        _write("stun", data, seen)
    for data in _digest_seeds():
        _write("digest", data, seen)
    for data in _trust_seeds():
        _write("trust", data, seen)
    for data in _portmap_seeds():
        _write("portmap", data, seen)
    for target, made in (("ice", _ice_seeds()), ("reginfo", _reginfo_seeds()), ("paths", _paths_seeds())):
        for data in made:
            _write(target, data, seen)
    for body in _attribute_seeds():
        _write("sdp", body, seen)
        _write("attributes", body + b"a=PORT:8000\r\n", seen)
        _write("attributes", body, seen)
    # A TCP stream: the segment size byte, then messages back to back with CRLF keep-alives.
    framed = [m for m in messages if re.search(rb"^(content-length|l)\s*:", m, re.I | re.M)]
    for i in range(0, len(framed), 3):
        for step in (0, 7, 255):
            _write("stream", bytes([step]) + b"\r\n\r\n".join(framed[i : i + 3]), seen)


def main(argv: list[str]) -> int:
    if argv[1:2] == ["capture"]:
        import tempfile
        capture(Path(tempfile.mkdtemp(prefix="sipmesh-capture-")))
    elif argv[1:2] == ["derive"]:
        derive()
    else:
        print(__doc__.split("\n\n")[1])
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
