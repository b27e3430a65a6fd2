"""Trust that does not rest on the SIP server: a network CA, member certificates, and
signed session descriptions (issue 12 item 5; docs/mesh-trust.md).

A mesh member's WireGuard key and mesh address travel in SDP ``a=`` lines through
SIP servers the members do not control. Anything on that path can rewrite them, so
each member proves them:

* A **network CA** (an Ed25519 key pair per network) issues each member a short-lived
  **certificate** binding {network, member name, mesh address, groups, WireGuard public
  key, identity public key, validity, serial}.
* Each offer and answer carries ``a=mesh-cert`` (the certificate), ``a=mesh-ts`` (when it
  was signed) and ``a=mesh-sig``: the member's identity key's signature over every other
  ``a=`` line in order, the Call-ID, the From and To URIs and the role (offer or answer).
* The peer checks the certificate against the network's CA and its revocation list, that
  ``a=wg-pubkey`` and ``a=mesh-ip`` are the certificate's, the timestamp, and the
  signature, and refuses the session with a `TrustError` that says which check failed.

The certificate is a compact binary document (see `MemberCertificate`), not X.509: it
has to fit one ``a=`` line (the agent reads at most `MAX_VALUE_LENGTH` characters of a
value) and X.509 has no field for a WireGuard key. docs/mesh-trust.md, "Formats", says more.

No I/O here but the explicit load/save helpers at the end. Private keys never appear in
a repr, an exception or a log line.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import ipaddress
import os
import re
import secrets
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Container, Iterable, Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sipmesh.agent.params import MAX_VALUE_LENGTH, show

__all__ = [
    "CERT_ATTRIBUTE", "DEFAULT_DAYS", "MAX_DAYS", "MAX_SKEW", "ROLES", "SIG_ATTRIBUTE",
    "TS_ATTRIBUTE", "MemberCertificate", "NetworkCA", "RevocationList", "TrustAnchor",
    "TrustError", "VerifiedPeer", "b64url", "check_member", "generate_identity",
    "identity_public_text", "issue_member_certificate", "load_anchor", "load_certificate",
    "load_identity", "load_revocations", "parse_public_key", "save_identity",
    "session_message", "sign_session", "verify_session", "write_text",
]

CERT_ATTRIBUTE, TS_ATTRIBUTE, SIG_ATTRIBUTE = "mesh-cert", "mesh-ts", "mesh-sig"
WG_ATTRIBUTE, IP_ATTRIBUTE = "wg-pubkey", "mesh-ip"
ROLES = ("offer", "answer")
DEFAULT_DAYS = 7          # certificates are short-lived; renewal is a re-issue (mesh-trust.md)
MAX_DAYS = 366
BACKDATE = 300            # not_before lies this far in the past: clocks a little behind
MAX_SKEW = 300            # a=mesh-ts may be this many seconds from our clock either way
SESSION_CONTEXT = b"sipmesh mesh session v1"  # domain separation: nothing else is signed so

# The same names as the broker's networks, users and groups (broker/networks.py): this
# module cannot import the broker, so the patterns are repeated here and tested alike.
_NETWORK = re.compile(r"[a-z](?:[a-z0-9-]{0,10}[a-z0-9])?")
_MEMBER = re.compile(r"[A-Za-z0-9\-_.!~*'()&=+$,;?/%]{1,64}")
_GROUP = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_TIMESTAMP = re.compile(r"0|[1-9][0-9]{0,11}")


class TrustError(Exception):
    """A peer's session or certificate is refused (or ours cannot be made).

    `reason` is a short code for scripts and status (`expired`, `wrong-wg-key`, ...);
    the message is one sentence for the log and ``sipmesh status``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


# ---------------------------------------------------------------------------- encodings


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str, what: str) -> bytes:
    """Strict base64url without padding: the one text that encodes the bytes, or
    TrustError (a decoder that ignores the unused low bits of the last character would
    let a proxy change a signature's text without changing the signature)."""
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text) or len(text) % 4 == 1:
        raise TrustError("malformed", f"{what} is not base64url ({show(text)})")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if b64url(data) != text:
        raise TrustError("malformed", f"{what} is not canonical base64url ({show(text)})")
    return data


