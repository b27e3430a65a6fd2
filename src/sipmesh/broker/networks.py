"""Mesh networks at the broker: name, address pool, members, ACL (issue 12).

A network is a private address space whose members find each other through the broker
(the roster, broker/roster.py). What the broker keeps of it lives in the same SQLite
file as the location service, under the same write lock (location.SqliteStore):

* the network: its name and its address pool (a CIDR; pools of two networks on one
  broker never overlap, so an address names one member of one network);
* its members: each gets one address from the pool when it is added, and keeps it. A
  removed member's address stays reserved for it (it gets the same one back if added
  again) and goes to someone else only when the pool has no never-used address left.
  Every allocation happens under the store's write lock and `address` is UNIQUE in the
  table, so two processes adding members at once never hand out one address twice;
* members by RADIUS group (`radius_group`): a user whom the broker's RADIUS server
  accepts in the network's realm with that group in its Access-Accept (broker/radius.py)
  is a member too. The roster (broker/roster.py) records it at that authentication
  (`join_by_radius`: first time, an address from the pool, kept as a static member's)
  and takes it out at the first authentication without the group (`leave_by_radius`).
  A row is a member while it is static (`active`, `members add`) or by RADIUS, or both;
* its groups (a member belongs to any number; a member by RADIUS is in the network's
  RADIUS group too) and its ACL: rules `FROM TO`, each a member name, `@group` or `*`.
  Without rules every member may reach every other; with rules a member may reach
  another when some rule matches the pair. A pair is connected when either may reach the
  other (a tunnel carries both directions); the roster a member receives lists only the
  members it is paired with.

Credentials are not here: a network is its own digest realm (realm = network name),
so a member's ID and password for it are a line of the broker's users file
(`sipmesh broker users add --realm NAME USER`), or an account of the RADIUS server.
Being a member means both: a row here (or the RADIUS group) and credentials in that realm.
"""

from __future__ import annotations

import ipaddress
import re
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Iterable

from sipmesh.broker.location import SqliteStore
from sipmesh.broker.users import UsersFileError, check_name

SCHEMA_VERSION = 2  # 2: networks.radius_group, network_members.radius
# Lower case, no dots (never mistaken for a served domain), short enough that an
# interface name made of it (`sm-NAME`, 15 bytes at most on Linux) fits.
_NETWORK = re.compile(r"^[a-z](?:[a-z0-9-]{0,10}[a-z0-9])?$")
_GROUP = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
AOR_PREFIX = "net-"  # the network's address-of-record: sip:net-NAME@domain

# version 1 -> 2, in place (the columns have defaults: every old row stays what it was)
_UPGRADE_1 = ("ALTER TABLE networks ADD COLUMN radius_group TEXT",
              "ALTER TABLE network_members ADD COLUMN radius INTEGER NOT NULL DEFAULT 0")
_MEMBER = "(active=1 OR radius=1)"  # a row that is a member now

_SCHEMA = """
CREATE TABLE IF NOT EXISTS networks (
    name    TEXT PRIMARY KEY,
    pool    TEXT NOT NULL,          -- CIDR, normalised
    created REAL NOT NULL,
    radius_group TEXT               -- members by RADIUS group (NULL: none)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS network_members (
    network TEXT NOT NULL,
    user    TEXT NOT NULL,
    address TEXT NOT NULL UNIQUE,   -- from the pool, never shared
    active  INTEGER NOT NULL,       -- a static member ('members add'); 0: removed
    groups  TEXT NOT NULL DEFAULT '',
    since   REAL NOT NULL,          -- became a member, or stopped being one
    radius  INTEGER NOT NULL DEFAULT 0,  -- a member by the network's RADIUS group
    PRIMARY KEY (network, user)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS network_rules (
    network TEXT NOT NULL,
    src     TEXT NOT NULL,
    dst     TEXT NOT NULL,
    PRIMARY KEY (network, src, dst)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS store_versions (
    part    TEXT PRIMARY KEY,
    version INTEGER NOT NULL
) WITHOUT ROWID;
"""


