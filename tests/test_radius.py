"""The broker's RADIUS mode (broker/radius.py): digest credentials checked by FreeRADIUS.

The Access-Request's encoding without I/O; then a broker in-process and as a process
(`sipmesh broker --radius`) against a real FreeRADIUS 3.2 that the test configures and
starts (tests/lab/freeradius.py), and against a silent UDP socket (a server that does
not answer: 503 with Retry-After, the checks bounded, the event loop free).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from pyrad.dictionary import Dictionary
from pyrad.packet import AuthPacket, Packet

from sipmesh.agent.errors import AgentError
from sipmesh.agent.roster import RosterClient
from sipmesh.broker.networks import NetworkStore
from sipmesh.broker.registrar import RegistrarPolicy
from sipmesh.broker.radius import (DICTIONARY, MAX_GROUPS, RadiusConfig, RadiusError, digest_attributes, groups_of,
                                   parse_server, read_secret)
from sipmesh.broker.users import UsersFile
from sipmesh.sip.auth import AuthResult, DigestClient, DigestServer, NonceManager
from sipmesh.sip.message import Response
from sipmesh.sip.ua import UAConfig, UserAgent
from tests.lab import wait_for_async
from tests.lab.broker import start_broker
from tests.lab.freeradius import FreeRadius, freeradius_unavailable_reason
from tests.peers.broker import SDP_A, SDP_B, answering, make_broker, make_ua, sip  # noqa: F401 (fixtures)
from tests.peers.raw import RawPeer

SECRET = "radius-Sh4red-" + secrets.token_hex(6)  # unique, so that a log can be searched for it
PASSWORDS = {"alice": "wonderland", "bob": "builder"}
GROUPS = {"alice": ["engineering", "ops"]}

needs_freeradius = pytest.mark.skipif(freeradius_unavailable_reason() is not None,
                                      reason=freeradius_unavailable_reason() or "")


# ------------------------------------------------------------------ the request, without I/O

def _credentials(qop: str | None = "auth", uri: str = "sip:example.org"):
    server = DigestServer("example.org", NonceManager(), ("MD5",))
    challenge = server.challenges()[0]
    if qop is None:
        challenge = challenge.replace(', qop="auth"', "")
    value = DigestClient("alice", "wonderland").authorize(challenge, "REGISTER", uri, cnonce="c0ffee")
    if qop == "auth-int":  # the response is not checked here: only the parameters matter
        value = value.replace("qop=auth", "qop=auth-int")
    parsed = server.parse_credentials(value)
    assert not isinstance(parsed, AuthResult), parsed
    return parsed


def test_digest_attributes_are_draft_sterman_sub_attributes():
    c = _credentials()
    values = digest_attributes(c, "REGISTER")
    decoded = {v[0]: v[2:].decode() for v in values}
    assert all(v[1] == len(v) for v in values)  # [type, length, value]
    assert decoded == {1: "example.org", 2: c.nonce, 3: "REGISTER", 4: "sip:example.org", 5: "auth",
                       6: "MD5", 8: "c0ffee", 9: "00000001", 10: "alice"}
    plain = {v[0] for v in digest_attributes(_credentials(qop=None), "REGISTER")}
    assert plain == {1, 2, 3, 4, 6, 10}  # no qop: no QOP, CNonce, Nonce-Count
    body_digest = {v[0]: v[2:] for v in digest_attributes(_credentials("auth-int"), "MESSAGE", b"hi")}[7]
    assert body_digest == hashlib.md5(b"hi").hexdigest().encode()


def test_an_access_request_carries_a_message_authenticator_and_never_the_secret():
    request = AuthPacket(dict=Dictionary(io.StringIO(DICTIONARY)), id=7, secret=SECRET.encode(),
                         message_authenticator=True)
    request["User-Name"] = "alice"
    for value in digest_attributes(_credentials(), "REGISTER"):
        request.AddAttribute("Digest-Attributes", value)
    wire = request.RequestPacket()
    decoded = Packet(packet=wire, dict=request.dict)
    assert 80 in decoded and len(decoded[80][0]) == 16  # Message-Authenticator
    assert SECRET.encode() not in wire


def test_a_parameter_too_long_for_an_attribute_is_refused():
    with pytest.raises(RadiusError):
        digest_attributes(_credentials(uri="sip:" + "a" * 260 + "@example.org"), "REGISTER")


def test_groups_are_plain_names_only():
    assert groups_of([b"engineering", b" ops ", b"bad name", b"x" * 65, b"\xff\xfe", b"a.b-c_d"]) \
        == frozenset({"engineering", "ops", "a.b-c_d"})
    many = groups_of([f"g{i}".encode() for i in range(1000)])  # a hostile reply: bounded
    assert len(many) == MAX_GROUPS and "g0" in many


def test_server_and_secret_file(tmp_path):
    assert parse_server("radius.example.org") == ("radius.example.org", 1812)
    assert parse_server("127.0.0.1:18120") == ("127.0.0.1", 18120)
    assert parse_server("[::1]:1645") == ("::1", 1645)
    with pytest.raises(RadiusError):
        parse_server("host:port")
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\nsecond line ignored\n")
    assert read_secret(secret) == SECRET.encode()
    secret.write_text("short\n")
    with pytest.raises(RadiusError, match="at least 8") as short:
        read_secret(secret)
    assert "short" not in str(short.value).replace("at least", "")
    with pytest.raises(RadiusError, match="cannot read"):
        read_secret(tmp_path / "missing")
    with pytest.raises(RadiusError):
        RadiusConfig("127.0.0.1", retries=11)
    assert RadiusConfig("h", realms=("Example.org",)).covers("example.ORG")
    assert not RadiusConfig("h", realms=("a.example",)).covers("b.example")
    assert RadiusConfig("h").covers("anything.example")


def test_the_command_line_says_what_is_missing(tmp_path):
    def broker(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "sipmesh", "broker", "--listen", "127.0.0.1:0",
                               "--db", str(tmp_path / "b.db"), "--workers", "1", *args],
                              capture_output=True, text=True, timeout=60)

    no_secret = broker("--radius", "127.0.0.1")
    assert no_secret.returncode == 2 and "--radius-secret-file" in no_secret.stderr
    missing = broker("--radius", "127.0.0.1", "--radius-secret-file", str(tmp_path / "nope"))
    assert missing.returncode == 2 and str(tmp_path / "nope") in missing.stderr
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\n")
    foreign = broker("--radius", "127.0.0.1", "--radius-secret-file", str(secret), "--domain", "a.example",
                     "--radius-realm", "b.example")
    assert foreign.returncode == 2 and "b.example" in foreign.stderr
    assert all(SECRET not in r.stdout + r.stderr for r in (no_secret, missing, foreign))


# ------------------------------------------------------------------ SIP helpers

async def _register(peer: RawPeer, server: tuple[str, int], user: str, password: str | None, *,
                    call_id: str | None = None) -> tuple[Response, Response | None]:
    """REGISTER, and once more with credentials for its challenge: (first, second) answers."""
    host, port = server
    uri, call_id = f"sip:{host}:{port}", call_id or secrets.token_hex(6)

    def send(cseq: int, headers: list[str]) -> None:
        peer.send(sip("REGISTER", uri, peer, user=user, to=f"<sip:{user}@{host}:{port}>", call_id=call_id,
                      cseq=cseq, headers=["Expires: 600", *headers], domain=f"{host}:{port}"), server)

    send(1, [])
    first = await _final(peer, call_id, 1, timeout=5)
    if first.status != 401 or password is None:
        return first, None
    auth = DigestClient(user, password).authorize(first.headers.get("WWW-Authenticate") or "",
                                                   "REGISTER", uri)
    send(2, [f"Authorization: {auth}"])
    return first, await _final(peer, call_id, 2)


def _finals(peer: RawPeer, call_id: str, cseq: int) -> list[Response]:
    return [m for _, m in peer.log if isinstance(m, Response) and m.status >= 200
            and m.call_id == call_id and m.cseq[0] == cseq]


async def _final(peer: RawPeer, call_id: str, cseq: int, timeout: float = 8.0) -> Response:
    """The final response to CSeq `cseq` of `call_id` (from the peer's log: waiting for one
    call's answer must not swallow another's)."""
    finals = await wait_for_async(lambda: _finals(peer, call_id, cseq), timeout,
                                  what=f"final response to CSeq {cseq} of {call_id}")
    return finals[0]


def _secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "radius.secret"
    path.write_text(SECRET + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def freeradius(tmp_path):
    if (reason := freeradius_unavailable_reason()) is not None:
        pytest.skip(reason)
    server = FreeRadius(tmp_path / "radius", secret=SECRET, users=PASSWORDS, groups=GROUPS)
    server.start()
    yield server
    server.stop()


class SilentServer:
    """A UDP socket that reads Access-Requests and never answers (a RADIUS server that hangs)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._read)

    def _read(self) -> None:
        try:
            while True:
                self.received.append(self.sock.recv(4096))
        except BlockingIOError:
            pass

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()


