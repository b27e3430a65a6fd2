"""The broker's parts without sockets: registrar rules, location store, users file,
rate limiter, loop detection, `myself`."""

from __future__ import annotations

import itertools
import concurrent.futures
import os
import sqlite3

import pytest

from sipmesh.broker.domains import Listener, LocalIdentity
from sipmesh.broker.location import Binding, Changes, LocationService
from sipmesh.broker.nat import add_alias, format_alias, parse_alias, response_from_nat, take_alias
from sipmesh.broker.proxy import BRANCH_PREFIX, branch_worker, loop_hash, make_branch
from sipmesh.broker.ratelimit import LoadShedder, RateLimiter, receive_queue_fill, retry_after, triage
from sipmesh.broker.registrar import RegistrarPolicy, behind_nat, contact_key, process_register
from sipmesh.broker.replies import ReplyCache, quick_reply
from sipmesh.broker.users import UsersFile, UsersFileError, parse_users
from sipmesh.broker.workers import owner_of
from sipmesh.sip.auth import compute_ha1
from sipmesh.sip.headers import parse_via
from sipmesh.sip.message import make_response, parse_message
from sipmesh.sip.transport import stun as stun_codec
from sipmesh.sip.transport.base import Flow
from sipmesh.sip.uri import parse_sip_uri
from tests.lab import wait_for_async

AOR = "sip:alice@example.org"
SOURCE = Flow("UDP", "192.0.2.7", 40000)


_branches = itertools.count(1)


def register(*contacts: str, call_id: str = "cid-1", cseq: int = 1, expires: str | None = None,
             extra: str = "") -> object:
    """A REGISTER; each call is a new request (a new branch)."""
    lines = [
        "REGISTER sip:example.org SIP/2.0",
        f"Via: SIP/2.0/UDP 192.0.2.7:5060;branch=z9hG4bK-{next(_branches)}",
        "From: <sip:alice@example.org>;tag=a1",
        "To: <sip:alice@example.org>",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} REGISTER",
    ]
    lines += [f"Contact: {c}" for c in contacts]
    if expires is not None:
        lines.append(f"Expires: {expires}")
    if extra:
        lines.append(extra)
    lines += ["Content-Length: 0", "", ""]
    return parse_message("\r\n".join(lines).encode())


class Store:
    """process_register + the bindings it leaves, like LocationService.update would."""

    def __init__(self) -> None:
        self.bindings: dict[str, Binding] = {}

    def apply(self, request, now: float = 1000.0, policy: RegistrarPolicy = RegistrarPolicy()):
        current = [b for b in self.bindings.values() if b.expires > now]
        outcome, changes = process_register(request, AOR, current, now=now, source=SOURCE, policy=policy)
        if changes.delete_all:
            self.bindings.clear()
        for key in changes.delete:
            self.bindings.pop(key, None)
        for b in changes.upsert:
            self.bindings[b.contact_key] = b
        return outcome


def contacts_of(outcome) -> list[str]:
    return [v for n, v in outcome.headers if n == "Contact"]


# ------------------------------------------------------------------ registrar (§10.3)

def test_several_contacts_with_q_are_listed_best_first_with_their_expiry():
    s = Store()
    out = s.apply(register("<sip:alice@192.0.2.7:5060>;q=0.5", "<sip:alice@198.51.100.1:5070>;q=0.9",
                           expires="600"))
    assert out.status == 200
    assert contacts_of(out) == ["<sip:alice@198.51.100.1:5070>;expires=600;q=0.9",
                                "<sip:alice@192.0.2.7:5060>;expires=600;q=0.5"]
    assert any(n == "Date" for n, _ in out.headers)
    b = s.bindings[contact_key(parse_sip_uri("sip:alice@192.0.2.7:5060"))]
    assert b.source == SOURCE and b.call_id == "cid-1" and b.cseq == 1 and b.q == 0.5


