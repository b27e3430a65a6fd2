"""agent/trust.py: a network CA, member certificates, and signed offers and answers.

Every way a session is refused is provoked here, each by tampering with one thing,
and the reason a user would read (log, status) is asserted. The attacker of these
tests is what a SIP server on the path can do: rewrite, drop, add, reorder and replay
a= lines, move a body to another dialog, and hand out certificates it has.
"""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import os
import stat

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sipmesh.agent.attributes import build_sdp, read_attribute_list
from sipmesh.agent.params import MAX_VALUE_LENGTH, ParamError
from sipmesh.agent.trust import (MAX_SKEW, MemberCertificate, NetworkCA, RevocationList,
                                 TrustAnchor, TrustError, b64url, check_member,
                                 generate_identity, identity_public_text,
                                 issue_member_certificate, load_identity, save_identity,
                                 session_message, sign_session, verify_session)
from sipmesh.apps.wireguard import keypair
from sipmesh.sip.sdp import SDPError
from tests.lab.certs import private_texts

NOW = 1_800_000_000.0
CALL_ID = "a84b4c76e66710@alice.example"
FROM = "sip:alice@lab.mesh.example"
TO = "sip:bob@lab.mesh.example"


@dataclasses.dataclass
class Member:
    name: str
    identity: Ed25519PrivateKey
    wg_private: bytes
    wg_public: str
    cert: MemberCertificate


def make_member(ca: NetworkCA, name: str, address: str, *, groups=("lab",), days=7.0,
                now: float = NOW) -> Member:
    identity = generate_identity()
    wg_private, wg_public = keypair()
    cert = issue_member_certificate(ca, name=name, address=address, wg_pubkey=wg_public,
                                    identity_pubkey=identity_public_text(identity),
                                    groups=groups, days=days, now=now)
    return Member(name, identity, wg_private, wg_public, cert)


@pytest.fixture(scope="module")
def ca() -> NetworkCA:
    return NetworkCA.create("lab")


@pytest.fixture(scope="module")
def alice(ca) -> Member:
    return make_member(ca, "alice", "100.64.0.5/24")


@pytest.fixture(scope="module")
def bob(ca) -> Member:
    return make_member(ca, "bob", "100.64.0.6/24")


def session_attrs(member: Member) -> list[tuple[str, str]]:
    """An offer's a= lines as the mesh data plane will write them (ICE + WireGuard)."""
    return [("ice-ufrag", "8hhY"), ("ice-pwd", "asd88fgpdd777uzjYhagZg"),
            ("candidate", "1 1 udp 2130706431 10.0.1.1 51820 typ host"),
            ("candidate", "2 1 udp 1694498815 192.0.2.3 45664 typ srflx raddr 10.0.1.1 rport 51820"),
            ("end-of-candidates", ""),
            ("wg-pubkey", member.wg_public), ("mesh-ip", str(member.cert.address.ip))]


def signed_offer(member: Member, *, now: float = NOW, call_id: str = CALL_ID,
                 role: str = "offer") -> list[tuple[str, str]]:
    attrs = session_attrs(member)
    return attrs + sign_session(attrs, call_id=call_id, from_uri=FROM, to_uri=TO, role=role,
                                certificate=member.cert, identity_key=member.identity, now=now)


def verify(attrs, ca, *, call_id=CALL_ID, from_uri=FROM, to_uri=TO, role="offer",
           revoked=(), now=NOW, **kw):
    return verify_session(attrs, call_id, from_uri, to_uri, role, ca.public_key, revoked, now,
                          **kw)


def refused(attrs, ca, reason: str, text: str, **kw) -> TrustError:
    with pytest.raises(TrustError) as caught:
        verify(attrs, ca, **kw)
    assert caught.value.reason == reason, caught.value
    assert text in str(caught.value)
    return caught.value


def replace(attrs, name: str, value: str) -> list[tuple[str, str]]:
    return [(n, value if n == name else v) for n, v in attrs]


