"""The broker's users file: digest credentials per realm, as HA1 hashes only.

One line per user and realm, whitespace-separated::

    # realm        user    MD5 HA1                            SHA-256 HA1
    example.org    alice   8d3f...                            91c2...

HA1 = H(user:realm:password) (RFC 2617 §3.2.2.2, RFC 7616 §3.4.2) for MD5 and
SHA-256. A password is never stored: whoever reads the file can authenticate in
that realm (HA1 is password-equivalent there) but learns no password that might be
reused elsewhere. The file is written atomically with mode 0600; the broker reloads
it when it changes, so users can be added while it runs.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sipmesh.sip.auth import compute_ha1

ALGORITHMS = ("MD5", "SHA-256")
_HEX = {"MD5": re.compile(r"^[0-9a-f]{32}$"), "SHA-256": re.compile(r"^[0-9a-f]{64}$")}
# A SIP user part may carry more than this, but the file format needs a token without
# whitespace and '#'; these are what people use as account names.
_NAME = re.compile(r"^[A-Za-z0-9\-_.!~*'()&=+$,;?/%]+\Z")
_REALM = re.compile(r"^[A-Za-z0-9\-_.:\[\]]+\Z")
_HEADER = ("# sipmesh broker users: realm user MD5-HA1 SHA-256-HA1 (hashes only, never passwords)\n"
           "# manage with: sipmesh broker users add|remove|list --users FILE\n")


class UsersFileError(ValueError):
    """The users file is malformed, or a name cannot be stored in it."""


@dataclass(frozen=True, slots=True)
class UserEntry:
    realm: str
    user: str
    ha1_md5: str
    ha1_sha256: str

    def ha1(self, algorithm: str) -> str | None:
        if algorithm == "MD5":
            return self.ha1_md5
        if algorithm == "SHA-256":
            return self.ha1_sha256
        return None


def check_name(user: str) -> None:
    if not _NAME.match(user):
        raise UsersFileError(f"user name {user!r} may only contain letters, digits and -_.!~*'()&=+$,;?/%")


def check_realm(realm: str) -> None:
    if not _REALM.match(realm):
        raise UsersFileError(f"realm {realm!r} must be a host name or address")


def make_entry(realm: str, user: str, password: str) -> UserEntry:
    check_realm(realm)
    check_name(user)
    return UserEntry(realm, user, compute_ha1(user, realm, password, "MD5"),
                     compute_ha1(user, realm, password, "SHA-256"))


def parse_users(text: str, source: str = "users file") -> dict[tuple[str, str], UserEntry]:
    entries: dict[tuple[str, str], UserEntry] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 4:
            raise UsersFileError(f"{source}:{number}: expected 'realm user md5-ha1 sha256-ha1', "
                                 f"found {len(fields)} fields")
        realm, user, md5, sha256 = fields
        md5, sha256 = md5.lower(), sha256.lower()
        if not _HEX["MD5"].match(md5) or not _HEX["SHA-256"].match(sha256):
            raise UsersFileError(f"{source}:{number}: the hashes must be 32 and 64 hex digits "
                                 "(is this a password? passwords are never stored here)")
        try:
            check_realm(realm)
            check_name(user)
        except UsersFileError as exc:
            raise UsersFileError(f"{source}:{number}: {exc}") from None
        entries[(realm.lower(), user)] = UserEntry(realm, user, md5, sha256)
    return entries


class UsersFile:
    """The users file, loaded; `refresh()` re-reads it if it changed on disk."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._entries: dict[tuple[str, str], UserEntry] = {}
        self._stamp: tuple[int, int, int] | None = None
        self.refresh(force=True)

    def refresh(self, *, force: bool = False) -> bool:
        """Re-read the file if it changed; True if it was (re)loaded. A missing file is empty."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            changed = self._stamp is not None or force
            self._entries, self._stamp = {}, None
            return changed
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if not force and stamp == self._stamp:
            return False
        self._entries = parse_users(self.path.read_text(encoding="utf-8"), str(self.path))
        self._stamp = stamp
        return True

    # -- queries ----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self):
        return iter(sorted(self._entries.values(), key=lambda e: (e.realm.lower(), e.user)))

    @property
    def realms(self) -> set[str]:
        return {realm for realm, _ in self._entries}

    def get(self, user: str, realm: str) -> UserEntry | None:
        return self._entries.get((realm.lower(), user))

    def exists(self, user: str, realm: str) -> bool:
        return (realm.lower(), user) in self._entries

    def ha1(self, user: str, realm: str, algorithm: str) -> str | None:
        """The `ha1_lookup` of sip.auth.DigestServer.verify."""
        entry = self._entries.get((realm.lower(), user))
        return entry.ha1(algorithm) if entry is not None else None

    # -- changes ----------------------------------------------------------------------
    def add(self, realm: str, user: str, password: str) -> bool:
        """Add or replace a user; True if it was new. Call save() to write the file."""
        entry = make_entry(realm, user, password)
        key = (realm.lower(), user)
        new = key not in self._entries
        self._entries[key] = entry
        return new

    def remove(self, realm: str, user: str) -> bool:
        return self._entries.pop((realm.lower(), user), None) is not None

    def save(self) -> None:
        """Write atomically (temporary file + rename), readable by the owner only. Root
        editing a service's file (sudo sipmesh broker users ...) leaves it the service's."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            previous: os.stat_result | None = self.path.stat()
        except FileNotFoundError:
            previous = None
        lines = [_HEADER] + [f"{e.realm} {e.user} {e.ha1_md5} {e.ha1_sha256}\n" for e in self]
        fd, tmp = tempfile.mkstemp(prefix=".users-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                os.fchmod(f.fileno(), 0o600)
                if previous is not None and os.geteuid() == 0:
                    os.fchown(f.fileno(), previous.st_uid, previous.st_gid)
                f.writelines(lines)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.refresh(force=True)