@pytest.fixture
async def silent():
    server = SilentServer()
    yield server
    server.close()


# ------------------------------------------------------------------ in-process broker, real FreeRADIUS

@needs_freeradius
async def test_a_radius_user_registers_calls_and_brings_its_groups(make_broker, raw_peers, freeradius, tmp_path):
    radius = RadiusConfig("127.0.0.1", freeradius.port, _secret_file(tmp_path), timeout=1.0, retries=1)
    broker = await make_broker(radius=radius)
    peer = await raw_peers()
    first, second = await _register(peer, broker.address(), "alice", "wonderland")
    challenges = first.headers.get_all("WWW-Authenticate")
    assert len(challenges) == 1 and "algorithm=MD5" in challenges[0]  # what FreeRADIUS computes
    assert second is not None and second.status == 200, second
    assert broker.auth.groups("alice", "127.0.0.1") == frozenset({"engineering", "ops"})
    assert broker.auth.groups("bob", "127.0.0.1") is None  # not (yet) accepted by RADIUS

    # INVITE: 407, then the credentials go to RADIUS through the transaction layer
    host, port = broker.address()
    bob = UserAgent(UAConfig(user="bob", domain=f"{host}:{port}", password="builder", listen_port=0),
                    on_invite=answering(SDP_B))
    alice = UserAgent(UAConfig(user="alice", domain=f"{host}:{port}", password="wonderland", listen_port=0))
    await bob.start()
    await alice.start()
    try:
        assert (await bob.register()).status == 200
        assert broker.auth.groups("bob", "127.0.0.1") == frozenset()
        call = await alice.invite("bob", SDP_A, timeout=10)
        assert call.remote_sdp == SDP_B
        await call.bye()
    finally:
        await alice.stop()
        await bob.stop()