def test_contact_expires_param_beats_the_header_and_is_capped():
    s = Store()
    out = s.apply(register("<sip:a@192.0.2.7>;expires=120", "<sip:b@192.0.2.7>", expires="99999"))
    assert sorted(contacts_of(out)) == ["<sip:a@192.0.2.7>;expires=120", "<sip:b@192.0.2.7>;expires=3600"]


def test_query_without_contact_lists_the_bindings_and_changes_nothing():
    s = Store()
    s.apply(register("<sip:alice@192.0.2.7>", expires="600"))
    out = s.apply(register(cseq=2), now=1100.0)
    assert out.status == 200 and contacts_of(out) == ["<sip:alice@192.0.2.7>;expires=500"]


def test_refresh_and_remove_a_single_contact():
    s = Store()
    s.apply(register("<sip:a@192.0.2.7>", "<sip:b@192.0.2.7>", expires="600"))
    out = s.apply(register("<sip:a@192.0.2.7>;expires=0", cseq=2), now=1010.0)
    assert contacts_of(out) == ["<sip:b@192.0.2.7>;expires=590"]
    out = s.apply(register("<sip:b@192.0.2.7>", cseq=3, expires="900"), now=1020.0)
    assert contacts_of(out) == ["<sip:b@192.0.2.7>;expires=900"]


def test_contact_star_with_expires_zero_removes_everything():
    s = Store()
    s.apply(register("<sip:a@192.0.2.7>", "<sip:b@192.0.2.7>", expires="600"))
    out = s.apply(register("*", cseq=2, expires="0"))
    assert out.status == 200 and contacts_of(out) == [] and not s.bindings


@pytest.mark.parametrize("contacts,expires", [(("*",), "60"), (("*",), None), (("*", "<sip:a@192.0.2.7>"), "0")])
def test_contact_star_needs_expires_zero_and_no_other_contact(contacts, expires):
    assert Store().apply(register(*contacts, expires=expires)).status == 400


def test_too_brief_interval_gets_423_with_min_expires():
    out = Store().apply(register("<sip:a@192.0.2.7>", expires="10"))
    assert out.status == 423 and ("Min-Expires", "60") in out.headers


def test_same_call_id_needs_a_higher_cseq():
    s = Store()
    assert s.apply(register("<sip:a@192.0.2.7>", cseq=5, expires="600")).status == 200
    stale = s.apply(register("<sip:a@192.0.2.7>", cseq=4, expires="0"))
    assert stale.status == 500  # §10.3 step 7: "the update MUST be aborted and the request fails"
    assert s.apply(register("<sip:a@192.0.2.7>", cseq=5, expires="0")).status == 500
    assert s.bindings  # nothing was removed
    # a different Call-ID (another UA instance) may replace the binding whatever its CSeq
    assert s.apply(register("<sip:a@192.0.2.7>", call_id="cid-2", cseq=1, expires="0")).status == 200
    assert not s.bindings


def test_a_retransmission_is_answered_again_but_a_new_request_with_the_same_cseq_fails():
    s = Store()
    first = register("<sip:a@192.0.2.7>", cseq=7, expires="600")
    assert s.apply(first).status == 200
    again = s.apply(first, now=1001.0)  # e.g. handled by another worker, past the reply cache
    assert again.status == 200 and contacts_of(again) == ["<sip:a@192.0.2.7>;expires=599"]
    other = register("<sip:a@192.0.2.7>", cseq=7, expires="0")
    other.headers.set("Via", "SIP/2.0/UDP 192.0.2.7:5060;branch=z9hG4bK-2")
    assert s.apply(other).status == 500 and s.bindings


def test_a_failing_contact_fails_the_whole_request():
    s = Store()
    s.apply(register("<sip:a@192.0.2.7>", cseq=5, expires="600"))
    out = s.apply(register("<sip:b@192.0.2.7>", "<sip:a@192.0.2.7>", cseq=3, expires="600"))
    assert out.status == 500 and len(s.bindings) == 1