def _b64key(text: str, what: str) -> bytes:
    """A 32-byte key in standard base64 with padding (as `wg` prints keys), canonical."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32 or base64.b64encode(raw).decode() != text:
        raise TrustError("malformed", f"{what} {show(text)} is not a base64 key of 32 bytes")
    return raw


def _key_text(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def parse_public_key(text: str, what: str = "identity public key") -> Ed25519PublicKey:
    """An Ed25519 public key from its base64 text (what `identity_public_text` prints)."""
    return Ed25519PublicKey.from_public_bytes(_b64key(text.strip(), what))


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> bytes:
    """8 bytes naming a CA key: a certificate says which CA signed it."""
    return hashlib.sha256(b"sipmesh ca " + _raw_public(key)).digest()[:8]


class _Reader:
    """Fields out of a binary document, each length-checked; TrustError on any excess."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.at, self.what = data, 0, what

    def take(self, size: int) -> bytes:
        if self.at + size > len(self.data):
            raise TrustError("malformed", f"{self.what} is truncated")
        chunk = self.data[self.at:self.at + size]
        self.at += size
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u64(self) -> int:
        return struct.unpack(">Q", self.take(8))[0]

    def text(self, pattern: re.Pattern[str], what: str) -> str:
        raw = self.take(self.u8())
        value = raw.decode("ascii", "replace")
        if not pattern.fullmatch(value):
            raise TrustError("malformed", f"{self.what}: {what} {show(value)} is not valid")
        return value

    def end(self) -> None:
        if self.at != len(self.data):
            raise TrustError("malformed", f"{self.what} has {len(self.data) - self.at} "
                                          "bytes too many")


def _text_field(value: str) -> bytes:
    raw = value.encode("ascii")
    return bytes([len(raw)]) + raw


# ---------------------------------------------------------------------------- checks of names


def check_network(network: str) -> str:
    if not isinstance(network, str) or not _NETWORK.fullmatch(network):
        raise TrustError("invalid", f"network name {show(str(network))}: 1-12 lower-case "
                                    "letters, digits and '-', starting with a letter")
    return network


def check_member(name: str) -> str:
    if not isinstance(name, str) or not _MEMBER.fullmatch(name):
        raise TrustError("invalid", f"member name {show(str(name))}: 1-64 letters, digits "
                                    "and -_.!~*'()&=+$,;?/%")
    return name


def check_group(group: str) -> str:
    if not isinstance(group, str) or not _GROUP.fullmatch(group):
        raise TrustError("invalid", f"group name {show(str(group))}: letters, digits, '_', "
                                    "'.', '-' (at most 32)")
    return group