@needs_freeradius
async def test_wrong_password_and_unknown_user_get_a_fresh_challenge(make_broker, raw_peers, freeradius,
                                                                      tmp_path):
    radius = RadiusConfig("127.0.0.1", freeradius.port, _secret_file(tmp_path), timeout=1.0, retries=1)
    broker = await make_broker(radius=radius)
    peer = await raw_peers()
    for user, password in (("alice", "not-it"), ("mallory", "anything")):
        first, second = await _register(peer, broker.address(), user, password)
        assert second is not None and second.status == 401, second  # as for the users file
        assert second.headers.get("WWW-Authenticate") != first.headers.get("WWW-Authenticate")
    assert broker.location.count() == 0 and broker.auth.failures == 2


async def test_users_file_first_then_radius(make_broker, raw_peers, silent, tmp_path):
    """A user of the users file never waits for the RADIUS server (here, one that hangs)."""
    users = UsersFile(tmp_path / "users")
    users.add("127.0.0.1", "carol", "carol-pw")
    users.save()
    radius = RadiusConfig("127.0.0.1", silent.port, _secret_file(tmp_path), timeout=0.3, retries=0)
    broker = await make_broker(users_file=tmp_path / "users", radius=radius)
    peer = await raw_peers()
    _, ok = await _register(peer, broker.address(), "carol", "carol-pw")
    _, wrong = await _register(peer, broker.address(), "carol", "wrong")
    assert ok is not None and ok.status == 200 and wrong is not None and wrong.status == 401
    assert silent.received == []  # carol's credentials were never sent out
    _, other = await _register(peer, broker.address(), "alice", "wonderland")
    assert other is not None and other.status == 503 and len(silent.received) == 1


