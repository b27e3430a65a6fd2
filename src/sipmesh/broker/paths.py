"""The paths of a mesh network's pairs, as its members publish them (RFC 3903 PUBLISH).

Only a member knows which path its pair took (direct, relayed, via a member) and why.
Each member PUBLISHes its view to the network's AOR (``sip:net-NAME@DOMAIN``, ``Event:
sipmesh-paths``, a small JSON document: ops/paths.py); the broker is the event state
compositor and keeps one publication per member in the store (SQLite, beside the
networks: any worker takes the PUBLISH, worker 0's status page reads it).

What is refused, since everything from the network is hostile:
* anyone but a member of that network, authenticated in its realm and sending as itself
  (403, as for the roster: broker/roster.py:Roster.authorise_member; a member by RADIUS
  group too, once the RADIUS server has answered);
* a document about another member (403), or naming peers that are not members, unknown
  states or paths, too long reasons (400), more than MAX_BODY bytes (413), another
  content type (415), another event package (489);
* a refresh or change of a publication we do not hold (412: the member publishes anew).

The broker stores the pairs as it parsed them (never the bytes it received); a
publication lasts its Expires (at most MAX_EXPIRES), a member that leaves removes it
(Expires: 0), a killed one's runs out.
"""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
import time
from dataclasses import dataclass
from typing import Callable

from sipmesh.broker.location import SqliteStore
from sipmesh.broker.networks import Network, NetworkStore, network_of_aor_user
from sipmesh.broker.roster import Roster
from sipmesh.broker.domains import LocalIdentity
from sipmesh.ops import paths
from sipmesh.ops.paths import Pair, PathsError
from sipmesh.sip.dialog import new_tag
from sipmesh.sip.errors import ParseError
from sipmesh.sip.event import parse_event
from sipmesh.sip.transaction.layer import ServerTransaction
from sipmesh.sip.uri import SipURI

log = logging.getLogger("sipmesh.broker.paths")

DEFAULT_EXPIRES = 300
MAX_EXPIRES = 3600

_SCHEMA = """
CREATE TABLE IF NOT EXISTS network_paths (
    network  TEXT NOT NULL,
    member   TEXT NOT NULL,
    etag     TEXT NOT NULL,
    reported REAL NOT NULL,         -- when the member last said what its pairs are
    expires  REAL NOT NULL,
    pairs    TEXT NOT NULL,         -- the pairs as the broker parsed them, JSON
    PRIMARY KEY (network, member)
) WITHOUT ROWID;
"""


@dataclass(frozen=True, slots=True)
class Report:
    member: str
    reported: float
    expires: float
    pairs: tuple[Pair, ...]


class PathStore(SqliteStore):
    """Publications by (network, member), in the broker's store."""

    def setup_schema(self, db: sqlite3.Connection) -> None:
        db.executescript(_SCHEMA)

    def etag(self, network: str, member: str, now: float) -> str | None:
        row = self._db.execute("SELECT etag FROM network_paths WHERE network=? AND member=? AND "
                               "expires>?", (network, member, now)).fetchone()
        return row[0] if row else None

    def put(self, network: str, member: str, pairs: list[Pair] | None, *, now: float,
            expires: int) -> str:
        """Store (pairs None: refresh what is there) for `expires` s; the new entity tag."""
        etag = secrets.token_hex(8)
        with self.writing() as db:
            db.execute("DELETE FROM network_paths WHERE expires<=?", (now,))
            if pairs is None:
                db.execute("UPDATE network_paths SET etag=?, expires=? WHERE network=? AND member=?",
                           (etag, now + expires, network, member))
            else:
                text = json.dumps([p.to_json() for p in pairs], separators=(",", ":"))
                db.execute("INSERT OR REPLACE INTO network_paths (network, member, etag, reported, "
                           "expires, pairs) VALUES (?, ?, ?, ?, ?, ?)",
                           (network, member, etag, now, now + expires, text))
        return etag

    def remove(self, network: str, member: str) -> None:
        with self.writing() as db:
            db.execute("DELETE FROM network_paths WHERE network=? AND member=?", (network, member))

    def reports(self, network: str, now: float) -> list[Report]:
        out = []
        for member, reported, expires, text in self._db.execute(
                "SELECT member, reported, expires, pairs FROM network_paths WHERE network=? AND "
                "expires>? ORDER BY member", (network, now)):
            pairs = tuple(Pair(p["peer"], p["state"], p["path"], p["why"], p["rtt_ms"])
                          for p in json.loads(text))
            out.append(Report(member, reported, expires, pairs))
        return out


