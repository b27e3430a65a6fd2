"""SIP HTTP-Digest authentication (RFC 3261 §22, RFC 7616, RFC 8760), sans-I/O.

Works on header *values* only (``WWW-Authenticate`` / ``Proxy-Authenticate``
challenges, ``Authorization`` / ``Proxy-Authorization`` credentials).  The
server side stores only HA1 hashes, never passwords: for ``-sess`` algorithms
the lookup is asked for the base algorithm's HA1 (``"MD5"`` for ``"MD5-sess"``),
because ``H(user:realm:password)`` is the same for both.
"""

from __future__ import annotations

import base64
import enum
import functools
import hashlib
import hmac
import os
import re
import secrets
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sipmesh.sip import grammar

__all__ = [
    "AuthError", "AuthOutcome", "AuthResult", "DigestClient", "DigestServer", "NonceManager",
    "NonceState", "SUPPORTED_ALGORITHMS", "choose_challenge", "compute_ha1", "compute_response",
    "format_auth_params", "is_stale", "parse_auth_params",
]


class AuthError(ValueError):
    """Malformed or unusable authentication header value."""


# --------------------------------------------------------------------------- algorithms

@dataclass(frozen=True, slots=True)
class _Hash:
    new: Callable[[bytes], Any]  # hashlib constructor
    strength: int                # RFC 8760 preference: higher is stronger
    hex_len: int                 # length of a hex digest


_HASHES: dict[str, _Hash] = {"MD5": _Hash(hashlib.md5, 0, 32), "SHA-256": _Hash(hashlib.sha256, 1, 64)}
try:
    hashlib.new("sha512_256")
    _HASHES["SHA-512-256"] = _Hash(functools.partial(hashlib.new, "sha512_256"), 2, 64)
except ValueError:  # pragma: no cover - depends on the OpenSSL build
    pass
SUPPORTED_ALGORITHMS: tuple[str, ...] = tuple(n + s for n in _HASHES for s in ("", "-sess"))
# upper-cased algorithm name -> (canonical base name, is_sess)
_ALGORITHMS: dict[str, tuple[str, bool]] = {a.upper(): (a.removesuffix("-sess"), a.endswith("-sess"))
                                            for a in SUPPORTED_ALGORITHMS}


def _algo(algorithm: str) -> tuple[str, bool]:
    """Return (canonical base name, is_sess) or raise AuthError."""
    found = _ALGORITHMS.get(algorithm.strip().upper())
    if found is None:
        raise AuthError(f"unsupported digest algorithm {algorithm[:40]!r}")
    return found


def _canonical(algorithm: str) -> str:
    base, sess = _algo(algorithm)
    return base + ("-sess" if sess else "")


def _h(base: str, data: str | bytes) -> str:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return _HASHES[base].new(raw).hexdigest()


def compute_ha1(username: str, realm: str, password: str, algorithm: str = "MD5",
                nonce: str | None = None, cnonce: str | None = None) -> str:
    """HA1 as hex.  For ``-sess`` algorithms nonce and cnonce are required:
    HA1 = H(H(user:realm:pw):nonce:cnonce).  Store ``compute_ha1(u, r, pw, "MD5")``
    (no -sess) on a server."""
    base, sess = _algo(algorithm)
    ha1 = _h(base, f"{username}:{realm}:{password}")
    if sess:
        if nonce is None or cnonce is None:
            raise AuthError("-sess algorithms need nonce and cnonce")
        ha1 = _h(base, f"{ha1}:{nonce}:{cnonce}")
    return ha1