async def test_a_silent_server_gives_503_with_retry_after_and_bounded_checks(make_broker, raw_peers, silent,
                                                                             tmp_path):
    radius = RadiusConfig("127.0.0.1", silent.port, _secret_file(tmp_path), timeout=0.4, retries=1,
                          max_outstanding=1)
    broker = await make_broker(radius=radius)
    peer = await raw_peers()
    host, port = broker.address()
    uri = f"sip:{host}:{port}"
    first, _ = await _register(peer, (host, port), "alice", None, call_id="held")
    auth = DigestClient("alice", "wonderland").authorize(first.headers.get("WWW-Authenticate") or "",
                                                          "REGISTER", uri)
    held = sip("REGISTER", uri, peer, user="alice", to=f"<sip:alice@{host}:{port}>", call_id="held", cseq=2,
               headers=["Expires: 600", f"Authorization: {auth}"], domain=f"{host}:{port}")
    started = asyncio.get_running_loop().time()
    peer.send(held, (host, port))
    await asyncio.sleep(0.05)
    peer.send(held, (host, port))  # a retransmission while the first is with the server: absorbed

    # the one slot is taken: the next check is refused at once, and the loop answers meanwhile
    _, busy = await _register(peer, (host, port), "bob", "builder", call_id="busy")
    assert busy is not None and busy.status == 503 and busy.headers.get("Retry-After")
    assert asyncio.get_running_loop().time() - started < radius.deadline
    peer.send(sip("OPTIONS", uri, peer, call_id="ping"), (host, port))
    assert (await _final(peer, "ping", 1)).status == 200

    answer = await _final(peer, "held", 2, timeout=radius.deadline + 3)
    assert answer.status == 503 and int(answer.headers.get("Retry-After") or 0) >= 1
    assert asyncio.get_running_loop().time() - started >= radius.deadline - 0.05
    assert _finals(peer, "held", 2) == [answer]  # one answer, for the two copies
    ids = {datagram[1] for datagram in silent.received}
    assert len(ids) == 1 and len(silent.received) == radius.retries + 1  # one request, retransmitted
    assert broker.location.count() == 0
    assert all(SECRET.encode() not in d for d in silent.received)


# ------------------------------------------------------------------ a mesh network's members by RADIUS group

@needs_freeradius
async def test_a_network_takes_its_members_from_a_radius_group(make_broker, make_ua, tmp_path):
    """Network lab takes RADIUS group staff (alice, bob) beside its static member dave (a
    RADIUS user without the group): they join, get addresses from the pool, see each other
    and call each other; carol (no group) is refused; bob, taken out of the group in
    FreeRADIUS's users file, is out at his next authentication; RADIUS down: 503."""
    server = FreeRadius(tmp_path / "radius", secret=SECRET, users={**PASSWORDS, "carol": "c-pw", "dave": "d-pw"},
                        groups={"alice": ["staff"], "bob": ["ops", "staff"], "carol": ["ops"]}).start()
    try:
        store = NetworkStore(tmp_path / "broker.db")
        store.create("lab", "10.9.0.0/24", radius_group="staff")
        store.add_members("lab", ["dave"])
        store.close()
        broker = await make_broker(radius=RadiusConfig("127.0.0.1", server.port, _secret_file(tmp_path), timeout=0.5,
                                                       retries=1, realms=("127.0.0.1",)),  # lab is checked anyway
                                   db_path=tmp_path / "broker.db",
                                   registrar=RegistrarPolicy(min_expires=2, max_expires=3600, default_expires=3600))
        domain = broker.hostport
        passwords = {**PASSWORDS, "carol": "c-pw", "dave": "d-pw"}

        async def member(name: str, **options) -> RosterClient:
            ua = await make_ua(name, domain, password=passwords[name], transports=("UDP",),
                               on_invite=answering(SDP_B) if name == "bob" else None)
            client = RosterClient(ua, "lab", **options)
            await client.start()
            return client

        alice = await member("alice")
        bob = await member("bob", register_expires=60, subscribe_expires=6)  # a SUBSCRIBE refresh each second
        dave = await member("dave")
        expected = {"alice": "10.9.0.2", "bob": "10.9.0.3", "dave": "10.9.0.1"}
        for client in (alice, bob, dave):
            await wait_for_async(lambda: {m.name: m.mesh_ip for m in client.members.values()} ==
                                 {n: a for n, a in expected.items() if n != client.ua.config.user}, 5,
                                 what=f"{client.ua.config.user} sees the others ({client.members})")
        assert alice.mesh_ip == "10.9.0.2" and alice.mode == "push"
        # a mesh session is member to member, at the roster's contact (as `sipmesh up` calls)
        call = await alice.ua.invite(alice.members["bob"].contact, SDP_A, timeout=10)
        assert call.remote_sdp == SDP_B
        await call.bye()

        with pytest.raises(AgentError, match="403.*not in its group staff"):
            await member("carol")
        assert "carol" not in NetworkStore(tmp_path / "broker.db").network("lab").members

        # out of the group in FreeRADIUS's users file (restarted): out at bob's next authentication
        # (here the refresh of his roster subscription)
        server.stop()
        server.groups["bob"] = ["ops"]
        server.start()
        await wait_for_async(lambda: "bob" not in alice.members, 5, what="bob gone from alice's roster")
        network = NetworkStore(tmp_path / "broker.db").network("lab")
        assert set(network.members) == {"alice", "dave"}
        refused = await bob.ua.register(60, aor=bob.aor, contact=bob.contact())
        assert refused.status == 403 and "not in its group staff" in refused.reason

        server.stop()  # RADIUS down: 503 with Retry-After, never an open door (even for a member)
        down = await alice.ua.register(60, aor=alice.aor, contact=alice.contact())
        assert down.status == 503 and int(down.headers.get("Retry-After") or 0) >= 1, down
        for client in (alice, dave):
            await client.stop()
    finally:
        server.stop()