class PathReports:
    """The PUBLISH hook a broker worker holds (broker/server.py asks it first, like the roster)."""

    def __init__(self, *, networks: NetworkStore, store: PathStore, me: LocalIdentity,
                 roster: Roster, min_expires: int,
                 clock: Callable[[], float] = time.time) -> None:
        self.networks = networks
        self.store = store
        self.me = me
        self.roster = roster
        self.min_expires = min_expires
        self.clock = clock

    def on_request(self, txn: ServerTransaction) -> bool:
        """Take a PUBLISH to a network's AOR (True), or leave the request (False)."""
        request = txn.request
        uri = request.uri
        if request.method != "PUBLISH" or not isinstance(uri, SipURI) or not self.me.is_ours(uri) \
                or request.to.tag is not None:
            return False
        name = network_of_aor_user(uri.user)
        network = self.networks.network(name) if name is not None else None
        if network is None:
            return False
        tag = new_tag()
        try:
            event = parse_event(request.headers.get("Event"))
        except ParseError:
            event = None
        if event is None or event.package != paths.EVENT:
            txn.reply(489, "Bad Event", to_tag=tag, headers=[("Allow-Events", paths.EVENT)])
            return True
        self.roster.authorise_member(txn, network, "publish its paths",
                                     lambda member: self._publish(txn, network, member, tag))
        return True

    def _publish(self, txn: ServerTransaction, network: Network, member: str, tag: str) -> None:
        """The PUBLISH of `member`, authorised (now or after the RADIUS server answered)."""
        request = txn.request
        value = (request.headers.get("Expires") or "").strip()
        expires = int(value) if value.isdigit() and len(value) <= 10 else DEFAULT_EXPIRES
        if 0 < expires < self.min_expires:
            txn.reply(423, to_tag=tag, headers=[("Min-Expires", str(self.min_expires))])
            return
        expires = min(expires, MAX_EXPIRES)
        now = self.clock()
        match = (request.headers.get("SIP-If-Match") or "").strip()
        if match and match != self.store.etag(network.name, member, now):
            txn.reply(412, "Conditional Request Failed", to_tag=tag)
            return
        if expires == 0:
            self.store.remove(network.name, member)
            log.info("%s removed its paths in network %s", member, network.name)
            txn.reply(200, to_tag=tag, headers=[("Expires", "0")])
            return
        pairs: list[Pair] | None = None
        if request.body or not match:
            content_type = (request.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if content_type != paths.CONTENT_TYPE:
                txn.reply(415, to_tag=tag, headers=[("Accept", paths.CONTENT_TYPE)])
                return
            if len(request.body) > paths.MAX_BODY:
                txn.reply(413, f"Request Entity Too Large (at most {paths.MAX_BODY} bytes)",
                          to_tag=tag)
                return
            try:
                pairs = paths.parse(request.body, member=member, members=network.members)
            except paths.NotYours as exc:
                log.info("%s published for someone else in network %s: refused", member,
                         network.name)
                txn.reply(403, f"Forbidden ({exc})", to_tag=tag)
                return
            except PathsError as exc:
                txn.reply(400, f"Bad Request ({exc})", to_tag=tag)
                return
        etag = self.store.put(network.name, member, pairs, now=now, expires=expires)
        txn.reply(200, to_tag=tag, headers=[("SIP-ETag", etag), ("Expires", str(expires))])

    def close(self) -> None:
        self.store.close()