def check_address(text: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    """A member's mesh address, 'A.B.C.D/P' (the pool's prefix) or a bare address (/32)."""
    try:
        address = ipaddress.ip_interface(str(text).strip())
    except ValueError:
        raise TrustError("invalid", f"mesh address {show(str(text))} is not an address "
                                    "such as 100.64.0.5/24") from None
    ip = address.ip
    if ip.is_multicast or ip.is_unspecified or ip.is_loopback or \
            address.network.num_addresses > 1 and ip == address.network.broadcast_address:
        raise TrustError("invalid", f"mesh address {address} is not a usable unicast address")
    return address


# ---------------------------------------------------------------------------- certificates

_CERT_MAGIC = b"smc1"
_CERT_CONTEXT = b"sipmesh member certificate v1"


@dataclass(frozen=True)
class MemberCertificate:
    """A member certificate: the fields, and the CA's signature over their encoding.

    The encoding (``tbs``, all integers big-endian)::

        "smc1" | ca key id (8) | serial (u64) | not_before (u64) | not_after (u64)
        | address: length (u8: 4 or 16) + bytes + prefix (u8)
        | wg public key (32) | identity public key (32)
        | network, name: u8 length + ASCII each | groups: u8 count, then u8 length + ASCII each

    followed by the 64-byte Ed25519 signature over ``"sipmesh member certificate v1" | tbs``.
    The text form (``a=mesh-cert``, files) is base64url without padding.
    """

    network: str
    name: str
    address: ipaddress.IPv4Interface | ipaddress.IPv6Interface
    groups: tuple[str, ...]
    wg_pubkey: str               # standard base64, as in a=wg-pubkey and `wg show`
    identity_pubkey: str         # standard base64 of the Ed25519 public key
    not_before: int              # Unix seconds
    not_after: int
    serial: int
    ca_id: bytes
    signature: bytes = field(repr=False)

    # -- encoding ---------------------------------------------------------------------
    def tbs(self) -> bytes:
        """The signed part."""
        packed = self.address.ip.packed
        out = [_CERT_MAGIC, self.ca_id, struct.pack(">QQQ", self.serial, self.not_before,
                                                     self.not_after),
               bytes([len(packed)]), packed, bytes([self.address.network.prefixlen]),
               base64.b64decode(self.wg_pubkey), base64.b64decode(self.identity_pubkey),
               _text_field(self.network), _text_field(self.name), bytes([len(self.groups)])]
        out += [_text_field(group) for group in self.groups]
        return b"".join(out)

    def to_bytes(self) -> bytes:
        return self.tbs() + self.signature

    def to_text(self) -> str:
        return b64url(self.to_bytes())

    @classmethod
    def from_bytes(cls, data: bytes) -> MemberCertificate:
        """Parse (strictly, every field checked); the signature is NOT verified here."""
        what = "the member certificate"
        if len(data) > 1024:
            raise TrustError("malformed", f"{what} is {len(data)} bytes, too large")
        r = _Reader(data, what)
        if r.take(4) != _CERT_MAGIC:
            raise TrustError("malformed", f"{what} is not a sipmesh certificate (version "
                                          "or format unknown)")
        ca_id = r.take(8)
        serial, not_before, not_after = r.u64(), r.u64(), r.u64()
        size = r.u8()
        if size not in (4, 16):
            raise TrustError("malformed", f"{what}: address of {size} bytes")
        ip = ipaddress.ip_address(r.take(size))
        prefix = r.u8()
        try:
            address = check_address(f"{ip}/{prefix}")
        except TrustError as exc:
            raise TrustError("malformed", f"{what}: {exc.message}") from None
        wg, identity = r.take(32), r.take(32)
        network = r.text(_NETWORK, "network name")
        name = r.text(_MEMBER, "member name")
        groups = tuple(r.text(_GROUP, "group name") for _ in range(r.u8()))
        signature = r.take(64)
        r.end()
        return cls(network, name, address, groups, _key_text(wg), _key_text(identity),
                   not_before, not_after, serial, ca_id, signature)

    @classmethod
    def from_text(cls, text: str) -> MemberCertificate:
        return cls.from_bytes(b64url_decode(text.strip(), "the member certificate"))

    # -- checks -----------------------------------------------------------------------
    def verify(self, ca_public_key: Ed25519PublicKey, now: float,
               revoked: Container[int] = ()) -> None:
        """TrustError unless this CA signed the certificate, it is valid at `now` and its
        serial is not in `revoked`."""
        if self.ca_id != key_id(ca_public_key):
            raise TrustError("other-ca", f"the certificate of {self.name} is signed by another "
                             f"CA (key id {self.ca_id.hex()}), not this network's CA "
                             f"({key_id(ca_public_key).hex()})")
        try:
            ca_public_key.verify(self.signature, _CERT_CONTEXT + self.tbs())
        except InvalidSignature:
            raise TrustError("bad-cert-signature", f"the certificate of {self.name} does not "
                             "verify against this network's CA (forged or altered)") from None
        if now < self.not_before:
            raise TrustError("not-yet-valid", f"the certificate of {self.name} is not valid "
                             f"before {_when(self.not_before)} (is a clock wrong?)")
        if now >= self.not_after:
            raise TrustError("expired", f"the certificate of {self.name} expired at "
                             f"{_when(self.not_after)} (renew it: sipmesh network cert issue)")
        if self.serial in revoked:
            raise TrustError("revoked", f"the certificate of {self.name} (serial "
                             f"{self.serial}) is revoked")

    def identity_key(self) -> Ed25519PublicKey:
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(self.identity_pubkey))

    def needs_renewal(self, now: float) -> bool:
        """True once less than a third of the lifetime is left (renew then, mesh-trust.md)."""
        return now >= self.not_after - (self.not_after - self.not_before) / 3

    def describe(self) -> dict[str, object]:
        """The fields for people and JSON (`sipmesh network cert show`)."""
        return {"network": self.network, "name": self.name, "address": str(self.address),
                "groups": list(self.groups), "wg_pubkey": self.wg_pubkey,
                "identity_pubkey": self.identity_pubkey, "serial": self.serial,
                "not_before": _when(self.not_before), "not_after": _when(self.not_after),
                "ca_key_id": self.ca_id.hex()}


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


# ---------------------------------------------------------------------------- the CA