# ------------------------------------------------------------------ `sipmesh broker --radius`, a process

@pytest.mark.slow
@needs_freeradius
@pytest.mark.parametrize("workers", [1, 2])
async def test_broker_process_in_radius_mode(raw_peers, freeradius, tmp_path, workers):
    proc, port = start_broker(tmp_path, extra=[
        "--workers", str(workers), "--radius", freeradius.hostport,
        "--radius-secret-file", str(_secret_file(tmp_path)),
        "--radius-timeout", "0.5", "--radius-retries", "1", "--debug"])
    server = ("127.0.0.1", port)
    peer = await raw_peers()

    _, good = await _register(peer, server, "alice", "wonderland")
    assert good is not None and good.status == 200, proc.log_tail()
    _, wrong = await _register(peer, server, "alice", "not-it")
    _, unknown = await _register(peer, server, "mallory", "anything")
    assert wrong is not None and wrong.status == 401 and unknown is not None and unknown.status == 401

    freeradius.stop()  # the RADIUS server is down: 503, never an open door
    _, down = await _register(peer, server, "bob", "builder")
    assert down is not None and down.status == 503 and down.headers.get("Retry-After"), down

    freeradius.start()  # back on the same port: the next registration goes through
    _, back = await _register(peer, server, "bob", "builder")
    assert back is not None and back.status == 200, proc.log_tail()

    # a sipmesh user agent registers through it like any other
    ua = UserAgent(UAConfig(user="alice", domain=f"127.0.0.1:{port}", password="wonderland", listen_port=0))
    await ua.start()
    try:
        assert (await ua.register()).status == 200
    finally:
        await ua.stop()

    log = proc.log_text()
    assert "RADIUS server 127.0.0.1:" in log and "did not answer" in log  # the outage, said once
    assert "for alice@127.0.0.1: accept" in log  # RADIUS answers are logged at --debug
    assert SECRET not in log  # not even at --debug
    proc.stop()
    assert SECRET not in proc.log_text()


# ------------------------------------------------------------------ cross-check: Kamailio's auth_radius

