"""Which path each pair of a mesh network took, as its members publish it (RFC 3903 PUBLISH,
`Event: sipmesh-paths`): the document (ops/paths.py) and its hostile variants, the broker
that keeps only what a member may say about itself (broker/paths.py), the member's
reporter (agent/pathreport.py) against our broker and against Kamailio, which has no such
event package and is then left alone."""

from __future__ import annotations

import json
import logging

import pytest

from sipmesh.agent.pathreport import PathReporter
from sipmesh.agent.roster import RosterClient
from sipmesh.broker.paths import PathStore
from sipmesh.ops import paths
from sipmesh.ops.paths import Pair
from tests.lab import wait_for_async
from tests.peers.raw import RawPeer
from tests.peers.broker import make_broker  # noqa: F401 (fixture)
from tests.peers.roster import (lab_broker, lab_kamailio, make_ua, member_ua,  # noqa: F401 (fixture)
                                raw_with_auth)

BOB = Pair("bob", "up", "direct", "host pair 10.0.0.1:51820 <-> 10.0.0.2:51820", 0.4)
CAROL = Pair("carol", "up", "via bob", "no direct path: symmetric NAT on both sides", 12.5)
MEMBERS = {"alice", "bob", "carol"}


# ------------------------------------------------------------------ the document

def test_the_document_round_trips_and_prints_in_the_status_columns():
    body = paths.serialise("alice", [CAROL, BOB])
    assert paths.parse(body, member="alice", members=MEMBERS) == [BOB, CAROL]
    assert dict(zip(paths.PAIR_COLUMNS, BOB.cells())) == {
        "PEER": "bob", "STATE": "up", "PATH": "direct", "RTT": "0.4 ms",
        "WHY": "host pair 10.0.0.1:51820 <-> 10.0.0.2:51820"}
    # a mesh member's status says the same (a failed peer: why is its error)
    failed = Pair.from_status({"name": "dave", "state": "failed", "path": "none", "why": "",
                               "error": "INVITE: 408\nRequest Timeout", "rtt_ms": None})
    assert failed.cells() == ["dave", "failed", "none", "-", "INVITE: 408 Request Timeout"]
    # worth publishing: a new peer, another path, an RTT that moved by more than a quarter
    assert paths.changed(None, [])
    assert not paths.changed([BOB], [Pair("bob", "up", "direct", BOB.why, 0.9)])
    assert paths.changed([BOB], [Pair("bob", "up", "direct", BOB.why, 3.0)])
    assert paths.changed([BOB], [Pair("bob", "up", "relayed", BOB.why, 0.4)])
    assert paths.changed([BOB], [BOB, CAROL]) and paths.changed([BOB, CAROL], [BOB])


def document(member: str = "alice", **pair) -> bytes:
    item = {"peer": "bob", "state": "up", "path": "direct", "why": "", "rtt_ms": 1.0, **pair}
    return json.dumps({"member": member, "pairs": [item]}).encode()