@dataclass(frozen=True)
class TrustAnchor:
    """What members (and the broker) know of a network's CA: its name and public key.
    Text form, one line: ``sipmesh-ca NETWORK BASE64-PUBLIC-KEY``."""

    network: str
    public_key: Ed25519PublicKey

    @property
    def key_id(self) -> bytes:
        return key_id(self.public_key)

    def to_text(self) -> str:
        return f"sipmesh-ca {self.network} {_key_text(_raw_public(self.public_key))}\n"

    @classmethod
    def from_text(cls, text: str) -> TrustAnchor:
        fields = text.split()
        if len(fields) != 3 or fields[0] != "sipmesh-ca":
            raise TrustError("malformed", "not a sipmesh CA public key (expected one line "
                                          "'sipmesh-ca NETWORK KEY')")
        return cls(check_network(fields[1]), parse_public_key(fields[2], "CA public key"))


class NetworkCA:
    """A network's CA: an Ed25519 key pair. The private key is only ever used to sign;
    nothing here prints or logs it (repr shows the network and the key id)."""

    def __init__(self, network: str, private_key: Ed25519PrivateKey) -> None:
        self.network = check_network(network)
        self._key = private_key
        self.anchor = TrustAnchor(network, private_key.public_key())

    def __repr__(self) -> str:
        return f"<NetworkCA {self.network} key id {self.key_id.hex()}>"

    @classmethod
    def create(cls, network: str) -> NetworkCA:
        return cls(network, Ed25519PrivateKey.generate())

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.anchor.public_key

    @property
    def key_id(self) -> bytes:
        return self.anchor.key_id

    def sign(self, context: bytes, data: bytes) -> bytes:
        return self._key.sign(context + data)

    # -- files: DIR/ca.key (0600), DIR/ca.pub ------------------------------------------
    def save(self, directory: Path) -> None:
        """ca.key (PKCS#8 PEM, 0600) and ca.pub in `directory` (made 0700). Refuses to
        overwrite a CA: every certificate of the network depends on it."""
        directory = Path(directory)
        if (directory / "ca.key").exists():
            raise TrustError("exists", f"{directory / 'ca.key'} exists: a network has one CA "
                                       "(remove the directory to start over)")
        _write_private(directory / "ca.key", self._key)
        write_text(directory / "ca.pub", self.anchor.to_text())

    @classmethod
    def load(cls, directory: Path) -> NetworkCA:
        directory = Path(directory)
        anchor = load_anchor(directory / "ca.pub")
        key = _read_private(directory / "ca.key")
        if _raw_public(key.public_key()) != _raw_public(anchor.public_key):
            raise TrustError("malformed", f"{directory / 'ca.key'} does not belong to "
                                          f"{directory / 'ca.pub'}")
        return cls(anchor.network, key)


def issue_member_certificate(ca: NetworkCA, *, name: str, address: str, wg_pubkey: str,
                             identity_pubkey: str, groups: Iterable[str] = (),
                             days: float = DEFAULT_DAYS, now: float | None = None,
                             serial: int | None = None) -> MemberCertificate:
    """A certificate for one member, signed by `ca`: the one way certificates are made,
    whether an admin issues them off the broker (lock mode) or the broker at enrollment.

    `address` is the member's mesh address with the pool's prefix ('100.64.0.5/24');
    `wg_pubkey` and `identity_pubkey` are base64 as `wg pubkey` and
    `sipmesh network identity init` print them. Raises TrustError on a bad value or when
    the certificate would not fit one ``a=`` line.
    """
    now = time.time() if now is None else now
    if not 0 < days <= MAX_DAYS:
        raise TrustError("invalid", f"validity of {days} days: give 1 second to {MAX_DAYS} days")
    wg = _b64key(wg_pubkey.strip(), "WireGuard public key")  # any 32 bytes are an X25519 key
    identity = _b64key(identity_pubkey.strip(), "identity public key")
    group_list = tuple(dict.fromkeys(check_group(g) for g in groups))
    if len(group_list) > 16:
        raise TrustError("invalid", f"{len(group_list)} groups: at most 16")
    start = int(now) - BACKDATE
    cert = MemberCertificate(
        check_network(ca.network), check_member(name), check_address(address), group_list,
        _key_text(wg), _key_text(identity), start, int(now + days * 86400),
        secrets.randbits(63) + 1 if serial is None else serial, ca.key_id, b"")
    cert = dataclasses.replace(cert, signature=ca.sign(_CERT_CONTEXT, cert.tbs()))
    if len(cert.to_text()) > MAX_VALUE_LENGTH:
        raise TrustError("invalid", f"the certificate would be {len(cert.to_text())} characters "
                         f"in SDP, more than {MAX_VALUE_LENGTH}: use fewer or shorter groups")
    return cert