def test_contact_comparison_follows_uri_equality():
    s = Store()
    s.apply(register("<sip:alice@EXAMPLE.net;transport=UDP;ob>", expires="600"))
    out = s.apply(register("<sip:alice@example.net;transport=udp>", cseq=2, expires="300"))
    assert len(s.bindings) == 1 and len(contacts_of(out)) == 1


def test_bad_q_and_too_many_contacts_are_refused():
    assert Store().apply(register("<sip:a@192.0.2.7>;q=1.5", expires="600")).status == 400
    policy = RegistrarPolicy(max_contacts=2)
    out = Store().apply(register("<sip:a@h1>", "<sip:a@h2>", "<sip:a@h3>", expires="600"), policy=policy)
    assert out.status == 403


# ------------------------------------------------------------------ location service

def _binding(contact: str, expires: float, aor: str = AOR) -> Binding:
    uri = parse_sip_uri(contact)
    return Binding(aor=aor, contact_key=contact_key(uri), contact=contact, expires=expires, q=1.0,
                   call_id="c", cseq=1, transport="UDP", src_host="192.0.2.7", src_port=5060,
                   updated=expires - 60)


def test_location_survives_reopening_and_purges_expired(tmp_path):
    now = [1000.0]
    db = tmp_path / "loc.db"
    loc = LocationService(db, clock=lambda: now[0])
    loc.update(AOR, lambda cur: (None, Changes(upsert=(_binding("sip:alice@192.0.2.7", 1100.0),
                                                       _binding("sip:alice@192.0.2.8", 2000.0)))))
    loc.close()
    loc = LocationService(db, clock=lambda: now[0])  # another process, or after a crash
    assert [b.contact for b in loc.lookup(AOR)] == ["sip:alice@192.0.2.8", "sip:alice@192.0.2.7"]
    now[0] = 1500.0
    assert [b.contact for b in loc.lookup(AOR)] == ["sip:alice@192.0.2.8"]  # expired ones are never returned
    assert loc.purge() == 1
    raw = sqlite3.connect(db).execute("SELECT COUNT(*) FROM bindings").fetchone()[0]
    assert raw == 1
    assert loc.known(AOR) and not loc.known("sip:bob@example.org")
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert oct(os.stat(db).st_mode & 0o777) == "0o600"
    loc.close()


def test_location_update_many_isolates_a_failing_decision(tmp_path):
    loc = LocationService(tmp_path / "loc.db", clock=lambda: 1000.0)

    def boom(current):
        raise ValueError("bad")

    results = loc.update_many([
        (AOR, lambda cur: ("ok", Changes(upsert=(_binding("sip:alice@192.0.2.7", 2000.0),)))),
        ("sip:bob@example.org", boom)])
    assert results[0] == "ok" and isinstance(results[1], ValueError)
    assert loc.count() == 1
    loc.close()


def test_location_checkpoints_only_when_asked_and_from_another_thread(tmp_path):
    db = tmp_path / "loc.db"
    loc = LocationService(db, clock=lambda: 1000.0, auto_checkpoint=False)
    for i in range(600):
        loc.update(f"sip:u{i}@example.org", lambda cur, i=i: (None, Changes(upsert=(
            _binding(f"sip:u{i}@192.0.2.7", 2000.0, aor=f"sip:u{i}@example.org"),))))
    # SQLite's own checkpoint (at 1000 pages) would have left fewer frames than that
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        assert pool.submit(loc.checkpoint).result() > 1000
    other = sqlite3.connect(db)
    assert other.execute("SELECT COUNT(*) FROM bindings").fetchone()[0] == 600
    other.close()
    loc.close()


# ------------------------------------------------------------------ users file