def forge(attrs, cert: MemberCertificate, key: Ed25519PrivateKey, *, now: float = NOW,
          role: str = "offer", call_id: str = CALL_ID) -> list[tuple[str, str]]:
    """A session signed by whoever holds `key` with `cert`, bypassing sign_session's own
    checks: what an attacker with those two things can send."""
    signed = [*attrs, ("mesh-cert", cert.to_text()), ("mesh-ts", str(int(now)))]
    sig = key.sign(session_message(signed, call_id=call_id, from_uri=FROM, to_uri=TO, role=role))
    return signed + [("mesh-sig", b64url(sig))]


# ---------------------------------------------------------------------------- what works


def test_a_signed_offer_verifies_and_names_the_certified_peer(ca, alice):
    peer = verify(signed_offer(alice), ca, expected_name="alice")
    assert (peer.network, peer.name, peer.wg_pubkey) == ("lab", "alice", alice.wg_public)
    assert peer.address == ipaddress.ip_interface("100.64.0.5/24")
    assert peer.groups == ("lab",) and peer.serial == alice.cert.serial
    assert peer.signed_at == int(NOW)


def test_a_signed_session_survives_sdp_and_fits_the_agents_value_limit(ca, alice, bob):
    """The attributes go through a real SDP body and the agent's reader (512 characters a
    value at most) and still verify, as offer and as answer."""
    for member, role in ((alice, "offer"), (bob, "answer")):
        attrs = signed_offer(member, role=role)
        body = build_sdp(username=member.name, address="192.0.2.1", media="application",
                         proto="udp", port=9, attributes=attrs)
        assert read_attribute_list(body) == attrs
        assert verify(read_attribute_list(body), ca, role=role).name == member.name


def test_the_largest_certificate_fits_one_a_line_and_a_larger_one_is_refused(ca):
    identity, (_, wg) = generate_identity(), keypair()
    big = issue_member_certificate(
        ca, name="m" * 64, address="2001:db8:ffff:ffff:ffff:ffff:ffff:fffe/64", wg_pubkey=wg,
        identity_pubkey=identity_public_text(identity), groups=[f"g{i:02d}" + "x" * 28 for i in range(3)])
    assert len(big.to_text()) <= MAX_VALUE_LENGTH
    assert MemberCertificate.from_text(big.to_text()) == big
    with pytest.raises(TrustError, match="fewer or shorter groups"):
        issue_member_certificate(ca, name="m" * 64, address="100.64.0.9/24", wg_pubkey=wg,
                                 identity_pubkey=identity_public_text(identity),
                                 groups=[f"g{i:02d}" + "x" * 29 for i in range(8)])


def test_a_mesh_ip_with_the_prefix_is_accepted_when_it_is_the_certificates(ca, alice):
    attrs = replace(session_attrs(alice), "mesh-ip", "100.64.0.5/24")
    signed = attrs + sign_session(attrs, call_id=CALL_ID, from_uri=FROM, to_uri=TO, role="offer",
                                  certificate=alice.cert, identity_key=alice.identity, now=NOW)
    assert verify(signed, ca).name == "alice"


# ---------------------------------------------------------------------------- the certificate


def test_a_certificate_of_another_ca_is_refused(ca):
    other = NetworkCA.create("lab")  # same network name, another key: a broker's own CA
    mallory = make_member(other, "alice", "100.64.0.5/24")
    refused(signed_offer(mallory), ca, "other-ca", "signed by another CA")