# ---------------------------------------------------------------------------- revocation

_CRL_MAGIC = b"smr1"
_CRL_CONTEXT = b"sipmesh revocation list v1"


@dataclass(frozen=True)
class RevocationList:
    """Serials the CA revoked, signed by the CA; `serial in crl` is the member's check.

    Each entry keeps the certificate's not_after, so an entry whose certificate has
    expired anyway can be dropped (`pruned`): short-lived certificates keep the list short.
    `issued_at` orders lists: a member keeps the newest it has seen, so a broker cannot
    hand it an older one back. Encoding: ``"smr1" | ca key id (8) | issued_at (u64) |
    count (u32) | (serial u64, not_after u64)... | signature (64)``, text base64url.
    """

    ca_id: bytes
    issued_at: int
    entries: tuple[tuple[int, int], ...]  # (serial, not_after), sorted
    signature: bytes = field(repr=False)

    def __contains__(self, serial: object) -> bool:
        return any(serial == entry[0] for entry in self.entries)

    @property
    def serials(self) -> frozenset[int]:
        return frozenset(serial for serial, _ in self.entries)

    def tbs(self) -> bytes:
        return b"".join([_CRL_MAGIC, self.ca_id, struct.pack(">QI", self.issued_at,
                                                             len(self.entries))]
                        + [struct.pack(">QQ", *entry) for entry in self.entries])

    def to_text(self) -> str:
        return b64url(self.tbs() + self.signature) + "\n"

    @classmethod
    def sign(cls, ca: NetworkCA, entries: Iterable[tuple[int, int]],
             now: float | None = None) -> RevocationList:
        now = time.time() if now is None else now
        unsigned = cls(ca.key_id, int(now), tuple(sorted(set(entries))), b"")
        return cls(unsigned.ca_id, unsigned.issued_at, unsigned.entries,
                   ca.sign(_CRL_CONTEXT, unsigned.tbs()))

    @classmethod
    def empty(cls, ca: NetworkCA, now: float | None = None) -> RevocationList:
        return cls.sign(ca, (), now)

    def revoke(self, ca: NetworkCA, serial: int, not_after: int,
               now: float | None = None) -> RevocationList:
        """A new list with one more entry, expired entries dropped."""
        now = time.time() if now is None else now
        kept = [e for e in self.entries if e[1] > now]
        return RevocationList.sign(ca, kept + [(serial, not_after)], max(now, self.issued_at + 1))

    @classmethod
    def from_text(cls, text: str, ca_public_key: Ed25519PublicKey) -> RevocationList:
        """Parse and verify against the network's CA; TrustError otherwise."""
        data = b64url_decode(text.strip(), "the revocation list")
        r = _Reader(data, "the revocation list")
        if r.take(4) != _CRL_MAGIC:
            raise TrustError("malformed", "not a sipmesh revocation list")
        ca_id = r.take(8)
        issued_at, count = struct.unpack(">QI", r.take(12))
        if count > max(len(data) - 88, 0) // 16:
            raise TrustError("malformed", "the revocation list is truncated")
        entries = tuple(struct.unpack(">QQ", r.take(16)) for _ in range(count))
        signature = r.take(64)
        r.end()
        crl = cls(ca_id, issued_at, entries, signature)
        if ca_id != key_id(ca_public_key):
            raise TrustError("other-ca", "the revocation list is signed by another CA")
        try:
            ca_public_key.verify(signature, _CRL_CONTEXT + crl.tbs())
        except InvalidSignature:
            raise TrustError("bad-cert-signature", "the revocation list does not verify "
                                                   "against this network's CA") from None
        return crl


# ---------------------------------------------------------------------------- identity keys


def generate_identity() -> Ed25519PrivateKey:
    """A member's identity key: it signs the member's sessions, never leaves its host."""
    return Ed25519PrivateKey.generate()


