"""Mesh networks at the broker (issue 12, item 1): `sipmesh broker network ...` as an
operator runs it, and address allocation under concurrency."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import textwrap

import pytest

from sipmesh.broker.location import LocationService
from sipmesh.broker.networks import NetworkError, NetworkStore

SIPMESH = [sys.executable, "-m", "sipmesh", "broker", "network"]


def net(db, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SIPMESH, *args, "--db", str(db)], capture_output=True, text=True, timeout=60)


def test_create_members_show_list_remove(tmp_path):
    db = tmp_path / "broker.db"
    created = net(db, "create", "lab", "--pool", "100.64.1.0/24")
    assert created.returncode == 0, created.stderr
    assert "net-lab" in created.stdout and "realm lab" in created.stdout
    added = net(db, "members", "add", "lab", "alice", "bob", "--group", "staff")
    assert added.returncode == 0, added.stderr
    assert added.stdout.split("\n")[:2] == ["alice 100.64.1.1", "bob 100.64.1.2"]
    assert net(db, "members", "add", "lab", "carol").stdout.strip() == "carol 100.64.1.3"
    shown = json.loads(net(db, "show", "lab", "--json").stdout)
    assert shown["pool"] == "100.64.1.0/24" and shown["realm"] == "lab" and shown["rules"] == []
    assert [(m["user"], m["address"], m["groups"]) for m in shown["members"]] == [
        ("alice", "100.64.1.1", ["staff"]), ("bob", "100.64.1.2", ["staff"]), ("carol", "100.64.1.3", [])]
    assert "every member may reach every other" in net(db, "show", "lab").stdout
    assert net(db, "list").stdout.strip() == "lab  100.64.1.0/24  3 members"
    # An address is the member's for good: removed and added again, it comes back.
    assert net(db, "members", "remove", "lab", "bob").returncode == 0
    assert "bob" not in net(db, "members", "list", "lab").stdout
    assert net(db, "members", "add", "lab", "dave").stdout.strip() == "dave 100.64.1.4"
    assert net(db, "members", "add", "lab", "bob").stdout.strip() == "bob 100.64.1.2"
    removed = net(db, "remove", "lab")
    assert removed.returncode == 0 and "4 members" in removed.stdout
    assert net(db, "list").stdout == ""


def test_the_store_is_the_brokers_own_file(tmp_path):
    db = tmp_path / "broker.db"
    LocationService(db).close()  # a broker's existing store
    assert net(db, "create", "lab", "--pool", "10.9.0.0/24").returncode == 0
    LocationService(db).close()  # and the broker still opens it
    assert NetworkStore(db).names() == ["lab"]


@pytest.fixture(scope="module")
def lab_db(tmp_path_factory):
    """One store with network lab for the refusals below (none of them changes it)."""
    db = tmp_path_factory.mktemp("refusals") / "broker.db"
    NetworkStore(db).create("lab", "100.64.1.0/24")
    return db


@pytest.mark.parametrize("args, message", [
    (("create", "lab2", "--pool", "100.64.0.0/16"), "overlaps the pool of network 'lab' (100.64.1.0/24)"),
    (("create", "lab", "--pool", "10.1.0.0/24"), "network 'lab' exists already"),
    (("create", "Lab", "--pool", "10.1.0.0/24"), "network name 'Lab'"),
    (("create", "a.b", "--pool", "10.1.0.0/24"), "network name 'a.b'"),
    (("create", "x", "--pool", "10.1.0.0/33"), "is not a CIDR"),
    (("create", "x", "--pool", "10.1.0.1/24"), "has host bits set"),
    (("create", "x", "--pool", "10.1.0.0/31"), "too small"),
    (("create", "x", "--pool", "224.0.0.0/24"), "multicast"),
    (("create", "x"), "required: --pool"),
    (("show", "nope"), "no network 'nope'"),
    (("members", "add", "nope", "alice"), "no network 'nope'"),
    (("members", "add", "lab", "al ice"), "user name 'al ice'"),
    (("members", "add", "lab", "alice", "--group", "a b"), "group name 'a b'"),
    (("members", "remove", "lab", "zed"), "not members of lab: zed"),
    (("allow", "lab", "@", "*"), "group name ''"),
    (("disallow", "lab", "alice", "*"), "no rule alice -> *"),
    (("frobnicate",), "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_status_2(lab_db, args, message):
    result = net(lab_db, *args)
    assert result.returncode == 2, result
    assert result.stdout == "" and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("sipmesh broker network: ") and message in result.stderr


def test_ipv6_pools_and_a_full_pool(tmp_path):
    store = NetworkStore(tmp_path / "b.db")
    store.create("six", "fd00:5a::/120")
    assert store.add_members("six", ["a"]) == {"a": "fd00:5a::1"}
    store.create("tiny", "10.7.0.0/30")  # two host addresses
    assert store.add_members("tiny", ["a", "b"]) == {"a": "10.7.0.1", "b": "10.7.0.2"}
    with pytest.raises(NetworkError, match="is full"):
        store.add_members("tiny", ["c"])
    store.remove_members("tiny", ["a"])  # a's address is reclaimed only now the pool is full
    assert store.add_members("tiny", ["c"]) == {"c": "10.7.0.1"}
    store.close()


def test_acl_default_all_to_all_then_rules_on_members_and_groups(tmp_path):
    store = NetworkStore(tmp_path / "b.db")
    store.create("lab", "10.8.0.0/24")
    store.add_members("lab", ["teacher"], ["staff"])
    store.add_members("lab", ["s1", "s2"], ["students"])
    lab = store.network("lab")
    assert lab.peers_of("s1") == ["s2", "teacher"]
    store.allow("lab", "@staff", "*")  # the teacher reaches every student, students only the teacher
    lab = store.network("lab")
    assert lab.may_reach("teacher", "s1") and not lab.may_reach("s1", "teacher")
    assert lab.paired("s1", "teacher") and not lab.paired("s1", "s2")
    assert lab.peers_of("s1") == ["teacher"] and lab.peers_of("teacher") == ["s1", "s2"]
    store.allow("lab", "s1", "s2")
    assert store.network("lab").peers_of("s2") == ["s1", "teacher"]
    assert not store.network("lab").may_reach("s1", "outsider")
    store.close()


def test_two_processes_allocating_at_once_never_share_an_address(tmp_path):
    db = tmp_path / "b.db"
    store = NetworkStore(db)
    store.create("lab", "10.20.0.0/16")
    store.close()
    start = tmp_path / "go"
    worker = textwrap.dedent(f"""
        import os, sys, time
        from sipmesh.broker.networks import NetworkStore
        store = NetworkStore({str(db)!r})
        while not os.path.exists({str(start)!r}):
            time.sleep(0.001)
        for i in range(60):
            print(*store.add_members("lab", [f"{{sys.argv[1]}}{{i}}"]).values(), flush=True)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", worker, prefix], stdout=subprocess.PIPE, text=True)
             for prefix in ("a", "b")]
    try:
        start.touch()
        outputs = [p.communicate(timeout=60)[0].split() for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert all(p.returncode == 0 for p in procs)
    handed = outputs[0] + outputs[1]
    assert len(handed) == 120 and len(set(handed)) == 120
    members = NetworkStore(db).network("lab").members
    assert len(members) == 120 and {m.address for m in members.values()} == set(handed)
    assert all(ipaddress.ip_address(a) in ipaddress.ip_network("10.20.0.0/16") for a in handed)


def test_members_by_radius_group_beside_static_ones(tmp_path):
    """A network that takes members from a RADIUS group: the roster's join/leave calls as the
    broker makes them, the operator's `set` and `show`, and a store of schema 1 upgraded."""
    import sqlite3

    db = tmp_path / "broker.db"
    old = sqlite3.connect(db)  # a store written by the previous release (schema 1)
    old.executescript("""
        CREATE TABLE networks (name TEXT PRIMARY KEY, pool TEXT NOT NULL, created REAL NOT NULL) WITHOUT ROWID;
        CREATE TABLE network_members (network TEXT NOT NULL, user TEXT NOT NULL, address TEXT NOT NULL UNIQUE,
            active INTEGER NOT NULL, groups TEXT NOT NULL DEFAULT '', since REAL NOT NULL,
            PRIMARY KEY (network, user)) WITHOUT ROWID;
        CREATE TABLE store_versions (part TEXT PRIMARY KEY, version INTEGER NOT NULL) WITHOUT ROWID;
        INSERT INTO store_versions VALUES ('networks', 1);
        INSERT INTO networks VALUES ('lab', '10.9.0.0/29', 0);
        INSERT INTO network_members VALUES ('lab', 'dave', '10.9.0.1', 1, '', 0);""")
    old.commit()
    old.close()
    assert net(db, "set", "lab", "--radius-group", "staff").returncode == 0
    store = NetworkStore(db)
    assert store.join_by_radius("lab", "alice", "staff") == "10.9.0.2"  # first join: from the pool
    assert store.join_by_radius("lab", "dave", "staff") == "10.9.0.1"  # static and by RADIUS
    with pytest.raises(NetworkError, match="no members from RADIUS group 'ops'"):
        store.join_by_radius("lab", "bob", "ops")
    lab = store.network("lab")
    assert lab.radius_group == "staff"
    assert {u: (m.address, m.static, m.radius) for u, m in lab.members.items()} == {
        "alice": ("10.9.0.2", False, True), "dave": ("10.9.0.1", True, True)}
    assert lab.members["alice"].groups == ("staff",)  # the ACL's @staff names it
    shown = net(db, "show", "lab").stdout
    assert "RADIUS group staff" in shown and "(by RADIUS)" in shown and "(by RADIUS and static)" in shown

    # out of the group: out of the network (dave stays: static); back in: the same address
    assert store.leave_by_radius("lab", "alice") and store.leave_by_radius("lab", "dave")
    assert set(store.network("lab").members) == {"dave"} and not store.leave_by_radius("lab", "alice")
    assert store.add_members("lab", ["bob"]) == {"bob": "10.9.0.3"}  # alice's address stays hers
    assert store.join_by_radius("lab", "alice", "staff") == "10.9.0.2"
    # a new group takes the members by the old one out, until RADIUS names it for them
    changed = net(db, "set", "lab", "--radius-group", "ops")
    assert changed.returncode == 0 and "1 member by RADIUS taken out" in changed.stdout
    assert set(store.network("lab").members) == {"bob", "dave"}
    assert json.loads(net(db, "show", "lab", "--json").stdout)["radius_group"] == "ops"
    assert net(db, "list").stdout.strip() == "lab  10.9.0.0/29  2 members  (and RADIUS group ops)"
    store.close()


def test_export_then_import_gives_a_second_broker_the_same_networks(tmp_path):
    """The second broker of a pair (docs/broker.md, "Two brokers"): an export imported
    there holds the same members at the same addresses, removed ones' reservations and
    rules; an import replaces what was there; a bad export changes nothing."""
    first, second = tmp_path / "a.db", tmp_path / "b.db"
    net(first, "create", "lab", "--pool", "100.64.1.0/24")
    net(first, "create", "ops", "--pool", "10.8.0.0/29", "--radius-group", "admins")
    NetworkStore(first).join_by_radius("ops", "dave", "admins")  # a member by RADIUS comes along
    net(first, "members", "add", "lab", "alice", "bob", "carol", "--group", "staff")
    net(first, "members", "remove", "lab", "bob")
    net(first, "allow", "lab", "@staff", "carol")
    net(second, "create", "old", "--pool", "10.7.0.0/24")
    exported = net(first, "export")
    assert exported.returncode == 0, exported.stderr
    (tmp_path / "export.json").write_text(exported.stdout)
    imported = net(second, "import", str(tmp_path / "export.json"))
    assert imported.returncode == 0 and "imported 2 networks, 3 members" in imported.stdout, imported
    for name in ("lab", "ops"):
        assert net(second, "show", name, "--json").stdout == net(first, "show", name, "--json").stdout
    assert net(second, "list").stdout.split("\n")[0].startswith("lab")
    assert "(by RADIUS)" in net(second, "show", "ops").stdout
    assert "old" not in net(second, "list").stdout
    # bob's reservation came along: added again at the second broker, he gets his address
    assert net(second, "members", "add", "lab", "bob").stdout.strip() == "bob 100.64.1.2"

    document = json.loads(exported.stdout)
    document["networks"][0]["members"][0]["address"] = "100.64.2.9"  # outside the pool
    (tmp_path / "bad.json").write_text(json.dumps(document))
    before = net(second, "export").stdout
    refused = net(second, "import", str(tmp_path / "bad.json"))
    assert refused.returncode == 2 and "is not a host address of 100.64.1.0/24" in refused.stderr
    assert net(second, "export").stdout == before
    (tmp_path / "junk").write_text("{")
    assert "not JSON" in net(second, "import", str(tmp_path / "junk")).stderr
