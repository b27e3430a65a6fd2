"""Tests for sipmesh.sip.auth (SIP HTTP-Digest)."""

from __future__ import annotations

import base64
import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sipmesh.sip.auth import (
    AuthError, AuthOutcome, DigestClient, DigestServer, NonceManager, NonceState,
    choose_challenge, compute_ha1, compute_response, format_auth_params, is_stale,
    parse_auth_params,
)


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


USERS = {"alice": "s3cret", "Mufasa": "Circle Of Life"}
REALM = "sipmesh.test"


def lookup(username: str, realm: str, algorithm: str) -> str | None:
    pw = USERS.get(username)
    return None if pw is None else compute_ha1(username, realm, pw, algorithm)


def make_server(clock: FakeClock | None = None, **kw: object) -> DigestServer:
    nm = NonceManager(clock=clock or FakeClock(), lifetime=300.0)
    return DigestServer(REALM, nm, **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------- RFC vectors

def test_rfc2617_md5_vector() -> None:
    ch = ('Digest realm="testrealm@host.com", qop="auth,auth-int", '
          'nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", opaque="5ccc069c403ebaf9f0171e9517f40e41"')
    value = DigestClient("Mufasa", "Circle Of Life").authorize(ch, "GET", "/dir/index.html", cnonce="0a4f113b")
    _, p = parse_auth_params(value)
    assert p["response"] == "6629fae49393a05397450978507c4ef1"
    assert p["nc"] == "00000001" and p["qop"] == "auth" and p["cnonce"] == "0a4f113b"
    assert p["opaque"] == "5ccc069c403ebaf9f0171e9517f40e41"
    ha1 = compute_ha1("Mufasa", "testrealm@host.com", "Circle Of Life", "MD5")
    assert compute_response(ha1, "dcd98b7102dd2f0e8b11d0f600bfb0c093", "GET", "/dir/index.html",
                            qop="auth", nc="00000001", cnonce="0a4f113b") == "6629fae49393a05397450978507c4ef1"


def test_rfc7616_sha256_vector() -> None:
    ch = ('Digest realm="http-auth@example.org", qop="auth, auth-int", algorithm=SHA-256, '
          'nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v", '
          'opaque="FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"')
    cn = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ"
    value = DigestClient("Mufasa", "Circle of Life").authorize(ch, "GET", "/dir/index.html", cnonce=cn)
    scheme, p = parse_auth_params(value)
    assert scheme == "Digest"
    assert p["response"] == "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"
    assert p["algorithm"] == "SHA-256"
    assert "algorithm=SHA-256" in value and "qop=auth" in value and "nc=00000001" in value


def test_sess_ha1() -> None:
    base = compute_ha1("u", "r", "p", "MD5")
    assert compute_ha1("u", "r", "p", "md5-SESS", "n", "c") == hashlib.md5(f"{base}:n:c".encode()).hexdigest()
    with pytest.raises(AuthError):
        compute_ha1("u", "r", "p", "MD5-sess")
    with pytest.raises(AuthError):
        compute_ha1("u", "r", "p", "SHA-1")


# ---------------------------------------------------------------- parsing

def test_parse_basic() -> None:
    scheme, p = parse_auth_params(
        'Digest realm="a", nonce="b", qop="auth,auth-int", algorithm=MD5, stale=TRUE')
    assert scheme == "Digest"
    assert p == {"realm": "a", "nonce": "b", "qop": "auth,auth-int", "algorithm": "MD5", "stale": "TRUE"}


def test_parse_escapes_commas_and_spaces() -> None:
    scheme, p = parse_auth_params('  Digest   REALM = "a, \\"b\\" \\\\ c" ,,  Nonce="x" ,opaque=tok  ')
    assert scheme == "Digest"
    assert p == {"realm": 'a, "b" \\ c', "nonce": "x", "opaque": "tok"}
    assert parse_auth_params('Digest realm="a",\r\n  nonce="b"')[1] == {"realm": "a", "nonce": "b"}


def test_parse_unfolds_only_real_folds() -> None:
    folded = 'Digest username="alice",\r\n\trealm="a\r\n b",\n  nonce="n"'
    assert parse_auth_params(folded) == ("Digest", {"username": "alice", "realm": "a b", "nonce": "n"})
    with pytest.raises(AuthError):  # a line break without a following space is no fold
        parse_auth_params('Digest realm="a",\r\nnonce="b"')


def test_parse_unescapes_quoted_pairs_only_where_present() -> None:
    _, p = parse_auth_params(r'Digest username="a\"b", realm="plain", uri="\a\\\"", nonce="x\\"')
    assert p == {"username": 'a"b', "realm": "plain", "uri": 'a\\"', "nonce": "x\\"}


@pytest.mark.parametrize("bad", [
    "", "   ", 'Digest realm="a', 'Digest realm="a\\', "Digest realm", "Digest =x", 'Digest realm="a" nonce="b"',
    'Digest realm="a", realm="b"', '"Digest"', 'Digest, realm="a"', "Digest realm=a b", 'Digest realm="a\nb"',
    'Digest realm="a"\r\nX-Injected: 1',
])
def test_parse_rejects(bad: str) -> None:
    with pytest.raises(AuthError):
        parse_auth_params(bad)


def test_format_roundtrip() -> None:
    params = {"username": 'we"ird\\name', "realm": "r, s", "nonce": "n", "uri": "sip:a@b",
              "response": "00", "algorithm": "SHA-256", "qop": "auth", "nc": "00000001", "cnonce": "c"}
    value = format_auth_params("Digest", params)
    assert "algorithm=SHA-256" in value and "qop=auth," in value and "nc=00000001" in value
    assert 'uri="sip:a@b"' in value
    assert parse_auth_params(value) == ("Digest", params)
    assert 'qop="auth"' in format_auth_params("Digest", {"qop": "auth"}, challenge=True)
    with pytest.raises(AuthError):
        format_auth_params("Digest", {"realm": "a\r\nb"})
    with pytest.raises(AuthError):
        format_auth_params("Digest", {"nc": "1 2"})


@settings(max_examples=500)
@given(st.text())
def test_parse_random_only_autherror(s: str) -> None:
    try:
        parse_auth_params(s)
    except AuthError:
        pass


@settings(max_examples=300)
@given(st.dictionaries(st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True),
                       st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc"))), max_size=6))
def test_format_parse_roundtrip_property(params: dict[str, str]) -> None:
    quoted = {k: v for k, v in params.items() if k not in ("algorithm", "nc", "stale", "qop")}
    assert parse_auth_params(format_auth_params("Digest", quoted)) == ("Digest", quoted)


# ---------------------------------------------------------------- client helpers

def test_choose_challenge_prefers_sha256() -> None:
    md5 = 'Digest realm="r", nonce="n", algorithm=MD5, qop="auth"'
    sha = 'Digest realm="r", nonce="n", algorithm=SHA-256, qop="auth"'
    assert choose_challenge([md5, sha]) == sha
    assert choose_challenge(['Basic realm="r"', "garbage\"", 'Digest realm="r", nonce="n", algorithm=FOO', md5]) == md5
    assert choose_challenge(make_server().challenges())  # SHA-256 first anyway
    assert "SHA-256" in choose_challenge(list(reversed(make_server().challenges())))
    with pytest.raises(AuthError):
        choose_challenge(['Basic realm="r"'])


def test_is_stale() -> None:
    assert is_stale('Digest realm="r", nonce="n", stale=TRUE')
    assert is_stale('Digest realm="r", nonce="n", stale="true"')
    assert not is_stale('Digest realm="r", nonce="n", stale=FALSE')
    assert not is_stale('Digest realm="r", nonce="n"')


def test_client_nc_increments_and_cnonce_random() -> None:
    c = DigestClient("alice", "s3cret")
    ch = 'Digest realm="r", nonce="n1", qop="auth"'
    ps = [parse_auth_params(c.authorize(ch, "INVITE", "sip:bob@x"))[1] for _ in range(3)]
    assert [p["nc"] for p in ps] == ["00000001", "00000002", "00000003"]
    assert len({p["cnonce"] for p in ps}) == 3
    other = parse_auth_params(c.authorize('Digest realm="r", nonce="n2", qop="auth"', "INVITE", "sip:bob@x"))[1]
    assert other["nc"] == "00000001"


def test_client_rfc2069_and_auth_int() -> None:
    c = DigestClient("alice", "s3cret")
    p = parse_auth_params(c.authorize('Digest realm="r", nonce="n"', "REGISTER", "sip:x"))[1]
    assert "qop" not in p and "nc" not in p and "cnonce" not in p and "algorithm" not in p
    ha1 = compute_ha1("alice", "r", "s3cret")
    assert p["response"] == compute_response(ha1, "n", "REGISTER", "sip:x")
    p = parse_auth_params(c.authorize('Digest realm="r", nonce="n", qop="auth-int"', "MESSAGE", "sip:x",
                                      body=b"hello"))[1]
    assert p["qop"] == "auth-int"
    assert p["response"] == compute_response(ha1, "n", "MESSAGE", "sip:x", qop="auth-int", nc="00000001",
                                             cnonce=p["cnonce"], body=b"hello")


@pytest.mark.parametrize("ch", [
    'Digest realm="r", nonce="n", algorithm=SHA-1', 'Digest realm="r", nonce="n", qop="auth-conf"',
    'Basic realm="r"', 'Digest realm="r"', 'Digest realm="r, nonce="n"',
])
def test_client_rejects(ch: str) -> None:
    with pytest.raises(AuthError):
        DigestClient("alice", "s3cret").authorize(ch, "INVITE", "sip:x")


def test_no_secrets_in_repr() -> None:
    c = DigestClient("alice", "hunter2-password")
    assert "hunter2" not in repr(c) and "hunter2" not in str(c) and "alice" in repr(c)
    nm = NonceManager(secret=b"topsecretkey")
    assert "topsecret" not in repr(nm)
    with pytest.raises(AuthError) as ei:
        c.authorize('Digest realm="r", nonce="n", algorithm=SHA-1', "INVITE", "sip:x")
    assert "hunter2" not in str(ei.value)


# ---------------------------------------------------------------- server

@pytest.mark.parametrize("alg", ["MD5", "MD5-sess", "SHA-256", "SHA-256-sess", "SHA-512-256", "sha-256"])
def test_roundtrip_each_algorithm(alg: str) -> None:
    srv = make_server(algorithms=(alg,), opaque="op")
    c = DigestClient("alice", "s3cret")
    [ch] = srv.challenges()
    assert 'qop="auth"' in ch and 'opaque="op"' in ch
    r = srv.verify(c.authorize(ch, "INVITE", "sip:bob@x"), "INVITE", lookup)
    assert r.outcome is AuthOutcome.OK and r.ok
    assert r.username == "alice" and r.uri == "sip:bob@x"


def test_roundtrip_auth_int_and_rfc2069() -> None:
    srv = make_server()
    c = DigestClient("alice", "s3cret")
    nonce = parse_auth_params(srv.challenges()[0])[1]["nonce"]
    ch = f'Digest realm="{REALM}", nonce="{nonce}", qop="auth-int", algorithm=SHA-256'
    assert srv.verify(c.authorize(ch, "MESSAGE", "sip:b", b"body"), "MESSAGE", lookup, b"body").ok
    bad = srv.verify(c.authorize(ch, "MESSAGE", "sip:b", b"body"), "MESSAGE", lookup, b"tampered")
    assert bad.outcome is AuthOutcome.BAD_CREDENTIALS
    # RFC 2069 form (no qop): a nonce may be used once
    nonce2 = parse_auth_params(srv.challenges()[0])[1]["nonce"]
    value = c.authorize(f'Digest realm="{REALM}", nonce="{nonce2}"', "REGISTER", "sip:reg")
    assert srv.verify(value, "REGISTER", lookup).ok
    assert srv.verify(value, "REGISTER", lookup).outcome is AuthOutcome.REPLAY


def test_challenges_order_and_stale() -> None:
    srv = make_server(algorithms=("MD5", "SHA-256"))
    chs = srv.challenges(stale=True)
    assert [parse_auth_params(c)[1]["algorithm"] for c in chs] == ["SHA-256", "MD5"]
    assert all(is_stale(c) for c in chs) and "stale=TRUE" in chs[0]
    assert not any(is_stale(c) for c in srv.challenges())
    with pytest.raises(AuthError):
        make_server(algorithms=("SHA-1",))


def test_challenges_match_format_auth_params() -> None:
    for opaque in (None, 'o"p\\q'):
        srv = make_server(algorithms=("MD5", "SHA-256-sess"), opaque=opaque)
        for stale in (False, True):
            chs = srv.challenges(stale=stale)
            nonce = parse_auth_params(chs[0])[1]["nonce"]
            expected = []
            for alg in ("SHA-256-sess", "MD5"):
                p = {"realm": REALM, "nonce": nonce, "algorithm": alg, "qop": "auth"}
                if opaque is not None:
                    p["opaque"] = opaque
                if stale:
                    p["stale"] = "TRUE"
                expected.append(format_auth_params("Digest", p, challenge=True))
            assert chs == expected
    with pytest.raises(AuthError):
        DigestServer("bad\r\nrealm", NonceManager())


def test_wrong_password_unknown_user_wrong_realm() -> None:
    srv = make_server()
    ch = srv.challenges()[0]
    r = srv.verify(DigestClient("alice", "wrong").authorize(ch, "INVITE", "sip:x"), "INVITE", lookup)
    assert r.outcome is AuthOutcome.BAD_CREDENTIALS and r.username == "alice"
    r = srv.verify(DigestClient("mallory", "x").authorize(ch, "INVITE", "sip:x"), "INVITE", lookup)
    assert r.outcome is AuthOutcome.UNKNOWN_USER
    other = ch.replace(REALM, "elsewhere")
    r = srv.verify(DigestClient("alice", "s3cret").authorize(other, "INVITE", "sip:x"), "INVITE", lookup)
    assert r.outcome is AuthOutcome.WRONG_REALM
    # method is covered by the digest
    r = srv.verify(DigestClient("alice", "s3cret").authorize(ch, "INVITE", "sip:x"), "BYE", lookup)
    assert r.outcome is AuthOutcome.BAD_CREDENTIALS


def test_unsupported_algorithm() -> None:
    srv = make_server(algorithms=("SHA-256",))
    nonce = parse_auth_params(srv.challenges()[0])[1]["nonce"]
    md5 = DigestClient("alice", "s3cret").authorize(
        f'Digest realm="{REALM}", nonce="{nonce}", algorithm=MD5, qop="auth"', "INVITE", "sip:x")
    assert srv.verify(md5, "INVITE", lookup).outcome is AuthOutcome.UNSUPPORTED_ALGORITHM
    weird = md5.replace("algorithm=MD5", "algorithm=SHA-1")
    assert srv.verify(weird, "INVITE", lookup).outcome is AuthOutcome.UNSUPPORTED_ALGORITHM


def test_replay_and_increasing_nc() -> None:
    srv = make_server()
    c = DigestClient("alice", "s3cret")
    ch = srv.challenges()[0]
    first = c.authorize(ch, "INVITE", "sip:x")
    assert srv.verify(first, "INVITE", lookup).ok
    assert srv.verify(first, "INVITE", lookup).outcome is AuthOutcome.REPLAY
    second = c.authorize(ch, "INVITE", "sip:x")
    third = c.authorize(ch, "INVITE", "sip:x")
    assert srv.verify(third, "INVITE", lookup).ok          # nc 3
    assert srv.verify(second, "INVITE", lookup).outcome is AuthOutcome.REPLAY  # nc 2 < 3
    assert srv.verify(c.authorize(ch, "INVITE", "sip:x"), "INVITE", lookup).ok  # nc 4


def test_bad_digest_does_not_burn_nc() -> None:
    srv = make_server()
    ch = srv.challenges()[0]
    forged = DigestClient("alice", "wrong")
    for _ in range(5):
        forged.authorize(ch, "INVITE", "sip:x")
    assert srv.verify(forged.authorize(ch, "INVITE", "sip:x"), "INVITE", lookup).outcome \
        is AuthOutcome.BAD_CREDENTIALS
    assert srv.verify(DigestClient("alice", "s3cret").authorize(ch, "INVITE", "sip:x"), "INVITE", lookup).ok


def test_expired_nonce_is_stale() -> None:
    clock = FakeClock()
    srv = make_server(clock)
    c = DigestClient("alice", "s3cret")
    ch = srv.challenges()[0]
    clock.t += 301
    r = srv.verify(c.authorize(ch, "INVITE", "sip:x"), "INVITE", lookup)
    assert r.outcome is AuthOutcome.STALE
    # wrong password with a stale nonce is still bad credentials (no stale=TRUE hint)
    r = srv.verify(DigestClient("alice", "no").authorize(ch, "INVITE", "sip:x"), "INVITE", lookup)
    assert r.outcome is AuthOutcome.BAD_CREDENTIALS
    assert srv.verify(c.authorize(srv.challenges()[0], "INVITE", "sip:x"), "INVITE", lookup).ok


def test_nonce_manager_states() -> None:
    clock = FakeClock()
    nm = NonceManager(secret=b"k" * 32, lifetime=10, clock=clock)
    n = nm.issue()
    assert len(n) == 48 and n.isascii() and "=" not in n
    assert nm.issue() != n
    assert nm.check(n) is NonceState.VALID
    assert NonceManager(secret=b"other", clock=clock).check(n) is NonceState.INVALID
    flipped = n[:-1] + ("A" if n[-1] != "A" else "B")
    assert nm.check(flipped) is NonceState.INVALID
    for garbage in ["", "abc", "x" * 48, "é" * 48, n + "=", n[:-2]]:
        assert nm.check(garbage) is NonceState.INVALID
    if "-" in n or "_" in n:  # alternative alphabet spellings must not alias
        assert nm.check(n.replace("-", "+").replace("_", "/")) is NonceState.INVALID
    clock.t += 11
    assert nm.check(n) is NonceState.STALE


def test_nonce_manager_rejects_every_single_byte_forgery() -> None:
    nm = NonceManager(secret=b"k" * 32, clock=FakeClock())
    n = nm.issue()
    raw = base64.urlsafe_b64decode(n)
    assert len(raw) == 36
    for i in range(len(raw)):  # timestamp, random part and MAC are all covered
        forged = raw[:i] + bytes([raw[i] ^ 0x01]) + raw[i + 1:]
        assert nm.check(base64.urlsafe_b64encode(forged).decode()) is NonceState.INVALID
    assert nm.check(n) is NonceState.VALID  # the remembered last answer is per nonce


def test_nonce_manager_secrets_of_any_length() -> None:
    clock = FakeClock()
    long_secret = bytes(range(100))  # longer than a BLAKE2b key
    nm = NonceManager(secret=long_secret, clock=clock)
    n = nm.issue()
    assert nm.check(n) is NonceState.VALID
    assert NonceManager(secret=long_secret, clock=clock).check(n) is NonceState.VALID  # another worker
    assert NonceManager(secret=long_secret[:-1] + b"x", clock=clock).check(n) is NonceState.INVALID
    assert NonceManager(secret=long_secret[:64], clock=clock).check(n) is NonceState.INVALID
    assert NonceManager(clock=clock).check(n) is NonceState.INVALID  # random secret (a restart)
    assert NonceManager(secret=b"", clock=clock).check(n) is NonceState.INVALID


def test_nonce_manager_record_use_refuses_forged_nonces() -> None:
    nm = NonceManager(secret=b"k" * 32, clock=FakeClock())
    n = nm.issue()
    forged = n[:10] + ("A" if n[10] != "A" else "B") + n[11:]
    assert nm.check(forged) is NonceState.INVALID
    assert not nm.record_use(forged, 1) and not nm.record_use("x" * 48, None)
    assert nm.check(n) is NonceState.VALID and nm.record_use(n, 1)


def test_nonce_manager_replay_table_bounded() -> None:
    clock = FakeClock()
    nm = NonceManager(lifetime=10, clock=clock, max_tracked=3)
    nonces = []
    for _ in range(5):
        clock.t += 0.5
        nonces.append(nm.issue())
    for n in nonces:
        assert nm.record_use(n, 1)
    assert len(nm._seen) == 3
    # evicted (still live) nonces become STALE, so they can never be replayed
    assert nm.check(nonces[0]) is NonceState.STALE and nm.check(nonces[1]) is NonceState.STALE
    assert nm.check(nonces[4]) is NonceState.VALID
    assert not nm.record_use(nonces[4], 1) and nm.record_use(nonces[4], 2)
    assert not nm.record_use(nonces[4], None)
    clock.t += 20
    fresh = nm.issue()
    assert nm.record_use(fresh, None)
    assert len(nm._seen) == 1  # expired ones forgotten
    assert not nm.record_use(fresh, None)


def test_forged_nonce_is_malformed() -> None:
    srv = make_server()
    c = DigestClient("alice", "s3cret")
    ch = f'Digest realm="{REALM}", nonce="{"A" * 48}", qop="auth", algorithm=SHA-256'
    r = srv.verify(c.authorize(ch, "INVITE", "sip:x"), "INVITE", lookup)
    assert r.outcome is AuthOutcome.MALFORMED
    other = DigestServer(REALM, NonceManager(), algorithms=("SHA-256",))
    r = srv.verify(c.authorize(other.challenges()[0], "INVITE", "sip:x"), "INVITE", lookup)
    assert r.outcome is AuthOutcome.MALFORMED


@pytest.mark.parametrize("value", [
    "", "garbage", "Basic YWxhZGRpbjpvcGVuc2VzYW1l", 'Digest username="alice"', 'Digest username="alice',
    'Digest username="alice", realm="sipmesh.test", nonce="n", uri="sip:x", response="zz"',
    'Digest username="alice", realm="sipmesh.test", nonce="n", uri="sip:x", response="é" ',
    'Digest username="alice", realm="sipmesh.test", nonce="n", response="00"',
    "\x00\x01\x02", 'Digest a=b, ,,, c="d',
])
def test_garbage_is_malformed_not_exception(value: str) -> None:
    assert make_server().verify(value, "INVITE", lookup).outcome is AuthOutcome.MALFORMED


def test_malformed_qop_fields() -> None:
    srv = make_server()
    c = DigestClient("alice", "s3cret")
    good = c.authorize(srv.challenges()[0], "INVITE", "sip:x")
    _, p = parse_auth_params(good)
    for mutate in ({"nc": "1"}, {"nc": "zzzzzzzz"}, {"qop": "auth-conf"}, {"response": p["response"][:-2]}):
        q = dict(p) | mutate
        assert srv.verify(format_auth_params("Digest", q), "INVITE", lookup).outcome is AuthOutcome.MALFORMED
    q = dict(p)
    del q["cnonce"]
    assert srv.verify(format_auth_params("Digest", q), "INVITE", lookup).outcome is AuthOutcome.MALFORMED
    assert srv.verify(good, "INVITE", lookup).ok


def test_upper_case_response_hex_accepted() -> None:
    srv = make_server()
    value = DigestClient("alice", "s3cret").authorize(srv.challenges()[0], "INVITE", "sip:x")
    _, p = parse_auth_params(value)
    upper = value.replace(p["response"], p["response"].upper())
    assert upper != value and srv.verify(upper, "INVITE", lookup).ok


def test_opaque_must_echo() -> None:
    srv = make_server(opaque="xyz")
    ch = srv.challenges()[0]
    value = DigestClient("alice", "s3cret").authorize(ch.replace('"xyz"', '"abc"'), "INVITE", "sip:x")
    assert srv.verify(value, "INVITE", lookup).outcome is AuthOutcome.MALFORMED


@settings(max_examples=300)
@given(st.text())
def test_verify_random_never_raises(s: str) -> None:
    assert make_server().verify(s, "INVITE", lookup).outcome is AuthOutcome.MALFORMED


def test_lookup_gets_base_algorithm_and_never_password() -> None:
    seen: list[tuple[str, str, str]] = []

    def lk(u: str, r: str, a: str) -> str | None:
        seen.append((u, r, a))
        return lookup(u, r, a)

    srv = make_server(algorithms=("SHA-256-sess",))
    assert srv.verify(DigestClient("alice", "s3cret").authorize(srv.challenges()[0], "INVITE", "sip:x"),
                      "INVITE", lk).ok
    assert seen == [("alice", REALM, "SHA-256")]