def identity_public_text(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The public key as base64 (what the admin passes to ``cert issue --identity-pubkey``)."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return _key_text(_raw_public(public))


# ---------------------------------------------------------------------------- sessions


@dataclass(frozen=True)
class VerifiedPeer:
    """A peer whose session verified: what its certificate says about it. Use these
    values (not the roster's hints) for the WireGuard peer and its AllowedIPs."""

    network: str
    name: str
    address: ipaddress.IPv4Interface | ipaddress.IPv6Interface
    groups: tuple[str, ...]
    wg_pubkey: str
    serial: int
    not_after: int
    signed_at: int
    certificate: MemberCertificate = field(repr=False)


def session_message(attributes: Sequence[tuple[str, str]], *, call_id: str, from_uri: str,
                    to_uri: str, role: str) -> bytes:
    """What a=mesh-sig signs: the role, the Call-ID, From and To, then each (name, value)
    in order, every item length-prefixed so no two different sessions encode alike."""
    items = [role, call_id, from_uri, to_uri, str(len(attributes))]
    for name, value in attributes:
        items += [name, value]
    out = [SESSION_CONTEXT]
    for item in items:
        raw = item.encode("utf-8", "surrogateescape")
        out += [struct.pack(">I", len(raw)), raw]
    return b"".join(out)


def _check_role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")
    return role


def _check_bindings(attributes: Sequence[tuple[str, str]], cert: MemberCertificate) -> None:
    """a=wg-pubkey and a=mesh-ip are the certificate's."""
    values = {name: [v for n, v in attributes if n == name] for name in (WG_ATTRIBUTE, IP_ATTRIBUTE)}
    keys = values[WG_ATTRIBUTE]
    if not keys:
        raise TrustError("missing", "the session has no a=wg-pubkey")
    if any(key != cert.wg_pubkey for key in keys):
        raise TrustError("wrong-wg-key", "the WireGuard key in a=wg-pubkey is not the one in "
                         f"the member's certificate ({cert.name}): {show(keys[0])} instead "
                         f"of {cert.wg_pubkey}")
    for text in values[IP_ATTRIBUTE]:
        if not _same_address(text, cert.address):
            raise TrustError("wrong-address", f"the address in a=mesh-ip ({show(text)}) is "
                             f"not the member's address in its certificate ({cert.address})")


def _same_address(text: str, address: ipaddress.IPv4Interface | ipaddress.IPv6Interface) -> bool:
    try:
        given = ipaddress.ip_interface(text)
    except ValueError:
        return False
    return given == address if "/" in text else given.ip == address.ip


def sign_session(attributes: Sequence[tuple[str, str]], *, call_id: str, from_uri: str,
                 to_uri: str, role: str, certificate: MemberCertificate,
                 identity_key: Ed25519PrivateKey, now: float | None = None
                 ) -> list[tuple[str, str]]:
    """The three attributes to append, in this order, after `attributes` (every other
    ``a=`` line of the body, in body order: session level first, then the media
    section's, as `agent.attributes.read_attribute_list` reads them back).

    `from_uri`/`to_uri` are the dialog's From and To URIs as in the INVITE (the answer
    carries the same ones); `role` is "offer" or "answer". Raises TrustError if the
    identity key is not the certificate's, or a=wg-pubkey / a=mesh-ip are not its values
    (the peer would refuse the session; better to say so here).
    """
    _check_role(role)
    if identity_public_text(identity_key) != certificate.identity_pubkey:
        raise TrustError("wrong-identity", "the identity key is not the one in our certificate "
                         "(re-issue the certificate for this key)")
    _check_bindings(attributes, certificate)
    stamp = str(int(time.time() if now is None else now))
    signed = [*attributes, (CERT_ATTRIBUTE, certificate.to_text()), (TS_ATTRIBUTE, stamp)]
    message = session_message(signed, call_id=call_id, from_uri=from_uri, to_uri=to_uri,
                              role=role)
    return [(CERT_ATTRIBUTE, certificate.to_text()), (TS_ATTRIBUTE, stamp),
            (SIG_ATTRIBUTE, b64url(identity_key.sign(message)))]


def _one(attributes: Sequence[tuple[str, str]], name: str) -> str:
    found = [value for n, value in attributes if n == name]
    if not found:
        raise TrustError("missing", f"the session has no a={name}: the peer does not sign its "
                         "sessions (not a member of this network, or an older sipmesh?)")
    if len(found) > 1:
        raise TrustError("malformed", f"the session has a={name} {len(found)} times")
    return found[0]


def verify_session(attributes: Sequence[tuple[str, str]], call_id: str, from_uri: str,
                   to_uri: str, role: str, ca_public_key: Ed25519PublicKey,
                   revoked: Container[int] = (), now: float | None = None, *,
                   max_skew: float = MAX_SKEW, expected_name: str | None = None
                   ) -> VerifiedPeer:
    """Check a peer's offer or answer: every ``a=`` (name, value) of the body in order
    (`read_attribute_list`), the dialog's Call-ID, From and To URIs, the role the peer
    signed as ("offer" if it sent the offer). `expected_name`: the member we called or
    that the roster names as the caller, when known. Returns the peer's certified values
    or raises TrustError with the reason.

    The checks run in this order, so the message names the most specific fault: the
    certificate (CA, validity, revocation), that a=wg-pubkey and a=mesh-ip are the
    certificate's, the member's name, the timestamp, then the signature over the rest.
    """
    _check_role(role)
    now = time.time() if now is None else now
    cert_text = _one(attributes, CERT_ATTRIBUTE)
    stamp_text = _one(attributes, TS_ATTRIBUTE)
    sig_text = _one(attributes, SIG_ATTRIBUTE)
    cert = MemberCertificate.from_text(cert_text)
    cert.verify(ca_public_key, now, revoked)
    _check_bindings(attributes, cert)
    if expected_name is not None and cert.name != expected_name:
        raise TrustError("wrong-member", f"the certificate is for member {cert.name}, not "
                         f"{expected_name} (did the SIP server send the call to another member?)")
    if not _TIMESTAMP.fullmatch(stamp_text):
        raise TrustError("malformed", f"a=mesh-ts {show(stamp_text)} is not a time in seconds")
    stamp = int(stamp_text)
    if now - stamp > max_skew:
        raise TrustError("stale", f"timestamp too old (replay?): signed {int(now - stamp)} s "
                         f"ago, at most {int(max_skew)} s are accepted")
    if stamp - now > max_skew:
        raise TrustError("future", f"timestamp {int(stamp - now)} s in the future (is a clock "
                         "wrong?)")
    signature = b64url_decode(sig_text, "a=mesh-sig")
    signed = [(name, value) for name, value in attributes if name != SIG_ATTRIBUTE]
    message = session_message(signed, call_id=call_id, from_uri=from_uri, to_uri=to_uri,
                              role=role)
    try:
        cert.identity_key().verify(signature, message)
    except InvalidSignature:
        raise TrustError("bad-signature", "signature does not match the session (SDP "
                         "rewritten in transit?)") from None
    return VerifiedPeer(cert.network, cert.name, cert.address, cert.groups, cert.wg_pubkey,
                        cert.serial, cert.not_after, stamp, cert)


# ---------------------------------------------------------------------------- files


def write_text(path: Path, text: str, mode: int = 0o644) -> None:
    """Write a public file atomically (a temporary file renamed over it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            os.fchmod(f.fileno(), mode)
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_private(path: Path, key: Ed25519PrivateKey) -> None:
    """A private key in a new file of mode 0600 (created so: no moment it is wider) in a
    directory made 0700. Refuses to replace an existing file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise TrustError("exists", f"{path} exists: not replacing a key") from None
    try:
        os.write(fd, pem)
    finally:
        os.close(fd)


def _read_private(path: Path) -> Ed25519PrivateKey:
    path = Path(path)
    try:
        if path.stat().st_mode & 0o077:
            raise TrustError("permissions", f"{path} is readable by others: chmod 600 it")
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise TrustError("missing", f"cannot read {path}: {exc.strerror}") from None
    except (ValueError, TypeError):
        raise TrustError("malformed", f"{path} is not a private key in PEM") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise TrustError("malformed", f"{path} is not an Ed25519 key")
    return key


def save_identity(path: Path, key: Ed25519PrivateKey) -> None:
    _write_private(path, key)


def load_identity(path: Path) -> Ed25519PrivateKey:
    return _read_private(path)


def load_anchor(path: Path) -> TrustAnchor:
    return TrustAnchor.from_text(_read_public(path))


def load_certificate(path: Path) -> MemberCertificate:
    return MemberCertificate.from_text(_read_public(path))


def load_revocations(path: Path, ca_public_key: Ed25519PublicKey) -> RevocationList:
    return RevocationList.from_text(_read_public(path), ca_public_key)


def _read_public(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="ascii")
    except OSError as exc:
        raise TrustError("missing", f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise TrustError("malformed", f"{path} is not a text file") from None