@pytest.mark.parametrize("change", [
    {"name": "bob"}, {"network": "lob"}, {"groups": ("admins",)}, {"serial": 1},
    {"address": ipaddress.ip_interface("100.64.0.66/24")},
    {"not_before": int(NOW) - 86400 * 30}, {"not_after": int(NOW) + 86400 * 300},
    {"wg_pubkey": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="},
    {"identity_pubkey": "identity"},
], ids=lambda c: next(iter(c)))
def test_any_field_changed_in_a_certificate_breaks_the_cas_signature(ca, alice, change):
    """A holder of a real certificate edits one field, keeps the CA's signature, and signs
    the session with a key of its choice: the certificate no longer verifies."""
    key = alice.identity
    if change.get("identity_pubkey") == "identity":
        key = generate_identity()
        change = {"identity_pubkey": identity_public_text(key)}
    cert = dataclasses.replace(alice.cert, **change)
    attrs = [("wg-pubkey", cert.wg_pubkey), ("mesh-ip", str(cert.address.ip))]
    refused(forge(attrs, cert, key), ca, "bad-cert-signature",
            "does not verify against this network's CA")


def test_a_forged_certificate_claiming_the_cas_key_id_is_refused(ca):
    rogue = NetworkCA.create("lab")
    mallory = make_member(rogue, "mallory", "100.64.0.66/24")
    cert = dataclasses.replace(mallory.cert, ca_id=ca.key_id)
    cert = dataclasses.replace(cert, signature=rogue.sign(b"sipmesh member certificate v1",
                                                          cert.tbs()))
    refused(forge(session_attrs(mallory), cert, mallory.identity), ca, "bad-cert-signature",
            "forged or altered")


def test_an_expired_certificate_is_refused_and_says_how_to_renew(ca, alice):
    later = alice.cert.not_after + 1
    error = refused(signed_offer(alice, now=later), ca, "expired", "expired at", now=later)
    assert "sipmesh network cert issue" in str(error)


def test_a_certificate_not_yet_valid_is_refused(ca):
    future = make_member(ca, "carol", "100.64.0.7/24", now=NOW + 86400)
    refused(signed_offer(future), ca, "not-yet-valid", "not valid before")


def test_a_revoked_certificate_is_refused_by_serial_and_by_signed_list(ca, alice):
    refused(signed_offer(alice), ca, "revoked", "is revoked", revoked={alice.cert.serial})
    crl = RevocationList.empty(ca, NOW).revoke(ca, alice.cert.serial, alice.cert.not_after, NOW)
    crl = RevocationList.from_text(crl.to_text(), ca.public_key)
    refused(signed_offer(alice), ca, "revoked", f"(serial {alice.cert.serial}) is revoked",
            revoked=crl)


def test_short_lived_certificates_ask_for_renewal_in_their_last_third(ca):
    member = make_member(ca, "dave", "100.64.0.8/24", days=6)
    assert not member.cert.needs_renewal(NOW + 3 * 86400)
    assert member.cert.needs_renewal(NOW + 4.1 * 86400)
    assert member.cert.not_after == int(NOW) + 6 * 86400


# ---------------------------------------------------------------------------- the bindings


def test_a_proxy_swapping_the_wireguard_key_is_refused(ca, alice):
    _, attacker = keypair()
    refused(replace(signed_offer(alice), "wg-pubkey", attacker), ca, "wrong-wg-key",
            "the WireGuard key in a=wg-pubkey is not the one in the member's certificate")


def test_a_member_signing_a_wireguard_key_not_in_its_certificate_is_refused(ca, alice):
    _, other = keypair()
    attrs = replace(session_attrs(alice), "wg-pubkey", other)
    refused(forge(attrs, alice.cert, alice.identity), ca, "wrong-wg-key",
            "not the one in the member's certificate")
    with pytest.raises(TrustError) as caught:  # and our own side would not sign it
        sign_session(attrs, call_id=CALL_ID, from_uri=FROM, to_uri=TO, role="offer",
                     certificate=alice.cert, identity_key=alice.identity, now=NOW)
    assert caught.value.reason == "wrong-wg-key"


def test_a_session_without_a_wireguard_key_is_refused(ca, alice):
    attrs = [a for a in session_attrs(alice) if a[0] != "wg-pubkey"]
    refused(forge(attrs, alice.cert, alice.identity), ca, "missing", "no a=wg-pubkey")


@pytest.mark.parametrize("address", ["100.64.0.66", "100.64.0.5/16", "not-an-address"])
def test_a_proxy_rewriting_the_mesh_address_is_refused(ca, alice, address):
    refused(replace(signed_offer(alice), "mesh-ip", address), ca, "wrong-address",
            "the address in a=mesh-ip")


def test_another_member_answering_for_the_callee_is_refused_by_name(ca, alice, bob):
    """The SIP server routes our INVITE for bob to alice (a real member): her session is
    valid, but she is not whom we called."""
    refused(signed_offer(alice, role="answer"), ca, "wrong-member",
            "for member alice, not bob", role="answer", expected_name="bob")


def test_sign_session_refuses_an_identity_key_that_is_not_the_certificates(alice):
    with pytest.raises(TrustError) as caught:
        sign_session(session_attrs(alice), call_id=CALL_ID, from_uri=FROM, to_uri=TO,
                     role="offer", certificate=alice.cert, identity_key=generate_identity())
    assert caught.value.reason == "wrong-identity"


# ---------------------------------------------------------------------------- the signature


@pytest.mark.parametrize("tamper", [
    lambda a: replace(a, "candidate", "1 1 udp 2130706431 203.0.113.66 51820 typ host"),
    lambda a: replace(a, "ice-pwd", "attackerattackerattack"),
    lambda a: [x for x in a if x[0] != "candidate"],
    lambda a: a[:2] + [("candidate", "9 1 udp 1 203.0.113.66 1 typ relay")] + a[2:],
    lambda a: [a[1], a[0], *a[2:]],
    lambda a: a + [("x-extra", "1")],
], ids=["candidate", "ice-pwd", "dropped", "added", "reordered", "appended"])
def test_a_rewritten_a_line_is_refused(ca, alice, tamper):
    refused(tamper(signed_offer(alice)), ca, "bad-signature",
            "signature does not match the session (SDP rewritten in transit?)")


@pytest.mark.parametrize("where", [
    {"call_id": "other-dialog@alice.example"}, {"from_uri": "sip:mallory@lab.mesh.example"},
    {"to_uri": "sip:carol@lab.mesh.example"}, {"role": "answer"},
], ids=lambda w: next(iter(w)))
def test_a_body_moved_to_another_dialog_or_role_is_refused(ca, alice, where):
    refused(signed_offer(alice), ca, "bad-signature", "SDP rewritten in transit?", **where)


def test_an_old_answer_replayed_is_refused(ca, bob):
    answer = signed_offer(bob, role="answer")
    later = NOW + MAX_SKEW + 1
    refused(answer, ca, "stale", "timestamp too old (replay?)", role="answer", now=later)
    assert verify(answer, ca, role="answer", now=NOW + MAX_SKEW).name == "bob"


def test_a_timestamp_from_the_future_or_rewritten_is_refused(ca, alice):
    refused(signed_offer(alice, now=NOW + MAX_SKEW + 5), ca, "future", "in the future")
    refused(replace(signed_offer(alice), "mesh-ts", str(int(NOW) + 1)), ca, "bad-signature",
            "SDP rewritten")
    refused(replace(signed_offer(alice), "mesh-ts", "01800000000"), ca, "malformed",
            "not a time in seconds")


@pytest.mark.parametrize("name", ["mesh-cert", "mesh-ts", "mesh-sig"])
def test_a_missing_or_doubled_trust_attribute_is_refused(ca, alice, name):
    attrs = signed_offer(alice)
    refused([a for a in attrs if a[0] != name], ca, "missing", f"no a={name}")
    doubled = attrs + [next(a for a in attrs if a[0] == name)]
    refused(doubled, ca, "malformed", f"a={name} 2 times")


def test_a_signature_in_a_non_canonical_encoding_is_refused(ca, alice):
    """64 bytes in base64url leave 4 unused bits in the last character; a lax decoder
    would accept 15 other texts for the same signature."""
    attrs = signed_offer(alice)
    sig = attrs[-1][1]
    twin = sig[:-1] + "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"[
        ("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".index(sig[-1]) ^ 1)]
    assert base64.urlsafe_b64decode(twin + "==") == base64.urlsafe_b64decode(sig + "==")
    refused(replace(attrs, "mesh-sig", twin), ca, "malformed", "not canonical base64url")


@pytest.mark.parametrize("text", ["", "!!", "c21jMQ", b64url(b"smc1" + bytes(300))])
def test_a_garbled_certificate_is_refused_as_malformed(ca, alice, text):
    refused(replace(signed_offer(alice), "mesh-cert", text), ca, "malformed", "certificate")


# ---------------------------------------------------------------------------- properties

SIGNED_CA = NetworkCA.create("lab")
SIGNED_ALICE = make_member(SIGNED_CA, "alice", "100.64.0.5/24")
SIGNED = signed_offer(SIGNED_ALICE)
REPLACEMENTS = st.integers(1, 255).map(chr)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(index=st.integers(0, len(SIGNED) - 1), part=st.sampled_from(["name", "value"]),
       position=st.integers(0, 10_000), replacement=REPLACEMENTS)
def test_any_single_byte_change_of_any_a_line_is_refused(index, part, position, replacement):
    name, value = SIGNED[index]
    text = name if part == "name" else value
    if not text:
        text, position = " ", 0  # a flag's empty value: put a byte there instead
    position %= len(text)
    if text[position] == replacement:
        replacement = chr(ord(replacement) % 255 + 1)
    changed = text[:position] + replacement + text[position + 1:]
    line = (changed, value) if part == "name" else (name, changed)
    attrs = SIGNED[:index] + [line] + SIGNED[index + 1:]
    with pytest.raises(TrustError):
        verify_session(attrs, CALL_ID, FROM, TO, "offer", SIGNED_CA.public_key, (), NOW)


@settings(max_examples=300, deadline=None)
@given(which=st.sampled_from(["call_id", "from_uri", "to_uri"]), position=st.integers(0, 10_000),
       replacement=REPLACEMENTS)
def test_any_single_byte_change_of_the_call_id_from_or_to_is_refused(which, position, replacement):
    values = {"call_id": CALL_ID, "from_uri": FROM, "to_uri": TO}
    text = values[which]
    position %= len(text)
    if text[position] == replacement:
        replacement = chr(ord(replacement) % 255 + 1)
    values[which] = text[:position] + replacement + text[position + 1:]
    with pytest.raises(TrustError) as caught:
        verify_session(SIGNED, values["call_id"], values["from_uri"], values["to_uri"], "offer",
                       SIGNED_CA.public_key, (), NOW)
    assert caught.value.reason == "bad-signature"


BODY = build_sdp(username="alice", address="192.0.2.1", media="application", proto="udp",
                 port=9, attributes=SIGNED)
A_LINES = [i for i in range(len(BODY))
           if BODY.rfind(b"\n", 0, i) + 1 <= i and BODY[BODY.rfind(b"\n", 0, i) + 1:][:2] == b"a="
           and BODY[i:i + 1] not in (b"\r", b"\n")]


@settings(max_examples=400, deadline=None)
@given(position=st.sampled_from(A_LINES), byte=st.integers(0, 255))
def test_any_single_byte_change_in_the_bodys_a_lines_is_refused(position, byte):
    """The same on the wire: one byte of an a= line of the body changed, then read as the
    agent reads bodies. Either the body is refused by the SDP reader, or the session by
    the trust check; never accepted."""
    if BODY[position] == byte:
        byte = (byte + 1) % 256
    body = BODY[:position] + bytes([byte]) + BODY[position + 1:]
    try:
        attrs = read_attribute_list(body)
    except (SDPError, ParamError, UnicodeDecodeError):
        return
    with pytest.raises(TrustError):
        verify_session(attrs, CALL_ID, FROM, TO, "offer", SIGNED_CA.public_key, (), NOW)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_certificate_and_revocation_parsers_refuse_garbage_with_trust_error_only(data):
    for parse in (lambda: MemberCertificate.from_bytes(data),
                  lambda: MemberCertificate.from_text(b64url(data)),
                  lambda: RevocationList.from_text(b64url(data), SIGNED_CA.public_key)):
        try:
            parse()
        except TrustError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(codec="ascii"), min_size=1, max_size=64))