@pytest.mark.parametrize("body, message", [
    (b"x" * (paths.MAX_BODY + 1), "bytes"),
    (b"{\"member\": \"alice\", \"pairs\": [", "not JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "bytes"),
    (b"[" * 8000 + b"]" * 8000, "not JSON"),
    (b"{\"member\": \"alice\", \"pairs\": 7}", "not a paths document"),
    (document(rtt_ms=float("nan")), "not JSON"),
    (document(rtt_ms=-1), "rtt_ms"),
    (document(rtt_ms=True), "rtt_ms"),
    (document(state="dancing"), "state"),
    (document(path="via alice"), "path"),
    (document(path="teleported"), "path"),
    (document(peer="alice"), "peer"),
    (document(peer="<script>"), "peer"),
    (document(why="x" * (paths.MAX_WHY + 1)), "why"),
    (document(why="bell\x07"), "why"),
    (json.dumps({"member": "alice", "pairs": [{"peer": f"m{i}", "state": "up", "path": "none"}
                                               for i in range(paths.MAX_PAIRS + 1)]}).encode(), "pairs"),
])
def test_hostile_documents_are_refused(body: bytes, message: str):
    with pytest.raises(paths.PathsError, match=message):
        paths.parse(body, member="alice", members=MEMBERS)


def test_a_document_about_someone_else_and_pairs_with_strangers():
    with pytest.raises(paths.NotYours):
        paths.parse(document("bob", peer="carol"), member="alice", members=MEMBERS)
    # a peer the network no longer has (the sender has not heard yet): left out, not refused
    assert paths.parse(document(peer="zoe"), member="alice", members=MEMBERS) == []


# ------------------------------------------------------------------ at our broker

async def test_the_broker_keeps_what_a_member_says_about_itself_and_nothing_else(lab_broker, member_ua,
                                                                                   tmp_path):
    peer = await RawPeer.open()
    headers = [f"Event: {paths.EVENT}", f"Content-Type: {paths.CONTENT_TYPE}", "Expires: 60"]
    try:
        # mallory has credentials in realm lab but is no member; dave is a member of another network
        for outsider in ("mallory", "dave"):
            refused = await raw_with_auth(peer, lab_broker, outsider, "PUBLISH", headers,
                                          paths.serialise(outsider, [BOB]))
            assert refused.status == 403 and "only members" in refused.reason
        about_bob = await raw_with_auth(peer, lab_broker, "alice", "PUBLISH", headers,
                                        paths.serialise("bob", [Pair("alice", "up", "relayed")]))
        assert about_bob.status == 403 and "only its own pairs" in about_bob.reason
        big = json.dumps({"member": "alice", "pairs": [], "pad": "x" * paths.MAX_BODY}).encode()
        oversized = await raw_with_auth(peer, lab_broker, "alice", "PUBLISH", headers, big)
        assert oversized.status == 413
        bad = await raw_with_auth(peer, lab_broker, "alice", "PUBLISH", headers, document(state="x"))
        assert bad.status == 400 and "state" in bad.reason
        other_event = await raw_with_auth(peer, lab_broker, "alice", "PUBLISH",
                                          ["Event: presence", *headers[1:]], document())
        assert other_event.status == 489 and other_event.headers.get("Allow-Events") == paths.EVENT
        stale = await raw_with_auth(peer, lab_broker, "alice", "PUBLISH",
                                    [*headers, "SIP-If-Match: not-ours"], document())
        assert stale.status == 412
        ok = await raw_with_auth(peer, lab_broker, "alice", "PUBLISH", headers, document())
        assert ok.status == 200 and ok.headers.get("SIP-ETag") and ok.headers.get("Expires") == "60"
    finally:
        peer.close()
    store = PathStore(tmp_path / "broker.db")
    try:
        assert [(r.member, [p.peer for p in r.pairs]) for r in store.reports("lab", 0)] == [("alice", ["bob"])]
    finally:
        store.close()


async def test_a_member_reports_changes_refreshes_and_removes_its_paths(lab_broker, member_ua, tmp_path):
    ua = await member_ua("alice", lab_broker.hostport)
    pairs = [BOB]
    reporter = PathReporter(ua, "lab", RosterClient(ua, "lab").aor, lambda: list(pairs), expires=3,
                            min_interval=0.1, check_every=0.2)
    store = PathStore(tmp_path / "broker.db")

    def reported() -> list[Pair]:
        found = store.reports("lab", __import__("time").time())
        return list(found[0].pairs) if found else []

    try:
        reporter.start()
        await wait_for_async(lambda: reported() == [BOB], 5, what="alice's report at the broker")
        first = reporter.etag
        pairs.append(CAROL)
        reporter.poke()
        await wait_for_async(lambda: reported() == [BOB, CAROL], 5, what="carol added")
        # refreshed before it runs out (3 s): still there after twice its lifetime
        await wait_for_async(lambda: reporter.etag != first and reported() == [BOB, CAROL], 5,
                             what="a refresh")
        await reporter.stop()
        assert reported() == [] and reporter.state == "stopped"
    finally:
        store.close()


async def test_kamailio_has_no_such_package_and_is_told_nothing_more(lab_kamailio, member_ua, caplog):
    ua = await member_ua("alice", lab_kamailio.hostport)
    asked = []

    def source() -> list[Pair]:
        asked.append(1)
        return [BOB]

    reporter = PathReporter(ua, "lab", RosterClient(ua, "lab").aor, source, min_interval=0.1,
                            check_every=0.1)
    with caplog.at_level(logging.INFO, logger="sipmesh.agent.pathreport"):
        reporter.start()
        await wait_for_async(lambda: reporter.state == "unsupported", 5, what="Kamailio refuses")
        await reporter.stop()
    assert len(asked) == 1  # one PUBLISH, then quiet
    lines = [r.getMessage() for r in caplog.records if r.name == "sipmesh.agent.pathreport"]
    assert len(lines) == 1 and "does not take path reports (489" in lines[0], lines