KAMAILIO_CFG = """#!KAMAILIO
debug=2
log_stderror=yes
children=1
auto_aliases=no
listen=udp:127.0.0.1:{port}
mpath="/usr/lib/x86_64-linux-gnu/kamailio/modules/"
loadmodule "kex.so"
loadmodule "corex.so"
loadmodule "tm.so"
loadmodule "sl.so"
loadmodule "pv.so"
loadmodule "maxfwd.so"
loadmodule "textops.so"
loadmodule "siputils.so"
loadmodule "xlog.so"
loadmodule "usrloc.so"
loadmodule "registrar.so"
loadmodule "auth.so"
loadmodule "auth_radius.so"
modparam("usrloc", "db_mode", 0)
modparam("auth_radius", "radius_config", "{run}/radiusclient.conf")
modparam("auth_radius", "append_realm_to_username", 0)
request_route {{
	if (!mf_process_maxfwd_header("10")) {{ sl_send_reply("483", "Too Many Hops"); exit; }}
	if (is_method("REGISTER")) {{
		if (!radius_www_authorize("$td")) {{
			www_challenge("$td", "1");
			exit;
		}}
		if (!save("location")) {{ sl_reply_error(); }}
		exit;
	}}
	sl_send_reply("501", "Not Implemented");
}}
"""


def _start_kamailio(run: Path, radius: FreeRadius, spawn_proc):
    """Kamailio 5.6 as a registrar whose digest check is auth_radius (radcli) at `radius`."""
    from tests.lab import free_port, kamailio_unavailable_reason, wait_udp_listening

    if (reason := kamailio_unavailable_reason()) is not None:
        pytest.skip(reason)
    if not Path("/usr/lib/x86_64-linux-gnu/kamailio/modules/auth_radius.so").exists():
        pytest.skip("Kamailio's auth_radius is not installed (Debian kamailio-radius-modules)")
    run.mkdir(parents=True, exist_ok=True)
    port = free_port("udp")
    (run / "kamailio.cfg").write_text(KAMAILIO_CFG.format(port=port, run=run))
    (run / "radiusclient.conf").write_text(
        f"nas-identifier kamailio-test\nauthserver {radius.hostport}\nacctserver {radius.hostport}\n"
        f"servers {run}/servers\ndictionary {run}/dictionary\ndefault_realm\n"
        "radius_timeout 1\nradius_retries 1\nbindaddr *\n")
    servers = run / "servers"
    servers.write_text(f"127.0.0.1 {radius.secret}\n")
    servers.chmod(0o600)
    (run / "dictionary").write_text("$INCLUDE /etc/radcli/dictionary\n$INCLUDE /etc/radcli/dictionary.sip\n"
                                    "$INCLUDE /etc/kamailio/dictionary.kamailio\n"
                                    "VALUE Service-Type Sip-Session 15\n")  # what auth_radius asks for
    proc = spawn_proc(["kamailio", "-f", str(run / "kamailio.cfg"), "-DD", "-E", "-m", "64", "-M", "8",
                       "-P", str(run / "kamailio.pid"), "-Y", str(run), "-w", str(run)], name="kamailio-radius")
    wait_udp_listening("127.0.0.1", port, proc=proc)
    return proc, port


@pytest.mark.slow
@needs_freeradius
async def test_kamailio_auth_radius_and_the_broker_agree_on_the_same_freeradius(raw_peers, spawn_proc,
                                                                                tmp_path):
    # radcli 1.2 (Kamailio's RADIUS client) sends no Message-Authenticator; the broker does
    radius = FreeRadius(tmp_path / "radius", secret=SECRET, users=PASSWORDS, groups=GROUPS,
                        require_message_authenticator=False).start()
    try:
        kamailio, kamailio_port = _start_kamailio(tmp_path / "kamailio", radius, spawn_proc)
        broker, broker_port = start_broker(tmp_path, extra=[
            "--radius", radius.hostport, "--radius-secret-file", str(_secret_file(tmp_path)),
            "--radius-timeout", "1", "--radius-retries", "1"])
        peer = await raw_peers()
        outcomes = {}
        for name, port in (("kamailio", kamailio_port), ("broker", broker_port)):
            results = []
            for user, password in (("alice", "wonderland"), ("alice", "not-it"), ("mallory", "x")):
                _, answer = await _register(peer, ("127.0.0.1", port), user, password)
                assert answer is not None, name
                results.append(answer.status)
            outcomes[name] = results
        assert outcomes == {"kamailio": [200, 401, 401], "broker": [200, 401, 401]}, kamailio.log_tail()
        log = radius.log_text()
        assert log.count("Digest-Attributes look OK") == 6  # both dialects are what the module reads
        assert log.count("Sent Access-Accept") == 2
    finally:
        radius.stop()