def compute_response(ha1: str, nonce: str, method: str, uri: str, *, algorithm: str = "MD5",
                     qop: str | None = None, nc: str | None = None, cnonce: str | None = None,
                     body: bytes = b"") -> str:
    """Request-digest from the (already session-adjusted) HA1."""
    base, _ = _algo(algorithm)
    ha2 = _h(base, f"{method}:{uri}:{_h(base, body)}" if qop == "auth-int" else f"{method}:{uri}")
    if qop is None:
        return _h(base, f"{ha1}:{nonce}:{ha2}")
    return _h(base, f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")


# --------------------------------------------------------------------------- parsing

_SCHEME = re.compile(rf"({grammar.token})(?:[ \t]+|$)")  # auth-scheme = token
_PARAM = re.compile(  # [list separators and empty elements] name = value [separators]
    rf"""[ \t,]*({grammar.token})[ \t]*=[ \t]*"""
    rf"""(?:"({grammar.qdtext}*(?:\\.{grammar.qdtext}*)*)"|([A-Za-z0-9\-.!%*_+`'~#$&^|/:@?\[\]]+))"""
    r"""([ \t,]*)""")  # value: quoted-string (*(qdtext / quoted-pair)) | token (leniently)
# Bound here, not imported by name: grammar.py says why.
_TOKEN, _FOLD, _QUOTED_PAIR = grammar.TOKEN, grammar.FOLD, grammar.QUOTED_PAIR
_UNQUOTED = frozenset({"algorithm", "nc", "stale"})


def parse_auth_params(value: str) -> tuple[str, dict[str, str]]:
    """Parse ``Scheme k=v, k="v", ...`` into (scheme, {lower-cased key: value})."""
    s = (_FOLD.sub(" ", value) if "\n" in value else value).strip(" \t")  # unfold LWS
    if "\r" in s or "\n" in s or "\0" in s:
        raise AuthError("control characters in header value")
    if not s.isascii():  # the message parser keeps bytes that are not UTF-8 as surrogates
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise AuthError("header value is not UTF-8") from None
    m = _SCHEME.match(s)
    if not m:
        raise AuthError("missing or malformed auth scheme")
    scheme, pos = m.group(1), m.end()
    params: dict[str, str] = {}
    while pos < len(s):
        m = _PARAM.match(s, pos)
        if not m:
            raise AuthError(f"malformed auth-param at offset {pos}")
        name, quoted, token, separator = m.groups()
        key = name.lower()
        if key in params:
            raise AuthError(f"duplicate parameter {key!r}")
        if quoted is None:
            params[key] = token
        else:
            params[key] = _QUOTED_PAIR.sub(r"\1", quoted) if "\\" in quoted else quoted
        pos = m.end()
        if pos < len(s) and "," not in separator:
            raise AuthError(f"expected ',' at offset {pos}")
    return scheme, params


def format_auth_params(scheme: str, params: Mapping[str, str], *, challenge: bool = False) -> str:
    """Serialise; algorithm, nc, stale (and qop in credentials) are bare tokens, the rest quoted."""
    if not _TOKEN.fullmatch(scheme):
        raise AuthError("bad auth scheme")
    return f"{scheme} " + ", ".join(_format_param(key, val, challenge=challenge) for key, val in params.items())


def _format_param(key: str, val: str, *, challenge: bool) -> str:
    if not _TOKEN.fullmatch(key) or "\r" in val or "\n" in val or "\0" in val:
        raise AuthError(f"bad parameter {key[:40]!r}")
    if key.lower() in _UNQUOTED or (key.lower() == "qop" and not challenge):
        if not _TOKEN.fullmatch(val):
            raise AuthError(f"parameter {key!r} must be a token")
        return f"{key}={val}"
    return f'{key}="' + val.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _parse_digest(value: str) -> dict[str, str]:
    scheme, params = parse_auth_params(value)
    if scheme.lower() != "digest":
        raise AuthError(f"not a Digest header (scheme {scheme[:20]!r})")
    return params


def is_stale(challenge: str) -> bool:
    """True if the challenge carries stale=TRUE (retry with the new nonce, same credentials)."""
    return _parse_digest(challenge).get("stale", "").lower() == "true"


def choose_challenge(values: list[str]) -> str:
    """Pick the strongest usable Digest challenge (RFC 8760: SHA-256 before MD5); first wins ties."""
    best: tuple[int, str] | None = None
    for v in values:
        try:
            p = _parse_digest(v)
            base, _ = _algo(p.get("algorithm", "MD5"))
        except AuthError:
            continue
        if "realm" not in p or "nonce" not in p:
            continue
        if best is None or _HASHES[base].strength > best[0]:
            best = (_HASHES[base].strength, v)
    if best is None:
        raise AuthError("no supported Digest challenge")
    return best[1]


# --------------------------------------------------------------------------- client

class DigestClient:
    """Client side: answers challenges with credentials; tracks nc per nonce."""

    _MAX_NONCES = 64

    def __init__(self, username: str, password: str) -> None:
        self.username = username
        self._password = password
        self._nc: OrderedDict[str, int] = OrderedDict()

    def __repr__(self) -> str:
        return f"DigestClient(username={self.username!r})"

    def authorize(self, challenge: str, method: str, uri: str, body: bytes = b"", *,
                  cnonce: str | None = None) -> str:
        """Return the Authorization / Proxy-Authorization value for ``challenge``."""
        p = _parse_digest(challenge)
        if "realm" not in p or "nonce" not in p:
            raise AuthError("challenge lacks realm or nonce")
        realm, nonce = p["realm"], p["nonce"]
        algorithm = _canonical(p.get("algorithm", "MD5"))
        offered = [q.strip().lower() for q in p.get("qop", "").split(",") if q.strip()]
        qop = "auth" if "auth" in offered else "auth-int" if "auth-int" in offered else None
        if offered and qop is None:
            raise AuthError("no supported qop offered")
        out = {"username": self.username, "realm": realm, "nonce": nonce, "uri": uri}
        nc: str | None = None
        if qop is not None or algorithm.endswith("-sess"):
            cnonce = cnonce if cnonce is not None else secrets.token_hex(16)
        else:
            cnonce = None
        if qop is not None:
            count = self._nc.pop(nonce, 0) + 1
            self._nc[nonce] = count
            while len(self._nc) > self._MAX_NONCES:
                self._nc.popitem(last=False)
            nc = f"{count:08x}"
        ha1 = compute_ha1(self.username, realm, self._password, algorithm, nonce, cnonce)
        out["response"] = compute_response(ha1, nonce, method, uri, algorithm=algorithm, qop=qop,
                                           nc=nc, cnonce=cnonce, body=body)
        if "algorithm" in p:
            out["algorithm"] = algorithm
        if cnonce is not None:
            out["cnonce"] = cnonce
        if "opaque" in p:
            out["opaque"] = p["opaque"]
        if qop is not None and nc is not None:
            out["qop"], out["nc"] = qop, nc
        return format_auth_params("Digest", out)


# --------------------------------------------------------------------------- server

class NonceState(enum.Enum):
    VALID = "valid"
    STALE = "stale"      # authentic but expired
    INVALID = "invalid"  # forged, garbage, or from another secret (e.g. before a restart)


_NONCE_RE = re.compile(r"[A-Za-z0-9_-]{48}")  # 36 bytes -> 48 base64url chars, never padded
_TIMESTAMP = struct.Struct(">d")
_NO_QOP = 1 << 62  # marks a nonce consumed without qop: any further use is a replay


class NonceManager:
    """Stateless, self-validating nonces: base64url(timestamp | 12 random bytes | MAC[:16]),
    the MAC being keyed BLAKE2b (RFC 7693 §2.5) with a key derived from the secret.

    Only the replay table (highest accepted nc per nonce) is kept; it forgets
    expired nonces and holds at most ``max_tracked`` entries.  When a live
    entry must be evicted, every nonce issued at or before it is treated as
    STALE from then on, so eviction can never enable a replay.
    """

    def __init__(self, secret: bytes | None = None, lifetime: float = 300.0,
                 clock: Callable[[], float] = time.monotonic, max_tracked: int = 100_000) -> None:
        secret = secret if secret is not None else secrets.token_bytes(32)
        # A BLAKE2b key is at most 64 bytes: hash the secret (any length) to one.  The keyed
        # state is made once; each MAC continues a copy of it.
        key = hashlib.blake2b(secret, digest_size=32, person=b"sipmesh-nonce").digest()
        self._keyed = hashlib.blake2b(key=key, digest_size=16)
        self.lifetime = lifetime
        self._clock = clock
        self._max = max_tracked
        self._seen: OrderedDict[str, tuple[float, int]] = OrderedDict()  # nonce -> (expiry, last nc)
        self._floor = float("-inf")
        self._last: tuple[str, float | None] = ("", None)  # the last _timestamp() answer

    def __repr__(self) -> str:
        return f"NonceManager(lifetime={self.lifetime!r}, tracked={len(self._seen)})"

    def _mac(self, head: bytes) -> bytes:
        mac = self._keyed.copy()
        mac.update(head)
        return mac.digest()

    def issue(self) -> str:
        head = _TIMESTAMP.pack(self._clock()) + os.urandom(12)
        return base64.urlsafe_b64encode(head + self._mac(head)).decode("ascii")

    def _timestamp(self, nonce: str) -> float | None:
        """The issue time of a nonce we issued, else None.  The last answer is remembered:
        a verification asks twice for the same nonce (check, then record_use)."""
        if nonce == self._last[0]:
            return self._last[1]
        ts: float | None = None
        if _NONCE_RE.fullmatch(nonce):
            raw = base64.urlsafe_b64decode(nonce)
            if hmac.compare_digest(raw[20:], self._mac(raw[:20])):
                ts = _TIMESTAMP.unpack_from(raw)[0]
        self._last = (nonce, ts)
        return ts

    def check(self, nonce: str) -> NonceState:
        ts = self._timestamp(nonce)
        if ts is None or ts != ts:  # ts != ts: NaN
            return NonceState.INVALID
        if self._clock() - ts > self.lifetime or ts <= self._floor:
            return NonceState.STALE
        return NonceState.VALID

    def record_use(self, nonce: str, nc: int | None) -> bool:
        """Record a verified use; False if it is a replay (nc not above the last one,
        or a second use of a nonce used without qop).  Call only after check() == VALID."""
        now = self._clock()
        while self._seen:  # forget expired entries (approximately expiry-ordered)
            key, (expiry, _) = next(iter(self._seen.items()))
            if expiry >= now:
                break
            del self._seen[key]
        prev = self._seen.get(nonce)
        if prev is not None and (nc is None or nc <= prev[1]):
            return False
        ts = self._timestamp(nonce)
        if ts is None:
            return False
        self._seen[nonce] = (ts + self.lifetime, _NO_QOP if nc is None else nc)
        while len(self._seen) > self._max:
            _, (expiry, _) = self._seen.popitem(last=False)
            self._floor = max(self._floor, expiry - self.lifetime)
        return True


class AuthOutcome(enum.Enum):
    OK = "ok"
    STALE = "stale"                      # right credentials, expired nonce: re-challenge with stale=TRUE
    BAD_CREDENTIALS = "bad_credentials"
    UNKNOWN_USER = "unknown_user"
    REPLAY = "replay"
    MALFORMED = "malformed"              # includes nonces we did not issue: re-challenge
    WRONG_REALM = "wrong_realm"
    UNSUPPORTED_ALGORITHM = "unsupported_algorithm"


@dataclass(frozen=True)
class AuthResult:
    outcome: AuthOutcome
    username: str | None = None
    uri: str | None = None
    algorithm: str | None = None

    @property
    def ok(self) -> bool:
        return self.outcome is AuthOutcome.OK


_HEX = re.compile(r"[0-9a-fA-F]+")
_REQUIRED = frozenset({"username", "realm", "nonce", "uri", "response"})


class DigestServer:
    """Server side: issues challenges and verifies credentials against stored HA1s."""

    def __init__(self, realm: str, nonces: NonceManager,
                 algorithms: tuple[str, ...] | list[str] = ("SHA-256", "MD5"),
                 opaque: str | None = None) -> None:
        canon = [_canonical(a) for a in algorithms]
        if not canon:
            raise AuthError("no algorithms configured")
        self.realm, self.nonces, self.opaque = realm, nonces, opaque
        self.algorithms = tuple(sorted(dict.fromkeys(canon), key=lambda a: -_HASHES[_algo(a)[0]].strength))

        # A challenge is fixed but for its nonce, so it is formatted once, in two parts: the
        # text before the nonce and, per algorithm, the text after it.  (Nonces are base64url:
        # they never need escaping.)
        def formatted(params: dict[str, str]) -> str:
            return ", ".join(_format_param(k, v, challenge=True) for k, v in params.items())

        self._challenge_head = f'Digest {formatted({"realm": realm})}, nonce="'
        fixed = {"qop": "auth"} | ({} if opaque is None else {"opaque": opaque})
        self._challenge_tails = [f'", {formatted({"algorithm": alg} | fixed)}' for alg in self.algorithms]

    def challenges(self, stale: bool = False) -> list[str]:
        nonce = self.nonces.issue()
        stale_param = ", stale=TRUE" if stale else ""
        return [self._challenge_head + nonce + tail + stale_param for tail in self._challenge_tails]

    def verify(self, authorization: str, method: str,
               ha1_lookup: Callable[[str, str, str], str | None], body: bytes = b"") -> AuthResult:
        """Check an Authorization value.  ``ha1_lookup(username, realm, algorithm)`` returns
        the stored hex HA1 (base algorithm name for -sess) or None for an unknown user."""
        def res(outcome: AuthOutcome) -> AuthResult:
            return AuthResult(outcome, p.get("username"), p.get("uri"), p.get("algorithm"))

        p: dict[str, str] = {}
        try:
            p = _parse_digest(authorization)
        except AuthError:
            return res(AuthOutcome.MALFORMED)
        if not _REQUIRED.issubset(p):
            return res(AuthOutcome.MALFORMED)
        if p["realm"] != self.realm:
            return res(AuthOutcome.WRONG_REALM)
        try:
            algorithm = _canonical(p.get("algorithm", "MD5"))
        except AuthError:
            return res(AuthOutcome.UNSUPPORTED_ALGORITHM)
        if algorithm not in self.algorithms:
            return res(AuthOutcome.UNSUPPORTED_ALGORITHM)
        p["algorithm"] = algorithm
        base, sess = _algo(algorithm)
        qop, nc, cnonce = p.get("qop"), p.get("nc"), p.get("cnonce")
        if qop is not None:
            qop = qop.lower()
            if qop not in ("auth", "auth-int") or cnonce is None or nc is None \
                    or len(nc) != 8 or not _HEX.fullmatch(nc):
                return res(AuthOutcome.MALFORMED)
        elif sess and cnonce is None:
            return res(AuthOutcome.MALFORMED)
        response = p["response"]
        if len(response) != _HASHES[base].hex_len or not _HEX.fullmatch(response):
            return res(AuthOutcome.MALFORMED)
        if self.opaque is not None and p.get("opaque") != self.opaque:
            return res(AuthOutcome.MALFORMED)
        state = self.nonces.check(p["nonce"])
        if state is NonceState.INVALID:
            return res(AuthOutcome.MALFORMED)
        ha1 = ha1_lookup(p["username"], p["realm"], base)
        if ha1 is None:
            return res(AuthOutcome.UNKNOWN_USER)
        ha1 = ha1.lower()
        if sess:
            ha1 = _h(base, f"{ha1}:{p['nonce']}:{cnonce}")
        expected = compute_response(ha1, p["nonce"], method, p["uri"], algorithm=algorithm, qop=qop,
                                    nc=nc if qop else None, cnonce=cnonce if qop else None, body=body)
        # both are ASCII: response matched _HEX
        if not hmac.compare_digest(expected, response.lower()):
            return res(AuthOutcome.BAD_CREDENTIALS)
        if state is NonceState.STALE:
            return res(AuthOutcome.STALE)
        if not self.nonces.record_use(p["nonce"], int(nc, 16) if qop and nc else None):
            return res(AuthOutcome.REPLAY)
        return res(AuthOutcome.OK)