def test_member_names_are_the_brokers_user_names(name):
    from sipmesh.broker.users import UsersFileError, check_name
    try:
        check_name(name)
        broker_ok = True
    except UsersFileError:
        broker_ok = False
    try:
        check_member(name)
        ours = True
    except TrustError:
        ours = False
    assert ours == broker_ok


# ---------------------------------------------------------------------------- revocation list


def test_revocation_lists_verify_prune_and_refuse_tampering(ca, alice, bob):
    crl = RevocationList.empty(ca, NOW)
    crl = crl.revoke(ca, alice.cert.serial, alice.cert.not_after, NOW)
    crl = crl.revoke(ca, bob.cert.serial, int(NOW) + 10, NOW)
    assert crl.serials == {alice.cert.serial, bob.cert.serial}
    pruned = crl.revoke(ca, 77, int(NOW) + 86400, NOW + 20)  # bob's would have expired anyway
    assert pruned.serials == {alice.cert.serial, 77} and pruned.issued_at > crl.issued_at
    text = pruned.to_text()
    assert RevocationList.from_text(text, ca.public_key) == pruned
    raw = bytearray(base64.urlsafe_b64decode(text.strip() + "=="))
    raw[30] ^= 1  # one bit of a serial
    with pytest.raises(TrustError, match="does not verify"):
        RevocationList.from_text(b64url(bytes(raw)), ca.public_key)
    with pytest.raises(TrustError, match="another CA"):
        RevocationList.from_text(text, NetworkCA.create("lab").public_key)


