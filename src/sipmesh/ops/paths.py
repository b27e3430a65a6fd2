"""Which path each pair of a mesh network takes, as its members see it: the document a
member publishes to the broker (agent/pathreport.py sends it, broker/paths.py keeps it)
and the one row format that `sipmesh status` and the broker's status page both show.

The document (``application/vnd.sipmesh.paths+json``, in a PUBLISH with ``Event:
sipmesh-paths``, RFC 3903)::

    {"member": "alice",
     "pairs": [{"peer": "bob", "state": "up", "path": "direct",
                "why": "host pair 10.0.0.1:51820 <-> 10.0.0.2:51820", "rtt_ms": 0.4}]}

JSON because the page and the API that read it are JSON already, and the standard
library reads it within the limits below; everything in it is hostile until `parse`
has checked it. Sans-I/O.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Iterable

EVENT = "sipmesh-paths"  # the event package of the PUBLISH (an unregistered, private name)
CONTENT_TYPE = "application/vnd.sipmesh.paths+json"
MAX_BODY = 16 * 1024
MAX_PAIRS = 128
MAX_WHY = 200
MAX_RTT_MS = 60_000.0
STATES = ("connecting", "up", "refused", "failed")
_NAME = re.compile(r"^[A-Za-z0-9\-_.!~*'()&=+$,;?/%]{1,64}$")  # a SIP user name (a member's)

# The columns of a pair, in `sipmesh status` and on the page, with the same words.
PAIR_COLUMNS = ("PEER", "STATE", "PATH", "RTT", "WHY")


class PathsError(ValueError):
    """A document we refuse; the message says why (it goes into a 400's reason)."""


class NotYours(PathsError):
    """A document about another member than the one who sent it."""


@dataclass(frozen=True, slots=True)
class Pair:
    """One pair as one of its members sees it."""

    peer: str
    state: str  # connecting | up | refused | failed
    path: str  # direct | relayed | via MEMBER | none
    why: str = ""
    rtt_ms: float | None = None

    @classmethod
    def from_status(cls, peer: dict[str, Any]) -> "Pair":
        """A peer of a mesh member's status (apps/mesh.py): why it failed when it did."""
        why = str(peer.get("why") or peer.get("error") or "")
        why = "".join(c if c.isprintable() else " " for c in why)
        return cls(str(peer.get("name", "")), str(peer.get("state", "")),
                   str(peer.get("path") or "none"),
                   why if len(why) <= MAX_WHY else why[:MAX_WHY - 3] + "...", peer.get("rtt_ms"))

    def cells(self) -> list[str]:
        """The row under PAIR_COLUMNS."""
        rtt = "-" if self.rtt_ms is None else f"{self.rtt_ms:.1f} ms"
        return [self.peer, self.state, self.path, rtt, self.why or "-"]

    def to_json(self) -> dict[str, Any]:
        return {"peer": self.peer, "state": self.state, "path": self.path, "why": self.why,
                "rtt_ms": None if self.rtt_ms is None else round(self.rtt_ms, 3)}

    def differs(self, other: "Pair") -> bool:
        """Worth telling the broker: anything but an RTT within 25 % (or 1 ms)."""
        if (self.peer, self.state, self.path, self.why) != (other.peer, other.state, other.path,
                                                            other.why):
            return True
        if (self.rtt_ms is None) != (other.rtt_ms is None):
            return True
        if self.rtt_ms is None or other.rtt_ms is None:
            return False
        return abs(self.rtt_ms - other.rtt_ms) > max(1.0, 0.25 * other.rtt_ms)


def changed(old: Iterable[Pair] | None, new: Iterable[Pair]) -> bool:
    """Do two views of our pairs differ enough to publish the new one?"""
    if old is None:
        return True
    before, after = {p.peer: p for p in old}, {p.peer: p for p in new}
    return before.keys() != after.keys() or any(after[k].differs(before[k]) for k in after)


def serialise(member: str, pairs: Iterable[Pair]) -> bytes:
    """Our document: at most MAX_PAIRS pairs (by name), never more than MAX_BODY bytes."""
    chosen = sorted(pairs, key=lambda p: p.peer)[:MAX_PAIRS]
    body = json.dumps({"member": member, "pairs": [p.to_json() for p in chosen]},
                      separators=(",", ":"), ensure_ascii=True).encode()
    while len(body) > MAX_BODY and chosen:  # long reasons: fewer pairs rather than no report
        chosen = chosen[:-1]
        body = json.dumps({"member": member, "pairs": [p.to_json() for p in chosen]},
                          separators=(",", ":"), ensure_ascii=True).encode()
    return body


def parse(body: bytes, *, member: str, members: Iterable[str]) -> list[Pair]:
    """The pairs of `member`'s document, checked: its own name, known states and paths,
    bounded text and numbers; pairs with someone not in `members` (the network's, now)
    are left out."""
    if len(body) > MAX_BODY:
        raise PathsError(f"document of {len(body)} bytes (at most {MAX_BODY})")
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PathsError(f"not JSON: {str(exc)[:80]}") from None
    if not isinstance(data, dict) or not isinstance(data.get("pairs"), list):
        raise PathsError("not a paths document (an object with member and pairs)")
    if data.get("member") != member:
        raise NotYours(f"a document about {str(data.get('member'))[:64]!r}: a member "
                         f"publishes only its own pairs ({member})")
    raw = data["pairs"]
    if len(raw) > MAX_PAIRS:
        raise PathsError(f"{len(raw)} pairs (at most {MAX_PAIRS})")
    known = set(members)
    pairs: dict[str, Pair] = {}
    for item in raw:
        pair = _pair(item, member)
        if pair.peer not in known or (pair.path.startswith("via ") and pair.path[4:] not in known):
            continue  # a member the broker no longer has (the sender has not heard yet)
        if pair.peer in pairs:
            raise PathsError(f"pair with {pair.peer} twice")
        pairs[pair.peer] = pair
    return sorted(pairs.values(), key=lambda p: p.peer)


def _pair(item: Any, member: str) -> Pair:
    if not isinstance(item, dict):
        raise PathsError("a pair is not an object")
    peer, state, path = item.get("peer"), item.get("state"), item.get("path")
    why, rtt = item.get("why", ""), item.get("rtt_ms")
    if not isinstance(peer, str) or not _NAME.match(peer) or peer == member:
        raise PathsError(f"peer {str(peer)[:64]!r} is not another member's name")
    if state not in STATES:
        raise PathsError(f"state {str(state)[:32]!r} (one of {', '.join(STATES)})")
    if not isinstance(path, str) or not (path in ("direct", "relayed", "none") or (
            path.startswith("via ") and _NAME.match(path[4:]) and path[4:] not in (member, peer))):
        raise PathsError(f"path {str(path)[:80]!r} (direct, relayed, none or via MEMBER)")
    if not isinstance(why, str) or len(why) > MAX_WHY or not why.isprintable():
        raise PathsError(f"why: printable text of at most {MAX_WHY} characters")
    if rtt is not None and (isinstance(rtt, bool) or not isinstance(rtt, (int, float))
                            or not 0 <= rtt <= MAX_RTT_MS or math.isnan(rtt)):
        raise PathsError(f"rtt_ms {str(rtt)[:32]!r} (a number of milliseconds or null)")
    return Pair(peer, state, path, why, None if rtt is None else float(rtt))


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


__all__ = ["CONTENT_TYPE", "EVENT", "MAX_BODY", "MAX_PAIRS", "NotYours", "PAIR_COLUMNS", "Pair",
           "PathsError",
           "changed", "parse", "serialise"]