def test_users_file_holds_hashes_only_and_round_trips(tmp_path):
    path = tmp_path / "users"
    users = UsersFile(path)
    assert len(users) == 0
    assert users.add("example.org", "alice", "correct horse") is True
    assert users.add("example.org", "alice", "battery staple") is False  # password changed
    users.add("other.net", "alice", "x")
    users.save()
    text = path.read_text()
    assert "battery" not in text and "horse" not in text
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    again = UsersFile(path)
    assert again.realms == {"example.org", "other.net"}
    assert again.ha1("alice", "example.org", "MD5") == compute_ha1("alice", "example.org", "battery staple")
    assert again.ha1("alice", "example.org", "SHA-256") == compute_ha1("alice", "example.org", "battery staple",
                                                                       "SHA-256")
    assert again.ha1("bob", "example.org", "MD5") is None
    assert again.remove("example.org", "alice") and not again.remove("example.org", "alice")


def test_users_file_rejects_what_looks_like_a_password():
    with pytest.raises(UsersFileError, match="hex"):
        parse_users("example.org alice hunter2 hunter2\n")
    with pytest.raises(UsersFileError, match="fields"):
        parse_users("example.org alice\n")


def test_users_file_refuses_a_name_or_realm_with_a_trailing_newline(tmp_path):
    """A regex `$` matches before a final newline: 'alice\n' once passed, and split the
    file's line in two when saved."""
    users = UsersFile(tmp_path / "users")
    with pytest.raises(UsersFileError, match="user name"):
        users.add("example.org", "alice\n", "x")
    with pytest.raises(UsersFileError, match="realm"):
        users.add("example.org\n", "alice", "x")


# ------------------------------------------------------------------ protection

def test_token_bucket_per_source():
    now = [0.0]
    rl = RateLimiter(rate=10, burst=5, clock=lambda: now[0])
    assert [rl.check("a") for _ in range(5)] == [0.0] * 5
    wait = rl.check("a")
    assert 0 < wait <= 0.1 and retry_after(wait) == "1"
    assert rl.check("b") == 0.0  # another source has its own bucket
    now[0] = 0.5
    assert rl.check("a") == 0.0


def test_rate_limiter_memory_is_bounded():
    rl = RateLimiter(rate=1, max_sources=3, clock=lambda: 0.0)
    for key in "abcdef":
        rl.check(key)
    assert len(rl) == 3


def test_reply_cache_is_bounded_in_count_and_age():
    now = [0.0]
    cache = ReplyCache(max_entries=2, ttl=32, clock=lambda: now[0])
    flow = Flow("UDP", "127.0.0.1", 1)
    for key in ("a", "b", "c"):
        cache.put(key, make_response(register(), 200), flow)
    assert cache.get("a") is None
    wire, target = cache.get("c")
    assert wire.to_bytes().startswith(b"SIP/2.0 200 OK\r\n") and target == flow
    now[0] = 40.0
    assert cache.get("c") is None


# ------------------------------------------------------------------ proxy helpers, myself

def _invite(uri: str = "sip:bob@example.org", via_extra: str = "") -> object:
    text = (f"INVITE {uri} SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.7;branch=z9hG4bK-x\r\n{via_extra}"
            "From: <sip:alice@example.org>;tag=1\r\nTo: <sip:bob@example.org>\r\n"
            "Call-ID: c1\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n")
    return parse_message(text.encode())


def test_loop_hash_changes_with_the_request_uri_only():
    a, b = _invite(), _invite()
    assert loop_hash(a) == loop_hash(b)
    assert loop_hash(_invite("sip:bob@192.0.2.9")) != loop_hash(a)  # a spiral, not a loop
    branch = make_branch(3, loop_hash(a))
    assert branch.startswith(BRANCH_PREFIX) and branch_worker(branch) == 3
    assert branch_worker("z9hG4bK-somebody-else") is None