# ---------------------------------------------------------------------------- keys and files


def test_ca_files_are_private_and_load_back(tmp_path, alice):
    ca = NetworkCA.create("lab")
    ca.save(tmp_path / "ca")
    assert stat.S_IMODE(os.stat(tmp_path / "ca").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "ca" / "ca.key").st_mode) == 0o600
    loaded = NetworkCA.load(tmp_path / "ca")
    assert loaded.key_id == ca.key_id and loaded.network == "lab"
    assert TrustAnchor.from_text((tmp_path / "ca" / "ca.pub").read_text()).key_id == ca.key_id
    with pytest.raises(TrustError, match="a network has one CA"):
        ca.save(tmp_path / "ca")
    os.chmod(tmp_path / "ca" / "ca.key", 0o644)
    with pytest.raises(TrustError, match="chmod 600"):
        NetworkCA.load(tmp_path / "ca")


def test_identity_key_file_is_0600_and_never_replaced(tmp_path):
    key = generate_identity()
    path = tmp_path / "state" / "identity.key"
    save_identity(path, key)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert identity_public_text(load_identity(path)) == identity_public_text(key)
    with pytest.raises(TrustError, match="not replacing"):
        save_identity(path, generate_identity())
    path.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    with pytest.raises(TrustError) as caught:
        load_identity(path)
    assert "not a key" not in str(caught.value)  # the file's content is never echoed


def test_no_private_key_in_reprs_errors_or_logs(ca, alice, caplog):
    caplog.set_level("DEBUG")
    seen = [repr(ca), str(ca), repr(alice.cert), repr(ca.anchor), repr(alice.cert.describe())]
    attrs = signed_offer(alice)
    seen += [f"{n}:{v}" for n, v in attrs]
    for tamper in (lambda a: replace(a, "wg-pubkey", keypair()[1]), lambda a: a[1:]):
        try:
            verify(tamper(attrs), ca)
        except TrustError as exc:
            seen.append(str(exc))
    seen += [record.getMessage() for record in caplog.records]
    joined = "\n".join(seen)
    for secret in private_texts(alice.identity) + private_texts(ca._key):
        assert secret not in joined