class NetworkError(ValueError):
    """Bad input or an impossible change; the message is one line for the operator."""


def check_network_name(name: str) -> str:
    if not _NETWORK.match(name):
        raise NetworkError(f"network name {name!r}: 1-12 lower-case letters, digits and '-', "
                           "starting with a letter")
    return name


def check_group(group: str) -> str:
    if not _GROUP.match(group):
        raise NetworkError(f"group name {group!r}: letters, digits, '_', '.', '-' (at most 32)")
    return group


def check_user(user: str) -> str:
    try:
        check_name(user)
    except UsersFileError as exc:
        raise NetworkError(str(exc)) from None
    return user


def check_term(term: str) -> str:
    """An ACL term: '*', a member name or '@group'."""
    if term == "*":
        return term
    if term.startswith("@"):
        check_group(term[1:])
        return term
    return check_user(term)


def parse_pool(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        pool = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        raise NetworkError(f"pool {text!r} is not a CIDR such as 100.64.1.0/24 ({exc})") from None
    if pool.num_addresses < 4:
        raise NetworkError(f"pool {pool} is too small: give at least a /30 (IPv4) or /126 (IPv6)")
    if pool.is_multicast or pool.is_loopback or pool.is_link_local or pool.is_unspecified:
        raise NetworkError(f"pool {pool} is a multicast, loopback or link-local range: use a "
                           "private one such as 100.64.0.0/10 or 10.0.0.0/8 slices")
    return pool


def network_aor_user(name: str) -> str:
    """The user part of the network's AOR (`net-NAME`)."""
    return AOR_PREFIX + name


def network_of_aor_user(user: str | None) -> str | None:
    """NAME if `user` is `net-NAME` with a well-formed NAME, else None."""
    if user is None or not user.startswith(AOR_PREFIX):
        return None
    name = user[len(AOR_PREFIX):]
    return name if _NETWORK.match(name) else None


@dataclass(frozen=True, slots=True)
class Member:
    user: str
    address: str
    groups: tuple[str, ...] = ()
    static: bool = True    # added with 'members add'
    radius: bool = False   # in by the network's RADIUS group (at its last authentication)

    def matches(self, term: str) -> bool:
        return term == "*" or term == self.user or (term.startswith("@") and term[1:] in self.groups)


@dataclass(frozen=True, slots=True)
class Network:
    """A snapshot of one network: what the broker and the CLI read."""

    name: str
    pool: str
    members: dict[str, Member] = field(default_factory=dict)
    rules: tuple[tuple[str, str], ...] = ()
    radius_group: str | None = None  # users RADIUS accepts with this group are members

    @property
    def realm(self) -> str:
        return self.name

    @property
    def aor_user(self) -> str:
        return network_aor_user(self.name)

    def may_reach(self, src: str, dst: str) -> bool:
        """May member `src` reach member `dst` (ACL; no rules: everyone everyone)?"""
        a, b = self.members.get(src), self.members.get(dst)
        if a is None or b is None:
            return False
        if not self.rules:
            return True
        return any(a.matches(s) and b.matches(d) for s, d in self.rules)

    def paired(self, a: str, b: str) -> bool:
        """Are `a` and `b` connected (either may reach the other)?"""
        return a == b and a in self.members or self.may_reach(a, b) or self.may_reach(b, a)

    def peers_of(self, user: str) -> list[str]:
        """The members `user` is paired with (itself not included), by name."""
        return sorted(m for m in self.members if m != user and self.paired(user, m))


class NetworkStore(SqliteStore):
    """The networks in the broker's store; safe to use from several processes at once."""

    def setup_schema(self, db: sqlite3.Connection) -> None:
        db.executescript(_SCHEMA)
        row = db.execute("SELECT version FROM store_versions WHERE part='networks'").fetchone()
        if row is None:
            db.execute("INSERT INTO store_versions (part, version) VALUES ('networks', ?)", (SCHEMA_VERSION,))
        elif row[0] == 1:
            for statement in _UPGRADE_1:
                db.execute(statement)
            db.execute("UPDATE store_versions SET version=? WHERE part='networks'", (SCHEMA_VERSION,))
        elif row[0] != SCHEMA_VERSION:
            raise RuntimeError(f"{self.path}: networks schema version {row[0]}, this broker knows "
                               f"{SCHEMA_VERSION}")

    # -- reading --------------------------------------------------------------------------
    def names(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT name FROM networks ORDER BY name")]

    def network(self, name: str) -> Network | None:
        # One read transaction: members and rules from the same moment.
        db = self._db
        db.execute("BEGIN")
        try:
            return self._load(db, name)
        finally:
            db.execute("COMMIT")

    def networks(self) -> list[Network]:
        return [n for n in (self.network(name) for name in self.names()) if n is not None]

    def _load(self, db: sqlite3.Connection, name: str) -> Network | None:
        row = db.execute("SELECT pool, radius_group FROM networks WHERE name=?", (name,)).fetchone()
        if row is None:
            return None
        pool, radius_group = row
        members = {}
        for user, address, groups, active, radius in db.execute(
                f"SELECT user, address, groups, active, radius FROM network_members WHERE network=? AND "
                f"{_MEMBER} ORDER BY user", (name,)):
            names = {g for g in groups.split(",") if g}
            if radius and radius_group is not None:
                names.add(radius_group)
            members[user] = Member(user, address, tuple(sorted(names)), bool(active), bool(radius))
        rules = tuple(db.execute("SELECT src, dst FROM network_rules WHERE network=? ORDER BY src, dst",
                                 (name,)).fetchall())
        return Network(name, pool, members, rules, radius_group)

    def _require(self, db: sqlite3.Connection, name: str) -> Network:
        network = self._load(db, check_network_name(name))
        if network is None:
            raise NetworkError(f"no network {name!r} (see 'sipmesh broker network list')")
        return network

    # -- changes --------------------------------------------------------------------------
    def create(self, name: str, pool: str, radius_group: str | None = None) -> Network:
        check_network_name(name)
        net = parse_pool(pool)
        if radius_group is not None:
            check_group(radius_group)
        with self.writing() as db:
            if db.execute("SELECT 1 FROM networks WHERE name=?", (name,)).fetchone():
                raise NetworkError(f"network {name!r} exists already")
            for other, other_pool in db.execute("SELECT name, pool FROM networks"):
                theirs = ipaddress.ip_network(other_pool)
                if theirs.version == net.version and theirs.overlaps(net):
                    raise NetworkError(f"pool {net} overlaps the pool of network {other!r} ({theirs}): "
                                       "pools on one broker must not overlap")
            db.execute("INSERT INTO networks (name, pool, created, radius_group) VALUES (?, ?, ?, ?)",
                       (name, str(net), time.time(), radius_group))
        return Network(name, str(net), radius_group=radius_group)

    def set_radius_group(self, name: str, group: str | None) -> int:
        """Take members from RADIUS group `group` (None: from no group). A change takes the
        members by the old group out (their addresses stay reserved for them) until RADIUS
        names the new group for them; the number taken out."""
        if group is not None:
            check_group(group)
        with self.writing() as db:
            network = self._require(db, name)
            if group == network.radius_group:
                return 0
            db.execute("UPDATE networks SET radius_group=? WHERE name=?", (group, name))
            return self._radius_out(db, name, [m.user for m in network.members.values() if m.radius])

    def join_by_radius(self, name: str, user: str, group: str) -> str:
        """`user` was accepted by RADIUS with `group`: a member (if the network still takes
        that group); its address (a new one from the pool the first time)."""
        check_user(user)
        with self.writing() as db:
            network = self._require(db, name)
            if network.radius_group is None or network.radius_group != group:
                raise NetworkError(f"network {name!r} takes no members from RADIUS group {group!r}")
            row = db.execute("SELECT address, active, radius FROM network_members WHERE network=? AND user=?",
                             (name, user)).fetchone()
            if row is None:
                return self._allocate(db, network, user, "", radius=True)
            address, active, radius = row
            if not radius:
                db.execute("UPDATE network_members SET radius=1, since=CASE WHEN active=1 THEN since "
                           "ELSE ? END WHERE network=? AND user=?", (time.time(), name, user))
            return address

    def leave_by_radius(self, name: str, user: str) -> bool:
        """RADIUS accepted `user` without the network's group: no longer a member by it
        (still one if static). False if it was not a member by RADIUS."""
        with self.writing() as db:
            self._require(db, name)
            return self._radius_out(db, name, [user]) > 0

    @staticmethod
    def _radius_out(db: sqlite3.Connection, name: str, users: list[str]) -> int:
        now, count = time.time(), 0
        for user in users:
            count += db.execute("UPDATE network_members SET radius=0, since=CASE WHEN active=1 THEN since "
                                "ELSE ? END WHERE network=? AND user=? AND radius=1",
                                (now, name, user)).rowcount
        return count

    def remove(self, name: str) -> int:
        """Remove a network with its members and rules; the number of members it had."""
        with self.writing() as db:
            network = self._require(db, name)
            for table, column in (("network_members", "network"), ("network_rules", "network"),
                                  ("networks", "name")):
                db.execute(f"DELETE FROM {table} WHERE {column}=?", (name,))
        return len(network.members)

    def add_members(self, name: str, users: Iterable[str], groups: Iterable[str] = ()) -> dict[str, str]:
        """Add `users` (or give existing members `groups` too); their addresses by user."""
        users = [check_user(u) for u in users]
        groups = [check_group(g) for g in groups]
        if not users:
            raise NetworkError("no user given")
        now = time.time()
        out: dict[str, str] = {}
        with self.writing() as db:
            network = self._require(db, name)
            for user in users:
                row = db.execute("SELECT address, active, radius, groups, since FROM network_members WHERE "
                                 "network=? AND user=?", (name, user)).fetchone()
                if row is not None:
                    address, active, radius, old, since = row
                    merged = ",".join(sorted({g for g in old.split(",") if g} | set(groups)))
                    db.execute("UPDATE network_members SET active=1, groups=?, since=? WHERE "
                               "network=? AND user=?", (merged, since if active or radius else now, name, user))
                    out[user] = address
                    continue
                out[user] = self._allocate(db, network, user, ",".join(sorted(set(groups))))
        return out

    @staticmethod
    def _allocate(db: sqlite3.Connection, network: Network, user: str, groups: str, *,
                  radius: bool = False) -> str:
        """A new member `user` (no row yet; static, or by RADIUS) with the lowest free
        address of the pool, else the address of the member removed longest ago; under the
        write lock."""
        name, pool = network.name, ipaddress.ip_network(network.pool)
        taken = {r[0] for r in db.execute("SELECT address FROM network_members WHERE network=?", (name,))}
        address = _free_address(pool, taken)
        if address is None:
            oldest = db.execute(f"SELECT user, address FROM network_members WHERE network=? AND NOT {_MEMBER} "
                                "ORDER BY since LIMIT 1", (name,)).fetchone()
            if oldest is None:
                raise NetworkError(f"pool {pool} of network {name!r} is full: no address for {user}")
            db.execute("DELETE FROM network_members WHERE network=? AND user=?", (name, oldest[0]))
            address = oldest[1]
        db.execute("INSERT INTO network_members (network, user, address, active, groups, since, radius) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?)", (name, user, address, int(not radius), groups, time.time(),
                                                    int(radius)))
        return address

    def remove_members(self, name: str, users: Iterable[str]) -> list[str]:
        """Remove members, static or by RADIUS (their addresses stay reserved for them);
        those that were members. One still in the RADIUS group is back at its next
        authentication."""
        users = [check_user(u) for u in users]
        removed = []
        with self.writing() as db:
            self._require(db, name)
            for user in users:
                cursor = db.execute(f"UPDATE network_members SET active=0, radius=0, since=? WHERE network=? AND "
                                    f"user=? AND {_MEMBER}", (time.time(), name, user))
                if cursor.rowcount:
                    removed.append(user)
        return removed

    def allow(self, name: str, src: str, dst: str) -> bool:
        """Add the rule `src` may reach `dst`; False if it was there already."""
        return self._rule(name, src, dst, "INSERT OR IGNORE INTO network_rules (network, src, dst) "
                                          "VALUES (?, ?, ?)")

    def disallow(self, name: str, src: str, dst: str) -> bool:
        """Remove a rule; False if there was no such rule."""
        return self._rule(name, src, dst, "DELETE FROM network_rules WHERE network=? AND src=? AND dst=?")

    def _rule(self, name: str, src: str, dst: str, statement: str) -> bool:
        src, dst = check_term(src), check_term(dst)
        with self.writing() as db:
            self._require(db, name)
            return db.execute(statement, (name, src, dst)).rowcount > 0

    # -- a copy for a second broker (docs/broker.md, "Two brokers") -------------------------
    def export(self) -> dict:
        """Every network with all its rows (removed members too: their addresses stay
        theirs), as a JSON-ready document that `replace_all` on another store reads."""
        db = self._db
        db.execute("BEGIN")
        try:
            networks = []
            for name, pool, radius_group in db.execute(
                    "SELECT name, pool, radius_group FROM networks ORDER BY name").fetchall():
                members = [{"user": u, "address": a, "active": bool(act), "radius": bool(radius),
                            "groups": [g for g in groups.split(",") if g], "since": since}
                           for u, a, act, radius, groups, since in db.execute(
                               "SELECT user, address, active, radius, groups, since FROM network_members "
                               "WHERE network=? ORDER BY user", (name,))]
                rules = [list(r) for r in db.execute(
                    "SELECT src, dst FROM network_rules WHERE network=? ORDER BY src, dst", (name,))]
                networks.append({"name": name, "pool": pool, "radius_group": radius_group,
                                 "members": members, "rules": rules})
        finally:
            db.execute("COMMIT")
        return {"sipmesh-networks": SCHEMA_VERSION, "networks": networks}

    def replace_all(self, document: object) -> list[Network]:
        """Make this store hold exactly the networks of `document` (from `export`), in one
        write transaction: all of it or, on any invalid field, nothing (NetworkError)."""
        rows = _checked_document(document)
        with self.writing() as db:
            for table in ("network_members", "network_rules", "networks"):
                db.execute(f"DELETE FROM {table}")
            now = time.time()
            for name, pool, radius_group, members, rules in rows:
                db.execute("INSERT INTO networks (name, pool, created, radius_group) VALUES (?, ?, ?, ?)",
                           (name, pool, now, radius_group))
                db.executemany("INSERT INTO network_members (network, user, address, active, groups, "
                               "since, radius) VALUES (?, ?, ?, ?, ?, ?, ?)",
                               [(name, *member) for member in members])
                db.executemany("INSERT INTO network_rules (network, src, dst) VALUES (?, ?, ?)",
                               [(name, src, dst) for src, dst in rules])
            return [n for n in (self._load(db, row[0]) for row in rows) if n is not None]


MAX_EXPORTED_NETWORKS = 1000
MAX_EXPORTED_ROWS = 1_000_000  # members and rules, all networks together


def _checked_document(document: object) -> list[tuple[str, str, str | None, list[tuple], list[tuple[str, str]]]]:
    """The rows of an exported document, every field checked as the CLI checks it, the
    pools disjoint, each address in its pool and used once; NetworkError otherwise."""
    if not isinstance(document, dict) or document.get("sipmesh-networks") != SCHEMA_VERSION:
        raise NetworkError(f"not a networks export of version {SCHEMA_VERSION} "
                           "('sipmesh broker network export')")
    networks = document.get("networks")
    if not isinstance(networks, list) or len(networks) > MAX_EXPORTED_NETWORKS:
        raise NetworkError(f"'networks' must be a list of at most {MAX_EXPORTED_NETWORKS}")
    rows, pools, total = [], [], 0
    for entry in networks:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or \
                not isinstance(entry.get("pool"), str) or not isinstance(entry.get("members"), list) \
                or not isinstance(entry.get("rules"), list):
            raise NetworkError("each network needs a name, a pool, members and rules")
        name, pool = check_network_name(entry["name"]), parse_pool(entry["pool"])
        radius_group = entry.get("radius_group")
        if radius_group is not None:
            if not isinstance(radius_group, str):
                raise NetworkError(f"network {name!r}: radius_group is a group name or null")
            radius_group = check_group(radius_group)
        if any(name == other for other, *_ in rows):
            raise NetworkError(f"network {name!r} twice")
        for other, theirs in pools:
            if theirs.version == pool.version and theirs.overlaps(pool):
                raise NetworkError(f"pool {pool} of {name!r} overlaps the pool of {other!r}")
        pools.append((name, pool))
        total += len(entry["members"]) + len(entry["rules"])
        if total > MAX_EXPORTED_ROWS:
            raise NetworkError(f"more than {MAX_EXPORTED_ROWS} members and rules")
        members, users, addresses = [], set(), set()
        for m in entry["members"]:
            if not isinstance(m, dict) or not isinstance(m.get("user"), str) or \
                    not isinstance(m.get("address"), str) or not isinstance(m.get("active"), bool) \
                    or not isinstance(m.get("groups"), list) or \
                    not all(isinstance(g, str) for g in m["groups"]) or \
                    not isinstance(m.get("since"), (int, float)) or isinstance(m["since"], bool) \
                    or not isinstance(m.get("radius", False), bool):
                raise NetworkError(f"network {name!r}: a member needs user, address, active, "
                                   "groups and since")
            user = check_user(m["user"])
            try:
                address = ipaddress.ip_address(m["address"])
            except ValueError:
                raise NetworkError(f"network {name!r}: {m['address']!r} is not an address") from None
            if address not in pool or address in (pool.network_address, pool.broadcast_address):
                raise NetworkError(f"network {name!r}: {address} is not a host address of {pool}")
            if user in users or address in addresses:
                raise NetworkError(f"network {name!r}: member {user} or address {address} twice")
            users.add(user)
            addresses.add(address)
            groups = ",".join(sorted({check_group(g) for g in m["groups"]}))
            members.append((user, str(address), int(m["active"]), groups, float(m["since"]),
                            int(m.get("radius", False))))
        rules = []
        for rule in entry["rules"]:
            if not isinstance(rule, list) or len(rule) != 2 or \
                    not all(isinstance(t, str) for t in rule):
                raise NetworkError(f"network {name!r}: a rule is [FROM, TO]")
            rules.append((check_term(rule[0]), check_term(rule[1])))
        rows.append((name, str(pool), radius_group, members, sorted(set(rules))))
    return rows


def _free_address(pool: ipaddress.IPv4Network | ipaddress.IPv6Network, taken: set[str]) -> str | None:
    """The lowest host address of `pool` not in `taken` (never the network address, nor
    an IPv4 broadcast address); None if there is none."""
    first = int(pool.network_address) + 1
    last = int(pool.broadcast_address) - (1 if pool.version == 4 else 0)
    candidate = first
    for value in sorted(int(ipaddress.ip_address(a)) for a in taken):
        if value > candidate:
            break
        if value == candidate:
            candidate += 1
    return str(ipaddress.ip_address(candidate)) if candidate <= last else None


__all__ = ["AOR_PREFIX", "Member", "Network", "NetworkError", "NetworkStore", "check_group", "check_network_name",
           "network_aor_user", "network_of_aor_user", "parse_pool"]