def test_datagrams_are_steered_by_call_id_and_by_our_branch():
    invite = _invite().to_bytes()
    owners = {owner_of(invite, 4)}
    assert owners == {owner_of(invite.replace(b"INVITE sip:", b"INVITE  sip:"), 4)}
    response = (b"SIP/2.0 180 Ringing\r\nVia: SIP/2.0/UDP 127.0.0.1:5060;branch=" +
                make_branch(2, "abc").encode() + b"\r\nVia: SIP/2.0/UDP 192.0.2.7;branch=z9hG4bK-x\r\n"
                b"Call-ID: c1\r\n\r\n")
    assert owner_of(response, 4) == 2
    assert owner_of(b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 192.0.2.7;branch=z9hG4bK-x\r\n\r\n", 4) is None


def test_myself_matches_domains_and_addresses_with_our_port():
    me = LocalIdentity(["example.org"], [Listener("UDP", "127.0.0.1", 5070)])
    assert me.is_ours(parse_sip_uri("sip:alice@example.org"))
    assert me.is_ours(parse_sip_uri("sip:127.0.0.1:5070;lr"))
    assert not me.is_ours(parse_sip_uri("sip:alice@127.0.0.1:5090"))  # a UA's contact on this host
    assert not me.is_ours(parse_sip_uri("sip:alice@example.com"))
    assert me.aor(parse_sip_uri("sip:alice@127.0.0.1:5070")) == "sip:alice@example.org"
    assert me.domain_of("example.com") is None


# ------------------------------------------------------------------ refusing without parsing

def test_quick_reply_copies_what_a_response_needs_and_adds_a_to_tag():
    raw = register("<sip:alice@192.0.2.7>", expires="600").to_bytes().replace(b"From:", b"f:")
    wire, target = quick_reply(raw, Flow("UDP", "127.0.0.1", 4444), 503, [("Retry-After", "2")])
    response = parse_message(wire.to_bytes())
    assert response.status == 503 and response.headers.get("Retry-After") == "2"
    assert response.to.tag and response.from_.tag == "a1" and response.cseq == (1, "REGISTER")
    assert target == Flow("UDP", "127.0.0.1", 5060)  # no rport: the Via port, at the source address
    with_rport = raw.replace(b"branch=", b"rport;branch=")
    assert quick_reply(with_rport, Flow("UDP", "127.0.0.1", 4444), 503)[1].port == 4444
    assert quick_reply(b"ACK sip:a@b SIP/2.0\r\nVia: x\r\n\r\n", Flow("UDP", "127.0.0.1", 1), 503) is None
    assert quick_reply(b"garbage", Flow("UDP", "127.0.0.1", 1), 503) is None


def test_triage_never_refuses_what_ends_or_continues_work():
    invite = _invite().to_bytes()
    assert triage(invite) == "new"
    assert triage(b"SIP/2.0 200 OK\r\n\r\n") == "keep"
    assert triage(invite.replace(b"INVITE sip", b"ACK sip", 1)) == "keep"
    in_dialog = invite.replace(b"To: <sip:bob@example.org>", b"To: <sip:bob@example.org>;tag=9")
    assert triage(in_dialog) == "stray"  # no Route: not a dialog we record-routed
    assert triage(in_dialog.replace(b"Max-Forwards", b"Route: <sip:127.0.0.1;lr>\r\nMax-Forwards")) == "keep"


def test_receive_queue_fill_is_read_from_the_kernel():
    import socket as sk

    sink = sk.socket(sk.AF_INET, sk.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sender = sk.socket(sk.AF_INET, sk.SOCK_DGRAM)
    try:
        assert receive_queue_fill(sink) == 0.0
        for _ in range(20):
            sender.sendto(b"x" * 1000, sink.getsockname())
        assert 0.0 < receive_queue_fill(sink) <= 1.0
    finally:
        sink.close()
        sender.close()


def test_load_shedder_has_hysteresis():
    fill = [0.0]
    shedder = LoadShedder([], high=0.5, low=0.2, interval=0.0, measure=lambda: fill[0])
    assert not shedder.overloaded
    fill[0] = 0.6
    assert shedder.overloaded
    fill[0] = 0.3
    assert shedder.overloaded  # not yet drained below `low`
    fill[0] = 0.1
    assert not shedder.overloaded
    fill[0] = 0.3
    assert not shedder.overloaded  # and not again before `high`


def test_nat_is_recognised_from_the_via_and_the_contact():
    source = Flow("UDP", "203.0.113.5", 40000)
    assert behind_nat(parse_via("SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bK1;received=203.0.113.5"),
                      parse_sip_uri("sip:a@10.0.0.2:5060"), source)
    assert not behind_nat(parse_via("SIP/2.0/UDP 203.0.113.5:40000;branch=z9hG4bK1"),
                          parse_sip_uri("sip:a@203.0.113.5:40000"), source)
    # a third-party registration: sent from elsewhere for a reachable contact
    assert not behind_nat(parse_via("SIP/2.0/UDP 203.0.113.5:40000;branch=z9hG4bK1"),
                          parse_sip_uri("sip:a@93.184.216.34:5060"), source)
    assert behind_nat(parse_via("SIP/2.0/UDP 203.0.113.5:40000;branch=z9hG4bK1"),
                      parse_sip_uri("sip:a@192.168.1.20:5060"), source)


def test_an_alias_names_a_flow_and_survives_the_round_trip():
    for flow in (Flow("UDP", "203.0.113.5", 40000), Flow("TCP", "198.51.100.1", 5060),
                 Flow("TLS", "2001:db8::1", 5061)):
        assert parse_alias(format_alias(flow)) == flow
    assert format_alias(Flow("TCP", "203.0.113.5", 40000)) == "203.0.113.5~40000~2"  # Kamailio's
    for bad in ("", "203.0.113.5~40000", "203.0.113.5~0~1", "203.0.113.5~70000~1",
                "example.org~5060~1", "203.0.113.5~5060~9", "203.0.113.5~x~1", None):
        assert parse_alias(bad) is None, bad


def test_only_the_last_proxy_follows_an_alias_and_the_ua_gets_its_contact_back():
    bye = parse_message(b"BYE sip:nat@10.0.0.2:5060;alias=203.0.113.5~40000~1 SIP/2.0\r\n"
                        b"Via: SIP/2.0/UDP 192.0.2.7:5060;branch=z9hG4bK-al\r\n"
                        b"From: <sip:b@example.org>;tag=1\r\nTo: <sip:nat@example.org>;tag=2\r\n"
                        b"Call-ID: al\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n")
    routed = parse_message(bye.to_bytes().replace(b"Content-Length", b"Route: <sip:192.0.2.99;lr>\r\nContent-Length"))
    assert take_alias(routed) is None and "alias" in routed.uri.params  # a Route still ahead
    assert take_alias(bye) == Flow("UDP", "203.0.113.5", 40000)
    assert str(bye.uri) == "sip:nat@10.0.0.2:5060"


def test_a_natted_uas_contact_is_marked_with_the_flow_its_answer_came_on():
    invite = parse_message(register("<sip:alice@10.0.0.2:5060>").to_bytes().replace(b"REGISTER", b"INVITE"))
    flow = Flow("UDP", "203.0.113.5", 40000)
    ok = make_response(invite, 200, to_tag="t")
    ok.headers.add("Contact", '"Al" <sip:alice@10.0.0.2:5060;transport=udp>;expires=60')
    ok.headers.add("Contact", "<sip:other@192.0.2.1>")
    assert response_from_nat(ok, flow)
    add_alias(ok, flow)
    first = ok.contacts[0]
    assert first.display_name == "Al" and first.params == {"expires": "60"}
    assert first.uri.params == {"transport": "udp", "alias": "203.0.113.5~40000~1"}
    assert str(ok.contacts[1].uri) == "sip:other@192.0.2.1"
    assert not response_from_nat(ok, flow)  # marked once, not twice
    public = make_response(invite, 200, to_tag="t")
    public.headers.add("Contact", "<sip:alice@203.0.113.5:40000>")
    assert not response_from_nat(public, flow)
    assert not response_from_nat(make_response(invite, 486, to_tag="t"), flow)


def test_stun_binding_answers_carry_the_source_and_nothing_else_is_answered():
    tid, request = stun_codec.binding_request()
    assert stun_codec.is_stun(request) and not stun_codec.is_stun(b"OPTIONS sip:x SIP/2.0\r\n" * 2)
    answer = stun_codec.binding_response(request, ("198.51.100.7", 4242))
    assert stun_codec.mapped_address(answer) == (tid, ("198.51.100.7", 4242))
    assert stun_codec.binding_response(answer, ("198.51.100.7", 4242)) is None  # a response
    for junk in (request[:19], request + b"x", b"\x00\x01" + b"\xff" * 40, b"\x01" * 600):
        assert stun_codec.binding_response(junk, ("198.51.100.7", 4242)) is None
        assert stun_codec.mapped_address(junk) is None


def test_a_binding_request_with_an_unknown_required_attribute_gets_420_listing_it():
    """RFC 8489 §6.3.1.1: not understood and comprehension-required (< 0x8000) → 420 with
    UNKNOWN-ATTRIBUTES; unknown optional ones (>= 0x8000) are ignored."""
    import struct

    from aioice import stun

    def request_with(*types: int) -> bytes:
        raw = bytearray(bytes(stun.Message(stun.Method.BINDING, stun.Class.REQUEST)))
        for kind in types:
            raw += struct.pack("!HH", kind, 3) + b"abc\0"
        struct.pack_into("!H", raw, 2, len(raw) - 20 + 8)  # and a FINGERPRINT
        raw += struct.pack("!HHI", 0x8028, 4, stun.message_fingerprint(bytes(raw)))
        return bytes(raw)

    answer = stun_codec.binding_response(request_with(0x7777, 0x7778), ("198.51.100.7", 4242))
    message = stun.parse_message(answer)  # (checks the FINGERPRINT too)
    assert message.message_class == stun.Class.ERROR
    assert message.attributes["ERROR-CODE"] == (420, "Unknown Attribute")
    assert bytes.fromhex("000a0004" "77777778") in answer
    assert stun_codec.mapped_address(answer) is None
    optional = stun_codec.binding_response(request_with(0xC001), ("198.51.100.7", 4242))
    assert stun_codec.mapped_address(optional)[1] == ("198.51.100.7", 4242)


def test_the_worker_collector_still_reclaims_young_and_old_cycles():
    import asyncio
    import gc
    import weakref

    from sipmesh.broker.workers import _collect_young

    class Node:
        def __init__(self) -> None:
            self.me = self  # a cycle: only the cyclic collector can free it

    async def scenario() -> tuple[bool, bool]:
        old = Node()
        old_ref = weakref.ref(old)
        gc.freeze()  # `old` is now out of the collector's view, as after a worker's pass
        del old
        collector = asyncio.ensure_future(_collect_young(every=0.01, full_every=0.3))
        try:
            young = Node()
            young_ref = weakref.ref(young)
            del young
            young_freed = await wait_for_async(lambda: young_ref() is None, 0.1, 0.005,
                                               what="the young cycle collected")
            old_kept = old_ref() is not None  # the first full pass comes at 0.3 s
            old_freed = await wait_for_async(lambda: old_ref() is None, 0.4, 0.01,
                                             what="the frozen cycle collected by a full pass")
            return young_freed and old_kept, old_freed
        finally:
            collector.cancel()

    enabled = gc.isenabled()
    gc.disable()  # only the worker's collector runs
    try:
        young_collected, old_collected = asyncio.run(scenario())
    finally:
        gc.unfreeze()
        if enabled:
            gc.enable()
    assert young_collected, "a cycle among young objects must be collected on the next pass"
    assert old_collected, "the periodic full pass must reclaim cycles among frozen objects"
